"""Triton causal 1-D convolutions for Code2Wav (MODEL_SPEC §10): the `triton` backend of the four conv ops of
kernels/conv.py, with the same signatures, semantics and streaming-state contracts (read its docstring).
The kernels live in kernels/triton_conv_kernels.py (legend and tiling there); this module sizes their grids
and wraps each op as a `torch.library` op (`omni_rt_triton::<op>`, a fake implementation for FakeTensorMode and
torch.compile); the public functions keep the reference signatures.

Streaming ops launch twice: outputs first (they read the old state), then the state update. In the second
launch every state element is read and written by the same program (its whole state rows; for the tail,
p and p − L·s share the phase), with a barrier between loads and stores, so updating in place is race-free.
Padded rows (slot id −1) mask all their loads, write zero outputs and store no state. No host syncs, no
allocation besides the returned output: the update ops can be captured in a CUDA graph. Which kernels one call
launches: kernels/launch_counts.py (the wrappers branch on the same plans).
Accumulation is fp32; fp32 dots use IEEE precision (no TF32), so fp32 results match the references to ~1e-7.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch
import triton

from kernels.launch_counts import causal_conv1d_plan, causal_conv_transpose1d_plan, transpose_output_range
from kernels.triton_conv_kernels import (conv1d_depthwise_kernel, conv1d_dot_kernel, conv_state_kernel,
                                         conv_transpose_kernel)
from kernels.tuning import launch_config

# The CPU interpreter pays mostly per program and per op, little per element: its default time tiles are long
# (tests stay fast). GPU defaults are 64; tuned entries (kernels/tuned/) override either.
_MAX_TIME_BLOCK = 1024 if os.environ.get("TRITON_INTERPRET") == "1" else 64

# Launch parameters: kernels.tuning.launch_config per op call, keyed "B=..,C_in=..,C_out=..,K|k=..,..,L=..";
# bench/tune.py sweeps them from the defaults by name (BLOCK_*, num_warps, num_stages).


# ------------------------------------------------------------------------------------------ launch helpers


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, n))))


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # only fp32 operands read it: no TF32 rounding


@lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _fill_sms(block: int, size: int, other_programs: int, device: torch.device) -> int:
    """Halve a default channel tile (down to 16) until the grid has a program per SM: a streaming step has few
    columns, and its weight-bound conv wants every SM streaming weights. Tuned entries override this."""
    if device.type != "cuda":
        return block
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    while block > 16 and other_programs * triton.cdiv(size, block) < sms:
        block //= 2
    return block


def _launch_opts(cfg: dict) -> dict:
    return {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}


def _conv1d_config(op: str, x: torch.Tensor, weight: torch.Tensor, dilation: int, groups: int) -> dict:
    """One launch_config lookup per op call; BLOCK_CS is the state kernel's channel block (update op only)."""
    batch, c_in, length = x.shape
    c_out, cin_g, taps = weight.shape
    key = f"B={batch},C_in={c_in},C_out={c_out},K={taps},d={dilation},g={groups},L={length}"
    if groups == c_in == c_out:  # depthwise kernel
        default = {"BLOCK_C": _pow2(c_in, 16, 64), "BLOCK_T": _pow2(length, 16, _MAX_TIME_BLOCK),
                   "num_warps": 4, "num_stages": 1}
    else:
        block_t = _pow2(batch * length, 16, _MAX_TIME_BLOCK)
        block_co = _fill_sms(_pow2(c_out // groups, 16, 64), c_out // groups,
                             groups * triton.cdiv(batch * length, block_t), x.device)
        default = {"BLOCK_CO": block_co, "BLOCK_CI": _pow2(cin_g, 16, 32), "BLOCK_T": block_t,
                   "num_warps": 4, "num_stages": 2}
    if op == "causal_conv1d_update":
        default["BLOCK_CS"] = _pow2(c_in, 16, 32)
    return launch_config(op, key, x.dtype, default)


def _conv1d_launch(x, state, weight, bias, dilation, groups, slot_ids, cfg, plan) -> torch.Tensor:
    """Shared body of the full op (state None: the left zero pad) and the update (outputs only)."""
    batch, c_in, length = x.shape
    c_out, cin_g, taps = weight.shape
    out = torch.empty(batch, c_out, length, device=x.device, dtype=x.dtype)
    if not plan:
        return out
    state_len = (taps - 1) * dilation
    has_state = state is not None and state_len > 0
    s_t = state if has_state else x
    s_strides = state.stride() if has_state else (0, 0, 0)
    b_t, b_stride = (bias, bias.stride(0)) if bias is not None else (x, 0)
    slot_t, slot_stride = (slot_ids, slot_ids.stride(0)) if slot_ids is not None else (x, 0)
    if plan[0] == "conv1d_depthwise":  # groups = C_in = C_out
        grid = (triton.cdiv(length, cfg["BLOCK_T"]), triton.cdiv(c_in, cfg["BLOCK_C"]), batch)
        conv1d_depthwise_kernel[grid](
            x, weight, b_t, s_t, slot_t, out,
            length, c_in, dilation, state_len,
            *x.stride(), weight.stride(0), weight.stride(2), b_stride, *s_strides, slot_stride, *out.stride(),
            K=taps, HAS_BIAS=bias is not None, HAS_STATE=has_state, HAS_SLOTS=slot_ids is not None,
            BLOCK_C=cfg["BLOCK_C"], BLOCK_T=cfg["BLOCK_T"], **_launch_opts(cfg))
        return out
    cout_g = c_out // groups
    grid = (triton.cdiv(batch * length, cfg["BLOCK_T"]), groups * triton.cdiv(cout_g, cfg["BLOCK_CO"]))
    conv1d_dot_kernel[grid](
        x, weight, b_t, s_t, slot_t, out,
        batch, length, cin_g, cout_g, dilation, state_len,
        *x.stride(), *weight.stride(), b_stride, *s_strides, slot_stride, *out.stride(),
        K=taps, HAS_BIAS=bias is not None, HAS_STATE=has_state, HAS_SLOTS=slot_ids is not None,
        DOT_PRECISION=_dot_precision(x.dtype), BLOCK_CO=cfg["BLOCK_CO"], BLOCK_CI=cfg["BLOCK_CI"],
        BLOCK_T=cfg["BLOCK_T"], **_launch_opts(cfg))
    return out


def _check_groups(x: torch.Tensor, weight: torch.Tensor, groups: int) -> None:
    c_in, (c_out, cin_g, _) = x.shape[1], weight.shape
    if cin_g * groups != c_in or c_out % groups:
        raise ValueError(f"weight {tuple(weight.shape)} with groups={groups} does not fit {c_in} input channels")


def _transpose_launch(x, weight, bias, tail, slot_ids, dst, stride, p_begin, p_end, to_tail, cfg) -> None:
    batch, c_in, length = x.shape
    _, c_out, ksize = weight.shape
    q_lo, q_hi = p_begin // stride, triton.cdiv(p_end, stride)
    num_q = q_hi - q_lo
    if to_tail:  # one program per (row, phase, C_out block) owns the row's whole tail: see the kernel
        block_q = pitch = _pow2(num_q, 16, 1 << 30)
    else:
        block_q, pitch = cfg["BLOCK_Q"], num_q
    grid = (triton.cdiv(batch * pitch, block_q) * stride, triton.cdiv(c_out, cfg["BLOCK_CO"]))
    has_tail = tail is not None
    t_t, t_strides = (tail, tail.stride()) if has_tail else (x, (0, 0, 0))
    b_t, b_stride = (bias, bias.stride(0)) if bias is not None else (x, 0)
    slot_t, slot_stride = (slot_ids, slot_ids.stride(0)) if slot_ids is not None else (x, 0)
    conv_transpose_kernel[grid](
        x, weight, b_t, t_t, slot_t, dst,
        batch, length, c_in, c_out, ksize, stride, ksize - stride, p_begin, p_end, q_lo, num_q, pitch,
        *x.stride(), *weight.stride(), b_stride, *t_strides, slot_stride, *dst.stride(),
        NT=triton.cdiv(ksize, stride), I_START=1 if to_tail else 0, HAS_BIAS=bias is not None, HAS_TAIL=has_tail,
        HAS_SLOTS=slot_ids is not None, TO_TAIL=to_tail, DOT_PRECISION=_dot_precision(x.dtype),
        BLOCK_CO=cfg["BLOCK_CO"], BLOCK_CI=cfg["BLOCK_CI"], BLOCK_Q=block_q, **_launch_opts(cfg))


def _transpose_config(op: str, x: torch.Tensor, weight: torch.Tensor, stride: int) -> dict:
    batch, c_in, length = x.shape
    key = f"B={batch},C_in={c_in},C_out={weight.shape[1]},k={weight.shape[-1]},s={stride},L={length}"
    c_out = weight.shape[1]
    block_q = _pow2(batch * (length + 1), 16, _MAX_TIME_BLOCK)
    block_co = _fill_sms(_pow2(c_out, 16, 64), c_out, stride * triton.cdiv(batch * (length + 1), block_q), x.device)
    return launch_config(op, key, x.dtype, {"BLOCK_CO": block_co, "BLOCK_CI": _pow2(c_in, 16, 32), "BLOCK_Q": block_q,
                                            "num_warps": 4, "num_stages": 2})


def _check_stride(weight: torch.Tensor, stride: int) -> int:
    if weight.shape[-1] < stride:
        raise ValueError(f"causal transposed conv needs kernel_size >= stride, got {weight.shape[-1]} < {stride}")
    return weight.shape[-1] - stride


# ----------------------------------------------------------------------------------------------- conv1d


def _conv1d_plan(x: torch.Tensor, weight: torch.Tensor, dilation: int, groups: int, update: bool) -> tuple[str, ...]:
    batch, c_in, length = x.shape
    return causal_conv1d_plan(batch, c_in, weight.shape[0], length, groups, (weight.shape[-1] - 1) * dilation, update)


@torch.library.custom_op("omni_rt_triton::causal_conv1d", mutates_args=())
def _causal_conv1d_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dilation: int,
                      groups: int) -> torch.Tensor:
    cfg = _conv1d_config("causal_conv1d", x, weight, dilation, groups)
    plan = _conv1d_plan(x, weight, dilation, groups, update=False)
    return _conv1d_launch(x, None, weight, bias, dilation, groups, None, cfg, plan)


