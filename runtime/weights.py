"""Checkpoint I/O in the Hugging Face layout, fused at load time.

On disk (MODEL_SPEC §1, §12): safetensors shards with HF tensor names, an optional
`model.safetensors.index.json`, q/k/v and gate/up as separate tensors and every MoE expert separate.
In memory: `FusedLinear` holds q|k|v (or gate|up) as one weight, `MoEExperts` holds all experts stacked
(gate_up_proj [E, 2I, H], down_proj [E, H, I]). Everything else keeps its checkpoint name.

`load_weights` checks the whole checkpoint against the module first and raises one `CheckpointError`
listing every missing, unexpected and wrongly shaped tensor; only then does it read, so a failed load
leaves the module untouched. Shards are memory-mapped (safetensors `safe_open`).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from runtime.models.layers import FusedLinear, MoEExperts

INDEX_FILE = "model.safetensors.index.json"
PROGRESS_MIN_BYTES = 1 << 30  # show a progress bar for checkpoints of 1 GiB and more


class CheckpointError(ValueError):
    """The checkpoint does not match the model: the message lists every problem found."""


@dataclass(frozen=True)
class _Source:
    """How one in-memory parameter is assembled from checkpoint tensors."""

    param: str  # name in module.state_dict()
    parts: tuple[tuple[str, tuple[int, ...]], ...]  # (checkpoint name, expected shape) in order
    combine: str  # "copy" | "cat" (along dim 0) | "experts" (stack of per-expert tensors)
    num_experts: int = 0


def _plan(module: nn.Module, prefix: str) -> list[_Source]:
    """Every parameter of `module` and the checkpoint tensors it comes from."""
    plan = []
    for path, sub in module.named_modules():
        base = f"{path}." if path else ""
        for name, param in sub.named_parameters(recurse=False):
            shape = tuple(param.shape)
            ckpt = f"{prefix}{base}"
            if isinstance(sub, FusedLinear):  # its parts are siblings of the fused module on disk
                parent = f"{prefix}{path.rpartition('.')[0]}."
                parent = parent if parent != "." else ""
                parts = tuple((f"{parent}{part}.{name}", (size, *shape[1:]))
                              for part, size in zip(sub.part_names, sub.part_sizes))
                plan.append(_Source(base + name, parts, "cat"))
            elif isinstance(sub, MoEExperts):
                experts = shape[0]
                if name == "gate_up_proj":
                    inter = shape[1] // 2
                    parts = tuple((f"{ckpt}{e}.{proj}.weight", (inter, shape[2]))
                                  for e in range(experts) for proj in ("gate_proj", "up_proj"))
                else:
                    parts = tuple((f"{ckpt}{e}.down_proj.weight", shape[1:]) for e in range(experts))
                plan.append(_Source(base + name, parts, "experts", experts))
            else:
                plan.append(_Source(base + name, ((f"{ckpt}{name}", shape),), "copy"))
    return plan


def check_shard(path: str) -> None:
    """CheckpointError naming `path` unless it is a whole safetensors file: an 8-byte little-endian header
    length, a JSON header, and exactly as many data bytes as the header's offsets cover. A shard cut short by an
    interrupted download is caught here, by name, before anything is read from it."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as handle:
            if size < 8:
                raise CheckpointError(f"safetensors shard {path} is truncated ({size} bytes, no header)")
            header_len = int.from_bytes(handle.read(8), "little")
            if header_len > size - 8:
                raise CheckpointError(f"safetensors shard {path} is truncated or not safetensors: its header claims "
                                      f"{header_len} bytes but the file has {size}")
            header = json.loads(handle.read(header_len))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"safetensors shard {path} has a damaged header: {exc}") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"safetensors shard {path} has a damaged header (not a JSON object)")
    try:
        data_len = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError) as exc:
        raise CheckpointError(f"safetensors shard {path} has a damaged header: {exc!r}") from exc
    if 8 + header_len + data_len != size:
        raise CheckpointError(f"safetensors shard {path} is truncated or damaged: its header covers "
                              f"{8 + header_len + data_len} bytes, the file has {size}")


