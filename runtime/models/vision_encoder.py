"""Vision encoder: the Qwen3-VL ViT with DeepStack taps (MODEL_SPEC §6), as transformers'
`Qwen3OmniMoeVisionEncoder` (5.23) computes it.

    pixel_values [N, C*T*P*P]  --patch embed (Conv3d with kernel = stride, i.e. one GEMM)-->  [N, H]
      + learned position table, bilinearly resampled to each item's (h, w) grid
      -> `depth` pre-LN blocks: 2-D rotary attention inside each temporal group of each item, tanh-GELU MLP
           (after the blocks listed in `deepstack_visual_indexes`: merger_list[i] -> one DeepStack level)
      -> merger: LayerNorm per patch, 2x2 patches -> one token, MLP                 -> [N / merge², out_hidden]

Shapes: N = patches of all items together, H = hidden_size, D = head_dim, M = spatial_merge_size.
Patches arrive in the processor's order: item, frame (temporal group), block row, block col, row in block,
col in block — so every M*M consecutive patches form one merged token (MODEL_SPEC §6.3).

Parameter names are the checkpoint's under `thinker.visual.`; runtime.weights.load_weights reads them as is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kernels.rope import rope_inv_freq
from runtime import dispatch
from runtime.config import VisionEncoderConfig

LAYER_NORM_EPS = 1e-6  # every vision LayerNorm, blocks and mergers (MODEL_SPEC §14.5)

_ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "silu": F.silu,
}


# ----------------------------------------------------------------------------------------------------------
# Per-call layout: everything that depends only on grid_thw (computed once per forward, shared by all blocks)
# ----------------------------------------------------------------------------------------------------------

@dataclass
class VisionLayout:
    """What the encoder derives from `grid_thw` before touching activations.

    rows, cols:  [N] int64, each patch's row and column in its frame's patch grid.
    heights, widths: [N] int64, the (h, w) of the item each patch belongs to.
    runs: attention segments, run-length encoded: (first_patch, num_segments, segment_len). A segment is one
      temporal group of one item (h*w patches); consecutive segments of equal length form one run, which is
      attended as one batched call of `num_segments` independent sequences.
    """

    rows: torch.Tensor
    cols: torch.Tensor
    heights: torch.Tensor
    widths: torch.Tensor
    runs: list[tuple[int, int, int]]

    @property
    def num_patches(self) -> int:
        return self.rows.numel()


def vision_layout(grid_thw: torch.Tensor, merge_size: int) -> VisionLayout:
    """grid_thw: [num_items, 3] int (t, h, w) in patch units; h and w must be multiples of `merge_size`.

    One host sync (grid_thw.tolist()); the rest is device arithmetic.
    """
    if grid_thw.dim() != 2 or grid_thw.shape[-1] != 3:
        raise ValueError(f"grid_thw must be [num_items, 3], got {tuple(grid_thw.shape)}")
    device = grid_thw.device
    grids = [tuple(int(v) for v in item) for item in grid_thw.tolist()]
    for t, h, w in grids:
        if t < 1 or h < 1 or w < 1 or h % merge_size or w % merge_size:
            raise ValueError(f"grid (t={t}, h={h}, w={w}): t, h, w must be positive and h, w multiples "
                             f"of spatial_merge_size {merge_size}")

    # Position of each patch inside its frame, in merge-block order (block_row, block_col, in_row, in_col).
    m = merge_size
    rows, cols, heights, widths = [], [], [], []
    for t, h, w in grids:
        row = torch.arange(h, device=device).view(h // m, 1, m, 1).expand(h // m, w // m, m, m)
        col = torch.arange(w, device=device).view(1, w // m, 1, m).expand(h // m, w // m, m, m)
        rows.append(row.reshape(-1).repeat(t))  # [t*h*w]
        cols.append(col.reshape(-1).repeat(t))
        heights.append(torch.full((t * h * w,), h, device=device))
        widths.append(torch.full((t * h * w,), w, device=device))

    runs: list[tuple[int, int, int]] = []
    start = 0
    for t, h, w in grids:
        if runs and runs[-1][2] == h * w:  # same segment length as the previous run: extend it
            first, count, length = runs[-1]
            runs[-1] = (first, count + t, length)
        else:
            runs.append((start, t, h * w))
        start += t * h * w

    empty = torch.zeros(0, dtype=torch.int64, device=device)
    cat = lambda parts: torch.cat(parts) if parts else empty  # noqa: E731
    return VisionLayout(cat(rows), cat(cols), cat(heights), cat(widths), runs)


def pos_embed_taps(index: torch.Tensor, size: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear align_corners=True resampling along one axis of a `side`-long table to a `size`-long grid.

    index: [N] int64 target positions; size: [N] int64 target axis length per patch.
    Returns (taps [N, 2] int64 source positions, weights [N, 2] fp32).

    Target i sits at source coordinate i*(side-1)/(size-1) (0 when size == 1); its two neighbours floor and
    floor+1 are clamped to the table, with hat weights 1 - distance (the clamped tap past the end gets 0).
    The arithmetic follows transformers 5.23 step by step in fp32 so the weights agree to the bit.
    """
    src = index.to(torch.float32) * (side - 1) / torch.clamp(size - 1, min=1)  # [N] fp32
    floor = torch.floor(src)
    offsets = torch.arange(2, device=index.device)
    taps = (floor.long()[:, None] + offsets).clamp(0, side - 1)  # [N, 2]
    weights = (1 - (src[:, None] - floor[:, None] - offsets).abs()).clamp(min=0)  # [N, 2] fp32
    return taps, weights


