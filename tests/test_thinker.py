"""Thinker parity with transformers' Qwen3OmniMoeThinkerForConditionalGeneration (5.23, eager, fp32) on both
tiny oracles: logits and hidden states for text-only and mixed text/audio/image/video prompts in a
left-padded batch, cached decode against the full forward, greedy generation token for token, and clear
errors for bad input."""

from __future__ import annotations

import random

import pytest
import torch

from runtime.config import OmniConfig
from tests.reference_generate import thinker_generate
from runtime.models.thinker import MultimodalInputs, Thinker
from runtime.weights import load_weights
from tests.oracle import build_oracle, rel_err
from tests.test_rope_index import PromptBuilder

TOL = 1e-4  # fp32, relative


@pytest.fixture(scope="module", params=["pow2", "odd"])
def pair(request, tmp_path_factory):
    """(transformers' thinker, ours with the same weights, our config)."""
    path = tmp_path_factory.mktemp(request.param)
    oracle = build_oracle(request.param, path, seed=int(torch.randint(0, 2**31, ()).item()))
    cfg = OmniConfig.from_pretrained(path).thinker
    with torch.device("meta"):
        ours = Thinker(cfg)
    load_weights(ours, path, prefix="thinker.", dtype=torch.float32)
    return oracle.thinker, ours.eval(), cfg


def mixed_batch(cfg, rng: random.Random, rows: int = 2, use_audio_in_video: bool = False, kinds=("audio", "image", "video")):
    """Left-padded ids and mask, plus random encoder inputs whose sizes match the placeholders. Every row
    holds each of `kinds` at least once and ends in text."""
    builder = PromptBuilder(cfg, rng)
    prompts = []
    for _ in range(rows):
        ids = builder.text(rng.randint(1, 3))
        for kind in rng.sample(kinds, len(kinds)):
            ids += builder.audio() if kind == "audio" else builder.image() if kind == "image" else \
                builder.video(use_audio_in_video)
            ids += builder.text(rng.randint(0, 2))
        prompts.append(ids + builder.text(rng.randint(1, 3)))
    if rows > 1 and len(prompts[0]) == len(prompts[1]):
        prompts[0] += builder.text(1)  # make sure the batch is left-padded
    ids, mask = builder.batch(prompts)
    meta = builder.metadata()
    patch = cfg.vision.in_channels * cfg.vision.temporal_patch_size * cfg.vision.patch_size ** 2
    mm = dict(use_audio_in_video=use_audio_in_video)
    if builder.audio_frames:
        frames = builder.audio_frames
        mm["input_features"] = torch.randn(len(frames), cfg.audio.num_mel_bins, max(frames))
        mm["feature_attention_mask"] = (torch.arange(max(frames))[None] < torch.tensor(frames)[:, None]).long()
    if meta["image_grid_thw"] is not None:
        mm["pixel_values"] = torch.randn(int(meta["image_grid_thw"].prod(-1).sum()), patch)
        mm["image_grid_thw"] = meta["image_grid_thw"]
    if meta["video_grid_thw"] is not None:
        mm["pixel_values_videos"] = torch.randn(int(meta["video_grid_thw"].prod(-1).sum()), patch)
        mm["video_grid_thw"] = meta["video_grid_thw"]
        mm["video_second_per_grid"] = meta["video_second_per_grid"]
    return ids, mask, mm


def compare_forward(theirs, ours, ids, mask, mm):
    with torch.no_grad():
        ref = theirs(input_ids=ids, attention_mask=mask, output_hidden_states=True, **mm)
        out = ours(ids, mask, MultimodalInputs(**mm), output_hidden_states=True)
    real = mask.bool()  # padded rows are don't-care
    err = rel_err(out.logits[real], ref.logits[real])
    max_abs = (out.logits[real] - ref.logits[real]).abs().max().item()
    assert err <= TOL, f"logits rel err {err:.2e} (max abs {max_abs:.2e})"
    assert len(out.hidden_states) == len(ref.hidden_states)
    for k, (mine, their) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert rel_err(mine[real], their[real]) <= TOL, f"hidden_states[{k}]: {rel_err(mine[real], their[real]):.2e}"
    print(f"logits rel err {err:.2e}, max abs {max_abs:.2e}")
    return out


def test_text_only_logits(pair):
    theirs, ours, cfg = pair
    builder = PromptBuilder(cfg, random.Random())
    ids, mask = builder.batch([builder.text(13), builder.text(6), builder.text(1)])
    compare_forward(theirs, ours, ids, mask, {})


@pytest.mark.parametrize("use_audio_in_video", [False, True])
def test_mixed_prompt_logits(pair, use_audio_in_video):
    theirs, ours, cfg = pair
    ids, mask, mm = mixed_batch(cfg, random.Random(), use_audio_in_video=use_audio_in_video)
    compare_forward(theirs, ours, ids, mask, mm)


