"""The model runner: the static state every session lives in, and the step functions that advance it.

`ModelRunner` owns the per-slot state (the thinker's and the talker's StaticKVCache, Code2WavSlots, the decode
steps' input state ThinkerInputs and TalkerInputs), the code-0 suppress mask, the talker's CUDA stream, and one
step function per stage:

    audio_encoder     a piece of one audio in whole zero-padded chunks, per chunk-count bucket
    vision_encoder    one segment (a frame of an image or video) of zero-padded patches, per patch-count bucket
    thinker_prefill   one prefill chunk of one slot, front-padded to a static bucket
    talker_prefill    the same for the talker's prompt
    thinker_decode    slot ids -> each slot's last token fed at its next position -> the next token, sampled
    talker_decode     slot ids -> its input (last frame + the text its thinker has reached) -> code 0, sampled
                      with the control ids suppressed, recorded with its hidden state
    code_predictor    slot ids -> one whole frame (codebooks 1..G−1) per slot from its code 0 and hidden state,
                      each code sampled, the frame recorded per slot
    code2wav          slot ids -> one frame's samples per slot (its recorded frame), after its first frame
    code2wav_first    a slot's first frame (its transposed convs trim their left edge: fewer samples)

The decode stages return nothing: each writes its results into per-slot state on the device
(runtime/decode_inputs.py; Code2Wav's samples into `last_samples`), where the next stage and the host find them
by slot, so a frame passes from stage to stage on the device and no replay's output is copied out between the
graphs (and none is overwritten by another replay of the same graph in the same tick: a first frame beside a
steady one, a batch retried row by row). Between the graphs the host uploads slot ids (once per steady batch)
and reads the tick's tokens back (`read_tick`: one copy), nothing else.

Each step function has static shapes and no host reads, so it is what a CUDA graph captures (`capture_plan`
lists every stage at every bucket; runtime/graphs.py captures exactly that list and replays it) and, on the
CPU or with graphs off, what runs eagerly. The host-level methods (`thinker_decode`, `talker_decode`,
`code_predictor_frame`, `code2wav_frame`; the prefills in runtime/prefill.py) check limits on the host, pad,
and run a step through its graph or eagerly (`run`): the scheduler (policy, runtime/scheduler.py) and the
talker's tick (runtime/speech.py) call only those.

Sampling lives inside the steps (runtime/sampling.py SlotSampling per stage: parameters, seeds, step counters
and repetition-penalty histories per slot, set on admission by `admit`), so a graph replay samples every row
with its own request's parameters. The host learns the tokens through `read_tick`, the tick's one blocking
device-to-host read; host ints go to the device through `indices` (pinned, non-blocking on a GPU).

Shapes: B = rows of one batched step, C = a prefill bucket, H = hidden size, G = code groups, V = vocab.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from runtime.exported import EXPORTED_STEPS, ExportedSteps
from runtime.graphs import GraphRunner, batch_buckets, graphs_possible, mark_constant
from runtime.kv_cache import FrameKVCache, StaticKVCache
from runtime.models.code2wav import Code2WavSlots
from runtime.models.decoder import DeepStack
from runtime.models.talker import code0_suppress_mask
from runtime.models.vision_encoder import vision_layout
from kernels.sampling import STAGE_CODE_PREDICTOR, STAGE_TALKER, STAGE_THINKER
from runtime.options import VISION_GRAPH_MIN, GenerationOptions, SchedulerConfig
from runtime.sampling import SlotSampling
from runtime.decode_inputs import DecodeReadout, ThinkerInputs, TalkerInputs
from runtime.frontend.audio import audio_token_count
from runtime.timing import StageTimer
from runtime.transfers import HostTransfers

TALKER_PROMPT_EXTRA = 9  # assistant positions the talker prompt adds after the user part (MODEL_SPEC §8.3)

# Batched stages: the batch dim of each input and the value that pads it up to a captured bucket (−1 slots
# write only the scratch slot). Prefill stages take one slot and a chunk already padded to its bucket.
BATCHED = {
    "thinker_decode": ((0,), (-1,)),
    "talker_decode": ((0,), (-1,)),
    "code_predictor": ((0,), (-1,)),
    "code2wav": ((0,), (-1,)),
    "code2wav_first": ((0,), (-1,)),
}


# The audio encoder's captured chunk counts (`audio_encoder` stage): whole chunks up to one attention window
# (8 chunks of 2·n_window frames), then whole windows, up to AUDIO_GRAPH_CHUNKS (~32 s of audio; a chunk is
# 1 s). A longer clip goes through in pieces of that many chunks, several clips one after another; only prompts
# whose clips are all shorter than a chunk are encoded eagerly (ModelRunner.encode_audio).
AUDIO_GRAPH_CHUNKS = 32


# Slot-id tensors kept (runner.slot_ids): far more than the few batches one tick uses, so one evicted was last
# used many ticks ago, by work that has completed (each tick ends with a blocking read after both streams).
SLOT_ID_CACHE = 256

# Stages that run on the talker's CUDA stream (their graphs replay there, in that stream's memory pool).
TALKER_STAGES = ("talker_prefill", "talker_decode", "code_predictor", "code2wav", "code2wav_first")


@dataclass(frozen=True)
class StageSpec:
    """One captured stage at one size: `fn(*example_inputs)` runs exactly what its graph captures and returns
    a tuple of tensors (empty for the decode stages, which write per-slot state). size: the prefill bucket
    (tokens) or the batch bucket (rows)."""

    name: str
    size: int
    fn: Callable[..., tuple[torch.Tensor, ...]]
    example_inputs: tuple[torch.Tensor, ...]


class ModelRunner:
    """Static caches, slots and step functions of one engine (see the module docstring)."""

    def __init__(self, model, config, options: SchedulerConfig, exported: set[str] | frozenset = frozenset()):
        """exported: the modules this engine runs as exported graphs (export/ort.py names); the decoder steps and
        Code2Wav's stream among them run through runtime/exported.py, one session at a time, without graphs."""
        self.model, self.config = model, config
        param = model.thinker.lm_head.weight
        self.device, self.dtype = param.device, param.dtype
        text_cfg = config.thinker.text
        self.max_sessions = options.max_sessions
        self.max_seq_len = min(options.max_seq_len, text_cfg.max_position_embeddings)
        self.prefill_chunk = min(options.prefill_chunk, self.max_seq_len)
        self.prefill_buckets = prefill_buckets(self.prefill_chunk)
        self.speech = model.has_audio_output
        # hidden_states[accept_hidden_layer] of the prompt feed the talker prompt; 0 = the embeddings themselves
        self.accept_layer = config.talker.accept_hidden_layer if self.speech else 0
        slots = options.max_sessions
        self.thinker_cache = StaticKVCache.for_decoder(text_cfg, slots, self.max_seq_len, self.dtype, self.device)
        # one entry longer than the longest session: the last one is always past the text, so the talker's text
        # index clamps to a tts_pad there once the text has ended (runtime/decode_inputs.py)
        self.sampling = {"thinker": SlotSampling(slots, self.max_seq_len + 1, STAGE_THINKER, self.device)}
        self.sampling["thinker"].history[-1].zero_()  # padded talker rows read their text there: valid ids
        self.readout = DecodeReadout(slots, options.thinker_steps, self.device)
        self.thinker_inputs = ThinkerInputs(self.readout)
        self.talker_cache = self.code2wav_slots = self.suppress = self.talker_inputs = self.last_samples = None
        self.frame_caches: dict[int, FrameKVCache] = {}
        self.talker_max_len = 0
        if self.speech:
            talker_cfg = config.talker.text
            self.talker_max_len = min(self.max_seq_len + TALKER_PROMPT_EXTRA + 1, talker_cfg.max_position_embeddings)
            self.talker_cache = StaticKVCache.for_decoder(talker_cfg, slots, self.talker_max_len, self.dtype,
                                                          self.device)
            self.suppress = code0_suppress_mask(model.talker.cfg, self.device)  # [V]
            self.suppress_for = model.talker.cfg.codec_eos_token_id
            self.code2wav_slots = Code2WavSlots(model.code2wav, slots, self.device, self.dtype)
            self.first_column = torch.arange(config.talker.num_code_groups, device=self.device) == 0  # [G]
            self.talker_inputs = TalkerInputs(self.readout, config.talker.num_code_groups, talker_cfg.hidden_size,
                                              self.dtype)
            # each slot's last frame's samples (Code2Wav's steps write them, its packet copies them out)
            pool = self.code2wav_slots
            self.last_samples = torch.zeros(slots + 1, max(pool.first_frame_samples, pool.frame_samples),
                                            dtype=torch.float32, device=self.device)
            self.sampling["talker"] = SlotSampling(slots, self.talker_max_len, STAGE_TALKER, self.device)
            self.sampling["code_predictor"] = SlotSampling(slots, 0, STAGE_CODE_PREDICTOR, self.device)
            # one frame cache per batch bucket, outside any graph pool: a captured frame allocates nothing (an eager
            # batch of another size makes its own)
            predictor = model.talker.code_predictor
            self.frame_caches = {size: predictor.frame_cache(size, self.dtype, self.device)
                                 for size in batch_buckets(slots)}
        # Streams only where CUDA runs: the runner is also built on fake `cuda` tensors without a GPU.
        on_gpu = self.device.type == "cuda" and torch.cuda.is_available()
        # the talker's stream outranks the thinker's: where both have kernels ready, the speech path's run first
        self.talker_stream = torch.cuda.Stream(self.device, priority=-1) if self.speech and on_gpu else None
        self.timer = StageTimer(cuda_events=on_gpu)  # per-stage figures: CUDA events on a GPU (runtime/timing.py)
        self.transfers = HostTransfers(self.device, on_gpu, self.talker_stream)
        self._slot_ids: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        steps = set(exported) & EXPORTED_STEPS
        self.exported = ExportedSteps(self, steps) if steps else None
        use_graphs = options.use_graphs
        if use_graphs and self.exported is not None:
            raise ValueError(f"CUDA graphs capture the PyTorch steps; exported {', '.join(sorted(steps))} run without "
                             "them: use_graphs=False")
        if use_graphs is None:  # default: graphs wherever they can run
            use_graphs = on_gpu and graphs_possible() and self.exported is None
        self.static_prefill = use_graphs if options.static_prefill is None else options.static_prefill
        if use_graphs and not self.static_prefill:
            raise ValueError("CUDA graphs capture prefill chunks in their static form: static_prefill=False needs "
                             "use_graphs=False")
        audio = config.thinker.audio
        window_chunks = audio.n_window_infer // (2 * audio.n_window)
        self.audio_buckets = [size for size in batch_buckets(window_chunks)
                              if size < window_chunks] + list(range(window_chunks, AUDIO_GRAPH_CHUNKS + 1,
                                                                    window_chunks))
        # the vision encoder's captured patch counts (`vision_encoder` stage), one segment (a frame of one image or
        # video: its attention never leaves it) per replay: powers of two from VISION_GRAPH_MIN up to
        # max_vision_patches (16,384 by default: a 2048 x 2048 image at 16-pixel patches)
        self.vision_buckets = [size for size in batch_buckets(options.max_vision_patches) if size >= VISION_GRAPH_MIN]
        self.steps: dict[str, Callable] = {
            "audio_encoder": self.audio_encoder_step, "vision_encoder": self.vision_encoder_step,
            "thinker_prefill": self.thinker_prefill_step, "thinker_decode": self.thinker_decode_step,
            "talker_prefill": self.talker_prefill_step, "talker_decode": self.talker_decode_step,
            "code_predictor": self.code_predictor_step, "code2wav": self.code2wav_step,
            "code2wav_first": self.code2wav_first_step}
        self.graphs = None
        if use_graphs:
            talker_streams = {name: self.talker_stream for name in TALKER_STAGES} if self.speech else {}
            self.graphs = GraphRunner(self.device, max_batch=slots, stage_streams=talker_streams)
            self.graphs.capture_all(self.capture_plan())

    # ------------------------------------------------------------------ slots

    def reset_slot(self, slot: int) -> None:
        """Forget whatever a slot's last user left: KV lengths and the Code2Wav stream (admission calls this)."""
        self.thinker_cache.reset(slot)
        if self.exported is not None:
            self.exported.reset(slot)
        if self.speech:
            with self.on_talker_stream():  # the talker's graphs write these on its stream
                self.talker_cache.reset(slot)
                self.code2wav_slots.reset(slot)

    def admit(self, slot: int, options: GenerationOptions, prompt_ids: torch.Tensor) -> None:
        """A new request's sampling state in its slot (options resolved: every stage set, a seed); the thinker's
        repetition-penalty history starts with the prompt ids [1, L] (on the host), as transformers' input_ids do."""
        self.sampling["thinker"].admit(slot, options.thinker, options.seed, self.transfers.upload(prompt_ids))
        if self.speech:
            with self.on_talker_stream():
                self.sampling["talker"].admit(slot, options.talker, options.seed)
                self.sampling["code_predictor"].admit(slot, options.code_predictor, options.seed)

    def on_talker_stream(self):
        """The talker's CUDA stream as a context (nothing on the CPU)."""
        return torch.cuda.stream(self.talker_stream) if self.talker_stream is not None else nullcontext()

    def slot_ids(self, slots: list[int]) -> torch.Tensor:
        """[n] int64 slot ids on the device, kept per (stream, slots): a steady batch uploads its ids once, and a
        graph replay finds them in its input buffer already (runtime/graphs.py copies only what changed). Per
        stream, so no stream reads ids whose upload another stream has not finished. Never written in place
        (runtime/graphs.py mark_constant)."""
        key = (torch.cuda.current_stream(self.device).cuda_stream if self.transfers.on_gpu else None, tuple(slots))
        ids = self._slot_ids.get(key)
        if ids is None:
            ids = self._slot_ids[key] = mark_constant(self.indices(slots))
            if len(self._slot_ids) > SLOT_ID_CACHE:  # the oldest: unused for many ticks, whose work is done
                self._slot_ids.popitem(last=False)
        else:
            self._slot_ids.move_to_end(key)
        return ids

    def indices(self, values: list[int]) -> torch.Tensor:
        """[n] int64 on the runner's device from host ints (runtime/transfers.py: pinned, non-blocking)."""
        return self.transfers.to_device(values)

    def read_tick(self, talker: bool = True) -> tuple[list[list[int]], list[int] | None]:
        """The tick's one blocking device-to-host read, one copy of DecodeReadout: (the thinker's recent draws,
        ring[d mod R][slot] = a slot's draw d; each slot's last code 0, indexed by slot). Entries no step wrote
        this tick hold older values: the host reads only what it stepped. talker=False: the thinker's rows only,
        read without waiting for the talker's stream (a prompt's first token, while the talker's prefill runs);
        code 0s None."""
        if not talker:
            return self.transfers.read(self.readout.thinker, wait_for_talker=False), None
        rows = self.transfers.read(self.readout.tokens)
        return rows[:self.readout.ring], rows[self.readout.ring]

    def end_text(self, slot: int, prompt_len: int, generated: int) -> None:
        """A speaking session's text has ended after `generated` tokens (once, when the host sees it): in the
        thinker's history, its last token becomes tts_eos and the rest of the row tts_pad, the texts of the talker
        inputs that follow (runtime/decode_inputs.py). On the talker's stream, ahead of the talker steps that read
        them; the thinker writes the row no more."""
        history, start = self.sampling["thinker"].history, prompt_len
        with self.on_talker_stream():
            history[slot, start + generated - 1] = self.config.tts_eos_token_id
            history[slot, start + generated:] = self.config.tts_pad_token_id

    # ------------------------------------------------------------------ step functions (what graphs capture)

    def audio_encoder_step(self, chunks, num_tokens) -> tuple[torch.Tensor]:
        """chunks [1, C, mel, 2·n_window] one audio's zero-padded chunks, num_tokens [1] -> ([C·Tc, output_dim],):
        the audio encoder in its static layout (AudioEncoder.forward_chunks), the rows past num_tokens padding."""
        return (self.model.thinker.audio_tower.forward_chunks(chunks[0], num_tokens),)

    def vision_encoder_step(self, pixel_values, layout, num_patches) -> tuple[torch.Tensor, ...]:
        """pixel_values [1, S, patch_dim] one segment's patches zero-padded to its bucket S, layout [4, S] its
        rows, cols, heights, widths, num_patches [1] -> (embeds [S / M², H], *DeepStack levels [S / M², H]): the
        vision encoder in its static layout (VisionEncoder.forward_segment), the rows past num_patches / M²
        padding."""
        embeds, deepstack = self.model.thinker.visual.forward_segment(pixel_values[0], layout, num_patches)
        return (embeds, *deepstack)

    def thinker_prefill_step(self, embeds, positions, deepstack, slots, num_valid) -> tuple[torch.Tensor, ...]:
        """embeds [1, C, H], positions [3, 1, C], deepstack [levels, 1, C, H], slots [1], num_valid [1] real
        tokens (the last ones) -> (last hidden [1, H],) + (accept-layer states [1, C, H],) with a talker."""
        view = self.thinker_cache.view(slots, embeds.shape[1], embeds.shape[1], num_valid=num_valid)
        out = self.model.thinker.model(embeds, positions, None, view, DeepStack(dense=deepstack),
                                       output_layers=self.accept_layer > 0)
        view.commit()
        if self.accept_layer == 0:
            return (out.hidden[:, -1],)
        return out.hidden[:, -1], out.layer_outputs[self.accept_layer - 1]

    def thinker_decode_step(self, slots) -> tuple[()]:
        """slots [B] (−1 = padded row): each slot's last token fed at its next position, the next token sampled;
        both read from and written back to runtime/decode_inputs.py's ThinkerInputs (its tokens: the readout)."""
        thinker, state, sampler = self.model.thinker, self.thinker_inputs, self.sampling["thinker"]
        tokens, positions = state.build(slots)
        view = self.thinker_cache.view(slots, 1, 1)
        hidden = thinker.model(thinker.model.embed_tokens(tokens[:, None]), positions, None, view).hidden
        view.commit()
        drawn_at = sampler.steps[slots]  # (padded rows: the scratch row's)
        state.advance(slots, positions, sampler.sample(thinker.lm_head(hidden[:, -1]), slots), drawn_at)
        return ()

    def talker_prefill_step(self, embeds, positions, slots, num_valid) -> tuple[torch.Tensor, torch.Tensor]:
        """embeds [1, C, H], positions [3, 1, C], slots [1], num_valid [1] -> (logits [1, V], hidden [1, H])
        of the chunk's last token."""
        view = self.talker_cache.view(slots, embeds.shape[1], embeds.shape[1], num_valid=num_valid)
        logits, hidden = self.model.talker(embeds, positions, None, view, num_logits_to_keep=1)
        view.commit()
        return logits[:, -1], hidden[:, -1]

    def talker_decode_step(self, slots) -> tuple[()]:
        """slots [B]: the input after each slot's last frame built here (its codes and its text: runtime/
        decode_inputs.py), one step, code 0 sampled with the control ids suppressed (§8.2) and recorded with its
        hidden state for the code predictor's step."""
        embeds, positions = self.talker_input(slots)
        view = self.talker_cache.view(slots, 1, 1)
        logits, hidden = self.model.talker(embeds, positions, None, view)
        view.commit()
        code0 = self.sampling["talker"].sample(logits[:, -1], slots, self.suppress)
        self.talker_inputs.advance(slots, positions)  # last, as the cache's commit: a failed step changes nothing
        self.talker_inputs.record_code0(slots, code0, hidden[:, -1])
        return ()

    def talker_input(self, slots) -> tuple[torch.Tensor, torch.Tensor]:
        """slots [B] -> (embeds [B, 1, H], positions [3, B, 1]) of the slots' next talker step (before its draw:
        the talker's step counter is the frames made so far)."""
        model, state = self.model, self.talker_inputs
        text_ids = state.text_ids(self.sampling["thinker"].history, self.sampling["talker"].steps, slots)
        return state.build(model.talker, model.thinker.model.embed_tokens, text_ids, slots)

    def code_predictor_step(self, slots) -> tuple[()]:
        """slots [B]: the code predictor's whole frame from each slot's code 0 and talker state (recorded by the
        talker's step in runtime/decode_inputs.py's TalkerInputs), recorded there as the slot's frame. Code g of
        frame k is drawn at step k * G + g (k: the talker's steps so far − 1), its history the frame's codes so
        far (transformers' code-predictor generate starts its input_ids empty)."""
        sampler, groups = self.sampling["code_predictor"], self.config.talker.num_code_groups
        hidden, code0 = self.talker_inputs.frame_inputs(slots)
        rows = sampler.rows(slots)
        gathered = sampler.gather(rows)
        first_step = (self.sampling["talker"].steps[rows] - 1) * groups  # [B]
        # every draw's step, made once per frame: row g (contiguous, as the draw kernel reads it) is codebook g+1's
        steps = first_step[None] + torch.arange(1, groups, device=slots.device)[:, None]  # [G-1, B]
        history = torch.full((slots.shape[0], groups - 1), -1, dtype=torch.long, device=slots.device)
        drawn = []

        def choose(logits):  # called once per codebook 1..G-1, in order; the draw records the code in history
            code = sampler.draw(logits, gathered, history, steps[len(drawn)], record_at=len(drawn))
            drawn.append(code)
            return code

        codes = self.model.talker.predict_frame(hidden, code0, sample_fn=choose,
                                                frame_cache=self.frame_caches.get(hidden.shape[0]))  # [B, G]
        self.talker_inputs.record_codes(slots, codes)  # the next talker step's input and Code2Wav read them there
        return ()

    def code2wav_step(self, slots) -> tuple[()]:
        """slots [B] of slots past their first frame: each slot's last frame (recorded by the code predictor's
        step) -> its hop of samples, float32, in last_samples[slot, :hop]."""
        return self._code2wav(slots, first=False)

    def code2wav_first_step(self, slots) -> tuple[()]:
        """slots [B] of slots on their first frame -> last_samples[slot, :num_samples(1)]."""
        return self._code2wav(slots, first=True)

    def _code2wav(self, slots, first: bool) -> tuple[()]:
        codes = self.in_codebook(self.talker_inputs.codes[slots])[:, :, None]  # [B, G, 1]
        wav = self.model.code2wav.decode_frame(codes, self.code2wav_slots.view(slots, first=first))  # [B, 1, n]
        # packets are float32 (or pcm16 from it, on the host), cast here rather than between graphs
        self.last_samples[:, :wav.shape[-1]].index_put_((slots,), wav[:, 0].float())
        return ()

    def frame(self, slot: int, first: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes [G], samples [n]) of the slot's last frame: views of the per-slot state the steps wrote (valid
        until the slot's next frame; a packet copies them out)."""
        pool = self.code2wav_slots
        samples = pool.first_frame_samples if first else pool.frame_samples
        return self.talker_inputs.codes[slot], self.last_samples[slot, :samples]

    def in_codebook(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, G] as Code2Wav reads them: a frame is made before its code 0 is read (runtime/speech.py
        make_frames), so code 0 may be the end-of-speech id, past Code2Wav's tables; that frame is dropped, and
        code 0 stands in for it so the lookup stays inside them. Every other code is left as it is."""
        return torch.where((codes == self.model.talker.cfg.codec_eos_token_id) & self.first_column, 0, codes)

    def capture_plan(self) -> list[StageSpec]:
        """Every stage the runner captures at every bucket, largest first (the smaller graphs reuse the larger
        ones' pool blocks): the audio encoder per chunk bucket, prefill chunks per prefill bucket, then each decode
        stage per batch bucket. The
        example inputs are all padded rows (slot −1): running them touches only the scratch slots."""
        prefill = ["thinker_prefill"] + (["talker_prefill"] if self.speech else [])
        batched = ["thinker_decode"] + (["talker_decode", "code_predictor", "code2wav", "code2wav_first"]
                                        if self.speech else [])
        stages = [("audio_encoder", size) for size in reversed(self.audio_buckets)]
        stages += [("vision_encoder", size) for size in reversed(self.vision_buckets)]
        stages += [(name, size) for size in reversed(self.prefill_buckets) for name in prefill]
        stages += [(name, size) for size in reversed(batch_buckets(self.max_sessions)) for name in batched]
        return [StageSpec(name, size, self.steps[name], self._example_inputs(name, size)) for name, size in stages]

    def _example_inputs(self, name: str, size: int) -> tuple[torch.Tensor, ...]:
        """Inputs of the right shapes made on the runner's device by factory functions (no host copies)."""
        cfg, kw = self.config, dict(dtype=self.dtype, device=self.device)
        index = dict(dtype=torch.long, device=self.device)
        thinker_hidden, talker_hidden = cfg.thinker.text.hidden_size, cfg.talker.text.hidden_size
        padded = torch.full((1 if "prefill" in name else size,), -1, **index)
        if name == "audio_encoder":  # chunks [1, C, mel, 2·n_window], num_tokens [1]
            audio = cfg.thinker.audio
            return (torch.zeros(1, size, audio.num_mel_bins, 2 * audio.n_window, **kw),
                    torch.full((1,), size, **index))
        if name == "vision_encoder":  # pixel_values [1, S, patch_dim], layout [4, S], num_patches [1]
            vision = cfg.thinker.vision
            patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
            return (torch.zeros(1, size, patch_dim, **kw), torch.ones(4, size, **index),
                    torch.full((1,), size, **index))
        if name == "thinker_prefill":
            levels = len(cfg.thinker.vision.deepstack_visual_indexes)
            return (torch.zeros(1, size, thinker_hidden, **kw), torch.zeros(3, 1, size, **index),
                    torch.zeros(levels, 1, size, thinker_hidden, **kw), padded, torch.full((1,), size, **index))
        if name == "talker_prefill":
            return (torch.zeros(1, size, talker_hidden, **kw), torch.zeros(3, 1, size, **index), padded,
                    torch.full((1,), size, **index))
        return (padded,)  # the other decode stages read their inputs from runtime/decode_inputs.py by slot

    def run(self, name: str, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """One stage: its graph's replay when captured, else the step function eagerly."""
        if self.graphs is not None:
            return self.graphs.replay(name, inputs, *BATCHED.get(name, (None, None)))
        return self.steps[name](*inputs)

    # ------------------------------------------------------------------ host-level steps

    def encode_audio(self, inputs) -> torch.Tensor | None:
        """A prompt's audios through the `audio_encoder` stage (its graph when captured) -> [tokens, output_dim],
        every audio's tokens in order: each audio cut at window boundaries into pieces of at most
        AUDIO_GRAPH_CHUNKS chunks, each piece in the smallest chunk bucket that holds it. That is transformers'
        encoding whenever one of the audios holds a full chunk: it then pads every chunk of the batch to a full
        chunk, as the stage does, and cuts attention windows of whole chunks from each audio's start, which the
        pieces keep whole (runtime/models/audio_encoder.py). Else (every audio shorter than a chunk), with
        dynamic prefill, or a mask that is not the processor's right padding: None, and the thinker encodes them
        together eagerly. The frame counts come from the host-side frame mask: nothing is read back."""
        features, mask = inputs.input_features, inputs.feature_attention_mask
        if not self.static_prefill or features is None:
            return None
        audio = self.config.thinker.audio
        chunk = 2 * audio.n_window
        if mask is None:
            lengths = [features.shape[-1]] * features.shape[0]
        else:
            lengths = [int(n) for n in mask.sum(-1).tolist()]
            if not all(bool(row[:n].all()) for row, n in zip(mask, lengths)):
                return None
        if max(lengths, default=0) < chunk:
            return None
        piece_frames = self.audio_buckets[-1] * chunk  # whole attention windows (AUDIO_GRAPH_CHUNKS' buckets)
        encoded = []
        for row, frames in enumerate(lengths):
            for start in range(0, frames, piece_frames):
                piece = min(piece_frames, frames - start)
                bucket = next(size for size in self.audio_buckets if size * chunk >= piece)
                chunks = F.pad(features[row, :, start:start + piece], (0, bucket * chunk - piece))  # [mel, b·chunk]
                chunks = chunks.view(audio.num_mel_bins, bucket, chunk).transpose(0, 1)  # [bucket, mel, chunk]
                tokens = audio_token_count(piece, audio.n_window)
                encoded.append(self.run("audio_encoder", (chunks[None], self.indices([tokens])))[0][:tokens])
        return torch.cat(encoded) if len(encoded) > 1 else encoded[0]

    def encode_vision(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor
                      ) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
        """Images or videos through the `vision_encoder` stage (its graph when captured) -> the vision encoder's
        (embeds [tokens, H], DeepStack levels), items in order: each segment (a frame of an item: its patches
        attend only among themselves, MODEL_SPEC §6.4) alone, zero-padded to its patch bucket, padded patches
        masked as keys. grid_thw on the host (runtime/engine.py keeps it there): the layout is computed there and
        uploaded. None with dynamic prefill, a grid on the device, or a frame past the largest bucket: the thinker
        encodes them eagerly."""
        merge = self.config.thinker.vision.spatial_merge_size
        if not self.static_prefill or grid_thw is None or grid_thw.device.type != "cpu":
            return None
        grids = [tuple(int(v) for v in item) for item in grid_thw.tolist()]
        if any(h * w > self.vision_buckets[-1] for _, h, w in grids):
            return None
        outputs, offset = [], 0
        for t, h, w in grids:
            patches = h * w
            bucket = next(size for size in self.vision_buckets if size >= patches)
            frame = vision_layout(torch.tensor([[1, h, w]]), merge)  # on the host, the same for every frame
            layout = self.transfers.upload(F.pad(torch.stack((frame.rows, frame.cols, frame.heights, frame.widths)),
                                                 (0, bucket - patches), value=1))  # [4, bucket]
            count = self.indices([patches])
            for _ in range(t):
                pixels = F.pad(pixel_values[offset:offset + patches], (0, 0, 0, bucket - patches))  # [bucket, dim]
                out = self.run("vision_encoder", (pixels[None], layout, count))
                outputs.append([level[:patches // merge ** 2] for level in out])
                offset += patches
        if offset != pixel_values.shape[0]:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches, grid_thw {grid_thw.tolist()} "
                             f"describes {offset}")
        levels = [torch.cat(parts) if len(parts) > 1 else parts[0] for parts in zip(*outputs)]
        return levels[0], levels[1:]

    def thinker_decode(self, slots: list[int], longest: int) -> None:
        """One step of each slot's last token (on the device: ThinkerInputs), its next token sampled there (read
        with `read_tick`); `longest`: the longest row's length after it."""
        check_room(self.thinker_cache, longest)
        slot_ids = self.slot_ids(slots)
        if self.exported is not None and self.exported.thinker:
            sampler = self.sampling["thinker"]
            tokens, positions = self.thinker_inputs.build(slot_ids)
            drawn_at = sampler.steps[slot_ids]
            chosen = sampler.sample(self.exported.thinker_decode(tokens, positions, slots), slot_ids)
            self.thinker_inputs.advance(slot_ids, positions, chosen, drawn_at)
            return
        self.run("thinker_decode", (slot_ids,))

    def talker_decode(self, slots: list[int], longest: int) -> None:
        """One talker step per slot: its input (last frame, text, position) built on the device, code 0 sampled and
        kept there with its hidden state for the code predictor (runtime/decode_inputs.py; read with
        `read_tick`)."""
        check_room(self.talker_cache, longest)
        self._check_suppress()
        slot_ids = self.slot_ids(slots)
        if self.exported is not None and self.exported.talker:
            embeds, positions = self.talker_input(slot_ids)
            logits, hidden = self.exported.talker_decode(embeds, positions, slots)
            code0 = self.sampling["talker"].sample(logits, slot_ids, self.suppress)
            self.talker_inputs.advance(slot_ids, positions)
            self.talker_inputs.record_code0(slot_ids, code0, hidden)
            return
        self.run("talker_decode", (slot_ids,))

    def first_token(self, logits: torch.Tensor, slot: int, last_positions: torch.Tensor) -> torch.Tensor:
        """The prompt's last logits [1, V] and last positions [3, 1, 1] -> the first generated token [1], sampled
        as the decode steps do; both become the slot's ThinkerInputs (the first decode step feeds them)."""
        token = self.sampling["thinker"].sample(logits, self.slot_ids([slot]))
        self.thinker_inputs.start(slot, token, last_positions)
        return token

    def first_code0(self, logits: torch.Tensor, hidden: torch.Tensor, slot: int) -> None:
        """The talker prompt's last logits [1, V] and hidden state [1, H] -> code 0 of the first frame (control
        ids suppressed), recorded with that state for the code predictor's step (read with `read_tick`)."""
        self._check_suppress()
        slot_ids = self.slot_ids([slot])
        code0 = self.sampling["talker"].sample(logits, slot_ids, self.suppress)
        self.talker_inputs.record_code0(slot_ids, code0, hidden)

    def _check_suppress(self) -> None:
        # the mask spares the talker's current EOS id; rewritten in place, as the captured steps read it
        talker_cfg = self.model.talker.cfg
        if self.suppress_for != talker_cfg.codec_eos_token_id:
            self.suppress.copy_(code0_suppress_mask(talker_cfg, self.device))
            self.suppress_for = talker_cfg.codec_eos_token_id

    def code_predictor_frame(self, slots: list[int]) -> None:
        """Each slot's next frame (code 0, then the code predictor's sampled codes), from its code 0 and talker state
        on the device, recorded there (TalkerInputs.codes)."""
        self.run("code_predictor", (self.slot_ids(slots),))

    def code2wav_frame(self, slots: list[int], first: bool) -> None:
        """Each slot's recorded frame through Code2Wav -> its samples in `last_samples` (float32; `frame` gives
        them). A slot's first frame (`first`: all rows are, else none) has its own stage (code2wav_first): its
        transposed convs still trim their left edge, so it makes fewer samples."""
        if self.exported is not None and self.exported.code2wav:
            codes = self.in_codebook(self.talker_inputs.codes[self.slot_ids(slots)])
            for slot, wav in zip(slots, self.exported.code2wav_frame(codes, slots)):
                self.last_samples[slot, :wav.shape[-1]] = wav.float()
            return
        self.run("code2wav_first" if first else "code2wav", (self.slot_ids(slots),))


def prefill_buckets(prefill_chunk: int) -> list[int]:
    """Static chunk lengths of the captured prefill: powers of two from 16 below prefill_chunk, then
    prefill_chunk: [16, 32, 64, 128, 256, 512] for 512, [7] for 7."""
    buckets, size = [], 16
    while size < prefill_chunk:
        buckets.append(size)
        size *= 2
    return buckets + [prefill_chunk]


def check_room(cache: StaticKVCache, longest: int) -> None:
    # The step functions see only static shapes (a graph cannot check a host length): check it here first.
    if longest > cache.max_len:
        raise ValueError(f"{longest} tokens exceed this cache's {cache.max_len} tokens per session")
