"""Device-side sampling (kernels/sampling.py) and its parameters (runtime/sampling.py).

The filters equal transformers' own logits processors at the three stages' vocabularies; the Gumbel-max draw
follows the filtered distribution (chi-square) and never leaves it; a row's draw depends only on (seed, stage,
step); the Philox words equal Triton's `tl.randint4x`; the op is graph-safe under the strict meta audit.
"""

import json

import pytest
import torch
import triton
import triton.language as tl
from transformers.generation import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                     SuppressTokensLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
                                     TopPLogitsWarper)

from kernels.sampling import (STAGE_CODE_PREDICTOR, STAGE_TALKER, STAGE_THINKER, SamplingTensors, draw_offsets,
                              filter_logits_ref, philox4x32, philox_uniform, sample_ref)
from runtime.graph_audit import StepAudit
from runtime.sampling import SamplingParams, StageSampling

THINKER_VOCAB, TALKER_VOCAB, CODE_PREDICTOR_VOCAB = 152064, 3072, 2048  # runtime/presets.py, released config
CODEC_EOS = 2150  # talker codec EOS id (runtime/presets.py); ids >= vocab - 1024 but EOS are suppressed
CHI2_DF5_Q999 = 20.515  # 0.999 quantile of chi-square with 5 degrees of freedom (tables; scipy.stats.chi2.ppf)
CHI2_DF2_Q999 = 13.816  # ... with 2 degrees of freedom

# One row per case: sampled with every filter, greedy, temperature 0, filters off, strong penalty, ...
ROW_PARAMS = [
    SamplingParams(do_sample=True, temperature=0.9, top_k=50, top_p=1.0, repetition_penalty=1.05),
    SamplingParams(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, min_p=0.05, repetition_penalty=1.3),
    SamplingParams(do_sample=False, repetition_penalty=1.1),
    SamplingParams(do_sample=True, temperature=1.3, top_k=0, top_p=0.95, min_p=0.0),
    SamplingParams(do_sample=True, temperature=0.5, top_k=0, top_p=1.0, min_p=0.1, repetition_penalty=0.8),
    SamplingParams(do_sample=True, temperature=1.0, top_k=1000, top_p=0.5),
    SamplingParams(do_sample=True, temperature=0.0, top_k=5),
    SamplingParams(do_sample=True, temperature=1.1, top_k=3000000, top_p=0.9, min_p=0.2, repetition_penalty=2.0),
]


