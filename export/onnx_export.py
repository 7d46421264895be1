"""Module -> ONNX file + manifest entry.

Why the dynamo exporter (`torch.onnx.export(..., dynamo=True)`, needs `onnxscript`): the TorchScript
exporter cannot express the runtime's mask construction (`aten::__iand_`) and treats shape arithmetic as
constants, so dynamic KV lengths would silently bake in; torch.export traces symbolic shapes (past length,
new tokens, batch) through `torch.cat` / `arange` and the exported graph has named dynamic axes.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from export import wrappers

OPSET = 18  # the dynamo exporter's native opset: asking for another triggers a version conversion
MODULES = ("audio_encoder", "vision_encoder", "code_predictor", "code2wav", "talker_step", "thinker_step")
DEFAULT_SHAPES = {"code2wav_frames": 8, "audio_frames": 200, "vision_grid": (1, 4, 4)}
_ONNX_DTYPES = {1: "float32", 10: "float16", 16: "bfloat16", 7: "int64", 6: "int32", 9: "bool"}


def omni_rt_version() -> str:
    try:
        from importlib.metadata import version

        return version("omni-rt")
    except Exception:  # not installed as a distribution: the source tree's commit is the version
        head = Path(__file__).resolve().parents[1] / ".git" / "HEAD"
        try:
            ref = head.read_text().strip()
            if ref.startswith("ref: "):
                ref = (head.parent / ref[5:]).read_text().strip()
            return f"0+git.{ref[:12]}"
        except OSError:
            return "unknown"


def checkpoint_hash(directory: str | os.PathLike) -> str:
    """sha256 over config.json, the safetensors index and every safetensors header (names, dtypes, shapes,
    offsets): cheap (no tensor data read) and changes whenever the checkpoint's layout does."""
    directory = Path(directory)
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json"):
        if (directory / name).is_file():
            digest.update(name.encode() + b"\0" + (directory / name).read_bytes())
    for path in sorted(directory.glob("*.safetensors")):
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            digest.update(path.name.encode() + b"\0" + f.read(size))
    return digest.hexdigest()


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


@dataclass
class ExportSpec:
    """What one exported module is: the wrapper, its example inputs, names and dynamic axes."""

    name: str
    wrapper: nn.Module
    source: nn.Module  # the runtime module whose weights the file carries (fingerprinted)
    args: tuple
    input_names: list[str]
    output_names: list[str]
    dynamic: dict[str, dict[int, str]] = field(default_factory=dict)  # input name -> {axis: dim name}
    num_fixed: int | None = None  # inputs before the *past varargs (step modules)


def _step_spec(name, wrapper, source, cfg, head_inputs: list[tuple[str, torch.Tensor, dict]], dtype,
               output_heads: list[str]) -> ExportSpec:
    batch, length, past = 2, 2, 3  # examples > 1 so torch.export keeps the axes symbolic
    pasts = [torch.randn(batch, past, cfg.num_kv_heads, cfg.head_dim, dtype=dtype)
             for _ in range(2 * cfg.num_layers)]
    names = [n for n, _, _ in head_inputs] + wrappers.kv_names(cfg.num_layers, "past")
    dynamic = {n: d for n, _, d in head_inputs}
    for n in wrappers.kv_names(cfg.num_layers, "past"):
        dynamic[n] = {0: "batch", 1: "past"}
    return ExportSpec(name, wrapper, source, tuple(t for _, t, _ in head_inputs) + tuple(pasts), names,
                      output_heads + wrappers.kv_names(cfg.num_layers, "present"), dynamic, len(head_inputs))


def build_spec(model, name: str, dtype: torch.dtype, shapes: dict | None = None) -> ExportSpec:
    """The ExportSpec of `name` (one of MODULES) for an OmniModel."""
    shapes = {**DEFAULT_SHAPES, **(shapes or {})}
    batch, length = 2, 2
    bl = {0: "batch", 1: "seq"}
    if name == "thinker_step":
        thinker = model.thinker
        cfg = thinker.model.cfg
        ids = torch.randint(0, cfg.vocab_size, (batch, length))
        pos = torch.arange(3, 3 + length).expand(3, batch, length).contiguous()
        return _step_spec(name, wrappers.ThinkerStep(thinker), thinker.model, cfg,
                          [("input_ids", ids, bl), ("position_ids", pos, {1: "batch", 2: "seq"})], dtype,
                          ["logits", "hidden"])
    if name == "talker_step":
        talker = _require(model.talker, name)
        cfg = talker.model.cfg
        embeds = torch.randn(batch, length, cfg.hidden_size, dtype=dtype)
        pos = torch.arange(3, 3 + length).expand(3, batch, length).contiguous()
        return _step_spec(name, wrappers.TalkerStep(talker), talker, cfg,
                          [("inputs_embeds", embeds, bl), ("position_ids", pos, {1: "batch", 2: "seq"})], dtype,
                          ["logits", "hidden"])
    if name == "code_predictor":
        predictor = _require(model.talker, name).code_predictor
        cfg = predictor.model.cfg
        embeds = torch.randn(batch, length, cfg.hidden_size, dtype=dtype)
        pos = torch.arange(3, 3 + length).expand(batch, length).contiguous()
        return _step_spec(name, wrappers.CodePredictorStep(predictor), predictor, cfg,
                          [("inputs_embeds", embeds, bl), ("position_ids", pos, bl),
                           ("head_index", torch.tensor(1), {})], dtype, ["logits"])
    if name == "code2wav":
        code2wav = _require(model.code2wav, name)
        frames = int(shapes["code2wav_frames"])
        codes = torch.randint(0, code2wav.cfg.codebook_size, (1, code2wav.cfg.num_quantizers, frames))
        return ExportSpec(name, wrappers.Code2WavDecode(code2wav), code2wav, (codes,), ["codes"], ["waveform"])
    if name == "audio_encoder":
        tower = model.thinker.audio_tower
        feats = torch.randn(tower.cfg.num_mel_bins, int(shapes["audio_frames"]), dtype=dtype)
        return ExportSpec(name, wrappers.AudioEncoderForward(tower, feats.shape[-1]), tower, (feats,), ["input_features"],
                          ["audio_embeds"])
    if name == "vision_encoder":
        visual = model.thinker.visual
        vcfg = visual.cfg
        grid = tuple(int(g) for g in shapes["vision_grid"])
        patch_dim = vcfg.in_channels * vcfg.temporal_patch_size * vcfg.patch_size ** 2
        pixels = torch.randn(grid[0] * grid[1] * grid[2], patch_dim, dtype=dtype)
        levels = len(vcfg.deepstack_visual_indexes)
        return ExportSpec(name, wrappers.VisionEncoderForward(visual, grid), visual, (pixels,), ["pixel_values"],
                          ["image_embeds"] + [f"deepstack_{i}" for i in range(levels)])
    raise ValueError(f"unknown module {name!r}; known: {', '.join(MODULES)}")


