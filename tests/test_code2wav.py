"""Code2Wav (MODEL_SPEC §10): parity of the full decode with transformers' Qwen3OmniMoeCode2Wav (5.23) on
the tiny oracle configs, the stateful stream against our own full decode, and the causal conv reference
ops (kernels/conv.py) against independent formulations, including their streaming state and padded slots."""

import random

import pytest
import torch
import torch.nn.functional as F

from kernels.conv import (causal_conv1d_ref, causal_conv1d_update_ref, causal_conv_transpose1d_ref,
                          causal_conv_transpose1d_update_ref, transpose_output_length)
from runtime import dispatch
from runtime.config import OmniConfig
from runtime.models.code2wav import Code2Wav
from runtime.presets import PRESETS
from runtime.weights import load_weights
from tests.oracle import build_oracle, rel_err

TOL_ORACLE = 1e-4  # fp32, ours vs transformers: measured 0 (pow2) and ~3e-7 (odd)
TOL_STREAM = 1e-5  # fp32, stream vs our full decode: measured ~2e-7 to 5e-7
TOL_OP = 1e-6  # fp32, conv refs vs independent formulations / streamed vs full: measured ~1e-7


# ---- model ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["pow2", "odd"])
def pair(request, tmp_path_factory):
    """(variant, seed, ours, transformers' code2wav) with the same weights, loaded from the saved checkpoint."""
    seed = int(torch.randint(0, 2**31, ()).item())
    tmp = tmp_path_factory.mktemp(request.param)
    oracle = build_oracle(request.param, tmp, seed=seed)
    cfg = OmniConfig.from_pretrained(tmp).code2wav
    with torch.device("meta"):
        ours = Code2Wav(cfg)
    load_weights(ours, tmp, prefix="code2wav.")
    return request.param, seed, ours.eval(), oracle.code2wav


def random_codes(cfg, batch, frames, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.codebook_size, (batch, cfg.num_quantizers, frames), generator=generator)


def stream(model, codes, chunks):
    """Decode `codes` through one stream in chunks of the given frame counts; returns (pieces, state)."""
    state = model.new_state(codes.shape[0])
    pieces, start = [], 0
    for size in chunks:
        pieces.append(model.decode_step(codes[..., start:start + size], state))
        start += size
    assert start == codes.shape[-1]
    pieces.append(model.flush(state))
    return pieces, state


@torch.no_grad()
@pytest.mark.parametrize("frames", [1, 2, 19])
def test_matches_transformers(pair, frames):
    variant, seed, ours, theirs = pair
    codes = random_codes(ours.cfg, 2, frames, seed + frames)
    wav, ref = ours(codes), theirs(codes)
    assert wav.shape == ref.shape == (2, 1, ours.num_samples(frames))
    err, max_abs = rel_err(wav, ref), (wav - ref).abs().max().item()
    print(f"{variant} (seed {seed}) L={frames}: rel err {err:.2e}, max abs {max_abs:.2e}, "
          f"clamped {(ref.abs() >= 1).float().mean().item():.1%}")
    assert err <= TOL_ORACLE


@torch.no_grad()
def test_stream_frame_by_frame_equals_full(pair):
    variant, seed, ours, _ = pair
    frames = 3 * ours.cfg.sliding_window + 4  # the KV window slides several times
    codes = random_codes(ours.cfg, 2, frames, seed + 100)
    full = ours(codes)
    pieces, state = stream(ours, codes, [1] * frames)
    # Frame n emits exactly the samples it made final: num_samples(n + 1) − num_samples(n).
    assert [p.shape[-1] for p in pieces[:-1]] == [ours.num_samples(n + 1) - ours.num_samples(n) for n in range(frames)]
    assert pieces[-1].shape == (2, 1, 0)  # flush: nothing pending that the full decode keeps
    streamed = torch.cat(pieces, dim=-1)
    assert streamed.shape == full.shape and state.samples == full.shape[-1]
    err = rel_err(streamed, full)
    print(f"{variant} frame-by-frame over {frames} frames: rel err {err:.2e}")
    assert err <= TOL_STREAM
    # The stream keeps what later frames can still see, nothing more.
    keep = ours.cfg.sliding_window - 1
    assert state.frames == frames
    assert all(k.shape == (2, keep, ours.cfg.num_kv_heads, ours.cfg.head_dim) for k in state.keys)
    assert all(state.consumed[key] > 0 for key in state.tails)


