"""Command line: `python -m runtime demo`, `python -m runtime generate ...` and `python -m runtime serve`.

demo      builds (first run) or reuses the tiny default checkpoint, answers a built-in prompt with a
          synthetic audio clip and image, streams the speech into demo.wav, prints the text and the
          timing record (the paper's Table 2 rows).
generate  runs a checkpoint directory (or preset) on your text / audio / images and streams the speech.
serve     an OpenAI-compatible HTTP server (runtime/serve/): chat completions with streaming speech, a
          realtime WebSocket, Prometheus metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import numpy as np
import torch

from runtime.frontend.audio import OUTPUT_FORMATS
from runtime.frontend.prompt import DEFAULT_SYSTEM_PROMPT

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEMO_TEXT = "Listen to this clip and look at the picture. What do you hear and see?"
DEMO_SEED = 20251201  # the demo samples with the checkpoint's defaults and this seed: the same output every run
# CLI flag (dest) -> generate/stream keyword; unset flags keep the checkpoint's generation_config.json defaults
SAMPLING_FLAGS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                  "repetition_penalty": "repetition_penalty", "talker_temperature": "talker_temperature",
                  "talker_top_k": "talker_top_k", "talker_top_p": "talker_top_p", "talker_min_p": "talker_min_p",
                  "talker_repetition_penalty": "talker_repetition_penalty", "seed": "seed"}


def _demo_inputs() -> tuple[np.ndarray, int, np.ndarray]:
    """A 1.5 s rising two-tone chirp at 44.1 kHz (so the resampler runs) and a 96x128 colour gradient."""
    rate = 44100
    t = np.arange(int(1.5 * rate)) / rate
    audio = 0.4 * np.sin(2 * np.pi * (220 + 200 * t) * t) + 0.2 * np.sin(2 * np.pi * 660 * t)
    rows, cols = np.mgrid[0:96, 0:128]
    image = np.stack([rows * 255 // 95, cols * 255 // 127, (rows + cols) * 255 // 222], axis=-1).astype(np.uint8)
    return audio.astype(np.float32), rate, image


def _run(engine, out: str | None, out_format: str | None, **request) -> int:
    """Stream one request: text to stdout as it comes, audio into `out` frame by frame (in `out_format`), a
    progress line on stderr when it is a terminal, then the timing record (the paper's Table 2 rows)."""
    from runtime.frontend.audio import open_audio_writer
    from runtime.streaming import AudioChunk, TextDelta

    stream = engine.stream(**request)
    writer, frames, text = None, 0, []
    try:
        for event in stream:
            if isinstance(event, TextDelta):
                text.append(event.text)
            elif isinstance(event, AudioChunk):
                if writer is None:
                    writer = open_audio_writer(out, event.sample_rate, out_format)
                writer.write(event.samples.numpy())
                frames = event.frame + 1
                if sys.stderr.isatty():
                    print(f"\rspeaking: {frames} frames, {stream.timings.audio_seconds:.2f} s of audio",
                          end="", file=sys.stderr, flush=True)
    finally:
        if writer is not None:
            writer.close()
    if frames and sys.stderr.isatty():
        print(file=sys.stderr)
    print(f"text: {''.join(text)!r}")
    if writer is not None:
        print(f"speech: {frames} codec frames, {stream.timings.audio_seconds:.2f} s at 24000 Hz -> {out} "
              f"({out_format})")
    elif request.get("return_audio"):  # the talker ended the speech before its first frame (or the text at t1)
        print(f"speech: none (the talker ended the speech before its first frame); nothing written to {out}")
    _print_timings(stream.timings)
    return 0


def _print_timings(t) -> None:
    ms = lambda v: "-" if v is None else f"{v * 1000:.1f} ms"  # noqa: E731
    per = lambda xs: "-" if not xs else f"{sum(xs) / len(xs) * 1000:.2f} ms"  # noqa: E731
    rows = [("preprocessing", ms(t.preprocess)), ("thinker first token", ms(t.thinker_first_token)),
            ("talker first frame", ms(t.talker_first_frame)),
            ("code predictor per frame", per(t.code_predictor_per_frame)),
            ("code2wav per frame", per(t.code2wav_per_frame)), ("first audio packet", ms(t.first_packet)),
            ("total", ms(t.total)), ("RTF", "-" if t.rtf is None else f"{t.rtf:.3f}")]
    print("timings:")
    for name, value in rows:
        print(f"  {name:<26} {value}")


def _engine(checkpoint: str, device: str, dtype: str):
    from runtime.engine import OmniEngine

    start = time.perf_counter()
    engine = OmniEngine.from_pretrained(checkpoint, device=device, dtype=DTYPES[dtype])
    # stdout: stderr is kept for the one error line (and the progress line on a terminal)
    print(f"loaded {checkpoint} on {device} ({dtype}) in {time.perf_counter() - start:.2f} s")
    return engine


def _output(args) -> str | None:
    """The output format, checked before any model work (a bad --out must not cost a whole generation)."""
    if getattr(args, "no_audio", False):
        return None
    from runtime.frontend.audio import output_format

    return output_format(args.out, args.format)


def demo(args) -> int:
    out_format = _output(args)
    engine = _engine(args.checkpoint, args.device, args.dtype)
    audio, rate, image = _demo_inputs()
    print(f"prompt: {DEMO_TEXT!r} + 1.5 s audio clip + 96x128 image")
    return _run(engine, args.out, out_format, text=DEMO_TEXT, audio=audio, sample_rate=rate, images=[image],
                max_new_tokens=args.max_new_tokens, talker_max_new_tokens=args.talker_max_new_tokens,
                speaker=args.speaker, return_audio=engine.model.has_audio_output, **_sampling(args))


def _sampling(args) -> dict:
    """The sampling flags given -> generate/stream keywords (with a sampling keyword set, `do_sample` follows:
    --temperature 0.7 samples the thinker, which is greedy by default); --greedy: every stage greedy."""
    if args.greedy:
        return dict(do_sample=False, talker_do_sample=False, code_predictor_do_sample=False, seed=args.seed)
    given = {keyword: getattr(args, flag) for flag, keyword in SAMPLING_FLAGS.items() if getattr(args, flag) is not None}
    if any(k in given for k in ("temperature", "top_k", "top_p", "min_p")):
        given["do_sample"] = True
    if any(k.startswith("talker_") and k != "talker_repetition_penalty" for k in given):
        given["talker_do_sample"] = True
    return given


def _load_messages(path: str) -> list:
    """--messages FILE: a JSON list of turns (runtime/frontend/conversation.py), media given as file paths
    relative to the JSON file's folder or absolute."""
    try:
        with open(path, encoding="utf-8") as handle:
            messages = json.load(handle)
    except FileNotFoundError:
        raise FileNotFoundError(f"--messages file {path!r} does not exist") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"--messages file {path!r} is not valid JSON: {exc}") from exc
    if not isinstance(messages, list):
        raise ValueError(f"--messages file {path!r} must hold a JSON list of turns, got {type(messages).__name__}")
    base = os.path.dirname(os.path.abspath(path))
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else []:
            for key in ("audio", "image", "video", "path"):
                value = part.get(key) if isinstance(part, dict) else None
                if isinstance(value, str) and not os.path.isabs(value) and "://" not in value:
                    part[key] = os.path.join(base, value)
    return messages


