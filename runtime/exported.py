"""Exported backends (export/ort.py, export/trt.py) inside the one engine: the runner's steps for the modules
an engine runs as exported graphs. Those graphs carry their state explicitly (past_* keys in, present_* out;
Code2Wav's stream state in and out), so here each session runs alone: its slot's cached keys become the step's
past, the new keys go back into the slot, and Code2Wav keeps one explicit stream state per slot. No CUDA graphs
(an exported engine is its own graph).

    thinker_step     replaces Thinker.decode: prefill chunks and decode steps
    talker_step      replaces Talker.forward: the talker prompt's prefill and decode steps
    code2wav_stream  replaces Code2Wav.decode_step: one frame per call on the slot's stream state

The encoders and the code predictor (a fresh cache per frame) need nothing here: the engine calls them as they
are. The full Code2Wav decode (`code2wav`) has no place in an engine that decodes frame by frame.
"""

from __future__ import annotations

import torch

from runtime.kv_cache import DynamicKVCache, StaticKVCache

EXPORTED_STEPS = {"thinker_step", "talker_step", "code2wav_stream"}


class ExportedSteps:
    """The steps of the exported modules among `backends` (names as in export/ort.py), one session at a time."""

    def __init__(self, runner, backends: set[str]):
        self.runner = runner
        self.thinker, self.talker = "thinker_step" in backends, "talker_step" in backends
        self.code2wav = "code2wav_stream" in backends
        self.streams: dict[int, object] = {}  # slot -> Code2WavState

    def reset(self, slot: int) -> None:
        self.streams.pop(slot, None)

    def thinker_step(self, embeds, positions, slot: int, deepstack=None, hidden_layer: int = 0):
        """embeds [1, L, H], positions [3, 1, L] after the slot's cached tokens -> (logits [1, V], the
        `hidden_layer` states [1, L, H] or None)."""
        cache = self.runner.thinker_cache
        past, start = _past(cache, slot)
        layers = [hidden_layer] if hidden_layer else []
        logits, states = self.runner.model.thinker.decode(embeds, positions, None, past, deepstack,
                                                          hidden_layers=layers, num_logits_to_keep=1)
        _write_back(cache, slot, past, start)
        return logits[:, -1], states[0] if states else None

    def thinker_decode(self, tokens, positions, slots: list[int]) -> torch.Tensor:
        """tokens [B], positions [3, B, 1] -> logits [B, V], row by row."""
        embed = self.runner.model.thinker.model.embed_tokens
        return torch.cat([self.thinker_step(embed(tokens[i:i + 1, None]), positions[:, i:i + 1], slot)[0]
                          for i, slot in enumerate(slots)])

    def talker_step(self, embeds, positions, slot: int):
        """embeds [1, L, H], positions [3, 1, L] -> (logits [1, V], hidden [1, H]) of the last position."""
        cache = self.runner.talker_cache
        past, start = _past(cache, slot)
        logits, hidden = self.runner.model.talker(embeds, positions, None, past, num_logits_to_keep=1)
        _write_back(cache, slot, past, start)
        return logits[:, -1], hidden[:, -1]

    def talker_decode(self, embeds, positions, slots: list[int]):
        """embeds [B, 1, H], positions [3, B, 1] -> (logits [B, V], hidden [B, H]), row by row."""
        rows = [self.talker_step(embeds[i:i + 1], positions[:, i:i + 1], slot) for i, slot in enumerate(slots)]
        return torch.cat([logits for logits, _ in rows]), torch.cat([hidden for _, hidden in rows])

    def code2wav_frame(self, codes, slots: list[int]) -> list[torch.Tensor]:
        """codes [B, G] of one new frame per slot -> each slot's new samples [n] (num_samples(1) on its first
        frame, the hop after), from its explicit stream state."""
        code2wav, out = self.runner.model.code2wav, []
        for i, slot in enumerate(slots):
            if slot not in self.streams:
                self.streams[slot] = code2wav.new_state(1)
            out.append(code2wav.decode_step(codes[i:i + 1, :, None], self.streams[slot])[0, 0])
        return out


def _past(cache: StaticKVCache, slot: int) -> tuple[DynamicKVCache, int]:
    """A slot's cached keys/values as the dynamic cache an exported step reads its past_* from."""
    start = int(cache.lengths[slot])  # a host read: fine here, exported steps run one session at a time
    past = DynamicKVCache(cache.keys.shape[0])
    if start:
        past.keys = [cache.keys[layer, slot, :start][None] for layer in range(cache.keys.shape[0])]
        past.values = [cache.values[layer, slot, :start][None] for layer in range(cache.values.shape[0])]
    return past, start


def _write_back(cache: StaticKVCache, slot: int, past: DynamicKVCache, start: int) -> None:
    """The step's present_* (past + new) -> the new keys into the slot after its cached ones; its length."""
    end = past.keys[0].shape[1]
    for layer, (keys, values) in enumerate(zip(past.keys, past.values)):
        cache.keys[layer, slot, start:end] = keys[0, start:end]
        cache.values[layer, slot, start:end] = values[0, start:end]
    cache.lengths[slot] = end
