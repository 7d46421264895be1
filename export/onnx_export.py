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
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from export import wrappers
from export.manifest import (FORMAT, MODULES, _require, file_sha256, read_manifest_file, source_module,  # noqa: F401
                             weights_fingerprint)

OPSET = 18  # the dynamo exporter's native opset: asking for another triggers a version conversion
# The encoders lay out chunks, windows and position taps on the host from the input size, so each size is its own
# static graph (a bucket, one file each); the other modules have dynamic axes within a profile.
BUCKET_KEYS = {"audio_encoder": "audio_frames", "vision_encoder": "vision_grid"}
DEFAULT_SHAPES = {"audio_frames": [200], "vision_grid": [(1, 4, 4)]}
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


@dataclass
class ExportSpec:
    """What one exported graph is: the wrapper, its example inputs, names and dynamic axes."""

    name: str  # the module (one of MODULES)
    key: str  # manifest key and file stem: the module, or `<module>.<bucket>` for a static-shape bucket
    wrapper: nn.Module
    source: nn.Module  # the runtime module whose weights the file carries (fingerprinted)
    args: tuple
    input_names: list[str]
    output_names: list[str]
    # input name -> {axis: dim name}; a name with "+" (attention_mask's "past+seq") is derived from the others
    dynamic: dict[str, dict[int, str]] = field(default_factory=dict)
    num_fixed: int | None = None  # inputs before the *past varargs (step modules)
    bucket: dict | None = None  # the static shape a bucket was exported for, e.g. {"audio_frames": 137}
    extra: dict = field(default_factory=dict)  # module-specific manifest fields


