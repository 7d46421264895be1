"""Export manifests: what `python -m export` records about each graph, and the checks that refuse a graph made
for other weights, dtype or shapes (ManifestMismatch, naming both values) before any session or engine is made.

Shared by the ONNX Runtime backend (export/ort.py), the TensorRT backend (export/trt.py) and the exporter
(export/onnx_export.py). It imports nothing from runtime/: the runtime plugs exported backends in
(export/backends.py) without the import cycle runtime -> export -> runtime.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

FORMAT = "omni-rt-export/2"
MODULES = ("audio_encoder", "vision_encoder", "code_predictor", "code2wav", "code2wav_stream", "talker_step",
           "thinker_step")


def weights_fingerprint(module: nn.Module) -> str:
    """sha256 over every parameter's name, shape, dtype and its first and last 16 values: tells two weight
    sets apart (another checkpoint, another random seed) without reading whole tensors."""
    digest = hashlib.sha256()
    for name, tensor in sorted(list(module.state_dict().items())):
        flat = tensor.detach().reshape(-1)
        sample = torch.cat((flat[:16], flat[-16:])).float().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def source_module(model, name: str) -> nn.Module:
    """The runtime module whose weights the export of `name` carries (what its manifest fingerprints)."""
    if name == "thinker_step":
        return model.thinker.model
    if name == "talker_step":
        return _require(model.talker, name)
    if name == "code_predictor":
        return _require(model.talker, name).code_predictor
    if name in ("code2wav", "code2wav_stream"):
        return _require(model.code2wav, name)
    if name == "audio_encoder":
        return model.thinker.audio_tower
    if name == "vision_encoder":
        return model.thinker.visual
    raise ValueError(f"unknown module {name!r}; known: {', '.join(MODULES)}")


def _require(module, name):
    if module is None:
        raise ValueError(f"{name}: the checkpoint has no audio output (talker/code2wav absent)")
    return module


def file_sha256(path: str | os.PathLike, block: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest_file(path: Path) -> dict:
    """manifest.json -> dict; ValueError naming the path when it is not a JSON object with a "modules" map."""
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: export manifest is damaged ({exc}); re-export with `python -m export`") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("modules"), dict):
        raise ValueError(f"{path}: export manifest is damaged (no 'modules' map); re-export with `python -m export`")
    return manifest


class ManifestMismatch(ValueError):
    """An exported module that was built for other weights or other shapes than the ones at hand."""


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no export manifest (run `python -m export ... --out {directory}`)")
    try:
        manifest = read_manifest_file(path)
    except ValueError as exc:
        raise ManifestMismatch(str(exc)) from exc
    if manifest.get("format") != FORMAT:
        raise ManifestMismatch(f"{path}: export format {manifest.get('format')!r}, this omni-rt reads {FORMAT!r}; "
                               "re-export with `python -m export`")
    return manifest


def module_entries(manifest: dict, name: str, directory="") -> dict[str, dict]:
    """{manifest key: entry} of every graph exported for module `name` (several for a bucketed encoder)."""
    entries = {key: entry for key, entry in manifest["modules"].items() if entry["module"] == name}
    if not entries:
        have = sorted({entry["module"] for entry in manifest["modules"].values()})
        raise KeyError(f"{directory}: module {name!r} was not exported (have: {', '.join(have) or 'none'})")
    return entries


def check_entry(entry: dict, name: str, source: nn.Module | None, dtype: torch.dtype | None = None,
                shapes: dict[str, list] | None = None, fingerprint: str | None = None) -> None:
    """Refuse an exported module whose weights, dtype or static shapes differ from what the caller runs."""
    # dtype first: the weights fingerprint covers the dtype too, so a bf16 engine beside an fp32 export would
    # otherwise be told "other weights"
    if dtype is not None and entry["dtype"] != str(dtype).replace("torch.", ""):
        raise ManifestMismatch(f"{name}: exported in {entry['dtype']}, the runtime runs {dtype}; re-export with "
                               f"--dtype {str(dtype).replace('torch.', '')} (or load the engine in {entry['dtype']})")
    if source is not None or fingerprint is not None:
        expected = fingerprint or weights_fingerprint(source)
        if entry["weights_sha256"] != expected:
            raise ManifestMismatch(
                f"{name}: exported from other weights: manifest weights_sha256 {entry['weights_sha256']} "
                f"(checkpoint {entry.get('checkpoint')}), loaded module has {expected}; re-export for this checkpoint")
    for io in entry["inputs"]:
        want = (shapes or {}).get(io["name"])
        if want is None:
            continue
        for axis, (have, need) in enumerate(zip(io["shape"], want)):
            if isinstance(have, int) and have != need or len(io["shape"]) != len(want):
                raise ManifestMismatch(f"{name}: input {io['name']} was exported with shape {io['shape']}, "
                                       f"the runtime needs {list(want)} (axis {axis}); re-export with --shapes")


def verify_files(directory: str | Path, entry: dict, name: str) -> None:
    """Recompute the sha256 of every file the manifest entry lists; ManifestMismatch naming the file that is
    missing or differs (another export's .onnx.data, a graph from an interrupted re-export, a damaged copy)."""
    hashes = entry.get("files_sha256")
    if not isinstance(hashes, dict) or not hashes:
        raise ManifestMismatch(f"{name}: the manifest in {directory} records no file hashes (an older export); "
                               "re-export with `python -m export`")
    for file, want in hashes.items():
        path = Path(directory) / file
        if not path.is_file():
            raise ManifestMismatch(f"{name}: {path} is listed in the manifest but missing; re-export")
        if file_sha256(path) != want:
            raise ManifestMismatch(f"{name}: {path} is not the file this manifest was written with (sha256 differs:"
                                   " another export's file, or an interrupted re-export); re-export this module")


def bind_dims(entry: dict, name: str, shapes: list[tuple[int, ...]]) -> dict[str, int]:
    """Check input shapes (in the entry's input order) against the manifest; return {dim name: size}.

    Static dims must be equal; a dynamic dim must have one size wherever it appears and lie inside the
    entry's profile [min, max]; a derived dim ("past+seq") must equal the sum of its parts."""
    sizes: dict[str, int] = {}
    derived = []
    for io, shape in zip(entry["inputs"], shapes):
        if len(shape) != len(io["shape"]):
            raise ManifestMismatch(f"{name}: input {io['name']} has shape {list(shape)}, exported as {io['shape']}")
        for axis, (dim, size) in enumerate(zip(io["shape"], shape)):
            if isinstance(dim, int):
                if dim != size:
                    raise ManifestMismatch(f"{name}: input {io['name']} has shape {list(shape)}, exported as "
                                           f"{io['shape']} (axis {axis} must be {dim})")
            elif "+" in dim:
                derived.append((io["name"], axis, dim, size))
            elif sizes.setdefault(dim, size) != size:
                raise ManifestMismatch(f"{name}: dim {dim!r} is {sizes[dim]} in one input and {size} in "
                                       f"{io['name']} (axis {axis}); inputs {[io['name'] for io in entry['inputs']]}")
    for dim, size in sizes.items():
        low, _, high = entry.get("profile", {}).get(dim, (0, 0, size))
        if not low <= size <= high:
            raise ManifestMismatch(f"{name}: {dim} = {size} is outside the exported profile [{low}, {high}]; "
                                   f"re-export with --profile {dim}=MIN:OPT:MAX")
    for input_name, axis, dim, size in derived:
        want = sum(sizes[part] for part in dim.split("+"))
        if size != want:
            raise ManifestMismatch(f"{name}: input {input_name} axis {axis} is {size}, must be {dim} = {want}")
    return sizes
