"""Decode attention over a static KV cache in Triton (flash-decoding): `decode_attention`, the Triton twin of
kernels.attention.decode_attention_ref, and the jit pieces kernels/triton_norm_rope_attention.py shares.

Each program takes one batch row, one KV head and one split of the cache's positions: the L new queries of
the q heads sharing that KV head (GQA: L·G query rows against one K/V stream, read once) run an online
softmax over the split's keys (a long chunk's rows are tiled, MAX_BLOCK_R per program, and each tile stops at
its last query's position). One split: the program normalises and writes the output itself. Several: each
program stores its partial (accumulator, row max, row sum) and bumps a per-(row block, KV head) counter with
an acq_rel atomic; the program that finds the count at S − 1 is the last of its splits, merges the S partials
and sets the counter back to 0, so the next call (a CUDA-graph replay) starts from zero. Without a counter
buffer (`counters` None, or one too small for the layout) a second kernel merges the splits instead.

The grid and the split count are sized from the shapes (kernels/launch_counts.py decode_attention_layout),
never from the lengths (which stay on the device): programs past a row's length do no reads, so a step is
one fixed launch (or launch pair), safe inside a CUDA graph.

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
from kernels.launch_counts import (FINISH_DIRECT, FINISH_LAST_SPLIT_MERGES, FINISH_MERGE_KERNEL,  # noqa: F401
                                   decode_attention_layout, split_finish)
from kernels.tuning import dot_precision
TUNE_SPACE = {"decode_attention": {"BLOCK_N": [16, 32, 64, 128], "num_warps": [2, 4, 8],
                                   "min_programs": [132, 264, 528, 1056], "MAX_BLOCK_R": [16, 32, 64, 128]}}



@triton.jit
def _softmax_step(scores, v, m_i, l_i, acc, PRECISION: tl.constexpr):
    """One online-softmax update of the rows' (max, sum, accumulator) with scores [BLOCK_R, n] (−inf = not
    allowed) and their values v [n, BLOCK_D]."""
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing allowed yet stays empty
    p = tl.exp(scores - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    # probabilities rounded to the value dtype before the product, as the reference's probs.to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _attend_cached_keys(q, m_i, l_i, acc, k_base, v_base, start, end, query_pos, row_valid, offs_d, D, scale,
                        stride_kn, stride_kd, stride_vn, stride_vd,
                        BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """The query rows q [BLOCK_R, BLOCK_D] over the cached keys start … end − 1 of one slot and KV head (k_base,
    v_base), each row seeing keys up to its query_pos."""
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        key_valid = offs_n < end
        k = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                    mask=key_valid[None, :] & (offs_d[:, None] < D), other=0.0)  # [BLOCK_D, BLOCK_N]
        # operands in the activation dtype (16-bit MMAs, fp32 accumulation); the scale goes on the fp32 scores
        scores = tl.dot(q, k, input_precision=PRECISION) * scale  # [BLOCK_R, BLOCK_N] fp32
        allowed = key_valid[None, :] & (offs_n[None, :] <= query_pos[:, None]) & row_valid[:, None]
        scores = tl.where(allowed, scores, float("-inf"))
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=key_valid[:, None] & (offs_d[None, :] < D), other=0.0)  # [BLOCK_N, BLOCK_D]
        m_i, l_i, acc = _softmax_step(scores, v, m_i, l_i, acc, PRECISION)
    return m_i, l_i, acc


@triton.jit
def _merge_partials(acc_ptr, max_ptr, sum_ptr, partial0, stats0, S, offs_r, row_valid, offs_d, D,
                    stride_as, stride_ar, stride_ad, stride_ms, stride_mr, BLOCK_R: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    """The normalised output [BLOCK_R, BLOCK_D] of S split partials (offsets partial0 / stats0 of split 0). Loads
    bypass L1 (.cg): other programs wrote the partials during this launch."""
    stats = max_ptr + stats0 + offs_r * stride_mr
    m_all = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for s in range(0, S):
        m_all = tl.maximum(m_all, tl.load(stats + s * stride_ms, mask=row_valid, other=float("-inf"),
                                          cache_modifier=".cg"))
    m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
    total = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for s in range(0, S):
        m_s = tl.load(stats + s * stride_ms, mask=row_valid, other=float("-inf"), cache_modifier=".cg")
        weight = tl.exp(m_s - m_safe)
        total += weight * tl.load(sum_ptr + stats0 + s * stride_ms + offs_r * stride_mr, mask=row_valid, other=0.0,
                                  cache_modifier=".cg")
        part = tl.load(acc_ptr + partial0 + s * stride_as + offs_r[:, None] * stride_ar + offs_d[None, :] * stride_ad,
                       mask=row_valid[:, None] & (offs_d[None, :] < D), other=0.0, cache_modifier=".cg")
        acc += weight[:, None] * part
    return acc / tl.where(total > 0, total, 1.0)[:, None]


@triton.jit
def _store_rows(out, slot, out_ptr, pid_b, pid_h, offs_r, row_valid, offs_d, G, D,
                stride_ob, stride_ol, stride_oh, stride_od):
    """Query rows r = l·G + g of KV head pid_h to out[pid_b, l, pid_h·G + g]; a padded row (slot < 0): zeros."""
    out = tl.where(slot < 0, 0.0, out)
    offs_l, offs_g = offs_r // G, offs_r % G
    tl.store(out_ptr + pid_b * stride_ob + offs_l[:, None] * stride_ol + (pid_h * G + offs_g)[:, None] * stride_oh
             + offs_d[None, :] * stride_od, out.to(out_ptr.dtype.element_ty),
             mask=row_valid[:, None] & (offs_d[None, :] < D))


@triton.jit
def _query_block(slot_ptr, length_ptr, L, G, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's place: (batch row, query-row block, KV head, key split) from its ids, its query rows
    r = l·G + g, and the row's slot and length (int32 like a split's start: the compiler wants one type for ends)."""
    row_blocks = tl.cdiv(L * G, BLOCK_R)
    pid_b, pid_r = tl.program_id(0) // row_blocks, tl.program_id(0) % row_blocks
    pid_h, pid_s = tl.program_id(1), tl.program_id(2)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    row_valid = offs_r < L * G
    slot = tl.load(slot_ptr + pid_b)
    length = tl.load(length_ptr + pid_b).to(tl.int32)
    return pid_b, pid_r, pid_h, pid_s, offs_r, offs_d, row_valid, offs_r // G, offs_r % G, slot, length