def _checkpoint_files(checkpoint_dir: str) -> dict[str, str]:
    """Checkpoint tensor name -> shard path."""
    if not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(f"checkpoint directory {checkpoint_dir!r} does not exist")
    index = os.path.join(checkpoint_dir, INDEX_FILE)
    if os.path.isfile(index):
        try:
            with open(index) as handle:
                weight_map = json.load(handle).get("weight_map")
        except (ValueError, AttributeError) as exc:  # bad JSON, or JSON that is not an object
            raise CheckpointError(f"{index} is damaged: {exc}") from exc
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' object")
        files = {name: os.path.join(checkpoint_dir, shard) for name, shard in weight_map.items()}
        absent = sorted({path for path in files.values() if not os.path.isfile(path)})
        if absent:
            raise CheckpointError(f"{index} names shards that are not there: {', '.join(map(os.path.basename, absent))}")
        for path in sorted(set(files.values())):
            check_shard(path)
        return files
    shards = sorted(f for f in os.listdir(checkpoint_dir) if f.endswith(".safetensors"))
    if not shards:
        raise FileNotFoundError(f"no *.safetensors files (and no {INDEX_FILE}) in {checkpoint_dir!r}")
    from safetensors import safe_open

    files = {}
    for shard in shards:
        path = os.path.join(checkpoint_dir, shard)
        check_shard(path)
        with safe_open(path, framework="pt") as handle:
            files.update({name: path for name in handle.keys()})
    return files


def _summarise(names: list[str], limit: int = 40) -> list[str]:
    """All names when few; otherwise grouped by pattern (digits -> N) with a count and an example each."""
    if len(names) <= limit:
        return names
    groups: dict[str, list[str]] = defaultdict(list)
    for name in names:
        groups[re.sub(r"\.\d+\.", ".N.", re.sub(r"\.\d+\.", ".N.", name))].append(name)
    return [f"{pattern}  ({len(members)} tensors, e.g. {members[0]})" for pattern, members in sorted(groups.items())]


class _Shards:
    """Open safetensors shards lazily (memory-mapped) and keep them open for one load."""

    def __init__(self, device: str):
        self.device = device
        self.handles: dict = {}

    def get(self, path: str):
        if path not in self.handles:
            from safetensors import safe_open

            self.handles[path] = safe_open(path, framework="pt", device=self.device)
        return self.handles[path]

    def close(self):
        for handle in self.handles.values():
            handle.__exit__(None, None, None)
        self.handles.clear()


def check_checkpoint(module: nn.Module, checkpoint_dir: str, prefix: str = "") -> dict[str, str]:
    """Compare the checkpoint with what `module` needs; raise CheckpointError listing every problem.
    Returns checkpoint name -> shard path."""
    files = _checkpoint_files(checkpoint_dir)
    plan = _plan(module, prefix)
    expected = {name: shape for source in plan for name, shape in source.parts}
    missing = sorted(name for name in expected if name not in files)
    unexpected = sorted(name for name in files if name.startswith(prefix) and name not in expected)
    shards = _Shards("cpu")
    wrong = []
    try:
        for name, shape in expected.items():
            if name in files:
                found = tuple(shards.get(files[name]).get_slice(name).get_shape())
                if found != shape:
                    wrong.append(f"{name}: checkpoint {list(found)}, model expects {list(shape)}")
    finally:
        shards.close()
    if missing or unexpected or wrong:
        lines = [f"checkpoint {checkpoint_dir!r} does not match the model (prefix {prefix!r}):"]
        for title, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if names:
                lines.append(f"  {len(names)} {title}:")
                lines += [f"    {entry}" for entry in _summarise(names)]
        raise CheckpointError("\n".join(lines))
    return files


