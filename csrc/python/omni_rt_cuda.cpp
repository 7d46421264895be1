// pybind11 module `omni_rt_cuda` over the C API of libomni_rt_kernels (csrc/include/omni_rt_kernels.h).
// Torch-free: every tensor is an integer device pointer (tensor.data_ptr()) plus sizes and element strides,
// every call takes a cudaStream_t as an integer (torch.cuda.current_stream().cuda_stream). Launch errors
// raise RuntimeError; nothing here synchronises. runtime/cuda_ops.py wraps these as torch.library ops.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "omni_rt_kernels.h"

namespace py = pybind11;

namespace {

void check(cudaError_t err, const char* op) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("omni_rt_cuda.") + op + ": " + cudaGetErrorString(err));
}

template <typename T> T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }
cudaStream_t stream_of(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

omni_rt_dtype dtype_of(int code) {
  if (code < OMNI_RT_FLOAT32 || code > OMNI_RT_BFLOAT16) throw std::invalid_argument("unknown omni_rt dtype code");
  return static_cast<omni_rt_dtype>(code);
}

}  // namespace

PYBIND11_MODULE(omni_rt_cuda, m) {
  m.doc() = "omni-rt CUDA kernels (torch-free): integer device pointers, sizes, element strides, stream handle";
  m.attr("FLOAT32") = static_cast<int>(OMNI_RT_FLOAT32);
  m.attr("FLOAT16") = static_cast<int>(OMNI_RT_FLOAT16);
  m.attr("BFLOAT16") = static_cast<int>(OMNI_RT_BFLOAT16);

  m.def(
      "device_count",
      [] {
        int n = 0;
        const cudaError_t err = cudaGetDeviceCount(&n);
        return py::make_tuple(err == cudaSuccess ? n : 0, static_cast<int>(err), std::string(cudaGetErrorString(err)));
      },
      "(count, cudaError_t code, message) of cudaGetDeviceCount: code 35 = no driver, 100 = no device");

  m.def(
      "route_topk",
      [](uintptr_t logits, int64_t stride_lt, int64_t stride_le, uintptr_t weights, uintptr_t ids, int64_t T, int64_t E,
         int64_t K, bool renormalize, int dtype, uintptr_t stream) {
        check(omni_rt_route_topk(ptr<const void>(logits), stride_lt, stride_le, ptr<void>(weights), ptr<int64_t>(ids), T,
                                 E, K, renormalize ? 1 : 0, dtype_of(dtype), stream_of(stream)),
              "route_topk");
      },
      py::arg("logits"), py::arg("stride_lt"), py::arg("stride_le"), py::arg("weights"), py::arg("ids"), py::arg("T"),
      py::arg("E"), py::arg("K"), py::arg("renormalize"), py::arg("dtype"), py::arg("stream"));

  m.def("moe_align_max_padded", &omni_rt_moe_align_max_padded, py::arg("P"), py::arg("E"), py::arg("BM"));

  m.def(
      "moe_align",
      [](uintptr_t topk_ids, uintptr_t sorted_ids, uintptr_t expert_ids, uintptr_t num_tokens_post_pad, int64_t P,
         int64_t E, int64_t BM, uintptr_t stream) {
        check(omni_rt_moe_align(ptr<const int64_t>(topk_ids), ptr<int32_t>(sorted_ids), ptr<int32_t>(expert_ids),
                                ptr<int32_t>(num_tokens_post_pad), P, E, BM, stream_of(stream)),
              "moe_align");
      },
      py::arg("topk_ids"), py::arg("sorted_ids"), py::arg("expert_ids"), py::arg("num_tokens_post_pad"), py::arg("P"),
      py::arg("E"), py::arg("BM"), py::arg("stream"));

  m.def(
      "mrope_qk_norm",
      [](uintptr_t q, int64_t stride_qt, int64_t stride_qh, uintptr_t k, int64_t stride_kt, int64_t stride_kh,
         uintptr_t q_weight, uintptr_t k_weight, uintptr_t positions, int64_t stride_pa, int64_t stride_pt,
         uintptr_t inv_freq, int64_t T, int64_t Hq, int64_t Hk, int64_t D, int64_t section1, int64_t section2, float eps,
         int dtype, uintptr_t stream) {
        check(omni_rt_mrope_qk_norm(ptr<void>(q), stride_qt, stride_qh, ptr<void>(k), stride_kt, stride_kh,
                                    ptr<const void>(q_weight), ptr<const void>(k_weight), ptr<const int64_t>(positions),
                                    stride_pa, stride_pt, ptr<const float>(inv_freq), T, Hq, Hk, D, section1, section2,
                                    eps, dtype_of(dtype), stream_of(stream)),
              "mrope_qk_norm");
      },
      py::arg("q"), py::arg("stride_qt"), py::arg("stride_qh"), py::arg("k"), py::arg("stride_kt"), py::arg("stride_kh"),
      py::arg("q_weight"), py::arg("k_weight"), py::arg("positions"), py::arg("stride_pa"), py::arg("stride_pt"),
      py::arg("inv_freq"), py::arg("T"), py::arg("Hq"), py::arg("Hk"), py::arg("D"), py::arg("section1"),
      py::arg("section2"), py::arg("eps"), py::arg("dtype"), py::arg("stream"));

  m.def(
      "causal_conv1d_update",
      [](uintptr_t x, int64_t stride_xb, int64_t stride_xc, int64_t stride_xl, uintptr_t state, int64_t stride_sb,
         int64_t stride_sc, int64_t stride_ss, uintptr_t weight, uintptr_t bias, uintptr_t slot_ids, uintptr_t out,
         int64_t B, int64_t C_in, int64_t C_out, int64_t L, int64_t W, int64_t dilation, int64_t groups, int dtype,
         uintptr_t stream) {
        check(omni_rt_causal_conv1d_update(ptr<const void>(x), stride_xb, stride_xc, stride_xl, ptr<void>(state),
                                           stride_sb, stride_sc, stride_ss, ptr<const void>(weight),
                                           ptr<const void>(bias), ptr<const int64_t>(slot_ids), ptr<void>(out), B, C_in,
                                           C_out, L, W, dilation, groups, dtype_of(dtype), stream_of(stream)),
              "causal_conv1d_update");
      },
      py::arg("x"), py::arg("stride_xb"), py::arg("stride_xc"), py::arg("stride_xl"), py::arg("state"),
      py::arg("stride_sb"), py::arg("stride_sc"), py::arg("stride_ss"), py::arg("weight"), py::arg("bias"),
      py::arg("slot_ids"), py::arg("out"), py::arg("B"), py::arg("C_in"), py::arg("C_out"), py::arg("L"), py::arg("W"),
      py::arg("dilation"), py::arg("groups"), py::arg("dtype"), py::arg("stream"));
}
