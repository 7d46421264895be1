"""SnakeBeta in Triton: one kernel for x + inv_beta·sin²(alpha_exp·x), which the torch twin (kernels/snake.py)
runs as five (mul, sin, pow, mul, add): 29 SnakeBetas per Code2Wav frame on the released config. Every
rounding step of the twin is reproduced (each torch op rounds to the activation dtype).

The public function validates its arguments and calls the `torch.library` op `omni_rt_triton::snake_beta`,
whose fake implementation only allocates the output. Kernels one call launches: kernels/launch_counts.py.

Legend: B = batch, C = channels, L = samples; a program covers BLOCK_L samples of one (b, c) row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch_counts import elementwise_plan

BLOCK_L = 1024


@triton.jit
def _snake_beta_kernel(
    x_ptr, alpha_ptr, inv_beta_ptr, out_ptr,
    C, L,
    stride_xb, stride_xc, stride_xl, stride_ob, stride_oc, stride_ol,
    BLOCK_L: tl.constexpr,
):
    row, pid_l = tl.program_id(0), tl.program_id(1)
    b, c = row // C, row % C
    offs = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    mask = offs < L
    act = out_ptr.dtype.element_ty
    alpha = tl.load(alpha_ptr + c).to(tl.float32)
    inv_beta = tl.load(inv_beta_ptr + c).to(tl.float32)
    x = tl.load(x_ptr + b * stride_xb + c * stride_xc + offs * stride_xl, mask=mask, other=0.0).to(tl.float32)
    wave = tl.sin((x * alpha).to(act).to(tl.float32)).to(act).to(tl.float32)
    scaled = (inv_beta * (wave * wave).to(act).to(tl.float32)).to(act).to(tl.float32)
    tl.store(out_ptr + b * stride_ob + c * stride_oc + offs * stride_ol, (x + scaled).to(act), mask=mask)


@torch.library.custom_op("omni_rt_triton::snake_beta", mutates_args=())
def _snake_beta_op(x: torch.Tensor, alpha_exp: torch.Tensor, inv_beta: torch.Tensor) -> torch.Tensor:
    """x: (B, C, L), any strides; alpha_exp, inv_beta: (C,) contiguous. Returns a new contiguous (B, C, L)."""
    batch, channels, length = x.shape
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if elementwise_plan(batch * channels, length, "snake_beta"):
        _snake_beta_kernel[(batch * channels, triton.cdiv(length, BLOCK_L))](
            x, alpha_exp, inv_beta, out, channels, length, *x.stride(), *out.stride(), BLOCK_L=BLOCK_L, num_warps=4)
    return out


@_snake_beta_op.register_fake
def _(x, alpha_exp, inv_beta):
    return x.new_empty(x.shape)


def snake_beta(x: torch.Tensor, alpha_exp: torch.Tensor, inv_beta: torch.Tensor) -> torch.Tensor:
    """x: [B, C, L]; alpha_exp, inv_beta: [C], x's dtype. Returns a new x + inv_beta·sin²(alpha_exp·x) as
    kernels.snake.snake_beta_ref."""
    if x.dim() != 3 or alpha_exp.shape != (x.shape[1],) or inv_beta.shape != (x.shape[1],):
        raise ValueError(f"x {tuple(x.shape)} must be [B, C, L] and alpha_exp {tuple(alpha_exp.shape)}, inv_beta "
                         f"{tuple(inv_beta.shape)} [C]")
    if not x.dtype == alpha_exp.dtype == inv_beta.dtype:
        raise ValueError(f"x {x.dtype}, alpha_exp {alpha_exp.dtype} and inv_beta {inv_beta.dtype} must share a dtype")
    return torch.ops.omni_rt_triton.snake_beta(x, alpha_exp.contiguous(), inv_beta.contiguous())


# runtime/dispatch.py registers these as the `triton` backend (dispatch op name -> public function).
TRITON_OPS = {
    "snake_beta": snake_beta,
}
