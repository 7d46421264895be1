"""AudioEncoder parity with transformers' Qwen3OmniMoeAudioEncoder (5.23) on the tiny oracle configs: same
checkpoint, fresh random log-mels, several audios per call (MODEL_SPEC §5).

The tiny configs keep the real n_window = 50 (100-frame chunks, 13 tokens each) and use n_window_infer
200 (pow2) / 300 (odd): attention windows of 26 / 39 tokens, so a few hundred frames already span several.
"""

import copy

import pytest
import torch
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import _get_feat_extract_output_lengths

from runtime.config import OmniConfig
from runtime.models.audio_encoder import AudioEncoder, audio_layout
from runtime.weights import load_weights
from tests.oracle import build_oracle, rel_err

TOL_FP32 = 1e-4
TOL_BF16_VS_BF16 = 5e-3  # ours and transformers both in bf16


@pytest.fixture(scope="module", params=["pow2", "odd"])
def pair(request, tmp_path_factory):
    """(variant, seed, ours, transformers' audio tower) with the same weights, loaded from the saved checkpoint."""
    seed = int(torch.randint(0, 2**31, ()).item())
    tmp = tmp_path_factory.mktemp(request.param)
    oracle = build_oracle(request.param, tmp, seed=seed)
    cfg = OmniConfig.from_pretrained(tmp).thinker.audio
    with torch.device("meta"):
        ours = AudioEncoder(cfg)
    load_weights(ours, tmp, prefix="thinker.audio_tower.")
    return request.param, seed, ours.eval(), oracle


def window_frames(cfg) -> int:
    return cfg.n_window_infer  # one attention window of full chunks, in mel frames


def random_lengths(cfg, kind: str, generator: torch.Generator) -> list[int]:
    """Frame counts per audio for one call."""
    randint = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=generator))  # noqa: E731
    chunk = 2 * cfg.n_window
    if kind == "mixed":
        # Random lengths in [37, 450] that are not whole chunks, one longer than 3 attention windows, one
        # shorter than a chunk, and the whole-chunk edge cases: one chunk exactly, one window exactly.
        lengths = []
        while len(lengths) < 4:
            n = randint(37, 450)
            if n % chunk:
                lengths.append(n)
        long = randint(3 * window_frames(cfg) + 1, 3 * window_frames(cfg) + chunk - 1)
        return lengths[:2] + [long, randint(1, chunk - 1), chunk] + lengths[2:] + [window_frames(cfg)]
    if kind == "all_short":  # no full chunk: chunks padded to less than 100 frames, a smaller window
        return [randint(1, chunk - 1) for _ in range(3)]
    if kind == "single_long":  # one audio, several windows, a short tail window
        return [randint(2 * window_frames(cfg) + 1, 4 * window_frames(cfg) - 1)]
    raise ValueError(kind)


def random_features(cfg, lengths: list[int], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """([num_mel_bins, sum(lengths)] log-mel-like values, [num_audios] int64)."""
    features = torch.randn(cfg.num_mel_bins, sum(lengths), generator=generator)
    return features, torch.tensor(lengths, dtype=torch.long)


@torch.no_grad()
def test_sinusoid_table_is_transformers(pair):
    _, _, ours, oracle = pair
    theirs = oracle.thinker.model.audio_tower.positional_embedding.positional_embedding
    table = ours.positional_embedding
    assert torch.equal(table, theirs[: table.shape[0]])


@pytest.mark.parametrize("kind", ["mixed", "all_short", "single_long"])
@torch.no_grad()
def test_matches_transformers(pair, kind):
    variant, seed, ours, oracle = pair
    cfg = ours.cfg
    generator = torch.Generator().manual_seed(seed + 1)
    lengths = random_lengths(cfg, kind, generator)
    features, feature_lens = random_features(cfg, lengths, generator)

    out = ours(features, feature_lens)
    ref = oracle.thinker.model.audio_tower(features, feature_lens=feature_lens).last_hidden_state
    expected_tokens = _get_feat_extract_output_lengths(feature_lens, cfg.n_window)
    assert [AudioEncoder.num_tokens(n, cfg.n_window) for n in lengths] == expected_tokens.tolist()
    assert out.shape == ref.shape == (int(expected_tokens.sum()), cfg.output_dim)
    err = rel_err(out, ref)
    windows = audio_layout(lengths, cfg.n_window, cfg.n_window_infer).window_tokens
    print(f"{variant} {kind} (seed {seed}) frames {lengths} -> windows {windows}: rel err {err:.2e}, "
          f"max abs {(out - ref).abs().max().item():.2e}")
    assert err <= TOL_FP32


@torch.no_grad()
def test_encode_matches_get_audio_features(pair):
    """The processor's padded batch + feature_attention_mask, as the thinker takes it. Padding frames hold
    garbage, which must not leak in."""
    variant, seed, ours, oracle = pair
    cfg = ours.cfg
    generator = torch.Generator().manual_seed(seed + 2)
    lengths = [173, 61, 2 * window_frames(cfg) + 57]
    batch = torch.randn(len(lengths), cfg.num_mel_bins, max(lengths), generator=generator) * 5
    mask = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).long()  # [B, T]

    outs = ours.encode(batch, mask)
    ref = oracle.thinker.get_audio_features(batch, feature_attention_mask=mask).last_hidden_state
    assert [o.shape[0] for o in outs] == [AudioEncoder.num_tokens(n) for n in lengths]
    err = rel_err(torch.cat(outs), ref)
    print(f"{variant} encode: rel err {err:.2e}")
    assert err <= TOL_FP32