def vision_rope_cos_sin(rows: torch.Tensor, cols: torch.Tensor, inv_freq: torch.Tensor):
    """Axial 2-D rotary tables. rows, cols: [N] int; inv_freq: [D/4] fp32.
    Returns (cos, sin), each [N, D] fp32: angles [row*inv (D/4) | col*inv (D/4)] repeated twice, so that
    the rotate-half pairs (j, j + D/2) share one angle (MODEL_SPEC §6.3).

    Own helper rather than dispatch.rope_cos_sin: that one assigns one position axis per frequency slot of
    a single inv_freq table, while here the two axes each use the whole table side by side.
    """
    inv_freq = inv_freq.to(device=rows.device, dtype=torch.float32)
    angles = torch.cat((rows.float()[:, None] * inv_freq, cols.float()[:, None] * inv_freq), dim=-1)  # [N, D/2]
    angles = torch.cat((angles, angles), dim=-1)  # [N, D]
    return angles.cos(), angles.sin()


# ----------------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------------

class VisionPatchEmbed(nn.Module):
    """Conv3d with kernel = stride = (T, P, P) over one patch is a linear map of the flattened patch, so it
    runs as one GEMM; the weight keeps the checkpoint's Conv3d shape [H, C, T, P, P]."""

    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, bias=True,
                              kernel_size=(cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size),
                              stride=(cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight  # [H, C, T, P, P]; flattening matches the patch's (C, T, P, P) layout
        x = pixel_values.to(weight.dtype)  # [N, C*T*P*P]
        return F.linear(x, weight.reshape(weight.shape[0], -1), self.proj.bias)  # [N, H]


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)  # q|k|v as in the checkpoint
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                runs: list[tuple[int, int, int]], key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: [N, H]; cos, sin: [N, D] fp32; runs: see VisionLayout; or key_mask: [1, 1, 1, N] bool, one segment
        whose keys past its patches are padding (VisionEncoder.forward_segment). Returns [N, H]."""
        num_patches = x.shape[0]
        q, k, v = self.qkv(x).view(1, num_patches, 3, self.num_heads, self.head_dim).unbind(2)  # [1, N, heads, D]
        # Vision rotary runs in fp32 whatever the activation dtype (MODEL_SPEC §14.3).
        q = dispatch.apply_rope(q.float(), cos[None], sin[None]).to(x.dtype)
        k = dispatch.apply_rope(k.float(), cos[None], sin[None]).to(x.dtype)
        scale = self.head_dim ** -0.5
        if key_mask is not None:  # [1, 1, 1, N]: broadcast over the query rows, never materialised [N, N]
            return self.proj(dispatch.attention(q, k, v, key_mask, scale).reshape(num_patches, -1))
        # Full attention inside each segment (one frame of one item), never across: each run of equal-length
        # segments is one batched call with no mask (MODEL_SPEC §6.4).
        outs = []
        for first, count, length in runs:
            span = slice(first, first + count * length)
            shape = (count, length, self.num_heads, self.head_dim)
            out = dispatch.attention(q[0, span].reshape(shape), k[0, span].reshape(shape),
                                     v[0, span].reshape(shape), None, scale)  # [count, length, heads, D]
            outs.append(out.reshape(count * length, -1))
        out = torch.cat(outs) if len(outs) > 1 else outs[0]  # [N, H]
        return self.proj(out)


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=LAYER_NORM_EPS)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=LAYER_NORM_EPS)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)

    def forward(self, x, cos, sin, runs, key_mask=None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, runs, key_mask)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """M*M neighbouring patches -> one token of out_hidden_size: LayerNorm, concat, Linear, exact GELU, Linear.

    The main merger normalizes each patch before the concat (LayerNorm over H); the DeepStack mergers
    (`norm_after_merge=True`) normalize the concatenated M*M*H vector (MODEL_SPEC §6.5-6, §14.9).
    """

    def __init__(self, cfg: VisionEncoderConfig, norm_after_merge: bool):
        super().__init__()
        self.merged_size = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.norm_after_merge = norm_after_merge
        self.ln_q = nn.LayerNorm(self.merged_size if norm_after_merge else cfg.hidden_size, eps=LAYER_NORM_EPS)
        # nn.Sequential so the checkpoint names mlp.0 / mlp.2 (mlp.1 is the parameterless GELU) line up.
        self.mlp = nn.Sequential(nn.Linear(self.merged_size, self.merged_size, bias=True), nn.GELU(),
                                 nn.Linear(self.merged_size, cfg.out_hidden_size, bias=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, H] in merge-block order -> [N / M², out_hidden_size]."""
        if self.norm_after_merge:
            x = self.ln_q(x.reshape(-1, self.merged_size))
        else:
            x = self.ln_q(x).reshape(-1, self.merged_size)
        return self.mlp(x)


