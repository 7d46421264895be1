"""moe_experts's decode path (T ≤ DECODE_MAX_TOKENS), two launches and no alignment; kernels/triton_moe.py
runs it from its op.

- Kernel 1 (`_decode_gate_up_kernel`): one program per (pair, block of I columns): the gate and up rows of that
  pair's expert against its token, SiLU(gate)·up in the epilogue. Program (0, 0) also zeroes kernel 2's
  arrival counters, so they need no state kept between calls.
- Kernel 2 (`_decode_down_combine_kernel`): one program per (token, block of H columns, group of
  EXPERTS_PER_PROGRAM pairs): the down rows of each pair's expert against the pair's activation, scaled by the
  router weight and summed in registers, so the down GEMM, the router weights and the top-k combine are one
  launch and each weight byte is read once per pair. Several groups (issue 18: one program walking all K = 8
  experts of a token left a one-token step with H / BLOCK_N_DOWN = 128 programs on a 132-SM GPU): each stores
  its fp32 partial and counts itself in with an acq_rel atomic; the last of a (token, block) to arrive sums the
  partials in group order (deterministic, no atomics on data) and stores the output. One group: the program
  stores the output itself, the kernel as it was before the split.

Rounding follows the reference where it matters (gate/up and the expert output rounded to the activation dtype
before SiLU and before the router weight); sums over experts stay in fp32 and are rounded once. Grids, partials
(T, groups, H) and counters are sized from shapes only: no host sync, safe inside a CUDA graph.

Legend: T = tokens, E = experts, K = top_k, H = hidden_size, I = moe_intermediate_size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# EXPERTS_PER_PROGRAM: the down + combine kernel's pairs per program (issue 18: one program walking all K = 8
# experts of a token gave a decode step only H / BLOCK_N_DOWN = 128 programs on a 132-SM GPU)
DECODE_CONFIG = {"BLOCK_N_GATE_UP": 32, "BLOCK_K_GATE_UP": 128, "BLOCK_N_DOWN": 16, "BLOCK_K_DOWN": 128,
                 "EXPERTS_PER_PROGRAM": 2, "num_warps": 4}


@triton.jit
def _silu_mul(gate, up, ACT_DTYPE: tl.constexpr):
    """SiLU(gate)·up with the reference's roundings: gate and up from a linear in the activation dtype, SiLU
    rounded, the product rounded (fp32 in and out)."""
    gate = gate.to(ACT_DTYPE).to(tl.float32)
    up = up.to(ACT_DTYPE).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(ACT_DTYPE).to(tl.float32)
    return (silu * up).to(ACT_DTYPE).to(tl.float32)


@triton.jit
def _decode_gate_up_kernel(
    x_ptr, w_ptr, ids_ptr, act_ptr, counter_ptr,
    E, H, I, TOP_K, num_counters,
    stride_xt, stride_xh, stride_we, stride_wn, stride_wh, stride_ap, stride_ai,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pair, pid_n = tl.program_id(0), tl.program_id(1)
    if (pair == 0) & (pid_n == 0):  # the down kernel's arrival counters start from zero (it runs after this one)
        for c0 in range(0, num_counters, 1024):
            offs_c = c0 + tl.arange(0, 1024)
            tl.store(counter_ptr + offs_c, tl.zeros([1024], tl.int32), mask=offs_c < num_counters)
    expert = tl.load(ids_ptr + pair)
    if (expert >= 0) & (expert < E):
        token = pair // TOP_K
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_valid = offs_n < I
        acc_gate = tl.zeros([BLOCK_N], tl.float32)
        acc_up = tl.zeros([BLOCK_N], tl.float32)
        gate_rows = w_ptr + expert * stride_we + offs_n[:, None] * stride_wn
        up_rows = gate_rows + I * stride_wn
        for k0 in range(0, H, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_valid = offs_k < H
            x = tl.load(x_ptr + token * stride_xt + offs_k * stride_xh, mask=k_valid, other=0.0).to(tl.float32)
            mask = n_valid[:, None] & k_valid[None, :]
            w_gate = tl.load(gate_rows + offs_k[None, :] * stride_wh, mask=mask, other=0.0).to(tl.float32)
            w_up = tl.load(up_rows + offs_k[None, :] * stride_wh, mask=mask, other=0.0).to(tl.float32)
            acc_gate += tl.sum(w_gate * x[None, :], 1)
            acc_up += tl.sum(w_up * x[None, :], 1)
        act = _silu_mul(acc_gate, acc_up, act_ptr.dtype.element_ty)
        tl.store(act_ptr + pair * stride_ap + offs_n * stride_ai, act.to(act_ptr.dtype.element_ty), mask=n_valid)


@triton.jit
def _decode_down_combine_kernel(
    act_ptr, w_ptr, ids_ptr, router_w_ptr, partial_ptr, counter_ptr, out_ptr,
    E, H, I, TOP_K,
    stride_ap, stride_ai, stride_we, stride_wh, stride_wi, stride_pt, stride_pg, stride_ph, stride_ot, stride_oh,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EXPERTS_PER_PROGRAM: tl.constexpr, GROUPS: tl.constexpr,
):
    """Program (token, block of H columns, group of EXPERTS_PER_PROGRAM pairs). GROUPS = 1: the program sums all
    K pairs and stores the output. GROUPS > 1: it stores its fp32 partial, counts itself in at the (token, block)
    counter, and the last of the GROUPS to arrive sums the partials in group order (deterministic) and stores."""
    token, pid_n, group = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = offs_n < H
    act_dtype = out_ptr.dtype.element_ty
    total = tl.zeros([BLOCK_N], tl.float32)
    first_k = group * EXPERTS_PER_PROGRAM
    for k in range(first_k, tl.minimum(first_k + EXPERTS_PER_PROGRAM, TOP_K)):
        pair = token * TOP_K + k
        expert = tl.load(ids_ptr + pair)
        if (expert >= 0) & (expert < E):
            acc = tl.zeros([BLOCK_N], tl.float32)
            down_rows = w_ptr + expert * stride_we + offs_n[:, None] * stride_wh
            for k0 in range(0, I, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_valid = offs_k < I
                a = tl.load(act_ptr + pair * stride_ap + offs_k * stride_ai, mask=k_valid, other=0.0).to(tl.float32)
                w = tl.load(down_rows + offs_k[None, :] * stride_wi, mask=n_valid[:, None] & k_valid[None, :],
                            other=0.0).to(tl.float32)
                acc += tl.sum(w * a[None, :], 1)
            router_weight = tl.load(router_w_ptr + pair).to(tl.float32)
            total += (acc.to(act_dtype).to(tl.float32) * router_weight).to(act_dtype).to(tl.float32)
    out_ptrs = out_ptr + token * stride_ot + offs_n * stride_oh
    if GROUPS == 1:
        tl.store(out_ptrs, total.to(act_dtype), mask=n_valid)
    else:
        partials = partial_ptr + token * stride_pt + offs_n * stride_ph
        tl.store(partials + group * stride_pg, total, mask=n_valid)
        # every thread's partial is stored before the release; the last arrival's acquire then sees all GROUPS
        tl.debug_barrier()
        if tl.atomic_add(counter_ptr + token * tl.num_programs(1) + pid_n, 1, sem="acq_rel") == GROUPS - 1:
            merged = tl.zeros([BLOCK_N], tl.float32)
            for g in tl.static_range(GROUPS):  # .cg: other programs wrote these during this launch
                merged += tl.load(partials + g * stride_pg, mask=n_valid, other=0.0, cache_modifier=".cg")
            tl.store(out_ptrs, merged.to(act_dtype), mask=n_valid)


def launch_decode(hidden, ids, router_weights, gate_up_proj, down_proj, out, cfg: dict) -> None:
    """The decode path's two launches into `out` (T, H); ids, router_weights: (T·K,) contiguous. The down kernel
    splits each token's K pairs over ceil(K / EXPERTS_PER_PROGRAM) programs; their fp32 partials (T, groups, H)
    and arrival counters (one per (token, block of H), zeroed by the gate_up kernel) are sized from shapes."""
    num_tokens, hidden_size = hidden.shape
    num_experts, inter = gate_up_proj.shape[0], gate_up_proj.shape[1] // 2
    top_k = ids.numel() // num_tokens
    per_program = min(cfg["EXPERTS_PER_PROGRAM"], top_k)
    groups = triton.cdiv(top_k, per_program)
    down_blocks = triton.cdiv(hidden_size, cfg["BLOCK_N_DOWN"])
    num_counters = num_tokens * down_blocks if groups > 1 else 0  # one group stores the output itself
    partials = torch.empty(num_tokens, groups, hidden_size, dtype=torch.float32, device=hidden.device)
    counters = torch.empty(max(num_counters, 1), dtype=torch.int32, device=hidden.device)
    act = hidden.new_empty(num_tokens * top_k, inter)
    _decode_gate_up_kernel[(num_tokens * top_k, triton.cdiv(inter, cfg["BLOCK_N_GATE_UP"]))](
        hidden, gate_up_proj, ids, act, counters, num_experts, hidden_size, inter, top_k,
        num_counters, *hidden.stride(), *gate_up_proj.stride(), *act.stride(),
        BLOCK_N=cfg["BLOCK_N_GATE_UP"], BLOCK_K=cfg["BLOCK_K_GATE_UP"], num_warps=cfg["num_warps"])
    _decode_down_combine_kernel[(num_tokens, down_blocks, groups)](
        act, down_proj, ids, router_weights, partials, counters, out, num_experts, hidden_size, inter, top_k,
        *act.stride(), *down_proj.stride(), *partials.stride(), *out.stride(),
        BLOCK_N=cfg["BLOCK_N_DOWN"], BLOCK_K=cfg["BLOCK_K_DOWN"], EXPERTS_PER_PROGRAM=per_program, GROUPS=groups,
        num_warps=cfg["num_warps"])
