"""python -m export (--checkpoint DIR | --preset NAME) --modules a,b --out DIR [--dtype float32]
                   [--shapes KEY=V[/V...],...] [--profile [MODULE.]DIM=MIN:OPT:MAX,...]

Writes <out>/<key>.onnx (+ <key>.onnx.data external weights) per graph and <out>/manifest.json, which records
the sha256 of every file it lists (checked before a graph is opened). Each module is written into a staging
folder and renamed into place when whole; the manifest is replaced after each module. Errors: exit 2, one line.
--shapes: the static-shape encoders' buckets, one graph each: audio_frames=137/200 (mel frames of one clip),
  vision_grid=1x4x6/2x6x4 (t x h x w patches of one image or video). Defaults: audio_frames=200, vision_grid=1x4x4.
--profile: (min, opt, max) of a dynamic dim (batch, seq, past; frames for code2wav and code2wav_stream), for
  every module that has it or, prefixed, for one: batch=1:1:4,code_predictor.past=0:1:14. The ort backend
  refuses sizes outside it; export/trt.py builds the TensorRT optimization profile from it.
--modules: the graphs to write (default: all); code2wav_stream writes two, .first and .next (a stream's first
  chunk, then every later one).
"""

from __future__ import annotations

import argparse
import sys

import torch

from export.onnx_export import DEFAULT_SHAPES, MODULES, checkpoint_hash, export_all

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_shapes(text: str | None) -> dict:
    """"audio_frames=137/200,vision_grid=1x4x6" -> {"audio_frames": [137, 200], "vision_grid": [(1, 4, 6)]}."""
    shapes = {}
    for item in filter(None, (text or "").split(",")):
        key, _, value = item.partition("=")
        if key not in DEFAULT_SHAPES:
            raise SystemExit(f"--shapes: unknown key {key!r} (known: {', '.join(DEFAULT_SHAPES)})")
        try:
            shapes[key] = [tuple(int(v) for v in one.split("x")) if "x" in one else int(one)
                           for one in value.split("/")]
        except ValueError:
            raise SystemExit(f"--shapes: {item!r} is not KEY=V[/V...] with integer sizes (grids as TxHxW)") from None
        sizes = [v for one in shapes[key] for v in (one if isinstance(one, tuple) else (one,))]
        if any(v < 1 for v in sizes) or (key == "vision_grid" and any(len(g) != 3 for g in shapes[key])):
            raise SystemExit(f"--shapes: {item!r} needs sizes >= 1 (and grids as TxHxW): an empty bucket exports "
                             "a graph nothing can run")
    return shapes


def parse_profile(text: str | None) -> dict:
    """"batch=1:1:4,code_predictor.past=0:1:14" -> {"batch": (1, 1, 4), "code_predictor.past": (0, 1, 14)}."""
    profile = {}
    for item in filter(None, (text or "").split(",")):
        key, _, value = item.partition("=")
        parts = value.split(":")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise SystemExit(f"--profile: {item!r} is not [MODULE.]DIM=MIN:OPT:MAX")
        low, opt, high = (int(p) for p in parts)
        dim = key.rpartition(".")[2]
        least = 0 if dim == "past" else 1  # an empty KV cache is real; zero frames, tokens or rows are not
        if not least <= low <= opt <= high:
            raise SystemExit(f"--profile: {item!r} needs {least} <= MIN <= OPT <= MAX (a {dim} range of "
                             f"{low}:{opt}:{high} exports a graph nothing can run)")
        profile[key] = (low, opt, high)
    return profile


def main(argv=None) -> int:
    """Every error is one line on stderr and exit code 2 (--debug: the traceback too)."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        return _main(argv)
    except SystemExit as exc:
        if isinstance(exc.code, str):  # a usage error raised with its message
            print(f"error: {exc.code}", file=sys.stderr)
            return 2
        raise
    except Exception as exc:
        if debug:
            import traceback

            traceback.print_exc()
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="HF-layout checkpoint directory")
    source.add_argument("--preset", help="preset name (random weights, see --seed)")
    parser.add_argument("--seed", type=int, default=0, help="random-weight seed for --preset")
    parser.add_argument("--modules", default=",".join(MODULES), help=f"comma-separated subset of {','.join(MODULES)}")
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    parser.add_argument("--shapes", default=None, help="encoder buckets, e.g. audio_frames=137/200,vision_grid=1x4x6")
    parser.add_argument("--profile", default=None,
                        help="dynamic-dim ranges, e.g. batch=1:1:4,thinker_step.seq=1:1:2048")
    parser.add_argument("--debug", action="store_true", help="on an error, show the traceback too")
    args = parser.parse_args(argv)

    from runtime.config import OmniConfig
    from runtime.models.omni import build_model
    from runtime.weights import init_random, load_weights

    dtype = _DTYPES[args.dtype]
    modules = [m for m in args.modules.split(",") if m]
    unknown = sorted(set(modules) - set(MODULES))
    if unknown:
        raise SystemExit(f"--modules: unknown {', '.join(unknown)} (known: {', '.join(MODULES)})")
    shapes, profile = parse_shapes(args.shapes), parse_profile(args.profile)
    if args.checkpoint:
        config = OmniConfig.from_pretrained(args.checkpoint)
        model = build_model(config, "meta")
        load_weights(model, args.checkpoint, dtype=dtype, device="cpu")
        label, source_hash = args.checkpoint, checkpoint_hash(args.checkpoint)
    else:
        model = init_random(args.preset, "cpu", dtype, seed=args.seed)
        label, source_hash = f"preset:{args.preset}:seed={args.seed}", None
    model.eval()

    def report(name, entries, seconds):
        for key, entry in entries.items():
            print(f"{key}: {args.out}/{entry['file']} ({len(entry['inputs'])} inputs, {len(entry['outputs'])} "
                  f"outputs, profile {entry['profile'] or 'static'})")
        print(f"[{modules.index(name) + 1}/{len(modules)}] {name} exported in {seconds:.1f} s", flush=True)

    # One call for all modules: a --profile dim is checked against every module being exported, not each alone.
    export_all(model, modules, args.out, dtype, shapes, label, source_hash, profile, on_module=report)
    print(f"manifest: {args.out}/manifest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
