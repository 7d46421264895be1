"""The MoE router linear fused into the top-k routing, in Triton: `router_topk`, the twin of
kernels.moe.router_topk_ref (route_topk_ref of F.linear(hidden, gate_weight)).

One program per block of BLOCK_T tokens computes their E router logits with tl.dot over H (fp32
accumulation), rounds them to the activation dtype as the separate linear would, then runs route_topk's
softmax / top-k / renormalisation in registers (kernels/triton_moe.py _softmax_topk_store): the logits never
touch memory and the step has one launch instead of a GEMM and a routing kernel. The whole (E, H) router
weight is read once per token block (512 KB in bf16 for the thinker's 128 × 2048): at decode one program
reads it, where the separate GEMM spreads it over many; a GPU measurement decides whether that pays for the
launch it saves (bench/tune.py's BLOCK_K / num_warps).

The public function validates its arguments, reshapes (views where it can) and calls the `torch.library` op
`omni_rt_triton::router_topk`; its fake implementation only allocates the outputs. Kernels one call launches:
kernels/launch_counts.py.

Legend: T = tokens, E = experts, H = hidden_size, K = top_k.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch_counts import route_topk_plan
from kernels.triton_moe import _softmax_topk_store
from kernels.tuning import dot_precision, launch_config

DEFAULT_CONFIG = {"BLOCK_K": 64, "num_warps": 8}
TUNE_SPACE = {"router_topk": {"BLOCK_K": [32, 64, 128, 256], "num_warps": [4, 8, 16]}}
BLOCK_T = 16  # tl.dot's smallest M


@triton.jit
def _router_topk_kernel(
    x_ptr, w_ptr, weights_ptr, ids_ptr,
    T, E, H,
    stride_xt, stride_xh, stride_we, stride_wh, stride_wt, stride_wk, stride_it, stride_ik,
    TOP_K: tl.constexpr, NORM_TOPK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    offs_k = tl.arange(0, BLOCK_K)
    t_valid = offs_t < T
    e_valid = offs_e < E
    acc = tl.zeros([BLOCK_T, BLOCK_E], tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k_valid = (k0 + offs_k) < H
        x = tl.load(x_ptr + offs_t[:, None] * stride_xt + (k0 + offs_k)[None, :] * stride_xh,
                    mask=t_valid[:, None] & k_valid[None, :], other=0.0)  # [BLOCK_T, BLOCK_K]
        w = tl.load(w_ptr + offs_e[None, :] * stride_we + (k0 + offs_k)[:, None] * stride_wh,
                    mask=k_valid[:, None] & e_valid[None, :], other=0.0)  # [BLOCK_K, BLOCK_E]
        acc += tl.dot(x, w, input_precision=PRECISION)
    logits = acc.to(weights_ptr.dtype.element_ty).to(tl.float32)  # rounded as the linear's output
    logits = tl.where(e_valid[None, :], logits, float("-inf"))
    _softmax_topk_store(logits, offs_t, offs_e, t_valid, e_valid, weights_ptr, ids_ptr,
                        stride_wt, stride_wk, stride_it, stride_ik, TOP_K, NORM_TOPK, BLOCK_T)


@torch.library.custom_op("omni_rt_triton::router_topk", mutates_args=())
def _router_topk_op(hidden: torch.Tensor, gate_weight: torch.Tensor, top_k: int,
                    norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden: (T, H); gate_weight: (E, H); any strides. Returns new (weights (T, K) in hidden's dtype,
    ids (T, K) int64)."""
    num_tokens, hidden_size = hidden.shape
    num_experts = gate_weight.shape[0]
    weights = hidden.new_empty(num_tokens, top_k)
    ids = hidden.new_empty(num_tokens, top_k, dtype=torch.int64)
    if route_topk_plan(num_tokens):
        cfg = launch_config("router_topk", f"E={num_experts},H={hidden_size}", hidden.dtype, DEFAULT_CONFIG)
        _router_topk_kernel[(triton.cdiv(num_tokens, BLOCK_T),)](
            hidden, gate_weight, weights, ids, num_tokens, num_experts, hidden_size,
            *hidden.stride(), *gate_weight.stride(), *weights.stride(), *ids.stride(),
            TOP_K=top_k, NORM_TOPK=norm_topk_prob, BLOCK_T=BLOCK_T,
            BLOCK_E=max(16, triton.next_power_of_2(num_experts)), BLOCK_K=cfg["BLOCK_K"],
            PRECISION=dot_precision(hidden.dtype), num_warps=cfg["num_warps"])
    return weights, ids


@_router_topk_op.register_fake
def _(hidden, gate_weight, top_k, norm_topk_prob):
    num_tokens = hidden.shape[0]
    return hidden.new_empty(num_tokens, top_k), hidden.new_empty(num_tokens, top_k, dtype=torch.int64)


def router_topk(hidden: torch.Tensor, gate_weight: torch.Tensor, top_k: int, norm_topk_prob: bool):
    """kernels.moe.router_topk_ref: hidden (..., H), gate_weight (E, H) of hidden's dtype -> weights (..., K) in
    hidden's dtype, ids (..., K) int64."""
    num_experts, hidden_size = gate_weight.shape
    if hidden.shape[-1] != hidden_size or gate_weight.dtype != hidden.dtype:
        raise ValueError(f"router_topk: hidden {tuple(hidden.shape)} {hidden.dtype} and gate_weight "
                         f"{tuple(gate_weight.shape)} {gate_weight.dtype} must share H and the dtype")
    if not 0 < top_k <= num_experts:
        raise ValueError(f"router_topk: top_k must be in [1, {num_experts}], got {top_k}")
    lead = hidden.shape[:-1]
    weights, ids = torch.ops.omni_rt_triton.router_topk(hidden.reshape(-1, hidden_size), gate_weight, int(top_k),
                                                        bool(norm_topk_prob))
    return weights.view(*lead, top_k), ids.view(*lead, top_k)


# runtime/dispatch.py registers these as the `triton` backend (dispatch op name -> public function).
TRITON_OPS = {
    "router_topk": router_topk,
}
