"""Triton causal convs (kernels/triton_conv.py) against the torch references (kernels/conv.py): full ops,
streaming updates in any chunking, padded slots, in-place state, and the tiny Code2Wav end to end.

Without a GPU these run under Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1), in fp32
and fp16 only (bf16 is wrong under the interpreter); bf16 at the real shapes and CUDA-graph capture need CUDA.
"""

import pytest
import torch

from kernels.conv import (causal_conv1d_ref, causal_conv1d_update_ref, causal_conv_transpose1d_ref,
                          causal_conv_transpose1d_update_ref, transpose_output_length)
from runtime import dispatch

triton_conv = pytest.importorskip("kernels.triton_conv", reason="triton not installed")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")
CONV_OPS = ("causal_conv1d", "causal_conv1d_update", "causal_conv_transpose1d", "causal_conv_transpose1d_update")
BLOCK = 16  # the smallest tile (GPU floor; test_*_small_tiles force it under the interpreter, whose tiles are long)


@pytest.fixture(autouse=True)
def exact_fp32_references():
    """cuDNN convs default to TF32 on a GPU, which would make the fp32 torch references ~1e-3 off: keep them
    fp32 (matmuls too) for each test, and restore the flags after it."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def tol(dtype: torch.dtype) -> float:
    """Relative error bound against the fp32 reference on the same (upcast) inputs."""
    return {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}[dtype]


def check_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    if ref.numel() == 0:
        return
    out64, ref64 = out.double(), ref.double()
    err = ((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30)).item()
    print(f"{what}: rel err {err:.2e}, max abs {(out64 - ref64).abs().max().item():.2e}")
    assert err <= tol(dtype), f"{what}: rel err {err:.2e} > {tol(dtype):.0e}"


def randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * scale).to(device=DEVICE, dtype=dtype)


def conv_params(c_in, c_out, taps, groups, dtype, seed):
    weight = randn(c_out, c_in // groups, taps, dtype=dtype, seed=seed, scale=(c_in // groups * taps) ** -0.5)
    return weight, randn(c_out, dtype=dtype, seed=seed + 1, scale=0.1)


def trans_params(c_in, c_out, k, stride, dtype, seed):
    weight = randn(c_in, c_out, k, dtype=dtype, seed=seed, scale=(c_in * k / stride) ** -0.5)
    return weight, randn(c_out, dtype=dtype, seed=seed + 1, scale=0.1)


def up(*tensors):
    return [None if t is None else t.float() for t in tensors]


def strided(x: torch.Tensor) -> torch.Tensor:
    """The same values as a non-contiguous view: the last dim outermost in memory (e.g. (B, L, C) transposed)."""
    return x.transpose(0, -1).contiguous().transpose(0, -1)


# (C_in, C_out, K, dilation, groups, L): dense / depthwise / groups=2, odd primes, L = 1 and one past a tile
CONV_CASES = [
    (5, 7, 3, 1, 1, 1),
    (7, 5, 7, 3, 1, BLOCK + 1),
    (13, 13, 7, 1, 13, BLOCK + 1),
    (13, 13, 7, 9, 13, 5),
    (6, 10, 7, 9, 2, 20),
    (11, 1, 7, 1, 1, 9),
    (37, 19, 3, 3, 1, 2 * BLOCK + 1),
    (4, 4, 1, 1, 1, 6),
]
# (C_in, C_out, k, stride, L): the upsamplers (k = s = 2; k = 2s for s = 8, 5, 4, 3) and k − s > s
TRANS_CASES = [
    (5, 7, 2, 2, 1),
    (3, 5, 2, 2, BLOCK + 1),
    (7, 3, 16, 8, 2),
    (5, 3, 10, 5, 3),
    (3, 7, 8, 4, 5),
    (11, 2, 6, 3, BLOCK + 1),
    (4, 5, 7, 2, 4),
]


# ---- causal conv1d ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv1d_full(case, dtype):
    c_in, c_out, taps, dilation, groups, length = case
    x = strided(randn(2, c_in, length, dtype=dtype, seed=1))
    weight, bias = conv_params(c_in, c_out, taps, groups, dtype, seed=2)
    weight = strided(weight)
    out = triton_conv.causal_conv1d(x, weight, bias, dilation, groups)
    ref = causal_conv1d_ref(*up(x, weight, bias), dilation, groups)
    assert out.dtype == dtype
    check_close(out, ref, dtype, f"conv1d {case} {dtype}")


def test_conv1d_no_bias_and_empty():
    x = randn(2, 6, 9, seed=3)
    weight, _ = conv_params(6, 4, 7, 2, torch.float32, seed=4)
    check_close(triton_conv.causal_conv1d(x, weight, None, 3, 2), causal_conv1d_ref(x, weight, None, 3, 2),
                torch.float32, "conv1d no bias")
    assert triton_conv.causal_conv1d(x[..., :0], weight, None, 3, 2).shape == (2, 4, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", [c for c in CONV_CASES if c[2] > 1])
def test_conv1d_update_matches_ref(case, dtype):
    """One update from a random (mid-stream) state: outputs close, new state exactly the reference's copy."""
    c_in, c_out, taps, dilation, groups, length = case
    x = randn(3, c_in, length, dtype=dtype, seed=5)
    weight, bias = conv_params(c_in, c_out, taps, groups, dtype, seed=6)
    state = strided(randn(3, c_in, (taps - 1) * dilation, dtype=dtype, seed=7))
    ref_state = state.float().clone()
    pointer = state.data_ptr()
    out = triton_conv.causal_conv1d_update(x, state, weight, bias, dilation, groups)
    ref = causal_conv1d_update_ref(*up(x), ref_state, *up(weight, bias), dilation, groups)
    check_close(out, ref, dtype, f"conv1d update {case} {dtype}")
    assert state.data_ptr() == pointer
    assert torch.equal(state.float(), ref_state)  # a copy of input samples: exact


