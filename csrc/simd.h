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
// The same targets for every function defined up to the next SK_END_TARGET (for code
// included once per level, e.g. attention_lanes.h).
#define SK_BEGIN_TARGET_AVX2 _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,f16c\")")
#define SK_BEGIN_TARGET_AVX512 \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512bw,avx2,fma,f16c\")")
#define SK_END_TARGET _Pragma("GCC pop_options")
#else  // MSVC: intrinsics are usable without per-function target attributes
#define SK_TARGET_AVX2
#define SK_TARGET_AVX512
#define SK_TARGET_VNNI
#define SK_BEGIN_TARGET_AVX2
#define SK_BEGIN_TARGET_AVX512
#define SK_END_TARGET
#endif
#endif

#include <algorithm>
#include <cstdint>

#include "quantize.h"  // DType

namespace sentinel {

// Forces v to be materialised as a rounded fp32 value: keeps the compiler from
// contracting the product that produced v with a following addition into an FMA (GCC's
// default -ffp-contract=fast does so wherever FMA is available, also for intrinsics),
// which would skip a rounding the reference does.
inline float materialize(float v) {
#if defined(__GNUC__) && defined(__x86_64__)
  __asm__("" : "+x"(v));
#elif defined(__GNUC__) && defined(__aarch64__)
  __asm__("" : "+w"(v));
#else
  volatile float held = v;
  v = held;
#endif
  return v;
}

}  // namespace sentinel

#if defined(SENTINEL_X86_64)
namespace sentinel {

// materialize() on 8 / 16 lanes.
SK_TARGET_AVX2 inline __m256 materialize(__m256 v) {
#if defined(__GNUC__) || defined(__clang__)
  __asm__("" : "+x"(v));
#endif
  return v;
}

SK_TARGET_AVX512 inline __m512 materialize(__m512 v) {
#if defined(__GNUC__) || defined(__clang__)
  __asm__("" : "+v"(v));
#endif
  return v;
}

// Lanes [0, n) set (n in 0..8).
SK_TARGET_AVX2 inline __m256i lane_mask8(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// Lanes [0, count) set; count is clamped to [0, 16].
SK_TARGET_AVX512 inline __mmask16 tail_mask16(int64_t count) {
  return count >= 16 ? static_cast<__mmask16>(0xFFFF)
                     : static_cast<__mmask16>((1u << std::max<int64_t>(count, 0)) - 1u);
}

// Horizontal sum / max of 8 lanes (a fixed tree: (0+4, 1+5, 2+6, 3+7), then pairs).
SK_TARGET_AVX2 inline float hsum8(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

SK_TARGET_AVX2 inline float hmax8(__m256 v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  x = _mm_max_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

SK_TARGET_AVX2 inline int32_t hsum8_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

SK_TARGET_AVX2 inline uint32_t hmax8_epu32(__m256i v) {
  __m128i m = _mm_max_epu32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(1, 0, 3, 2)));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(2, 3, 0, 1)));
  return static_cast<uint32_t>(_mm_cvtsi128_si32(m));
}

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

