"""RMSNorm as Qwen3 computes it (MODEL_SPEC §3): normalise in fp32, cast back, then scale."""

import torch


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
