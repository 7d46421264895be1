"""`request_options(body, engine, ...)`: the one place where a request's OpenAI fields (max_tokens, audio,
modalities, temperature, top_p, seed) and omni-rt's extension field `omni` (talker options) become
`engine.stream` keywords. The sampling fields become the engine's sampling keywords (runtime/options.py
SAMPLING_KEYWORDS; README "Sampling"): `temperature` / `top_p` sample the thinker (temperature 0 is greedy), the
`omni.talker_*` fields the talker; fields left out keep the checkpoint's defaults. `seed` makes a request
reproducible: the same seed gives the same answer whatever else the server runs; none draws a fresh one."""

from __future__ import annotations

from dataclasses import dataclass, field

from runtime.options import SAMPLING_KEYWORDS
from runtime.serve.errors import bad_request
from runtime.serve.schemas import AUDIO_OUT_FORMATS

DEFAULT_VOICE = "ethan"
# OpenAI field (dotted) -> (engine.stream keyword, the do_sample keyword it turns on, or None).
SAMPLING_FIELDS = {
    "temperature": ("temperature", "do_sample"),
    "top_p": ("top_p", "do_sample"),
    "omni.talker_temperature": ("talker_temperature", "talker_do_sample"),
    "omni.talker_top_p": ("talker_top_p", "talker_do_sample"),
    "omni.talker_top_k": ("talker_top_k", "talker_do_sample"),
    "omni.talker_repetition_penalty": ("talker_repetition_penalty", None),
}


@dataclass
class RequestOptions:
    stream_kwargs: dict = field(default_factory=dict)  # keywords for engine.stream besides the prompt
    speaks: bool = False
    voice: str = DEFAULT_VOICE
    audio_format: str = "wav"  # what the client gets: streamed deltas are always pcm16
    max_tokens: int = 128


def _get(body: dict, dotted: str):
    value = body
    for key in dotted.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def request_options(body: dict, engine, *, streaming: bool, default_max_tokens: int = 128,
                    default_talker_max_new_tokens: int = 1024) -> RequestOptions:
    """body: the request's fields as a dict in OpenAI names (chat: the validated request's model_dump();
    realtime: the session and response fields mapped to the same names)."""
    out = RequestOptions()
    kwargs = out.stream_kwargs
    for name, (keyword, samples) in SAMPLING_FIELDS.items():
        value = _get(body, name)
        if value is None:
            continue
        assert keyword in SAMPLING_KEYWORDS, keyword
        kwargs[keyword] = value
        if samples is not None:  # asking for a temperature or top-p asks for sampling (temperature 0: greedy)
            kwargs[samples] = True
    if body.get("seed") is not None:
        seed = body["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise bad_request(f"seed must be an integer, got {seed!r}", "seed")
        kwargs["seed"] = seed % 2 ** 63  # OpenAI seeds may be negative; ours are in [0, 2**63)

    if body.get("n") not in (None, 1):
        raise bad_request("n must be 1: one choice per request", "n", "unsupported_value")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    out.max_tokens = body.get(name) or default_max_tokens
    limit = engine.scheduler_config.max_seq_len - 1
    if out.max_tokens > limit:
        raise bad_request(f"{name}={out.max_tokens} is more than this server's context allows ({limit})", name)

    modalities = body.get("modalities") or ["text"]
    out.speaks = "audio" in modalities
    if out.speaks and not engine.model.has_audio_output:
        raise bad_request("this checkpoint cannot speak (no talker): use modalities ['text']", "modalities")
    audio = body.get("audio") or {}
    voice = audio.get("voice") or DEFAULT_VOICE
    voices = engine.config.talker.speaker_id
    if voice.lower() not in voices:
        raise bad_request(f"unknown voice {voice!r}; this model has: {', '.join(sorted(voices))}", "audio.voice")
    out.voice = voice.lower()
    out.audio_format = audio.get("format") or ("pcm16" if streaming else "wav")
    if out.audio_format not in AUDIO_OUT_FORMATS:
        raise bad_request(f"unsupported audio format {out.audio_format!r}; supported: {', '.join(AUDIO_OUT_FORMATS)}",
                          "audio.format")
    if streaming and out.speaks and out.audio_format != "pcm16":
        raise bad_request("streamed audio is sent as pcm16 deltas: use audio.format 'pcm16' with stream=true",
                          "audio.format")
    if out.speaks and out.max_tokens < 2:
        raise bad_request("speech needs max_tokens >= 2 (the talker starts after the first text token)", name)

    omni = body.get("omni") or {}
    kwargs.update(max_new_tokens=out.max_tokens, return_audio=out.speaks, speaker=out.voice,
                  talker_max_new_tokens=omni.get("talker_max_new_tokens") or default_talker_max_new_tokens,
                  audio_format="pcm16", chunk_frames=omni.get("chunk_frames") or 1)
    return out
