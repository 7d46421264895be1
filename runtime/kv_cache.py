"""KV caches. `DynamicKVCache` grows by concatenation (eager CPU path and parity tests); static
preallocated caches for CUDA graphs live beside it."""

from __future__ import annotations

import torch


class DynamicKVCache:
    """Per-layer (k, v), each (batch, seq, kv_heads, head_dim), appended along seq."""

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    @property
    def seq_len(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[1]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat((self.keys[layer], k), dim=1)
            v = torch.cat((self.values[layer], v), dim=1)
        self.keys[layer], self.values[layer] = k, v
        return k, v
