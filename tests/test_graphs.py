"""CUDA graphs of the decode steps and prefill chunks: replay equals eager for every captured stage (GPU), and
the guards that keep graphs away from where they cannot run (CPU)."""

import pytest
import torch

from runtime import dispatch
from runtime.engine import OmniEngine
from runtime.graphs import GraphRunner, batch_buckets, check_graph_safe
from runtime.models.vision_encoder import vision_layout
from runtime.runner import BATCHED
from runtime.streaming import AudioChunk
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
        GraphRunner(torch.device("cpu"), max_batch=2)


class _FakeStream:
    """A CUDA stream stand-in: records the waits it is asked for."""

    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def wait_stream(self, other):
        self.log.append(("wait", self.name, other.name))

    def __repr__(self):
        return self.name


class _FakeCuda:
    """torch.cuda as GraphRunner uses it, on the CPU: every capture's pool and stream and every replay's stream
    are recorded; a replay re-runs its stage's function (the fake graph keeps it) into the captured outputs."""

    def __init__(self):
        self.log: list = []
        self.main = _FakeStream("main", self.log)
        self.current = self.main
        self.made = 0

    def is_available(self):
        return True

    def current_stream(self, device=None):
        return self.current

    def default_stream(self, device=None):
        return self.main

    def Stream(self, device=None):  # noqa: N802 - torch.cuda's name
        self.made += 1
        return _FakeStream(f"side{self.made}", self.log)

    def graph_pool_handle(self):
        self.made += 1
        return f"pool{self.made}"

    def stream(self, stream):
        fake = self

        class _On:
            def __enter__(self):
                self.before, fake.current = fake.current, stream

            def __exit__(self, *exc):
                fake.current = self.before

        return _On()

    def CUDAGraph(self):  # noqa: N802
        return _FakeGraph(self)

    def graph(self, graph, pool=None, stream=None):
        fake = self

        class _Capture:
            def __enter__(self):
                fake.log.append(("capture", pool, stream.name))
                graph.capturing = True
                self.before, fake.current = fake.current, stream

            def __exit__(self, *exc):
                fake.current = self.before

        return _Capture()


class _FakeGraph:
    def __init__(self, cuda):
        self.cuda, self.replay_fn = cuda, None

    def replay(self):
        self.cuda.log.append(("replay", self.cuda.current.name))
        self.replay_fn()


@torch.inference_mode()  # as the scheduler's tick runs
def test_graphs_on_two_streams_never_share_a_pool():
    """Thinker stages capture into the main stream's pool (on a side stream: the default stream cannot capture),
    talker stages into the talker stream's own pool, on that stream; each replays on its own stream, and a replay
    asked for from the other stream is ordered by waits both ways."""
    from runtime.runner import TALKER_STAGES, StageSpec

    cuda = _FakeCuda()
    talker = _FakeStream("talker", cuda.log)
    graphs = GraphRunner(torch.device("cuda"), max_batch=2, stage_streams={n: talker for n in TALKER_STAGES},
                         cuda=cuda)
    generator = torch.Generator().manual_seed(13)
    weight = torch.randn(4, 4, generator=generator)

    def step(x, slots):
        return (x @ weight,)

    plan = [StageSpec(name, size, step, (torch.zeros(size, 4), torch.full((size,), -1)))
            for size in (2, 1) for name in ("thinker_decode", "talker_decode", "code2wav_first")]
    with dispatch.using("triton"):
        graphs.capture_all(plan)
    captures = [entry for entry in cuda.log if entry[0] == "capture"]
    main_pool, talker_pool = graphs.pools[cuda.main][0], graphs.pools[talker][0]
    assert main_pool != talker_pool
    for spec, (_, pool, stream) in zip(plan, captures):
        on_talker = spec.name in TALKER_STAGES
        assert pool == (talker_pool if on_talker else main_pool), spec
        assert stream == ("talker" if on_talker else graphs.pools[cuda.main][1].name) != "main", spec
    for captured, spec in zip(graphs.graphs.values(), plan):
        captured.graph.replay_fn = lambda c=captured, fn=spec.fn: c.outputs[0].copy_(fn(*c.inputs)[0])

    cuda.log.clear()
    x = torch.randn(1, 4, generator=generator)
    (out,) = graphs.replay("talker_decode", (x, torch.tensor([0])), (0, 0), (0, -1))  # asked from main
    assert cuda.log == [("wait", "talker", "main"), ("replay", "talker"), ("wait", "main", "talker")]
    assert rel_err(out, x @ weight) <= 1e-6
    cuda.log.clear()
    with cuda.stream(talker):  # already on its stream: no waits
        graphs.replay("code2wav_first", (x, torch.tensor([1])), (0, 0), (0, -1))
    graphs.replay("thinker_decode", (x, torch.tensor([1])), (0, 0), (0, -1))
    assert cuda.log == [("replay", "talker"), ("replay", "main")]


