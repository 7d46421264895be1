"""Streaming output of a request: the events it yields (text deltas and 80 ms audio packets, as soon as each
is ready) and its timing record. runtime/scheduler.py produces them; `Stream` drives the scheduler while its
consumer iterates.

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

from dataclasses import dataclass, field
from typing import Iterator

import torch



@dataclass
class TextDelta:
    text: str  # newly completed text ("" without a tokenizer or inside a multi-byte character)
    token_ids: list[int]  # the tokens this delta covers
    time: float  # seconds since the request started


@dataclass
class AudioChunk:
    samples: torch.Tensor  # [n] float32 in [-1, 1] at `sample_rate`, or int16 PCM with audio_format="pcm16"
    sample_rate: int
    frame: int  # index of the last codec frame these samples complete
    codes: torch.Tensor  # [G, frames in this chunk] int64: the codec codes decoded into these samples
    start_sample: int  # offset of samples[0] in the utterance
    time: float  # seconds since the request started


@dataclass
class StreamTimings:
    """The paper's Table 2 rows for one request (seconds)."""

    preprocess: float = 0.0
    thinker_first_token: float | None = None  # request start -> first text token
    talker_first_frame: float | None = None  # request start -> first codec frame (code 0 .. G−1)
    first_packet: float | None = None  # request start -> first audio samples out
    code_predictor_per_frame: list[float] = field(default_factory=list)
    code2wav_per_frame: list[float] = field(default_factory=list)
    total: float = 0.0
    audio_seconds: float = 0.0

    @property
    def rtf(self) -> float | None:
        """Generation real-time factor: wall time / seconds of audio produced."""
        return self.total / self.audio_seconds if self.audio_seconds else None


class Stream:
    """Iterate for TextDelta / AudioChunk events; `timings` fills in as the request runs.

    Iterating advances the engine's scheduler, so streams consumed side by side (or one after another) run
    concurrently in its slots. A failed request raises its error here; the scheduler goes on serving."""

    def __init__(self, scheduler, session):
        self.scheduler, self.session, self.timings = scheduler, session, session.timings

    def __iter__(self) -> Iterator[TextDelta | AudioChunk]:
        session = self.session
        while True:
            while session.events:
                yield session.events.popleft()
            if session.finished:
                if session.state == "failed":
                    raise session.error
                return
            self.scheduler.step()

    def cancel(self) -> None:
        """Stop the request now and free its slot; other requests are unaffected."""
        self.scheduler.cancel(self.session)


def pcm16(samples: torch.Tensor) -> torch.Tensor:
    """float samples in [-1, 1] -> int16 PCM (clipped)."""
    return (samples.clamp(-1, 1) * 32767).round().to(torch.int16)


def consume_together(streams: list[Stream]) -> list[list[TextDelta | AudioChunk]]:
    """Consume several streams side by side, one event of each in turn, until all have ended; returns each
    stream's events. (They share the engine's scheduler, so this runs them concurrently.)"""
    iterators = [iter(stream) for stream in streams]
    events: list[list] = [[] for _ in streams]
    live = list(range(len(streams)))
    while live:
        for i in list(live):
            try:
                events[i].append(next(iterators[i]))
            except StopIteration:
                live.remove(i)
    return events