def distinct_logits(batch: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Random logits without ties (a tie straddling a top-p cut may be broken either way by any sort):
    a permuted grid through a monotone cubic, spread like real logits (a few high, many low)."""
    rows = []
    for _ in range(batch):
        grid = (torch.randperm(vocab, generator=generator).double() + 0.5) / vocab * 2 - 1  # (-1, 1)
        rows.append((6 * grid ** 3 + 2 * grid).float())
    return torch.stack(rows)


def histories(batch: int, vocab: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """[B, length] ids with repeats, each row a different number of entries, -1 after them."""
    ids = torch.randint(0, vocab, (batch, length), generator=generator)
    ids[:, length // 2:] = ids[:, : length - length // 2]  # repeats: each token penalised once
    used = torch.randint(0, length + 1, (batch,), generator=generator)
    used[0] = length
    return torch.where(torch.arange(length)[None] < used[:, None], ids, -1)


def transformers_filter(row_logits, row_history, params: SamplingParams, suppress_ids) -> torch.Tensor:
    """One row through transformers' processors, built under generate's conditions (generation/utils.py)."""
    scores, input_ids = row_logits[None].clone(), row_history[row_history >= 0][None]
    if params.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(float(params.repetition_penalty))(input_ids, scores)
    if suppress_ids is not None:
        scores = SuppressTokensLogitsProcessor(suppress_ids)(input_ids, scores)
    if params.do_sample and params.temperature != 0:
        warpers = [TemperatureLogitsWarper(float(params.temperature))] if params.temperature != 1.0 else []
        warpers += [TopKLogitsWarper(params.top_k)] if params.top_k != 0 else []
        warpers += [TopPLogitsWarper(float(params.top_p))] if params.top_p < 1.0 else []
        warpers += [MinPLogitsWarper(float(params.min_p))]
        for warper in warpers:
            scores = warper(input_ids, scores)
    return scores[0]


def talker_suppress(vocab: int) -> tuple[torch.Tensor, list[int]]:
    ids = [i for i in range(vocab - 1024, vocab) if i != CODEC_EOS]
    mask = torch.zeros(vocab, dtype=torch.bool)
    mask[ids] = True
    return mask, ids


@pytest.mark.parametrize("vocab", [THINKER_VOCAB, TALKER_VOCAB, CODE_PREDICTOR_VOCAB])
def test_filters_equal_transformers_processors(vocab):
    generator = torch.Generator().manual_seed(vocab)
    batch = len(ROW_PARAMS)
    logits = distinct_logits(batch, vocab, generator)
    history = histories(batch, vocab, 40, generator)
    suppress, suppress_ids = talker_suppress(vocab) if vocab == TALKER_VOCAB else (None, None)
    got = filter_logits_ref(logits, history, SamplingTensors.from_params(ROW_PARAMS), suppress)
    for row, params in enumerate(ROW_PARAMS):
        want = transformers_filter(logits[row], history[row], params, suppress_ids)
        finite = torch.isfinite(want)
        assert torch.equal(torch.isfinite(got[row]), finite), (row, params)
        assert (got[row][~finite] == float("-inf")).all()
        err = ((got[row][finite] - want[finite]).norm() / want[finite].norm()).item()
        assert err <= 1e-6, (row, err)
        kept = int(finite.sum())
        print(f"row {row}: {kept} of {vocab} kept, rel err {err:.1e}")
    assert 1 < int(torch.isfinite(got[1]).sum()) <= 20  # the filters did cut (top-k 20, then top-p / min-p)


def draw_many(logits_row, params: SamplingParams, count: int, seed: int = 1234, stage: int = STAGE_TALKER):
    """`count` draws of one row: the same (seed, stage), steps 0..count-1 (one batch of count copies)."""
    logits = logits_row[None].expand(count, -1)
    history = torch.full((count, 1), -1)
    tensors = SamplingTensors.from_params([params] * count)
    seeds = torch.full((count,), seed)
    return sample_ref(logits, history, tensors, seeds, torch.arange(count), stage)


def chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * tokens.numel()
    support = expected > 0
    assert counts[~support].sum() == 0, "a token outside the filtered support was drawn"
    return float(((counts[support] - expected[support]) ** 2 / expected[support]).sum())


def test_draw_follows_the_distribution():
    probs = torch.tensor([0.3, 0.25, 0.2, 0.12, 0.08, 0.05])
    tokens = draw_many(probs.log(), SamplingParams(do_sample=True, temperature=1.0, top_k=0), 20000)
    statistic = chi_square(tokens, probs)
    print(f"chi-square {statistic:.2f} (df 5, 0.999 quantile {CHI2_DF5_Q999})")
    assert statistic < CHI2_DF5_Q999


@pytest.mark.parametrize("params", [SamplingParams(do_sample=True, temperature=0.7, top_k=3),
                                    SamplingParams(do_sample=True, temperature=0.7, top_k=0, top_p=0.8)])
def test_draw_stays_inside_top_k_and_top_p(params):
    probs = torch.tensor([0.3, 0.25, 0.2, 0.12, 0.08, 0.05])
    logits = probs.log()
    filtered = transformers_filter(logits, torch.full((1,), -1), params, None)
    expected = filtered.softmax(dim=-1)
    assert int((expected > 0).sum()) == 3  # both cases keep the top 3 (top-p: 0.05, 0.08, 0.12 fall below 0.2)
    tokens = draw_many(logits, params, 12000, seed=99)
    statistic = chi_square(tokens, expected)
    print(f"chi-square {statistic:.2f} (df 2, 0.999 quantile {CHI2_DF2_Q999})")
    assert statistic < CHI2_DF2_Q999


def test_a_rows_draw_depends_only_on_its_seed_stage_and_step():
    generator = torch.Generator().manual_seed(7)
    vocab = TALKER_VOCAB
    logits = torch.randn(16, vocab, generator=generator)
    history = histories(16, vocab, 12, generator)
    params = [ROW_PARAMS[i % len(ROW_PARAMS)] for i in range(16)]
    params[5] = SamplingParams(do_sample=True, temperature=1.0, top_k=0)  # the row under test: wide support
    seeds = torch.randint(0, 2**62, (16,), generator=generator)
    steps = torch.randint(0, 1000, (16,), generator=generator)

    def draw(rows):
        return sample_ref(logits[rows], history[rows], SamplingTensors.from_params([params[i] for i in rows]),
                          seeds[rows], steps[rows], STAGE_TALKER)

    alone = draw([5])
    beside_seven = draw([0, 1, 2, 3, 4, 5, 6, 7])[5]
    padded_bucket = draw([9, 5] + list(range(10, 16)) + [0, 1, 2, 3, 4, 6, 7, 8])[1]
    assert alone.item() == beside_seven.item() == padded_bucket.item()
    # the same row over steps: every draw equal whatever the batch, and different seeds / stages differ
    rows = torch.full((64,), 5)
    one = sample_ref(logits[rows], history[rows], SamplingTensors.from_params([params[5]] * 64), seeds[rows],
                     torch.arange(64), STAGE_TALKER)
    assert torch.equal(one[:8], torch.stack([draw_at(logits, history, params[5], seeds[5], s) for s in range(8)]))
    other_seed = sample_ref(logits[rows], history[rows], SamplingTensors.from_params([params[5]] * 64),
                            seeds[rows] + 1, torch.arange(64), STAGE_TALKER)
    other_stage = sample_ref(logits[rows], history[rows], SamplingTensors.from_params([params[5]] * 64),
                             seeds[rows], torch.arange(64), STAGE_CODE_PREDICTOR)
    assert (one != other_seed).sum() > 48 and (one != other_stage).sum() > 48


def draw_at(logits, history, params, seed, step):
    return sample_ref(logits[5:6], history[5:6], SamplingTensors.from_params([params]), seed.view(1),
                      torch.tensor([step]), STAGE_TALKER)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_rows_are_the_plain_argmax(dtype):
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(8, THINKER_VOCAB, generator=generator).to(dtype)
    logits[3, 100:104] = logits[3].max() + 1  # a tie at the top: the first index wins, as torch.argmax
    params = [SamplingParams(), SamplingParams(do_sample=True, temperature=0.0, top_k=1, top_p=0.1)] * 4
    tokens = sample_ref(logits, torch.full((8, 4), -1), SamplingTensors.from_params(params),
                        torch.arange(8), torch.arange(8), STAGE_THINKER)
    assert torch.equal(tokens, logits.float().argmax(dim=-1))
    assert tokens[3].item() == 100


def test_suppressed_tokens_are_never_drawn():
    vocab = TALKER_VOCAB
    suppress, _ = talker_suppress(vocab)
    logits = torch.zeros(256, vocab)
    logits[:, -1024:] = 5.0  # the suppressed codes would win every draw
    tokens = sample_ref(logits, torch.full((256, 1), -1), SamplingTensors.from_params(
        [SamplingParams(do_sample=True, top_k=0)] * 256), torch.full((256,), 5), torch.arange(256), STAGE_TALKER,
        suppress)
    assert not suppress[tokens].any()
    assert (tokens == CODEC_EOS).any()  # EOS, the one high id left, still wins draws


@triton.jit
def _randint4x_kernel(out_ptr, seed, offsets_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    words = tl.randint4x(seed, tl.load(offsets_ptr + offs))
    for index in tl.static_range(4):
        tl.store(out_ptr + offs * 4 + index, words[index].to(tl.int64) & 0xFFFFFFFF)


def test_philox_matches_the_reference_and_triton():
    # Random123's known answer for Philox4x32-10 with key 0 and counter 0
    assert philox4x32(torch.tensor([0]), torch.tensor([[0]]))[0, 0].tolist() == [
        0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    for seed, step, stage in [(0, 0, STAGE_THINKER), (987654321, 17, STAGE_TALKER), (2**40 + 3, 2**20, 2), (-5, 3, 1)]:
        offsets = draw_offsets(torch.tensor([step]), stage) + torch.arange(16)
        words = torch.zeros(64, dtype=torch.int64)
        _randint4x_kernel[(1,)](words, seed, offsets, N=16)
        assert torch.equal(words, philox4x32(torch.tensor([seed]), offsets[None])[0].reshape(-1))
        uniforms = philox_uniform(torch.tensor([seed]), draw_offsets(torch.tensor([step]), stage), 61)
        assert torch.equal(uniforms[0], (((words[:61] >> 9) * 2 + 1).float() * 2.0 ** -24))
        assert (uniforms > 0).all() and (uniforms < 1).all()


def test_sampling_is_graph_safe_and_counted():
    """Strict meta audit at B = 8 and the thinker's vocabulary: no host sync, no host copy, no CPU work."""
    batch, vocab = 8, THINKER_VOCAB
    meta = dict(device="meta")
    params = SamplingTensors.greedy(batch, "meta")
    inputs = (torch.empty(batch, vocab, dtype=torch.bfloat16, **meta), torch.empty(batch, 64, dtype=torch.int64, **meta),
              params, torch.empty(batch, dtype=torch.int64, **meta), torch.empty(batch, dtype=torch.int64, **meta))
    audit = StepAudit({}, strict=True)
    with torch.inference_mode(), audit:
        tokens = sample_ref(*inputs, STAGE_THINKER, torch.empty(vocab, dtype=torch.bool, **meta))
    report = audit.report
    print(f"sample_ref at B={batch}, V={vocab}: {report.kernels} kernels; top ops {report.ops.most_common(6)}")
    assert tokens.shape == (batch,) and tokens.device.type == "meta" and tokens.dtype == torch.int64
    assert not report.violations and report.host_syncs == report.h2d_copies == report.d2h_copies == 0
    assert report.kernels > 0


def test_set_row_rewrites_the_persistent_buffers_in_place():
    tensors = SamplingTensors.greedy(4)
    pointers = [getattr(tensors, name).data_ptr() for name in SamplingTensors.DTYPES]
    params = SamplingParams(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, min_p=0.1, repetition_penalty=1.2)
    tensors.set_row(2, params)
    assert pointers == [getattr(tensors, name).data_ptr() for name in SamplingTensors.DTYPES]
    expected = SamplingTensors.from_params([SamplingParams(do_sample=False, top_k=0)] * 2 + [params]
                                           + [SamplingParams(do_sample=False, top_k=0)])
    for name in SamplingTensors.DTYPES:
        assert torch.equal(getattr(tensors, name), getattr(expected, name)), name
    assert tensors.rows(3).top_k.tolist() == [0, 0, 20]


@pytest.mark.parametrize("field, value, error", [
    ("temperature", -0.1, ValueError), ("top_k", -1, ValueError), ("top_k", 2.5, TypeError),
    ("top_p", 0.0, ValueError), ("top_p", 1.5, ValueError), ("min_p", 1.2, ValueError),
    ("min_p", -0.1, ValueError), ("repetition_penalty", 0.0, ValueError), ("do_sample", 1, TypeError),
    ("temperature", float("nan"), TypeError),
])
def test_invalid_parameters_name_the_field(field, value, error):
    with pytest.raises(error, match=f"SamplingParams.{field}"):
        SamplingParams(**{field: value})


def test_stage_defaults_and_generation_config(tmp_path):
    defaults = StageSampling.from_checkpoint(tmp_path)  # no generation_config.json: the released defaults
    assert not defaults.thinker.do_sample
    assert defaults.talker == SamplingParams(do_sample=True, temperature=0.9, top_k=50, top_p=1.0,
                                             repetition_penalty=1.05)
    assert defaults.code_predictor == SamplingParams(do_sample=True, temperature=1.0, top_k=50, top_p=0.8)
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "talker_do_sample": False,
         "talker_temperature": None, "bos_token_id": 1}))
    loaded = StageSampling.from_checkpoint(tmp_path)
    assert loaded.thinker == SamplingParams(do_sample=True, temperature=0.6, top_k=20, top_p=0.95)
    assert not loaded.talker.do_sample and loaded.talker.temperature == 0.9
    assert not loaded.code_predictor.do_sample  # follows the talker's do_sample
    (tmp_path / "generation_config.json").write_text(json.dumps({"talker_top_p": 2}))
    with pytest.raises(ValueError, match="talker_.*SamplingParams.top_p"):
        StageSampling.from_checkpoint(tmp_path)


