"""Triton decode attention over a static KV cache against its torch twin (decode_attention_ref): GQA ratios,
several new tokens per row (causal among them), lengths from 1 to the cache's end, padded rows, strided q.
CPU: Triton's interpreter (fp32 / fp16). GPU: bf16 at the real thinker shapes and CUDA-graph replay."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kernels.attention import decode_attention_ref
from kernels.triton_attention import decode_attention

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bf16, real shapes, graphs)")


def rel_err(got, want):
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


_COMPILE_HARNESS = """
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

launches = []
JITFunction.__getitem__ = lambda self, grid: lambda *args, **kwargs: launches.append((self, args, kwargs))
TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
         torch.int32: "i32"}


def arg_type(value):
    if isinstance(value, torch.Tensor):
        return "*" + TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i64" if abs(value) >= 2**31 else "i32"
    return "fp32"


SCENARIO
compiled = set()
for fn, args, kwargs in launches:
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    values = {**dict(zip(fn.arg_names, args)), **kwargs}
    signature = {n: "constexpr" if p.is_constexpr else arg_type(values[n]) for n, p in zip(fn.arg_names, fn.params)}
    constexprs = {n: values[n] for n, p in zip(fn.arg_names, fn.params) if p.is_constexpr}
    kernel = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32), options=options)
    assert kernel.asm["cubin"], fn.__name__
    compiled.add(fn.__name__)
print("compiled", len(launches), "launches of", sorted(compiled))
"""


def compile_for_sm90(scenario: str) -> str:
    """Run `scenario` (Python calling the op wrappers on CPU tensors) with every Triton launch intercepted and
    compiled for sm_90 down to a cubin instead: catches what the interpreter never checks (types that change
    across branches, unsupported ops). Returns the harness's stdout."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = _COMPILE_HARNESS.replace("SCENARIO", textwrap.dedent(scenario))
    run = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    return run.stdout


def can_compile_for_sm90() -> bool:
    import triton

    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


compiles_without_gpu = pytest.mark.skipif(torch.cuda.is_available() or not can_compile_for_sm90(),
                                          reason="a GPU runs the kernels for real / triton's ptxas not bundled")


def _case(batch, new, q_heads, kv_heads, head_dim, max_len, dtype, slots, lengths, num_slots=4):
    q = torch.randn(batch, new, q_heads, head_dim, dtype=dtype, device=DEVICE)
    k_cache = torch.randn(num_slots, max_len, kv_heads, head_dim, dtype=dtype, device=DEVICE)
    v_cache = torch.randn_like(k_cache)
    slot_ids = torch.tensor(slots, device=DEVICE)
    lengths = torch.tensor(lengths, device=DEVICE)
    return q, k_cache, v_cache, slot_ids, lengths


@pytest.mark.parametrize("batch,new,q_heads,kv_heads,head_dim,max_len,slots,lengths,dtype", [
    (1, 1, 2, 2, 16, 1, [0], [1], torch.float32),  # one key
    (3, 1, 8, 2, 16, 70, [2, -1, 0], [70, 5, 65], torch.float32),  # G = 4, a padded row, block + 1
    (2, 3, 4, 4, 24, 33, [1, 3], [3, 33], torch.float32),  # three new tokens: causal among them
    (2, 2, 8, 1, 32, 129, [3, 0], [129, 2], torch.float16),  # G = 8, odd head_dim handled by masking
    (1, 5, 6, 2, 128, 37, [1], [23], torch.float32),  # head_dim 128
    (3, 1, 3, 3, 64, 130, [0, 2, 1], [1, 65, 130], torch.float16),  # G = 1, D = 64: lengths 1, block + 1, max_len
    (2, 1, 32, 4, 128, 65, [3, -1], [65, 65], torch.float16),  # the thinker's heads, a padded row
    (2, 9, 16, 2, 32, 80, [1, 2], [80, 9], torch.float32),  # a 9-token chunk at G = 8: 72 query rows, 2 blocks
    (2, 8, 4, 2, 16, 40, [0, 1], [5, 0], torch.float32),  # front-padded chunks: 3 and 8 queries before position 0
])
def test_matches_reference(batch, new, q_heads, kv_heads, head_dim, max_len, slots, lengths, dtype):
    q, k_cache, v_cache, slot_ids, lengths = _case(batch, new, q_heads, kv_heads, head_dim, max_len, dtype, slots,
                                                   lengths)
    scale = head_dim ** -0.5
    got = decode_attention(q, k_cache, v_cache, slot_ids, lengths, scale)
    want = decode_attention_ref(q.float(), k_cache.float(), v_cache.float(), slot_ids, lengths, scale)
    assert got.dtype == dtype and got.shape == q.shape
    real = slot_ids >= 0
    assert rel_err(got[real], want[real]) <= TOL[dtype]
    assert not got[~real].any(), "a padded row must give zeros"


