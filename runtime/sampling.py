"""Sampling parameters of one stage (`SamplingParams`) and the defaults of the three sampled stages.

    StageSampling.from_checkpoint("/path/to/qwen3-omni")  # the checkpoint's generation_config.json, else defaults
    SamplingParams(do_sample=True, temperature=0.7, top_k=20, top_p=0.8)

Defaults are those of the released model's `generate` in transformers 5.23
(models/qwen3_omni_moe/modeling_qwen3_omni_moe.py, `Qwen3OmniMoeForConditionalGeneration.generate` and the
talker's `prepare_inputs_for_generation`):
- thinker: `GenerationConfig`'s defaults, greedy (do_sample False, temperature 1, top_k 50, top_p 1);
- talker: do_sample True, top_k 50, top_p 1.0, temperature 0.9, repetition_penalty 1.05;
- code predictor: follows the talker's do_sample; when sampling top_k 50 and top_p 0.8 (hard-coded there),
  temperature 1.0 (its own generation config's default).
The filters and the draw run on the device: kernels/sampling.py (`SamplingTensors` holds these per row).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How one stage picks its next token. do_sample False (or temperature 0) is greedy: the argmax after the
    repetition penalty, exactly as transformers' greedy search; the warpers (temperature, top_k, top_p, min_p)
    then do nothing.

    temperature: >= 0, divides the logits; top_k: int >= 0, 0 = off; top_p: in (0, 1], 1 = off;
    min_p: in [0, 1], 0 = off; repetition_penalty: > 0, 1 = off, over the stage's own history.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if not isinstance(self.do_sample, bool):
            raise TypeError(f"SamplingParams.do_sample must be True or False, got {self.do_sample!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise TypeError(f"SamplingParams.top_k must be an int, got {self.top_k!r} ({type(self.top_k).__name__})")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TypeError(f"SamplingParams.{name} must be a finite number, got {value!r}")
        checks = (("temperature", self.temperature >= 0, ">= 0"), ("top_k", self.top_k >= 0, ">= 0 (0 = off)"),
                  ("top_p", 0 < self.top_p <= 1, "in (0, 1]"), ("min_p", 0 <= self.min_p <= 1, "in [0, 1]"),
                  ("repetition_penalty", self.repetition_penalty > 0, "> 0"))
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"SamplingParams.{name} must be {rule}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


THINKER_DEFAULTS = SamplingParams()
TALKER_DEFAULTS = SamplingParams(do_sample=True, temperature=0.9, top_k=50, top_p=1.0, repetition_penalty=1.05)
CODE_PREDICTOR_SAMPLED = SamplingParams(do_sample=True, temperature=1.0, top_k=50, top_p=0.8)
CODE_PREDICTOR_GREEDY = SamplingParams(do_sample=False, temperature=1.0, top_k=50, top_p=0.8)
_FIELDS = tuple(f.name for f in fields(SamplingParams))


def code_predictor_for(talker: SamplingParams) -> SamplingParams:
    """The code predictor mirrors the talker's do_sample (transformers 5.23 `_prepare_generation_config`)."""
    return CODE_PREDICTOR_SAMPLED if talker.do_sample else CODE_PREDICTOR_GREEDY


@dataclass(frozen=True)
class StageSampling:
    """The sampling parameters of the three sampled stages."""

    thinker: SamplingParams = THINKER_DEFAULTS
    talker: SamplingParams = TALKER_DEFAULTS
    code_predictor: SamplingParams = CODE_PREDICTOR_SAMPLED

    @classmethod
    def from_generation_config(cls, config: dict) -> "StageSampling":
        """From a generation_config.json's content: plain or `thinker_*` keys set the thinker, `talker_*` keys
        the talker, `code_predictor_*` keys the code predictor (which otherwise follows the talker's do_sample);
        keys it does not name keep the released defaults. A value of None counts as absent."""
        thinker = _override(THINKER_DEFAULTS, config, "")
        thinker = _override(thinker, config, "thinker_")
        talker = _override(TALKER_DEFAULTS, config, "talker_")
        code_predictor = _override(code_predictor_for(talker), config, "code_predictor_")
        return cls(thinker, talker, code_predictor)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> "StageSampling":
        """The checkpoint directory's generation_config.json when it has one, else the released defaults."""
        file = Path(path) / "generation_config.json"
        if not file.is_file():
            return cls()
        return cls.from_generation_config(json.loads(file.read_text()))


