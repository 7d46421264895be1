"""Sampling inside the engine (runtime/sampling.py SlotSampling, read by the runner's steps) on the tiny checkpoint:

- reproducible per request: with a seed, `generate` alone, `stream` alone and the same request beside three
  others (other seeds, other lengths, a bigger batch bucket) give the same tokens and codes; two seeds differ;
  no seed differs across calls;
- the keywords reach every stage: top_k = 1 everywhere is greedy for any seed; the options are checked;
- a steady-state tick reads the device once (`ModelRunner.read_tick`) and uploads host ints only through the
  runner's staging (`ModelRunner.indices`), and only when its batches changed, counted by a TorchFunctionMode
  over real scheduler ticks.
"""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from runtime.engine import OmniEngine
from runtime.options import GenerationOptions, Request, SchedulerConfig, resolve_sampling, sampling_options
from runtime.sampling import CODE_PREDICTOR_GREEDY, SamplingParams, StageSampling
from runtime.scheduler import Scheduler
from runtime.streaming import AudioChunk, TextDelta, consume_together

PROMPT = "Tell me something about the sea."
SAMPLED = dict(do_sample=True, temperature=0.8, top_k=40, top_p=0.95, repetition_penalty=1.1)  # the thinker too
LIMITS = dict(max_new_tokens=10, talker_max_new_tokens=14)


@pytest.fixture(scope="module")
def engine():
    engine = OmniEngine.from_pretrained("tiny", scheduler=dict(max_sessions=4))
    yield engine
    engine.close()


def _outcome(events) -> tuple[list[int], torch.Tensor | None]:
    tokens = [t for e in events if isinstance(e, TextDelta) for t in e.token_ids]
    audio = [e.codes for e in events if isinstance(e, AudioChunk)]
    return tokens, torch.cat(audio, dim=-1) if audio else None


def _generated(engine, result) -> tuple[list[int], torch.Tensor]:
    length = engine.prepare(PROMPT).input_ids.shape[1]
    eos = engine.config.im_end_token_id
    return [t for t in result.sequences[0, length:].tolist() if t != eos], result.codes[0, :, :result.num_frames[0]]


def test_a_seeded_request_gives_the_same_alone_streamed_and_beside_others(engine):
    request = dict(text=PROMPT, **SAMPLED, **LIMITS, seed=1234)
    tokens, codes = _generated(engine, engine.generate(**request))
    assert codes.shape[-1] >= 2, "the tiny talker should speak a few frames"
    assert _outcome(list(engine.stream(**request)))[0] == tokens
    assert torch.equal(_outcome(list(engine.stream(**request)))[1], codes)
    others = [dict(text="Hi.", **SAMPLED, max_new_tokens=4, talker_max_new_tokens=6, seed=1),
              dict(text="What is the weather like on Mars today?", **LIMITS, seed=99),
              dict(text=PROMPT, **SAMPLED, max_new_tokens=14, talker_max_new_tokens=20, seed=7)]
    streams = [engine.stream(**others[0]), engine.stream(**request), engine.stream(**others[1]),
               engine.stream(**others[2])]
    beside_tokens, beside_codes = _outcome(consume_together(streams)[1])
    assert beside_tokens == tokens and torch.equal(beside_codes, codes)


def test_seeds_change_the_output_and_no_seed_is_fresh_each_call(engine):
    request = dict(text=PROMPT, **SAMPLED, **LIMITS)
    first, second = (_generated(engine, engine.generate(**request, seed=seed)) for seed in (1, 2))
    assert first[0] != second[0] or not torch.equal(first[1], second[1])
    unseeded = [_generated(engine, engine.generate(**request)) for _ in range(2)]
    assert unseeded[0][0] != unseeded[1][0] or not torch.equal(unseeded[0][1], unseeded[1][1])