@_causal_conv1d_op.register_fake
def _(x, weight, bias, dilation, groups):
    return x.new_empty(x.shape[0], weight.shape[0], x.shape[2])


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dilation: int = 1,
                  groups: int = 1) -> torch.Tensor:
    """x: (B, C_in, L), any strides; weight: (C_out, C_in/groups, K); bias: (C_out,) or None.
    Returns (B, C_out, L), a new tensor in x's dtype (fp32 accumulation).

    `kernels.conv.causal_conv1d_ref`: output t sees inputs t − (K−1)·d … t in steps of d, zeros before 0.
    """
    _check_groups(x, weight, groups)
    return torch.ops.omni_rt_triton.causal_conv1d(x, weight, bias, int(dilation), int(groups))


@torch.library.custom_op("omni_rt_triton::causal_conv1d_update", mutates_args=("conv_state",))
def _causal_conv1d_update_op(x_chunk: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                             bias: torch.Tensor | None, dilation: int, groups: int,
                             slot_ids: torch.Tensor | None) -> torch.Tensor:
    batch, c_in, length = x_chunk.shape
    state_len = (weight.shape[-1] - 1) * dilation
    cfg = _conv1d_config("causal_conv1d_update", x_chunk, weight, dilation, groups)
    plan = _conv1d_plan(x_chunk, weight, dilation, groups, update=True)
    out = _conv1d_launch(x_chunk, conv_state, weight, bias, dilation, groups, slot_ids, cfg, plan)
    if "conv_state" in plan:
        block_c = cfg["BLOCK_CS"]
        slot_t, slot_stride = (slot_ids, slot_ids.stride(0)) if slot_ids is not None else (x_chunk, 0)
        conv_state_kernel[(triton.cdiv(c_in, block_c), batch)](
            x_chunk, conv_state, slot_t,
            length, c_in, state_len,
            *x_chunk.stride(), *conv_state.stride(), slot_stride,
            HAS_SLOTS=slot_ids is not None, BLOCK_C=block_c, BLOCK_S=_pow2(state_len, 1, 1 << 30))
    return out


