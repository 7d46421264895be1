"""End-to-end generation against transformers' own `generate` (greedy, no repetition penalty): the same
sequences, the same codec codes, and the same waveform. Also the bad inputs of speech output."""

import pytest
import torch

from runtime.engine import OmniEngine
from runtime.frontend.audio import audio_token_count
from tests.oracle import build_oracle, rel_err

NEWLINE = 10  # any ordinary token id of the tiny vocab


@pytest.fixture(scope="module", params=["pow2", "odd"])
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    oracle = build_oracle(request.param, path, seed=int(torch.randint(0, 2**31, ()).item()))
    return oracle, OmniEngine.from_pretrained(path)


def _text(n):
    return torch.randint(11, 470, (n,)).tolist()  # ordinary ids: the special ids of the oracle start at 480


def _audio_prompt(cfg, frames):
    """A system turn, a user turn with text and an audio span of `frames` mel frames, the assistant prefix."""
    thinker = cfg.thinker
    audio = [thinker.audio_start_token_id] + [thinker.audio_token_id] * audio_token_count(frames) + [484]
    ids = ([cfg.im_start_token_id, cfg.system_token_id, NEWLINE] + _text(4) + [cfg.im_end_token_id, NEWLINE]
           + [cfg.im_start_token_id, cfg.user_token_id, NEWLINE] + audio + _text(5) + [cfg.im_end_token_id, NEWLINE]
           + [cfg.im_start_token_id, cfg.assistant_token_id, NEWLINE])
    return torch.tensor([ids])


def _capture_codes(oracle):
    """transformers' codec codes, read at the input of its code2wav."""
    seen = {}

    def hook(module, args, kwargs):
        seen["codes"] = (args[0] if args else kwargs["codes"]).clone()

    return seen, oracle.code2wav.register_forward_pre_hook(hook, with_kwargs=True)


def speech_request(engine, min_frames=3, attempts=8, **kwargs):
    """Fresh random audio prompts until our greedy speech runs at least `min_frames` frames (a random talker
    sometimes emits EOS at once, which would leave nothing to compare). Returns (request kwargs, result)."""
    for _ in range(attempts):
        frames = int(torch.randint(60, 260, ()).item())
        request = dict(input_ids=_audio_prompt(engine.config, frames), input_features=torch.randn(1, 128, frames),
                       feature_attention_mask=torch.ones(1, frames, dtype=torch.long), **kwargs)
        result = engine.generate(**request, return_audio=True)
        if result.codes.shape[-1] >= min_frames:
            return request, result
    pytest.fail(f"the random talker stopped before {min_frames} frames in {attempts} fresh prompts")


def test_speech_generate_matches_transformers(pair):
    oracle, engine = pair
    thinker_tokens, talker_tokens = 6, 12
    request, ours = speech_request(engine, max_new_tokens=thinker_tokens, talker_max_new_tokens=talker_tokens,
                                   speaker="ethan")
    seen, handle = _capture_codes(oracle)
    try:
        theirs_sequences, theirs_wave = oracle.generate(
            input_ids=request["input_ids"], input_features=request["input_features"],
            feature_attention_mask=request["feature_attention_mask"], return_audio=True,
            thinker_max_new_tokens=thinker_tokens, thinker_do_sample=False, talker_max_new_tokens=talker_tokens,
            talker_do_sample=False, talker_repetition_penalty=1.0, speaker="Ethan",
            thinker_eos_token_id=engine.config.im_end_token_id)
    finally:
        handle.remove()
    assert torch.equal(ours.sequences, theirs_sequences)
    assert torch.equal(ours.codes, seen["codes"])
    theirs_wave = theirs_wave.reshape(-1)
    assert ours.waveform.shape == (1, theirs_wave.numel())
    assert rel_err(ours.waveform[0], theirs_wave) <= 1e-3
    assert set(ours.timings) == {"preprocess", "thinker", "talker", "code2wav"}


def test_text_and_image_prompt_text_only(pair):
    oracle, engine = pair
    cfg = engine.config
    vision = cfg.thinker.vision
    grid = torch.tensor([[1, 4, 6]])
    patches = int(grid.prod())
    pixels = torch.randn(patches, 3 * vision.temporal_patch_size * vision.patch_size ** 2)
    image = [cfg.thinker.vision_start_token_id] + [cfg.thinker.image_token_id] * (patches // 4) + [486]
    ids = torch.tensor([[cfg.im_start_token_id, cfg.user_token_id, NEWLINE] + image + _text(6)
                        + [cfg.im_end_token_id, NEWLINE, cfg.im_start_token_id, cfg.assistant_token_id, NEWLINE]])
    theirs = oracle.generate(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, return_audio=False,
                             thinker_max_new_tokens=5, thinker_do_sample=False, thinker_eos_token_id=cfg.im_end_token_id)
    theirs = theirs[0] if isinstance(theirs, tuple) else theirs
    theirs = getattr(theirs, "sequences", theirs)
    ours = engine.generate(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, max_new_tokens=5,
                           return_audio=False)
    assert torch.equal(ours.sequences, theirs)
    assert ours.codes is None and ours.waveform is None


def test_speech_bad_inputs(pair):
    _, engine = pair
    cfg = engine.config
    frames = 120
    ids = _audio_prompt(cfg, frames)
    features, mask = torch.randn(1, 128, frames), torch.ones(1, frames, dtype=torch.long)
    with pytest.raises(ValueError, match="unknown speaker 'nobody'"):
        engine.generate(input_ids=ids, input_features=features, feature_attention_mask=mask, speaker="nobody")
    with pytest.raises(ValueError, match="assistant turn"):
        engine.generate(input_ids=ids[:, :-3], input_features=features, feature_attention_mask=mask)
    with pytest.raises(ValueError, match="zero-length audio"):
        engine.generate(input_ids=ids, input_features=features, feature_attention_mask=torch.zeros_like(mask))
