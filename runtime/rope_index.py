"""TM-RoPE position ids for a thinker prompt (MODEL_SPEC §4.2), as transformers 5.23's `get_rope_index`
computes them, value for value (fp32, including fractional video time ids and its quirks).

A prompt is text with multimodal spans. Each span is introduced by a start token and followed by its
end token(s); the span body is a run of placeholder tokens whose (t, h, w) ids come from the grid or the
audio length, not from the token ids:

    <audio_start> audio*N <audio_end>                          N = audio_token_count(mel frames)
    <vision_start> image*(t*h*w/M²) <vision_end>               t ids: i*position_id_per_seconds
    <vision_start> video*(t*h*w/M²) <vision_end>               t ids: i*second_per_grid*position_id_per_seconds
    <vision_start><audio_start> video|audio interleaved by t <audio_end><vision_end>   (use_audio_in_video)

Positions are laid down piece by piece with a running start `start` (fp32):
  text and start tokens continue from `start` one id per token on all three axes;
  a span body is its local (t, h, w) grid plus `start`;
  the end tokens and any following text restart from `max(last piece) + 1`.
rope_delta = max id + 1 − number of real tokens, so decode continues at `cache position + rope_delta`.

Shapes: B = batch, L = padded prompt length, n = real (unpadded) tokens of one row, M = spatial_merge_size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from runtime.config import ThinkerConfig
from runtime.frontend.audio import audio_token_count


@dataclass
class _Inputs:
    """The per-item multimodal metadata, consumed in order across the whole batch."""

    image_grids: list[tuple[int, int, int]]
    video_grids: list[tuple[int, int, int]]
    video_seconds: torch.Tensor | None  # [num_videos] fp32 seconds per temporal grid
    audio_lengths: list[int]  # audio tokens per audio
    image: int = 0
    video: int = 0
    audio: int = 0

    def next_image(self) -> tuple[int, int, int]:
        if self.image >= len(self.image_grids):
            raise ValueError(f"the prompt has more images than image_grid_thw rows ({len(self.image_grids)})")
        self.image += 1
        return self.image_grids[self.image - 1]

    def next_video(self) -> tuple[tuple[int, int, int], torch.Tensor]:
        if self.video >= len(self.video_grids):
            raise ValueError(f"the prompt has more videos than video_grid_thw rows ({len(self.video_grids)})")
        if self.video_seconds is None or self.video >= self.video_seconds.numel():
            raise ValueError("video_second_per_grid must give one value per video")
        self.video += 1
        return self.video_grids[self.video - 1], self.video_seconds[self.video - 1]

    def next_audio(self) -> int:
        if self.audio >= len(self.audio_lengths):
            raise ValueError(f"the prompt has more audios than audio_seqlens entries ({len(self.audio_lengths)})")
        self.audio += 1
        return self.audio_lengths[self.audio - 1]


def _run(length: int, start: torch.Tensor) -> torch.Tensor:
    """[3, length] fp32: one id per token from `start`, the same on t, h and w."""
    return (torch.arange(length, dtype=torch.float32) + start).expand(3, -1)


def _vision_grid(grid: tuple[int, int, int], merge: int, t_step: torch.Tensor | float) -> torch.Tensor:
    """[3, t*(h/M)*(w/M)] fp32 local (t, h, w) ids of a merged image/video grid, temporal group outermost.

    t ids are `i * t_step` (kept fractional), h ids the merged row, w ids the merged column.
    """
    frames, rows, cols = grid[0], grid[1] // merge, grid[2] // merge
    t = torch.arange(frames, dtype=torch.float32) * t_step  # [frames]
    t = t.view(-1, 1, 1).expand(frames, rows, cols)
    h = torch.arange(rows, dtype=torch.float32).view(1, -1, 1).expand(frames, rows, cols)
    w = torch.arange(cols, dtype=torch.float32).view(1, 1, -1).expand(frames, rows, cols)
    return torch.stack((t.reshape(-1), h.reshape(-1), w.reshape(-1)))


def _sequence_positions(ids: list[int], items: _Inputs, cfg: ThinkerConfig, merge: int,
                        use_audio_in_video: bool) -> torch.Tensor:
    """[3, n] fp32 positions of one unpadded sequence."""
    pieces: list[torch.Tensor] = []  # [3, k] each, in sequence order
    pps = cfg.position_id_per_seconds
    starts = (cfg.vision_start_token_id, cfg.audio_start_token_id)

    def after_last_piece() -> torch.Tensor:
        return pieces[-1].max() + 1 if pieces else torch.tensor(0.0)

    cursor = 0  # index of the first token not yet given a position
    while True:
        span = next((i for i in range(cursor, len(ids)) if ids[i] in starts), None)
        if span is None:
            break
        start = after_last_piece()
        if span > cursor:  # text before the span
            pieces.append(_run(span - cursor, start))
            start = start + (span - cursor)

        is_vision = ids[span] == cfg.vision_start_token_id
        inner = ids[span + 1] if span + 1 < len(ids) else None
        with_audio = is_vision and inner == cfg.audio_start_token_id
        if with_audio and not use_audio_in_video:
            raise ValueError(f"token {span}: <vision_start><audio_start> (audio in video) needs use_audio_in_video=True")
        num_start = 2 if with_audio else 1
        pieces.append(_run(num_start, start))
        start = start + num_start

        if not is_vision:  # audio
            body = _run(items.next_audio(), start)
            pieces.append(body)
            body_len = body.shape[1]
        elif inner == cfg.image_token_id:
            grid = items.next_image()
            pieces.append(_vision_grid(grid, merge, pps) + start)
            body_len = pieces[-1].shape[1]
        elif inner == cfg.video_token_id or with_audio:
            grid, seconds = items.next_video()
            # (i * seconds) * pps in fp32, the order transformers multiplies in.
            video = _vision_grid(grid, merge, 1.0)
            video[0] = video[0] * seconds * pps
            video = video + start
            if not with_audio:
                pieces.append(video)
                body_len = video.shape[1]
            else:
                audio = _run(items.next_audio(), start)
                pieces.extend(_interleave_by_time(video, audio))
                body_len = video.shape[1] + audio.shape[1]
        else:
            raise ValueError(f"token {span}: <vision_start> must be followed by an image, video or "
                             f"<audio_start> token, got id {inner}")

        num_end = num_start
        end = span + num_start + body_len + num_end  # index after the span
        if end > len(ids):
            raise ValueError(f"the multimodal span at token {span} needs {end - span} tokens "
                             f"(from its grid / audio length) but the sequence ends after {len(ids) - span}")
        pieces.append(_run(num_end, after_last_piece()))
        cursor = end

    if cursor < len(ids):  # trailing text
        pieces.append(_run(len(ids) - cursor, after_last_piece()))
    if not pieces:
        return torch.zeros(3, 0)
    return torch.cat(pieces, dim=1)


def _interleave_by_time(video: torch.Tensor, audio: torch.Tensor) -> list[torch.Tensor]:
    """Audio-in-video body: video [3, V] and audio [3, A] ids merged by t, video first on ties.

    Returns the merged ids as two pieces, [everything before the trailing run, the trailing run], where
    the trailing run is the tail of whichever stream outlasts the other. transformers restarts the end
    tokens from the max of that run only, not of the whole span (MODEL_SPEC §4.2 says "max so far"; the
    two differ when an audio tail ends below the video's h/w ids), so the split is kept for that.
    """
    both = torch.cat((video, audio), dim=1)  # [3, V + A]
    is_video = torch.cat((torch.ones(video.shape[1], dtype=torch.bool), torch.zeros(audio.shape[1], dtype=torch.bool)))
    order = torch.sort(both[0], stable=True).indices  # stable: video (listed first) wins ties
    merged, is_video = both[:, order], is_video[order]
    if merged.shape[1] == 0:
        return [merged]
    # Trailing run: after the last element of the stream that ran out first.
    other = ~is_video if is_video[-1] else is_video
    last_other = int(other.nonzero().max()) if other.any() else -1
    return [merged[:, :last_other + 1], merged[:, last_other + 1:]]


def get_rope_index(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   image_grid_thw: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None,
                   audio_seqlens: torch.Tensor | None = None, video_second_per_grid: torch.Tensor | None = None,
                   use_audio_in_video: bool = False, *, config: ThinkerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """TM-RoPE ids of a (left-padded) prompt batch.

    input_ids: [B, L] int64.
    attention_mask: [B, L], 1 = real token, 0 = padding; None = nothing padded.
    image_grid_thw / video_grid_thw: [num_images|num_videos, 3] int (t, h, w) in patch units, items in
      batch-then-sequence order.
    audio_seqlens: [num_audios] int, **log-mel frame counts** (feature_attention_mask.sum(-1)), the same
      input transformers takes; the token count per audio is `audio_token_count(frames, n_window)`.
    video_second_per_grid: [num_videos] seconds per temporal grid (temporal_patch_size / fps).
    use_audio_in_video: videos are `<vision_start><audio_start> interleaved <audio_end><vision_end>` spans
      that consume one video and one audio each.
    config: token ids, position_id_per_seconds, vision spatial_merge_size and audio n_window.

    Returns (position_ids [3, B, L] fp32, rope_deltas [B, 1] fp32).

    Like transformers, a prompt without image/video grids takes the plain branch: cumulative positions of
    the real tokens, padding at id 1, and rope_delta computed from the max including those padding ids.
    With grids, padding gets id 0.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got {tuple(input_ids.shape)}")
    batch, length = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones(batch, length, dtype=torch.long, device=device)
    real = attention_mask == 1  # [B, L]

    if image_grid_thw is None and video_grid_thw is None:
        positions = real.float().cumsum(-1) - 1  # [B, L]
        positions = positions.masked_fill(~real, 1.0)
        deltas = positions.max(-1, keepdim=True).values + 1 - real.sum(-1, keepdim=True)  # [B, 1]
        return positions.unsqueeze(0).expand(3, -1, -1), deltas

    to_grids = lambda grid: [] if grid is None else [tuple(int(v) for v in row) for row in grid.tolist()]  # noqa: E731
    n_window = config.audio.n_window
    items = _Inputs(
        image_grids=to_grids(image_grid_thw),
        video_grids=to_grids(video_grid_thw),
        video_seconds=None if video_second_per_grid is None else video_second_per_grid.detach().cpu().float().reshape(-1),
        audio_lengths=[] if audio_seqlens is None else
        [audio_token_count(int(frames), n_window) for frames in audio_seqlens.reshape(-1).tolist()],
    )
    position_ids = torch.zeros(3, batch, length, dtype=torch.float32)
    deltas = torch.zeros(batch, 1, dtype=torch.float32)
    merge = config.vision.spatial_merge_size
    for row in range(batch):
        ids = input_ids[row][real[row]].tolist()
        positions = _sequence_positions(ids, items, config, merge, use_audio_in_video)  # [3, n]
        if positions.shape[1] != len(ids):
            raise ValueError(f"row {row}: built {positions.shape[1]} positions for {len(ids)} tokens")
        position_ids[:, row, real[row].cpu()] = positions
        if ids:
            deltas[row] = positions.max() + 1 - len(ids)
    return position_ids.to(device), deltas.to(device)


def decode_position_ids(rope_deltas: torch.Tensor, cache_len: int, num_tokens: int = 1,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[3, B, num_tokens] fp32 ids of the next `num_tokens` text tokens after `cache_len` cached ones.

    rope_deltas: [B, 1] from get_rope_index.
    attention_mask: [B, cache_len + num_tokens] (1 = real token) for a left-padded batch; the position of a
      token is then the number of real tokens before it, plus its row's delta. None: no padding, so the
      position is its index in the cache plus the delta. Every axis gets the same id.
    """
    deltas = rope_deltas.to(torch.float32)
    if attention_mask is None:
        index = torch.arange(cache_len, cache_len + num_tokens, dtype=torch.float32, device=deltas.device)
        index = index.expand(deltas.shape[0], -1)  # [B, num_tokens]
    else:
        index = attention_mask.long().cumsum(-1)[:, -num_tokens:].float() - 1  # [B, num_tokens]
    return (index + deltas).unsqueeze(0).expand(3, -1, -1)
