"""Triton causal 1-D convolutions for Code2Wav (MODEL_SPEC §10): the `triton` backend of the four conv ops of
kernels/conv.py, with the same signatures, semantics and streaming-state contracts (read its docstring).

Legend (kernels): B = rows, C_IN / C_OUT = channels, CIN_G / COUT_G = channels per group, L = input samples
of this call, K = taps, DIL = dilation, S = conv state length (K−1)·DIL; transposed: STRIDE = s, KSIZE = k,
TRIM = k − s, p = untrimmed output position local to the call, p = q·s + r (r the phase), NT = ⌈k/s⌉.

Kernels
- `_conv1d_dot_kernel`: dense and grouped convs. A program owns a [BLOCK_CO, BLOCK_T] output tile of one
  group, its columns (row, t) pairs of all rows, and reduces over (C_in/groups × K) with tl.dot tiles
  [BLOCK_CO, BLOCK_CI] × [BLOCK_CI, BLOCK_T]; the input window is (state ‖ x), read from the two tensors (the
  full op has no state: the left zero pad). Folding the rows into the columns means a streaming step (a few
  samples per row) reads each weight tile once for the whole batch.
- `_conv1d_depthwise_kernel`: groups = C_in = C_out (the ConvNeXt conv): one K-tap filter per channel, FMAs.
- `_conv_state_kernel`: conv state ← last S samples of (old state ‖ x), in place.
- `_conv_transpose_kernel`: for a fixed phase r, output q·s + r = Σ_i Σ_ci w[ci, :, r + i·s]·x[ci, q − i], a
  plain causal conv over x with taps r + i·s; so each program owns one phase and a [BLOCK_CO, BLOCK_Q] tile
  (columns (row, q) pairs) and reduces over (C_in × NT) with tl.dot. The same kernel writes the final samples
  (+ old tail, + bias) or, in a second launch, the new overlap-add tail.

Streaming ops launch twice: outputs first (they read the old state), then the state update. In the second
launch every state element is read and written by the same program (its whole state rows; for the tail,
p and p − L·s share the phase), with a barrier between loads and stores, so updating in place is race-free.
Padded rows (slot id −1) mask all their loads, write zero outputs and store no state. No host syncs, no
allocation besides the returned output: the update ops can be captured in a CUDA graph.
Accumulation is fp32; fp32 dots use IEEE precision (no TF32), so fp32 results match the references to ~1e-7.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch
import triton
import triton.language as tl

from kernels.tuning import launch_config
from runtime import dispatch

# The CPU interpreter pays mostly per program and per op, little per element: its default time tiles are long
# (tests stay fast). GPU defaults are 64; tuned entries (kernels/tuned/) override either.
_MAX_TIME_BLOCK = 1024 if os.environ.get("TRITON_INTERPRET") == "1" else 64

# Launch parameters: kernels.tuning.launch_config per op call, keyed "B=..,C_in=..,C_out=..,K|k=..,..,L=..";
# bench/tune.py sweeps them from the defaults by name (BLOCK_*, num_warps, num_stages).


# ---------------------------------------------------------------------------------------------- kernels


@triton.jit
def _conv1d_dot_kernel(
    x_ptr, w_ptr, bias_ptr, state_ptr, slot_ptr, out_ptr,
    B, L, CIN_G, COUT_G, DIL, S,
    stride_xb, stride_xc, stride_xt,
    stride_wo, stride_wi, stride_wk,
    stride_bias,
    stride_sb, stride_sc, stride_st,
    stride_slot,
    stride_ob, stride_oc, stride_ot,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, HAS_SLOTS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Columns are (row, t) pairs, n = row·L + t: a streaming step's few samples of all rows share one tile,
    so each weight tile is read once per step, not once per row."""
    pid_t = tl.program_id(0)  # column block
    pid_n = tl.program_id(1)  # group × C_out block within the group
    co_blocks = tl.cdiv(COUT_G, BLOCK_CO)
    group = pid_n // co_blocks
    # int64 offsets: no overflow on long full decodes (and the interpreter skips its int32 overflow checks)
    offs_co_g = (pid_n % co_blocks) * BLOCK_CO + tl.arange(0, BLOCK_CO).to(tl.int64)
    mask_co = offs_co_g < COUT_G
    offs_co = group * COUT_G + offs_co_g
    offs_n = pid_t * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)  # [BLOCK_T] columns
    mask_n = offs_n < B * L
    row = offs_n // L
    offs_t = offs_n % L
    if HAS_SLOTS:
        slot = tl.load(slot_ptr + row * stride_slot, mask=mask_n, other=-1).to(tl.int64)
    else:
        slot = row
    live = mask_n & (slot >= 0)  # padded rows (slot −1) read nothing and write zeros
    offs_ci = tl.arange(0, BLOCK_CI).to(tl.int64)  # within the group, from ci0
    w_tile = w_ptr + offs_co[:, None] * stride_wo + offs_ci[None, :] * stride_wi  # [BLOCK_CO, BLOCK_CI]
    x_chan = (group * CIN_G + offs_ci)[:, None]
    x_tile = x_ptr + x_chan * stride_xc + (row * stride_xb + offs_t * stride_xt)[None, :]  # [BLOCK_CI, BLOCK_T]
    s_tile = state_ptr + x_chan * stride_sc + (tl.maximum(slot, 0) * stride_sb + (offs_t + S) * stride_st)[None, :]
    acc = tl.zeros((BLOCK_CO, BLOCK_T), dtype=tl.float32)
    for ci0 in range(0, CIN_G, BLOCK_CI):
        mask_ci = offs_ci < CIN_G - ci0
        mask_w = mask_co[:, None] & mask_ci[None, :]
        for k in range(K):
            shift = (K - 1 - k) * DIL  # output t reads input t − shift; < 0 lies in the state / the zero pad
            w = tl.load(w_tile + (ci0 * stride_wi + k * stride_wk), mask=mask_w, other=0.0)
            in_x = (offs_t >= shift) & live
            xt = tl.load(x_tile + (ci0 * stride_xc - shift * stride_xt), mask=mask_ci[:, None] & in_x[None, :],
                         other=0.0)
            if HAS_STATE:
                in_s = (offs_t < shift) & live
                xs = tl.load(s_tile + (ci0 * stride_sc - shift * stride_st), mask=mask_ci[:, None] & in_s[None, :],
                             other=0.0)
                xt = tl.where(in_s[None, :], xs, xt)
            acc = tl.dot(w.to(xt.dtype), xt, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_co * stride_bias, mask=mask_co, other=0.0).to(tl.float32)[:, None]
    acc = tl.where(live[None, :], acc, 0.0)
    tl.store(out_ptr + offs_co[:, None] * stride_oc + (row * stride_ob + offs_t * stride_ot)[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mask_co[:, None] & mask_n[None, :])


@triton.jit
def _conv1d_depthwise_kernel(
    x_ptr, w_ptr, bias_ptr, state_ptr, slot_ptr, out_ptr,
    L, C, DIL, S,
    stride_xb, stride_xc, stride_xt,
    stride_wc, stride_wk,
    stride_bias,
    stride_sb, stride_sc, stride_st,
    stride_slot,
    stride_ob, stride_oc, stride_ot,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, HAS_SLOTS: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    mask_c = offs_c < C
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    mask_t = offs_t < L
    if HAS_SLOTS:
        slot = tl.load(slot_ptr + b * stride_slot).to(tl.int64)
    else:
        slot = b
    valid = slot >= 0
    live_t = offs_t < tl.where(valid, L, 0)  # a padded row reads nothing
    x_tile = x_ptr + b * stride_xb + offs_c[:, None] * stride_xc + offs_t[None, :] * stride_xt  # [BLOCK_C, BLOCK_T]
    s_tile = (state_ptr + tl.maximum(slot, 0) * stride_sb + offs_c[:, None] * stride_sc
              + (offs_t + S)[None, :] * stride_st)
    acc = tl.zeros((BLOCK_C, BLOCK_T), dtype=tl.float32)
    for k in range(K):
        shift = (K - 1 - k) * DIL
        w = tl.load(w_ptr + offs_c * stride_wc + k * stride_wk, mask=mask_c, other=0.0).to(tl.float32)
        in_x = (offs_t >= shift) & live_t
        xt = tl.load(x_tile - shift * stride_xt, mask=mask_c[:, None] & in_x[None, :], other=0.0)
        if HAS_STATE:
            in_s = (offs_t < shift) & live_t
            xs = tl.load(s_tile - shift * stride_st, mask=mask_c[:, None] & in_s[None, :], other=0.0)
            xt = tl.where(in_s[None, :], xs, xt)
        acc += w[:, None] * xt.to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_c * stride_bias, mask=mask_c, other=0.0).to(tl.float32)[:, None]
    acc = tl.where(valid, acc, 0.0)
    tl.store(out_ptr + b * stride_ob + offs_c[:, None] * stride_oc + offs_t[None, :] * stride_ot,
             acc.to(out_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_t[None, :])


@triton.jit
def _conv_state_kernel(
    x_ptr, state_ptr, slot_ptr,
    L, C, S,
    stride_xb, stride_xc, stride_xt,
    stride_sb, stride_sc, stride_st,
    stride_slot,
    HAS_SLOTS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid_c = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    if HAS_SLOTS:
        slot = tl.load(slot_ptr + b * stride_slot).to(tl.int64)
    else:
        slot = b
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    offs_j = tl.arange(0, BLOCK_S).to(tl.int64)
    mask = (offs_c < C)[:, None] & (offs_j < tl.where(slot >= 0, S, 0))[None, :]  # [BLOCK_C, BLOCK_S]; none if padded
    src = offs_j + L  # position in (old state ‖ x) of new state sample j
    from_state = (src < S)[None, :]
    s_tile = state_ptr + tl.maximum(slot, 0) * stride_sb + offs_c[:, None] * stride_sc
    old = tl.load(s_tile + src[None, :] * stride_st, mask=mask & from_state, other=0.0)
    new = tl.load(x_ptr + b * stride_xb + offs_c[:, None] * stride_xc + (src - S)[None, :] * stride_xt,
                  mask=mask & ~from_state, other=0.0)
    vals = tl.where(from_state, old, new.to(old.dtype))
    tl.debug_barrier()  # every old sample of these rows is read before any is overwritten
    tl.store(s_tile + offs_j[None, :] * stride_st, vals, mask=mask)


@triton.jit
def _conv_transpose_kernel(
    x_ptr, w_ptr, bias_ptr, tail_ptr, slot_ptr, dst_ptr,
    B, L, C_IN, C_OUT, KSIZE, STRIDE, TRIM, P_BEGIN, P_END, Q_LO, NQ, Q_PITCH,
    stride_xb, stride_xc, stride_xt,
    stride_wi, stride_wo, stride_wk,
    stride_bias,
    stride_tb, stride_tc, stride_tt,
    stride_slot,
    stride_db, stride_dc, stride_dt,
    NT: tl.constexpr, I_START: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_TAIL: tl.constexpr,
    HAS_SLOTS: tl.constexpr, TO_TAIL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    """Writes dst[row, co, p − P_BEGIN] for untrimmed local positions p in [P_BEGIN, P_END): the chunk's own
    overlap-add sum, plus the old tail where p < TRIM (HAS_TAIL), plus bias (HAS_BIAS). dst is the output
    (dst row = batch row; padded rows get zeros) or, with TO_TAIL, the tail state itself (dst row = slot;
    padded rows are skipped; its q >= L see no input through tap i = 0, so I_START = 1).
    Columns are (row, q) pairs, n = row·Q_PITCH + (q − Q_LO), the first NQ of each row valid; the tail launch
    pads Q_PITCH to BLOCK_Q, so one program owns a row's whole tail (the in-place update needs that)."""
    pid_q = tl.program_id(0)  # column block × phase
    pid_co = tl.program_id(1)
    phase = pid_q % STRIDE
    offs_n = (pid_q // STRIDE) * BLOCK_Q + tl.arange(0, BLOCK_Q).to(tl.int64)
    row = offs_n // Q_PITCH
    offs_q = Q_LO + offs_n % Q_PITCH
    offs_p = offs_q * STRIDE + phase  # [BLOCK_Q]
    mask_p = (row < B) & (offs_q < Q_LO + NQ) & (offs_p >= P_BEGIN) & (offs_p < P_END)
    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO).to(tl.int64)
    mask_co = offs_co < C_OUT
    offs_ci = tl.arange(0, BLOCK_CI).to(tl.int64)  # from ci0
    if HAS_SLOTS:
        slot = tl.load(slot_ptr + row * stride_slot, mask=mask_p, other=-1).to(tl.int64)
    else:
        slot = row
    live = mask_p & (slot >= 0)  # padded rows read nothing
    slot = tl.maximum(slot, 0)
    # [BLOCK_CO, BLOCK_CI] weight tile of tap `phase`; [BLOCK_CI, BLOCK_Q] input tile
    w_tile = w_ptr + offs_ci[None, :] * stride_wi + offs_co[:, None] * stride_wo + phase * stride_wk
    x_tile = x_ptr + offs_ci[:, None] * stride_xc + (row * stride_xb + offs_q * stride_xt)[None, :]
    acc = tl.zeros((BLOCK_CO, BLOCK_Q), dtype=tl.float32)
    for ci0 in range(0, C_IN, BLOCK_CI):
        mask_ci = offs_ci < C_IN - ci0
        for i in range(I_START, NT):  # tap phase + i·s carries input q − i to output q·s + phase
            ci_end = tl.where(phase + i * STRIDE < KSIZE, C_IN - ci0, 0)  # taps past k add nothing
            w = tl.load(w_tile + (ci0 * stride_wi + i * STRIDE * stride_wk),
                        mask=mask_co[:, None] & (offs_ci < ci_end)[None, :], other=0.0)
            in_x = (offs_q >= i) & (offs_q < L + i) & live
            xt = tl.load(x_tile + (ci0 * stride_xc - i * stride_xt), mask=mask_ci[:, None] & in_x[None, :],
                         other=0.0)
            acc = tl.dot(w.to(xt.dtype), xt, acc, input_precision=DOT_PRECISION)
    if HAS_TAIL:
        acc += tl.load(tail_ptr + offs_co[:, None] * stride_tc + (slot * stride_tb + offs_p * stride_tt)[None, :],
                       mask=mask_co[:, None] & (live & (offs_p < TRIM))[None, :], other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_co * stride_bias, mask=mask_co, other=0.0).to(tl.float32)[:, None]
    if TO_TAIL:
        tl.debug_barrier()  # the old tail samples this program adds are read before it overwrites them
        tl.store(dst_ptr + offs_co[:, None] * stride_dc + (slot * stride_db + (offs_p - P_BEGIN) * stride_dt)[None, :],
                 acc.to(dst_ptr.dtype.element_ty), mask=mask_co[:, None] & live[None, :])
    else:
        acc = tl.where(live[None, :], acc, 0.0)
        tl.store(dst_ptr + offs_co[:, None] * stride_dc + (row * stride_db + (offs_p - P_BEGIN) * stride_dt)[None, :],
                 acc.to(dst_ptr.dtype.element_ty), mask=mask_co[:, None] & mask_p[None, :])


# --------------------------------------------------------------------------------------------- wrappers


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


def _conv1d_launch(x, state, weight, bias, dilation, groups, slot_ids, cfg) -> torch.Tensor:
    """Shared body of the full op (state None: the left zero pad) and the update (outputs only)."""
    batch, c_in, length = x.shape
    c_out, cin_g, taps = weight.shape
    out = torch.empty(batch, c_out, length, device=x.device, dtype=x.dtype)
    if length == 0 or batch == 0:
        return out
    state_len = (taps - 1) * dilation
    has_state = state is not None and state_len > 0
    s_t = state if has_state else x
    s_strides = state.stride() if has_state else (0, 0, 0)
    b_t, b_stride = (bias, bias.stride(0)) if bias is not None else (x, 0)
    slot_t, slot_stride = (slot_ids, slot_ids.stride(0)) if slot_ids is not None else (x, 0)
    if groups == c_in == c_out:  # depthwise
        grid = (triton.cdiv(length, cfg["BLOCK_T"]), triton.cdiv(c_in, cfg["BLOCK_C"]), batch)
        _conv1d_depthwise_kernel[grid](
            x, weight, b_t, s_t, slot_t, out,
            length, c_in, dilation, state_len,
            *x.stride(), weight.stride(0), weight.stride(2), b_stride, *s_strides, slot_stride, *out.stride(),
            K=taps, HAS_BIAS=bias is not None, HAS_STATE=has_state, HAS_SLOTS=slot_ids is not None,
            BLOCK_C=cfg["BLOCK_C"], BLOCK_T=cfg["BLOCK_T"], **_launch_opts(cfg))
        return out
    cout_g = c_out // groups
    grid = (triton.cdiv(batch * length, cfg["BLOCK_T"]), groups * triton.cdiv(cout_g, cfg["BLOCK_CO"]))
    _conv1d_dot_kernel[grid](
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


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dilation: int = 1,
                  groups: int = 1) -> torch.Tensor:
    """x: (B, C_in, L), any strides; weight: (C_out, C_in/groups, K); bias: (C_out,) or None.
    Returns (B, C_out, L), a new tensor in x's dtype (fp32 accumulation).

    `kernels.conv.causal_conv1d_ref`: output t sees inputs t − (K−1)·d … t in steps of d, zeros before 0.
    """
    _check_groups(x, weight, groups)
    cfg = _conv1d_config("causal_conv1d", x, weight, dilation, groups)
    return _conv1d_launch(x, None, weight, bias, dilation, groups, None, cfg)


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
    batch, c_in, length = x_chunk.shape
    state_len = (weight.shape[-1] - 1) * dilation
    if conv_state.shape[-1] != state_len:
        raise ValueError(f"conv_state holds {conv_state.shape[-1]} samples, kernel {weight.shape[-1]} with "
                         f"dilation {dilation} needs (K-1)*d = {state_len}")
    _check_groups(x_chunk, weight, groups)
    cfg = _conv1d_config("causal_conv1d_update", x_chunk, weight, dilation, groups)
    out = _conv1d_launch(x_chunk, conv_state, weight, bias, dilation, groups, slot_ids, cfg)
    if length == 0 or batch == 0 or state_len == 0:
        return out
    block_c = cfg["BLOCK_CS"]
    slot_t, slot_stride = (slot_ids, slot_ids.stride(0)) if slot_ids is not None else (x_chunk, 0)
    _conv_state_kernel[(triton.cdiv(c_in, block_c), batch)](
        x_chunk, conv_state, slot_t,
        length, c_in, state_len,
        *x_chunk.stride(), *conv_state.stride(), slot_stride,
        HAS_SLOTS=slot_ids is not None, BLOCK_C=block_c, BLOCK_S=_pow2(state_len, 1, 1 << 30))
    return out


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
    _conv_transpose_kernel[grid](
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


def causal_conv_transpose1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            stride: int) -> torch.Tensor:
    """x: (B, C_in, L), any strides; weight: (C_in, C_out, k) with k >= stride; bias: (C_out,) or None.
    Returns (B, C_out, max(0, L·s − (k−s))), a new tensor in x's dtype (fp32 accumulation).

    `kernels.conv.causal_conv_transpose1d_ref`: the full transposed conv trimmed k−s samples on both sides.
    """
    trim = _check_stride(weight, stride)
    batch, _, length = x.shape
    p_end = length * stride
    p_begin = min(trim, p_end)
    out = torch.empty(batch, weight.shape[1], p_end - p_begin, device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    cfg = _transpose_config("causal_conv_transpose1d", x, weight, stride)
    _transpose_launch(x, weight, bias, None, None, out, stride, p_begin, p_end, False, cfg)
    return out


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
    batch, _, length = x_chunk.shape
    p_end = length * stride
    p_begin = min(max(trim - start * stride, 0), p_end)  # the left trim still to drop
    out = torch.empty(batch, weight.shape[1], p_end - p_begin, device=x_chunk.device, dtype=x_chunk.dtype)
    if length == 0 or batch == 0:
        return out
    cfg = _transpose_config("causal_conv_transpose1d_update", x_chunk, weight, stride)
    has_tail = trim > 0
    if out.shape[-1]:
        _transpose_launch(x_chunk, weight, bias, tail_state if has_tail else None, slot_ids, out, stride,
                          p_begin, p_end, False, cfg)
    if has_tail:  # new tail = this chunk's sums at [L·s, L·s + k − s) (+ old tail beyond L·s when k − s > L·s)
        _transpose_launch(x_chunk, weight, None, tail_state, slot_ids, tail_state, stride, p_end, p_end + trim,
                          True, cfg)
    return out


dispatch.register("causal_conv1d", "triton", causal_conv1d)
dispatch.register("causal_conv1d_update", "triton", causal_conv1d_update)
dispatch.register("causal_conv_transpose1d", "triton", causal_conv_transpose1d)
dispatch.register("causal_conv_transpose1d_update", "triton", causal_conv_transpose1d_update)
