"""The engine loop: one background thread owns the scheduler and steps it while there is work.

Threading contract (docs/architecture.md, "Engine loop"):
- Only the loop thread touches the scheduler. `submit`, `cancel`, `call` and `close` are safe from any
  thread: they queue a command that the loop thread applies between ticks (FIFO), and wait for its answer
  (`cancel(wait=False)` and a stream's finalizer do not wait).
- The loop steps (`scheduler.step()`, one tick) while any session is live or waiting, and sleeps on a
  condition variable otherwise: no polling. `ticks` counts the steps.
- After each tick it moves each session's new events into that session's `EventQueue`
  (runtime/streaming.py), where the consumer reads them at its own pace: a slow consumer delays only itself.
- The loop holds each request's session and queue, never its `Stream`, so a stream dropped unfinished is
  garbage-collected; its finalizer queues a cancel and the slot is free after the next tick.
- A session's own failure is the scheduler's business (its stream raises it). An exception escaping
  `scheduler.step()` itself is a crash of the loop: every open stream ends with an `EngineLoopError` (caused
  by it), and every later submit raises one. `close()` ends open streams the same way and joins the thread;
  at interpreter exit an atexit hook closes the loop. `retire()` (the engine was garbage-collected) ends the
  loop once its open streams have finished, so the thread does not keep the scheduler's caches alive.
"""

from __future__ import annotations

import atexit
import contextvars
import threading
import weakref
from collections import deque
from contextlib import nullcontext
from typing import Callable

from runtime.streaming import EventQueue, Stream


class EngineLoopError(RuntimeError):
    """The engine loop stopped (it crashed, or was closed): the request cannot run."""


