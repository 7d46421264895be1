"""How many GPU kernels one call of each `omni_rt_triton` op launches, as a function of its arguments.

A TorchDispatchMode sees one `omni_rt_triton::<op>` call, not what runs inside it: `LAUNCHES[name](args,
kwargs) -> int` says how many kernels that call puts on the stream (Triton launches plus the torch kernels the
op runs on the device, such as a copy that makes an input contiguous; allocations with torch.empty launch
nothing). `args` / `kwargs` are the op's arguments as a dispatch mode receives them (schema order, see
`SCHEMA_ARGS`); tensors may be fake or meta, only shapes and strides are read. The public functions of
kernels/triton_*.py run their reshapes outside the op, where a dispatch mode sees them as aten ops.

Importable without triton. The Triton wrappers pick their path with the `*_plan` functions below, so a count
cannot drift from the code it describes: a plan is the tuple of kernels one call launches, in order.
"""

from __future__ import annotations

from typing import Any, Callable

from kernels.tuning import launch_config

NAMESPACE = "omni_rt_triton"
DECODE_MAX_TOKENS = 8  # moe_experts: up to this many tokens the pair-major decode path (no alignment) runs


# ------------------------------------------------------------------------------------------------- plans
def rms_norm_plan(rows: int) -> tuple[str, ...]:
    return ("rms_norm",) if rows else ()


def elementwise_plan(rows: int, cols: int, name: str) -> tuple[str, ...]:
    """snake_beta and apply_rope: one kernel over the (rows, cols) output."""
    return (name,) if rows and cols else ()


def norm_linear_plan(rows: int, cols: int, name: str) -> tuple[str, ...]:
    """add_rms_norm_linear and add_rms_norm_swiglu (the norm in the GEMM's prologue), linear_swiglu and
    linear_gated_add (the shared expert's GEMMs with their epilogues): one kernel each (kernels/triton_linear.py)."""
    return (name,) if rows and cols else ()


def qk_norm_rope_plan(tokens: int) -> tuple[str, ...]:
    """qk_norm_rope, qk_norm_rope_cache_write and mrope_qk_norm_: one launch covers the q heads and the k heads
    (and the k/v cache writes)."""
    return ("qk_norm_rope",) if tokens else ()


def route_topk_plan(num_tokens: int) -> tuple[str, ...]:
    return ("route_topk",) if num_tokens else ()


def moe_experts_plan(num_tokens: int) -> tuple[str, ...]:
    """The path is chosen by the token count (a shape, never the data). Decode is two kernels whatever the down
    kernel's split over expert groups: the groups merge in-kernel (kernels/triton_moe_decode.py)."""
    if num_tokens == 0:
        return ()
    if num_tokens <= DECODE_MAX_TOKENS:
        return ("decode_gate_up", "decode_down_combine")
    return ("moe_align", "grouped_gate_up", "grouped_down", "combine_topk")


# decode_attention's launch parameters (bench/tune.py may override them per shape; kernels/triton_attention.py)
DECODE_ATTENTION_CONFIG = {"BLOCK_N": 64, "num_warps": 4, "min_programs": 264, "MAX_BLOCK_R": 64}


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def decode_attention_layout(batch: int, new_tokens: int, q_heads: int, kv_heads: int, head_dim: int, max_len: int,
                            dtype, on_cpu: bool) -> dict:
    """The launch parameters of one decode_attention call, from shapes only (never the lengths, which stay on the
    device): the tuned or default config plus BLOCK_R (query rows per program), row_blocks, splits (key splits
    per row block) and split_len. Splits: enough programs to fill the GPU for the longest possible row; on the
    CPU interpreter (programs run one after another) one split. Meta and fake tensors count as a GPU's."""
    groups = q_heads // kv_heads
    default = {**DECODE_ATTENTION_CONFIG, "min_programs": 1} if on_cpu else DECODE_ATTENTION_CONFIG
    cfg = launch_config("decode_attention", f"L={new_tokens},G={groups},D={head_dim}", dtype, default)
    block_n = cfg["BLOCK_N"]
    # Query rows per program: all L·G rows of a KV head share its K/V reads; capped (long chunks tile the rows).
    block_r = max(16, min(cfg["MAX_BLOCK_R"], _next_power_of_2(new_tokens * groups)))
    row_blocks = _cdiv(new_tokens * groups, block_r)
    programs = batch * row_blocks * kv_heads
    splits = max(1, min(_cdiv(max_len, block_n), _cdiv(cfg["min_programs"], programs)))
    split_len = _cdiv(_cdiv(max_len, splits), block_n) * block_n
    return dict(cfg, BLOCK_R=block_r, row_blocks=row_blocks, splits=_cdiv(max_len, split_len), split_len=split_len)


