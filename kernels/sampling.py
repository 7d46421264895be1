"""Token sampling on the device: per-row filters (as transformers' logits processors) and a counter-based draw.

    tokens = sample_ref(logits, history, params, seeds, steps, stage=STAGE_TALKER, suppress=codec_mask)

Graph-safe by construction: no host sync, no Python branch on a tensor value, no host tensor, static shapes.
Every per-row choice (greedy or not, a filter on or off) is a `torch.where` on device tensors, so one captured
graph serves any mix of requests. This module is the reference (the "twin") and the CPU path.

Reproducibility: a row's random numbers depend only on (its seed, the stage, its step index), never on the
batch it sits in, its row index or the batch bucket; `philox_uniform` says how.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

STAGE_THINKER, STAGE_TALKER, STAGE_CODE_PREDICTOR = 0, 1, 2
STEP_BITS = 24  # steps below 2**24 per (seed, stage); the code predictor numbers its draws talker_step * G + group
_MASK32 = 0xFFFFFFFF
# Philox4x32-10 constants (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11).
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUNDS = 10


# ------------------------------------------------------------------------------------------------ Philox
def draw_offsets(steps: torch.Tensor, stage: int) -> torch.Tensor:
    """steps: [B] int64 step index per row -> [B] int64 Philox offsets ((stage << 24 | step) << 32)."""
    if not 0 <= stage < 128:
        raise ValueError(f"stage must be in [0, 128), got {stage}")
    return ((steps & ((1 << STEP_BITS) - 1)) + (stage << STEP_BITS)) << 32


def _mulhilo(multiplier: int, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(multiplier * value) >> 32 and & 0xFFFFFFFF for 32-bit operands, without overflowing int64: the
    multiplier is split in 16-bit halves so every partial product stays below 2**49."""
    low_product = value * (multiplier & 0xFFFF)
    high_product = value * (multiplier >> 16)
    middle = high_product + (low_product >> 16)  # product = middle * 2**16 + low_product % 2**16
    return middle >> 16, ((middle & 0xFFFF) << 16) | (low_product & 0xFFFF)


def philox4x32(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """seeds: [B] int64 (the 64-bit key); counters: [B, N] int64 (a 64-bit counter) -> [B, N, 4] int64 words
    in [0, 2**32). Key (k0, k1) = (seed low, seed high 32 bits); counter (c0, c1, c2, c3) = (counter low,
    counter high, 0, 0): exactly Triton's `tl.randint4x(seed, counter)` (triton/language/random.py)."""
    k0 = (seeds & _MASK32)[:, None]
    k1 = ((seeds >> 32) & _MASK32)[:, None]
    c0, c1 = counters & _MASK32, (counters >> 32) & _MASK32
    c2 = c3 = torch.zeros_like(c0)
    for round_index in range(_ROUNDS):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        if round_index + 1 < _ROUNDS:
            k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return torch.stack((c0, c1, c2, c3), dim=-1)


def philox_uniform(seeds: torch.Tensor, offsets: torch.Tensor, num: int) -> torch.Tensor:
    """seeds: [B] int64, one per row (the request's seed); offsets: [B] int64 from `draw_offsets(steps, stage)`
    -> [B, num] float32 uniforms in (0, 1), exactly.

    Layout: uniform n of row b is word n % 4 of Philox4x32-10 with key = seeds[b] (k0 = low, k1 = high 32 bits)
    and counter = offsets[b] + n // 4 split as (c0 = low, c1 = high 32 bits, c2 = 0, c3 = 0), i.e.
    c0 = n // 4 and c1 = stage << 24 | step. Word w becomes ((w >> 9) * 2 + 1) * 2**-24: 2**23 odd multiples
    of 2**-24, never 0 or 1 (so log(u) and log(-log(u)) are finite), each exact in float32.
    """
    blocks = (num + 3) // 4
    counters = offsets[:, None] + torch.arange(blocks, device=offsets.device)  # [B, blocks]
    words = philox4x32(seeds, counters).reshape(seeds.shape[0], blocks * 4)[:, :num]
    return (((words >> 9) << 1) + 1).to(torch.float32) * 2.0 ** -24


# ---------------------------------------------------------------------------------------------- parameters
@dataclass
class SamplingTensors:
    """Per-row sampling parameters on the device (a captured step reads them; `set_row` rewrites them in place).

    temperature: [B] float32 (0 = greedy); top_k: [B] int64 (0 = off); top_p: [B] float64 (1 = off; float64
    so that 1 - top_p rounds to float32 exactly as transformers' `cumsum <= 1 - top_p` does with a Python
    float); min_p: [B] float32 (0 = off); repetition_penalty: [B] float32 (1 = off); do_sample: [B] bool.
    """

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    repetition_penalty: torch.Tensor
    do_sample: torch.Tensor

    DTYPES = dict(temperature=torch.float32, top_k=torch.int64, top_p=torch.float64, min_p=torch.float32,
                  repetition_penalty=torch.float32, do_sample=torch.bool)

    @classmethod
    def from_params(cls, params: list, device: torch.device | str = "cpu") -> "SamplingTensors":
        """One row per item of `params` (objects with the six fields, e.g. runtime.sampling.SamplingParams)."""
        return cls(**{name: torch.tensor([_value(p, name) for p in params], dtype=dtype, device=device)
                      for name, dtype in cls.DTYPES.items()})

    @classmethod
    def greedy(cls, batch: int, device: torch.device | str = "cpu") -> "SamplingTensors":
        """`batch` greedy rows (every filter off): persistent buffers before any request sets a row."""
        values = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, do_sample=False)
        return cls(**{name: torch.full((batch,), values[name], dtype=dtype, device=device)
                      for name, dtype in cls.DTYPES.items()})

    def set_row(self, row: int, params) -> None:
        """Write one row's parameters in place (a fill per field: no host sync, the buffers keep their address)."""
        for name in self.DTYPES:
            getattr(self, name)[row] = _value(params, name)

    def rows(self, count: int) -> "SamplingTensors":
        """Views of the first `count` rows (a batch bucket of persistent per-slot buffers)."""
        return SamplingTensors(**{f.name: getattr(self, f.name)[:count] for f in fields(self)})


