"""Triton add_rms_norm_linear and add_rms_norm_swiglu (kernels/triton_linear.py) against their torch twins
(kernels/norm.py): rows 1, 3, 17 and past a row tile, residual given and None, N and K not multiples of the
blocks, strided rows (the code predictor's last position), fp32 and fp16 under the interpreter; the new
residual exactly; argument checks; the dispatch choice; the kernels compiled for sm_90 (no GPU needed). GPU: bf16
at the real shapes. The same for the talker's shared expert, linear_swiglu and linear_gated_add (twins:
kernels/mlp.py), and the SparseMoeBlock that runs them."""

import pytest
import torch
import torch.nn.functional as F

from kernels.mlp import linear_gated_add_ref, linear_swiglu_ref
from kernels.norm import add_rms_norm_linear_ref, add_rms_norm_swiglu_ref
from kernels.triton_linear import (DECODE_CONFIG, MAX_BLOCK_M, PREFILL_CONFIG, add_rms_norm_linear,
                                   add_rms_norm_swiglu, linear_gated_add, linear_swiglu)
from runtime import dispatch
from runtime.models.layers import SparseMoeBlock
from tests.test_triton_attention import compile_for_sm90, compiles_without_gpu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bf16, real shapes)")
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
# K and N past whole blocks of both configs (masked edges), and several column tiles (the first writes the residual)
BLOCK_K, BLOCK_N = max(DECODE_CONFIG["BLOCK_K"], PREFILL_CONFIG["BLOCK_K"]), max(DECODE_CONFIG["BLOCK_N"],
                                                                                  PREFILL_CONFIG["BLOCK_N"])
WIDTH = BLOCK_K + 73
COLS = BLOCK_N + 6


def rel_err(got, want):
    got, want = got.float(), want.float()
    err = ((got - want).norm() / want.norm()).item()
    print(f"rel {err:.2e}  max abs {(got - want).abs().max().item():.2e}")
    return err


def _inputs(rows: int, width: int, out_rows: int, dtype, with_residual: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=gen).to(DEVICE, dtype)
    residual = (3 * torch.randn(rows, width, generator=gen)).to(DEVICE, dtype) if with_residual else None
    norm_weight = (1 + 0.2 * torch.randn(width, generator=gen)).to(DEVICE, dtype)
    weight = (torch.randn(out_rows, width, generator=gen) / width ** 0.5).to(DEVICE, dtype)
    return x, residual, norm_weight, weight


def _check_residual(got, x, residual, want):
    assert got.shape == x.shape and got.dtype == x.dtype
    assert torch.equal(got, want), "new_residual must be x + residual rounded as torch adds (x itself when None)"
    if residual is None:
        assert got.data_ptr() != x.data_ptr()  # a fresh tensor: an op's output may not alias its input


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("rows", [1, 3, 17, MAX_BLOCK_M + 3])
def test_add_rms_norm_linear(dtype, with_residual, rows):
    x, residual, norm_weight, weight = _inputs(rows, WIDTH, COLS, dtype, with_residual, seed=rows)
    got, got_residual = add_rms_norm_linear(x, residual, norm_weight, 1e-6, weight)
    want, want_residual = add_rms_norm_linear_ref(x, residual, norm_weight, 1e-6, weight)
    assert got.shape == want.shape == (rows, COLS) and got.dtype == want.dtype
    assert rel_err(got, want) <= TOL[dtype]
    _check_residual(got_residual, x, residual, want_residual)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_add_rms_norm_swiglu(dtype, with_residual, rows):
    x, residual, norm_weight, gate_up = _inputs(rows, WIDTH, 2 * COLS, dtype, with_residual, seed=100 + rows)
    got, got_residual = add_rms_norm_swiglu(x, residual, norm_weight, 1e-6, gate_up)
    want, want_residual = add_rms_norm_swiglu_ref(x, residual, norm_weight, 1e-6, gate_up)
    assert got.shape == want.shape == (rows, COLS) and got.dtype == want.dtype
    assert rel_err(got, want) <= TOL[dtype]
    _check_residual(got_residual, x, residual, want_residual)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_strided_rows_and_leading_dims(dtype):
    """x[:, -1] and residual[:, -1] of [B, L, K] streams (the code predictor's final norm + lm_head) and a
    [B, L, K] input whose output keeps its leading dims."""
    x, residual, norm_weight, weight = _inputs(2 * 3, WIDTH, COLS, dtype, True, seed=7)
    x, residual = x.view(2, 3, WIDTH), residual.view(2, 3, WIDTH)
    for rows_x, rows_residual in ((x[:, -1], residual[:, -1]), (x, residual)):
        got, got_residual = add_rms_norm_linear(rows_x, rows_residual, norm_weight, 1e-6, weight)
        want, want_residual = add_rms_norm_linear_ref(rows_x, rows_residual, norm_weight, 1e-6, weight)
        assert got.shape == want.shape == (*rows_x.shape[:-1], COLS)
        assert rel_err(got, want) <= TOL[dtype]
        _check_residual(got_residual, rows_x, rows_residual, want_residual)
        act, act_residual = add_rms_norm_swiglu(rows_x, rows_residual, norm_weight, 1e-6, weight)
        want_act, _ = add_rms_norm_swiglu_ref(rows_x, rows_residual, norm_weight, 1e-6, weight)
        assert act.shape == (*rows_x.shape[:-1], COLS // 2) and rel_err(act, want_act) <= TOL[dtype]
        assert torch.equal(act_residual, want_residual)


def test_argument_checks_and_empty_rows():
    x, residual, norm_weight, weight = _inputs(2, 16, 6, torch.float32, True, seed=3)
    out, new_residual = add_rms_norm_linear(x[:0], residual[:0], norm_weight, 1e-6, weight)
    assert out.shape == (0, 6) and new_residual.shape == (0, 16)
    with pytest.raises(ValueError, match="residual"):
        add_rms_norm_linear(x, residual[:, :8], norm_weight, 1e-6, weight)
    with pytest.raises(ValueError, match="norm_weight"):
        add_rms_norm_linear(x, residual, norm_weight[:8], 1e-6, weight)
    with pytest.raises(ValueError, match="dtype"):
        add_rms_norm_linear(x, residual, norm_weight, 1e-6, weight.half())
    with pytest.raises(ValueError, match="2I rows"):
        add_rms_norm_swiglu(x, residual, norm_weight, 1e-6, weight[:5])


def test_the_triton_choice_runs_them():
    choice = dispatch.kernel_choice("triton")
    assert choice["add_rms_norm_linear"] == choice["add_rms_norm_swiglu"] == "triton"
    x, residual, norm_weight, weight = _inputs(3, 40, 12, torch.float32, True, seed=5)
    with dispatch.active(choice):
        got, _ = dispatch.add_rms_norm_swiglu(x, residual, norm_weight, 1e-6, weight)
    assert rel_err(got, add_rms_norm_swiglu_ref(x, residual, norm_weight, 1e-6, weight)[0]) <= 1e-5


def _shared_expert_inputs(rows: int, width: int, inter: int, dtype, seed: int):
    """x (rows, width), gate|up (2·inter, width), down (width, inter), gate (1, width), routed sum y (rows, width);
    weights scaled by 1/sqrt(fan-in) so the gate logits stay where the sigmoid is not flat."""
    gen = torch.Generator().manual_seed(seed)

    def new(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).to(DEVICE, dtype)
    return (new(rows, width), new(2 * inter, width, scale=width ** -0.5), new(width, inter, scale=inter ** -0.5),
            new(1, width, scale=width ** -0.5), new(rows, width))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, 17, MAX_BLOCK_M + 3])
