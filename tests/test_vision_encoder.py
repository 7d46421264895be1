"""VisionEncoder parity with transformers' Qwen3OmniMoeVisionEncoder (5.23) on the tiny oracle configs:
same checkpoint, fresh random pixels, several images and a video in one call (MODEL_SPEC §6)."""

import copy

import pytest
import torch

from runtime.config import OmniConfig
from runtime.models.vision_encoder import VisionEncoder, vision_layout
from runtime.weights import load_weights
from tests.oracle import build_oracle, rel_err

TOL_FP32 = 1e-4
TOL_BF16_VS_BF16 = 5e-3  # ours and transformers both in bf16: measured ~6e-4 (bf16 noise itself is ~7e-3)

# Images of several sizes (merged grids 2x3, 3x5, 1x7 — odd and prime sides — and one larger than the
# position table, so the table is both down- and up-sampled) and a 3-frame video; two equal-size images in
# a row share one batched attention call.
GRIDS = [(1, 4, 6), (1, 6, 10), (1, 2, 14), (3, 4, 4), (1, 4, 4), (1, 12, 18)]


@pytest.fixture(scope="module", params=["pow2", "odd"])
def pair(request, tmp_path_factory):
    """(ours, transformers' vision tower) with the same weights, loaded from the saved checkpoint."""
    seed = int(torch.randint(0, 2**31, ()).item())
    tmp = tmp_path_factory.mktemp(request.param)
    oracle = build_oracle(request.param, tmp, seed=seed)
    cfg = OmniConfig.from_pretrained(tmp).thinker.vision
    with torch.device("meta"):
        ours = VisionEncoder(cfg)
    load_weights(ours, tmp, prefix="thinker.visual.")
    return request.param, seed, ours.eval(), oracle.thinker.model.visual


def random_pixels(cfg, grids, seed):
    generator = torch.Generator().manual_seed(seed)
    patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
    num_patches = sum(t * h * w for t, h, w in grids)
    return torch.randn(num_patches, patch_dim, generator=generator), torch.tensor(grids, dtype=torch.long)


