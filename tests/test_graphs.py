"""CUDA graphs of the decode steps and prefill chunks: replay equals eager for every captured stage (GPU), and
the guards that keep graphs away from where they cannot run (CPU)."""

import pytest
import torch

from runtime import dispatch
from runtime.engine import OmniEngine
from runtime.graphs import GraphRunner, batch_buckets, check_graph_safe
from tests.oracle import build_oracle, rel_err

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (graph capture and replay)")


def test_batch_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert batch_buckets(8) == [1, 2, 4, 8]


def test_capture_refuses_host_syncing_references():
    with dispatch.using("torch"):
        with pytest.raises(RuntimeError, match="decode_attention .*moe_experts"):
            check_graph_safe()


def test_runner_refuses_cpu():
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device"):
        GraphRunner(torch.device("cpu"), max_batch=2, prefill_buckets=[16])


def test_every_stage_runs_from_its_capture_inputs_on_cpu(tmp_path):
    """What capture_all would capture, run eagerly on the CPU: every stage's example inputs (all rows padded)
    fit its step function, and no session's slot is touched (only the scratch slot, reset after)."""
    build_oracle("odd", tmp_path, seed=int(torch.randint(0, 2**31, ()).item()))
    engine = OmniEngine.from_pretrained(tmp_path)
    engine.scheduler_config = dict(max_sessions=2, prefill_chunk=40)
    scheduler = engine.scheduler
    runner = object.__new__(GraphRunner)  # the capture plan without a device to capture on
    runner.device, runner.buckets, runner.prefill_buckets = scheduler.device, batch_buckets(2), scheduler.prefill_buckets
    stages = [(stage, size) for size in runner.prefill_buckets for stage in ("thinker_prefill", "talker_prefill")]
    stages += [(stage, size) for size in runner.buckets for stage in runner._stages(scheduler)]
    caches = (scheduler.thinker_cache, scheduler.talker_cache)
    before = [(c.keys[:, :-1].clone(), c.lengths.clone()) for c in caches]
    with torch.inference_mode():
        for stage, size in stages:
            outputs = runner._step_fn(scheduler, stage)(*runner._example_inputs(scheduler, stage, size))
            assert all(torch.is_tensor(o) and o.shape[0] == (1 if "prefill" in stage else size) for o in outputs), stage
    for cache, (keys, lengths) in zip(caches, before):
        assert torch.equal(cache.keys[:, :-1], keys) and torch.equal(cache.lengths, lengths)
    assert runner.prefill_buckets == [16, 32, 40]