def _check_generate_inputs(args) -> None:
    """What can be refused before the model is loaded: no input, a preset without a tokenizer asked for text,
    missing input files."""
    from runtime.presets import PRESETS

    if not (args.text or args.audio or args.image or args.video or args.messages):
        raise ValueError("nothing to answer: give --text, --audio, --image, --video or --messages")
    if args.checkpoint in PRESETS and args.checkpoint != "tiny":
        raise ValueError(f"preset {args.checkpoint!r} has random weights and no tokenizer, so it cannot read "
                         "--text/--audio/--image/--video/--messages (it serves benchmarks through input_ids); "
                         "use a checkpoint directory with tokenizer.json")
    if args.messages and (args.text or args.audio or args.image or args.video):
        raise ValueError("give either --messages or --text/--audio/--image/--video, not both")
    for flag, paths in (("--audio", args.audio), ("--image", args.image), ("--video", args.video)):
        for path in paths or []:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{flag} file {path!r} does not exist")
    from runtime.frontend.audio import require_soundfile
    from runtime.frontend.vision import load_image

    for i, path in enumerate(args.image or []):
        load_image(path, f"--image {i}")  # a damaged or non-image file, found before a long model load
    for path in args.audio or []:
        soundfile = require_soundfile()
        try:
            soundfile.info(path)
        except (RuntimeError, soundfile.SoundFileError) as exc:
            raise ValueError(f"could not decode audio file {path}: {exc}") from exc


def generate(args) -> int:
    _check_generate_inputs(args)
    messages = _load_messages(args.messages) if args.messages else None
    out_format = _output(args)
    engine = _engine(args.checkpoint, args.device, args.dtype)
    request = dict(messages=messages) if messages is not None else dict(
        text=args.text, audio=args.audio or None, images=args.image or None, videos=args.video or None)
    return _run(engine, args.out, out_format, **request, system=args.system, video_fps=args.video_fps,
                use_audio_in_video=args.use_audio_in_video, max_new_tokens=args.max_new_tokens,
                talker_max_new_tokens=args.talker_max_new_tokens, speaker=args.speaker,
                return_audio=engine.model.has_audio_output and not args.no_audio, **_sampling(args))