@_causal_conv1d_update_op.register_fake
def _(x_chunk, conv_state, weight, bias, dilation, groups, slot_ids):
    return x_chunk.new_empty(x_chunk.shape[0], weight.shape[0], x_chunk.shape[2])


def causal_conv1d_update(x_chunk: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor | None, dilation: int = 1, groups: int = 1,
                         slot_ids: torch.Tensor | None = None) -> torch.Tensor:
    """x_chunk: (B, C_in, L), the next L samples of each row's stream (L may be 0).
    conv_state: (B, C_in, S) when slot_ids is None, else a pool (num_slots, C_in, S); S = (K−1)·d; x's dtype;
      updated in place (the kernels write it) to the last S samples of (old state ‖ x_chunk).
    weight: (C_out, C_in/groups, K); bias: (C_out,) or None.
    slot_ids: (B,) int32/int64 or None: each row's state row; −1 = padded row (zero output, state untouched).
    Returns (B, C_out, L) in x's dtype: `kernels.conv.causal_conv1d_update_ref`'s samples. No host sync.
    """
    state_len = (weight.shape[-1] - 1) * dilation
    if conv_state.shape[-1] != state_len:
        raise ValueError(f"conv_state holds {conv_state.shape[-1]} samples, kernel {weight.shape[-1]} with "
                         f"dilation {dilation} needs (K-1)*d = {state_len}")
    _check_groups(x_chunk, weight, groups)
    return torch.ops.omni_rt_triton.causal_conv1d_update(x_chunk, conv_state, weight, bias, int(dilation),
                                                         int(groups), slot_ids)


