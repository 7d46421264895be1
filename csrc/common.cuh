// Internal helpers shared by the kernel files: dtype conversion and the dtype switch of the C API.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "omni_rt_kernels.h"

namespace omni_rt {

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Round a float to T's precision and back: reproduces torch's per-op rounding in 16-bit dtypes.
template <typename T> __device__ __forceinline__ float round_to(float v) { return to_float<T>(from_float<T>(v)); }

constexpr int kWarp = 32;

inline unsigned int ceil_div(int64_t a, int64_t b) { return static_cast<unsigned int>((a + b - 1) / b); }

}  // namespace omni_rt

// Calls BODY with `scalar_t` bound to the C type of `dtype`; unknown dtypes return cudaErrorInvalidValue.
#define OMNI_RT_DISPATCH_DTYPE(dtype, ...)                        \
  switch (dtype) {                                                \
    case OMNI_RT_FLOAT32: {                                       \
      using scalar_t = float;                                     \
      __VA_ARGS__;                                                \
      break;                                                      \
    }                                                             \
    case OMNI_RT_FLOAT16: {                                       \
      using scalar_t = __half;                                    \
      __VA_ARGS__;                                                \
      break;                                                      \
    }                                                             \
    case OMNI_RT_BFLOAT16: {                                      \
      using scalar_t = __nv_bfloat16;                             \
      __VA_ARGS__;                                                \
      break;                                                      \
    }                                                             \
    default:                                                      \
      return cudaErrorInvalidValue;                               \
  }