@pytest.fixture(scope="module")
def gpu_engine(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA (graph capture and replay)")
    path = tmp_path_factory.mktemp("oracle")
    build_oracle("odd", path, seed=int(torch.randint(0, 2**31, ()).item()))
    with dispatch.using("triton"):
        yield OmniEngine.from_pretrained(path, device="cuda")


def _snapshot(cache):
    return cache.keys.clone(), cache.values.clone(), cache.lengths.clone()


def _restore(cache, saved):
    for tensor, value in zip((cache.keys, cache.values, cache.lengths), saved):
        tensor.copy_(value)


@needs_cuda
@torch.inference_mode()
def test_replay_equals_eager_for_every_stage(gpu_engine):
    engine = OmniEngine(gpu_engine.config, gpu_engine.model, None, "cuda", torch.float32,
                        dict(max_sessions=4, use_graphs=True))
    scheduler, graphs = engine.scheduler, engine.scheduler.graphs
    assert graphs is not None and set(graphs.graphs) >= {("thinker_decode", 4), ("talker_decode", 1)}
    for captured in graphs.graphs.values():  # poison the outputs: every replay must write all of them
        for out in captured.outputs:
            if out.is_floating_point():
                out.fill_(float("nan"))
    cfg = engine.config
    device = "cuda"
    slots = torch.tensor([2, 0, 1], device=device)
    scheduler.thinker_cache.lengths[:3] = torch.tensor([5, 9, 3], device=device)
    scheduler.talker_cache.lengths[:3] = torch.tensor([4, 6, 2], device=device)
    for cache in (scheduler.thinker_cache, scheduler.talker_cache):
        cache.keys.normal_()
        cache.values.normal_()
    tokens = torch.randint(11, 470, (3,), device=device)
    positions = torch.randint(0, 30, (3, 3, 1), device=device)
    embeds = torch.randn(3, 1, cfg.talker.text.hidden_size, device=device)
    hidden = torch.randn(3, cfg.talker.text.hidden_size, device=device)
    code0 = torch.randint(0, 100, (3,), device=device)
    frame_codes = torch.randint(0, cfg.code2wav.codebook_size, (3, cfg.code2wav.num_quantizers, 1), device=device)
    bucket = scheduler.prefill_buckets[1]  # a chunk of bucket − 3 tokens, front-padded, after slot 2's 5 tokens
    chunk = (torch.randn(1, bucket, cfg.thinker.text.hidden_size, device=device),
             torch.randint(0, 30, (3, 1, bucket), device=device),
             torch.randn(len(cfg.thinker.vision.deepstack_visual_indexes), 1, bucket, cfg.thinker.text.hidden_size,
                         device=device),
             slots[:1], torch.tensor([bucket - 3], device=device))
    talker_chunk = (torch.randn(1, bucket, cfg.talker.text.hidden_size, device=device),
                    torch.randint(0, 30, (3, 1, bucket), device=device), slots[1:2],
                    torch.tensor([bucket - 2], device=device))  # after slot 0's 6 talker tokens
    assert {("thinker_prefill", bucket), ("talker_prefill", bucket)} <= set(graphs.graphs)
    for slot in (0, 1, 2):  # streams past their first frame, with non-zero contexts
        scheduler.code2wav_slots.reset(slot)
        scheduler.code2wav_slots.frames[slot] = 3 + slot
    for pool in (*scheduler.code2wav_slots.conv.values(), *scheduler.code2wav_slots.tails.values()):
        pool.normal_()
    for cache, eager, graphed in (
        (scheduler.thinker_cache, lambda: scheduler.thinker_prefill_eager(*chunk, 5 + bucket - 3),
         lambda: graphs.thinker_prefill(scheduler, *chunk, 5 + bucket - 3)),
        (scheduler.talker_cache, lambda: scheduler.talker_prefill_eager(*talker_chunk, 6 + bucket - 2),
         lambda: graphs.talker_prefill(scheduler, *talker_chunk, 6 + bucket - 2)),
        (scheduler.thinker_cache, lambda: (scheduler.thinker_decode_eager(tokens, positions, slots, 10),),
         lambda: (graphs.thinker_decode(scheduler, tokens, positions, slots, 10),)),
        (scheduler.talker_cache, lambda: scheduler.talker_decode_eager(embeds, positions, slots, 10),
         lambda: graphs.talker_decode(scheduler, embeds, positions, slots, 10)),
        (None, lambda: (engine.model.talker.predict_frame(hidden, code0),),
         lambda: (graphs.code_predictor_frame(scheduler, hidden, code0),)),
        (None, lambda: (engine.model.code2wav.decode_frame(frame_codes, scheduler.code2wav_slots.view(slots, False)),),
         lambda: (graphs.code2wav_frame(scheduler, frame_codes, slots),)),
    ):
        c2w_saved = [t.clone() for t in scheduler.code2wav_slots.state_tensors()]
        saved = _snapshot(cache) if cache is not None else None
        want = eager()
        after_eager = _snapshot(cache) if cache is not None else None
        if cache is not None:
            _restore(cache, saved)
        for tensor, value in zip(scheduler.code2wav_slots.state_tensors(), c2w_saved):
            tensor.copy_(value)
        got = graphed()
        for g, w in zip(got, want):
            if w.is_floating_point():
                assert not g.isnan().any()
                assert rel_err(g, w) <= 1e-5
            else:
                assert torch.equal(g, w)
        if cache is not None:  # the graph wrote the same keys and lengths as eager
            for g, w in zip(_snapshot(cache), after_eager):
                assert torch.equal(g, w) if not g.is_floating_point() else rel_err(g, w) <= 1e-6


@needs_cuda
def test_stream_with_graphs_equals_offline(gpu_engine):
    from tests.test_generate import speech_request
    from tests.test_scheduler import _check_alone

    engine = OmniEngine(gpu_engine.config, gpu_engine.model, None, "cuda", torch.float32,
                        dict(max_sessions=2, use_graphs=True))
    request, offline = speech_request(gpu_engine, min_frames=2, max_new_tokens=7, talker_max_new_tokens=11)
    request = {k: v.cuda() if torch.is_tensor(v) else v for k, v in request.items()}
    _check_alone(engine, request, offline, list(engine.stream(**request)))
