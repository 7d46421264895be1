"""Graph safety and launch counts at the released shapes, without a GPU.

A step that a CUDA graph captures must not synchronise with the host (`.item()`, `.tolist()`, `nonzero`,
boolean-mask indexing, a Python branch on a tensor value), must not copy from or to host memory, and must
not compute anything on the CPU. None of that can be timed here, but all of it can be *seen*: the model is
built at the real 30B-A3B shapes on the meta device (shapes, dtypes, a device other than the CPU; no memory,
no GPU), and every op a step dispatches passes through `StepAudit`, which counts it and fails on the forbidden
ones, naming the op and the line of omni-rt that issued it.

    model = meta_model(OmniConfig.from_pretrained("qwen3-omni-30b-a3b"), torch.bfloat16)
    with dispatch.using("triton"):
        report, outputs = model.audit(fn, example_inputs)   # raises GraphSafetyError on a violation
    report.kernels, report.weight_bytes, report.ops

Why meta and not fake `cuda` tensors (FakeTensorMode): on a CPU-only build of torch, Python indexing of a fake
CUDA tensor (`lengths[rows]`) fails in C++ before any dispatch ("not linked with support for cuda devices"),
while the meta device runs every op the steps use. Meta tensors are as strict where it matters: `.item()`,
`nonzero` and boolean masks cannot run on them, and a CPU tensor mixed into a meta op is an error. Custom ops
run their registered fake implementations on meta tensors.

Counting rules (bench/launches.py prints them per stage):
- an aten op that computes on the device (not a view, reshape of metadata or bare allocation) counts as one
  kernel launch; work on host tensors launches nothing (and inside a step it is a violation);
  a few (sort, topk, scatter with reductions) launch more on a real GPU, so aten counts are a floor;
- a custom op (the Triton `omni_rt_triton::` and CUDA `omni_rt::` kernels) counts what its launch-count hint
  says (kernels/launch_counts.py), one when it has none;
- weight bytes: the bytes of model parameters an op reads, each parameter once per step; the MoE experts op
  reads only the experts its tokens route to: at most min(E, tokens · top_k) of E experts (a worst case:
  meta tensors carry no routing).
"""

from __future__ import annotations

import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
aten = torch.ops.aten

# Ops that only describe, alias or allocate memory: no kernel runs for them.
NO_LAUNCH = {
    aten.view, aten._unsafe_view, aten.reshape, aten._reshape_alias, aten.t, aten.transpose, aten.permute,
    aten.expand, aten.slice, aten.select, aten.unsqueeze, aten.squeeze, aten.as_strided, aten.detach, aten.detach_,
    aten.alias, aten.split, aten.split_with_sizes, aten.unbind, aten.narrow, aten.lift_fresh, aten.empty,
    aten.empty_like, aten.empty_strided, aten.new_empty, aten.new_empty_strided, aten.view_as_real,
    aten.view_as_complex, aten.unfold, aten.diagonal, aten.movedim, aten.numpy_T, aten.sym_size,
    aten.sym_stride, aten.sym_numel, aten.sym_storage_offset, aten.dim, aten.size, aten.stride,
    aten.is_contiguous, aten._has_compatible_shallow_copy_type,
}
# Ops whose result depends on tensor values on the host: each one is a blocking device-to-host read.
HOST_SYNC = {
    aten._local_scalar_dense: "reads a value back to the host (.item(), .tolist(), int()/bool() of a tensor, "
                              "a Python branch on a tensor value)",
    aten.item: "reads a value back to the host (.item(), int()/bool() of a tensor)",
    aten.is_nonzero: "a Python branch on a tensor value",
    aten.nonzero: "nonzero: its output size depends on values (host sync)",
    aten.masked_select: "boolean-mask selection: its output size depends on values (host sync)",
    aten.equal: "torch.equal returns a Python bool (host sync)",
    aten._unique2: "unique: its output size depends on values (host sync)",
    aten.unique_consecutive: "unique_consecutive: its output size depends on values (host sync)",
    aten.unique_dim: "unique: its output size depends on values (host sync)",
    aten.bincount: "bincount: its output size depends on values (host sync)",
}


# Meta tensors have no values: in a non-strict audit these stand in for the host's answer (1, True, one hit).
_STAND_INS = {
    aten._local_scalar_dense: lambda t: False if t.dtype == torch.bool else (1 if not t.is_floating_point() else 1.0),
    aten.item: lambda t: False if t.dtype == torch.bool else (1 if not t.is_floating_point() else 1.0),
    aten.is_nonzero: lambda t: True,
    aten.equal: lambda a, b: True,
    aten.bincount: lambda t, weights=None, minlength=0: torch.ones(max(minlength, 1), dtype=torch.long,
                                                                    device=t.device),
}


class GraphSafetyError(RuntimeError):
    """A step did something a CUDA graph cannot capture; the message names the op and where it came from."""


