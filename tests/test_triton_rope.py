"""Triton q/k RMSNorm + rotary (qk_norm_rope from cos/sin tables; mrope_qk_norm_ in place from t/h/w positions)
and RMSNorm against their torch twins: odd head counts, GQA 1/4/8, head_dim 16/64/128, one token, the tiny and
real TM-RoPE sections with distinct t/h/w ids, 1-D RoPE, strided views of a fused qkv output, in-place
semantics; and the tiny thinker's logits through the kernels. CPU: Triton's interpreter (fp32 / fp16).
GPU: bf16 at the real thinker shapes and CUDA-graph replay."""

import pytest
import torch

from kernels.norm import add_rms_norm_ref, rms_norm_ref
from kernels.rope import (mrope_qk_norm_ref_, qk_norm_rope_cache_write_ref, qk_norm_rope_ref, rope_cos_sin_ref,
                          rope_inv_freq)
from kernels.triton_rope import add_rms_norm, mrope_qk_norm_, qk_norm_rope, qk_norm_rope_cache_write, rms_norm
from runtime import dispatch
from tests.test_triton_attention import compile_for_sm90, compiles_without_gpu

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bf16, real shapes, graphs)")
EPS = 1e-6


def rel_err(got, want):
    got, want = got.float(), want.float()
    err = ((got - want).norm() / want.norm()).item()
    print(f"rel {err:.2e}  max abs {(got - want).abs().max().item():.2e}")
    return err


def _weight(dim, dtype):
    return (1 + 0.3 * torch.randn(dim, device=DEVICE)).to(dtype)


