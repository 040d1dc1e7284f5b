// KV append on raw pointers: the CPU backend of sk.ops.kv_append (dense / INT8 / INT4
// cache, quantize-on-append, optional wrapping ring) and sk.ops.kv_append_key_blocks
// (KIVI keys).
//
// Storage formats and the quantization rule are those of kv_format.h and
// python/sentinel_kernels/reference/kv_formats.py, the slot / position rules those of
// reference/kv_append.py (the oracles); codes and scales written here are bit-identical
// to them at every SIMD level.
//
// Python bindings (sentinel_kernels._C, csrc/module.cpp); pointers are ints
// (tensor.data_ptr(), 0 = none), strides are in elements of the tensor they describe:
//
//   kv_append(x_ptr, x_dtype, cache_ptr, scales_ptr, kv_format, B, H, S, D, L, n_groups,
//             x_strides[4], cache_strides[3], scale_strides[3], start_ptr, wrap,
//             num_threads, cache_dtype="", rows_ptr=0, Bc=-1)
//     x [B, H, S, D] of x_dtype ('float32' | 'float16' | 'bfloat16'), any strides >= 0;
//     cache: dense [Bc, H, L, D] of cache_dtype ('' = x_dtype), int8 [Bc, H, L, D] int8,
//     int4 [Bc, H, L, ceil(D/2)] uint8; strides (b, h, l), unit stride along the last dim.
//     scales (int8: [Bc, H, L, G] float16, int4: [Bc, H, L, G, 2] float16, dense: 0):
//     strides (b, h, l) in float16 elements, the trailing [G] / [G, 2] contiguous.
//     start: int32 [B]; token i of row b goes to position start[b] + i: slot
//     start[b] + i (skipped when >= L) or, with wrap, slot (start[b] + i) % L, where only
//     the last L tokens are written when S > L. rows: int32 [B] or 0 (none); the slot is
//     in cache (and scales) row rows[b] when given (skipped when outside [0, Bc)), else
//     in row b. Bc: the cache's row count, -1 = B; without rows it must be B.
//
//   kv_append_key_blocks(x_ptr, x_dtype, codes_ptr, scales_ptr, ring_ptr, ring_dtype,
//             B, H, S, D, L, W, block, x_strides[4], codes_strides[3],
//             scales_strides[3], ring_strides[3], start_ptr, num_threads)
//     KIVI keys (per-channel int4 over blocks of T = block positions). x [B, H, S, D] of
//     x_dtype, any strides >= 0; codes uint8 [B, H, L, ceil(D/2)] with strides (b, h, l);
//     scales float16 [B, H, L / T, D, 2] with strides (b, h, block), the [D, 2] tail
//     contiguous; ring [B, H, W, D] of ring_dtype with strides (b, h, w); start int32 [B].
//
// Every size, stride and pointer is checked; bad ones raise std::invalid_argument
// (ValueError in Python) naming the argument.
#pragma once

#include <cstdint>

#include "args.h"       // Strides3, Strides4
#include "kv_format.h"  // KvFormat
#include "quantize.h"   // DType

namespace sentinel {

// Writes x [B, H, S, D] into the cache (quantize-on-append for int8 / int4). Per group of
// g = ceil(D / G) channels, all in fp32 with one correctly rounded operation per step:
//   int8: s = f16(min(max|x| / 127, 65504)), code = s == 0 ? 0 : clamp(rint(x / s), +-127)
//   int4: s = f16(min((max - min) / 15, 65504)), m = f16(clamp(min, +-65504)),
//         code = s == 0 ? 0 : clamp(rint((x - m) / s), 0, 15), two codes per byte (channel
//         c in byte c / 2, low nibble for even c; an odd D leaves the last high nibble 0).
// NaN inputs are ignored by the max / min (as in the reference) and give code 0.
// `cache_dtype` is the dense cache's element type (ignored for int8 / int4).
// `rows` (int32 [B], nullptr = none) sends batch row b to cache (and scales) row rows[b]
// of the Bc rows instead of row b; a rows[b] outside [0, Bc) is skipped (not an error:
// the op layer cannot check device values without a sync). The cache may then have any
// Bc >= 1 rows; without rows, Bc is B (Bc = -1 means B). Where two batch rows write one
// (cache row, slot), the later batch row's codes and scales stay, as in the reference:
// such an append runs on one thread (the token rows of the others are independent).
// Requirements (std::invalid_argument otherwise): B, H, S >= 0, D >= 1, L >= 1,
// 1 <= G <= D with ceil(D / ceil(D / G)) == G (int8 / int4), strides >= 0, the [Bc, H, L]
// rows of cache and scales not overlapping one another, Bc >= 1 with rows and Bc == B
// without, start[b] >= 0, num_threads >= 1 and non-null pointers wherever something is
// written.
void kv_append(const void* x, DType x_dtype, void* cache, DType cache_dtype, uint16_t* scales,
               KvFormat fmt, int64_t B, int64_t H, int64_t S, int64_t D, int64_t L,
               int64_t n_groups, const Strides4& x_strides, const Strides3& cache_strides,
               const Strides3& scale_strides, const int32_t* start, bool wrap,
               int num_threads, const int32_t* rows = nullptr, int64_t Bc = -1);

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

}  // namespace sentinel
