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

#if defined(SENTINEL_X86_64)
namespace sentinel {

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
