"""The scheduler: policy only. Which sessions hold slots, which one prefills a chunk this tick, which decode.

Each tick (`Scheduler.step`):
  1. admit waiting sessions into free slots (FIFO), each slot reset first (never trusted from its last user);
  2. one prefill chunk of the oldest session still prefilling (chunked, so a long prompt never stalls the
     others' audio for more than one chunk); its last chunk yields t1 and, with speech, the talker prefill
     and the first frame (code predictor, Code2Wav), launched before t1 or the first code 0 is read: the
     frame is kept aside until step 5 reads code 0, so the first packet is ready at the end of this tick;
  3. thinker decode steps for every session still generating text (one batch each), launched now; they sample
     the next tokens on the device. One on a tick with talker work: it overlaps the talker's frame on the other
     stream, and keeps the text one token ahead of the talker, which takes one per frame; more would stretch
     the tick past the frame (by the floors counted in docs/performance.md, not measured, a batch-1 thinker
     step and a talker frame take about as long on a GPU) and slow the audio. Without talker work (text-only sessions, a text that outlasts its
     speech) up to `thinker_steps` (SchedulerConfig), so several steps share one blocking read; never past a
     session's max_new_tokens, and one on a tick that ends a prompt (its first token and first packet wait for
     this tick's read);
  4. on the talker's stream (GPU), overlapping the thinker step: one talker step (sampling code 0) for every
     session whose next input is ready, then the frames of those code 0s (runtime/speech.py make_frames),
     made before code 0 is read;
  5. one read-back, the tick's only blocking device-to-host read: the thinker's tokens of step 3 and the
     talker's new code 0s (`ModelRunner.read_tick`: one copy of the per-slot tokens); each frame made from them
     stands (its packet starts its copy to the host) or is dropped (its code 0 ended the speech); a text that
     has ended is marked for the talker (`ModelRunner.end_text`); sessions with nothing left finish. (A
     prompt's last chunk adds one read: t1.)

Between the graphs the host uploads nothing in a steady tick (the batch's slot ids stay in the graphs' buffers)
and launches no kernel: the steps write their results into per-slot device state (runtime/decode_inputs.py),
where the next step and the read-back find them.

A batched step that raises is retried row by row: only the sessions that fail alone fail (state "failed",
the error kept for their stream), the others go on. Sampling draws from (the request's seed, the stage, the
step), so each session's tokens, codes and audio equal what it gives alone, whatever runs beside it. The model
work is the runner's (runtime/runner.py), the per-request rules the session's (runtime/session.py).
"""

from __future__ import annotations

from collections import deque

import torch

from runtime import prefill, speech
from runtime.config import Code2WavConfig
from runtime.options import Request, SchedulerConfig
from runtime.runner import TALKER_PROMPT_EXTRA, ModelRunner
from runtime.session import Session
from runtime.streaming import StreamTimings