def _override(params: SamplingParams, config: dict, prefix: str) -> SamplingParams:
    given = {name: config[prefix + name] for name in _FIELDS if config.get(prefix + name) is not None}
    if "top_k" in given and isinstance(given["top_k"], float) and given["top_k"].is_integer():
        given["top_k"] = int(given["top_k"])
    try:
        return replace(params, **given)
    except (TypeError, ValueError) as error:
        raise ValueError(f"generation_config: {prefix or 'thinker '}sampling parameters: {error}") from error


class SlotSampling:
    """One stage's sampling state per scheduler slot, on the device: what its captured decode step reads and
    advances, so a graph replay samples every row with its own request's parameters, seed and history.

    params: SamplingTensors [slots + 1] (set on admission); seeds, steps: [slots + 1] int64 (steps advanced by
    `sample`); history: [slots + 1, history_len] int64 token ids for the repetition penalty, -1 = empty,
    written by `sample` at `filled`. Row `slots` is the scratch row of padded rows (slot -1).
    """

    def __init__(self, slots: int, history_len: int, stage: int, device):
        from kernels.sampling import SamplingTensors

        self.stage, self.scratch = stage, slots
        rows = slots + 1
        index = dict(dtype=torch.long, device=device)
        self.params = SamplingTensors.greedy(rows, device)
        self.seeds, self.steps, self.filled = (torch.zeros(rows, **index) for _ in range(3))
        self.history = torch.full((rows, max(history_len, 1)), -1, **index)

    def admit(self, slot: int, params: SamplingParams, seed: int, prefix: torch.Tensor | None = None) -> None:
        """A new request in `slot` (outside any graph): its parameters and seed, step 0, its history emptied
        (then `prefix` [n] int64 on the device, the prompt for the thinker, as transformers' input_ids)."""
        self.params.set_row(slot, params)
        self.seeds[slot] = seed
        self.steps[slot] = 0
        self.history[slot].fill_(-1)
        count = 0 if prefix is None else min(prefix.numel(), self.history.shape[1])
        if count:
            self.history[slot, :count].copy_(prefix.reshape(-1)[:count])
        self.filled[slot] = count

    def rows(self, slots: torch.Tensor) -> torch.Tensor:
        """[B] slot ids, -1 = padded -> [B] rows of the state (padded rows read and write the scratch row)."""
        return torch.where(slots < 0, self.scratch, slots)

    def gather(self, rows: torch.Tensor):
        """[B] rows -> (their SamplingTensors, their seeds [B]): what `draw` takes, gathered once for any number
        of draws (the code predictor draws G − 1 times per frame)."""
        from kernels.sampling import SamplingTensors

        params = SamplingTensors(**{name: getattr(self.params, name)[rows] for name in SamplingTensors.DTYPES})
        return params, self.seeds[rows]

    def draw(self, logits: torch.Tensor, gathered, history: torch.Tensor, steps: torch.Tensor,
             suppress: torch.Tensor | None = None, record_at: int | None = None) -> torch.Tensor:
        """logits [B, V], gathered = gather(rows), history [B, H], steps [B] -> [B] int64 tokens (the dispatched
        `sample` op), also written to history[:, record_at] when given."""
        from runtime import dispatch

        params, seeds = gathered
        return dispatch.sample(logits, history, params, seeds, steps, self.stage, suppress, record_at)

    def sample(self, logits: torch.Tensor, slots: torch.Tensor, suppress: torch.Tensor | None = None) -> torch.Tensor:
        """logits [B, V], slots [B] (-1 = padded) -> [B] tokens drawn at each row's step, which then advances;
        each token joins its row's history. Graph-safe: gathers, a draw and in-place scatters only."""
        rows = self.rows(slots)
        steps = self.steps[rows]
        tokens = self.draw(logits, self.gather(rows), self.history[rows], steps, suppress)
        filled = self.filled[rows]
        self.history.index_put_((rows, filled.clamp(max=self.history.shape[1] - 1)), tokens)
        self.filled.index_put_((rows,), filled + 1)
        self.steps.index_put_((rows,), steps + 1)
        return tokens
