"""Triton MoE (route_topk, moe_align, moe_experts on its decode and prefill paths) against the torch twins:
one token, the decode/prefill boundary, odd primes for E/H/I/BM, empty expert groups, every token on one expert,
a group of BLOCK_M + 1 rows, dropped pairs (expert −1), strided hidden states; alignment outputs compared
exactly. CPU: Triton's interpreter (fp32 / fp16). GPU: bf16 at the real thinker shapes, no host sync, and
CUDA-graph replay with poisoned outputs."""

import pytest
import torch

from kernels.moe import moe_align_max_padded, moe_align_ref, moe_experts_ref, route_topk_ref, router_topk_ref
from kernels.triton_moe import (DECODE_CONFIG, DECODE_MAX_TOKENS, PREFILL_CONFIG, decode_split, moe_align, moe_experts,
                                route_topk)
from kernels.triton_router import router_topk
from runtime import dispatch
from tests.test_triton_attention import compile_for_sm90, compiles_without_gpu

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bf16, real shapes, graphs)")


def rel_err(got, want):
    got, want = got.float(), want.float()
    err = ((got - want).norm() / want.norm()).item()
    print(f"rel {err:.2e}  max abs {(got - want).abs().max().item():.2e}")
    return err


def distinct_logits(lead: tuple, num_experts: int, dtype) -> torch.Tensor:
    """Router logits whose probabilities have no ties in `dtype` (random order, spacing above its rounding),
    so that the top-k ids are defined."""
    order = torch.argsort(torch.rand(*lead, num_experts, device=DEVICE), dim=-1).float()
    return (order * (6.0 / num_experts) - 3.0 + 0.2 * torch.rand(*lead, 1, device=DEVICE)).to(dtype)


def routed_ids(num_tokens: int, num_experts: int, top_k: int) -> torch.Tensor:
    """(T, K) distinct experts per token, as a router picks them."""
    if num_tokens == 0:
        return torch.empty(0, top_k, dtype=torch.int64, device=DEVICE)
    return torch.argsort(torch.rand(num_tokens, num_experts, device=DEVICE), dim=-1)[:, :top_k]


def expert_weights_for(num_experts, hidden, inter, dtype):
    gate_up = (torch.randn(num_experts, 2 * inter, hidden, device=DEVICE) / hidden ** 0.5).to(dtype)
    down = (torch.randn(num_experts, hidden, inter, device=DEVICE) / inter ** 0.5).to(dtype)
    return gate_up, down


def router_weights(num_tokens, top_k, dtype):
    weights = torch.rand(num_tokens, top_k, device=DEVICE) + 0.1
    return (weights / weights.sum(-1, keepdim=True)).to(dtype)


def reference(hidden, ids, weights, gate_up, down):
    """moe_experts_ref in fp32; dropped pairs (ids outside [0, E)) as pairs with weight 0."""
    valid = (ids >= 0) & (ids < gate_up.shape[0])
    return moe_experts_ref(hidden.float(), torch.where(valid, ids, 0), torch.where(valid, weights, 0).float(),
                           gate_up.float(), down.float())


# -------------------------------------------------------------------------------------------- route_topk
@pytest.mark.parametrize("lead,num_experts,top_k,norm,dtype", [
    ((1,), 8, 2, True, torch.float32),  # one token
    ((17,), 61, 4, True, torch.float32),  # odd prime experts
    ((33,), 128, 8, True, torch.float16),  # the thinker's router, block + 1 tokens
    ((5,), 3, 3, False, torch.float32),  # K = E, no renormalisation
    ((2, 3), 16, 4, False, torch.float16),  # (B, L, E) logits
    ((0,), 8, 2, True, torch.float32),  # no tokens
])
def test_route_topk(lead, num_experts, top_k, norm, dtype):
    logits = distinct_logits(lead, num_experts, dtype)
    weights, ids = route_topk(logits, top_k, norm)
    want_weights, want_ids = route_topk_ref(logits, top_k, norm)
    assert ids.dtype == torch.int64 and weights.dtype == dtype and weights.shape == (*lead, top_k)
    assert torch.equal(ids, want_ids)
    if weights.numel():
        assert rel_err(weights, want_weights) <= TOL[dtype]


