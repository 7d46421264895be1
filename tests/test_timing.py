"""Honest per-stage timers and packets on the host (runtime/timing.py, StreamTimings, HostCopy): spans are read
only once complete, in order, without waiting unless asked; a packet is queued (and first_packet stamped) only once
its samples are on the host. CPU tests use stand-in spans and copies; the CUDA-event versions need a GPU."""

import time
from types import SimpleNamespace

import pytest
import torch

import runtime.session as session_module
from runtime.session import Session, TalkerProgress
from runtime.streaming import AudioChunk, HostCopy, StreamTimings, pcm16
from runtime.timing import CpuSpan, StageTimer

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CUDA events, pinned copies)")


class _Span:
    """A stand-in span whose completion the test decides."""

    def __init__(self, seconds: float, done: bool = False):
        self._seconds, self.finished, self.waited = seconds, done, False

    def done(self) -> bool:
        return self.finished

    def wait(self) -> None:
        self.waited = self.finished = True

    def seconds(self) -> float:
        assert self.finished, "read before it completed"
        return self._seconds


def _stopped() -> CpuSpan:
    span = CpuSpan()
    span.stop()
    return span


def test_cpu_span_measures_the_work():
    timer = StageTimer(cuda_events=False)
    span = timer.start()
    assert not span.done()
    time.sleep(0.02)
    span.stop()
    assert span.done() and 0.015 <= span.seconds() < 1.0
    assert isinstance(StageTimer.for_device("cpu").start(), CpuSpan)


def test_timings_read_spans_in_order_once_complete():
    timings = StreamTimings()
    first, second, third = _Span(0.5), _Span(0.25), _Span(0.125)
    timings.add_span("code_predictor_per_frame", first)
    timings.add_span("talker_first_frame", first)
    timings.add_span("code2wav_per_frame", second)
    timings.add_span("code_predictor_per_frame", third)
    clock = iter([1.5, 2.5, 3.5])
    timings.resolve(lambda: next(clock))
    assert timings.code_predictor_per_frame == [] and timings.talker_first_frame is None  # nothing done yet
    third.finished = True  # done out of order: still waits for the earlier ones
    timings.resolve(lambda: next(clock))
    assert timings.code_predictor_per_frame == [] and timings.code2wav_per_frame == []
    first.finished = True
    timings.resolve(lambda: next(clock))
    assert timings.code_predictor_per_frame == [0.5] and timings.talker_first_frame == 1.5
    assert timings.code2wav_per_frame == [] and not second.waited  # never waited without `wait`
    timings.resolve(lambda: next(clock), wait=True)
    assert second.waited and timings.code2wav_per_frame == [0.25]
    assert timings.code_predictor_per_frame == [0.5, 0.125] and not timings.pending


class _SlowCopy:
    """HostCopy whose copy completes when the test says so."""

    made: list = []

    def __init__(self, *tensors):
        self.host, self.arrived = tuple(t.clone() for t in tensors), False
        _SlowCopy.made.append(self)

    def ready(self):
        return self.arrived

    def wait(self):
        self.arrived = True
        return self.host


def _speaking_session(chunk_frames: int, audio_format: str = "float32") -> Session:
    options = SimpleNamespace(chunk_frames=chunk_frames, audio_format=audio_format, max_new_tokens=4,
                              talker_max_new_tokens=9, return_audio=True)
    request = SimpleNamespace(options=options, prompt=SimpleNamespace(input_ids=torch.zeros(1, 3, dtype=torch.long)))
    session = Session(0, request, None, eos_token_id=1, codec_eos_token_id=2, sample_rate=24000)
    session.talker = TalkerProgress(5)
    return session


