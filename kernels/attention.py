"""Scaled dot-product attention with grouped KV heads (GQA)."""

import torch


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """q: (batch, seq_q, q_heads, head_dim); k, v: (batch, seq_k, kv_heads, head_dim);
    mask: bool (batch or 1, 1, seq_q, seq_k), True = may attend, or None for full attention.
    Returns (batch, seq_q, q_heads, head_dim) in q's dtype.

    Softmax in fp32 as the model's eager path does. q_heads must be a multiple of kv_heads.
    """
    groups = q.shape[2] // k.shape[2]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, S, D)
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v).transpose(1, 2)


def causal_mask(seq_q: int, seq_k: int, device=None, window: int | None = None) -> torch.Tensor:
    """(1, 1, seq_q, seq_k) bool: query i (the last seq_q of seq_k positions) sees keys <= its own position,
    and with `window` only the last `window` keys including itself."""
    q_pos = torch.arange(seq_k - seq_q, seq_k, device=device)[:, None]
    k_pos = torch.arange(seq_k, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    return allowed[None, None]
