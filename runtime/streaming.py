"""Streaming output of a request: the events it yields (text deltas and 80 ms audio packets, as soon as each
is ready) and its timing record. runtime/scheduler.py produces them, the engine loop (runtime/engine_loop.py)
moves them into each stream's `EventQueue`, and `Stream` reads them there, as an iterator or an async iterator.

Per session the scheduler interleaves the thinker, the talker and Code2Wav:

    thinker prefill + t1 ─► talker prefill (MODEL_SPEC §8.3: it needs only the prompt's states and t1)
    per frame k: code 0 ─► code predictor ─► Code2Wav (the frame's final samples, its state carried)
                 the next talker input needs the text of frame k: t_{k+2}, or tts_eos / tts_pad once the
                 thinker has stopped
    the thinker's remaining text streams after the talker stops.

With greedy decoding everything equals the offline `OmniEngine.generate`: the same tokens, the same codes,
and the audio of the single full decode.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator

import torch


@dataclass
class TextDelta:
    text: str  # newly completed text ("" without a tokenizer or inside a multi-byte character)
    token_ids: list[int]  # the tokens this delta covers
    time: float  # seconds since the request started


@dataclass
class AudioChunk:
    samples: torch.Tensor  # [n] on the CPU: float32 in [-1, 1] at `sample_rate`, or int16 PCM (audio_format="pcm16")
    sample_rate: int
    frame: int  # index of the last codec frame these samples complete
    codes: torch.Tensor  # [G, frames in this chunk] int64 on the CPU: the codec codes decoded into these samples
    start_sample: int  # offset of samples[0] in the utterance
    time: float  # seconds since the request started


@dataclass
class StreamTimings:
    """The paper's Table 2 rows for one request (seconds). On a GPU the per-frame figures are GPU time between
    CUDA events around each stage on its stream (runtime/timing.py); they arrive as spans and are read once
    complete (`resolve`), so the lists fill in a tick or so behind the frames and are whole at the request's end."""

    preprocess: float = 0.0
    thinker_first_token: float | None = None  # request start -> first text token (on the host)
    talker_first_frame: float | None = None  # request start -> first codec frame (code 0 .. G−1) computed
    first_packet: float | None = None  # request start -> first audio samples on the host
    code_predictor_per_frame: list[float] = field(default_factory=list)
    code2wav_per_frame: list[float] = field(default_factory=list)
    total: float = 0.0
    audio_seconds: float = 0.0
    # (field name, span) not read yet, in the order they were recorded: a list field gets the span's seconds,
    # a stamp field (talker_first_frame) the request's clock when the span is seen complete.
    pending: deque = field(default_factory=deque, repr=False, compare=False)

    @property
    def rtf(self) -> float | None:
        """Generation real-time factor: wall time / seconds of audio produced."""
        return self.total / self.audio_seconds if self.audio_seconds else None

    def add_span(self, name: str, span) -> None:
        """A stage's span (runtime/timing.py) for the list `name`, or for the stamp `talker_first_frame`."""
        self.pending.append((name, span))

    def resolve(self, clock, wait: bool = False) -> None:
        """Read the spans that have completed (all of them with `wait`, e.g. at the request's end); clock():
        seconds since the request started, for stamps."""
        while self.pending and (wait or self.pending[0][1].done()):
            name, span = self.pending.popleft()
            span.wait()
            value = getattr(self, name)
            if isinstance(value, list):
                value.append(span.seconds())
            elif value is None:
                setattr(self, name, clock())


class StreamEnd:
    """The last item of an EventQueue: the request finished (error None), failed or was cancelled."""

    def __init__(self, error: BaseException | None = None, cancelled: bool = False):
        self.error, self.cancelled = error, cancelled


class EventQueue:
    """One stream's events on their way from the engine loop's thread to the stream's consumer, who reads
    them at its own pace (so a slow consumer delays only itself): a blocking `get` for threads, an awaitable
    `get_async` that never blocks an asyncio event loop. It ends with one StreamEnd, which every later get
    returns again."""

    def __init__(self):
        # Reentrant: a Stream's finalizer ends its queue and may run in a garbage collection that starts
        # inside this queue's own critical section.
        self._lock = threading.RLock()
        self._ready = threading.Condition(self._lock)
        self._items: deque = deque()
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self.ended = False
        # Loop ticks at the submit and at the first delivered event: how long a request waited, counted in
        # the engine's own steps (tests read these; seconds depend on the machine).
        self.submit_tick: int | None = None
        self.first_event_tick: int | None = None

    def put(self, events: list, tick: int | None = None) -> None:
        """Append events (the engine loop's thread); dropped once the queue has ended."""
        with self._lock:
            if self.ended:
                return
            if self.first_event_tick is None and events:
                self.first_event_tick = tick
            self._items.extend(events)
            self._wake()

    def end(self, error: BaseException | None = None, cancelled: bool = False) -> bool:
        """Close the queue with a StreamEnd (events already in it stay readable, except on cancel, which
        drops them). False when it had ended already."""
        with self._lock:
            if self.ended:
                return False
            self.ended = True
            if cancelled:
                self._items.clear()
            self._items.append(StreamEnd(error, cancelled))
            self._wake()
            return True

    def final(self) -> StreamEnd | None:
        """The StreamEnd once the queue has ended (events before it may still be unread), else None."""
        with self._lock:
            return self._items[-1] if self.ended else None

    def get(self):
        """The next event or the StreamEnd, waiting for it (any thread but the engine loop's)."""
        with self._ready:
            while not self._items:
                self._ready.wait()
            return self._take()

    async def get_async(self):
        """`get` for a coroutine: waits on an asyncio future that the loop thread resolves thread-safely."""
        while True:
            with self._lock:
                if self._items:
                    return self._take()
                future = asyncio.get_running_loop().create_future()
                self._async_waiters.append((future.get_loop(), future))
            await future

    def _take(self):
        item = self._items.popleft()
        if isinstance(item, StreamEnd):
            self._items.appendleft(item)  # every later get sees the end too
        return item

    def _wake(self) -> None:  # with the lock held
        self._ready.notify_all()
        waiters, self._async_waiters = self._async_waiters, []
        for event_loop, future in waiters:
            try:
                event_loop.call_soon_threadsafe(_resolve, future)
            except RuntimeError:  # that event loop is closed: nobody waits there any more
                pass