def default_profile(model, name: str) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of each dynamic dim of `name`: what the runtime asks of it (TensorRT builds its
    optimization profile from these; the ort backend refuses shapes outside them)."""
    batch = (1, 1, 8)
    if name in ("thinker_step", "talker_step"):
        decoder = model.thinker.model if name == "thinker_step" else _require(model.talker, name).model
        longest = decoder.cfg.max_position_embeddings
        return {"batch": batch, "seq": (1, 1, longest), "past": (0, min(512, longest - 1), longest - 1)}
    if name == "code_predictor":  # per frame: a 2-token prefill, then G-2 single steps after 2, 3, ..., G-1 tokens
        groups = _require(model.talker, name).code_predictor.num_code_groups
        return {"batch": batch, "seq": (1, 1, 2), "past": (0, 2, max(groups - 1, 2))}
    if name == "code2wav":  # full decodes of up to talker_max_new_tokens (default 1024) frames
        return {"batch": batch, "frames": (1, 64, 1024)}
    if name == "code2wav_stream":  # chunks of frames (one per step when streaming), the window's kept keys
        keep = _require(model.code2wav, name).cfg.sliding_window - 1
        return {"batch": batch, "frames": (1, 1, 1024), "past": (0, keep, keep)}
    return {}


def _step_spec(name, wrapper, source, cfg, head_inputs: list[tuple[str, torch.Tensor, dict]], dtype,
               output_heads: list[str], extra: dict | None = None) -> ExportSpec:
    batch, past = 2, 3  # examples > 1 so torch.export keeps the axes symbolic
    pasts = [torch.randn(batch, past, cfg.num_kv_heads, cfg.head_dim, dtype=dtype)
             for _ in range(2 * cfg.num_layers)]
    names = [n for n, _, _ in head_inputs] + wrappers.kv_names(cfg.num_layers, "past")
    dynamic = {n: d for n, _, d in head_inputs}
    for n in wrappers.kv_names(cfg.num_layers, "past"):
        dynamic[n] = {0: "batch", 1: "past"}
    return ExportSpec(name, name, wrapper, source, tuple(t for _, t, _ in head_inputs) + tuple(pasts), names,
                      output_heads + wrappers.kv_names(cfg.num_layers, "present"), dynamic, len(head_inputs),
                      extra=extra or {})


def _bucket_label(value) -> str:
    return "x".join(str(v) for v in value) if isinstance(value, (tuple, list)) else str(value)


def build_specs(model, name: str, dtype: torch.dtype, shapes: dict | None = None) -> list[ExportSpec]:
    """The ExportSpecs of `name` (one of MODULES) for an OmniModel: one, or one per bucket of an encoder."""
    shapes = {**DEFAULT_SHAPES, **(shapes or {})}
    batch, length, past = 2, 2, 3
    bl = {0: "batch", 1: "seq"}
    mask = {0: "batch", 1: "past+seq"}
    if name == "thinker_step":
        thinker = model.thinker
        cfg = thinker.model.cfg
        hidden_layers = [model.cfg.talker.accept_hidden_layer] if model.talker is not None else []
        levels = len(thinker.cfg.vision.deepstack_visual_indexes)
        head = [("inputs_embeds", torch.randn(batch, length, cfg.hidden_size, dtype=dtype), bl),
                ("position_ids", _positions(3, batch, length), {1: "batch", 2: "seq"}),
                ("attention_mask", torch.ones(batch, past + length, dtype=torch.long), mask),
                ("deepstack_embeds", torch.randn(levels, batch, length, cfg.hidden_size, dtype=dtype),
                 {1: "batch", 2: "seq"})]
        return [_step_spec(name, wrappers.ThinkerStep(thinker, hidden_layers), thinker.model, cfg, head, dtype,
                           ["logits"] + [f"hidden_states_{k}" for k in hidden_layers],
                           {"hidden_layers": hidden_layers, "deepstack_levels": levels})]
    if name == "talker_step":
        talker = _require(model.talker, name)
        cfg = talker.model.cfg
        head = [("inputs_embeds", torch.randn(batch, length, cfg.hidden_size, dtype=dtype), bl),
                ("position_ids", _positions(3, batch, length), {1: "batch", 2: "seq"}),
                ("attention_mask", torch.ones(batch, past + length, dtype=torch.long), mask)]
        return [_step_spec(name, wrappers.TalkerStep(talker), talker, cfg, head, dtype, ["logits", "hidden"])]
    if name == "code_predictor":
        predictor = _require(model.talker, name).code_predictor
        cfg = predictor.model.cfg
        head = [("inputs_embeds", torch.randn(batch, length, cfg.hidden_size, dtype=dtype), bl),
                ("position_ids", _positions(None, batch, length), bl), ("head_index", torch.tensor(1), {})]
        return [_step_spec(name, wrappers.CodePredictorStep(predictor), predictor, cfg, head, dtype, ["logits"])]
    if name == "code2wav":
        code2wav = _require(model.code2wav, name)
        codes = torch.randint(0, code2wav.cfg.codebook_size, (batch, code2wav.cfg.num_quantizers, 7))
        return [ExportSpec(name, name, wrappers.Code2WavDecode(code2wav), code2wav, (codes,), ["codes"], ["waveform"],
                           {"codes": {0: "batch", 2: "frames"}})]
    if name == "code2wav_stream":
        code2wav = _require(model.code2wav, name)
        cfg = code2wav.cfg
        frames, kept = 3, 2
        codes = torch.randint(0, cfg.codebook_size, (batch, cfg.num_quantizers, frames))
        past = [torch.randn(batch, kept, cfg.num_kv_heads, cfg.head_dim, dtype=dtype) for _ in range(2 * cfg.num_layers)]
        convs, tails = wrappers.code2wav_state_layout(code2wav)
        modules = dict(code2wav.named_modules())
        conv_states = [torch.randn(batch, modules[p].in_channels, modules[p].state_len, dtype=dtype) for p in convs]
        tail_states = [torch.randn(batch, modules[p].out_channels, modules[p].kernel_size - modules[p].stride,
                                   dtype=dtype) for p in tails]
        paths = [("conv", p) for p in convs] + [("tail", p) for p in tails]
        state_in = [f"{kind}_{wrappers.state_name(p)}" for kind, p in paths]
        state_out = [f"{kind}_out_{wrappers.state_name(p)}" for kind, p in paths]
        names = ["codes", "start_frame"] + wrappers.kv_names(cfg.num_layers, "past") + state_in
        dynamic = {"codes": {0: "batch", 2: "frames"}, **{n: {0: "batch", 1: "past"}
                                                          for n in wrappers.kv_names(cfg.num_layers, "past")},
                   **{n: {0: "batch"} for n in state_in}}
        outputs = ["waveform"] + wrappers.kv_names(cfg.num_layers, "present") + state_out
        return [ExportSpec(name, f"{name}.{chunk}", wrappers.Code2WavStreamStep(code2wav, first=chunk == "first"),
                           code2wav, (codes, torch.tensor(5), *past, *conv_states, *tail_states), names, outputs,
                           dynamic, num_fixed=2, bucket={"chunk": chunk}, extra={"kv_keep": cfg.sliding_window - 1})
                for chunk in ("first", "next")]
    if name == "audio_encoder":
        tower = model.thinker.audio_tower
        specs = []
        for frames in _as_buckets(shapes["audio_frames"]):
            feats = torch.randn(tower.cfg.num_mel_bins, int(frames), dtype=dtype)
            specs.append(ExportSpec(name, f"{name}.{frames}", wrappers.AudioEncoderForward(tower, int(frames)), tower,
                                    (feats,), ["input_features"], ["audio_embeds"],
                                    bucket={"audio_frames": int(frames)}))
        return specs
    if name == "vision_encoder":
        visual = model.thinker.visual
        vcfg = visual.cfg
        patch_dim = vcfg.in_channels * vcfg.temporal_patch_size * vcfg.patch_size ** 2
        levels = len(vcfg.deepstack_visual_indexes)
        specs = []
        for grid in _as_buckets(shapes["vision_grid"], tuple):
            grid = tuple(int(g) for g in grid)
            pixels = torch.randn(grid[0] * grid[1] * grid[2], patch_dim, dtype=dtype)
            specs.append(ExportSpec(name, f"{name}.{_bucket_label(grid)}", wrappers.VisionEncoderForward(visual, grid),
                                    visual, (pixels,), ["pixel_values"],
                                    ["image_embeds"] + [f"deepstack_{i}" for i in range(levels)],
                                    bucket={"vision_grid": list(grid)}))
        return specs
    raise ValueError(f"unknown module {name!r}; known: {', '.join(MODULES)}")


def _positions(axes: int | None, batch: int, length: int) -> torch.Tensor:
    """Example position ids, float32 as the runtime makes them: [3, B, L] (axes=3) or [B, L]."""
    ids = torch.arange(3, 3 + length, dtype=torch.float32).expand(batch, length)
    return ids.expand(axes, batch, length).contiguous() if axes else ids.contiguous()


def _as_buckets(value, kind=int) -> list:
    """One bucket or a list of them: 137 / [137, 200]; (1, 4, 4) / [(1, 4, 4), (1, 6, 4)]."""
    if kind is tuple:
        return [value] if value and isinstance(value[0], int) else list(value)
    return [value] if isinstance(value, int) else list(value)


def _dynamic_shapes(spec: ExportSpec):
    dims: dict[str, torch.export.Dim] = {}
    out = []
    for name in spec.input_names:
        axes = spec.dynamic.get(name)
        if not axes:
            out.append(None)
            continue
        # A derived dim (past+seq) is left to the exporter (AUTO); the manifest names it after export.
        out.append({axis: torch.export.Dim.AUTO if "+" in dim else dims.setdefault(dim, torch.export.Dim(dim))
                    for axis, dim in axes.items()})
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


def _name_dims(proto, spec: ExportSpec) -> None:
    """Rename the exporter's symbolic dims (s0, s1, ...; sums such as `s0 + s1`) to ours (batch, seq, past,
    past+seq, ...) in the graph's inputs and outputs, so the manifest and ONNX Runtime's errors read them."""
    rename = {}
    for value, name_in in zip(proto.graph.input, spec.input_names):
        for axis, dim_name in spec.dynamic.get(name_in, {}).items():
            param = value.type.tensor_type.shape.dim[axis].dim_param
            if param and "+" not in dim_name:
                rename[param] = dim_name
    for value, name_in in zip(proto.graph.input, spec.input_names):  # derived dims: after their roots
        for axis, dim_name in spec.dynamic.get(name_in, {}).items():
            param = value.type.tensor_type.shape.dim[axis].dim_param
            if param and "+" in dim_name and param not in rename:
                rename[param] = dim_name
    symbol = re.compile(r"\b[a-z]\d+\b")
    for value in list(proto.graph.input) + list(proto.graph.output):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]
            elif dim.dim_param:  # an expression of the exporter's symbols
                dim.dim_param = symbol.sub(lambda m: rename.get(m.group(0), m.group(0)), dim.dim_param).replace(" ", "")


def export_graph(spec: ExportSpec, out_dir: Path, dtype: torch.dtype, profile: dict, checkpoint: str | None,
                 source_hash: str | None, fingerprint: str) -> dict:
    """Write `<out_dir>/<spec.key>.onnx` (weights as external data `<key>.onnx.data`) and return its manifest
    entry: input/output names, shapes (ints or dim names) and dtypes, dynamic-dim profile, opset, hashes."""
    import onnx

    path = out_dir / f"{spec.key}.onnx"
    with torch.no_grad(), wrappers.exportable():
        program = torch.onnx.export(
            spec.wrapper.eval(), spec.args, input_names=spec.input_names, output_names=spec.output_names,
            dynamic_shapes=_dynamic_shapes(spec) if spec.dynamic else None, dynamo=True, opset_version=OPSET,
            optimize=True, verbose=False)
    proto = program.model_proto
    _name_dims(proto, spec)
    data_name = f"{spec.key}.onnx.data"
    if (out_dir / data_name).exists():
        (out_dir / data_name).unlink()
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)
    onnx.checker.check_model(str(path))
    roots = {d for axes in spec.dynamic.values() for d in axes.values() if "+" not in d}
    written = [path.name] + ([data_name] if (out_dir / data_name).exists() else [])
    return {
        "module": spec.name,
        "file": path.name,
        "external_data": data_name if (out_dir / data_name).exists() else None,
        # what the check recomputes before a session opens: another export's .onnx.data swapped in, or graph
        # files of an interrupted re-export beside the old manifest, are refused by name
        "files_sha256": {name: file_sha256(out_dir / name) for name in written},
        "inputs": _value_info(proto.graph.input),
        "outputs": _value_info(proto.graph.output),
        "dynamic_axes": {k: {str(a): d for a, d in v.items()} for k, v in spec.dynamic.items()},
        "profile": {d: list(r) for d, r in profile.items() if d in roots},
        **({"bucket": spec.bucket} if spec.bucket else {}),
        **spec.extra,
        "opset": OPSET,
        "dtype": str(dtype).replace("torch.", ""),
        "weights_sha256": fingerprint,
        "checkpoint": checkpoint,
        "checkpoint_sha256": source_hash,
        "omni_rt_version": omni_rt_version(),
        "torch_version": torch.__version__,
    }


def export_module(model, name: str, out_dir: str | os.PathLike, dtype: torch.dtype = torch.float32,
                  shapes: dict | None = None, checkpoint: str | None = None, source_hash: str | None = None,
                  profile: dict | None = None) -> dict[str, dict]:
    """Export every graph of `name` (one per bucket for the encoders). Returns {manifest key: entry}.
    profile: {dim or "module.dim": (min, opt, max)} overriding default_profile's ranges."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ordered = sorted((profile or {}).items(), key=lambda item: "." in item[0])  # "module.dim" wins over "dim"
    defaults = default_profile(model, name)
    overrides = {key.rpartition(".")[2]: value for key, value in ordered
                 if key.startswith(name + ".") or "." not in key and key in defaults}
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ValueError(f"{name}: no dynamic dim {', '.join(unknown)} (it has: {', '.join(defaults) or 'none'})")
    ranges = {**defaults, **overrides}
    for dim, (low, opt, high) in ranges.items():
        if not low <= opt <= high:
            raise ValueError(f"{name}: profile {dim}={low}:{opt}:{high} needs min <= opt <= max")
    fingerprint = weights_fingerprint(source_module(model, name))
    # Written into a staging folder and renamed into place only once every graph of the module is whole, so an
    # interrupted export leaves the previous files (and the manifest that lists them) as they were.
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{name}-", dir=out_dir))
    try:
        entries = {spec.key: export_graph(spec, staging, dtype, ranges, checkpoint, source_hash, fingerprint)
                   for spec in build_specs(model, name, dtype, shapes)}
        for key, entry in entries.items():
            stale = out_dir / f"{key}.onnx.data"
            if entry["external_data"] is None and stale.exists():
                stale.unlink()
            for file in entry["files_sha256"]:
                os.replace(staging / file, out_dir / file)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return entries


