// Per-function ISA targets and SIMD helpers shared by the CPU kernels.
//
// The library is built for baseline x86-64; AVX2 and AVX-512 code is compiled per function
// through these target attributes and only called after cpu_features() says the CPU has it.
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#define SENTINEL_X86_64 1
#include <immintrin.h>
#if defined(__GNUC__) || defined(__clang__)
#define SK_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define SK_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx2,fma,f16c")))
#define SK_TARGET_VNNI __attribute__((target("avx512f,avx512bw,avx512vnni,avx2,fma,f16c")))
#else  // MSVC: intrinsics are usable without per-function target attributes
#define SK_TARGET_AVX2
#define SK_TARGET_AVX512
#define SK_TARGET_VNNI
#endif
#endif

#include <cstdint>

#include "quantize.h"  // DType

#if defined(SENTINEL_X86_64)
namespace sentinel {

// fp32 -> bf16 bits (round to nearest even, NaN -> 0x7fc0) in the low half of each lane
// (float_to_bf16 of dtype_convert.h on 8 lanes).
SK_TARGET_AVX2 inline __m256i f32_to_bf16_avx2(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(
      _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
}

// The same, packed: 8 bf16 values in 16-bit lanes.
SK_TARGET_AVX2 inline __m128i f32_to_bf16x8_avx2(__m256 v) {
  const __m256i r = f32_to_bf16_avx2(v);
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

// 8 elements of a float32 / float16 / bfloat16 buffer from index j, as fp32 (exact).
template <DType D>
SK_TARGET_AVX2 inline __m256 load8_avx2(const void* base, int64_t j) {
  if constexpr (D == DType::kFloat32) {
    return _mm256_loadu_ps(static_cast<const float*>(base) + j);
  } else {
    const __m128i h =
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + j));
    if constexpr (D == DType::kFloat16) {
      return _mm256_cvtph_ps(h);
    } else {
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
  }
}

// fp32 -> bf16 bits (round to nearest even, NaN -> 0x7fc0) in the low half of each lane.
SK_TARGET_AVX512 inline __m512i f32_to_bf16_avx512(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(
      _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q),
                               _mm512_set1_epi32(0x7FC0));
}

}  // namespace sentinel
#endif
