"""The Triton kernels as `torch.library` ops (namespace omni_rt_triton): schemas, `opcheck`, fake tensors, and
the launch counts of kernels/launch_counts.py.

- `opcheck` on every op with small fp32 inputs (on a CPU, Triton's interpreter runs the real implementations).
- Every op runs under FakeTensorMode on fake `cuda` tensors at the real Qwen3-Omni-30B-A3B shapes, without a GPU:
  `torch.empty(..., device="cuda")` inside `FakeTensorMode(allow_non_fake_inputs=False)` makes a FakeTensor on
  cuda:0 with no GPU and no memory (torch 2.13 CPU build: checked here); nothing may compile or launch a Triton
  kernel or query the GPU meanwhile (both patched to raise). Python indexing of a fake cuda tensor (`t[:, :n]`,
  `t[0]`) raises "PyTorch is not linked with support for cuda devices" on that build; `split`, `narrow`, `view`
  and the ops themselves work.
- The same on meta tensors (the ops' fake implementations serve the Meta key too).
- A TorchDispatchMode sees each op as one `omni_rt_triton::<op>` call, and `LAUNCHES[name](args, kwargs)` equals
  the Triton launches the real implementation makes (counted at the kernel objects' grid subscription).
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from kernels.launch_counts import LAUNCHES, NAMESPACE, SCHEMA_ARGS

triton = pytest.importorskip("triton", reason="triton not installed")

from kernels import (triton_attention, triton_conv, triton_moe, triton_rope,  # noqa: E402  (after the skip)
                     triton_router, triton_snake, triton_apply_rope, triton_linear, triton_norm_rope_attention)

OPS = tuple(SCHEMA_ARGS)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: Triton's interpreter (tests/conftest.py)


def _op(name: str):
    return getattr(getattr(torch.ops, NAMESPACE), name).default


def _empty(*shape, device="cuda", dtype=torch.float32):
    return torch.empty(*shape, device=device, dtype=dtype)


# ------------------------------------------------------------------------------------------------ cases
# name -> (public function, [(op args, expected Triton launches)]); built by a function of `new` (tensor
# maker), `ids` (int tensor maker) and `counters` (zeroed int32 split counters of a given size).
def small_cases(new, ids, counters):
    section = [2, 3, 3]
    q, k = new(3, 4, 16), new(3, 2, 16)
    w16 = new(16)
    x_dense, w_dense = new(2, 4, 5), new(6, 2, 3)  # groups 2
    x_dw, w_dw = new(2, 4, 5), new(4, 1, 3)  # depthwise
    x_t, w_t = new(2, 4, 3), new(4, 3, 5)  # stride 2, k 5: trim 3
    slots = ids([2, -1])
    # decode_norm_rope_attention: 2 rows (one padded) x 2 new tokens, 4 q / 2 kv heads of 16, 3 slots (2: scratch)
    fused_attn = (new(2, 2, 4, 16), new(2, 2, 2, 16), new(2, 2, 2, 16), w16, w16, 1e-6, new(2, 2, 16), new(2, 2, 16),
                  new(3, 20, 2, 16), new(3, 20, 2, 16), ids([[1, 1], [2, 2]]), ids([[5, 6], [0, 1]]), ids([1, -1]),
                  ids([7, 2]))
    return {
        "rms_norm": [((new(5, 24), new(24), 1e-6), 1), ((new(0, 24), new(24), 1e-6), 0)],
        "add_rms_norm": [((new(5, 24), new(5, 24), new(24), 1e-6), 1), ((new(0, 24), new(0, 24), new(24), 1e-6), 0)],
        "add_rms_norm_linear": [((new(5, 24), new(5, 24), new(24), 1e-6, new(7, 24)), 1),
                                ((new(17, 24), None, new(24), 1e-6, new(7, 24)), 1),
                                ((new(0, 24), new(0, 24), new(24), 1e-6, new(7, 24)), 0)],
        "add_rms_norm_swiglu": [((new(5, 24), new(5, 24), new(24), 1e-6, new(14, 24)), 1),
                                ((new(3, 24), None, new(24), 1e-6, new(14, 24)), 1)],
        "linear_swiglu": [((new(5, 24), new(14, 24)), 1), ((new(0, 24), new(14, 24)), 0)],
        "linear_gated_add": [((new(5, 7), new(24, 7), new(5, 20), new(1, 20), new(5, 24)), 1),
                             ((new(0, 7), new(24, 7), new(0, 20), new(1, 20), new(0, 24)), 0)],
        "qk_norm_rope": [((q, k, w16, w16, 1e-6, new(3, 16), new(3, 16)), 1)],
        "qk_norm_rope_cache_write": [((q, k, new(3, 2, 16), w16, w16, 1e-6, new(3, 16), new(3, 16), new(4, 5, 2, 16),
                                       new(4, 5, 2, 16), ids([[1, 3, 0]]), ids([[2, 4, 0]])), 1)],
        "mrope_qk_norm_": [((q, k, w16, w16, 1e-6, ids([[0, 1, 2]] * 3), new(8), section), 1),
                           ((q, k, w16, w16, 1e-6, ids([[5, 6, 7]]), new(8), None), 1)],
        "route_topk": [((new(5, 8), 2, True), 1)],
        "router_topk": [((new(5, 24), new(8, 24), 2, True), 1), ((new(0, 24), new(8, 24), 2, True), 0)],
        "snake_beta": [((new(2, 4, 5), new(4), new(4)), 1), ((new(2, 4, 0), new(4), new(4)), 0)],
        "apply_rope": [((new(2, 3, 4, 16), new(2, 3, 16), new(2, 3, 16)), 1), ((new(2, 3, 4, 16), new(1, 3, 16), new(1, 3, 16)), 1)],
        "moe_experts": [((new(3, 16), ids([[0, 1], [3, 2], [1, -1]]), new(3, 2), new(4, 16, 16), new(4, 16, 8)), 2),
                        ((new(10, 16), ids([[i % 4, (i + 1) % 4] for i in range(10)]), new(10, 2), new(4, 16, 16),
                          new(4, 16, 8)), 4)],
        "decode_attention": [((new(2, 2, 4, 16), new(3, 20, 2, 16), new(3, 20, 2, 16), ids([1, -1]), ids([7, 3]),
                               0.25), 1),  # the CPU interpreter: one split, no merge
                             ((new(2, 2, 4, 16), new(3, 20, 2, 16), new(3, 20, 2, 16), ids([1, -1]), ids([7, 3]),
                               0.25, counters(64)), 1)],
        "decode_norm_rope_attention": [((*fused_attn, 0.25), 1), ((*fused_attn, 0.25, counters(64)), 1)],
        "causal_conv1d": [((x_dense, w_dense, new(6), 2, 2), 1), ((x_dw, w_dw, None, 1, 4), 1)],
        "causal_conv1d_update": [((x_dense, new(3, 4, 4), w_dense, new(6), 2, 2, slots), 2),
                                 ((x_dw, new(2, 4, 2), w_dw, None, 1, 4, None), 2),
                                 ((new(2, 4, 0), new(2, 4, 2), w_dw, None, 1, 4, None), 0)],
        "causal_conv_transpose1d": [((x_t, w_t, new(3), 2), 1)],
        "causal_conv_transpose1d_update": [((x_t, new(3, 3, 3), w_t, new(3), 2, 0, slots), 2),
                                           ((new(2, 4, 1), new(2, 3, 3), w_t, None, 2, 0, None), 1),
                                           ((x_t, new(2, 3, 3), w_t, None, 2, 5, None), 2)],
    }


def real_cases():
    """Small fp32 cases on DEVICE, fixed seed."""
    gen = torch.Generator().manual_seed(1234)

    def new(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE)

    def ids(values):
        return torch.tensor(values, dtype=torch.int64, device=DEVICE)
    return small_cases(new, ids, lambda n: torch.zeros(n, dtype=torch.int32, device=DEVICE))


def test_schemas_match_the_launch_counters():
    for name in OPS:
        schema = _op(name)._schema
        assert tuple(a.name for a in schema.arguments) == SCHEMA_ARGS[name], name
        assert f"{NAMESPACE}::{name}" in LAUNCHES
    mutated = {name: [a.name for a in _op(name)._schema.arguments if a.alias_info and a.alias_info.is_write]
               for name in OPS}
    assert mutated == {**{name: [] for name in OPS}, "mrope_qk_norm_": ["q", "k"], "decode_attention": ["counters"],
                       "decode_norm_rope_attention": ["k_cache", "v_cache", "counters"],
                       "qk_norm_rope_cache_write": ["k_cache", "v_cache"],
                       "causal_conv1d_update": ["conv_state"], "causal_conv_transpose1d_update": ["tail_state"]}


# aot_dispatch_dynamic retraces with symbolic sizes; the ops' fake impls are shape arithmetic, so it runs too.
@pytest.mark.parametrize("name", OPS)
def test_opcheck(name):
    for args, _ in real_cases()[name]:
        torch.library.opcheck(_op(name), args)


class LaunchCounter:
    """Counts Triton launches (grid subscriptions of any kernel object) while active."""

    def __init__(self, monkeypatch):
        self.launches = 0
        kinds = {type(k) for k in (triton_rope._rms_norm_kernel, triton_moe._route_topk_kernel,
                                   triton_conv.conv1d_dot_kernel, triton_attention._decode_attention_split)}
        for kind in kinds:
            original = kind.__getitem__

            def counted(kernel, grid, _original=original):
                self.launches += 1
                return _original(kernel, grid)
            monkeypatch.setattr(kind, "__getitem__", counted)


@pytest.mark.parametrize("name", OPS)
def test_launch_counts_equal_the_launches(name, monkeypatch):
    counter = LaunchCounter(monkeypatch)
    for args, expected in real_cases()[name]:
        before = counter.launches
        _op(name)(*args)
        made = counter.launches - before
        assert made == expected == LAUNCHES[f"{NAMESPACE}::{name}"](args, {}), (name, made, expected)


def test_moe_count_includes_the_copy_of_strided_ids():
    args = real_cases()["moe_experts"][0][0]
    strided = (args[0], args[1].t().contiguous().t(), args[2]) + args[3:]
    assert not strided[1].is_contiguous()
    assert LAUNCHES[f"{NAMESPACE}::moe_experts"](strided, {}) == 3
    assert LAUNCHES[f"{NAMESPACE}::moe_experts"](args[:2], {"expert_weights": args[2], "gate_up_proj": args[3],
                                                            "down_proj": args[4]}) == 2  # kwargs bind by name


# ------------------------------------------------------------------------------------------- fake tensors
@pytest.fixture
def no_gpu_no_triton(monkeypatch):
    """Compiling, launching or sizing by the GPU would be a bug in a fake implementation: make each raise."""
    def refuse(*args, **kwargs):
        raise AssertionError("a fake implementation reached Triton or the GPU")
    from triton.runtime.jit import JITFunction
    from triton.runtime.interpreter import InterpretedFunction
    for kind in (JITFunction, InterpretedFunction):
        monkeypatch.setattr(kind, "__getitem__", refuse)
        monkeypatch.setattr(kind, "run", refuse, raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_properties", refuse)
    monkeypatch.setattr(torch.cuda, "get_device_name", refuse)


def _real_shape_calls(dtype=torch.bfloat16, device="cuda"):
    """(public function, args, expected (shape, dtype) of each output) at the 30B-A3B shapes: thinker (H 2048,
    E 128, K 8, I 768, 32/4 heads of 128), Code2Wav convs (decoder_dim 1536, upsample 8), on `device`."""
    def new(*shape, d=dtype):
        return _empty(*shape, device=device, dtype=d)

    def ids(*shape):
        return _empty(*shape, device=device, dtype=torch.int64)
    calls = []
    for tokens in (1, 8, 9, 512):  # both MoE paths and the boundary
        calls += [
            (triton_rope.rms_norm, (new(2, tokens, 2048), new(2048), 1e-6), [((2, tokens, 2048), dtype)]),
            (triton_rope.add_rms_norm, (new(2, tokens, 2048), new(2, tokens, 2048), new(2048), 1e-6),
             [((2, tokens, 2048), dtype)] * 2),
            (triton_linear.add_rms_norm_linear, (new(1, tokens, 2048), new(1, tokens, 2048), new(2048), 1e-6,
                                                 new(5120, 2048)),  # input_layernorm + q|k|v
             [((1, tokens, 5120), dtype), ((1, tokens, 2048), dtype)]),
            (triton_moe.route_topk, (new(tokens, 128), 8, True), [((tokens, 8), dtype), ((tokens, 8), torch.int64)]),
            (triton_router.router_topk, (new(tokens, 2048), new(128, 2048), 8, True),
             [((tokens, 8), dtype), ((tokens, 8), torch.int64)]),
            (triton_moe.moe_experts, (new(tokens, 2048), ids(tokens, 8), new(tokens, 8), new(128, 1536, 2048),
                                      new(128, 2048, 768)), [((tokens, 2048), dtype)]),
            (triton_rope.qk_norm_rope, (new(1, tokens, 32, 128), new(1, tokens, 4, 128), new(128), new(128), 1e-6,
                                        new(1, tokens, 128), new(1, tokens, 128)),
             [((1, tokens, 32, 128), dtype), ((1, tokens, 4, 128), dtype)]),
            (triton_attention.decode_attention, (new(8, tokens, 32, 128), new(8, 8192, 4, 128), new(8, 8192, 4, 128),
                                                 ids(8), ids(8), 128 ** -0.5), [((8, tokens, 32, 128), dtype)]),
        ]
    # thinker decode at batch 8 over the cache's split counters: several splits merged in the one launch
    calls.append((triton_attention.decode_attention, (new(8, 1, 32, 128), new(9, 8192, 4, 128), new(9, 8192, 4, 128),
                                                      ids(8), ids(8), 128 ** -0.5, new(2048, d=torch.int32)),
                  [((8, 1, 32, 128), dtype)]))
    # the same step from the raw q|k|v projection (views of one fused output), norm + rotary + cache write fused in
    q, k, v = new(8, 1, 40 * 128).split([4096, 512, 512], dim=-1)
    calls.append((triton_norm_rope_attention.decode_norm_rope_attention,
                  (q.view(8, 1, 32, 128), k.view(8, 1, 4, 128), v.view(8, 1, 4, 128), new(128), new(128), 1e-6,
                   new(8, 1, 128), new(8, 1, 128), new(9, 8192, 4, 128), new(9, 8192, 4, 128), ids(8, 1), ids(8, 1),
                   ids(8), ids(8), 128 ** -0.5, new(2048, d=torch.int32)), [((8, 1, 32, 128), dtype)]))
    # a fused qkv output: q and k are strided views, updated in place (split, not qkv[:, :4096]: see the docstring)
    q, k, v = new(1, 512, 40 * 128).split([4096, 512, 512], dim=-1)
    calls.append((triton_rope.qk_norm_rope_cache_write,
                  (q.view(1, 512, 32, 128), k.view(1, 512, 4, 128), v.view(1, 512, 4, 128), new(128), new(128), 1e-6,
                   new(1, 512, 128), new(1, 512, 128), new(9, 8192, 4, 128), new(9, 8192, 4, 128), ids(1, 512),
                   ids(1, 512)), [((1, 512, 32, 128), dtype)]))
    q, k, _ = new(512, 40 * 128).split([4096, 512, 512], dim=-1)
    q, k = q.view(512, 32, 128), k.view(512, 4, 128)
    calls.append((triton_rope.mrope_qk_norm_, (q, k, new(128), new(128), 1e-6, ids(3, 512),
                                               new(64, d=torch.float32), [24, 20, 20]),
                  [((512, 32, 128), dtype), ((512, 4, 128), dtype)]))
    # the code predictor's dense MLP (H 1024, I 3072), residual None as a first layer's
    calls.append((triton_linear.add_rms_norm_swiglu, (new(8, 1, 1024), None, new(1024), 1e-6, new(6144, 1024)),
                  [((8, 1, 3072), dtype), ((8, 1, 1024), dtype)]))
    # the talker's shared expert (H 1024, I 768)
    calls += [
        (triton_linear.linear_swiglu, (new(8, 1, 1024), new(1536, 1024)), [((8, 1, 768), dtype)]),
        (triton_linear.linear_gated_add, (new(8, 768), new(1024, 768), new(8, 1024), new(1, 1024), new(8, 1024)),
         [((8, 1024), dtype)]),
        (triton_snake.snake_beta, (new(4, 768, 24), new(768), new(768)), [((4, 768, 24), dtype)]),
        (triton_apply_rope.apply_rope, (new(4, 1, 32, 64), new(4, 1, 64), new(4, 1, 64)), [((4, 1, 32, 64), dtype)]),
        (triton_conv.causal_conv1d, (new(4, 1024, 50), new(1536, 1024, 7), new(1536), 1, 1), [((4, 1536, 50), dtype)]),
        (triton_conv.causal_conv1d_update, (new(4, 1536, 2), new(8, 1536, 6), new(1536, 1, 7), new(1536), 1, 1536,
                                            ids(4)), [((4, 1536, 2), dtype)]),
        (triton_conv.causal_conv_transpose1d, (new(4, 1536, 50), new(1536, 768, 16), new(768), 8),
         [((4, 768, 392), dtype)]),
        (triton_conv.causal_conv_transpose1d_update, (new(4, 1536, 3), new(8, 768, 8), new(1536, 768, 16), new(768),
                                                      8, 10, ids(4)), [((4, 768, 24), dtype)]),
    ]
    return calls


def test_every_op_runs_on_fake_cuda_tensors(no_gpu_no_triton):
    with pytest.raises(AssertionError, match="reached Triton"):  # the guard bites on a real (CPU) call
        triton_rope.rms_norm(torch.randn(2, 8), torch.randn(8), 1e-6)
    seen = set()
    with FakeTensorMode(allow_non_fake_inputs=False):
        probe = _empty(2)
        assert isinstance(probe, FakeTensor) and probe.device.type == "cuda"
        for fn, args, expected in _real_shape_calls():
            outs = fn(*args)
            outs = outs if isinstance(outs, tuple) else (outs,)
            got = [(tuple(o.shape), o.dtype) for o in outs]
            assert got == expected, (fn.__name__, got, expected)
            assert all(isinstance(o, FakeTensor) and o.device.type == "cuda" for o in outs), fn.__name__
            seen.add(fn.__name__)
    assert seen == set(OPS)


def test_every_op_runs_on_meta_tensors(no_gpu_no_triton):
    """The meta device (runtime/graph_audit.py's choice) runs the same fake implementations, no mode needed."""
    for fn, args, expected in _real_shape_calls(device="meta"):
        outs = fn(*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        assert [(tuple(o.shape), o.dtype) for o in outs] == expected, fn.__name__
        assert all(o.device.type == "meta" for o in outs), fn.__name__


def test_mrope_wrapper_returns_its_inputs_on_fake_tensors(no_gpu_no_triton):
    with FakeTensorMode(allow_non_fake_inputs=False):
        fn, args, _ = next(c for c in _real_shape_calls() if c[0] is triton_rope.mrope_qk_norm_)
        q, k = fn(*args)
        assert q is args[0] and k is args[1]


class OpRecorder(TorchDispatchMode):
    """What a launch counter sees: each op once, with its schema arguments."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func.name(), args, kwargs or {}))
        return func(*args, **(kwargs or {}))


def test_a_dispatch_mode_sees_each_op_and_counts_its_launches(no_gpu_no_triton):
    # decode_attention at 512 tokens fills the GPU with query-row blocks: one key split, no merge kernel; with
    # counters the splits merge in-kernel
    expected = {"moe_experts": [2, 2, 4, 4], "decode_attention": [2, 2, 2, 1, 1], "rms_norm": [1] * 4,
                "add_rms_norm": [1] * 4, "add_rms_norm_linear": [1] * 4, "add_rms_norm_swiglu": [1],
                "linear_swiglu": [1], "linear_gated_add": [1],
                "qk_norm_rope_cache_write": [1], "decode_norm_rope_attention": [1],
                "snake_beta": [1], "apply_rope": [1],
                "route_topk": [1] * 4, "router_topk": [1] * 4, "qk_norm_rope": [1] * 4, "mrope_qk_norm_": [1], "causal_conv1d": [1],
                "causal_conv1d_update": [2], "causal_conv_transpose1d": [1], "causal_conv_transpose1d_update": [2]}
    with FakeTensorMode(allow_non_fake_inputs=False):
        calls = _real_shape_calls()
        with OpRecorder() as recorder:
            for fn, args, _ in calls:
                fn(*args)
    counts = {}
    for name, args, kwargs in recorder.calls:
        if name.startswith(f"{NAMESPACE}::"):
            counts.setdefault(name.removeprefix(f"{NAMESPACE}::"), []).append(LAUNCHES[name](args, kwargs))
    assert counts == expected
