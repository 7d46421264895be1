"""TensorRT engines from the exported ONNX + manifest.

`build_engines(onnx_dir, out_dir, modules)` parses each exported graph (`<key>.onnx`, one per manifest key)
with a strongly typed network (the ONNX dtypes decide precision, no implicit fp16 fallbacks), adds one
optimization profile per graph from the manifest entry's `profile` (min / opt / max per dynamic dim, the
ranges `python -m export --profile` recorded; `profiles` overrides them), reuses a timing cache across builds
(`<out>/timing.cache`), and writes `<out>/<key>.engine` beside a copy of the manifest entry
(`<out>/manifest.json`, with the shapes used and the TensorRT version added) so a runtime can refuse an engine
built for other weights or shapes exactly as export/ort.py does.

Without `tensorrt` or without a CUDA GPU this refuses up front, naming what is missing: nothing is
downloaded or installed (STYLE §4).
"""

from __future__ import annotations

import json
from pathlib import Path


class TensorRTUnavailable(RuntimeError):
    """TensorRT engines cannot be built or run here; the message names what is missing."""


def require_tensorrt():
    """The tensorrt module, or TensorRTUnavailable naming what is missing (the package, or a CUDA GPU)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as err:
        raise TensorRTUnavailable(
            "TensorRT backend unavailable: the `tensorrt` Python package is not installed "
            f"({err}); install TensorRT >= 10 for your CUDA version, or use the ONNX Runtime backend (ort:DIR)"
        ) from None
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailable("TensorRT backend unavailable: no CUDA GPU is visible to torch "
                                  "(torch.cuda.is_available() is False); TensorRT engines need CUDA")
    import tensorrt

    return tensorrt


def _shape(dims, profile: dict, which: int) -> tuple[int, ...]:
    """One of (min, opt, max) of an input's shape; a derived dim ("past+seq") is the sum of its parts'."""
    return tuple(d if isinstance(d, int) else sum(profile[part][which] for part in d.split("+")) for d in dims)


def build_engines(onnx_dir: str | Path, out_dir: str | Path, modules: list[str] | None = None,
                  profiles: dict[str, tuple[int, int, int]] | None = None, workspace_gib: float = 8.0) -> dict:
    """Build `<out_dir>/<key>.engine` for each exported graph of `modules` (default: all). Returns the written
    manifest."""
    trt = require_tensorrt()
    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    cache_path = out_dir / "timing.cache"
    cache_bytes = cache_path.read_bytes() if cache_path.is_file() else b""
    cache = builder.create_builder_config().create_timing_cache(cache_bytes)
    built = {**{k: v for k, v in manifest.items() if k != "modules"}, "modules": {},
             "tensorrt_version": trt.__version__, "source_manifest": str(onnx_dir / "manifest.json")}
    for key, entry in manifest["modules"].items():
        if modules and entry["module"] not in modules and key not in modules:
            continue
        config = builder.create_builder_config()  # one per graph: profiles are per network
        config.set_timing_cache(cache, ignore_mismatch=False)
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_dir / entry["file"])):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"{key}: TensorRT could not parse {entry['file']}: {errors}")
        profile = {**entry.get("profile", {}), **(profiles or {})}
        used = {}
        dynamic = [io for io in entry["inputs"] if any(isinstance(d, str) for d in io["shape"])]
        if dynamic:
            opt_profile = builder.create_optimization_profile()
            for io in dynamic:
                shapes = [_shape(io["shape"], profile, i) for i in range(3)]
                opt_profile.set_shape(io["name"], *shapes)
                used[io["name"]] = shapes
            config.add_optimization_profile(opt_profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise RuntimeError(f"{key}: TensorRT engine build failed (see the TensorRT log above)")
        (out_dir / f"{key}.engine").write_bytes(bytes(serialized))
        built["modules"][key] = {**entry, "engine": f"{key}.engine", "profile_shapes": used}
    cache_path.write_bytes(bytes(cache.serialize()))
    (out_dir / "manifest.json").write_text(json.dumps(built, indent=2) + "\n")
    return built


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m export.trt", description="ONNX export dir -> TensorRT engines")
    parser.add_argument("--onnx", required=True, help="directory written by `python -m export`")
    parser.add_argument("--out", required=True)
    parser.add_argument("--modules", default=None)
    args = parser.parse_args(argv)
    try:
        build_engines(args.onnx, args.out, args.modules.split(",") if args.modules else None)
    except TensorRTUnavailable as err:
        raise SystemExit(str(err))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
