"""What the talker's decode step builds its input from, kept per slot on the device (MODEL_SPEC §8.4).

The talker input after frame k is Σ codec embeddings of frame k's G codes + the projected text of frame k, at the
slot's last position + 1. Kept here, the step computes all of it inside its CUDA graph: the code predictor's step
records each slot's frame codes, the talker prefill sets the slot's last position, and the decode step reads both
and takes only the text token ids from the host (a fed token, or tts_eos / tts_pad: their projections are the
same text projection of their thinker embeddings). Nothing is gathered or concatenated eagerly per session.

Rows are indexed by slot id; slot −1 (a padded batch row) indexes the last row, the scratch row, so a padded row
reads and writes only that (tensor indexing counts −1 from the end, as the KV caches' scratch slot does).
"""

from __future__ import annotations

import torch


class TalkerInputs:
    """codes: [slots + 1, G] int64, the last frame of each slot (written by the code predictor's step);
    positions: [3, slots + 1] int64, the TM-RoPE position of each slot's last talker input (t, h, w)."""

    def __init__(self, slots: int, num_code_groups: int, device):
        self.codes = torch.zeros(slots + 1, num_code_groups, dtype=torch.long, device=device)
        self.positions = torch.zeros(3, slots + 1, dtype=torch.long, device=device)

    def state_tensors(self) -> list[torch.Tensor]:
        return [self.codes, self.positions]

    def start(self, slot: int, last_positions: torch.Tensor) -> None:
        """After the talker prefill: last_positions [3] (or [3, 1, 1]) of the prompt's last position."""
        self.positions[:, slot] = last_positions.reshape(3)

    def record_codes(self, slots: torch.Tensor, codes: torch.Tensor) -> None:
        """slots [B] (−1 = padded), codes [B, G] of the frame each slot has just made (inside the code predictor's
        step)."""
        self.codes[slots] = codes

    def build(self, talker, embed_tokens, text_ids: torch.Tensor, slots: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """text_ids [B] thinker token ids, slots [B] -> (embeds [B, 1, H], positions [3, B, 1]): each slot's last
        frame embedded and summed plus its projected text (Talker.frame_input), at its last position + 1."""
        text = talker.project_text(embed_tokens(text_ids))  # [B, H]
        embeds = talker.frame_input(self.codes[slots], text)
        positions = self.positions[:, slots] + 1  # [3, B]
        return embeds, positions[:, :, None]

    def advance(self, slots: torch.Tensor, positions: torch.Tensor) -> None:
        """slots [B], positions [3, B, 1] of the inputs just fed: the slots' last positions now."""
        self.positions[:, slots] = positions[:, :, 0]
