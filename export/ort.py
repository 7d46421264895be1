"""ONNX Runtime backend: exported modules behind the call contracts of the PyTorch modules they replace.

`OrtModule(dir, key, expect=module)` opens `<dir>/<key>.onnx` after checking its manifest entry against the
runtime module it stands in for (weights fingerprint, dtype, static shapes): a mismatch raises
`ManifestMismatch` naming both values before any session is created. Every call checks its input shapes
against the entry (static dims, each dynamic dim the same wherever it appears and inside the exported
profile) before ONNX Runtime sees them. Providers: CUDA when onnxruntime has it and torch sees a GPU, else CPU.

The backends (`Ort*` below) take and return what the runtime module does, so generation code runs unchanged:

    module            replaces                        exported graph(s)
    audio_encoder     thinker.audio_tower.forward     one per clip length (bucket)
    vision_encoder    thinker.visual.forward          one per grid (t, h, w) (bucket)
    thinker_step      thinker.decode                  dynamic batch / seq / past
    talker_step       talker.forward                  dynamic batch / seq / past
    code_predictor    talker.code_predictor.forward   dynamic batch / seq / past
    code2wav          code2wav.forward                dynamic batch / frames
    code2wav_stream   code2wav.decode_step            .first / .next chunk; dynamic batch / frames / past

`apply_backends(model, {"thinker_step": "ort:DIR", ...})` is the hook `OmniEngine.from_pretrained(backends=...)`
calls: it plugs each named backend into the model (the steps carry their KV state in the runtime's
DynamicKVCache, as the PyTorch modules do).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from export.onnx_export import FORMAT, MODULES, file_sha256, read_manifest_file, source_module, weights_fingerprint
from runtime.kv_cache import DynamicKVCache

_NP = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_}


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


def default_providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available and torch.cuda.is_available():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OrtModule:
    """One exported graph as a callable: tensors in (in the manifest's input order), tensors out.

    key: the manifest key (a module name, or `<module>.<bucket>` for an encoder bucket, see module_entries).
    fingerprint: the expected weights_sha256, when the caller computed it already (else from `expect`)."""

    def __init__(self, directory: str | Path, key: str, expect: nn.Module | None = None,
                 dtype: torch.dtype | None = None, shapes: dict[str, list] | None = None,
                 providers: list[str] | None = None, fingerprint: str | None = None):
        import onnxruntime as ort

        directory = Path(directory)
        manifest = read_manifest(directory)
        if key not in manifest["modules"]:
            graphs = sorted(k for k, e in manifest["modules"].items() if e["module"] == key)
            hint = f" (bucketed: open one of {', '.join(graphs)})" if graphs else ""
            raise KeyError(f"{directory}: {key!r} was not exported{hint}; have: {', '.join(manifest['modules'])}")
        self.name = key
        self.entry = manifest["modules"][key]
        check_entry(self.entry, key, expect, dtype, shapes, fingerprint)
        unsupported = sorted({io["dtype"] for io in self.entry["inputs"] + self.entry["outputs"]} - set(_NP))
        if unsupported:
            raise ManifestMismatch(f"{key}: exported in {', '.join(unsupported)}, which the ONNX Runtime backend does "
                                   f"not run (it takes {', '.join(_NP)}); build a TensorRT engine "
                                   "(python -m export.trt) or re-export with --dtype float32")
        verify_files(directory, self.entry, key)  # last before the session: the files are what it will load
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
        bind_dims(self.entry, self.name, [tuple(t.shape) for t in tensors])
        device = tensors[0].device
        feeds = {n: t.detach().cpu().numpy().astype(d, copy=False)
                 for n, t, d in zip(self.input_names, tensors, self.input_dtypes)}
        return tuple(torch.from_numpy(o).to(device) for o in self.session.run(self.output_names, feeds))


# ---------------------------------------------------------------------------------------------- step modules

def _past(session: OrtModule, cache, batch: int, device) -> list[torch.Tensor]:
    """The cache's keys/values as past_* inputs; [B, 0, kv_heads, D] zeros for an empty (or no) cache."""
    if cache is not None and not isinstance(cache, DynamicKVCache):
        raise TypeError(f"{session.name}: the ort backend carries a DynamicKVCache (offline generate); "
                        f"got {type(cache).__name__}")
    if cache is not None and cache.keys[0] is not None:
        return [t for kv in zip(cache.keys, cache.values) for t in kv]
    out = []
    for io in session.entry["inputs"]:
        if io["name"].startswith("past_"):
            kv_heads, head_dim = io["shape"][2:]
            out.append(torch.zeros(batch, 0, kv_heads, head_dim, device=device, dtype=torch.float32))
    return out


def _store(cache, presents: tuple[torch.Tensor, ...]) -> None:
    """present_* outputs -> the cache (what DynamicKVCache.update would have appended)."""
    if cache is not None:
        cache.keys, cache.values = list(presents[0::2]), list(presents[1::2])


def _mask(attention_mask, batch: int, total: int, device) -> torch.Tensor:
    if attention_mask is None:  # nothing padded: the same mask as the runtime's causal-only one
        return torch.ones(batch, total, dtype=torch.long, device=device)
    return attention_mask.long()


def _last_logits_only(name: str, length: int, num_logits_to_keep) -> None:
    if length > 1 and num_logits_to_keep != 1:
        raise ValueError(f"{name} (ort) returns the last position's logits only: call it with num_logits_to_keep=1 "
                         f"for {length} new tokens (generation does)")


class OrtThinkerStep:
    """Thinker.decode(embeds, position_ids, attention_mask, cache, deepstack, *, hidden_layers, num_logits_to_keep)
    -> (logits [B, 1, V], [hidden_states[k] for k in hidden_layers]) through the exported thinker_step. Only the
    exported hidden layers (the talker's accept_hidden_layer) and 0 (the embeddings themselves) can be asked."""

    def __init__(self, directory, thinker, dtype: torch.dtype | None = None, opener=OrtModule, **kw):
        self.session = opener(directory, "thinker_step", expect=thinker.model, dtype=dtype, **kw)
        self.hidden_layers = list(self.session.entry["hidden_layers"])
        self.levels = int(self.session.entry["deepstack_levels"])

    def __call__(self, embeds, position_ids, attention_mask=None, cache=None, deepstack=None, *, hidden_layers=(),
                 num_logits_to_keep=None):
        batch, length, hidden = embeds.shape
        _last_logits_only("thinker_step", length, num_logits_to_keep)
        missing = [k for k in hidden_layers if k != 0 and k not in self.hidden_layers]
        if missing:
            raise ManifestMismatch(f"thinker_step: exported with hidden_states {self.hidden_layers} only, asked for "
                                   f"{sorted(set(missing))} (output_hidden_states needs the PyTorch thinker)")
        past = _past(self.session, cache, batch, embeds.device)
        mask = _mask(attention_mask, batch, past[0].shape[1] + length, embeds.device)
        if deepstack is None:
            dense = embeds.new_zeros(self.levels, batch, length, hidden)
        else:
            dense = deepstack.to_dense(batch, length, hidden, embeds.dtype, embeds.device)
        outputs = self.session(embeds, position_ids.float(), mask, dense, *past)
        states = outputs[1:1 + len(self.hidden_layers)]
        _store(cache, outputs[1 + len(self.hidden_layers):])
        return outputs[0], [embeds if k == 0 else states[self.hidden_layers.index(k)] for k in hidden_layers]


class OrtTalkerStep:
    """Talker.forward(inputs_embeds, position_ids, attention_mask, cache, num_logits_to_keep)
    -> (logits [B, 1, V], hidden [B, L, H]) through the exported talker_step."""

    def __init__(self, directory, talker, dtype: torch.dtype | None = None, opener=OrtModule, **kw):
        self.session = opener(directory, "talker_step", expect=talker, dtype=dtype, **kw)

    def __call__(self, inputs_embeds, position_ids, attention_mask=None, cache=None, num_logits_to_keep=None):
        batch, length, _ = inputs_embeds.shape
        _last_logits_only("talker_step", length, num_logits_to_keep)
        past = _past(self.session, cache, batch, inputs_embeds.device)
        mask = _mask(attention_mask, batch, past[0].shape[1] + length, inputs_embeds.device)
        logits, hidden, *presents = self.session(inputs_embeds, position_ids.float(), mask, *past)
        _store(cache, presents)
        return logits, hidden


class OrtCodePredictorStep:
    """CodePredictor.forward(inputs_embeds, position_ids, cache, head_index) -> logits [B, L, Vc] through the
    exported code_predictor."""

    def __init__(self, directory, code_predictor, dtype: torch.dtype | None = None, opener=OrtModule, **kw):
        self.session = opener(directory, "code_predictor", expect=code_predictor, dtype=dtype, **kw)

    def __call__(self, inputs_embeds, position_ids, cache, head_index: int):
        past = _past(self.session, cache, inputs_embeds.shape[0], inputs_embeds.device)
        logits, *presents = self.session(inputs_embeds, position_ids.float(), torch.tensor(head_index), *past)
        _store(cache, presents)
        return logits


class OrtCode2Wav:
    """Code2Wav.forward(codes [B, Q, F]) -> waveform [B, 1, samples] through the exported code2wav (dynamic
    batch and frames within the profile)."""

    def __init__(self, directory, code2wav, dtype: torch.dtype | None = None, opener=OrtModule, **kw):
        self.session = opener(directory, "code2wav", expect=code2wav, dtype=dtype, **kw)

    def __call__(self, codes: torch.Tensor) -> torch.Tensor:
        return self.session(codes)[0]


class OrtCode2WavStream:
    """Code2Wav.decode_step(codes [B, Q, n], state: Code2WavState) -> the samples these frames made final
    [B, 1, samples], state updated as the PyTorch stream updates it, through the exported code2wav_stream
    graphs (`.first` for a stream's first chunk, `.next` for the others)."""

    def __init__(self, directory, code2wav, dtype: torch.dtype | None = None, opener=OrtModule, **kw):
        from export.wrappers import code2wav_state_layout

        module_entries(read_manifest(directory), "code2wav_stream", directory)  # a clear error when absent
        fingerprint = weights_fingerprint(code2wav)
        self.first, self.next = (opener(directory, f"code2wav_stream.{chunk}", dtype=dtype, fingerprint=fingerprint,
                                        **kw) for chunk in ("first", "next"))
        self.keep = int(self.next.entry["kv_keep"])
        self.convs, self.tails = code2wav_state_layout(code2wav)
        self.empty = code2wav.code_embedding.weight.new_zeros  # what the PyTorch stream returns for 0 frames

    def __call__(self, codes: torch.Tensor, state) -> torch.Tensor:
        if state.finished:
            raise RuntimeError("decode_step after flush: start a new stream with new_state()")
        if codes.shape[0] != state.batch:
            raise ValueError(f"codes has {codes.shape[0]} rows, the stream has {state.batch}")
        frames = codes.shape[-1]
        if frames == 0:
            return self.empty(state.batch, 1, 0)
        session = self.first if state.frames == 0 else self.next
        layers = len(state.keys)
        past = []
        for layer in range(layers):
            for kv in (state.keys, state.values):
                if kv[layer] is None:  # no frame yet: an empty past of the exported per-head shape
                    kv_heads, head_dim = session.entry["inputs"][2]["shape"][2:]
                    past.append(codes.new_zeros(state.batch, 0, kv_heads, head_dim, dtype=torch.float32))
                else:
                    past.append(kv[layer])
        outputs = session(codes, torch.tensor(state.frames), *past, *(state.conv[p] for p in self.convs),
                          *(state.tails[p] for p in self.tails))
        wav, presents = outputs[0], outputs[1:1 + 2 * layers]
        for layer in range(layers):  # a later query sees only the last window - 1 positions
            state.keys[layer] = presents[2 * layer][:, -self.keep:].contiguous()
            state.values[layer] = presents[2 * layer + 1][:, -self.keep:].contiguous()
        new_states = outputs[1 + 2 * layers:]
        for path, tensor in zip(self.convs + self.tails, new_states):
            target = state.conv if path in state.conv else state.tails
            target[path] = tensor.to(target[path].dtype)
        for path in state.consumed:  # not each conv's exact count (the graphs' trims are fixed: first / next),
            state.consumed[path] += frames  # but >= 1 after the first chunk: all a later PyTorch step reads
        state.frames += frames
        state.samples += wav.shape[-1]
        return wav


# ---------------------------------------------------------------------------------------------- encoders

class _Buckets:
    """The static-shape graphs of one encoder, by bucket value; all checked against one weights fingerprint."""

    def __init__(self, directory, name: str, source: nn.Module, bucket_key: str, dtype, opener=OrtModule, **kw):
        entries = module_entries(read_manifest(directory), name, directory)
        fingerprint = weights_fingerprint(source)
        self.name, self.bucket_key = name, bucket_key
        self.graphs = {_bucket_value(e["bucket"][bucket_key]): opener(directory, key, dtype=dtype,
                                                                     fingerprint=fingerprint, **kw)
                       for key, e in entries.items()}

    def get(self, value, what: str) -> OrtModule:
        if value not in self.graphs:
            have = ", ".join(_bucket_label(v) for v in sorted(self.graphs))
            raise ManifestMismatch(f"{self.name}: no graph exported for {what} {_bucket_label(value)} (exported: "
                                   f"{have}); re-export with --shapes {self.bucket_key}={_bucket_label(value)}")
        return self.graphs[value]


def _bucket_value(value):
    return tuple(value) if isinstance(value, list) else value


def _bucket_label(value) -> str:
    return "x".join(map(str, value)) if isinstance(value, tuple) else str(value)


class OrtAudioEncoder:
    """AudioEncoder.forward(input_features [mel, T], feature_lens [1]) -> [tokens, d] through the graph exported for
    a clip of T frames. One clip per call: the chunk layout of several clips depends on all of them."""

    def __init__(self, directory, audio_tower, dtype: torch.dtype | None = None, **kw):
        self.buckets = _Buckets(directory, "audio_encoder", audio_tower, "audio_frames", dtype, **kw)

    def __call__(self, input_features: torch.Tensor, feature_lens: torch.Tensor) -> torch.Tensor:
        lengths = [int(n) for n in feature_lens]
        if len(lengths) != 1:
            raise ManifestMismatch(f"audio_encoder: the exported graphs encode one clip per call, got {len(lengths)} "
                                   f"clips ({lengths} frames)")
        return self.buckets.get(lengths[0], "a clip of frames")(input_features)[0]


class OrtVisionEncoder:
    """VisionEncoder.forward(pixel_values [N, C·T·P·P], grid_thw [1, 3]) -> (embeds, [deepstack levels]) through the
    graph exported for that grid. One image or video per call (the exported layout is of one grid)."""

    def __init__(self, directory, visual, dtype: torch.dtype | None = None, **kw):
        self.buckets = _Buckets(directory, "vision_encoder", visual, "vision_grid", dtype, **kw)

    def __call__(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor):
        grids = [tuple(int(v) for v in row) for row in grid_thw.reshape(-1, 3)]
        if len(grids) != 1:
            raise ManifestMismatch(f"vision_encoder: the exported graphs encode one image or video per call, got "
                                   f"{len(grids)} grids {grids}")
        embeds, *deepstack = self.buckets.get(grids[0], "grid")(pixel_values)
        return embeds, deepstack


# ---------------------------------------------------------------------------------------------- plugging

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
