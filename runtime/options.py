"""Typed options: how the engine's scheduler is sized (`SchedulerConfig`) and what one request asks for
(`GenerationOptions`). Both validate on construction, so a bad value fails where it is given, before any
model work, with a message naming the field; both are frozen, so nothing changes them behind the engine's back.

    SchedulerConfig(max_sessions=8, max_seq_len=4096, prefill_chunk=512, thinker_steps=4)
    GenerationOptions(max_new_tokens=256, talker_max_new_tokens=2048, speaker="ethan", audio_format="pcm16")
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import secrets

from runtime.sampling import SamplingParams, StageSampling, code_predictor_for

AUDIO_FORMATS = ("float32", "pcm16")
VISION_GRAPH_MIN = 16  # the smallest captured vision bucket, in patches (runtime/runner.py)
SAMPLING_FIELDS = ("do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty")
STAGE_PREFIXES = {"thinker": "", "talker": "talker_", "code_predictor": "code_predictor_"}
# generate / stream keywords, as transformers names them: do_sample, talker_top_k, code_predictor_top_p, ...
SAMPLING_KEYWORDS = tuple(prefix + name for prefix in STAGE_PREFIXES.values() for name in SAMPLING_FIELDS) + ("seed",)


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
    thinker_steps: thinker decode steps per tick at most, on ticks without talker work (text-only sessions, a text
      that outlasts its speech): several steps per blocking read. A tick with talker work, or one that makes a
      first packet, does one (runtime/scheduler.py says why).
    max_vision_patches: the largest image or video frame, in patches, whose vision encoder runs in the captured
      static form (one bucket per power of two from 16 up to it); a larger frame is encoded eagerly.
    """

    max_sessions: int = 8
    max_seq_len: int = 4096
    prefill_chunk: int = 512
    use_graphs: bool | None = None
    static_prefill: bool | None = None
    thinker_steps: int = 4
    max_vision_patches: int = 16384

    def __post_init__(self):
        for name in ("max_sessions", "max_seq_len", "prefill_chunk", "thinker_steps"):
            _check_int("SchedulerConfig", name, getattr(self, name), 1)
        _check_int("SchedulerConfig", "max_vision_patches", self.max_vision_patches, VISION_GRAPH_MIN)
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
    thinker, talker, code_predictor: how each stage picks its tokens (runtime.sampling.SamplingParams); None =
      the checkpoint's generation_config.json, else the released defaults (the engine resolves them).
    seed: the request's random seed (0 <= seed < 2**63); its sampled output depends on nothing else (not on the
      sessions beside it, nor on generate vs stream). None = a fresh seed drawn per request.
    """

    max_new_tokens: int = 128
    talker_max_new_tokens: int = 1024
    speaker: str | None = None
    return_audio: bool | None = None
    audio_format: str = "float32"
    chunk_frames: int = 1
    thinker: SamplingParams | None = None
    talker: SamplingParams | None = None
    code_predictor: SamplingParams | None = None
    seed: int | None = None

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
        for stage in STAGE_PREFIXES:
            value = getattr(self, stage)
            if value is not None and not isinstance(value, SamplingParams):
                raise TypeError(f"GenerationOptions.{stage} must be a runtime.sampling.SamplingParams or None, "
                                f"got {value!r}")
        if self.seed is not None:
            _check_int("GenerationOptions", "seed", self.seed, 0)
            if self.seed >= 2 ** 63:
                raise ValueError(f"GenerationOptions.seed must be < 2**63, got {self.seed}")


def sampling_options(defaults: StageSampling, **keywords) -> dict:
    """generate / stream sampling keywords (SAMPLING_KEYWORDS: `temperature`, `talker_top_k`,
    `code_predictor_do_sample`, ..., `seed`) -> GenerationOptions fields (thinker, talker, code_predictor, seed):
    each stage's keywords override its `defaults`; a stage given none keeps None (the engine's defaults). The code
    predictor follows `talker_do_sample` when it is given and `code_predictor_do_sample` is not, as transformers
    does. Unknown keywords are a TypeError naming them."""
    unknown = sorted(set(keywords) - set(SAMPLING_KEYWORDS))
    if unknown:
        raise TypeError(f"unknown keyword argument(s) {', '.join(unknown)}; sampling keywords: "
                        f"{', '.join(SAMPLING_KEYWORDS)}")
    out = {"seed": keywords.get("seed")}
    for stage, prefix in STAGE_PREFIXES.items():
        given = {name: keywords[prefix + name] for name in SAMPLING_FIELDS if keywords.get(prefix + name) is not None}
        if stage == "code_predictor" and "do_sample" not in given and keywords.get("talker_do_sample") is not None:
            given["do_sample"] = bool(keywords["talker_do_sample"])
        if not given:
            out[stage] = None
            continue
        try:
            out[stage] = replace(getattr(defaults, stage), **given)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{stage} sampling: {error}") from error
    return out


def resolve_sampling(options: GenerationOptions, defaults: StageSampling) -> GenerationOptions:
    """Every stage's SamplingParams set (a stage left None takes `defaults`; a code predictor left None follows
    a given talker's do_sample) and a seed: the given one, else a fresh one from the OS's generator."""
    talker = options.talker or defaults.talker
    code_predictor = options.code_predictor or (code_predictor_for(talker) if options.talker is not None
                                                else defaults.code_predictor)
    seed = options.seed if options.seed is not None else secrets.randbits(63)
    return replace(options, thinker=options.thinker or defaults.thinker, talker=talker,
                   code_predictor=code_predictor, seed=seed)


@dataclass(frozen=True)
class Request:
    """One request as the scheduler takes it: a prepared prompt of one row and its options, resolved by the
    engine (speaker set and lower-cased, return_audio a bool), inputs already checked."""

    prompt: object  # runtime.engine.Prompt, batch 1, on the engine's device
    options: GenerationOptions
