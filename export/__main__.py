"""python -m export (--checkpoint DIR | --preset NAME) --modules a,b --out DIR [--dtype float32] [--shapes k=v,...]

Writes <out>/<module>.onnx (+ .onnx.data external weights) per module and <out>/manifest.json.
--shapes: code2wav_frames=8, audio_frames=200, vision_grid=1x4x4 (fixed-shape modules; the step modules
have dynamic batch / seq / past axes).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from export.onnx_export import DEFAULT_SHAPES, MODULES, checkpoint_hash, export_all

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_shapes(text: str | None) -> dict:
    shapes = {}
    for item in filter(None, (text or "").split(",")):
        key, _, value = item.partition("=")
        if key not in DEFAULT_SHAPES:
            raise SystemExit(f"--shapes: unknown key {key!r} (known: {', '.join(DEFAULT_SHAPES)})")
        shapes[key] = tuple(int(v) for v in value.split("x")) if "x" in value else int(value)
    return shapes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="HF-layout checkpoint directory")
    source.add_argument("--preset", help="preset name (random weights, see --seed)")
    parser.add_argument("--seed", type=int, default=0, help="random-weight seed for --preset")
    parser.add_argument("--modules", default=",".join(MODULES), help=f"comma-separated subset of {','.join(MODULES)}")
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    parser.add_argument("--shapes", default=None)
    args = parser.parse_args(argv)

    from runtime.config import OmniConfig
    from runtime.models.omni import build_model
    from runtime.weights import init_random, load_weights

    dtype = _DTYPES[args.dtype]
    modules = [m for m in args.modules.split(",") if m]
    unknown = sorted(set(modules) - set(MODULES))
    if unknown:
        raise SystemExit(f"--modules: unknown {', '.join(unknown)} (known: {', '.join(MODULES)})")
    if args.checkpoint:
        config = OmniConfig.from_pretrained(args.checkpoint)
        model = build_model(config, "meta")
        load_weights(model, args.checkpoint, dtype=dtype, device="cpu")
        label, source_hash = args.checkpoint, checkpoint_hash(args.checkpoint)
    else:
        model = init_random(args.preset, "cpu", dtype, seed=args.seed)
        label, source_hash = f"preset:{args.preset}:seed={args.seed}", None
    model.eval()
    for name in modules:
        start = time.perf_counter()
        manifest = export_all(model, [name], args.out, dtype, parse_shapes(args.shapes), label, source_hash)
        entry = manifest["modules"][name]
        print(f"{name}: {args.out}/{entry['file']} ({len(entry['inputs'])} inputs, {len(entry['outputs'])} outputs, "
              f"{time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
