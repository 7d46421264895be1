"""Mixture-of-experts in Triton: the twins of kernels.moe.route_topk_ref, moe_align_ref and moe_experts_ref.

- `route_topk`: one program per block of tokens: softmax over the experts in fp32, K rounds of argmax, the
  model's renormalisation, all in registers.
- `moe_align`: one program groups the T·K (token, expert) pairs into per-expert blocks of BM rows on the
  device (counts by one-hot sums, exclusive cumsum of the padded counts, ranks by a cumsum inside each chunk
  of pairs). Every output is sized for the worst case, so no shape depends on the routing: no host sync,
  safe inside a CUDA graph.
- `moe_experts`, two paths chosen by the token count (a shape, never the data):
  * decode (T ≤ DECODE_MAX_TOKENS, kernels/triton_moe_decode.py): no alignment. Kernel 1: gate|up and
    SiLU·up per (pair, block of I); kernel 2: down, router weight and top-k combine per (token, block of H,
    group of EXPERTS_PER_PROGRAM pairs), the groups' fp32 partials merged by the last to arrive.
  * prefill: `moe_align`, then grouped GEMMs over the aligned blocks with tl.dot (every block holds rows of
    one expert): gate|up with SiLU·mul fused in the epilogue, written per sorted row; down with the router
    weight in the epilogue, written per pair; then a combine kernel sums each token's K pair rows in fp32
    (deterministic: no atomics). Blocks past the used ones (expert −1) exit at once.
  Rounding follows the reference where it matters (gate/up and the expert output rounded to the activation
  dtype before SiLU and before the router weight); sums over experts stay in fp32 and are rounded once.

Each public function validates its arguments, reshapes (views where it can) and calls its `torch.library` op
`omni_rt_triton::<name>`, which launches the kernels; the op's fake implementation only allocates outputs
(FakeTensorMode, meta tensors, torch.compile). Kernels one call launches: kernels/launch_counts.py.

Legend: T = tokens, E = experts, K = top_k, P = T·K pairs, H = hidden_size, I = moe_intermediate_size,
BM = rows per aligned block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch_counts import DECODE_MAX_TOKENS  # noqa: F401  re-exported: tests size their cases by it
from kernels.launch_counts import moe_experts_plan, route_topk_plan
from kernels.moe import moe_align_max_padded
from kernels.triton_moe_decode import DECODE_CONFIG, _silu_mul, launch_decode
from kernels.tuning import dot_precision, launch_config

PREFILL_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}
ALIGN_CONFIG = {"BLOCK_P": 64, "num_warps": 4}
TUNE_SPACE = {
    "moe_decode": {"BLOCK_N_GATE_UP": [8, 16, 32, 64], "BLOCK_K_GATE_UP": [64, 128, 256, 512],
                   "BLOCK_N_DOWN": [8, 16, 32, 64], "BLOCK_K_DOWN": [64, 128, 256],
                   "EXPERTS_PER_PROGRAM": [1, 2, 4, 8], "num_warps": [2, 4, 8]},
    "moe_prefill": {"BLOCK_M": [16, 32, 64, 128], "BLOCK_N": [32, 64, 128], "BLOCK_K": [32, 64, 128],
                    "num_warps": [4, 8], "num_stages": [2, 3, 4]},
}


# --------------------------------------------------------------------------------------------- routing
@triton.jit
def _softmax_topk_store(
    x, offs_t, offs_e, t_valid, e_valid, weights_ptr, ids_ptr,
    stride_wt, stride_wk, stride_it, stride_ik,
    TOP_K: tl.constexpr, NORM_TOPK: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """x: [BLOCK_T, BLOCK_E] fp32 router logits (−inf in lanes past E). Stores each valid row's K weights and
    expert ids: softmax in fp32, K rounds of argmax, the optional renormalisation."""
    x = tl.where(t_valid[:, None], x, 0.0)  # rows past T: finite, never stored
    x_max = tl.max(x, 1)
    p = tl.exp(x - x_max[:, None])
    p = tl.where(e_valid[None, :], p, 0.0)
    probs = p / tl.sum(p, 1)[:, None]
    probs = tl.where(e_valid[None, :], probs, -1.0)  # padding lanes are never picked

    denom = tl.full([BLOCK_T], 1.0, tl.float32)
    if NORM_TOPK:  # first pass: the sum of the K largest probabilities
        remaining = probs
        denom = tl.zeros([BLOCK_T], tl.float32)
        for _ in tl.static_range(TOP_K):
            best = tl.max(remaining, 1)
            pick = tl.argmax(remaining, 1)
            denom += best
            remaining = tl.where(offs_e[None, :] == pick[:, None], -1.0, remaining)
    remaining = probs
    for k in tl.static_range(TOP_K):
        best = tl.max(remaining, 1)
        pick = tl.argmax(remaining, 1)  # ties: the lowest expert index
        tl.store(weights_ptr + offs_t * stride_wt + k * stride_wk,
                 (best / denom).to(weights_ptr.dtype.element_ty), mask=t_valid)
        tl.store(ids_ptr + offs_t * stride_it + k * stride_ik, pick.to(tl.int64), mask=t_valid)
        remaining = tl.where(offs_e[None, :] == pick[:, None], -1.0, remaining)


@triton.jit
def _route_topk_kernel(
    logits_ptr, weights_ptr, ids_ptr,
    T, E,
    stride_lt, stride_le, stride_wt, stride_wk, stride_it, stride_ik,
    TOP_K: tl.constexpr, NORM_TOPK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    t_valid = offs_t < T
    e_valid = offs_e < E
    x = tl.load(logits_ptr + offs_t[:, None] * stride_lt + offs_e[None, :] * stride_le,
                mask=t_valid[:, None] & e_valid[None, :], other=float("-inf")).to(tl.float32)
    _softmax_topk_store(x, offs_t, offs_e, t_valid, e_valid, weights_ptr, ids_ptr,
                        stride_wt, stride_wk, stride_it, stride_ik, TOP_K, NORM_TOPK, BLOCK_T)


@torch.library.custom_op("omni_rt_triton::route_topk", mutates_args=())
def _route_topk_op(router_logits: torch.Tensor, top_k: int,
                   norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits: (T, E), any strides. Returns new (weights (T, K) in the logits' dtype, ids (T, K) int64)."""
    num_tokens, num_experts = router_logits.shape
    weights = router_logits.new_empty(num_tokens, top_k)
    ids = router_logits.new_empty(num_tokens, top_k, dtype=torch.int64)
    if route_topk_plan(num_tokens):
        block_e = triton.next_power_of_2(num_experts)
        block_t = max(1, min(16, 2048 // block_e))
        _route_topk_kernel[(triton.cdiv(num_tokens, block_t),)](
            router_logits, weights, ids, num_tokens, num_experts, *router_logits.stride(), *weights.stride(),
            *ids.stride(), TOP_K=top_k, NORM_TOPK=norm_topk_prob, BLOCK_T=block_t, BLOCK_E=block_e, num_warps=4)
    return weights, ids


@_route_topk_op.register_fake
def _(router_logits, top_k, norm_topk_prob):
    num_tokens = router_logits.shape[0]
    return router_logits.new_empty(num_tokens, top_k), router_logits.new_empty(num_tokens, top_k, dtype=torch.int64)


def route_topk(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool):
    """kernels.moe.route_topk_ref: router_logits (..., E) -> weights (..., K) in the logits' dtype, ids (..., K)
    int64."""
    num_experts = router_logits.shape[-1]
    if not 0 < top_k <= num_experts:
        raise ValueError(f"route_topk: top_k must be in [1, {num_experts}], got {top_k}")
    lead = router_logits.shape[:-1]
    weights, ids = torch.ops.omni_rt_triton.route_topk(router_logits.reshape(-1, num_experts), int(top_k),
                                                       bool(norm_topk_prob))
    return weights.view(*lead, top_k), ids.view(*lead, top_k)


# ------------------------------------------------------------------------------------------- alignment
@triton.jit
def _moe_align_kernel(
    ids_ptr, sorted_ptr, block_expert_ptr, post_pad_ptr,
    P, E, max_padded,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr,
):
    offs_e = tl.arange(0, BLOCK_E)
    e_valid = offs_e < E
    counts = tl.zeros([BLOCK_E], tl.int32)
    for start in range(0, P, BLOCK_P):
        offs_p = start + tl.arange(0, BLOCK_P)
        expert = tl.load(ids_ptr + offs_p, mask=offs_p < P, other=-1)
        one_hot = ((expert[:, None] == offs_e[None, :]) & e_valid[None, :]).to(tl.int32)  # ids outside [0, E): none
        counts += tl.sum(one_hot, 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    padded_end = tl.cumsum(padded, 0)
    padded_start = padded_end - padded
    total = tl.sum(padded, 0)
    tl.store(post_pad_ptr, total)

    for start in range(0, max_padded, BLOCK_P):  # every row starts as the sentinel P
        offs = start + tl.arange(0, BLOCK_P)
        tl.store(sorted_ptr + offs, tl.full([BLOCK_P], 0, tl.int32) + P, mask=offs < max_padded)
    num_blocks = max_padded // BLOCK_M
    for start in range(0, num_blocks, BLOCK_P):
        offs_b = start + tl.arange(0, BLOCK_P)
        first_row = offs_b * BLOCK_M
        # a block belongs to the expert after all those whose padded run ends at or before its first row
        expert = tl.sum(((padded_end[None, :] <= first_row[:, None]) & e_valid[None, :]).to(tl.int32), 1)
        expert = tl.where(first_row < total, expert, -1)
        tl.store(block_expert_ptr + offs_b, expert, mask=offs_b < num_blocks)
    tl.debug_barrier()  # the sentinel stores land before the pair stores that overwrite them

    placed = tl.zeros([BLOCK_E], tl.int32)  # pairs of each expert placed by earlier chunks
    for start in range(0, P, BLOCK_P):
        offs_p = start + tl.arange(0, BLOCK_P)
        expert = tl.load(ids_ptr + offs_p, mask=offs_p < P, other=-1)
        one_hot = ((expert[:, None] == offs_e[None, :]) & e_valid[None, :]).to(tl.int32)
        rank_in_chunk = tl.sum(one_hot * (tl.cumsum(one_hot, 0) - 1), 1)
        row = rank_in_chunk + tl.sum(one_hot * (padded_start + placed)[None, :], 1)
        tl.store(sorted_ptr + row, offs_p.to(tl.int32), mask=tl.sum(one_hot, 1) > 0)
        placed += tl.sum(one_hot, 0)


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """kernels.moe.moe_align_ref's contract (topk_ids (T, K) int64), computed on the device in one launch."""
    if topk_ids.dtype != torch.int64:
        raise TypeError(f"moe_align: topk_ids must be int64, got {topk_ids.dtype}")
    flat = topk_ids.reshape(-1).contiguous()
    num_pairs = flat.numel()
    max_padded = moe_align_max_padded(num_pairs, num_experts, block_m)
    sorted_ids = torch.empty(max_padded, dtype=torch.int32, device=flat.device)
    expert_ids = torch.empty(max_padded // block_m, dtype=torch.int32, device=flat.device)
    num_post_pad = torch.empty(1, dtype=torch.int32, device=flat.device)
    cfg = ALIGN_CONFIG
    _moe_align_kernel[(1,)](flat, sorted_ids, expert_ids, num_post_pad, num_pairs, num_experts, max_padded,
                            BLOCK_M=block_m, BLOCK_P=cfg["BLOCK_P"], BLOCK_E=triton.next_power_of_2(num_experts),
                            num_warps=cfg["num_warps"])
    return sorted_ids, expert_ids, num_post_pad


# --------------------------------------------------------------------------------------------- prefill
@triton.jit
def _grouped_gate_up_kernel(
    x_ptr, w_ptr, sorted_ptr, block_expert_ptr, act_ptr,
    P, H, I, TOP_K,
    stride_xt, stride_xh, stride_we, stride_wn, stride_wh, stride_ar, stride_ai,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert >= 0:  # blocks past the used ones exit at once
        offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # sorted rows of this block
        pair = tl.load(sorted_ptr + offs_r)
        row_valid = pair < P  # padding rows hold the sentinel P
        token = pair // TOP_K
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_valid = offs_n < I
        acc_gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        gate_cols = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn  # W^T tiles [BLOCK_K, BLOCK_N]
        up_cols = gate_cols + I * stride_wn
        for k0 in range(0, H, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_valid = offs_k < H
            a = tl.load(x_ptr + token[:, None] * stride_xt + offs_k[None, :] * stride_xh,
                        mask=row_valid[:, None] & k_valid[None, :], other=0.0)
            w_mask = k_valid[:, None] & n_valid[None, :]
            w_gate = tl.load(gate_cols + offs_k[:, None] * stride_wh, mask=w_mask, other=0.0)
            w_up = tl.load(up_cols + offs_k[:, None] * stride_wh, mask=w_mask, other=0.0)
            acc_gate = tl.dot(a, w_gate, acc_gate, input_precision=PRECISION)
            acc_up = tl.dot(a, w_up, acc_up, input_precision=PRECISION)
        act = _silu_mul(acc_gate, acc_up, act_ptr.dtype.element_ty)
        tl.store(act_ptr + offs_r[:, None] * stride_ar + offs_n[None, :] * stride_ai,
                 act.to(act_ptr.dtype.element_ty), mask=row_valid[:, None] & n_valid[None, :])


@triton.jit
def _grouped_down_kernel(
    act_ptr, w_ptr, sorted_ptr, block_expert_ptr, router_w_ptr, y_ptr,
    P, H, I,
    stride_ar, stride_ai, stride_we, stride_wh, stride_wi, stride_yp, stride_yh,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert >= 0:
        offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ptr + offs_r)
        row_valid = pair < P
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_valid = offs_n < H
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        down_cols = w_ptr + expert * stride_we + offs_n[None, :] * stride_wh
        for k0 in range(0, I, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_valid = offs_k < I
            a = tl.load(act_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ai,
                        mask=row_valid[:, None] & k_valid[None, :], other=0.0)
            w = tl.load(down_cols + offs_k[:, None] * stride_wi, mask=k_valid[:, None] & n_valid[None, :], other=0.0)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
        act_dtype = act_ptr.dtype.element_ty
        router_weight = tl.load(router_w_ptr + pair, mask=row_valid, other=0.0).to(tl.float32)
        y = (acc.to(act_dtype).to(tl.float32) * router_weight[:, None]).to(act_dtype)
        tl.store(y_ptr + pair[:, None] * stride_yp + offs_n[None, :] * stride_yh, y,
                 mask=row_valid[:, None] & n_valid[None, :])


@triton.jit
def _combine_topk_kernel(
    y_ptr, ids_ptr, out_ptr,
    E, H, TOP_K,
    stride_yp, stride_yh, stride_ot, stride_oh,
    BLOCK_N: tl.constexpr,
):
    """out[t] = sum over the token's valid pairs of y[t·K + k], in fp32, rounded once."""
    token, pid_n = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = offs_n < H
    total = tl.zeros([BLOCK_N], tl.float32)
    for k in range(0, TOP_K):
        pair = token * TOP_K + k
        expert = tl.load(ids_ptr + pair)
        if (expert >= 0) & (expert < E):  # a dropped pair's row of y was never written
            total += tl.load(y_ptr + pair * stride_yp + offs_n * stride_yh, mask=n_valid, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * stride_ot + offs_n * stride_oh, total.to(out_ptr.dtype.element_ty), mask=n_valid)


# ------------------------------------------------------------------------------------------ entry point
def _check_moe_args(hidden, expert_ids, expert_weights, gate_up_proj, down_proj) -> None:
    num_experts, two_inter, hidden_size = gate_up_proj.shape
    if hidden.dim() != 2 or hidden.shape[1] != hidden_size:
        raise ValueError(f"moe_experts: hidden must be (T, {hidden_size}), got {tuple(hidden.shape)}")
    if down_proj.shape != (num_experts, hidden_size, two_inter // 2):
        raise ValueError(f"moe_experts: down_proj {tuple(down_proj.shape)} does not match gate_up_proj "
                         f"{tuple(gate_up_proj.shape)} (want ({num_experts}, {hidden_size}, {two_inter // 2}))")
    if expert_ids.shape != expert_weights.shape or expert_ids.shape[0] != hidden.shape[0]:
        raise ValueError(f"moe_experts: expert_ids {tuple(expert_ids.shape)} and expert_weights "
                         f"{tuple(expert_weights.shape)} must both be (T={hidden.shape[0]}, K)")
    if not (hidden.dtype == gate_up_proj.dtype == down_proj.dtype):
        raise TypeError(f"moe_experts: hidden ({hidden.dtype}) and expert weights ({gate_up_proj.dtype}, "
                        f"{down_proj.dtype}) must share a dtype")


@torch.library.custom_op("omni_rt_triton::moe_experts", mutates_args=())
def _moe_experts_op(hidden: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor,
                    gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> torch.Tensor:
    """moe_experts below, its arguments checked. Launches: kernels.launch_counts.moe_experts_plan."""
    num_tokens, hidden_size = hidden.shape
    num_experts, inter = gate_up_proj.shape[0], gate_up_proj.shape[1] // 2
    top_k = expert_ids.shape[1]
    num_pairs = num_tokens * top_k
    out = torch.empty_like(hidden)
    plan = moe_experts_plan(num_tokens)
    if not plan:
        return out
    ids = expert_ids.reshape(-1).contiguous()  # the kernels index pairs t·K + k (a copy only if not contiguous)
    router_weights = expert_weights.reshape(-1).contiguous()
    shape_key = f"T={num_tokens},E={num_experts},K={top_k},H={hidden_size},I={inter}"
    if plan[0] == "decode_gate_up":
        launch_decode(hidden, ids, router_weights, gate_up_proj, down_proj, out,
                      launch_config("moe_decode", shape_key, hidden.dtype, DECODE_CONFIG))
        return out

    cfg = launch_config("moe_prefill", shape_key, hidden.dtype, PREFILL_CONFIG)
    block_m = cfg["BLOCK_M"]
    sorted_ids, block_expert, _ = moe_align(ids, num_experts, block_m)
    num_blocks = block_expert.numel()
    precision = dot_precision(hidden.dtype)
    launch = {"BLOCK_M": block_m, "BLOCK_N": cfg["BLOCK_N"], "BLOCK_K": cfg["BLOCK_K"], "PRECISION": precision,
              "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    act = hidden.new_empty(sorted_ids.numel(), inter)  # one row per sorted (padded) position
    _grouped_gate_up_kernel[(num_blocks, triton.cdiv(inter, cfg["BLOCK_N"]))](
        hidden, gate_up_proj, sorted_ids, block_expert, act, num_pairs, hidden_size, inter, top_k,
        *hidden.stride(), *gate_up_proj.stride(), *act.stride(), **launch)
    pair_out = hidden.new_empty(num_pairs, hidden_size)  # each pair's weighted expert output
    _grouped_down_kernel[(num_blocks, triton.cdiv(hidden_size, cfg["BLOCK_N"]))](
        act, down_proj, sorted_ids, block_expert, router_weights, pair_out, num_pairs, hidden_size, inter,
        *act.stride(), *down_proj.stride(), *pair_out.stride(), **launch)
    combine_block = min(1024, triton.next_power_of_2(hidden_size))
    _combine_topk_kernel[(num_tokens, triton.cdiv(hidden_size, combine_block))](
        pair_out, ids, out, num_experts, hidden_size, top_k, *pair_out.stride(), *out.stride(),
        BLOCK_N=combine_block, num_warps=4)
    return out


@_moe_experts_op.register_fake
def _(hidden, expert_ids, expert_weights, gate_up_proj, down_proj):
    return torch.empty_like(hidden)


def moe_experts(hidden: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor,
                gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> torch.Tensor:
    """kernels.moe.moe_experts_ref's contract; pairs whose expert id is outside [0, E) contribute nothing.
    No host sync on either path: launch grids depend on shapes only."""
    _check_moe_args(hidden, expert_ids, expert_weights, gate_up_proj, down_proj)
    return torch.ops.omni_rt_triton.moe_experts(hidden, expert_ids.contiguous(), expert_weights.contiguous(),
                                                gate_up_proj, down_proj)


def decode_split(experts_per_program: int):
    """moe_experts's decode path with the down kernel's split forced to `experts_per_program` pairs per program
    (K or more: one program per (token, block of H), the unsplit kernel), whatever the tuned table says: what
    bench/kernels.py times side by side. Runs the launches directly, not through the torch.library op."""
    def run(hidden, expert_ids, expert_weights, gate_up_proj, down_proj):
        _check_moe_args(hidden, expert_ids, expert_weights, gate_up_proj, down_proj)
        if not 0 < hidden.shape[0] <= DECODE_MAX_TOKENS:
            raise ValueError(f"decode_split: 1 to {DECODE_MAX_TOKENS} tokens, got {hidden.shape[0]}")
        out = torch.empty_like(hidden)
        launch_decode(hidden, expert_ids.reshape(-1).contiguous(), expert_weights.reshape(-1).contiguous(),
                      gate_up_proj, down_proj, out, {**DECODE_CONFIG, "EXPERTS_PER_PROGRAM": experts_per_program})
        return out
    return run


# runtime/dispatch.py registers these as the `triton` backend (dispatch op name -> public function).
TRITON_OPS = {
    "route_topk": route_topk,
    "moe_experts": moe_experts,
}
