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

export/backends.py `apply_backends(model, {"thinker_step": "ort:DIR", ...})` plugs them into a model. The steps
carry their KV state in a per-layer keys/values cache (the runtime's DynamicKVCache, duck-typed: this module
imports nothing from runtime/).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from export.manifest import (ManifestMismatch, bind_dims, check_entry, module_entries, read_manifest, verify_files,
                             weights_fingerprint)

_NP = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_}


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
    if cache is not None and not (isinstance(getattr(cache, "keys", None), list)
                                  and isinstance(getattr(cache, "values", None), list)):
        # duck-typed (runtime.kv_cache.DynamicKVCache): this module imports nothing from runtime/
        raise TypeError(f"{session.name}: the ort backend carries a per-layer keys/values cache "
                        f"(runtime.kv_cache.DynamicKVCache); got {type(cache).__name__}")
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
        module_entries(read_manifest(directory), "code2wav_stream", directory)  # a clear error when absent
        fingerprint = weights_fingerprint(code2wav)
        self.first, self.next = (opener(directory, f"code2wav_stream.{chunk}", dtype=dtype, fingerprint=fingerprint,
                                        **kw) for chunk in ("first", "next"))
        self.keep = int(self.next.entry["kv_keep"])
        # the graphs' state inputs, in order: conv_<path> per causal conv, tail_<path> per transposed conv
        # (export/wrappers.py state_name); matched to the stream state's module paths on the first call
        names = [io["name"] for io in self.next.entry["inputs"]]
        self.conv_names = [n[len("conv_"):] for n in names if n.startswith("conv_")]
        self.tail_names = [n[len("tail_"):] for n in names if n.startswith("tail_")]
        self.convs = self.tails = None
        self.empty = code2wav.code_embedding.weight.new_zeros  # what the PyTorch stream returns for 0 frames

    def __call__(self, codes: torch.Tensor, state) -> torch.Tensor:
        if state.finished:
            raise RuntimeError("decode_step after flush: start a new stream with new_state()")
        if codes.shape[0] != state.batch:
            raise ValueError(f"codes has {codes.shape[0]} rows, the stream has {state.batch}")
        frames = codes.shape[-1]
        if frames == 0:
            return self.empty(state.batch, 1, 0)
        if self.convs is None:
            self.convs = _paths(self.conv_names, state.conv, "conv")
            self.tails = _paths(self.tail_names, state.tails, "tail")
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


def _paths(names: list[str], states: dict, kind: str) -> list[str]:
    """The stream state's module paths ("decoder.1.block.1") in the order of the graph's state inputs
    ("decoder_1_block_1"). The state may hold more (a transposed conv with kernel = stride keeps an empty tail,
    which the graph does not carry)."""
    by_name = {path.replace(".", "_"): path for path in states}
    missing = [name for name in names if name not in by_name]
    if missing:
        raise ManifestMismatch(f"code2wav_stream: the exported {kind} states {names} do not match this Code2Wav's "
                               f"{sorted(by_name)}; re-export for this checkpoint")
    return [by_name[name] for name in names]


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
