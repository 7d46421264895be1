"""CUDA graphs of the model runner's steps: each step is captured once per (stage, batch bucket) and then
replayed, so a decode step costs one launch instead of hundreds (at batch 1 the thinker's 48 MoE layers are
~1,500 kernels: launch overhead alone would exceed the 2.6 ms/token target).

- Persistent input buffers per captured step; a batch of n sessions runs in the smallest bucket >= n, the
  extra rows padded with slot −1 (they write only the caches' scratch slot and their outputs are dropped). An
  input is not copied again when it is the constant tensor last copied there (a steady batch's slot ids).
- One memory pool per replay stream. The thinker's graphs replay on the main stream, the talker's (talker
  prefill and decode, the code predictor's frame, Code2Wav's frames) on the talker stream, and the two run
  concurrently. Graphs that share a pool reuse each other's intermediate blocks, which is safe only for graphs
  that never run at the same time: graphs on one stream are serialised by it, graphs on two streams are not
  (a shared pool would be silent memory corruption). So each stream gets its own pool
  (`torch.cuda.graph_pool_handle()`), and its graphs are captured on that stream (a side stream for the
  main one when it is the default stream, which cannot capture) so their blocks belong to it. Within a pool
  graphs are captured largest bucket first, so the smaller ones reuse its blocks (`capture_all`, run when
  the runner is built: capture is warm-up work, never on a request's path).
- A stage replays on its own stream whoever calls it: from another stream, its stream first waits for the
  caller's (the inputs), and the caller's waits for it after (the outputs); both are events, no host sync.
- Nothing inside a step syncs with the host: slot lengths, write positions and expert routing stay on the
  device. That needs graph-safe implementations of the ops whose torch references read values back to the
  host (GRAPH_UNSAFE_REFERENCES); the runner refuses to capture with those selected, naming them.

Captured stages: thinker decode, talker decode, the code predictor's whole frame (its G−1 sequential steps
in one graph), Code2Wav's frame decode from per-slot streaming states (`code2wav`, after a session's first
frame), Code2Wav's first frame (`code2wav_first`: it trims the transposed convs' left edge, so it makes fewer
samples), and thinker prefill chunks: one graph per chunk bucket (runtime/runner.py prefill_buckets), the chunk
front-padded to it (padded tokens write only the scratch slot; DeepStack additions come in dense), and talker
prefill chunks the same way, and the audio encoder per chunk-count bucket (`audio_encoder`: whole zero-padded
chunks, padded slots masked; up to runtime/runner.py AUDIO_GRAPH_CHUNKS per piece, a prompt's audios one piece
after another), and the vision encoder per patch-count bucket (`vision_encoder`: one frame of an image or video
per replay, padded patches masked). Frames past SchedulerConfig.max_vision_patches, audios all shorter than a
chunk, the embedding merge and the talker prompt's construction run eagerly.

The runner hands its stages over (`ModelRunner.capture_plan()`, a list of StageSpec: name, size, step
function, example inputs); this module only captures and replays them, it never calls back into the runner.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from runtime import dispatch

# Ops whose torch reference syncs with the host (host loops over rows / experts): not capturable.
GRAPH_UNSAFE_REFERENCES = {
    "decode_attention": "loops over batch rows on the host",
    "decode_norm_rope_attention": "loops over batch rows on the host",
    "moe_experts": "reads expert token counts back to the host",
}


def check_graph_safe() -> None:
    """Raise if a selected implementation cannot run inside a CUDA graph."""
    unsafe = {op: why for op, why in GRAPH_UNSAFE_REFERENCES.items() if dispatch.selected()[op] == "torch"}
    if unsafe:
        listed = "; ".join(f"{op} ({why})" for op, why in unsafe.items())
        raise RuntimeError(f"CUDA graphs need graph-safe kernels, but the torch reference is selected for: {listed}. "
                           "Select the triton backend (with runtime.dispatch.using('triton')) or build the engine "
                           "with SchedulerConfig(use_graphs=False)")


def batch_buckets(max_batch: int) -> list[int]:
    """Powers of two below max_batch, then max_batch: [1, 2, 4, 8] for 8, [1, 2, 4, 6] for 6."""
    buckets, size = [], 1
    while size < max_batch:
        buckets.append(size)
        size *= 2
    return buckets + [max_batch]


def graphs_possible() -> bool:
    """CUDA is present and every selected op implementation may run inside a CUDA graph."""
    if not torch.cuda.is_available():
        return False
    try:
        check_graph_safe()
    except RuntimeError:
        return False
    return True


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]  # persistent buffers, batch on dim `batch_dims[i]`
    outputs: tuple[torch.Tensor, ...]  # written by each replay, batch on dim 0


class GraphRunner:
    """Captured stages of one model runner (runtime/runner.py): `capture_all` captures the runner's capture plan,
    `replay` runs one stage from its persistent buffers and returns copies of the real rows' outputs."""

    def __init__(self, device: torch.device, max_batch: int, stage_streams: dict | None = None, cuda=torch.cuda):
        """stage_streams: stage name -> the stream its graph replays on (the talker's stages: the talker stream);
        the others replay on the stream current here (the main stream). cuda: torch.cuda, or a stand-in with
        the same functions (tests/test_graphs.py records on the CPU what is captured where)."""
        if device.type != "cuda" or not cuda.is_available():
            raise RuntimeError(f"CUDA graphs need a CUDA device, the engine runs on {device}: "
                               "use SchedulerConfig(use_graphs=False)")
        self.cuda, self.device, self.buckets = cuda, device, batch_buckets(max_batch)
        self.main_stream = cuda.current_stream(device)
        self.stage_streams = dict(stage_streams or {})
        self.pools: dict = {}  # replay stream -> (its pool handle, the stream its graphs are captured on)
        self.graphs: dict[tuple[str, int], _Captured] = {}
        self.last_inputs: dict[tuple[str, int], list] = {}  # per graph: (constant tensor, batch) last copied in

    def stream_of(self, name: str):
        return self.stage_streams.get(name, self.main_stream)

    def pool_of(self, stream) -> tuple:
        """(pool handle, capture stream) of a replay stream, made at its first capture."""
        if stream not in self.pools:
            capture_on = stream
            if stream == self.cuda.default_stream(self.device):  # the legacy default stream cannot capture
                capture_on = self.cuda.Stream(self.device)
            self.pools[stream] = (self.cuda.graph_pool_handle(), capture_on)
        return self.pools[stream]

    def bucket(self, batch: int) -> int:
        for size in self.buckets:
            if size >= batch:
                return size
        raise ValueError(f"batch {batch} exceeds the largest captured bucket {self.buckets[-1]}")

    def capture_all(self, plan: list) -> None:
        """Capture every StageSpec of the plan (runner.capture_plan(): largest first, all rows padded)."""
        check_graph_safe()
        for spec in plan:
            self.capture(spec)

    def capture(self, spec) -> None:
        """Warm up and capture one stage on its stream's capture stream, into its stream's pool."""
        cuda, caller = self.cuda, self.cuda.current_stream(self.device)
        pool, capture_on = self.pool_of(self.stream_of(spec.name))
        capture_on.wait_stream(caller)  # the example inputs were made on the caller's stream
        with cuda.stream(capture_on), torch.inference_mode():
            for _ in range(2):  # warm-up: lazy initialisation, Triton compilation, allocator growth
                spec.fn(*spec.example_inputs)
        graph = cuda.CUDAGraph()
        with cuda.graph(graph, pool=pool, stream=capture_on), torch.inference_mode():
            outputs = spec.fn(*spec.example_inputs)
        caller.wait_stream(capture_on)
        self.graphs[(spec.name, spec.size)] = _Captured(graph, spec.example_inputs, tuple(outputs))

    def replay(self, name: str, inputs: tuple[torch.Tensor, ...], batch_dims: tuple[int, ...] | None = None,
               pad_values: tuple | None = None) -> tuple[torch.Tensor, ...]:
        """A prefill chunk (batch_dims None: inputs[0] is [1, C, H], already padded to its bucket C) or a batch
        of B rows (the last input of every batched stage is [B]), padded here to its bucket with pad_values.
        Runs on the stage's stream (see the module docstring)."""
        stream, caller = self.stream_of(name), self.cuda.current_stream(self.device)
        if stream == caller:
            return self._replay(name, inputs, batch_dims, pad_values)
        stream.wait_stream(caller)
        with self.cuda.stream(stream):
            outputs = self._replay(name, inputs, batch_dims, pad_values)
        caller.wait_stream(stream)
        for out in outputs:  # made on the stage's stream, freed on the caller's
            if out.is_cuda:
                out.record_stream(caller)
        return outputs

    def _replay(self, name, inputs, batch_dims, pad_values) -> tuple[torch.Tensor, ...]:
        if batch_dims is None:
            captured = self.graphs[(name, inputs[0].shape[1])]
            for buffer, value in zip(captured.inputs, inputs):
                buffer.copy_(value)
            captured.graph.replay()
            return tuple(out.clone() for out in captured.outputs)
        batch = inputs[-1].shape[0]
        key = (name, self.bucket(batch))
        captured = self.graphs[key]
        last = self.last_inputs.setdefault(key, [None] * len(inputs))
        copy_inputs(captured.inputs, inputs, batch_dims, pad_values, last)
        captured.graph.replay()
        # Copies: the next replay of this step overwrites the buffers, and a session may hold its rows longer.
        return tuple(out[:batch].clone() for out in captured.outputs)