# How a decode-attention split program ends (its FINISH meta-parameter, kernels/triton_attention.py): one split
# writes the output; several either merge in the last split to finish (a per-(row block, KV head) counter) or,
# without counters, in a second kernel.
FINISH_DIRECT, FINISH_LAST_SPLIT_MERGES, FINISH_MERGE_KERNEL = 0, 1, 2
# Counters a cache holds for that merge (kernels.attention.split_counters): one per program of a split, i.e.
# B · row_blocks · Hkv, and several splits only happen below min_programs such programs (at most 1056 in
# bench/tune.py's space), so this covers every layout; a smaller buffer falls back to the merge kernel.
DECODE_ATTENTION_COUNTERS = 2048
# decode_norm_rope_attention: up to this many new tokens per row (decode, the code predictor's 2-token first
# step, speculative chunks); every row block of split 0 normalises and rotates all of them in registers, so a
# longer chunk (a prefill) takes qk_norm_rope_cache_write + decode_attention instead (runtime/kv_cache.py).
FUSED_ATTENTION_MAX_NEW = 16


def split_finish(batch: int, layout: dict, kv_heads: int, counters) -> int:
    """The FINISH of one call: from the layout's splits and whether `counters` (a tensor or None; only its size is
    read) has one counter per (batch row, row block, KV head)."""
    if layout["splits"] == 1:
        return FINISH_DIRECT
    if counters is not None and counters.numel() >= batch * layout["row_blocks"] * kv_heads:
        return FINISH_LAST_SPLIT_MERGES
    return FINISH_MERGE_KERNEL


def decode_attention_plan(batch: int, new_tokens: int, finish: int,
                          first: str = "decode_attention_split") -> tuple[str, ...]:
    """One launch (the split kernel, or `first`, the fused norm + rotary + attention kernel), plus the merge
    kernel when several splits have no counters."""
    if not batch or not new_tokens:
        return ()
    return (first, "decode_attention_merge") if finish == FINISH_MERGE_KERNEL else (first,)


def _decode_attention(a: dict, first: str = "decode_attention_split") -> int:
    """decode_attention, and decode_norm_rope_attention (first: its fused kernel; the same layout)."""
    q, k_cache = a["q"], a["k_cache"]
    batch, new, q_heads, head_dim = q.shape
    if not batch or not new:
        return 0
    layout = decode_attention_layout(batch, new, q_heads, k_cache.shape[2], head_dim, k_cache.shape[1], q.dtype,
                                     q.device.type == "cpu")
    finish = split_finish(batch, layout, k_cache.shape[2], a.get("counters"))
    return len(decode_attention_plan(batch, new, finish, first))


def causal_conv1d_plan(batch: int, c_in: int, c_out: int, length: int, groups: int, state_len: int,
                       update: bool) -> tuple[str, ...]:
    """The output kernel (depthwise when groups = C_in = C_out), then, for an update, the state kernel."""
    if batch == 0 or length == 0:
        return ()
    plan = ("conv1d_depthwise",) if groups == c_in == c_out else ("conv1d_dot",)
    return plan + ("conv_state",) if update and state_len else plan


def causal_conv_transpose1d_plan(batch: int, c_out: int, length: int, out_len: int, trim: int,
                                 update: bool) -> tuple[str, ...]:
    """The output samples (when there are any), then, for an update, the new tail (when k > s)."""
    if update:
        if batch == 0 or length == 0:
            return ()
        return (("conv_transpose_out",) if out_len else ()) + (("conv_transpose_tail",) if trim else ())
    return ("conv_transpose_out",) if batch * c_out * out_len else ()


