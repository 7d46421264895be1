"""csrc/: the CUDA kernels compile for sm_90, the torch-free C++ example builds, the pybind11 module imports;
on a GPU each op equals its torch twin (eager, padded slots, awkward shapes, CUDA-graph replay, opcheck).

One CMake build per session (module fixture) in a temp dir, from the sources as they are.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels.moe import moe_align_max_padded, moe_align_ref

ROOT = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc") or next((p for p in ["/usr/local/cuda/bin/nvcc"] if os.path.exists(p)), None)
CMAKE = shutil.which("cmake")
HAS_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def assert_close(out: torch.Tensor, ref: torch.Tensor, what: str = "") -> None:
    """Relative error ‖out−ref‖/‖ref‖ within the dtype's tolerance; the message carries the max abs diff."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, f"{what}: {out.shape} {out.dtype} vs {ref.shape} {ref.dtype}"
    if ref.numel() == 0:
        return
    diff = out.double() - ref.double()
    assert not torch.isnan(out).any(), f"{what}: NaN in the output"
    rel = (diff.norm() / ref.double().norm().clamp_min(1e-30)).item()
    assert rel <= TOLERANCE[ref.dtype], f"{what}: rel err {rel:.2e} (max abs diff {diff.abs().max().item():.3e})"


# --------------------------------------------------------------------------------------------- the build


@pytest.fixture(scope="module")
def cmake_build(tmp_path_factory):
    """Configure + build every target of CMakeLists.txt (core library, pybind11 module, C++ example) once."""
    if NVCC is None:
        pytest.skip("nvcc not found: the CUDA sources cannot be compiled on this machine")
    if CMAKE is None:
        pytest.skip("cmake not found: the CUDA build cannot run on this machine")
    build = tmp_path_factory.mktemp("omni_rt_cmake")
    configure = subprocess.run(
        [CMAKE, "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_CUDA_COMPILER={NVCC}",
         "-DCMAKE_CUDA_ARCHITECTURES=90", f"-DPython_EXECUTABLE={sys.executable}"],
        capture_output=True, text=True)
    assert configure.returncode == 0, f"cmake configure failed:\n{configure.stdout[-6000:]}\n{configure.stderr[-6000:]}"
    result = subprocess.run([CMAKE, "--build", str(build), "-j", str(os.cpu_count() or 1)],
                            capture_output=True, text=True)
    return build, result


def test_every_cuda_source_compiles_for_sm90(cmake_build):
    build, result = cmake_build
    assert result.returncode == 0, f"CUDA build failed:\n{result.stdout[-8000:]}\n{result.stderr[-8000:]}"
    sources = sorted((ROOT / "csrc").glob("*.cu"))
    assert sources, "csrc/ has no .cu sources"
    objects = {p.name for p in build.rglob("*.cu.o")}
    missing = [s.name for s in sources if f"{s.name}.o" not in objects]
    assert not missing, f"not compiled: {missing}"
    library = next(build.rglob("libomni_rt_kernels.a"))
    cuobjdump = Path(NVCC).resolve().parent / "cuobjdump"
    if cuobjdump.exists():
        listing = subprocess.run([str(cuobjdump), "--list-elf", str(library)], capture_output=True, text=True)
        assert listing.returncode == 0, listing.stderr
        assert "sm_90" in listing.stdout, f"no sm_90 code in {library.name}:\n{listing.stdout}"


def test_cpp_example_links_the_core_library_alone(cmake_build):
    build, result = cmake_build
    assert result.returncode == 0, "the CUDA build failed (see test_every_cuda_source_compiles_for_sm90)"
    example = build / "route_topk_example"
    assert example.exists(), "route_topk_example was not built"
    linked = subprocess.run(["ldd", str(example)], capture_output=True, text=True).stdout
    assert "torch" not in linked and "python" not in linked, linked
    run = subprocess.run([str(example)], capture_output=True, text=True, timeout=60)
    if HAS_GPU:
        assert run.returncode == 0, run.stderr
        assert "token 3:" in run.stdout
    else:  # no GPU: it reports what is missing instead of crashing
        assert run.returncode == 2 and "needs a CUDA GPU" in run.stderr, (run.returncode, run.stderr)


