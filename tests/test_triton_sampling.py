"""The fused Triton sampler (kernels/triton_sampling.py) against its torch twin (kernels/sampling.py).

Tokens equal `sample_ref`'s for mixed rows (greedy and sampled, each filter on and off, repetition penalty over
histories with -1 padding, a suppress mask) at the code predictor's (2048), the talker's (3072), an odd (1000)
and the thinker's (151936) vocabularies, fp32 and fp16; the filtered rows equal `filter_logits_ref`'s, ties at
the k-th value included; the op is one launch, counted as such by kernels/launch_counts.py, and graph-safe.
The draw's distribution is tests/test_sampling.py's (chi-square on the twin): equal tokens inherit it.
CPU: Triton's interpreter (tests/conftest.py), one program per row run after another: the batches stay small.
"""

import pytest
import torch

from kernels.launch_counts import LAUNCHES, NAMESPACE, SAMPLE_ARGS
from kernels.sampling import (STAGE_CODE_PREDICTOR, STAGE_TALKER, STAGE_THINKER, SamplingTensors, filter_logits_ref,
                              sample_ref)
from runtime.graph_audit import StepAudit
from runtime.sampling import SamplingParams
from tests.test_sampling import ROW_PARAMS, distinct_logits, histories, talker_suppress

triton = pytest.importorskip("triton", reason="triton not installed")

from kernels.triton_sampling import SAMPLE_LAUNCHES, filter_logits, sample  # noqa: E402  (after the skip)

THINKER_VOCAB = 151936  # the thinker's text vocabulary (the head is padded to 152064; either is one tile walk)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bf16, real shapes, graphs)")
# ROW_PARAMS plus what it lacks: top-k alone, top-p alone at a tight cut, min-p alone, top-k = V, greedy + penalty
EXTRA_PARAMS = [
    SamplingParams(do_sample=True, temperature=1.0, top_k=7, top_p=1.0),
    SamplingParams(do_sample=True, temperature=0.8, top_k=0, top_p=0.3),
    SamplingParams(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, min_p=0.3),
    SamplingParams(do_sample=True, temperature=0.6, top_k=1000, top_p=0.99, repetition_penalty=1.2),
    SamplingParams(do_sample=False, temperature=0.0, repetition_penalty=3.0),
    SamplingParams(do_sample=True, temperature=2.0, top_k=0, top_p=1.0, min_p=0.0),
]
MIXED_PARAMS = ROW_PARAMS + EXTRA_PARAMS


def _inputs(batch: int, vocab: int, dtype, seed: int, history_len: int = 24):
    """Strided logits (a column slice), histories with repeats and -1s, mixed rows, seeds and steps."""
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, vocab + 3, generator=generator) * 3)[:, 2:vocab + 2].to(dtype)
    history = histories(batch, vocab, history_len, generator)
    params = SamplingTensors.from_params([MIXED_PARAMS[i % len(MIXED_PARAMS)] for i in range(batch)])
    seeds = torch.randint(-2**62, 2**62, (batch,), generator=generator)
    steps = torch.randint(0, 2**24, (batch,), generator=generator)
    return logits, history, params, seeds, steps


def _to(device, *tensors):
    return [t.to(device) for t in tensors]


