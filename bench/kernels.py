"""Kernel microbenchmarks at the real Qwen3-Omni-30B-A3B shapes: one row per available backend of each op
(runtime/dispatch.py: torch reference, triton, cuda), the torch reference as the ratio's denominator, each row
judged against the floor measured in the same run (bench/common.py).

    python bench/kernels.py                         # GPU: bf16, real shapes, every backend present
    python bench/kernels.py --ops moe_experts,decode_attention --out /tmp/results
    python bench/kernels.py --ops moe_experts:decode,decode_attention      # decode shapes of those ops only
    python bench/kernels.py --skip-ops moe_experts:decode,decode_attention # everything else
    python bench/kernels.py --smoke                 # CPU, fp32, tiny shapes, torch only: checks the script

Ops and shapes (read from runtime/presets.py `qwen3-omni-30b-a3b`):
- moe_experts: thinker layer (E=128, K=8, H=2048, I=768) at decode M = 1, 4, 8 and prefill M = 256, 2048;
  talker layer (E=128, K=6, H=1024, I=384) at M = 1, 4, 8, 256. Extra row `torch._grouped_mm` (where this
  torch has it): the same computation from grouped GEMMs (gather per expert, grouped gate_up, silu*up,
  grouped down, weighted combine). Bytes = weights of the distinct experts the drawn routing touches +
  activations, averaged over the rotated input sets (each set has its own routing). Decode cases add the
  Triton decode path with its down + combine kernel forced unsplit, `triton:down K experts/program` (one
  program per token and block of H, as before issue 18), and split, `triton:down 2 experts/program` (K/2
  programs, merged in-kernel): their µs ratio in one run is the split's gain.
- route_topk: thinker router logits (M, 128), top-8.
- qk_norm_rope (TM-RoPE + q/k RMSNorm): 32 q heads, 4 kv heads, D=128 at the same M; the CUDA fused
  `omni_rt::mrope_qk_norm_` (which also computes cos/sin from positions) as an extra row where built.
- decode_attention: one new token per row over a static cache, lengths 1k/4k/8k, batch 1/4/8.
- causal_conv1d_update / causal_conv_transpose1d_update: Code2Wav's per-frame (80 ms) streaming shapes.
- rms_norm: thinker hidden (M, 2048).
- add_rms_norm_linear: the thinker's residual add + input norm + q|k|v (H=2048 -> 5120) at the same M;
  add_rms_norm_swiglu: the code predictor's norm + gate|up + SiLU·up (H=1024, I=3072) at M = 1, 4, 8.

Each case has a phase: `decode` (one decode step: M <= 8 tokens; attention and the per-frame conv updates are
decode by nature) or `prefill`; `--ops` / `--skip-ops` take `op` or `op:phase` items.
The JSON is rewritten after every case (`"complete": false` until the last), so a run stopped by a time
limit still leaves what it measured.

Inputs are random (never zeros) and rotate over several sets so a pass exceeds twice the L2 cache.
Launch-bound cases are also timed as CUDA-graph replays where the implementation does not sync with the
host; the `mode` column says which timing a row shows. A backend that fails gives a FAILED row, not a crash.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from runtime import dispatch, presets  # noqa: E402

# -------------------------------------------------------------------------------- bytes and FLOPs counted


def moe_bytes(num_tokens: int, unique_experts: int, hidden: int, inter: int, top_k: int, elem: int) -> int:
    """Fewest bytes of one MoE layer call: gate_up (2I×H) and down (H×I) of each routed expert once, hidden in,
    output out, expert ids (int64) and weights of every token-expert pair."""
    weights = unique_experts * 3 * inter * hidden * elem
    activations = 2 * num_tokens * hidden * elem + num_tokens * top_k * (8 + elem)
    return weights + activations


def moe_flops(num_tokens: int, hidden: int, inter: int, top_k: int) -> int:
    """2 FLOPs per multiply-add: gate_up (2I×H) and down (H×I) per token-expert pair: 6·H·I each."""
    return num_tokens * top_k * 6 * hidden * inter


def decode_attention_bytes(lengths: list[int], q_heads: int, kv_heads: int, head_dim: int, new: int,
                           elem: int) -> int:
    """K and V of each row's cached tokens once, q in, out out, slot id and length (int64) per row."""
    kv = sum(2 * length * kv_heads * head_dim * elem for length in lengths)
    return kv + 2 * len(lengths) * new * q_heads * head_dim * elem + 16 * len(lengths)


