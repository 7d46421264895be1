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


def decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_ids: torch.Tensor,
                         lengths: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of a few new tokens per row over a static KV cache (decode, or a prefill chunk).

    q: (B, L, q_heads, head_dim), the L newest tokens of each row; their keys/values are already written.
    k_cache, v_cache: (num_slots, max_len, kv_heads, head_dim), a preallocated pool shared by sessions.
    slot_ids: (B,) int64, the cache row of each batch row; −1 marks a padded row (output zeros, nothing read).
    lengths: (B,) int64, valid cached tokens of the row including its new ones (0 <= length <= max_len).
    Returns (B, L, q_heads, head_dim) in q's dtype. Query i of a row sits at position length − L + i and sees
    keys 0 … length − L + i (causal inside the chunk); softmax in fp32. GQA: q_heads % kv_heads == 0.
    A length below L front-pads the chunk: its first L − length queries sit before position 0, see no key
    and output zeros (a prefill chunk padded to a static bucket).
    """
    batch, new, q_heads, head_dim = q.shape
    out = torch.zeros_like(q)
    for row in range(batch):  # reference only: a host loop over rows; the kernels read slot/length on device
        slot, length = int(slot_ids[row]), int(lengths[row])
        if slot < 0:
            continue
        if not 0 <= length <= k_cache.shape[1]:
            raise ValueError(f"row {row}: length {length} must be in [0, {k_cache.shape[1]}]")
        padding = max(0, new - length)  # front-padded queries: no key, zero output
        if padding == new:
            continue
        k = k_cache[slot, :length][None]  # (1, length, kv_heads, D)
        v = v_cache[slot, :length][None]
        out[row, padding:] = attention_ref(q[row:row + 1, padding:], k, v, causal_mask(new - padding, length, q.device),
                                           scale)[0]
    return out


def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   scale: float) -> torch.Tensor:
    """attention_ref's contract through torch.nn.functional.scaled_dot_product_attention, whose fused flash /
    memory-efficient kernels run prefill chunks and the encoders' windows on a GPU (one fused kernel in place
    of the reference's matmul, mask, softmax, matmul).

    The mask goes in as an additive bias of finfo.min where attention_ref fills finfo.min: a row with every key
    masked (front padding) then averages all keys as the reference does instead of coming out NaN, which the
    next layer's keys would carry into the real rows. GQA heads are expanded (repeat_interleave) so that every
    fused backend accepts the call.
    """
    groups = q.shape[2] // k.shape[2]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, S, D)
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    bias = None
    if mask is not None:
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, torch.finfo(q.dtype).min)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    return out.transpose(1, 2)
