"""The engine loop (runtime/engine_loop.py) and its streams: requests from many threads or coroutines, with
cancels from other threads, each give what they give alone; dropped streams free their slots within a
tick; a crash of the loop reaches every waiting stream; options are checked before any model work.

Every wait on another thread is bounded (`_within`), so a hang fails the test instead of stalling the run.
Randomness is seeded (`SEED`, printed in every failure message).
"""

import asyncio
import gc
import random
import threading

import pytest
import torch

from runtime import dispatch
from runtime.engine import OmniEngine
from runtime.engine_loop import EngineLoopError
from runtime.options import SchedulerConfig
from runtime.streaming import AudioChunk, TextDelta
from tests.oracle import build_oracle, rel_err
from tests.test_generate import audio_request, image_request

SEED = 20261201
THINKER_TOKENS, TALKER_TOKENS = 6, 9
# Waveforms of the same codes: Code2Wav runs each session's frames in batches whose size depends on who else
# is decoding, and the CPU convolutions' summation order (so their fp32 result) depends on the batch size:
# ~2e-7 relative here. Tokens and codes must match exactly.
WAVE_TOL = 1e-5
HANG_S = 120.0  # far above what any test here needs; reached only by a hang


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("odd")
    build_oracle("odd", path, seed=SEED)
    engine = OmniEngine.from_pretrained(path)
    yield engine
    engine.close()


@pytest.fixture
def serve(base):
    """serve(**scheduler options) -> a fresh engine on the same model (its own scheduler and loop), closed
    after the test."""
    engines = []

    def make(**options) -> OmniEngine:
        engines.append(OmniEngine(base.config, base.model, base.tokenizer, base.device, base.dtype, scheduler=options))
        return engines[-1]

    yield make
    for engine in engines:
        engine.close()


class Outcome:
    """What a stream delivered: text tokens, codec codes [G, frames] and samples."""

    def __init__(self, events: list):
        self.tokens = [t for e in events if isinstance(e, TextDelta) for t in e.token_ids]
        audio = [e for e in events if isinstance(e, AudioChunk)]
        self.codes = torch.cat([c.codes for c in audio], dim=-1) if audio else None
        self.wave = torch.cat([c.samples for c in audio]) if audio else torch.zeros(0)

    @property
    def frames(self) -> int:
        return 0 if self.codes is None else self.codes.shape[-1]


def assert_same(got: Outcome, want: Outcome, context: str) -> None:
    assert got.tokens == want.tokens, f"{context}: tokens {got.tokens} != alone {want.tokens}"
    assert got.frames == want.frames and (got.codes is None or torch.equal(got.codes, want.codes)), \
        f"{context}: codes differ from alone"
    assert got.wave.numel() == want.wave.numel(), f"{context}: {got.wave.numel()} samples != {want.wave.numel()}"
    if want.wave.numel():
        err = rel_err(got.wave, want.wave)
        assert err <= WAVE_TOL, f"{context}: waveform rel err {err:.2e}"


def assert_prefix(got: Outcome, want: Outcome, context: str) -> None:
    """A cancelled stream delivered a beginning of what the request gives alone, nothing else."""
    assert got.tokens == want.tokens[:len(got.tokens)], f"{context}: tokens {got.tokens} not a prefix of {want.tokens}"
    assert got.frames <= want.frames, f"{context}: more frames than alone"
    if got.frames:
        assert torch.equal(got.codes, want.codes[:, :got.frames]), f"{context}: codes not a prefix of alone"
        n = got.wave.numel()
        assert rel_err(got.wave, want.wave[:n]) <= WAVE_TOL, f"{context}: waveform not a prefix of alone"


