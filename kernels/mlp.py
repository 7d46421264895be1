"""The elementwise ends of the SiLU-gated MLPs (MODEL_SPEC §3, §8.1): the SiLU·up product between the gate|up
and down GEMMs, and the talker's sigmoid-gated shared-expert sum. Torch twins of kernels/triton_mlp.py."""

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
