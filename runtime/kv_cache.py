"""KV caches. `DynamicKVCache` grows by concatenation (the eager path of one request and the parity tests);
`StaticKVCache` is preallocated once per stage with one slot per concurrent session (the scheduler and CUDA
graphs: nothing is allocated and no shape changes while decoding).

A decoder layer hands its new k/v to the cache and gets the attention output back (`attend`), so each cache
owns how keys are stored and read: concatenation + full attention, or a slot write + decode attention.
"""

from __future__ import annotations

import torch

from kernels.attention import causal_mask, split_counters
from kernels.launch_counts import FUSED_ATTENTION_MAX_NEW
from runtime import dispatch


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

    def attend(self, layer: int, q, k, v, mask, scale: float) -> torch.Tensor:
        """q: [B, L, q_heads, D]; k, v: [B, L, kv_heads, D] of the new tokens; mask: [B|1, 1, L, S] bool."""
        k, v = self.update(layer, k, v)
        return dispatch.attention(q, k, v, mask, scale)


class StaticKVCache:
    """Preallocated keys/values for `num_slots` sessions of up to `max_len` tokens each.

    keys, values: [layers, num_slots + 1, max_len, kv_heads, head_dim]; the extra last slot is scratch: padded
      batch rows (slot id −1) write there, so a padded row never touches a session's cache.
    lengths: [num_slots + 1] int64 on the device, tokens cached per slot (the device copy the kernels read;
      the scheduler keeps its own host count per session for limits and never reads this back).
    split_counters: int32, zeros between calls: decode attention's split merge inside its one launch (kernels.
      attention.split_counters); every layer's call uses them in turn, on the stage's one stream.
    """

    def __init__(self, num_layers: int, num_slots: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device):
        shape = (num_layers, num_slots + 1, max_len, num_kv_heads, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(num_slots + 1, dtype=torch.long, device=device)
        self.split_counters = split_counters(device)
        self.num_slots, self.max_len = num_slots, max_len

    @classmethod
    def for_decoder(cls, cfg, num_slots: int, max_len: int, dtype: torch.dtype, device) -> "StaticKVCache":
        """A cache shaped for a runtime.config.DecoderConfig."""
        return cls(cfg.num_layers, num_slots, max_len, cfg.num_kv_heads, cfg.head_dim, dtype, device)

    @property
    def scratch_slot(self) -> int:
        return self.num_slots

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def reset(self, slot: int) -> None:
        """Forget a slot's tokens (its old keys are never read again: reads stop at `lengths`)."""
        self.lengths[slot] = 0

    def view(self, slot_ids: torch.Tensor, num_new: int, seq_len: int, prefill_slot: int | None = None,
             num_valid: torch.Tensor | None = None) -> "StaticCacheView":
        """Bind batch rows to slots for one forward of `num_new` tokens per row.

        slot_ids: [B] int64 on the device, −1 for padded rows. seq_len: the host's largest cached + new
        length among the rows (checked against max_len here, before any work).
        prefill_slot: for a prefill chunk of one session (B = 1, eager), its slot on the host: the chunk
        then attends with the prefill attention op (dispatch.attention) over the slot's first seq_len keys.
        num_valid: [B] int64 on the device, real tokens per row when a chunk is front-padded to a static length
        (a captured prefill bucket): the first num_new − num_valid tokens of a row are padding; they write only
        the scratch slot and the row's slot advances by num_valid."""
        if seq_len > self.max_len:
            raise ValueError(f"{seq_len} tokens exceed this cache's {self.max_len} tokens per session")
        return StaticCacheView(self, slot_ids, num_new, seq_len, prefill_slot, num_valid)


class StaticCacheView:
    """A StaticKVCache seen by one forward: each row writes its `num_new` tokens after its slot's cached ones
    and attends over the slot (dispatch.decode_attention). `commit()` advances the slots' lengths afterwards;
    all of it is device work without host syncs, so a step can be captured in a CUDA graph."""

    def __init__(self, cache: StaticKVCache, slot_ids: torch.Tensor, num_new: int, seq_len: int,
                 prefill_slot: int | None = None, num_valid: torch.Tensor | None = None):
        self.cache, self.num_new, self.seq_len_host, self.prefill_slot = cache, num_new, seq_len, prefill_slot
        self.slot_ids = slot_ids  # [B], −1 = padded row
        self.rows = torch.where(slot_ids >= 0, slot_ids, cache.scratch_slot)  # [B] slot written by each row
        start = cache.lengths[self.rows]  # [B] tokens cached before this forward
        offsets = torch.arange(num_new, device=slot_ids.device).expand(len(slot_ids), num_new)  # [B, L]
        if num_valid is None:
            self.new_lengths = start + num_new  # [B]
            self.write_rows = self.rows[:, None].expand(-1, num_new)  # [B, L]
        else:  # front padding: token j of a row is real from j = num_new − num_valid on
            offsets = offsets - (num_new - num_valid)[:, None]
            self.new_lengths = start + num_valid
            self.write_rows = torch.where(offsets >= 0, self.rows[:, None], cache.scratch_slot)
        # padded tokens and rows (scratch) stay in bounds
        self.write_at = (start[:, None] + offsets).clamp(min=0, max=cache.max_len - 1)  # [B, L]

    @property
    def seq_len(self) -> int:
        """Cached + new tokens of the longest row (host value, for limits and the prefill/decode decision)."""
        return self.seq_len_host - self.num_new

    def attend(self, layer: int, q, k, v, mask, scale: float) -> torch.Tensor:
        """q: [B, L, q_heads, D]; k, v: [B, L, kv_heads, D]. `mask` is unused: causality and each row's
        cached length come from the slot lengths."""
        self.cache.keys[layer].index_put_((self.write_rows, self.write_at), k)
        self.cache.values[layer].index_put_((self.write_rows, self.write_at), v)
        return self._attend_cached(layer, q, scale)

    def norm_rope_attend(self, layer: int, q, k, v, q_norm_weight, k_norm_weight, eps: float, cos, sin,
                         scale: float) -> torch.Tensor:
        """`attend` from the raw projections: q: [B, L, q_heads, D]; k, v: [B, L, kv_heads, D] before q/k-norm
        and rotary; cos/sin: [B, L, D]. Up to FUSED_ATTENTION_MAX_NEW new tokens per row (decode steps, the code
        predictor's frame) the norm + rotary, the k/v write into the slots and the attention are one op
        (dispatch.decode_norm_rope_attention); a longer chunk (prefill) runs the norm + rotary + write as one op
        (dispatch.qk_norm_rope_cache_write), then the attention over the slots."""
        if self.prefill_slot is None and self.num_new <= FUSED_ATTENTION_MAX_NEW:
            return dispatch.decode_norm_rope_attention(q, k, v, q_norm_weight, k_norm_weight, eps, cos, sin,
                                                       self.cache.keys[layer], self.cache.values[layer],
                                                       self.write_rows, self.write_at, self.slot_ids,
                                                       self.new_lengths, scale, self.cache.split_counters)
        q = dispatch.qk_norm_rope_cache_write(q, k, v, q_norm_weight, k_norm_weight, eps, cos, sin,
                                              self.cache.keys[layer], self.cache.values[layer], self.write_rows,
                                              self.write_at)
        return self._attend_cached(layer, q, scale)

    def _attend_cached(self, layer: int, q, scale: float) -> torch.Tensor:
        """q: [B, L, q_heads, D] over the slots, whose keys/values already hold this forward's tokens."""
        if self.prefill_slot is not None:  # one session's chunk: plain causal attention over its prefix
            length = self.seq_len_host
            keys = self.cache.keys[layer][self.prefill_slot, :length][None]  # [1, S, kv_heads, D]
            values = self.cache.values[layer][self.prefill_slot, :length][None]
            mask = causal_mask(self.num_new, length, q.device)
            return dispatch.attention(q, keys, values, mask, scale)
        return dispatch.decode_attention(q, self.cache.keys[layer], self.cache.values[layer], self.slot_ids,
                                         self.new_lengths, scale, self.cache.split_counters)

    def commit(self) -> None:
        """Advance the rows' slots by the tokens this forward wrote (padded rows advance only scratch)."""
        self.cache.lengths.index_put_((self.rows,), self.new_lengths)
        self.cache.lengths[self.cache.scratch_slot] = 0


class FrameKVCache:
    """A cache for a short forward schedule known in advance, preallocated for one call (the code predictor's
    frame: a prefill of 2 positions, then single steps, G positions in all). Each forward is a `step` view, a
    StaticCacheView whose slots are the batch rows and whose write positions and lengths are slices of tensors
    made once per call, so a step adds no index work of its own and no shape changes (CUDA graphs: the
    buffers come from the graph's pool).

    keys, values: [layers, B, max_len, kv_heads, head_dim], zeroed (masked-off keys are never garbage). A cache
    can serve call after call: each call's steps write positions 0, 1, ... again and attend only over what this
    call wrote (lengths_after), so what an earlier call left behind is never read.
    cos, sin: [B, max_len, head_dim], the owner's RoPE table of positions 0 .. max_len − 1 when it keeps one
    (runtime/models/talker.py CodePredictor.frame_cache), else None.
    """

    def __init__(self, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device):
        shape = (num_layers, batch, max_len, num_kv_heads, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        # no split counters: a cache made per call would zero them in every frame (one more kernel), and its few
        # positions (G = 16 for the released code predictor) are one split of decode attention anyway
        self.split_counters = None
        self.positions = torch.arange(max_len, device=device)  # [N]
        self.rows = torch.arange(batch, device=device)  # [B]: row b is slot b
        # lengths_after[p]: [B] tokens cached once position p is written, contiguous per p (the kernels read it)
        self.lengths_after = (self.positions + 1)[:, None].expand(max_len, batch).contiguous()  # [N, B]
        self.cos = self.sin = None

    @classmethod
    def for_decoder(cls, cfg, batch: int, max_len: int, dtype: torch.dtype, device) -> "FrameKVCache":
        return cls(cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim, dtype, device)

    def step(self, start: int, num_new: int) -> "StaticCacheView":
        """The view of one forward writing positions start .. start + num_new − 1 of every row (host ints)."""
        if start + num_new > self.max_len:
            raise ValueError(f"positions up to {start + num_new} exceed this cache's {self.max_len}")
        return _FrameStepView(self, start, num_new)


class _FrameStepView(StaticCacheView):
    """StaticCacheView over a FrameKVCache: every index tensor is a view of the cache's per-call tensors."""

    def __init__(self, cache: FrameKVCache, start: int, num_new: int):  # not StaticCacheView's: no device lengths
        batch = cache.rows.shape[0]
        self.cache, self.num_new, self.seq_len_host, self.prefill_slot = cache, num_new, start + num_new, None
        self.slot_ids = self.rows = cache.rows
        self.new_lengths = cache.lengths_after[start + num_new - 1]  # [B]
        self.write_rows = cache.rows[:, None].expand(batch, num_new)  # [B, L]
        self.write_at = cache.positions[start:start + num_new][None].expand(batch, num_new)  # [B, L]

    def commit(self) -> None:  # the next step's view already starts after these positions
        pass