# ------------------------------------------------------------------------------------- transposed conv1d


@torch.library.custom_op("omni_rt_triton::causal_conv_transpose1d", mutates_args=())
def _causal_conv_transpose1d_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                stride: int) -> torch.Tensor:
    batch, _, length = x.shape
    trim = weight.shape[-1] - stride
    p_begin, p_end = transpose_output_range(length, stride, trim, None)
    out = torch.empty(batch, weight.shape[1], p_end - p_begin, device=x.device, dtype=x.dtype)
    if causal_conv_transpose1d_plan(batch, weight.shape[1], length, p_end - p_begin, trim, update=False):
        cfg = _transpose_config("causal_conv_transpose1d", x, weight, stride)
        _transpose_launch(x, weight, bias, None, None, out, stride, p_begin, p_end, False, cfg)
    return out


@_causal_conv_transpose1d_op.register_fake
def _(x, weight, bias, stride):
    p_begin, p_end = transpose_output_range(x.shape[2], stride, weight.shape[-1] - stride, None)
    return x.new_empty(x.shape[0], weight.shape[1], p_end - p_begin)


def causal_conv_transpose1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            stride: int) -> torch.Tensor:
    """x: (B, C_in, L), any strides; weight: (C_in, C_out, k) with k >= stride; bias: (C_out,) or None.
    Returns (B, C_out, max(0, L·s − (k−s))), a new tensor in x's dtype (fp32 accumulation).

    `kernels.conv.causal_conv_transpose1d_ref`: the full transposed conv trimmed k−s samples on both sides.
    """
    _check_stride(weight, stride)
    return torch.ops.omni_rt_triton.causal_conv_transpose1d(x, weight, bias, int(stride))


