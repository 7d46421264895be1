"""The draw of kernels/sampling.py in one Triton kernel: Philox4x32-10 uniforms, Gumbel noise and the argmax,
fused (the twin is `sample_ref`'s last four lines; `sample` is `sample_ref` with this op for them).

Why only the draw: in the torch twin the Philox rounds on int64 tensors are ~270 of the ~330 kernels one call
launches (B = 8, V = 152064; tests/test_sampling.py prints the count), the filters ~50. This kernel makes the
draw one launch and reads the filtered logits once, writing nothing but the tokens. The filters keep their
torch form: top-p needs a sorted cumulative sum, which a fused kernel would have to replace by a search.

One program per row walks the vocabulary in tiles of 4 * BLOCK_Q entries: Philox counter c gives the four
uniforms of entries 4c .. 4c + 3 (word w -> entry 4c + w), exactly the twin's layout, so the noise is
bit-identical; the log is the backend's, so a token can differ from the twin's only when two perturbed
logits lie within an ulp. Ties keep the first index, as torch.argmax.

Legend: B = rows, V = vocabulary, BLOCK_Q = Philox counters per tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.sampling import STEP_BITS, SamplingTensors, filter_logits_ref

DRAW_LAUNCHES = 1  # kernels one call of omni_rt_triton::sample_draw launches (kernels/launch_counts.py)


@triton.jit
def _gumbel_argmax_kernel(
    scores_ptr, seeds_ptr, steps_ptr, do_sample_ptr, temperature_ptr, tokens_ptr,
    V,
    stride_sb, stride_sv,
    STAGE: tl.constexpr, STEP_MASK: tl.constexpr, STEP_SHIFT: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    pid_b = tl.program_id(0)
    seed = tl.load(seeds_ptr + pid_b)
    step = tl.load(steps_ptr + pid_b)
    offset = ((step & STEP_MASK) + (STAGE << STEP_SHIFT)) << 32  # kernels.sampling.draw_offsets
    sampled = (tl.load(do_sample_ptr + pid_b) != 0) & (tl.load(temperature_ptr + pid_b) != 0.0)
    best_value = tl.full((), float("-inf"), tl.float32)
    best_index = tl.full((), 0, tl.int32) + V  # replaced by the first entry: every value is >= -inf
    offs_q = tl.arange(0, BLOCK_Q)
    for start in range(0, tl.cdiv(V, 4 * BLOCK_Q)):
        counters = start * BLOCK_Q + offs_q
        words = tl.randint4x(seed, offset + counters.to(tl.int64))
        for w in tl.static_range(4):
            offs_v = counters * 4 + w
            score = tl.load(scores_ptr + pid_b * stride_sb + offs_v * stride_sv, mask=offs_v < V,
                            other=-float("inf")).to(tl.float32)
            uniform = ((words[w] >> 9) * 2 + 1).to(tl.float32) * 5.9604644775390625e-08  # 2**-24
            gumbel = -tl.log(-tl.log(uniform))
            value = score + tl.where(sampled, gumbel, 0.0)
            tile_max = tl.max(value, axis=0)
            tile_index = tl.min(tl.where((value == tile_max) & (offs_v < V), offs_v, V), axis=0)
            better = (tile_max > best_value) | ((tile_max == best_value) & (tile_index < best_index))
            best_value = tl.where(better, tile_max, best_value)
            best_index = tl.where(better, tile_index, best_index)
    tl.store(tokens_ptr + pid_b, best_index.to(tl.int64))


@torch.library.custom_op("omni_rt_triton::sample_draw", mutates_args=())
def _sample_draw_op(scores: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor, do_sample: torch.Tensor,
                    temperature: torch.Tensor, stage: int) -> torch.Tensor:
    """scores: (B, V) filtered logits, any strides; seeds, steps: (B,) int64; do_sample: (B,) bool;
    temperature: (B,) float32. Returns (B,) int64 tokens."""
    batch, vocab = scores.shape
    tokens = torch.empty(batch, dtype=torch.int64, device=scores.device)
    if batch == 0:
        return tokens
    block_q = min(1024, triton.next_power_of_2(triton.cdiv(vocab, 4)))
    _gumbel_argmax_kernel[(batch,)](
        scores, seeds.contiguous(), steps.contiguous(), do_sample.contiguous(), temperature.contiguous(), tokens,
        vocab, *scores.stride(),
        STAGE=stage, STEP_MASK=(1 << STEP_BITS) - 1, STEP_SHIFT=STEP_BITS, BLOCK_Q=block_q, num_warps=4)
    return tokens


@_sample_draw_op.register_fake
def _(scores, seeds, steps, do_sample, temperature, stage):
    return scores.new_empty(scores.shape[0], dtype=torch.int64)


def sample_draw(scores: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor, params: SamplingTensors,
                stage: int) -> torch.Tensor:
    """scores: [B, V] filtered logits (`filter_logits_ref`); seeds, steps: [B] int64; params: SamplingTensors;
    stage: STAGE_* -> [B] int64 tokens: Gumbel-max for sampled rows, argmax for greedy ones."""
    if not 0 <= stage < 128:
        raise ValueError(f"stage must be in [0, 128), got {stage}")
    return torch.ops.omni_rt_triton.sample_draw(scores, seeds, steps, params.do_sample, params.temperature, stage)


def sample(logits: torch.Tensor, history: torch.Tensor, params: SamplingTensors, seeds: torch.Tensor,
           steps: torch.Tensor, stage: int, suppress: torch.Tensor | None = None) -> torch.Tensor:
    """kernels.sampling.sample_ref's contract, with the draw fused into one Triton kernel."""
    return sample_draw(filter_logits_ref(logits, history, params, suppress), seeds, steps, params, stage)


TRITON_OPS = {"sample": sample}  # runtime/dispatch.py registers these for the triton backend
