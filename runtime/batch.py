"""Offline generation as the engine run to completion: a batch of prompt rows becomes one session per row in
the same scheduler that serves streams, and their streamed events are assembled into the batch result
transformers' `generate` returns.

- `check_prompt`: the errors a prompt batch must raise before any model work.
- `split_rows`: a left-padded prompt batch -> one unpadded prompt per row, each with its own encoder inputs.
  The audio encoder's result depends on which audios share its call (its chunk padding, runtime/models/
  audio_encoder.py), so a batch's audios are encoded together here, as transformers does, and each row gets
  its share of that output.
- `assemble`: each row's events -> sequences, codes, waveform, counts (runtime.engine.GenerateResult).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from runtime.frontend.audio import audio_token_count
from runtime.models.thinker import MultimodalInputs
from runtime.streaming import AudioChunk, TextDelta


@dataclass
class EncodedAudioInputs(MultimodalInputs):
    """One row's encoder inputs whose audios were already encoded with the rest of their batch: `audio_embeds`
    [the row's audio tokens, H] (runtime/runner.py merges them instead of running the encoder again)."""

    audio_embeds: torch.Tensor | None = None


def check_prompt(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int,
                 limit: int) -> None:
    """Empty prompts or rows, and a prompt + max_new_tokens beyond the thinker's context (`limit`)."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got {tuple(input_ids.shape)}")
    batch, length = input_ids.shape
    if batch == 0 or length == 0:
        raise ValueError(f"empty prompt: input_ids has shape {tuple(input_ids.shape)}; give at least one token per row")
    if attention_mask is not None:
        empty_rows = (attention_mask.sum(-1) == 0).nonzero().flatten().tolist()
        if empty_rows:
            raise ValueError(f"empty prompt: rows {empty_rows} of attention_mask have no real token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if length + max_new_tokens > limit:
        raise ValueError(f"prompt length {length} + max_new_tokens {max_new_tokens} = {length + max_new_tokens} "
                         f"exceeds the thinker's max_position_embeddings {limit}")


def split_rows(prompt, thinker) -> list:
    """prompt: runtime.engine.Prompt [B, L] -> B prompts of one row each, leading padding dropped, each with
    the encoder inputs its placeholders stand for (items are in batch-then-sequence order)."""
    ids, mask, inputs = prompt.input_ids, prompt.attention_mask, prompt.inputs
    if ids.shape[0] == 1:
        return [prompt]
    cfg = thinker.cfg
    merge = cfg.vision.spatial_merge_size
    frames = inputs.audio_frames()
    audio_tokens = [] if frames is None else [audio_token_count(int(n), cfg.audio.n_window) for n in frames]
    image_tokens = _grid_tokens(inputs.image_grid_thw, merge)
    video_tokens = _grid_tokens(inputs.video_grid_thw, merge)
    audio_embeds = thinker.encode_audio(inputs) if audio_tokens else None  # [all audio tokens, H]
    taken = dict(audio=0, image=0, video=0)
    rows = []
    for row in range(ids.shape[0]):
        row_ids = ids[row:row + 1] if mask is None else ids[row:row + 1, mask[row].bool()]
        parts = {}
        for kind, token, counts in (("audio", cfg.audio_token_id, audio_tokens),
                                    ("image", cfg.image_token_id, image_tokens),
                                    ("video", cfg.video_token_id, video_tokens)):
            parts[kind] = _items_for(kind, int((row_ids == token).sum()), counts, taken[kind])
            taken[kind] = parts[kind].stop
        row_inputs = EncodedAudioInputs(use_audio_in_video=inputs.use_audio_in_video)
        audios, images, videos = parts["audio"], parts["image"], parts["video"]
        if audios.stop > audios.start:
            start = sum(audio_tokens[:audios.start])
            row_inputs.input_features = inputs.input_features[audios]
            row_inputs.feature_attention_mask = (None if inputs.feature_attention_mask is None
                                                 else inputs.feature_attention_mask[audios])
            row_inputs.audio_embeds = audio_embeds[start:start + sum(audio_tokens[audios])]
        if images.stop > images.start:
            row_inputs.pixel_values = inputs.pixel_values[_patches(inputs.image_grid_thw, images)]
            row_inputs.image_grid_thw = inputs.image_grid_thw[images]
        if videos.stop > videos.start:
            row_inputs.pixel_values_videos = inputs.pixel_values_videos[_patches(inputs.video_grid_thw, videos)]
            row_inputs.video_grid_thw = inputs.video_grid_thw[videos]
            if inputs.video_second_per_grid is not None:
                row_inputs.video_second_per_grid = inputs.video_second_per_grid[videos]
        rows.append(type(prompt)(row_ids, None, row_inputs))
    return rows


def _grid_tokens(grid: torch.Tensor | None, merge: int) -> list[int]:
    return [] if grid is None else [int(n) // merge ** 2 for n in grid.prod(-1)]


def _patches(grid: torch.Tensor, items: slice) -> slice:
    """The rows of pixel_values that belong to grid items [items.start, items.stop)."""
    sizes = grid.prod(-1).tolist()
    return slice(sum(sizes[:items.start]), sum(sizes[:items.stop]))


def _items_for(kind: str, tokens: int, counts: list[int], first: int) -> slice:
    """The items (audios, images or videos), from `first` on, whose placeholder tokens make up `tokens`."""
    end, total = first, 0
    while total < tokens and end < len(counts):
        total, end = total + counts[end], end + 1
    if total != tokens:
        raise ValueError(f"a prompt row has {tokens} {kind} placeholder tokens, which the {kind} inputs left for "
                         f"it ({len(counts) - first} items, in batch order) do not match")
    return slice(first, end)


@dataclass
class RowResult:
    tokens: list[int]  # generated tokens, EOS included when the row stopped on it
    codes: torch.Tensor | None  # [G, frames]
    samples: torch.Tensor | None  # [samples] float32


def row_result(events: list, max_new_tokens: int, eos_token_id: int, speaks: bool) -> RowResult:
    """One row's events -> its result. A TextDelta carries every generated token but the EOS, so fewer tokens
    than max_new_tokens means the row stopped on EOS."""
    tokens = [t for e in events if isinstance(e, TextDelta) for t in e.token_ids]
    if len(tokens) < max_new_tokens:
        tokens.append(eos_token_id)
    audio = [e for e in events if isinstance(e, AudioChunk)]
    if not speaks:
        return RowResult(tokens, None, None)
    if not audio:
        return RowResult(tokens, None, torch.zeros(0))
    return RowResult(tokens, torch.cat([c.codes for c in audio], dim=-1), torch.cat([c.samples for c in audio]))


def assemble(rows: list[RowResult], prompt_ids: torch.Tensor, eos_token_id: int, num_code_groups: int):
    """(sequences [B, L + n] with pad_token_id = EOS after a row stops, codes [B, G, F] zeros past a row's frames,
    num_frames [B], waveform [B, S] zeros past a row's samples, num_samples [B]); codes onward None without speech."""
    width = max(len(r.tokens) for r in rows)
    new = torch.full((len(rows), width), eos_token_id, dtype=torch.long)
    for i, r in enumerate(rows):
        new[i, :len(r.tokens)] = torch.tensor(r.tokens, dtype=torch.long)
    sequences = torch.cat((prompt_ids, new.to(prompt_ids.device)), dim=1)
    if rows[0].samples is None:
        return sequences, None, None, None, None
    frames = torch.tensor([0 if r.codes is None else r.codes.shape[-1] for r in rows])
    lengths = torch.tensor([r.samples.numel() for r in rows])
    codes = torch.zeros(len(rows), num_code_groups, int(frames.max()), dtype=torch.long, device=prompt_ids.device)
    waveform = torch.zeros(len(rows), int(lengths.max()), dtype=torch.float32, device=prompt_ids.device)
    for i, r in enumerate(rows):
        if r.codes is not None:
            codes[i, :, :r.codes.shape[-1]] = r.codes
        waveform[i, :r.samples.numel()] = r.samples
    return sequences, codes, frames, waveform, lengths
