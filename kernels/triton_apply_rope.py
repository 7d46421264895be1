"""Rotary embedding (no norm) in Triton: one kernel for x·cos + rotate_half(x)·sin, which the torch twin
(kernels/rope.py apply_rope_ref) runs as five (mul, neg, cat, mul, add). Code2Wav's transformer rotates its
q|k heads with it every frame; the vision encoder's windows too. Every rounding step of the twin is reproduced.

The public function calls the `torch.library` op `omni_rt_triton::apply_rope`, whose fake implementation only
allocates the output. Kernels one call launches: kernels/launch_counts.py.

Legend: B = batch, S = positions, H = heads, D = head_dim; a program rotates the H heads' D values of one (b, s).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch_counts import elementwise_plan


@triton.jit
def _apply_rope_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr,
    S, H, D,
    stride_xb, stride_xs, stride_xh, stride_xd, stride_cb, stride_cs, stride_cd, stride_sb, stride_ss, stride_sd,
    stride_ob, stride_os, stride_oh, stride_od,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    b, s = row // S, row % S
    offs_h, offs_d = tl.arange(0, BLOCK_H), tl.arange(0, BLOCK_D)
    half = D // 2
    partner = tl.where(offs_d < half, offs_d + half, offs_d - half)
    sign = tl.where(offs_d < half, -1.0, 1.0)
    act = out_ptr.dtype.element_ty
    mask_d = offs_d < D
    mask = (offs_h[:, None] < H) & mask_d[None, :]
    cos = tl.load(cos_ptr + b * stride_cb + s * stride_cs + offs_d * stride_cd, mask=mask_d, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + b * stride_sb + s * stride_ss + offs_d * stride_sd, mask=mask_d, other=0.0).to(tl.float32)
    base = x_ptr + b * stride_xb + s * stride_xs + offs_h[:, None] * stride_xh
    x = tl.load(base + offs_d[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    x_rot = tl.load(base + partner[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32) * sign[None, :]
    first = (x * cos[None, :]).to(act).to(tl.float32)
    second = (x_rot * sin[None, :]).to(act).to(tl.float32)
    tl.store(out_ptr + b * stride_ob + s * stride_os + offs_h[:, None] * stride_oh + offs_d[None, :] * stride_od,
             (first + second).to(act), mask=mask)


@torch.library.custom_op("omni_rt_triton::apply_rope", mutates_args=())
def _apply_rope_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, S, H, D), any strides; cos, sin: (B or 1, S, D). Returns a new contiguous (B, S, H, D)."""
    batch, seq, heads, head_dim = x.shape
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if elementwise_plan(batch * seq, heads * head_dim, "apply_rope"):
        cos_b = cos.stride(0) if cos.shape[0] > 1 else 0  # one table for every row
        sin_b = sin.stride(0) if sin.shape[0] > 1 else 0
        _apply_rope_kernel[(batch * seq,)](
            x, cos, sin, out, seq, heads, head_dim, *x.stride(), cos_b, cos.stride(1), cos.stride(2),
            sin_b, sin.stride(1), sin.stride(2), *out.stride(),
            BLOCK_H=triton.next_power_of_2(heads), BLOCK_D=triton.next_power_of_2(head_dim), num_warps=4)
    return out


@_apply_rope_op.register_fake
def _(x, cos, sin):
    return x.new_empty(x.shape)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, S, H, D); cos/sin: (B or 1, S, D) in x's dtype. Returns the rotated x (new tensor) as
    kernels.rope.apply_rope_ref."""
    if x.dim() != 4 or x.shape[-1] % 2 or cos.shape != sin.shape or cos.shape[1:] != (x.shape[1], x.shape[3]) \
            or cos.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"x {tuple(x.shape)} must be (B, S, H, even D) and cos/sin {tuple(cos.shape)} "
                         f"{tuple(sin.shape)} (B or 1, S, D)")
    if not x.dtype == cos.dtype == sin.dtype:
        raise ValueError(f"x {x.dtype}, cos {cos.dtype} and sin {sin.dtype} must share a dtype")
    return torch.ops.omni_rt_triton.apply_rope(x, cos, sin)


# runtime/dispatch.py registers these as the `triton` backend (dispatch op name -> public function).
TRITON_OPS = {
    "apply_rope": apply_rope,
}