def decode_attention_flops(lengths: list[int], q_heads: int, head_dim: int, new: int) -> int:
    """q·Kᵀ and p·V: 2·2·D per (query head, new token, key)."""
    return sum(4 * q_heads * head_dim * new * length for length in lengths)


def conv1d_update_bytes(batch: int, c_in: int, c_out: int, taps: int, dilation: int, groups: int, length: int,
                        elem: int) -> int:
    state = (taps - 1) * dilation
    return elem * (batch * c_in * length + 2 * batch * c_in * state + c_out * (c_in // groups) * taps + c_out
                   + batch * c_out * length) + 8 * batch


def conv1d_update_flops(batch: int, c_in: int, c_out: int, taps: int, groups: int, length: int) -> int:
    return 2 * batch * c_out * length * (c_in // groups) * taps


# ------------------------------------------------------------------------------------------------ cases


@dataclass
class Case:
    """One op at one shape. `make_set(i)` draws input set i: (args, bytes counted, flops counted).
    `mutable`: argument positions the op updates in place (cloned before the correctness comparison)."""

    op: str
    name: str
    make_set: Callable[[int], tuple[tuple, int, int]]
    launch_bound: bool = False
    phase: str = "decode"  # "decode" (one decode step) or "prefill": what --ops op:phase selects
    mutable: tuple[int, ...] = ()
    min_sets: int = 1
    extras: dict[str, Callable] = field(default_factory=dict)  # extra implementations with the op's signature


@dataclass
class Env:
    device: torch.device
    dtype: torch.dtype
    smoke: bool

    @property
    def elem(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def randn(self, *shape, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, device=self.device, dtype=torch.float32).mul_(scale).to(self.dtype)


def _shapes(smoke: bool) -> dict:
    cfg = presets.tiny() if smoke else presets.qwen3_omni_30b_a3b()
    thinker, talker = cfg["thinker_config"]["text_config"], cfg["talker_config"]["text_config"]
    c2w = cfg["code2wav_config"]
    return {
        "thinker": dict(E=thinker["num_experts"], K=thinker["num_experts_per_tok"], H=thinker["hidden_size"],
                        I=thinker["moe_intermediate_size"], q_heads=thinker["num_attention_heads"],
                        kv_heads=thinker["num_key_value_heads"], D=thinker["head_dim"],
                        section=thinker["rope_parameters"]["mrope_section"], eps=thinker["rms_norm_eps"]),
        "talker": dict(E=talker["num_experts"], K=talker["num_experts_per_tok"], H=talker["hidden_size"],
                       I=talker["moe_intermediate_size"]),
        "code_predictor": dict(H=cfg["talker_config"]["code_predictor_config"]["hidden_size"],
                               I=cfg["talker_config"]["code_predictor_config"]["intermediate_size"]),
        "code2wav": dict(hidden=c2w["hidden_size"], decoder_dim=c2w["decoder_dim"], rates=c2w["upsample_rates"],
                         ratios=c2w["upsampling_ratios"]),
        "thinker_m": [1, 4, 33] if smoke else [1, 4, 8, 256, 2048],
        "talker_m": [1, 4] if smoke else [1, 4, 8, 256],
        "thinker_moe_m": [1, 4, 33] if smoke else [1, 4, 8, 256, 2048],
        "talker_moe_m": [1, 4] if smoke else [1, 4, 8, 256],
        "attn_lengths": [16, 64] if smoke else [1024, 4096, 8192],
        "attn_batches": [1, 2] if smoke else [1, 4, 8],
        "conv_batches": [1, 2] if smoke else [1, 4],
    }


def _phase(num_tokens: int) -> str:
    """Up to 8 tokens is a decode step (one new token per session), more is a prefill chunk."""
    return "decode" if num_tokens <= 8 else "prefill"


def moe_cases(env: Env, shapes: dict) -> list[Case]:
    cases = []
    for model, ms in (("thinker", shapes["thinker_moe_m"]), ("talker", shapes["talker_moe_m"])):
        s = shapes[model]
        E, K, H, I = s["E"], s["K"], s["H"], s["I"]
        holder: dict = {}

        def weights(E=E, H=H, I=I, holder=holder):  # shared by every M of this model: drawn once, lazily
            if not holder:
                holder["gate_up"] = env.randn(E, 2 * I, H, scale=H ** -0.5)
                holder["down"] = env.randn(E, H, I, scale=I ** -0.5)
            return holder["gate_up"], holder["down"]

        for m in ms:
            def make_set(i, m=m, E=E, K=K, H=H, I=I, weights=weights):
                gate_up, down = weights()
                hidden = env.randn(m, H)
                logits = env.randn(m, E)
                expert_weights, expert_ids = _route(logits, K)
                unique = int(torch.unique(expert_ids).numel())
                return ((hidden, expert_ids, expert_weights, gate_up, down),
                        moe_bytes(m, unique, H, I, K, env.elem), moe_flops(m, H, I, K))

            extras = {"torch._grouped_mm": grouped_mm_moe} if hasattr(torch, "_grouped_mm") else {}
            if m <= 8:  # the decode path's down + combine kernel, unsplit (the old one) and split, same run
                extras[f"triton:down {K} experts/program"] = _moe_decode_split(K)
                if K > 2:
                    extras["triton:down 2 experts/program"] = _moe_decode_split(2)
            cases.append(Case("moe_experts", f"{model} M={m} E={E} K={K} H={H} I={I}", make_set,
                              launch_bound=m <= 8, phase=_phase(m), min_sets=4, extras=extras))
    return cases


def _moe_decode_split(experts_per_program: int) -> Callable:
    """kernels.triton_moe.decode_split, imported at the first call (only where Triton rows run)."""
    def run(*args):
        from kernels.triton_moe import decode_split

        return decode_split(experts_per_program)(*args)
    return run


def _route(logits: torch.Tensor, top_k: int):
    from kernels.moe import route_topk_ref

    return route_topk_ref(logits, top_k, True)


def grouped_mm_moe(hidden, expert_ids, expert_weights, gate_up_proj, down_proj):
    """moe_experts from torch._grouped_mm: no host sync (offsets stay on the device), so it graph-captures.
    hidden (T, H); expert_ids/weights (T, K); gate_up_proj (E, 2I, H); down_proj (E, H, I) → (T, H)."""
    num_tokens, top_k = expert_ids.shape
    num_experts = gate_up_proj.shape[0]
    flat = expert_ids.reshape(-1)  # [T*K]
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=flat.device)
    counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))  # bincount would sync (it reads max)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)  # [E] group ends
    token_of = order // top_k
    x = hidden[token_of]  # [T*K, H] grouped by expert
    gate_up = torch._grouped_mm(x, gate_up_proj.transpose(1, 2), offs=offs)  # [T*K, 2I]
    gate, up = gate_up.chunk(2, dim=-1)
    y = torch._grouped_mm(F.silu(gate) * up, down_proj.transpose(1, 2), offs=offs)  # [T*K, H]
    y = y * expert_weights.reshape(-1)[order, None]
    return torch.zeros_like(hidden).index_add_(0, token_of, y)