class VisionEncoder(nn.Module):
    """The thinker's vision tower (`thinker.visual.` in the checkpoint)."""

    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.num_grid_per_side = int(round(cfg.num_position_embeddings ** 0.5))
        self.patch_embed = VisionPatchEmbed(cfg)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)  # a side x side grid
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg, norm_after_merge=False)
        self.merger_list = nn.ModuleList(PatchMerger(cfg, norm_after_merge=True)
                                         for _ in cfg.deepstack_visual_indexes)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """(Re)compute the non-persistent rotary frequencies, e.g. after materialising from the meta device.
        D/4 of them: the same table serves the row half and the column half of each head."""
        self.register_buffer("inv_freq", rope_inv_freq(self.head_dim // 2, self.cfg.rope_theta), persistent=False)

    def interpolated_pos_embed(self, layout: VisionLayout) -> torch.Tensor:
        """[N, H] in the table's dtype: the position table bilinearly resampled to each item's grid, the same
        for every frame. Weights stay fp32 and the 4-tap sum is taken in fp32 (5.23; 4.57 cast the weights to
        the model dtype first, MODEL_SPEC §15)."""
        side = self.num_grid_per_side
        row_taps, row_weights = pos_embed_taps(layout.rows, layout.heights, side)  # [N, 2] each
        col_taps, col_weights = pos_embed_taps(layout.cols, layout.widths, side)
        taps = (row_taps[:, :, None] * side + col_taps[:, None, :]).reshape(-1, 4)  # [N, 4] into the table
        weights = (row_weights[:, :, None] * col_weights[:, None, :]).reshape(-1, 4)  # [N, 4] fp32
        table = self.pos_embed.weight
        return (table[taps] * weights[:, :, None]).sum(dim=1).to(table.dtype)  # [N, H]

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """pixel_values: [N, C*T*P*P], patches in processor order (see the module docstring), any float dtype;
        grid_thw: [num_items, 3] int64 (t, h, w) per image or video, in patch units.

        Returns (embeds [N / M², out_hidden_size], deepstack: one [N / M², out_hidden_size] per entry of
        deepstack_visual_indexes, in block order), in the parameters' dtype.
        """
        cfg = self.cfg
        layout = vision_layout(grid_thw.to(pixel_values.device), cfg.spatial_merge_size)
        patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
        if pixel_values.dim() != 2 or pixel_values.shape != (layout.num_patches, patch_dim):
            raise ValueError(f"pixel_values must be [{layout.num_patches}, {patch_dim}] for grid_thw "
                             f"{grid_thw.tolist()}, got {tuple(pixel_values.shape)}")

        x = self.patch_embed(pixel_values)  # [N, H]
        x = x + self.interpolated_pos_embed(layout).to(x.dtype)
        cos, sin = vision_rope_cos_sin(layout.rows, layout.cols, self.inv_freq)  # [N, D] fp32
        if layout.num_patches == 0:
            empty = x.new_zeros(0, cfg.out_hidden_size)
            return empty, [empty.clone() for _ in cfg.deepstack_visual_indexes]

        return self._blocks(x, cos, sin, layout.runs, None)

    def forward_segment(self, pixel_values: torch.Tensor, layout: torch.Tensor, num_patches: torch.Tensor
                        ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One segment (one frame of one image or video: h·w patches, whose attention stays inside it) in a static
        layout, what a CUDA graph captures per patch count (runtime/runner.py). pixel_values: [S, C*T*P*P] its
        patches, then zero rows; layout: [4, S] int64 its rows, cols, heights, widths (vision_layout's; padded
        entries any in-range value); num_patches: [1] int64, h·w, on the device.

        Returns `forward`'s (embeds, deepstack) with S / M² rows each: the first h·w / M² equal `forward`'s for
        the segment, the rest are padding (finite, to be dropped). Padded patches are masked as keys. No host
        read."""
        x = self.patch_embed(pixel_values)  # [S, H]
        rows, cols, heights, widths = layout.unbind(0)
        x = x + self.interpolated_pos_embed(VisionLayout(rows, cols, heights, widths, [])).to(x.dtype)
        cos, sin = vision_rope_cos_sin(rows, cols, self.inv_freq)  # [S, D] fp32
        key_mask = (torch.arange(x.shape[0], device=x.device) < num_patches)[None, None, None, :]  # [1, 1, 1, S]
        return self._blocks(x, cos, sin, [], key_mask)

    def _blocks(self, x, cos, sin, runs, key_mask) -> tuple[torch.Tensor, list[torch.Tensor]]:
        cfg, deepstack = self.cfg, []
        for index, block in enumerate(self.blocks):
            x = block(x, cos, sin, runs, key_mask)
            if index in cfg.deepstack_visual_indexes:
                deepstack.append(self.merger_list[cfg.deepstack_visual_indexes.index(index)](x))
        return self.merger(x), deepstack
