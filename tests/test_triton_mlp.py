"""Triton silu_mul and sigmoid_gate_add (kernels/triton_mlp.py) against their torch twins (kernels/mlp.py):
one row, a row count past a block, widths past BLOCK_N, strided views of a gate|up output, fp32 and fp16
under the interpreter; the dispatch choice; and the tiny talker (shared expert) and code predictor (dense MLP)
through them. GPU: bf16 at the real shapes."""

import pytest
import torch

from kernels.mlp import sigmoid_gate_add_ref, silu_mul_ref
from kernels.triton_mlp import BLOCK_N, sigmoid_gate_add, silu_mul
from runtime import dispatch
from tests.test_triton_attention import compile_for_sm90, compiles_without_gpu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bf16, real shapes)")
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def rel_err(got, want):
    got, want = got.float(), want.float()
    err = ((got - want).norm() / want.norm()).item()
    print(f"rel {err:.2e}  max abs {(got - want).abs().max().item():.2e}")
    return err


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lead,width", [((1,), 24), ((2, 3), 130), ((129,), BLOCK_N + 7)])
def test_silu_mul_of_a_gate_up_output(dtype, lead, width):
    torch.manual_seed(width)
    gate_up = (2 * torch.randn(*lead, 2 * width, device=DEVICE)).to(dtype)
    gate, up = gate_up.split(width, dim=-1)  # strided views, as GatedMLP's FusedLinear returns them
    got, want = silu_mul(gate, up), silu_mul_ref(gate, up)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert rel_err(got, want) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,width", [(1, 24), (17, 130), (3, BLOCK_N + 1)])
def test_sigmoid_gate_add(dtype, rows, width):
    torch.manual_seed(rows)
    x, y = torch.randn(rows, width, device=DEVICE).to(dtype), torch.randn(rows, width, device=DEVICE).to(dtype)
    gate_logit = (3 * torch.randn(rows, 1, device=DEVICE)).to(dtype)
    got, want = sigmoid_gate_add(x, gate_logit, y), sigmoid_gate_add_ref(x, gate_logit, y)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert rel_err(got, want) <= TOL[dtype]


def test_shape_checks_and_empty_rows():
    x = torch.randn(0, 8, device=DEVICE)
    assert silu_mul(x, x).shape == (0, 8) and sigmoid_gate_add(x, x[:, :1], x).shape == (0, 8)
    with pytest.raises(ValueError, match="must match"):
        silu_mul(torch.randn(2, 8), torch.randn(2, 4))
    with pytest.raises(ValueError, match="gate_logit"):
        sigmoid_gate_add(torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 8))


def test_the_triton_choice_runs_them():
    choice = dispatch.kernel_choice("triton")
    assert choice["silu_mul"] == choice["sigmoid_gate_add"] == "triton"


@torch.no_grad()
def test_tiny_talker_and_code_predictor_through_triton():
    """The tiny talker (MoE + sigmoid-gated shared expert) and code predictor (dense SiLU MLPs) logits with
    the two ops on Triton equal the torch path."""
    from runtime.weights import init_random

    model = init_random("tiny", DEVICE, torch.float32, seed=3)
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 5, model.cfg.talker.text.hidden_size, generator=gen).to(DEVICE)
    positions = torch.arange(5, device=DEVICE).expand(3, 2, -1)
    code0 = torch.tensor([3, 7], device=DEVICE)
    want = model.talker(hidden, positions)
    want_codes, want_logits = model.talker.predict_frame(hidden[:, -1], code0, return_logits=True)
    with dispatch.active({"silu_mul": "triton", "sigmoid_gate_add": "triton"}):
        got = model.talker(hidden, positions)
        got_codes, got_logits = model.talker.predict_frame(hidden[:, -1], code0, return_logits=True)
    assert rel_err(got[0], want[0]) <= 1e-5
    assert rel_err(got_logits, want_logits) <= 1e-5 and torch.equal(got_codes, want_codes)


@compiles_without_gpu
def test_compiles_for_sm90():
    out = compile_for_sm90("""
        from kernels.triton_mlp import sigmoid_gate_add, silu_mul
        for dtype in (torch.bfloat16, torch.float32):
            gate, up = torch.randn(4, 2 * 768).to(dtype).split(768, dim=-1)
            silu_mul(gate, up)
            x = torch.randn(4, 1024).to(dtype)
            sigmoid_gate_add(x, x[:, :1], x)
    """)
    assert "_silu_mul_kernel" in out and "_sigmoid_gate_add_kernel" in out


@needs_cuda
def test_real_shapes_bf16():
    gate_up = torch.randn(8, 2 * 768, device="cuda").bfloat16()  # the talker's shared expert, 8 rows
    gate, up = gate_up.split(768, dim=-1)
    assert rel_err(silu_mul(gate, up), silu_mul_ref(gate, up)) <= 1e-2
    x, y = torch.randn(8, 1024, device="cuda").bfloat16(), torch.randn(8, 1024, device="cuda").bfloat16()
    g = torch.randn(8, 1, device="cuda").bfloat16()
    assert rel_err(sigmoid_gate_add(x, g, y), sigmoid_gate_add_ref(x, g, y)) <= 1e-2