@pytest.mark.parametrize("lead,num_experts,hidden_size,top_k,norm,dtype", [
    ((1,), 128, 2048, 8, True, torch.float32),  # the thinker's router at decode
    ((17,), 61, 96, 4, True, torch.float32),  # odd prime experts, a token block + 1
    ((3, 5), 128, 1024, 6, False, torch.float32),  # the talker's router shape, (B, L, H)
    ((9,), 16, 80, 2, True, torch.float16),  # fp16: H past a BLOCK_K, 16 experts
    ((0,), 8, 32, 2, True, torch.float32),  # no tokens
])
def test_router_topk_fuses_the_router_linear(lead, num_experts, hidden_size, top_k, norm, dtype):
    gen = torch.Generator().manual_seed(num_experts * 7 + hidden_size)
    hidden = torch.randn(*lead, hidden_size, generator=gen).to(DEVICE, dtype)
    gate_weight = (3 * torch.randn(num_experts, hidden_size, generator=gen) / hidden_size ** 0.5).to(DEVICE, dtype)
    weights, ids = router_topk(hidden, gate_weight, top_k, norm)
    want_weights, want_ids = router_topk_ref(hidden, gate_weight, top_k, norm)
    assert ids.dtype == torch.int64 and weights.dtype == dtype and weights.shape == (*lead, top_k)
    if not weights.numel():
        return
    logits = torch.nn.functional.linear(hidden, gate_weight).float().sort(-1, descending=True).values
    margin = 1e-4 if dtype == torch.float32 else 1e-2  # several ulps of the logits
    assert (logits[..., top_k - 1] - logits[..., top_k]).min() > margin  # the case has no near tie at K
    assert torch.equal(ids, want_ids)
    assert rel_err(weights, want_weights) <= (1e-5 if dtype == torch.float32 else 1e-3)


def test_router_topk_checks_and_dispatch():
    with pytest.raises(ValueError, match="share H"):
        router_topk(torch.randn(2, 8, device=DEVICE), torch.randn(4, 6, device=DEVICE), 2, True)
    with pytest.raises(ValueError, match="top_k must be in"):
        router_topk(torch.randn(2, 8, device=DEVICE), torch.randn(4, 8, device=DEVICE), 5, True)
    assert dispatch.kernel_choice("triton")["router_topk"] == "triton"


def test_route_topk_refuses_top_k_above_experts():
    with pytest.raises(ValueError, match="top_k must be in"):
        route_topk(distinct_logits((2,), 4, torch.float32), 5, True)


# --------------------------------------------------------------------------------------------- moe_align
def _all_on_one_expert(num_tokens, num_experts, top_k):
    ids = routed_ids(num_tokens, num_experts, top_k)
    ids[:, 0] = num_experts - 1  # every token's first pair on the last expert
    ids[:, 1:] = torch.where(ids[:, 1:] == num_experts - 1, 0, ids[:, 1:])
    return ids


@pytest.mark.parametrize("ids_of,num_experts,block_m", [
    (lambda: routed_ids(1, 128, 8), 128, 16),  # decode: one token
    (lambda: routed_ids(37, 61, 4), 61, 7),  # odd primes
    (lambda: routed_ids(129, 128, 8), 128, 64),  # block + 1 tokens
    (lambda: routed_ids(5, 3, 2), 3, 1),  # BM = 1
    (lambda: routed_ids(0, 128, 8), 128, 16),  # no tokens: every block unused
    (lambda: _all_on_one_expert(65, 16, 2), 16, 64),  # one group of BM + 1 rows, most experts empty
    (lambda: torch.full((9, 1), 4, device=DEVICE), 8, 4),  # every pair on one expert
])
def test_moe_align_equals_twin(ids_of, num_experts, block_m):
    ids = ids_of()
    got = moe_align(ids, num_experts, block_m)
    want = moe_align_ref(ids, num_experts, block_m)
    assert got[0].shape == (moe_align_max_padded(ids.numel(), num_experts, block_m),)
    for name, g, w in zip(("sorted_ids", "expert_ids", "num_tokens_post_pad"), got, want):
        assert g.dtype == w.dtype == torch.int32 and torch.equal(g, w), name


def test_moe_align_drops_pairs_outside_the_experts():
    ids = routed_ids(20, 32, 4)
    ids[3] = -1  # a padded token
    ids[7, 2] = 32  # an id past the last expert
    got = moe_align(ids, 32, 8)
    for g, w in zip(got, moe_align_ref(ids, 32, 8)):
        assert torch.equal(g, w)
    placed = got[0][got[0] < ids.numel()].long()
    assert placed.numel() == ids.numel() - 5 and not ((placed >= 12) & (placed < 16)).any() and 30 not in placed


