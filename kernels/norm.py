"""RMSNorm as Qwen3 computes it (MODEL_SPEC §3): normalise in fp32, cast back, then scale."""

import torch


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: (..., dim) any float dtype; weight: (dim,). Returns a new tensor of x's shape and dtype.

    The cast to x's dtype happens before the multiply by `weight`, exactly as the checkpoint was trained.
    """
    normed = x.float()
    normed = normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)
