"""Causal 1-D convolutions for Code2Wav (MODEL_SPEC §10): the plain conv with a left zero pad, the
transposed conv trimmed k−s on both sides, and their streaming forms with explicit state.

Legend: B = rows in this call, C_in / C_out = channels, L = samples in this call, K = kernel taps,
d = dilation, s = stride, S = state length. These are the torch references (`<op>_ref`); faster
implementations register under the same op names in runtime/dispatch.py with the same signatures.

Streaming contracts (the samples of a stream fed in any chunking equal the full op's samples):
- causal_conv1d: the state is the last (K−1)·d input samples, zeros for a new stream (= the left pad).
  Every input sample gives one output sample at once: no latency.
- causal_conv_transpose1d: input sample j adds k output samples at untrimmed positions [j·s, j·s+k).
  After n inputs, untrimmed positions < n·s are final; the k−s positions after them still wait for
  input n (and later) and are carried as the overlap-add `tail_state`. The full op trims exactly those
  k−s samples on the right, so after n inputs the stream has emitted the whole full result for n inputs
  (n·s − (k−s) samples): no latency against the full op; the k−s held-back samples are the ones the right
  trim removes. The left trim (the first k−s untrimmed samples) is applied by the update op from `start`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dilation: int = 1,
                      groups: int = 1) -> torch.Tensor:
    """x: (B, C_in, L); weight: (C_out, C_in/groups, K); bias: (C_out,) or None.
    Returns (B, C_out, L), a new tensor in x's dtype.

    Output t sees inputs t − (K−1)·d … t in steps of d: the input is left-padded with (K−1)·d zeros and
    never right-padded (stride 1).
    """
    pad = (weight.shape[-1] - 1) * dilation
    return F.conv1d(F.pad(x, (pad, 0)), weight, bias, dilation=dilation, groups=groups)


def causal_conv1d_update_ref(x_chunk: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                             bias: torch.Tensor | None, dilation: int = 1, groups: int = 1,
                             slot_ids: torch.Tensor | None = None) -> torch.Tensor:
    """x_chunk: (B, C_in, L), the next L samples of each row's stream (L may be 0).
    conv_state: (B, C_in, S) when slot_ids is None, else a pool (num_slots, C_in, S); S = (K−1)·d; x's
      dtype; updated in place to the last S samples of (old state ‖ x_chunk). Zeros start a stream.
    weight: (C_out, C_in/groups, K); bias: (C_out,) or None.
    slot_ids: (B,) int64 or None: the state row of each batch row; −1 marks a padded row, whose output is
      zeros and whose state is left untouched. Valid ids must be distinct.
    Returns (B, C_out, L) in x's dtype: exactly the samples `causal_conv1d_ref` gives for these positions of
    the whole stream.
    """
    batch, _, length = x_chunk.shape
    state_len = (weight.shape[-1] - 1) * dilation
    if conv_state.shape[-1] != state_len:
        raise ValueError(f"conv_state holds {conv_state.shape[-1]} samples, kernel {weight.shape[-1]} with "
                         f"dilation {dilation} needs (K-1)*d = {state_len}")
    if slot_ids is None:
        past = conv_state  # (B, C_in, S)
    else:
        valid = slot_ids >= 0  # (B,)
        past = conv_state[slot_ids.clamp(min=0)]  # (B, C_in, S), a copy
    if length == 0:
        return x_chunk.new_zeros(batch, weight.shape[0], 0)
    window = torch.cat((past, x_chunk), dim=-1)  # (B, C_in, S + L)
    out = F.conv1d(window, weight, bias, dilation=dilation, groups=groups)  # (B, C_out, L)
    new_state = window[..., window.shape[-1] - state_len:]  # (B, C_in, S)
    if slot_ids is None:
        conv_state.copy_(new_state)
        return out
    # Reference only: boolean indexing syncs with the host; the kernels skip rows with id −1 instead.
    conv_state[slot_ids[valid]] = new_state[valid]
    return torch.where(valid[:, None, None], out, torch.zeros((), dtype=out.dtype, device=out.device))


def causal_conv_transpose1d_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                stride: int) -> torch.Tensor:
    """x: (B, C_in, L); weight: (C_in, C_out, k) with k >= stride; bias: (C_out,) or None.
    Returns (B, C_out, L·s − (k−s)) (empty when that is <= 0), a new tensor in x's dtype.

    The full transposed conv ((L−1)·s + k samples), then k−s samples trimmed from the left and from the
    right, as transformers' CausalTransConvNet does (MODEL_SPEC §10; k = 2s gives (L−1)·s).
    """
    trim = _transpose_trim(weight, stride)
    y = F.conv_transpose1d(x, weight, bias, stride=stride)  # (B, C_out, (L−1)·s + k)
    return y[..., trim:max(trim, y.shape[-1] - trim)]


def causal_conv_transpose1d_update_ref(x_chunk: torch.Tensor, tail_state: torch.Tensor, weight: torch.Tensor,
                                       bias: torch.Tensor | None, stride: int, start: int,
                                       slot_ids: torch.Tensor | None = None) -> torch.Tensor:
    """x_chunk: (B, C_in, L), the next L input samples of each row's stream (L may be 0).
    tail_state: (B, C_out, k−s) when slot_ids is None, else a pool (num_slots, C_out, k−s); x's dtype;
      updated in place. It holds the overlap-add partial sums (without bias) of the k−s untrimmed output
      positions that are not final yet. Zeros start a stream.
    weight: (C_in, C_out, k) with k >= s; bias: (C_out,) or None; stride: s.
    start: input samples this stream consumed before x_chunk (0 for its first chunk), shared by all rows;
      it decides how much of the k−s left trim is still to drop.
    slot_ids: (B,) int64 or None: the state row of each batch row; −1 marks a padded row, whose output is
      zeros and whose state is left untouched. Valid ids must be distinct.
    Returns (B, C_out, n_out), n_out = max(0, (start+L)·s − (k−s)) − max(0, start·s − (k−s)): every sample
    of `causal_conv_transpose1d_ref` over the whole stream that these L inputs made final, and no other.
    After the chunk the stream has emitted the full op's result for start+L inputs (no latency; the tail
    is what the full op trims on the right).
    """
    batch, _, length = x_chunk.shape
    trim = _transpose_trim(weight, stride)
    if tail_state.shape[-1] != trim:
        raise ValueError(f"tail_state holds {tail_state.shape[-1]} samples, kernel {weight.shape[-1]} with "
                         f"stride {stride} needs k-s = {trim}")
    new_final = length * stride
    drop = min(max(trim - start * stride, 0), new_final)  # left trim not yet applied
    if length == 0:
        return x_chunk.new_zeros(batch, weight.shape[1], 0)
    if slot_ids is None:
        tail = tail_state  # (B, C_out, k−s)
    else:
        valid = slot_ids >= 0
        tail = tail_state[slot_ids.clamp(min=0)]  # (B, C_out, k−s), a copy
    # Untrimmed positions [start·s, (start+L)·s + k − s) of the stream; the first k−s also got earlier inputs.
    y = F.conv_transpose1d(x_chunk, weight, None, stride=stride)  # (B, C_out, L·s + k − s)
    y[..., :trim] += tail
    final, new_tail = y[..., :new_final], y[..., new_final:]  # (B, C_out, L·s), (B, C_out, k−s)
    if bias is not None:
        final = final + bias[:, None]
    out = final[..., drop:]
    if slot_ids is None:
        tail_state.copy_(new_tail)
        return out
    # Reference only: boolean indexing syncs with the host; the kernels skip rows with id −1 instead.
    tail_state[slot_ids[valid]] = new_tail[valid]
    return torch.where(valid[:, None, None], out, torch.zeros((), dtype=out.dtype, device=out.device))


def transpose_output_length(num_inputs: int, kernel_size: int, stride: int) -> int:
    """Samples `causal_conv_transpose1d_ref` gives for `num_inputs` inputs: max(0, n·s − (k−s))."""
    return max(0, num_inputs * stride - (kernel_size - stride))


def _transpose_trim(weight: torch.Tensor, stride: int) -> int:
    kernel_size = weight.shape[-1]
    if kernel_size < stride:
        raise ValueError(f"causal transposed conv needs kernel_size >= stride, got {kernel_size} < {stride}")
    return kernel_size - stride