def _value(params, name: str):
    value = getattr(params, name)
    return bool(value) if name == "do_sample" else value


# ------------------------------------------------------------------------------------------------ filters
def _greedy_rows(params: SamplingTensors) -> torch.Tensor:
    return ~params.do_sample | (params.temperature == 0)  # [B]


def filter_logits_ref(logits: torch.Tensor, history: torch.Tensor, params: SamplingTensors,
                      suppress: torch.Tensor | None = None) -> torch.Tensor:
    """logits: [B, V] any float dtype; history: [B, H] int64 token ids of the row so far, -1 = empty (read);
    params: SamplingTensors of B rows; suppress: [V] bool or None, tokens never drawn
    -> [B, V] float32 filtered logits, -inf where a token cannot be drawn.

    In transformers' order (generation/utils.py `_get_logits_processor`): suppressed tokens -> -inf; the
    repetition penalty over each history token once (score < 0: * penalty, else / penalty); then, for sampled
    rows only, temperature, top-k, top-p (ascending sort, remove where the cumulative probability <= 1 - top_p,
    the largest always kept) and min-p. Greedy rows (do_sample False or temperature 0) skip the warpers, as
    transformers' greedy search does. Top-k and top-p share one sort.
    """
    scores = logits.to(torch.float32)
    vocab = scores.shape[-1]
    if suppress is not None:
        scores = scores.masked_fill(suppress, float("-inf"))
    # repetition penalty: a [B, V + 1] membership mask, column V taking the empty (-1) history entries
    ids = torch.where(history < 0, vocab, history)
    seen = torch.zeros(scores.shape[0], vocab + 1, dtype=torch.bool, device=scores.device).scatter_(1, ids, True)
    penalty = params.repetition_penalty[:, None]
    scores = torch.where(seen[:, :vocab], torch.where(scores < 0, scores * penalty, scores / penalty), scores)

    greedy = _greedy_rows(params)
    scores = scores / torch.where(greedy, 1.0, params.temperature)[:, None]
    sorted_scores, sorted_ids = scores.sort(dim=-1)  # ascending, [B, V]
    # top-k: drop what is below the k-th largest value (ties with it stay, as in TopKLogitsWarper)
    top_k = torch.where(greedy, 0, params.top_k)
    kth = sorted_scores.gather(1, (vocab - top_k).clamp(0, vocab - 1)[:, None])  # [B, 1]
    threshold = torch.where((top_k > 0)[:, None], kth, float("-inf"))
    drop = scores < threshold
    # top-p on the top-k survivors, in the ascending order of the shared sort
    sorted_kept = sorted_scores.masked_fill(sorted_scores < threshold, float("-inf"))
    cumulative = sorted_kept.softmax(dim=-1).cumsum(dim=-1)
    cutoff = (1.0 - params.top_p).to(torch.float32)[:, None]
    top_p_on = (~greedy & (params.top_p < 1.0))[:, None]
    sorted_drop = (cumulative <= cutoff) & top_p_on
    sorted_drop[:, -1] = False  # min_tokens_to_keep = 1: the largest stays
    drop = drop | torch.zeros_like(drop).scatter_(1, sorted_ids, sorted_drop)
    scores = scores.masked_fill(drop, float("-inf"))
    # min-p: drop tokens below min_p times the top probability (never the top one: min_p <= 1)
    probs = scores.softmax(dim=-1)
    min_p = torch.where(greedy, 0.0, params.min_p)[:, None]
    return scores.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))


def sample_ref(logits: torch.Tensor, history: torch.Tensor, params: SamplingTensors, seeds: torch.Tensor,
               steps: torch.Tensor, stage: int, suppress: torch.Tensor | None = None,
               record_at: int | None = None) -> torch.Tensor:
    """logits: [B, V]; history: [B, H] int64, -1 = empty; params: SamplingTensors of B rows; seeds: [B] int64
    request seeds; steps: [B] int64 step index of each row in its stage; stage: STAGE_*; suppress: [V] bool
    or None -> [B] int64 tokens.

    Sampled rows: Gumbel-max over the filtered logits, argmax(logits - log(-log(u))) with u from
    `philox_uniform(seeds, draw_offsets(steps, stage), V)`: an exact draw from softmax(filtered logits), one
    per row. Greedy rows: the argmax of the filtered logits (the first index on ties), the same path with the
    noise set to zero. record_at: when given, each row's token is also written to history[:, record_at] (the code
    predictor's history of the frame so far; the Triton kernel stores it itself, with no copy after it).
    """
    scores = filter_logits_ref(logits, history, params, suppress)
    uniforms = philox_uniform(seeds, draw_offsets(steps, stage), scores.shape[-1])
    gumbel = -torch.log(-torch.log(uniforms))
    noise = torch.where(_greedy_rows(params)[:, None], 0.0, gumbel)
    tokens = (scores + noise).argmax(dim=-1)
    if record_at is not None:
        history[:, record_at] = tokens
    return tokens
