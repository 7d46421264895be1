"""Building blocks shared by the model modules.

Parameters keep the checkpoint's names except where the loader fuses them (runtime/weights.py):
`FusedLinear` holds q|k|v or gate|up as one weight, `MoEExperts` holds all experts stacked.
Hot math goes through runtime.dispatch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from runtime import dispatch


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch.rms_norm(x, self.weight, self.eps)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(normed, new_residual) with new_residual = x + residual in one fused op (dispatch.add_rms_norm);
        residual None: x is the residual stream already, (norm(x), x)."""
        if residual is None:
            return self(x), x
        return dispatch.add_rms_norm(x, residual, self.weight, self.eps)

    def add_norm_linear(self, x: torch.Tensor, residual: torch.Tensor | None,
                        weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(F.linear(normed, weight), new_residual): add_and_norm with the linear that reads it in the same op
        (dispatch.add_rms_norm_linear), so the normed rows never go through memory."""
        return dispatch.add_rms_norm_linear(x, residual, self.weight, self.eps, weight)


class FusedLinear(nn.Module):
    """Several linears over the same input run as one GEMM. The checkpoint stores them separately as
    `<prefix>.<part_name>.weight|bias`; the loader concatenates them along the output dim in this order."""

    def __init__(self, in_features: int, part_sizes: list[int], part_names: list[str], bias: bool):
        super().__init__()
        self.part_sizes = list(part_sizes)
        self.part_names = list(part_names)
        self.weight = nn.Parameter(torch.empty(sum(part_sizes), in_features))
        self.bias = nn.Parameter(torch.empty(sum(part_sizes))) if bias else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return F.linear(x, self.weight, self.bias).split(self.part_sizes, dim=-1)


class GatedMLP(nn.Module):
    """down(silu(gate x) * up x), gate|up fused."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = FusedLinear(hidden_size, [intermediate_size] * 2, ["gate_proj", "up_proj"], bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """gate|up and SiLU·up in one op (dispatch.linear_swiglu), then down_proj."""
        return self.down_proj(dispatch.linear_swiglu(x, self.gate_up_proj.weight))

    def add_norm_forward(self, x: torch.Tensor, residual: torch.Tensor | None,
                         norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """(self(norm(x + residual)), new_residual): the pre-norm, gate|up and SiLU·up in one op
        (dispatch.add_rms_norm_swiglu), then down_proj."""
        act, residual = dispatch.add_rms_norm_swiglu(x, residual, norm.weight, norm.eps, self.gate_up_proj.weight)
        return self.down_proj(act), residual

    def gated_add_forward(self, x: torch.Tensor, gate_weight: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y + sigmoid(F.linear(x, gate_weight)) * self(x) (the talker's shared expert with its gate (1, H), added to
        the routed experts' sum) in two ops: gate|up + SiLU·up (dispatch.linear_swiglu), then down_proj with the
        gate and the sum in its epilogue (dispatch.linear_gated_add)."""
        act = dispatch.linear_swiglu(x, self.gate_up_proj.weight)
        return dispatch.linear_gated_add(act, self.down_proj.weight, x, gate_weight, y)


class MoEExperts(nn.Module):
    """All experts stacked: gate_up_proj (E, 2I, H), down_proj (E, H, I). On disk each expert is
    `<prefix>.<e>.{gate_proj,up_proj,down_proj}.weight`."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))


class SparseMoeBlock(nn.Module):
    """Softmax top-k router over `experts`, plus the talker's sigmoid-gated shared expert when configured."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int,
                 norm_topk_prob: bool, shared_expert_intermediate_size: int = 0):
        super().__init__()
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = MoEExperts(num_experts, hidden_size, intermediate_size)
        if shared_expert_intermediate_size:
            self.shared_expert = GatedMLP(hidden_size, shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)
        else:
            self.shared_expert = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])  # [T, H]
        weights, ids = dispatch.router_topk(tokens, self.gate.weight, self.top_k, self.norm_topk_prob)
        out = dispatch.moe_experts(tokens, ids, weights, self.experts.gate_up_proj, self.experts.down_proj)
        if self.shared_expert is not None:
            out = self.shared_expert.gated_add_forward(tokens, self.shared_expert_gate.weight, out)
        return out.reshape(shape)
