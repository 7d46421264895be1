"""The streaming scheduler: sessions in slots of static KV caches, advanced together one tick at a time.

Each tick (`Scheduler.step`):
  1. admit waiting sessions into free slots (FIFO);
  2. one prefill chunk of the oldest session still prefilling (chunked, so a long prompt never stalls the
     others' audio for more than one chunk); its last chunk yields t1, and with speech the talker prefill;
  3. one thinker decode step for every session still generating text (one batch), launched now, its tokens
     read at the end of the tick;
  4. on the talker's stream (GPU), overlapping the thinker step: code 0 of every session whose talker has
     fresh logits, then the code predictor's whole frame for all of them (one batch), and Code2Wav per
     session (its own streaming state); then one talker decode step for every session whose next talker
     input is ready (one batch): the input after frame k needs the text token t_{k+2}, or tts_eos / tts_pad
     once the thinker has stopped (MODEL_SPEC §8.3);
  5. the thinker's tokens of step 3: text deltas, EOS.

With greedy decoding each session's tokens, codes and audio equal what the offline `OmniEngine.generate`
gives for it alone, whatever else runs beside it. On the CPU every step runs eagerly; on a GPU the decode
steps replay CUDA graphs (runtime/graphs.py) when `use_graphs` is on.

Shapes: S = slots, B = sessions in one batched step, H = hidden size, G = code groups, V = vocab.
"""

from __future__ import annotations

import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from runtime.frontend.tokenizer import StreamingDecoder
from runtime.generate import ThinkerGeneration
from runtime.kv_cache import StaticKVCache
from runtime.models.code2wav import Code2WavSlots
from runtime.models.decoder import DeepStack
from runtime.models.talker import code0_suppress_mask
from runtime.rope_index import get_rope_index
from runtime.speech import talker_position_ids
from runtime.streaming import AudioChunk, StreamTimings, TextDelta, pcm16

TALKER_PROMPT_EXTRA = 9  # assistant positions the talker prompt adds after the user part (MODEL_SPEC §8.3)


@dataclass
class SessionRequest:
    """A validated request of one session (the engine checks inputs before it gets here)."""

    prompt: object  # runtime.engine.Prompt, batch 1, on the engine's device
    speaker: str
    max_new_tokens: int
    talker_max_new_tokens: int
    return_audio: bool
    audio_format: str = "float32"
    chunk_frames: int = 1


@dataclass
class _Thinker:
    """Per-session thinker progress."""

    prompt_len: int
    prefilled: int = 0  # prompt tokens through the decoder so far
    embeds: torch.Tensor | None = None  # [1, L, H] prompt embeddings (prefill only)
    deepstack: DeepStack | None = None
    position_ids: torch.Tensor | None = None  # [3, 1, L] prompt positions
    states: list = field(default_factory=list)  # (embeddings, accept-layer hidden) per prefill chunk (speech)
    positions: torch.Tensor | None = None  # [3, 1, 1] position of the last fed token
    tokens: list[int] = field(default_factory=list)  # generated so far (host)
    next_token: torch.Tensor | None = None  # [1] generated, not fed yet
    done: bool = False


@dataclass
class _Talker:
    """Per-session talker progress."""

    prompt: object  # TalkerPrompt
    positions: torch.Tensor  # [3, 1, 1] position of the last fed input
    tts_eos: torch.Tensor  # [H] projected tts_eos
    tts_pad: torch.Tensor  # [H]
    logits: torch.Tensor | None = None  # [1, V] fresh logits (code 0 of the next frame not taken yet)
    hidden: torch.Tensor | None = None  # [1, H] final-norm state that produced `logits`
    codes: torch.Tensor | None = None  # [1, G] the last frame, waiting for its text to be fed back
    frame: int = 0  # frames produced
    waiting: list = field(default_factory=list)  # frames decoded but not sent yet, [G] each
    samples: list = field(default_factory=list)  # their waveform samples, [n] each
    emitted: int = 0  # samples out so far
    done: bool = False


