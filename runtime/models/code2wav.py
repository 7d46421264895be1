"""Code2Wav: codec codes (B, num_quantizers, L) at 12.5 Hz → 24 kHz waveform (MODEL_SPEC §10), the same
computation as transformers' Qwen3OmniMoeCode2Wav `forward`, plus a stateful streaming decode.

Pipeline: mean of the per-quantizer code embeddings → sliding-window causal transformer → upsampling
stages (causal transposed conv + ConvNeXt block) → decoder (causal conv, SnakeBeta/transposed-conv blocks
with dilated residual units, SnakeBeta, causal conv to 1 channel) → clamp to [−1, 1].

Everything is causal, so the stream (`new_state` / `decode_step` / `flush`) decodes each frame once: it
keeps the last window−1 keys/values per layer (rotary positions continue), the left context of every
causal conv and the overlap-add tail of every transposed conv. After n frames in total it has emitted
exactly `num_samples(n)` samples (1920·n − 555 for the released config), which are the first samples of
the full decode of any longer code sequence. That is every final sample: output sample t depends on frame
⌊(t + 555)/1920⌋ (MODEL_SPEC §10.5), so sample 1920·n − 555 needs frame n. `flush` therefore emits
nothing: the samples still pending (555 per stream on the released config) are exactly those a full
decode trims on the right, so the stream's total equals the full decode, sample for sample and in length.

Shapes: B = batch, L = frames (or samples, inside the conv stack), H = hidden_size, C = channels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kernels.attention import causal_mask, split_counters
from kernels.conv import transpose_output_length
from kernels.rope import rope_inv_freq
from runtime import dispatch
from runtime.config import Code2WavConfig
from runtime.models.layers import FusedLinear, GatedMLP, RMSNorm

CONVNEXT_KERNEL = 7
DECODER_KERNEL = 7
RESIDUAL_DILATIONS = (1, 3, 9)
SNAKE_EPS = 1e-9  # transformers' no_div_by_zero
CONVNEXT_NORM_EPS = 1e-6
CONVNEXT_GAMMA_INIT = 1e-6


@dataclass
class Code2WavState:
    """What a stream carries between `Code2Wav.decode_step` calls; all rows advance in lockstep.

    Conv states are keyed by the module's path in Code2Wav (e.g. "decoder.1.block.2.conv1"), so the
    whole state is a flat set of tensors that can later live in preallocated per-slot pools.
    """

    batch: int
    frames: int = 0  # codec frames consumed = rotary position of the next frame
    samples: int = 0  # waveform samples emitted
    finished: bool = False
    keys: list[torch.Tensor | None] = field(default_factory=list)  # per layer [B, <= window−1, kv_heads, D], rotated
    values: list[torch.Tensor | None] = field(default_factory=list)  # per layer [B, <= window−1, kv_heads, D]
    conv: dict[str, torch.Tensor] = field(default_factory=dict)  # [B, C_in, (K−1)·d] left context per causal conv
    tails: dict[str, torch.Tensor] = field(default_factory=dict)  # [B, C_out, k−s] overlap-add tail per transposed conv
    consumed: dict[str, int] = field(default_factory=dict)  # input samples each transposed conv has seen
    slot_ids = None  # the conv states are per row (Code2WavSlots views carry slot ids instead)

    def positions(self, length: int, device) -> torch.Tensor:
        """[1, n] rotary positions of the next n frames."""
        return torch.arange(self.frames, self.frames + length, device=device)[None]

    def window_mask(self, length: int, window: int, device) -> torch.Tensor:
        """[1, 1, n, past + n] bool: causal over the kept keys and the n new frames."""
        past = 0 if self.keys[0] is None else self.keys[0].shape[1]
        return causal_mask(length, past + length, device, window=window)

    def append_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: [B, n, kv_heads, D] for the new frames. Returns cached + new ([B, past + n, kv_heads, D]) and
        keeps only the last `keep` (= window − 1) positions: all a later query can attend to."""
        if self.keys[layer] is not None:
            k = torch.cat((self.keys[layer], k), dim=1)
            v = torch.cat((self.values[layer], v), dim=1)
        first = max(0, k.shape[1] - keep)
        self.keys[layer], self.values[layer] = k[:, first:].contiguous(), v[:, first:].contiguous()
        return k, v


