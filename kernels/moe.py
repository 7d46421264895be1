"""Mixture-of-experts: softmax top-k routing and SiLU-gated experts (MODEL_SPEC §3, §8.1).

Legend: T = num_tokens, E = num_experts, H = hidden_size, I = moe_intermediate_size, K = top_k,
P = T·K token-expert pairs, BM = rows per expert block of a grouped GEMM.
"""

import torch
import torch.nn.functional as F


def route_topk_ref(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool):
    """router_logits: (T, E) in the model dtype. Returns (weights (T, K) in the logits' dtype, ids (T, K) int64).

    Softmax over all experts in fp32, top-k on probabilities, optional renormalisation, then cast.
    """
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(router_logits.dtype), ids


def router_topk_ref(hidden: torch.Tensor, gate_weight: torch.Tensor, top_k: int, norm_topk_prob: bool):
    """hidden: (T, H); gate_weight: (E, H), the router linear (no bias), hidden's dtype. Returns (weights (T, K)
    in hidden's dtype, ids (T, K) int64): route_topk_ref of the router logits F.linear(hidden, gate_weight),
    which are rounded to the model dtype as the model's eager path rounds them."""
    return route_topk_ref(F.linear(hidden, gate_weight), top_k, norm_topk_prob)


def moe_experts_ref(hidden: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor,
                    gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> torch.Tensor:
    """hidden: (T, H); expert_ids, expert_weights: (T, K); gate_up_proj: (E, 2I, H) gate rows then up rows;
    down_proj: (E, H, I). Returns (T, H): sum_k w_k * down_e(silu(gate_e x) * up_e x).

    Loops over the experts that received tokens; accumulates in the hidden dtype like the model's eager path.
    """
    out = torch.zeros_like(hidden)
    flat_ids = expert_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=gate_up_proj.shape[0]).tolist()
    token_of = order // expert_ids.shape[1]
    weight_of = expert_weights.reshape(-1)[order]
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        tokens = token_of[start:start + count]
        gate, up = F.linear(hidden[tokens], gate_up_proj[expert]).chunk(2, dim=-1)
        expert_out = F.linear(F.silu(gate) * up, down_proj[expert])
        out.index_add_(0, tokens, expert_out * weight_of[start:start + count, None])
        start += count
    return out


def moe_align_max_padded(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Worst-case entries of sorted_ids for `num_pairs` = T*K pairs: round_up(P + E*(BM-1), BM)."""
    return -(-(num_pairs + num_experts * (block_m - 1)) // block_m) * block_m


def moe_align_ref(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """Group token-expert pairs into per-expert blocks of BM rows for a grouped GEMM (host syncs: reference only).

    topk_ids: (T, K) int64 expert of each pair; ids outside [0, E) (−1: a padded token) are dropped.
    Returns, sized for the worst case so that no shape depends on the data:
    sorted_ids: (moe_align_max_padded(P, E, BM),) int32: flat pair indices t*K + k grouped by expert (ascending
      inside an expert), each expert's run padded with the sentinel P to a multiple of BM; the entries after
      the used blocks are P as well.
    expert_ids: (max_padded / BM,) int32: expert of each BM-row block, −1 for the unused blocks.
    num_tokens_post_pad: (1,) int32: sum over experts of round_up(count_e, BM).
    """
    flat = topk_ids.reshape(-1)
    num_pairs, device = flat.numel(), flat.device
    max_padded = moe_align_max_padded(num_pairs, num_experts, block_m)
    valid = (flat >= 0) & (flat < num_experts)
    counts = torch.bincount(flat[valid], minlength=num_experts)  # (E,)
    padded = (counts + block_m - 1) // block_m * block_m
    padded_start = torch.cumsum(padded, 0) - padded  # (E,) exclusive
    count_start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(torch.where(valid, flat, num_experts), stable=True)[:int(valid.sum())]  # by expert, then index
    experts = flat[order]
    rank = torch.arange(order.numel(), device=device) - count_start[experts]
    sorted_ids = torch.full((max_padded,), num_pairs, dtype=torch.int32, device=device)
    sorted_ids[padded_start[experts] + rank] = order.to(torch.int32)
    expert_ids = torch.full((max_padded // block_m,), -1, dtype=torch.int32, device=device)
    used = torch.repeat_interleave(torch.arange(num_experts, device=device), padded // block_m)
    expert_ids[:used.numel()] = used.to(torch.int32)
    num_post_pad = padded.sum().to(torch.int32).reshape(1)
    return sorted_ids, expert_ids, num_post_pad