def _within(seconds: float, fn, *args):
    """fn(*args) on a helper thread; its result, or its exception re-raised; fails if it takes longer."""
    box = {}

    def run():
        try:
            box["result"] = fn(*args)
        except BaseException as error:  # noqa: BLE001 - re-raised on the test's thread
            box["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{getattr(fn, '__name__', fn)} still running after {seconds} s (a hang)"
    if "error" in box:
        raise box["error"]
    return box["result"]


@pytest.fixture(scope="module")
def pool(base):
    """Four requests (audio, image, audio + image prompts; the last text only) and what each gives alone
    (a single stream on an otherwise idle engine). The speaking ones run at least 2 frames."""
    torch.manual_seed(SEED)
    makers = [audio_request, image_request, lambda cfg: image_request(cfg, with_audio=True)]
    requests = []
    for maker in makers:
        for _ in range(8):  # a random talker sometimes stops at once: draw another prompt
            request = dict(maker(base.config), max_new_tokens=THINKER_TOKENS, talker_max_new_tokens=TALKER_TOKENS,
                           seed=SEED + len(requests))
            alone = Outcome(_within(HANG_S, list, base.stream(**request)))
            if alone.frames >= 2:
                requests.append((request, alone))
                break
        else:
            pytest.fail(f"no prompt of {maker} spoke 2 frames in 8 draws (seed {SEED})")
    text_only = dict(audio_request(base.config), max_new_tokens=THINKER_TOKENS, return_audio=False)
    requests.append((text_only, Outcome(_within(HANG_S, list, base.stream(**text_only)))))
    return requests


def _free(engine) -> tuple[bool, list[int]]:
    """(idle, free slots) read on the loop's own thread."""
    return engine.loop.call(lambda scheduler: (scheduler.idle, sorted(scheduler.free_slots)))


# ---------------------------------------------------------------------------------------------- threads


def test_threads_with_cross_thread_cancels(serve, pool):
    """8 threads x 3 rounds, each round one stream per thread (a random request of the pool) while threads
    cancel each other's streams at random points; every stream not cancelled equals its result alone, a
    cancelled one delivered a prefix of it; afterwards every slot is free and a fresh stream equals alone."""
    engine = serve(max_sessions=4, prefill_chunk=16)
    threads, rounds = 8, 3
    open_streams: dict[int, object] = {}
    lock, start = threading.Lock(), threading.Barrier(threads)
    results, errors = [], []

    def worker(index: int) -> None:
        rng = random.Random(SEED * 100 + index)
        try:
            for round_ in range(rounds):
                start.wait(HANG_S)
                which = rng.randrange(len(pool))
                stream = engine.stream(**pool[which][0])
                with lock:
                    open_streams[index] = stream
                cancel_after = rng.randrange(1, 12) if rng.random() < 0.5 else None
                events = []
                for event in stream:
                    events.append(event)
                    if len(events) == cancel_after:
                        with lock:
                            victims = [s for i, s in open_streams.items() if i != index]
                        if victims:
                            rng.choice(victims).cancel()
                with lock:
                    open_streams.pop(index)
                results.append((index, round_, which, stream.cancelled, Outcome(events)))
        except BaseException as error:  # noqa: BLE001 - reported by the test thread
            errors.append((index, error))
            start.abort()

    workers = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(HANG_S)
    assert not any(t.is_alive() for t in workers), f"worker threads hung (seed {SEED})"
    assert not errors, f"seed {SEED}: {errors}"
    assert len(results) == threads * rounds
    for index, round_, which, cancelled, outcome in results:
        context = f"seed {SEED}, thread {index}, round {round_}, request {which}"
        (assert_prefix if cancelled else assert_same)(outcome, pool[which][1], context)
    cancelled = sum(r[3] for r in results)
    assert 1 <= cancelled < len(results), f"seed {SEED}: {cancelled} of {len(results)} cancelled"
    assert _free(engine) == (True, [0, 1, 2, 3])
    request, alone = pool[2]
    assert_same(Outcome(_within(HANG_S, list, engine.stream(**request))), alone, "fresh stream after the threads")


# ---------------------------------------------------------------------------------------------- asyncio


def test_async_streams_with_cancels(serve, pool, monkeypatch):
    """`async for` over several concurrent streams in one event loop, some cancelled by other tasks: each
    not cancelled equals alone, a cancelled one delivered a prefix of it; one left by `break`. Once every
    consumer is waiting, the loop's next tick waits for a coroutine of that event loop to run, so a consumer
    that blocked the event loop while waiting for events would hang here."""
    engine = serve(max_sessions=3)
    scheduler = engine.scheduler
    armed, gate, real_step = threading.Event(), threading.Event(), scheduler.step

    def gated_step():
        if armed.is_set():
            assert gate.wait(HANG_S), "the event loop was blocked while its streams waited"
        real_step()

    monkeypatch.setattr(scheduler, "step", gated_step)
    rng = random.Random(SEED)
    plan = [(rng.randrange(len(pool)), rng.random() < 0.4) for _ in range(6)]

    async def consume(stream, others, cancel_one):
        events = []
        async for event in stream:
            events.append(event)
            if cancel_one and len(events) == 2:
                rng.choice(others).cancel(wait=False)
        return events

    async def leave_early(stream):
        async for _ in stream:
            break
        return stream.cancelled  # already: the dropped async iterator cancelled it, no event-loop turn needed

    async def open_gate():
        await asyncio.sleep(0.05)
        gate.set()

    async def main():
        streams = [engine.stream(**pool[which][0]) for which, _ in plan]
        early = engine.stream(**pool[0][0])
        armed.set()  # from here on, engine.stream() here would wait for a tick that waits for this event loop
        tasks = [asyncio.create_task(consume(s, streams[:i] + streams[i + 1:], cancel_one))
                 for i, (s, (_, cancel_one)) in enumerate(zip(streams, plan))]
        left = asyncio.create_task(leave_early(early))
        await open_gate()
        return streams, await asyncio.gather(*tasks), await left

    streams, outcomes, left_cancelled = _within(HANG_S, asyncio.run, main())
    assert left_cancelled, "leaving an `async for` early must cancel the stream"
    for i, (stream, events) in enumerate(zip(streams, outcomes)):
        context = f"seed {SEED}, task {i}, request {plan[i][0]}"
        (assert_prefix if stream.cancelled else assert_same)(Outcome(events), pool[plan[i][0]][1], context)
    assert any(not s.cancelled for s in streams) and any(s.cancelled for s in streams), f"seed {SEED}: {plan}"
    assert _free(engine) == (True, [0, 1, 2])


# ---------------------------------------------------------------------------------------------- dropped streams


def test_dropped_streams_free_their_slots_within_a_tick(serve, pool):
    """Two long requests fill both slots; one stream is garbage-collected unread, the other left by `break`;
    two new requests get their first events within a few ticks of their submits (one prefill chunk runs per
    tick), and the dropped sessions are gone."""
    engine = serve(max_sessions=2)
    long_request = dict(pool[0][0], max_new_tokens=60, talker_max_new_tokens=60)
    dropped = engine.stream(**long_request)
    left = engine.stream(**long_request)
    for _ in left:  # one event read, then the consumer leaves
        break
    dropped_session = dropped.session
    live = engine.loop.call(lambda scheduler: [s.id for s in scheduler.live])
    assert dropped_session.id in live and not dropped_session.finished, "the dropped request should be running"
    del dropped
    gc.collect()
    # Each new request runs for more ticks than the bound below, so neither can start in a slot the other
    # has freed: both need one of the dropped ones.
    fresh = [engine.stream(**pool[i][0]) for i in (0, 1)]
    for stream, i in zip(fresh, (0, 1)):
        events = iter(stream)
        first = _within(HANG_S, next, events)
        waited = stream.first_event_tick - stream.submit_tick
        assert waited <= 3, f"a new request's first event came {waited} ticks after its submit"
        assert_same(Outcome([first] + _within(HANG_S, list, events)), pool[i][1], "request after the dropped ones")
    assert dropped_session.state == left.session.state == "cancelled"
    gone = engine.loop.call(lambda scheduler: {s.id for s in list(scheduler.live) + list(scheduler.waiting)})
    assert dropped_session.id not in gone and left.session.id not in gone
    assert _free(engine) == (True, [0, 1])


def test_close_and_context_manager_end_the_request(serve, pool):
    engine = serve(max_sessions=2)
    request = dict(pool[0][0], max_new_tokens=60, talker_max_new_tokens=60)
    with engine.stream(**request) as stream:
        events = iter(stream)
        _within(HANG_S, next, events)
        assert not stream.cancelled
    assert stream.cancelled
    stream = engine.stream(**request)
    stream.close()
    assert stream.cancelled and list(stream) == []
    _within(HANG_S, engine.loop.call, lambda scheduler: None, True)  # a tick after the close
    assert stream.session.state == "cancelled" and _free(engine) == (True, [0, 1])


# ---------------------------------------------------------------------------------------------- loop failures


def test_loop_crash_reaches_every_waiting_stream(serve, pool, monkeypatch):
    engine = serve(max_sessions=2)
    scheduler = engine.scheduler
    real_step, calls = scheduler.step, []

    def failing_step():
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("injected loop fault")
        real_step()

    monkeypatch.setattr(scheduler, "step", failing_step)
    streams = [engine.stream(**pool[i][0]) for i in (0, 1, 2)]  # two in slots, one waiting
    for stream in streams:
        with pytest.raises(EngineLoopError, match="injected loop fault") as caught:
            _within(HANG_S, list, stream)
        assert isinstance(caught.value.__cause__, RuntimeError)
    with pytest.raises(EngineLoopError, match="injected loop fault"):
        engine.stream(**pool[3][0])
    assert not engine.loop.running and engine.loop.ticks == 3


def test_close_ends_open_streams_and_refuses_new_ones(serve, pool):
    engine = serve(max_sessions=2)
    stream = engine.stream(**dict(pool[0][0], max_new_tokens=60, talker_max_new_tokens=60))
    events = iter(stream)
    _within(HANG_S, next, events)
    engine.close()
    with pytest.raises(EngineLoopError, match="closed"):
        _within(HANG_S, list, events)
    with pytest.raises(EngineLoopError, match="closed"):
        engine.stream(**pool[3][0])


def test_a_dropped_engine_finishes_its_streams_then_its_loop_ends(base, pool):
    """`OmniEngine(...).stream(...)` on a temporary engine still runs to the end; then the loop thread ends and
    lets the scheduler (its caches) go, instead of keeping them alive for the life of the process."""
    engine = OmniEngine(base.config, base.model, base.tokenizer, base.device, base.dtype)
    stream, loop = engine.stream(**pool[3][0]), engine.loop
    del engine
    gc.collect()
    assert_same(Outcome(_within(HANG_S, list, stream)), pool[3][1], "stream of a dropped engine")
    loop.thread.join(HANG_S)
    assert not loop.thread.is_alive() and loop.scheduler is None


# ---------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize("kwargs, error, field", [
    (dict(max_new_tokens=2.5), TypeError, "max_new_tokens"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
    (dict(talker_max_new_tokens=True), TypeError, "talker_max_new_tokens"),
    (dict(speaker=123), TypeError, "speaker"),
    (dict(speaker="nobody"), ValueError, "chelsie, ethan"),
    (dict(audio_format="mp3"), ValueError, "audio_format"),
    (dict(chunk_frames=0), ValueError, "chunk_frames"),
])
def test_bad_options_fail_before_any_work(serve, pool, monkeypatch, kwargs, error, field):
    engine = serve()
    calls = []
    monkeypatch.setattr(engine.model.thinker, "embed", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(engine.model.thinker.model, "forward", lambda *a, **k: calls.append(1))
    with pytest.raises(error, match=field):
        engine.stream(**dict(pool[0][0], **kwargs))
    assert not calls and engine.loop is None, "nothing may run for a refused request"


def test_scheduler_options_are_typed_and_fixed_once_serving(base, serve, pool):
    with pytest.raises(ValueError, match="max_seq_len must be >= 1, got 0"):
        serve(max_seq_len=0)
    with pytest.raises(TypeError, match="max_sessions must be an int"):
        serve(max_sessions=2.0)
    with pytest.raises(ValueError, match="thinker_steps must be >= 1, got 0"):
        serve(thinker_steps=0)
    with pytest.raises(ValueError, match="unknown scheduler option"):
        serve(max_batch=2)
    engine = serve(max_sessions=2)
    engine.scheduler_config = SchedulerConfig(max_sessions=3, prefill_chunk=32)  # not serving yet: allowed
    assert engine.scheduler_config.max_sessions == 3
    _within(HANG_S, list, engine.stream(**pool[3][0]))
    assert len(engine.scheduler.free_slots) == 3 and engine.scheduler_config.prefill_chunk == 32
    with pytest.raises(RuntimeError, match="fixed once the engine has started serving"):
        engine.scheduler_config = dict(max_sessions=4)
    assert engine.scheduler_config.max_sessions == 3


# ---------------------------------------------------------------------------------------------- kernel choice


def test_two_engines_run_their_own_kernel_choice(base, pool, monkeypatch):
    """Two engines in one process, served at the same time: the one whose choice names a probe backend for
    rms_norm runs it on its own loop thread only; the other runs torch, even when its loop is started
    from a context that selected the probe."""
    probe_threads = []
    reference = dispatch._IMPLS["rms_norm"]["torch"]

    def probe(*args):
        probe_threads.append(threading.current_thread())
        return reference(*args)

    monkeypatch.setitem(dispatch._IMPLS["rms_norm"], "probe", probe)
    shared = (base.config, base.model, base.tokenizer, base.device, base.dtype)
    plain = OmniEngine(*shared, kernels="torch")
    probed = OmniEngine(*shared, kernels={"rms_norm": "probe"})
    try:
        assert plain.kernels == dispatch.kernel_choice("torch") and probed.kernels["rms_norm"] == "probe"
        with dispatch.active({"rms_norm": "probe"}):  # the plain engine's loop starts (and copies) this context
            plain_stream = plain.stream(**pool[0][0])
        probed_stream = probed.stream(**pool[1][0])
        outcomes = _within(HANG_S, lambda: [Outcome(list(s)) for s in (plain_stream, probed_stream)])
        assert_same(outcomes[0], pool[0][1], "torch engine")
        assert_same(outcomes[1], pool[1][1], "probe engine")
        assert probe_threads and set(probe_threads) == {probed.loop.thread}
        assert dispatch.selected()["rms_norm"] == "torch", "an engine's choice leaked into the caller's context"
    finally:
        plain.close()
        probed.close()