@torch.no_grad()
def test_matches_transformers(pair):
    variant, seed, ours, theirs = pair
    pixels, grid_thw = random_pixels(ours.cfg, GRIDS, seed + 1)
    embeds, deepstack = ours(pixels, grid_thw)
    ref = theirs(pixels, grid_thw)
    merge = ours.cfg.spatial_merge_size ** 2
    assert embeds.shape == (pixels.shape[0] // merge, ours.cfg.out_hidden_size)
    assert len(deepstack) == len(ref.deepstack_features) == len(ours.cfg.deepstack_visual_indexes)
    errors = {"embeds": rel_err(embeds, ref.pooler_output)}
    errors.update({f"deepstack[{i}]": rel_err(d, r) for i, (d, r) in enumerate(zip(deepstack, ref.deepstack_features))})
    max_abs = (embeds - ref.pooler_output).abs().max().item()
    print(f"{variant} (seed {seed}): {', '.join(f'{k} {v:.2e}' for k, v in errors.items())}; embeds max abs {max_abs:.2e}")
    assert all(err <= TOL_FP32 for err in errors.values()), errors


@torch.no_grad()
def test_bf16_matches_transformers_bf16(pair):
    """Same dtype flow as transformers in bf16 (fp32 rotary and fp32 pos-embed weights, MODEL_SPEC §15)."""
    variant, seed, ours, theirs = pair
    ours, theirs = copy.deepcopy(ours).to(torch.bfloat16), copy.deepcopy(theirs).to(torch.bfloat16)
    pixels, grid_thw = random_pixels(ours.cfg, GRIDS, seed + 3)
    embeds, deepstack = ours(pixels, grid_thw)
    ref = theirs(pixels, grid_thw)
    assert embeds.dtype == torch.bfloat16
    errors = [rel_err(embeds, ref.pooler_output)] + [rel_err(d, r) for d, r in zip(deepstack, ref.deepstack_features)]
    print(f"{variant} bf16: {', '.join(f'{e:.2e}' for e in errors)}")
    assert max(errors) <= TOL_BF16_VS_BF16, errors


@torch.no_grad()
def test_items_are_independent(pair):
    """Encoding items together equals encoding each alone: no attention leaks across items or frames."""
    _, seed, ours, _ = pair
    grids = [(3, 4, 4), (1, 2, 14)]
    pixels, grid_thw = random_pixels(ours.cfg, grids, seed + 2)
    together, deep_together = ours(pixels, grid_thw)
    merge = ours.cfg.spatial_merge_size ** 2
    alone, deep_alone, start = [], [], 0
    for grid in grids:
        count = grid[0] * grid[1] * grid[2]
        out, deep = ours(pixels[start:start + count], torch.tensor([grid]))
        alone.append(out)
        deep_alone.append(deep)
        start += count
    assert rel_err(together, torch.cat(alone)) <= 1e-6
    for level, feature in enumerate(deep_together):
        assert rel_err(feature, torch.cat([d[level] for d in deep_alone])) <= 1e-6
    # Frames of a video do not see each other either: frame 0 alone equals frame 0 of the video.
    frame = pixels[:16]
    out, _ = ours(frame, torch.tensor([(1, 4, 4)]))
    assert rel_err(out, together[:16 // merge]) <= 1e-6


@torch.inference_mode()
def test_a_padded_frame_equals_the_general_encoder(pair):
    """forward_segment (the static form the runner captures per patch bucket): a frame's patches zero-padded to
    a larger bucket, padded patches masked as keys, gives the general encoder's rows for that frame (fp32), and
    finite padding rows; frames of every size in GRIDS, each in the next power-of-two bucket."""
    _, seed, ours, _ = pair
    merge = ours.cfg.spatial_merge_size
    for index, (t, h, w) in enumerate(GRIDS):
        pixels, grid_thw = random_pixels(ours.cfg, [(1, h, w)], seed + 10 + index)
        want, want_deep = ours(pixels, grid_thw)
        patches = h * w
        bucket = 1 << patches.bit_length()  # strictly larger: some padding in every case
        frame = vision_layout(grid_thw, merge)
        layout = torch.nn.functional.pad(torch.stack((frame.rows, frame.cols, frame.heights, frame.widths)),
                                         (0, bucket - patches), value=1)
        padded = torch.nn.functional.pad(pixels, (0, 0, 0, bucket - patches))
        got, got_deep = ours.forward_segment(padded, layout, torch.tensor([patches]))
        rows = patches // merge ** 2
        assert got.shape[0] == bucket // merge ** 2 and torch.isfinite(got).all()
        assert rel_err(got[:rows], want) <= 1e-5, (t, h, w)
        for level, feature in zip(got_deep, want_deep):
            assert rel_err(level[:rows], feature) <= 1e-5, (t, h, w)


def test_layout():
    layout = vision_layout(torch.tensor([(2, 2, 4), (1, 2, 4), (1, 4, 2)]), merge_size=2)
    # Merge-block order inside a 2x4 frame: block (0,0) then block (0,1).
    assert layout.rows[:8].tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    assert layout.cols[:8].tolist() == [0, 1, 0, 1, 2, 3, 2, 3]
    assert layout.rows[8:16].tolist() == layout.rows[:8].tolist()  # the second frame repeats the grid
    assert layout.runs == [(0, 4, 8)]  # three frames of 8 patches, then another 8: one batched call
    with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
        vision_layout(torch.tensor([(1, 3, 4)]), merge_size=2)


def test_rejects_wrong_pixel_count():
    cfg = OmniConfig.from_pretrained("tiny").thinker.vision
    encoder = VisionEncoder(cfg)
    pixels = torch.zeros(15, cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2)
    with pytest.raises(ValueError, match="pixel_values must be"):
        encoder(pixels, torch.tensor([(1, 4, 4)]))
