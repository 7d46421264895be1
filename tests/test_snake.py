"""SnakeBeta with its constants folded at load (kernels/snake.py, kernels/triton_snake.py, runtime/models/code2wav.py):
the torch twin against the unfolded formula, the Triton kernel against the twin, and the folded buffers kept in
step with α, β by loading and random init while the state dict stays the checkpoint's."""

import pytest
import torch

from kernels.snake import snake_beta_ref
from runtime.models.code2wav import SNAKE_EPS, SnakeBeta
from runtime.weights import init_random_, refresh_folded
from tests.oracle import rel_err

TOL = 1e-6  # fp32; measured ~1e-7 (sin of the same rounded product)


def unfolded(x, alpha, beta):
    """transformers' SnakeBeta: everything from the log-space parameters, every call."""
    a, b = torch.exp(alpha)[None, :, None], torch.exp(beta)[None, :, None]
    return x + (1.0 / (b + SNAKE_EPS)) * torch.sin(x * a).pow(2)


def test_twin_matches_unfolded_formula():
    gen = torch.Generator().manual_seed(7)
    x, alpha, beta = torch.randn(2, 6, 33, generator=gen), torch.randn(6, generator=gen), torch.randn(6, generator=gen)
    out = snake_beta_ref(x, alpha.exp(), 1.0 / (beta.exp() + SNAKE_EPS))
    assert rel_err(out, unfolded(x, alpha, beta)) <= TOL


@pytest.mark.parametrize("shape", [(2, 6, 33), (1, 96, 1500), (3, 4, 1)])
def test_triton_kernel_matches_twin(shape):
    triton_snake = pytest.importorskip("kernels.triton_snake", reason="needs triton")
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(*shape, generator=gen) * 3
    alpha_exp, inv_beta = torch.rand(shape[1], generator=gen) + 0.5, torch.rand(shape[1], generator=gen) + 0.5
    strided = torch.randn(shape[0], shape[2], shape[1], generator=gen).transpose(1, 2)  # a non-contiguous input
    for inp in (x, strided):
        out = triton_snake.snake_beta(inp, alpha_exp, inv_beta)
        assert out.shape == inp.shape and out.is_contiguous()
        assert rel_err(out, snake_beta_ref(inp, alpha_exp, inv_beta)) <= TOL


def test_folded_buffers_follow_the_parameters_and_stay_out_of_the_state_dict():
    with torch.device("meta"):
        act = SnakeBeta(8)
    init_random_(act, seed=0)
    assert torch.equal(act.alpha_exp, act.alpha.exp())  # refreshed after the values, not from to_empty's memory
    assert set(act.state_dict()) == {"alpha", "beta"}
    with torch.no_grad():
        act.alpha.normal_()
        act.beta.normal_()
    refresh_folded(act)
    x = torch.randn(2, 8, 5)
    assert rel_err(act(x), unfolded(x, act.alpha.detach(), act.beta.detach())) <= TOL
