"""One request in the engine: its progress through the thinker and the talker, and the rules that are per
request (one definition each, for `generate` and `stream` alike):

- the thinker's stop rule: EOS, or `max_new_tokens` tokens;
- the text of each talker frame: the talker input after frame k carries t_{k+2} while that is a fed token,
  tts_eos for the generation's last token, tts_pad after it (MODEL_SPEC §8.3): read on the device
  (runtime/decode_inputs.py) once `text_ready`, its end written there once (ModelRunner.end_text);
- the frame stop rule: codec EOS as code 0, or the talker's last allowed step (which emits no frame, as
  transformers counts them: `talker_max_new_tokens` steps give at most `talker_max_new_tokens − 1` frames);
- packets: each frame's codes and samples are copied to the host as it stands (without blocking: its slot's
  state holds them only until the next frame); every `chunk_frames` frames (and the rest at the end) become one
  AudioChunk (float32, or pcm16 made on the host), sent once its frames are there (`deliver_audio`);
- timings (runtime.streaming.StreamTimings).

The scheduler (runtime/scheduler.py) decides when a session advances; the runner (runtime/runner.py) runs the
model. Events (TextDelta / AudioChunk) queue up in `events` as ticks produce them.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from runtime.frontend.tokenizer import StreamingDecoder
from runtime.options import Request
from runtime.prefill import PromptEmbedding
from runtime.streaming import AudioChunk, HostCopy, StreamTimings, TextDelta, pcm16


@dataclass
class ThinkerProgress:
    prompt_len: int
    prefilled: int = 0  # prompt tokens through the decoder so far
    prompt: PromptEmbedding | None = None  # while prefilling
    states: list = field(default_factory=list)  # talker-prompt states per prefill chunk (speech), [1, n, H] pairs
    tokens: list[int] = field(default_factory=list)  # generated so far
    next_token: torch.Tensor | None = None  # [1] the first token on the device (its embedding starts the talker)
    done: bool = False


@dataclass
class TalkerProgress:
    prompt_len: int  # talker prompt positions (the last fed input's position is on the device: TalkerInputs)
    drawn: bool = False  # a code 0 is sampled (on the device: TalkerInputs) and not read yet
    code0_value: int | None = None  # that code 0 on the host (the tick's read-back), None until read
    ready: bool = False  # the last frame stands: the next talker step may run once its text is ready
    frame: int = 0  # frames produced
    waiting: list = field(default_factory=list)  # frames not sent yet: a HostCopy of (samples [n], codes [G]) each
    emitted: int = 0  # samples sent so far
    # the next frame, made before its code 0 was read (runtime/speech.py make_frames): ((codes [G], samples [n]) in
    # its slot's state, the two stage spans) until the read says whether it stands
    pending: tuple | None = None
    done: bool = False


class Session:
    """One request (runtime.options.Request: a one-row prompt and its resolved options) in the scheduler."""

    def __init__(self, session_id: int, request: Request, tokenizer, eos_token_id: int, codec_eos_token_id: int,
                 sample_rate: int, timings: StreamTimings | None = None, started: float | None = None):
        self.id, self.request, self.options = session_id, request, request.options
        self.timings = timings or StreamTimings()
        self.started = time.perf_counter() if started is None else started
        self.eos_token_id, self.codec_eos_token_id, self.sample_rate = eos_token_id, codec_eos_token_id, sample_rate
        self.slot: int | None = None
        self.events: deque = deque()
        self.audio_pending: deque = deque()  # packets whose samples are on their way to the host (deliver_audio)
        self.state = "waiting"  # waiting -> prefill -> decode -> finished | failed | cancelled
        self.error: BaseException | None = None
        self.decoder = StreamingDecoder(tokenizer) if tokenizer is not None else None
        self.thinker = ThinkerProgress(prompt_len=request.prompt.input_ids.shape[1])
        self.talker: TalkerProgress | None = None
        self.thinker_seconds: float | None = None  # request start -> the thinker's last token

    @property
    def finished(self) -> bool:
        return self.state in ("finished", "failed", "cancelled")

    @property
    def speaks(self) -> bool:
        return bool(self.options.return_audio)

    def now(self) -> float:
        return time.perf_counter() - self.started

    @property
    def done(self) -> bool:
        """Nothing left to compute: the thinker has stopped and so has the talker (or there is none)."""
        return self.state == "decode" and self.thinker.done and (self.talker is None or self.talker.done)

    # ------------------------------------------------------------------ thinker

    def take_token(self, token: int) -> None:
        """The next text token (its device copy is in the slot's ThinkerInputs, fed at the next decode step): a
        text delta; the stop rule."""
        th = self.thinker
        th.tokens.append(token)
        now = self.now()
        if self.timings.thinker_first_token is None:
            self.timings.thinker_first_token = now
        if token != self.eos_token_id:
            text = self.decoder.push(token) if self.decoder else ""
            self.events.append(TextDelta(text, [token], now))
        th.done = token == self.eos_token_id or len(th.tokens) == self.options.max_new_tokens
        if th.done:
            self.thinker_seconds = now

    # ------------------------------------------------------------------ talker

    def text_ready(self) -> bool:
        """The talker input after frame k = frame − 1 needs t_{k+2} (generated token `frame`, 0-based), or the
        thinker to have stopped (then its text is tts_eos or tts_pad, written on the device by `end_text`)."""
        return self.thinker.done or len(self.thinker.tokens) >= self.talker.frame + 1

    def speech_ends(self, code0: int) -> bool:
        """The frame stop rule: codec EOS as code 0, or the last allowed talker step (it emits no frame)."""
        return code0 == self.codec_eos_token_id or self.talker.frame == self.options.talker_max_new_tokens - 1

    def add_frame(self, codes: torch.Tensor, samples: torch.Tensor, code_predictor_span, code2wav_span):
        """One decoded frame: codes [G] and its final samples [n] (in its slot's state: copied to the host now,
        on the current stream, the talker's, where the next frame overwrites them), the spans
        (runtime/timing.py) of its code predictor and Code2Wav stages; a packet when `chunk_frames` are waiting."""
        tk = self.talker
        self.timings.add_span("code_predictor_per_frame", code_predictor_span)
        if tk.frame == 0:  # the first frame exists once its code predictor stage has completed
            self.timings.add_span("talker_first_frame", code_predictor_span)
        self.timings.add_span("code2wav_per_frame", code2wav_span)
        tk.waiting.append(HostCopy(samples, codes))
        tk.frame += 1
        if len(tk.waiting) == self.options.chunk_frames:
            self._send_audio()
        self.deliver_audio()

    def end_speech(self) -> None:
        tk = self.talker
        if tk.waiting:
            self._send_audio()
        tk.done, tk.ready, tk.drawn, tk.code0_value, tk.pending = True, False, False, None, None

    def _send_audio(self) -> None:
        """One AudioChunk of the frames not sent yet (their copies to the host under way), queued once they are
        there (`deliver_audio`)."""
        tk = self.talker
        self.audio_pending.append((tk.waiting, tk.frame - 1, tk.emitted))
        tk.emitted += sum(copy.host[0].numel() for copy in tk.waiting)
        self.timings.audio_seconds = tk.emitted / self.sample_rate
        tk.waiting = []
        self.deliver_audio()

    def deliver_audio(self, wait: bool = False) -> None:
        """Queue, in order, the AudioChunks whose frames have reached the host, and read the timing spans that
        have completed; with `wait`, all of them (the request's end). Without `wait` it never blocks: on a GPU
        the tick's one blocking read (which waits for the talker's stream) completes them, and the engine loop
        calls this before it hands a session's events over. On the CPU everything is there at once."""
        self.timings.resolve(self.now, wait)
        while self.audio_pending and (wait or all(copy.ready() for copy in self.audio_pending[0][0])):
            copies, frame, start = self.audio_pending.popleft()
            frames = [copy.wait() for copy in copies]  # (samples [n], codes [G]) each, on the host
            samples = frames[0][0] if len(frames) == 1 else torch.cat([f[0] for f in frames])
            if self.options.audio_format == "pcm16":
                samples = pcm16(samples)
            codes = torch.stack([f[1] for f in frames], dim=-1)  # [G, frames]
            now = self.now()  # the samples are on the host now
            if self.timings.first_packet is None and samples.numel():
                self.timings.first_packet = now
            self.events.append(AudioChunk(samples, self.sample_rate, frame, codes, start, now))

    # ------------------------------------------------------------------ end

    def finish(self) -> None:
        """The last text (a multi-byte character completed by nothing more)."""
        if self.decoder is not None:
            tail = self.decoder.flush()
            if tail:
                self.events.append(TextDelta(tail, [], self.now()))

    def release(self, state: str, error: BaseException | None = None) -> None:
        if state == "finished":
            self.deliver_audio(wait=True)
        else:  # cancelled or failed: what is still on its way is dropped (a failed device may not answer)
            self.audio_pending.clear()
            self.timings.pending.clear()
        self.state, self.error = state, error
        self.slot = None
        self.timings.total = self.now()