def _one_line(err: BaseException) -> str:
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
    if isinstance(err, KeyError):  # str(KeyError) is the quoted key alone
        text = f"missing {text}"
    return f"error: {text}"


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr with exit code 2, like every other error here (`--help` shows usage)."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m runtime", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, checkpoint_default, max_new_tokens, talker_max_new_tokens, seed=None):
        p.add_argument("--checkpoint", default=checkpoint_default,
                       help="checkpoint directory or preset (tiny, qwen3-omni-30b-a3b); default: %(default)s")
        p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
        p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
        p.add_argument("--speaker", default="ethan", help="voice (default: %(default)s)")
        p.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                       help="thinker text tokens at most (default: %(default)s)")
        p.add_argument("--talker-max-new-tokens", type=int, default=talker_max_new_tokens,
                       help="codec frames of 80 ms at most (default: %(default)s = "
                            f"{talker_max_new_tokens * 0.08:.0f} s of speech)")
        p.add_argument("--format", choices=sorted(OUTPUT_FORMATS),
                       help="output audio format (default: from the --out suffix: .wav .flac .mp3 .opus/.ogg "
                            ".pcm/.raw)")
        p.add_argument("--debug", action="store_true", help="on an error, show the traceback too")
        sampling = p.add_argument_group("sampling (unset: the checkpoint's generation_config.json, else the "
                                        "released defaults; README \"Sampling\")")
        for stage, prefix in (("thinker", ""), ("talker", "talker-")):
            sampling.add_argument(f"--{prefix}temperature", type=float, help=f"the {stage}'s temperature (samples it)")
            sampling.add_argument(f"--{prefix}top-k", type=int, help=f"the {stage}'s top-k (0 = off; samples it)")
            sampling.add_argument(f"--{prefix}top-p", type=float, help=f"the {stage}'s top-p (1 = off; samples it)")
            sampling.add_argument(f"--{prefix}min-p", type=float, help=f"the {stage}'s min-p (0 = off; samples it)")
            sampling.add_argument(f"--{prefix}repetition-penalty", type=float,
                                  help=f"the {stage}'s repetition penalty (1 = off)")
        sampling.add_argument("--seed", type=int, default=seed,
                              help="random seed of the request (default: %(default)s; none = a fresh one per run)")
        sampling.add_argument("--greedy", action="store_true", help="greedy decoding on every stage")

    p_demo = sub.add_parser("demo", help="speak a built-in prompt with the tiny default model")
    # the tiny model has random weights: short limits keep the demo quick on a CPU
    common(p_demo, "tiny", 32, 64, seed=DEMO_SEED)
    p_demo.add_argument("--out", default="demo.wav", help="output audio file (default: %(default)s)")
    p_demo.set_defaults(run=demo)

    p_gen = sub.add_parser("generate", help="run a checkpoint on your inputs")
    # long enough for a real spoken answer: 512 text tokens, 4096 frames = 5.5 min of speech
    common(p_gen, None, 512, 4096)
    p_gen.add_argument("--text", help="the user's text")
    p_gen.add_argument("--audio", action="append", help="audio file (wav/flac/ogg/mp3, any rate); repeatable")
    p_gen.add_argument("--image", action="append", help="image file; repeatable")
    p_gen.add_argument("--video", action="append", help="video file (decoded with PyAV); repeatable")
    p_gen.add_argument("--video-fps", type=float, default=1.0, help="video frames sampled per second "
                       "(default: %(default)s)")
    p_gen.add_argument("--use-audio-in-video", action="store_true", help="feed each video's audio track too")
    p_gen.add_argument("--system", default=DEFAULT_SYSTEM_PROMPT,
                       help="system prompt, used when the conversation has none (default: the Qwen3-Omni one, "
                            "which speech output needs)")
    p_gen.add_argument("--messages", help="a conversation as a JSON list of turns ({'role': 'user', 'content': "
                       "[{'type': 'audio', 'audio': 'q.wav'}, {'type': 'text', 'text': '...'}]}, ...); media paths "
                       "are relative to the JSON file")
    p_gen.add_argument("--out", default="out.wav", help="output audio file (default: %(default)s)")
    p_gen.add_argument("--no-audio", action="store_true", help="text only, skip the talker")
    p_gen.set_defaults(run=generate)

    from runtime.serve.cli import add_serve_parser

    add_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "generate" and args.checkpoint is None:
        parser.error("generate needs --checkpoint DIR (or a preset name)")
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # every failure is one line (exit 2); --debug adds the traceback
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(_one_line(err), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