@dataclass
class StepReport:
    """What one call of a step dispatched (see the module docstring for the counting rules)."""

    kernels: int = 0
    weight_bytes: int = 0
    h2d_copies: int = 0
    d2h_copies: int = 0
    host_syncs: int = 0
    ops: Counter = field(default_factory=Counter)  # op name -> kernels counted for it
    violations: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(kernels=self.kernels, weight_bytes=self.weight_bytes, h2d_copies=self.h2d_copies,
                    d2h_copies=self.d2h_copies, host_syncs=self.host_syncs, violations=list(self.violations),
                    top_ops=dict(self.ops.most_common(12)))


def _sync_reason(func, args, kwargs) -> str | None:
    """Why this op blocks on the device (its result or its output's size depends on tensor values), or None.
    Reading host tensors (ids kept on the host) waits for nothing."""
    if all(t.device.type == "cpu" for t in _tensors((args, kwargs))):
        return None
    packet = func.overloadpacket
    if packet in HOST_SYNC:
        return HOST_SYNC[packet]
    if packet is aten.index and any(t is not None and t.dtype == torch.bool for t in _tensors(args[1:])):
        return "boolean-mask indexing: its output size depends on values (host sync)"
    if packet is aten.repeat_interleave and func is not aten.repeat_interleave.self_int \
            and kwargs.get("output_size") is None:
        return "repeat_interleave by a tensor of counts without output_size: its output size depends on values"
    return None


def _copy_direction(func, args, kwargs) -> str | None:
    """"h2d" / "d2h" for a copy between host memory and a device, else None."""
    packet = func.overloadpacket
    if packet is aten.copy_:
        source, target = args[1].device, args[0].device
    elif packet in (aten._to_copy, aten.to):
        source = args[0].device
        given = [a.device if isinstance(a, torch.Tensor) else a for a in args[1:]
                 if isinstance(a, (torch.device, torch.Tensor)) or (isinstance(a, str) and a)]
        target = kwargs.get("device") or (given[0] if given else source)
    else:
        return None
    target = torch.device(target)
    if (source.type == "cpu") == (target.type == "cpu"):
        return None
    return "h2d" if source.type == "cpu" else "d2h"


def _non_blocking(func, args, kwargs) -> bool:
    """A copy_ asked not to block (copy_(dst, src, non_blocking)); `.to(...)` reads are counted as blocking."""
    return func.overloadpacket is aten.copy_ and bool(kwargs.get("non_blocking", args[2] if len(args) > 2 else False))


def _host_stand_in(func, args, kwargs):
    """A host tensor of ones in place of a device-to-host copy's result (meta tensors hold no values)."""
    if func.overloadpacket is aten.copy_:
        return args[0].fill_(1)
    return torch.ones(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype, device="cpu")