def load_weights(module: nn.Module, checkpoint_dir: str, prefix: str = "", dtype: torch.dtype | None = None,
                 device: str | torch.device | None = None, progress: bool | None = None) -> None:
    """Load the tensors under `prefix` of an HF-layout checkpoint into `module`, fusing as the module needs.

    module: parameters may live on any device, including meta; they are replaced (assign) by tensors on
      `device` (default: where the module's parameters are, cpu for meta) in `dtype` (default: each
      parameter's current dtype).
    prefix: the module's place in the checkpoint, e.g. "thinker." or "thinker.audio_tower.".
    progress: tqdm bar on stderr; None shows it for checkpoints of 1 GiB and more.
    Raises CheckpointError (nothing loaded) when any tensor is missing, unexpected or wrongly shaped.
    """
    files = check_checkpoint(module, checkpoint_dir, prefix)
    plan = _plan(module, prefix)
    current = dict(module.named_parameters())
    if device is None:
        first = next(iter(current.values()), None)
        device = "cpu" if first is None or first.device.type == "meta" else first.device
    device = torch.device(device)
    shards = _Shards(str(device) if device.type == "cuda" else "cpu")
    total = sum(math.prod(shape) for source in plan for _, shape in source.parts)
    if dtype is not None:
        check_fits(total * dtype.itemsize, device, f"the weights of {checkpoint_dir} in {dtype}")
    show = progress if progress is not None else total * 2 >= PROGRESS_MIN_BYTES
    bar = _progress_bar(len(plan), show, "loading weights")
    state = {}
    try:
        for source in plan:
            target_dtype = dtype or current[source.param].dtype
            parts = [shards.get(files[name]).get_tensor(name).to(device=device, dtype=target_dtype)
                     for name, _ in source.parts]
            if source.combine == "copy":
                state[source.param] = parts[0]
            elif source.combine == "cat":
                state[source.param] = torch.cat(parts, dim=0)
            elif len(parts) == 2 * source.num_experts:  # experts' gate_up: cat(gate_e, up_e) per expert
                state[source.param] = torch.stack([torch.cat(parts[2 * e:2 * e + 2]) for e in range(source.num_experts)])
            else:
                state[source.param] = torch.stack(parts)
            bar.update(1)
    finally:
        shards.close()
        bar.close()
    module.load_state_dict(state, strict=False, assign=True)
    _move_buffers(module, device)
    refresh_folded(module)


def _move_buffers(module: nn.Module, device: torch.device) -> None:
    """Move buffers (rotary tables, sinusoids; built at construction) to `device`, keeping their dtype;
    buffers of a module built on the meta device are recomputed first."""
    if any(buf.device.type == "meta" for buf in module.buffers()):
        _rebuild_buffers(module)
    for sub in module.modules():
        for name, buf in list(sub.named_buffers(recurse=False)):
            if buf.device != device:
                sub.register_buffer(name, buf.to(device), persistent=name not in sub._non_persistent_buffers_set)


