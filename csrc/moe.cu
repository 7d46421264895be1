// MoE routing kernels: fused softmax top-k router and the expert-block alignment of token-expert pairs.
// Twins: kernels/moe.py route_topk_ref; runtime/cuda_ops.py moe_align_torch.
// Legend: T = num_tokens, E = num_experts, K = top_k, P = T*K pairs, BM = block_m.
#include <cmath>
#include <cstdint>

#include "common.cuh"

namespace omni_rt {
namespace {

constexpr int kRouteWarpsPerBlock = 4;
constexpr int kSharedBudgetBytes = 48 * 1024;  // the default dynamic shared memory limit, no opt-in needed

// torch.topk order: NaN above everything, then larger values; ties go to the lower expert id.
__device__ __forceinline__ bool ranks_before(float a, int ia, float b, int ib) {
  const bool na = isnan(a), nb = isnan(b);
  if (na || nb) return na && nb ? ia < ib : na;  // a strict total order even with NaNs: lanes must agree
  if (a != b) return a > b;
  return ia < ib;
}

// One warp per token: the row's E probabilities live in shared memory ([E] per warp, plus [K] picked).
template <typename scalar_t>
__global__ void route_topk_kernel(const scalar_t* __restrict__ logits, int64_t stride_lt, int64_t stride_le,
                                  scalar_t* __restrict__ weights, int64_t* __restrict__ ids, int64_t T, int E, int K,
                                  bool renormalize) {
  extern __shared__ float smem[];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + warp;
  if (t >= T) return;  // whole warps leave together; the kernel has no block-wide barrier
  float* probs = smem + static_cast<int64_t>(warp) * (E + K);  // [E]
  float* picked = probs + E;                                   // [K]
  const scalar_t* row = logits + t * stride_lt;

  float row_max = -INFINITY;
  for (int e = lane; e < E; e += kWarp) {
    const float v = to_float(row[e * stride_le]);
    probs[e] = v;
    row_max = fmaxf(row_max, v);
  }
  for (int off = kWarp / 2; off > 0; off /= 2) row_max = fmaxf(row_max, __shfl_xor_sync(0xffffffffu, row_max, off));
  float denom = 0.f;
  for (int e = lane; e < E; e += kWarp) {
    const float p = expf(probs[e] - row_max);
    probs[e] = p;
    denom += p;
  }
  for (int off = kWarp / 2; off > 0; off /= 2) denom += __shfl_xor_sync(0xffffffffu, denom, off);
  for (int e = lane; e < E; e += kWarp) probs[e] = probs[e] / denom;  // torch's softmax divides, not 1/sum
  __syncwarp();

  // K rounds of warp argmax; a picked expert is marked taken (-inf, below every probability).
  for (int r = 0; r < K; ++r) {
    float best = -INFINITY;
    int best_id = E;
    for (int e = lane; e < E; e += kWarp) {
      const float p = probs[e];
      if (ranks_before(p, e, best, best_id) && p != -INFINITY) {
        best = p;
        best_id = e;
      }
    }
    for (int off = kWarp / 2; off > 0; off /= 2) {
      const float other = __shfl_xor_sync(0xffffffffu, best, off);
      const int other_id = __shfl_xor_sync(0xffffffffu, best_id, off);
      if (ranks_before(other, other_id, best, best_id)) {
        best = other;
        best_id = other_id;
      }
    }
    if (lane == 0) {
      picked[r] = best;
      ids[t * K + r] = best_id;
    }
    if (best_id < E && best_id % kWarp == lane) probs[best_id] = -INFINITY;
    __syncwarp();
  }

  float scale = 1.f;
  if (renormalize) {
    float total = 0.f;
    for (int r = 0; r < K; ++r) total += picked[r];
    scale = total;
  }
  for (int r = lane; r < K; r += kWarp) weights[t * K + r] = from_float<scalar_t>(renormalize ? picked[r] / scale : picked[r]);
}

// One block. Warp w owns the contiguous pair segment [w*seg, (w+1)*seg): pass A counts its pairs per
// expert, a scan turns the counts into write positions, pass B writes the pairs in order (ranks inside a
// warp from __match_any_sync), so every expert's pairs come out ascending without any sort.
__global__ void moe_align_kernel(const int64_t* __restrict__ topk_ids, int32_t* __restrict__ sorted_ids,
                                 int32_t* __restrict__ expert_ids, int32_t* __restrict__ num_tokens_post_pad, int64_t P,
                                 int E, int BM, int64_t max_padded) {
  extern __shared__ int32_t ismem[];
  const int num_warps = blockDim.x / kWarp;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  int32_t* warp_counts = ismem;                               // [num_warps][E], then write offsets
  int32_t* expert_start = ismem + num_warps * E;              // [E + 1]

  for (int i = threadIdx.x; i < num_warps * E; i += blockDim.x) warp_counts[i] = 0;
  for (int64_t i = threadIdx.x; i < max_padded; i += blockDim.x) sorted_ids[i] = static_cast<int32_t>(P);
  __syncthreads();

  const int64_t seg = (P + num_warps - 1) / num_warps;
  const int64_t begin = warp * seg;
  const int64_t end = begin + seg < P ? begin + seg : P;
  for (int64_t i = begin + lane; i < end; i += kWarp) {
    const int64_t e = topk_ids[i];
    if (e >= 0 && e < E) atomicAdd(&warp_counts[warp * E + e], 1);
  }
  __syncthreads();

  for (int e = threadIdx.x; e < E; e += blockDim.x) {  // exclusive prefix over warps, per expert
    int32_t run = 0;
    for (int w = 0; w < num_warps; ++w) {
      const int32_t c = warp_counts[w * E + e];
      warp_counts[w * E + e] = run;
      run += c;
    }
    expert_start[e] = run;  // the expert's total, until the scan below
  }
  __syncthreads();
  if (threadIdx.x == 0) {  // E is small (128 in Qwen3-Omni): a serial scan is cheaper than a block scan's barriers
    int32_t acc = 0;
    for (int e = 0; e < E; ++e) {
      const int32_t c = expert_start[e];
      expert_start[e] = acc;
      acc += (c + BM - 1) / BM * BM;
    }
    expert_start[E] = acc;
    *num_tokens_post_pad = acc;
  }
  __syncthreads();

  const int64_t num_blocks = max_padded / BM;
  const int32_t used = expert_start[E];
  for (int64_t b = threadIdx.x; b < num_blocks; b += blockDim.x) {
    const int64_t pos = b * BM;
    int32_t expert = -1;
    if (pos < used) {  // last e with expert_start[e] <= pos (empty experts share their successor's start)
      int lo = 0, hi = E;  // invariant: expert_start[lo] <= pos < expert_start[hi]
      while (hi - lo > 1) {
        const int mid = (lo + hi) / 2;
        if (expert_start[mid] <= pos) lo = mid; else hi = mid;
      }
      expert = lo;
    }
    expert_ids[b] = expert;
  }

  const unsigned lanes_below = (1u << lane) - 1u;
  for (int64_t base = begin; base < end; base += kWarp) {
    const int64_t i = base + lane;
    const int64_t e64 = i < end ? topk_ids[i] : -1;
    const bool valid = e64 >= 0 && e64 < E;
    const int e = valid ? static_cast<int>(e64) : -1;
    const unsigned same = __match_any_sync(0xffffffffu, e);
    const int rank = __popc(same & lanes_below);
    if (valid) sorted_ids[expert_start[e] + warp_counts[warp * E + e] + rank] = static_cast<int32_t>(i);
    __syncwarp();
    if (valid && rank == 0) warp_counts[warp * E + e] += __popc(same);
    __syncwarp();
  }
}

}  // namespace
}  // namespace omni_rt

