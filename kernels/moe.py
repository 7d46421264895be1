"""Mixture-of-experts: softmax top-k routing and SiLU-gated experts (MODEL_SPEC §3, §8.1).

Legend: T = num_tokens, E = num_experts, H = hidden_size, I = moe_intermediate_size, K = top_k.
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