def save_weights(module: nn.Module, out_dir: str, prefix: str = "", max_shard_bytes: int = 4 << 30) -> None:
    """Write `module`'s parameters in the HF layout (unfused, per-expert) under `prefix`, sharded with an
    index when larger than `max_shard_bytes`. The inverse of `load_weights`."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    params = dict(module.named_parameters())
    tensors: dict[str, torch.Tensor] = {}
    for source in _plan(module, prefix):
        value = params[source.param].detach().cpu()
        if source.combine == "copy":
            pieces = [value]
        elif source.combine == "cat":
            pieces = list(value.split([shape[0] for _, shape in source.parts], dim=0))
        elif len(source.parts) == 2 * source.num_experts:
            pieces = [half for expert in value for half in expert.chunk(2, dim=0)]
        else:
            pieces = list(value.unbind(0))
        for (name, _), piece in zip(source.parts, pieces):
            tensors[name] = piece.contiguous().clone()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(out_dir, INDEX_FILE), "w") as handle:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, handle, indent=2)


def init_random_(module: nn.Module, seed: int, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None) -> nn.Module:
    """Give `module` random weights in place, allocated directly on `device` (a module built on the meta
    device is materialised there, so full-size models never pass through host memory).

    Scales keep activations O(1) at any size: matrices N(0, 1/fan_in), embeddings N(0, 1), norm weights 1,
    biases 0, snake log-parameters 0, layer scales 0.01. Latency depends on shapes, not values.
    """
    first = next(module.parameters(), None)
    if device is None:
        device = "cpu" if first is None or first.device.type == "meta" else first.device
    device = torch.device(device)
    if dtype is not None:  # parameters only: rotary/sinusoid buffers stay fp32
        for param in module.parameters():
            param.data = param.data.to(dtype)
    if first is not None and first.device.type == "meta":
        module.to_empty(device=device)
        _rebuild_buffers(module)  # to_empty leaves buffers uninitialised
    _move_buffers(module, device)
    for param in module.parameters():
        param.data = param.data.to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    embeddings = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    with torch.no_grad():
        for name, param in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "bias" or leaf in ("alpha", "beta"):
                param.zero_()
            elif param.dim() == 1:
                param.fill_(0.01 if leaf in ("scale", "gamma") else 1.0)
            else:
                owner = _owner(module, name)
                if isinstance(owner, MoEExperts):
                    fan_in = param.shape[-1]
                else:  # modules whose weight layout is not (out, in, ...) state their fan-in
                    fan_in = getattr(owner, "fan_in", None) or param[0].numel()
                std = 1.0 if id(param) in embeddings else fan_in ** -0.5
                param.normal_(0.0, std, generator=generator)
    refresh_folded(module)
    return module


def init_random(config, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """A full OmniModel for `config` (an OmniConfig or a preset name) with random weights built directly on
    `device` in `dtype`: the real 30B-A3B shapes fit an 80 GB GPU in bf16 without touching host memory."""
    from runtime.config import OmniConfig
    from runtime.models.omni import build_model

    cfg = config if isinstance(config, OmniConfig) else OmniConfig.from_pretrained(config)
    model = build_model(cfg, "meta")
    size = dtype.itemsize if dtype is not None else 4
    check_fits(sum(p.numel() for p in model.parameters()) * size, device, f"random {dtype} weights")
    return init_random_(model, seed=seed, device=device, dtype=dtype).eval()


class InsufficientMemoryError(MemoryError):
    """A model that cannot fit where it was asked to go, refused before anything is allocated."""


def available_bytes(device: str | torch.device) -> int | None:
    """Bytes free for new tensors on `device`: MemAvailable from /proc/meminfo for the CPU,
    torch.cuda.mem_get_info for a GPU; None when it cannot be told."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0]) if torch.cuda.is_available() else None
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_fits(num_bytes: int, device: str | torch.device, what: str) -> None:
    """InsufficientMemoryError with both figures when `num_bytes` exceed what `device` has free: random init
    of the released shapes in fp32 (~120 GB) would otherwise be OOM-killed half way, taking others with it."""
    free = available_bytes(device)
    if free is not None and num_bytes > free:
        raise InsufficientMemoryError(
            f"{what} need {num_bytes / 2**30:.1f} GiB on {torch.device(device)} but only {free / 2**30:.1f} GiB is "
            "available; use a smaller preset, bfloat16, or a device with more memory")


def _owner(module: nn.Module, param_name: str) -> nn.Module:
    path = param_name.rsplit(".", 1)[0] if "." in param_name else ""
    return module.get_submodule(path)


def _rebuild_buffers(module: nn.Module) -> None:
    """Non-persistent buffers computed at construction (rotary frequencies, sinusoid tables) are garbage
    after `to_empty`: modules that own such buffers provide `reset_buffers()` to recompute them."""
    for sub in module.modules():
        if hasattr(sub, "reset_buffers"):
            sub.reset_buffers()
        elif sub._non_persistent_buffers_set:
            raise NotImplementedError(f"{type(sub).__name__} has non-persistent buffers "
                                      f"{sorted(sub._non_persistent_buffers_set)} but no reset_buffers()")


def refresh_folded(module: nn.Module) -> None:
    """Recompute the buffers derived from parameters (e.g. SnakeBeta's e^α, 1/(e^β + ε)) by every submodule's
    `fold_parameters()`: after the parameters have their values, never before (`_rebuild_buffers` runs on the
    uninitialised memory `to_empty` leaves). Call it after changing such parameters by hand."""
    for sub in module.modules():
        if hasattr(sub, "fold_parameters"):
            sub.fold_parameters()


def _progress_bar(total: int, show: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not show, file=sys.stderr, dynamic_ncols=True)
