"""Decode attention over a static KV cache in Triton (flash-decoding): `decode_attention`, the Triton twin of
kernels.attention.decode_attention_ref.

Each program takes one batch row, one KV head and one split of the cache's positions: the L new queries of
the q heads sharing that KV head (GQA: L·G query rows against one K/V stream, read once) run an online
softmax over the split's keys (a long chunk's rows are tiled, MAX_BLOCK_R per program, and each tile stops at
its last query's position); a second kernel merges the splits, unless there is one split, when the split
kernel normalises and writes the output itself. The grid and the split count are sized from the shapes
(kernels/launch_counts.py decode_attention_layout), never from the lengths (which stay on the device):
programs past a row's length exit at once, so a step is one fixed launch or launch pair, safe inside a CUDA
graph.

Each public function validates its arguments, reshapes (views where it can) and calls its `torch.library` op
`omni_rt_triton::<name>`, which launches the kernels; the op's fake implementation only allocates outputs
(FakeTensorMode, meta tensors, torch.compile). Kernels one call launches: kernels/launch_counts.py.

Legend: B = batch rows, L = new tokens per row, Hq / Hkv = q / kv heads, G = Hq / Hkv, D = head_dim,
N = cached positions (max_len), S = splits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.attention import attention_sdpa
from kernels.launch_counts import DECODE_ATTENTION_CONFIG as DEFAULT_CONFIG  # noqa: F401  (bench/tune.py)
from kernels.launch_counts import decode_attention_layout, decode_attention_plan
from kernels.tuning import dot_precision
TUNE_SPACE = {"decode_attention": {"BLOCK_N": [16, 32, 64, 128], "num_warps": [2, 4, 8],
                                   "min_programs": [132, 264, 528, 1056], "MAX_BLOCK_R": [16, 32, 64, 128]}}


@triton.jit
def _decode_attention_split(
    q_ptr, k_ptr, v_ptr, slot_ptr, length_ptr, acc_ptr, max_ptr, sum_ptr, out_ptr,
    L, G, D, split_len, scale,
    stride_qb, stride_ql, stride_qh, stride_qd,
    stride_ks, stride_kn, stride_kh, stride_kd,
    stride_vs, stride_vn, stride_vh, stride_vd,
    stride_ab, stride_ah, stride_as, stride_ar, stride_ad,
    stride_mb, stride_mh, stride_ms, stride_mr,
    stride_ob, stride_ol, stride_oh, stride_od,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    DIRECT: tl.constexpr,
):
    row_blocks = tl.cdiv(L * G, BLOCK_R)
    pid_b, pid_r = tl.program_id(0) // row_blocks, tl.program_id(0) % row_blocks
    pid_h, pid_s = tl.program_id(1), tl.program_id(2)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # query row r = l·G + g
    offs_d = tl.arange(0, BLOCK_D)
    row_valid = offs_r < L * G
    offs_l, offs_g = offs_r // G, offs_r % G
    slot = tl.load(slot_ptr + pid_b)
    length = tl.load(length_ptr + pid_b).to(tl.int32)  # int32 like start: the compiler wants one type for `end`
    start = pid_s * split_len
    last_l = tl.minimum(L - 1, ((pid_r + 1) * BLOCK_R - 1) // G)  # the block's last query sees keys < end
    end = tl.minimum(tl.minimum(start + split_len, length), length - L + last_l + 1)
    if slot < 0:  # padded row: nothing read
        end = start

    q = tl.load(q_ptr + pid_b * stride_qb + offs_l[:, None] * stride_ql + (pid_h * G + offs_g)[:, None] * stride_qh
                + offs_d[None, :] * stride_qd, mask=row_valid[:, None] & (offs_d[None, :] < D), other=0.0)
    # Operands stay in the activation dtype (16-bit MMAs, fp32 accumulation); the scale goes on the fp32 scores.
    query_pos = length - L + offs_l  # position of each query row; it sees keys <= its own position
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    k_base = k_ptr + slot * stride_ks + pid_h * stride_kh
    v_base = v_ptr + slot * stride_vs + pid_h * stride_vh
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        key_valid = offs_n < end
        k = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                    mask=key_valid[None, :] & (offs_d[:, None] < D), other=0.0)  # [BLOCK_D, BLOCK_N]
        scores = tl.dot(q, k, input_precision=PRECISION) * scale  # [BLOCK_R, BLOCK_N] fp32
        allowed = key_valid[None, :] & (offs_n[None, :] <= query_pos[:, None]) & row_valid[:, None]
        scores = tl.where(allowed, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing allowed yet stays empty
        p = tl.exp(scores - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=key_valid[:, None] & (offs_d[None, :] < D), other=0.0)  # [BLOCK_N, BLOCK_D]
        l_i = l_i * alpha + tl.sum(p, 1)
        # probabilities rounded to the value dtype before the product, as the reference's probs.to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    if DIRECT:  # one split: normalise here, as the merge would (a row that saw no key: zeros), and skip it
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        out = tl.where(slot < 0, 0.0, out)
        tl.store(out_ptr + pid_b * stride_ob + offs_l[:, None] * stride_ol + (pid_h * G + offs_g)[:, None] * stride_oh
                 + offs_d[None, :] * stride_od, out.to(out_ptr.dtype.element_ty),
                 mask=row_valid[:, None] & (offs_d[None, :] < D))
    else:
        tl.store(acc_ptr + pid_b * stride_ab + pid_h * stride_ah + pid_s * stride_as + offs_r[:, None] * stride_ar
                 + offs_d[None, :] * stride_ad, acc, mask=row_valid[:, None] & (offs_d[None, :] < D))
        stats = pid_b * stride_mb + pid_h * stride_mh + pid_s * stride_ms + offs_r * stride_mr
        tl.store(max_ptr + stats, m_i, mask=row_valid)
        tl.store(sum_ptr + stats, l_i, mask=row_valid)


@triton.jit
def _decode_attention_merge(
    acc_ptr, max_ptr, sum_ptr, slot_ptr, out_ptr,
    L, G, D, S,
    stride_ab, stride_ah, stride_as, stride_ar, stride_ad,
    stride_mb, stride_mh, stride_ms, stride_mr,
    stride_ob, stride_ol, stride_oh, stride_od,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row_blocks = tl.cdiv(L * G, BLOCK_R)
    pid_b, pid_r, pid_h = tl.program_id(0) // row_blocks, tl.program_id(0) % row_blocks, tl.program_id(1)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    row_valid = offs_r < L * G
    stats = max_ptr + pid_b * stride_mb + pid_h * stride_mh + offs_r * stride_mr
    m_all = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for s in range(0, S):
        m_all = tl.maximum(m_all, tl.load(stats + s * stride_ms, mask=row_valid, other=float("-inf")))
    m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
    total = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for s in range(0, S):
        m_s = tl.load(stats + s * stride_ms, mask=row_valid, other=float("-inf"))
        weight = tl.exp(m_s - m_safe)
        total += weight * tl.load(sum_ptr + pid_b * stride_mb + pid_h * stride_mh + s * stride_ms + offs_r * stride_mr,
                                  mask=row_valid, other=0.0)
        part = tl.load(acc_ptr + pid_b * stride_ab + pid_h * stride_ah + s * stride_as + offs_r[:, None] * stride_ar
                       + offs_d[None, :] * stride_ad, mask=row_valid[:, None] & (offs_d[None, :] < D), other=0.0)
        acc += weight[:, None] * part
    out = acc / tl.where(total > 0, total, 1.0)[:, None]
    slot = tl.load(slot_ptr + pid_b)
    out = tl.where(slot < 0, 0.0, out)
    offs_l, offs_g = offs_r // G, offs_r % G
    tl.store(out_ptr + pid_b * stride_ob + offs_l[:, None] * stride_ol + (pid_h * G + offs_g)[:, None] * stride_oh
             + offs_d[None, :] * stride_od, out.to(out_ptr.dtype.element_ty),
             mask=row_valid[:, None] & (offs_d[None, :] < D))


@torch.library.custom_op("omni_rt_triton::decode_attention", mutates_args=())
def _decode_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_ids: torch.Tensor,
                         lengths: torch.Tensor, scale: float) -> torch.Tensor:
    """decode_attention below. Launches: kernels.launch_counts.decode_attention_plan."""
    batch, new, q_heads, head_dim = q.shape
    kv_heads, max_len = k_cache.shape[2], k_cache.shape[1]
    groups = q_heads // kv_heads
    out = torch.empty_like(q)
    if not batch or not new:
        return out
    cfg = decode_attention_layout(batch, new, q_heads, kv_heads, head_dim, max_len, q.dtype, q.device.type == "cpu")
    block_r, row_blocks, splits = cfg["BLOCK_R"], cfg["row_blocks"], cfg["splits"]
    direct = decode_attention_plan(batch, new, splits) == ("decode_attention_split",)
    block_d = max(16, triton.next_power_of_2(head_dim))
    # partials only when a merge follows (torch.empty launches nothing either way)
    acc_shape = (batch, kv_heads, splits, new * groups) if not direct else (1, 1, 1, 1)
    acc = torch.empty(*acc_shape, head_dim, dtype=torch.float32, device=q.device)
    row_max = torch.empty(*acc_shape, dtype=torch.float32, device=q.device)
    row_sum = torch.empty_like(row_max)
    _decode_attention_split[(batch * row_blocks, kv_heads, splits)](
        q, k_cache, v_cache, slot_ids, lengths, acc, row_max, row_sum, out,
        new, groups, head_dim, cfg["split_len"], scale,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *acc.stride(), *row_max.stride(), *out.stride(),
        BLOCK_R=block_r, BLOCK_N=cfg["BLOCK_N"], BLOCK_D=block_d, PRECISION=dot_precision(q.dtype), DIRECT=direct,
        num_warps=cfg["num_warps"])
    if not direct:
        _decode_attention_merge[(batch * row_blocks, kv_heads)](
            acc, row_max, row_sum, slot_ids, out, new, groups, head_dim, splits,
            *acc.stride(), *row_max.stride(), *out.stride(),
            BLOCK_R=block_r, BLOCK_D=block_d, num_warps=cfg["num_warps"])
    return out


@_decode_attention_op.register_fake
def _(q, k_cache, v_cache, slot_ids, lengths, scale):
    return torch.empty_like(q)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_ids: torch.Tensor,
                     lengths: torch.Tensor, scale: float) -> torch.Tensor:
    """q: (B, L, Hq, D); k_cache, v_cache: (num_slots, N, Hkv, D); slot_ids, lengths: (B,) int64 on the device
    (slot −1 = padded row: zeros out). Returns (B, L, Hq, D) in q's dtype, as decode_attention_ref."""
    return torch.ops.omni_rt_triton.decode_attention(q, k_cache, v_cache, slot_ids, lengths, float(scale))


# runtime/dispatch.py registers these as the `triton` backend (dispatch op name -> public function). The dense
# `attention` (prefill chunks, the audio / vision encoders) is torch's fused SDPA rather than a kernel of ours:
# kernel_choice("triton") is what the GPU runs, and SDPA's flash / memory-efficient kernels are the fused ones.
TRITON_OPS = {
    "decode_attention": decode_attention,
    "attention": attention_sdpa,
}