def _load_built_module(build: Path):
    so = next(build.glob("omni_rt_cuda*.so"))
    spec = importlib.util.spec_from_file_location("omni_rt_cuda", so)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pybind11_module_imports(cmake_build):
    build, result = cmake_build
    assert result.returncode == 0, "the CUDA build failed (see test_every_cuda_source_compiles_for_sm90)"
    module = _load_built_module(build)
    for name in ("route_topk", "moe_align", "moe_align_max_padded", "mrope_qk_norm", "causal_conv1d_update"):
        assert callable(getattr(module, name)), name
    count, code, message = module.device_count()
    assert (count > 0) == HAS_GPU, (count, code, message)
    assert module.moe_align_max_padded(16, 8, 4) == 40  # round_up(16 + 8*3, 4)


def test_cuda_ops_import_says_what_is_missing():
    if HAS_GPU and importlib.util.find_spec("runtime.omni_rt_cuda") is not None:
        pytest.skip("this machine has both the extension and a GPU: nothing is missing")
    with pytest.raises(ImportError, match="needs a CUDA GPU|without the CUDA extension"):
        importlib.import_module("runtime.cuda_ops")
    from runtime import dispatch
    assert "cuda" not in dispatch.backends("route_topk")  # a missing backend lists nothing, raises nothing


_STUB_SCRIPT = r"""
import sys, types, torch
stub = types.ModuleType("omni_rt_cuda")  # the extension's Python surface, nothing behind it
stub.FLOAT32, stub.FLOAT16, stub.BFLOAT16 = 0, 1, 2
stub.device_count = lambda: (0, 35, "no driver")
sys.modules["runtime.omni_rt_cuda"] = stub
import runtime
runtime.omni_rt_cuda = stub
torch.cuda.is_available = lambda: True
from runtime import dispatch
def rope_ref(q, k, q_norm_weight, k_norm_weight, positions, inv_freq, mrope_section, eps):
    pass
if "mrope_qk_norm_" not in dispatch._IMPLS:
    dispatch._IMPLS["mrope_qk_norm_"] = {"torch": rope_ref}
import runtime.cuda_ops as ops
from kernels.moe import moe_align_max_padded, moe_align_ref
schemas = {n: str(getattr(torch.ops.omni_rt, n).default._schema)
           for n in ("route_topk", "moe_align", "mrope_qk_norm_", "causal_conv1d_update")}
assert "Tensor(a0!) q, Tensor(a1!) k, Tensor q_norm_weight" in schemas["mrope_qk_norm_"], schemas
assert "Tensor(a1!) conv_state, Tensor weight, Tensor? bias" in schemas["causal_conv1d_update"], schemas
assert "!" not in schemas["route_topk"] + schemas["moe_align"], schemas
from torch._subclasses.fake_tensor import FakeTensorMode
with FakeTensorMode():
    w, i = torch.ops.omni_rt.route_topk(torch.empty(5, 64, device="cuda", dtype=torch.bfloat16), 4, True)
    assert w.shape == (5, 4) and w.dtype == torch.bfloat16 and i.dtype == torch.int64
    s, e, n = torch.ops.omni_rt.moe_align(torch.empty(5, 4, dtype=torch.int64, device="cuda"), 64, 16)
    assert s.shape == (moe_align_max_padded(20, 64, 16),) and e.shape == (s.shape[0] // 16,) and n.shape == (1,)
    out = torch.ops.omni_rt.causal_conv1d_update(torch.empty(2, 8, 3, device="cuda"), torch.empty(3, 8, 3, device="cuda"),
                                                 torch.empty(8, 1, 4, device="cuda"), None, 1, 8, None)
    assert out.shape == (2, 8, 3)
for op in ("route_topk", "causal_conv1d_update", "mrope_qk_norm_"):
    assert "cuda" in dispatch.backends(op), op
# the moe_align twin's contract, on CPU
ids = torch.stack([torch.randperm(61)[:4] for _ in range(37)])
ids[1] = -1
sorted_ids, expert_ids, num_post_pad = moe_align_ref(ids, 61, 7)
flat = ids.reshape(-1)
total = int(num_post_pad)
assert total % 7 == 0 and sorted_ids.numel() == moe_align_max_padded(148, 61, 7)
assert (expert_ids[total // 7:] == -1).all() and (sorted_ids[total:] == 148).all()
for b in range(total // 7):
    rows = sorted_ids[b * 7:(b + 1) * 7]
    rows = rows[rows < 148].long()
    assert (flat[rows] == expert_ids[b]).all() and (rows.diff() > 0).all()
assert sorted((sorted_ids[sorted_ids < 148]).tolist()) == (flat >= 0).nonzero().reshape(-1).tolist()
print("stub ok")
"""