# -------------------------------------------------------------------------------------------- moe_experts
@pytest.mark.parametrize("num_tokens,num_experts,top_k,hidden,inter,dtype", [
    (1, 8, 2, 32, 24, torch.float32),  # decode: one token
    (DECODE_MAX_TOKENS, 16, 4, 48, 40, torch.float32),  # the largest decode batch
    (DECODE_MAX_TOKENS + 1, 16, 4, 48, 40, torch.float32),  # the smallest prefill
    (37, 61, 4, 33, 17, torch.float32),  # odd primes everywhere
    (3, 61, 4, 33, 17, torch.float16),  # decode in fp16, most experts empty
    (70, 8, 2, 64, 48, torch.float16),  # prefill in fp16, groups above BLOCK_M
])
def test_moe_experts(num_tokens, num_experts, top_k, hidden, inter, dtype):
    x = torch.randn(num_tokens, hidden, device=DEVICE).to(dtype)
    gate_up, down = expert_weights_for(num_experts, hidden, inter, dtype)
    ids, weights = routed_ids(num_tokens, num_experts, top_k), router_weights(num_tokens, top_k, dtype)
    got = moe_experts(x, ids, weights, gate_up, down)
    assert got.shape == x.shape and got.dtype == dtype
    assert rel_err(got, reference(x, ids, weights, gate_up, down)) <= TOL[dtype]
    if dtype == torch.float32:  # and against the twin in its own dtype
        assert rel_err(got, moe_experts_ref(x, ids, weights, gate_up, down)) <= TOL[dtype]


@pytest.mark.parametrize("num_tokens", [4, PREFILL_CONFIG["BLOCK_M"] + 1])
def test_moe_experts_all_tokens_on_one_expert(num_tokens):
    x = torch.randn(num_tokens, 40, device=DEVICE)
    gate_up, down = expert_weights_for(16, 40, 24, torch.float32)
    ids = _all_on_one_expert(num_tokens, 16, 2)
    weights = router_weights(num_tokens, 2, torch.float32)
    assert rel_err(moe_experts(x, ids, weights, gate_up, down), reference(x, ids, weights, gate_up, down)) <= 1e-5


@pytest.mark.parametrize("num_tokens", [3, 20])  # decode and prefill
def test_moe_experts_dropped_pairs_contribute_nothing(num_tokens):
    x = torch.randn(num_tokens, 32, device=DEVICE)
    gate_up, down = expert_weights_for(12, 32, 16, torch.float32)
    ids, weights = routed_ids(num_tokens, 12, 3), router_weights(num_tokens, 3, torch.float32)
    ids[1, 0] = -1
    ids[-1, 2] = 12
    got = moe_experts(x, ids, weights, gate_up, down)
    assert rel_err(got, reference(x, ids, weights, gate_up, down)) <= 1e-5


@pytest.mark.parametrize("num_tokens", [2, 11])
def test_moe_experts_strided_hidden(num_tokens):
    wide = torch.randn(num_tokens, 2 * 24, device=DEVICE)
    x = wide[:, ::2]  # a view with stride 2 along the hidden size
    gate_up, down = expert_weights_for(8, 24, 16, torch.float32)
    ids, weights = routed_ids(num_tokens, 8, 2), router_weights(num_tokens, 2, torch.float32)
    assert rel_err(moe_experts(x, ids, weights, gate_up, down), reference(x, ids, weights, gate_up, down)) <= 1e-5


def test_moe_experts_no_tokens():
    gate_up, down = expert_weights_for(8, 16, 8, torch.float32)
    out = moe_experts(torch.empty(0, 16, device=DEVICE), routed_ids(0, 8, 2), torch.empty(0, 2, device=DEVICE),
                      gate_up, down)
    assert out.shape == (0, 16)


def test_moe_experts_refuses_mismatched_arguments():
    gate_up, down = expert_weights_for(8, 16, 8, torch.float32)
    x, ids, weights = torch.randn(3, 16), routed_ids(3, 8, 2), router_weights(3, 2, torch.float32)
    with pytest.raises(ValueError, match="hidden must be"):
        moe_experts(torch.randn(3, 17), ids, weights, gate_up, down)
    with pytest.raises(ValueError, match="down_proj"):
        moe_experts(x, ids, weights, gate_up, down[:, :, :4])
    with pytest.raises(ValueError, match="must both be"):
        moe_experts(x, ids[:2], weights, gate_up, down)
    with pytest.raises(TypeError, match="share a dtype"):
        moe_experts(x.half(), ids, weights, gate_up, down)


