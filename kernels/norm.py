"""RMSNorm as Qwen3 computes it (MODEL_SPEC §3): normalise in fp32, cast back, then scale; alone, after the
residual add, and followed by the linear that reads it. Twins of kernels/triton_rope.py and
kernels/triton_linear.py."""

import torch
import torch.nn.functional as F

from kernels.mlp import silu_mul_ref


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: (..., dim) any float dtype; weight: (dim,). Returns a new tensor of x's shape and dtype.

    The cast to x's dtype happens before the multiply by `weight`, exactly as the checkpoint was trained.
    """
    normed = x.float()
    normed = normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: (..., dim), the same shape; weight: (dim,). Returns new (normed, new_residual):
    new_residual = x + residual (the decoder's residual stream, added and rounded in the activation dtype as
    transformers adds it), normed = rms_norm_ref(new_residual, weight, eps)."""
    new_residual = x + residual
    return rms_norm_ref(new_residual, weight, eps), new_residual


def add_rms_norm_linear_ref(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                            weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: (..., K), the same shape (residual None: x is the residual stream already); norm_weight: (K,);
    weight: (N, K). Returns (out (..., N), new_residual (..., K)): out = F.linear(normed, weight) with
    (normed, new_residual) = add_rms_norm_ref(x, residual, norm_weight, eps), or (rms_norm_ref(x, ...), x) when
    residual is None — a pre-norm decoder's norm and the linear that reads it (RMSNorm.add_and_norm, then qkv or
    the code predictor's lm_head)."""
    if residual is None:
        normed, new_residual = rms_norm_ref(x, norm_weight, eps), x
    else:
        normed, new_residual = add_rms_norm_ref(x, residual, norm_weight, eps)
    return F.linear(normed, weight), new_residual


def add_rms_norm_swiglu_ref(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                            gate_up_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """As add_rms_norm_linear_ref with gate_up_weight (2I, K), the gate rows then the up rows (GatedMLP's fused
    gate|up), followed by the SiLU·up product: returns (silu_mul_ref(gate, up) (..., I), new_residual (..., K))."""
    gate_up, new_residual = add_rms_norm_linear_ref(x, residual, norm_weight, eps, gate_up_weight)
    gate, up = gate_up.chunk(2, dim=-1)
    return silu_mul_ref(gate, up), new_residual