class Scheduler:
    """Sessions -> slots of the runner's static caches; `step()` advances every live session by one tick.
    A request that cannot fit its slot is refused at `submit`, before any model work."""

    def __init__(self, engine, config: SchedulerConfig | dict | None = None, **options):
        self.options = SchedulerConfig.of(options if config is None else config)
        self.model, self.config, self.tokenizer = engine.model, engine.config, engine.tokenizer
        self.runner = ModelRunner(engine.model, engine.config, self.options, set(getattr(engine, "backends", ())))
        self.free_slots = list(range(self.options.max_sessions))
        self.waiting: deque[Session] = deque()
        self.live: list[Session] = []
        self._next_id = 0

    @property
    def graphs(self):
        return self.runner.graphs

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.live

    # ------------------------------------------------------------------ sessions

    def submit(self, request: Request, timings: StreamTimings | None = None, started: float | None = None) -> Session:
        """Queue a request (its options already validated and resolved by the engine); what cannot fit is
        refused here."""
        prompt, options, runner = request.prompt, request.options, self.runner
        if prompt.input_ids.shape[0] != 1:
            raise ValueError(f"a stream takes one request at a time, got a batch of {prompt.input_ids.shape[0]}: "
                             "open one stream per request (they run concurrently)")
        if prompt.attention_mask is not None:  # one session per slot needs no padding: drop a single row's
            keep = prompt.attention_mask[0].bool()  # leading pad positions (they change nothing else)
            request = Request(type(prompt)(prompt.input_ids[:, keep], None, prompt.inputs), options)
        length = request.prompt.input_ids.shape[1]
        if length + options.max_new_tokens > runner.max_seq_len:
            raise ValueError(f"prompt length {length} + max_new_tokens {options.max_new_tokens} = "
                             f"{length + options.max_new_tokens} exceeds the scheduler's {runner.max_seq_len} tokens "
                             f"per session (max_seq_len)")
        if options.return_audio:
            need = length + TALKER_PROMPT_EXTRA + options.talker_max_new_tokens
            if need > runner.talker_max_len:
                raise ValueError(f"the talker needs up to {need} positions for this prompt (prompt {length} + "
                                 f"{TALKER_PROMPT_EXTRA} + talker_max_new_tokens {options.talker_max_new_tokens}); "
                                 f"its slots hold {runner.talker_max_len}: lower talker_max_new_tokens")
        codec_eos = self.model.talker.cfg.codec_eos_token_id if runner.speech else -1
        session = Session(self._next_id, request, self.tokenizer, self.config.im_end_token_id, codec_eos,
                          Code2WavConfig.SAMPLE_RATE, timings, started)
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
        if session in self.live:
            self.live.remove(session)
        if session.slot is not None:
            self.free_slots.append(session.slot)
            self.free_slots.sort()
        session.release(state, error)

    # ------------------------------------------------------------------ one tick

    @torch.inference_mode()
    def step(self) -> None:
        while self.waiting and self.free_slots:
            session = self.waiting.popleft()
            session.slot, session.state = self.free_slots.pop(0), "prefill"
            self.runner.reset_slot(session.slot)
            self.runner.admit(session.slot, session.options, session.request.prompt.input_ids)
            self.live.append(session)
        prefilling = [s for s in self.live if s.state == "prefill"][:1]
        if prefilling:
            self._guarded(prefilling, self._prefill_chunk)
        prompt_ended = any(s.state == "decode" for s in prefilling)
        # The thinker steps are launched first and their tokens read last: on a GPU the talker's work runs on its
        # own (higher-priority) stream meanwhile, so the two decoders overlap; the host then reads both in one
        # read-back. (A session's first frame was launched with its talker prefill, ahead of these steps.)
        thinking = [s for s in self.live if s.state == "decode" and not s.thinker.done]
        talking = [s for s in self.live if s.talker is not None and s.talker.ready and s.text_ready()]
        steps = self._thinker_steps(thinking, prompt_ended or bool(talking))
        for ahead in range(steps):  # each step its own guarded batch: a failure retries only that step
            thinking = [s for s, _ in self._guarded(thinking, lambda sessions: self._thinker_decode(sessions, ahead))]
        self._talker_work(talking)
        self._read_back([s for s in thinking if not s.finished], steps)
        for session in list(self.live):
            if session.done:
                self._guarded([session], lambda one: one[0].finish())  # the tokenizer's last text may fail
                self._release(session, "finished")

    def _talker_work(self, talking: list[Session]) -> None:
        """Launch the tick's talker side on its stream: one talker step for every session in `talking` (its last
        frame and its text ready), then the frames of the code 0s just sampled (code predictor, Code2Wav), settled
        at the read-back. Two guarded batches: a failed frame batch is retried row by row without stepping
        again."""
        with self.runner.on_talker_stream():
            stepped = self._guarded(talking, lambda sessions: speech.talker_decode(self.runner, sessions))
            self._guarded([s for s, _ in stepped], lambda sessions: speech.make_frames(self.runner, sessions))

    def _guarded(self, sessions: list[Session], work) -> list[tuple[Session, object]]:
        """Run one batched piece of work (work(sessions) -> one result per session, or None). If it raises, run
        it again for each session alone: only those that fail alone fail; the others' results are returned."""
        sessions = [s for s in sessions if not s.finished]
        if not sessions:
            return []
        try:
            return list(zip(sessions, work(sessions) or [None] * len(sessions)))
        except Exception as error:  # noqa: BLE001 - handed to each failing session's stream, which re-raises it
            if len(sessions) == 1:
                self._release(sessions[0], "failed", error)
                return []
        done = []
        for session in sessions:
            done += self._guarded([session], work)
        return done

    # ------------------------------------------------------------------ thinker

    def _prefill_chunk(self, sessions: list[Session]) -> None:
        session, runner = sessions[0], self.runner
        th = session.thinker
        if th.prompt is None:  # first chunk: encoders, the embedding merge and TM-RoPE ids of the whole prompt
            th.prompt = prefill.embed_prompt(runner, session.request.prompt)
        start, end = th.prefilled, min(th.prefilled + runner.prefill_chunk, th.prompt_len)
        logits, states = prefill.thinker_prefill(runner, th.prompt, session.slot, start, end, session.speaks)
        if session.speaks:  # the talker prompt reads the user turn's embeddings and accept-layer states
            th.states.append((th.prompt.embeds[:, start:end], states))
        th.prefilled = end
        if end < th.prompt_len:
            return
        last_positions = th.prompt.positions[:, :, -1:]
        th.prompt = None
        session.state = "decode"
        token = runner.first_token(logits, session.slot, last_positions)  # [1]
        if session.speaks:
            # t1 is fed next, so the talker can start now, before t1's value is read: its prompt and prefill
            # queue on the device right behind the thinker's prefill instead of waiting for the host to see t1
            # (the read below waits for the thinker's stream only). If t1 ends the text, they are dropped.
            th.next_token = token
            if runner.talker_stream is not None:  # it reads the thinker prefill's states
                runner.talker_stream.wait_stream(torch.cuda.current_stream(runner.device))
            with runner.on_talker_stream():
                speech.start_talker(runner, session)
                speech.make_frames(runner, [session])  # its code 0 is read with the tick's read-back
        self._take_tokens([session], runner.read_tick(talker=False)[0], 1)
        if session.talker is not None and th.done and not session.finished:  # the text ended at t1 (EOS):
            session.end_speech()  # nothing to speak, as when the talker never started

    def _thinker_steps(self, thinking: list[Session], one: bool) -> int:
        """Thinker steps this tick: one when `one` (a prompt ended this tick, or the talker works: see the module
        docstring), else up to `thinker_steps`, none past a session's max_new_tokens (its KV slot holds no more)."""
        if not thinking:
            return 0
        if one:
            return 1
        left = min(s.options.max_new_tokens - len(s.thinker.tokens) for s in thinking)
        return max(1, min(self.options.thinker_steps, left))

    def _thinker_decode(self, sessions: list[Session], ahead: int = 0) -> None:
        # each slot's last token and position are on the device (runtime/decode_inputs.py): only slot ids go up,
        # and the sampled tokens stay there (read after the talker's work is launched); `ahead`: steps already
        # launched this tick, not read yet
        longest = max(s.thinker.prompt_len + len(s.thinker.tokens) for s in sessions) + ahead
        self.runner.thinker_decode([s.slot for s in sessions], longest)

    def _read_back(self, decoded: list[Session], steps: int) -> None:
        """The tick's one blocking read: the `steps` thinker tokens just sampled for each session in `decoded` and
        every talker code 0 sampled but not read yet; then the text deltas and stop rules that need them."""
        talkers = [s for s in self.live if s.talker is not None and s.talker.drawn and not s.finished]
        if not decoded and not talkers:
            return
        ring, code0 = self.runner.read_tick()
        self._take_tokens(decoded, ring, steps)
        for session in talkers:
            session.talker.code0_value = code0[session.slot]
            if session.talker.pending is not None:  # the frame made from it before this read
                with self.runner.on_talker_stream():  # its packet is copied out where it was made
                    self._guarded([session], lambda one: speech.settle_frame(one[0]))

    def _take_tokens(self, sessions: list[Session], ring: list[list[int]], count: int) -> None:
        """Each session's next `count` tokens from the read-back's ring (a slot's draw d at ring[d mod R][slot];
        its draws so far are its tokens so far), up to its stop: the steps past it were run ahead and are dropped
        (on the device the last token waits in the slot's ThinkerInputs, fed at the next decode step). A speaking
        session whose text has just ended marks that for its talker (ModelRunner.end_text)."""
        for session in sessions:
            drawn = len(session.thinker.tokens)
            values = [ring[(drawn + j) % len(ring)][session.slot] for j in range(count)]
            # per session (its detokenizer may fail), and not for one cancelled since its row was computed
            self._guarded([session], lambda one, values=values: self._take(one[0], values))

    def _take(self, session: Session, tokens: list[int]) -> None:
        for token in tokens:
            if session.thinker.done:
                break
            session.take_token(token)
        if session.thinker.done and session.speaks and self.runner.speech:
            self.runner.end_text(session.slot, session.thinker.prompt_len, len(session.thinker.tokens))
