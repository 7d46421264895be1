"""Qwen3's per-head q/k RMSNorm fused with rotary embeddings, and RMSNorm, in Triton: the twins of
kernels.rope.qk_norm_rope_ref (cos/sin given), kernels.rope.mrope_qk_norm_ref_ (in place, cos/sin computed
in the kernel from t/h/w positions, interleaved TM-RoPE) and kernels.norm.rms_norm_ref.

One program takes one token and a block of heads (q heads first, then k heads, in one launch): it normalises
each head in fp32, rotates it with rotate-half (slot j pairs channel j with j + D/2, MODEL_SPEC §4.1) and
writes it back. Every rounding step of the torch twins is reproduced (normed cast to the activation dtype
before the weight, weight·x rounded, cos/sin rounded to the activation dtype, each product and the sum
rounded), so bf16 results match the references to the last bit up to fp32 reduction order.

Each public function validates its arguments, reshapes (views where it can) and calls its `torch.library` op
`omni_rt_triton::<name>`, which launches the kernels; the op's fake implementation only allocates outputs
(FakeTensorMode, meta tensors, torch.compile). Kernels one call launches: kernels/launch_counts.py.

Legend: T = tokens, Hq / Hk = q / kv heads, D = head_dim, HALF = D/2 frequency slots, M, N = rows and width
of rms_norm.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.launch_counts import qk_norm_rope_plan, rms_norm_plan
from kernels.tuning import launch_config

_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

# Tuner search spaces (bench/tune.py reads TUNE_SPACE).
TUNE_SPACE = {"qk_norm_rope": {"BLOCK_H": [1, 2, 4, 8, 16, 32], "num_warps": [1, 2, 4, 8]},
              "rms_norm": {"BLOCK_M": [1, 2, 4, 8, 16], "num_warps": [1, 2, 4, 8, 16]}}

# Cody–Waite split of 2π: C1 has 8 significant bits, so k·C1 is exact for |k| < 2^16 (angles up to ~4e5 rad)
# and the reduced angle keeps ~1e-7 absolute accuracy whatever cos/sin the backend lowers to.
_TWO_PI_HI = 6.28125
_TWO_PI_LO = 2 * math.pi - 6.28125
_INV_TWO_PI = 1 / (2 * math.pi)

COS_FROM_TABLE, COS_FROM_POSITIONS, COS_FROM_MROPE = 0, 1, 2


# ------------------------------------------------------------------------------------------------ rms_norm
@triton.jit
def _rms_norm_kernel(
    x_ptr, w_ptr, out_ptr,
    M, N, eps,
    stride_xm, stride_xn, stride_w, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_n[None, :] * stride_xn, mask=mask, other=0.0)
    x = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, 1) / N + eps)
    normed = (x * rstd[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)  # cast before the weight
    w = tl.load(w_ptr + offs_n * stride_w, mask=offs_n < N, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             (w[None, :] * normed).to(out_ptr.dtype.element_ty), mask=mask)


@torch.library.custom_op("omni_rt_triton::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: (M, N), any strides; weight: (N,). Returns a new (M, N) tensor (dtype: _rms_norm_dtype)."""
    rows, width = x.shape
    out = torch.empty(x.shape, dtype=_rms_norm_dtype(x, weight), device=x.device)
    if not rms_norm_plan(rows):
        return out
    block_n = triton.next_power_of_2(width)
    default = {"BLOCK_M": max(1, min(16, 2048 // block_n)), "num_warps": 4 if block_n <= 2048 else 8}
    cfg = launch_config("rms_norm", f"M={rows},N={width}", x.dtype, default)
    _rms_norm_kernel[(triton.cdiv(rows, cfg["BLOCK_M"]),)](
        x, weight, out, rows, width, eps, *x.stride(), weight.stride(0), *out.stride(),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=block_n, num_warps=cfg["num_warps"])
    return out


@_rms_norm_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape, dtype=_rms_norm_dtype(x, weight))


def _rms_norm_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    return torch.promote_types(weight.dtype, x.dtype)  # what torch gives `weight * normed.to(x.dtype)`


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: (..., N) float; weight: (N,). Returns a new tensor of x's shape in the dtype torch gives
    `weight * normed.to(x.dtype)` (as kernels.norm.rms_norm_ref)."""
    out = torch.ops.omni_rt_triton.rms_norm(x.reshape(-1, x.shape[-1]), weight, float(eps))  # reshape: a view if it can
    return out.view(x.shape)


# ---------------------------------------------------------------------------------- residual add + rms_norm
@triton.jit
def _add_rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, out_ptr, r_out_ptr,
    M, N, eps,
    stride_xm, stride_xn, stride_rm, stride_rn, stride_w, stride_om, stride_on, stride_sm, stride_sn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_n[None, :] * stride_xn, mask=mask, other=0.0)
    r = tl.load(r_ptr + offs_m[:, None] * stride_rm + offs_n[None, :] * stride_rn, mask=mask, other=0.0)
    # the sum rounded to the residual stream's dtype first, as `x + residual` in torch; the norm reads that
    total = (x.to(tl.float32) + r.to(tl.float32)).to(r_out_ptr.dtype.element_ty)
    tl.store(r_out_ptr + offs_m[:, None] * stride_sm + offs_n[None, :] * stride_sn, total, mask=mask)
    total = total.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(total * total, 1) / N + eps)
    normed = (total * rstd[:, None]).to(r_out_ptr.dtype.element_ty).to(tl.float32)  # cast before the weight
    w = tl.load(w_ptr + offs_n * stride_w, mask=offs_n < N, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             (w[None, :] * normed).to(out_ptr.dtype.element_ty), mask=mask)


@torch.library.custom_op("omni_rt_triton::add_rms_norm", mutates_args=())
def _add_rms_norm_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: (M, N), any strides; weight: (N,). Returns new (normed, new_residual), each (M, N)."""
    rows, width = x.shape
    normed, new_residual = _add_rms_norm_outputs(x, residual, weight)
    if not rms_norm_plan(rows):
        return normed, new_residual
    block_n = triton.next_power_of_2(width)
    default = {"BLOCK_M": max(1, min(16, 2048 // block_n)), "num_warps": 4 if block_n <= 2048 else 8}
    cfg = launch_config("rms_norm", f"M={rows},N={width}", x.dtype, default)  # the same tiling as rms_norm
    _add_rms_norm_kernel[(triton.cdiv(rows, cfg["BLOCK_M"]),)](
        x, residual, weight, normed, new_residual, rows, width, eps,
        *x.stride(), *residual.stride(), weight.stride(0), *normed.stride(), *new_residual.stride(),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=block_n, num_warps=cfg["num_warps"])
    return normed, new_residual


def _add_rms_norm_outputs(x, residual, weight) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty (normed, new_residual) in the dtypes kernels.norm.add_rms_norm_ref gives."""
    sum_dtype = torch.promote_types(x.dtype, residual.dtype)
    return (x.new_empty(x.shape, dtype=torch.promote_types(weight.dtype, sum_dtype)),
            x.new_empty(x.shape, dtype=sum_dtype))


@_add_rms_norm_op.register_fake
def _(x, residual, weight, eps):
    return _add_rms_norm_outputs(x, residual, weight)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: (..., N) float, the same shape; weight: (N,). Returns new (normed, new_residual) as
    kernels.norm.add_rms_norm_ref: new_residual = x + residual rounded to its dtype, normed its RMSNorm."""
    if x.shape != residual.shape:
        raise ValueError(f"x {tuple(x.shape)} and residual {tuple(residual.shape)} must have the same shape")
    width = x.shape[-1]
    normed, new_residual = torch.ops.omni_rt_triton.add_rms_norm(x.reshape(-1, width), residual.reshape(-1, width),
                                                                 weight, float(eps))
    return normed.view(x.shape), new_residual.view(x.shape)


# ------------------------------------------------------------------------------------- q/k norm + rotary
@triton.jit
def _norm_rope_heads(
    x_ptr, out_ptr, w_ptr, cos_lo, cos_hi, sin_lo, sin_hi,
    pid_t, out_row, head0, H, D, HALF, eps,
    stride_xt, stride_xh, stride_xd, stride_ot, stride_oh, stride_od, stride_w,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, Y_DTYPE: tl.constexpr, ROPE_DTYPE: tl.constexpr,
):
    """RMSNorm + rotate-half of heads head0 … head0+BLOCK_H−1 of token pid_t, stored at row out_row of out
    (pid_t, or a cache position); cos/sin halves: [BLOCK_HALF]."""
    offs_h = head0 + tl.arange(0, BLOCK_H)
    offs_j = tl.arange(0, BLOCK_HALF)
    mask = (offs_h < H)[:, None] & (offs_j < HALF)[None, :]
    x_lo_ptrs = x_ptr + pid_t * stride_xt + offs_h[:, None] * stride_xh + offs_j[None, :] * stride_xd
    x_lo = tl.load(x_lo_ptrs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_H, BLOCK_HALF] channels j
    x_hi = tl.load(x_lo_ptrs + HALF * stride_xd, mask=mask, other=0.0).to(tl.float32)  # channels j + D/2
    rstd = tl.rsqrt((tl.sum(x_lo * x_lo, 1) + tl.sum(x_hi * x_hi, 1)) / D + eps)
    act = x_ptr.dtype.element_ty
    n_lo = (x_lo * rstd[:, None]).to(act).to(tl.float32)
    n_hi = (x_hi * rstd[:, None]).to(act).to(tl.float32)
    w_lo = tl.load(w_ptr + offs_j * stride_w, mask=offs_j < HALF, other=0.0).to(tl.float32)
    w_hi = tl.load(w_ptr + (offs_j + HALF) * stride_w, mask=offs_j < HALF, other=0.0).to(tl.float32)
    y_lo = (w_lo[None, :] * n_lo).to(Y_DTYPE).to(tl.float32)
    y_hi = (w_hi[None, :] * n_hi).to(Y_DTYPE).to(tl.float32)
    # x·cos + rotate_half(x)·sin with rotate_half(x) = [−x_hi, x_lo]; each product rounded like torch's.
    out_lo = (y_lo * cos_lo[None, :]).to(ROPE_DTYPE).to(tl.float32) + \
        (-y_hi * sin_lo[None, :]).to(ROPE_DTYPE).to(tl.float32)
    out_hi = (y_hi * cos_hi[None, :]).to(ROPE_DTYPE).to(tl.float32) + \
        (y_lo * sin_hi[None, :]).to(ROPE_DTYPE).to(tl.float32)
    o_lo_ptrs = out_ptr + out_row * stride_ot + offs_h[:, None] * stride_oh + offs_j[None, :] * stride_od
    out_ty = out_ptr.dtype.element_ty
    tl.store(o_lo_ptrs, out_lo.to(ROPE_DTYPE).to(out_ty), mask=mask)
    tl.store(o_lo_ptrs + HALF * stride_od, out_hi.to(ROPE_DTYPE).to(out_ty), mask=mask)


@triton.jit
def _qk_norm_rope_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, q_w_ptr, k_w_ptr, cos_ptr, sin_ptr, pos_ptr, inv_freq_ptr,
    v_ptr, v_out_ptr, rows_ptr, at_ptr,
    Hq, Hk, D, HALF, section_h, section_w, eps, L,
    stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd,
    stride_qot, stride_qoh, stride_qod, stride_kot, stride_koh, stride_kod,
    stride_qw, stride_kw, stride_ct, stride_cd, stride_st, stride_sd, stride_pa, stride_pt, stride_f,
    stride_vt, stride_vh, stride_vd, stride_ks, stride_vs, stride_von, stride_voh, stride_vod,
    stride_rb, stride_rl, stride_ab, stride_al,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, COS_MODE: tl.constexpr, COS_DTYPE: tl.constexpr,
    WRITE_KV: tl.constexpr,
    QY_DTYPE: tl.constexpr, KY_DTYPE: tl.constexpr, QROPE_DTYPE: tl.constexpr, KROPE_DTYPE: tl.constexpr,
    TWO_PI_HI: tl.constexpr, TWO_PI_LO: tl.constexpr, INV_TWO_PI: tl.constexpr,
):
    pid_t, pid_h = tl.program_id(0), tl.program_id(1)
    offs_j = tl.arange(0, BLOCK_HALF)
    slot_valid = offs_j < HALF
    if COS_MODE == 0:  # cos/sin tables (T, D), already in their dtype
        cos_lo = tl.load(cos_ptr + pid_t * stride_ct + offs_j * stride_cd, mask=slot_valid, other=0.0)
        cos_hi = tl.load(cos_ptr + pid_t * stride_ct + (offs_j + HALF) * stride_cd, mask=slot_valid, other=0.0)
        sin_lo = tl.load(sin_ptr + pid_t * stride_st + offs_j * stride_sd, mask=slot_valid, other=0.0)
        sin_hi = tl.load(sin_ptr + pid_t * stride_st + (offs_j + HALF) * stride_sd, mask=slot_valid, other=0.0)
        cos_lo, cos_hi = cos_lo.to(tl.float32), cos_hi.to(tl.float32)
        sin_lo, sin_hi = sin_lo.to(tl.float32), sin_hi.to(tl.float32)
    else:
        if COS_MODE == 2:  # interleaved TM-RoPE: kernels.rope.tm_rope_axis_of_slot
            axis = tl.where((offs_j % 3 == 1) & (offs_j < 3 * section_h), 1,
                            tl.where((offs_j % 3 == 2) & (offs_j < 3 * section_w), 2, 0))
        else:  # 1-D RoPE: one position row
            axis = offs_j * 0
        pos = tl.load(pos_ptr + axis * stride_pa + pid_t * stride_pt, mask=slot_valid, other=0).to(tl.float32)
        angle = pos * tl.load(inv_freq_ptr + offs_j * stride_f, mask=slot_valid, other=0.0).to(tl.float32)
        turns = tl.floor(angle * INV_TWO_PI + 0.5)
        angle = (angle - turns * TWO_PI_HI) - turns * TWO_PI_LO  # in [−π, π]
        cos_lo = tl.cos(angle).to(COS_DTYPE).to(tl.float32)  # cast to the activation dtype before use
        sin_lo = tl.sin(angle).to(COS_DTYPE).to(tl.float32)
        cos_hi, sin_hi = cos_lo, sin_lo
    q_blocks = tl.cdiv(Hq, BLOCK_H)
    if pid_h < q_blocks:
        _norm_rope_heads(q_ptr, q_out_ptr, q_w_ptr, cos_lo, cos_hi, sin_lo, sin_hi,
                         pid_t, pid_t, pid_h * BLOCK_H, Hq, D, HALF, eps,
                         stride_qt, stride_qh, stride_qd, stride_qot, stride_qoh, stride_qod, stride_qw,
                         BLOCK_H, BLOCK_HALF, QY_DTYPE, QROPE_DTYPE)
    elif WRITE_KV:  # k and v of token pid_t (= b·L + l) go to position at[b, l] of cache slot rows[b, l]
        row = tl.load(rows_ptr + (pid_t // L) * stride_rb + (pid_t % L) * stride_rl)
        at = tl.load(at_ptr + (pid_t // L) * stride_ab + (pid_t % L) * stride_al)
        head0 = (pid_h - q_blocks) * BLOCK_H
        _norm_rope_heads(k_ptr, k_out_ptr + row * stride_ks, k_w_ptr, cos_lo, cos_hi, sin_lo, sin_hi,
                         pid_t, at, head0, Hk, D, HALF, eps,
                         stride_kt, stride_kh, stride_kd, stride_kot, stride_koh, stride_kod, stride_kw,
                         BLOCK_H, BLOCK_HALF, KY_DTYPE, KROPE_DTYPE)
        offs_h = head0 + tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, 2 * BLOCK_HALF)  # = next power of two of D (D even)
        mask = (offs_h < Hk)[:, None] & (offs_d < D)[None, :]
        v = tl.load(v_ptr + pid_t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :] * stride_vd,
                    mask=mask, other=0.0)
        tl.store(v_out_ptr + row * stride_vs + at * stride_von + offs_h[:, None] * stride_voh
                 + offs_d[None, :] * stride_vod, v.to(v_out_ptr.dtype.element_ty), mask=mask)
    else:
        _norm_rope_heads(k_ptr, k_out_ptr, k_w_ptr, cos_lo, cos_hi, sin_lo, sin_hi,
                         pid_t, pid_t, (pid_h - q_blocks) * BLOCK_H, Hk, D, HALF, eps,
                         stride_kt, stride_kh, stride_kd, stride_kot, stride_koh, stride_kod, stride_kw,
                         BLOCK_H, BLOCK_HALF, KY_DTYPE, KROPE_DTYPE)


def _check_qk(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor | None) -> None:
    """q, k: (T, heads, D) with an even D; positions (axes, T) or None."""
    tokens, _, head_dim = q.shape
    if tokens == 0:
        return
    if head_dim % 2 or k.shape[0] != tokens or k.shape[2] != head_dim:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must be (T, heads, D) with an even D")
    if positions is not None and positions.shape[1] != tokens:
        raise ValueError(f"positions hold {positions.shape[1]} tokens per axis; q and k have {tokens}")


def _launch(q, k, q_out, k_out, q_norm_weight, k_norm_weight, eps, cos_mode, cos, sin, positions, inv_freq,
            section, cos_dtype, kv_write=None):
    """q, k, q_out, k_out: (T, H, D) views (out may alias in); cos/sin: (T, D) or None; positions: (axes, T)
    or None. Fills q_out and k_out. kv_write: (v (T, Hk, D), k_cache, v_cache (slots, N, Hk, D), write_rows,
    write_at (B, L) with B·L = T): k goes into k_cache (k_out unused) and v into v_cache at those slots/positions."""
    tokens, q_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    if not qk_norm_rope_plan(tokens):
        return
    half = head_dim // 2
    block_h = triton.next_power_of_2(max(q_heads, kv_heads))
    default = {"BLOCK_H": min(block_h, 8 if q.is_cuda else 32), "num_warps": 4 if head_dim >= 128 else 2}
    cfg = launch_config("qk_norm_rope", f"M={tokens},Hq={q_heads},Hk={kv_heads},D={head_dim}", q.dtype, default)
    block_h = cfg["BLOCK_H"]
    qy = torch.promote_types(q_norm_weight.dtype, q.dtype)
    ky = torch.promote_types(k_norm_weight.dtype, k.dtype)
    if cos is None:  # the other mode's pointers are never read: pass q rather than allocate
        cos = sin = q
        cos_strides = (0, 0, 0, 0)
    else:
        cos_strides = (*cos.stride(), *sin.stride())
    if positions is None:
        positions = inv_freq = q
        pos_strides = (0, 0, 0)
    else:
        pos_strides = (*positions.stride(), inv_freq.stride(0))
    if kv_write is None:  # the v / cache pointers are never read: pass q
        v = v_out = rows = at = q
        length, k_out_strides, kv_strides = 1, k_out.stride(), (0,) * 12
    else:
        v, k_out, v_out, rows, at = kv_write
        length = rows.shape[1]
        k_out_strides = k_out.stride()[1:]  # position, head, dim; the slot stride goes with the v strides
        kv_strides = (*v.stride(), k_out.stride(0), *v_out.stride(), *rows.stride(), *at.stride())
    grid = (tokens, triton.cdiv(q_heads, block_h) + triton.cdiv(kv_heads, block_h))
    _qk_norm_rope_kernel[grid](
        q, k, q_out, k_out, q_norm_weight, k_norm_weight, cos, sin, positions, inv_freq, v, v_out, rows, at,
        q_heads, kv_heads, head_dim, half, int(section[1]), int(section[2]), eps, length,
        *q.stride(), *k.stride(), *q_out.stride(), *k_out_strides,
        q_norm_weight.stride(0), k_norm_weight.stride(0), *cos_strides, *pos_strides, *kv_strides,
        BLOCK_H=block_h, BLOCK_HALF=triton.next_power_of_2(half), COS_MODE=cos_mode, WRITE_KV=kv_write is not None,
        COS_DTYPE=_TL_DTYPE[cos_dtype], QY_DTYPE=_TL_DTYPE[qy], KY_DTYPE=_TL_DTYPE[ky],
        QROPE_DTYPE=_TL_DTYPE[torch.promote_types(qy, cos_dtype)],
        KROPE_DTYPE=_TL_DTYPE[torch.promote_types(ky, cos_dtype)],
        TWO_PI_HI=_TWO_PI_HI, TWO_PI_LO=_TWO_PI_LO, INV_TWO_PI=_INV_TWO_PI, num_warps=cfg["num_warps"])


def _qk_out_dtypes(q, k, q_norm_weight, k_norm_weight, cos) -> tuple[torch.dtype, torch.dtype]:
    promote = torch.promote_types
    return (promote(promote(q_norm_weight.dtype, q.dtype), cos.dtype),
            promote(promote(k_norm_weight.dtype, k.dtype), cos.dtype))


@torch.library.custom_op("omni_rt_triton::qk_norm_rope", mutates_args=())
def _qk_norm_rope_op(q: torch.Tensor, k: torch.Tensor, q_norm_weight: torch.Tensor, k_norm_weight: torch.Tensor,
                     eps: float, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q: (T, Hq, D); k: (T, Hk, D); cos, sin: (T, D); any strides. Returns new contiguous (q, k)."""
    q_dtype, k_dtype = _qk_out_dtypes(q, k, q_norm_weight, k_norm_weight, cos)
    q_out = torch.empty(q.shape, dtype=q_dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k_dtype, device=k.device)
    _launch(q, k, q_out, k_out, q_norm_weight, k_norm_weight, eps, COS_FROM_TABLE, cos, sin, None, None, (0, 0, 0),
            cos.dtype)
    return q_out, k_out


@_qk_norm_rope_op.register_fake
def _(q, k, q_norm_weight, k_norm_weight, eps, cos, sin):
    q_dtype, k_dtype = _qk_out_dtypes(q, k, q_norm_weight, k_norm_weight, cos)
    return q.new_empty(q.shape, dtype=q_dtype), k.new_empty(k.shape, dtype=k_dtype)


def qk_norm_rope(q, k, q_norm_weight, k_norm_weight, eps: float, cos, sin):
    """q: (B, L, Hq, D); k: (B, L, Hk, D) (strided views fine); norm weights: (D,); cos/sin: (B, L, D).
    Returns new (q, k) as kernels.rope.qk_norm_rope_ref: per-head RMSNorm, then rotate-half rotary."""
    batch, length, q_heads, head_dim = q.shape
    tokens = batch * length
    q3 = q.reshape(tokens, q_heads, head_dim)  # views when they can be (a fused qkv output's q and k can)
    k3 = k.reshape(tokens, k.shape[2], head_dim)
    _check_qk(q3, k3, None)
    cos2 = cos.expand(batch, length, head_dim).reshape(tokens, head_dim)
    sin2 = sin.expand(batch, length, head_dim).reshape(tokens, head_dim)
    q_out, k_out = torch.ops.omni_rt_triton.qk_norm_rope(q3, k3, q_norm_weight, k_norm_weight, float(eps), cos2, sin2)
    return q_out.view(q.shape), k_out.view(k.shape)


@torch.library.custom_op("omni_rt_triton::qk_norm_rope_cache_write", mutates_args=("k_cache", "v_cache"))
def _qk_norm_rope_cache_write_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_norm_weight: torch.Tensor,
                                 k_norm_weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                                 k_cache: torch.Tensor, v_cache: torch.Tensor, write_rows: torch.Tensor,
                                 write_at: torch.Tensor) -> torch.Tensor:
    """q: (T, Hq, D); k, v: (T, Hk, D); cos, sin: (T, D); k_cache, v_cache: (slots, N, Hk, D), updated in
    place; write_rows, write_at: (B, L) with B·L = T; any strides. Returns the new contiguous q."""
    q_out = torch.empty(q.shape, dtype=_qk_out_dtypes(q, k, q_norm_weight, k_norm_weight, cos)[0], device=q.device)
    _launch(q, k, q_out, k_cache, q_norm_weight, k_norm_weight, eps, COS_FROM_TABLE, cos, sin, None, None, (0, 0, 0),
            cos.dtype, kv_write=(v, k_cache, v_cache, write_rows, write_at))
    return q_out


@_qk_norm_rope_cache_write_op.register_fake
def _(q, k, v, q_norm_weight, k_norm_weight, eps, cos, sin, k_cache, v_cache, write_rows, write_at):
    return q.new_empty(q.shape, dtype=_qk_out_dtypes(q, k, q_norm_weight, k_norm_weight, cos)[0])


def qk_norm_rope_cache_write(q, k, v, q_norm_weight, k_norm_weight, eps: float, cos, sin, k_cache, v_cache,
                             write_rows, write_at):
    """q: (B, L, Hq, D); k, v: (B, L, Hk, D) (strided views fine); norm weights: (D,); cos/sin: (B, L, D);
    k_cache, v_cache: (slots, N, Hk, D), updated in place; write_rows, write_at: (B, L) int64 on the device
    (expanded views fine). Returns the new q as kernels.rope.qk_norm_rope_cache_write_ref; k after its norm +
    rotary and v are stored at [write_rows, write_at] by the same kernel (one launch: no index_put_)."""
    batch, length, q_heads, head_dim = q.shape
    tokens = batch * length
    q3 = q.reshape(tokens, q_heads, head_dim)  # views when they can be (a fused qkv output's q, k, v can)
    k3 = k.reshape(tokens, k.shape[2], head_dim)
    v3 = v.reshape(tokens, v.shape[2], head_dim)
    _check_qk(q3, k3, None)
    if v3.shape != k3.shape or k_cache.shape[2:] != k3.shape[1:] or v_cache.shape != k_cache.shape:
        raise ValueError(f"v {tuple(v.shape)} must match k {tuple(k.shape)}, and the caches {tuple(k_cache.shape)}, "
                         f"{tuple(v_cache.shape)} its heads and head_dim")
    if write_rows.shape != (batch, length) or write_at.shape != (batch, length):
        raise ValueError(f"write_rows {tuple(write_rows.shape)} and write_at {tuple(write_at.shape)} must be "
                         f"({batch}, {length})")
    cos2 = cos.expand(batch, length, head_dim).reshape(tokens, head_dim)
    sin2 = sin.expand(batch, length, head_dim).reshape(tokens, head_dim)
    q_out = torch.ops.omni_rt_triton.qk_norm_rope_cache_write(q3, k3, v3, q_norm_weight, k_norm_weight, float(eps),
                                                              cos2, sin2, k_cache, v_cache, write_rows, write_at)
    return q_out.view(q.shape)


@torch.library.custom_op("omni_rt_triton::mrope_qk_norm_", mutates_args=("q", "k"))
def _mrope_qk_norm_op(q: torch.Tensor, k: torch.Tensor, q_norm_weight: torch.Tensor, k_norm_weight: torch.Tensor,
                      eps: float, positions: torch.Tensor, inv_freq: torch.Tensor,
                      mrope_section: list[int] | None) -> None:
    """q: (T, Hq, D), k: (T, Hk, D), both updated in place; positions: (3, T), or (1, T) with mrope_section None."""
    if mrope_section is None:
        mode, section = COS_FROM_POSITIONS, (0, 0, 0)
    else:
        mode, section = COS_FROM_MROPE, mrope_section
    _launch(q, k, q, k, q_norm_weight, k_norm_weight, eps, mode, None, None, positions, inv_freq, section, q.dtype)


@_mrope_qk_norm_op.register_fake
def _(q, k, q_norm_weight, k_norm_weight, eps, positions, inv_freq, mrope_section):
    return None


def mrope_qk_norm_(q, k, q_norm_weight, k_norm_weight, eps: float, positions, inv_freq, mrope_section):
    """q: (T, Hq, D), updated in place; k: (T, Hk, D), updated in place (strided views of a fused qkv output
    fine); norm weights: (D,); positions: (3, T) t/h/w ids (int64 or float; (3, B, L) with B·L = T is taken as
    (3, T)), or (T,) when mrope_section is None (1-D RoPE); inv_freq: (D/2,) float32. Returns (q, k), the same tensors, as
    kernels.rope.mrope_qk_norm_ref_: angles in fp32 from the positions read on the device, interleaved axis
    rule of tm_rope_axis_of_slot, cos/sin cast to q's dtype before use. No allocation, no host sync.
    The op (omni_rt_triton::mrope_qk_norm_) returns nothing: torch.library ops may not return their inputs."""
    if inv_freq.numel() != q.shape[-1] // 2:
        raise ValueError(f"inv_freq has {inv_freq.numel()} slots; head_dim {q.shape[-1]} needs {q.shape[-1] // 2}")
    section = None if mrope_section is None else [int(s) for s in mrope_section]
    positions = positions.reshape(1 if section is None else 3, -1)  # (axes, T): a view if it can
    _check_qk(q, k, positions)
    torch.ops.omni_rt_triton.mrope_qk_norm_(q, k, q_norm_weight, k_norm_weight, float(eps), positions, inv_freq,
                                            section)
    return q, k


# runtime/dispatch.py registers these as the `triton` backend (dispatch op name -> public function).
TRITON_OPS = {
    "rms_norm": rms_norm,
    "add_rms_norm": add_rms_norm,
    "qk_norm_rope": qk_norm_rope,
    "qk_norm_rope_cache_write": qk_norm_rope_cache_write,
    "mrope_qk_norm_": mrope_qk_norm_,
}