@triton.jit
def _finish_split(acc, m_i, l_i, slot, pid_b, pid_h, pid_s, S, offs_r, row_valid, offs_d, G, D,
                  acc_ptr, max_ptr, sum_ptr, counter_ptr, out_ptr,
                  stride_ab, stride_ah, stride_as, stride_ar, stride_ad,
                  stride_mb, stride_mh, stride_ms, stride_mr,
                  stride_ob, stride_ol, stride_oh, stride_od, stride_c,
                  BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, FINISH: tl.constexpr):
    """End of a split program: FINISH 0 normalises and stores (one split); 1 and 2 store the partial, and with 1
    the last split of this (row block, KV head) to finish merges all S and resets its counter."""
    if FINISH == 0:  # a row that saw no key: zeros, as the merge would give
        _store_rows(acc / tl.where(l_i > 0, l_i, 1.0)[:, None], slot, out_ptr, pid_b, pid_h, offs_r, row_valid,
                    offs_d, G, D, stride_ob, stride_ol, stride_oh, stride_od)
    else:
        partial0 = pid_b * stride_ab + pid_h * stride_ah
        stats0 = pid_b * stride_mb + pid_h * stride_mh
        tl.store(acc_ptr + partial0 + pid_s * stride_as + offs_r[:, None] * stride_ar + offs_d[None, :] * stride_ad,
                 acc, mask=row_valid[:, None] & (offs_d[None, :] < D))
        stats = stats0 + pid_s * stride_ms + offs_r * stride_mr
        tl.store(max_ptr + stats, m_i, mask=row_valid)
        tl.store(sum_ptr + stats, l_i, mask=row_valid)
        if FINISH == 1:
            # every thread's partial is stored before the release; the last arrival's acquire then sees all S
            tl.debug_barrier()
            counter = counter_ptr + (tl.program_id(0) * tl.num_programs(1) + pid_h) * stride_c
            if tl.atomic_add(counter, 1, sem="acq_rel") == S - 1:
                out = _merge_partials(acc_ptr, max_ptr, sum_ptr, partial0, stats0, S, offs_r, row_valid, offs_d, D,
                                      stride_as, stride_ar, stride_ad, stride_ms, stride_mr, BLOCK_R, BLOCK_D)
                _store_rows(out, slot, out_ptr, pid_b, pid_h, offs_r, row_valid, offs_d, G, D,
                            stride_ob, stride_ol, stride_oh, stride_od)
                tl.atomic_xchg(counter, 0, sem="relaxed")  # all S have arrived: the next launch starts from 0


