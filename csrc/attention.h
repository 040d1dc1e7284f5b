// Masked multi-head attention on raw pointers: the CPU backend of sk.ops.attention
// (prefill attention; decode over a KV cache is decode_attention.h).
//
// Flash-attention style: fp32 scores and an online softmax per query row, so the
// [Sq, Sk] score matrix is never materialised; pruned heads cost nothing but writing
// their zeros. The backend (scalar, AVX2+FMA+F16C, AVX-512 F+BW) is chosen from
// active_simd_level() on every call; work is spread over the extension's thread pool.
#pragma once

#include <cstdint>

#include "args.h"      // Strides4
#include "quantize.h"  // DType

namespace sentinel {

// out[b, h, i, :] = sum_j softmax_j(scale * q[b, h, i] . k[b, h / G, j]) v[b, h / G, j]
// over the keys j visible to query i, with G = Hq / Hkv (grouped-query attention) and
//   L_b = cache_lens[b] (or Sk when cache_lens == nullptr), p_i = L_b - Sq + i,
//   j visible <=> j < L_b and key_mask[b * Sk + j] != 0 (when given)
//                 and (!causal or j <= p_i) and (window == 0 or p_i - j < window)
//                 and j >= seg_start[b * Sq + i] (when given: packed prompts, each
//                 query kept inside its own; int32 [B, Sq] contiguous, any values).
// A row with no visible key gets zeros; a head with head_active[b * Hq + h] == 0 (when
// given) gets exact zeros and no compute. q, k, v and out all have `dtype`; element
// (b, h, s, d) of x lives at x[b * st.b + h * st.h + s * st.s + d * st.d]. Inputs are
// converted to fp32, all arithmetic is fp32 and out is rounded once (nearest even).
// Requirements (std::invalid_argument otherwise): sizes >= 0, Hkv >= 1, Hq % Hkv == 0,
// 1 <= D <= 256, Sq and Sk < 2^31, strides >= 0, window >= 0, finite scale,
// num_threads >= 1, cache_lens values in [0, Sk], non-null q / out (and k / v when
// Sk > 0) whenever the output is not empty.
void attention_fwd(const void* q, const void* k, const void* v, void* out, DType dtype,
                   int64_t B, int64_t Hq, int64_t Hkv, int64_t Sq, int64_t Sk, int64_t D,
                   const Strides4& q_strides, const Strides4& k_strides,
                   const Strides4& v_strides, const Strides4& out_strides, bool causal,
                   double scale, int64_t window, const int8_t* key_mask,
                   const int32_t* cache_lens, const int8_t* head_active, int num_threads,
                   const int32_t* seg_start = nullptr);

}  // namespace sentinel