def _aliases_input(func, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> bool:
    """A non-mutating op whose every output shares an input's memory is a view or a no-op (`.to` of the same
    dtype, `.contiguous()` of a contiguous tensor, `chunk`): no kernel runs."""
    if func._schema.is_mutable or not outputs:
        return False
    storages = {_storage_key(t) for t in inputs}
    return all(_storage_key(t) in storages for t in outputs)


def _where() -> str:
    """The innermost frames of omni-rt's own code on the stack: where the op was issued."""
    frames = [f for f in traceback.extract_stack()[:-3]
              if f.filename.startswith(str(ROOT)) and not f.filename.endswith("graph_audit.py")
              and not f.filename.startswith(str(ROOT / ".venv"))]
    return " <- ".join(f"{Path(f.filename).relative_to(ROOT)}:{f.lineno} ({f.name})" for f in reversed(frames[-3:]))


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


class StepAudit(TorchDispatchMode):
    """Records every op dispatched while active (enter it inside the model's FakeTensorMode).

    strict: raise GraphSafetyError at the first host sync, host copy or CPU computation (a capture would fail
    or be wrong there); otherwise record it in `report.violations` and go on (bench/launches.py counts them).
    """

    def __init__(self, parameters: dict[int, tuple[str, int]], strict: bool = True,
                 launch_counts: dict[str, Callable] | None = None):
        super().__init__()
        self.parameters = parameters  # storage key -> (name, bytes)
        self.strict = strict
        self.launch_counts = launch_counts or {}
        self.report = StepReport()
        self._read: set[int] = set()

    def _violation(self, kind: str, what: str) -> None:
        message = f"{kind}: {what} at {_where() or 'an unknown place'}"
        self.report.violations.append(message)
        if self.strict:
            raise GraphSafetyError(message)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        inputs = _tensors((args, kwargs))
        reason = _sync_reason(func, args, kwargs)
        if reason:
            self.report.host_syncs += 1
            self._violation("host sync", f"{reason} [{func}]")
            if packet in _STAND_INS:  # not strict: a plausible stand-in lets the count go on past the sync
                self.report.kernels += 1
                self.report.ops[str(func.name()).split(".")[0]] += 1
                return _STAND_INS[packet](*args, **kwargs)
        direction = _copy_direction(func, args, kwargs)
        if direction == "d2h":
            self.report.d2h_copies += 1
            if _non_blocking(func, args, kwargs):  # into pinned memory, read after an event: the copy engine's work
                self._violation("device-to-host copy", f"{func} (non-blocking)")
            else:
                self.report.host_syncs += 1
                self._violation("device-to-host copy", f"{func} (.tolist(), .cpu(), numpy(): a blocking read)")
            return _host_stand_in(func, args, kwargs)  # not strict: ones on the host let the count go on
        if direction == "h2d":
            self.report.h2d_copies += 1
            self._violation("host-to-device copy", f"{func} (a tensor made on the CPU inside the step)")
        try:
            out = func(*args, **kwargs)
        except NotImplementedError as error:  # an op with no meta implementation cannot be audited (or captured)
            raise GraphSafetyError(f"{func} cannot run on meta tensors ({error}) at {_where()}") from error
        produced = _tensors(out)
        on_host = direction is None and all(t.device.type == "cpu" for t in produced or inputs)
        if produced and on_host and any(t.numel() > 1 for t in produced):
            self._violation("CPU computation", f"{func} produced a CPU tensor inside the step")
        # a kernel runs on the device: host work (an eager layout read from host ids) launches none
        if packet not in NO_LAUNCH and not on_host and not _aliases_input(func, inputs, _tensors(out)):
            name = str(func.name())
            hint = self.launch_counts.get(name.split(".")[0]) if func.namespace != "aten" else None
            count = 1 if hint is None else int(hint(args, kwargs))
            self.report.kernels += count
            self.report.ops[name.split(".")[0]] += count
            self._count_weights(name, inputs)
        return out

    def _count_weights(self, name: str, inputs: list[torch.Tensor]) -> None:
        for tensor in inputs:
            key = _storage_key(tensor)
            if key in self._read or key not in self.parameters:
                continue
            self._read.add(key)
            param_name, nbytes = self.parameters[key]
            if "moe_experts" in name and tensor.dim() == 3:  # stacked experts [E, ...]: only routed ones are read
                tokens = inputs[0].numel() // inputs[0].shape[-1]
                top_k = inputs[1].shape[-1]
                nbytes = nbytes * min(tensor.shape[0], tokens * top_k) // tensor.shape[0]
            elif name.startswith("aten::embedding") and tensor is inputs[0]:  # a lookup reads its rows only
                nbytes = nbytes * min(tensor.shape[0], inputs[1].numel()) // tensor.shape[0]
            self.report.weight_bytes += nbytes


class HostDataWatch(TorchFunctionMode):
    """`torch.tensor(python_data, device=...)` copies host memory to the device without dispatching an op a
    TorchDispatchMode can see: watch the factory functions that take host data at the Python level."""

    FACTORIES = (torch.tensor, torch.as_tensor, torch.asarray, torch.from_numpy)

    def __init__(self, audit: StepAudit):
        super().__init__()
        self.audit = audit

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in self.FACTORIES and isinstance(out, torch.Tensor):
            if out.device.type != "cpu":
                self.audit.report.h2d_copies += 1
                self.audit._violation("host-to-device copy", f"{func.__name__}(host data, device={out.device}) "
                                                             "inside the step")
            elif out.numel() > 1:
                self.audit._violation("CPU computation", f"{func.__name__}(host data) made a CPU tensor inside the step")
        return out


class MetaModel:
    """An OmniModel at any size on the meta device, and the audit of its steps."""

    def __init__(self, model):
        self.model = model
        self.parameters = {_storage_key(p): (name, p.untyped_storage().nbytes())
                           for name, p in model.named_parameters()}

    def audit(self, fn: Callable, inputs: tuple, strict: bool = True) -> tuple[StepReport, object]:
        """Run fn(*inputs) under a StepAudit; returns (report, outputs)."""
        from kernels.launch_counts import LAUNCHES

        audit = StepAudit(self.parameters, strict, LAUNCHES)
        from torch.fx.experimental import _config as fx_config

        # Not strict: a boolean mask or nonzero on meta tensors is taken as all true, so the count goes on.
        with torch.inference_mode(), fx_config.patch(meta_nonzero_assume_all_nonzero=not strict), \
                HostDataWatch(audit), audit:
            out = fn(*inputs)
        return audit.report, out


def meta_model(config, dtype: torch.dtype = torch.bfloat16) -> MetaModel:
    """The whole model for `config` on the meta device, parameters in `dtype` (rotary tables stay fp32, as
    runtime.weights.init_random_ keeps them): the released 30B-A3B shapes in a second and no memory."""
    from runtime.models.omni import build_model
    from runtime.weights import _move_buffers

    model = build_model(config, "meta")
    for param in model.parameters():
        param.data = param.data.to(dtype)
    _move_buffers(model, torch.device("meta"))  # recomputes the rotary / sinusoid tables, then back on meta
    return MetaModel(model.eval())