CHUNKINGS = [[1] * 8, [3, 1, 5, 2], [0, 4, 0, 0, 7], [2, 0, 9]]


@pytest.mark.parametrize("case", [(7, 5, 7, 3, 1), (13, 13, 7, 9, 13), (6, 10, 3, 1, 2)])
@pytest.mark.parametrize("chunks", CHUNKINGS)
def test_conv1d_stream_equals_full(case, chunks):
    c_in, c_out, taps, dilation, groups = case
    length = sum(chunks)
    x = randn(2, c_in, length, seed=8)
    weight, bias = conv_params(c_in, c_out, taps, groups, torch.float32, seed=9)
    state = torch.zeros(2, c_in, (taps - 1) * dilation, device=DEVICE)
    pieces, start = [], 0
    for size in chunks:
        pieces.append(triton_conv.causal_conv1d_update(x[..., start:start + size], state, weight, bias, dilation,
                                                       groups))
        assert pieces[-1].shape == (2, c_out, size)
        start += size
    check_close(torch.cat(pieces, -1), causal_conv1d_ref(x, weight, bias, dilation, groups), torch.float32,
                f"conv1d stream {case} {chunks}")
    padded = torch.nn.functional.pad(x, ((taps - 1) * dilation, 0))
    assert torch.equal(state, padded[..., padded.shape[-1] - state.shape[-1]:])