@torch.no_grad()
def test_stream_uneven_chunks_equals_full(pair):
    variant, seed, ours, _ = pair
    rng = random.Random(seed)
    chunks = [3, 1, 7, 2, 0, 1, 2 * ours.cfg.sliding_window + 1] + [rng.randint(1, 6) for _ in range(4)]
    codes = random_codes(ours.cfg, 3, sum(chunks), seed + 200)
    full = ours(codes)
    pieces, _ = stream(ours, codes, chunks)
    emitted, done = [], 0
    for size in chunks:
        emitted.append(ours.num_samples(done + size) - ours.num_samples(done))
        done += size
    assert [p.shape[-1] for p in pieces[:-1]] == emitted
    err = rel_err(torch.cat(pieces, dim=-1), full)
    print(f"{variant} chunks {chunks}: rel err {err:.2e}")
    assert err <= TOL_STREAM


@torch.no_grad()
def test_emission_is_as_early_as_possible(pair):
    """After n frames the stream has emitted num_samples(n) samples: these do not depend on frame n, and the
    next sample does, so no final sample is held back."""
    _, seed, ours, _ = pair
    frames, n = 12, 7
    codes = random_codes(ours.cfg, 1, frames, seed + 300)
    changed = codes.clone()
    changed[..., n] = (changed[..., n] + 1) % ours.cfg.codebook_size
    a, b = ours(codes), ours(changed)
    ready = ours.num_samples(n)
    assert torch.allclose(a[..., :ready], b[..., :ready], rtol=0, atol=1e-7)
    assert (a[..., ready] - b[..., ready]).abs().item() > 1e-7


def test_convs_go_through_dispatch(pair, monkeypatch):
    _, seed, ours, _ = pair
    calls = {op: 0 for op in ("causal_conv1d", "causal_conv1d_update", "causal_conv_transpose1d",
                              "causal_conv_transpose1d_update")}
    for op in calls:
        def spy(*args, _op=op, _ref=dispatch._IMPLS[op]["torch"]):
            calls[_op] += 1
            return _ref(*args)
        monkeypatch.setitem(dispatch._IMPLS[op], "torch", spy)
    codes = random_codes(ours.cfg, 1, 2, seed)
    with torch.no_grad():
        ours(codes)
        ours.decode_step(codes, ours.new_state(1))
    num_transposed = len(ours.cfg.upsampling_ratios) + len(ours.cfg.upsample_rates)
    assert calls["causal_conv_transpose1d"] == calls["causal_conv_transpose1d_update"] == num_transposed
    assert calls["causal_conv1d"] > 0 and calls["causal_conv1d_update"] > 0


def test_released_shapes_on_meta():
    """The released config (MODEL_SPEC §10): 216,016,577 parameters, 1920·L − 555 samples, stream emission."""
    cfg = OmniConfig.from_dict(PRESETS["qwen3-omni-30b-a3b"]()).code2wav
    with torch.device("meta"):
        model = Code2Wav(cfg)
    assert sum(p.numel() for p in model.parameters()) == 216_016_577
    assert cfg.samples_per_frame == 1920
    assert [model.num_samples(n) for n in (0, 1, 2, 40)] == [0, 1365, 3285, 1920 * 40 - 555]
    codes = torch.zeros(1, cfg.num_quantizers, 3, dtype=torch.long, device="meta")
    assert model(codes).shape == (1, 1, 1920 * 3 - 555)
    state = model.new_state(1, device="meta")
    sizes = [model.decode_step(codes[..., :1], state).shape[-1] for _ in range(3)]
    assert sizes == [1365, 1920, 1920]
    assert {key: tail.shape[-1] for key, tail in state.tails.items() if tail.shape[-1]} == {
        "decoder.1.block.1": 8, "decoder.2.block.1": 5, "decoder.3.block.1": 4, "decoder.4.block.1": 3}
    assert state.conv["decoder.1.block.4.conv1"].shape == (1, 768, 54)  # dilation 9 · (7 − 1)