def test_top_k_one_on_every_stage_is_greedy_for_any_seed(engine):
    greedy = _generated(engine, engine.generate(text=PROMPT, **LIMITS, do_sample=False, talker_do_sample=False,
                                                talker_repetition_penalty=1.0))
    for seed in (3, 4):
        one = dict(do_sample=True, top_k=1, talker_top_k=1, talker_repetition_penalty=1.0, code_predictor_top_k=1)
        tokens, codes = _generated(engine, engine.generate(text=PROMPT, **LIMITS, **one, seed=seed))
        assert tokens == greedy[0] and torch.equal(codes, greedy[1])


def test_sampling_options_are_checked_and_resolved():
    defaults = StageSampling()
    given = sampling_options(defaults, temperature=0.7, talker_do_sample=False, seed=5)
    assert given["thinker"] == SamplingParams(temperature=0.7) and given["seed"] == 5
    assert given["talker"].do_sample is False and given["code_predictor"] == CODE_PREDICTOR_GREEDY
    with pytest.raises(TypeError, match="top_n"):
        sampling_options(defaults, top_n=3)
    with pytest.raises(ValueError, match="talker sampling: SamplingParams.temperature must be >= 0"):
        sampling_options(defaults, talker_temperature=-1.0)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        GenerationOptions(seed=-1)
    with pytest.raises(TypeError, match="GenerationOptions.talker"):
        GenerationOptions(talker={"top_k": 3})
    resolved = resolve_sampling(GenerationOptions(talker=SamplingParams(do_sample=False)), defaults)
    assert resolved.code_predictor == CODE_PREDICTOR_GREEDY and resolved.thinker == defaults.thinker
    assert 0 <= resolved.seed < 2 ** 63
    assert resolve_sampling(GenerationOptions(), defaults).talker == defaults.talker


# ---------------------------------------------------------------------------------------------- host reads
HOST_READS = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.__bool__,
              torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__}


def _to_host(args, kwargs) -> bool:
    targets = list(args[1:]) + [kwargs.get("device")]
    return any((isinstance(t, str) and t.startswith("cpu")) or (isinstance(t, torch.device) and t.type == "cpu")
               for t in targets)


class HostTraffic(TorchFunctionMode):
    """Counts host reads (a device value reaching Python) and uploads (`torch.tensor(..., device=...)`) made
    outside the runner's two transfer methods, and calls of those methods. What runs inside a model module is
    the kernels' business: here the CPU references, which read freely; the GPU kernels the steps run are proven
    free of host syncs by tests/test_graph_safety.py's strict audit at the released shapes."""

    def __init__(self):
        super().__init__()
        self.inside, self.reads, self.uploads = False, [], []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.inside:
            if func in HOST_READS or (func is torch.Tensor.to and _to_host(args, kwargs)):
                self.reads.append(func.__name__)
            elif func is torch.tensor and kwargs.get("device") is not None:
                self.uploads.append(func.__name__)
        return func(*args, **kwargs)

    def excused(self, fn, calls: list | None = None):
        """fn, with what it does not counted (and its calls appended to `calls`)."""
        def wrapper(*args, **kwargs):
            if calls is not None:
                calls.append(fn.__name__)
            outer, self.inside = self.inside, True
            try:
                return fn(*args, **kwargs)
            finally:
                self.inside = outer
        return wrapper


