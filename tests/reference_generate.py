"""A reference for the tests, outside the runtime's call paths: transformers-shaped greedy thinker generation
on a dynamic KV cache (one prefill of the whole left-padded batch, then one token per step), recording the
states transformers records. The runtime generates through its one engine (runtime/scheduler.py); this
reference checks the Thinker module's generation API against transformers on its own.

Matches transformers' `generate(do_sample=False)` token for token: argmax of the fp32-or-model-dtype logits
(first index on ties), a row stops at its first EOS, later tokens of a finished row are `pad_token_id`
(default: the first EOS id), and the loop ends when every row has finished or after `max_new_tokens`.

Decode positions continue every TM-RoPE axis from the last prompt token (+1 per step), as transformers'
generate does. For a prompt that ends in text this equals `cache length + rope_delta`
(runtime.rope_index.decode_position_ids).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from runtime.batch import check_prompt
from runtime.models.thinker import MultimodalInputs, Thinker


def _eos_ids(eos_token_id: int | Iterable[int] | None, device) -> torch.Tensor:
    if eos_token_id is None:
        return torch.zeros(0, dtype=torch.long, device=device)
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(ids, dtype=torch.long, device=device)


@dataclass
class ThinkerGeneration:
    """A finished thinker generation and, when asked, the states the talker is built from (MODEL_SPEC §8.3),
    for every position fed through the thinker (N = prompt + generated − 1, as transformers records them)."""

    sequences: torch.Tensor  # [B, L + n] int64
    embeddings: torch.Tensor | None = None  # [B, N, H] decoder input after the multimodal merge
    accepted_hidden: torch.Tensor | None = None  # [B, N, H] transformers' hidden_states[hidden_layer]


def thinker_generate(thinker: Thinker, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                     max_new_tokens: int, eos_token_id: int | Iterable[int] | None = None,
                     pad_token_id: int | None = None, **multimodal) -> torch.LongTensor:
    """input_ids: [B, L] prompt, left-padded when rows differ in length; attention_mask: [B, L] (1 = real).
    multimodal: MultimodalInputs fields (input_features, feature_attention_mask, pixel_values,
    image_grid_thw, pixel_values_videos, video_grid_thw, video_second_per_grid, use_audio_in_video).

    Returns [B, L + n] int64: the prompt followed by n <= max_new_tokens generated tokens.
    Raises ValueError for an empty prompt (or an all-padding row) and when L + max_new_tokens exceeds the
    thinker's max_position_embeddings.
    """
    return generate_with_states(thinker, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                                eos_token_id=eos_token_id, pad_token_id=pad_token_id, **multimodal).sequences


@torch.inference_mode()
def generate_with_states(thinker: Thinker, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                         max_new_tokens: int, eos_token_id: int | Iterable[int] | None = None,
                         pad_token_id: int | None = None, hidden_layer: int | None = None,
                         **multimodal) -> ThinkerGeneration:
    """`thinker_generate`, also recording the embeddings and transformers' `hidden_states[hidden_layer]`
    (0 = embeddings, k = output of layer k − 1) of every fed position when `hidden_layer` is given."""
    stepper = ThinkerStepper(thinker, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                             eos_token_id=eos_token_id, pad_token_id=pad_token_id, hidden_layer=hidden_layer,
                             **multimodal)
    while not stepper.done:
        stepper.step()
    return stepper.result()


class ThinkerStepper:
    """Greedy thinker decoding one token at a time: `step()` returns the next token of every row;
    `generate_with_states` runs it to the end.

    The prompt is checked at construction (before any model work); the prefill runs on the first step.
    """

    def __init__(self, thinker: Thinker, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int, eos_token_id: int | Iterable[int] | None = None,
                 pad_token_id: int | None = None, hidden_layer: int | None = None, **multimodal):
        check_prompt(input_ids, attention_mask, max_new_tokens, thinker.cfg.text.max_position_embeddings)
        self.thinker, self.max_new_tokens = thinker, max_new_tokens
        self.attention_mask = attention_mask
        self.multimodal = MultimodalInputs(**multimodal)
        self.eos = _eos_ids(eos_token_id, input_ids.device)
        self.pad_token_id = pad_token_id if pad_token_id is not None else (int(self.eos[0]) if self.eos.numel() else 0)
        self.hidden_layer = hidden_layer
        self.sequences = input_ids  # [B, L + generated]
        self.unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        self.embeddings: list[torch.Tensor] = []  # per forward: [B, fed this call, H]
        self.accepted: list[torch.Tensor] = []
        self.cache = thinker.new_cache()
        self.positions = None  # [3, B, 1] ids of the last fed token
        self.logits = None  # [B, V] of the last fed token
        self.generated = 0
        self.done = max_new_tokens == 0

    def _feed(self, out) -> None:
        self.logits = out.logits[:, -1]
        if self.hidden_layer is not None:
            self.embeddings.append(out.embeddings)
            self.accepted.append(out.selected_hidden)

    @torch.inference_mode()
    def step(self) -> torch.Tensor:
        """Generate one token per row ([B] int64; finished rows get pad_token_id). Sets `done` after the last."""
        if self.done:
            raise RuntimeError("the thinker generation has finished")
        if self.logits is None:  # prefill
            out = self.thinker(self.sequences, self.attention_mask, self.multimodal, cache=self.cache,
                               num_logits_to_keep=1, hidden_layer=self.hidden_layer)
            self.positions = out.position_ids[:, :, -1:]
            self._feed(out)
        next_tokens = self.logits.argmax(-1)  # [B]
        next_tokens = torch.where(self.unfinished, next_tokens, torch.full_like(next_tokens, self.pad_token_id))
        self.sequences = torch.cat((self.sequences, next_tokens[:, None]), dim=1)
        self.unfinished &= ~torch.isin(next_tokens, self.eos)
        self.generated += 1
        self.done = not self.unfinished.any() or self.generated == self.max_new_tokens
        if not self.done:  # feed it: its logits give the next token, its states are recorded
            batch = next_tokens.shape[0]
            if self.attention_mask is not None:
                self.attention_mask = torch.cat((self.attention_mask, self.attention_mask.new_ones(batch, 1)), dim=1)
            self.positions = self.positions + 1
            out = self.thinker(next_tokens[:, None], self.attention_mask, cache=self.cache,
                               position_ids=self.positions, hidden_layer=self.hidden_layer)
            self._feed(out)
        return next_tokens

    def result(self) -> ThinkerGeneration:
        if self.hidden_layer is None or not self.embeddings:
            return ThinkerGeneration(self.sequences)
        return ThinkerGeneration(self.sequences, torch.cat(self.embeddings, dim=1), torch.cat(self.accepted, dim=1))