def test_slot_sampling_state_per_slot():
    """SlotSampling (what the runner's steps read): admission sets a slot's parameters, seed, step 0 and history
    (the prompt as its prefix); `sample` draws each row as sample_ref with that row's own state, then advances
    its step and appends the token; padded rows (slot -1) touch only the scratch row."""
    from runtime.sampling import SlotSampling

    torch.manual_seed(0)
    state = SlotSampling(slots=3, history_len=6, stage=STAGE_TALKER, device="cpu")
    talker = SamplingParams(do_sample=True, temperature=0.9, top_k=5, repetition_penalty=1.3)
    state.admit(2, talker, seed=77, prefix=torch.tensor([[4, 9]]))
    state.admit(0, SamplingParams(), seed=5)
    assert state.history[2].tolist() == [4, 9, -1, -1, -1, -1] and state.filled.tolist() == [0, 0, 2, 0]
    logits = torch.randn(3, 32)
    slots = torch.tensor([2, -1, 0])
    scratch_before = state.history[1].clone()
    tokens = state.sample(logits, slots)
    for row, slot, params, seed, history in ((0, 2, talker, 77, [[4, 9]]), (2, 0, SamplingParams(), 5, [[-1]])):
        want = sample_ref(logits[row:row + 1], torch.tensor(history), SamplingTensors.from_params([params]),
                          torch.tensor([seed]), torch.tensor([0]), STAGE_TALKER)
        assert tokens[row] == want[0], (row, slot)
    assert state.steps.tolist() == [1, 0, 1, 1] and state.filled.tolist() == [1, 0, 3, 1]
    assert state.history[2, :3].tolist() == [4, 9, tokens[0].item()] and state.history[0, 0] == tokens[2]
    assert torch.equal(state.history[1], scratch_before)  # slot 1 is nobody's: untouched
    state.admit(2, talker, seed=77)  # a new request in slot 2: nothing of the last one is left
    assert state.steps[2] == 0 and state.filled[2] == 0 and (state.history[2] == -1).all()
