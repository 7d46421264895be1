"""The talker's next input built inside its decode step (runtime/decode_inputs.py, ModelRunner.talker_decode_step):
the G codec embeddings as one gather + sum over Talker's stacked tables, bit-equal to the per-codebook lookups
(the order transformers sums them in; tests/test_talker.py compares frame_input with transformers itself), and the
per-slot state the step reads (frame codes, last positions) with padded rows (slot −1) touching only the scratch
row. Graph safety of the step at the released shapes: tests/test_graph_safety.py."""

import pytest
import torch

from runtime.config import OmniConfig
from runtime.options import SchedulerConfig
from runtime.presets import tiny
from runtime.runner import ModelRunner
from runtime.weights import init_random, refresh_folded
from tests.oracle import rel_err

SLOTS = 4


@pytest.fixture(scope="module")
def runner():
    cfg = OmniConfig.from_dict(tiny())
    model = init_random(cfg, device="cpu", dtype=torch.float32, seed=3)
    return ModelRunner(model, cfg, SchedulerConfig(max_sessions=SLOTS, max_seq_len=64, use_graphs=False))


def _random_codes(cfg, rows: int, generator) -> torch.Tensor:
    """[rows, G]: code 0 anywhere in the talker vocab (control ids included), then codebook codes."""
    code0 = torch.randint(0, cfg.talker.text.vocab_size, (rows, 1), generator=generator)
    rest = torch.randint(0, cfg.talker.code_predictor.vocab_size, (rows, cfg.talker.num_code_groups - 1),
                         generator=generator)
    return torch.cat((code0, rest), dim=1)


def _per_codebook_sum(talker, codes: torch.Tensor) -> torch.Tensor:
    """[B, H]: each codebook's own embedding table, stacked in frame order and summed (the unfused form)."""
    tables = [talker.model.codec_embedding, *talker.code_predictor.model.codec_embedding]
    return torch.stack([table(codes[:, g]) for g, table in enumerate(tables)], dim=1).sum(1)


@torch.inference_mode()
def test_frame_input_gather_equals_the_per_codebook_lookups_bit_for_bit(runner):
    cfg, talker = runner.config, runner.model.talker
    generator = torch.Generator().manual_seed(11)
    for rows in (1, 3, 7):
        codes = _random_codes(cfg, rows, generator)
        text = torch.randn(rows, cfg.talker.text.hidden_size, generator=generator)
        got = talker.frame_input(codes, text)
        assert got.shape == (rows, 1, cfg.talker.text.hidden_size)
        assert torch.equal(got[:, 0], _per_codebook_sum(talker, codes) + text)


@torch.inference_mode()
def test_stacked_tables_follow_the_weights_after_refresh(runner):
    """The stacked tables are derived from the parameters: a weight changed by hand shows after refresh_folded."""
    cfg, talker = runner.config, runner.model.talker
    table = talker.code_predictor.model.codec_embedding[2].weight
    saved = table.clone()
    codes = _random_codes(cfg, 2, torch.Generator().manual_seed(12))
    text = torch.zeros(2, cfg.talker.text.hidden_size)
    try:
        table.mul_(-3.0)
        refresh_folded(talker)
        assert torch.equal(talker.frame_input(codes, text)[:, 0], _per_codebook_sum(talker, codes))
    finally:
        table.copy_(saved)
        refresh_folded(talker)


