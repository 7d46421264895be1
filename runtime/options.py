"""Typed options: how the engine's scheduler is sized (`SchedulerConfig`) and what one request asks for
(`GenerationOptions`). Both validate on construction, so a bad value fails where it is given, before any
model work, with a message naming the field; both are frozen, so nothing changes them behind the engine's back.

    SchedulerConfig(max_sessions=8, max_seq_len=4096, prefill_chunk=512)
    GenerationOptions(max_new_tokens=256, talker_max_new_tokens=2048, speaker="ethan", audio_format="pcm16")
"""

from __future__ import annotations

from dataclasses import dataclass, fields

AUDIO_FORMATS = ("float32", "pcm16")


def _check_int(owner: str, name: str, value, minimum: int) -> None:
    # bool is an int subclass; 2.5 or "8" would otherwise pass a `>=` check and fail much later.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}.{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{owner}.{name} must be >= {minimum}, got {value}")


def _check_optional_bool(owner: str, name: str, value) -> None:
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{owner}.{name} must be True, False or None, got {value!r}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Sizing of the engine's scheduler, fixed when the engine starts serving.

    max_sessions: KV-cache slots (concurrent sessions); more requests wait for a free slot.
    max_seq_len: thinker tokens per slot (prompt + generated), at most the model's max_position_embeddings.
    prefill_chunk: prompt tokens per prefill forward (a long prompt never stalls the others for longer).
    use_graphs: replay CUDA graphs of every captured stage; None = on a GPU when the selected kernels are
      graph-safe, off elsewhere.
    static_prefill: run prefill chunks front-padded to static buckets (the form graphs capture); None = with graphs.
    """

    max_sessions: int = 8
    max_seq_len: int = 4096
    prefill_chunk: int = 512
    use_graphs: bool | None = None
    static_prefill: bool | None = None

    def __post_init__(self):
        for name in ("max_sessions", "max_seq_len", "prefill_chunk"):
            _check_int("SchedulerConfig", name, getattr(self, name), 1)
        for name in ("use_graphs", "static_prefill"):
            _check_optional_bool("SchedulerConfig", name, getattr(self, name))
        if self.use_graphs and self.static_prefill is False:
            raise ValueError("SchedulerConfig: CUDA graphs capture prefill chunks in their static form, so "
                             "use_graphs=True needs static_prefill=True (or None)")

    @classmethod
    def of(cls, value: "SchedulerConfig | dict | None") -> "SchedulerConfig":
        """A SchedulerConfig from itself, a dict of its fields (unknown keys are an error) or None (defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ValueError(f"unknown scheduler option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
            return cls(**value)
        raise TypeError(f"scheduler options must be a SchedulerConfig or a dict, got {type(value).__name__}")


@dataclass(frozen=True)
class GenerationOptions:
    """What one request asks for (the same for `generate` and `stream`).

    max_new_tokens: text tokens to generate at most (>= 1; >= 2 with speech: the talker starts once the first
      text token has been fed back).
    talker_max_new_tokens: talker steps at most; the last one emits no frame, so >= 2 for any audio.
    speaker: a voice the checkpoint knows (any case); None = the default voice.
    return_audio: speak the answer; None = whenever the checkpoint can.
    audio_format: samples of AudioChunk, "float32" in [-1, 1] or "pcm16" (stream only).
    chunk_frames: codec frames (80 ms each) per AudioChunk (stream only).
    """

    max_new_tokens: int = 128
    talker_max_new_tokens: int = 1024
    speaker: str | None = None
    return_audio: bool | None = None
    audio_format: str = "float32"
    chunk_frames: int = 1

    def __post_init__(self):
        _check_int("GenerationOptions", "max_new_tokens", self.max_new_tokens, 1)
        _check_int("GenerationOptions", "talker_max_new_tokens", self.talker_max_new_tokens, 2)
        _check_int("GenerationOptions", "chunk_frames", self.chunk_frames, 1)
        _check_optional_bool("GenerationOptions", "return_audio", self.return_audio)
        if self.speaker is not None and not isinstance(self.speaker, str):
            raise TypeError(f"GenerationOptions.speaker must be a voice name (str), got {self.speaker!r}")
        if self.audio_format not in AUDIO_FORMATS:
            raise ValueError(f"GenerationOptions.audio_format must be one of {', '.join(AUDIO_FORMATS)}, "
                             f"got {self.audio_format!r}")


@dataclass(frozen=True)
class Request:
    """One request as the scheduler takes it: a prepared prompt of one row and its options, resolved by the
    engine (speaker set and lower-cased, return_audio a bool), inputs already checked."""

    prompt: object  # runtime.engine.Prompt, batch 1, on the engine's device
    options: GenerationOptions
