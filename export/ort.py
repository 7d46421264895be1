"""ONNX Runtime backend: an exported module behind the call contract of the PyTorch module it replaces.

`OrtModule(dir, name, expect=module)` opens `<dir>/<name>.onnx` after checking its manifest entry against
the runtime module it stands in for (weights fingerprint, dtype, static shapes): a mismatch raises
`ManifestMismatch` naming both values before any session is created. Providers: CUDA when onnxruntime
has it and torch sees a GPU, else CPU.

`apply_backends(model, {"code2wav": "ort:DIR", ...})` is the hook `OmniEngine.from_pretrained(backends=...)`
calls: it swaps the named runtime modules' forward for the session.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from export.onnx_export import build_spec, weights_fingerprint

_NP = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_}


class ManifestMismatch(ValueError):
    """An exported module that was built for other weights or other shapes than the ones at hand."""


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no export manifest (run `python -m export ... --out {directory}`)")
    return json.loads(path.read_text())


def check_entry(entry: dict, name: str, source: nn.Module | None, dtype: torch.dtype | None = None,
                shapes: dict[str, list] | None = None) -> None:
    """Refuse an exported module whose weights, dtype or static shapes differ from what the caller runs."""
    if source is not None:
        expected = weights_fingerprint(source)
        if entry["weights_sha256"] != expected:
            raise ManifestMismatch(
                f"{name}: exported from other weights: manifest weights_sha256 {entry['weights_sha256']} "
                f"(checkpoint {entry.get('checkpoint')}), loaded module has {expected}; re-export for this checkpoint")
    if dtype is not None and entry["dtype"] != str(dtype).replace("torch.", ""):
        raise ManifestMismatch(f"{name}: exported in {entry['dtype']}, the runtime runs {dtype}")
    for io in entry["inputs"]:
        want = (shapes or {}).get(io["name"])
        if want is None:
            continue
        for axis, (have, need) in enumerate(zip(io["shape"], want)):
            if isinstance(have, int) and have != need or len(io["shape"]) != len(want):
                raise ManifestMismatch(f"{name}: input {io['name']} was exported with shape {io['shape']}, "
                                       f"the runtime needs {list(want)} (axis {axis}); re-export with --shapes")


def default_providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available and torch.cuda.is_available():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OrtModule:
    """One exported module as a callable: tensors in (in the manifest's input order), tensors out."""

    def __init__(self, directory: str | Path, name: str, expect: nn.Module | None = None,
                 dtype: torch.dtype | None = None, shapes: dict[str, list] | None = None,
                 providers: list[str] | None = None):
        import onnxruntime as ort

        directory = Path(directory)
        manifest = read_manifest(directory)
        if name not in manifest["modules"]:
            raise KeyError(f"{directory}: module {name!r} was not exported (have: {', '.join(manifest['modules'])})")
        self.name = name
        self.entry = manifest["modules"][name]
        check_entry(self.entry, name, expect, dtype, shapes)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(directory / self.entry["file"]), options,
                                            providers=providers or default_providers())
        self.input_names = [i["name"] for i in self.entry["inputs"]]
        self.input_dtypes = [_NP[i["dtype"]] for i in self.entry["inputs"]]
        self.output_names = [o["name"] for o in self.entry["outputs"]]

    def __call__(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(tensors) != len(self.input_names):
            raise ValueError(f"{self.name}: expected {len(self.input_names)} inputs "
                             f"({', '.join(self.input_names)}), got {len(tensors)}")
        device = tensors[0].device
        feeds = {n: t.detach().cpu().numpy().astype(d, copy=False)
                 for n, t, d in zip(self.input_names, tensors, self.input_dtypes)}
        return tuple(torch.from_numpy(o).to(device) for o in self.session.run(self.output_names, feeds))


class OrtCode2Wav(nn.Module):
    """Code2Wav.forward(codes [B, Q, F]) -> waveform [B, 1, samples] through ONNX Runtime at the exported F;
    other frame counts raise (re-export with --shapes code2wav_frames=F)."""

    def __init__(self, directory, code2wav: nn.Module, **kw):
        super().__init__()
        self.ort = OrtModule(directory, "code2wav", expect=code2wav, **kw)
        self.shape = self.ort.entry["inputs"][0]["shape"]

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        if list(codes.shape) != self.shape:
            raise ManifestMismatch(f"code2wav: exported for codes {self.shape}, called with {list(codes.shape)}")
        return self.ort(codes)[0]


def apply_backends(model, backends: dict[str, str] | None, dtype: torch.dtype | None = None) -> dict[str, object]:
    """Plug exported modules into an OmniModel. backends: module -> "torch" | "ort:DIR" (| "trt:DIR", see
    export/trt.py). Returns the ORT callables by module name (step modules are used by their callers)."""
    plugged: dict[str, object] = {}
    for name, spec in (backends or {}).items():
        kind, _, directory = spec.partition(":")
        if kind == "torch":
            continue
        if kind == "trt":
            from export.trt import require_tensorrt

            require_tensorrt()
        if kind != "ort" or not directory:
            raise ValueError(f"backend for {name!r} must be 'torch' or 'ort:DIR', got {spec!r}")
        if name == "code2wav":
            ort_module = OrtCode2Wav(directory, model.code2wav, dtype=dtype)
            model.code2wav.forward = ort_module.forward  # full decodes run in ONNX Runtime
            plugged[name] = ort_module
        else:
            source = build_spec(model, name, torch.float32).source
            plugged[name] = OrtModule(directory, name, expect=source, dtype=dtype)
    return plugged