@torch.inference_mode()
def test_step_input_reads_each_slots_frame_and_position_and_pads_touch_only_scratch(runner):
    cfg, model, state = runner.config, runner.model, runner.talker_inputs
    generator = torch.Generator().manual_seed(13)
    state.codes.zero_()
    state.positions.zero_()
    slots = torch.tensor([2, 0, -1])  # two sessions and a padded row
    codes = _random_codes(cfg, 3, generator)
    state.record_codes(slots, codes)
    last = {2: torch.tensor([[[9]], [[11]], [[12]]]), 0: torch.tensor([[[4]], [[4]], [[4]]])}  # [3, 1, 1] each
    history, steps = runner.sampling["thinker"].history, runner.sampling["talker"].steps
    history.copy_(torch.randint(11, 470, history.shape, generator=generator))  # ordinary thinker ids, tiny vocab
    starts = {2: 7, 0: 3}  # each slot's prompt length: where its generated text starts in the history
    for slot, positions in last.items():
        state.start(slot, positions[:, :, -1], starts[slot])
    steps[[2, 0]] = torch.tensor([4, 1])  # frames made so far
    text_ids = torch.stack([history[2, 7 + 4], history[0, 3 + 1], history[-1, 0]])  # the padded row: scratch
    steps[-1], state.text_start[-1] = 0, 0

    embeds, positions = runner.talker_input(slots)

    embed_tokens = model.thinker.model.embed_tokens
    for row in range(2):  # each real row: its slot's frame + its own text, projected alone
        text = model.talker.project_text(embed_tokens(text_ids[row:row + 1]))
        want = model.talker.frame_input(codes[row:row + 1], text)
        assert rel_err(embeds[row:row + 1], want) <= 1e-6
        assert torch.equal(positions[:, row, 0], last[int(slots[row])].reshape(3) + 1)
    assert torch.equal(state.codes[SLOTS], codes[2])  # the padded row's codes went to the scratch row only
    assert torch.equal(state.codes[[1, 3]], torch.zeros(2, cfg.talker.num_code_groups, dtype=torch.long))

    state.advance(slots, positions)
    assert torch.equal(state.positions[:, 2], torch.tensor([10, 12, 13]))
    assert torch.equal(state.positions[:, 0], torch.tensor([5, 5, 5]))
    assert torch.equal(state.positions[:, [1, 3]], torch.zeros(3, 2, dtype=torch.long))  # untouched slots
    assert torch.equal(state.positions[:, SLOTS], torch.ones(3, dtype=torch.long))  # scratch: 0 + 1


@torch.inference_mode()
def test_the_talker_text_on_the_device_follows_the_text_rule(runner):
    """The talker input after frame k carries t_{k+2} while that is a fed token, tts_eos for the generation's
    last token, tts_pad after it (MODEL_SPEC §8.3): read on the device from the thinker's history at the prompt
    length + the talker's steps, the end written once by end_text; a talker that speaks past the row's end reads
    tts_pad. Compared with that rule on the host, step by step, while the text grows and after it ends."""
    cfg, state = runner.config, runner.talker_inputs
    history, steps = runner.sampling["thinker"].history, runner.sampling["talker"].steps
    generator = torch.Generator().manual_seed(17)
    slot, prompt_len, generated = 1, 9, 6
    tokens = torch.randint(11, 470, (generated,), generator=generator).tolist()
    history[slot].fill_(-1)
    history[slot, :prompt_len] = torch.randint(11, 470, (prompt_len,), generator=generator)
    state.start(slot, torch.zeros(3), prompt_len)

    def rule(frame: int, known: int, done: bool) -> int:  # the host's definition: 1-based index of t_{k+2}
        wanted = frame + 1
        if wanted < known or (wanted == known and not done):
            return tokens[wanted - 1]
        return cfg.tts_eos_token_id if wanted == known else cfg.tts_pad_token_id

    slots = torch.tensor([slot])
    for known in range(1, generated + 1):  # the thinker writes one token a tick; the talker follows when ready
        history[slot, prompt_len + known - 1] = tokens[known - 1]
        for frame in range(1, known):  # every frame whose text is ready
            steps[slot] = frame
            assert state.text_ids(history, steps, slots).tolist() == [rule(frame, known, done=False)], (known, frame)
    runner.end_text(slot, prompt_len, generated)
    assert history.shape[1] == runner.max_seq_len + 1
    for frame in [*range(1, generated + 4), history.shape[1], history.shape[1] + 50]:  # past the row: clamped
        steps[slot] = frame
        assert state.text_ids(history, steps, slots).tolist() == [rule(frame, generated, done=True)], frame
