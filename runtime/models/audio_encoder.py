"""Audio encoder (AuT, MODEL_SPEC §5), as transformers' `Qwen3OmniMoeAudioEncoder` (5.23) computes it.

    input_features [mel, F]  (every audio's valid frames, concatenated)
      -> cut each audio into chunks of 2*n_window frames (the last one holds the remainder), right-pad all
         chunks of the batch with zeros to the longest chunk                         -> [C, 1, mel, Fc]
      -> 3 x (Conv2d k3 s2 p1, exact GELU)                                          -> [C, ch, mel/8, Fc/8]
      -> flatten (channel, freq), conv_out (no bias)                                -> [C, Tc, d]
      -> + sinusoids, restarted at position 0 in every chunk
      -> keep each chunk's valid tokens                                             -> [N, d]
      -> num_layers pre-LN blocks; attention is full inside fixed windows of each audio, never across
      -> ln_post, proj1, exact GELU, proj2                                          -> [N, output_dim]

Shapes: F = frames of all audios, C = chunks of all audios, Fc = the longest chunk in frames, Tc = its
length after the convs, N = output tokens of all audios, d = d_model.

The padding is part of the arithmetic, not an implementation detail: the conv biases and GELU make padded
frames nonzero from the second conv on, so a short tail chunk encodes differently when the batch holds a
longer chunk (MODEL_SPEC §5, §14.8). Audios in one call therefore only match transformers when they are
batched exactly as transformers batches them; `forward` does.

Parameter names are the checkpoint's under `thinker.audio_tower.`, except q/k/v, which the loader
(runtime.weights) concatenates into `self_attn.qkv_proj`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from runtime import dispatch
from runtime.config import AudioEncoderConfig
from runtime.frontend.audio import audio_token_count, conv_out_len
from runtime.models.layers import FusedLinear

LAYER_NORM_EPS = 1e-5  # every audio LayerNorm (MODEL_SPEC §14.5)
CONV_BATCH = 500  # chunks per conv call: bounds the conv activations (transformers' conv_chunksize)
SINUSOID_MAX_TIMESCALE = 10000.0


def sinusoids(length: int, channels: int, max_timescale: float = SINUSOID_MAX_TIMESCALE) -> torch.Tensor:
    """[length, channels] fp32: sin of every timescale in the first half, cos in the second (concatenated,
    not interleaved), timescales geometric from 1 to max_timescale. fp32 step by step as transformers."""
    half = channels // 2
    log_increment = math.log(max_timescale) / (half - 1)
    inv_timescales = torch.exp(-log_increment * torch.arange(half, dtype=torch.float32))  # [half]
    angles = torch.arange(length)[:, None] * inv_timescales[None, :]  # [length, half] fp32
    return torch.cat((angles.sin(), angles.cos()), dim=1)


# ----------------------------------------------------------------------------------------------------------
# Per-call layout: everything derived from feature_lens before touching activations
# ----------------------------------------------------------------------------------------------------------

@dataclass
class AudioLayout:
    """How one call's audios are cut into conv chunks and attention windows (host integers).

    chunk_frames: valid frames of each chunk, audios in order ([C]).
    chunk_tokens: tokens each chunk yields after the convs ([C]).
    window_tokens: tokens of each attention window, audios in order; they sum to num_tokens.
    audio_tokens: output tokens of each audio.
    """

    chunk_frames: list[int]
    chunk_tokens: list[int]
    window_tokens: list[int]
    audio_tokens: list[int]

    @property
    def num_tokens(self) -> int:
        return sum(self.audio_tokens)


def audio_layout(feature_lens: list[int], n_window: int, n_window_infer: int) -> AudioLayout:
    """feature_lens: valid mel frames of each audio (0 allowed: no tokens).

    Chunks are 2*n_window frames; an audio's last chunk holds the remainder (a remainder of 0 means the
    last chunk is full). Attention windows are cut per audio from its start: the window is the longest
    chunk of the batch after the convs times n_window_infer / (2*n_window) chunks, the remainder forms a
    last shorter window. (When no chunk is full, every audio is shorter than one window, so the window
    length only matters through the full chunks: in effect it is conv_out_len(2*n_window) * ratio.)
    """
    chunk_len = 2 * n_window
    chunk_frames: list[int] = []
    audio_tokens: list[int] = []
    for frames in feature_lens:
        if frames < 0:
            raise ValueError(f"feature_lens must be >= 0, got {feature_lens}")
        full, tail = divmod(frames, chunk_len)
        chunks = [chunk_len] * full + ([tail] if tail else [])
        chunk_frames += chunks
        audio_tokens.append(sum(conv_out_len(f) for f in chunks))
    chunk_tokens = [conv_out_len(f) for f in chunk_frames]

    window = max(chunk_tokens, default=0) * (n_window_infer // chunk_len)
    window_tokens: list[int] = []
    for tokens in audio_tokens:
        full, tail = divmod(tokens, window) if window else (0, 0)
        window_tokens += [window] * full + ([tail] if tail else [])
    return AudioLayout(chunk_frames, chunk_tokens, window_tokens, audio_tokens)


def pad_segments(lengths: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Consecutive segments of a flat sequence, laid out as right-padded rows.

    Returns (index [S, L] int64 into the flat sequence, clamped into it so it is always a legal gather
    index; valid [S, L] bool), L = the longest segment. Padded slots must be masked by the caller.
    """
    sizes = torch.tensor(lengths, dtype=torch.int64, device=device)  # [S]
    starts = torch.cumsum(sizes, 0) - sizes
    offsets = torch.arange(max(lengths, default=0), device=device)  # [L]
    valid = offsets[None, :] < sizes[:, None]  # [S, L]
    index = (starts[:, None] + offsets[None, :]).clamp(max=max(sum(lengths) - 1, 0))  # [S, L]
    return index, valid