def _require(module, name):
    if module is None:
        raise ValueError(f"{name}: the checkpoint has no audio output (talker/code2wav absent)")
    return module


def _dynamic_shapes(spec: ExportSpec):
    dims: dict[str, torch.export.Dim] = {}
    out = []
    for name in spec.input_names:
        axes = spec.dynamic.get(name)
        if not axes:
            out.append(None)
            continue
        out.append({axis: dims.setdefault(dim, torch.export.Dim(dim)) for axis, dim in axes.items()})
    if spec.num_fixed is not None:  # forward(a, b, *past): torch.export wants the varargs as one tuple
        return (*out[:spec.num_fixed], tuple(out[spec.num_fixed:]))
    return tuple(out)


def _value_info(values) -> list[dict]:
    out = []
    for value in values:
        tensor_type = value.type.tensor_type
        shape = [d.dim_param if d.dim_param else d.dim_value for d in tensor_type.shape.dim]
        out.append({"name": value.name, "shape": shape, "dtype": _ONNX_DTYPES.get(tensor_type.elem_type,
                                                                                   str(tensor_type.elem_type))})
    return out


def export_module(model, name: str, out_dir: str | os.PathLike, dtype: torch.dtype = torch.float32,
                  shapes: dict | None = None, checkpoint: str | None = None, source_hash: str | None = None) -> dict:
    """Write `<out_dir>/<name>.onnx` (weights as external data `<name>.onnx.data`) and return its manifest
    entry: input/output names, shapes (ints or dim names) and dtypes, opset, hashes, version."""
    import onnx

    spec = build_spec(model, name, dtype, shapes)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.onnx"
    with torch.no_grad(), wrappers.exportable():
        program = torch.onnx.export(
            spec.wrapper.eval(), spec.args, input_names=spec.input_names, output_names=spec.output_names,
            dynamic_shapes=_dynamic_shapes(spec) if spec.dynamic else None, dynamo=True, opset_version=OPSET,
            optimize=True, verbose=False)
    # Rename the exporter's symbolic dims (s0, s1, ...) to ours so the manifest reads batch / seq / past.
    proto = program.model_proto
    rename = {}
    for value, name_in in zip(proto.graph.input, spec.input_names):
        for axis, dim_name in spec.dynamic.get(name_in, {}).items():
            param = value.type.tensor_type.shape.dim[axis].dim_param
            if param:
                rename[param] = dim_name
    for value in list(proto.graph.input) + list(proto.graph.output):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]
    data_name = f"{name}.onnx.data"
    if (out_dir / data_name).exists():
        (out_dir / data_name).unlink()
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)
    onnx.checker.check_model(str(path))
    return {
        "module": name,
        "file": path.name,
        "external_data": data_name if (out_dir / data_name).exists() else None,
        "inputs": _value_info(proto.graph.input),
        "outputs": _value_info(proto.graph.output),
        "dynamic_axes": {k: {str(a): d for a, d in v.items()} for k, v in spec.dynamic.items()},
        "opset": OPSET,
        "dtype": str(dtype).replace("torch.", ""),
        "weights_sha256": weights_fingerprint(spec.source),
        "checkpoint": checkpoint,
        "checkpoint_sha256": source_hash,
        "omni_rt_version": omni_rt_version(),
        "torch_version": torch.__version__,
    }


def export_all(model, modules, out_dir, dtype=torch.float32, shapes=None, checkpoint=None, source_hash=None) -> dict:
    """Export `modules` and write `<out_dir>/manifest.json` (merged with an existing one)."""
    out_dir = Path(out_dir)
    manifest_path = out_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"modules": {}}
    for name in modules:
        manifest["modules"][name] = export_module(model, name, out_dir, dtype, shapes, checkpoint, source_hash)
    manifest.update(format="omni-rt-export/1", omni_rt_version=omni_rt_version(), checkpoint=checkpoint,
                    checkpoint_sha256=source_hash)
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
