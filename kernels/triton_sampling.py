"""kernels/sampling.py's `sample_ref` in one Triton kernel: suppress mask, repetition penalty, temperature, top-k,
top-p, min-p and the Philox/Gumbel draw, one program per row, one launch per call (issue 18: the torch filters
were ~48 kernels per draw, 15 draws per code-predictor frame).

    tokens = sample(logits, history, params, seeds, steps, stage, suppress)      # sample_ref's contract
    scores = filter_logits(logits, history, params, suppress)                    # filter_logits_ref's

How the row is walked (no sort): pass 0 writes the suppressed logits over the temperature to a float32 scratch
row (allocated by the op, as its output), then the history ids overwrite their own entries with the penalised
value (each id writes the same value however often it repeats, so repeats are penalised once, as transformers
does). Later passes re-read that row in tiles, from L1/L2: one tile for V <= 4096 (code predictor 2048,
talker 3072), a walk over 38 tiles for the thinker (151936). A filter costs passes only on rows that turn it on:
- top-k: a search over the float values' order-preserving int keys for the k-th largest value (the largest
  key with count(keys >= it) >= k); ties with it stay, as TopKLogitsWarper's `scores < kth`. Each pass tests
  NUM_PIVOTS keys at once: ~8 passes over the row instead of a bisection's ~32 (sm_90: no spills).
- top-p: the same search for the smallest value t whose probability mass over the values <= t exceeds
  1 - top_p, over the top-k survivors: transformers' "ascending sort, drop where cumsum <= 1 - top_p, the
  largest always kept" read as a threshold. The kept sets can differ from the sorted cumulative sum only where
  the two sums round differently at the boundary, or where equal values straddle the cut (the sort splits a
  tie, the threshold keeps it whole; tests/test_triton_sampling.py checks the other ties).
- min-p: one pass for the kept set's exp-sum; drop where the probability < min_p times the top one (1 / sum).
Greedy rows (do_sample False or temperature 0) skip all three: pass 0 (and the penalty) and the draw. The draw
is the former `_gumbel_argmax_kernel`'s loop: Philox counter c gives the uniforms of entries 4c .. 4c + 3, the
twin's layout, so the noise is bit-identical; divisions round to nearest (`div_rn`) as torch's. Log and exp
are the backend's, so a token can differ from the twin's only when two perturbed logits lie within an ulp or
a probability sits on a top-p / min-p boundary.

Legend: B = rows, V = vocabulary, H = history length, BLOCK_V = entries per tile (BLOCK_Q = BLOCK_V / 4 Philox
counters per draw tile), BLOCK_S = entries per tile of a search, P = NUM_PIVOTS, BLOCK_H = history ids per tile.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.launch_counts import sample_plan
from kernels.sampling import STEP_BITS, SamplingTensors

SAMPLE_LAUNCHES = len(sample_plan(1))  # kernels one call of omni_rt_triton::sample launches (contiguous rows)
MAX_BLOCK_V = 4096  # entries per tile: the code predictor's and the talker's rows stay one tile
MAX_BLOCK_S = 1024  # entries per tile of the threshold searches on a GPU
NUM_PIVOTS = 16  # keys tested per pass of a threshold search: ~8 passes instead of ~32 for a bisection
BLOCK_H = 256


@triton.jit
def _float_key(x):
    """float32 -> int32 key in the same order (-0.0 just below +0.0): sign-magnitude to two's complement. Keys of
    non-NaN floats lie in [-2**31 + 2**23 - 1, 2**31 - 2**23], so a key +- 1 still fits in int32."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _key_float(key):
    bits = key.to(tl.int32)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)