def route_cases(env: Env, shapes: dict) -> list[Case]:
    s = shapes["thinker"]
    cases = []
    for m in shapes["thinker_m"]:
        def make_set(i, m=m):
            return ((env.randn(m, s["E"]), s["K"], True),
                    m * s["E"] * env.elem + m * s["K"] * (env.elem + 8), 0)

        cases.append(Case("route_topk", f"thinker M={m} E={s['E']} K={s['K']}", make_set, launch_bound=m <= 8,
                          phase=_phase(m)))
    return cases


def rope_cases(env: Env, shapes: dict) -> list[Case]:
    from kernels.rope import rope_cos_sin_ref, rope_inv_freq

    s = shapes["thinker"]
    qh, kvh, D = s["q_heads"], s["kv_heads"], s["D"]
    inv_freq = rope_inv_freq(D, 1e6)
    cases = []
    for m in shapes["thinker_m"]:
        batch, seq = (m, 1) if m <= 8 else (1, m)  # decode: one new token per row; prefill: one long row

        def make_set(i, batch=batch, seq=seq, m=m):
            q, k = env.randn(batch, seq, qh, D), env.randn(batch, seq, kvh, D)
            positions = torch.randint(0, 4096, (3, batch, seq), device=env.device)
            cos, sin = rope_cos_sin_ref(positions, inv_freq, s["section"], env.dtype)
            qw, kw = env.randn(D, scale=0.1).add_(1), env.randn(D, scale=0.1).add_(1)
            moved = env.elem * (2 * m * (qh + kvh) * D + 2 * m * D + 2 * D)  # q, k in and out; cos, sin; weights
            return (q, k, qw, kw, s["eps"], cos, sin), moved, 0

        extras = {}
        if _omni_rt_mrope_available(env):
            extras["cuda:omni_rt.mrope_qk_norm_"] = _mrope_fused(inv_freq, s["section"])
        cases.append(Case("qk_norm_rope", f"M={m} q_heads={qh} kv_heads={kvh} D={D}", make_set,
                          launch_bound=m <= 8, phase=_phase(m), extras=extras))
    return cases