@torch.no_grad()
def test_batched_vs_separate_as_transformers(pair):
    """A short audio's tail chunk is padded to the longest chunk of the call, so it encodes differently
    next to a long audio than alone (MODEL_SPEC §5); a long audio is unaffected (its own full chunks
    already set the padding, and windows never cross audios). Ours must reproduce both behaviours."""
    variant, seed, ours, oracle = pair
    theirs = oracle.thinker.model.audio_tower
    cfg = ours.cfg
    generator = torch.Generator().manual_seed(seed + 3)
    lengths = [9, 2 * window_frames(cfg) + 43]  # 9 frames: the padding moves it most (~5e-3 to 1e-2)
    features, feature_lens = random_features(cfg, lengths, generator)
    counts = [AudioEncoder.num_tokens(n) for n in lengths]

    run_ours = lambda f, n: ours(f, n)  # noqa: E731
    run_theirs = lambda f, n: theirs(f, feature_lens=n).last_hidden_state  # noqa: E731
    results = {}
    for name, run in (("ours", run_ours), ("theirs", run_theirs)):
        together = run(features, feature_lens).split(counts)
        alone = [run(part, torch.tensor([n])) for part, n in zip(features.split(lengths, dim=1), lengths)]
        results[name] = together, alone

    (ours_together, ours_alone), (ref_together, ref_alone) = results["ours"], results["theirs"]
    for a, b in zip(ours_together + tuple(ours_alone), ref_together + tuple(ref_alone)):
        assert rel_err(a, b) <= TOL_FP32
    ref_shift = rel_err(ref_together[0], ref_alone[0])
    our_shift = rel_err(ours_together[0], ours_alone[0])
    print(f"{variant}: short audio batched vs alone moves by {ref_shift:.2e} (transformers), {our_shift:.2e} (ours)")
    assert ref_shift > 10 * TOL_FP32 and abs(our_shift - ref_shift) <= 1e-3 * ref_shift
    assert rel_err(ref_together[1], ref_alone[1]) <= 1e-6
    assert rel_err(ours_together[1], ours_alone[1]) <= 1e-6


@torch.no_grad()
def test_bf16_matches_transformers_bf16(pair):
    variant, seed, ours, oracle = pair
    ours = copy.deepcopy(ours).to(torch.bfloat16)
    theirs = copy.deepcopy(oracle.thinker.model.audio_tower).to(torch.bfloat16)
    generator = torch.Generator().manual_seed(seed + 4)
    features, feature_lens = random_features(ours.cfg, random_lengths(ours.cfg, "mixed", generator), generator)
    out = ours(features, feature_lens)
    ref = theirs(features.to(torch.bfloat16), feature_lens=feature_lens).last_hidden_state
    assert out.dtype == torch.bfloat16
    err = rel_err(out, ref)
    print(f"{variant} bf16: rel err {err:.2e}")
    assert err <= TOL_BF16_VS_BF16


def test_num_tokens():
    frames = torch.arange(0, 3001)
    expected = _get_feat_extract_output_lengths(frames, 50)
    assert torch.equal(AudioEncoder.num_tokens(frames), expected)
    assert [AudioEncoder.num_tokens(n) for n in (100, 101, 250, 1000, 1, 8, 9)] == [13, 14, 33, 130, 1, 1, 2]


def test_windows_as_transformers_cuts_them():
    """MODEL_SPEC §5: audios of 2050 and 130 frames with n_window_infer 800 give cu_seqlens
    [0, 104, 208, 267, 284]."""
    layout = audio_layout([2050, 130], n_window=50, n_window_infer=800)
    assert layout.window_tokens == [104, 104, 59, 17]
    assert layout.audio_tokens == [267, 17]


@torch.no_grad()
def test_empty_call(pair):
    _, _, ours, _ = pair
    out = ours(torch.zeros(ours.cfg.num_mel_bins, 0), torch.zeros(0, dtype=torch.long))
    assert out.shape == (0, ours.cfg.output_dim)
    with pytest.raises(ValueError):
        ours(torch.zeros(ours.cfg.num_mel_bins, 10), torch.tensor([11]))


def test_num_tokens_agrees_with_the_frontend():
    """The prompt builder reserves one <|audio_pad|> per encoder output row: its count must be ours."""
    frontend = pytest.importorskip("runtime.frontend.audio", reason="runtime/frontend/audio.py not present")
    frames = torch.arange(0, 3001)
    assert torch.equal(frontend.audio_token_count(frames), AudioEncoder.num_tokens(frames))
