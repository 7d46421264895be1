"""TM-RoPE position ids (MODEL_SPEC §4.2): ours equal transformers' `get_rope_index` exactly, on random
prompts mixing text, audio, images, videos (fractional seconds per grid), audio-in-video and left padding,
and on the measured examples of the spec."""

from __future__ import annotations

import random

import pytest
import torch

from runtime.config import OmniConfig
from runtime.frontend.audio import audio_token_count
from runtime.rope_index import decode_position_ids, get_rope_index
from tests.oracle import build_oracle

VARIANTS = ["pow2", "odd"]
PAD = 0


@pytest.fixture(scope="module", params=VARIANTS)
def oracle(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    model = build_oracle(request.param, path, seed=int(torch.randint(0, 2**31, ()).item()))
    return model.thinker, OmniConfig.from_pretrained(path).thinker


class PromptBuilder:
    """Random prompts laid out the way the processor lays them out, with their multimodal metadata."""

    def __init__(self, cfg, rng: random.Random):
        self.cfg, self.rng = cfg, rng
        self.merge = cfg.vision.spatial_merge_size
        special = {cfg.audio_token_id, cfg.image_token_id, cfg.video_token_id, cfg.audio_start_token_id,
                   cfg.vision_start_token_id}
        self.text_ids = [i for i in range(1, 470) if i not in special]
        self.image_grids, self.video_grids, self.seconds, self.audio_frames = [], [], [], []

    def text(self, n):
        return [self.rng.choice(self.text_ids) for _ in range(n)]

    def grid(self, frames):
        return (frames, self.merge * self.rng.randint(1, 4), self.merge * self.rng.randint(1, 4))

    def audio(self):
        frames = self.rng.choice([self.rng.randint(1, 99), self.rng.randint(100, 350), 100, 200])
        self.audio_frames.append(frames)
        n = audio_token_count(frames, self.cfg.audio.n_window)
        return [self.cfg.audio_start_token_id] + [self.cfg.audio_token_id] * n + [self.cfg.audio_start_token_id + 1]

    def image(self):
        grid = self.grid(1)
        self.image_grids.append(grid)
        n = grid[0] * grid[1] * grid[2] // self.merge ** 2
        return [self.cfg.vision_start_token_id] + [self.cfg.image_token_id] * n + [self.cfg.vision_start_token_id + 1]

    def video(self, with_audio: bool):
        grid = self.grid(self.rng.randint(1, 4))
        seconds = self.rng.choice([2.0, 0.5, 1.0, 2 / 3, self.rng.uniform(0.1, 3.0)])
        self.video_grids.append(grid)
        self.seconds.append(seconds)
        per_frame = grid[1] * grid[2] // self.merge ** 2
        vs, ve = self.cfg.vision_start_token_id, self.cfg.vision_start_token_id + 1
        if not with_audio:
            return [vs] + [self.cfg.video_token_id] * (grid[0] * per_frame) + [ve]
        frames = self.rng.randint(1, 400)
        self.audio_frames.append(frames)
        num_audio = audio_token_count(frames, self.cfg.audio.n_window)
        # The processor's order: by time, video before audio on ties (video t = i * seconds * 13, audio t = j).
        pps = self.cfg.position_id_per_seconds
        video_t = [float(torch.tensor(float(i)) * torch.tensor(seconds, dtype=torch.float32) * pps)
                   for i in range(grid[0]) for _ in range(per_frame)]
        body, v, a = [], 0, 0
        while v < len(video_t) or a < num_audio:
            if a == num_audio or (v < len(video_t) and video_t[v] <= a):
                body.append(self.cfg.video_token_id)
                v += 1
            else:
                body.append(self.cfg.audio_token_id)
                a += 1
        au_s, au_e = self.cfg.audio_start_token_id, self.cfg.audio_start_token_id + 1
        return [vs, au_s] + body + [au_e, ve]

    def prompt(self, use_audio_in_video: bool, kinds=("audio", "image", "video")):
        ids = self.text(self.rng.randint(0, 4))
        for _ in range(self.rng.randint(1, 4)):
            kind = self.rng.choice(kinds)
            ids += self.audio() if kind == "audio" else self.image() if kind == "image" else self.video(use_audio_in_video)
            ids += self.text(self.rng.randint(0, 3))
        return ids

    def batch(self, rows):
        """Left-padded [B, L] ids and mask."""
        length = max(len(r) for r in rows)
        ids = torch.tensor([[PAD] * (length - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
        return ids, mask

    def metadata(self):
        as_tensor = lambda grids: torch.tensor(grids, dtype=torch.long).view(-1, 3) if grids else None  # noqa: E731
        return dict(image_grid_thw=as_tensor(self.image_grids), video_grid_thw=as_tensor(self.video_grids),
                    audio_seqlens=torch.tensor(self.audio_frames, dtype=torch.long) if self.audio_frames else None,
                    video_second_per_grid=torch.tensor(self.seconds) if self.seconds else None)


def compare(theirs, cfg, ids, mask, meta, use_audio_in_video):
    ours_pos, ours_delta = get_rope_index(ids, mask, meta["image_grid_thw"], meta["video_grid_thw"],
                                          meta["audio_seqlens"], meta["video_second_per_grid"], use_audio_in_video,
                                          config=cfg)
    # transformers needs a mask; ours treats None as "nothing padded".
    ref_mask = torch.ones_like(ids) if mask is None else mask
    ref_pos, ref_delta = theirs.get_rope_index(
        ids, meta["image_grid_thw"], meta["video_grid_thw"], ref_mask, use_audio_in_video, meta["audio_seqlens"],
        meta["video_second_per_grid"])
    assert ours_pos.dtype == ref_pos.dtype == torch.float32
    diff = (ours_pos - ref_pos).abs()
    assert torch.equal(ours_pos, ref_pos), f"max abs diff {diff.max().item()} at {diff.nonzero()[:5].tolist()}"
    assert torch.equal(ours_delta.float(), ref_delta.float().view(-1, 1)), (ours_delta, ref_delta)
    return ours_pos, ours_delta


@pytest.mark.parametrize("use_audio_in_video", [False, True])
def test_random_prompts_equal_transformers(oracle, use_audio_in_video):
    theirs, cfg = oracle
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    for trial in range(25):
        builder = PromptBuilder(cfg, rng)
        rows = [builder.prompt(use_audio_in_video) for _ in range(rng.randint(1, 3))]
        ids, mask = builder.batch(rows)
        try:
            compare(theirs, cfg, ids, mask, builder.metadata(), use_audio_in_video)
        except AssertionError as err:
            raise AssertionError(f"seed {seed}, trial {trial}: {err}") from None


def test_text_and_audio_only_take_the_plain_branch(oracle):
    """No grids: cumulative positions, padding at 1, as transformers (even with audio spans)."""
    theirs, cfg = oracle
    builder = PromptBuilder(cfg, random.Random())
    rows = [builder.text(7), builder.text(2) + builder.audio() + builder.text(1), builder.text(1)]
    ids, mask = builder.batch(rows)
    pos, delta = compare(theirs, cfg, ids, mask, builder.metadata(), False)
    assert pos[0, 0, -1].item() == 6 and pos[0, 2, 0].item() == 1  # real token, padding


def test_audio_in_video_end_tokens_restart_from_the_last_run(oracle):
    """A short audio inside a tall video: all video tokens come first (t = start), then the audio tail. The
    end tokens restart from the audio tail's max, below the video's h/w ids (transformers' behaviour)."""
    theirs, cfg = oracle
    m = cfg.vision.spatial_merge_size
    builder = PromptBuilder(cfg, random.Random())
    builder.video_grids, builder.seconds, builder.audio_frames = [(1, 8 * m, 2 * m)], [2.0], [20]  # 3 tokens
    vs, au = cfg.vision_start_token_id, cfg.audio_start_token_id
    ids = [5, vs, au] + [cfg.video_token_id] * 16 + [cfg.audio_token_id] * 3 + [au + 1, vs + 1, 6]
    pos, _ = compare(theirs, cfg, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), builder.metadata(), True)
    assert pos[1, 0, 3:19].max().item() == 3 + 7  # video h ids reach start + 7
    assert pos[:, 0, 22].tolist() == [6.0, 6.0, 6.0]  # <audio_end> after the audio tail (3, 4, 5)


def test_measured_examples_of_the_spec(oracle):
    """MODEL_SPEC §4.2 (merge 2, 13 ids per second)."""
    theirs, cfg = oracle
    if cfg.vision.spatial_merge_size != 2 or cfg.position_id_per_seconds != 13:
        pytest.skip("the spec's examples are for merge 2 and 13 ids/s")
    vs, ve, img, vid = cfg.vision_start_token_id, cfg.vision_start_token_id + 1, cfg.image_token_id, cfg.video_token_id
    meta = dict(image_grid_thw=torch.tensor([[1, 4, 6]]), video_grid_thw=None, audio_seqlens=None,
                video_second_per_grid=None)
    ids = torch.tensor([[10, 11, vs] + [img] * 6 + [ve, 12, 13]])
    pos, delta = compare(theirs, cfg, ids, None, meta, False)
    assert pos[0, 0].tolist() == [0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7, 8]
    assert pos[1, 0].tolist() == [0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7, 8]
    assert pos[2, 0].tolist() == [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7, 8]
    assert delta.item() == -3

    meta = dict(image_grid_thw=None, video_grid_thw=torch.tensor([[3, 4, 4]]), audio_seqlens=None,
                video_second_per_grid=torch.tensor([2.0]))
    ids = torch.tensor([[10, vs] + [vid] * 12 + [ve]])
    pos, _ = compare(theirs, cfg, ids, torch.ones_like(ids), meta, False)
    assert pos[0, 0, 2:14].unique().tolist() == [2, 28, 54]
    assert pos[1, 0, 2:6].tolist() == [2, 2, 3, 3] and pos[2, 0, 2:6].tolist() == [2, 3, 2, 3]
    assert pos[0, 0, 14].item() == 55

    # Audio in video: 250 mel frames -> 33 audio tokens; video grid (2, 4, 4) at 1 s per grid -> t 3 and 16.
    au, au_end = cfg.audio_start_token_id, cfg.audio_start_token_id + 1
    meta = dict(image_grid_thw=None, video_grid_thw=torch.tensor([[2, 4, 4]]), audio_seqlens=torch.tensor([250]),
                video_second_per_grid=torch.tensor([1.0]))
    body = [vid] * 4 + [aud for aud in [cfg.audio_token_id] * 13] + [vid] * 4 + [cfg.audio_token_id] * 20
    ids = torch.tensor([[10, vs, au] + body + [au_end, ve, 11]])
    pos, _ = compare(theirs, cfg, ids, None, meta, True)
    t = pos[0, 0].tolist()
    assert t[1:3] == [1, 2] and t[3:7] == [3] * 4 and t[7:20] == list(range(3, 16))
    assert t[20:24] == [16] * 4 and t[24:44] == list(range(16, 36)) and t[44:] == [36, 37, 38]

    # Decode after the image example with 6 more text tokens (18 tokens, max id 14): [15]*3, then [16]*3.
    meta = dict(image_grid_thw=torch.tensor([[1, 4, 6]]), video_grid_thw=None, audio_seqlens=None,
                video_second_per_grid=None)
    ids = torch.tensor([[10, 11, vs] + [img] * 6 + [ve] + [12] * 8])
    pos, delta = compare(theirs, cfg, ids, None, meta, False)
    assert pos.max().item() == 14 and delta.item() == -3
    assert decode_position_ids(delta, 18)[:, 0, 0].tolist() == [15.0] * 3
    assert decode_position_ids(delta, 19)[:, 0, 0].tolist() == [16.0] * 3
    # The same prompt left-padded by 4: the mask, not the cache length, counts the tokens before.
    padded = torch.cat((torch.full((1, 4), PAD), ids), dim=1)
    mask = (torch.arange(22) >= 4).long()[None]
    _, delta = compare(theirs, cfg, padded, mask, meta, False)
    step = torch.cat((mask, torch.ones(1, 1, dtype=torch.long)), dim=1)
    assert decode_position_ids(delta, 22, 1, step)[:, 0, 0].tolist() == [15.0] * 3


def test_decode_positions_continue_the_prompt(oracle):
    """Appending text tokens to a prompt gives the ids decode_position_ids predicts (cache + delta)."""
    theirs, cfg = oracle
    rng = random.Random()
    builder = PromptBuilder(cfg, rng)
    rows = [builder.prompt(False) + builder.text(1) for _ in range(2)]
    ids, mask = builder.batch(rows)
    meta = builder.metadata()
    _, delta = compare(theirs, cfg, ids, mask, meta, False)
    extra = torch.tensor([builder.text(3) for _ in range(2)])
    full_ids = torch.cat((ids, extra), dim=1)
    full_mask = torch.cat((mask, torch.ones_like(extra)), dim=1)
    full, _ = compare(theirs, cfg, full_ids, full_mask, meta, False)
    step = decode_position_ids(delta, ids.shape[1], 3, full_mask)
    assert torch.equal(step, full[:, :, -3:])


def test_bad_metadata_raises(oracle):
    _, cfg = oracle
    vs, img = cfg.vision_start_token_id, cfg.image_token_id
    ids = torch.tensor([[1, vs] + [img] * 4 + [vs + 1]])
    with pytest.raises(ValueError, match="more images than image_grid_thw rows"):
        get_rope_index(ids, video_grid_thw=torch.tensor([[1, 2, 2]]), config=cfg)
    with pytest.raises(ValueError, match="needs 8 tokens"):
        get_rope_index(ids, image_grid_thw=torch.tensor([[1, 2 * 2, 3 * 2]]), config=cfg)