def test_cuda_ops_python_layer_with_a_stub_extension():
    """Without a GPU: the op schemas (mutations declared), the fake impls, the dispatch registrations and the
    moe_align twin, by importing runtime.cuda_ops over a stub extension in a fresh interpreter."""
    run = subprocess.run([sys.executable, "-c", _STUB_SCRIPT], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0 and "stub ok" in run.stdout, run.stdout[-4000:] + run.stderr[-4000:]


# ------------------------------------------------------------------------------------- GPU run-time tests


@pytest.fixture(autouse=True)
def _no_tf32():
    """The torch twins run cuDNN/cuBLAS in fp32: TF32 would make the oracle the less precise side."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="module")
def ops(cmake_build):
    """runtime.cuda_ops over the installed extension, or over this session's build when none is installed."""
    if not HAS_GPU:
        pytest.skip("needs a CUDA GPU")
    if importlib.util.find_spec("runtime.omni_rt_cuda") is None:
        build, result = cmake_build
        assert result.returncode == 0, "the CUDA build failed"
        sys.modules["omni_rt_cuda"] = _load_built_module(build)
    return importlib.import_module("runtime.cuda_ops")


def _distinct_logits(num_tokens: int, num_experts: int, dtype, device="cuda") -> torch.Tensor:
    """(T, E) logits without ties, exact in bf16 (k/16 for |k| <= 128), so top-k ids are unambiguous."""
    assert num_experts <= 256
    keys = torch.rand(num_tokens, num_experts, device=device).argsort(dim=-1)
    return ((keys - num_experts // 2).to(torch.float32) / 16).to(dtype)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(1, 128, 8), (129, 128, 8), (7, 61, 5), (3, 8, 8),
                                                          (0, 16, 2), (5, 256, 1)])
@pytest.mark.parametrize("norm", [True, False])
def test_route_topk_matches_ref(ops, dtype, num_tokens, num_experts, top_k, norm):
    from kernels.moe import route_topk_ref
    logits = _distinct_logits(num_tokens, num_experts, dtype)
    weights, ids = ops.route_topk_cuda(logits, top_k, norm)
    ref_weights, ref_ids = route_topk_ref(logits, top_k, norm)
    assert torch.equal(ids, ref_ids)
    assert_close(weights, ref_weights, "weights")


@needs_gpu
def test_route_topk_strided_logits(ops):
    from kernels.moe import route_topk_ref
    base = torch.randn(128, 33, device="cuda")
    logits = base.t()  # (33, 128) with strides (1, 33)
    weights, ids = torch.ops.omni_rt.route_topk(logits, 8, True)
    ref_weights, ref_ids = route_topk_ref(logits, 8, True)
    assert torch.equal(ids, ref_ids)
    assert_close(weights, ref_weights, "weights")


@needs_gpu
@pytest.mark.parametrize("num_tokens,top_k,num_experts,block_m",
                         [(1, 8, 128, 16), (129, 8, 128, 64), (37, 4, 61, 7), (0, 8, 128, 16), (2048, 8, 128, 64),
                          (5, 2, 3, 1)])
def test_moe_align_matches_twin(ops, num_tokens, top_k, num_experts, block_m):
    ids = torch.stack([torch.randperm(num_experts, device="cuda")[:top_k] for _ in range(num_tokens)]) \
        if num_tokens else torch.empty(0, top_k, dtype=torch.int64, device="cuda")
    if num_tokens > 2:
        ids[1] = -1  # a padded token: its pairs land in no block
    out = torch.ops.omni_rt.moe_align(ids, num_experts, block_m)
    ref = moe_align_ref(ids, num_experts, block_m)
    for name, o, r in zip(("sorted_ids", "expert_ids", "num_tokens_post_pad"), out, ref):
        assert torch.equal(o, r), f"{name} differs"


def _rope_inputs(num_tokens, q_heads, kv_heads, head_dim, dtype, section):
    from kernels.rope import rope_inv_freq
    width = (q_heads + 2 * kv_heads) * head_dim
    qkv = torch.randn(num_tokens, width, device="cuda", dtype=dtype)  # fused projection: q, k are strided views
    q = qkv[:, :q_heads * head_dim].view(num_tokens, q_heads, head_dim)
    k = qkv[:, q_heads * head_dim:(q_heads + kv_heads) * head_dim].view(num_tokens, kv_heads, head_dim)
    q_w = (1 + 0.1 * torch.randn(head_dim, device="cuda")).to(dtype)
    k_w = (1 + 0.1 * torch.randn(head_dim, device="cuda")).to(dtype)
    positions = torch.randint(0, 4096, (3, num_tokens), device="cuda", dtype=torch.int64)
    inv_freq = rope_inv_freq(head_dim, 1e6).cuda()
    return qkv, q, k, q_w, k_w, positions, inv_freq


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_tokens,q_heads,kv_heads,head_dim,section",
                         [(1, 32, 4, 128, [24, 20, 20]), (129, 4, 2, 128, [24, 20, 20]), (17, 3, 1, 64, [16, 8, 8]),
                          (5, 2, 2, 2, [1, 0, 0]), (3, 2, 1, 512, [128, 64, 64])])
