"""Export wrappers: the runtime's modules expressed with ONNX-exportable ops and explicit streaming state.

Each wrapper is an nn.Module whose forward takes and returns plain tensors (no cache objects, no Python
ints derived from data), so `torch.onnx.export` sees one graph:

- MoE: `moe_experts_ref` loops over experts with a host sync (`bincount(...).tolist()`); under
  `exportable()` the dispatch point runs `moe_experts_gather` instead: the top-k experts' weights are
  gathered per token (gate_up_proj[ids]) and applied as one batched matmul. Work is T·K expert GEMVs,
  never the dense T·E.
- KV cache: step modules take `past_key_<i>` / `past_value_<i>` [B, P, kv_heads, head_dim] and return
  `present_key_<i>` / `present_value_<i>` [B, P + L, kv_heads, head_dim] (the DynamicKVCache layout);
  P = 0 is a prefill.
- TM-RoPE: position ids are an input ([3, B, L] t/h/w, or [B, L] for the code predictor's 1-D RoPE);
  the cos/sin tables are computed in-graph with gather + cos/sin (kernels/rope.py's reference).

Legend: B = batch, L = new tokens, P = cached tokens, H = hidden_size, V = vocab, G = num_code_groups.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from runtime import dispatch
from runtime.kv_cache import DynamicKVCache


def moe_experts_gather(hidden: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor,
                       gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> torch.Tensor:
    """hidden: (T, H); expert_ids, expert_weights: (T, K); gate_up_proj: (E, 2I, H); down_proj: (E, H, I).
    Returns (T, H): sum_k w_k * down_e(silu(gate_e x) * up_e x), the same contract as moe_experts_ref.

    Gathers each token's K experts (no host sync, static graph); for decode (T small) this reads only the
    touched experts' weights, like the grouped GEMM does.
    """
    gate_up = torch.matmul(gate_up_proj[expert_ids], hidden[:, None, :, None]).squeeze(-1)  # [T, K, 2I]
    gate, up = gate_up.chunk(2, dim=-1)
    act = F.silu(gate) * up  # [T, K, I]
    out = torch.matmul(down_proj[expert_ids], act[..., None]).squeeze(-1)  # [T, K, H]
    return (out * expert_weights[..., None].to(out.dtype)).sum(dim=1)


dispatch.register("moe_experts", "export", moe_experts_gather)


@contextmanager
def exportable():
    """Route the hot ops through their exportable forms while exporting (and when comparing eagerly)."""
    saved = dispatch.selected()
    dispatch.use("moe_experts", "export")
    try:
        yield
    finally:
        for op, backend in saved.items():
            dispatch.use(op, backend)


def _cache_from(past: tuple[torch.Tensor, ...], num_layers: int) -> DynamicKVCache:
    if len(past) != 2 * num_layers:
        raise ValueError(f"expected {2 * num_layers} past tensors (key, value per layer), got {len(past)}")
    cache = DynamicKVCache(num_layers)
    cache.keys = list(past[0::2])
    cache.values = list(past[1::2])
    return cache


def _presents(cache: DynamicKVCache) -> tuple[torch.Tensor, ...]:
    out = []
    for k, v in zip(cache.keys, cache.values):
        out += [k, v]
    return tuple(out)


def kv_names(num_layers: int, prefix: str) -> list[str]:
    return [f"{prefix}_{kind}_{i}" for i in range(num_layers) for kind in ("key", "value")]


class ThinkerStep(nn.Module):
    """input_ids [B, L] int64, position_ids [3, B, L] int64 (TM-RoPE t/h/w), past k/v per layer
    -> logits [B, L, V], hidden [B, L, H] (final norm), present k/v per layer."""

    def __init__(self, thinker):
        super().__init__()
        self.model, self.lm_head = thinker.model, thinker.lm_head
        self.num_layers = thinker.model.cfg.num_layers

    def forward(self, input_ids, position_ids, *past):
        cache = _cache_from(past, self.num_layers)
        hidden = self.model(self.model.embed_tokens(input_ids), position_ids, None, cache).hidden
        return (self.lm_head(hidden), hidden, *_presents(cache))


class TalkerStep(nn.Module):
    """inputs_embeds [B, L, H] (talker frame input), position_ids [3, B, L], past k/v per layer
    -> logits [B, L, V], hidden [B, L, H], present k/v per layer."""

    def __init__(self, talker):
        super().__init__()
        self.talker = talker
        self.num_layers = talker.model.cfg.num_layers

    def forward(self, inputs_embeds, position_ids, *past):
        cache = _cache_from(past, self.num_layers)
        logits, hidden = self.talker(inputs_embeds, position_ids, None, cache)
        return (logits, hidden, *_presents(cache))


class CodePredictorStep(nn.Module):
    """inputs_embeds [B, L, H], position_ids [B, L] (1-D), head_index [] int64 (lm_head i predicts codebook
    i+1), past k/v per layer -> logits [B, L, Vc], present k/v per layer. The same call serves the
    2-token prefill (P = 0) and the G-2 single steps."""

    def __init__(self, code_predictor):
        super().__init__()
        self.model = code_predictor.model
        self.num_layers = code_predictor.model.cfg.num_layers
        # [G-1, Vc, H]: the heads stacked so the head is chosen by a tensor (Gather), not a Python int.
        self.heads = nn.Parameter(torch.stack([h.weight for h in code_predictor.lm_head]), requires_grad=False)

    def forward(self, inputs_embeds, position_ids, head_index, *past):
        cache = _cache_from(past, self.num_layers)
        hidden = self.model(inputs_embeds, position_ids, None, cache).hidden
        return (torch.matmul(hidden, self.heads[head_index].transpose(0, 1)), *_presents(cache))


class Code2WavDecode(nn.Module):
    """codes [B, Q, F] int64 -> waveform [B, 1, num_samples(F)]: one full decode at a fixed frame count."""

    def __init__(self, code2wav):
        super().__init__()
        self.code2wav = code2wav

    def forward(self, codes):
        return self.code2wav(codes)


class AudioEncoderForward(nn.Module):
    """input_features [num_mel_bins, frames] (one clip) -> audio embeddings [tokens, output_dim]."""

    def __init__(self, audio_tower):
        super().__init__()
        self.audio_tower = audio_tower

    def forward(self, input_features):
        lengths = torch.full((1,), input_features.shape[-1], dtype=torch.long)
        return self.audio_tower(input_features, lengths)


class VisionEncoderForward(nn.Module):
    """pixel_values [patches, C·T·P·P] for one image of a fixed grid -> (embeds, *deepstack features)."""

    def __init__(self, visual, grid_thw: tuple[int, int, int]):
        super().__init__()
        self.visual = visual
        self.register_buffer("grid_thw", torch.tensor([list(grid_thw)], dtype=torch.long), persistent=False)

    def forward(self, pixel_values):
        embeds, levels = self.visual(pixel_values, self.grid_thw)
        return (embeds, *levels)