# ---- conv reference ops --------------------------------------------------------------------------------

CONV_CASES = [  # (batch, C_in, C_out, K, dilation, groups, L)
    (2, 3, 5, 7, 1, 1, 129),
    (1, 6, 6, 7, 9, 6, 37),  # depthwise, dilated: state 54
    (3, 4, 2, 1, 1, 1, 13),  # 1 tap: empty state
    (2, 4, 6, 3, 3, 2, 1),
]


def random_chunks(total, rng):
    chunks = []
    while total:
        size = min(total, rng.choice([0, 1, 1, 2, 3, 5, 11]))
        chunks.append(size)
        total -= size
    return chunks


def conv_case(case, seed):
    batch, c_in, c_out, k, dilation, groups, length = case
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c_in, length, generator=generator)
    weight = torch.randn(c_out, c_in // groups, k, generator=generator)
    bias = torch.randn(c_out, generator=generator)
    return x, weight, bias, dilation, groups


@pytest.mark.parametrize("case", CONV_CASES)
def test_causal_conv1d_matches_padded_conv(case):
    x, weight, bias, dilation, groups = conv_case(case, 0)
    pad = (weight.shape[-1] - 1) * dilation
    # Symmetric padding, keep the first L outputs: output t sees inputs up to t only.
    ref = F.conv1d(x, weight, bias, padding=pad, dilation=dilation, groups=groups)[..., :x.shape[-1]]
    out = causal_conv1d_ref(x, weight, bias, dilation, groups)
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= TOL_OP


@pytest.mark.parametrize("case", CONV_CASES)
def test_causal_conv1d_update_chunks_equal_full(case):
    x, weight, bias, dilation, groups = conv_case(case, 1)
    full = causal_conv1d_ref(x, weight, bias, dilation, groups)
    state_len = (weight.shape[-1] - 1) * dilation
    for trial in range(3):
        chunks = random_chunks(x.shape[-1], random.Random(trial))
        state = x.new_zeros(x.shape[0], x.shape[1], state_len)
        pieces, start = [], 0
        for size in chunks:
            pieces.append(causal_conv1d_update_ref(x[..., start:start + size], state, weight, bias, dilation, groups))
            start += size
        assert rel_err(torch.cat(pieces, dim=-1), full) <= TOL_OP
        # The state is the last (K−1)·d samples of the zero-padded input, exactly.
        assert torch.equal(state, F.pad(x, (state_len, 0))[..., x.shape[-1]:])


@pytest.mark.parametrize("case", CONV_CASES)
def test_causal_conv1d_update_slots(case):
    """A pool of 5 states; rows map to slots 3, −1, 0 (and −1 again): real rows equal their own streams,
    padded rows give zeros and leave every state untouched."""
    x, weight, bias, dilation, groups = conv_case((4, *case[1:]), 2)
    state_len = (weight.shape[-1] - 1) * dilation
    slot_ids = torch.tensor([3, -1, 0, -1])
    pool = torch.randn(5, x.shape[1], state_len)  # earlier history of every slot
    before = pool.clone()
    full = causal_conv1d_ref(torch.cat((pool[slot_ids.clamp(min=0)], x), -1), weight, bias, dilation, groups)
    expected = full[..., state_len:]  # outputs for x's positions of each slot's stream
    pieces, start = [], 0
    for size in random_chunks(x.shape[-1], random.Random(5)):
        pieces.append(causal_conv1d_update_ref(x[..., start:start + size], pool, weight, bias, dilation, groups,
                                               slot_ids))
        start += size
    out = torch.cat(pieces, dim=-1)
    real = slot_ids >= 0
    assert rel_err(out[real], expected[real]) <= TOL_OP
    assert torch.equal(out[~real], torch.zeros_like(out[~real]))
    for slot in (1, 2, 4):  # not in the batch
        assert torch.equal(pool[slot], before[slot])
    for row, slot in ((0, 3), (2, 0)):
        history = torch.cat((before[slot], x[row]), dim=-1)
        assert torch.equal(pool[slot], history[:, history.shape[-1] - state_len:])


TRANSPOSE_CASES = [  # (batch, C_in, C_out, k, stride, L)
    (2, 3, 5, 2, 2, 17),  # k = s (upsample stages): nothing trimmed, no tail
    (2, 4, 3, 6, 3, 23),  # k = 2s (decoder blocks)
    (1, 3, 2, 7, 2, 11),  # k − s = 5 > s: the left trim spans several inputs
    (2, 2, 3, 16, 8, 5),
]


def transpose_case(case, seed):
    batch, c_in, c_out, k, stride, length = case
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c_in, length, generator=generator)
    weight = torch.randn(c_in, c_out, k, generator=generator)
    bias = torch.randn(c_out, generator=generator)
    return x, weight, bias, stride