class Session:
    """One request in the scheduler. Events (TextDelta / AudioChunk) queue up in `events` as ticks produce them."""

    def __init__(self, session_id: int, request: SessionRequest, tokenizer, timings: StreamTimings, started: float):
        self.id, self.request, self.timings, self.started = session_id, request, timings, started
        self.slot: int | None = None
        self.events: deque = deque()
        self.state = "waiting"  # waiting -> prefill -> decode -> finished | failed | cancelled
        self.error: BaseException | None = None
        self.decoder = StreamingDecoder(tokenizer) if tokenizer is not None else None
        self.thinker = _Thinker(prompt_len=request.prompt.input_ids.shape[1])
        self.talker: _Talker | None = None

    @property
    def finished(self) -> bool:
        return self.state in ("finished", "failed", "cancelled")

    def now(self) -> float:
        return time.perf_counter() - self.started


class Scheduler:
    """Sessions -> slots of static KV caches; `step()` advances every live session by one tick.

    max_sessions: slots (concurrent sessions); more requests wait for a free slot.
    max_seq_len: tokens per slot (prompt + generated) for the thinker; the talker's slots hold its prompt and
      frames. A request that cannot fit is refused at `submit`, before any model work.
    prefill_chunk: prompt tokens per prefill forward.
    use_graphs: replay CUDA graphs of the decode steps and of the prefill chunks (runtime/graphs.py); default:
      on a GPU when the selected kernels are graph-safe (e.g. after runtime.dispatch.use_all("triton")), else eager.
    static_prefill: run each prefill chunk front-padded to a static bucket (`prefill_buckets`) through the
      decode attention over the slot, the form CUDA graphs capture; default: with graphs. Eager otherwise: the
      chunk attends over its slot's prefix with the prefill attention op.
    """

    def __init__(self, engine, max_sessions: int = 8, max_seq_len: int | None = None, prefill_chunk: int = 512,
                 use_graphs: bool | None = None, static_prefill: bool | None = None):
        if max_sessions < 1 or prefill_chunk < 1:
            raise ValueError(f"max_sessions and prefill_chunk must be >= 1, got {max_sessions}, {prefill_chunk}")
        self.engine, self.model, self.config = engine, engine.model, engine.config
        text_cfg = self.config.thinker.text
        self.max_seq_len = min(max_seq_len or 4096, text_cfg.max_position_embeddings)
        self.max_sessions = max_sessions
        self.prefill_chunk = min(prefill_chunk, self.max_seq_len)
        self.prefill_buckets = prefill_buckets(self.prefill_chunk)
        param = self.model.thinker.lm_head.weight
        self.device, self.dtype = param.device, param.dtype
        self.thinker_cache = StaticKVCache.for_decoder(text_cfg, max_sessions, self.max_seq_len, self.dtype, self.device)
        self.talker_cache = None
        if self.model.has_audio_output:
            talker_cfg = self.config.talker.text
            self.talker_max_len = min(self.max_seq_len + TALKER_PROMPT_EXTRA + 1, talker_cfg.max_position_embeddings)
            self.talker_cache = StaticKVCache.for_decoder(talker_cfg, max_sessions, self.talker_max_len, self.dtype,
                                                          self.device)
            self.suppress = code0_suppress_mask(self.model.talker.cfg, self.device)
            self.code2wav_slots = Code2WavSlots(self.model.code2wav, max_sessions, self.device, self.dtype)
        self.talker_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" and self.talker_cache else None
        self.free_slots = list(range(max_sessions))
        self.waiting: deque[Session] = deque()
        self.live: list[Session] = []
        self._next_id = 0
        self.graphs = None
        if use_graphs is None:  # default: graphs wherever they can run
            use_graphs = self.device.type == "cuda" and graphs_possible()
        self.static_prefill = use_graphs if static_prefill is None else static_prefill
        if use_graphs and not self.static_prefill:
            raise ValueError("CUDA graphs capture prefill chunks in their static form: static_prefill=False needs "
                             "use_graphs=False")
        if use_graphs:
            from runtime.graphs import GraphRunner

            self.graphs = GraphRunner(self.device, max_batch=max_sessions, prefill_buckets=self.prefill_buckets)
            self.graphs.capture_all(self)

    # ------------------------------------------------------------------ sessions

    def submit(self, request: SessionRequest, timings: StreamTimings | None = None,
               started: float | None = None) -> Session:
        """Queue a request; errors that need no model work are raised here."""
        prompt = request.prompt
        if prompt.input_ids.shape[0] != 1:
            raise ValueError(f"a stream takes one request at a time, got a batch of {prompt.input_ids.shape[0]}: "
                             "open one stream per request (they run concurrently)")
        if request.audio_format not in ("float32", "pcm16"):
            raise ValueError(f"audio_format must be 'float32' or 'pcm16', got {request.audio_format!r}")
        if request.chunk_frames < 1:
            raise ValueError(f"chunk_frames must be >= 1, got {request.chunk_frames}")
        if request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
        length = prompt.input_ids.shape[1]
        if length + request.max_new_tokens > self.max_seq_len:
            raise ValueError(f"prompt length {length} + max_new_tokens {request.max_new_tokens} = "
                             f"{length + request.max_new_tokens} exceeds the scheduler's {self.max_seq_len} tokens "
                             f"per session (max_seq_len)")
        if request.return_audio:
            if request.talker_max_new_tokens < 1:
                raise ValueError(f"talker_max_new_tokens must be >= 1, got {request.talker_max_new_tokens}")
            need = length + TALKER_PROMPT_EXTRA + request.talker_max_new_tokens
            if need > self.talker_max_len:
                raise ValueError(f"the talker needs up to {need} positions for this prompt (prompt {length} + "
                                 f"{TALKER_PROMPT_EXTRA} + talker_max_new_tokens {request.talker_max_new_tokens}); "
                                 f"its slots hold {self.talker_max_len}: lower talker_max_new_tokens")
        if prompt.attention_mask is not None:  # one session per slot needs no padding: drop a single row's
            keep = prompt.attention_mask[0].bool()  # leading pad positions (they change nothing else)
            prompt = type(prompt)(prompt.input_ids[:, keep], None, prompt.inputs)
            request = replace(request, prompt=prompt)
        session = Session(self._next_id, request, self.engine.tokenizer, timings or StreamTimings(),
                          time.perf_counter() if started is None else started)
        self._next_id += 1
        self.waiting.append(session)
        return session

    def cancel(self, session: Session) -> None:
        """Stop a session now and free its slot; events not yet consumed are dropped; the others go on."""
        session.events.clear()
        if session.finished:
            return
        if session in self.waiting:
            self.waiting.remove(session)
        self._release(session, "cancelled")

    def _release(self, session: Session, state: str, error: BaseException | None = None) -> None:
        if session.finished:
            return
        session.state, session.error = state, error
        if session in self.live:
            self.live.remove(session)
        if session.slot is not None:
            self.thinker_cache.reset(session.slot)
            if self.talker_cache is not None:
                self.talker_cache.reset(session.slot)
            self.free_slots.append(session.slot)
            self.free_slots.sort()
            session.slot = None
        session.timings.total = session.now()

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.live

    # ------------------------------------------------------------------ one tick

    @torch.inference_mode()
    def step(self) -> None:
        while self.waiting and self.free_slots:
            session = self.waiting.popleft()
            session.slot, session.state = self.free_slots.pop(0), "prefill"
            self.live.append(session)
        prefilling = [s for s in self.live if s.state == "prefill"]
        if prefilling:
            self._guarded([prefilling[0]], self._prefill_chunk)
        # The thinker step is launched first and its tokens read last: on a GPU the talker's work runs on its
        # own stream meanwhile, so the two decoders overlap (the host reads each one's result only when needed).
        thinking = [s for s in self.live if s.state == "decode" and not s.thinker.done]
        logits = self._guarded(thinking, self._thinker_decode)
        with self._talker_stream():
            self._guarded([s for s in self.live if s.talker is not None and s.talker.logits is not None], self._frames)
            self._guarded([s for s in self.live if s.talker is not None and s.talker.codes is not None
                           and self._text_ready(s)], self._talker_decode)
        if logits is not None:
            self._guarded(thinking, lambda sessions: self._take_tokens(sessions, logits))
        for session in list(self.live):
            if session.state == "decode" and session.thinker.done and (session.talker is None or session.talker.done):
                self._finish(session)

    def _talker_stream(self):
        """The talker's CUDA stream as a context (nothing on the CPU)."""
        return torch.cuda.stream(self.talker_stream) if self.talker_stream is not None else nullcontext()

    def _guarded(self, sessions: list[Session], work):
        """Run one batched piece of work; a failure fails the sessions in it and leaves the others serving."""
        if not sessions:
            return None
        try:
            return work(sessions)
        except Exception as error:  # noqa: BLE001 - handed to each session's stream, which re-raises it
            for session in sessions:
                self._release(session, "failed", error)
            return None

    # ------------------------------------------------------------------ thinker

    def _prefill_chunk(self, sessions: list[Session]) -> None:
        session = sessions[0]
        th, thinker, prompt = session.thinker, self.model.thinker, session.request.prompt
        if th.embeds is None:  # first chunk: encoders, the embedding merge and TM-RoPE ids of the whole prompt
            inputs = prompt.inputs
            th.embeds, th.deepstack = thinker.embed(prompt.input_ids, inputs)
            th.position_ids, _ = get_rope_index(
                prompt.input_ids, None, inputs.image_grid_thw, inputs.video_grid_thw, inputs.audio_frames(),
                inputs.video_second_per_grid, inputs.use_audio_in_video, config=thinker.cfg)
            if self.static_prefill:  # one scatter for the whole prompt; chunks slice it without host syncs
                th.deepstack = self._dense_deepstack(th.deepstack, th.prompt_len)
        start, end = th.prefilled, min(th.prefilled + self.prefill_chunk, th.prompt_len)
        slot = torch.tensor([session.slot], device=self.device)
        speech = session.request.return_audio
        layer = self.config.talker.accept_hidden_layer if speech else None
        if self.static_prefill:
            last_hidden, accepted = self._static_prefill_chunk(th, slot, start, end)
        else:
            view = self.thinker_cache.view(slot, end - start, end, prefill_slot=session.slot)
            out = thinker.model(th.embeds[:, start:end], th.position_ids[:, :, start:end], None, view,
                                _deepstack_slice(th.deepstack, start, end), output_layers=bool(layer))
            view.commit()
            last_hidden, accepted = out.hidden[:, -1], out.layer_outputs[layer - 1] if layer else None
        if speech:  # the talker prompt reads the user turn's embeddings and accept-layer states
            embeds = th.embeds[:, start:end]
            th.states.append((embeds, embeds if layer == 0 else accepted))
        th.prefilled = end
        if end < th.prompt_len:
            return
        logits = thinker.lm_head(last_hidden)  # [1, V]
        th.positions = th.position_ids[:, :, -1:]
        th.embeds = th.deepstack = None
        session.state = "decode"
        self._take_tokens([session], logits)
        if speech and not th.done:  # t1 is fed next: the talker can start now
            if self.talker_stream is not None:  # it reads the thinker prefill's states
                self.talker_stream.wait_stream(torch.cuda.current_stream(self.device))
            with self._talker_stream():
                self._talker_prefill(session)
        elif speech:
            session.talker = None  # the reply ended at once: nothing to say

    def _thinker_decode(self, sessions: list[Session]) -> None:
        tokens = torch.cat([s.thinker.next_token for s in sessions])  # [B]
        positions = torch.cat([s.thinker.positions + 1 for s in sessions], dim=1)  # [3, B, 1]
        slots = torch.tensor([s.slot for s in sessions], device=self.device)
        longest = max(s.thinker.prompt_len + len(s.thinker.tokens) for s in sessions)
        if self.graphs is not None:
            logits = self.graphs.thinker_decode(self, tokens, positions, slots, longest)
        else:
            logits = self.thinker_decode_eager(tokens, positions, slots, longest)
        for i, session in enumerate(sessions):
            session.thinker.positions = positions[:, i:i + 1]
        return logits  # [B, V]; the tokens are taken after the talker's work of this tick is launched

    def _dense_deepstack(self, deepstack: DeepStack | None, length: int) -> torch.Tensor:
        """[levels, 1, P, H] DeepStack additions of a prompt (zeros without visual rows)."""
        if deepstack is not None:
            return deepstack.to_dense(1, length, self.config.thinker.text.hidden_size, self.dtype, self.device)
        levels = len(self.config.thinker.vision.deepstack_visual_indexes)
        return torch.zeros(levels, 1, length, self.config.thinker.text.hidden_size, dtype=self.dtype,
                           device=self.device)

    def _static_prefill_chunk(self, th, slot, start: int, end: int):
        """Prompt positions [start, end) front-padded to the smallest bucket that holds them; the captured graph
        of that bucket on a GPU. Returns (last hidden state [1, H], accept-layer states [1, n, H] or None)."""
        embeds, positions, num_valid = _front_padded(self.prefill_buckets, th.embeds[:, start:end],
                                                     th.position_ids[:, :, start:end])
        pad = embeds.shape[1] - (end - start)
        deepstack = F.pad(th.deepstack[:, :, start:end], (0, 0, pad, 0))  # [levels, 1, C, H]
        if self.graphs is not None:
            last_hidden, accepted = self.graphs.thinker_prefill(self, embeds, positions, deepstack, slot, num_valid, end)
        else:
            last_hidden, accepted = self.thinker_prefill_eager(embeds, positions, deepstack, slot, num_valid, end)
        return last_hidden, None if accepted is None else accepted[:, pad:]

    def thinker_prefill_eager(self, embeds, positions, deepstack, slots, num_valid, longest: int):
        """One front-padded prefill chunk in static shapes (what the graph of its bucket captures).
        embeds [1, C, H], positions [3, 1, C], deepstack [levels, 1, C, H], slots [1], num_valid [1] real tokens
        (the last ones) -> (last hidden [1, H], accept-layer states [1, C, H] or None); advances the slot."""
        model = self.model.thinker.model
        view = self.thinker_cache.view(slots, embeds.shape[1], longest, num_valid=num_valid)
        layer = self.config.talker.accept_hidden_layer if self.talker_cache is not None else 0
        out = model(embeds, positions, None, view, DeepStack(dense=deepstack), output_layers=layer > 0)
        view.commit()
        return out.hidden[:, -1], out.layer_outputs[layer - 1] if layer > 0 else None

    def thinker_decode_eager(self, tokens, positions, slots, longest: int) -> torch.Tensor:
        """tokens [B], positions [3, B, 1], slots [B] (−1 = padded row) -> logits [B, V]; advances the slots."""
        thinker = self.model.thinker
        view = self.thinker_cache.view(slots, 1, longest)
        embeds = thinker.model.embed_tokens(tokens[:, None])  # [B, 1, H]
        hidden = thinker.model(embeds, positions, None, view).hidden  # [B, 1, H]
        view.commit()
        return thinker.lm_head(hidden[:, -1])

    def _take_tokens(self, sessions: list[Session], logits: torch.Tensor) -> None:
        """Greedy next token of each session from logits [B, V]; text deltas; stop on EOS or max_new_tokens."""
        chosen = logits.argmax(-1)  # [B]
        for i, (session, token) in enumerate(zip(sessions, chosen.tolist())):
            if session.finished:  # failed or cancelled since its row was computed
                continue
            th = session.thinker
            th.tokens.append(token)
            th.next_token = chosen[i:i + 1]
            now = session.now()
            if session.timings.thinker_first_token is None:
                session.timings.thinker_first_token = now
            if token != self.config.im_end_token_id:
                text = session.decoder.push(token) if session.decoder else ""
                session.events.append(TextDelta(text, [token], now))
            th.done = token == self.config.im_end_token_id or len(th.tokens) == session.request.max_new_tokens

    # ------------------------------------------------------------------ talker

    def _talker_prefill(self, session: Session) -> None:
        cfg, talker, thinker = self.config, self.model.talker, self.model.thinker
        prompt, th = session.request.prompt, session.thinker
        embeds = torch.cat([e for e, _ in th.states], dim=1)  # [1, L, H]
        accepted = torch.cat([a for _, a in th.states], dim=1)
        th.states = []
        if self.talker_stream is not None:  # made on the main stream, read on the talker's: keep their memory
            for tensor in (embeds, accepted, th.next_token):  # until the talker stream is done with it
                tensor.record_stream(self.talker_stream)
        # t1 is a text token: its embedding is its token embedding and its accept-layer state is never read.
        t1 = th.next_token[:, None]  # [1, 1]
        so_far = ThinkerGeneration(torch.cat((prompt.input_ids, t1), dim=1),
                                   torch.cat((embeds, thinker.model.embed_tokens(t1)), dim=1),
                                   torch.cat((accepted, accepted.new_zeros(1, 1, accepted.shape[-1])), dim=1))
        talker_prompt = talker.build_prompt(cfg, prompt.input_ids, so_far.sequences, so_far.embeddings,
                                            so_far.accepted_hidden, thinker.model.embed_tokens,
                                            session.request.speaker, prompt.attention_mask)
        inputs = prompt.inputs
        positions = talker_position_ids(talker_prompt, cfg, inputs.image_grid_thw, inputs.video_grid_thw,
                                        inputs.audio_frames(), inputs.video_second_per_grid, inputs.use_audio_in_video)
        special = torch.tensor([cfg.tts_eos_token_id, cfg.tts_pad_token_id], device=self.device)
        tts_eos, tts_pad = talker.project_text(thinker.model.embed_tokens(special))
        length = talker_prompt.inputs_embeds.shape[1]
        slot = torch.tensor([session.slot], device=self.device)
        if self.static_prefill:  # in chunks of prefill_chunk, each front-padded to its bucket (graphs on a GPU)
            for start in range(0, length, self.prefill_chunk):
                end = min(start + self.prefill_chunk, length)
                embeds, chunk_positions, num_valid = _front_padded(
                    self.prefill_buckets, talker_prompt.inputs_embeds[:, start:end], positions[:, :, start:end])
                if self.graphs is not None:
                    last_logits, last_hidden = self.graphs.talker_prefill(self, embeds, chunk_positions, slot,
                                                                          num_valid, end)
                else:
                    last_logits, last_hidden = self.talker_prefill_eager(embeds, chunk_positions, slot, num_valid, end)
        else:
            view = self.talker_cache.view(slot, length, length, prefill_slot=session.slot)
            logits, hidden = talker(talker_prompt.inputs_embeds, positions, None, view, num_logits_to_keep=1)
            view.commit()
            last_logits, last_hidden = logits[:, -1], hidden[:, -1]
        self.code2wav_slots.reset(session.slot)
        session.talker = _Talker(talker_prompt, positions[:, :, -1:], tts_eos, tts_pad, last_logits, last_hidden)

    def _frames(self, sessions: list[Session]) -> None:
        """Code 0 from each session's fresh logits; the code predictor's frame for those that go on;
        Code2Wav for each."""
        talker_cfg = self.model.talker.cfg
        logits = torch.cat([s.talker.logits for s in sessions])  # [B, V]
        code0 = logits.masked_fill(self.suppress, float("-inf")).argmax(-1)  # [B]
        going = []
        for i, (session, code) in enumerate(zip(sessions, code0.tolist())):
            tk = session.talker
            tk.logits = None
            # Same frame accounting as runtime.speech.talker_generate: the last allowed step emits no frame.
            if code == talker_cfg.codec_eos_token_id or tk.frame == session.request.talker_max_new_tokens - 1:
                self._end_speech(session)
            else:
                going.append(i)
        if not going:
            return
        tick = time.perf_counter()
        index = torch.tensor(going, device=self.device)
        hidden = torch.cat([sessions[i].talker.hidden for i in going])  # [B', H]
        if self.graphs is not None:
            codes = self.graphs.code_predictor_frame(self, hidden, code0[index])
        else:
            codes = self.model.talker.predict_frame(hidden, code0[index])  # [B', G]
        spent = time.perf_counter() - tick
        for row, i in enumerate(going):
            session = sessions[i]
            session.timings.code_predictor_per_frame.append(spent)
            if session.timings.talker_first_frame is None:
                session.timings.talker_first_frame = session.now()
            session.talker.codes, session.talker.hidden = codes[row:row + 1], None
        self._code2wav([sessions[i] for i in going], codes)

    def _code2wav(self, sessions: list[Session], codes: torch.Tensor) -> None:
        """Decode one new frame per session (codes [B, G]) in their Code2Wav slots: sessions on their first
        frame in one eager batch, the others in one (graph-replayed) batch; send the chunks that are full."""
        starting = [s.talker.frame == 0 for s in sessions]
        for first in (True, False):
            rows = [i for i, start in enumerate(starting) if start == first]
            if not rows:
                continue
            tick = time.perf_counter()
            frame_codes = codes[rows][:, :, None]  # [B', G, 1]
            slots = torch.tensor([sessions[i].slot for i in rows], device=self.device)
            if self.graphs is not None and not first:
                wav = self.graphs.code2wav_frame(self, frame_codes, slots)
            else:
                wav = self.model.code2wav.decode_frame(frame_codes, self.code2wav_slots.view(slots, first))
            wav = wav[:, 0].float()  # [B', samples]
            spent = time.perf_counter() - tick
            for row, i in enumerate(rows):
                session = sessions[i]
                tk = session.talker
                session.timings.code2wav_per_frame.append(spent)
                tk.waiting.append(codes[i])
                tk.samples.append(wav[row])
                tk.frame += 1
                if len(tk.waiting) == session.request.chunk_frames:
                    self._send_audio(session)

    def _send_audio(self, session: Session) -> None:
        """One AudioChunk of the decoded frames not sent yet."""
        tk, sample_rate = session.talker, self.model.code2wav.cfg.SAMPLE_RATE
        samples = torch.cat(tk.samples)
        now = session.now()
        if session.timings.first_packet is None and samples.numel():
            session.timings.first_packet = now
        out = pcm16(samples) if session.request.audio_format == "pcm16" else samples
        codes = torch.stack(tk.waiting, dim=-1)  # [G, n]
        session.events.append(AudioChunk(out, sample_rate, tk.frame - 1, codes, tk.emitted, now))
        tk.emitted += samples.numel()
        session.timings.audio_seconds = tk.emitted / sample_rate
        tk.waiting, tk.samples = [], []

    def _end_speech(self, session: Session) -> None:
        tk = session.talker
        if tk.waiting:
            self._send_audio(session)
        tk.done, tk.codes = True, None

    def _text_ready(self, session: Session) -> bool:
        """The talker input after frame k needs t_{k+2}, or the thinker to have stopped."""
        th = session.thinker
        return th.done or len(th.tokens) >= session.talker.frame + 1

    def _text_for_frame(self, session: Session) -> torch.Tensor:
        """[1, H] the text part of the talker input after frame k = frame − 1 (equal to TalkerPrompt.text_for_frame
        of the offline prompt): P(t_{k+2}) while that is a fed token, tts_eos for the generation's last token
        (EOS or the max-token cut), tts_pad after it."""
        th, tk = session.thinker, session.talker
        wanted, generated = tk.frame + 1, len(th.tokens)  # 1-based index of t_{k+2}, k = frame − 1
        if wanted < generated or (wanted == generated and not th.done):
            token = torch.tensor([th.tokens[wanted - 1]], device=self.device)
            return self.model.talker.project_text(self.model.thinker.model.embed_tokens(token))
        return (tk.tts_eos if wanted == generated else tk.tts_pad)[None]

    def _talker_decode(self, sessions: list[Session]) -> None:
        talker = self.model.talker
        embeds = torch.cat([talker.frame_input(s.talker.codes, self._text_for_frame(s)) for s in sessions])  # [B, 1, H]
        positions = torch.cat([s.talker.positions + 1 for s in sessions], dim=1)  # [3, B, 1]
        slots = torch.tensor([s.slot for s in sessions], device=self.device)
        longest = max(s.talker.prompt.inputs_embeds.shape[1] + s.talker.frame for s in sessions)
        if self.graphs is not None:
            logits, hidden = self.graphs.talker_decode(self, embeds, positions, slots, longest)
        else:
            logits, hidden = self.talker_decode_eager(embeds, positions, slots, longest)
        for i, session in enumerate(sessions):
            tk = session.talker
            tk.positions, tk.codes = positions[:, i:i + 1], None
            tk.logits, tk.hidden = logits[i:i + 1], hidden[i:i + 1]

    def talker_prefill_eager(self, embeds, positions, slots, num_valid, longest: int):
        """One front-padded talker prefill chunk in static shapes (what the graph of its bucket captures).
        embeds [1, C, H], positions [3, 1, C], slots [1], num_valid [1] real tokens (the last ones)
        -> (logits [1, V], hidden [1, H]) of the chunk's last token; advances the slot."""
        view = self.talker_cache.view(slots, embeds.shape[1], longest, num_valid=num_valid)
        logits, hidden = self.model.talker(embeds, positions, None, view, num_logits_to_keep=1)
        view.commit()
        return logits[:, -1], hidden[:, -1]

    def talker_decode_eager(self, embeds, positions, slots, longest: int) -> tuple[torch.Tensor, torch.Tensor]:
        """embeds [B, 1, H], positions [3, B, 1], slots [B] -> (logits [B, V], hidden [B, H]); advances the slots."""
        view = self.talker_cache.view(slots, 1, longest)
        logits, hidden = self.model.talker(embeds, positions, None, view)
        view.commit()
        return logits[:, -1], hidden[:, -1]

    # ------------------------------------------------------------------ end

    def _finish(self, session: Session) -> None:
        if session.decoder is not None:
            tail = session.decoder.flush()
            if tail:
                session.events.append(TextDelta(tail, [], session.now()))
        self._release(session, "finished")


