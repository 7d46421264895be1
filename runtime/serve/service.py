"""What the HTTP side shares: the engine, bounded admission, the open jobs, shutdown.

Admission: the engine's scheduler has `max_sessions` slots and queues what does not fit; the server admits
at most `max_sessions + max_queue` open requests and answers the next one 429 with Retry-After, so a burst
cannot pile up unbounded work. Every admitted request is a `Job` until its stream ends, however it ends
(finished, cancelled, client gone, failed, server shutting down); `release` counts its outcome once.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

from runtime.serve.errors import APIError, bad_request
from runtime.serve.metrics import Metrics


@dataclass(frozen=True)
class ServeConfig:
    model_name: str = "omni-rt"
    max_queue: int = 16
    max_body_bytes: int = 32 * 1024 * 1024
    allow_local_files: bool = False
    default_max_tokens: int = 128
    default_talker_max_new_tokens: int = 1024
    retry_after_s: int = 1
    replica_id: str | None = None  # set on a Ray Serve replica (runtime/serve/scale.py): named in /health


class Job:
    """One admitted request; `stream` is its engine stream once opened."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.stream = None
        self.abort_reason: str | None = None  # set when the server ends it (shutdown)
        self.released = False

    def abort(self, reason: str) -> None:
        self.abort_reason = reason
        if self.stream is not None:
            self.stream.cancel(wait=False)


class Service:
    def __init__(self, engine, config: ServeConfig):
        self.engine, self.config = engine, config
        self.metrics = Metrics()
        self.jobs: set[Job] = set()
        self.shutting_down = False
        self._lock = threading.Lock()

    @property
    def capacity(self) -> int:
        return self.engine.scheduler_config.max_sessions + self.config.max_queue

    def admit(self, endpoint: str) -> Job:
        with self._lock:
            if self.shutting_down:
                raise APIError(503, "the server is shutting down", code="shutting_down", kind="server_error")
            if len(self.jobs) >= self.capacity:
                self.metrics.count(endpoint, "rejected")
                raise APIError(429, f"the server is at capacity ({self.capacity} open requests); retry shortly",
                               code="rate_limit_exceeded", kind="rate_limit_error",
                               headers={"Retry-After": str(self.config.retry_after_s)})
            job = Job(endpoint)
            self.jobs.add(job)
            return job

    def release(self, job: Job, outcome: str) -> None:
        with self._lock:
            if job.released:
                return
            job.released = True
            self.jobs.discard(job)
        if job.stream is not None:
            job.stream.cancel(wait=False)  # a no-op once finished; frees the slot of anything else
            if outcome == "ok":
                self.metrics.observe(job.stream.timings)
        self.metrics.count(job.endpoint, "shutdown" if job.abort_reason and outcome != "ok" else outcome)

    async def open_stream(self, job: Job, **kwargs):
        """engine.stream(**kwargs) off the event loop (it waits for the loop thread to queue the request)."""
        try:
            stream = await asyncio.to_thread(self.engine.stream, **kwargs)
        except (ValueError, TypeError) as err:  # the engine's checks: the message names its option
            message = str(err)
            param = ("omni.talker_max_new_tokens" if "talker_max_new_tokens" in message
                     else "max_tokens" if "max_new_tokens" in message else "messages")
            raise bad_request(message, param) from None
        job.stream = stream
        if job.abort_reason is not None:  # shutdown began while it was being queued
            stream.cancel(wait=False)
        return stream

    def begin_shutdown(self) -> None:
        """Refuse new requests and end every open one (its client gets a final error event)."""
        with self._lock:
            self.shutting_down = True
            jobs = list(self.jobs)
        for job in jobs:
            job.abort("the server is shutting down")

    def slots(self) -> dict:
        """Slots in use and sessions waiting, read on the engine loop's thread between ticks (blocks briefly)."""
        total = self.engine.scheduler_config.max_sessions
        loop = self.engine.loop
        in_use = waiting = 0
        if loop is not None:
            try:
                in_use, waiting = loop.call(lambda s: (total - len(s.free_slots), len(s.waiting)))
            except RuntimeError:  # the loop has stopped: nothing holds a slot
                pass
        return {"total": total, "in_use": in_use, "free": total - in_use, "waiting": waiting,
                "open_requests": len(self.jobs)}