def test_mrope_qk_norm_matches_ref(ops, dtype, num_tokens, q_heads, kv_heads, head_dim, section):
    _, q, k, q_w, k_w, positions, inv_freq = _rope_inputs(num_tokens, q_heads, kv_heads, head_dim, dtype, section)
    ref_q, ref_k = q.clone(), k.clone()
    ops.mrope_qk_norm_torch(ref_q, ref_k, q_w, k_w, positions, inv_freq, section, 1e-6)
    torch.ops.omni_rt.mrope_qk_norm_(q, k, q_w, k_w, positions, inv_freq, section, 1e-6)
    assert_close(q, ref_q, "q")
    assert_close(k, ref_k, "k")


def _conv_case(batch, c_in, c_out, taps, dilation, groups, length, pool, dtype):
    x = torch.randn(batch, c_in, length + 3, device="cuda", dtype=dtype)[..., 1:length + 1]  # strided view
    weight = torch.randn(c_out, c_in // groups, taps, device="cuda", dtype=dtype) / (taps * c_in // groups) ** 0.5
    bias = torch.randn(c_out, device="cuda", dtype=dtype)
    state = torch.randn(pool, c_in, (taps - 1) * dilation, device="cuda", dtype=dtype)
    return x, weight, bias, state


CONV_CASES = [  # batch, c_in, c_out, taps, dilation, groups, length
    (3, 16, 16, 7, 1, 16, 1),  # depthwise decode step (ConvNeXt dwconv)
    (3, 16, 16, 7, 3, 16, 5),
    (2, 8, 12, 4, 2, 1, 9),  # dense, chunk longer than the state
    (1, 6, 4, 3, 1, 2, 2),  # grouped
    (4, 5, 5, 2, 1, 5, 0),  # empty chunk
    (1, 3, 7, 1, 1, 1, 4),  # one tap: no state
]


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("padded", [False, True])
def test_causal_conv1d_update_matches_ref(ops, dtype, case, padded):
    from kernels.conv import causal_conv1d_update_ref
    batch, c_in, c_out, taps, dilation, groups, length = case
    pool = batch + 2 if padded else batch
    x, weight, bias, state = _conv_case(batch, c_in, c_out, taps, dilation, groups, length, pool, dtype)
    slot_ids = None
    if padded:
        slot_ids = torch.randperm(pool, device="cuda")[:batch]
        slot_ids[batch // 2] = -1
    ref_state = state.clone()
    ref = causal_conv1d_update_ref(x, ref_state, weight, bias, dilation, groups, slot_ids)
    out = ops.causal_conv1d_update_cuda(x, state, weight, bias, dilation, groups, slot_ids)
    assert torch.equal(state, ref_state), "state differs"
    assert_close(out, ref, "out")
    if padded:
        assert torch.equal(out[batch // 2], torch.zeros_like(out[batch // 2]))


@needs_gpu
def test_causal_conv1d_update_streams_like_the_full_conv(ops):
    from kernels.conv import causal_conv1d_ref
    x = torch.randn(2, 8, 23, device="cuda")
    weight = torch.randn(8, 1, 7, device="cuda")
    state = torch.zeros(2, 8, 6 * 2, device="cuda")
    chunks = [ops.causal_conv1d_update_cuda(x[..., a:b], state, weight, None, 2, 8)
              for a, b in ((0, 1), (1, 6), (6, 6), (6, 23))]
    assert_close(torch.cat(chunks, dim=-1), causal_conv1d_ref(x, weight, None, 2, 8), "streamed")


# ------------------------------------------------------------------- CUDA-graph capture and torch.library


def _capture(fn):
    """Warm up on a side stream, capture fn() into a graph; returns (graph, its static outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = fn()
    return graph, outs


@needs_gpu
def test_ops_replay_under_cuda_graph_into_poisoned_outputs(ops):
    from kernels.conv import causal_conv1d_update_ref
    from kernels.moe import route_topk_ref
    dtype = torch.bfloat16
    logits = _distinct_logits(33, 128, dtype)
    graph, (weights, ids) = _capture(lambda: ops.route_topk_cuda(logits, 8, True))
    logits.copy_(_distinct_logits(33, 128, dtype))
    weights.fill_(float("nan"))
    ids.fill_(-7)
    graph.replay()
    ref_weights, ref_ids = route_topk_ref(logits, 8, True)
    assert torch.equal(ids, ref_ids)
    assert_close(weights, ref_weights, "graph route_topk")

    topk_ids = ids.clone()
    graph, aligned = _capture(lambda: torch.ops.omni_rt.moe_align(topk_ids, 128, 16))
    topk_ids.copy_(torch.stack([torch.randperm(128, device="cuda")[:8] for _ in range(33)]))
    for t in aligned:
        t.fill_(-7)
    graph.replay()
    for o, r in zip(aligned, moe_align_ref(topk_ids, 128, 16)):
        assert torch.equal(o, r)

    section = [24, 20, 20]
    qkv, q, k, q_w, k_w, positions, inv_freq = _rope_inputs(9, 4, 2, 128, dtype, section)
    graph, _ = _capture(lambda: torch.ops.omni_rt.mrope_qk_norm_(q, k, q_w, k_w, positions, inv_freq, section, 1e-6))
    fresh = torch.randn_like(qkv)
    qkv.copy_(fresh)
    positions.copy_(torch.randint(0, 4096, positions.shape, device="cuda"))
    ref_q, ref_k = q.clone(), k.clone()
    ops.mrope_qk_norm_torch(ref_q, ref_k, q_w, k_w, positions, inv_freq, section, 1e-6)
    graph.replay()
    assert_close(q, ref_q, "graph q")
    assert_close(k, ref_k, "graph k")

    x, weight, bias, state = _conv_case(3, 16, 16, 7, 1, 16, 1, 5, dtype)
    slot_ids = torch.tensor([4, -1, 0], device="cuda")
    graph, out = _capture(lambda: ops.causal_conv1d_update_cuda(x, state, weight, bias, 1, 16, slot_ids))
    state.copy_(torch.randn_like(state))
    x.copy_(torch.randn_like(x))
    ref_state = state.clone()
    ref = causal_conv1d_update_ref(x, ref_state, weight, bias, 1, 16, slot_ids)
    out.fill_(float("nan"))
    graph.replay()
    assert torch.equal(state, ref_state)
    assert_close(out, ref, "graph conv")


@needs_gpu
def test_opcheck(ops):
    logits = torch.randn(5, 64, device="cuda", dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.omni_rt.route_topk.default, (logits, 4, True))
    ids = torch.stack([torch.randperm(64, device="cuda")[:4] for _ in range(5)])
    torch.library.opcheck(torch.ops.omni_rt.moe_align.default, (ids, 64, 16))
    section = [24, 20, 20]
    _, q, k, q_w, k_w, positions, inv_freq = _rope_inputs(3, 4, 2, 128, torch.float32, section)
    torch.library.opcheck(torch.ops.omni_rt.mrope_qk_norm_.default,
                          (q.contiguous(), k.contiguous(), q_w, k_w, positions, inv_freq, section, 1e-6))
    x, weight, bias, state = _conv_case(2, 8, 8, 4, 1, 8, 3, 3, torch.float32)
    torch.library.opcheck(torch.ops.omni_rt.causal_conv1d_update.default,
                          (x.contiguous(), state, weight, bias, 1, 8, torch.tensor([2, -1], device="cuda")))


@needs_gpu
def test_ops_are_listed_by_dispatch(ops):
    from runtime import dispatch
    for op in ("route_topk", "causal_conv1d_update"):
        assert "cuda" in dispatch.backends(op), op
