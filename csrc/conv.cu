// Streaming causal conv1d update (Code2Wav, MODEL_SPEC §10): outputs from (old state || x), then the state
// shift. Twin: kernels/conv.py causal_conv1d_update_ref (its state contract: slot -1 = zeros, state untouched).
// Legend: B = batch rows, C_in / C_out = channels, L = samples in this call, W = taps, d = dilation,
// S = (W-1)*d state samples, G = groups, Cg = C_in/G input channels per output channel.
#include <cstdint>

#include "common.cuh"

namespace omni_rt {
namespace {

constexpr int kConvThreads = 256;

// One thread per output sample (b, co, l): sum over its group's Cg input channels and W taps, in fp32.
// Window position p in [0, S + L) is state sample p when p < S, else input sample p - S.
template <typename scalar_t>
__global__ void causal_conv1d_update_out_kernel(const scalar_t* __restrict__ x, int64_t stride_xb, int64_t stride_xc,
                                                int64_t stride_xl, const scalar_t* __restrict__ state, int64_t stride_sb,
                                                int64_t stride_sc, int64_t stride_ss,
                                                const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias,
                                                const int64_t* __restrict__ slot_ids, scalar_t* __restrict__ out,
                                                int64_t B, int64_t C_in, int64_t C_out, int64_t L, int W, int dilation,
                                                int64_t groups) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= B * C_out * L) return;
  const int64_t l = idx % L;
  const int64_t co = (idx / L) % C_out;
  const int64_t b = idx / (L * C_out);
  const int64_t row = slot_ids ? slot_ids[b] : b;
  if (row < 0) {  // padded batch row
    out[idx] = from_float<scalar_t>(0.f);
    return;
  }
  const int64_t S = static_cast<int64_t>(W - 1) * dilation;
  const int64_t Cg = C_in / groups;
  const int64_t c0 = (co / (C_out / groups)) * Cg;
  const scalar_t* w_row = weight + co * Cg * W;
  float acc = bias ? to_float(bias[co]) : 0.f;
  for (int64_t cl = 0; cl < Cg; ++cl) {
    const int64_t c = c0 + cl;
    const scalar_t* s_row = state + row * stride_sb + c * stride_sc;
    const scalar_t* x_row = x + b * stride_xb + c * stride_xc;
    for (int w = 0; w < W; ++w) {
      const int64_t p = l + static_cast<int64_t>(w) * dilation;
      const float v = to_float(p < S ? s_row[p * stride_ss] : x_row[(p - S) * stride_xl]);
      acc = fmaf(to_float(w_row[cl * W + w]), v, acc);
    }
  }
  out[idx] = from_float<scalar_t>(acc);
}

// One thread per (b, c) state row: new state[s] = window[s + L]. Ascending s is safe in place: step s reads
// index s + L > s, which no earlier step of this thread has written.
template <typename scalar_t>
__global__ void causal_conv1d_update_state_kernel(const scalar_t* __restrict__ x, int64_t stride_xb, int64_t stride_xc,
                                                  int64_t stride_xl, scalar_t* state, int64_t stride_sb,
                                                  int64_t stride_sc, int64_t stride_ss,
                                                  const int64_t* __restrict__ slot_ids, int64_t B, int64_t C_in,
                                                  int64_t L, int64_t S) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= B * C_in) return;
  const int64_t c = idx % C_in;
  const int64_t b = idx / C_in;
  const int64_t row = slot_ids ? slot_ids[b] : b;
  if (row < 0) return;  // padded batch row: state untouched
  scalar_t* s_row = state + row * stride_sb + c * stride_sc;
  const scalar_t* x_row = x + b * stride_xb + c * stride_xc;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t p = s + L;
    s_row[s * stride_ss] = p < S ? s_row[p * stride_ss] : x_row[(p - S) * stride_xl];
  }
}

}  // namespace
}  // namespace omni_rt

extern "C" cudaError_t omni_rt_causal_conv1d_update(const void* x, int64_t stride_xb, int64_t stride_xc,
                                                    int64_t stride_xl, void* state, int64_t stride_sb, int64_t stride_sc,
                                                    int64_t stride_ss, const void* weight, const void* bias,
                                                    const int64_t* slot_ids, void* out, int64_t B, int64_t C_in,
                                                    int64_t C_out, int64_t L, int64_t W, int64_t dilation,
                                                    int64_t groups, omni_rt_dtype dtype, cudaStream_t stream) {
  using namespace omni_rt;
  if (B < 0 || L < 0 || W < 1 || dilation < 1 || groups < 1 || C_in % groups != 0 || C_out % groups != 0)
    return cudaErrorInvalidValue;
  const int64_t S = (W - 1) * dilation;
  const int64_t num_out = B * C_out * L;
  const int64_t num_rows = B * C_in;
  if (num_out == 0) return cudaSuccess;  // L == 0: no output and the state keeps its samples
  OMNI_RT_DISPATCH_DTYPE(dtype, {
    causal_conv1d_update_out_kernel<scalar_t><<<ceil_div(num_out, kConvThreads), kConvThreads, 0, stream>>>(
        static_cast<const scalar_t*>(x), stride_xb, stride_xc, stride_xl, static_cast<const scalar_t*>(state),
        stride_sb, stride_sc, stride_ss, static_cast<const scalar_t*>(weight), static_cast<const scalar_t*>(bias),
        slot_ids, static_cast<scalar_t*>(out), B, C_in, C_out, L, static_cast<int>(W), static_cast<int>(dilation),
        groups);
    if (S > 0 && num_rows > 0)
      causal_conv1d_update_state_kernel<scalar_t><<<ceil_div(num_rows, kConvThreads), kConvThreads, 0, stream>>>(
          static_cast<const scalar_t*>(x), stride_xb, stride_xc, stride_xl, static_cast<scalar_t*>(state), stride_sb,
          stride_sc, stride_ss, slot_ids, B, C_in, L, S);
  });
  return cudaGetLastError();
}