@pytest.mark.parametrize("case", [(7, 5, 7, 3, 1), (13, 13, 7, 1, 13), (6, 10, 7, 9, 2)])
def test_conv1d_update_padded_slots(case):
    """A pool of 5 states, 4 rows: rows with id −1 output zeros; their slots and unused slots keep their bits."""
    c_in, c_out, taps, dilation, groups = case
    length = 5
    pool = strided(randn(5, c_in, (taps - 1) * dilation, seed=10))
    before = pool.clone()
    slot_ids = torch.tensor([3, -1, 0, -1], device=DEVICE)
    x = randn(4, c_in, length, seed=11)
    weight, bias = conv_params(c_in, c_out, taps, groups, torch.float32, seed=12)
    ref_pool = pool.clone()
    out = triton_conv.causal_conv1d_update(x, pool, weight, bias, dilation, groups, slot_ids)
    ref = causal_conv1d_update_ref(x, ref_pool, weight, bias, dilation, groups, slot_ids)
    check_close(out, ref, torch.float32, f"conv1d slots {case}")
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.equal(out[3], torch.zeros_like(out[3]))
    assert torch.equal(pool, ref_pool)
    for slot in (1, 2, 4):
        assert torch.equal(pool[slot], before[slot])
    # a second step continues each valid slot's stream (rows may map to other slots in another order)
    x2 = randn(2, c_in, 3, seed=13)
    ids2 = torch.tensor([0, 3], device=DEVICE)
    out2 = triton_conv.causal_conv1d_update(x2, pool, weight, bias, dilation, groups, ids2)
    ref2 = causal_conv1d_update_ref(x2, ref_pool, weight, bias, dilation, groups, ids2)
    check_close(out2, ref2, torch.float32, f"conv1d slots step 2 {case}")
    assert torch.equal(pool, ref_pool)


def test_conv1d_update_rejects_wrong_state():
    weight, bias = conv_params(4, 4, 7, 1, torch.float32, seed=14)
    with pytest.raises(ValueError, match="needs"):
        triton_conv.causal_conv1d_update(randn(1, 4, 3), torch.zeros(1, 4, 5, device=DEVICE), weight, bias, 1, 1)


# ---- causal transposed conv -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", TRANS_CASES)
def test_conv_transpose_full(case, dtype):
    c_in, c_out, k, stride, length = case
    x = strided(randn(2, c_in, length, dtype=dtype, seed=15))
    weight, bias = trans_params(c_in, c_out, k, stride, dtype, seed=16)
    weight = strided(weight)
    out = triton_conv.causal_conv_transpose1d(x, weight, bias, stride)
    ref = causal_conv_transpose1d_ref(*up(x, weight, bias), stride)
    assert out.shape[-1] == transpose_output_length(length, k, stride) and out.dtype == dtype
    check_close(out, ref, dtype, f"convT {case} {dtype}")


@pytest.mark.parametrize("dtype,start", [(torch.float32, 0), (torch.float32, 1), (torch.float32, 5),
                                         (torch.float16, 1)])
@pytest.mark.parametrize("case", TRANS_CASES)
def test_conv_transpose_update_matches_ref(case, dtype, start):
    """One update from a random tail at several stream offsets (the left trim still pending or done)."""
    c_in, c_out, k, stride, length = case
    x = randn(3, c_in, length, dtype=dtype, seed=17)
    weight, bias = trans_params(c_in, c_out, k, stride, dtype, seed=18)
    tail = strided(randn(3, c_out, k - stride, dtype=dtype, seed=19))
    ref_tail = tail.float().clone()
    pointer = tail.data_ptr()
    out = triton_conv.causal_conv_transpose1d_update(x, tail, weight, bias, stride, start)
    ref = causal_conv_transpose1d_update_ref(*up(x), ref_tail, *up(weight, bias), stride, start)
    check_close(out, ref, dtype, f"convT update {case} start={start} {dtype}")
    assert tail.data_ptr() == pointer
    check_close(tail, ref_tail, dtype, f"convT tail {case} start={start} {dtype}")


