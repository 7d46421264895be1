"""Rotary embeddings: TM-RoPE (interleaved time/height/width sections) and plain 1-D RoPE.

Rotate-half convention: frequency slot j rotates channel j with channel j + head_dim/2 (MODEL_SPEC §4.1).
"""

import torch


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """(head_dim/2,) float32 inverse frequencies theta^(-2j/head_dim)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def tm_rope_axis_of_slot(num_slots: int, mrope_section, device=None) -> torch.Tensor:
    """(num_slots,) int64 on `device`: which position axis (0=t, 1=h, 2=w) drives each frequency slot.

    The rule transformers implements (not "counts"): every slot starts as t; slots 1, 4, 7, ... below
    3*section[1] become h; slots 2, 5, 8, ... below 3*section[2] become w. section[0] is never read.
    Built on `device` from an arange (device kernels only): a table made on the host and copied over would be
    a host-to-device copy inside every decode step, which synchronises and cannot be captured in a CUDA graph.
    """
    slot = torch.arange(num_slots, device=device)
    axis = torch.zeros_like(slot)
    for dim in (1, 2):
        axis = torch.where((slot % 3 == dim) & (slot < 3 * mrope_section[dim]), dim, axis)
    return axis


def rope_cos_sin_ref(positions: torch.Tensor, inv_freq: torch.Tensor, mrope_section, dtype: torch.dtype):
    """positions: (3, ...) t/h/w ids (float or int) for TM-RoPE, or (...) ids for 1-D RoPE (mrope_section None).
    inv_freq: (head_dim/2,) float32. Returns (cos, sin), each (..., head_dim) in `dtype`.

    Angles are computed in fp32; cos/sin are cast to the activation dtype before use, as the model does.
    """
    positions = positions.to(torch.float32)
    inv_freq = inv_freq.to(device=positions.device, dtype=torch.float32)
    if mrope_section is None:
        angles = positions[..., None] * inv_freq  # (..., D/2)
    else:
        axis = tm_rope_axis_of_slot(inv_freq.numel(), mrope_section, positions.device)
        per_axis = positions[..., None] * inv_freq  # (3, ..., D/2)
        angles = _select_axis(per_axis, axis)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _select_axis(per_axis: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
    """per_axis: (3, ..., S); axis: (S,) -> (..., S) taking slot s from per_axis[axis[s]]."""
    index = axis.view(1, *([1] * (per_axis.dim() - 2)), -1).expand(1, *per_axis.shape[1:])
    return per_axis.gather(0, index).squeeze(0)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, seq, heads, head_dim); cos/sin: (batch, seq, head_dim). Returns the rotated x (new tensor)."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return x * cos + rotate_half(x) * sin


def qk_norm_rope_ref(q, k, q_norm_weight, k_norm_weight, eps: float, cos, sin):
    """q: (batch, seq, q_heads, head_dim); k: (batch, seq, kv_heads, head_dim); norm weights: (head_dim,);
    cos/sin: (batch, seq, head_dim). Returns (q, k): Qwen3's per-head RMSNorm, then rotary, as new tensors.
    """
    from kernels.norm import rms_norm_ref

    q = apply_rope_ref(rms_norm_ref(q, q_norm_weight, eps), cos, sin)
    k = apply_rope_ref(rms_norm_ref(k, k_norm_weight, eps), cos, sin)
    return q, k


def mrope_qk_norm_ref_(q, k, q_norm_weight, k_norm_weight, eps: float, positions, inv_freq, mrope_section):
    """q: (T, q_heads, head_dim), updated in place; k: (T, kv_heads, head_dim), updated in place (views of a
    fused qkv output allowed); norm weights: (head_dim,); positions: (3, T) t/h/w ids for TM-RoPE ((3, B, L)
    with B·L = T is read as (3, T)), or (T,) for 1-D RoPE when mrope_section is None; inv_freq: (head_dim/2,) float32. Returns (q, k), the same tensors.

    Qwen3's per-head RMSNorm then rotary, with cos/sin built from the positions in the activation dtype
    (q's), exactly as rope_cos_sin_ref then qk_norm_rope_ref; the results are copied back into q and k.
    """
    cos, sin = rope_cos_sin_ref(positions, inv_freq, mrope_section, q.dtype)  # (T, D) each, or (B, L, D)
    cos, sin = cos.reshape(1, -1, cos.shape[-1]), sin.reshape(1, -1, sin.shape[-1])  # (1, T, D)
    q_new, k_new = qk_norm_rope_ref(q[None], k[None], q_norm_weight, k_norm_weight, eps, cos, sin)
    q.copy_(q_new[0])
    k.copy_(k_new[0])
    return q, k


def qk_norm_rope_cache_write_ref(q, k, v, q_norm_weight, k_norm_weight, eps: float, cos, sin, k_cache, v_cache,
                                 write_rows, write_at):
    """q: (B, L, q_heads, D); k, v: (B, L, kv_heads, D) (strided views fine); norm weights: (D,); cos/sin:
    (B, L, D); k_cache, v_cache: (num_slots, max_len, kv_heads, D), updated in place; write_rows, write_at:
    (B, L) int64 on the device, the cache slot and position each new token is stored at.
    Returns the new q as qk_norm_rope_ref; k after the same norm + rotary, and v as given, go straight into the
    caches at [write_rows, write_at] (a static KV cache's write, runtime/kv_cache.py) instead of being returned.
    """
    q, k = qk_norm_rope_ref(q, k, q_norm_weight, k_norm_weight, eps, cos, sin)
    k_cache.index_put_((write_rows, write_at), k)
    v_cache.index_put_((write_rows, write_at), v)
    return q