class _Command:
    """A function to run on the loop thread, with its answer for the thread that waits."""

    def __init__(self, fn: Callable, wait: bool, after_tick: bool = False):
        self.fn, self.after_tick = fn, after_tick
        self.done = threading.Event() if wait else None
        self.result = self.error = None

    def answer(self, result=None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        if self.done is not None:
            self.done.set()

    def outcome(self):
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.result


class EngineLoop:
    """Runs `scheduler` on a daemon thread; see the module docstring for what is safe from where.

    context: the contextvars context the thread runs in (default: a copy of the creating thread's, so a
      kernel choice made there with `runtime.dispatch` applies to the loop); scope: a context-manager
      factory entered on the thread around the whole loop (the engine passes its device and kernel choice).
    """

    def __init__(self, scheduler, scope: Callable = nullcontext, context: contextvars.Context | None = None,
                 name: str = "omni-rt-engine-loop"):
        self.scheduler = scheduler
        self.ticks = 0
        self.error: EngineLoopError | None = None  # why the loop stopped, once it has
        self._scope = scope
        self._commands: deque[_Command] = deque()
        self._after_tick: list[_Command] = []
        self._queues: dict[int, tuple[object, EventQueue]] = {}  # session id -> (session, its stream's queue)
        # Reentrant: a Stream's finalizer queues a command and may run in a garbage collection on a thread
        # that holds this lock already.
        self._wake = threading.Condition(threading.RLock())
        self._closing = self._retiring = self._stopped = False
        context = context if context is not None else contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._run,), name=name, daemon=True)
        self._thread.start()
        atexit.register(_close_at_exit, weakref.ref(self))

    # ------------------------------------------------------------------ any thread

    def submit(self, request, **submit_kwargs) -> Stream:
        """`scheduler.submit(request, **submit_kwargs)` on the loop thread -> the request's Stream. The
        scheduler's refusal (a request that cannot fit) is raised here."""

        def admit(loop: EngineLoop) -> tuple:
            session = loop.scheduler.submit(request, **submit_kwargs)
            events = EventQueue()
            events.submit_tick = loop.ticks
            loop._queues[session.id] = (session, events)
            return session, events

        session, events = self._send(admit)
        return Stream(self, session, events)

    def cancel(self, session, events: EventQueue | None = None, wait: bool = True) -> None:
        """Cancel a session (free its slot, drop its undelivered events) and end its queue. With `wait`,
        returns once the loop has done it; a loop that has stopped has nothing left to cancel."""

        def cancel(loop: EngineLoop) -> None:
            loop.scheduler.cancel(session)
            _, queue = loop._queues.pop(session.id, (None, events))
            if queue is not None:
                queue.end(cancelled=True)

        try:
            self._send(cancel, wait=wait and not self._on_loop_thread())
        except EngineLoopError:
            pass

    def abandon(self, session, events: EventQueue) -> None:
        """A Stream's finalizer: its consumer is gone. Never waits (it may run on any thread)."""
        if events.end(cancelled=True):
            self.cancel(session, events, wait=False)

    def call(self, fn: Callable, after_tick: bool = False):
        """`fn(scheduler)` on the loop thread between ticks -> its result: a consistent look at the scheduler
        from another thread. after_tick: run it after the next tick instead (right away when idle)."""
        return self._send(lambda loop: fn(loop.scheduler), after_tick=after_tick)

    def retire(self) -> None:
        """End the loop once it has nothing left to do (its engine is gone: no new requests can come, and the
        streams still open finish first). Never waits."""
        with self._wake:
            self._retiring = True
            self._wake.notify()

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop the loop: open streams end with an EngineLoopError, later submits raise one; joins the thread."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        if not self._on_loop_thread():
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return not self._stopped

    @property
    def thread(self) -> threading.Thread:
        """The loop's thread (the only one that touches the scheduler)."""
        return self._thread

    def _send(self, fn: Callable, wait: bool = True, after_tick: bool = False):
        if wait and self._on_loop_thread():
            raise RuntimeError("the engine loop's own thread cannot wait for the engine loop")
        command = _Command(fn, wait, after_tick)
        with self._wake:
            if self._stopped:
                raise self._refusal()
            self._commands.append(command)
            self._wake.notify()
        return command.outcome() if wait else None

    def _refusal(self) -> EngineLoopError:
        error = EngineLoopError(str(self.error))
        error.__cause__ = self.error.__cause__
        return error

    def _on_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    # ------------------------------------------------------------------ the loop thread

    def _run(self) -> None:
        reason = EngineLoopError("the engine loop was closed")
        try:
            with self._scope():
                while self._wait_for_work():
                    self.scheduler.step()
                    self.ticks += 1
                    self._deliver()
                    after, self._after_tick = self._after_tick, []
                    for command in after:
                        self._apply(command)
        except BaseException as crash:  # noqa: BLE001 - handed to every stream and every later submit
            reason = EngineLoopError(f"the engine loop crashed: {crash!r}")
            reason.__cause__ = crash
        finally:
            self._stop(reason)

    def _wait_for_work(self) -> bool:
        """Apply queued commands; sleep while there is nothing to step. False once closing."""
        while True:
            while self._commands:
                command = self._commands.popleft()
                if command.after_tick and not self.scheduler.idle:
                    self._after_tick.append(command)
                else:
                    self._apply(command)
            self._deliver()  # a cancel or a refused submit may have ended sessions without a tick
            with self._wake:
                if self._closing:
                    return False
                if not self.scheduler.idle:
                    return True
                if self._retiring and not self._commands:
                    return False
                if not self._commands:
                    self._wake.wait()

    def _apply(self, command: _Command) -> None:
        try:
            command.answer(command.fn(self))
        except Exception as error:  # noqa: BLE001 - the caller's error (a refused submit), raised in its thread
            command.answer(error=error)

    def _deliver(self) -> None:
        """Each session's new events into its queue; a finished session's queue ends (with its error)."""
        for session_id, (session, queue) in list(self._queues.items()):
            session.deliver_audio()  # packets whose samples reached the host during the tick (never waits)
            if session.events:
                events = []
                while session.events:
                    events.append(session.events.popleft())
                queue.put(events, self.ticks)
            if session.finished:
                queue.end(session.error if session.state == "failed" else None, session.state == "cancelled")
                del self._queues[session_id]

    def _stop(self, reason: EngineLoopError) -> None:
        with self._wake:
            self._stopped, self.error = True, reason
            pending = list(self._commands) + self._after_tick
            self._commands.clear()
            self._after_tick = []
        for command in pending:
            command.answer(error=self._refusal())
        for session, queue in self._queues.values():
            queue.end(self._refusal())
            try:  # free the slot; after a crash the scheduler may be broken, and nothing else needs it
                self.scheduler.cancel(session)
            except Exception:  # noqa: BLE001
                pass
        self._queues.clear()
        self.scheduler = None  # its caches (and graphs) go with the engine, not with this stopped loop


def _close_at_exit(loop_ref: weakref.ref) -> None:
    loop = loop_ref()
    if loop is not None and loop.running:
        loop.close(timeout=5.0)
