"""The elementwise ends of the SiLU-gated MLPs in Triton, one kernel each: `silu_mul` (silu(gate)·up between the
gate|up and down GEMMs: two torch kernels) and `sigmoid_gate_add` (the talker's routed sum plus its
sigmoid-gated shared expert: three torch kernels). Twins: kernels/mlp.py. Every rounding step of the twins is
reproduced (each torch op rounds its result to the activation dtype), so results match to the last bit up to
the backend's exp.

Each public function validates its arguments, reshapes (views where it can) and calls its `torch.library` op
`omni_rt_triton::<name>`; the op's fake implementation only allocates the output. Kernels one call launches:
kernels/launch_counts.py.

Legend: M = rows (tokens), N = columns (I for silu_mul, H for sigmoid_gate_add).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch_counts import elementwise_plan

BLOCK_N = 1024


@triton.jit
def _silu_mul_kernel(
    gate_ptr, up_ptr, out_ptr,
    M, N,
    stride_gm, stride_gn, stride_um, stride_un, stride_om, stride_on,
    BLOCK_N: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs_n < N
    gate = tl.load(gate_ptr + pid_m * stride_gm + offs_n * stride_gn, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + pid_m * stride_um + offs_n * stride_un, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)  # F.silu rounds
    tl.store(out_ptr + pid_m * stride_om + offs_n * stride_on, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sigmoid_gate_add_kernel(
    x_ptr, g_ptr, y_ptr, out_ptr,
    M, N,
    stride_xm, stride_xn, stride_gm, stride_ym, stride_yn, stride_om, stride_on,
    BLOCK_N: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs_n < N
    act = out_ptr.dtype.element_ty
    logit = tl.load(g_ptr + pid_m * stride_gm).to(tl.float32)
    gate = (1.0 / (1.0 + tl.exp(-logit))).to(act).to(tl.float32)  # torch.sigmoid rounds
    x = tl.load(x_ptr + pid_m * stride_xm + offs_n * stride_xn, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + pid_m * stride_ym + offs_n * stride_yn, mask=mask, other=0.0).to(tl.float32)
    scaled = (gate * y).to(act).to(tl.float32)  # the product rounds before the add
    tl.store(out_ptr + pid_m * stride_om + offs_n * stride_on, (x + scaled).to(act), mask=mask)


def _grid(rows: int, cols: int) -> tuple[int, int]:
    return rows, triton.cdiv(cols, BLOCK_N)


@torch.library.custom_op("omni_rt_triton::silu_mul", mutates_args=())
def _silu_mul_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up: (M, N), any strides. Returns a new contiguous (M, N)."""
    rows, cols = gate.shape
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if elementwise_plan(rows, cols, "silu_mul"):
        _silu_mul_kernel[_grid(rows, cols)](gate, up, out, rows, cols, *gate.stride(), *up.stride(), *out.stride(),
                                            BLOCK_N=BLOCK_N, num_warps=4)
    return out


@_silu_mul_op.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up: (..., N), the same shape and dtype (strided views of a gate|up output fine). Returns a new
    silu(gate) * up as kernels.mlp.silu_mul_ref."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} must match")
    width = gate.shape[-1]
    out = torch.ops.omni_rt_triton.silu_mul(gate.reshape(-1, width), up.reshape(-1, width))
    return out.view(gate.shape)


@torch.library.custom_op("omni_rt_triton::sigmoid_gate_add", mutates_args=())
def _sigmoid_gate_add_op(x: torch.Tensor, gate_logit: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x, y: (M, N); gate_logit: (M, 1); any strides. Returns a new contiguous (M, N)."""
    rows, cols = x.shape
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if elementwise_plan(rows, cols, "sigmoid_gate_add"):
        _sigmoid_gate_add_kernel[_grid(rows, cols)](
            x, gate_logit, y, out, rows, cols, *x.stride(), gate_logit.stride(0), *y.stride(), *out.stride(),
            BLOCK_N=BLOCK_N, num_warps=4)
    return out


@_sigmoid_gate_add_op.register_fake
def _(x, gate_logit, y):
    return x.new_empty(x.shape)


def sigmoid_gate_add(x: torch.Tensor, gate_logit: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x, y: (..., N), the same shape and dtype; gate_logit: (..., 1) of that dtype. Returns a new
    x + sigmoid(gate_logit) * y as kernels.mlp.sigmoid_gate_add_ref."""
    if x.shape != y.shape or gate_logit.shape != (*x.shape[:-1], 1) or not x.dtype == y.dtype == gate_logit.dtype:
        raise ValueError(f"x {tuple(x.shape)}, y {tuple(y.shape)} must match and gate_logit {tuple(gate_logit.shape)} "
                         f"be (..., 1), all one dtype")
    width = x.shape[-1]
    out = torch.ops.omni_rt_triton.sigmoid_gate_add(x.reshape(-1, width), gate_logit.reshape(-1, 1),
                                                    y.reshape(-1, width))
    return out.view(x.shape)


# runtime/dispatch.py registers these as the `triton` backend (dispatch op name -> public function).
TRITON_OPS = {
    "silu_mul": silu_mul,
    "sigmoid_gate_add": sigmoid_gate_add,
}
