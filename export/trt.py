"""TensorRT engines from the exported ONNX + manifest.

`build_engines(onnx_dir, out_dir, modules)` parses each exported graph (`<key>.onnx`, one per manifest key)
with a strongly typed network (the ONNX dtypes decide precision, no implicit fp16 fallbacks), adds one
optimization profile per graph from the manifest entry's `profile` (min / opt / max per dynamic dim, the
ranges `python -m export --profile` recorded; `profiles` overrides them), reuses a timing cache across builds
(`<out>/timing.cache`), and writes `<out>/<key>.engine` beside a copy of the manifest entry
(`<out>/manifest.json`, with the shapes used and the TensorRT version added) so a runtime can refuse an engine
built for other weights or shapes exactly as export/ort.py does.

`TrtModule(engine_dir, key, expect=module)` runs one built engine with the contract of export/ort.py's
`OrtModule` (same manifest checks, tensors in the manifest's input order, tensors out), so the runtime's exported
backends take either: `OmniEngine.from_pretrained(..., backends={"code2wav": "trt:DIR"})`.

Without `tensorrt` or without a CUDA GPU this refuses up front, naming what is missing: nothing is
downloaded or installed (STYLE §4).
"""

from __future__ import annotations

import json
from pathlib import Path

from export.manifest import ManifestMismatch, bind_dims, check_entry, file_sha256, read_manifest, verify_files


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
                  profiles: dict[str, tuple[int, int, int]] | None = None, workspace_gib: float = 8.0,
                  tf32: bool = False) -> dict:
    """Build `<out_dir>/<key>.engine` for each exported graph of `modules` (default: all). Returns the written
    manifest. tf32: let fp32 matmuls and convolutions run in TF32 (TensorRT's default; off here so an fp32 engine
    computes what the fp32 module does)."""
    trt = require_tensorrt()
    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    manifest = read_manifest(onnx_dir)
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
        if not tf32:
            config.clear_flag(trt.BuilderFlag.TF32)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        verify_files(onnx_dir, entry, key)
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
        # "profile": the ranges this engine was built for (overrides included): what TrtModule enforces.
        built["modules"][key] = {**entry, "profile": {d: list(r) for d, r in profile.items()},
                                 "engine": f"{key}.engine", "profile_shapes": used,
                                 "files_sha256": {f"{key}.engine": file_sha256(out_dir / f"{key}.engine")}}
    cache_path.write_bytes(bytes(cache.serialize()))
    (out_dir / "manifest.json").write_text(json.dumps(built, indent=2) + "\n")
    return built


class TrtModule:
    """One built engine as a callable, with OrtModule's contract: the manifest entry is checked against the module
    it stands in for (weights, dtype, static shapes) before the engine is deserialized, every call's shapes
    against the entry and the profile it was built with; inputs are moved to the GPU in the exported dtypes, the
    engine runs on torch's current stream, and outputs come back on the first input's device."""

    def __init__(self, directory: str | Path, key: str, expect=None, dtype=None, shapes: dict | None = None,
                 fingerprint: str | None = None):
        import torch

        trt = require_tensorrt()
        directory = Path(directory)
        manifest = read_manifest(directory)
        if key not in manifest["modules"]:
            raise KeyError(f"{directory}: no engine for {key!r}; have: {', '.join(manifest['modules']) or 'none'}")
        self.name, self.entry = key, manifest["modules"][key]
        if "engine" not in self.entry:
            raise ManifestMismatch(f"{directory}: {key} is an ONNX export, not a TensorRT engine; build one with "
                                   f"`python -m export.trt --onnx {directory} --out ENGINE_DIR` (or use ort:{directory})")
        if manifest.get("tensorrt_version") != trt.__version__:
            raise ManifestMismatch(f"{key}: engine built with TensorRT {manifest.get('tensorrt_version')}, this is "
                                   f"{trt.__version__}; engines are not portable across versions: rebuild")
        check_entry(self.entry, key, expect, dtype, shapes, fingerprint)
        verify_files(directory, self.entry, key)
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self._runtime.deserialize_cuda_engine((directory / self.entry["engine"]).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{key}: TensorRT could not deserialize {directory / self.entry['engine']} "
                               "(built on another GPU or TensorRT version?)")
        self.context = self.engine.create_execution_context()
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.input_names = [i["name"] for i in self.entry["inputs"]]
        self.input_dtypes = [getattr(torch, i["dtype"]) for i in self.entry["inputs"]]
        self.output_names = [o["name"] for o in self.entry["outputs"]]
        self.output_dtypes = [getattr(torch, o["dtype"]) for o in self.entry["outputs"]]
        # TensorRT wants a valid address even for an empty tensor (an empty past KV cache).
        self._placeholder = torch.empty(16, dtype=torch.uint8, device=self.device)

    def _address(self, tensor) -> int:
        return tensor.data_ptr() if tensor.numel() else self._placeholder.data_ptr()

    def __call__(self, *tensors):
        import torch

        if len(tensors) != len(self.input_names):
            raise ValueError(f"{self.name}: expected {len(self.input_names)} inputs "
                             f"({', '.join(self.input_names)}), got {len(tensors)}")
        bind_dims(self.entry, self.name, [tuple(t.shape) for t in tensors])
        inputs = [t.detach().to(self.device, dtype).contiguous() for t, dtype in zip(tensors, self.input_dtypes)]
        for name, tensor in zip(self.input_names, inputs):
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, self._address(tensor))
        outputs = []
        for name, dtype in zip(self.output_names, self.output_dtypes):
            shape = tuple(self.context.get_tensor_shape(name))
            if any(size < 0 for size in shape):
                raise RuntimeError(f"{self.name}: TensorRT left output {name} with unresolved shape {shape}")
            outputs.append(torch.empty(shape, dtype=dtype, device=self.device))
            self.context.set_tensor_address(name, self._address(outputs[-1]))
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError(f"{self.name}: TensorRT execution failed (see the TensorRT log above)")
        return tuple(out.to(tensors[0].device) for out in outputs)  # OrtModule's contract: the caller's device


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
