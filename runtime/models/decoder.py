"""The Qwen3 decoder shared by the thinker and talker text models (MoE, TM-RoPE) and the code predictor
(dense, 1-D RoPE): pre-norm layers of q/k-normed GQA attention and an MLP (MODEL_SPEC §3, §8, §9).

Shapes: B = batch, L = new tokens this call, S = cached + new tokens, H = hidden_size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kernels.attention import causal_mask
from kernels.rope import rope_inv_freq
from runtime import dispatch
from runtime.config import DecoderConfig
from runtime.kv_cache import DynamicKVCache, StaticCacheView
from runtime.models.layers import FusedLinear, GatedMLP, RMSNorm, SparseMoeBlock


class DecoderAttention(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv_proj = FusedLinear(cfg.hidden_size, [cfg.q_size, cfg.kv_size, cfg.kv_size],
                                    ["q_proj", "k_proj", "v_proj"], bias=False)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def forward(self, qkv, cos, sin, mask, cache: DynamicKVCache | StaticCacheView | None,
                layer: int) -> torch.Tensor:
        """qkv: [B, L, q_size + 2 kv_size], the output of qkv_proj, which DecoderLayer runs fused with the
        input norm (RMSNorm.add_norm_linear). Returns o_proj's output [B, L, H]."""
        batch, length, _ = qkv.shape
        q, k, v = qkv.split(self.qkv_proj.part_sizes, dim=-1)
        q = q.view(batch, length, self.num_heads, self.head_dim)
        k = k.view(batch, length, self.num_kv_heads, self.head_dim)
        v = v.view(batch, length, self.num_kv_heads, self.head_dim)
        scale = self.head_dim ** -0.5
        if isinstance(cache, StaticCacheView):  # q/k-norm + rotary and the k/v slot write in one op
            out = cache.norm_rope_attend(layer, q, k, v, self.q_norm.weight, self.k_norm.weight, self.q_norm.eps,
                                         cos, sin, scale)
        else:
            q, k = dispatch.qk_norm_rope(q, k, self.q_norm.weight, self.k_norm.weight, self.q_norm.eps, cos, sin)
            if cache is None:
                out = dispatch.attention(q, k, v, mask, scale)
            else:  # the cache stores the new k/v and attends over everything cached for the row
                out = cache.attend(layer, q, k, v, mask, scale)  # [B, L, heads, D]
        return self.o_proj(out.reshape(batch, length, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.self_attn = DecoderAttention(cfg)
        if cfg.num_experts:
            self.mlp = SparseMoeBlock(cfg.hidden_size, cfg.num_experts, cfg.top_k, cfg.moe_intermediate_size,
                                      cfg.norm_topk_prob, cfg.shared_expert_intermediate_size)
        else:
            self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, residual, cos, sin, mask, cache, layer) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, L, H], the previous layer's MLP output (residual given) or the layer input (residual None).
        Returns (mlp_out, residual): the layer's output is their sum, left for the next norm to add in its own
        kernel (RMSNorm.add_and_norm) so that no residual add runs alone. Each norm runs inside the op of the
        linear that reads it (input norm + q|k|v; for a dense MLP post-attention norm + gate|up + SiLU·up)."""
        qkv, residual = self.input_layernorm.add_norm_linear(x, residual, self.self_attn.qkv_proj.weight)
        attn_out = self.self_attn(qkv, cos, sin, mask, cache, layer)
        if isinstance(self.mlp, GatedMLP):  # dense: the norm, gate|up and SiLU·up in one op
            return self.mlp.add_norm_forward(attn_out, residual, self.post_attention_layernorm)
        hidden, residual = self.post_attention_layernorm.add_and_norm(attn_out, residual)  # router and experts read it
        return self.mlp(hidden), residual


@dataclass
class DeepStack:
    """Visual features added to the hidden states after layers 0..levels−1, in one of two forms:
    sparse (eager): `visual_mask` [B, L] bool and `features`, each [num_visual_tokens, H];
    dense (static shapes, CUDA graphs: no data-dependent indexing): `dense` [levels, B, L, H], zero rows where
    a token is not visual (adding them changes nothing)."""

    visual_mask: torch.Tensor | None = None  # [B, L] bool
    features: list[torch.Tensor] | None = None  # each [num_visual_tokens, H]
    dense: torch.Tensor | None = None  # [levels, B, L, H]

    @property
    def levels(self) -> int:
        return len(self.dense) if self.dense is not None else len(self.features)

    def add(self, x: torch.Tensor, level: int) -> torch.Tensor:
        if self.dense is not None:
            return x + self.dense[level].to(x.dtype)
        x = x.clone()
        x[self.visual_mask] = x[self.visual_mask] + self.features[level].to(x.dtype)
        return x

    def to_dense(self, batch: int, length: int, hidden: int, dtype: torch.dtype, device) -> torch.Tensor:
        """[levels, B, L, H]: the sparse features scattered to their rows."""
        dense = torch.zeros(self.levels, batch, length, hidden, dtype=dtype, device=device)
        if self.dense is not None:
            return dense + self.dense
        for level, features in enumerate(self.features):
            dense[level][self.visual_mask] = features.to(dtype)
        return dense


@dataclass
class DecoderOutput:
    hidden: torch.Tensor  # [B, L, H] after the final norm
    layer_outputs: list[torch.Tensor] | None  # [i] = output of layer i (before DeepStack), when asked


class Decoder(nn.Module):
    """Layers + final norm; the owner adds its own embedding tables and head."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """(Re)compute the non-persistent rotary table, e.g. after materialising from the meta device."""
        self.register_buffer("inv_freq", rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta),
                             persistent=False)

    def new_cache(self) -> DynamicKVCache:
        return DynamicKVCache(self.cfg.num_layers)

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None, cache: DynamicKVCache | None = None,
                deepstack: DeepStack | None = None, output_layers: bool = False) -> DecoderOutput:
        """inputs_embeds: [B, L, H]; position_ids: [3, B, L] (t, h, w) for TM-RoPE or [B, L] for 1-D RoPE;
        attention_mask: [B, S] with 1 for real tokens (left padding), None when nothing is padded;
        cache: appended in place."""
        batch, length, _ = inputs_embeds.shape
        cos, sin = dispatch.rope_cos_sin(position_ids, self.inv_freq, self.cfg.mrope_section, inputs_embeds.dtype)
        if isinstance(cache, StaticCacheView):  # one session per row, no padding: causality from slot lengths
            if attention_mask is not None:
                raise ValueError("a static KV cache holds one session per row: give no attention_mask")
            mask = None
        else:
            past = cache.seq_len if cache is not None else 0
            mask = causal_mask(length, past + length, inputs_embeds.device)
            if attention_mask is not None:
                mask = mask & attention_mask[:, None, None, :].bool()
        x, residual = inputs_embeds, None  # layer output = x + residual (residual None: x alone)
        outputs = [] if output_layers else None
        for index, layer in enumerate(self.layers):
            x, residual = layer(x, residual, cos, sin, mask, cache, index)
            if deepstack is not None and index < deepstack.levels:  # the layer output itself is needed
                x, residual = x + residual, None
                if outputs is not None:
                    outputs.append(x)
                x = deepstack.add(x, index)
            elif outputs is not None:
                outputs.append(x + residual)
        return DecoderOutput(self.norm.add_and_norm(x, residual)[0], outputs)
