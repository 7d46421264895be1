"""What the decode steps build their inputs from and write their outputs to, kept per slot on the device, so each
captured step takes only slot ids from the host and nothing is gathered, copied or concatenated eagerly per session
between the graphs.

Thinker (`ThinkerInputs`): each slot's last sampled token and the TM-RoPE position it was fed at. Text decode
positions advance by one on all three axes (MODEL_SPEC §5), so the step feeds the last token at that position + 1
and records what it samples. The prefill's end sets both (the first token and the prompt's last position).

Talker (`TalkerInputs`, MODEL_SPEC §8.4): the talker input after frame k is Σ codec embeddings of frame k's G
codes + the projected text of frame k, at the slot's last position + 1. Kept here, the step computes all of it
inside its CUDA graph: the code predictor's step records each slot's frame codes, the talker prefill sets the
slot's last position, and the decode step reads both. The text of frame k is read on the device too, from the
thinker's token history (runtime/sampling.py SlotSampling.history: the prompt's ids, then every generated token
at prompt length + i), at `text_start` (the prompt length) + the talker's steps so far: t_{k+2} while that is a
fed token. When the text ends the host writes, once per session (`end_text`), tts_eos over the generation's last
token and tts_pad over the rest of the row, which every later step reads (its index is clamped to the row's last
entry, a tts_pad: the history is one longer than the longest session). The talker step records the code 0 it
samples and the hidden state that produced it, the code predictor's step reads them and records the frame's
codes, and Code2Wav's step reads those: a frame passes from stage to stage on the device, by slot.

What the host reads of a tick (`DecodeReadout`): the thinker's recent tokens (a ring of `thinker_steps` rows: the
token of a slot's draw d in row d mod thinker_steps, so the several steps of one tick never overwrite each other)
and the talker's last code 0s (the last row) are one [thinker_steps + 1, slots + 1] tensor, so the tick's
read-back is one copy of it, no gather; a frame's samples stay in Code2Wav's per-slot output rows until its packet
is copied out.

Positions are float32: TM-RoPE time positions of a video are fractional (seconds per grid × rate), and the
rotary tables are computed in fp32 from whatever dtype they get, so integer positions give the same angles.

Rows are indexed by slot id; slot −1 (a padded batch row) indexes the last row, the scratch row, so a padded row
reads and writes only that (tensor indexing counts −1 from the end, as the KV caches' scratch slot does).
"""

from __future__ import annotations

import torch


class DecodeReadout:
    """tokens: [ring + 1, slots + 1] int64 on the device, what a tick's read-back copies to the host: rows
    [0, ring) the thinker's draws (ThinkerInputs.ring: draw d of a slot in row d mod ring), row `ring` each slot's
    last code 0 (TalkerInputs.code0)."""

    def __init__(self, slots: int, ring: int, device):
        self.ring = ring
        self.tokens = torch.zeros(ring + 1, slots + 1, dtype=torch.long, device=device)

    @property
    def thinker(self) -> torch.Tensor:
        return self.tokens[:self.ring]

    @property
    def talker(self) -> torch.Tensor:
        return self.tokens[self.ring]