def _positions(tokens, spread=3000):
    """(3, T) t/h/w ids, distinct on every axis."""
    base = torch.randint(0, spread, (tokens,), device=DEVICE)
    return torch.stack([base, base // 7 + 1, base % 11 + 2 * torch.arange(tokens, device=DEVICE)])


# ------------------------------------------------------------------------------------------------ rms_norm
@pytest.mark.parametrize("shape,dtype,weight_dtype", [
    ((1, 24), torch.float32, torch.float32),
    ((3, 5, 40), torch.float32, torch.float32),
    ((7, 130), torch.float16, torch.float16),
    ((4, 64), torch.float16, torch.float32),  # fp32 weight: output promotes to fp32 as the reference's
])
def test_rms_norm(shape, dtype, weight_dtype):
    x = torch.randn(shape, device=DEVICE).to(dtype)
    w = _weight(shape[-1], weight_dtype)
    got = rms_norm(x, w, EPS)
    want = rms_norm_ref(x.float(), w.float(), EPS)
    assert got.shape == x.shape and got.dtype == rms_norm_ref(x, w, EPS).dtype
    assert rel_err(got, want) <= TOL[dtype]


def test_rms_norm_strided_input():
    x = torch.randn(6, 2 * 48, device=DEVICE)[:, ::2]
    w = _weight(48, torch.float32)
    assert rel_err(rms_norm(x, w, EPS), rms_norm_ref(x, w, EPS)) <= 1e-5


# ---------------------------------------------------------------------------------- residual add + rms_norm
@pytest.mark.parametrize("shape,dtype,weight_dtype", [
    ((1, 24), torch.float32, torch.float32),
    ((3, 5, 130), torch.float32, torch.float32),
    ((7, 130), torch.float16, torch.float16),
    ((17, 64), torch.float16, torch.float32),  # fp32 weight: normed promotes to fp32, the residual stays fp16
])
def test_add_rms_norm(shape, dtype, weight_dtype):
    torch.manual_seed(7)
    x, residual = torch.randn(shape, device=DEVICE).to(dtype), (3 * torch.randn(shape, device=DEVICE)).to(dtype)
    w = _weight(shape[-1], weight_dtype)
    normed, new_residual = add_rms_norm(x, residual, w, EPS)
    want_normed, want_residual = add_rms_norm_ref(x, residual, w, EPS)
    assert (normed.shape, normed.dtype) == (want_normed.shape, want_normed.dtype)
    assert (new_residual.shape, new_residual.dtype) == (want_residual.shape, want_residual.dtype)
    assert torch.equal(new_residual, want_residual)  # one rounded add: bit-exact
    assert rel_err(normed, want_normed) <= (1e-5 if dtype == torch.float32 else 1e-3)


def test_add_rms_norm_rounds_the_sum_before_the_norm():
    """fp16: the norm must read x + residual rounded to fp16 (as the model adds), not the fp32 sum."""
    torch.manual_seed(8)
    x = (0.3 * torch.randn(4, 64, device=DEVICE)).half()
    residual = (1000 + torch.randn(4, 64, device=DEVICE)).half()  # big: the rounding of the sum shows
    w = _weight(64, torch.float32)
    normed, _ = add_rms_norm(x, residual, w, EPS)
    unrounded = rms_norm_ref(x.float() + residual.float(), w, EPS)
    want, _ = add_rms_norm_ref(x, residual, w, EPS)
    assert rel_err(normed, want) <= 1e-6 < rel_err(normed, unrounded)


def test_add_rms_norm_strided_inputs_and_shape_check():
    torch.manual_seed(9)
    x = torch.randn(6, 2 * 48, device=DEVICE)[:, ::2]
    residual = torch.randn(48, 6, device=DEVICE).t()
    w = _weight(48, torch.float32)
    got, want = add_rms_norm(x, residual, w, EPS), add_rms_norm_ref(x, residual, w, EPS)
    assert rel_err(got[0], want[0]) <= 1e-5 and torch.equal(got[1], want[1])
    with pytest.raises(ValueError, match="same shape"):
        add_rms_norm(x, residual[:1], w, EPS)


# ---------------------------------------------------------------------------------- qk_norm_rope (tables)
@pytest.mark.parametrize("batch,length,q_heads,kv_heads,head_dim,section,dtype", [
    (1, 1, 1, 1, 16, [2, 3, 3], torch.float32),  # one token, one head
    (2, 3, 5, 5, 16, [2, 3, 3], torch.float32),  # odd heads, G = 1, the tiny thinker's section
    (1, 4, 8, 2, 64, [8, 12, 12], torch.float16),  # G = 4, D = 64
    (2, 2, 8, 1, 128, [24, 20, 20], torch.float32),  # G = 8, the real section
    (1, 3, 6, 2, 8, [1, 1, 2], torch.float16),  # the tiny talker's D = 8
    (2, 1, 3, 1, 40, [4, 3, 5], torch.float32),  # D/2 = 20 slots: a masked half-tile
    (2, 2, 4, 2, 128, None, torch.float32),  # 1-D RoPE (code predictor)
])
def test_qk_norm_rope(batch, length, q_heads, kv_heads, head_dim, section, dtype):
    q = torch.randn(batch, length, q_heads, head_dim, device=DEVICE).to(dtype)
    k = torch.randn(batch, length, kv_heads, head_dim, device=DEVICE).to(dtype)
    qw, kw = _weight(head_dim, dtype), _weight(head_dim, dtype)
    positions = _positions(batch * length).view(3, batch, length)
    if section is None:
        positions = positions[0]
    cos, sin = rope_cos_sin_ref(positions, rope_inv_freq(head_dim, 1e6), section, dtype)
    q_in, k_in = q.clone(), k.clone()
    got_q, got_k = qk_norm_rope(q, k, qw, kw, EPS, cos, sin)
    want_q, want_k = qk_norm_rope_ref(q.float(), k.float(), qw.float(), kw.float(), EPS, cos.float(), sin.float())
    assert got_q.dtype == dtype and got_q.shape == q.shape and got_k.shape == k.shape
    assert rel_err(got_q, want_q) <= TOL[dtype] and rel_err(got_k, want_k) <= TOL[dtype]
    assert torch.equal(q, q_in) and torch.equal(k, k_in), "qk_norm_rope returns new tensors"


def test_qk_norm_rope_strided_views_of_fused_qkv():
    batch, length, q_heads, kv_heads, head_dim = 2, 3, 4, 2, 16
    fused = torch.randn(batch, length, (q_heads + 2 * kv_heads) * head_dim, device=DEVICE)
    q = fused[..., :q_heads * head_dim].view(batch, length, q_heads, head_dim)
    k = fused[..., q_heads * head_dim:(q_heads + kv_heads) * head_dim].view(batch, length, kv_heads, head_dim)
    assert not q.is_contiguous() and not k.is_contiguous()
    qw, kw = _weight(head_dim, torch.float32), _weight(head_dim, torch.float32)
    cos, sin = rope_cos_sin_ref(_positions(batch * length).view(3, batch, length), rope_inv_freq(head_dim, 1e6),
                                [2, 3, 3], torch.float32)
    got = qk_norm_rope(q, k, qw, kw, EPS, cos, sin)
    want = qk_norm_rope_ref(q, k, qw, kw, EPS, cos, sin)
    assert rel_err(got[0], want[0]) <= 1e-5 and rel_err(got[1], want[1]) <= 1e-5


# -------------------------------------------------------------- qk_norm_rope with the k/v cache write fused
def _cache_write_case(dtype, batch=2, length=3, q_heads=4, kv_heads=2, head_dim=16, slots=3, max_len=10):
    """Strided q/k/v views of one fused qkv output, random caches, rows written at distinct positions (row 1 a
    padded row: it writes the scratch slot, as runtime/kv_cache.py's StaticCacheView)."""
    torch.manual_seed(11)
    qkv = torch.randn(batch, length, (q_heads + 2 * kv_heads) * head_dim, device=DEVICE).to(dtype)
    q, k, v = qkv.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = q.view(batch, length, q_heads, head_dim)
    k, v = k.view(batch, length, kv_heads, head_dim), v.view(batch, length, kv_heads, head_dim)
    cos, sin = rope_cos_sin_ref(_positions(batch * length).view(3, batch, length), rope_inv_freq(head_dim, 1e6),
                                [2, 3, 3], dtype)
    caches = [torch.randn(slots + 1, max_len, kv_heads, head_dim, device=DEVICE).to(dtype) for _ in range(2)]
    rows = torch.tensor([1, slots], device=DEVICE)[:batch, None].expand(batch, length)  # an expanded view
    start = torch.tensor([4, 0], device=DEVICE)[:batch, None]
    at = start + torch.arange(length, device=DEVICE)
    return (q, k, v, _weight(head_dim, dtype), _weight(head_dim, dtype), EPS, cos, sin), caches, rows, at


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_qk_norm_rope_cache_write(dtype):
    args, (k_cache, v_cache), rows, at = _cache_write_case(dtype)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want_q = qk_norm_rope_cache_write_ref(*args, want_k, want_v, rows, at)
    got_q = qk_norm_rope_cache_write(*args, k_cache, v_cache, rows, at)
    assert got_q.shape == want_q.shape and got_q.dtype == want_q.dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    assert rel_err(got_q, want_q) <= tol
    assert rel_err(k_cache, want_k) <= tol
    assert torch.equal(v_cache, want_v)  # a copy
    untouched = torch.ones_like(k_cache, dtype=torch.bool)
    untouched[rows, at] = False
    assert torch.equal(k_cache[untouched], want_k[untouched])  # nothing else written
    written_k = qk_norm_rope_ref(*args[:2], *args[3:])[1]
    assert rel_err(k_cache[rows, at], written_k) <= tol


def test_qk_norm_rope_cache_write_one_token_real_heads():
    """Decode: one token per row, the thinker's 32/4 heads of 128, a row in the last cache position."""
    args, (k_cache, v_cache), _, _ = _cache_write_case(torch.float32, batch=2, length=1, q_heads=32, kv_heads=4,
                                                       head_dim=128, slots=2, max_len=5)
    rows = torch.tensor([[0], [1]], device=DEVICE)
    at = torch.tensor([[4], [0]], device=DEVICE)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want_q = qk_norm_rope_cache_write_ref(*args, want_k, want_v, rows, at)
    got_q = qk_norm_rope_cache_write(*args, k_cache, v_cache, rows, at)
    assert rel_err(got_q, want_q) <= 1e-5 and rel_err(k_cache, want_k) <= 1e-5 and torch.equal(v_cache, want_v)


def test_qk_norm_rope_cache_write_checks_shapes():
    args, (k_cache, v_cache), rows, at = _cache_write_case(torch.float32)
    with pytest.raises(ValueError, match="write_rows"):
        qk_norm_rope_cache_write(*args, k_cache, v_cache, rows[:, :1], at)
    with pytest.raises(ValueError, match="must match"):
        qk_norm_rope_cache_write(*args, k_cache[..., :8], v_cache[..., :8], rows, at)


# --------------------------------------------------------------------------- mrope_qk_norm_ (in place)
@pytest.mark.parametrize("tokens,q_heads,kv_heads,head_dim,section,dtype", [
    (1, 3, 1, 16, [2, 3, 3], torch.float32),  # one token (decode), G = 3, the tiny thinker
    (5, 2, 2, 8, [1, 1, 2], torch.float16),  # G = 1, the tiny talker (THWT)
    (4, 8, 2, 64, [16, 8, 8], torch.float32),  # G = 4, D = 64, unequal h/w sections
    (3, 8, 1, 128, [24, 20, 20], torch.float32),  # G = 8, the real thinker section
    (6, 7, 7, 128, [24, 20, 20], torch.float16),  # odd heads
    (3, 4, 1, 128, [16, 24, 24], torch.float32),  # sections reaching past D/2 (22/21/21)
    (4, 4, 2, 64, None, torch.float32),  # 1-D RoPE: positions (T,)
])
def test_mrope_qk_norm_in_place(tokens, q_heads, kv_heads, head_dim, section, dtype):
    q = torch.randn(tokens, q_heads, head_dim, device=DEVICE).to(dtype)
    k = torch.randn(tokens, kv_heads, head_dim, device=DEVICE).to(dtype)
    qw, kw = _weight(head_dim, dtype), _weight(head_dim, dtype)
    positions = _positions(tokens, spread=8000)
    if section is None:
        positions = positions[1]
    inv_freq = rope_inv_freq(head_dim, 1e6).to(DEVICE)
    want_q, want_k = q.float().clone(), k.float().clone()
    mrope_qk_norm_ref_(want_q, want_k, qw.float(), kw.float(), EPS, positions, inv_freq, section)
    q_obj, k_obj, q_ptr = q, k, q.data_ptr()
    got_q, got_k = mrope_qk_norm_(q, k, qw, kw, EPS, positions, inv_freq, section)
    assert got_q is q_obj and got_k is k_obj and q.data_ptr() == q_ptr, "updated in place, same tensors returned"
    assert rel_err(q, want_q) <= TOL[dtype] and rel_err(k, want_k) <= TOL[dtype]


def test_mrope_qk_norm_strided_views_of_fused_qkv():
    """q and k as views into one fused [q | k | v] projection: both updated through their strides, v untouched."""
    tokens, q_heads, kv_heads, head_dim = 5, 4, 2, 128
    fused = torch.randn(tokens, (q_heads + 2 * kv_heads) * head_dim, device=DEVICE)
    q = fused[:, :q_heads * head_dim].view(tokens, q_heads, head_dim)
    k = fused[:, q_heads * head_dim:(q_heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    v_before = fused[:, (q_heads + kv_heads) * head_dim:].clone()
    qw, kw = _weight(head_dim, torch.float32), _weight(head_dim, torch.float32)
    positions = _positions(tokens).float().view(3, 1, tokens)  # the model builds float (3, B, L) ids
    inv_freq = rope_inv_freq(head_dim, 1e6).to(DEVICE)
    want_q, want_k = q.clone(), k.clone()
    mrope_qk_norm_ref_(want_q, want_k, qw, kw, EPS, positions, inv_freq, [24, 20, 20])
    mrope_qk_norm_(q, k, qw, kw, EPS, positions, inv_freq, [24, 20, 20])
    assert rel_err(fused[:, :q_heads * head_dim], want_q.flatten(1)) <= 1e-5
    assert rel_err(fused[:, q_heads * head_dim:(q_heads + kv_heads) * head_dim], want_k.flatten(1)) <= 1e-5
    assert torch.equal(fused[:, (q_heads + kv_heads) * head_dim:], v_before)


def test_mrope_qk_norm_equals_table_path():
    """The in-place op from positions and qk_norm_rope from rope_cos_sin tables agree (fp16: same roundings)."""
    tokens, q_heads, kv_heads, head_dim, section = 6, 4, 2, 64, [8, 12, 12]
    q = torch.randn(tokens, q_heads, head_dim, device=DEVICE).half()
    k = torch.randn(tokens, kv_heads, head_dim, device=DEVICE).half()
    qw, kw = _weight(head_dim, torch.float16), _weight(head_dim, torch.float16)
    positions, inv_freq = _positions(tokens), rope_inv_freq(head_dim, 1e6).to(DEVICE)
    cos, sin = rope_cos_sin_ref(positions, inv_freq, section, torch.float16)
    table_q, table_k = qk_norm_rope(q[None], k[None], qw, kw, EPS, cos[None], sin[None])
    mrope_qk_norm_(q, k, qw, kw, EPS, positions, inv_freq, section)
    assert rel_err(q, table_q[0]) <= 2e-3 and rel_err(k, table_k[0]) <= 2e-3


# ---------------------------------------------------------------------------------------------- dispatch
def test_registered_and_selectable():
    saved = dispatch.selected()
    ops = ("rms_norm", "qk_norm_rope", "mrope_qk_norm_")
    assert all("triton" in dispatch.backends(op) for op in ops)
    with dispatch.active({op: "triton" for op in ops}):
        q = torch.randn(2, 3, 16, device=DEVICE)
        k = torch.randn(2, 1, 16, device=DEVICE)
        want_q, want_k = q.clone(), k.clone()
        w = _weight(16, torch.float32)
        inv_freq = rope_inv_freq(16, 1e6).to(DEVICE)
        got = dispatch.mrope_qk_norm_(q, k, w, w, EPS, _positions(2), inv_freq, [2, 3, 3])
        assert got[0] is q
    assert dispatch.selected() == saved
    assert not torch.equal(q, want_q) and not torch.equal(k, want_k)


@torch.no_grad()
def test_tiny_thinker_logits_through_triton(monkeypatch):
    """The whole tiny thinker (TM-RoPE [2, 3, 3], D = 16) through the Triton qk_norm_rope and the norms: each
    layer's input norm inside its q|k|v GEMM (add_rms_norm_linear, the first without a residual), its
    post-attention norm and the final norm as add_rms_norm (both take the running residual)."""
    from runtime.weights import init_random

    seed = int(torch.randint(0, 2**31, ()).item())
    model = init_random("tiny", DEVICE, torch.float32, seed=seed)  # compiled Triton (CUDA) takes device tensors
    input_ids = torch.randint(0, min(model.thinker.cfg.text.vocab_size, 64), (2, 7), device=DEVICE)
    want = model.thinker(input_ids).logits
    calls = {"qk_norm_rope": 0, "rms_norm": 0, "add_rms_norm": 0, "add_rms_norm_linear": 0}
    saved = dispatch.selected()
    dispatch.load_backend("triton")
    for op in calls:
        kernel = dispatch._IMPLS[op]["triton"]

        def counted(*args, _op=op, _kernel=kernel):
            calls[_op] += 1
            return _kernel(*args)
        monkeypatch.setitem(dispatch._IMPLS[op], "triton", counted)
    with dispatch.active({op: "triton" for op in calls}):
        got = model.thinker(input_ids).logits
    assert dispatch.selected() == saved
    num_layers = model.thinker.cfg.text.num_layers
    assert calls == {"qk_norm_rope": num_layers, "rms_norm": 0, "add_rms_norm": num_layers + 1,
                     "add_rms_norm_linear": num_layers}, calls
    assert rel_err(got, want) <= 1e-4


# ------------------------------------------------------------------------------------------------- GPU
@compiles_without_gpu
def test_compiles_for_sm90():
    out = compile_for_sm90("""
        from kernels.rope import rope_cos_sin_ref, rope_inv_freq
        from kernels.triton_rope import add_rms_norm, mrope_qk_norm_, qk_norm_rope, qk_norm_rope_cache_write, rms_norm
        inv_freq = rope_inv_freq(128, 1e6)
        for dtype in (torch.bfloat16, torch.float32):  # fp16 compiles as bf16 does
            w = torch.ones(128, dtype=dtype)
            q, k = torch.randn(1, 4, 32, 128).to(dtype), torch.randn(1, 4, 4, 128).to(dtype)
            cos, sin = rope_cos_sin_ref(torch.zeros(3, 1, 4), inv_freq, [24, 20, 20], dtype)
            qk_norm_rope(q, k, w, w, 1e-6, cos, sin)
            mrope_qk_norm_(q[0], k[0], w, w, 1e-6, torch.zeros(3, 4, dtype=torch.int64), inv_freq, [24, 20, 20])
            mrope_qk_norm_(q[0], k[0], w, w, 1e-6, torch.zeros(4), inv_freq, None)
            rms_norm(torch.randn(3, 2048).to(dtype), torch.ones(2048), 1e-6)
            rms_norm(torch.randn(3, 2048).to(dtype), torch.ones(2048, dtype=dtype), 1e-6)
            add_rms_norm(torch.randn(3, 2048).to(dtype), torch.randn(3, 2048).to(dtype), torch.ones(2048, dtype=dtype),
                         1e-6)
            cache = torch.zeros(3, 16, 4, 128, dtype=dtype)
            rows = torch.zeros(1, 4, dtype=torch.int64)
            qk_norm_rope_cache_write(q, k, k, w, w, 1e-6, cos, sin, cache, cache.clone(), rows, rows + 1)
    """)
    assert "_qk_norm_rope_kernel" in out and "_rms_norm_kernel" in out and "_add_rms_norm_kernel" in out


@needs_cuda
@pytest.mark.parametrize("tokens", [1, 8, 4096])
def test_real_shapes_bf16(tokens):
    q_heads, kv_heads, head_dim, section = 32, 4, 128, [24, 20, 20]
    q = torch.randn(tokens, q_heads, head_dim, device="cuda").bfloat16()
    k = torch.randn(tokens, kv_heads, head_dim, device="cuda").bfloat16()
    qw, kw = _weight(head_dim, torch.bfloat16), _weight(head_dim, torch.bfloat16)
    positions, inv_freq = _positions(tokens, spread=8192), rope_inv_freq(head_dim, 1e6).cuda()
    cos, sin = rope_cos_sin_ref(positions, inv_freq, section, torch.bfloat16)
    want_q, want_k = qk_norm_rope_ref(q[None].float(), k[None].float(), qw.float(), kw.float(), EPS,
                                      cos[None].float(), sin[None].float())
    got_q, got_k = qk_norm_rope(q[None], k[None], qw, kw, EPS, cos[None], sin[None])
    assert rel_err(got_q, want_q) <= 1e-2 and rel_err(got_k, want_k) <= 1e-2
    same_q, _ = qk_norm_rope_ref(q[None], k[None], qw, kw, EPS, cos[None], sin[None])
    assert rel_err(got_q, same_q) <= 1e-3  # the bf16 roundings are the reference's
    mrope_qk_norm_(q, k, qw, kw, EPS, positions, inv_freq, section)
    assert rel_err(q, want_q[0]) <= 1e-2 and rel_err(k, want_k[0]) <= 1e-2
    x = torch.randn(tokens, 2048, device="cuda").bfloat16()
    w = _weight(2048, torch.bfloat16)
    assert rel_err(rms_norm(x, w, EPS), rms_norm_ref(x.float(), w.float(), EPS)) <= 1e-2
    residual = torch.randn(tokens, 2048, device="cuda").bfloat16()
    got_normed, got_residual = add_rms_norm(x, residual, w, EPS)
    want_normed, want_residual = add_rms_norm_ref(x, residual, w, EPS)
    assert torch.equal(got_residual, want_residual) and rel_err(got_normed, want_normed) <= 1e-2
    k_cache = torch.zeros(3, tokens + 3, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    rows = torch.full((1, tokens), 2, device="cuda")
    at = torch.arange(tokens, device="cuda")[None] + 3
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want_q = qk_norm_rope_cache_write_ref(q[None], k[None], k[None], qw, kw, EPS, cos[None], sin[None], want_k, want_v,
                                          rows, at)
    got_q = qk_norm_rope_cache_write(q[None], k[None], k[None], qw, kw, EPS, cos[None], sin[None], k_cache, v_cache,
                                     rows, at)
    assert rel_err(got_q, want_q) <= 1e-2 and rel_err(k_cache, want_k) <= 1e-2 and torch.equal(v_cache, want_v)


@needs_cuda
def test_cuda_graph_replay_with_poisoned_outputs():
    tokens, q_heads, kv_heads, head_dim, section = 4, 32, 4, 128, [24, 20, 20]
    fused = torch.randn(tokens, (q_heads + 2 * kv_heads) * head_dim, device="cuda").bfloat16()
    q = fused[:, :q_heads * head_dim].view(tokens, q_heads, head_dim)
    k = fused[:, q_heads * head_dim:(q_heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    qw, kw = _weight(head_dim, torch.bfloat16), _weight(head_dim, torch.bfloat16)
    positions, inv_freq = _positions(tokens), rope_inv_freq(head_dim, 1e6).cuda()
    x_in = torch.randn(tokens, 2048, device="cuda").bfloat16()
    w = _weight(2048, torch.bfloat16)
    x_out = torch.empty_like(x_in)
    src = torch.empty_like(fused)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up compiles outside the capture
        mrope_qk_norm_(q, k, qw, kw, EPS, positions, inv_freq, section)
        x_out.copy_(rms_norm(x_in, w, EPS))
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fused.copy_(src)
        mrope_qk_norm_(q, k, qw, kw, EPS, positions, inv_freq, section)
        x_out.copy_(rms_norm(x_in, w, EPS))
    for _ in range(2):  # fresh inputs and positions each replay; outputs poisoned before
        src.copy_(torch.randn_like(src))
        positions.copy_(_positions(tokens, spread=8192))
        x_in.copy_(torch.randn_like(x_in))
        fused.fill_(float("nan"))
        x_out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        want_q = src[:, :q_heads * head_dim].view(tokens, q_heads, head_dim).clone()
        want_k = src[:, q_heads * head_dim:(q_heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim).clone()
        mrope_qk_norm_ref_(want_q, want_k, qw, kw, EPS, positions, inv_freq, section)
        assert not fused.isnan().any() and not x_out.isnan().any()
        assert rel_err(q, want_q) <= 1e-2 and rel_err(k, want_k) <= 1e-2
        assert rel_err(x_out, rms_norm_ref(x_in, w, EPS)) <= 1e-2
