"""A decoder's pre-norm fused into the linear that reads it, in Triton: `add_rms_norm_linear` (residual add +
RMSNorm + GEMM: input_layernorm + qkv_proj, the code predictor's final norm + lm_head) and
`add_rms_norm_swiglu` (the same prologue, gate|up GEMM and silu(gate)·up epilogue: post_attention_layernorm +
a dense GatedMLP up to its down_proj). Twins: kernels/norm.py. One launch each, where the torch path runs a
norm kernel, a GEMM and (SwiGLU) an activation kernel. The talker's sigmoid-gated shared expert (MODEL_SPEC §3)
runs in two more: `linear_swiglu` (the SwiGLU kernel with its norm prologue off: gate|up + silu(gate)·up) and
`linear_gated_add` (down GEMM whose epilogue adds sigmoid(x·shared_expert_gate) times it to the routed experts'
sum; every program recomputes its rows' gate dot product, G reads a row, cheap next to its weight tile), where
the torch path runs five (two GEMMs, silu·up, the N = 1 gate GEMM, the gated add). Twins: kernels/mlp.py.

Each program owns a tile of BLOCK_M rows and BLOCK_N output columns. Pass 1 reads its rows once over K and
accumulates their sum of squares (every column tile recomputes it: K·BLOCK_M reads, cheap next to the
BLOCK_N·K weight tile); the programs of the first column tile (pid_n == 0) also store the new residual stream.
Pass 2 re-reads the rows, normalises them on the fly and feeds them to tl.dot with fp32 accumulation; rows past
M are masked, so any row count runs (tl.dot needs BLOCK_M >= 16). Every rounding of the twins is reproduced:
x + residual rounded to the activation dtype, the normed rows cast before the norm weight, norm_weight · normed
rounded (the GEMM's input), the GEMM output rounded, then silu rounded before the product; the GEMM's sum
order is the one difference from torch's.

Each public function validates its arguments, reshapes (views where it can) and calls its `torch.library` op
`omni_rt_triton::<name>`; the op's fake implementation only allocates the outputs. When residual is None the
new residual is a copy of x written by the kernel (an op's output may not alias its input). Kernels one call
launches: kernels/launch_counts.py.

Legend: M = rows (tokens), K = the GEMM's reduction width (hidden_size; I for linear_gated_add's down GEMM),
N = output columns (I for the SwiGLU kernel, whose weight holds 2I rows: gate then up), G = the width of
linear_gated_add's gate input x.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kernels.launch_counts import norm_linear_plan
from kernels.tuning import dot_precision, launch_config

# Up to 16 rows (a decode step) the weight read is the whole cost and the column tiles are the programs that
# stream it: 32 columns give N/32 programs (64 for the code predictor's 2048-wide lm_head, 160 for the thinker's
# q|k|v) where 64 would leave most of an H100's 132 SMs idle. More rows (a prefill chunk): every 64-row tile
# re-reads the weight, so wider column tiles. bench/tune.py decides per shape on a GPU.
DECODE_CONFIG = {"BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4}
PREFILL_CONFIG = {"BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4}
TUNE_SPACE = {op: {"BLOCK_N": [32, 64, 128], "BLOCK_K": [64, 128, 256], "num_warps": [4, 8]}
              for op in ("add_rms_norm_linear", "add_rms_norm_swiglu", "linear_swiglu", "linear_gated_add")}
MAX_BLOCK_M = 64  # rows per program: up to M rounded to a power of two (at least tl.dot's 16)


@triton.jit
def _residual_tile(x_ptr, r_ptr, offs_m, offs_k, mask, stride_xm, stride_xk, stride_rm, stride_rk,
                   HAS_RESIDUAL: tl.constexpr):
    """[BLOCK_M, BLOCK_K] of the new residual stream in fp32, x + residual rounded to x's dtype as torch adds."""
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + offs_m[:, None] * stride_rm + offs_k[None, :] * stride_rk, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
    return x.to(tl.float32)


