"""The elementwise ends of the SiLU-gated MLPs (MODEL_SPEC §3, §8.1): the SiLU·up product between the gate|up
and down GEMMs, and the talker's sigmoid-gated shared-expert sum, as steps of the torch twins of
kernels/triton_linear.py's linear_swiglu / linear_gated_add (with their GEMMs: the talker's shared expert in two
ops) and kernels/norm.py's add_rms_norm_swiglu_ref. The model reaches them only through those fused ops."""

import torch
import torch.nn.functional as F


def silu_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up: (..., I), the same shape and dtype (views of one gate|up GEMM output fine). Returns a new
    silu(gate) * up, each step rounded to the dtype as the model's eager path."""
    return F.silu(gate) * up


def sigmoid_gate_add_ref(x: torch.Tensor, gate_logit: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x, y: (..., H); gate_logit: (..., 1). Returns a new x + sigmoid(gate_logit) * y (the routed experts' sum
    plus the shared expert scaled by its gate), each step rounded to the dtype as the model's eager path."""
    return x + torch.sigmoid(gate_logit) * y


def linear_swiglu_ref(x: torch.Tensor, gate_up_weight: torch.Tensor) -> torch.Tensor:
    """x: (..., K); gate_up_weight: (2I, K), the gate rows then the up rows (GatedMLP's fused gate|up); one
    dtype. Returns a new silu(gate) * up (..., I): the gate|up GEMM (output rounded) then silu_mul_ref."""
    gate, up = F.linear(x, gate_up_weight).chunk(2, dim=-1)
    return silu_mul_ref(gate, up)


def linear_gated_add_ref(act: torch.Tensor, down_weight: torch.Tensor, x: torch.Tensor, gate_weight: torch.Tensor,
                         y: torch.Tensor) -> torch.Tensor:
    """act: (..., I), the shared expert's silu(gate)·up; down_weight: (H, I); x: (..., G), the block's input;
    gate_weight: (1, G), shared_expert_gate; y: (..., H), the routed experts' sum; one dtype. Returns a new
    y + sigmoid(x·gate_weight) * (act @ down_weight^T): sigmoid_gate_add_ref of the two GEMM outputs (each rounded)."""
    return sigmoid_gate_add_ref(y, F.linear(x, gate_weight), F.linear(act, down_weight))
