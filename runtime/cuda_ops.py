"""CUDA backend: the hand-written kernels of csrc/ as `torch.library` ops (namespace `omni_rt`), registered
with runtime/dispatch.py under the reference op names.

The kernels live in the torch-free library libomni_rt_kernels; the pybind11 module `omni_rt_cuda` (built by
CMake through setup.py into runtime/) exposes them as functions of integer device pointers, sizes, element
strides and a stream handle. This module is the only place that turns tensors into those integers: it
passes `data_ptr()`, `stride()` and `torch.cuda.current_stream().cuda_stream`, so every op runs on the
caller's stream, allocates only its outputs (through torch's caching allocator) and never syncs with the
host: all of them are safe under CUDA-graph capture. Each op has a fake (meta) implementation for
`torch.compile` and is checked with `torch.library.opcheck` in tests/test_csrc.py.

Ops (legend: T = num_tokens, E = num_experts, K = top_k, BM = block_m, D = head_dim):
- omni_rt::route_topk      twin kernels/moe.py route_topk_ref
- omni_rt::moe_align       twin kernels/moe.py moe_align_ref
- omni_rt::mrope_qk_norm_  in place; twin mrope_qk_norm_torch below (= kernels/rope.py qk_norm_rope_ref)
- omni_rt::causal_conv1d_update   twin kernels/conv.py causal_conv1d_update_ref

Importing raises ImportError when the extension was not built (no nvcc/cmake at install time) or when no
CUDA GPU is visible; runtime/dispatch.py then simply lists no `cuda` implementations.
"""

import inspect
from typing import Optional

import torch

from kernels import conv as _conv
from kernels import moe as _moe
from kernels.moe import moe_align_max_padded
from kernels import rope as _rope
from runtime import dispatch

try:
    from runtime import omni_rt_cuda as _C
except ImportError:
    try:
        import omni_rt_cuda as _C  # a CMake build dir put on sys.path by hand
    except ImportError as exc:
        raise ImportError(
            "omni-rt was installed without the CUDA extension (no nvcc at build time): the module "
            "runtime/omni_rt_cuda*.so is missing. Put nvcc and cmake on PATH and reinstall with "
            "`pip install --no-deps --no-build-isolation -e .`") from exc

if not torch.cuda.is_available():
    _count, _code, _message = _C.device_count()
    raise ImportError(f"runtime.cuda_ops needs a CUDA GPU: torch.cuda.is_available() is False "
                      f"(cudaGetDeviceCount: error {_code}, {_message})")

_DTYPE_CODE = {torch.float32: _C.FLOAT32, torch.float16: _C.FLOAT16, torch.bfloat16: _C.BFLOAT16}