@triton.jit
def _row_rstd(x_ptr, r_ptr, s_ptr, offs_m, m_valid, K, eps, store_m,
              stride_xm, stride_xk, stride_rm, stride_rk, stride_sm, stride_sk,
              HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Pass 1: 1/rms of each row [BLOCK_M] (fp32); stores the new residual of the rows where store_m [BLOCK_M]."""
    offs_k = tl.arange(0, BLOCK_K)
    sum_sq = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask = m_valid[:, None] & ((k0 + offs_k) < K)[None, :]
        total = _residual_tile(x_ptr, r_ptr, offs_m, k0 + offs_k, mask, stride_xm, stride_xk, stride_rm, stride_rk,
                               HAS_RESIDUAL)
        tl.store(s_ptr + offs_m[:, None] * stride_sm + (k0 + offs_k)[None, :] * stride_sk,
                 total.to(s_ptr.dtype.element_ty), mask=store_m[:, None] & mask)
        sum_sq += tl.sum(total * total, 1)
    return tl.rsqrt(sum_sq / K + eps)


@triton.jit
def _normed_tile(x_ptr, r_ptr, nw_ptr, rstd, offs_m, m_valid, k0, K, stride_xm, stride_xk, stride_rm, stride_rk,
                 stride_nw, HAS_RESIDUAL: tl.constexpr, BLOCK_K: tl.constexpr):
    """Pass 2: [BLOCK_M, BLOCK_K] of norm_weight · normed rows in the activation dtype (the GEMM's A operand)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    k_valid = offs_k < K
    total = _residual_tile(x_ptr, r_ptr, offs_m, offs_k, m_valid[:, None] & k_valid[None, :],
                           stride_xm, stride_xk, stride_rm, stride_rk, HAS_RESIDUAL)
    act = x_ptr.dtype.element_ty
    normed = (total * rstd[:, None]).to(act).to(tl.float32)  # cast before the weight, as rms_norm_ref
    nw = tl.load(nw_ptr + offs_k * stride_nw, mask=k_valid, other=0.0).to(tl.float32)
    return (nw[None, :] * normed).to(act)


@triton.jit
def _row_tile(x_ptr, offs_m, m_valid, k0, K, stride_xm, stride_xk, BLOCK_K: tl.constexpr):
    """[BLOCK_M, BLOCK_K] of rows x (M, K) as stored: the GEMM's A operand when there is no norm."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    return tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                   mask=m_valid[:, None] & (offs_k < K)[None, :], other=0.0)


@triton.jit
def _weight_tile(w_ptr, offs_n, n_valid, k0, K, stride_wn, stride_wk, BLOCK_K: tl.constexpr):
    """[BLOCK_K, BLOCK_N] of weight (N, K) transposed: the GEMM's B operand."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    return tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                   mask=(offs_k < K)[:, None] & n_valid[None, :], other=0.0)


@triton.jit
def _add_rms_norm_linear_kernel(
    x_ptr, r_ptr, nw_ptr, w_ptr, out_ptr, s_ptr,
    M, N, K, eps,
    stride_xm, stride_xk, stride_rm, stride_rk, stride_nw, stride_wn, stride_wk, stride_om, stride_on,
    stride_sm, stride_sk,
    HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_valid, n_valid = offs_m < M, offs_n < N
    store_m = m_valid & (offs_m * 0 + pid_n == 0)  # the first column tile writes the new residual
    rstd = _row_rstd(x_ptr, r_ptr, s_ptr, offs_m, m_valid, K, eps, store_m, stride_xm, stride_xk, stride_rm,
                     stride_rk, stride_sm, stride_sk, HAS_RESIDUAL, BLOCK_M, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = _normed_tile(x_ptr, r_ptr, nw_ptr, rstd, offs_m, m_valid, k0, K, stride_xm, stride_xk, stride_rm,
                         stride_rk, stride_nw, HAS_RESIDUAL, BLOCK_K)
        acc += tl.dot(a, _weight_tile(w_ptr, offs_n, n_valid, k0, K, stride_wn, stride_wk, BLOCK_K),
                      input_precision=PRECISION)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=m_valid[:, None] & n_valid[None, :])


@triton.jit
def _swiglu_kernel(
    x_ptr, r_ptr, nw_ptr, w_ptr, out_ptr, s_ptr,
    M, N, K, eps,
    stride_xm, stride_xk, stride_rm, stride_rk, stride_nw, stride_wn, stride_wk, stride_om, stride_on,
    stride_sm, stride_sk,
    NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """NORM: add_rms_norm_swiglu (the norm prologue, the new residual stored); else linear_swiglu (x as stored;
    r_ptr, nw_ptr, s_ptr never read or written)."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_valid, n_valid = offs_m < M, offs_n < N
    if NORM:
        store_m = m_valid & (offs_m * 0 + pid_n == 0)  # the first column tile writes the new residual
        rstd = _row_rstd(x_ptr, r_ptr, s_ptr, offs_m, m_valid, K, eps, store_m, stride_xm, stride_xk, stride_rm,
                         stride_rk, stride_sm, stride_sk, HAS_RESIDUAL, BLOCK_M, BLOCK_K)
    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if NORM:
            a = _normed_tile(x_ptr, r_ptr, nw_ptr, rstd, offs_m, m_valid, k0, K, stride_xm, stride_xk, stride_rm,
                             stride_rk, stride_nw, HAS_RESIDUAL, BLOCK_K)
        else:
            a = _row_tile(x_ptr, offs_m, m_valid, k0, K, stride_xm, stride_xk, BLOCK_K)
        acc_gate += tl.dot(a, _weight_tile(w_ptr, offs_n, n_valid, k0, K, stride_wn, stride_wk, BLOCK_K),
                           input_precision=PRECISION)
        acc_up += tl.dot(a, _weight_tile(w_ptr, N + offs_n, n_valid, k0, K, stride_wn, stride_wk, BLOCK_K),
                         input_precision=PRECISION)
    act = out_ptr.dtype.element_ty
    gate = acc_gate.to(act).to(tl.float32)  # each GEMM output rounded, as the gate|up linear's
    up = acc_up.to(act).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(act).to(tl.float32)  # F.silu rounds before the product
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on, (silu * up).to(act),
             mask=m_valid[:, None] & n_valid[None, :])


@triton.jit
def _linear_gated_add_kernel(
    a_ptr, w_ptr, x_ptr, gw_ptr, y_ptr, out_ptr,
    M, N, K, G,
    stride_am, stride_ak, stride_wn, stride_wk, stride_xm, stride_xg, stride_gw, stride_ym, stride_yn,
    stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_valid, n_valid = offs_m < M, offs_n < N
    act = out_ptr.dtype.element_ty
    # The gate: x·gate_weight of each row (an N = 1 GEMM, too narrow for tl.dot), every column tile recomputing it.
    logit = tl.zeros([BLOCK_M], tl.float32)
    for g0 in range(0, G, BLOCK_K):
        offs_g = g0 + tl.arange(0, BLOCK_K)
        gw = tl.load(gw_ptr + offs_g * stride_gw, mask=offs_g < G, other=0.0).to(tl.float32)
        x = _row_tile(x_ptr, offs_m, m_valid, g0, G, stride_xm, stride_xg, BLOCK_K).to(tl.float32)
        logit += tl.sum(x * gw[None, :], 1)
    logit = logit.to(act).to(tl.float32)  # the gate linear's output rounds
    gate = (1.0 / (1.0 + tl.exp(-logit))).to(act).to(tl.float32)  # torch.sigmoid rounds
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        acc += tl.dot(_row_tile(a_ptr, offs_m, m_valid, k0, K, stride_am, stride_ak, BLOCK_K),
                      _weight_tile(w_ptr, offs_n, n_valid, k0, K, stride_wn, stride_wk, BLOCK_K),
                      input_precision=PRECISION)
    shared = acc.to(act).to(tl.float32)  # the down linear's output rounds
    mask = m_valid[:, None] & n_valid[None, :]
    y = tl.load(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, mask=mask, other=0.0)
    scaled = (gate[:, None] * shared).to(act).to(tl.float32)  # the product rounds before the add
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on, (y.to(tl.float32) + scaled).to(act),
             mask=mask)


def _block_m_and_config(name: str, rows: int, cols: int, width: int, dtype) -> tuple[int, dict]:
    block_m = min(MAX_BLOCK_M, max(16, triton.next_power_of_2(rows)))
    return block_m, launch_config(name, f"M={block_m},N={cols},K={width}", dtype,
                                  DECODE_CONFIG if block_m == 16 else PREFILL_CONFIG)


def _launch(kernel, name: str, x, residual, norm_weight, eps, weight, out, new_residual, **flags) -> None:
    """norm_weight None (linear_swiglu, flags NORM=False): no norm, no residual in or out."""
    rows, width = x.shape
    cols = out.shape[1]
    if not norm_linear_plan(rows, cols, name):
        return
    block_m, cfg = _block_m_and_config(name, rows, cols, width, x.dtype)
    residual_arg = residual if residual is not None else x  # never read without HAS_RESIDUAL
    norm_arg = norm_weight if norm_weight is not None else x  # never read without NORM (nor new_residual written)
    residual_out = new_residual if new_residual is not None else x
    kernel[(triton.cdiv(rows, block_m), triton.cdiv(cols, cfg["BLOCK_N"]))](
        x, residual_arg, norm_arg, weight, out, residual_out, rows, cols, width, eps,
        *x.stride(), *residual_arg.stride(), norm_arg.stride(0), *weight.stride(), *out.stride(),
        *residual_out.stride(),
        HAS_RESIDUAL=residual is not None, BLOCK_M=block_m, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        PRECISION=dot_precision(x.dtype), num_warps=cfg["num_warps"], **flags)


@torch.library.custom_op("omni_rt_triton::add_rms_norm_linear", mutates_args=())
def _add_rms_norm_linear_op(x: torch.Tensor, residual: Optional[torch.Tensor], norm_weight: torch.Tensor, eps: float,
                            weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: (M, K), any strides; norm_weight: (K,); weight: (N, K). Returns new (out (M, N),
    new_residual (M, K))."""
    out = x.new_empty(x.shape[0], weight.shape[0])
    new_residual = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(_add_rms_norm_linear_kernel, "add_rms_norm_linear", x, residual, norm_weight, eps, weight, out,
            new_residual)
    return out, new_residual


@_add_rms_norm_linear_op.register_fake
def _(x, residual, norm_weight, eps, weight):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape)


@torch.library.custom_op("omni_rt_triton::add_rms_norm_swiglu", mutates_args=())
def _add_rms_norm_swiglu_op(x: torch.Tensor, residual: Optional[torch.Tensor], norm_weight: torch.Tensor, eps: float,
                            gate_up_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: (M, K), any strides; norm_weight: (K,); gate_up_weight: (2N, K). Returns new (out (M, N),
    new_residual (M, K))."""
    out = x.new_empty(x.shape[0], gate_up_weight.shape[0] // 2)
    new_residual = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(_swiglu_kernel, "add_rms_norm_swiglu", x, residual, norm_weight, eps, gate_up_weight, out, new_residual,
            NORM=True)
    return out, new_residual


@_add_rms_norm_swiglu_op.register_fake
def _(x, residual, norm_weight, eps, gate_up_weight):
    return x.new_empty(x.shape[0], gate_up_weight.shape[0] // 2), x.new_empty(x.shape)


@torch.library.custom_op("omni_rt_triton::linear_swiglu", mutates_args=())
def _linear_swiglu_op(x: torch.Tensor, gate_up_weight: torch.Tensor) -> torch.Tensor:
    """x: (M, K), any strides; gate_up_weight: (2N, K). Returns a new out (M, N)."""
    out = x.new_empty(x.shape[0], gate_up_weight.shape[0] // 2)
    _launch(_swiglu_kernel, "linear_swiglu", x, None, None, 0.0, gate_up_weight, out, None, NORM=False)
    return out


@_linear_swiglu_op.register_fake
def _(x, gate_up_weight):
    return x.new_empty(x.shape[0], gate_up_weight.shape[0] // 2)


@torch.library.custom_op("omni_rt_triton::linear_gated_add", mutates_args=())
def _linear_gated_add_op(act: torch.Tensor, down_weight: torch.Tensor, x: torch.Tensor, gate_weight: torch.Tensor,
                         y: torch.Tensor) -> torch.Tensor:
    """act: (M, K); down_weight: (N, K); x: (M, G); gate_weight: (1, G); y: (M, N); any strides. Returns a new
    out (M, N)."""
    rows, width = act.shape
    cols = down_weight.shape[0]
    out = y.new_empty(rows, cols)
    if norm_linear_plan(rows, cols, "linear_gated_add"):
        block_m, cfg = _block_m_and_config("linear_gated_add", rows, cols, width, act.dtype)
        _linear_gated_add_kernel[(triton.cdiv(rows, block_m), triton.cdiv(cols, cfg["BLOCK_N"]))](
            act, down_weight, x, gate_weight, y, out, rows, cols, width, x.shape[1],
            *act.stride(), *down_weight.stride(), *x.stride(), gate_weight.stride(1), *y.stride(), *out.stride(),
            BLOCK_M=block_m, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], PRECISION=dot_precision(act.dtype),
            num_warps=cfg["num_warps"])
    return out


@_linear_gated_add_op.register_fake
def _(act, down_weight, x, gate_weight, y):
    return y.new_empty(act.shape[0], down_weight.shape[0])


def _check(name: str, x, residual, norm_weight, weight) -> None:
    width = x.shape[-1]
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"{name}: residual {tuple(residual.shape)} {residual.dtype} must match x "
                         f"{tuple(x.shape)} {x.dtype}")
    if norm_weight.shape != (width,) or weight.dim() != 2 or weight.shape[1] != width:
        raise ValueError(f"{name}: norm_weight {tuple(norm_weight.shape)} must be ({width},) and weight "
                         f"{tuple(weight.shape)} (N, {width})")
    if not x.dtype == norm_weight.dtype == weight.dtype:  # the twin's F.linear needs one dtype as well
        raise ValueError(f"{name}: x {x.dtype}, norm_weight {norm_weight.dtype} and weight {weight.dtype} must "
                         f"share the dtype")


def add_rms_norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                        weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """kernels.norm.add_rms_norm_linear_ref: x, residual (..., K) (residual None: x alone), norm_weight (K,),
    weight (N, K), one dtype -> new (out (..., N), new_residual (..., K))."""
    _check("add_rms_norm_linear", x, residual, norm_weight, weight)
    width, lead = x.shape[-1], x.shape[:-1]
    out, new_residual = torch.ops.omni_rt_triton.add_rms_norm_linear(
        x.reshape(-1, width), None if residual is None else residual.reshape(-1, width), norm_weight, float(eps),
        weight)
    return out.view(*lead, weight.shape[0]), new_residual.view(x.shape)


def add_rms_norm_swiglu(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                        gate_up_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """kernels.norm.add_rms_norm_swiglu_ref: x, residual (..., K) (residual None: x alone), norm_weight (K,),
    gate_up_weight (2I, K) gate rows then up rows, one dtype -> new (silu(gate)·up (..., I), new_residual (..., K))."""
    _check("add_rms_norm_swiglu", x, residual, norm_weight, gate_up_weight)
    if gate_up_weight.shape[0] % 2:
        raise ValueError(f"add_rms_norm_swiglu: gate_up_weight {tuple(gate_up_weight.shape)} must hold 2I rows")
    width, lead = x.shape[-1], x.shape[:-1]
    out, new_residual = torch.ops.omni_rt_triton.add_rms_norm_swiglu(
        x.reshape(-1, width), None if residual is None else residual.reshape(-1, width), norm_weight, float(eps),
        gate_up_weight)
    return out.view(*lead, gate_up_weight.shape[0] // 2), new_residual.view(x.shape)


def linear_swiglu(x: torch.Tensor, gate_up_weight: torch.Tensor) -> torch.Tensor:
    """kernels.mlp.linear_swiglu_ref: x (..., K), gate_up_weight (2I, K) gate rows then up rows, one dtype ->
    new silu(gate)·up (..., I)."""
    width, lead = x.shape[-1], x.shape[:-1]
    if gate_up_weight.dim() != 2 or gate_up_weight.shape[1] != width or gate_up_weight.shape[0] % 2:
        raise ValueError(f"linear_swiglu: gate_up_weight {tuple(gate_up_weight.shape)} must be (2I, {width})")
    if x.dtype != gate_up_weight.dtype:
        raise ValueError(f"linear_swiglu: x {x.dtype} and gate_up_weight {gate_up_weight.dtype} must share the dtype")
    out = torch.ops.omni_rt_triton.linear_swiglu(x.reshape(-1, width), gate_up_weight)
    return out.view(*lead, gate_up_weight.shape[0] // 2)


def linear_gated_add(act: torch.Tensor, down_weight: torch.Tensor, x: torch.Tensor, gate_weight: torch.Tensor,
                     y: torch.Tensor) -> torch.Tensor:
    """kernels.mlp.linear_gated_add_ref: act (..., I), down_weight (H, I), x (..., G), gate_weight (1, G),
    y (..., H), one dtype -> new y + sigmoid(x·gate_weight) * (act @ down_weight^T) (..., H)."""
    width, lead = act.shape[-1], act.shape[:-1]
    if (down_weight.dim() != 2 or down_weight.shape[1] != width or x.shape[:-1] != lead
            or gate_weight.shape != (1, x.shape[-1]) or y.shape != (*lead, down_weight.shape[0])):
        raise ValueError(f"linear_gated_add: act {tuple(act.shape)}, down_weight {tuple(down_weight.shape)}, x "
                         f"{tuple(x.shape)}, gate_weight {tuple(gate_weight.shape)}, y {tuple(y.shape)} must be "
                         f"(..., I), (H, I), (..., G), (1, G), (..., H)")
    if not act.dtype == down_weight.dtype == x.dtype == gate_weight.dtype == y.dtype:
        raise ValueError("linear_gated_add: act, down_weight, x, gate_weight and y must share the dtype")
    out = torch.ops.omni_rt_triton.linear_gated_add(act.reshape(-1, width), down_weight, x.reshape(-1, x.shape[-1]),
                                                    gate_weight, y.reshape(-1, y.shape[-1]))
    return out.view(y.shape)


# runtime/dispatch.py registers these as the `triton` backend (dispatch op name -> public function).
TRITON_OPS = {
    "add_rms_norm_linear": add_rms_norm_linear,
    "add_rms_norm_swiglu": add_rms_norm_swiglu,
    "linear_swiglu": linear_swiglu,
    "linear_gated_add": linear_gated_add,
}
