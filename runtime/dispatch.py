"""The one dispatch point for hot ops: model modules call these functions and never know which
implementation ran.

Each op has a `torch` reference (kernels/*_ref, the CPU path and the oracle); Triton (`triton`) and CUDA
(`cuda`) implementations are registered under the same op name with the same signature when their modules
are loaded (kernels/triton_*.py list theirs in `TRITON_OPS`; kernels/ never imports runtime/). Those modules
are imported on first selection of their backend (`_BACKEND_MODULES`), so importing the runtime never needs
triton or a GPU.

Which implementation runs is a *kernel choice*, a dict op -> backend held by whoever runs the model, not by
the process:
- `kernel_choice(spec)` resolves a backend name ("torch", "triton", "cuda": that backend for every op that has
  it, torch for the others) or a mapping {op: backend} (missing ops: torch) into a full choice, loading the
  backend modules; an unknown op is a KeyError, a backend an op lacks a ValueError, each naming it.
- The active choice lives in a `contextvars.ContextVar`: `with active(choice):` sets it for the current
  context (a thread, or an asyncio task) and restores the previous one on exit; `selected()` returns it; every
  dispatch call reads it. `using(backend)` is `active(kernel_choice(backend))`.
- A new thread starts with the default, not its creator's choice (unless it runs in a copy of the creator's
  context, as runtime/engine_loop.py's thread does): the default is `kernel_choice($OMNI_RT_BACKEND)` when
  that variable is set, else torch for every op. So two engines in one process can run different kernels.
"""

from __future__ import annotations

import contextvars
import importlib
import importlib.util
import os
from contextlib import contextmanager
from typing import Callable, Mapping

from kernels import attention as _attention
from kernels import conv as _conv
from kernels import mlp as _mlp
from kernels import moe as _moe
from kernels import norm as _norm
from kernels import rope as _rope
from kernels import sampling as _sampling
from kernels import snake as _snake

_IMPLS: dict[str, dict[str, Callable]] = {
    "rms_norm": {"torch": _norm.rms_norm_ref},
    "add_rms_norm": {"torch": _norm.add_rms_norm_ref},
    "add_rms_norm_linear": {"torch": _norm.add_rms_norm_linear_ref},
    "add_rms_norm_swiglu": {"torch": _norm.add_rms_norm_swiglu_ref},
    "rope_cos_sin": {"torch": _rope.rope_cos_sin_ref},
    "apply_rope": {"torch": _rope.apply_rope_ref},
    "qk_norm_rope": {"torch": _rope.qk_norm_rope_ref},
    "qk_norm_rope_cache_write": {"torch": _rope.qk_norm_rope_cache_write_ref},
    "mrope_qk_norm_": {"torch": _rope.mrope_qk_norm_ref_},
    "attention": {"torch": _attention.attention_ref},
    "decode_attention": {"torch": _attention.decode_attention_ref},
    "decode_norm_rope_attention": {"torch": _attention.decode_norm_rope_attention_ref},
    "route_topk": {"torch": _moe.route_topk_ref},
    "router_topk": {"torch": _moe.router_topk_ref},
    "moe_experts": {"torch": _moe.moe_experts_ref},
    "linear_swiglu": {"torch": _mlp.linear_swiglu_ref},
    "linear_gated_add": {"torch": _mlp.linear_gated_add_ref},
    "snake_beta": {"torch": _snake.snake_beta_ref},
    "causal_conv1d": {"torch": _conv.causal_conv1d_ref},
    "sample": {"torch": _sampling.sample_ref},
    "causal_conv1d_update": {"torch": _conv.causal_conv1d_update_ref},
    "causal_conv_transpose1d": {"torch": _conv.causal_conv_transpose1d_ref},
    "causal_conv_transpose1d_update": {"torch": _conv.causal_conv_transpose1d_update_ref},
}

# The modules of each backend (each may cover some ops only). A module lists its implementations in a dict
# `<BACKEND>_OPS` (op name -> function; kernels/ imports nothing from runtime/), which load_backend registers;
# runtime/cuda_ops.py registers itself on import instead.
_BACKEND_MODULES: dict[str, list[str]] = {
    "triton": ["kernels.triton_moe", "kernels.triton_rope", "kernels.triton_conv", "kernels.triton_attention",
               "kernels.triton_sampling", "kernels.triton_snake", "kernels.triton_apply_rope",
               "kernels.triton_router", "kernels.triton_linear", "kernels.triton_norm_rope_attention"],
    "cuda": ["runtime.cuda_ops"],
}
_loaded: set[str] = set()