def test_image_only_and_video_only_deepstack(pair):
    """DeepStack over one modality (no joint layout) on each side."""
    theirs, ours, cfg = pair
    for kinds in (("image",), ("video",)):
        ids, mask, mm = mixed_batch(cfg, random.Random(), kinds=kinds)
        compare_forward(theirs, ours, ids, mask, mm)


def test_cached_decode_equals_full_forward(pair):
    theirs, ours, cfg = pair
    rng = random.Random()
    ids, mask, mm = mixed_batch(cfg, rng)
    extra = torch.tensor([PromptBuilder(cfg, rng).text(4) for _ in range(ids.shape[0])])
    full_ids = torch.cat((ids, extra), dim=1)
    full_mask = torch.cat((mask, torch.ones_like(extra)), dim=1)
    with torch.no_grad():
        full = ours(full_ids, full_mask, MultimodalInputs(**mm)).logits
        cache = ours.new_cache()
        prefill = ours(ids, mask, MultimodalInputs(**mm), cache=cache)
        steps = [prefill.logits[:, -1:]]
        for k in range(extra.shape[1]):
            step_mask = full_mask[:, :ids.shape[1] + k + 1]
            steps.append(ours(extra[:, k:k + 1], step_mask, cache=cache, rope_deltas=prefill.rope_deltas).logits)
    decoded = torch.cat(steps, dim=1)  # logits for positions L-1 .. L+3
    reference = full[:, ids.shape[1] - 1:]
    err = rel_err(decoded, reference)
    assert err <= TOL, f"cached decode vs full forward rel err {err:.2e}"
    print(f"cached decode vs full forward rel err {err:.2e}")


def test_greedy_generation_matches_transformers(pair):
    theirs, ours, cfg = pair
    rng = random.Random()
    ids, mask, mm = mixed_batch(cfg, rng)
    steps = 8
    free = thinker_generate(ours, ids, mask, max_new_tokens=steps, **mm)[:, ids.shape[1]:].tolist()
    eos = pick_eos(free, steps)
    ours_seq = thinker_generate(ours, ids, mask, max_new_tokens=steps, eos_token_id=eos, **mm)
    with torch.no_grad():  # no pad_token_id: transformers then pads finished rows with the EOS, as we do
        ref_seq = theirs.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=steps,
                                  eos_token_id=eos, **mm)
    new = ours_seq[:, ids.shape[1]:].tolist()
    assert torch.equal(ours_seq, ref_seq), f"ours {new} != transformers {ref_seq[:, ids.shape[1]:].tolist()} (eos {eos})"
    assert len(new[0]) >= 3, f"only {len(new[0])} steps: {new} (eos {eos})"
    print(f"generated {new} with eos {eos}")


def pick_eos(free: list[list[int]], steps: int) -> int:
    """An EOS id that makes generation run at least 3 steps and, if possible, finish one row before the
    other (so that the padding of finished rows is exercised). free: each row's tokens without EOS."""
    def score(token):
        finish = [row.index(token) + 1 if token in row else steps for row in free]
        total = max(finish)
        return (total >= 3, min(finish) < total, total)

    seen = {token for row in free for token in row}
    unused = min(set(range(len(seen) + 1)) - seen)  # never emitted: every row runs all steps
    return max(seen | {unused}, key=score)


def test_bad_inputs_raise_clear_errors(pair):
    _, ours, cfg = pair
    builder = PromptBuilder(cfg, random.Random())
    ids, mask, mm = mixed_batch(cfg, random.Random(), rows=1, kinds=("image",))
    # One image placeholder too many: the count check names both numbers.
    image_tokens = int((ids == cfg.image_token_id).sum())
    bad = torch.cat((ids[:, :2], torch.tensor([[cfg.image_token_id]]), ids[:, 2:]), dim=1)
    with pytest.raises(ValueError, match=f"{image_tokens + 1} placeholder tokens .* {image_tokens} image features"):
        ours(bad, None, MultimodalInputs(**mm))
    with pytest.raises(ValueError, match="placeholder tokens but no image input"):
        ours(ids, mask)

    limit = cfg.text.max_position_embeddings
    long_prompt = torch.tensor([builder.text(limit - 5)])
    with pytest.raises(ValueError, match=f"prompt length {limit - 5} \\+ max_new_tokens 10 .* {limit}"):
        thinker_generate(ours, long_prompt, max_new_tokens=10)
    with pytest.raises(ValueError, match=f"{limit + 1} tokens exceed the thinker's max_position_embeddings {limit}"):
        ours(torch.tensor([builder.text(limit + 1)]))

    with pytest.raises(ValueError, match="empty prompt"):
        thinker_generate(ours, torch.zeros(1, 0, dtype=torch.long), max_new_tokens=4)
    with pytest.raises(ValueError, match="empty prompt: rows \\[1\\]"):
        thinker_generate(ours, torch.ones(2, 3, dtype=torch.long), torch.tensor([[1, 1, 1], [0, 0, 0]]),
                         max_new_tokens=4)
