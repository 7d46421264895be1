"""Triton add_rms_norm_linear and add_rms_norm_swiglu (kernels/triton_linear.py) against their torch twins
(kernels/norm.py): rows 1, 3, 17 and past a row tile, residual given and None, N and K not multiples of the
blocks, strided rows (the code predictor's last position), fp32 and fp16 under the interpreter; the new
residual exactly; argument checks; the dispatch choice; both kernels compiled for sm_90 (no GPU needed). GPU: bf16
at the real shapes."""

import pytest
import torch

from kernels.norm import add_rms_norm_linear_ref, add_rms_norm_swiglu_ref
from kernels.triton_linear import (DECODE_CONFIG, MAX_BLOCK_M, PREFILL_CONFIG, add_rms_norm_linear,
                                   add_rms_norm_swiglu)
from runtime import dispatch
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


@compiles_without_gpu
def test_compiles_for_sm90():
    out = compile_for_sm90("""
        from kernels.triton_linear import add_rms_norm_linear, add_rms_norm_swiglu
        for dtype, rows in ((torch.bfloat16, 1), (torch.bfloat16, 256), (torch.float32, 1)):  # decode, prefill tiles
            x = torch.randn(rows, 1024).to(dtype)
            norm_weight, weight = torch.randn(1024).to(dtype), torch.randn(6144, 1024).to(dtype)
            add_rms_norm_linear(x, x, norm_weight, 1e-6, weight)
            add_rms_norm_swiglu(x, None, norm_weight, 1e-6, weight)
    """)
    assert "_add_rms_norm_linear_kernel" in out and "_add_rms_norm_swiglu_kernel" in out


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
