"""Prefill on the host side: a prompt's embeddings (the encoders, the embedding merge, TM-RoPE ids), then its
chunks through the runner (runtime/runner.py): in static form, each chunk front-padded to one of the runner's
prefill buckets and run by the captured step (its graph on a GPU), or eagerly, each chunk attending over its
slot's prefix with the prefill attention op. The thinker prefill yields the states the talker prompt is built
from; the talker prompt is prefilled the same way.

Shapes: L = prompt length, n = tokens of a chunk, C = its bucket, H = hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from runtime.models.decoder import DeepStack
from runtime.rope_index import get_rope_index
from runtime.runner import check_room


@dataclass
class PromptEmbedding:
    """A thinker prompt ready for prefill: embeds [1, L, H], positions [3, 1, L] (TM-RoPE), and its DeepStack
    additions: dense [levels, 1, L, H] for static prefill, sparse (or None) for eager prefill."""

    embeds: torch.Tensor
    positions: torch.Tensor
    deepstack: torch.Tensor | DeepStack | None


def embed_prompt(runner, prompt) -> PromptEmbedding:
    """A one-row prompt (runtime.engine.Prompt) -> its embeddings, with the encoders run and their features
    merged in, its TM-RoPE positions and DeepStack additions (dense for static prefill: one scatter for
    the whole prompt, so that chunks slice it without host reads)."""
    thinker, inputs, host_ids = runner.model.thinker, prompt.inputs, prompt.input_ids
    upload = runner.transfers.upload  # the prompt's ids live on the host (runtime/engine.py Prompt)
    audio_embeds = getattr(inputs, "audio_embeds", None)  # encoded with the rest of a batch (runtime/batch.py)
    if audio_embeds is None and inputs.input_features is not None:
        audio_embeds = runner.encode_audio(inputs)  # its captured stage when it has one, else None
    def encode_vision(pixels, grid):  # its captured stage when it has one
        return runner.encode_vision(pixels, grid) or thinker.encode_vision(pixels, grid)

    if audio_embeds is None:
        embeds, deepstack = thinker.embed(host_ids, inputs, upload=upload, encode_vision=encode_vision)
    else:
        embeds, deepstack = thinker.embed(host_ids, replace(inputs, input_features=None, feature_attention_mask=None),
                                          required=False, upload=upload, encode_vision=encode_vision)
        audio_rows = upload((host_ids == thinker.cfg.audio_token_id)[..., None])  # [1, L, 1]
        embeds = embeds.masked_scatter(audio_rows, audio_embeds.to(embeds.dtype))
    # from the host ids and grids: the positions without a device read
    positions, _ = get_rope_index(host_ids, None, inputs.image_grid_thw, inputs.video_grid_thw,
                                  inputs.audio_frames(), inputs.video_second_per_grid, inputs.use_audio_in_video,
                                  config=thinker.cfg)
    positions = upload(positions)
    if runner.static_prefill:
        length, hidden = host_ids.shape[1], runner.config.thinker.text.hidden_size
        if deepstack is not None:
            deepstack = deepstack.to_dense(1, length, hidden, runner.dtype, runner.device)
        else:
            levels = len(runner.config.thinker.vision.deepstack_visual_indexes)
            deepstack = torch.zeros(levels, 1, length, hidden, dtype=runner.dtype, device=runner.device)
    return PromptEmbedding(embeds, positions, deepstack)


def thinker_prefill(runner, prompt: PromptEmbedding, slot: int, start: int, end: int, want_states: bool):
    """Prompt positions [start, end) of one slot. Returns (the last position's logits [1, V] (None before the
    prompt's last chunk), the talker's states of the chunk [1, n, H] (accept-layer output, or the embeddings
    for accept layer 0) when `want_states`)."""
    check_room(runner.thinker_cache, end)
    embeds, positions = prompt.embeds[:, start:end], prompt.positions[:, :, start:end]
    layer = runner.accept_layer if want_states else 0
    if runner.exported is not None and runner.exported.thinker:
        deepstack = (DeepStack(dense=prompt.deepstack[:, :, start:end]) if runner.static_prefill
                     else _deepstack_slice(prompt.deepstack, start, end))
        logits, accepted = runner.exported.thinker_step(embeds, positions, slot, deepstack, layer)
        return logits, (embeds if layer == 0 else accepted) if want_states else None
    if runner.static_prefill:
        deepstack = prompt.deepstack[:, :, start:end]
        (embeds_c, positions_c, deepstack_c), pad, num_valid = _front_padded(runner, embeds, positions, deepstack)
        outputs = runner.run("thinker_prefill",
                             (embeds_c, positions_c, deepstack_c, runner.slot_ids([slot]), num_valid))
        hidden, accepted = outputs[0], outputs[1][:, pad:] if layer else None
    else:
        view = runner.thinker_cache.view(runner.slot_ids([slot]), end - start, end, prefill_slot=slot)
        deepstack = _deepstack_slice(prompt.deepstack, start, end)
        out = runner.model.thinker.model(embeds, positions, None, view, deepstack, output_layers=layer > 0)
        view.commit()
        hidden, accepted = out.hidden[:, -1], out.layer_outputs[layer - 1] if layer else None
    # the next token's logits, on the prompt's last chunk only
    logits = runner.model.thinker.lm_head(hidden) if end == prompt.embeds.shape[1] else None  # [1, V]
    if not want_states:
        return logits, None
    return logits, embeds if layer == 0 else accepted


def talker_prefill(runner, embeds, positions, slot: int):
    """The talker prompt (embeds [1, P, H], positions [3, 1, P]) into one slot -> (logits [1, V],
    hidden [1, H]) of its last position: chunks of prefill_chunk (front-padded buckets when static)."""
    length = embeds.shape[1]
    check_room(runner.talker_cache, length)
    if runner.exported is not None and runner.exported.talker:
        return runner.exported.talker_step(embeds, positions, slot)
    slots = runner.slot_ids([slot])
    if not runner.static_prefill:
        view = runner.talker_cache.view(slots, length, length, prefill_slot=slot)
        logits, hidden = runner.model.talker(embeds, positions, None, view, num_logits_to_keep=1)
        view.commit()
        return logits[:, -1], hidden[:, -1]
    for start in range(0, length, runner.prefill_chunk):
        end = min(start + runner.prefill_chunk, length)
        (embeds_c, positions_c), _, num_valid = _front_padded(runner, embeds[:, start:end], positions[:, :, start:end])
        logits, hidden = runner.run("talker_prefill", (embeds_c, positions_c, slots, num_valid))
    return logits, hidden


def _front_padded(runner, embeds, positions, deepstack=None):
    """A chunk (embeds [1, n, H], positions [3, 1, n], deepstack [levels, 1, n, H]) front-padded with zeros
    to the smallest bucket C >= n: ((embeds, positions[, deepstack]) at C, pad = C − n, num_valid [1])."""
    count = embeds.shape[1]
    pad = next(size for size in runner.prefill_buckets if size >= count) - count
    padded = [F.pad(embeds, (0, 0, pad, 0)), F.pad(positions, (pad, 0))]
    if deepstack is not None:
        padded.append(F.pad(deepstack, (0, 0, pad, 0)))
    return padded, pad, torch.full((1,), count, dtype=torch.long, device=runner.device)


def _deepstack_slice(deepstack: DeepStack | None, start: int, end: int) -> DeepStack | None:
    """The sparse DeepStack of prompt positions [start, end): its mask columns and its visual rows' features."""
    if deepstack is None:
        return None
    mask = deepstack.visual_mask[:, start:end]
    if not bool(mask.any()):
        return None
    before = int(deepstack.visual_mask[:, :start].sum())
    count = int(mask.sum())
    return DeepStack(mask, [level[before:before + count] for level in deepstack.features])