@pytest.mark.parametrize("case", [(5, 7, 2, 2), (3, 4, 10, 5), (4, 3, 6, 3), (4, 5, 7, 2)])
@pytest.mark.parametrize("chunks", CHUNKINGS)
def test_conv_transpose_stream_equals_full(case, chunks):
    c_in, c_out, k, stride = case
    length = sum(chunks)
    x = randn(2, c_in, length, seed=20)
    weight, bias = trans_params(c_in, c_out, k, stride, torch.float32, seed=21)
    tail = torch.zeros(2, c_out, k - stride, device=DEVICE)
    ref_tail = tail.clone()
    pieces, start = [], 0
    for size in chunks:
        piece = triton_conv.causal_conv_transpose1d_update(x[..., start:start + size], tail, weight, bias, stride,
                                                           start)
        causal_conv_transpose1d_update_ref(x[..., start:start + size], ref_tail, weight, bias, stride, start)
        n_out = transpose_output_length(start + size, k, stride) - transpose_output_length(start, k, stride)
        assert piece.shape == (2, c_out, n_out)
        pieces.append(piece)
        start += size
    full = causal_conv_transpose1d_ref(x, weight, bias, stride)
    check_close(torch.cat(pieces, -1), full, torch.float32, f"convT stream {case} {chunks}")
    check_close(tail, ref_tail, torch.float32, f"convT stream tail {case} {chunks}")


@pytest.mark.parametrize("case", [(5, 7, 2, 2), (3, 4, 10, 5), (4, 5, 7, 2)])
def test_conv_transpose_update_padded_slots(case):
    c_in, c_out, k, stride = case
    pool = strided(randn(5, c_out, k - stride, seed=22))
    before = pool.clone()
    slot_ids = torch.tensor([-1, 4, -1, 1], device=DEVICE)
    x = randn(4, c_in, 3, seed=23)
    weight, bias = trans_params(c_in, c_out, k, stride, torch.float32, seed=24)
    ref_pool = pool.clone()
    out = triton_conv.causal_conv_transpose1d_update(x, pool, weight, bias, stride, 7, slot_ids)
    ref = causal_conv_transpose1d_update_ref(x, ref_pool, weight, bias, stride, 7, slot_ids)
    check_close(out, ref, torch.float32, f"convT slots {case}")
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[2], torch.zeros_like(out[2]))
    for slot in (0, 2, 3):
        assert torch.equal(pool[slot], before[slot])
    check_close(pool, ref_pool, torch.float32, f"convT slots pool {case}")


def test_conv_transpose_rejects_wrong_tail():
    weight, bias = trans_params(3, 4, 10, 5, torch.float32, seed=25)
    with pytest.raises(ValueError, match="needs"):
        triton_conv.causal_conv_transpose1d_update(randn(1, 3, 2), torch.zeros(1, 4, 4, device=DEVICE), weight,
                                                   bias, 5, 0)


# ---- tiling: the interpreter's default tiles cover these small shapes whole; force 16-wide ones ------------

@pytest.fixture
def small_tiles(monkeypatch):
    """Every BLOCK_* launch parameter 16: several channel and column tiles, tiles straddling rows."""
    def config(op, key, dtype, default):
        return {name: 16 if name.startswith("BLOCK") else value for name, value in default.items()}
    monkeypatch.setattr(triton_conv, "launch_config", config)


@pytest.mark.parametrize("case", [(20, 17, 7, 3, 1, 9), (20, 20, 7, 9, 20, BLOCK + 1), (38, 22, 3, 1, 2, 7)])
def test_conv1d_small_tiles(small_tiles, case):
    c_in, c_out, taps, dilation, groups, length = case
    x = randn(3, c_in, length, seed=60)
    weight, bias = conv_params(c_in, c_out, taps, groups, torch.float32, seed=61)
    check_close(triton_conv.causal_conv1d(x, weight, bias, dilation, groups),
                causal_conv1d_ref(x, weight, bias, dilation, groups), torch.float32, f"conv1d 16-tiles {case}")
    pool = randn(4, c_in, (taps - 1) * dilation, seed=62)
    ref_pool = pool.clone()
    slot_ids = torch.tensor([2, -1, 0], device=DEVICE)
    out = triton_conv.causal_conv1d_update(x, pool, weight, bias, dilation, groups, slot_ids)
    ref = causal_conv1d_update_ref(x, ref_pool, weight, bias, dilation, groups, slot_ids)
    check_close(out, ref, torch.float32, f"conv1d update 16-tiles {case}")
    assert not out[1].any() and torch.equal(pool, ref_pool)