def _omni_rt_mrope_available(env: Env) -> bool:
    if env.device.type != "cuda":
        return False
    try:
        dispatch.load_backend("cuda")
    except ImportError:
        return False
    return hasattr(torch.ops, "omni_rt") and hasattr(torch.ops.omni_rt, "mrope_qk_norm_")


def _mrope_fused(inv_freq: torch.Tensor, section):
    """The fused CUDA kernel, in place, computing cos/sin itself from t/h/w positions. Times the same norm +
    rotation with the cos/sin step included (so it does more than the op it sits beside)."""
    cache: dict = {}

    def run(q, k, q_norm_weight, k_norm_weight, eps, cos, sin):
        key = (q.shape[0] * q.shape[1], q.device)
        if key not in cache:
            cache[key] = (torch.randint(0, 4096, (3, key[0]), device=q.device),
                          inv_freq.to(device=q.device, dtype=torch.float32).contiguous())
        positions, freq = cache[key]
        q3, k3 = q.view(-1, *q.shape[-2:]), k.view(-1, *k.shape[-2:])
        torch.ops.omni_rt.mrope_qk_norm_(q3, k3, q_norm_weight, k_norm_weight, positions, freq,
                                         [int(x) for x in section], float(eps))
        return q, k

    run.no_check = True  # different positions than the reference's cos/sin: timing only
    return run


def attention_cases(env: Env, shapes: dict) -> list[Case]:
    s = shapes["thinker"]
    qh, kvh, D = s["q_heads"], s["kv_heads"], s["D"]
    cases = []
    for length in shapes["attn_lengths"]:
        for batch in shapes["attn_batches"]:
            def make_set(i, length=length, batch=batch):
                k_cache, v_cache = env.randn(batch, length, kvh, D), env.randn(batch, length, kvh, D)
                q = env.randn(batch, 1, qh, D)
                slot_ids = torch.randperm(batch, device=env.device)
                lengths = torch.full((batch,), length, dtype=torch.int64, device=env.device)
                return ((q, k_cache, v_cache, slot_ids, lengths, D ** -0.5),
                        decode_attention_bytes([length] * batch, qh, kvh, D, 1, env.elem),
                        decode_attention_flops([length] * batch, qh, D, 1))

            cases.append(Case("decode_attention", f"B={batch} len={length} q_heads={qh} kv_heads={kvh} D={D}",
                              make_set, launch_bound=True))
    return cases