@triton.jit
def _pivots(lo, hi, NUM_PIVOTS: tl.constexpr):
    """NUM_PIVOTS increasing int32 keys spread over [lo, hi), at least one inside (lo, hi) when hi - lo >= 2."""
    offs_p = tl.arange(0, NUM_PIVOTS).to(tl.int64) + 1
    return (lo + ((hi - lo) * offs_p) // (NUM_PIVOTS + 1)).to(tl.int32)


@triton.jit
def _row_max_min(row_ptr, V, BLOCK_V: tl.constexpr):
    row_max = tl.full((), float("-inf"), tl.float32)
    row_min = tl.full((), float("inf"), tl.float32)
    for start in range(0, V, BLOCK_V):
        offs_v = start + tl.arange(0, BLOCK_V)
        score = tl.load(row_ptr + offs_v, mask=offs_v < V, other=float("-inf"))
        row_max = tl.maximum(row_max, tl.max(score, axis=0))
        row_min = tl.minimum(row_min, tl.min(tl.where(offs_v < V, score, float("inf")), axis=0))
    return row_max, row_min


@triton.jit
def _kth_largest(row_ptr, V, k, lo, hi, BLOCK_V: tl.constexpr, NUM_PIVOTS: tl.constexpr):
    """The k-th largest value: the largest key T with count(key >= T) >= k, given count(>= lo) >= k > count(>= hi)
    (int64 keys). A search with NUM_PIVOTS pivots: each pass over the row counts at all of them."""
    while hi - lo > 1:
        pivots = _pivots(lo, hi, NUM_PIVOTS)  # [P]
        counts = tl.zeros((NUM_PIVOTS,), tl.int32)
        for start in range(0, V, BLOCK_V):
            offs_v = start + tl.arange(0, BLOCK_V)
            key = _float_key(tl.load(row_ptr + offs_v, mask=offs_v < V, other=float("-inf")))
            at_least = (key[:, None] >= pivots[None, :]) & (offs_v < V)[:, None]  # [BLOCK_V, P]
            counts += tl.sum(at_least.to(tl.int32), axis=0)
        enough = counts >= k
        lo = tl.max(tl.where(enough, pivots.to(tl.int64), lo), axis=0)
        hi = tl.min(tl.where(enough, hi, pivots.to(tl.int64)), axis=0)
    return _key_float(lo)


@triton.jit
def _exp_sum(row_ptr, V, row_max, threshold, BLOCK_V: tl.constexpr):
    """Softmax denominator over the entries >= threshold."""
    total = tl.full((), 0.0, tl.float32)
    for start in range(0, V, BLOCK_V):
        offs_v = start + tl.arange(0, BLOCK_V)
        score = tl.load(row_ptr + offs_v, mask=offs_v < V, other=float("-inf"))
        total += tl.sum(tl.where(score >= threshold, tl.exp(score - row_max), 0.0), axis=0)
    return total


@triton.jit
def _top_p_floor(row_ptr, V, row_max, threshold, total, cutoff, lo, hi, BLOCK_V: tl.constexpr,
                 NUM_PIVOTS: tl.constexpr):
    """The smallest kept value: the smallest key T in (lo, hi] whose probability mass over the entries >= threshold
    with keys <= T exceeds cutoff (hi, the row's largest value, is kept whatever the sums say:
    min_tokens_to_keep = 1). The same NUM_PIVOTS-ary search as _kth_largest."""
    while hi - lo > 1:
        pivots = _pivots(lo, hi, NUM_PIVOTS)  # [P]
        mass = tl.zeros((NUM_PIVOTS,), tl.float32)
        for start in range(0, V, BLOCK_V):
            offs_v = start + tl.arange(0, BLOCK_V)
            score = tl.load(row_ptr + offs_v, mask=offs_v < V, other=float("-inf"))
            prob = tl.where(score >= threshold, tl.math.div_rn(tl.exp(score - row_max), total), 0.0)
            below = _float_key(score)[:, None] <= pivots[None, :]  # [BLOCK_V, P]
            mass += tl.sum(tl.where(below, prob[:, None], 0.0), axis=0)
        above = mass > cutoff
        hi = tl.min(tl.where(above, pivots.to(tl.int64), hi), axis=0)
        lo = tl.max(tl.where(above, lo, pivots.to(tl.int64)), axis=0)
    return _key_float(hi)


@triton.jit
def _sample_kernel(
    logits_ptr, history_ptr, suppress_ptr, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, penalty_ptr,
    do_sample_ptr, seeds_ptr, steps_ptr, scores_ptr, tokens_ptr,
    V, H,
    stride_lb, stride_lv, stride_hb, stride_hh,
    STAGE: tl.constexpr, STEP_MASK: tl.constexpr, STEP_SHIFT: tl.constexpr, HAS_SUPPRESS: tl.constexpr,
    RECORD_AT: tl.constexpr, WRITE_SCORES: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_S: tl.constexpr, NUM_PIVOTS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + pid_b * stride_lb
    row_ptr = scores_ptr + pid_b * V  # the scratch row (contiguous float32)
    sampled = (tl.load(do_sample_ptr + pid_b) != 0) & (tl.load(temperature_ptr + pid_b) != 0.0)
    temperature = tl.where(sampled, tl.load(temperature_ptr + pid_b), 1.0)

    # pass 0: suppressed logits / temperature
    for start in range(0, V, BLOCK_V):
        offs_v = start + tl.arange(0, BLOCK_V)
        score = tl.load(logits_row + offs_v * stride_lv, mask=offs_v < V, other=float("-inf")).to(tl.float32)
        if HAS_SUPPRESS:
            score = tl.where(tl.load(suppress_ptr + offs_v, mask=offs_v < V, other=0) != 0, float("-inf"), score)
        tl.store(row_ptr + offs_v, tl.math.div_rn(score, temperature), mask=offs_v < V)
    # repetition penalty: each history id rewrites its own entry (repeats write the same value)
    penalty = tl.load(penalty_ptr + pid_b)
    if penalty != 1.0:
        tl.debug_barrier()  # pass 0's stores land before any thread overwrites them
        for start in range(0, H, BLOCK_H):
            offs_h = start + tl.arange(0, BLOCK_H)
            ids = tl.load(history_ptr + pid_b * stride_hb + offs_h * stride_hh, mask=offs_h < H, other=-1)
            seen = (ids >= 0) & (ids < V)
            score = tl.load(logits_row + ids * stride_lv, mask=seen, other=0.0).to(tl.float32)
            if HAS_SUPPRESS:
                score = tl.where(tl.load(suppress_ptr + ids, mask=seen, other=0) != 0, float("-inf"), score)
            score = tl.where(score < 0, score * penalty, tl.math.div_rn(score, penalty))
            tl.store(row_ptr + ids, tl.math.div_rn(score, temperature), mask=seen)
    tl.debug_barrier()  # every later pass reads entries other threads wrote

    # the warpers' thresholds (sampled rows only): keep score >= threshold, then min-p's probability floor
    top_k = tl.load(top_k_ptr + pid_b)
    top_p = tl.load(top_p_ptr + pid_b)  # float64: 1 - top_p rounds to float32 as transformers' Python float
    min_p = tl.load(min_p_ptr + pid_b)
    top_k_on = sampled & (top_k > 0) & (top_k < V)  # top_k >= V keeps everything, as the twin's clamp
    top_p_on = sampled & (top_p < 1.0)
    min_p_on = sampled & (min_p > 0.0)
    threshold = tl.full((), float("-inf"), tl.float32)
    row_max = tl.full((), 0.0, tl.float32)
    kept_total = tl.full((), 1.0, tl.float32)
    prob_floor = tl.full((), 0.0, tl.float32)
    if top_k_on | top_p_on | min_p_on:
        row_max, row_min = _row_max_min(row_ptr, V, BLOCK_V)
        if top_k_on:
            threshold = _kth_largest(row_ptr, V, top_k, _float_key(row_min).to(tl.int64),
                                     _float_key(row_max).to(tl.int64) + 1, BLOCK_S, NUM_PIVOTS)
        if top_p_on:
            cutoff = (1.0 - top_p).to(tl.float32)
            total = _exp_sum(row_ptr, V, row_max, threshold, BLOCK_V)
            # below the top-k threshold the mass is 0: the search starts there (a narrower key range)
            lowest = _float_key(tl.maximum(threshold, row_min)).to(tl.int64) - 1
            floor = _top_p_floor(row_ptr, V, row_max, threshold, total, cutoff, lowest,
                                 _float_key(row_max).to(tl.int64), BLOCK_S, NUM_PIVOTS)
            threshold = tl.maximum(threshold, floor)
        if min_p_on:
            kept_total = _exp_sum(row_ptr, V, row_max, threshold, BLOCK_V)
            prob_floor = min_p * tl.math.div_rn(1.0, kept_total)  # min_p times the top probability

    # the draw: Gumbel-max for sampled rows, argmax for greedy ones (first index on ties)
    seed = tl.load(seeds_ptr + pid_b)
    offset = ((tl.load(steps_ptr + pid_b) & STEP_MASK) + (STAGE << STEP_SHIFT)) << 32  # sampling.draw_offsets
    best_value = tl.full((), float("-inf"), tl.float32)
    best_index = tl.full((), 0, tl.int32) + V  # replaced by the first entry: every value is >= -inf
    BLOCK_Q: tl.constexpr = BLOCK_V // 4
    offs_q = tl.arange(0, BLOCK_Q)
    for start in range(0, tl.cdiv(V, BLOCK_V)):
        counters = start * BLOCK_Q + offs_q
        words = tl.randint4x(seed, offset + counters.to(tl.int64))
        for w in tl.static_range(4):
            offs_v = counters * 4 + w
            score = tl.load(row_ptr + offs_v, mask=offs_v < V, other=float("-inf"))
            keep = score >= threshold
            if min_p_on:
                keep &= tl.math.div_rn(tl.exp(score - row_max), kept_total) >= prob_floor
            score = tl.where(keep, score, float("-inf"))
            if WRITE_SCORES:
                tl.store(row_ptr + offs_v, score, mask=offs_v < V)
            uniform = ((words[w] >> 9) * 2 + 1).to(tl.float32) * 5.9604644775390625e-08  # 2**-24
            gumbel = -tl.log(-tl.log(uniform))
            value = score + tl.where(sampled, gumbel, 0.0)
            tile_max = tl.max(value, axis=0)
            tile_index = tl.min(tl.where((value == tile_max) & (offs_v < V), offs_v, V), axis=0)
            better = (tile_max > best_value) | ((tile_max == best_value) & (tile_index < best_index))
            best_value = tl.where(better, tile_max, best_value)
            best_index = tl.where(better, tile_index, best_index)
    tl.store(tokens_ptr + pid_b, best_index.to(tl.int64))
    if RECORD_AT >= 0:  # the penalty pass above has read this row's history: no other thread reads it after
        tl.store(history_ptr + pid_b * stride_hb + RECORD_AT * stride_hh, best_index.to(tl.int64))


def _launch(logits, history, suppress, temperature, top_k, top_p, min_p, repetition_penalty, do_sample, seeds,
            steps, stage: int, write_scores: bool, record_at: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    batch, vocab = logits.shape
    tokens = torch.empty(batch, dtype=torch.int64, device=logits.device)
    scores = torch.empty(batch, vocab, dtype=torch.float32, device=logits.device)  # the per-row scratch
    if batch == 0:
        return tokens, scores
    block_v = min(MAX_BLOCK_V, max(16, triton.next_power_of_2(vocab)))
    # the searches hold a [BLOCK_S, NUM_PIVOTS] tile: smaller compiled (registers), whole on the interpreter (whose
    # cost is per op, not per element)
    block_s = block_v if os.environ.get("TRITON_INTERPRET") == "1" else min(block_v, MAX_BLOCK_S)
    rows = [t.contiguous() for t in (temperature, top_k, top_p, min_p, repetition_penalty, do_sample, seeds, steps)]
    _sample_kernel[(batch,)](
        logits, history, logits if suppress is None else suppress.contiguous(), *rows, scores, tokens,
        vocab, history.shape[1], *logits.stride(), *history.stride(),
        STAGE=stage, STEP_MASK=(1 << STEP_BITS) - 1, STEP_SHIFT=STEP_BITS, HAS_SUPPRESS=suppress is not None,
        RECORD_AT=record_at, WRITE_SCORES=write_scores, BLOCK_V=block_v, BLOCK_S=block_s, NUM_PIVOTS=NUM_PIVOTS, BLOCK_H=BLOCK_H,
        num_warps=8 if block_v >= 2048 else 4)
    return tokens, scores


@torch.library.custom_op("omni_rt_triton::sample", mutates_args=("history",))
def _sample_op(logits: torch.Tensor, history: torch.Tensor, suppress: torch.Tensor | None, temperature: torch.Tensor,
               top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor, repetition_penalty: torch.Tensor,
               do_sample: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor, stage: int,
               record_at: int = -1) -> torch.Tensor:
    """logits: (B, V) any float dtype and strides; history: (B, H) int64, -1 = empty, any strides; suppress: (V,)
    bool or None; temperature, min_p, repetition_penalty: (B,) float32; top_k, seeds, steps: (B,) int64; top_p:
    (B,) float64; do_sample: (B,) bool; record_at: a history column the tokens are also written to, -1 = none.
    Returns (B,) int64 tokens."""
    return _launch(logits, history, suppress, temperature, top_k, top_p, min_p, repetition_penalty, do_sample, seeds,
                   steps, stage, write_scores=False, record_at=record_at)[0]


@_sample_op.register_fake
def _(logits, history, suppress, temperature, top_k, top_p, min_p, repetition_penalty, do_sample, seeds, steps, stage,
      record_at=-1):
    return logits.new_empty(logits.shape[0], dtype=torch.int64)


def _check_stage(stage: int) -> None:
    if not 0 <= stage < 128:
        raise ValueError(f"stage must be in [0, 128), got {stage}")


def sample(logits: torch.Tensor, history: torch.Tensor, params: SamplingTensors, seeds: torch.Tensor,
           steps: torch.Tensor, stage: int, suppress: torch.Tensor | None = None,
           record_at: int | None = None) -> torch.Tensor:
    """kernels.sampling.sample_ref's contract (logits [B, V], history [B, H] int64 with -1 = empty, params of B
    rows, seeds and steps [B] int64, stage STAGE_*, suppress [V] bool or None, record_at a history column or None
    -> [B] int64 tokens), one kernel."""
    _check_stage(stage)
    if record_at is not None and not 0 <= record_at < history.shape[1]:
        raise ValueError(f"record_at {record_at} is not a column of history {tuple(history.shape)}")
    return torch.ops.omni_rt_triton.sample(logits, history, suppress, params.temperature, params.top_k, params.top_p,
                                           params.min_p, params.repetition_penalty, params.do_sample, seeds, steps,
                                           stage, -1 if record_at is None else record_at)


def filter_logits(logits: torch.Tensor, history: torch.Tensor, params: SamplingTensors,
                  suppress: torch.Tensor | None = None) -> torch.Tensor:
    """kernels.sampling.filter_logits_ref's contract -> [B, V] float32, -inf where a token cannot be drawn: the
    same kernel writing its filtered row back (for tests and inspection; `sample` never writes it)."""
    batch = logits.shape[0]
    zeros = torch.zeros(batch, dtype=torch.int64, device=logits.device)
    return _launch(logits, history, suppress, params.temperature, params.top_k, params.top_p, params.min_p,
                   params.repetition_penalty, params.do_sample, zeros, zeros, 0, write_scores=True)[1]


TRITON_OPS = {"sample": sample}  # runtime/dispatch.py registers these for the triton backend