def load_backend(backend: str) -> None:
    """Import the modules of `backend` and register what they list; a missing dependency (triton, the built
    CUDA extension) is a clear error naming it. Modules not written yet are skipped."""
    if backend in _loaded or backend not in _BACKEND_MODULES:  # torch, or one registered directly (export)
        return
    for name in _BACKEND_MODULES[backend]:
        if importlib.util.find_spec(name) is None:
            continue
        module = importlib.import_module(name)
        for op, fn in getattr(module, f"{backend.upper()}_OPS", {}).items():
            register(op, backend, fn)
    _loaded.add(backend)


def register(op: str, backend: str, fn: Callable) -> None:
    """Make `fn` available as `backend` for `op` (same signature as the reference)."""
    if op not in _IMPLS:
        raise KeyError(f"unknown op {op!r}; known ops: {', '.join(sorted(_IMPLS))}")
    _IMPLS[op][backend] = fn


def backends(op: str) -> list[str]:
    """Implementations of `op` available now (importing the backend modules first)."""
    for backend in _BACKEND_MODULES:
        try:
            load_backend(backend)
        except ImportError:
            pass  # that backend's dependency is missing here: it simply has no implementations
    return sorted(_IMPLS[op])


def kernel_choice(spec: str | Mapping[str, str] | None = None) -> dict[str, str]:
    """A full op -> backend dict from a backend name (every op that has it; torch for the others) or a
    mapping {op: backend} (missing ops: torch); None: all torch. Loads the backends it names."""
    if isinstance(spec, str):
        load_backend(spec)
        if not any(spec in impls for impls in _IMPLS.values()):
            known = sorted({b for impls in _IMPLS.values() for b in impls} | set(_BACKEND_MODULES))
            raise ValueError(f"no op has a {spec!r} implementation (backends: {', '.join(known)})")
        return {op: spec if spec in impls else "torch" for op, impls in _IMPLS.items()}
    choice = {op: "torch" for op in _IMPLS}
    for op, backend in (spec or {}).items():
        if op not in _IMPLS:
            raise KeyError(f"unknown op {op!r}; known ops: {', '.join(sorted(_IMPLS))}")
        load_backend(backend)
        if backend not in _IMPLS[op]:
            raise ValueError(f"op {op!r} has no {backend!r} implementation (available: {', '.join(backends(op))})")
        choice[op] = backend
    return choice


def _default_choice() -> dict[str, str]:
    return kernel_choice(os.environ.get("OMNI_RT_BACKEND") or None)


_active: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("omni_rt_kernel_choice",
                                                                         default=_default_choice())


@contextmanager
def active(choice: str | Mapping[str, str]):
    """Run the body with `choice` (resolved and checked by kernel_choice) as this context's kernel choice."""
    token = _active.set(kernel_choice(choice))
    try:
        yield selected()
    finally:
        _active.reset(token)


def using(backend: str | Mapping[str, str]):
    """`active(kernel_choice(backend))`: e.g. `with dispatch.using("triton"):`."""
    return active(kernel_choice(backend))


def selected() -> dict[str, str]:
    """The active kernel choice of this context (a copy)."""
    return dict(_active.get())


def _call(op: str) -> Callable:
    return _IMPLS[op][_active.get()[op]]


def rms_norm(x, weight, eps):
    return _call("rms_norm")(x, weight, eps)


def add_rms_norm(x, residual, weight, eps):
    """(normed, new_residual): RMSNorm of x + residual, and that sum (the decoder's residual stream)."""
    return _call("add_rms_norm")(x, residual, weight, eps)


def add_rms_norm_linear(x, residual, norm_weight, eps, weight):
    """(F.linear(normed, weight), new_residual): add_rms_norm (rms_norm alone when residual is None, new_residual
    then x) with the linear that reads the normed rows fused in."""
    return _call("add_rms_norm_linear")(x, residual, norm_weight, eps, weight)


def add_rms_norm_swiglu(x, residual, norm_weight, eps, gate_up_weight):
    """(silu(gate)·up, new_residual): add_rms_norm_linear with a gate|up weight (2I, H), the SiLU·up product
    fused after it: a dense GatedMLP up to its down projection."""
    return _call("add_rms_norm_swiglu")(x, residual, norm_weight, eps, gate_up_weight)


def rope_cos_sin(positions, inv_freq, mrope_section, dtype):
    return _call("rope_cos_sin")(positions, inv_freq, mrope_section, dtype)