def test_front_padded_chunk_equals_the_unpadded_one():
    """A 5-token first chunk front-padded to 8 (a static prefill bucket): the 3 padded queries give zeros, the
    real ones what the unpadded chunk gives, in the kernel and the reference alike."""
    q, k_cache, v_cache, slot_ids, _ = _case(1, 8, 4, 2, 16, 40, torch.float32, [2], [5])
    length = torch.tensor([5], device=DEVICE)
    want = decode_attention_ref(q[:, 3:], k_cache, v_cache, slot_ids, length, 0.25)
    for fn in (decode_attention, decode_attention_ref):
        got = fn(q, k_cache, v_cache, slot_ids, length, 0.25)
        assert not got[:, :3].any()
        assert rel_err(got[:, 3:], want) <= 1e-5


def test_strided_queries_from_a_fused_projection():
    """q as a view into a fused [q | k | v] projection (non-contiguous heads)."""
    batch, new, q_heads, kv_heads, head_dim = 2, 2, 4, 2, 16
    fused = torch.randn(batch, new, (q_heads + 2 * kv_heads) * head_dim, device=DEVICE)
    q = fused[..., :q_heads * head_dim].view(batch, new, q_heads, head_dim)
    assert not q.is_contiguous()
    k_cache = torch.randn(3, 40, kv_heads, head_dim, device=DEVICE)
    v_cache = torch.randn_like(k_cache)
    slot_ids, lengths = torch.tensor([2, 0], device=DEVICE), torch.tensor([40, 9], device=DEVICE)
    got = decode_attention(q, k_cache, v_cache, slot_ids, lengths, 0.25)
    assert rel_err(got, decode_attention_ref(q, k_cache, v_cache, slot_ids, lengths, 0.25)) <= 1e-5


@pytest.mark.parametrize("config", [
    {"BLOCK_N": 16, "num_warps": 2, "min_programs": 1, "MAX_BLOCK_R": 64},  # one split: the merge only normalises
    {"BLOCK_N": 16, "num_warps": 2, "min_programs": 10_000, "MAX_BLOCK_R": 64},  # one block per split
    {"BLOCK_N": 32, "num_warps": 2, "min_programs": 8, "MAX_BLOCK_R": 16},  # query rows tiled: 3 row blocks
    {"BLOCK_N": 64, "num_warps": 4, "min_programs": 264, "MAX_BLOCK_R": 64},  # the GPU default (CPU: one split)
])
@pytest.mark.parametrize("with_counters", [False, True])
def test_split_counts(monkeypatch, config, with_counters):
    """All paths: one split (the split kernel writes the output, one launch), several with counters (the last
    split to finish merges, one launch, counters back at zero) and several without (split + merge kernels)."""
    import kernels.launch_counts as launch_counts
    from kernels.attention import split_counters
    from kernels.launch_counts import LAUNCHES

    monkeypatch.setattr(launch_counts, "launch_config", lambda op, key, dtype, default: dict(config))
    torch.manual_seed(3)
    q, k_cache, v_cache, slot_ids, lengths = _case(3, 9, 4, 2, 32, 97, torch.float32, [1, 0, -1], [97, 17, 9])
    counters = split_counters(DEVICE) if with_counters else None
    got = decode_attention(q, k_cache, v_cache, slot_ids, lengths, 0.2, counters)
    want = decode_attention_ref(q, k_cache, v_cache, slot_ids, lengths, 0.2)
    assert rel_err(got[:2], want[:2]) <= 1e-5
    assert not got[2].any()
    splits = launch_counts.decode_attention_layout(3, 9, 4, 2, 32, 97, q.dtype, on_cpu=True)["splits"]
    if config["min_programs"] in (1, 10_000):  # the paths are all covered
        assert (splits == 1) == (config["min_programs"] == 1)
    launches = LAUNCHES["omni_rt_triton::decode_attention"]((q, k_cache, v_cache, slot_ids, lengths, 0.2, counters),
                                                            {})
    assert launches == (1 if splits == 1 or with_counters else 2)
    if with_counters:
        assert not counters.any(), "the last split of each program group must reset its counter"