def test_linear_swiglu(dtype, rows):
    x, gate_up, _, _, _ = _shared_expert_inputs(rows, WIDTH, COLS, dtype, seed=200 + rows)
    got, want = linear_swiglu(x, gate_up), linear_swiglu_ref(x, gate_up)
    assert got.shape == want.shape == (rows, COLS) and got.dtype == dtype
    assert rel_err(got, want) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, 17, MAX_BLOCK_M + 3])
def test_linear_gated_add(dtype, rows):
    """K (the down GEMM's width) and N and G (the gate's width) all past whole blocks, several column tiles."""
    x, _, down, gate, y = _shared_expert_inputs(rows, COLS, WIDTH, dtype, seed=300 + rows)
    act = linear_swiglu_ref(x, torch.randn(2 * WIDTH, COLS, generator=torch.Generator().manual_seed(rows)).to(x))
    got, want = linear_gated_add(act, down, x, gate, y), linear_gated_add_ref(act, down, x, gate, y)
    assert got.shape == want.shape == (rows, COLS) and got.dtype == dtype
    assert rel_err(got, want) <= TOL[dtype]
    # the gate matters: dropping it (gate 1 everywhere) is far from the result
    assert rel_err(y + F.linear(act, down), want) > 100 * TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_shared_expert_strided_and_leading_dims(dtype):
    """[B, L, H] inputs keep their leading dims; x and y as column slices of wider rows (strided)."""
    x, gate_up, down, gate, y = _shared_expert_inputs(2 * 3, WIDTH + 5, 40, dtype, seed=11)
    x, y = x.view(2, 3, -1)[..., 2:WIDTH + 2], y.view(2, 3, -1)[..., :WIDTH]
    gate_up, down, gate = gate_up[:, :WIDTH], down[:WIDTH], gate[:, :WIDTH]
    act = linear_swiglu(x, gate_up)
    assert act.shape == (2, 3, 40) and rel_err(act, linear_swiglu_ref(x, gate_up)) <= TOL[dtype]
    got, want = linear_gated_add(act, down, x, gate, y), linear_gated_add_ref(act, down, x, gate, y)
    assert got.shape == (2, 3, WIDTH) and rel_err(got, want) <= TOL[dtype]