def mark_constant(tensor: torch.Tensor) -> torch.Tensor:
    """Promise that `tensor` is never written again, so a replay whose buffer it was last copied into may skip the
    copy (runner.slot_ids marks the slot ids it keeps). Inference tensors have no version counter to check it."""
    tensor.omni_rt_constant = True
    return tensor


def copy_inputs(buffers, inputs, batch_dims, pad_values, last: list) -> None:
    """A batch of B rows into a graph's input buffers: rows [0, B) of each buffer's batch dim, the rest padded.
    `last` (one entry per input, kept by the caller per graph) skips an input that is the constant tensor
    (`mark_constant`) last copied there, at the same B: the buffer holds it already (a steady batch's slot ids).
    The reference held in `last` keeps that tensor alive, so its identity stays unique."""
    batch = inputs[-1].shape[0]
    for i, (buffer, value, dim, pad) in enumerate(zip(buffers, inputs, batch_dims, pad_values)):
        if last[i] is not None and last[i][0] is value and last[i][1] == batch:
            continue
        buffer.narrow(dim, 0, batch).copy_(value)
        if buffer.shape[dim] > batch:
            buffer.narrow(dim, batch, buffer.shape[dim] - batch).fill_(pad)
        last[i] = (value, batch) if getattr(value, "omni_rt_constant", False) else None