def test_the_mode_sees_every_kind_of_host_read():
    value = torch.tensor([1])
    with HostTraffic() as mode:
        value.tolist(), value.item(), bool(value), int(value), float(value), [0, 1][value], value.numpy()
        value.cpu(), value.to("cpu"), torch.tensor([2], device="cpu"), value.to(torch.float32)
    assert mode.reads == ["tolist", "item", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu", "to"]
    assert mode.uploads == ["tensor"]


def test_a_steady_tick_reads_the_device_once(engine, monkeypatch):
    """Three speaking sessions, ticked here: after their prefills (the first ticks), every tick reads the
    device exactly once, through read_tick, and makes no other host read or unstaged upload; a tick whose
    batches are those of the tick before uploads nothing at all (slot ids stay in the graphs' buffers, the
    talker's text is read on the device)."""
    scheduler = Scheduler(engine, SchedulerConfig(max_sessions=4))
    for i, text in enumerate((PROMPT, "Hi there.", "Name three colours, please.")):
        prompt = engine.prepare(text)
        options = GenerationOptions(max_new_tokens=8 + 3 * i, talker_max_new_tokens=12 + 2 * i, speaker="ethan",
                                    return_audio=True, **sampling_options(engine.sampling, **SAMPLED, seed=i))
        scheduler.submit(Request(prompt, resolve_sampling(options, engine.sampling)))
    mode, read_ticks, staged = HostTraffic(), [], []
    runner = scheduler.runner
    monkeypatch.setattr(runner, "read_tick", mode.excused(runner.read_tick, read_ticks))
    monkeypatch.setattr(runner, "indices", mode.excused(runner.indices, staged))
    monkeypatch.setattr(torch.nn.Module, "__call__", mode.excused(torch.nn.Module.__call__))
    slot_ids, batches = runner.slot_ids, []  # the slot lists each tick's steps ran
    monkeypatch.setattr(runner, "slot_ids", lambda slots: batches[-1].append(tuple(slots)) or slot_ids(slots))
    per_tick, uploads, previous = [], [], None
    while not scheduler.idle:
        steady = all(s.state == "decode" and s.talker is not None for s in scheduler.live) and not scheduler.waiting
        read_ticks.clear(), staged.clear(), batches.append([])
        with mode:
            scheduler.step()
        if steady:
            per_tick.append(len(read_ticks))
            assert not mode.reads and not mode.uploads, (mode.reads, mode.uploads)
            if batches[-1] == previous:
                uploads.append(len(staged))
        previous = batches[-1] if steady else None
        mode.reads.clear(), mode.uploads.clear()
    assert len(per_tick) >= 8, per_tick
    assert all(count == 1 for count in per_tick[:-1]) and per_tick[-1] <= 1, per_tick
    assert len(uploads) >= 4 and not any(uploads), uploads


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_sampling_flags_become_keywords():
    from runtime.__main__ import DEMO_SEED, _sampling, build_parser

    parser = build_parser()
    args = parser.parse_args(["demo", "--temperature", "0.7", "--talker-top-k", "5", "--talker-repetition-penalty",
                              "1.2"])
    assert _sampling(args) == dict(temperature=0.7, do_sample=True, talker_top_k=5, talker_do_sample=True,
                                   talker_repetition_penalty=1.2, seed=DEMO_SEED)
    assert _sampling(parser.parse_args(["generate", "--checkpoint", "x", "--text", "hi"])) == {}  # defaults, no seed
    greedy = _sampling(parser.parse_args(["generate", "--checkpoint", "x", "--greedy", "--seed", "3"]))
    assert greedy == dict(do_sample=False, talker_do_sample=False, code_predictor_do_sample=False, seed=3)


def test_the_demo_is_reproducible(tmp_path, capsys):
    """The demo samples the talker (the checkpoint's defaults) with a fixed seed: two runs write the same audio."""
    import numpy as np

    from runtime.__main__ import main
    from runtime.frontend.audio import require_soundfile

    soundfile = require_soundfile()
    outs = [tmp_path / f"demo{i}.wav" for i in range(2)]
    for out in outs:
        assert main(["demo", "--out", str(out), "--max-new-tokens", "6", "--talker-max-new-tokens", "8"]) == 0
    first, second = (soundfile.read(str(out))[0] for out in outs)
    assert first.size > 0 and np.array_equal(first, second)


def test_batch_row_i_draws_with_seed_plus_i(engine):
    """generate on a batch: row i is the request alone with seed + i (one seed per session)."""
    ids = engine.prepare(PROMPT).input_ids
    both = engine.generate(input_ids=torch.cat([ids, ids]), **SAMPLED, **LIMITS, seed=40)
    for row in (0, 1):
        alone = engine.generate(input_ids=ids, **SAMPLED, **LIMITS, seed=40 + row)
        frames = int(alone.num_frames[0])
        assert torch.equal(both.sequences[row, :alone.sequences.shape[1]], alone.sequences[0])
        assert int(both.num_frames[row]) == frames and torch.equal(both.codes[row, :, :frames], alone.codes[0])
    assert not torch.equal(both.codes[0], both.codes[1])
