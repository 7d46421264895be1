"""The fused q/k-norm + RoPE + K/V cache write + decode attention kernel against its torch twin
(kernels.attention.decode_norm_rope_attention_ref = qk_norm_rope_cache_write_ref, then decode_attention_ref):
outputs, the caches after the call, the split counters back at zero, launch counts, and StaticCacheView /
FrameKVCache using it. CPU: Triton's interpreter (fp32 / fp16). GPU: bf16 at the thinker's shapes and CUDA-graph
replay."""

import pytest
import torch

from kernels.attention import decode_norm_rope_attention_ref, split_counters
from kernels.launch_counts import FUSED_ATTENTION_MAX_NEW, LAUNCHES
from kernels.triton_norm_rope_attention import decode_norm_rope_attention
from runtime import dispatch
from runtime.kv_cache import FrameKVCache, StaticKVCache
from tests.test_triton_attention import compile_for_sm90, compiles_without_gpu

TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bf16, real shapes, graphs)")
OP = "omni_rt_triton::decode_norm_rope_attention"
ONE_SPLIT = {"BLOCK_N": 16, "num_warps": 2, "min_programs": 1, "MAX_BLOCK_R": 64}
MANY_SPLITS = {"BLOCK_N": 16, "num_warps": 2, "min_programs": 10_000, "MAX_BLOCK_R": 16}  # 16 keys per split


def rel_err(got, want):
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


@pytest.fixture
def layout(monkeypatch):
    """Force a decode-attention launch config (the CPU interpreter's default is one split)."""
    import kernels.launch_counts as launch_counts

    def use(config):
        monkeypatch.setattr(launch_counts, "launch_config", lambda op, key, dtype, default: dict(config))
    return use


def _rope(gen, batch, new, head_dim, dtype):
    angles = torch.rand(batch, new, head_dim // 2, generator=gen) * 40  # positions up to ~40 at slot 0
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype).to(DEVICE), angles.sin().to(dtype).to(DEVICE)