def test_slot_reset_of_talker_state_runs_on_the_talker_stream(tmp_path, monkeypatch):
    """Admission resets a slot: the talker's KV lengths and Code2Wav stream are written by the talker's graphs on
    its stream, so their reset is issued on that stream too (after the previous user's talker work); the thinker's
    cache on the main stream."""
    from contextlib import contextmanager

    from runtime.tiny import write_tiny_checkpoint

    runner = OmniEngine.from_pretrained(write_tiny_checkpoint(tmp_path)).scheduler.runner
    inside: list = []

    @contextmanager
    def on_talker_stream():
        inside.append(True)
        yield
        inside.pop()

    monkeypatch.setattr(runner, "on_talker_stream", on_talker_stream)
    seen = {}
    for name, state in (("thinker", runner.thinker_cache), ("talker", runner.talker_cache),
                        ("code2wav", runner.code2wav_slots)):
        monkeypatch.setattr(state, "reset", lambda slot, name=name, reset=state.reset: (
            seen.__setitem__(name, bool(inside)), reset(slot)))
    runner.reset_slot(1)
    assert seen == {"thinker": False, "talker": True, "code2wav": True}


def test_every_stage_runs_from_its_capture_inputs_on_cpu(tmp_path):
    """What capture_all would capture (the runner's capture plan), run eagerly on the CPU: every stage at every
    bucket, its example inputs (all rows padded) fit its step function, which returns a tuple of tensors, and
    no session's slot is touched (only the scratch slots)."""
    build_oracle("odd", tmp_path, seed=int(torch.randint(0, 2**31, ()).item()))
    engine = OmniEngine.from_pretrained(tmp_path, scheduler=dict(max_sessions=2, prefill_chunk=40,
                                                                 max_vision_patches=64))
    runner = engine.scheduler.runner
    plan = runner.capture_plan()
    audio, merge = engine.config.thinker.audio, engine.config.thinker.vision.spatial_merge_size
    window = audio.n_window_infer // (2 * audio.n_window)  # chunks per attention window (8 released, 3 here)
    assert runner.audio_buckets == [s for s in (1, 2, 4, 8, 16) if s < window] + list(range(window, 33, window))
    assert [(spec.name, spec.size) for spec in plan] == (
        [("audio_encoder", size) for size in reversed(runner.audio_buckets)]
        + [("vision_encoder", size) for size in (64, 32, 16)]
        + [(name, size) for size in (40, 32, 16) for name in ("thinker_prefill", "talker_prefill")]
        + [(name, size) for size in (2, 1) for name in ("thinker_decode", "talker_decode", "code_predictor", "code2wav",
                                                        "code2wav_first")])
    caches = (runner.thinker_cache, runner.talker_cache)
    before = [(c.keys[:, :-1].clone(), c.lengths.clone()) for c in caches]
    code2wav_before = [t[:-1].clone() for t in runner.code2wav_slots.state_tensors()]
    # per-slot decode inputs (runtime/decode_inputs.py): slot rows first, the scratch row last (positions: dim 1)
    decode_state = [*runner.thinker_inputs.state_tensors(), *runner.talker_inputs.state_tensors()]
    by_slot_on_dim1 = {id(runner.thinker_inputs.positions), id(runner.talker_inputs.positions),
                       id(runner.thinker_inputs.ring)}
    for tensor in decode_state:  # non-zero, so a padded row writing a real slot shows
        tensor.copy_(torch.randint(1, 50, tensor.shape).to(tensor.dtype))
    slot_rows = lambda t: t[:, :-1] if id(t) in by_slot_on_dim1 else t[:-1]  # noqa: E731
    decode_before = [slot_rows(t).clone() for t in decode_state]
    with torch.inference_mode():
        for spec in plan:
            outputs = spec.fn(*spec.example_inputs)
            tokens_per_chunk = -(-2 * audio.n_window // 8)  # three stride-2 convs
            rows = (1 if "prefill" in spec.name else tokens_per_chunk * spec.size if spec.name == "audio_encoder"
                    else spec.size // merge ** 2 if spec.name == "vision_encoder" else spec.size)
            assert isinstance(outputs, tuple) and all(torch.is_tensor(o) and o.shape[0] == rows for o in outputs), spec
    for cache, (keys, lengths) in zip(caches, before):
        assert torch.equal(cache.keys[:, :-1], keys) and torch.equal(cache.lengths, lengths)
    for tensor, saved in zip(runner.code2wav_slots.state_tensors(), code2wav_before):
        assert torch.equal(tensor[:-1], saved)
    for tensor, saved in zip(decode_state, decode_before):
        assert torch.equal(slot_rows(tensor), saved)


def test_runner_builds_at_released_shapes_without_a_gpu():
    """The runner at the released shapes on the meta device (no GPU, no memory; tests/test_graph_safety.py
    audits its stages there): no CUDA stream is made, nothing asks the GPU, and its capture plan's inputs are
    made on the runner's device."""
    from runtime.config import OmniConfig
    from runtime.models.omni import build_model
    from runtime.options import SchedulerConfig
    from runtime.runner import ModelRunner

    config = OmniConfig.from_pretrained("qwen3-omni-30b-a3b")
    model = build_model(config, "meta").to(torch.bfloat16)
    runner = ModelRunner(model, config, SchedulerConfig(max_sessions=4, prefill_chunk=64, use_graphs=False))
    plan = runner.capture_plan()
    assert runner.talker_stream is None and runner.graphs is None and runner.static_prefill is False
    assert {spec.name for spec in plan} == {"audio_encoder", "vision_encoder", "thinker_prefill", "talker_prefill",
                                            "thinker_decode", "talker_decode", "code_predictor", "code2wav",
                                            "code2wav_first"}
    assert all(t.device.type == "meta" for spec in plan for t in spec.example_inputs)
    assert runner.thinker_cache.keys.device.type == "meta" and runner.thinker_cache.keys.dtype == torch.bfloat16


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


def _side_state(runner) -> list[torch.Tensor]:
    """State a step changes besides the KV caches: Code2Wav's streams, the per-slot sampling state (step
    counters, histories) and the decode steps' input state (runtime/decode_inputs.py)."""
    sampling = [t for stage in runner.sampling.values() for t in vars(stage).values() if torch.is_tensor(t)]
    return [*runner.code2wav_slots.state_tensors(), *sampling, *runner.thinker_inputs.state_tensors(),
            *runner.talker_inputs.state_tensors(), runner.last_samples]


@needs_cuda
@torch.inference_mode()
def test_replay_equals_eager_for_every_stage(gpu_engine):
    engine = OmniEngine(gpu_engine.config, gpu_engine.model, None, "cuda", torch.float32,
                        dict(max_sessions=4, use_graphs=True))
    runner = engine.scheduler.runner
    graphs = runner.graphs
    assert set(graphs.graphs) == {(spec.name, spec.size) for spec in runner.capture_plan()}
    # one pool per replay stream: the thinker's (main) and the talker's never share blocks
    assert set(graphs.pools) == {graphs.main_stream, runner.talker_stream}
    assert len({pool for pool, _ in graphs.pools.values()}) == 2
    for captured in graphs.graphs.values():  # poison the outputs: every replay must write all of them
        for out in captured.outputs:
            if out.is_floating_point():
                out.fill_(float("nan"))
    cfg = engine.config
    device = "cuda"
    slots = torch.tensor([2, 0, 1], device=device)
    runner.thinker_cache.lengths[:3] = torch.tensor([5, 9, 3], device=device)
    runner.talker_cache.lengths[:3] = torch.tensor([4, 6, 2], device=device)
    for cache in (runner.thinker_cache, runner.talker_cache):
        cache.keys.normal_()
        cache.values.normal_()
    # each slot's decode inputs on the device (runtime/decode_inputs.py): the steps take only slot ids
    runner.thinker_inputs.tokens[:3] = torch.randint(11, 470, (3,), device=device)
    runner.thinker_inputs.positions[:, :3] = torch.randint(0, 30, (3, 3), device=device)
    # the talker step reads its text in the thinker's history, at each slot's text start + its steps so far
    runner.sampling["thinker"].history[:3] = torch.randint(11, 470, (3, runner.max_seq_len + 1), device=device)
    runner.talker_inputs.text_start[:3] = torch.randint(0, 5, (3,), device=device)
    groups = cfg.talker.num_code_groups
    # each slot's last frame: codes the talker's tables and Code2Wav's codebooks both hold
    codebook = min(cfg.code2wav.codebook_size, cfg.talker.code_predictor.vocab_size)
    runner.talker_inputs.codes[:3] = torch.randint(0, codebook, (3, groups), device=device)
    runner.talker_inputs.positions[:, :3] = torch.randint(0, 30, (3, 3), device=device)
    runner.talker_inputs.hidden[:3] = torch.randn(3, cfg.talker.text.hidden_size, device=device)
    runner.talker_inputs.code0[:3] = torch.randint(0, 100, (3,), device=device)
    bucket = runner.prefill_buckets[1]  # a chunk of bucket − 3 tokens, front-padded, after slot 2's 5 tokens
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
        runner.code2wav_slots.reset(slot)
        runner.code2wav_slots.frames[slot] = 3 + slot
    for pool in (*runner.code2wav_slots.conv.values(), *runner.code2wav_slots.tails.values()):
        pool.normal_()
    audio = cfg.thinker.audio
    audio_chunks = (torch.randn(1, runner.audio_buckets[1], audio.num_mel_bins, 2 * audio.n_window, device=device),
                    torch.tensor([runner.audio_buckets[1] * -(-2 * audio.n_window // 8) - 3], device=device))
    vision, merge = cfg.thinker.vision, cfg.thinker.vision.spatial_merge_size
    frame = vision_layout(torch.tensor([[1, 2 * merge, 3 * merge]]), merge)  # 6·M² patches in the 32 bucket
    patches = frame.rows.numel()
    layout = torch.nn.functional.pad(torch.stack((frame.rows, frame.cols, frame.heights, frame.widths)),
                                     (0, 32 - patches), value=1).to(device)
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    vision_frame = (torch.nn.functional.pad(torch.randn(1, patches, patch_dim, device=device), (0, 0, 0, 32 - patches)),
                    layout, torch.tensor([patches], device=device))
    for cache, name, inputs in (
        (None, "audio_encoder", audio_chunks),  # 2 chunks, the last 3 token slots padding
        (None, "vision_encoder", vision_frame),  # a 2M x 3M-patch frame, the rest of its bucket padding
        (runner.thinker_cache, "thinker_prefill", chunk),
        (runner.talker_cache, "talker_prefill", talker_chunk),
        (runner.thinker_cache, "thinker_decode", (slots,)),
        (runner.talker_cache, "talker_decode", (slots,)),
        (None, "code_predictor", (slots,)),
        (None, "code2wav", (slots,)),
        (None, "code2wav_first", (slots,)),
    ):
        if name == "code2wav_first":  # fresh streams: the first frame trims the transposed convs' left edge
            for slot in (0, 1, 2):
                runner.code2wav_slots.reset(slot)
        eager = lambda: runner.steps[name](*inputs)  # noqa: E731 - the step function the graph captured
        graphed = lambda: runner.run(name, inputs)  # noqa: E731 - its graph's replay (3 rows in bucket 4)
        side_saved = [t.clone() for t in _side_state(runner)]
        saved = _snapshot(cache) if cache is not None else None
        want = eager()
        after_eager = _snapshot(cache) if cache is not None else None
        side_eager = [t.clone() for t in _side_state(runner)]  # the decode stages' results are per-slot state
        if cache is not None:
            _restore(cache, saved)
        for tensor, value in zip(_side_state(runner), side_saved):
            tensor.copy_(value)
        got = graphed()
        assert len(got) == len(want) and (len(want) == 0) == (name in BATCHED), name
        for g, w in zip([*got, *_side_state(runner)], [*want, *side_eager]):
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
    stream = engine.stream(**request)
    events = list(stream)
    _check_alone(engine, request, offline, events)
    audio = [e for e in events if isinstance(e, AudioChunk)]
    assert all(chunk.samples.device.type == "cpu" for chunk in audio)  # copied to the host before being sent
    timings, frames = stream.timings, offline.codes.shape[-1]
    assert len(timings.code_predictor_per_frame) == len(timings.code2wav_per_frame) == frames
    assert all(t > 0 for t in timings.code_predictor_per_frame + timings.code2wav_per_frame)  # CUDA-event spans
    assert timings.thinker_first_token <= timings.first_packet and timings.talker_first_frame <= timings.first_packet


def test_replay_copies_an_input_again_unless_it_is_the_same_constant_at_the_same_batch():
    """runtime/graphs.py copy_inputs: a steady batch's slot ids (constant, kept by the runner) stay in the graph's
    buffer; anything else, a new tensor or another batch size is copied in (and the rest of the bucket padded)."""
    from runtime.graphs import copy_inputs, mark_constant

    buffers = [torch.full((4,), 9), torch.full((4,), 9)]
    last = [None, None]
    slots, text = mark_constant(torch.tensor([2, 0])), torch.tensor([7, 8])
    copy_inputs(buffers, (text, slots), (0, 0), (0, -1), last)
    assert buffers[0].tolist() == [7, 8, 0, 0] and buffers[1].tolist() == [2, 0, -1, -1]
    for buffer in buffers:
        buffer.fill_(5)  # what a skipped copy would leave
    copy_inputs(buffers, (torch.tensor([3, 4]), slots), (0, 0), (0, -1), last)
    assert buffers[0].tolist() == [3, 4, 0, 0], "a non-constant input is copied every time"
    assert buffers[1].tolist() == [5, 5, 5, 5], "the same constant at the same batch is not copied again"
    copy_inputs(buffers, (torch.tensor([3, 4]), torch.tensor([2, 0])), (0, 0), (0, -1), last)
    assert buffers[1].tolist() == [2, 0, -1, -1], "another tensor with the same values is copied"
    buffers[1].fill_(5)
    copy_inputs(buffers, (torch.tensor([3]), slots[:1]), (0, 0), (0, -1), last)
    assert buffers[1].tolist() == [2, -1, -1, -1], "a view of the constant is another tensor"


def test_slot_ids_are_kept_per_batch_and_never_rewritten():
    from runtime.config import OmniConfig
    from runtime.models.omni import build_model
    from runtime.options import SchedulerConfig
    from runtime.runner import SLOT_ID_CACHE, ModelRunner

    config = OmniConfig.from_pretrained("qwen3-omni-30b-a3b")
    runner = ModelRunner(build_model(config, "meta").to(torch.bfloat16), config,
                         SchedulerConfig(max_sessions=4, use_graphs=False))
    first = runner.slot_ids([2, 0])
    assert runner.slot_ids([2, 0]) is first and runner.slot_ids([0, 2]) is not first
    for n in range(SLOT_ID_CACHE + 1):  # the oldest batch is dropped once more than SLOT_ID_CACHE are kept
        runner.slot_ids([n % 4] * (n // 4 + 1))
    assert len(runner._slot_ids) == SLOT_ID_CACHE and runner.slot_ids([2, 0]) is not first
