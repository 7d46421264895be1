"""One request in the engine: its progress through the thinker and the talker, and the rules that are per
request (one definition each, for `generate` and `stream` alike):

- the thinker's stop rule: EOS, or `max_new_tokens` tokens;
- the text of each talker frame: the talker input after frame k carries t_{k+2} while that is a fed token,
  tts_eos for the generation's last token, tts_pad after it (MODEL_SPEC §8.3);
- the frame stop rule: codec EOS as code 0, or the talker's last allowed step (which emits no frame, as
  transformers counts them: `talker_max_new_tokens` steps give at most `talker_max_new_tokens − 1` frames);
- packets: every `chunk_frames` frames (and the rest at the end) become one AudioChunk (float32 or pcm16), sent
  once its samples are on the host (copied without blocking, `deliver_audio`);
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
    next_token: torch.Tensor | None = None  # [1] generated, not fed yet (decode steps read ThinkerInputs' copy)
    done: bool = False


@dataclass
class TalkerProgress:
    prompt_len: int  # talker prompt positions (the last fed input's position is on the device: TalkerInputs)
    tts_eos_id: int  # thinker ids of the text after the generation's last token, then after that: the talker
    tts_pad_id: int  # step projects them as it projects a fed token
    code0: torch.Tensor | None = None  # [1] code 0 of the next frame, sampled, its frame not made yet (with the
    # state that produced it also in TalkerInputs, where the code predictor's step reads both)
    code0_value: int | None = None  # `code0` on the host (the tick's read-back), None until read
    codes: torch.Tensor | None = None  # [1, G] the last frame (also in TalkerInputs), waiting for its text
    frame: int = 0  # frames produced
    waiting: list = field(default_factory=list)  # frames decoded, not sent yet: [G] each
    samples: list = field(default_factory=list)  # their samples, [n] each
    emitted: int = 0  # samples sent so far
    # the next frame, made before its code 0 was read (runtime/speech.py make_frames): (codes [G], samples [n],
    # the two stage spans) until the read says whether it stands
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

    def take_token(self, token: int, token_tensor: torch.Tensor) -> None:
        """The next text token (token_tensor [1] on the device, fed at the next decode step): a text delta;
        the stop rule."""
        th = self.thinker
        th.tokens.append(token)
        th.next_token = token_tensor
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
        """The talker input after frame k needs t_{k+2}, or the thinker to have stopped."""
        return self.thinker.done or len(self.thinker.tokens) >= self.talker.frame + 1

    def frame_text(self) -> int:
        """The text of the talker input after frame k = frame − 1, as a thinker token id: t_{k+2} while that is a
        fed token, else tts_eos (for the generation's last token: EOS or the max-token cut) or tts_pad (after it)."""
        th, tk = self.thinker, self.talker
        wanted, generated = tk.frame + 1, len(th.tokens)  # 1-based index of t_{k+2}
        if wanted < generated or (wanted == generated and not th.done):
            return th.tokens[wanted - 1]
        return tk.tts_eos_id if wanted == generated else tk.tts_pad_id

    def speech_ends(self, code0: int) -> bool:
        """The frame stop rule: codec EOS as code 0, or the last allowed talker step (it emits no frame)."""
        return code0 == self.codec_eos_token_id or self.talker.frame == self.options.talker_max_new_tokens - 1

    def add_frame(self, codes: torch.Tensor, samples: torch.Tensor, code_predictor_span, code2wav_span):
        """One decoded frame: codes [G], its final samples [n], the spans (runtime/timing.py) of its code
        predictor and Code2Wav stages; a packet when `chunk_frames` are waiting."""
        tk = self.talker
        self.timings.add_span("code_predictor_per_frame", code_predictor_span)
        if tk.frame == 0:  # the first frame exists once its code predictor stage has completed
            self.timings.add_span("talker_first_frame", code_predictor_span)
        self.timings.add_span("code2wav_per_frame", code2wav_span)
        tk.waiting.append(codes)
        tk.samples.append(samples)
        tk.frame += 1
        if len(tk.waiting) == self.options.chunk_frames:
            self._send_audio()
        self.deliver_audio()

    def end_speech(self) -> None:
        tk = self.talker
        if tk.waiting:
            self._send_audio()
        tk.done, tk.codes, tk.code0, tk.code0_value, tk.pending = True, None, None, None, None

    def _send_audio(self) -> None:
        """One AudioChunk of the decoded frames not sent yet: its samples start their copy to the host (on the
        talker's stream, where they were made) and the chunk is queued once they are there (`deliver_audio`)."""
        tk = self.talker
        # one frame per packet (the default) needs no concatenation: its samples and codes as they are
        samples = tk.samples[0] if len(tk.samples) == 1 else torch.cat(tk.samples)
        out = pcm16(samples) if self.options.audio_format == "pcm16" else samples
        codes = tk.waiting[0][:, None] if len(tk.waiting) == 1 else torch.stack(tk.waiting, dim=-1)  # [G, n]
        self.audio_pending.append((HostCopy(out, codes), tk.frame - 1, tk.emitted))
        tk.emitted += samples.numel()
        self.timings.audio_seconds = tk.emitted / self.sample_rate
        tk.waiting, tk.samples = [], []
        self.deliver_audio()

    def deliver_audio(self, wait: bool = False) -> None:
        """Queue, in order, the AudioChunks whose samples have reached the host, and read the timing spans that
        have completed; with `wait`, all of them (the request's end). Without `wait` it never blocks: on a GPU
        the tick's one blocking read (which waits for the talker's stream) completes them, and the engine loop
        calls this before it hands a session's events over. On the CPU everything is there at once."""
        self.timings.resolve(self.now, wait)
        while self.audio_pending and (wait or self.audio_pending[0][0].ready()):
            copy, frame, start = self.audio_pending.popleft()
            samples, codes = copy.wait()
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