@pytest.mark.parametrize("case", [(20, 17, 8, 4, 2), (17, 20, 6, 3, 9), (21, 17, 2, 2, BLOCK + 1), (17, 18, 7, 2, 5)])
def test_conv_transpose_small_tiles(small_tiles, case):
    c_in, c_out, k, stride, length = case
    x = randn(3, c_in, length, seed=63)
    weight, bias = trans_params(c_in, c_out, k, stride, torch.float32, seed=64)
    check_close(triton_conv.causal_conv_transpose1d(x, weight, bias, stride),
                causal_conv_transpose1d_ref(x, weight, bias, stride), torch.float32, f"convT 16-tiles {case}")
    pool = randn(4, c_out, k - stride, seed=65)
    ref_pool = pool.clone()
    slot_ids = torch.tensor([3, -1, 1], device=DEVICE)
    for start in (0, 4):
        out = triton_conv.causal_conv_transpose1d_update(x, pool, weight, bias, stride, start, slot_ids)
        ref = causal_conv_transpose1d_update_ref(x, ref_pool, weight, bias, stride, start, slot_ids)
        check_close(out, ref, torch.float32, f"convT update 16-tiles {case} start={start}")
        assert not out[1].any()
        check_close(pool, ref_pool, torch.float32, f"convT tail 16-tiles {case} start={start}")
    assert torch.equal(pool[[0, 2]], ref_pool[[0, 2]])


# ---- registration and the tiny Code2Wav ---------------------------------------------------------------

def test_registered():
    for op in CONV_OPS:  # listed in TRITON_OPS, registered by dispatch under the op names it calls
        assert "triton" in dispatch.backends(op)
        assert dispatch._IMPLS[op]["triton"] is triton_conv.TRITON_OPS[op] is getattr(triton_conv, op)


def conv_choice(backend: str) -> dict[str, str]:
    """The four conv ops on `backend`, the other ops on torch."""
    return dispatch.kernel_choice({op: backend for op in CONV_OPS})


