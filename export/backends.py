"""Plugging exported modules into an OmniModel by composition: `apply_backends(model, {"thinker_step": "ort:DIR",
"code2wav": "trt:DIR"})` replaces each named module's method with its exported backend after the manifest was
checked against the module's weights and dtype. `OmniEngine.from_pretrained(backends=...)` calls it.

This module and the backends it builds (export/ort.py, export/trt.py, export/manifest.py) import nothing from
runtime/, so the runtime can call it without an import cycle; the TensorRT backend is imported only when asked for.
"""

from __future__ import annotations

import torch

from export.manifest import MODULES, source_module
from export.ort import (OrtAudioEncoder, OrtCode2Wav, OrtCode2WavStream, OrtCodePredictorStep, OrtModule,
                        OrtTalkerStep, OrtThinkerStep, OrtVisionEncoder)

# module -> (backend, the runtime module it is built from, the attribute of that module it replaces)
_PLUGS = {
    "audio_encoder": (OrtAudioEncoder, lambda model: model.thinker.audio_tower, "forward"),
    "vision_encoder": (OrtVisionEncoder, lambda model: model.thinker.visual, "forward"),
    "thinker_step": (OrtThinkerStep, lambda model: model.thinker, "decode"),
    "talker_step": (OrtTalkerStep, lambda model: model.talker, "forward"),
    "code_predictor": (OrtCodePredictorStep, lambda model: model.talker.code_predictor, "forward"),
    "code2wav": (OrtCode2Wav, lambda model: model.code2wav, "forward"),
    "code2wav_stream": (OrtCode2WavStream, lambda model: model.code2wav, "decode_step"),
}


def apply_backends(model, backends: dict[str, str] | None, dtype: torch.dtype | None = None) -> dict[str, object]:
    """Plug exported modules into an OmniModel. backends: module -> "torch" | "ort:DIR" (an ONNX export, run by
    ONNX Runtime) | "trt:DIR" (TensorRT engines from `python -m export.trt`, see export/trt.py). Each backend
    replaces its runtime module's method (table above) after its manifest was checked against the module's
    weights and `dtype`. Returns the backends by module name."""
    plugged: dict[str, object] = {}
    for name, spec in (backends or {}).items():
        if name not in _PLUGS:
            raise ValueError(f"backends: unknown module {name!r}; known: {', '.join(MODULES)}")
        kind, _, directory = spec.partition(":")
        if kind == "torch":
            continue
        if kind not in ("ort", "trt") or not directory:
            raise ValueError(f"backend for {name!r} must be 'torch', 'ort:DIR' or 'trt:DIR', got {spec!r}")
        opener = OrtModule
        if kind == "trt":
            from export.trt import TrtModule, require_tensorrt

            require_tensorrt()  # names what is missing before any manifest is read
            opener = TrtModule
        backend_class, target, method = _PLUGS[name]
        source_module(model, name)  # a clear error when the checkpoint has no talker / code2wav
        module = target(model)
        backend = backend_class(directory, module, dtype=dtype, opener=opener)
        setattr(module, method, backend)  # an instance attribute: calls go to the exported module from now on
        plugged[name] = backend
    return plugged