extern "C" cudaError_t omni_rt_route_topk(const void* logits, int64_t stride_lt, int64_t stride_le, void* weights,
                                          int64_t* ids, int64_t T, int64_t E, int64_t K, int renormalize,
                                          omni_rt_dtype dtype, cudaStream_t stream) {
  using namespace omni_rt;
  if (T < 0 || K < 1 || K > E || E > 8192) return cudaErrorInvalidValue;
  if (T == 0) return cudaSuccess;
  int warps = kRouteWarpsPerBlock;
  while (warps > 1 && static_cast<int64_t>(warps) * (E + K) * 4 > kSharedBudgetBytes) warps /= 2;
  const size_t smem = static_cast<size_t>(warps) * (E + K) * sizeof(float);
  if (smem > static_cast<size_t>(kSharedBudgetBytes)) return cudaErrorInvalidValue;
  const unsigned grid = ceil_div(T, warps);
  OMNI_RT_DISPATCH_DTYPE(dtype, route_topk_kernel<scalar_t><<<grid, warps * kWarp, smem, stream>>>(
                                    static_cast<const scalar_t*>(logits), stride_lt, stride_le,
                                    static_cast<scalar_t*>(weights), ids, T, static_cast<int>(E),
                                    static_cast<int>(K), renormalize != 0));
  return cudaGetLastError();
}

extern "C" int64_t omni_rt_moe_align_max_padded(int64_t P, int64_t E, int64_t BM) {
  if (BM < 1) return 0;
  return (P + E * (BM - 1) + BM - 1) / BM * BM;
}

extern "C" cudaError_t omni_rt_moe_align(const int64_t* topk_ids, int32_t* sorted_ids, int32_t* expert_ids,
                                         int32_t* num_tokens_post_pad, int64_t P, int64_t E, int64_t BM,
                                         cudaStream_t stream) {
  using namespace omni_rt;
  if (P < 0 || E < 1 || BM < 1) return cudaErrorInvalidValue;
  const int64_t max_padded = omni_rt_moe_align_max_padded(P, E, BM);
  if (max_padded >= INT32_MAX) return cudaErrorInvalidValue;  // int32 pair indices
  const int64_t budget = kSharedBudgetBytes / sizeof(int32_t) - (E + 1);
  const int64_t warps = budget / E < 32 ? budget / E : 32;
  if (warps < 1) return cudaErrorInvalidValue;
  const size_t smem = static_cast<size_t>(warps * E + E + 1) * sizeof(int32_t);
  moe_align_kernel<<<1, static_cast<unsigned>(warps * kWarp), smem, stream>>>(
      topk_ids, sorted_ids, expert_ids, num_tokens_post_pad, P, static_cast<int>(E), static_cast<int>(BM), max_padded);
  return cudaGetLastError();
}
