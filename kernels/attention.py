"""Scaled dot-product attention with grouped KV heads (GQA)."""

import torch

from kernels.launch_counts import DECODE_ATTENTION_COUNTERS
from kernels.rope import qk_norm_rope_cache_write_ref


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """q: (batch, seq_q, q_heads, head_dim); k, v: (batch, seq_k, kv_heads, head_dim);
    mask: bool (batch or 1, 1, seq_q or 1, seq_k), True = may attend, or None for full attention (a seq_q of 1
    applies one key mask to every query row).
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


def split_counters(device) -> torch.Tensor:
    """Zeroed int32 counters for decode attention's in-kernel split merge (kernels/triton_attention.py), one
    buffer per KV cache, made once with it: each call leaves them at zero again, so a captured step replays
    from a clean state. Calls sharing a buffer must be ordered (one stream); the torch twins ignore it."""
    return torch.zeros(DECODE_ATTENTION_COUNTERS, dtype=torch.int32, device=device)


def decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_ids: torch.Tensor,
                         lengths: torch.Tensor, scale: float, counters: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of a few new tokens per row over a static KV cache (decode, or a prefill chunk).

    q: (B, L, q_heads, head_dim), the L newest tokens of each row; their keys/values are already written.
    k_cache, v_cache: (num_slots, max_len, kv_heads, head_dim), a preallocated pool shared by sessions.
    slot_ids: (B,) int64, the cache row of each batch row; −1 marks a padded row (output zeros, nothing read).
    lengths: (B,) int64, valid cached tokens of the row including its new ones (0 <= length <= max_len).
    Returns (B, L, q_heads, head_dim) in q's dtype. Query i of a row sits at position length − L + i and sees
    keys 0 … length − L + i (causal inside the chunk); softmax in fp32. GQA: q_heads % kv_heads == 0.
    A length below L front-pads the chunk: its first L − length queries sit before position 0, see no key
    and output zeros (a prefill chunk padded to a static bucket).
    counters: unused here (the Triton kernel's split counters, split_counters).
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


def decode_norm_rope_attention_ref(q, k, v, q_norm_weight, k_norm_weight, eps: float, cos, sin, k_cache, v_cache,
                                   write_rows, write_at, slot_ids, lengths, scale: float, counters=None):
    """A decoder layer's attention from its raw projections over a static KV cache.

    q: (B, L, q_heads, D); k, v: (B, L, kv_heads, D), before q/k-norm and rotary (strided views fine);
    norm weights: (D,); cos/sin: (B, L, D); k_cache, v_cache: (num_slots, max_len, kv_heads, D), updated in
    place; write_rows, write_at: (B, L) int64, where each new token's k/v go; slot_ids, lengths: (B,) int64 as
    decode_attention_ref (lengths include the new tokens); counters: as decode_attention_ref.
    Returns (B, L, q_heads, D) in the dtype of the normed, rotated q: qk_norm_rope_cache_write_ref, then
    decode_attention_ref over the caches. The fused kernel (kernels/triton_norm_rope_attention.py) attends to the
    new keys from registers, so it assumes what runtime/kv_cache.py's views guarantee: a row's tokens written to
    its own slot (write_rows[b, l] == slot_ids[b]) are the last ones of the chunk and land at position
    lengths[b] − L + l; the others (front padding) go elsewhere (the scratch slot).
    """
    q = qk_norm_rope_cache_write_ref(q, k, v, q_norm_weight, k_norm_weight, eps, cos, sin, k_cache, v_cache,
                                     write_rows, write_at)
    return decode_attention_ref(q, k_cache, v_cache, slot_ids, lengths, scale)
