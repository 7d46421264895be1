"""The Triton kernels of kernels/triton_conv.py (its wrappers size the grids and launch them).

Legend (kernels): B = rows, C_IN / C_OUT = channels, CIN_G / COUT_G = channels per group, L = input samples
of this call, K = taps, DIL = dilation, S = conv state length (K−1)·DIL; transposed: STRIDE = s, KSIZE = k,
TRIM = k − s, p = untrimmed output position local to the call, p = q·s + r (r the phase), NT = ⌈k/s⌉.

Kernels
- `conv1d_dot_kernel`: dense and grouped convs. A program owns a [BLOCK_CO, BLOCK_T] output tile of one
  group, its columns (row, t) pairs of all rows, and reduces over (C_in/groups × K) with tl.dot tiles
  [BLOCK_CO, BLOCK_CI] × [BLOCK_CI, BLOCK_T]; the input window is (state ‖ x), read from the two tensors (the
  full op has no state: the left zero pad). Folding the rows into the columns means a streaming step (a few
  samples per row) reads each weight tile once for the whole batch.
- `conv1d_depthwise_kernel`: groups = C_in = C_out (the ConvNeXt conv): one K-tap filter per channel, FMAs.
- `conv_state_kernel`: conv state ← last S samples of (old state ‖ x), in place.
- `conv_transpose_kernel`: for a fixed phase r, output q·s + r = Σ_i Σ_ci w[ci, :, r + i·s]·x[ci, q − i], a
  plain causal conv over x with taps r + i·s; so each program owns one phase and a [BLOCK_CO, BLOCK_Q] tile
  (columns (row, q) pairs) and reduces over (C_in × NT) with tl.dot. The same kernel writes the final samples
  (+ old tail, + bias) or, in a second launch, the new overlap-add tail.

In-place state updates: every state element is read and written by the same program, with a barrier between
loads and stores. Padded rows (slot id −1) mask all their loads, write zero outputs and store no state.
"""

import triton
import triton.language as tl


@triton.jit
def conv1d_dot_kernel(
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
def conv1d_depthwise_kernel(
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
def conv_state_kernel(
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
def conv_transpose_kernel(
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
