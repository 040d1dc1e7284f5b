// Decode attention over a KV cache on raw pointers: the CPU backend of
// sk.ops.decode_attention for every cache format (dense / INT8 / INT4 with group scales,
// KIVI keys), with an optional full-precision "recent" ring and a wrapping ring cache.
//
// Storage formats are those of kv_format.h (written by kv_append.h), the attention rule
// that of python/sentinel_kernels/reference/decode_attention.py (the oracle).
//
// Python binding (sentinel_kernels._C, csrc/module.cpp); pointers are ints
// (tensor.data_ptr(), 0 = none), strides are in elements of the tensor they describe:
//
//   decode_attention_kv(q_ptr, out_ptr, dtype, kv_format, k_ptr, v_ptr, k_scale_ptr,
//             v_scale_ptr, k_recent_ptr, v_recent_ptr, B, Hq, Hkv, Sq, D, L, W, n_groups,
//             q_strides[4], out_strides[4], k_strides[3], v_strides[3], ks_strides[3],
//             vs_strides[3], kr_strides[3], vr_strides[3], scale, window, key_mask_ptr,
//             cache_lens_ptr, head_active_ptr, wrap, key_block, num_threads)
//     q, out [B, Hq, Sq, D] of dtype (4 strides each, any >= 0); the caches k, v in
//     kv_format (dense: of dtype) with strides (b, h, l); their scales as in kv_append;
//     the recent rings [B, Hkv, W, D] of dtype (W = 0: none) with strides (b, h, w);
//     key_mask int8 [B, L] contiguous (by slot), cache_lens int32 [B], head_active int8
//     [B * Hq] contiguous (0 = not given, except cache_lens which is required).
//     key_block = T > 0: KIVI keys, k_scale as in kv_append_key_blocks (strides (b, h,
//     block)); v_scale per token with n_groups groups as usual.
//
// Every size, stride, length and pointer is checked; bad ones raise
// std::invalid_argument (ValueError in Python) naming the argument.
#pragma once

#include <cstdint>

#include "args.h"       // Strides3, Strides4
#include "kv_format.h"  // KvFormat
#include "quantize.h"   // DType

namespace sentinel {

// Arguments of decode_attention_kv (see the binding above).
struct DecodeKvArgs {
  const void* q = nullptr;
  void* out = nullptr;
  DType dtype = DType::kFloat32;  // q, out, the dense cache and the recent rings
  KvFormat fmt = KvFormat::kDense;
  const void* k = nullptr;
  const void* v = nullptr;
  const uint16_t* k_scale = nullptr;  // float16 bits
  const uint16_t* v_scale = nullptr;
  const void* k_recent = nullptr;
  const void* v_recent = nullptr;
  int64_t B = 0, Hq = 0, Hkv = 1, Sq = 0, D = 1, L = 1, W = 0, n_groups = 1;
  Strides4 q_strides, out_strides;
  Strides3 k_strides, v_strides, ks_strides, vs_strides, kr_strides, vr_strides;
  double scale = 1.0;
  int64_t window = 0;
  const int8_t* key_mask = nullptr;
  const int32_t* cache_lens = nullptr;
  const int8_t* head_active = nullptr;
  bool wrap = false;
  // T > 0: KIVI keys. k_scale [B, Hkv, L / T, D, 2] (ks_strides step over blocks), the
  // rings hold the positions >= floor(len_b / T) * T. Needs int4, W a positive multiple
  // of T, L a multiple of T and no wrap.
  int64_t key_block = 0;
  int num_threads = 1;
};

// Decode attention over the cache, the rule of reference.decode_attention_kv:
// with len_b = cache_lens[b] and query t at position p = len_b - Sq + t, key position j
// is visible iff j < len_b, j <= p, (window == 0 or p - j < window), it is readable
// (wrap: j >= len_b - L, no wrap: j < L) and key_mask[b, slot(j)] != 0 when a mask is
// given, slot(j) = wrap ? j % L : j. Position j is read from the recent ring slot j % W
// when W > 0 and j >= len_b - W (key_block = T > 0: j >= floor(len_b / T) * T), else from
// the cache slot slot(j), dequantized (KIVI keys: code * s + m of channel c of block j / T).
// out = softmax_j(scale * q . k_j) v_j over the visible j; 0 for a row with none and
// for a head with head_active[b * Hq + h] == 0 (no compute). Query head h reads KV head
// h / (Hq / Hkv). fp32 math, one rounding of the output to dtype.
// Requirements (std::invalid_argument otherwise): sizes >= 0, Hkv >= 1, Hq % Hkv == 0,
// 1 <= D <= 256, L >= 1, W >= 0, valid n_groups (int8 / int4), strides >= 0, out rows not
// overlapping, window >= 0, finite scale, num_threads >= 1, cache_lens[b] >= 0, non-null
// pointers for everything the call reads or writes.
void decode_attention_kv(const DecodeKvArgs& a);

}  // namespace sentinel