class ThinkerInputs:
    """tokens: [slots + 1] int64, each slot's last sampled token (not fed yet); positions: [3, slots + 1] float32,
    the position of the last token fed (the prompt's last, then each decode step's); ring: [R, slots + 1] the
    slots' recent draws (DecodeReadout's thinker rows)."""

    def __init__(self, readout: DecodeReadout):
        self.ring = readout.thinker
        rows, device = self.ring.shape[1], self.ring.device
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)
        self.positions = torch.zeros(3, rows, dtype=torch.float32, device=device)

    def state_tensors(self) -> list[torch.Tensor]:
        return [self.tokens, self.positions, self.ring]

    def start(self, slot: int, first_token: torch.Tensor, last_positions: torch.Tensor) -> None:
        """After the thinker prefill: first_token [1] sampled from the prompt (the slot's draw 0),
        last_positions [3] (or [3, 1, 1])."""
        self.tokens[slot] = first_token.reshape(())
        self.ring[0, slot] = first_token.reshape(())
        self.positions[:, slot] = last_positions.reshape(3)

    def build(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """slots [B] -> (tokens [B], positions [3, B, 1]): each slot's last token at its last position + 1."""
        return self.tokens[slots], (self.positions[:, slots] + 1)[:, :, None]

    def advance(self, slots: torch.Tensor, positions: torch.Tensor, tokens: torch.Tensor, drawn_at: torch.Tensor
                ) -> None:
        """slots [B], positions [3, B, 1] just fed, tokens [B] just sampled as each slot's draw `drawn_at` [B]
        (last, as the cache's commit: a failed step changes nothing)."""
        self.positions[:, slots] = positions[:, :, 0]
        self.tokens[slots] = tokens
        self.ring.index_put_((drawn_at % self.ring.shape[0], slots), tokens)


class TalkerInputs:
    """codes: [slots + 1, G] int64, the last frame of each slot (written by the code predictor's step);
    positions: [3, slots + 1] float32, the TM-RoPE position of each slot's last talker input (t, h, w);
    code0: [slots + 1] int64 (a row of DecodeReadout) and hidden: [slots + 1, H], the next frame's code 0 and the
    talker state that produced it (written by the talker's prefill and decode steps, read by the code
    predictor's); text_start: [slots + 1] int64, where the slot's generated text starts in the thinker's token
    history (its prompt length)."""

    def __init__(self, readout: DecodeReadout, num_code_groups: int, hidden_size: int, dtype):
        self.code0 = readout.talker
        rows, device = self.code0.shape[0], self.code0.device
        self.codes = torch.zeros(rows, num_code_groups, dtype=torch.long, device=device)
        self.positions = torch.zeros(3, rows, dtype=torch.float32, device=device)
        self.hidden = torch.zeros(rows, hidden_size, dtype=dtype, device=device)
        self.text_start = torch.zeros(rows, dtype=torch.long, device=device)

    def state_tensors(self) -> list[torch.Tensor]:
        return [self.codes, self.positions, self.code0, self.hidden, self.text_start]

    def record_code0(self, slots: torch.Tensor, code0: torch.Tensor, hidden: torch.Tensor) -> None:
        """slots [B], code0 [B] just sampled, hidden [B, H] the state it came from."""
        self.code0[slots] = code0
        self.hidden[slots] = hidden

    def frame_inputs(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """slots [B] -> (hidden [B, H], code 0 [B]): what the code predictor's frame starts from."""
        return self.hidden[slots], self.code0[slots]

    def start(self, slot: int, last_positions: torch.Tensor, text_start: int) -> None:
        """After the talker prefill: last_positions [3] (or [3, 1, 1]) of the prompt's last position; text_start:
        the thinker prompt's length (its first generated token's index in the thinker's history)."""
        self.positions[:, slot] = last_positions.reshape(3)
        self.text_start[slot] = text_start

    def record_codes(self, slots: torch.Tensor, codes: torch.Tensor) -> None:
        """slots [B] (−1 = padded), codes [B, G] of the frame each slot has just made (inside the code predictor's
        step)."""
        self.codes[slots] = codes

    def text_ids(self, thinker_history: torch.Tensor, talker_steps: torch.Tensor, slots: torch.Tensor
                 ) -> torch.Tensor:
        """thinker_history [slots + 1, W] (thinker SlotSampling.history), talker_steps [slots + 1] (the talker's
        draws so far, = frames made), slots [B] -> [B] thinker ids of each slot's next talker text: history entry
        text_start + steps (t_{k+2} for the input after frame k = steps − 1), clamped to the row's last entry (a
        tts_pad once the text has ended: see the module docstring)."""
        index = (self.text_start[slots] + talker_steps[slots]).clamp_(max=thinker_history.shape[1] - 1)
        return thinker_history[slots, index]

    def build(self, talker, embed_tokens, text_ids: torch.Tensor, slots: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """text_ids [B] thinker token ids (`text_ids`), slots [B] -> (embeds [B, 1, H], positions [3, B, 1]): each
        slot's last frame embedded and summed plus its projected text (Talker.frame_input), at its last position
        + 1."""
        text = talker.project_text(embed_tokens(text_ids))  # [B, H]
        embeds = talker.frame_input(self.codes[slots], text)
        positions = self.positions[:, slots] + 1  # [3, B]
        return embeds, positions[:, :, None]

    def advance(self, slots: torch.Tensor, positions: torch.Tensor) -> None:
        """slots [B], positions [3, B, 1] of the inputs just fed: the slots' last positions now."""
        self.positions[:, slots] = positions[:, :, 0]
