// Links libomni_rt_kernels alone (no libtorch, no Python): routes 4 tokens over 8 experts, top-2,
// renormalised, and prints each token's experts and weights. Exits 2 when no CUDA device is present.
#include <cstdint>
#include <cstdio>
#include <vector>

#include <cuda_runtime_api.h>

#include "omni_rt_kernels.h"

#define CHECK(call)                                                                          \
  do {                                                                                       \
    const cudaError_t err_ = (call);                                                         \
    if (err_ != cudaSuccess) {                                                               \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(err_)); \
      return 1;                                                                              \
    }                                                                                        \
  } while (0)

int main() {
  constexpr int64_t T = 4, E = 8, K = 2;  // num_tokens, num_experts, top_k
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::fprintf(stderr, "route_topk_example: needs a CUDA GPU (%s)\n", cudaGetErrorString(cudaGetLastError()));
    return 2;
  }
  std::vector<float> logits(T * E);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t e = 0; e < E; ++e) logits[t * E + e] = static_cast<float>((t * 5 + e * 3) % 8) * 0.25f;

  float *d_logits = nullptr, *d_weights = nullptr;
  int64_t* d_ids = nullptr;
  CHECK(cudaMalloc(reinterpret_cast<void**>(&d_logits), sizeof(float) * T * E));
  CHECK(cudaMalloc(reinterpret_cast<void**>(&d_weights), sizeof(float) * T * K));
  CHECK(cudaMalloc(reinterpret_cast<void**>(&d_ids), sizeof(int64_t) * T * K));
  CHECK(cudaMemcpy(d_logits, logits.data(), sizeof(float) * T * E, cudaMemcpyHostToDevice));
  CHECK(omni_rt_route_topk(d_logits, E, 1, d_weights, d_ids, T, E, K, /*renormalize=*/1, OMNI_RT_FLOAT32, nullptr));
  CHECK(cudaDeviceSynchronize());

  std::vector<float> weights(T * K);
  std::vector<int64_t> ids(T * K);
  CHECK(cudaMemcpy(weights.data(), d_weights, sizeof(float) * T * K, cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(ids.data(), d_ids, sizeof(int64_t) * T * K, cudaMemcpyDeviceToHost));
  for (int64_t t = 0; t < T; ++t) {
    std::printf("token %lld:", static_cast<long long>(t));
    for (int64_t k = 0; k < K; ++k)
      std::printf("  expert %lld w=%.4f", static_cast<long long>(ids[t * K + k]), weights[t * K + k]);
    std::printf("\n");
  }
  CHECK(cudaFree(d_logits));
  CHECK(cudaFree(d_weights));
  CHECK(cudaFree(d_ids));
  return 0;
}
