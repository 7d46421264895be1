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
- TM-RoPE: position ids are a float32 input ([3, B, L] t/h/w, or [B, L] for the code predictor's 1-D RoPE),
  the runtime's own dtype (video t ids can be fractional); the cos/sin tables are computed in-graph with
  gather + cos/sin (kernels/rope.py's reference).
- Padding: the thinker and talker steps take attention_mask [B, P + L] (1 = real token), so left-padded
  batches run as in the runtime.

Legend: B = batch, L = new tokens, P = cached tokens, H = hidden_size, V = vocab, G = num_code_groups.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from runtime import dispatch
from runtime.kv_cache import DynamicKVCache
from runtime.models.decoder import DeepStack


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
    """Route the hot ops through their exportable forms while exporting (and when comparing eagerly): the
    active kernel choice with moe_experts on `export`, in this context only."""
    with dispatch.active({**dispatch.selected(), "moe_experts": "export"}):
        yield


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
    """Thinker.decode (the decoder step after the multimodal merge) with its state explicit:

    inputs_embeds [B, L, H] (token embeddings with the audio/image/video features scattered in),
    position_ids [3, B, L] float32 (TM-RoPE t/h/w; video t ids can be fractional),
    attention_mask [B, P + L] int64 (1 = real token, 0 = left padding),
    deepstack_embeds [levels, B, L, H] (visual features added after layers 0..levels-1, zero rows elsewhere),
    past k/v per layer
    -> logits [B, 1, V] (last position: all generation reads), hidden_states_<k> [B, L, H] for each k in
       `hidden_layers` (transformers' hidden_states[k], the talker's accept_hidden_layer), present k/v per layer.
    """

    def __init__(self, thinker, hidden_layers: list[int]):
        super().__init__()
        self.thinker = thinker
        self.num_layers = thinker.model.cfg.num_layers
        self.hidden_layers = list(hidden_layers)
        self.levels = len(thinker.cfg.vision.deepstack_visual_indexes)

    def forward(self, inputs_embeds, position_ids, attention_mask, deepstack_embeds, *past):
        deepstack = DeepStack(dense=deepstack_embeds) if self.levels else None
        cache = _cache_from(past, self.num_layers)
        logits, states = self.thinker.decode(inputs_embeds, position_ids, attention_mask, cache, deepstack,
                                             hidden_layers=self.hidden_layers, num_logits_to_keep=1)
        return (logits, *states, *_presents(cache))


class TalkerStep(nn.Module):
    """Talker.forward with its state explicit: inputs_embeds [B, L, H] (prompt, or one frame input),
    position_ids [3, B, L] float32, attention_mask [B, P + L] int64, past k/v per layer
    -> logits [B, 1, V] (last position), hidden [B, L, H] (final norm: the code predictor's input),
       present k/v per layer."""

    def __init__(self, talker):
        super().__init__()
        self.talker = talker
        self.num_layers = talker.model.cfg.num_layers

    def forward(self, inputs_embeds, position_ids, attention_mask, *past):
        cache = _cache_from(past, self.num_layers)
        logits, hidden = self.talker(inputs_embeds, position_ids, attention_mask, cache, num_logits_to_keep=1)
        return (logits, hidden, *_presents(cache))


class CodePredictorStep(nn.Module):
    """CodePredictor.forward with its state explicit: inputs_embeds [B, L, H], position_ids [B, L] float32
    (1-D), head_index [] int64 (lm_head i predicts codebook i+1), past k/v per layer -> logits [B, L, Vc],
    present k/v per layer. The same call serves the 2-token prefill (P = 0) and the G-2 single steps."""

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


def code2wav_state_layout(code2wav) -> tuple[list[str], list[str]]:
    """(causal convs with a left context, transposed convs with a tail): the module paths whose streaming
    state a code2wav_stream graph takes and returns, in its input order."""
    from runtime.models.code2wav import CausalConv1d, CausalTransConv1d

    convs = [n for n, m in code2wav.named_modules() if isinstance(m, CausalConv1d) and m.state_len]
    tails = [n for n, m in code2wav.named_modules()
             if isinstance(m, CausalTransConv1d) and m.kernel_size > m.stride]
    return convs, tails


def state_name(path: str) -> str:
    """"decoder.1.block.1" -> "decoder_1_block_1": an ONNX-friendly input name for a module's state."""
    return path.replace(".", "_")


class Code2WavStreamStep(nn.Module):
    """Code2Wav.decode_step with its state explicit: the next n frames of a stream in, the samples they made
    final out (the same samples as the full decode at those positions).

    codes [B, Q, n] int64, start_frame [] int64 (frames the stream consumed before), past k/v per layer
    [B, P, kv_heads, D] (P <= sliding_window − 1: the caller keeps the last window − 1 of each present),
    conv_<path> [B, C_in, (K−1)·d] per causal conv, tail_<path> [B, C_out, k−s] per transposed conv (zeros start
    a stream) -> waveform [B, 1, samples], present k/v [B, P + n, kv_heads, D], the updated conv_* and tail_*.

    `first`: the graph of a stream's first chunk (the transposed convs still trim their left edge); the other
    graph serves every later chunk (for this architecture k − s <= s, so one frame completes the trim)."""

    def __init__(self, code2wav, first: bool):
        super().__init__()
        from runtime.models.code2wav import CausalTransConv1d

        if any(m.kernel_size - m.stride > m.stride for m in code2wav.modules() if isinstance(m, CausalTransConv1d)):
            raise ValueError("code2wav_stream: a transposed conv with k - s > s needs more than one chunk to finish "
                             "its left trim; this export has two graphs (first chunk, later chunks) only")
        self.code2wav, self.first = code2wav, first
        self.num_layers = code2wav.cfg.num_layers
        self.convs, self.tails = code2wav_state_layout(code2wav)

    def forward(self, codes, start_frame, *state):
        from runtime.models.code2wav import CausalTransConv1d

        code2wav, layers = self.code2wav, self.num_layers
        past, convs, tails = (state[:2 * layers], state[2 * layers:2 * layers + len(self.convs)],
                              state[2 * layers + len(self.convs):])
        stream = _ExplicitCode2WavState(codes.shape[0], start_frame, list(past[0::2]), list(past[1::2]))
        stream.conv = {path: t.clone() for path, t in zip(self.convs, convs)}  # updated in place below
        stream.tails = {path: t.clone() for path, t in zip(self.tails, tails)}
        for path, module in code2wav.named_modules():
            if isinstance(module, CausalTransConv1d):
                stream.tails.setdefault(path, codes.new_zeros(codes.shape[0], module.out_channels, 0,
                                                              dtype=past[0].dtype))
                # 0: the left trim is still to drop; later chunks: long done (k − s <= s, checked above)
                stream.consumed[path] = 0 if self.first else 1 << 30
        hidden = code2wav.pre_transformer(code2wav.embed(codes), stream)  # [B, n, H]
        wav = code2wav._convnet(hidden.transpose(1, 2), stream)  # [B, 1, samples]
        presents = [t for kv in zip(stream.keys, stream.values) for t in kv]
        return (wav, *presents, *(stream.conv[p] for p in self.convs), *(stream.tails[p] for p in self.tails))


class _ExplicitCode2WavState:
    """Code2WavState's streaming interface over graph inputs: positions from a tensor start, keys kept whole
    (past ‖ new: trimming to the window is the caller's, which keeps the graph free of shape-dependent
    branches)."""

    def __init__(self, batch: int, start: torch.Tensor, keys: list, values: list):
        self.batch, self.start, self.keys, self.values = batch, start, keys, values
        self.conv, self.tails, self.consumed = {}, {}, {}
        self.slot_ids = None

    def positions(self, length: int, device) -> torch.Tensor:
        return (self.start + torch.arange(length, device=device))[None]  # [1, n]

    def window_mask(self, length: int, window: int, device) -> torch.Tensor:
        from kernels.attention import causal_mask

        return causal_mask(length, self.keys[0].shape[1] + length, device, window=window)

    def append_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys[layer] = torch.cat((self.keys[layer], k), dim=1)
        self.values[layer] = torch.cat((self.values[layer], v), dim=1)
        return self.keys[layer], self.values[layer]


class AudioEncoderForward(nn.Module):
    """input_features [num_mel_bins, frames] (one clip of a fixed frame count) -> [tokens, output_dim].

    AudioEncoder.forward lays out chunks and windows on the host from the lengths (feature_lens.tolist());
    for a fixed frame count that layout is a constant, so it is computed here once and kept as index
    buffers, and the forward is the same math with gathers (index_select) instead of boolean masks.
    """

    def __init__(self, audio_tower, frames: int):
        super().__init__()
        from runtime.models.audio_encoder import audio_layout, pad_segments

        self.tower = audio_tower
        cfg = audio_tower.cfg
        self.layout = audio_layout([frames], cfg.n_window, cfg.n_window_infer)
        frame_index, frame_valid = pad_segments(self.layout.chunk_frames, "cpu")  # [C, Fc]
        window_index, window_valid = pad_segments(self.layout.window_tokens, "cpu")  # [W, L]
        self.register_buffer("frame_index", frame_index, persistent=False)
        self.register_buffer("frame_valid", frame_valid, persistent=False)
        self.register_buffer("window_index", window_index, persistent=False)
        self.register_buffer("token_slots", window_valid.flatten().nonzero().squeeze(1), persistent=False)
        num_windows, window_len = window_index.shape
        mask = window_valid[:, None, None, :].expand(num_windows, 1, window_len, window_len).contiguous()
        self.register_buffer("window_mask", mask if min(self.layout.window_tokens) < window_len else None,
                             persistent=False)
        self.register_buffer("chunk_tokens", torch.tensor(self.layout.chunk_tokens), persistent=False)  # [C]

    def forward(self, input_features):
        tower = self.tower
        chunks = torch.where(self.frame_valid, input_features[:, self.frame_index], 0)  # [mel, C, Fc]
        h = chunks.transpose(0, 1).unsqueeze(1)  # [C, 1, mel, Fc]
        h = F.gelu(tower.conv2d3(F.gelu(tower.conv2d2(F.gelu(tower.conv2d1(h))))))  # [C, ch, mel/8, Tc]
        c, ch, freq, time = h.shape
        x = tower.conv_out(h.permute(0, 3, 1, 2).reshape(c, time, ch * freq))  # [C, Tc, d]
        x = x + tower.positional_embedding[:time].to(x.dtype)
        keep = (torch.arange(time)[None, :] < self.chunk_tokens[:, None]).flatten().nonzero().squeeze(1)
        x = x.reshape(-1, x.shape[-1]).index_select(0, keep.to(x.device))  # [N, d]
        for layer in tower.layers:
            x = layer(x, self.window_index, self.window_mask, self.token_slots)
        return tower.proj2(F.gelu(tower.proj1(tower.ln_post(x))))


class VisionEncoderForward(nn.Module):
    """pixel_values [patches, C·T·P·P] for one image/video of a fixed grid (t, h, w) -> (embeds, *deepstack).

    The grid's layout (attention runs, position-table taps and weights, rotary cos/sin) is host arithmetic
    on grid_thw, constant for a fixed grid: computed here once; the forward is VisionEncoder.forward's math.
    """

    def __init__(self, visual, grid_thw: tuple[int, int, int]):
        super().__init__()
        from runtime.models.vision_encoder import pos_embed_taps, vision_layout, vision_rope_cos_sin

        self.visual = visual
        cfg = visual.cfg
        self.layout = vision_layout(torch.tensor([list(grid_thw)], dtype=torch.long), cfg.spatial_merge_size)
        side = visual.num_grid_per_side
        row_taps, row_weights = pos_embed_taps(self.layout.rows, self.layout.heights, side)  # [N, 2] each
        col_taps, col_weights = pos_embed_taps(self.layout.cols, self.layout.widths, side)
        self.register_buffer("taps", (row_taps[:, :, None] * side + col_taps[:, None, :]).reshape(-1, 4),
                             persistent=False)  # [N, 4]
        self.register_buffer("tap_weights", (row_weights[:, :, None] * col_weights[:, None, :]).reshape(-1, 4),
                             persistent=False)  # [N, 4] fp32
        cos, sin = vision_rope_cos_sin(self.layout.rows, self.layout.cols, visual.inv_freq)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, pixel_values):
        visual, cfg = self.visual, self.visual.cfg
        table = visual.pos_embed.weight
        x = visual.patch_embed(pixel_values)  # [N, H]
        x = x + (table[self.taps] * self.tap_weights[:, :, None]).sum(dim=1).to(table.dtype).to(x.dtype)
        deepstack = []
        for index, block in enumerate(visual.blocks):
            x = block(x, self.cos, self.sin, self.layout.runs)
            if index in cfg.deepstack_visual_indexes:
                deepstack.append(visual.merger_list[cfg.deepstack_visual_indexes.index(index)](x))
        return (visual.merger(x), *deepstack)