def _dtype_code(t: torch.Tensor) -> int:
    if t.dtype not in _DTYPE_CODE:
        raise TypeError(f"omni_rt CUDA ops take float32, float16 or bfloat16 tensors, got {t.dtype}")
    return _DTYPE_CODE[t.dtype]


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def _check_cuda(op: str, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and not t.is_cuda:
            raise ValueError(f"omni_rt::{op}: {name} must be a CUDA tensor, got {t.device}")


# ----------------------------------------------------------------------------------------------- routing


@torch.library.custom_op("omni_rt::route_topk", mutates_args=(), device_types="cuda")
def route_topk(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits: (T, E) float, any strides; read.
    Returns (weights (T, K) in the logits' dtype, ids (T, K) int64), new tensors: softmax over all E experts
    in fp32, top-k by descending probability (ties: lower id), optional renormalisation, cast last.
    """
    _check_cuda("route_topk", router_logits=router_logits)
    num_tokens, num_experts = router_logits.shape
    weights = router_logits.new_empty(num_tokens, top_k)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=router_logits.device)
    with torch.cuda.device(router_logits.device):
        _C.route_topk(router_logits.data_ptr(), router_logits.stride(0), router_logits.stride(1), weights.data_ptr(),
                      ids.data_ptr(), num_tokens, num_experts, top_k, norm_topk_prob, _dtype_code(router_logits),
                      _stream(router_logits))
    return weights, ids


@route_topk.register_fake
def _(router_logits, top_k, norm_topk_prob):
    num_tokens = router_logits.shape[0]
    return (router_logits.new_empty(num_tokens, top_k),
            router_logits.new_empty(num_tokens, top_k, dtype=torch.int64))


def route_topk_cuda(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool):
    """Same signature and contract as kernels/moe.py route_topk_ref ((..., E) logits); CPU tensors go to it."""
    if not router_logits.is_cuda:
        return _moe.route_topk_ref(router_logits, top_k, norm_topk_prob)
    lead = router_logits.shape[:-1]
    weights, ids = torch.ops.omni_rt.route_topk(router_logits.reshape(-1, router_logits.shape[-1]), top_k,
                                                norm_topk_prob)
    return weights.view(*lead, top_k), ids.view(*lead, top_k)


@torch.library.custom_op("omni_rt::moe_align", mutates_args=(), device_types="cuda")
def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """kernels/moe.py moe_align_ref's contract (topk_ids (T, K) int64), computed on the device in one launch."""
    _check_cuda("moe_align", topk_ids=topk_ids)
    if topk_ids.dtype != torch.int64:
        raise TypeError(f"omni_rt::moe_align: topk_ids must be int64, got {topk_ids.dtype}")
    flat = topk_ids.contiguous().view(-1)
    num_pairs = flat.numel()
    max_padded = moe_align_max_padded(num_pairs, num_experts, block_m)
    sorted_ids = torch.empty(max_padded, dtype=torch.int32, device=flat.device)
    expert_ids = torch.empty(max_padded // block_m, dtype=torch.int32, device=flat.device)
    num_post_pad = torch.empty(1, dtype=torch.int32, device=flat.device)
    with torch.cuda.device(flat.device):
        _C.moe_align(flat.data_ptr(), sorted_ids.data_ptr(), expert_ids.data_ptr(), num_post_pad.data_ptr(),
                     num_pairs, num_experts, block_m, _stream(flat))
    return sorted_ids, expert_ids, num_post_pad


@moe_align.register_fake
def _(topk_ids, num_experts, block_m):
    max_padded = moe_align_max_padded(topk_ids.numel(), num_experts, block_m)
    return (topk_ids.new_empty(max_padded, dtype=torch.int32),
            topk_ids.new_empty(max_padded // block_m, dtype=torch.int32),
            topk_ids.new_empty(1, dtype=torch.int32))


# ------------------------------------------------------------------------------------------ TM-RoPE + norm


@torch.library.custom_op("omni_rt::mrope_qk_norm_", mutates_args=("q", "k"), device_types="cuda")
def mrope_qk_norm_(q: torch.Tensor, k: torch.Tensor, q_norm_weight: torch.Tensor, k_norm_weight: torch.Tensor,
                   positions: torch.Tensor, inv_freq: torch.Tensor, mrope_section: list[int], eps: float) -> None:
    """q: (T, Hq, D), k: (T, Hk, D), activation dtype, channels contiguous; both updated in place.
    q_norm_weight, k_norm_weight: (D,) same dtype. positions: (3, T) int64 t/h/w ids. inv_freq: (D/2,) float32.
    mrope_section: the 3 TM-RoPE section sizes (section[0] is not read). eps: RMSNorm epsilon.
    Per head: Qwen3's RMSNorm (kernels/norm.py cast order), then TM-RoPE with the interleaved axis rule of
    kernels/rope.py tm_rope_axis_of_slot, cos/sin cast to the activation dtype as rope_cos_sin_ref does.
    """
    _check_cuda("mrope_qk_norm_", q=q, k=k, positions=positions, inv_freq=inv_freq)
    num_tokens, q_heads, head_dim = q.shape
    if k.shape[0] != num_tokens or k.shape[2] != head_dim or q.stride(2) != 1 or k.stride(2) != 1:
        raise ValueError(f"omni_rt::mrope_qk_norm_: q {tuple(q.shape)} and k {tuple(k.shape)} must be (T, H, D) "
                         "with contiguous channels")
    if not (q.dtype == k.dtype == q_norm_weight.dtype == k_norm_weight.dtype):
        raise TypeError("omni_rt::mrope_qk_norm_: q, k and both norm weights must share a dtype")
    if positions.dtype != torch.int64 or positions.shape != (3, num_tokens):
        raise ValueError(f"omni_rt::mrope_qk_norm_: positions must be (3, {num_tokens}) int64, got "
                         f"{tuple(positions.shape)} {positions.dtype}")
    if inv_freq.dtype != torch.float32 or inv_freq.numel() != head_dim // 2 or not inv_freq.is_contiguous():
        raise ValueError("omni_rt::mrope_qk_norm_: inv_freq must be a contiguous (D/2,) float32 tensor")
    with torch.cuda.device(q.device):
        _C.mrope_qk_norm(q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), k.stride(0), k.stride(1),
                         q_norm_weight.contiguous().data_ptr(), k_norm_weight.contiguous().data_ptr(),
                         positions.data_ptr(), positions.stride(0), positions.stride(1), inv_freq.data_ptr(),
                         num_tokens, q_heads, k.shape[1], head_dim, int(mrope_section[1]), int(mrope_section[2]),
                         float(eps), _dtype_code(q), _stream(q))


@mrope_qk_norm_.register_fake
def _(q, k, q_norm_weight, k_norm_weight, positions, inv_freq, mrope_section, eps):
    return None


def mrope_qk_norm_torch(q, k, q_norm_weight, k_norm_weight, positions, inv_freq, mrope_section, eps) -> None:
    """The torch twin of omni_rt::mrope_qk_norm_ (same arguments, in place): rope_cos_sin_ref + qk_norm_rope_ref."""
    cos, sin = _rope.rope_cos_sin_ref(positions, inv_freq, mrope_section, q.dtype)  # (T, D) each
    new_q, new_k = _rope.qk_norm_rope_ref(q[None], k[None], q_norm_weight, k_norm_weight, eps, cos[None], sin[None])
    q.copy_(new_q[0])
    k.copy_(new_k[0])


# ------------------------------------------------------------------------------------------ causal conv1d


@torch.library.custom_op("omni_rt::causal_conv1d_update", mutates_args=("conv_state",), device_types="cuda")
def causal_conv1d_update(x_chunk: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                         bias: Optional[torch.Tensor], dilation: int, groups: int,
                         slot_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """The contract of kernels/conv.py causal_conv1d_update_ref: x_chunk (B, C_in, L); conv_state (B or
    num_slots, C_in, (W−1)·d) updated in place; weight (C_out, C_in/groups, W); bias (C_out,) or None;
    slot_ids (B,) int64 or None, −1 = padded row (zeros out, state untouched). Returns (B, C_out, L).
    """
    _check_cuda("causal_conv1d_update", x_chunk=x_chunk, conv_state=conv_state, weight=weight, bias=bias,
                slot_ids=slot_ids)
    batch, c_in, length = x_chunk.shape
    c_out, _, taps = weight.shape
    state_len = (taps - 1) * dilation
    if conv_state.shape[1:] != (c_in, state_len):
        raise ValueError(f"omni_rt::causal_conv1d_update: conv_state {tuple(conv_state.shape)} must be (rows, {c_in}, "
                         f"(K-1)*d = {state_len})")
    if not (x_chunk.dtype == conv_state.dtype == weight.dtype) or (bias is not None and bias.dtype != x_chunk.dtype):
        raise TypeError("omni_rt::causal_conv1d_update: x_chunk, conv_state, weight and bias must share a dtype")
    if slot_ids is not None and (slot_ids.dtype != torch.int64 or slot_ids.shape != (batch,)):
        raise ValueError(f"omni_rt::causal_conv1d_update: slot_ids must be ({batch},) int64")
    if slot_ids is None and conv_state.shape[0] != batch:
        raise ValueError("omni_rt::causal_conv1d_update: without slot_ids conv_state needs one row per batch row")
    out = x_chunk.new_empty(batch, c_out, length)
    weight = weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    slot_ids = None if slot_ids is None else slot_ids.contiguous()
    with torch.cuda.device(x_chunk.device):
        _C.causal_conv1d_update(x_chunk.data_ptr(), *x_chunk.stride(), conv_state.data_ptr(), *conv_state.stride(),
                                weight.data_ptr(), 0 if bias is None else bias.data_ptr(),
                                0 if slot_ids is None else slot_ids.data_ptr(), out.data_ptr(), batch, c_in, c_out,
                                length, taps, dilation, groups, _dtype_code(x_chunk), _stream(x_chunk))
    return out


@causal_conv1d_update.register_fake
def _(x_chunk, conv_state, weight, bias, dilation, groups, slot_ids):
    return x_chunk.new_empty(x_chunk.shape[0], weight.shape[0], x_chunk.shape[2])


def causal_conv1d_update_cuda(x_chunk, conv_state, weight, bias, dilation=1, groups=1, slot_ids=None):
    """Same signature and contract as kernels/conv.py causal_conv1d_update_ref; CPU tensors go to it."""
    if not x_chunk.is_cuda:
        return _conv.causal_conv1d_update_ref(x_chunk, conv_state, weight, bias, dilation, groups, slot_ids)
    return torch.ops.omni_rt.causal_conv1d_update(x_chunk, conv_state, weight, bias, dilation, groups, slot_ids)


# ------------------------------------------------------------------------------------------ registration

# Argument names this kernel understands in the dispatch op `mrope_qk_norm_` (its torch reference lives
# elsewhere and may name them differently); a signature with anything else is left to the other backends.
_ROPE_ALIASES = {"q": ("q", "query"), "k": ("k", "key"), "q_norm_weight": ("q_norm_weight", "q_weight"),
                 "k_norm_weight": ("k_norm_weight", "k_weight"), "positions": ("positions", "position_ids"),
                 "inv_freq": ("inv_freq",), "mrope_section": ("mrope_section", "section"), "eps": ("eps",)}


def _mrope_qk_norm_adapter(ref):
    """A wrapper with `ref`'s signature over omni_rt::mrope_qk_norm_, or None when the signature does not fit."""
    sig = inspect.signature(ref)
    names = {}
    for ours, aliases in _ROPE_ALIASES.items():
        found = [p for p in sig.parameters if p in aliases]
        if not found:
            return None
        names[ours] = found[0]
    if set(sig.parameters) - set(names.values()):
        return None

    def mrope_qk_norm_cuda(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        a = {ours: bound.arguments[theirs] for ours, theirs in names.items()}
        q, k, section = a["q"], a["k"], a["mrope_section"]
        if not q.is_cuda or q.dim() not in (3, 4) or k.dim() != q.dim():
            return ref(*args, **kwargs)
        try:  # (batch, seq, heads, D) -> (T, heads, D) views: the kernel writes through them
            q3, k3 = q.view(-1, *q.shape[-2:]), k.view(-1, *k.shape[-2:])
        except RuntimeError:
            return ref(*args, **kwargs)
        positions = a["positions"].to(torch.int64)
        if section is None:  # plain 1-D RoPE: every slot reads axis 0
            positions, section = positions.reshape(1, -1).expand(3, -1), (0, 0, 0)
        positions = positions.reshape(3, -1)
        inv_freq = a["inv_freq"].to(device=q.device, dtype=torch.float32).contiguous()
        torch.ops.omni_rt.mrope_qk_norm_(q3, k3, a["q_norm_weight"], a["k_norm_weight"], positions, inv_freq,
                                         [int(s) for s in section], float(a["eps"]))
        return q, k

    return mrope_qk_norm_cuda


dispatch.register("route_topk", "cuda", route_topk_cuda)
dispatch.register("causal_conv1d_update", "cuda", causal_conv1d_update_cuda)
if "torch" in getattr(dispatch, "_IMPLS", {}).get("mrope_qk_norm_", {}):
    _adapter = _mrope_qk_norm_adapter(dispatch._IMPLS["mrope_qk_norm_"]["torch"])
    if _adapter is not None:
        dispatch.register("mrope_qk_norm_", "cuda", _adapter)