def transpose_output_range(length: int, stride: int, trim: int, start: int | None) -> tuple[int, int]:
    """Untrimmed local positions [p_begin, p_end) whose samples a call returns; start None: the full op."""
    p_end = length * stride
    left_trim = trim if start is None else max(trim - start * stride, 0)  # the left trim still to drop
    return min(left_trim, p_end), p_end


# ------------------------------------------------------------------------------------------ the counters
# Argument names of each op's schema, in order (tests/test_triton_ops_fake.py checks them against the ops).
SCHEMA_ARGS: dict[str, tuple[str, ...]] = {
    "rms_norm": ("x", "weight", "eps"),
    "add_rms_norm": ("x", "residual", "weight", "eps"),
    "add_rms_norm_linear": ("x", "residual", "norm_weight", "eps", "weight"),
    "add_rms_norm_swiglu": ("x", "residual", "norm_weight", "eps", "gate_up_weight"),
    "linear_swiglu": ("x", "gate_up_weight"),
    "linear_gated_add": ("act", "down_weight", "x", "gate_weight", "y"),
    "qk_norm_rope": ("q", "k", "q_norm_weight", "k_norm_weight", "eps", "cos", "sin"),
    "qk_norm_rope_cache_write": ("q", "k", "v", "q_norm_weight", "k_norm_weight", "eps", "cos", "sin", "k_cache",
                                 "v_cache", "write_rows", "write_at"),
    "mrope_qk_norm_": ("q", "k", "q_norm_weight", "k_norm_weight", "eps", "positions", "inv_freq", "mrope_section"),
    "route_topk": ("router_logits", "top_k", "norm_topk_prob"),
    "router_topk": ("hidden", "gate_weight", "top_k", "norm_topk_prob"),
    "snake_beta": ("x", "alpha_exp", "inv_beta"),
    "apply_rope": ("x", "cos", "sin"),
    "moe_experts": ("hidden", "expert_ids", "expert_weights", "gate_up_proj", "down_proj"),
    "decode_attention": ("q", "k_cache", "v_cache", "slot_ids", "lengths", "scale", "counters"),
    "decode_norm_rope_attention": ("q", "k", "v", "q_norm_weight", "k_norm_weight", "eps", "cos", "sin", "k_cache",
                                   "v_cache", "write_rows", "write_at", "slot_ids", "lengths", "scale", "counters"),
    "causal_conv1d": ("x", "weight", "bias", "dilation", "groups"),
    "causal_conv1d_update": ("x_chunk", "conv_state", "weight", "bias", "dilation", "groups", "slot_ids"),
    "causal_conv_transpose1d": ("x", "weight", "bias", "stride"),
    "causal_conv_transpose1d_update": ("x_chunk", "tail_state", "weight", "bias", "stride", "start", "slot_ids"),
}


def _bind(op: str, args: tuple, kwargs: dict) -> dict[str, Any]:
    bound = dict(zip(SCHEMA_ARGS[op], args))
    bound.update(kwargs or {})
    return bound


def _moe_experts(a: dict) -> int:
    # the op flattens expert_ids / expert_weights; a non-contiguous one is copied first
    copies = sum(not a[name].is_contiguous() for name in ("expert_ids", "expert_weights"))
    return len(moe_experts_plan(a["hidden"].shape[0])) + (copies if a["hidden"].shape[0] else 0)


def _conv1d(a: dict, update: bool) -> int:
    x, weight = a["x_chunk" if update else "x"], a["weight"]
    batch, c_in, length = x.shape
    state_len = (weight.shape[-1] - 1) * a["dilation"]
    return len(causal_conv1d_plan(batch, c_in, weight.shape[0], length, a["groups"], state_len, update))


def _conv_transpose1d(a: dict, update: bool) -> int:
    x, weight, stride = a["x_chunk" if update else "x"], a["weight"], a["stride"]
    batch, _, length = x.shape
    trim = weight.shape[-1] - stride
    p_begin, p_end = transpose_output_range(length, stride, trim, a["start"] if update else None)
    return len(causal_conv_transpose1d_plan(batch, weight.shape[1], length, p_end - p_begin, trim, update))


