"""Per-stage timers that tell the truth on a GPU without adding host syncs.

On a GPU the host only launches work: `perf_counter` around a call measures the launch (a replayed graph: a few
µs), and the next blocking copy then absorbs whatever GPU time came before it (a Code2Wav timer that waits for
the code predictor's frame bills its time to Code2Wav). So each stage is timed by two CUDA events recorded
around it on the stream it runs on; the GPU time between them is read later, once both have completed (the
tick's one blocking read waits for both streams, so by then they have), never by a sync of its own. On the CPU
the work is done when the call returns, and `perf_counter` is exact.

    timer = StageTimer.for_device(device)
    span = timer.start()             # an event recorded on the current stream (the stage's)
    codes = runner.code_predictor_frame(...)
    span.stop()
    span.done()                      # never blocks
    span.seconds()                   # blocks only if the span has not completed (request end)
"""

from __future__ import annotations

import time

import torch


class CpuSpan:
    """A stage timed with perf_counter (the work is done when the call returns)."""

    def __init__(self):
        self.start, self.end = time.perf_counter(), None

    def stop(self) -> None:
        self.end = time.perf_counter()

    def done(self) -> bool:
        return self.end is not None

    def wait(self) -> None:
        pass

    def seconds(self) -> float:
        return self.end - self.start


class CudaSpan:
    """A stage timed by CUDA events recorded on its stream: GPU time, whatever the host did meanwhile."""

    def __init__(self, stream=None):
        self.stream = stream if stream is not None else torch.cuda.current_stream()
        self.start_event = torch.cuda.Event(enable_timing=True)
        self.end_event = torch.cuda.Event(enable_timing=True)
        self.start_event.record(stream)

    def stop(self) -> None:
        self.end_event.record(self.stream)

    def done(self) -> bool:
        """Both events have completed on the device (a query, never a wait)."""
        return self.end_event.query()

    def wait(self) -> None:
        self.end_event.synchronize()

    def seconds(self) -> float:
        self.wait()  # no-op once done()
        return self.start_event.elapsed_time(self.end_event) / 1e3  # elapsed_time is in ms


class StageTimer:
    """Makes spans: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, cuda_events: bool):
        self.cuda_events = cuda_events

    @classmethod
    def for_device(cls, device: torch.device | str) -> "StageTimer":
        return cls(torch.device(device).type == "cuda" and torch.cuda.is_available())

    def start(self, stream=None) -> CpuSpan | CudaSpan:
        """A span started now on `stream` (default: the current stream); the caller stops it after the stage
        (a failed stage's span is simply never stopped nor read)."""
        return CudaSpan(stream) if self.cuda_events else CpuSpan()
