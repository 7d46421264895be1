"""Code2Wav streaming states in per-slot pools (Code2WavSlots): sessions at different points of their streams,
decoded one frame per call in shared batches with padded rows, each equal to the full decode of its codes."""

import pytest
import torch

from runtime.engine import OmniEngine
from runtime.models.code2wav import Code2WavSlots
from tests.oracle import build_oracle, rel_err


@pytest.fixture(scope="module")
def code2wav(tmp_path_factory):
    path = tmp_path_factory.mktemp("oracle")
    build_oracle("odd", path, seed=int(torch.randint(0, 2**31, ()).item()))
    return OmniEngine.from_pretrained(path).model.code2wav


@torch.no_grad()
def test_sessions_in_slots_equal_their_full_decodes(code2wav):
    cfg = code2wav.cfg
    frames = cfg.sliding_window + 5  # past the ring buffer's first wrap
    starts = {2: 0, 0: 3, 3: 4}  # slot -> tick of its first frame (slot 1 stays free)
    codes = {slot: torch.randint(0, cfg.codebook_size, (1, cfg.num_quantizers, frames)) for slot in starts}
    pool = Code2WavSlots(code2wav, 4, "cpu", torch.float32)
    for slot in starts:
        pool.conv[next(iter(pool.conv))][slot].normal_()  # a stale stream: reset must clear it
        pool.reset(slot)
    free_slot_state = [t[1].clone() for t in (*pool.conv.values(), *pool.tails.values())]
    out = {slot: [] for slot in starts}
    for tick in range(frames + max(starts.values())):
        due = {slot: tick - start for slot, start in starts.items() if 0 <= tick - start < frames}
        for first in (True, False):
            group = [slot for slot, frame in due.items() if (frame == 0) == first]
            if not group:
                continue
            batch = torch.cat([codes[slot][:, :, due[slot]:due[slot] + 1] for slot in group]
                              + [torch.randint(0, cfg.codebook_size, (1, cfg.num_quantizers, 1))])  # + a padded row
            wav = code2wav.decode_frame(batch, pool.view(torch.tensor(group + [-1]), first))
            assert wav.shape[-1] == (pool.first_frame_samples if first else pool.frame_samples)
            assert not wav[-1].any(), "a padded row produced samples"
            for row, slot in enumerate(group):
                out[slot].append(wav[row, 0])
    for slot in starts:
        want = code2wav(codes[slot])[0, 0]
        got = torch.cat(out[slot])
        assert got.shape == want.shape
        assert rel_err(got, want) <= 1e-5, f"slot {slot}"
    for before, after in zip(free_slot_state, (t[1] for t in (*pool.conv.values(), *pool.tails.values()))):
        assert torch.equal(before, after), "the free slot's state changed"
    assert pool.frames.tolist() == [frames, 0, frames, frames, 0]