# ----------------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------------

class AudioAttention(nn.Module):
    """Non-causal multi-head attention inside each window; q/k/v/out with bias, no rotary (MODEL_SPEC §5)."""

    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        d = cfg.d_model
        self.num_heads = cfg.num_heads
        self.head_dim = d // cfg.num_heads
        self.qkv_proj = FusedLinear(d, [d, d, d], ["q_proj", "k_proj", "v_proj"], bias=True)
        self.out_proj = nn.Linear(d, d, bias=True)

    def forward(self, x: torch.Tensor, window_index: torch.Tensor, window_mask: torch.Tensor | None,
                token_slots: torch.Tensor) -> torch.Tensor:
        """x: [N, d]; window_index: [W, L] int64 token of each window slot; window_mask: bool [W, 1, L, L]
        (True = attend; None when no slot is padded); token_slots: [N] int64, each token's slot in the
        flattened [W*L] grid. Returns [N, d]."""
        num_windows, window_len = window_index.shape
        qkv = F.linear(x, self.qkv_proj.weight, self.qkv_proj.bias)  # [N, 3d]: q|k|v kept fused for the gather
        # The windows as one padded batch: padded slots repeat a real token (the clamped index) and are
        # masked out as keys; their query rows are computed and dropped.
        qkv = qkv[window_index].view(num_windows, window_len, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(2)  # [W, L, heads, head_dim]
        out = dispatch.attention(q, k, v, window_mask, self.head_dim ** -0.5)  # [W, L, heads, head_dim]
        out = out.reshape(num_windows * window_len, -1).index_select(0, token_slots)  # [N, d]
        return self.out_proj(out)


class AudioEncoderLayer(nn.Module):
    """Pre-LN block: x += attn(LN(x)); x += fc2(GELU(fc1(LN(x))))."""

    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model, eps=LAYER_NORM_EPS)
        self.self_attn = AudioAttention(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.d_model, eps=LAYER_NORM_EPS)
        self.fc1 = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=True)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=True)

    def forward(self, x, window_index, window_mask, token_slots) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), window_index, window_mask, token_slots)
        x = x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))
        if x.dtype == torch.float16:  # transformers keeps fp16 activations finite this way (none in bf16)
            limit = torch.finfo(torch.float16).max - 1000
            x = x.clamp(-limit, limit)
        return x


