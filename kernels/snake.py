"""SnakeBeta, the activation of Code2Wav's decoder (MODEL_SPEC §10): x + sin²(e^α·x) / (e^β + ε) per channel.
Torch twin of kernels/triton_snake.py. The per-channel constants e^α and 1/(e^β + ε) depend only on the
weights, so the model computes them once at load (runtime/models/code2wav.py `SnakeBeta.fold_parameters`) and
a frame runs only the x-dependent part."""

import torch


def snake_beta_ref(x: torch.Tensor, alpha_exp: torch.Tensor, inv_beta: torch.Tensor) -> torch.Tensor:
    """x: [B, C, L]; alpha_exp = e^α, inv_beta = 1/(e^β + ε): [C]. Returns a new x + inv_beta·sin²(alpha_exp·x),
    each step rounded to x's dtype in transformers' order (x·α, sin, square, scale, add)."""
    alpha_exp, inv_beta = alpha_exp[None, :, None], inv_beta[None, :, None]  # [1, C, 1]
    return x + inv_beta * torch.sin(x * alpha_exp).pow(2)
