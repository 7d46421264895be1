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
import sys
import time

import numpy as np
import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEMO_TEXT = "Listen to this clip and look at the picture. What do you hear and see?"


def _demo_inputs() -> tuple[np.ndarray, int, np.ndarray]:
    """A 1.5 s rising two-tone chirp at 44.1 kHz (so the resampler runs) and a 96x128 colour gradient."""
    rate = 44100
    t = np.arange(int(1.5 * rate)) / rate
    audio = 0.4 * np.sin(2 * np.pi * (220 + 200 * t) * t) + 0.2 * np.sin(2 * np.pi * 660 * t)
    rows, cols = np.mgrid[0:96, 0:128]
    image = np.stack([rows * 255 // 95, cols * 255 // 127, (rows + cols) * 255 // 222], axis=-1).astype(np.uint8)
    return audio.astype(np.float32), rate, image


def _run(engine, out: str | None, **request) -> int:
    """Stream one request: text to stdout as it comes, audio into `out` frame by frame, a progress line on
    stderr, then the timing record (the paper's Table 2 rows)."""
    from runtime.frontend.audio import require_soundfile
    from runtime.streaming import AudioChunk, TextDelta

    soundfile = require_soundfile() if request.get("return_audio") else None  # writing the wav needs it: fail first
    stream = engine.stream(**request)
    wav, frames, text = None, 0, []
    try:
        for event in stream:
            if isinstance(event, TextDelta):
                text.append(event.text)
            elif isinstance(event, AudioChunk):
                if wav is None:
                    wav = soundfile.SoundFile(out, "w", samplerate=event.sample_rate, channels=1, subtype="PCM_16")
                wav.write(event.samples.numpy())
                frames = event.frame + 1
                if sys.stderr.isatty():
                    print(f"\rspeaking: {frames} frames, {stream.timings.audio_seconds:.2f} s of audio",
                          end="", file=sys.stderr, flush=True)
    finally:
        if wav is not None:
            wav.close()
    if frames and sys.stderr.isatty():
        print(file=sys.stderr)
    print(f"text: {''.join(text)!r}")
    if wav is not None:
        print(f"speech: {frames} codec frames, {stream.timings.audio_seconds:.2f} s at 24000 Hz -> {out}")
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
    print(f"loaded {checkpoint} on {device} ({dtype}) in {time.perf_counter() - start:.2f} s", file=sys.stderr)
    return engine


def demo(args) -> int:
    engine = _engine(args.checkpoint, args.device, args.dtype)
    audio, rate, image = _demo_inputs()
    print(f"prompt: {DEMO_TEXT!r} + 1.5 s audio clip + 96x128 image")
    return _run(engine, args.out, text=DEMO_TEXT, audio=audio, sample_rate=rate, images=[image],
                max_new_tokens=args.max_new_tokens, talker_max_new_tokens=args.talker_max_new_tokens,
                speaker=args.speaker, return_audio=engine.model.has_audio_output)


def generate(args) -> int:
    engine = _engine(args.checkpoint, args.device, args.dtype)
    return _run(engine, args.out, text=args.text, audio=args.audio or None, images=args.image or None,
                max_new_tokens=args.max_new_tokens, talker_max_new_tokens=args.talker_max_new_tokens,
                speaker=args.speaker, return_audio=engine.model.has_audio_output and not args.no_audio)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, checkpoint_default):
        p.add_argument("--checkpoint", default=checkpoint_default,
                       help="checkpoint directory or preset (tiny, qwen3-omni-30b-a3b); default: %(default)s")
        p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
        p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
        p.add_argument("--speaker", default="ethan", help="voice (default: %(default)s)")
        p.add_argument("--max-new-tokens", type=int, default=32, help="thinker text tokens (default: %(default)s)")
        p.add_argument("--talker-max-new-tokens", type=int, default=64,
                       help="codec frames of 80 ms at most (default: %(default)s)")

    p_demo = sub.add_parser("demo", help="speak a built-in prompt with the tiny default model")
    common(p_demo, "tiny")
    p_demo.add_argument("--out", default="demo.wav", help="output wav (default: %(default)s)")
    p_demo.set_defaults(run=demo)

    p_gen = sub.add_parser("generate", help="run a checkpoint on your inputs")
    common(p_gen, None)
    p_gen.add_argument("--text", help="the user's text")
    p_gen.add_argument("--audio", action="append", help="audio file (wav/flac/ogg, any rate); repeatable")
    p_gen.add_argument("--image", action="append", help="image file; repeatable")
    p_gen.add_argument("--out", default="out.wav", help="output wav (default: %(default)s)")
    p_gen.add_argument("--no-audio", action="store_true", help="text only, skip the talker")
    p_gen.set_defaults(run=generate)

    from runtime.serve.cli import add_serve_parser

    add_serve_parser(sub)

    args = parser.parse_args(argv)
    if args.command == "generate" and args.checkpoint is None:
        parser.error("generate needs --checkpoint DIR (or a preset name)")
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
