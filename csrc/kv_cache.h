// Compressed KV cache on raw pointers: the CPU backend of sk.ops.kv_append and of
// sk.ops.decode_attention over a dense / INT8 / INT4 cache (with an optional
// full-precision "recent" ring and a wrapping ring cache).
//
// Storage formats, the quantization rule and the slot / position rules are those of
// python/sentinel_kernels/reference/kv_cache.py (the oracle); codes and scales written
// here are bit-identical to it at every SIMD level.
//
// Python bindings (sentinel_kernels._C, csrc/module.cpp); pointers are ints
// (tensor.data_ptr(), 0 = none), strides are in elements of the tensor they describe:
//
//   kv_append(x_ptr, x_dtype, cache_ptr, scales_ptr, kv_format, B, H, S, D, L, n_groups,
//             x_strides[4], cache_strides[3], scale_strides[3], start_ptr, wrap,
//             num_threads, cache_dtype="")
//     x [B, H, S, D] of x_dtype ('float32' | 'float16' | 'bfloat16'), any strides >= 0;
//     cache: dense [B, H, L, D] of cache_dtype ('' = x_dtype), int8 [B, H, L, D] int8,
//     int4 [B, H, L, ceil(D/2)] uint8; strides (b, h, l), unit stride along the last dim.
//     scales (int8: [B, H, L, G] float16, int4: [B, H, L, G, 2] float16, dense: 0):
//     strides (b, h, l) in float16 elements, the trailing [G] / [G, 2] contiguous.
//     start: int32 [B]; token i of row b goes to position start[b] + i: slot
//     start[b] + i (skipped when >= L) or, with wrap, slot (start[b] + i) % L, where only
//     the last L tokens are written when S > L.
//
//   kv_append_key_blocks(x_ptr, x_dtype, codes_ptr, scales_ptr, ring_ptr, ring_dtype,
//             B, H, S, D, L, W, block, x_strides[4], codes_strides[3],
//             scales_strides[3], ring_strides[3], start_ptr, num_threads)
//     KIVI keys (per-channel int4 over blocks of T = block positions). x [B, H, S, D] of
//     x_dtype, any strides >= 0; codes uint8 [B, H, L, ceil(D/2)] with strides (b, h, l);
//     scales float16 [B, H, L / T, D, 2] with strides (b, h, block), the [D, 2] tail
//     contiguous; ring [B, H, W, D] of ring_dtype with strides (b, h, w); start int32 [B].
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
#include <string>
#include <vector>

#include "attention.h"  // Strides4
#include "quantize.h"   // DType

namespace sentinel {

enum class KvFormat { kDense, kInt8, kInt4 };

// "dense" | "int8" | "int4"; throws std::invalid_argument otherwise.
KvFormat parse_kv_format(const std::string& name);

// Element strides of the (batch, head, slot) dims of a cache, scale or ring tensor.
struct Strides3 {
  int64_t b = 0, h = 0, l = 0;
};

// From a Python sequence of 3 (resp. 4) ints; throws std::invalid_argument (naming `fn`
// and `name`) for another length.
Strides3 kv_strides3(const std::vector<int64_t>& v, const char* fn, const char* name);
Strides4 kv_strides4(const std::vector<int64_t>& v, const char* fn, const char* name);

// Writes x [B, H, S, D] into the cache (quantize-on-append for int8 / int4). Per group of
// g = ceil(D / G) channels, all in fp32 with one correctly rounded operation per step:
//   int8: s = f16(min(max|x| / 127, 65504)), code = s == 0 ? 0 : clamp(rint(x / s), +-127)
//   int4: s = f16(min((max - min) / 15, 65504)), m = f16(clamp(min, +-65504)),
//         code = s == 0 ? 0 : clamp(rint((x - m) / s), 0, 15), two codes per byte (channel
//         c in byte c / 2, low nibble for even c; an odd D leaves the last high nibble 0).
// NaN inputs are ignored by the max / min (as in the reference) and give code 0.
// `cache_dtype` is the dense cache's element type (ignored for int8 / int4).
// Requirements (std::invalid_argument otherwise): B, H, S >= 0, D >= 1, L >= 1,
// 1 <= G <= D with ceil(D / ceil(D / G)) == G (int8 / int4), strides >= 0, the rows of
// cache and scales not overlapping one another, start[b] >= 0, num_threads >= 1 and
// non-null pointers wherever something is written.
void kv_append(const void* x, DType x_dtype, void* cache, DType cache_dtype, uint16_t* scales,
               KvFormat fmt, int64_t B, int64_t H, int64_t S, int64_t D, int64_t L,
               int64_t n_groups, const Strides4& x_strides, const Strides3& cache_strides,
               const Strides3& scale_strides, const int32_t* start, bool wrap,
               int num_threads);

// KIVI keys (Liu et al. 2024; the rule of reference.kv_append_key_blocks). For each row b
// with st = start[b], every block i with floor(st / T) <= i < floor((st + S) / T) and
// (i + 1) * T <= L is quantized per channel over its T keys: position j of the block comes
// from ring slot j % W when j < st, else from x[b, :, j - st] rounded to ring_dtype; per
// channel c the int4 rule of kv_append over the T values (instead of a group of channels)
// gives the codes of slots iT .. iT + T - 1 (packed as in kv_append) and the fp16 pair
// scales[b, h, i, c, 0:2] = (s, m). Then the keys of positions >= max(st, st + S - W)
// are written to ring slot j % W (rounded to ring_dtype). Within one (b, h) the blocks are
// quantized before the ring is written (a long chunk overwrites ring slots its first
// block still reads). Requirements (std::invalid_argument otherwise): B, H, S >= 0,
// D >= 1, block >= 1, L and W positive multiples of block, strides >= 0, rows of codes,
// scales and ring not overlapping, start[b] >= 0, num_threads >= 1, non-null pointers.
void kv_append_key_blocks(const void* x, DType x_dtype, uint8_t* codes, uint16_t* scales,
                          void* ring, DType ring_dtype, int64_t B, int64_t H, int64_t S,
                          int64_t D, int64_t L, int64_t W, int64_t block,
                          const Strides4& x_strides, const Strides3& codes_strides,
                          const Strides3& scales_strides, const Strides3& ring_strides,
                          const int32_t* start, int num_threads);

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