def _case(batch, new, q_heads, kv_heads, head_dim, max_len, dtype, slots, lengths, seed=0):
    """Raw q/k/v as views of one fused projection, norm weights, cos/sin, caches with a scratch slot (the last),
    and the write positions a StaticCacheView makes: token l of row b at lengths[b] − new + l of its slot."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)
    fused = randn(batch, new, (q_heads + 2 * kv_heads) * head_dim)
    q, k, v = fused.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = q.view(batch, new, q_heads, head_dim)
    k, v = k.view(batch, new, kv_heads, head_dim), v.view(batch, new, kv_heads, head_dim)
    q_w, k_w = 1 + 0.1 * randn(head_dim), 1 + 0.1 * randn(head_dim)
    cos, sin = _rope(gen, batch, new, head_dim, dtype)
    num_slots = max(slots) + 2
    k_cache, v_cache = randn(num_slots, max_len, kv_heads, head_dim), randn(num_slots, max_len, kv_heads, head_dim)
    slot_ids = torch.tensor(slots, device=DEVICE)
    lengths = torch.tensor(lengths, device=DEVICE)
    rows = torch.where(slot_ids >= 0, slot_ids, num_slots - 1)[:, None].expand(batch, new)
    position = lengths[:, None] - new + torch.arange(new, device=DEVICE)  # [B, L]
    at = position.clamp(0, max_len - 1)
    rows = torch.where(position >= 0, rows, num_slots - 1)  # front padding before position 0: scratch
    return (q, k, v, q_w, k_w, 1e-6, cos, sin), (k_cache, v_cache), (rows, at, slot_ids, lengths)


def _run_both(args, caches, index, scale, counters):
    """(out, k_cache, v_cache) of the kernel and of the twin, each on its own copy of the caches."""
    mine = [c.clone() for c in caches]
    twin = [c.clone() for c in caches]
    got = decode_norm_rope_attention(*args, *mine, *index, scale, counters)
    want = decode_norm_rope_attention_ref(*args, *twin, *index, scale)
    return (got, *mine), (want, *twin)


CASES = [  # batch, new, q_heads, kv_heads, head_dim, max_len, slots, lengths
    (3, 1, 8, 2, 16, 70, [2, -1, 0], [70, 5, 33]),  # G = 4, a padded row, a full slot
    (3, 2, 8, 2, 16, 70, [1, 0, 2], [2, 64, 17]),  # the code predictor's 2-token first step; 64: new keys cross a split
    (2, 1, 4, 4, 32, 40, [0, 1], [1, 40]),  # G = 1, length 1 (only the new key)
    (2, 2, 16, 2, 8, 33, [1, 0], [33, 18]),  # G = 8, D = 8 (the test models' head_dim)
    (2, 3, 6, 2, 128, 37, [0, 1], [23, 3]),  # D = 128, three new tokens: the causal triangle
    (1, 2, 4, 2, 16, 20, [0], [1]),  # front padding: length 1 < 2 new, the first query sees nothing
]


@pytest.mark.parametrize("config", [ONE_SPLIT, MANY_SPLITS], ids=["one_split", "splits"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_matches_the_twin(layout, config, dtype, case):
    layout(config)
    batch, new, q_heads, kv_heads, head_dim, max_len, slots, lengths = case
    args, caches, index = _case(batch, new, q_heads, kv_heads, head_dim, max_len, dtype, slots, lengths,
                                seed=len(slots))
    counters = split_counters(DEVICE)
    (got, k_got, v_got), (want, k_want, v_want) = _run_both(args, caches, index, head_dim ** -0.5, counters)
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    real = index[2] >= 0
    err = rel_err(got[real], want[real])
    assert err <= TOL[dtype], (err, (got - want).abs().max().item())
    assert not got[~real].any(), "a padded row must give zeros"
    # the new keys: the same norm + rotary roundings (fp32: up to rsqrt's last bits); values copied as given
    assert rel_err(k_got, k_want) <= (1e-7 if dtype == torch.float32 else 0), (k_got - k_want).abs().max().item()
    assert torch.equal(v_got, v_want)
    assert not counters.any(), "every (row block, KV head) counter must be back at zero"


def test_split_layouts_launch_once_with_counters(layout):
    layout(MANY_SPLITS)
    args, caches, index = _case(3, 2, 8, 2, 16, 70, torch.float32, [2, -1, 0], [70, 5, 33])
    counters = split_counters(DEVICE)
    op_args = (*args, *caches, *index, 0.25)
    assert LAUNCHES[OP](op_args + (counters,), {}) == 1
    assert LAUNCHES[OP](op_args + (None,), {}) == 2  # no counters: the merge kernel
    assert LAUNCHES[OP](op_args[:7], dict(zip(("cos", "sin", "k_cache", "v_cache", "write_rows", "write_at",
                                                "slot_ids", "lengths", "scale"), op_args[7:]))) == 2
    (got, *_), (want, *_) = _run_both(args, caches, index, 0.25, None)  # the merge-kernel path gives the same
    assert rel_err(got[[0, 2]], want[[0, 2]]) <= 1e-5
    layout(ONE_SPLIT)
    assert LAUNCHES[OP](op_args + (None,), {}) == 1


def test_repeated_calls_reuse_the_counters(layout):
    """Counters left at zero by one call serve the next (a CUDA graph replays the same buffer): decode three
    steps in a row, each over the cache the previous one wrote, equal to the twin step by step."""
    layout(MANY_SPLITS)
    args, caches, index = _case(2, 1, 8, 2, 16, 48, torch.float32, [0, 1], [30, 45])
    mine, twin = [c.clone() for c in caches], [c.clone() for c in caches]
    counters = split_counters(DEVICE)
    rows, at, slot_ids, lengths = index
    for step in range(3):
        step_index = (rows, at + step, slot_ids, lengths + step)
        got = decode_norm_rope_attention(*args, *mine, *step_index, 0.25, counters)
        want = decode_norm_rope_attention_ref(*args, *twin, *step_index, 0.25)
        assert rel_err(got, want) <= 1e-5, step
        assert not counters.any()
    assert rel_err(mine[0], twin[0]) <= 1e-7 and torch.equal(mine[1], twin[1])


def test_checks_its_arguments():
    args, caches, index = _case(1, 2, 4, 2, 16, 20, torch.float32, [0], [5])
    with pytest.raises(ValueError, match="write_rows"):
        decode_norm_rope_attention(*args, *caches, index[0][:, :1], *index[1:], 0.25)
    with pytest.raises(ValueError, match="int32"):
        decode_norm_rope_attention(*args, *caches, *index, 0.25, torch.zeros(8, device=DEVICE))
    too_long, caches, index = _case(1, FUSED_ATTENTION_MAX_NEW + 1, 4, 2, 16, 40, torch.float32, [0], [20])
    with pytest.raises(ValueError, match="qk_norm_rope_cache_write"):
        decode_norm_rope_attention(*too_long, *caches, *index, 0.25)


def test_registered():
    assert "triton" in dispatch.backends("decode_norm_rope_attention")
    assert dispatch._IMPLS["decode_norm_rope_attention"]["triton"] is decode_norm_rope_attention


def _view_inputs(gen, batch, new, dtype=torch.float32):
    q = torch.randn(batch, new, 4, 16, generator=gen).to(DEVICE)
    k = torch.randn(batch, new, 2, 16, generator=gen).to(DEVICE)
    v = torch.randn(batch, new, 2, 16, generator=gen).to(DEVICE)
    w = (1 + 0.1 * torch.randn(16, generator=gen)).to(DEVICE)
    cos, sin = _rope(gen, batch, new, 16, dtype)
    return q, k, v, w, w, 1e-6, cos, sin


@pytest.mark.parametrize("new,num_valid", [(1, None), (2, None), (3, [3, 1, 2]), (FUSED_ATTENTION_MAX_NEW + 2, None)])
def test_static_cache_view_equals_the_torch_path(layout, new, num_valid):
    """StaticCacheView.norm_rope_attend with the Triton kernels (the fused op up to FUSED_ATTENTION_MAX_NEW new
    tokens, qk_norm_rope_cache_write + decode_attention beyond) equals the all-torch path: outputs and caches,
    rows at different lengths, a padded row, front-padded chunks (num_valid)."""
    layout(MANY_SPLITS)
    gen = torch.Generator().manual_seed(new)
    caches = {backend: StaticKVCache(2, 3, 40, 2, 16, torch.float32, DEVICE) for backend in ("torch", "triton")}
    for cache in caches.values():
        cache.lengths.copy_(torch.tensor([5, 0, 17, 0], device=DEVICE))
    prefix = torch.randn(2, 4, 40, 2, 16, generator=gen).to(DEVICE)  # keys/values already cached
    inputs = _view_inputs(gen, 3, new)
    slot_ids = torch.tensor([2, -1, 0], device=DEVICE)
    valid = None if num_valid is None else torch.tensor(num_valid, device=DEVICE)
    out = {}
    for backend, cache in caches.items():
        cache.keys[1].copy_(prefix[0])
        cache.values[1].copy_(prefix[1])
        with dispatch.using(backend):
            view = cache.view(slot_ids, new, 17 + new, num_valid=valid)
            out[backend] = view.norm_rope_attend(1, *inputs, 0.25)
            view.commit()
    assert rel_err(out["triton"][[0, 2]], out["torch"][[0, 2]]) <= 1e-5
    assert not out["triton"][1].any()
    real_slots = [0, 2]  # the scratch slot (3) holds padding, whatever order the writes took
    assert rel_err(caches["triton"].keys[:, real_slots], caches["torch"].keys[:, real_slots]) <= 1e-6
    assert torch.equal(caches["triton"].values[:, real_slots], caches["torch"].values[:, real_slots])
    assert torch.equal(caches["triton"].lengths, caches["torch"].lengths)
    assert not caches["triton"].split_counters.any()


def test_frame_cache_steps_equal_the_torch_path():
    """The code predictor's frame: a 2-token first step, then single steps, on a FrameKVCache (no counters: one
    split), with the fused op and with torch."""
    gen = torch.Generator().manual_seed(7)
    caches = {backend: FrameKVCache(1, 2, 6, 2, 16, torch.float32, DEVICE) for backend in ("torch", "triton")}
    steps = [(0, 2), (2, 1), (3, 1), (4, 1)]
    inputs = [_view_inputs(gen, 2, new) for _, new in steps]
    outs = {}
    for backend, cache in caches.items():
        with dispatch.using(backend):
            outs[backend] = [cache.step(start, new).norm_rope_attend(0, *x, 0.25)
                             for (start, new), x in zip(steps, inputs)]
    for got, want in zip(outs["triton"], outs["torch"]):
        assert rel_err(got, want) <= 1e-5
    assert rel_err(caches["triton"].keys, caches["torch"].keys) <= 1e-6


@compiles_without_gpu
def test_compiles_for_sm90():
    out = compile_for_sm90("""
        import kernels.launch_counts as launch_counts
        from kernels.attention import split_counters
        from kernels.triton_norm_rope_attention import decode_norm_rope_attention
        launch_counts.launch_config = lambda op, key, dtype, default: dict(default, min_programs=264)
        for dtype in (torch.bfloat16, torch.float32):
            for new, q_heads, kv_heads, counters in ((1, 32, 4, split_counters("cpu")), (2, 16, 8, None),
                                                     (1, 32, 4, None)):
                q = torch.randn(2, new, q_heads, 128).to(dtype)
                k = torch.randn(2, new, kv_heads, 128).to(dtype)
                cache = torch.randn(3, 300, kv_heads, 128).to(dtype)
                rows, at = torch.tensor([[0] * new, [2] * new]), torch.tensor([[5] * new, [7] * new])
                decode_norm_rope_attention(q, k, k, q[0, 0, 0], q[0, 0, 0], 1e-6, q[:, :, 0], q[:, :, 0], cache, cache,
                                           rows, at, torch.tensor([0, -1]), torch.tensor([6, 8]), 0.1, counters)
    """)
    assert "_decode_norm_rope_attention_kernel" in out and "_decode_attention_merge" in out


def _thinker_case(batch, length):
    slots = list(range(batch))
    lengths = [length - 37 * i for i in range(batch)]
    return _case(batch, 1, 32, 4, 128, 8192, torch.bfloat16, slots, lengths)


@needs_cuda
@pytest.mark.parametrize("batch,length", [(1, 1024), (4, 4096), (8, 8192)])
def test_real_shapes_bf16(batch, length):
    args, caches, index = _thinker_case(batch, length)
    counters = split_counters(DEVICE)
    (got, k_got, _), (want, k_want, _) = _run_both(args, caches, index, 128 ** -0.5, counters)
    assert rel_err(got, want) <= 1e-2
    assert rel_err(k_got, k_want) <= 1e-3
    assert not counters.any()


@needs_cuda
def test_cuda_graph_replay_with_poisoned_output():
    args, (k_cache, v_cache), (rows, at, slot_ids, lengths) = _thinker_case(3, 2000)
    counters = split_counters(DEVICE)
    out = torch.full_like(args[0], float("nan"))
    twin_k, twin_v = k_cache.clone(), v_cache.clone()

    def step():
        out.copy_(decode_norm_rope_attention(*args, k_cache, v_cache, rows, at, slot_ids, lengths, 0.1, counters))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up / compile
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for replay in range(3):  # fresh inputs and lengths each replay, the same counters
        for x in args[:3]:
            x.copy_(torch.randn_like(x))
        lengths.copy_(torch.tensor([1000 + 300 * replay, 1, 2048], device=DEVICE))
        at.copy_(lengths[:, None] - 1)
        out.fill_(float("nan"))
        graph.replay()
        want = decode_norm_rope_attention_ref(*args, twin_k, twin_v, rows, at, slot_ids, lengths, 0.1)
        assert not out.isnan().any()
        assert rel_err(out, want) <= 1e-2
        assert not counters.any()