class _ConvParams(nn.Module):
    """Weight and bias of a conv as the checkpoint stores them (`<conv>.conv.weight|bias`); the math lives in
    the owner, which calls runtime.dispatch."""

    def __init__(self, weight_shape: tuple[int, int, int], out_channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(weight_shape))
        self.bias = nn.Parameter(torch.empty(out_channels))


class CausalConv1d(nn.Module):
    """Conv1d, stride 1, left zero pad (K−1)·d. Streaming keeps the last (K−1)·d input samples."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1, groups: int = 1):
        super().__init__()
        self.conv = _ConvParams((out_channels, in_channels // groups, kernel_size), out_channels)
        self.in_channels, self.dilation, self.groups = in_channels, dilation, groups
        self.state_len = (kernel_size - 1) * dilation
        self.state_key: str | None = None  # path in Code2Wav, set by its constructor

    def forward(self, x: torch.Tensor, state: Code2WavState | None = None) -> torch.Tensor:
        """x: [B, C_in, L] → [B, C_out, L]; with `state`, x continues the stream and its state is updated."""
        if state is None or self.state_len == 0:  # a 1-tap conv needs no context
            return dispatch.causal_conv1d(x, self.conv.weight, self.conv.bias, self.dilation, self.groups)
        return dispatch.causal_conv1d_update(x, state.conv[self.state_key], self.conv.weight, self.conv.bias,
                                             self.dilation, self.groups, state.slot_ids)


class CausalTransConv1d(nn.Module):
    """ConvTranspose1d(k, s) with k−s samples trimmed on both sides: n inputs → n·s − (k−s) samples.
    Streaming keeps the k−s not-yet-final overlap-add samples (kernels/conv.py)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int):
        super().__init__()
        self.conv = _ConvParams((in_channels, out_channels, kernel_size), out_channels)
        self.conv.fan_in = in_channels * kernel_size // stride  # inputs reaching one output sample (random init)
        self.out_channels, self.kernel_size, self.stride = out_channels, kernel_size, stride
        self.state_key: str | None = None

    def output_length(self, num_inputs: int) -> int:
        return transpose_output_length(num_inputs, self.kernel_size, self.stride)

    def forward(self, x: torch.Tensor, state: Code2WavState | None = None) -> torch.Tensor:
        """x: [B, C_in, L] → [B, C_out, L·s − (k−s)]; with `state`: the samples these L inputs made final."""
        if state is None:
            return dispatch.causal_conv_transpose1d(x, self.conv.weight, self.conv.bias, self.stride)
        key = self.state_key
        out = dispatch.causal_conv_transpose1d_update(x, state.tails[key], self.conv.weight, self.conv.bias,
                                                      self.stride, state.consumed[key], state.slot_ids)
        state.consumed[key] += x.shape[-1]
        return out


class SnakeBeta(nn.Module):
    """x + sin²(e^α·x) / (e^β + 1e-9), α and β per channel in log space. The constants e^α and
    1/(e^β + 1e-9) depend only on the weights: `fold_parameters` computes them once (runtime/weights.py calls
    it after loading or initialising), so a frame runs one fused kernel instead of nine."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))
        self.reset_buffers()

    def reset_buffers(self) -> None:
        self.fold_parameters()

    @torch.no_grad()
    def fold_parameters(self) -> None:
        """(Re)compute the non-persistent `alpha_exp`, `inv_beta` [C] from α, β in their dtype (transformers'
        rounding); call it whenever α or β change. Not in the state dict: the checkpoint keeps α, β."""
        self.register_buffer("alpha_exp", self.alpha.exp(), persistent=False)
        self.register_buffer("inv_beta", 1.0 / (self.beta.exp() + SNAKE_EPS), persistent=False)

    def forward(self, x: torch.Tensor, state: Code2WavState | None = None) -> torch.Tensor:
        """x: [B, C, L] (pointwise in time: no streaming state)."""
        return dispatch.snake_beta(x, self.alpha_exp, self.inv_beta)


class ConvNeXtBlock(nn.Module):
    """x + γ·Linear(GELU(Linear(LayerNorm(causal depthwise conv7(x))))) over channels."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = CausalConv1d(dim, dim, CONVNEXT_KERNEL, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=CONVNEXT_NORM_EPS)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), CONVNEXT_GAMMA_INIT))

    def forward(self, x: torch.Tensor, state: Code2WavState | None = None) -> torch.Tensor:
        """x: [B, C, L] → [B, C, L]."""
        h = self.dwconv(x, state).transpose(1, 2)  # [B, L, C]
        h = self.pwconv2(F.gelu(self.pwconv1(self.norm(h))))
        return torch.addcmul(x, self.gamma[:, None], h.transpose(1, 2))  # x + γ·h in one kernel, not two