def graphs_possible() -> bool:
    """CUDA is present and every selected op implementation may run inside a CUDA graph."""
    from runtime.graphs import check_graph_safe

    if not torch.cuda.is_available():
        return False
    try:
        check_graph_safe()
    except RuntimeError:
        return False
    return True


def prefill_buckets(prefill_chunk: int) -> list[int]:
    """Static chunk lengths of the captured prefill: powers of two from 16 below prefill_chunk, then
    prefill_chunk: [16, 32, 64, 128, 256, 512] for 512, [7] for 7."""
    buckets, size = [], 16
    while size < prefill_chunk:
        buckets.append(size)
        size *= 2
    return buckets + [prefill_chunk]


def _front_padded(buckets: list[int], embeds: torch.Tensor, positions: torch.Tensor):
    """A prefill chunk (embeds [1, n, H], positions [3, 1, n]) front-padded with zeros to the smallest bucket
    C >= n: (embeds [1, C, H], positions [3, 1, C], num_valid [1] = n on the device)."""
    count = embeds.shape[1]
    pad = next(size for size in buckets if size >= count) - count
    num_valid = torch.tensor([count], device=embeds.device)
    return F.pad(embeds, (0, 0, pad, 0)), F.pad(positions, (pad, 0)), num_valid


def _deepstack_slice(deepstack: DeepStack | None, start: int, end: int) -> DeepStack | None:
    """The DeepStack of prompt positions [start, end): its mask columns and the features of its visual rows."""
    if deepstack is None:
        return None
    mask = deepstack.visual_mask[:, start:end]
    if not bool(mask.any()):
        return None
    before = int(deepstack.visual_mask[:, :start].sum())
    count = int(mask.sum())
    return DeepStack(mask, [level[before:before + count] for level in deepstack.features])