@triton.jit
def _decode_attention_split(
    q_ptr, k_ptr, v_ptr, slot_ptr, length_ptr, acc_ptr, max_ptr, sum_ptr, counter_ptr, out_ptr,
    L, G, D, S, split_len, scale,
    stride_qb, stride_ql, stride_qh, stride_qd,
    stride_ks, stride_kn, stride_kh, stride_kd,
    stride_vs, stride_vn, stride_vh, stride_vd,
    stride_ab, stride_ah, stride_as, stride_ar, stride_ad,
    stride_mb, stride_mh, stride_ms, stride_mr,
    stride_ob, stride_ol, stride_oh, stride_od, stride_c,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    FINISH: tl.constexpr,
):
    pid_b, pid_r, pid_h, pid_s, offs_r, offs_d, row_valid, offs_l, offs_g, slot, length = _query_block(
        slot_ptr, length_ptr, L, G, BLOCK_R, BLOCK_D)
    start = pid_s * split_len
    last_l = tl.minimum(L - 1, ((pid_r + 1) * BLOCK_R - 1) // G)  # the block's last query sees keys < end
    end = tl.minimum(tl.minimum(start + split_len, length), length - L + last_l + 1)
    if slot < 0:  # padded row: nothing read
        end = start

    q = tl.load(q_ptr + pid_b * stride_qb + offs_l[:, None] * stride_ql + (pid_h * G + offs_g)[:, None] * stride_qh
                + offs_d[None, :] * stride_qd, mask=row_valid[:, None] & (offs_d[None, :] < D), other=0.0)
    query_pos = length - L + offs_l  # position of each query row; it sees keys <= its own position
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    m_i, l_i, acc = _attend_cached_keys(q, m_i, l_i, acc, k_ptr + slot * stride_ks + pid_h * stride_kh,
                                        v_ptr + slot * stride_vs + pid_h * stride_vh, start, end, query_pos,
                                        row_valid, offs_d, D, scale, stride_kn, stride_kd, stride_vn, stride_vd,
                                        BLOCK_N, PRECISION)
    _finish_split(acc, m_i, l_i, slot, pid_b, pid_h, pid_s, S, offs_r, row_valid, offs_d, G, D,
                  acc_ptr, max_ptr, sum_ptr, counter_ptr, out_ptr,
                  stride_ab, stride_ah, stride_as, stride_ar, stride_ad, stride_mb, stride_mh, stride_ms, stride_mr,
                  stride_ob, stride_ol, stride_oh, stride_od, stride_c, BLOCK_R, BLOCK_D, FINISH)


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
    out = _merge_partials(acc_ptr, max_ptr, sum_ptr, pid_b * stride_ab + pid_h * stride_ah,
                          pid_b * stride_mb + pid_h * stride_mh, S, offs_r, row_valid, offs_d, D,
                          stride_as, stride_ar, stride_ad, stride_ms, stride_mr, BLOCK_R, BLOCK_D)
    _store_rows(out, tl.load(slot_ptr + pid_b), out_ptr, pid_b, pid_h, offs_r, row_valid, offs_d, G, D,
                stride_ob, stride_ol, stride_oh, stride_od)


def split_buffers(batch: int, kv_heads: int, new: int, groups: int, head_dim: int, splits: int, finish: int,
                  device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empty (acc [B, Hkv, S, L·G, D], row_max, row_sum [B, Hkv, S, L·G]) fp32 partials; placeholders when one
    split writes the output directly (torch.empty launches nothing either way)."""
    shape = (batch, kv_heads, splits, new * groups) if finish != FINISH_DIRECT else (1, 1, 1, 1)
    acc = torch.empty(*shape, head_dim, dtype=torch.float32, device=device)
    row_max = torch.empty(*shape, dtype=torch.float32, device=device)
    return acc, row_max, torch.empty_like(row_max)


def launch_merge(acc, row_max, row_sum, slot_ids, out, new, groups, head_dim, splits, cfg) -> None:
    """The separate merge of FINISH_MERGE_KERNEL: out (B, L, Hq, D) from the partials."""
    _decode_attention_merge[(out.shape[0] * cfg["row_blocks"], acc.shape[1])](
        acc, row_max, row_sum, slot_ids, out, new, groups, head_dim, splits,
        *acc.stride(), *row_max.stride(), *out.stride(),
        BLOCK_R=cfg["BLOCK_R"], BLOCK_D=max(16, triton.next_power_of_2(head_dim)), num_warps=cfg["num_warps"])


@torch.library.custom_op("omni_rt_triton::decode_attention", mutates_args=("counters",))
def _decode_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_ids: torch.Tensor,
                         lengths: torch.Tensor, scale: float, counters: torch.Tensor | None = None) -> torch.Tensor:
    """decode_attention below. Launches: kernels.launch_counts.decode_attention_plan."""
    batch, new, q_heads, head_dim = q.shape
    kv_heads, max_len = k_cache.shape[2], k_cache.shape[1]
    groups = q_heads // kv_heads
    out = torch.empty_like(q)
    if not batch or not new:
        return out
    cfg = decode_attention_layout(batch, new, q_heads, kv_heads, head_dim, max_len, q.dtype, q.device.type == "cpu")
    splits = cfg["splits"]
    finish = split_finish(batch, cfg, kv_heads, counters)
    acc, row_max, row_sum = split_buffers(batch, kv_heads, new, groups, head_dim, splits, finish, q.device)
    counters = counters if counters is not None else row_max  # never read unless FINISH_LAST_SPLIT_MERGES
    _decode_attention_split[(batch * cfg["row_blocks"], kv_heads, splits)](
        q, k_cache, v_cache, slot_ids, lengths, acc, row_max, row_sum, counters, out,
        new, groups, head_dim, splits, cfg["split_len"], scale,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *acc.stride(), *row_max.stride(), *out.stride(),
        counters.stride(0),
        BLOCK_R=cfg["BLOCK_R"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        PRECISION=dot_precision(q.dtype), FINISH=finish, num_warps=cfg["num_warps"])
    if finish == FINISH_MERGE_KERNEL:
        launch_merge(acc, row_max, row_sum, slot_ids, out, new, groups, head_dim, splits, cfg)
    return out


@_decode_attention_op.register_fake
def _(q, k_cache, v_cache, slot_ids, lengths, scale, counters=None):
    return torch.empty_like(q)


def check_counters(counters: torch.Tensor | None) -> None:
    if counters is not None and (counters.dtype != torch.int32 or counters.dim() != 1):
        raise ValueError(f"counters must be a 1-D int32 tensor (kernels.attention.split_counters), got "
                         f"{counters.dtype} of shape {tuple(counters.shape)}")


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_ids: torch.Tensor,
                     lengths: torch.Tensor, scale: float, counters: torch.Tensor | None = None) -> torch.Tensor:
    """q: (B, L, Hq, D); k_cache, v_cache: (num_slots, N, Hkv, D); slot_ids, lengths: (B,) int64 on the device
    (slot −1 = padded row: zeros out); counters: 1-D int32, zeros, owned by the cache and left at zero after each
    call (kernels.attention.split_counters), or None (several splits then take a second, merge kernel).
    Returns (B, L, Hq, D) in q's dtype, as decode_attention_ref."""
    check_counters(counters)
    return torch.ops.omni_rt_triton.decode_attention(q, k_cache, v_cache, slot_ids, lengths, float(scale), counters)


# runtime/dispatch.py registers these as the `triton` backend (dispatch op name -> public function). The dense
# `attention` (prefill chunks, the audio / vision encoders) is torch's fused SDPA rather than a kernel of ours:
# kernel_choice("triton") is what the GPU runs, and SDPA's flash / memory-efficient kernels are the fused ones.
TRITON_OPS = {
    "decode_attention": decode_attention,
    "attention": attention_sdpa,
}
