"""Streaming generation of one request: text deltas and 80 ms audio packets as soon as each is ready.

The thinker, the talker and Code2Wav are interleaved instead of run one after another:

    thinker prefill + t1 ─► talker prefill (MODEL_SPEC §8.3: it needs only the prompt's states and t1)
    per frame k: code 0 ─► code predictor ─► Code2Wav.decode_step (emits the frame's final samples)
                 the next talker input needs the text of frame k: t_{k+2}, or tts_eos / tts_pad once the
                 thinker has stopped, so the thinker is stepped just far enough ahead
    the thinker's remaining text streams after the talker stops.

With greedy decoding everything equals the offline `OmniEngine.generate`: the same tokens, the same codes,
and the audio of the single full decode (Code2Wav's stream decodes every frame once, carrying its state).
This is the eager path (CPU and GPU); static caches and CUDA graphs replace its steps on a GPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from runtime.frontend.tokenizer import StreamingDecoder
from runtime.generate import ThinkerGeneration, ThinkerStepper
from runtime.models.talker import code0_suppress_mask
from runtime.speech import talker_position_ids


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


class _TextForFrames:
    """The talker's text input per frame, computed from the thinker's tokens as they arrive; equal to
    `TalkerPrompt.text_for_frame` of the offline prompt built from the finished generation:
    frame k takes P(t_{k+2}) while t_{k+2} is a fed token, tts_eos where the generation ended (its last token,
    EOS or the max-token cut), tts_pad after that."""

    def __init__(self, talker, thinker, config, stepper: ThinkerStepper, prompt_len: int, on_token):
        self.talker, self.stepper, self.prompt_len, self.on_token = talker, stepper, prompt_len, on_token
        special = torch.tensor([config.tts_eos_token_id, config.tts_pad_token_id], device=stepper.sequences.device)
        self.tts_eos, self.tts_pad = talker.project_text(thinker.model.embed_tokens(special))
        self.embed = thinker.model.embed_tokens

    def __call__(self, frame: int) -> torch.Tensor:
        wanted = frame + 2  # generated token index (1-based) this frame reads
        while self.stepper.generated < wanted and not self.stepper.done:
            self.on_token(self.stepper.step())
        generated = self.stepper.generated
        if wanted < generated or (wanted == generated and not self.stepper.done):
            token = self.stepper.sequences[:, self.prompt_len + wanted - 1]
            return self.talker.project_text(self.embed(token))  # [1, H]
        return (self.tts_eos if wanted == generated else self.tts_pad)[None]


class Stream:
    """Iterate for TextDelta / AudioChunk events; `timings` fills in as the request runs."""

    def __init__(self, events: Iterator[TextDelta | AudioChunk], timings: StreamTimings):
        self._events, self.timings = events, timings

    def __iter__(self) -> Iterator[TextDelta | AudioChunk]:
        return self._events

    def cancel(self) -> None:
        """Stop the request now; its caches are released with the generator."""
        self._events.close()


def stream_request(engine, prompt, *, speaker: str, max_new_tokens: int, talker_max_new_tokens: int,
                   return_audio: bool, audio_format: str = "float32", chunk_frames: int = 1,
                   started: float | None = None, timings: StreamTimings | None = None) -> Iterator[TextDelta | AudioChunk]:
    """Check the request (before any model work), then return the generator of its events (batch 1)."""
    if prompt.input_ids.shape[0] != 1:
        raise ValueError(f"streaming takes one request at a time, got a batch of {prompt.input_ids.shape[0]}")
    if audio_format not in ("float32", "pcm16"):
        raise ValueError(f"audio_format must be 'float32' or 'pcm16', got {audio_format!r}")
    if chunk_frames < 1:
        raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
    cfg = engine.config
    stepper = ThinkerStepper(
        engine.model.thinker, prompt.input_ids, prompt.attention_mask, max_new_tokens=max_new_tokens,
        eos_token_id=cfg.im_end_token_id, hidden_layer=cfg.talker.accept_hidden_layer if return_audio else None,
        **vars(prompt.inputs))
    return _events(engine, prompt, stepper, speaker, talker_max_new_tokens, return_audio, audio_format,
                   chunk_frames, time.perf_counter() if started is None else started, timings or StreamTimings())


def _events(engine, prompt, stepper, speaker, talker_max_new_tokens, return_audio, audio_format, chunk_frames,
            started, timings) -> Iterator[TextDelta | AudioChunk]:
    cfg = engine.config
    decoder = StreamingDecoder(engine.tokenizer) if engine.tokenizer is not None else None
    pending: list[TextDelta] = []

    def on_token(tokens: torch.Tensor) -> None:
        now = time.perf_counter() - started
        if timings.thinker_first_token is None:
            timings.thinker_first_token = now
        token = int(tokens[0])
        if token == cfg.im_end_token_id:
            return
        pending.append(TextDelta(decoder.push(token) if decoder else "", [token], now))

    def drain() -> Iterator[TextDelta]:
        while pending:
            yield pending.pop(0)

    if not stepper.done:
        on_token(stepper.step())
    yield from drain()
    if return_audio and not stepper.done:  # t1 was fed (not EOS): the talker can start
        yield from _speak(engine, prompt, stepper, speaker, talker_max_new_tokens, audio_format, chunk_frames,
                          started, timings, on_token, drain)
    while not stepper.done:
        on_token(stepper.step())
        yield from drain()
    if decoder is not None:
        tail = decoder.flush()
        if tail:
            yield TextDelta(tail, [], time.perf_counter() - started)
    timings.total = time.perf_counter() - started


@torch.inference_mode()
def _speak(engine, prompt, stepper: ThinkerStepper, speaker, max_frames, audio_format, chunk_frames, started,
           timings, on_token, drain) -> Iterator[TextDelta | AudioChunk]:
    cfg, model = engine.config, engine.model
    talker, code2wav, thinker = model.talker, model.code2wav, model.thinker
    length = prompt.input_ids.shape[1]
    # The talker prefill needs the prompt's states and t1; t1 is a text token, so its embedding is its
    # token embedding and its accept-layer state is never read (only user-turn positions use those).
    fed = stepper.result()
    t1 = stepper.sequences[:, length:length + 1]
    so_far = ThinkerGeneration(
        stepper.sequences[:, :length + 1],
        torch.cat((fed.embeddings[:, :length], thinker.model.embed_tokens(t1)), dim=1),
        torch.cat((fed.accepted_hidden[:, :length], fed.accepted_hidden.new_zeros(1, 1, fed.accepted_hidden.shape[-1])), dim=1))
    talker_prompt = talker.build_prompt(cfg, prompt.input_ids, so_far.sequences, so_far.embeddings,
                                        so_far.accepted_hidden, thinker.model.embed_tokens, speaker,
                                        prompt.attention_mask)
    inputs = prompt.inputs
    positions = talker_position_ids(talker_prompt, cfg, inputs.image_grid_thw, inputs.video_grid_thw,
                                    inputs.audio_frames(), inputs.video_second_per_grid, inputs.use_audio_in_video)
    text_for_frame = _TextForFrames(talker, thinker, cfg, stepper, length, on_token)
    suppress = code0_suppress_mask(talker.cfg, positions.device)
    cache, mask = talker.new_cache(), talker_prompt.attention_mask
    logits, hidden = talker(talker_prompt.inputs_embeds, positions, mask, cache, num_logits_to_keep=1)
    positions = positions[:, :, -1:]
    state = code2wav.new_state(1, device=hidden.device, dtype=hidden.dtype)
    emitted, waiting = 0, []  # waiting: frames not yet given to Code2Wav, [G] each

    def decode(last_frame: int) -> AudioChunk:
        nonlocal emitted
        codes = torch.stack(waiting, dim=-1)  # [G, n]
        tick = time.perf_counter()
        samples = code2wav.decode_step(codes[None], state)[0, 0].float()  # [samples these frames made final]
        timings.code2wav_per_frame.append((time.perf_counter() - tick) / len(waiting))
        now = time.perf_counter() - started
        if timings.first_packet is None and samples.numel():
            timings.first_packet = now
        chunk = AudioChunk(_format(samples, audio_format), code2wav.cfg.SAMPLE_RATE, last_frame, codes, emitted, now)
        emitted += samples.numel()
        timings.audio_seconds = emitted / code2wav.cfg.SAMPLE_RATE
        waiting.clear()
        return chunk

    for frame in range(max_frames):
        code0 = logits[:, -1].masked_fill(suppress, float("-inf")).argmax(-1)  # [1]
        if int(code0) == talker.cfg.codec_eos_token_id or frame == max_frames - 1:
            break  # same frame accounting as runtime.speech.talker_generate
        tick = time.perf_counter()
        codes = talker.predict_frame(hidden[:, -1], code0)  # [1, G]
        timings.code_predictor_per_frame.append(time.perf_counter() - tick)
        if timings.talker_first_frame is None:
            timings.talker_first_frame = time.perf_counter() - started
        waiting.append(codes[0])
        if len(waiting) == chunk_frames:
            yield decode(frame)
        text = text_for_frame(frame)
        yield from drain()
        mask = torch.cat((mask, mask.new_ones(1, 1)), dim=1)
        positions = positions + 1
        logits, hidden = talker(talker.frame_input(codes, text), positions, mask, cache)
    if waiting:
        yield decode(frame - 1)
    code2wav.flush(state)


def _format(samples: torch.Tensor, audio_format: str) -> torch.Tensor:
    if audio_format == "pcm16":
        return (samples.clamp(-1, 1) * 32767).round().to(torch.int16)
    return samples
