"""Greedy text generation with the thinker: one prefill, then one token per step on a KV cache.

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
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got {tuple(input_ids.shape)}")
    batch, length = input_ids.shape
    if batch == 0 or length == 0:
        raise ValueError(f"empty prompt: input_ids has shape {tuple(input_ids.shape)}; give at least one token per row")
    if attention_mask is not None:
        empty_rows = (attention_mask.sum(-1) == 0).nonzero().flatten().tolist()
        if empty_rows:
            raise ValueError(f"empty prompt: rows {empty_rows} of attention_mask have no real token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    limit = thinker.cfg.text.max_position_embeddings
    if length + max_new_tokens > limit:
        raise ValueError(f"prompt length {length} + max_new_tokens {max_new_tokens} = {length + max_new_tokens} "
                         f"exceeds the thinker's max_position_embeddings {limit}")
    if max_new_tokens == 0:
        return ThinkerGeneration(input_ids)

    device = input_ids.device
    eos = _eos_ids(eos_token_id, device)
    if pad_token_id is None:
        pad_token_id = int(eos[0]) if eos.numel() else 0
    cache = thinker.new_cache()

    collect = hidden_layer is not None
    embeddings, accepted = [], []

    def record(step_out):
        if collect:
            embeddings.append(step_out.embeddings)
            accepted.append(step_out.hidden_states[hidden_layer])

    out = thinker(input_ids, attention_mask, MultimodalInputs(**multimodal), cache=cache, num_logits_to_keep=1,
                  output_hidden_states=collect)
    record(out)
    positions = out.position_ids[:, :, -1:]  # [3, B, 1] ids of the last prompt token
    sequences = input_ids
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        next_tokens = out.logits[:, -1].argmax(-1)  # [B]
        next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad_token_id))
        sequences = torch.cat((sequences, next_tokens[:, None]), dim=1)
        unfinished &= ~torch.isin(next_tokens, eos)
        if not unfinished.any() or step == max_new_tokens - 1:
            break
        if attention_mask is not None:
            attention_mask = torch.cat((attention_mask, attention_mask.new_ones(batch, 1)), dim=1)
        positions = positions + 1
        out = thinker(next_tokens[:, None], attention_mask, cache=cache, position_ids=positions,
                      output_hidden_states=collect)
        record(out)
    if not collect:
        return ThinkerGeneration(sequences)
    return ThinkerGeneration(sequences, torch.cat(embeddings, dim=1), torch.cat(accepted, dim=1))