def _resolve(future: asyncio.Future) -> None:
    if not future.done():  # a consumer task cancelled meanwhile leaves a cancelled future behind
        future.set_result(None)


class Stream:
    """A request's events (TextDelta / AudioChunk) as they are ready; `timings` fills in as it runs.

        for event in stream: ...            # from any thread
        async for event in stream: ...      # from a coroutine; the asyncio event loop is never blocked

    The engine loop (runtime/engine_loop.py) produces the events on its own thread whether or not anyone
    reads them; a failed request raises its error from the iteration; the others go on. Leaving early ends
    the request and frees its slot: `cancel()` (from any thread), `close()`, a `with` block, `break` out of
    a `for` loop (the generator's exit), or dropping the last reference to the stream (a finalizer; the loop
    holds only the session and the queue, never the Stream)."""

    def __init__(self, loop, session, events: EventQueue):
        self._loop, self.session, self._events = loop, session, events
        self.timings: StreamTimings = session.timings
        self._finalizer = weakref.finalize(self, loop.abandon, session, events)
        self._finalizer.atexit = False  # at exit the engine loop closes every stream itself

    @property
    def cancelled(self) -> bool:
        """Ended by a cancel (its own, another thread's, or its finalizer's) before it finished."""
        end = self._events.final()
        return end is not None and end.cancelled

    @property
    def submit_tick(self) -> int | None:
        return self._events.submit_tick

    @property
    def first_event_tick(self) -> int | None:
        return self._events.first_event_tick

    def __iter__(self) -> Iterator[TextDelta | AudioChunk]:
        try:
            while not isinstance(item := self._events.get(), StreamEnd):
                yield item
            if item.error is not None:
                raise item.error
        finally:
            self._leave()

    def __aiter__(self) -> AsyncIterator[TextDelta | AudioChunk]:
        return _AsyncEvents(self)

    def cancel(self, wait: bool = True) -> None:
        """Stop the request and free its slot; events not read yet are dropped; other requests go on. A
        request that has finished already keeps its events. With `wait`, returns once the engine loop has
        released the slot (within one tick); a coroutine should pass wait=False (or call close()), which
        returns at once: the slot is freed at the loop's next turn all the same."""
        if self._events.end(cancelled=True):
            self._loop.cancel(self.session, self._events, wait=wait)

    def close(self) -> None:
        """Cancel unless finished; never waits for the engine loop."""
        self.cancel(wait=False)

    def _leave(self) -> None:
        # Runs when an iteration ends, however it ends (it may run in a garbage collection on any thread,
        # the engine loop's included), so it never waits.
        self.cancel(wait=False)

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    async def __aenter__(self) -> "Stream":
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()


class _AsyncEvents:
    """`async for` over a Stream. Not an async generator: those are closed only later, by the event loop, when
    dropped; this one cancels the request as soon as the consumer drops it (a `break`, a cancelled task)."""

    def __init__(self, stream: Stream):
        self._stream, self._ended = stream, False

    def __aiter__(self) -> "_AsyncEvents":
        return self

    async def __anext__(self) -> TextDelta | AudioChunk:
        item = await self._stream._events.get_async()
        if not isinstance(item, StreamEnd):
            return item
        self._ended = True
        if item.error is not None:
            raise item.error
        raise StopAsyncIteration

    def __del__(self):
        if not self._ended:
            self._stream._leave()


class HostCopy:
    """A frame's tensors (its samples, its codes: views of its slot's state, which the slot's next frame overwrites)
    on their way to the host: on a GPU, copied without blocking into pinned memory on the current stream (the
    talker's, where they were made, ahead of the next frame), one event recorded after the copies; `ready()` asks
    the event (never waits), `wait()` waits for it and returns them. On the CPU they are copied at once."""

    def __init__(self, *tensors: torch.Tensor):
        self.event, self._sources = None, None
        if all(t.device.type == "cpu" for t in tensors):
            self.host = tuple(t.clone() for t in tensors)
            return
        on_gpu = all(t.is_cuda for t in tensors)  # else the meta device of bench/launches.py's count
        self.host = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=on_gpu) for t in tensors)
        for host, tensor in zip(self.host, tensors):
            host.copy_(tensor, non_blocking=True)
        if on_gpu:
            self.event = torch.cuda.Event()
            self.event.record()
            self._sources = tensors  # kept alive until the copies have completed

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def wait(self) -> tuple[torch.Tensor, ...]:
        if self.event is not None:
            self.event.synchronize()
        self._sources = None
        return self.host


def pcm16(samples: torch.Tensor) -> torch.Tensor:
    """float samples in [-1, 1] -> int16 PCM (clipped)."""
    return (samples.clamp(-1, 1) * 32767).round().to(torch.int16)


def consume_together(streams: list[Stream]) -> list[list[TextDelta | AudioChunk]]:
    """Every event of each stream, in order; raises the first failure met. The engine loop runs the
    requests concurrently whatever order they are read in, so the streams are simply read one after another
    (those left unread when one fails are cancelled as they are dropped)."""
    return [list(stream) for stream in streams]