@torch.library.custom_op("omni_rt_triton::causal_conv_transpose1d_update", mutates_args=("tail_state",))
def _causal_conv_transpose1d_update_op(x_chunk: torch.Tensor, tail_state: torch.Tensor, weight: torch.Tensor,
                                       bias: torch.Tensor | None, stride: int, start: int,
                                       slot_ids: torch.Tensor | None) -> torch.Tensor:
    batch, _, length = x_chunk.shape
    trim = weight.shape[-1] - stride
    p_begin, p_end = transpose_output_range(length, stride, trim, start)
    out = torch.empty(batch, weight.shape[1], p_end - p_begin, device=x_chunk.device, dtype=x_chunk.dtype)
    plan = causal_conv_transpose1d_plan(batch, weight.shape[1], length, p_end - p_begin, trim, update=True)
    if not plan:
        return out
    cfg = _transpose_config("causal_conv_transpose1d_update", x_chunk, weight, stride)
    if "conv_transpose_out" in plan:
        _transpose_launch(x_chunk, weight, bias, tail_state if trim else None, slot_ids, out, stride,
                          p_begin, p_end, False, cfg)
    if "conv_transpose_tail" in plan:  # new tail = this chunk's sums at [L·s, L·s + k − s) (+ old tail beyond L·s)
        _transpose_launch(x_chunk, weight, None, tail_state, slot_ids, tail_state, stride, p_end, p_end + trim,
                          True, cfg)
    return out


@_causal_conv_transpose1d_update_op.register_fake
def _(x_chunk, tail_state, weight, bias, stride, start, slot_ids):
    p_begin, p_end = transpose_output_range(x_chunk.shape[2], stride, weight.shape[-1] - stride, start)
    return x_chunk.new_empty(x_chunk.shape[0], weight.shape[1], p_end - p_begin)


def causal_conv_transpose1d_update(x_chunk: torch.Tensor, tail_state: torch.Tensor, weight: torch.Tensor,
                                   bias: torch.Tensor | None, stride: int, start: int,
                                   slot_ids: torch.Tensor | None = None) -> torch.Tensor:
    """x_chunk: (B, C_in, L), the next L input samples of each row's stream (L may be 0).
    tail_state: (B, C_out, k−s) when slot_ids is None, else a pool (num_slots, C_out, k−s); x's dtype;
      updated in place (the kernels write it): the overlap-add partial sums (no bias) of the k−s untrimmed
      positions not final yet.
    weight: (C_in, C_out, k) with k >= s; bias: (C_out,) or None; stride: s.
    start: input samples the stream consumed before x_chunk (a host int shared by all rows).
    slot_ids: (B,) int32/int64 or None: each row's tail row; −1 = padded row (zero output, tail untouched).
    Returns (B, C_out, max(0, (start+L)·s − (k−s)) − max(0, start·s − (k−s))) in x's dtype:
    `kernels.conv.causal_conv_transpose1d_update_ref`'s samples. No host sync.
    """
    trim = _check_stride(weight, stride)
    if tail_state.shape[-1] != trim:
        raise ValueError(f"tail_state holds {tail_state.shape[-1]} samples, kernel {weight.shape[-1]} with "
                         f"stride {stride} needs k-s = {trim}")
    return torch.ops.omni_rt_triton.causal_conv_transpose1d_update(x_chunk, tail_state, weight, bias, int(stride),
                                                                   int(start), slot_ids)


# runtime/dispatch.py registers these as the `triton` backend (dispatch op name -> public function).
TRITON_OPS = {
    "causal_conv1d": causal_conv1d,
    "causal_conv1d_update": causal_conv1d_update,
    "causal_conv_transpose1d": causal_conv_transpose1d,
    "causal_conv_transpose1d_update": causal_conv_transpose1d_update,
}