// Stores 8 lanes as elements j .. j + 7 of a float32 / float16 / bfloat16 buffer
// (round to nearest even; store1 of dtype_access.h on 8 lanes).
template <DType D>
SK_TARGET_AVX2 inline void store8_avx2(void* base, int64_t j, __m256 v) {
  if constexpr (D == DType::kFloat32) {
    _mm256_storeu_ps(static_cast<float*>(base) + j, v);
  } else {
    __m128i h;
    if constexpr (D == DType::kFloat16) {
      h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {
      h = f32_to_bf16x8_avx2(v);
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(base) + j), h);
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

// Stores the lanes of v selected by k as elements idx + lane of a float32 / float16 /
// bfloat16 buffer (round to nearest even); the other elements are not touched.
SK_TARGET_AVX512 inline void store16_masked(void* base, DType d, int64_t idx, __m512 v,
                                            __mmask16 k) {
  switch (d) {
    case DType::kFloat32:
      _mm512_mask_storeu_ps(static_cast<float*>(base) + idx, k, v);
      return;
    case DType::kFloat16: {
      const __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      _mm512_mask_storeu_epi16(static_cast<uint16_t*>(base) + idx, static_cast<__mmask32>(k),
                               _mm512_castsi256_si512(h));
      return;
    }
    case DType::kBFloat16:
      _mm512_mask_cvtepi32_storeu_epi16(static_cast<uint16_t*>(base) + idx, k,
                                        f32_to_bf16_avx512(v));
      return;
  }
}

// The fp32 vector of one SIMD level and the operations on it that kernels written once
// for both widths use (attention_lanes.h, decode_deq_lanes.h, softmax_lanes.h): the same
// intrinsics the per-level kernels call, each always inlined and compiled for its level.
// M is a lane mask, I a vector of int32.
#define SK_VEC_OP(target) target __attribute__((always_inline)) static inline

// The operations whose intrinsics differ between the levels only in their prefix
// (_mm256 / _mm512).
#define SK_VEC_COMMON_OPS(target, mm)                                                       \
  SK_VEC_OP(target) F zero() { return mm##_setzero_ps(); }                                  \
  SK_VEC_OP(target) F set1(float x) { return mm##_set1_ps(x); }                             \
  SK_VEC_OP(target) F load(const float* p) { return mm##_load_ps(p); }                      \
  SK_VEC_OP(target) void store(float* p, F v) { mm##_store_ps(p, v); }                      \
  SK_VEC_OP(target) F loadu(const float* p) { return mm##_loadu_ps(p); }                    \
  SK_VEC_OP(target) void storeu(float* p, F v) { mm##_storeu_ps(p, v); }                    \
  SK_VEC_OP(target) F add(F a, F b) { return mm##_add_ps(a, b); }                           \
  SK_VEC_OP(target) F sub(F a, F b) { return mm##_sub_ps(a, b); }                           \
  SK_VEC_OP(target) F mul(F a, F b) { return mm##_mul_ps(a, b); }                           \
  SK_VEC_OP(target) F max(F a, F b) { return mm##_max_ps(a, b); }                           \
  SK_VEC_OP(target) F fmadd(F a, F b, F c) { return mm##_fmadd_ps(a, b, c); }               \
  SK_VEC_OP(target) I set1_i32(int32_t x) { return mm##_set1_epi32(x); }

struct VecAvx2 {
  using F = __m256;
  using I = __m256i;
  using M = __m256i;  // all-ones lanes
  static constexpr int kLanes = 8;
  static constexpr int kRegisters = 16;  // ymm0-15
  SK_VEC_COMMON_OPS(SK_TARGET_AVX2, _mm256)
  // v with its -inf lanes replaced by +0.
  SK_VEC_OP(SK_TARGET_AVX2) F neg_inf_to_zero(F v, F neg_inf) {
    return _mm256_andnot_ps(_mm256_cmp_ps(v, neg_inf, _CMP_EQ_OQ), v);
  }
  SK_VEC_OP(SK_TARGET_AVX2) I loadu_i32(const int32_t* p) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  }
  // Lanes with lo <= key < hi.
  SK_VEC_OP(SK_TARGET_AVX2) M in_range(I key, I lo, I hi) {
    // key >= lo and key < hi  <=>  !(lo > key) and (hi > key)
    return _mm256_andnot_si256(_mm256_cmpgt_epi32(lo, key), _mm256_cmpgt_epi32(hi, key));
  }
  SK_VEC_OP(SK_TARGET_AVX2) M no_lanes() { return _mm256_setzero_si256(); }
  // The lanes of m from p, 0 in the others (their memory is not read).
  SK_VEC_OP(SK_TARGET_AVX2) F load_masked(const float* p, M m) { return _mm256_maskload_ps(p, m); }
  // m ? yes : no, per lane.
  SK_VEC_OP(SK_TARGET_AVX2) F select(M m, F yes, F no) {
    return _mm256_blendv_ps(no, yes, _mm256_castsi256_ps(m));
  }
};

struct VecAvx512 {
  using F = __m512;
  using I = __m512i;
  using M = __mmask16;
  static constexpr int kLanes = 16;
  static constexpr int kRegisters = 32;  // zmm0-31
  SK_VEC_COMMON_OPS(SK_TARGET_AVX512, _mm512)
  SK_VEC_OP(SK_TARGET_AVX512) F neg_inf_to_zero(F v, F neg_inf) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, neg_inf, _CMP_EQ_OQ), v,
                                _mm512_setzero_ps());
  }
  SK_VEC_OP(SK_TARGET_AVX512) I loadu_i32(const int32_t* p) { return _mm512_loadu_si512(p); }
  SK_VEC_OP(SK_TARGET_AVX512) M in_range(I key, I lo, I hi) {
    return _mm512_cmp_epi32_mask(key, lo, _MM_CMPINT_NLT) &
           _mm512_cmp_epi32_mask(key, hi, _MM_CMPINT_LT);
  }
  SK_VEC_OP(SK_TARGET_AVX512) M no_lanes() { return 0; }
  SK_VEC_OP(SK_TARGET_AVX512) F load_masked(const float* p, M m) {
    return _mm512_maskz_loadu_ps(m, p);
  }
  SK_VEC_OP(SK_TARGET_AVX512) F select(M m, F yes, F no) {
    return _mm512_mask_blend_ps(m, no, yes);
  }
};

#undef SK_VEC_COMMON_OPS
#undef SK_VEC_OP

}  // namespace sentinel
#endif