# ----------------------------------------------------- decode: the down + combine kernel split over expert groups
def _decode_ids_with_repeats_and_padding(num_tokens, num_experts, top_k):
    """Routed ids with an expert repeated inside a token, a dropped pair and, from 3 tokens, a padded token."""
    ids = routed_ids(num_tokens, num_experts, top_k)
    ids[0, 1] = ids[0, 0]  # the same expert twice for one token: two pairs, two contributions
    ids[0, top_k - 1] = -1
    if num_tokens >= 3:
        ids[1] = -1  # a padded token: zeros out
    return ids


@pytest.mark.parametrize("num_tokens,experts_per_program,dtype", [  # K = 8; 3 per program: a short last group
    (1, 2, torch.float32), (1, 3, torch.float32), (3, 1, torch.float32), (3, 2, torch.float32),
    (DECODE_MAX_TOKENS, 2, torch.float32), (DECODE_MAX_TOKENS, 3, torch.float32),
    (1, 2, torch.float16), (3, 3, torch.float16), (DECODE_MAX_TOKENS, 2, torch.float16),
])
def test_decode_split_over_expert_groups(num_tokens, experts_per_program, dtype):
    torch.manual_seed(100 * num_tokens + 10 * experts_per_program + (dtype == torch.float16))  # the helpers draw
    num_experts, top_k, hidden, inter = 16, 8, 40, 24  # H: two blocks of BLOCK_N_DOWN and a partial one
    x = torch.randn(num_tokens, hidden, device=DEVICE).to(dtype)
    gate_up, down = expert_weights_for(num_experts, hidden, inter, dtype)
    ids = _decode_ids_with_repeats_and_padding(num_tokens, num_experts, top_k)
    weights = router_weights(num_tokens, top_k, dtype)
    got = decode_split(experts_per_program)(x, ids, weights, gate_up, down)
    assert rel_err(got, reference(x, ids, weights, gate_up, down)) <= (1e-5 if dtype == torch.float32 else 1e-3)
    if num_tokens >= 3:
        assert torch.equal(got[1], torch.zeros_like(got[1]))
    unsplit = decode_split(top_k)(x, ids, weights, gate_up, down)  # the one-program-per-token kernel
    assert rel_err(got, unsplit) <= (1e-6 if dtype == torch.float32 else 1e-3)  # only the fp32 sum order differs


def test_decode_default_is_the_split_and_calls_do_not_leak_counts():
    """The op's decode path uses DECODE_CONFIG's split; its arrival counters are zeroed inside each call, so calls
    one after another (recycled buffers holding the last call's counts) give the same output."""
    assert DECODE_CONFIG["EXPERTS_PER_PROGRAM"] < 8
    torch.manual_seed(7)
    x = torch.randn(2, 40, device=DEVICE)
    gate_up, down = expert_weights_for(16, 40, 24, torch.float32)
    ids, weights = routed_ids(2, 16, 8), router_weights(2, 8, torch.float32)
    first = moe_experts(x, ids, weights, gate_up, down)
    assert torch.equal(first, decode_split(DECODE_CONFIG["EXPERTS_PER_PROGRAM"])(x, ids, weights, gate_up, down))
    for _ in range(3):
        assert torch.equal(moe_experts(x, ids, weights, gate_up, down), first)
    assert rel_err(first, reference(x, ids, weights, gate_up, down)) <= 1e-5


def test_decode_split_refuses_prefill_sizes():
    gate_up, down = expert_weights_for(8, 16, 8, torch.float32)
    x, ids, weights = torch.randn(9, 16), routed_ids(9, 8, 2), router_weights(9, 2, torch.float32)
    with pytest.raises(ValueError, match="1 to 8 tokens"):
        decode_split(2)(x, ids, weights, gate_up, down)