def overlap_add(x, weight, bias, stride):
    """Independent float64 formulation: input j adds weight taps at positions j·s … j·s + k − 1, then the
    k − s first and last samples are dropped."""
    x, weight = x.double(), weight.double()
    k, length = weight.shape[-1], x.shape[-1]
    contrib = torch.einsum("bcj,cot->bojt", x, weight)  # [B, C_out, L, k]
    y = torch.zeros(x.shape[0], weight.shape[1], (length - 1) * stride + k, dtype=torch.float64)
    for tap in range(k):
        y[..., tap:tap + (length - 1) * stride + 1:stride] += contrib[..., tap]
    y = y + bias.double()[:, None]
    trim = k - stride
    return y[..., trim:y.shape[-1] - trim]


@pytest.mark.parametrize("case", TRANSPOSE_CASES)
def test_causal_conv_transpose1d_matches_overlap_add(case):
    x, weight, bias, stride = transpose_case(case, 0)
    out = causal_conv_transpose1d_ref(x, weight, bias, stride)
    ref = overlap_add(x, weight, bias, stride)
    assert out.shape[-1] == transpose_output_length(x.shape[-1], weight.shape[-1], stride) == ref.shape[-1]
    assert rel_err(out, ref) <= TOL_OP


@pytest.mark.parametrize("case", TRANSPOSE_CASES)
def test_causal_conv_transpose1d_update_chunks_equal_full(case):
    x, weight, bias, stride = transpose_case(case, 1)
    k = weight.shape[-1]
    full = causal_conv_transpose1d_ref(x, weight, bias, stride)
    for trial in range(3):
        state = x.new_zeros(x.shape[0], weight.shape[1], k - stride)
        pieces, start = [], 0
        for size in random_chunks(x.shape[-1], random.Random(trial)):
            piece = causal_conv_transpose1d_update_ref(x[..., start:start + size], state, weight, bias, stride, start)
            start += size
            pieces.append(piece)
            # No latency against the full op: after n inputs the stream holds its whole result for n inputs.
            assert sum(p.shape[-1] for p in pieces) == transpose_output_length(start, k, stride)
        assert rel_err(torch.cat(pieces, dim=-1), full) <= TOL_OP
        # The tail is the not-yet-final overlap-add of the last inputs (no bias), what the full op trims right.
        untrimmed = F.conv_transpose1d(x, weight, None, stride=stride)
        assert torch.allclose(state, untrimmed[..., x.shape[-1] * stride:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", TRANSPOSE_CASES)
def test_causal_conv_transpose1d_update_slots(case):
    x, weight, bias, stride = transpose_case((3, *case[1:]), 2)
    trim = weight.shape[-1] - stride
    slot_ids = torch.tensor([2, -1, 0])
    pool = torch.zeros(4, weight.shape[1], trim)
    pool[1] = torch.randn(weight.shape[1], trim)  # a slot of another stream, not in this batch
    before = pool.clone()
    full = causal_conv_transpose1d_ref(x, weight, bias, stride)
    pieces, start = [], 0
    for size in random_chunks(x.shape[-1], random.Random(7)):
        pieces.append(causal_conv_transpose1d_update_ref(x[..., start:start + size], pool, weight, bias, stride,
                                                         start, slot_ids))
        start += size
    out = torch.cat(pieces, dim=-1)
    assert rel_err(out[[0, 2]], full[[0, 2]]) <= TOL_OP
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.equal(pool[1], before[1]) and torch.equal(pool[3], before[3])