class AudioEncoder(nn.Module):
    """The thinker's audio tower (`thinker.audio_tower.` in the checkpoint)."""

    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.downsample_hidden_size
        self.conv2d1 = nn.Conv2d(1, ch, kernel_size=3, stride=2, padding=1)
        self.conv2d2 = nn.Conv2d(ch, ch, kernel_size=3, stride=2, padding=1)
        self.conv2d3 = nn.Conv2d(ch, ch, kernel_size=3, stride=2, padding=1)
        mel_after_conv = conv_out_len(cfg.num_mel_bins)  # 128 -> 16
        self.conv_out = nn.Linear(ch * mel_after_conv, cfg.d_model, bias=False)
        self.layers = nn.ModuleList(AudioEncoderLayer(cfg) for _ in range(cfg.num_layers))
        self.ln_post = nn.LayerNorm(cfg.d_model, eps=LAYER_NORM_EPS)
        self.proj1 = nn.Linear(cfg.d_model, cfg.d_model, bias=True)
        self.proj2 = nn.Linear(cfg.d_model, cfg.output_dim, bias=True)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """(Re)compute the non-persistent sinusoid table, e.g. after materialising from the meta device.
        Positions restart in every chunk, so one full chunk's tokens (13) is all the table ever needs."""
        rows = conv_out_len(2 * self.cfg.n_window)
        self.register_buffer("positional_embedding", sinusoids(rows, self.cfg.d_model), persistent=False)

    num_tokens = staticmethod(audio_token_count)  # tokens per audio for a mel length (runtime.frontend.audio)

    def forward(self, input_features: torch.Tensor, feature_lens: torch.Tensor) -> torch.Tensor:
        """input_features: [num_mel_bins, total_frames] float, the valid frames of every audio concatenated
        in order (transformers' audio_tower input); feature_lens: [num_audios] int64, frames per audio,
        summing to total_frames.

        Returns [num_tokens, output_dim] in the parameters' dtype, audios in order; audio i owns
        AudioEncoder.num_tokens(feature_lens[i], n_window) consecutive rows.

        One host sync (feature_lens.tolist()) to lay out chunks and windows.
        """
        cfg = self.cfg
        lens = [int(n) for n in feature_lens.tolist()]
        if input_features.dim() != 2 or input_features.shape != (cfg.num_mel_bins, sum(lens)):
            raise ValueError(f"input_features must be [{cfg.num_mel_bins}, {sum(lens)}] for feature_lens {lens}, "
                             f"got {tuple(input_features.shape)}")
        layout = audio_layout(lens, cfg.n_window, cfg.n_window_infer)
        dtype, device = self.conv_out.weight.dtype, input_features.device
        if layout.num_tokens == 0:
            return torch.zeros(0, cfg.output_dim, dtype=dtype, device=device)

        x = self.embed_chunks(input_features.to(dtype), layout)  # [N, d]

        window_index, window_valid = pad_segments(layout.window_tokens, device)  # [W, L] each
        num_windows, window_len = window_index.shape
        token_slots = window_valid.flatten().nonzero().squeeze(1)  # [N]
        window_mask = None
        if min(layout.window_tokens) < window_len:  # padded slots are masked as keys, for every query row
            window_mask = window_valid[:, None, None, :].expand(num_windows, 1, window_len, window_len)
        for layer in self.layers:
            x = layer(x, window_index, window_mask, token_slots)

        x = self.proj1(self.ln_post(x))
        return self.proj2(F.gelu(x))  # [N, output_dim]

    def embed_chunks(self, features: torch.Tensor, layout: AudioLayout) -> torch.Tensor:
        """features: [mel, F] in the parameters' dtype. Returns [N, d]: the conv stem over the zero-padded
        chunks, conv_out, per-chunk sinusoids, padding dropped."""
        frame_index, frame_valid = pad_segments(layout.chunk_frames, features.device)  # [C, Fc]
        chunks = torch.where(frame_valid, features[:, frame_index], 0)  # [mel, C, Fc]
        x = self._conv_stem(chunks.transpose(0, 1))  # [C, Tc, d]

        chunk_tokens = torch.tensor(layout.chunk_tokens, device=x.device)  # [C]
        valid = torch.arange(x.shape[1], device=x.device)[None, :] < chunk_tokens[:, None]  # [C, Tc]
        return x.reshape(-1, x.shape[-1])[valid.flatten()]  # [N, d]

    def _conv_stem(self, chunks: torch.Tensor) -> torch.Tensor:
        """chunks: [C, mel, Fc] zero-padded frames -> [C, Tc, d]: the three convs (CONV_BATCH chunks at a time),
        conv_out, and the sinusoids, restarted in every chunk."""
        embeds = []
        for batch in chunks.unsqueeze(1).split(CONV_BATCH, dim=0):  # [c, 1, mel, Fc]
            h = F.gelu(self.conv2d1(batch))  # [c, ch, mel/2, Fc/2]
            h = F.gelu(self.conv2d2(h))  # [c, ch, mel/4, Fc/4]
            h = F.gelu(self.conv2d3(h))  # [c, ch, mel/8, Tc]
            c, ch, freq, time = h.shape
            h = h.permute(0, 3, 1, 2).reshape(c, time, ch * freq)  # [c, Tc, ch*mel/8], channel-major
            embeds.append(self.conv_out(h))  # [c, Tc, d]
        x = torch.cat(embeds) if len(embeds) > 1 else embeds[0]  # [C, Tc, d]
        return x + self.positional_embedding[: x.shape[1]].to(x.dtype)

    def forward_chunks(self, chunks: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
        """One audio of at least one full chunk, in a static layout (what a CUDA graph captures per chunk count,
        runtime/runner.py). chunks: [C, mel, 2·n_window] its frames cut into full chunks, the last one (and any
        chunk past the audio) zero-padded, as `forward` pads a batch that holds a full chunk; num_tokens: [1]
        int64 its token count, on the device. C <= n_window_infer / (2·n_window) or a multiple of it, so that
        attention windows are whole.

        Returns [C·Tc, output_dim]: the first num_tokens rows equal `forward`'s for the audio (its tokens are a
        prefix of the chunk slots: only its last chunk is partial); the rest are padding, finite, to be dropped.
        The slots are the tokens: windows are runs of whole chunks, padded slots masked as keys. No host read.
        """
        cfg = self.cfg
        x = self._conv_stem(chunks.to(self.conv_out.weight.dtype))  # [C, Tc, d]
        count, per_chunk, width = x.shape
        slots = count * per_chunk
        window_len = min(per_chunk * (cfg.n_window_infer // (2 * cfg.n_window)), slots)
        if slots % window_len:
            raise ValueError(f"{count} chunks do not fill whole attention windows of {window_len} tokens")
        x = x.reshape(slots, width)
        index = torch.arange(slots, device=x.device)
        window_index = index.view(-1, window_len)  # [W, L]
        valid = (index < num_tokens).view(-1, window_len)  # [W, L]
        window_mask = valid[:, None, None, :].expand(-1, 1, window_len, window_len)
        for layer in self.layers:
            x = layer(x, window_index, window_mask, index)
        x = self.proj1(self.ln_post(x))
        return self.proj2(F.gelu(x))  # [C·Tc, output_dim]

    def encode(self, input_features: torch.Tensor, feature_attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """The processor's padded batch. input_features: [B, num_mel_bins, T] float; feature_attention_mask:
        [B, T] (1 = valid frame, 0 = padding).

        Returns a list of B tensors, [num_tokens_i, output_dim] each (one row per <|audio_pad|> token of
        audio i). The valid frames are gathered and encoded in one call, as transformers' thinker does, so
        the chunk padding, and hence the result, depends on the whole batch (module docstring).
        """
        mask = feature_attention_mask.bool()  # [B, T]
        features = input_features.transpose(1, 2)[mask].transpose(0, 1)  # [mel, sum of valid frames]
        feature_lens = mask.sum(dim=1)  # [B]
        out = self.forward(features, feature_lens)
        counts = [self.num_tokens(int(n), self.cfg.n_window) for n in feature_lens.tolist()]
        return list(out.split(counts, dim=0))