def test_registered_and_selectable():
    saved = dispatch.selected()
    with dispatch.active({"route_topk": "triton", "moe_experts": "triton"}):
        assert dispatch.selected()["moe_experts"] == "triton"
        logits = distinct_logits((6,), 16, torch.float32)
        x = torch.randn(6, 24, device=DEVICE)
        gate_up, down = expert_weights_for(16, 24, 8, torch.float32)
        weights, ids = dispatch.route_topk(logits, 4, True)
        got = dispatch.moe_experts(x, ids, weights, gate_up, down)
    assert dispatch.selected() == saved
    want_weights, want_ids = route_topk_ref(logits, 4, True)
    assert torch.equal(ids, want_ids)
    assert rel_err(got, moe_experts_ref(x, want_ids, want_weights, gate_up, down)) <= 1e-5


# ------------------------------------------------------------------------------------------------- GPU
@compiles_without_gpu
def test_compiles_for_sm90():
    out = compile_for_sm90("""
        from kernels.triton_moe import decode_split, moe_experts, route_topk
        from kernels.triton_router import router_topk
        for dtype in (torch.bfloat16, torch.float32):  # fp16 compiles as bf16 does
            logits = torch.randn(9, 128).to(dtype)
            weights, ids = route_topk(logits, 8, True)
            router_topk(torch.randn(9, 2048).to(dtype), torch.randn(128, 2048).to(dtype), 8, True)
            gate_up, down = torch.randn(128, 2 * 768, 2048).to(dtype), torch.randn(128, 2048, 768).to(dtype)
            ids = torch.stack([torch.randperm(128)[:8] for _ in range(9)])
            for tokens in (1, 9):  # the decode (split down kernel: in-kernel merge) and the prefill path
                moe_experts(torch.randn(tokens, 2048).to(dtype), ids[:tokens], weights[:tokens], gate_up, down)
            decode_split(8)(torch.randn(1, 2048).to(dtype), ids[:1], weights[:1], gate_up, down)  # unsplit
    """)
    for kernel in ("_route_topk_kernel", "_router_topk_kernel", "_moe_align_kernel", "_decode_gate_up_kernel", "_decode_down_combine_kernel",
                   "_grouped_gate_up_kernel", "_grouped_down_kernel", "_combine_topk_kernel"):
        assert kernel in out, kernel


@needs_cuda
@pytest.mark.parametrize("num_tokens", [1, 4, 8, 256, 2048])
def test_real_shapes_bf16(num_tokens):
    num_experts, top_k, hidden, inter = 128, 8, 2048, 768
    x = torch.randn(num_tokens, hidden, device="cuda").bfloat16()
    logits = distinct_logits((num_tokens,), num_experts, torch.bfloat16)
    weights, ids = route_topk(logits, top_k, True)
    want_weights, want_ids = route_topk_ref(logits, top_k, True)
    assert torch.equal(ids, want_ids) and rel_err(weights, want_weights) <= 1e-2
    gate_up, down = expert_weights_for(num_experts, hidden, inter, torch.bfloat16)
    got = moe_experts(x, ids, weights, gate_up, down)
    assert rel_err(got, reference(x, ids, weights, gate_up, down)) <= 1e-2
    for g, w in zip(moe_align(ids, num_experts, 64), moe_align_ref(ids, num_experts, 64)):
        assert torch.equal(g, w)


@needs_cuda
@pytest.mark.parametrize("num_tokens", [1, 8, 300])  # decode and prefill paths
def test_no_host_sync_and_cuda_graph_replay_with_poisoned_outputs(num_tokens):
    num_experts, top_k, hidden, inter = 128, 8, 2048, 768
    gate_up, down = expert_weights_for(num_experts, hidden, inter, torch.bfloat16)
    x = torch.randn(num_tokens, hidden, device="cuda").bfloat16()
    logits = distinct_logits((num_tokens,), num_experts, torch.bfloat16)
    out = torch.empty_like(x)

    def step():
        weights, ids = route_topk(logits, top_k, True)
        out.copy_(moe_experts(x, ids, weights, gate_up, down))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up compiles outside the capture
        step()
        torch.cuda.set_sync_debug_mode("error")  # a host sync inside the step would raise here
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(2):  # fresh tokens and routing each replay; the output poisoned before
        x.copy_(torch.randn_like(x))
        logits.copy_(distinct_logits((num_tokens,), num_experts, torch.bfloat16))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        weights, ids = route_topk_ref(logits, top_k, True)
        assert not out.isnan().any()
        assert rel_err(out, reference(x, ids, weights, gate_up, down)) <= 1e-2