_COUNTERS: dict[str, Callable[[dict], int]] = {
    "rms_norm": lambda a: len(rms_norm_plan(a["x"].shape[0])),
    "add_rms_norm": lambda a: len(rms_norm_plan(a["x"].shape[0])),  # one kernel: the add rides along
    "add_rms_norm_linear": lambda a: len(norm_linear_plan(a["x"].shape[0], a["weight"].shape[0],
                                                          "add_rms_norm_linear")),
    "add_rms_norm_swiglu": lambda a: len(norm_linear_plan(a["x"].shape[0], a["gate_up_weight"].shape[0] // 2,
                                                          "add_rms_norm_swiglu")),
    "linear_swiglu": lambda a: len(norm_linear_plan(a["x"].shape[0], a["gate_up_weight"].shape[0] // 2,
                                                    "linear_swiglu")),
    "linear_gated_add": lambda a: len(norm_linear_plan(a["act"].shape[0], a["down_weight"].shape[0],
                                                       "linear_gated_add")),
    "qk_norm_rope": lambda a: len(qk_norm_rope_plan(a["q"].shape[0])),
    "qk_norm_rope_cache_write": lambda a: len(qk_norm_rope_plan(a["q"].shape[0])),  # v and the cache writes ride along
    "mrope_qk_norm_": lambda a: len(qk_norm_rope_plan(a["q"].shape[0])),
    "route_topk": lambda a: len(route_topk_plan(a["router_logits"].shape[0])),
    "router_topk": lambda a: len(route_topk_plan(a["hidden"].shape[0])),  # the router GEMM inside
    "snake_beta": lambda a: len(elementwise_plan(a["x"].shape[0] * a["x"].shape[1], a["x"].shape[2], "snake_beta")),
    "apply_rope": lambda a: len(elementwise_plan(a["x"].shape[0] * a["x"].shape[1], a["x"].shape[2] * a["x"].shape[3],
                                                 "apply_rope")),
    "moe_experts": _moe_experts,
    "decode_attention": _decode_attention,
    "decode_norm_rope_attention": lambda a: _decode_attention(a, "decode_norm_rope_attention"),
    "causal_conv1d": lambda a: _conv1d(a, update=False),
    "causal_conv1d_update": lambda a: _conv1d(a, update=True),
    "causal_conv_transpose1d": lambda a: _conv_transpose1d(a, update=False),
    "causal_conv_transpose1d_update": lambda a: _conv_transpose1d(a, update=True),
}


def _counter(op: str) -> Callable[[tuple, dict], int]:
    def count(args: tuple, kwargs: dict | None = None) -> int:
        return _COUNTERS[op](_bind(op, args, kwargs or {}))
    count.__name__ = f"count_{op}"
    return count


# "omni_rt_triton::<op>" (what OpOverload.name() gives for the default overload) -> count(args, kwargs)
LAUNCHES: dict[str, Callable[[tuple, dict], int]] = {f"{NAMESPACE}::{op}": _counter(op) for op in SCHEMA_ARGS}

# kernels/triton_sampling.py (not in SCHEMA_ARGS: tests/test_triton_ops_fake.py's tables cover those ops;
# tests/test_triton_sampling.py checks this schema and count)
SAMPLE_ARGS = ("logits", "history", "suppress", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
               "do_sample", "seeds", "steps", "stage", "record_at")
SAMPLE_ROW_ARGS = SAMPLE_ARGS[3:11]  # (B,) tensors the op makes contiguous (a copy each when they are not)


def sample_plan(batch: int) -> tuple[str, ...]:
    """Filters and draw of every row in one kernel, one program per row, whatever the vocabulary."""
    return ("sample",) if batch else ()


def _sample(args: tuple, kwargs: dict | None = None) -> int:
    a = dict(zip(SAMPLE_ARGS, args), **(kwargs or {}))
    batch = a["logits"].shape[0]
    copies = sum(not a[name].is_contiguous() for name in SAMPLE_ROW_ARGS)
    copies += a.get("suppress") is not None and not a["suppress"].is_contiguous()
    return len(sample_plan(batch)) + (copies if batch else 0)


LAUNCHES[f"{NAMESPACE}::sample"] = _sample
