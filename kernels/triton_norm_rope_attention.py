"""A decoder layer's decode attention from its raw q/k/v projections in one Triton kernel: Qwen3's per-head q/k
RMSNorm, rotate-half RoPE, the new tokens' k/v written into a static KV cache and flash-decoding attention over
the cache. The Triton twin of kernels.attention.decode_norm_rope_attention_ref (= qk_norm_rope_cache_write_ref,
then decode_attention_ref).

The grid is decode attention's (kernels/triton_attention.py: one program per batch row, query-row block, KV head
and key split). Every program normalises and rotates its own query rows. Split 0's programs also normalise and
rotate the L new keys of their (row, KV head) and attend to them from registers (causal among them), and the
first row block among them stores those keys and values into the cache; every split reads only the positions
cached before this call (< length − L, plus the positions of a static chunk's front padding, whose tokens go
to the scratch slot), so no program waits for another's cache write. The splits end as in
decode attention: one split writes the output, several merge in the last split to finish when the cache gives
its split counters, else in decode attention's merge kernel.

Rounding follows the twin (as kernels/triton_rope.py): normed rows cast to the activation dtype before the
weight, weight·x rounded, each rotary product and their sum rounded; q then enters the dot products in the
cache's dtype, k and v are stored in it.

Small L only (kernels.launch_counts.FUSED_ATTENTION_MAX_NEW): every row block of split 0 holds all L new keys
in registers; a prefill chunk takes qk_norm_rope_cache_write + decode_attention (runtime/kv_cache.py).

Legend: B = batch rows, L = new tokens per row, Hq / Hkv = q / kv heads, G = Hq / Hkv, D = head_dim,
HALF = D/2, N = cached positions (max_len), S = splits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch_counts import (FINISH_MERGE_KERNEL, FUSED_ATTENTION_MAX_NEW, decode_attention_layout,
                                   split_finish)
from kernels.triton_attention import (_attend_cached_keys, _finish_split, _query_block, _softmax_step, check_counters,
                                      launch_merge, split_buffers)
from kernels.tuning import dot_precision

_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _norm_rope_tile(x_ptr, w_ptr, cos_ptr, sin_ptr, x_rows, cos_rows, sin_rows, mask, offs_d, D, HALF, eps,
                    stride_xd, stride_w, stride_cd, stride_sd, Y_DTYPE: tl.constexpr, ROPE_DTYPE: tl.constexpr):
    """RMSNorm + rotate-half of whole heads: rows at x_ptr + x_rows [R] (channel stride stride_xd), their cos/sin
    rows at cos_rows / sin_rows. Returns [R, BLOCK_D] in ROPE_DTYPE. Channel d pairs with its partner d ± D/2:
    out[d] = y[d]·cos[d] ∓ y[partner]·sin[d] (− below D/2: rotate_half's −x_hi)."""
    partner = tl.where(offs_d < HALF, offs_d + HALF, offs_d - HALF)
    sign = tl.where(offs_d < HALF, -1.0, 1.0)
    x = tl.load(x_ptr + x_rows[:, None] + offs_d[None, :] * stride_xd, mask=mask, other=0.0)
    x_p = tl.load(x_ptr + x_rows[:, None] + partner[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    act = x.dtype
    x = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, 1) / D + eps)
    normed = (x * rstd[:, None]).to(act).to(tl.float32)  # cast before the weight, as rms_norm_ref
    normed_p = (x_p * rstd[:, None]).to(act).to(tl.float32)
    channel = offs_d < D
    w = tl.load(w_ptr + offs_d * stride_w, mask=channel, other=0.0).to(tl.float32)
    w_p = tl.load(w_ptr + partner * stride_w, mask=channel, other=0.0).to(tl.float32)
    y = (w[None, :] * normed).to(Y_DTYPE).to(tl.float32)
    y_p = (w_p[None, :] * normed_p).to(Y_DTYPE).to(tl.float32)
    cos = tl.load(cos_ptr + cos_rows[:, None] + offs_d[None, :] * stride_cd, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + sin_rows[:, None] + offs_d[None, :] * stride_sd, mask=mask, other=0.0).to(tl.float32)
    out = (y * cos).to(ROPE_DTYPE).to(tl.float32) + (sign[None, :] * y_p * sin).to(ROPE_DTYPE).to(tl.float32)
    return out.to(ROPE_DTYPE)


@triton.jit
def _decode_norm_rope_attention_kernel(
    q_ptr, k_ptr, v_ptr, q_w_ptr, k_w_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, rows_ptr, at_ptr,
    slot_ptr, length_ptr, acc_ptr, max_ptr, sum_ptr, counter_ptr, out_ptr,
    L, G, D, HALF, S, split_len, eps, scale,
    stride_qb, stride_ql, stride_qh, stride_qd,
    stride_kb, stride_kl, stride_kh, stride_kd,
    stride_vb, stride_vl, stride_vh, stride_vd,
    stride_qw, stride_kw,
    stride_cb, stride_cl, stride_cd, stride_sb, stride_sl, stride_sd,
    stride_ks, stride_kn, stride_kch, stride_kcd,
    stride_vs, stride_vn, stride_vch, stride_vcd,
    stride_rb, stride_rl, stride_tb, stride_tl,
    stride_ab, stride_ah, stride_as, stride_ar, stride_ad,
    stride_mb, stride_mh, stride_ms, stride_mr,
    stride_ob, stride_ol, stride_oh, stride_od, stride_c,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
    PRECISION: tl.constexpr, FINISH: tl.constexpr,
    QY_DTYPE: tl.constexpr, KY_DTYPE: tl.constexpr, QROPE_DTYPE: tl.constexpr, KROPE_DTYPE: tl.constexpr,
):
    pid_b, pid_r, pid_h, pid_s, offs_r, offs_d, row_valid, offs_l, offs_g, slot, length = _query_block(
        slot_ptr, length_ptr, L, G, BLOCK_R, BLOCK_D)
    # Tokens written to the row's own slot are its new keys, at length − L + j; the others are front padding of a
    # static chunk (written to scratch), whose positions still hold keys cached before this call.
    offs_j = tl.arange(0, BLOCK_L)
    new_valid = offs_j < L
    rows = tl.load(rows_ptr + pid_b * stride_rb + offs_j * stride_rl, mask=new_valid, other=-1)
    num_pad = L - tl.sum((new_valid & (rows == slot)).to(tl.int32), 0)
    start = pid_s * split_len
    end = tl.minimum(start + split_len, length - L + num_pad)  # cached keys only: this call's come from registers
    if slot < 0:  # padded row: nothing read
        end = start
    cache_ty = k_cache_ptr.dtype.element_ty

    q = _norm_rope_tile(q_ptr, q_w_ptr, cos_ptr, sin_ptr,
                        pid_b * stride_qb + offs_l * stride_ql + (pid_h * G + offs_g) * stride_qh,
                        pid_b * stride_cb + offs_l * stride_cl, pid_b * stride_sb + offs_l * stride_sl,
                        row_valid[:, None] & (offs_d[None, :] < D), offs_d, D, HALF, eps,
                        stride_qd, stride_qw, stride_cd, stride_sd, QY_DTYPE, QROPE_DTYPE).to(cache_ty)
    query_pos = length - L + offs_l  # position of each query row; it sees keys <= its own position
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    m_i, l_i, acc = _attend_cached_keys(q, m_i, l_i, acc, k_cache_ptr + slot * stride_ks + pid_h * stride_kch,
                                        v_cache_ptr + slot * stride_vs + pid_h * stride_vch, start, end, query_pos,
                                        row_valid, offs_d, D, scale, stride_kn, stride_kcd, stride_vn, stride_vcd,
                                        BLOCK_N, PRECISION)
    if pid_s == 0:  # this call's L keys: normed, rotated and attended from registers, stored once
        new_mask = new_valid[:, None] & (offs_d[None, :] < D)
        k_new = _norm_rope_tile(k_ptr, k_w_ptr, cos_ptr, sin_ptr,
                                pid_b * stride_kb + offs_j * stride_kl + pid_h * stride_kh,
                                pid_b * stride_cb + offs_j * stride_cl, pid_b * stride_sb + offs_j * stride_sl,
                                new_mask, offs_d, D, HALF, eps, stride_kd, stride_kw, stride_cd, stride_sd,
                                KY_DTYPE, KROPE_DTYPE).to(cache_ty)  # [BLOCK_L, BLOCK_D]
        v_new = tl.load(v_ptr + pid_b * stride_vb + offs_j[:, None] * stride_vl + pid_h * stride_vh
                        + offs_d[None, :] * stride_vd, mask=new_mask, other=0.0).to(v_cache_ptr.dtype.element_ty)
        if pid_r == 0:  # token j of row b goes to [write_rows[b, j], write_at[b, j]] (padded rows: scratch)
            at = tl.load(at_ptr + pid_b * stride_tb + offs_j * stride_tl, mask=new_valid, other=0)
            tl.store(k_cache_ptr + rows[:, None] * stride_ks + at[:, None] * stride_kn + pid_h * stride_kch
                     + offs_d[None, :] * stride_kcd, k_new, mask=new_mask)
            tl.store(v_cache_ptr + rows[:, None] * stride_vs + at[:, None] * stride_vn + pid_h * stride_vch
                     + offs_d[None, :] * stride_vcd, v_new, mask=new_mask)
        scores = tl.dot(q, tl.trans(k_new), input_precision=PRECISION) * scale  # [BLOCK_R, BLOCK_L] fp32
        # new key j sits at length − L + j: query l sees it when j <= l and it is not front padding
        allowed = (new_valid[None, :] & (offs_j[None, :] <= offs_l[:, None]) & (offs_j[None, :] >= num_pad)
                   & (offs_j[None, :] >= L - length) & row_valid[:, None] & (slot >= 0))
        scores = tl.where(allowed, scores, float("-inf"))
        m_i, l_i, acc = _softmax_step(scores, v_new, m_i, l_i, acc, PRECISION)
    _finish_split(acc, m_i, l_i, slot, pid_b, pid_h, pid_s, S, offs_r, row_valid, offs_d, G, D,
                  acc_ptr, max_ptr, sum_ptr, counter_ptr, out_ptr,
                  stride_ab, stride_ah, stride_as, stride_ar, stride_ad, stride_mb, stride_mh, stride_ms, stride_mr,
                  stride_ob, stride_ol, stride_oh, stride_od, stride_c, BLOCK_R, BLOCK_D, FINISH)


def _out_dtype(q, q_norm_weight, cos) -> torch.dtype:
    """The dtype of the normed, rotated q (what qk_norm_rope_ref gives and decode_attention_ref keeps)."""
    return torch.promote_types(torch.promote_types(q_norm_weight.dtype, q.dtype), cos.dtype)


@torch.library.custom_op("omni_rt_triton::decode_norm_rope_attention", mutates_args=("k_cache", "v_cache", "counters"))
def _decode_norm_rope_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_norm_weight: torch.Tensor,
                                   k_norm_weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                                   k_cache: torch.Tensor, v_cache: torch.Tensor, write_rows: torch.Tensor,
                                   write_at: torch.Tensor, slot_ids: torch.Tensor, lengths: torch.Tensor, scale: float,
                                   counters: torch.Tensor | None = None) -> torch.Tensor:
    """decode_norm_rope_attention below (cos, sin already (B, L, D)). Launches: kernels.launch_counts."""
    batch, new, q_heads, head_dim = q.shape
    kv_heads, max_len = k_cache.shape[2], k_cache.shape[1]
    groups = q_heads // kv_heads
    out = torch.empty(q.shape, dtype=_out_dtype(q, q_norm_weight, cos), device=q.device)
    if not batch or not new:
        return out
    cfg = decode_attention_layout(batch, new, q_heads, kv_heads, head_dim, max_len, q.dtype, q.device.type == "cpu")
    splits = cfg["splits"]
    finish = split_finish(batch, cfg, kv_heads, counters)
    acc, row_max, row_sum = split_buffers(batch, kv_heads, new, groups, head_dim, splits, finish, q.device)
    counters = counters if counters is not None else row_max  # never read unless the last split merges
    qy = torch.promote_types(q_norm_weight.dtype, q.dtype)
    ky = torch.promote_types(k_norm_weight.dtype, k.dtype)
    _decode_norm_rope_attention_kernel[(batch * cfg["row_blocks"], kv_heads, splits)](
        q, k, v, q_norm_weight, k_norm_weight, cos, sin, k_cache, v_cache, write_rows, write_at,
        slot_ids, lengths, acc, row_max, row_sum, counters, out,
        new, groups, head_dim, head_dim // 2, splits, cfg["split_len"], eps, scale,
        *q.stride(), *k.stride(), *v.stride(), q_norm_weight.stride(0), k_norm_weight.stride(0),
        *cos.stride(), *sin.stride(), *k_cache.stride(), *v_cache.stride(), *write_rows.stride(), *write_at.stride(),
        *acc.stride(), *row_max.stride(), *out.stride(), counters.stride(0),
        BLOCK_R=cfg["BLOCK_R"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_L=max(16, triton.next_power_of_2(new)), PRECISION=dot_precision(k_cache.dtype), FINISH=finish,
        QY_DTYPE=_TL_DTYPE[qy], KY_DTYPE=_TL_DTYPE[ky], QROPE_DTYPE=_TL_DTYPE[torch.promote_types(qy, cos.dtype)],
        KROPE_DTYPE=_TL_DTYPE[torch.promote_types(ky, cos.dtype)], num_warps=cfg["num_warps"])
    if finish == FINISH_MERGE_KERNEL:
        launch_merge(acc, row_max, row_sum, slot_ids, out, new, groups, head_dim, splits, cfg)
    return out


@_decode_norm_rope_attention_op.register_fake
def _(q, k, v, q_norm_weight, k_norm_weight, eps, cos, sin, k_cache, v_cache, write_rows, write_at, slot_ids, lengths,
      scale, counters=None):
    return q.new_empty(q.shape, dtype=_out_dtype(q, q_norm_weight, cos))


def decode_norm_rope_attention(q, k, v, q_norm_weight, k_norm_weight, eps: float, cos, sin, k_cache, v_cache,
                               write_rows, write_at, slot_ids, lengths, scale: float, counters=None) -> torch.Tensor:
    """q: (B, L, Hq, D); k, v: (B, L, Hkv, D), raw projections (strided views of a fused qkv output fine); norm
    weights: (D,); cos/sin: (B, L, D) (broadcast views fine); k_cache, v_cache: (slots, N, Hkv, D), updated in
    place; write_rows, write_at: (B, L) int64 on the device (expanded views fine); slot_ids, lengths: (B,) int64
    on the device (lengths include the L new tokens; slot −1 = padded row: zeros out); counters: the cache's split
    counters (kernels.attention.split_counters) or None. L <= FUSED_ATTENTION_MAX_NEW.
    Returns (B, L, Hq, D) as kernels.attention.decode_norm_rope_attention_ref, in one launch (two when several
    splits have no counters)."""
    batch, new, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    if new > FUSED_ATTENTION_MAX_NEW:
        raise ValueError(f"{new} new tokens per row: the fused kernel takes up to {FUSED_ATTENTION_MAX_NEW} "
                         f"(use qk_norm_rope_cache_write + decode_attention)")
    if head_dim % 2 or q_heads % kv_heads or k.shape != (batch, new, kv_heads, head_dim) or v.shape != k.shape:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must be (B, L, heads, D) "
                         "with an even D and q heads a multiple of kv heads")
    if k_cache.shape[2:] != k.shape[2:] or v_cache.shape != k_cache.shape:
        raise ValueError(f"the caches {tuple(k_cache.shape)}, {tuple(v_cache.shape)} must match k's heads and "
                         f"head_dim {tuple(k.shape[2:])}")
    if write_rows.shape != (batch, new) or write_at.shape != (batch, new):
        raise ValueError(f"write_rows {tuple(write_rows.shape)} and write_at {tuple(write_at.shape)} must be "
                         f"({batch}, {new})")
    check_counters(counters)
    cos = cos.expand(batch, new, head_dim)  # a view: broadcast rows read with stride 0
    sin = sin.expand(batch, new, head_dim)
    return torch.ops.omni_rt_triton.decode_norm_rope_attention(q, k, v, q_norm_weight, k_norm_weight, float(eps), cos,
                                                               sin, k_cache, v_cache, write_rows, write_at, slot_ids,
                                                               lengths, float(scale), counters)


# runtime/dispatch.py registers these as the `triton` backend (dispatch op name -> public function).
TRITON_OPS = {"decode_norm_rope_attention": decode_norm_rope_attention}
