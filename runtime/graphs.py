"""CUDA graphs of the scheduler's decode steps: each step is captured once per (stage, batch bucket) and then
replayed, so a decode step costs one launch instead of hundreds (at batch 1 the thinker's 48 MoE layers are
~1,500 kernels: launch overhead alone would exceed the 2.6 ms/token target).

- Persistent input buffers per captured step; a batch of n sessions runs in the smallest bucket >= n, the
  extra rows padded with slot −1 (they write only the caches' scratch slot and their outputs are dropped).
- All graphs share one memory pool and are captured largest bucket first, so the smaller ones reuse its
  blocks (`capture_all`, run when the scheduler is built: capture is warm-up work, never on a request's path).
- Nothing inside a step syncs with the host: slot lengths, write positions and expert routing stay on the
  device. That needs graph-safe implementations of the ops whose torch references read values back to the
  host (GRAPH_UNSAFE_REFERENCES); the runner refuses to capture with those selected, naming them.

Captured stages: thinker decode, talker decode, the code predictor's whole frame (its G−1 sequential steps
in one graph), Code2Wav's frame decode from per-slot streaming states (after a session's first frame,
which trims the transposed convs' left edge and runs eagerly), and thinker prefill chunks: one graph per
chunk bucket (runtime/scheduler.py prefill_buckets), the chunk front-padded to it (padded tokens write only
the scratch slot; DeepStack additions come in dense), and talker prefill chunks the same way. The encoders,
the embedding merge and the talker prompt's construction run eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from runtime import dispatch

# Ops whose torch reference syncs with the host (host loops over rows / experts): not capturable.
GRAPH_UNSAFE_REFERENCES = {
    "decode_attention": "loops over batch rows on the host",
    "moe_experts": "reads expert token counts back to the host",
}


def check_graph_safe() -> None:
    """Raise if a selected implementation cannot run inside a CUDA graph."""
    unsafe = {op: why for op, why in GRAPH_UNSAFE_REFERENCES.items() if dispatch.selected()[op] == "torch"}
    if unsafe:
        listed = "; ".join(f"{op} ({why})" for op, why in unsafe.items())
        raise RuntimeError(f"CUDA graphs need graph-safe kernels, but the torch reference is selected for: {listed}. "
                           "Select the triton backend (runtime.dispatch.use_all('triton')) or build the engine "
                           "with scheduler_options={'use_graphs': False}")


def batch_buckets(max_batch: int) -> list[int]:
    """Powers of two below max_batch, then max_batch: [1, 2, 4, 8] for 8, [1, 2, 4, 6] for 6."""
    buckets, size = [], 1
    while size < max_batch:
        buckets.append(size)
        size *= 2
    return buckets + [max_batch]


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]  # persistent buffers, batch on dim `batch_dims[i]`
    outputs: tuple[torch.Tensor, ...]  # written by each replay, batch on dim 0


class GraphRunner:
    """Captured decode steps of one scheduler. `thinker_decode`, `talker_decode` and `code_predictor_frame`
    have the signatures of the scheduler's eager steps and return copies of the rows of the real sessions."""

    def __init__(self, device: torch.device, max_batch: int, prefill_buckets: list[int]):
        if device.type != "cuda" or not torch.cuda.is_available():
            raise RuntimeError(f"CUDA graphs need a CUDA device, the engine runs on {device}: "
                               "use scheduler_options={'use_graphs': False}")
        self.device, self.buckets, self.prefill_buckets = device, batch_buckets(max_batch), prefill_buckets
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[str, int], _Captured] = {}

    def bucket(self, batch: int) -> int:
        for size in self.buckets:
            if size >= batch:
                return size
        raise ValueError(f"batch {batch} exceeds the largest captured bucket {self.buckets[-1]}")

    # ------------------------------------------------------------------ capture

    def capture_all(self, scheduler) -> None:
        """Capture every stage at every bucket, largest first, all rows padded (no session's cache is touched)."""
        check_graph_safe()
        prefill = ["thinker_prefill"] + (["talker_prefill"] if scheduler.talker_cache else [])
        for size in reversed(self.prefill_buckets):  # the prefill chunks need the most memory
            for stage in prefill:
                self._get(scheduler, stage, size)
        for size in reversed(self.buckets):
            for stage in self._stages(scheduler):
                self._get(scheduler, stage, size)

    def _stages(self, scheduler) -> list[str]:
        speech = ["talker_decode", "code_predictor_frame", "code2wav_frame"] if scheduler.talker_cache else []
        return ["thinker_decode"] + speech

    def _example_inputs(self, scheduler, stage: str, size: int) -> tuple[torch.Tensor, ...]:
        device, dtype = self.device, scheduler.dtype
        if stage == "thinker_prefill":  # one chunk of `size` tokens of a padded row (only scratch is written)
            hidden = scheduler.config.thinker.text.hidden_size
            levels = len(scheduler.config.thinker.vision.deepstack_visual_indexes)
            return (torch.zeros(1, size, hidden, dtype=dtype, device=device),
                    torch.zeros(3, 1, size, dtype=torch.long, device=device),
                    torch.zeros(levels, 1, size, hidden, dtype=dtype, device=device),
                    torch.full((1,), -1, dtype=torch.long, device=device),
                    torch.full((1,), size, dtype=torch.long, device=device))
        if stage == "talker_prefill":
            hidden = scheduler.config.talker.text.hidden_size
            return (torch.zeros(1, size, hidden, dtype=dtype, device=device),
                    torch.zeros(3, 1, size, dtype=torch.long, device=device),
                    torch.full((1,), -1, dtype=torch.long, device=device),
                    torch.full((1,), size, dtype=torch.long, device=device))
        padded_slots = torch.full((size,), -1, dtype=torch.long, device=device)
        positions = torch.zeros(3, size, 1, dtype=torch.long, device=device)
        if stage == "thinker_decode":
            return torch.zeros(size, dtype=torch.long, device=device), positions, padded_slots
        if stage == "talker_decode":
            hidden = scheduler.config.talker.text.hidden_size
            return torch.randn(size, 1, hidden, dtype=dtype, device=device), positions, padded_slots
        if stage == "code2wav_frame":
            quantizers = scheduler.config.code2wav.num_quantizers
            return torch.zeros(size, quantizers, 1, dtype=torch.long, device=device), padded_slots
        hidden = scheduler.config.talker.text.hidden_size
        return torch.randn(size, hidden, dtype=dtype, device=device), torch.zeros(size, dtype=torch.long, device=device)

    def _step_fn(self, scheduler, stage: str) -> Callable:
        if stage == "thinker_prefill":
            def prefill(embeds, positions, deepstack, slots, num_valid):
                last_hidden, accepted = scheduler.thinker_prefill_eager(embeds, positions, deepstack, slots, num_valid,
                                                                        embeds.shape[1])
                return (last_hidden,) if accepted is None else (last_hidden, accepted)
            return prefill
        if stage == "talker_prefill":
            return lambda embeds, positions, slots, num_valid: scheduler.talker_prefill_eager(
                embeds, positions, slots, num_valid, embeds.shape[1])
        if stage == "thinker_decode":
            return lambda tokens, positions, slots: (scheduler.thinker_decode_eager(tokens, positions, slots, 1),)
        if stage == "talker_decode":
            return lambda embeds, positions, slots: scheduler.talker_decode_eager(embeds, positions, slots, 1)
        if stage == "code2wav_frame":
            return lambda codes, slots: (scheduler.model.code2wav.decode_frame(
                codes, scheduler.code2wav_slots.view(slots, first=False)),)
        return lambda hidden, code0: (scheduler.model.talker.predict_frame(hidden, code0),)

    def _get(self, scheduler, stage: str, size: int) -> _Captured:
        key = (stage, size)
        if key not in self.graphs:
            inputs = self._example_inputs(scheduler, stage, size)
            fn = self._step_fn(scheduler, stage)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side), torch.inference_mode():
                for _ in range(2):  # warm-up: lazy initialisation, Triton compilation, allocator growth
                    fn(*inputs)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool), torch.inference_mode():
                outputs = fn(*inputs)
            self.graphs[key] = _Captured(graph, inputs, tuple(outputs))
        return self.graphs[key]

    # ------------------------------------------------------------------ replay

    def _replay(self, scheduler, stage: str, inputs: tuple[torch.Tensor, ...], batch_dims: tuple[int, ...],
                pad_values: tuple) -> tuple[torch.Tensor, ...]:
        batch = inputs[-1].shape[0]  # the last input of every stage is [B] (slot ids, or code 0)
        captured = self._get(scheduler, stage, self.bucket(batch))
        for buffer, value, dim, pad in zip(captured.inputs, inputs, batch_dims, pad_values):
            buffer.narrow(dim, 0, batch).copy_(value)
            if pad is not None and buffer.shape[dim] > batch:
                buffer.narrow(dim, batch, buffer.shape[dim] - batch).fill_(pad)
        captured.graph.replay()
        # Copies: the next replay of this step overwrites the buffers, and a session may hold its rows longer.
        return tuple(out[:batch].clone() for out in captured.outputs)

    def _check_room(self, cache, longest: int) -> None:
        if longest > cache.max_len:  # the eager view checks this; inside a graph it must be checked before
            raise ValueError(f"{longest} tokens exceed this cache's {cache.max_len} tokens per session")

    def thinker_decode(self, scheduler, tokens, positions, slots, longest: int) -> torch.Tensor:
        self._check_room(scheduler.thinker_cache, longest)
        (logits,) = self._replay(scheduler, "thinker_decode", (tokens, positions, slots), (0, 1, 0), (0, 0, -1))
        return logits

    def talker_decode(self, scheduler, embeds, positions, slots, longest: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_room(scheduler.talker_cache, longest)
        logits, hidden = self._replay(scheduler, "talker_decode", (embeds, positions, slots), (0, 1, 0), (0, 0, -1))
        return logits, hidden

    def code2wav_frame(self, scheduler, codes, slots) -> torch.Tensor:
        (wav,) = self._replay(scheduler, "code2wav_frame", (codes, slots), (0, 0), (0, -1))
        return wav

    def _replay_chunk(self, scheduler, stage: str, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """A prefill chunk already padded to its bucket (inputs[0] is [1, C, H]): copy in, replay, copy out."""
        captured = self._get(scheduler, stage, inputs[0].shape[1])
        for buffer, value in zip(captured.inputs, inputs):
            buffer.copy_(value)
        captured.graph.replay()
        return tuple(out.clone() for out in captured.outputs)

    def thinker_prefill(self, scheduler, embeds, positions, deepstack, slots, num_valid, longest: int):
        """Scheduler.thinker_prefill_eager's contract; the chunk is already padded to one of prefill_buckets."""
        self._check_room(scheduler.thinker_cache, longest)
        outputs = self._replay_chunk(scheduler, "thinker_prefill", (embeds, positions, deepstack, slots, num_valid))
        return outputs[0], outputs[1] if len(outputs) > 1 else None

    def talker_prefill(self, scheduler, embeds, positions, slots, num_valid, longest: int):
        """Scheduler.talker_prefill_eager's contract; the chunk is already padded to one of prefill_buckets."""
        self._check_room(scheduler.talker_cache, longest)
        logits, hidden = self._replay_chunk(scheduler, "talker_prefill", (embeds, positions, slots, num_valid))
        return logits, hidden

    def code_predictor_frame(self, scheduler, hidden, code0) -> torch.Tensor:
        (codes,) = self._replay(scheduler, "code_predictor_frame", (hidden, code0), (0, 0), (0, 0))
        return codes
