"""`OmniEngine`: a checkpoint (or preset) in; text and speech out.

    engine = OmniEngine.from_pretrained("path/to/Qwen3-Omni-30B-A3B-Instruct", device="cuda", dtype=torch.bfloat16)
    result = engine.generate(text="What is said here?", audio="question.wav", return_audio=True)
    result.text, result.waveform, result.sample_rate

Raw inputs (text, audio files or waveforms with their sample rate, images, video frames) go through the
front ends in runtime/frontend; the tensors transformers' processor produces can be passed instead under
the names transformers' `generate` uses (input_ids, input_features, feature_attention_mask, pixel_values,
image_grid_thw, pixel_values_videos, video_grid_thw, video_second_per_grid).
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from runtime import dispatch
from runtime.config import OmniConfig
from runtime.frontend import audio as audio_frontend
from runtime.frontend import inputs as inputs_frontend
from runtime.frontend import vision as vision_frontend
from runtime.frontend.prompt import DEFAULT_SYSTEM_PROMPT, tokenize_chat_text
from runtime.models.omni import OmniModel, build_model
from runtime.models.thinker import MultimodalInputs
from runtime.options import GenerationOptions, Request, SchedulerConfig, resolve_sampling, sampling_options
from runtime.sampling import StageSampling

AudioInput = str | os.PathLike | torch.Tensor | np.ndarray
# Exported backends (export/ort.py) the scheduler runs: the modules it calls as they are (encoders, code
# predictor) and the steps runtime/exported.py feeds from its slots (decoder steps, Code2Wav's stream).
SCHEDULED_BACKENDS = {"audio_encoder", "vision_encoder", "code_predictor", "thinker_step", "talker_step",
                      "code2wav_stream"}


@dataclass
class Prompt:
    """A prepared thinker prompt: ids plus the encoder inputs its placeholders stand for."""

    # On the host once the engine has it (`_to_device` leaves them there): the layouts read from them (TM-RoPE ids,
    # the talker prompt, a batch's rows) need their values, which on the device would each be a blocking read.
    # The prefill uploads the ids once (runtime/prefill.py).
    input_ids: torch.Tensor  # [B, L] int64, left-padded when rows differ
    attention_mask: torch.Tensor | None  # [B, L], 1 = real token; None = nothing padded
    inputs: MultimodalInputs = field(default_factory=MultimodalInputs)


@dataclass
class GenerateResult:
    sequences: torch.Tensor  # [B, prompt + new] int64, as transformers' generate returns
    text: list[str]  # decoded new tokens per row (empty strings without a tokenizer)
    codes: torch.Tensor | None = None  # [B, num_code_groups, frames] int64
    waveform: torch.Tensor | None = None  # [B, samples] float32 in [-1, 1]; zero past a row's num_samples
    sample_rate: int = 24000
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    # Speech per row: in a batch a row that stopped early has zero codes and zero samples after these counts
    # (transformers returns the same rows trimmed, as a list).
    num_frames: torch.Tensor | None = None  # [B] int64 codec frames before the row's codec EOS
    num_samples: torch.Tensor | None = None  # [B] int64 waveform samples of those frames


class OmniEngine:
    def __init__(self, config: OmniConfig, model: OmniModel, tokenizer=None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, scheduler: SchedulerConfig | dict | None = None,
                 kernels: str | dict[str, str] | None = None):
        """scheduler: how the scheduler is sized (runtime.options.SchedulerConfig, or a dict of its fields);
        fixed once the engine serves its first request. kernels: the kernel choice this engine runs with
        ("torch", "triton", "cuda" or {op: backend}, runtime/dispatch.py); None: the one active where the engine
        is built. Its loop thread and its CUDA-graph capture run under it, whatever other engines use."""
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.dtype = dtype
        self._scheduler_config = SchedulerConfig.of(scheduler)
        self.kernels = dispatch.kernel_choice(kernels) if kernels is not None else dispatch.selected()
        self._scheduler = None
        self._loop = None  # runtime.engine_loop.EngineLoop, started by the first request
        self._closed = False
        self._serving_lock = threading.RLock()  # two first requests from two threads build one scheduler
        self.backends: dict[str, object] = {}  # module -> exported backend plugged in (export/ort.py)
        self.sampling = StageSampling()  # per-stage sampling defaults: the checkpoint's generation_config.json

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(cls, path_or_preset: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, seed: int = 0,
                        backends: dict[str, str] | None = None,
                        scheduler: SchedulerConfig | dict | None = None,
                        kernels: str | dict[str, str] | None = None) -> "OmniEngine":
        """A checkpoint directory (config.json, safetensors, tokenizer), or a preset name:
        `tiny` (the demo's checkpoint, written on first use) or `qwen3-omni-30b-a3b` (the released shapes
        with random weights and no tokenizer: for benchmarks, takes input_ids only).
        backends: module -> "torch" | "ort:DIR" (an export from `python -m export`, run by ONNX Runtime) |
        "trt:DIR" (engines from `python -m export.trt`; needs tensorrt and a GPU), e.g.
        {"thinker_step": "ort:engines/", "code2wav": "trt:engines/trt/"}; modules: audio_encoder, vision_encoder,
        thinker_step, talker_step, code_predictor, code2wav, code2wav_stream (decode_step). `generate` then runs
        them exported; an export made for other weights, dtype or shapes is refused (export/ort.py,
        export/trt.py).
        scheduler: runtime.options.SchedulerConfig (or a dict of its fields) for the engine's scheduler.
        kernels: "torch" | "triton" | "cuda" | {op: backend} (runtime/dispatch.py), held by this engine; None: the
        choice active here."""
        scheduler = SchedulerConfig.of(scheduler)  # bad options fail before any weights are read
        kernels = dispatch.kernel_choice(kernels) if kernels is not None else dispatch.selected()
        if backends:
            from export.backends import apply_backends

            engine = cls.from_pretrained(path_or_preset, device, dtype, seed, scheduler=scheduler, kernels=kernels)
            engine.backends = apply_backends(engine.model, backends, dtype)
            return engine
        from runtime.presets import PRESETS
        from runtime.weights import init_random, load_weights

        _check_device_dtype(device, dtype)
        name = os.fspath(path_or_preset)
        if name == "tiny":
            from runtime.tiny import ensure_tiny_checkpoint

            name = os.fspath(ensure_tiny_checkpoint())
        if name in PRESETS:
            config = OmniConfig.from_pretrained(name)
            return cls(config, init_random(config, device, dtype, seed), None, device, dtype, scheduler, kernels)
        config = OmniConfig.from_pretrained(name)
        model = build_model(config, "meta")
        load_weights(model, name, prefix="", dtype=dtype, device=device)
        model.eval()
        tokenizer = None
        if any((Path(name) / f).is_file() for f in ("tokenizer.json", "vocab.json")):
            from runtime.frontend.tokenizer import Tokenizer

            tokenizer = Tokenizer.from_dir(name)
        engine = cls(config, model, tokenizer, device, dtype, scheduler, kernels)
        engine.sampling = StageSampling.from_checkpoint(name)
        return engine

    # ------------------------------------------------------------------ inputs

    def prepare(self, text: str | None = None, audio: AudioInput | Sequence[AudioInput] | None = None,
                sample_rate: int | None = None, images: Sequence[Any] | Any | None = None,
                videos: Sequence[Any] | Any | None = None, video_fps: float = 1.0,
                system: str | None = DEFAULT_SYSTEM_PROMPT, use_audio_in_video: bool = False,
                messages: Sequence[dict] | None = None) -> Prompt:
        """Raw inputs -> Prompt, rendered with the checkpoint's chat template (the built-in one without).

        Either a conversation, `messages` (runtime/frontend/conversation.py: system / user / assistant turns
        with text, audio, image and video parts), or one user turn of audios, then images, then videos, then
        the text. `system` is added when the conversation has no system turn (None: none).
        audio: a file path (decoded and resampled to 16 kHz), or a waveform (1-D float) with `sample_rate`
          (resampled when it is not 16 kHz), or a list of those. images: PIL images, HxWx3 uint8 arrays or file
          paths (turned upright by their EXIF orientation). videos: a video file (decoded with PyAV, frames
          sampled at `video_fps`), a [T, H, W, 3] uint8 array (frames taken at `video_fps`), or a list of those;
          a bare array is one video. use_audio_in_video: each video's audio track goes in with its frames; a file
          brings its own track, a frame array takes its track from the end of `audio` (one per array video, in
          video order).
        Every input is checked here, before any model work: errors name the input (audio 0, image file ..).
        """
        from runtime.frontend.conversation import conversation

        if self.tokenizer is None:
            raise ValueError("this engine has no tokenizer (a preset with random weights, or a checkpoint without "
                             "tokenizer.json): pass input_ids instead of text")
        if messages is not None:
            if any(x is not None for x in (text, audio, images, videos)):
                raise ValueError("give either messages= or text/audio/images/videos, not both")
        else:
            messages = inputs_frontend.raw_turn(text, _as_list(audio), sample_rate, _as_list(images),
                                                inputs_frontend.as_videos(videos), use_audio_in_video)
        conv = conversation(messages, getattr(self.tokenizer, "chat_template", None), system=system)
        thinker = self.config.thinker
        vision = dict(patch_size=thinker.vision.patch_size, temporal_patch_size=thinker.vision.temporal_patch_size,
                      merge_size=thinker.vision.spatial_merge_size)
        audios = iter(conv.audios)
        videos = [inputs_frontend.load_video_part(v, i, video_fps, use_audio_in_video, vision)
                  for i, v in enumerate(conv.videos)]
        tracks = iter(track for _, track in videos)
        waveforms = []  # audio slots in order of appearance: audio parts, and videos' tracks with use_audio_in_video
        for index, kind in enumerate(conv.kinds):
            if kind == "audio":
                value, rate = next(audios)
                number = sum(k == "audio" for k in conv.kinds[:index])  # "audio N" counts audio parts only
                waveforms.append(self._load_audio(value, rate if rate is not None else sample_rate, number))
            elif kind == "video" and use_audio_in_video:
                waveforms.append(next(tracks))
        image_list = [self._open_image(image, i) for i, image in enumerate(conv.images)]
        inputs = MultimodalInputs(use_audio_in_video=use_audio_in_video)
        counts = []
        if waveforms:
            features, mask = audio_frontend.extract_audio_features(waveforms)
            inputs.input_features, inputs.feature_attention_mask = features.to(self.dtype), mask
            counts = [int(audio_frontend.audio_token_count(int(n), thinker.audio.n_window)) for n in mask.sum(-1)]
        if image_list:
            inputs.pixel_values, inputs.image_grid_thw = vision_frontend.preprocess_images(image_list, **vision)
        seconds_per_grid = []
        if videos:
            pieces = [vision_frontend.preprocess_video(frames, fps=video_fps, **vision) for frames, _ in videos]
            inputs.pixel_values_videos = torch.cat([p[0] for p in pieces])
            inputs.video_grid_thw = torch.cat([p[1] for p in pieces])
            inputs.video_second_per_grid = torch.cat([p[2] for p in pieces])
            seconds_per_grid = [thinker.vision.temporal_patch_size / video_fps] * len(videos)
        input_ids = tokenize_chat_text(
            self.tokenizer, conv.text, audio_token_counts=counts, image_grid_thw=_grid_rows(inputs.image_grid_thw),
            video_grid_thw=_grid_rows(inputs.video_grid_thw), video_second_per_grid=seconds_per_grid or None,
            merge_size=vision["merge_size"], position_id_per_seconds=thinker.position_id_per_seconds,
            use_audio_in_video=use_audio_in_video)
        for name in ("pixel_values", "pixel_values_videos"):
            if getattr(inputs, name) is not None:
                setattr(inputs, name, getattr(inputs, name).to(self.dtype))
        return Prompt(input_ids, None, inputs)

    def _load_audio(self, audio: AudioInput, sample_rate: int | None, index: int = 0) -> torch.Tensor:
        """One audio input -> [num_samples] float32 at 16 kHz; ValueError naming it (`audio {index}` or its file)
        for a bad rate, shape, dtype or a NaN / inf sample, before any resampling."""
        if isinstance(audio, (str, os.PathLike)):
            return audio_frontend.load_audio(audio)
        return inputs_frontend.load_waveform(audio, sample_rate, f"audio {index}")

    def _open_image(self, image, index: int = 0):
        if isinstance(image, (str, os.PathLike)):
            return vision_frontend.load_image(image, f"image {index}")
        return image

    # ------------------------------------------------------------------ generation

    @torch.inference_mode()
    def generate(self, text: str | None = None, audio=None, sample_rate: int | None = None, images=None,
                 videos=None, *, messages=None, input_ids: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, input_features=None, feature_attention_mask=None,
                 pixel_values=None, image_grid_thw=None,
                 pixel_values_videos=None, video_grid_thw=None, video_second_per_grid=None,
                 use_audio_in_video: bool = False, video_fps: float = 1.0, system: str | None = DEFAULT_SYSTEM_PROMPT,
                 speaker: str | None = None, max_new_tokens: int = 128, talker_max_new_tokens: int = 1024,
                 return_audio: bool | None = None, **sampling) -> GenerateResult:
        """Generate text (and speech when `return_audio`, default: whenever the checkpoint can speak).

        Give either raw inputs (a conversation as `messages`, or text / audio / images / videos; see `prepare`)
        or processor tensors (input_ids and friends).
        Runs as the engine runs every request: one session per prompt row in the scheduler, all to completion
        (runtime/batch.py assembles the result).
        sampling: keywords as transformers names them (runtime.options.SAMPLING_KEYWORDS): `do_sample`,
        `temperature`, `top_k`, `top_p`, `min_p`, `repetition_penalty` for the thinker, the same with `talker_`
        and `code_predictor_` for those stages, and `seed`; unset ones take the checkpoint's defaults
        (`engine.sampling`, README "Sampling"). Each row of a batch draws with its own seed: seed + row.
        """
        sampling = sampling_options(self.sampling, **sampling)
        timings: dict[str, float] = {}
        start = time.perf_counter()
        prompt = self._prompt(text, audio, sample_rate, images, videos, input_ids, attention_mask, input_features,
                              feature_attention_mask, pixel_values, image_grid_thw, pixel_values_videos,
                              video_grid_thw, video_second_per_grid, use_audio_in_video, video_fps, system,
                              messages=messages)
        timings["preprocess"] = time.perf_counter() - start

        from runtime.batch import assemble, check_prompt, row_result, split_rows
        from runtime.streaming import consume_together

        options = GenerationOptions(max_new_tokens=max_new_tokens, talker_max_new_tokens=talker_max_new_tokens,
                                    speaker=speaker, return_audio=return_audio, **sampling)
        self._refuse_unsupported_backends("generate()")
        check_prompt(prompt.input_ids, prompt.attention_mask, max_new_tokens,
                     self.config.thinker.text.max_position_embeddings)
        request = self._request(prompt, options)
        # Offline = the engine run to completion: one session per prompt row in the scheduler that serves
        # streams (the same prefill, decode steps, frame loop and stop rules), the rows side by side.
        start = time.perf_counter()
        with dispatch.active(self.kernels):  # splitting a batch runs the audio encoder here, on this thread
            rows = split_rows(prompt, self.model.thinker)
        seed = request.options.seed
        streams = [self.submit(Request(row, replace(request.options, seed=(seed + i) % 2 ** 63)), started=start)
                   for i, row in enumerate(rows)]
        events = consume_together(streams)
        total = time.perf_counter() - start
        want_audio, eos = request.options.return_audio, self.config.im_end_token_id
        rows = [row_result(e, max_new_tokens, eos, want_audio) for e in events]
        sequences, codes, frames, waveform, samples = assemble(rows, prompt.input_ids, eos,
                                                               self.config.talker.num_code_groups)
        # The stages interleave in one engine: "thinker" is when the last row's text ended, "talker" when its
        # speech ended (the whole run), "code2wav" the Code2Wav time of the row that spent the most on it.
        timings["thinker"] = max(s.session.thinker_seconds or total for s in streams)
        result = GenerateResult(sequences=sequences, text=self._decode(sequences, prompt.input_ids.shape[1]),
                                timings=timings, sample_rate=_output_sample_rate(self.config))
        if want_audio:
            result.codes, result.num_frames, result.waveform, result.num_samples = codes, frames, waveform, samples
            timings["talker"] = total
            timings["code2wav"] = max(sum(s.timings.code2wav_per_frame) for s in streams)
        return result

    def _refuse_unsupported_backends(self, caller: str) -> None:
        """Exported backends the engine cannot run: the full Code2Wav decode (`code2wav`) has no place in an
        engine that decodes every request frame by frame (export code2wav_stream for that)."""
        unsupported = sorted(set(self.backends) - SCHEDULED_BACKENDS)
        if unsupported:
            raise NotImplementedError(
                f"{caller} decodes Code2Wav frame by frame for every request; the exported backends for "
                f"{', '.join(unsupported)} cannot run there (supported: {', '.join(sorted(SCHEDULED_BACKENDS))}): "
                "use code2wav_stream, or leave those modules on 'torch'")

    def stream(self, text: str | None = None, audio=None, sample_rate: int | None = None, images=None, videos=None,
               *, messages=None, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
               input_features=None, feature_attention_mask=None, pixel_values=None, image_grid_thw=None,
               pixel_values_videos=None, video_grid_thw=None, video_second_per_grid=None,
               use_audio_in_video: bool = False, video_fps: float = 1.0, system: str | None = DEFAULT_SYSTEM_PROMPT,
               speaker: str | None = None, max_new_tokens: int = 128, talker_max_new_tokens: int = 1024,
               return_audio: bool | None = None, audio_format: str = "float32", chunk_frames: int = 1, **sampling):
        """Like `generate`, but returns a `Stream` of TextDelta and AudioChunk events as they are ready
        (runtime/streaming.py: iterate it, or `async for` it); `stream.timings` holds the request's timing
        record. One request (batch 1). audio_format: "float32" or "pcm16" samples; chunk_frames: codec frames
        per AudioChunk (80 ms each). Options are checked as runtime.options.GenerationOptions; input errors are
        raised here, before any model work. Safe from any thread: the engine loop runs the request. sampling: as
        in `generate`; with a seed, a stream gives what `generate` gives for that request."""
        from runtime.streaming import StreamTimings

        started = time.perf_counter()
        options = GenerationOptions(max_new_tokens=max_new_tokens, talker_max_new_tokens=talker_max_new_tokens,
                                    speaker=speaker, return_audio=return_audio, audio_format=audio_format,
                                    chunk_frames=chunk_frames, **sampling_options(self.sampling, **sampling))
        self._check_speaker(options.speaker)
        self._refuse_unsupported_backends("stream()")
        prompt = self._prompt(text, audio, sample_rate, images, videos, input_ids, attention_mask, input_features,
                              feature_attention_mask, pixel_values, image_grid_thw, pixel_values_videos,
                              video_grid_thw, video_second_per_grid, use_audio_in_video, video_fps, system,
                              messages=messages)
        request = self._request(prompt, options)
        return self.submit(request, StreamTimings(preprocess=time.perf_counter() - started), started)

    def _request(self, prompt: Prompt, options: GenerationOptions) -> Request:
        """A checked prompt (on the device) and its options resolved against this checkpoint: return_audio a
        bool, the speaker a lower-case voice name."""
        want_audio = self._want_audio(options.return_audio, prompt, options.speaker, options.max_new_tokens)
        options = resolve_sampling(options, self.sampling)
        return Request(prompt, replace(options, speaker=(options.speaker or "ethan").lower(), return_audio=want_audio))

    # ------------------------------------------------------------------ serving

    def submit(self, request: Request, timings=None, started: float | None = None):
        """Queue one request (runtime.options.Request, batch 1) on the engine loop -> its Stream. Safe from any
        thread; starts the loop on first use. The scheduler's refusal (a request that cannot fit its slots) is
        raised here. timings: the request's StreamTimings so far; started: its perf_counter start."""
        return self._serving_loop().submit(request, timings=timings, started=started)

    @property
    def scheduler_config(self) -> SchedulerConfig:
        return self._scheduler_config

    @scheduler_config.setter
    def scheduler_config(self, value: SchedulerConfig | dict) -> None:
        config = SchedulerConfig.of(value)
        with self._serving_lock:
            if self._scheduler is not None:
                raise RuntimeError("the scheduler options are fixed once the engine has started serving (its "
                                   "caches and graphs are built): set them before the first request, or pass "
                                   "scheduler= to OmniEngine / OmniEngine.from_pretrained")
            self._scheduler_config = config

    @property
    def scheduler(self):
        """The engine's scheduler (runtime/scheduler.py), built on first use from `scheduler_config`. Once the
        engine loop runs, only its thread steps or changes the scheduler; look at it from another thread through
        `engine.loop.call(fn)`."""
        with self._serving_lock:
            if self._scheduler is None:
                from runtime.scheduler import Scheduler

                with _serving_scope(self.kernels, self.device):  # CUDA graphs are captured here
                    self._scheduler = Scheduler(self, self._scheduler_config)
            return self._scheduler

    @property
    def loop(self):
        """The engine loop (runtime/engine_loop.py) once the first request has started it, else None."""
        return self._loop

    def _serving_loop(self):
        from runtime.engine_loop import EngineLoop, EngineLoopError

        with self._serving_lock:
            if self._loop is None:
                if self._closed:
                    raise EngineLoopError("this engine is closed")
                # The loop holds no reference to the engine, so an engine dropped while serving is collected;
                # its loop then ends once the streams still open have finished (a stream of a temporary engine
                # still runs), and the scheduler's caches go with it.
                loop = EngineLoop(self.scheduler, scope=partial(_serving_scope, self.kernels, self.device))
                weakref.finalize(self, loop.retire)
                self._loop = loop
            return self._loop

    def close(self) -> None:
        """Stop serving: open streams end with runtime.engine_loop.EngineLoopError, later requests raise it;
        the loop thread is joined. Also at interpreter exit, or at the end of a `with engine:` block."""
        with self._serving_lock:
            self._closed = True
            loop = self._loop
        if loop is not None:
            loop.close()

    def __enter__(self) -> "OmniEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _prompt(self, text, audio, sample_rate, images, videos, input_ids, attention_mask, input_features,
                feature_attention_mask, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
                video_second_per_grid, use_audio_in_video, video_fps, system, messages=None) -> Prompt:
        if input_ids is None:
            prompt = self.prepare(text, audio, sample_rate, images, videos, video_fps, system, use_audio_in_video,
                                  messages=messages)
        else:
            if any(x is not None for x in (text, audio, images, videos, messages)):
                raise ValueError("give either raw inputs (messages or text/audio/images/videos) or input_ids, not both")
            prompt = Prompt(input_ids, attention_mask, MultimodalInputs(
                input_features, feature_attention_mask, pixel_values, image_grid_thw, pixel_values_videos,
                video_grid_thw, video_second_per_grid, use_audio_in_video))
        return self._to_device(prompt)

    def _want_audio(self, return_audio: bool | None, prompt: Prompt, speaker: str | None, max_new_tokens: int) -> bool:
        want_audio = self.model.has_audio_output if return_audio is None else return_audio
        if want_audio and not self.model.has_audio_output:
            raise ValueError("this checkpoint has no talker (enable_audio_output is false): use return_audio=False")
        _check_prompt(prompt, self.config, need_assistant_turn=want_audio)
        if want_audio:
            self._check_speaker(speaker)
            if max_new_tokens < 2:
                raise ValueError(f"speech output needs max_new_tokens >= 2 (got {max_new_tokens}): the talker "
                                 "starts from the first generated text token once it has been fed back")
        return want_audio

    def _check_speaker(self, speaker: str | None) -> None:
        speakers = self.config.talker.speaker_id
        if speaker is not None and speaker.lower() not in speakers:
            raise ValueError(f"unknown speaker {speaker!r}; this checkpoint has: {', '.join(sorted(speakers))}")

    def _decode(self, sequences: torch.Tensor, prompt_len: int) -> list[str]:
        if self.tokenizer is None:
            return [""] * sequences.shape[0]
        return [self.tokenizer.decode(row[prompt_len:].tolist()) for row in sequences]

    def _to_device(self, prompt: Prompt) -> Prompt:
        # the encoders' inputs go to the device; the audio frame mask, the image / video grids and the seconds per
        # grid stay with the ids on the host: the encoders' layouts and the TM-RoPE ids are read from them
        # (runtime/runner.py encode_audio, encode_vision; runtime/rope_index.py)
        on_host = ("feature_attention_mask", "image_grid_thw", "video_grid_thw", "video_second_per_grid")
        inputs = MultimodalInputs(**{k: v.cpu() if k in on_host and v is not None
                                     else v.to(self.device) if isinstance(v, torch.Tensor) else v
                                     for k, v in vars(prompt.inputs).items()})
        mask = prompt.attention_mask.cpu() if prompt.attention_mask is not None else None
        return Prompt(prompt.input_ids.cpu(), mask, inputs)  # ids stay on the host (see Prompt)