@pytest.mark.parametrize("vocab, stage", [(1000, STAGE_THINKER), (2048, STAGE_CODE_PREDICTOR), (3072, STAGE_TALKER)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tokens_equal_the_twin(vocab, stage, dtype):
    batch = len(MIXED_PARAMS)
    logits, history, params, seeds, steps = _inputs(batch, vocab, dtype, seed=vocab + (dtype == torch.float16))
    suppress = talker_suppress(vocab)[0] if vocab == 3072 else torch.arange(vocab) % 97 == 5
    want = sample_ref(logits, history, params, seeds, steps, stage, suppress)
    got = sample(*_to(DEVICE, logits, history), SamplingTensors(*_to(DEVICE, *vars(params).values())),
                 *_to(DEVICE, seeds, steps), stage, suppress.to(DEVICE))
    assert got.dtype == torch.int64 and torch.equal(got.cpu(), want), (got, want)
    assert not suppress[want].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_record_at_writes_the_tokens_into_history_as_the_twin(dtype):
    """record_at: the kernel stores each row's token in its history column after reading the row's history for the
    penalty (the code predictor's draws, no copy after the kernel); the other columns stay; the twin does the same."""
    batch, vocab, column = len(MIXED_PARAMS), 2048, 5
    logits, history, params, seeds, steps = _inputs(batch, vocab, dtype, seed=11, history_len=8)
    want_history = history.clone()
    want = sample_ref(logits, want_history, params, seeds, steps, STAGE_CODE_PREDICTOR, record_at=column)
    untouched = sample_ref(logits, history.clone(), params, seeds, steps, STAGE_CODE_PREDICTOR)
    assert torch.equal(want, untouched)  # the column is written after the draw: the tokens do not change
    got_history = history.to(DEVICE)
    got = sample(logits.to(DEVICE), got_history, SamplingTensors(*_to(DEVICE, *vars(params).values())),
                 *_to(DEVICE, seeds, steps), STAGE_CODE_PREDICTOR, record_at=column)
    assert torch.equal(got.cpu(), want) and torch.equal(got_history.cpu(), want_history)
    assert torch.equal(want_history[:, column], want)
    keep = [c for c in range(history.shape[1]) if c != column]
    assert torch.equal(want_history[:, keep], history[:, keep])
    with pytest.raises(ValueError, match="record_at 8 is not a column"):
        sample(logits, history, params, seeds, steps, STAGE_CODE_PREDICTOR, record_at=8)


@pytest.mark.parametrize("vocab", [1000, 2048, 3072])
def test_filtered_rows_equal_the_twin(vocab):
    """Same finite set as filter_logits_ref, same values (both divide with round-to-nearest)."""
    generator = torch.Generator().manual_seed(vocab)
    batch = len(MIXED_PARAMS)
    logits = distinct_logits(batch, vocab, generator)
    history = histories(batch, vocab, 40, generator)
    params = SamplingTensors.from_params(MIXED_PARAMS)
    suppress = talker_suppress(vocab)[0] if vocab == 3072 else None
    want = filter_logits_ref(logits, history, params, suppress)
    got = filter_logits(logits, history, params, suppress)
    for row, row_params in enumerate(MIXED_PARAMS):
        finite = torch.isfinite(want[row])
        assert torch.equal(torch.isfinite(got[row]), finite), (row, row_params, int(torch.isfinite(got[row]).sum()),
                                                               int(finite.sum()))
        assert torch.equal(got[row][finite], want[row][finite]), (row, (got[row] - want[row])[finite].abs().max())
    assert int(torch.isfinite(got[1]).sum()) <= 20 < int(torch.isfinite(got[0]).sum())  # the filters did cut


def test_ties_at_the_cuts_stay_as_in_the_twin():
    """Top-k keeps every value equal to the k-th (-0.0 and 0.0 included); top-k >= V keeps all; min-p = 1 keeps
    the top value and its ties. (A top-p cut inside a tie is where the two may differ: the module docstring.)"""
    logits = torch.tensor([[1.0, 5.0, 4.0, 4.0, 3.0, 4.0, -2.0, 5.0, 0.0, -0.0, 0.5, 2.0, 2.0]]).repeat(6, 1)
    logits[5] = torch.tensor([0.0, -0.0, -1.0, 0.0, -3.0, -0.0, -1.0, -1.0, -2.0, -1.0, -5.0, -6.0, -7.0])
    params = SamplingTensors.from_params([
        SamplingParams(do_sample=True, top_k=3), SamplingParams(do_sample=True, top_k=13),
        SamplingParams(do_sample=True, top_k=0, min_p=1.0), SamplingParams(do_sample=True, top_k=0, top_p=0.5),
        SamplingParams(do_sample=True, top_k=100, min_p=0.3), SamplingParams(do_sample=True, top_k=3)])
    history = torch.full((6, 3), -1)
    want = filter_logits_ref(logits, history, params)
    got = filter_logits(logits, history, params)
    assert torch.equal(torch.isfinite(got), torch.isfinite(want)), (torch.isfinite(got), torch.isfinite(want))
    assert torch.isfinite(got).sum(dim=1).tolist() == [5, 13, 2, 2, 5, 4]


def test_thinker_vocabulary_walks_the_row_in_tiles():
    """151936 fp16 entries: 38 tiles per pass. Greedy with a penalty, and every filter at once (the interpreter's
    slowest case, ~10 s: two searches over the whole row)."""
    rows = [SamplingParams(do_sample=False, repetition_penalty=1.3),
            SamplingParams(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, min_p=0.05, repetition_penalty=1.1)]
    logits, history, _, seeds, steps = _inputs(2, THINKER_VOCAB, torch.float16, seed=11, history_len=300)
    history[0, :3] = logits[0].float().topk(3).indices  # the penalty changes the greedy row's argmax
    params = SamplingTensors.from_params(rows)
    want = sample_ref(logits, history, params, seeds, steps, STAGE_THINKER)
    got = sample(logits, history, params, seeds, steps, STAGE_THINKER)
    assert torch.equal(got, want), (got, want)
    assert want[0] != logits[0].float().argmax()


def test_empty_batch():
    params = SamplingTensors.greedy(0)
    tokens = sample(torch.zeros(0, 50), torch.zeros(0, 4, dtype=torch.int64), params, torch.zeros(0, dtype=torch.int64),
                    torch.zeros(0, dtype=torch.int64), STAGE_TALKER)
    assert tokens.shape == (0,) and tokens.dtype == torch.int64


def _op_args(batch=3, vocab=129, suppress=True):
    logits, history, params, seeds, steps = _inputs(batch, vocab, torch.float32, seed=5, history_len=6)
    mask = torch.arange(vocab) % 10 == 3 if suppress else None
    return (logits, history, mask, params.temperature, params.top_k, params.top_p, params.min_p,
            params.repetition_penalty, params.do_sample, seeds, steps, STAGE_TALKER)


def test_op_passes_opcheck():
    torch.library.opcheck(torch.ops.omni_rt_triton.sample.default, _op_args())


def test_schema_and_launch_count(monkeypatch):
    """The schema's names are launch_counts.SAMPLE_ARGS; the count equals the Triton launches plus one copy per
    strided (B,) input."""
    schema = torch.ops.omni_rt_triton.sample.default._schema
    assert tuple(a.name for a in schema.arguments) == SAMPLE_ARGS
    # history is written when record_at >= 0 (the code predictor's frame history); nothing else is
    assert [a.name for a in schema.arguments if a.alias_info and a.alias_info.is_write] == ["history"]
    from kernels import triton_sampling

    launches = []
    original = type(triton_sampling._sample_kernel).__getitem__
    monkeypatch.setattr(type(triton_sampling._sample_kernel), "__getitem__",
                        lambda kernel, grid: launches.append(grid) or original(kernel, grid))
    count = LAUNCHES[f"{NAMESPACE}::sample"]
    args = _op_args()
    torch.ops.omni_rt_triton.sample(*args)
    assert len(launches) == count(args) == SAMPLE_LAUNCHES == 1
    strided = list(args)
    strided[3] = torch.stack([args[3], args[3]], dim=1)[:, 0]  # temperature as a strided view: one copy
    assert count(tuple(strided)) == 2 and count((args[0][:0],) + args[1:]) == 0
    assert count(args[:2], {name: value for name, value in zip(SAMPLE_ARGS[2:], args[2:])}) == 1


def test_one_kernel_and_graph_safe_at_the_thinker_vocabulary():
    """Strict meta audit at B = 8: the op is the only thing dispatched (no torch op around it), no host sync."""
    batch, meta = 8, dict(device="meta")
    inputs = (torch.empty(batch, 152064, dtype=torch.bfloat16, **meta),
              torch.empty(batch, 64, dtype=torch.int64, **meta),
              SamplingTensors.greedy(batch, "meta"), torch.empty(batch, dtype=torch.int64, **meta),
              torch.empty(batch, dtype=torch.int64, **meta))
    audit = StepAudit({}, strict=True, launch_counts=LAUNCHES)
    with torch.inference_mode(), audit:
        tokens = sample(*inputs, STAGE_THINKER, torch.empty(152064, dtype=torch.bool, **meta))
    report = audit.report
    assert tokens.shape == (batch,) and tokens.dtype == torch.int64 and not report.violations
    assert dict(report.ops) == {f"{NAMESPACE}::sample": 1} and report.kernels == 1, (report.ops, report.kernels)


def test_a_sampled_request_through_the_engine_is_the_twins():
    """The tiny engine, every stage sampled (thinker, talker with its suppress mask and penalty, the code
    predictor's draws per frame): the same text and codes with the Triton sampler as with sample_ref."""
    from runtime import dispatch
    from runtime.engine import OmniEngine
    from tests.test_sampling_engine import PROMPT, SAMPLED, _generated

    request = dict(text=PROMPT, **SAMPLED, max_new_tokens=6, talker_max_new_tokens=8, seed=1234)
    outcomes = []
    for choice in ({"sample": "torch"}, {"sample": "triton"}):
        with dispatch.using(choice):  # the engine's loop thread runs in a copy of this context
            engine = OmniEngine.from_pretrained("tiny", scheduler=dict(max_sessions=2))
            try:
                outcomes.append(_generated(engine, engine.generate(**request)))
            finally:
                engine.close()
    (want_tokens, want_codes), (got_tokens, got_codes) = outcomes
    assert want_codes.shape[-1] >= 2, "the tiny talker should speak a few frames"
    assert got_tokens == want_tokens and torch.equal(got_codes, want_codes)


@needs_cuda
@pytest.mark.parametrize("vocab", [2048, 3072, THINKER_VOCAB])
def test_real_shapes_bf16_and_graph_replay(vocab):
    """bf16 logits at the stages' vocabularies, 8 mixed rows: tokens equal sample_ref's on the GPU, eagerly and
    from a captured CUDA graph replayed over fresh logits and steps (the output poisoned before each replay)."""
    batch = 8
    logits, history, params, seeds, steps = _inputs(batch, vocab, torch.bfloat16, seed=vocab, history_len=64)
    logits, history, seeds, steps = _to("cuda", logits.contiguous(), history, seeds, steps)
    params = SamplingTensors(*_to("cuda", *vars(params).values()))
    suppress = talker_suppress(vocab)[0].cuda() if vocab == 3072 else None
    want = sample_ref(logits, history, params, seeds, steps, STAGE_TALKER, suppress)
    assert torch.equal(sample(logits, history, params, seeds, steps, STAGE_TALKER, suppress), want)
    tokens = torch.full((batch,), -7, dtype=torch.int64, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        tokens.copy_(sample(logits, history, params, seeds, steps, STAGE_TALKER, suppress))  # warm-up / compile
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens.copy_(sample(logits, history, params, seeds, steps, STAGE_TALKER, suppress))
    for replay in range(2):
        logits.copy_(torch.randn_like(logits, dtype=torch.float32).mul_(3 + replay))
        steps.add_(1)
        tokens.fill_(-7)
        graph.replay()
        assert torch.equal(tokens, sample_ref(logits, history, params, seeds, steps, STAGE_TALKER, suppress))


def test_compiles_for_sm90():
    """What the interpreter never checks (loop-carried types, the searches' while loops, bf16) compiled to a cubin."""
    from tests.test_triton_attention import can_compile_for_sm90, compile_for_sm90

    if torch.cuda.is_available() or not can_compile_for_sm90():
        pytest.skip("a GPU runs the kernel for real / triton's ptxas not bundled")
    out = compile_for_sm90("""
        TYPES.update({torch.bool: "i1", torch.float64: "fp64"})
        from kernels.sampling import SamplingTensors, STAGE_TALKER
        from kernels.triton_sampling import sample
        for dtype, vocab, suppress in ((torch.float32, 3072, True), (torch.bfloat16, 151936, False)):
            mask = torch.zeros(vocab, dtype=torch.bool) if suppress else None
            sample(torch.zeros(4, vocab, dtype=dtype), torch.zeros(4, 7, dtype=torch.int64), SamplingTensors.greedy(4),
                   torch.zeros(4, dtype=torch.int64), torch.zeros(4, dtype=torch.int64), STAGE_TALKER, mask)
    """)
    assert "compiled 2 launches of ['_sample_kernel']" in out, out