def _write_manifest(path: Path, manifest: dict) -> None:
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(staging, path)  # a reader sees the old manifest or the new one, never half of one


def export_all(model, modules, out_dir, dtype=torch.float32, shapes=None, checkpoint=None, source_hash=None,
               profile=None, on_module=None) -> dict:
    """Export `modules` and write `<out_dir>/manifest.json`, merged with an existing one (a module exported
    again replaces all of its earlier graphs). `on_module(name, entries, seconds)` is called after each module
    (progress for the CLI: a real-size export takes minutes per module)."""
    dims = {dim for name in modules for dim in default_profile(model, name)}
    unknown = sorted(key for key in profile or {} if "." not in key and key not in dims)
    if unknown:
        raise ValueError(f"profile: no exported module has a dynamic dim {', '.join(unknown)} "
                         f"(dims: {', '.join(sorted(dims))})")
    out_dir = Path(out_dir)
    manifest_path = out_dir / "manifest.json"
    manifest = read_manifest_file(manifest_path) if manifest_path.is_file() else {"modules": {}}
    if manifest.get("format") != FORMAT:
        manifest = {"modules": {}}
    for name in modules:
        start = time.perf_counter()
        entries = export_module(model, name, out_dir, dtype, shapes, checkpoint, source_hash, profile)
        manifest["modules"] = {k: e for k, e in manifest["modules"].items() if e["module"] != name}
        manifest["modules"].update(entries)
        manifest.update(format=FORMAT, omni_rt_version=omni_rt_version(), checkpoint=checkpoint,
                        checkpoint_sha256=source_hash)
        _write_manifest(manifest_path, manifest)  # after each module: the finished ones stay usable
        if on_module is not None:
            on_module(name, entries, time.perf_counter() - start)
    return manifest