class ResidualUnit(nn.Module):
    """x + conv1x1(snake(conv7_dilated(snake(x))))."""

    def __init__(self, dim: int, dilation: int):
        super().__init__()
        self.act1 = SnakeBeta(dim)
        self.conv1 = CausalConv1d(dim, dim, DECODER_KERNEL, dilation=dilation)
        self.act2 = SnakeBeta(dim)
        self.conv2 = CausalConv1d(dim, dim, 1)

    def forward(self, x: torch.Tensor, state: Code2WavState | None = None) -> torch.Tensor:
        h = self.conv1(self.act1(x), state)
        return x + self.conv2(self.act2(h), state)


class DecoderBlock(nn.Module):
    """SnakeBeta → causal ConvTranspose1d(k 2r, stride r) halving the channels → residual units (d 1, 3, 9).
    n samples → (n−1)·r."""

    def __init__(self, in_dim: int, out_dim: int, rate: int):
        super().__init__()
        self.block = nn.ModuleList([SnakeBeta(in_dim), CausalTransConv1d(in_dim, out_dim, 2 * rate, rate),
                                    *(ResidualUnit(out_dim, d) for d in RESIDUAL_DILATIONS)])

    def forward(self, x: torch.Tensor, state: Code2WavState | None = None) -> torch.Tensor:
        for module in self.block:
            x = module(x, state)
        return x


class Code2WavAttention(nn.Module):
    """GQA self-attention, no biases, no q/k norm, 1-D rotary; the sliding window is in the mask."""

    def __init__(self, cfg: Code2WavConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.keep = cfg.sliding_window - 1  # past positions a query still sees
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qk_size = q_size + kv_size
        self.qkv_proj = FusedLinear(cfg.hidden_size, [q_size, kv_size, kv_size], ["q_proj", "k_proj", "v_proj"],
                                    bias=False)
        self.o_proj = nn.Linear(q_size, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, state: Code2WavState | None, layer: int) -> torch.Tensor:
        """x: [B, n, H]; cos/sin: [1 or B, n, D]; mask: [1 or B, 1, n, keys] bool."""
        batch, length, _ = x.shape
        # q|k as one slice of the fused projection: one rotary call for both (each is five kernels)
        qk, v = F.linear(x, self.qkv_proj.weight).split([self.qk_size, self.qkv_proj.part_sizes[-1]], dim=-1)
        qk = dispatch.apply_rope(qk.view(batch, length, self.num_heads + self.num_kv_heads, self.head_dim), cos, sin)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=2)
        v = v.view(batch, length, self.num_kv_heads, self.head_dim)
        if isinstance(state, Code2WavSlotView):  # the pooled ring: one fused decode attention, no gather or mask
            out = state.attend(layer, q, k, v, self.head_dim ** -0.5)
        else:
            if state is not None:
                k, v = state.append_kv(layer, k, v, self.keep)  # [B, past + n, kv_heads, D]
            out = dispatch.attention(q, k, v, mask, self.head_dim ** -0.5)  # [B, n, heads, D]
        return self.o_proj(out.reshape(batch, length, -1))