def _check_prompt(prompt: Prompt, config: OmniConfig, need_assistant_turn: bool) -> None:
    """Errors that must surface before any model work."""
    ids = prompt.input_ids
    if not isinstance(ids, torch.Tensor) or ids.dtype not in inputs_frontend.INT_DTYPES[:3] or ids.dim() != 2:
        raise ValueError(f"input_ids must be an integer tensor [batch, seq], got "
                         f"{getattr(ids, 'dtype', type(ids).__name__)} {tuple(getattr(ids, 'shape', ()))}")
    vocab = config.thinker.text.vocab_size
    bad = ((ids < 0) | (ids >= vocab)).any(-1).nonzero().flatten().tolist()
    if bad:
        row = bad[0]
        wrong = ids[row][(ids[row] < 0) | (ids[row] >= vocab)]
        raise ValueError(f"input_ids row {row} holds ids outside the vocabulary [0, {vocab}): "
                         f"{wrong[:5].tolist()} (rows with such ids: {bad})")
    attention = prompt.attention_mask
    if attention is not None:
        if tuple(attention.shape) != tuple(ids.shape):
            raise ValueError(f"attention_mask shape {tuple(attention.shape)} differs from input_ids {tuple(ids.shape)}")
        empty = (attention.sum(-1) == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"attention_mask row {empty[0]} is all zeros (rows {empty}): every row needs at least "
                             "one real token")
    mask = prompt.inputs.feature_attention_mask
    if mask is not None and (mask.sum(-1) == 0).any():
        empty = (mask.sum(-1) == 0).nonzero().flatten().tolist()
        raise ValueError(f"zero-length audio: feature_attention_mask rows {empty} have no frames")
    if not need_assistant_turn:
        return
    for row in range(ids.shape[0]):
        starts = (ids[row] == config.im_start_token_id).nonzero().flatten()
        if starts.numel() == 0 or starts[-1] + 1 >= ids.shape[1] or ids[row, starts[-1] + 1] != config.assistant_token_id:
            raise ValueError("speech output needs a prompt that ends with an open assistant turn "
                             "(`<|im_start|>assistant\\n`): the talker speaks that turn; row "
                             f"{row} has none")


@contextmanager
def _serving_scope(kernels: dict[str, str], device: torch.device):
    """What an engine's loop thread and its scheduler's construction (graph capture) run under: the engine's
    kernel choice and CUDA device."""
    with dispatch.active(kernels), torch.cuda.device(device) if device.type == "cuda" else nullcontext():
        yield


def _check_device_dtype(device, dtype) -> None:
    if isinstance(dtype, str):
        raise ValueError(f"dtype must be a torch.dtype, got the string {dtype!r}: pass torch.float32, torch.bfloat16 "
                         "or torch.float16 (the CLI's --dtype takes the names float32, bfloat16, float16)")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"unsupported dtype {dtype}; omni-rt runs torch.float32, torch.bfloat16 or torch.float16")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for but CUDA is not available (no GPU or no CUDA build of torch)")


def _output_sample_rate(config: OmniConfig) -> int:
    from runtime.config import Code2WavConfig

    return Code2WavConfig.SAMPLE_RATE


def _as_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _grid_rows(grid: torch.Tensor | None) -> list:
    return [] if grid is None else grid.tolist()