@pytest.fixture(scope="module")
def tiny_code2wav():
    from runtime.weights import init_random
    model = init_random("tiny", DEVICE, torch.float32, seed=31).code2wav
    generator = torch.Generator().manual_seed(32)
    with torch.no_grad():  # random init leaves conv biases at zero: give them values so bias paths count
        for name, param in model.named_parameters():
            if name.endswith("conv.bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        # Random weights grow the decoder's activations to ~300, so ~98% of the waveform clamps and the rest is
        # a small difference of large numbers: 1e-7 relative noise in each conv gave ~1e-4 there (and fp32 vs
        # fp64 references 6e-5). A smaller output conv keeps the waveform unclamped and the comparison
        # meaningful (the same noise then gives ~1e-5).
        model.decoder[-1].conv.weight.mul_(1 / 400)
    return model


@torch.no_grad()
def test_code2wav_tiny_through_triton(tiny_code2wav):
    model = tiny_code2wav
    generator = torch.Generator().manual_seed(33)
    codes = torch.randint(0, model.cfg.codebook_size, (2, model.cfg.num_quantizers, 2), generator=generator)
    codes = codes.to(DEVICE)
    with dispatch.active(conv_choice("torch")):
        ref = model(codes)
        state = model.new_state(2)
        ref_pieces = [model.decode_step(codes[..., a:b], state) for a, b in ((0, 1), (1, 2))]
    with dispatch.active(conv_choice("triton")):
        out = model(codes)
        state = model.new_state(2)
        pieces = [model.decode_step(codes[..., a:b], state) for a, b in ((0, 1), (1, 2))]
    assert out.shape == ref.shape == (2, 1, model.num_samples(2))
    assert (ref.abs() >= 1).float().mean() < 0.01  # see tiny_code2wav
    err = ((out - ref).double().norm() / ref.double().norm()).item()
    print(f"tiny Code2Wav full decode through triton convs: rel err {err:.2e}")
    assert err <= 1e-4
    for piece, ref_piece in zip(pieces, ref_pieces):
        assert piece.shape == ref_piece.shape
    streamed, ref_streamed = torch.cat(pieces, -1), torch.cat(ref_pieces, -1)
    err = ((streamed - ref_streamed).double().norm() / ref_streamed.double().norm()).item()
    print(f"tiny Code2Wav streaming decode_step through triton convs: rel err {err:.2e}")
    assert err <= 1e-4


@torch.no_grad()
def test_code2wav_tiny_slots_through_triton(tiny_code2wav):
    """decode_frame over a slot pool (the kernels' slot-id form) with a padded row: the same samples and states
    as with the torch convs; the free slot keeps its bits."""
    from runtime.models.code2wav import Code2WavSlots
    model = tiny_code2wav
    generator = torch.Generator().manual_seed(34)
    codes = torch.randint(0, model.cfg.codebook_size, (2, model.cfg.num_quantizers, 2), generator=generator)
    runs = {}
    for backend in ("torch", "triton"):
        with dispatch.active(conv_choice(backend)):
            pool = Code2WavSlots(model, 3, DEVICE, torch.float32)
            free = [t[0].clone() for t in (*pool.conv.values(), *pool.tails.values())]
            wavs = []
            for frame in range(2):  # slots 2 and 1 hold the two streams, row 1 is padding; slot 0 stays free
                rows = codes[[0, 0, 1], :, frame:frame + 1].to(DEVICE)  # [3, Q, 1]
                slot_ids = torch.tensor([2, -1, 1], device=DEVICE)
                wavs.append(model.decode_frame(rows, pool.view(slot_ids, frame == 0)))
                assert not wavs[-1][1].any(), "a padded row produced samples"
            for before, after in zip(free, (t[0] for t in (*pool.conv.values(), *pool.tails.values()))):
                assert torch.equal(before, after), "the free slot's state changed"
            runs[backend] = torch.cat(wavs, -1), pool.state_tensors()
    (wav, states), (ref_wav, ref_states) = runs["triton"], runs["torch"]
    err = ((wav - ref_wav).double().norm() / ref_wav.double().norm()).item()
    print(f"tiny Code2Wav decode_frame over slots through triton convs: rel err {err:.2e}")
    assert err <= 1e-4
    for state, ref_state in zip(states, ref_states):
        assert state.shape == ref_state.shape
        assert ((state - ref_state).double().norm() <= 1e-4 * ref_state.double().norm().clamp_min(1e-30)).item()


# ---- GPU only -------------------------------------------------------------------------------------------

def real_conv_shapes():
    """Per-frame streaming shapes of the released Code2Wav (MODEL_SPEC §10): conv1d (C_in, C_out, K, d, groups,
    L) and transposed (C_in, C_out, k, s, L)."""
    hidden, dims, rates = 1024, [1536 // 2 ** i for i in range(5)], (8, 5, 4, 3)
    conv, trans, length = [], [], 1
    for ratio in (2, 2):
        trans.append((hidden, hidden, ratio, ratio, length))
        length *= ratio
        conv.append((hidden, hidden, 7, 1, hidden, length))
    conv.append((hidden, dims[0], 7, 1, 1, length))
    for i, rate in enumerate(rates):
        trans.append((dims[i], dims[i + 1], 2 * rate, rate, length))
        length *= rate
        conv += [(dims[i + 1], dims[i + 1], 7, d, 1, length) for d in (1, 3, 9)]
    conv.append((dims[-1], 1, 7, 1, 1, length))
    return conv, trans


@needs_cuda
@pytest.mark.parametrize("batch", [1, 4])
def test_bf16_real_shapes(batch):
    conv, trans = real_conv_shapes()
    dtype = torch.bfloat16
    for c_in, c_out, taps, dilation, groups, length in conv:
        x = randn(batch, c_in, length, dtype=dtype, seed=40)
        weight, bias = conv_params(c_in, c_out, taps, groups, dtype, seed=41)
        state = randn(batch, c_in, (taps - 1) * dilation, dtype=dtype, seed=42)
        ref_state = state.float().clone()
        what = f"bf16 conv1d B={batch} {c_in}->{c_out} K={taps} d={dilation} g={groups} L={length}"
        check_close(triton_conv.causal_conv1d(x, weight, bias, dilation, groups),
                    causal_conv1d_ref(*up(x, weight, bias), dilation, groups), dtype, what)
        out = triton_conv.causal_conv1d_update(x, state, weight, bias, dilation, groups)
        ref = causal_conv1d_update_ref(x.float(), ref_state, *up(weight, bias), dilation, groups)
        check_close(out, ref, dtype, what + " update")
        assert torch.equal(state.float(), ref_state)
    for c_in, c_out, k, stride, length in trans:
        x = randn(batch, c_in, length, dtype=dtype, seed=43)
        weight, bias = trans_params(c_in, c_out, k, stride, dtype, seed=44)
        tail = randn(batch, c_out, k - stride, dtype=dtype, seed=45)
        ref_tail = tail.float().clone()
        what = f"bf16 convT B={batch} {c_in}->{c_out} k={k} s={stride} L={length}"
        check_close(triton_conv.causal_conv_transpose1d(x, weight, bias, stride),
                    causal_conv_transpose1d_ref(*up(x, weight, bias), stride), dtype, what)
        out = triton_conv.causal_conv_transpose1d_update(x, tail, weight, bias, stride, 100)
        ref = causal_conv_transpose1d_update_ref(x.float(), ref_tail, *up(weight, bias), stride, 100)
        check_close(out, ref, dtype, what + " update")
        if k > stride:
            check_close(tail, ref_tail, dtype, what + " tail")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_update_ops_under_cuda_graph(dtype):
    """Capture both update ops with slot ids (one padded row) into a graph, poison the outputs with NaN, replay:
    outputs and pools equal eager runs of the same steps."""
    conv, trans = real_conv_shapes()
    c_in, c_out, taps, dilation, groups, length = conv[4]  # a dense dilated residual conv
    t_in, t_out, k, stride, t_len = trans[2]
    slot_ids = torch.tensor([2, -1, 0], device=DEVICE)
    x = randn(3, c_in, length, dtype=dtype, seed=50)
    weight, bias = conv_params(c_in, c_out, taps, groups, dtype, seed=51)
    pool = randn(4, c_in, (taps - 1) * dilation, dtype=dtype, seed=52)
    tx = randn(3, t_in, t_len, dtype=dtype, seed=53)
    t_weight, t_bias = trans_params(t_in, t_out, k, stride, dtype, seed=54)
    t_pool = randn(4, t_out, k - stride, dtype=dtype, seed=55)
    eager_pool, eager_t_pool = pool.clone(), t_pool.clone()

    def step(p, tp):
        return (triton_conv.causal_conv1d_update(x, p, weight, bias, dilation, groups, slot_ids),
                triton_conv.causal_conv_transpose1d_update(tx, tp, t_weight, t_bias, stride, 9, slot_ids))

    expected = [step(eager_pool, eager_t_pool) for _ in range(2)]  # two steps: the state carries over
    work_pool, work_t_pool = pool.clone(), t_pool.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compiles) on scratch copies
        step(work_pool.clone(), work_t_pool.clone())
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step(work_pool, work_t_pool)
    work_pool.copy_(pool)
    work_t_pool.copy_(t_pool)
    for i in range(2):
        for out in outs:
            out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        for out, ref in zip(outs, expected[i]):
            assert torch.equal(out, ref), f"replay {i}: max diff {(out.float() - ref.float()).abs().max().item()}"
    assert torch.equal(work_pool, eager_pool) and torch.equal(work_t_pool, eager_t_pool)