class LayerScale(nn.Module):
    """A per-channel scale on a residual branch, applied with the residual add: x + scale·h is one kernel
    (addcmul). Folding it into the projection before would need a second, scaled copy of o_proj / down_proj
    (the parameters stay the checkpoint's) for the same kernel count."""

    def __init__(self, dim: int, initial_scale: float):
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), initial_scale))

    def add_to(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """x + scale·h."""
        return torch.addcmul(x, self.scale, h)


class Code2WavTransformerLayer(nn.Module):
    def __init__(self, cfg: Code2WavConfig):
        super().__init__()
        self.self_attn = Code2WavAttention(cfg)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn_layer_scale = LayerScale(cfg.hidden_size, cfg.layer_scale_initial_scale)
        self.mlp_layer_scale = LayerScale(cfg.hidden_size, cfg.layer_scale_initial_scale)

    def forward(self, x, cos, sin, mask, state, layer) -> torch.Tensor:
        x = self.self_attn_layer_scale.add_to(x, self.self_attn(self.input_layernorm(x), cos, sin, mask, state, layer))
        return self.mlp_layer_scale.add_to(x, self.mlp(self.post_attention_layernorm(x)))


class Code2WavTransformer(nn.Module):
    """Pre-norm layers with LayerScale, causal attention over the last `sliding_window` frames (self
    included), final RMSNorm. Rotary positions are frame indices within the stream (0… in a full decode)."""

    def __init__(self, cfg: Code2WavConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(Code2WavTransformerLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """(Re)compute the non-persistent rotary table, e.g. after materialising from the meta device."""
        self.register_buffer("inv_freq", rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta), persistent=False)

    def forward(self, x: torch.Tensor, state: Code2WavState | None = None) -> torch.Tensor:
        """x: [B, n, H] embeddings of n frames (all of them, or the next n of the stream) → [B, n, H]."""
        length = x.shape[1]
        if state is None:
            positions = torch.arange(length, device=x.device)[None]  # [1, n]
            mask = causal_mask(length, length, x.device, window=self.cfg.sliding_window)
        else:  # [1 or B, n] positions, [1 or B, 1, n, keys] mask: from the stream's state
            positions = state.positions(length, x.device)
            mask = state.window_mask(length, self.cfg.sliding_window, x.device)
        cos, sin = dispatch.rope_cos_sin(positions, self.inv_freq, None, x.dtype)  # [1 or B, n, D]
        for index, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, state, index)
        return self.norm(x)


class Code2Wav(nn.Module):
    """codes [B, num_quantizers, L] (int64, each in [0, codebook_size)) → waveform [B, 1, num_samples(L)]."""

    def __init__(self, cfg: Code2WavConfig):
        super().__init__()
        self.cfg = cfg
        hidden = cfg.hidden_size
        self.pre_transformer = Code2WavTransformer(cfg)
        self.code_embedding = nn.Embedding(cfg.codebook_size * cfg.num_quantizers, hidden)
        # upsample.i = [transposed conv (k = s = ratio: nothing trimmed), ConvNeXt block]
        self.upsample = nn.ModuleList(
            nn.ModuleList([CausalTransConv1d(hidden, hidden, ratio, ratio), ConvNeXtBlock(hidden)])
            for ratio in cfg.upsampling_ratios)
        dims = [cfg.decoder_dim // 2 ** i for i in range(len(cfg.upsample_rates) + 1)]  # 1536, 768, …, 96
        self.decoder = nn.ModuleList([
            CausalConv1d(hidden, dims[0], DECODER_KERNEL),
            *(DecoderBlock(dims[i], dims[i + 1], rate) for i, rate in enumerate(cfg.upsample_rates)),
            SnakeBeta(dims[-1]),
            CausalConv1d(dims[-1], 1, DECODER_KERNEL),
        ])
        for name, module in self.named_modules():
            if isinstance(module, (CausalConv1d, CausalTransConv1d)):
                module.state_key = name
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """(Re)compute the non-persistent code offsets (quantizer q's codes live at q·codebook_size)."""
        offsets = torch.arange(self.cfg.num_quantizers).view(1, -1, 1) * self.cfg.codebook_size  # [1, Q, 1]
        self.register_buffer("code_offset", offsets, persistent=False)

    def num_samples(self, num_frames: int) -> int:
        """Waveform samples of a full decode of `num_frames` frames (1920·L − 555 for the released config)."""
        length = num_frames
        for module in self.modules():  # registration order = data-flow order
            if isinstance(module, CausalTransConv1d):
                length = module.output_length(length)
        return length

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, Q, L] → mean of the Q code embeddings [B, L, H]."""
        if codes.dim() != 3 or codes.shape[1] != self.cfg.num_quantizers:
            raise ValueError(f"codes must be [batch, {self.cfg.num_quantizers} quantizers, frames], "
                             f"got {tuple(codes.shape)}")
        return self.code_embedding(codes + self.code_offset).mean(1)  # [B, Q, L, H] → [B, L, H]

    def _convnet(self, x: torch.Tensor, state: Code2WavState | None) -> torch.Tensor:
        """x: [B, H, L] transformer output → [B, 1, samples] clamped waveform."""
        for stage in self.upsample:
            for module in stage:
                x = module(x, state)
        for module in self.decoder:
            x = module(x, state)
        return x.clamp(min=-1.0, max=1.0)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, Q, L] → waveform [B, 1, num_samples(L)] in the parameters' dtype: one full decode."""
        hidden = self.pre_transformer(self.embed(codes))  # [B, L, H]
        return self._convnet(hidden.transpose(1, 2), None)

    # ---- streaming ---------------------------------------------------------------------------------

    def new_state(self, batch: int, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> Code2WavState:
        """A fresh stream for `batch` rows: no frames seen, zero conv contexts and tails (= the left zero
        pads of the full decode). Defaults: the parameters' device and dtype."""
        weight = self.code_embedding.weight
        device = weight.device if device is None else device
        dtype = weight.dtype if dtype is None else dtype
        state = Code2WavState(batch=batch, keys=[None] * self.cfg.num_layers, values=[None] * self.cfg.num_layers)
        for name, module in self.named_modules():
            if isinstance(module, CausalConv1d) and module.state_len:
                state.conv[name] = torch.zeros(batch, module.in_channels, module.state_len, device=device, dtype=dtype)
            elif isinstance(module, CausalTransConv1d):
                trim = module.kernel_size - module.stride
                state.tails[name] = torch.zeros(batch, module.out_channels, trim, device=device, dtype=dtype)
                state.consumed[name] = 0
        return state

    @torch.no_grad()
    def decode_step(self, codes: torch.Tensor, state: Code2WavState) -> torch.Tensor:
        """codes [B, Q, n] (n >= 0): the next n frames of each row. Returns [B, 1, num_samples(F + n) −
        num_samples(F)] (F = frames before the call): every sample these frames made final, which are the
        samples at the same positions of the full decode of the whole sequence. Each frame is processed
        once (no left-context re-decode). `state` is updated in place."""
        if state.finished:
            raise RuntimeError("decode_step after flush: start a new stream with new_state()")
        if codes.shape[0] != state.batch:
            raise ValueError(f"codes has {codes.shape[0]} rows, the stream has {state.batch}")
        if codes.shape[-1] == 0:
            return self.code_embedding.weight.new_zeros(state.batch, 1, 0)
        hidden = self.pre_transformer(self.embed(codes), state)  # [B, n, H]; reads state.frames
        wav = self._convnet(hidden.transpose(1, 2), state)  # [B, 1, new samples]
        state.frames += codes.shape[-1]
        state.samples += wav.shape[-1]
        return wav

    @torch.no_grad()
    def decode_frame(self, codes: torch.Tensor, view: "Code2WavSlotView") -> torch.Tensor:
        """codes [B, Q, 1]: the next frame of each row's stream, its state in a Code2WavSlots pool.
        Returns [B, 1, samples]: num_samples(1) for rows on their first frame (view.first), else the
        per-frame hop (1920 on the released config); zeros for padded rows. No host reads: capturable."""
        hidden = self.pre_transformer(self.embed(codes), view)  # [B, 1, H]
        wav = self._convnet(hidden.transpose(1, 2), view)
        view.advance()
        return wav

    def flush(self, state: Code2WavState) -> torch.Tensor:
        """End the stream. Returns [B, 1, 0]: after F frames the stream has already emitted num_samples(F),
        the full decode's length; what is still pending (the transposed convs' tails, 555 samples per
        stream on the released config) is what the full decode trims on the right."""
        state.finished = True
        return self.code_embedding.weight.new_zeros(state.batch, 1, 0)


class _SameCount(dict):
    """`consumed` of a slot view: every transposed conv has seen 0 inputs (first frame) or enough that its
    left trim is done (later frames); the count is never needed beyond that, so updates are dropped."""

    def __init__(self, value: int):
        super().__init__()
        self.value = value

    def __getitem__(self, key):
        return self.value

    def __setitem__(self, key, value):
        pass


class Code2WavSlots:
    """Streaming states of up to `num_slots` sessions in preallocated pools (plus a scratch slot for padded
    rows), decoded one frame per step in batches of sessions: conv contexts and transposed-conv tails
    [slots + 1, C, S] (the kernels' slot-id form), the transformer's keys/values in ring buffers
    [slots + 1, window, kv_heads, D] (a frame's keys go to slot frames % window; attention is over the valid
    entries, order does not matter once rotated), and the frames seen per slot on the device. Shapes never
    change, so a frame step can be captured in a CUDA graph; a session's first frame is a graph of its own
    (`view(slots, first=True)`: its transposed convs still trim their left edge, so it makes fewer samples)."""

    def __init__(self, code2wav: "Code2Wav", num_slots: int, device, dtype):
        cfg = code2wav.cfg
        rows = num_slots + 1
        self.num_slots, self.window = num_slots, cfg.sliding_window
        kv = (rows, self.window, cfg.num_kv_heads, cfg.head_dim)
        self.keys = [torch.zeros(kv, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.values = [torch.zeros(kv, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.frames = torch.zeros(rows, dtype=torch.long, device=device)
        # decode attention's split merge in its one launch: the window (72 on the released config) is two key
        # splits; the first-frame and later-frame graphs replay on one stream, so they can share the buffer
        self.split_counters = split_counters(device)
        self.conv: dict[str, torch.Tensor] = {}
        self.tails: dict[str, torch.Tensor] = {}
        for name, module in code2wav.named_modules():
            if isinstance(module, CausalConv1d) and module.state_len:
                self.conv[name] = torch.zeros(rows, module.in_channels, module.state_len, device=device, dtype=dtype)
            elif isinstance(module, CausalTransConv1d):
                trim = module.kernel_size - module.stride
                self.tails[name] = torch.zeros(rows, module.out_channels, trim, device=device, dtype=dtype)
        self.first_frame_samples = code2wav.num_samples(1)
        self.frame_samples = code2wav.num_samples(2) - self.first_frame_samples

    @property
    def scratch_slot(self) -> int:
        return self.num_slots

    def state_tensors(self) -> list[torch.Tensor]:
        """Every pool tensor (for snapshots in tests)."""
        return [*self.keys, *self.values, self.frames, *self.conv.values(), *self.tails.values()]

    def reset(self, slot: int) -> None:
        """Start a new stream in `slot`: zero contexts and tails (= the full decode's left zero pads)."""
        for pool in (*self.conv.values(), *self.tails.values()):
            pool[slot].zero_()
        self.frames[slot] = 0

    def view(self, slot_ids: torch.Tensor, first: bool) -> "Code2WavSlotView":
        """slot_ids [B] (−1 = padded row); first: every real row is on its stream's first frame (else none is)."""
        return Code2WavSlotView(self, slot_ids, first)


class Code2WavSlotView:
    """A Code2WavSlots pool seen by one `Code2Wav.decode_frame` call (the state interface of the modules)."""

    def __init__(self, slots: Code2WavSlots, slot_ids: torch.Tensor, first: bool):
        self.slots, self.slot_ids = slots, slot_ids
        self.rows = torch.where(slot_ids >= 0, slot_ids, slots.scratch_slot)  # [B]
        self.conv, self.tails = slots.conv, slots.tails
        self.consumed = _SameCount(0 if first else 1 << 30)
        self.now = slots.frames[self.rows]  # [B] index of the frame being decoded
        self.ring_at = self.now % slots.window  # [B] its ring entry (every layer writes there)
        # valid ring entries once this frame is written: always the prefix 0 … min(now, window − 1)
        self.ring_len = (self.now + 1).clamp(max=slots.window)  # [B]

    def positions(self, length: int, device) -> torch.Tensor:
        return self.now[:, None]  # [B, 1]

    def window_mask(self, length: int, window: int, device) -> None:
        """No mask: `attend` reads the valid prefix of each row's ring (`ring_len`)."""
        return None

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """q [B, 1, heads, D], k, v [B, 1, kv_heads, D] of the new frame: writes k, v at the frame's ring entry and
        returns the attention over the row's valid entries [B, 1, heads, D] (order is irrelevant once rotated)."""
        keys, values = self.slots.keys[layer], self.slots.values[layer]
        keys.index_put_((self.rows, self.ring_at), k[:, 0])
        values.index_put_((self.rows, self.ring_at), v[:, 0])
        return dispatch.decode_attention(q, keys, values, self.rows, self.ring_len, scale, self.slots.split_counters)

    def advance(self) -> None:
        self.slots.frames.index_put_((self.rows,), self.now + 1)
        self.slots.frames[self.slots.scratch_slot] = 0