def test_counters_too_small_fall_back_to_the_merge_kernel(monkeypatch):
    """A counter buffer with fewer than B · row_blocks · Hkv entries is not used: two launches, same result,
    the buffer untouched."""
    import kernels.launch_counts as launch_counts
    from kernels.launch_counts import LAUNCHES

    config = {"BLOCK_N": 16, "num_warps": 2, "min_programs": 10_000, "MAX_BLOCK_R": 16}
    monkeypatch.setattr(launch_counts, "launch_config", lambda op, key, dtype, default: dict(config))
    torch.manual_seed(4)
    q, k_cache, v_cache, slot_ids, lengths = _case(2, 1, 4, 2, 16, 50, torch.float32, [1, 3], [50, 20])
    counters = torch.full((3,), 7, dtype=torch.int32, device=DEVICE)  # 2 rows x 2 KV heads need 4
    args = (q, k_cache, v_cache, slot_ids, lengths, 0.3, counters)
    assert LAUNCHES["omni_rt_triton::decode_attention"](args, {}) == 2
    got = decode_attention(*args)
    assert rel_err(got, decode_attention_ref(*args)) <= 1e-5
    assert counters.tolist() == [7, 7, 7]


def test_counters_must_be_int32():
    q, k_cache, v_cache, slot_ids, lengths = _case(1, 1, 2, 2, 16, 8, torch.float32, [0], [3])
    with pytest.raises(ValueError, match="int32"):
        decode_attention(q, k_cache, v_cache, slot_ids, lengths, 0.3, torch.zeros(8, device=DEVICE))


def test_registered():
    from runtime import dispatch

    assert "triton" in dispatch.backends("decode_attention")
    assert dispatch._IMPLS["decode_attention"]["triton"] is decode_attention


@compiles_without_gpu
def test_compiles_for_sm90():
    out = compile_for_sm90("""
        from kernels.triton_attention import decode_attention
        for dtype in (torch.bfloat16, torch.float32):  # fp16 compiles as bf16 does
            for new, q_heads in ((1, 32), (1, 2), (9, 32)):
                q = torch.randn(2, new, q_heads, 128).to(dtype)
                k_cache = torch.randn(3, 300, 2 if q_heads == 2 else 4, 128).to(dtype)
                decode_attention(q, k_cache, k_cache, torch.tensor([0, -1]), torch.tensor([5, 300]), 0.1)
        # the GPU's split count (the CPU interpreter's is one split): the merge kernel, and the in-kernel merge
        import kernels.launch_counts as launch_counts
        from kernels.attention import split_counters
        launch_counts.launch_config = lambda op, key, dtype, default: dict(default, min_programs=264)
        q = torch.randn(1, 1, 32, 128).bfloat16()
        k_cache = torch.randn(2, 300, 4, 128).bfloat16()
        for counters in (None, split_counters("cpu")):
            decode_attention(q, k_cache, k_cache, torch.tensor([1]), torch.tensor([300]), 0.1, counters)
    """)
    assert "_decode_attention_split" in out and "_decode_attention_merge" in out
    assert "compiled 9 launches" in out  # 6 one-split calls, split + merge, then one split merging in-kernel


@needs_cuda
@pytest.mark.parametrize("batch,length", [(1, 1024), (4, 4096), (8, 8192)])
def test_real_shapes_bf16(batch, length):
    slots = list(range(batch))
    lengths = [length - 37 * i for i in range(batch)]
    q, k_cache, v_cache, slot_ids, lengths = _case(batch, 1, 32, 4, 128, 8192, torch.bfloat16, slots, lengths,
                                                   num_slots=batch)
    got = decode_attention(q, k_cache, v_cache, slot_ids, lengths, 128 ** -0.5)
    want = decode_attention_ref(q.float(), k_cache.float(), v_cache.float(), slot_ids, lengths, 128 ** -0.5)
    assert rel_err(got, want) <= 1e-2


@needs_cuda
def test_cuda_graph_replay_with_poisoned_output():
    q, k_cache, v_cache, slot_ids, lengths = _case(3, 1, 32, 4, 128, 2048, torch.bfloat16, [1, -1, 2],
                                                   [2000, 1, 17])
    out = torch.full_like(q, float("nan"))
    static_q = q.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())  # the inputs were made on the default stream
    with torch.cuda.stream(stream):
        out.copy_(decode_attention(static_q, k_cache, v_cache, slot_ids, lengths, 0.1))  # warm-up / compile
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(decode_attention(static_q, k_cache, v_cache, slot_ids, lengths, 0.1))
    for _ in range(2):  # fresh queries and lengths each replay
        static_q.copy_(torch.randn_like(q))
        lengths.copy_(torch.tensor([int(torch.randint(1, 2048, ())), 1, 2048], device="cuda"))
        out.fill_(float("nan"))
        graph.replay()
        want = decode_attention_ref(static_q.float(), k_cache.float(), v_cache.float(), slot_ids, lengths, 0.1)
        assert not out.isnan().any()
        assert rel_err(out, want) <= 1e-2