def test_shared_expert_argument_checks_and_empty_rows():
    x, gate_up, down, gate, y = _shared_expert_inputs(2, 16, 6, torch.float32, seed=13)
    act = linear_swiglu(x, gate_up)
    assert linear_swiglu(x[:0], gate_up).shape == (0, 6)
    assert linear_gated_add(act[:0], down, x[:0], gate, y[:0]).shape == (0, 16)
    with pytest.raises(ValueError, match="2I"):
        linear_swiglu(x, gate_up[:5])
    with pytest.raises(ValueError, match="dtype"):
        linear_swiglu(x, gate_up.half())
    with pytest.raises(ValueError, match="gate_weight"):
        linear_gated_add(act, down, x, gate.t(), y)
    with pytest.raises(ValueError, match="y"):
        linear_gated_add(act, down, x, gate, y[:, :8])
    with pytest.raises(ValueError, match="dtype"):
        linear_gated_add(act, down, x, gate, y.half())


def test_sparse_moe_block_runs_the_shared_expert_in_two_ops(monkeypatch):
    """The talker's MoE block (shared expert on) under the triton choice: linear_swiglu + linear_gated_add in place
    of the five ops, and the same output as the torch choice (the twins, i.e. the model's eager arithmetic)."""
    torch.manual_seed(17)
    block = SparseMoeBlock(hidden_size=48, num_experts=4, top_k=2, intermediate_size=16, norm_topk_prob=True,
                           shared_expert_intermediate_size=24).to(DEVICE)
    for param in block.parameters():
        torch.nn.init.normal_(param, std=param.shape[-1] ** -0.5)
    x = torch.randn(2, 3, 48, device=DEVICE)
    with dispatch.using("torch"):
        want = block(x)
    choice = dispatch.kernel_choice("triton")  # loads the triton modules before their entries are wrapped
    calls = []
    for op in ("linear_swiglu", "linear_gated_add"):
        def recorded(*args, _op=op, _impl=dispatch._IMPLS[op]["triton"]):
            calls.append(_op)
            return _impl(*args)
        monkeypatch.setitem(dispatch._IMPLS[op], "triton", recorded)
    with dispatch.active(choice):
        got = block(x)
    assert calls == ["linear_swiglu", "linear_gated_add"]
    assert got.shape == x.shape and rel_err(got, want) <= 1e-5


@compiles_without_gpu
def test_compiles_for_sm90():
    out = compile_for_sm90("""
        from kernels.triton_linear import add_rms_norm_linear, add_rms_norm_swiglu
        for dtype, rows in ((torch.bfloat16, 1), (torch.bfloat16, 256), (torch.float32, 1)):  # decode, prefill tiles
            x = torch.randn(rows, 1024).to(dtype)
            norm_weight, weight = torch.randn(1024).to(dtype), torch.randn(6144, 1024).to(dtype)
            add_rms_norm_linear(x, x, norm_weight, 1e-6, weight)
            add_rms_norm_swiglu(x, None, norm_weight, 1e-6, weight)
        from kernels.triton_linear import linear_gated_add, linear_swiglu
        for dtype, rows in ((torch.bfloat16, 1), (torch.bfloat16, 256), (torch.float32, 1)):  # the talker's shapes
            x, y = torch.randn(rows, 1024).to(dtype), torch.randn(rows, 1024).to(dtype)
            act = linear_swiglu(x, torch.randn(1536, 1024).to(dtype))
            linear_gated_add(act, torch.randn(1024, 768).to(dtype), x, torch.randn(1, 1024).to(dtype), y)
    """)
    for kernel in ("_add_rms_norm_linear_kernel", "_swiglu_kernel", "_linear_gated_add_kernel"):
        assert kernel in out, kernel


@needs_cuda
@pytest.mark.parametrize("rows", [1, 8, 256])
def test_real_shapes_bf16(rows):
    """Thinker input_layernorm + q|k|v (H 2048 -> 5120) and the code predictor's dense MLP (H 1024, I 3072)."""
    for fn, ref, width, out_rows in ((add_rms_norm_linear, add_rms_norm_linear_ref, 2048, 5120),
                                     (add_rms_norm_swiglu, add_rms_norm_swiglu_ref, 1024, 2 * 3072)):
        x, residual, norm_weight, weight = _inputs(rows, width, out_rows, torch.bfloat16, True, seed=rows)
        got, got_residual = fn(x, residual, norm_weight, 1e-6, weight)
        want, want_residual = ref(x, residual, norm_weight, 1e-6, weight)
        assert rel_err(got, want) <= TOL[torch.bfloat16]
        assert torch.equal(got_residual, want_residual)


@needs_cuda
@pytest.mark.parametrize("rows", [1, 8, 256])
def test_shared_expert_real_shapes_bf16(rows):
    """The talker's shared expert: H 1024, I 768."""
    x, gate_up, down, gate, y = _shared_expert_inputs(rows, 1024, 768, torch.bfloat16, seed=rows)
    act = linear_swiglu(x, gate_up)
    assert rel_err(act, linear_swiglu_ref(x, gate_up)) <= TOL[torch.bfloat16]
    got, want = linear_gated_add(act, down, x, gate, y), linear_gated_add_ref(act, down, x, gate, y)
    assert rel_err(got, want) <= TOL[torch.bfloat16]