def code2wav_conv_shapes(c2w: dict) -> tuple[list[tuple], list[tuple]]:
    """Per-frame (80 ms) streaming conv shapes of Code2Wav (runtime/models/code2wav.py):
    conv1d: (name, C_in, C_out, K, dilation, groups, L); transposed: (name, C_in, C_out, k, s, L)."""
    hidden, dims = c2w["hidden"], [c2w["decoder_dim"] // 2 ** i for i in range(len(c2w["rates"]) + 1)]
    conv, trans = [], []
    length = 1
    for i, ratio in enumerate(c2w["ratios"]):
        trans.append((f"upsample.{i} convT", hidden, hidden, ratio, ratio, length))
        length *= ratio
        conv.append((f"upsample.{i} dwconv", hidden, hidden, 7, 1, hidden, length))
    conv.append(("decoder.0 conv", hidden, dims[0], 7, 1, 1, length))
    for i, rate in enumerate(c2w["rates"]):
        trans.append((f"decoder.{i + 1} convT", dims[i], dims[i + 1], 2 * rate, rate, length))
        length *= rate
        conv.append((f"decoder.{i + 1} res d=9", dims[i + 1], dims[i + 1], 7, 9, 1, length))
    conv.append(("decoder.out conv", dims[-1], 1, 7, 1, 1, length))
    return conv, trans


def conv_cases(env: Env, shapes: dict) -> list[Case]:
    conv, trans = code2wav_conv_shapes(shapes["code2wav"])
    cases = []
    for batch in shapes["conv_batches"]:
        for name, c_in, c_out, taps, dilation, groups, length in conv:
            state_len = (taps - 1) * dilation

            def make_set(i, c_in=c_in, c_out=c_out, taps=taps, dilation=dilation, groups=groups, length=length,
                         state_len=state_len, batch=batch):
                x = env.randn(batch, c_in, length)
                pool = env.randn(batch, c_in, state_len)
                weight = env.randn(c_out, c_in // groups, taps, scale=(c_in // groups * taps) ** -0.5)
                bias = env.randn(c_out, scale=0.1)
                slot_ids = torch.randperm(batch, device=env.device)
                return ((x, pool, weight, bias, dilation, groups, slot_ids),
                        conv1d_update_bytes(batch, c_in, c_out, taps, dilation, groups, length, env.elem),
                        conv1d_update_flops(batch, c_in, c_out, taps, groups, length))

            cases.append(Case("causal_conv1d_update", f"{name} B={batch} C={c_in}->{c_out} K={taps} d={dilation} "
                              f"g={groups} L={length}", make_set, launch_bound=True, mutable=(1,)))
        for name, c_in, c_out, k, stride, length in trans:
            def make_set(i, c_in=c_in, c_out=c_out, k=k, stride=stride, length=length, batch=batch):
                x = env.randn(batch, c_in, length)
                tail = env.randn(batch, c_out, k - stride)
                weight = env.randn(c_in, c_out, k, scale=(c_in * k // stride) ** -0.5)
                bias = env.randn(c_out, scale=0.1)
                slot_ids = torch.randperm(batch, device=env.device)
                n_out = length * stride
                moved = env.elem * (batch * c_in * length + 2 * batch * c_out * (k - stride) + c_in * c_out * k
                                    + c_out + batch * c_out * n_out) + 8 * batch
                return ((x, tail, weight, bias, stride, 1000, slot_ids), moved, 2 * batch * c_in * c_out * k * length)

            cases.append(Case("causal_conv_transpose1d_update", f"{name} B={batch} C={c_in}->{c_out} k={k} "
                              f"s={stride} L={length}", make_set, launch_bound=True, mutable=(1,)))
    return cases


def rms_norm_cases(env: Env, shapes: dict) -> list[Case]:
    H = shapes["thinker"]["H"]
    cases = []
    for m in shapes["thinker_m"]:
        def make_set(i, m=m):
            return ((env.randn(m, H), env.randn(H, scale=0.1).add_(1), shapes["thinker"]["eps"]),
                    env.elem * (2 * m * H + H), 0)

        cases.append(Case("rms_norm", f"M={m} H={H}", make_set, launch_bound=m <= 8, phase=_phase(m)))
    return cases


def norm_linear_cases(env: Env, shapes: dict) -> list[Case]:
    s, cp = shapes["thinker"], shapes["code_predictor"]
    qkv = (s["q_heads"] + 2 * s["kv_heads"]) * s["D"]
    plans = [("add_rms_norm_linear", "thinker q|k|v", s["H"], qkv, m) for m in shapes["thinker_m"]]
    plans += [("add_rms_norm_swiglu", "code predictor gate|up", cp["H"], 2 * cp["I"], m) for m in (1, 4, 8)]
    cases = []
    for op, what, K, N, m in plans:
        out_cols = N // 2 if op == "add_rms_norm_swiglu" else N

        def make_set(i, K=K, N=N, m=m, out_cols=out_cols):
            args = (env.randn(m, K), env.randn(m, K), env.randn(K, scale=0.1).add_(1), s["eps"],
                    env.randn(N, K, scale=K ** -0.5))
            moved = env.elem * (N * K + K + 3 * m * K + m * out_cols)  # weights; x, residual in, new residual; out
            return args, moved, 2 * m * N * K

        cases.append(Case(op, f"{what} M={m} K={K} N={N}", make_set, launch_bound=m <= 8, phase=_phase(m)))
    return cases


BUILDERS = {"moe_experts": moe_cases, "route_topk": route_cases, "qk_norm_rope": rope_cases,
            "decode_attention": attention_cases, "causal_conv1d_update": conv_cases,
            "causal_conv_transpose1d_update": conv_cases, "rms_norm": rms_norm_cases,
            "add_rms_norm_linear": norm_linear_cases, "add_rms_norm_swiglu": norm_linear_cases}


PHASES = ("decode", "prefill")


def parse_selectors(text: str | None) -> list[tuple[str, str | None]] | None:
    """"moe_experts:decode,rms_norm" -> [("moe_experts", "decode"), ("rms_norm", None)]; None stays None."""
    if not text:
        return None
    selectors = []
    for item in text.split(","):
        op, _, phase = item.strip().partition(":")
        if op not in BUILDERS:
            raise ValueError(f"unknown op {op!r}; known: {', '.join(BUILDERS)}")
        if phase and phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r} in {item!r}; known: {', '.join(PHASES)}")
        selectors.append((op, phase or None))
    return selectors


def _matches(case: Case, selectors) -> bool:
    return any(case.op == op and phase in (None, case.phase) for op, phase in selectors)


def build_cases(env: Env, ops: list | None, overrides: dict | None = None, skip: list | None = None) -> list[Case]:
    """Every case of the selected ops, less the skipped ones; `ops`/`skip` items are op names or (op, phase)
    selectors (parse_selectors). `overrides` replaces entries of the shape table (e.g. thinker_moe_m)."""
    shapes = {**_shapes(env.smoke), **(overrides or {})}
    cases, seen = [], set()
    for op, builder in BUILDERS.items():
        if builder in seen:
            continue
        seen.add(builder)
        cases += builder(env, shapes)
    include = None if ops is None else [o if isinstance(o, tuple) else (o, None) for o in ops]
    exclude = [o if isinstance(o, tuple) else (o, None) for o in skip or []]
    return [c for c in cases if (include is None or _matches(c, include)) and not _matches(c, exclude)]


# ------------------------------------------------------------------------------------------------- run


def implementations(case: Case, allowed: list[str] | None) -> list[tuple[str, Callable]]:
    """(name, fn) for every backend of the op (torch first: it is the reference), then the extras."""
    try:
        names = dispatch.backends(case.op)
    except Exception as exc:  # a backend module being written may not import yet: bench what did register
        print(f"  note: listing backends of {case.op} failed ({type(exc).__name__}: {exc}); using those registered",
              flush=True)
        names = sorted(dispatch._IMPLS[case.op])
    ordered = ["torch"] + [b for b in names if b != "torch"]
    impls = [(b, dispatch._IMPLS[case.op][b]) for b in ordered if allowed is None or b in allowed]
    impls += [(name, fn) for name, fn in case.extras.items()
              if allowed is None or name.split(":")[0].split(".")[0] in allowed or name in allowed]
    return impls


def _clone_mutable(args: tuple, mutable: tuple[int, ...]) -> tuple:
    return tuple(a.clone() if i in mutable and isinstance(a, torch.Tensor) else a for i, a in enumerate(args))


def run_case(case: Case, env: Env, ceilings: dict, allowed: list[str] | None, graphs: bool,
             warmup_ms: float, rep_ms: float, min_reps: int = 10) -> list[dict]:
    first_args, first_bytes, first_flops = case.make_set(0)
    per_set = first_bytes
    n_sets = max(common.num_input_sets(per_set, env.device), case.min_sets if env.device.type == "cuda" else 1)
    sets = [(first_args, first_bytes, first_flops)] + [case.make_set(i) for i in range(1, n_sets)]
    # Rotation that cannot cover twice the L2 cache: eager calls run after an L2 flush instead (graph replays
    # keep the rotation only, and the JSON says so).
    flush = env.device.type == "cuda" and sum(s[1] for s in sets) < 2 * common.l2_bytes(env.device)
    bytes_moved = sum(s[1] for s in sets) / len(sets)
    flops = sum(s[2] for s in sets) / len(sets)
    impls = implementations(case, allowed)
    # The timed calls update the mutable arguments of the first set in place: every correctness check starts
    # from this untouched copy instead.
    pristine = _clone_mutable(first_args, case.mutable)
    reference = _clone_mutable(pristine, case.mutable)
    ref_out = dispatch._IMPLS[case.op]["torch"](*reference)
    rows, ref_us, ref_eager_us = [], None, None
    for backend, fn in impls:
        extra = {"sets": n_sets, "l2": "flushed" if flush else "rotated"}
        try:
            if not getattr(fn, "no_check", False):
                checked = _clone_mutable(pristine, case.mutable)
                extra["err"] = max([common.rel_err(fn(*checked), ref_out)] +
                                   [common.rel_err(checked[i], reference[i]) for i in case.mutable])
            calls = [lambda fn=fn, args=args: fn(*args) for args, _, _ in sets]
            timing = common.time_calls(calls, env.device, warmup_ms=warmup_ms, rep_ms=rep_ms, min_reps=min_reps,
                                       flush_l2=flush)
            if graphs and case.launch_bound and env.device.type == "cuda":
                if common.syncs_host(calls[0], env.device):
                    extra["graph"] = "not capturable: syncs with the host"
                else:
                    try:
                        graph_timing = common.time_calls(calls, env.device, warmup_ms=warmup_ms, rep_ms=rep_ms,
                                                         graph=True)
                        extra["eager_us"] = timing["median_us"]
                        extra["l2"] = "rotated" if not flush else "warm across the rotated sets (graph replay)"
                        timing = graph_timing
                    except Exception as exc:  # capture failed: keep the eager number, say why
                        extra["graph"] = f"capture failed: {type(exc).__name__}: {str(exc)[:200]}"
                        torch.cuda.synchronize(env.device)
            eager_us = extra.get("eager_us", timing["median_us"])
            if backend == "torch":
                ref_us, ref_eager_us = timing["median_us"], eager_us
            if ref_eager_us:
                extra["vs_ref_eager"] = ref_eager_us / eager_us  # both eager: the like-for-like ratio
            rows.append(common.make_row(case.op, case.name, backend, timing, bytes_moved, flops, ceilings,
                                        ref_us=ref_us, smoke=env.smoke, **extra))
        except Exception as exc:  # a backend being written right now may not run yet: a FAILED row, not a crash
            rows.append(common.make_row(case.op, case.name, backend, None, bytes_moved, flops, ceilings,
                                        smoke=env.smoke, error=f"{type(exc).__name__}: {str(exc)[:300]}", **extra))
            if env.device.type == "cuda":
                torch.cuda.synchronize(env.device)
    del sets, pristine, reference, ref_out
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, fp32, tiny shapes, torch only (checks the script)")
    parser.add_argument("--ops", default=None, help=f"comma list of op or op:phase (phase: decode, prefill; "
                                                    f"default all: {', '.join(BUILDERS)})")
    parser.add_argument("--skip-ops", default=None, help="comma list of op or op:phase to leave out")
    parser.add_argument("--backends", default=None,
                        help="comma list of backends/extras to run (default: all on GPU, torch and CPU-capable "
                             "extras in --smoke); the torch reference always runs for the ratio")
    parser.add_argument("--out", default=None, help="results directory (default bench/results)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--no-graphs", action="store_true", help="eager timings only")
    parser.add_argument("--warmup-ms", type=float, default=None)
    parser.add_argument("--rep-ms", type=float, default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.device, args.dtype = "cpu", "float32"
        args.backends = args.backends or "torch,torch._grouped_mm"
        if "triton" in args.backends.split(","):  # on the CPU Triton runs only under its interpreter
            os.environ.setdefault("TRITON_INTERPRET", "1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench/kernels.py: no CUDA GPU here; absolute times come only from a GPU. "
              "Run `python bench/kernels.py --smoke` to check the script on the CPU.", file=sys.stderr)
        return 2
    smoke = args.smoke or device.type != "cuda"
    torch.manual_seed(0)
    env = Env(device, getattr(torch, args.dtype), smoke)
    warmup_ms = args.warmup_ms if args.warmup_ms is not None else (2.0 if smoke else 25.0)
    rep_ms = args.rep_ms if args.rep_ms is not None else (10.0 if smoke else 100.0)
    try:
        ops, skip = parse_selectors(args.ops), parse_selectors(args.skip_ops)
    except ValueError as exc:
        parser.error(str(exc))
    allowed = args.backends.split(",") if args.backends else None
    if allowed is not None and "torch" not in allowed:
        allowed.append("torch")

    info = common.device_info(device, smoke)
    print(f"# kernel benchmarks on {info['device']} ({args.dtype})"
          + (f" -- {common.SMOKE_LABEL}" if smoke else ""), flush=True)
    ceilings = common.measure_ceilings(device, smoke)
    cases = build_cases(env, ops, skip=skip)
    path = common.results_path("kernels", info, args.out, smoke)
    uncovered = sorted(set(dispatch._IMPLS) - set(BUILDERS))
    run_args = {k: v for k, v in vars(args).items()}

    def save(rows: list[dict], done: int) -> None:  # after every case: a stopped run keeps what it measured
        common.write_results("kernels", info, ceilings, rows, path=path, smoke=smoke, args=run_args,
                             ops_without_cases=uncovered, complete=done == len(cases), cases_done=done,
                             cases_total=len(cases))

    rows = []
    save(rows, 0)
    for number, case in enumerate(cases, 1):
        try:
            case_rows = run_case(case, env, ceilings, allowed, not args.no_graphs, warmup_ms, rep_ms,
                                 min_reps=3 if smoke else 10)
        except Exception as exc:  # the inputs or the reference itself failed (e.g. out of memory)
            case_rows = [common.make_row(case.op, case.name, "torch", None, 0, 0, ceilings, smoke=smoke,
                                         error=f"case setup/reference: {type(exc).__name__}: {str(exc)[:300]}")]
            if device.type == "cuda":
                torch.cuda.empty_cache()
        for row in case_rows:
            status = row.get("error") or f"{row['us']:.2f} µs ({row['mode']})"
            print(f"  {row['op']:<32} {row['case']:<48} {row['backend']:<28} {status}", flush=True)
        rows += case_rows
        save(rows, number)
    if uncovered:
        print(f"  note: dispatch ops without a benchmark case here: {', '.join(uncovered)}", flush=True)
    print(f"wrote {path}")
    print()
    common.print_table(rows, ceilings, info, smoke)
    return 0


if __name__ == "__main__":
    sys.exit(main())
