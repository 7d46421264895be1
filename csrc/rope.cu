// TM-RoPE with Qwen3's per-head q/k RMSNorm, in place: one warp per (token, head) row.
// Twins: kernels/rope.py qk_norm_rope_ref (cos/sin from rope_cos_sin_ref), kernels/norm.py rms_norm_ref.
// Legend: T = num_tokens, Hq / Hk = query / key heads, D = head_dim, slot j in [0, D/2) pairs channels j, j + D/2.
#include <cstdint>

#include "common.cuh"

namespace omni_rt {
namespace {

constexpr int kRopeWarpsPerBlock = 8;
constexpr int kMaxSlotsPerLane = 8;  // D/2 <= 32 * 8, i.e. head_dim <= 512

// The reference rounds to the activation dtype after every op (norm cast, weight multiply, cos/sin cast,
// each product and the sum); round_to<> reproduces that, and the explicit _rn intrinsics keep nvcc from
// contracting a*c + b*s into an FMA that fp32 torch does not do.
template <typename scalar_t>
__global__ void mrope_qk_norm_kernel(scalar_t* __restrict__ q, int64_t stride_qt, int64_t stride_qh,
                                     scalar_t* __restrict__ k, int64_t stride_kt, int64_t stride_kh,
                                     const scalar_t* __restrict__ q_weight, const scalar_t* __restrict__ k_weight,
                                     const int64_t* __restrict__ positions, int64_t stride_pa, int64_t stride_pt,
                                     const float* __restrict__ inv_freq, int64_t T, int Hq, int Hk, int D,
                                     int section1, int section2, float eps) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int heads = Hq + Hk;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRopeWarpsPerBlock + warp;
  if (row >= T * heads) return;
  const int64_t t = row / heads;
  const int h = static_cast<int>(row % heads);
  scalar_t* x = h < Hq ? q + t * stride_qt + h * stride_qh : k + t * stride_kt + (h - Hq) * stride_kh;
  const scalar_t* weight = h < Hq ? q_weight : k_weight;
  const int half = D / 2;

  float lo[kMaxSlotsPerLane], hi[kMaxSlotsPerLane];
  float sum_sq = 0.f;
#pragma unroll
  for (int i = 0; i < kMaxSlotsPerLane; ++i) {
    const int j = lane + i * kWarp;
    if (j < half) {
      lo[i] = to_float(x[j]);
      hi[i] = to_float(x[j + half]);
      sum_sq += lo[i] * lo[i] + hi[i] * hi[i];
    }
  }
  for (int off = kWarp / 2; off > 0; off /= 2) sum_sq += __shfl_xor_sync(0xffffffffu, sum_sq, off);
  const float inv_rms = rsqrtf(sum_sq / static_cast<float>(D) + eps);

  const float pos_t = static_cast<float>(positions[t * stride_pt]);
  const float pos_h = static_cast<float>(positions[stride_pa + t * stride_pt]);
  const float pos_w = static_cast<float>(positions[2 * stride_pa + t * stride_pt]);
#pragma unroll
  for (int i = 0; i < kMaxSlotsPerLane; ++i) {
    const int j = lane + i * kWarp;
    if (j < half) {
      // kernels/rope.py tm_rope_axis_of_slot: t by default, h on slots 1, 4, ... below 3*section[1], w on 2, 5, ...
      const int phase = j % 3;
      const float pos = (phase == 1 && j < 3 * section1) ? pos_h : (phase == 2 && j < 3 * section2) ? pos_w : pos_t;
      const float angle = __fmul_rn(pos, inv_freq[j]);
      const float c = round_to<scalar_t>(cosf(angle));
      const float s = round_to<scalar_t>(sinf(angle));
      const float n_lo = round_to<scalar_t>(__fmul_rn(to_float(weight[j]), round_to<scalar_t>(__fmul_rn(lo[i], inv_rms))));
      const float n_hi =
          round_to<scalar_t>(__fmul_rn(to_float(weight[j + half]), round_to<scalar_t>(__fmul_rn(hi[i], inv_rms))));
      // rotate_half: channel j pairs with -x[j + D/2], channel j + D/2 with x[j]
      const float out_lo = __fadd_rn(round_to<scalar_t>(__fmul_rn(n_lo, c)), round_to<scalar_t>(__fmul_rn(-n_hi, s)));
      const float out_hi = __fadd_rn(round_to<scalar_t>(__fmul_rn(n_hi, c)), round_to<scalar_t>(__fmul_rn(n_lo, s)));
      x[j] = from_float<scalar_t>(out_lo);
      x[j + half] = from_float<scalar_t>(out_hi);
    }
  }
}

}  // namespace
}  // namespace omni_rt

extern "C" cudaError_t omni_rt_mrope_qk_norm(void* q, int64_t stride_qt, int64_t stride_qh, void* k, int64_t stride_kt,
                                             int64_t stride_kh, const void* q_weight, const void* k_weight,
                                             const int64_t* positions, int64_t stride_pa, int64_t stride_pt,
                                             const float* inv_freq, int64_t T, int64_t Hq, int64_t Hk, int64_t D,
                                             int64_t section1, int64_t section2, float eps, omni_rt_dtype dtype,
                                             cudaStream_t stream) {
  using namespace omni_rt;
  if (T < 0 || Hq < 0 || Hk < 0 || D < 2 || D % 2 != 0 || D / 2 > kWarp * kMaxSlotsPerLane) return cudaErrorInvalidValue;
  const int64_t rows = T * (Hq + Hk);
  if (rows == 0) return cudaSuccess;
  const unsigned grid = ceil_div(rows, kRopeWarpsPerBlock);
  OMNI_RT_DISPATCH_DTYPE(dtype, mrope_qk_norm_kernel<scalar_t><<<grid, kRopeWarpsPerBlock * kWarp, 0, stream>>>(
                                    static_cast<scalar_t*>(q), stride_qt, stride_qh, static_cast<scalar_t*>(k), stride_kt,
                                    stride_kh, static_cast<const scalar_t*>(q_weight),
                                    static_cast<const scalar_t*>(k_weight), positions, stride_pa, stride_pt, inv_freq, T,
                                    static_cast<int>(Hq), static_cast<int>(Hk), static_cast<int>(D),
                                    static_cast<int>(section1), static_cast<int>(section2), eps));
  return cudaGetLastError();
}
