/* omni-rt CUDA kernels: the torch-free C API of libomni_rt_kernels.
 *
 * Plain device pointers, sizes and element strides; every call is asynchronous on `stream`, allocates
 * nothing, never synchronises with the host, and returns the launch's cudaError_t (cudaErrorInvalidValue
 * for arguments it cannot handle). Sizes stay on the host; counts that depend on data stay on the device,
 * so every call is safe inside CUDA-graph capture.
 *
 * Legend (one name per concept, see STYLE.md §2):
 *   T = num_tokens, E = num_experts, K = top_k, BM = block_m (rows of an expert block),
 *   Hq / Hk = query / key heads, D = head_dim,
 *   B = batch rows, C_in / C_out = channels, L = samples in this call, W = conv taps, d = dilation,
 *   S = (W-1)*d state samples, G = groups.
 * Element strides are in elements, not bytes.
 */
#ifndef OMNI_RT_KERNELS_H_
#define OMNI_RT_KERNELS_H_

#include <stdint.h>
#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Floating dtype of the activation tensors of a call (weights share it unless said otherwise). */
typedef enum omni_rt_dtype {
  OMNI_RT_FLOAT32 = 0,
  OMNI_RT_FLOAT16 = 1,
  OMNI_RT_BFLOAT16 = 2
} omni_rt_dtype;

/* Softmax top-k router (twin: kernels/moe.py route_topk_ref).
 *   logits:  (T, E) `dtype`, element (t, e) at logits[t*stride_lt + e*stride_le]; read.
 *   weights: (T, K) `dtype`, contiguous; written: top-k softmax probabilities (renormalised to sum 1
 *            when renormalize != 0), computed in fp32 and cast last.
 *   ids:     (T, K) int64, contiguous; written: expert ids, by descending probability (ties: lower id).
 * Needs 1 <= K <= E and E <= 8192. */
cudaError_t omni_rt_route_topk(const void* logits, int64_t stride_lt, int64_t stride_le, void* weights,
                               int64_t* ids, int64_t T, int64_t E, int64_t K, int renormalize,
                               omni_rt_dtype dtype, cudaStream_t stream);

/* Worst-case sizes of the moe_align outputs for P = T*K token-expert pairs: sorted_ids holds
 * round_up(P + E*(BM-1), BM) entries and expert_ids round_up(...)/BM blocks. */
int64_t omni_rt_moe_align_max_padded(int64_t P, int64_t E, int64_t BM);

/* MoE alignment: group the P = T*K token-expert pairs by expert into blocks of BM rows
 * (twin: runtime/cuda_ops.py moe_align_torch).
 *   topk_ids:   (P,) int64 = ids (T, K) flattened; read. Ids outside [0, E) (e.g. -1 for a padded token)
 *               are skipped: they land in no block.
 *   sorted_ids: (omni_rt_moe_align_max_padded(P, E, BM),) int32; written in full: expert e's pairs (flat
 *               index t*K + k, ascending) start at the sum of the padded counts of experts < e, followed
 *               by the sentinel P up to a multiple of BM; every entry past the used blocks is P too.
 *   expert_ids: (max_padded / BM,) int32; written in full: the expert of each block, -1 past the used ones.
 *   num_tokens_post_pad: (1,) int32; written: sum over experts of round_up(count_e, BM).
 * Needs E <= 12288. One thread block: meant for the decode / small-prefill sizes it is used for. */
cudaError_t omni_rt_moe_align(const int64_t* topk_ids, int32_t* sorted_ids, int32_t* expert_ids,
                              int32_t* num_tokens_post_pad, int64_t P, int64_t E, int64_t BM,
                              cudaStream_t stream);

/* TM-RoPE with Qwen3's per-head q/k RMSNorm, in place (twin: kernels/rope.py qk_norm_rope_ref with
 * cos/sin from rope_cos_sin_ref). For every token t and head h:
 *   x = rotary(weight * cast(rms_normalise_fp32(x)), angle_j = positions[axis(j), t] * inv_freq[j])
 * with the cast order of kernels/norm.py rms_norm_ref, cos/sin cast to `dtype` before use, and rotate-half
 * pairing of channels j and j + D/2.
 *   q: (T, Hq, D) `dtype`, q[t*stride_qt + h*stride_qh + i] (channels contiguous); updated in place.
 *   k: (T, Hk, D) likewise; updated in place. Hk may be 0 (k unused).
 *   q_weight, k_weight: (D,) `dtype`; read.
 *   positions: (3, T) int64 t/h/w ids, positions[a*stride_pa + t*stride_pt]; read (1-D RoPE: pass the same
 *              row three times, i.e. stride_pa = 0).
 *   inv_freq: (D/2,) fp32; read.
 *   section1, section2: mrope_section[1], mrope_section[2]: slot j is driven by axis 1 when j % 3 == 1 and
 *              j < 3*section1, by axis 2 when j % 3 == 2 and j < 3*section2, else by axis 0 (the rule of
 *              kernels/rope.py tm_rope_axis_of_slot).
 * Needs D even and D <= 512. */
cudaError_t omni_rt_mrope_qk_norm(void* q, int64_t stride_qt, int64_t stride_qh, void* k, int64_t stride_kt,
                                  int64_t stride_kh, const void* q_weight, const void* k_weight,
                                  const int64_t* positions, int64_t stride_pa, int64_t stride_pt,
                                  const float* inv_freq, int64_t T, int64_t Hq, int64_t Hk, int64_t D,
                                  int64_t section1, int64_t section2, float eps, omni_rt_dtype dtype,
                                  cudaStream_t stream);

/* Streaming causal conv1d update (twin: kernels/conv.py causal_conv1d_update_ref).
 *   x:      (B, C_in, L) `dtype`, x[b*stride_xb + c*stride_xc + l*stride_xl]; read.
 *   state:  (rows, C_in, S) `dtype`, state[r*stride_sb + c*stride_sc + s*stride_ss]; rows = B without
 *           slot_ids, the pool size with them; updated in place to the last S samples of (state || x).
 *   weight: (C_out, C_in/G, W) `dtype`, contiguous; read. bias: (C_out,) `dtype` or NULL; read.
 *   slot_ids: (B,) int64 or NULL: state row of each batch row; -1 = padded row: output zeros, state
 *           untouched. Valid ids must be distinct.
 *   out:    (B, C_out, L) `dtype`, contiguous; written.
 * Two launches: the outputs (reading the old state), then the state shift. Depthwise (G = C_in = C_out)
 * and dense (G = 1) are the same kernel with C_in/G input channels per output channel. */
cudaError_t omni_rt_causal_conv1d_update(const void* x, int64_t stride_xb, int64_t stride_xc, int64_t stride_xl,
                                         void* state, int64_t stride_sb, int64_t stride_sc, int64_t stride_ss,
                                         const void* weight, const void* bias, const int64_t* slot_ids, void* out,
                                         int64_t B, int64_t C_in, int64_t C_out, int64_t L, int64_t W,
                                         int64_t dilation, int64_t groups, omni_rt_dtype dtype,
                                         cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* OMNI_RT_KERNELS_H_ */