def apply_rope(x, cos, sin):
    return _call("apply_rope")(x, cos, sin)


def qk_norm_rope(q, k, q_norm_weight, k_norm_weight, eps, cos, sin):
    return _call("qk_norm_rope")(q, k, q_norm_weight, k_norm_weight, eps, cos, sin)


def qk_norm_rope_cache_write(q, k, v, q_norm_weight, k_norm_weight, eps, cos, sin, k_cache, v_cache, write_rows,
                             write_at):
    """The new q after q/k-norm + rotary; k (normed, rotated) and v stored into the caches at [write_rows, write_at]."""
    return _call("qk_norm_rope_cache_write")(q, k, v, q_norm_weight, k_norm_weight, eps, cos, sin, k_cache, v_cache,
                                             write_rows, write_at)


def mrope_qk_norm_(q, k, q_norm_weight, k_norm_weight, eps, positions, inv_freq, mrope_section):
    """In place on q (T, q_heads, D) and k (T, kv_heads, D); returns (q, k)."""
    return _call("mrope_qk_norm_")(q, k, q_norm_weight, k_norm_weight, eps, positions, inv_freq, mrope_section)


def attention(q, k, v, mask, scale):
    return _call("attention")(q, k, v, mask, scale)


def decode_attention(q, k_cache, v_cache, slot_ids, lengths, scale, counters=None):
    """counters: the cache's split counters (kernels.attention.split_counters) or None."""
    return _call("decode_attention")(q, k_cache, v_cache, slot_ids, lengths, scale, counters)


def decode_norm_rope_attention(q, k, v, q_norm_weight, k_norm_weight, eps, cos, sin, k_cache, v_cache, write_rows,
                               write_at, slot_ids, lengths, scale, counters=None):
    """qk_norm_rope_cache_write then decode_attention over the caches, as one op (few new tokens per row)."""
    return _call("decode_norm_rope_attention")(q, k, v, q_norm_weight, k_norm_weight, eps, cos, sin, k_cache, v_cache,
                                               write_rows, write_at, slot_ids, lengths, scale, counters)


def route_topk(router_logits, top_k, norm_topk_prob):
    return _call("route_topk")(router_logits, top_k, norm_topk_prob)


def router_topk(hidden, gate_weight, top_k, norm_topk_prob):
    """route_topk of the router logits F.linear(hidden, gate_weight), the router GEMM fused in."""
    return _call("router_topk")(hidden, gate_weight, top_k, norm_topk_prob)


def moe_experts(hidden, expert_ids, expert_weights, gate_up_proj, down_proj):
    return _call("moe_experts")(hidden, expert_ids, expert_weights, gate_up_proj, down_proj)


def linear_swiglu(x, gate_up_weight):
    """silu(gate)·up of the gate|up linear (2I, H) of x: a GatedMLP up to its down projection, one op."""
    return _call("linear_swiglu")(x, gate_up_weight)


def linear_gated_add(act, down_weight, x, gate_weight, y):
    """y + sigmoid(x·gate_weight) * (act @ down_weight^T): the talker's shared expert from its SiLU·up through the
    down projection and its sigmoid gate, added to the routed experts' sum y, one op."""
    return _call("linear_gated_add")(act, down_weight, x, gate_weight, y)


def snake_beta(x, alpha_exp, inv_beta):
    """x + inv_beta·sin²(alpha_exp·x) per channel: Code2Wav's SnakeBeta with its constants folded at load."""
    return _call("snake_beta")(x, alpha_exp, inv_beta)


def causal_conv1d(x, weight, bias, dilation, groups):
    return _call("causal_conv1d")(x, weight, bias, dilation, groups)


def causal_conv1d_update(x_chunk, conv_state, weight, bias, dilation, groups, slot_ids=None):
    return _call("causal_conv1d_update")(x_chunk, conv_state, weight, bias, dilation, groups, slot_ids)


def causal_conv_transpose1d(x, weight, bias, stride):
    return _call("causal_conv_transpose1d")(x, weight, bias, stride)


def causal_conv_transpose1d_update(x_chunk, tail_state, weight, bias, stride, start, slot_ids=None):
    return _call("causal_conv_transpose1d_update")(x_chunk, tail_state, weight, bias, stride, start, slot_ids)


def sample(logits, history, params, seeds, steps, stage, suppress=None, record_at=None):
    """Filtered draw of one token per row (kernels/sampling.py `sample_ref`'s contract)."""
    return _call("sample")(logits, history, params, seeds, steps, stage, suppress, record_at)