def test_a_packet_is_sent_once_its_samples_are_on_the_host(monkeypatch):
    monkeypatch.setattr(session_module, "HostCopy", _SlowCopy)
    _SlowCopy.made = []
    session = _speaking_session(chunk_frames=2)
    generator = torch.Generator().manual_seed(5)
    frames = [torch.randn(7, generator=generator) for _ in range(5)]
    codes = torch.arange(15).reshape(5, 3)
    for k in range(4):
        session.add_frame(codes[k], frames[k], _stopped(), _stopped())
    # each frame's copy starts as it is added (its slot's state is overwritten by the next frame)
    assert len(_SlowCopy.made) == 4 and not session.events and session.timings.first_packet is None
    _SlowCopy.made[2].arrived = _SlowCopy.made[3].arrived = True  # the second packet is there, the first not:
    session.deliver_audio()  # order is kept
    assert not session.events
    _SlowCopy.made[0].arrived = True  # half of the first packet
    session.deliver_audio()
    assert not session.events
    _SlowCopy.made[1].arrived = True
    session.deliver_audio()
    chunks = list(session.events)
    assert [type(c) for c in chunks] == [AudioChunk, AudioChunk]
    assert session.timings.first_packet is not None and session.timings.first_packet == chunks[0].time
    assert torch.equal(torch.cat([c.samples for c in chunks]), torch.cat(frames[:4]))
    assert [c.start_sample for c in chunks] == [0, 14] and [c.frame for c in chunks] == [1, 3]
    assert torch.equal(chunks[1].codes, codes[2:4].T)
    session.add_frame(codes[4], frames[4], _stopped(), _stopped())
    session.end_speech()  # the last, short packet: delivered by the finish, which waits for it
    session.release("finished")
    assert torch.equal(session.events[-1].samples, frames[4])
    assert len(session.timings.code_predictor_per_frame) == len(session.timings.code2wav_per_frame) == 5


def test_a_cancel_drops_packets_on_their_way(monkeypatch):
    monkeypatch.setattr(session_module, "HostCopy", _SlowCopy)
    session = _speaking_session(chunk_frames=1, audio_format="pcm16")
    session.add_frame(torch.zeros(3, dtype=torch.long), torch.full((4,), 0.5), _stopped(), _stopped())
    session.release("cancelled")
    assert not session.events and not session.audio_pending and session.timings.first_packet is None


def test_pcm16_packets_are_made_on_the_host_from_the_float_frames(monkeypatch):
    monkeypatch.setattr(session_module, "HostCopy", _SlowCopy)
    _SlowCopy.made = []
    session = _speaking_session(chunk_frames=2, audio_format="pcm16")
    frames = [torch.rand(6, generator=torch.Generator().manual_seed(k)) * 2.4 - 1.2 for k in range(2)]  # some clip
    for k, frame in enumerate(frames):
        session.add_frame(torch.full((3,), k), frame, _stopped(), _stopped())
    assert all(copy.host[0].dtype == torch.float32 for copy in _SlowCopy.made)  # copied out as made
    session.release("finished")
    (chunk,) = session.events
    assert chunk.samples.dtype == torch.int16 and torch.equal(chunk.samples, pcm16(torch.cat(frames)))
    assert torch.equal(chunk.codes, torch.tensor([[0, 1]] * 3))


def test_a_host_copy_on_the_cpu_is_a_copy():
    """The frame's tensors are views of its slot's state, which the next frame overwrites: the copy keeps them."""
    samples, codes = torch.randn(9, generator=torch.Generator().manual_seed(3)), torch.arange(6).view(3, 2)
    copy = HostCopy(samples, codes)
    want = samples.clone(), codes.clone()
    samples.add_(1), codes.add_(1)  # the next frame
    host_samples, host_codes = copy.wait()
    assert copy.ready() and torch.equal(host_samples, want[0]) and torch.equal(host_codes, want[1])


@needs_cuda
def test_a_packet_arrives_in_pinned_memory_after_its_event():
    samples = torch.randn(24000, generator=torch.Generator().manual_seed(3))
    pcm = (samples.clamp(-1, 1) * 32767).round().to(torch.int16)
    codes = torch.arange(32).view(16, 2)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(50_000_000)  # keep the stream busy: the copies are queued behind it, the host goes on
        copy = HostCopy(pcm.cuda(), codes.cuda())
        assert all(t.is_pinned() and t.device.type == "cpu" for t in copy.host)
    host, host_codes = copy.wait()
    assert copy.ready() and host.dtype == torch.int16 and torch.equal(host, pcm) and torch.equal(host_codes, codes)


@needs_cuda
def test_cuda_span_measures_gpu_time_not_launch_time():
    timer = StageTimer.for_device("cuda")
    stream = torch.cuda.Stream()
    ones = torch.ones(8, device="cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        launch = time.perf_counter()
        before = timer.start()
        torch.cuda._sleep(20_000_000)  # ~10 ms of GPU time, launched in microseconds
        before.stop()
        launch = time.perf_counter() - launch  # what perf_counter around the call would have reported
        after = timer.start()  # a stage queued behind the sleep: its own time only, not the wait for it
        ones.sum()
        after.stop()
    assert not after.done()  # asking never waits
    assert before.seconds() > 0.002 and before.seconds() > 2 * launch
    assert after.done() and after.seconds() < before.seconds() / 5
