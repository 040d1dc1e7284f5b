#include "quantize.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "args.h"
#include "cpu_features.h"
#include "dtype_access.h"
#include "dtype_convert.h"
#include "thread_pool.h"

#include "simd.h"

// Bit-exactness contract shared by all backends
// ---------------------------------------------
// * absmax is an integer max over (bits(x) & 0x7fffffff): for non-negative floats the
//   integer order is the float order, and a NaN (larger than +inf as an integer)
//   propagates deterministically, whatever the vector max instruction would do.
// * scale = absmax / 127 and inv = 127 / absmax are computed once per row, in scalar
//   code shared by every backend.
// * q = clamp(round_half_even(x * inv), -127, 127): one fp32 multiply (never an FMA),
//   NaN products become 0, then round-to-nearest-even and clamp.
// * fp16 -> fp32 follows F16C exactly (exact for all numbers; NaN: quiet bit set,
//   payload kept); fp32 -> fp16 follows F16C with round-to-nearest-even (NaN: quiet,
//   payload truncated); bf16 <-> fp32 are bit shifts / round-to-nearest-even, NaN ->
//   0x7fc0 as in PyTorch.

namespace sentinel {
namespace {

constexpr float kQMax = 127.0f;
// Below this much work per chunk, waking a worker costs more than it saves.
constexpr int64_t kMinElemsPerChunk = 8 * 1024;

// clamp(round_half_even(x * inv), -127, 127), NaN -> 0. Independent of the FP
// rounding mode; the product is a single fp32 multiply.
inline int8_t quant1(float x, float inv) {
  // The product must be materialised as a rounded fp32 value: otherwise the compiler
  // may contract `x * inv` with the subtraction below into an FMA (e.g. when this is
  // inlined into the AVX2/AVX-512 tails, or on aarch64), which would change the rounding.
  const float v = materialize(x * inv);
  if (!(v == v)) return 0;  // NaN
  if (v >= kQMax) return 127;
  if (v <= -kQMax) return -127;
  // |v| < 127: truncate toward zero, then round half to even; v - t is exact.
  // Written branch-free: the fractional part of real data is unpredictable.
  const int t = static_cast<int>(v);
  const float d = v - static_cast<float>(t);
  const int odd = t & 1;
  const int up = static_cast<int>(d > 0.5f) | (static_cast<int>(d == 0.5f) & odd);
  const int down = static_cast<int>(d < -0.5f) | (static_cast<int>(d == -0.5f) & odd);
  return static_cast<int8_t>(t + up - down);
}

inline uint32_t absbits_max(uint32_t acc, float x) {
  return std::max(acc, f32_bits(x) & 0x7FFFFFFFu);
}

// ---------------------------------------------------------------------------
// Scalar row kernels
// ---------------------------------------------------------------------------

template <DType D>
float absmax_scalar(const void* x, int64_t n) {
  uint32_t m = 0;
  for (int64_t j = 0; j < n; ++j) m = absbits_max(m, load1<D>(x, j));
  return bits_f32(m);
}

template <DType D>
void quant_scalar(const void* x, int64_t n, float inv, int8_t* q) {
  for (int64_t j = 0; j < n; ++j) q[j] = quant1(load1<D>(x, j), inv);
}

template <DType D>
void dequant_scalar(const int8_t* q, int64_t n, float s, void* out) {
  for (int64_t j = 0; j < n; ++j) store1<D>(out, j, static_cast<float>(q[j]) * s);
}

#if defined(SENTINEL_X86_64)

// ---------------------------------------------------------------------------
// AVX2 (+F16C, FMA) row kernels: 8 lanes, scalar tails
// ---------------------------------------------------------------------------

template <DType D>
SK_TARGET_AVX2 float absmax_avx2(const void* x, int64_t n) {
  const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF);
  __m256i m0 = _mm256_setzero_si256(), m1 = m0, m2 = m0, m3 = m0;
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    m0 = _mm256_max_epu32(m0, _mm256_and_si256(_mm256_castps_si256(load8_avx2<D>(x, j)), abs_mask));
    m1 = _mm256_max_epu32(m1,
                          _mm256_and_si256(_mm256_castps_si256(load8_avx2<D>(x, j + 8)), abs_mask));
    m2 = _mm256_max_epu32(
        m2, _mm256_and_si256(_mm256_castps_si256(load8_avx2<D>(x, j + 16)), abs_mask));
    m3 = _mm256_max_epu32(
        m3, _mm256_and_si256(_mm256_castps_si256(load8_avx2<D>(x, j + 24)), abs_mask));
  }
  for (; j + 8 <= n; j += 8) {
    m0 = _mm256_max_epu32(m0, _mm256_and_si256(_mm256_castps_si256(load8_avx2<D>(x, j)), abs_mask));
  }
  m0 = _mm256_max_epu32(_mm256_max_epu32(m0, m1), _mm256_max_epu32(m2, m3));
  uint32_t m = hmax8_epu32(m0);
  for (; j < n; ++j) m = absbits_max(m, load1<D>(x, j));
  return bits_f32(m);
}

// 8 floats -> 8 int32 in [-127, 127].
SK_TARGET_AVX2 inline __m256i quant8_avx2(__m256 x, __m256 inv) {
  __m256 v = _mm256_mul_ps(x, inv);
  v = _mm256_and_ps(v, _mm256_cmp_ps(v, v, _CMP_ORD_Q));  // NaN -> 0
  v = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  v = _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(-kQMax)), _mm256_set1_ps(kQMax));
  return _mm256_cvtps_epi32(v);  // exact: v is already integral
}

template <DType D>
SK_TARGET_AVX2 void quant_avx2(const void* x, int64_t n, float inv_s, int8_t* q) {
  const __m256 inv = _mm256_set1_ps(inv_s);
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    const __m256i a = quant8_avx2(load8_avx2<D>(x, j), inv);
    const __m256i b = quant8_avx2(load8_avx2<D>(x, j + 8), inv);
    const __m256i c = quant8_avx2(load8_avx2<D>(x, j + 16), inv);
    const __m256i d = quant8_avx2(load8_avx2<D>(x, j + 24), inv);
    // packs work per 128-bit lane; the permute restores element order.
    const __m256i ab = _mm256_packs_epi32(a, b);
    const __m256i cd = _mm256_packs_epi32(c, d);
    const __m256i abcd = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(ab, cd), perm);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + j), abcd);
  }
  for (; j + 8 <= n; j += 8) {
    const __m256i a = quant8_avx2(load8_avx2<D>(x, j), inv);
    const __m128i a16 = _mm_packs_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + j), _mm_packs_epi16(a16, a16));
  }
  for (; j < n; ++j) q[j] = quant1(load1<D>(x, j), inv_s);
}

template <DType D>
SK_TARGET_AVX2 void dequant_avx2(const int8_t* q, int64_t n, float s, void* out) {
  const __m256 vs = _mm256_set1_ps(s);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256i qi =
        _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + j)));
    store8_avx2<D>(out, j, _mm256_mul_ps(_mm256_cvtepi32_ps(qi), vs));
  }
  for (; j < n; ++j) store1<D>(out, j, static_cast<float>(q[j]) * s);
}

// ---------------------------------------------------------------------------
// AVX-512 (F + BW) row kernels: 16 lanes, masked tails
// ---------------------------------------------------------------------------

template <DType D>
SK_TARGET_AVX512 inline __m512 load16_avx512(const void* base, int64_t j) {
  if constexpr (D == DType::kFloat32) {
    return _mm512_loadu_ps(static_cast<const float*>(base) + j);
  } else {
    const __m256i h = _mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + j));
    if constexpr (D == DType::kFloat16) {
      return _mm512_cvtph_ps(h);
    } else {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
  }
}

// Masked-off lanes read as +0.0 and never touch memory.
template <DType D>
SK_TARGET_AVX512 inline __m512 load16_avx512_masked(const void* base, int64_t j, __mmask16 k) {
  if constexpr (D == DType::kFloat32) {
    return _mm512_maskz_loadu_ps(k, static_cast<const float*>(base) + j);
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(base) + j;
    const __m256i h =
        _mm512_castsi512_si256(_mm512_maskz_loadu_epi16(static_cast<__mmask32>(k), p));
    if constexpr (D == DType::kFloat16) {
      return _mm512_cvtph_ps(h);
    } else {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
  }
}

template <DType D>
SK_TARGET_AVX512 float absmax_avx512(const void* x, int64_t n) {
  const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF);
  __m512i m0 = _mm512_setzero_si512(), m1 = m0, m2 = m0, m3 = m0;
  int64_t j = 0;
  for (; j + 64 <= n; j += 64) {
    m0 = _mm512_max_epu32(m0,
                          _mm512_and_si512(_mm512_castps_si512(load16_avx512<D>(x, j)), abs_mask));
    m1 = _mm512_max_epu32(
        m1, _mm512_and_si512(_mm512_castps_si512(load16_avx512<D>(x, j + 16)), abs_mask));
    m2 = _mm512_max_epu32(
        m2, _mm512_and_si512(_mm512_castps_si512(load16_avx512<D>(x, j + 32)), abs_mask));
    m3 = _mm512_max_epu32(
        m3, _mm512_and_si512(_mm512_castps_si512(load16_avx512<D>(x, j + 48)), abs_mask));
  }
  for (; j + 16 <= n; j += 16) {
    m0 = _mm512_max_epu32(m0,
                          _mm512_and_si512(_mm512_castps_si512(load16_avx512<D>(x, j)), abs_mask));
  }
  if (j < n) {
    const __m512 t = load16_avx512_masked<D>(x, j, tail_mask16(n - j));
    m1 = _mm512_max_epu32(m1, _mm512_and_si512(_mm512_castps_si512(t), abs_mask));
  }
  m0 = _mm512_max_epu32(_mm512_max_epu32(m0, m1), _mm512_max_epu32(m2, m3));
  return bits_f32(_mm512_reduce_max_epu32(m0));
}

SK_TARGET_AVX512 inline __m512i quant16_avx512(__m512 x, __m512 inv) {
  __m512 v = _mm512_mul_ps(x, inv);
  v = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), v);  // NaN -> 0
  v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  v = _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(-kQMax)), _mm512_set1_ps(kQMax));
  return _mm512_cvtps_epi32(v);  // exact: v is already integral
}

template <DType D>
SK_TARGET_AVX512 void quant_avx512(const void* x, int64_t n, float inv_s, int8_t* q) {
  const __m512 inv = _mm512_set1_ps(inv_s);
  int64_t j = 0;
  for (; j + 64 <= n; j += 64) {
    const __m128i a = _mm512_cvtsepi32_epi8(quant16_avx512(load16_avx512<D>(x, j), inv));
    const __m128i b = _mm512_cvtsepi32_epi8(quant16_avx512(load16_avx512<D>(x, j + 16), inv));
    const __m128i c = _mm512_cvtsepi32_epi8(quant16_avx512(load16_avx512<D>(x, j + 32), inv));
    const __m128i d = _mm512_cvtsepi32_epi8(quant16_avx512(load16_avx512<D>(x, j + 48), inv));
    const __m256i ab = _mm256_inserti128_si256(_mm256_castsi128_si256(a), b, 1);
    const __m256i cd = _mm256_inserti128_si256(_mm256_castsi128_si256(c), d, 1);
    _mm512_storeu_si512(q + j, _mm512_inserti64x4(_mm512_castsi256_si512(ab), cd, 1));
  }
  for (; j + 16 <= n; j += 16) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + j),
                     _mm512_cvtsepi32_epi8(quant16_avx512(load16_avx512<D>(x, j), inv)));
  }
  if (j < n) {
    const __mmask16 k = tail_mask16(n - j);
    _mm512_mask_cvtsepi32_storeu_epi8(q + j, k,
                                      quant16_avx512(load16_avx512_masked<D>(x, j, k), inv));
  }
}

template <DType D>
SK_TARGET_AVX512 inline void store16_avx512(void* base, int64_t j, __m512 v) {
  if constexpr (D == DType::kFloat32) {
    _mm512_storeu_ps(static_cast<float*>(base) + j, v);
  } else {
    uint16_t* p = static_cast<uint16_t*>(base) + j;
    if constexpr (D == DType::kFloat16) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                          _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                          _mm512_cvtepi32_epi16(f32_to_bf16_avx512(v)));
    }
  }
}

template <DType D>
SK_TARGET_AVX512 void dequant_avx512(const int8_t* q, int64_t n, float s, void* out) {
  const __m512 vs = _mm512_set1_ps(s);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512i qi =
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + j)));
    store16_avx512<D>(out, j, _mm512_mul_ps(_mm512_cvtepi32_ps(qi), vs));
  }
  if (j < n) {
    const __mmask16 k = tail_mask16(n - j);
    const __m512i qi = _mm512_cvtepi8_epi32(
        _mm512_castsi512_si128(_mm512_maskz_loadu_epi8(static_cast<__mmask64>(k), q + j)));
    store16_masked(out, D, j, _mm512_mul_ps(_mm512_cvtepi32_ps(qi), vs), k);
  }
}

#endif  // SENTINEL_X86_64

// ---------------------------------------------------------------------------
// Dispatch
// ---------------------------------------------------------------------------

using AbsmaxFn = float (*)(const void* x, int64_t n);
using QuantFn = void (*)(const void* x, int64_t n, float inv, int8_t* q);
using DequantFn = void (*)(const int8_t* q, int64_t n, float s, void* out);

struct QuantKernels {
  AbsmaxFn absmax;
  QuantFn quant;
};

template <DType D>
QuantKernels quant_kernels(SimdLevel level) {
#if defined(SENTINEL_X86_64)
  if (level >= SimdLevel::kAvx512) return {&absmax_avx512<D>, &quant_avx512<D>};
  if (level >= SimdLevel::kAvx2) return {&absmax_avx2<D>, &quant_avx2<D>};
#else
  (void)level;
#endif
  return {&absmax_scalar<D>, &quant_scalar<D>};
}

template <DType D>
DequantFn dequant_kernel(SimdLevel level) {
#if defined(SENTINEL_X86_64)
  if (level >= SimdLevel::kAvx512) return &dequant_avx512<D>;
  if (level >= SimdLevel::kAvx2) return &dequant_avx2<D>;
#else
  (void)level;
#endif
  return &dequant_scalar<D>;
}

int64_t rows_grain(int64_t cols) { return std::max<int64_t>(1, kMinElemsPerChunk / cols); }

template <DType D>
void quantize_impl(const void* x, int64_t rows, int64_t cols, int64_t x_stride_row,
                   int64_t x_stride_col, int8_t* q, int64_t q_stride_row, float* scale,
                   int num_threads) {
  const SimdLevel level = active_simd_level();
  const QuantKernels contiguous = quant_kernels<D>(level);
  // Strided rows are gathered into an fp32 buffer (the conversion is exact) and go
  // through the fp32 kernels, which makes them bit-identical to the contiguous path.
  const QuantKernels gathered = quant_kernels<DType::kFloat32>(level);
  const char* x_bytes = static_cast<const char*>(x);
  constexpr int64_t esize = element_size(D);

  parallel_for(
      rows, num_threads,
      [&](int64_t r0, int64_t r1) {
        std::vector<float> buf;
        if (x_stride_col != 1) buf.resize(static_cast<size_t>(cols));
        for (int64_t r = r0; r < r1; ++r) {
          const void* row = x_bytes + r * x_stride_row * esize;
          QuantKernels k = contiguous;
          if (x_stride_col != 1) {
            for (int64_t j = 0; j < cols; ++j) buf[j] = load1<D>(row, j * x_stride_col);
            row = buf.data();
            k = gathered;
          }
          int8_t* qrow = q + r * q_stride_row;
          const float absmax = k.absmax(row, cols);
          if (absmax == 0.0f) {
            scale[r] = 0.0f;
            std::memset(qrow, 0, static_cast<size_t>(cols));
            continue;
          }
          scale[r] = absmax / kQMax;
          k.quant(row, cols, kQMax / absmax, qrow);
        }
      },
      rows_grain(cols));
}

template <DType D>
void dequantize_impl(const int8_t* q, int64_t rows, int64_t cols, int64_t q_stride_row,
                     int64_t q_stride_col, const float* scale, int64_t scale_stride, void* out,
                     int64_t out_stride_row, int num_threads) {
  const DequantFn kernel = dequant_kernel<D>(active_simd_level());
  char* out_bytes = static_cast<char*>(out);
  constexpr int64_t esize = element_size(D);

  parallel_for(
      rows, num_threads,
      [&](int64_t r0, int64_t r1) {
        std::vector<int8_t> buf;
        if (q_stride_col != 1) buf.resize(static_cast<size_t>(cols));
        for (int64_t r = r0; r < r1; ++r) {
          const int8_t* qrow = q + r * q_stride_row;
          if (q_stride_col != 1) {
            for (int64_t j = 0; j < cols; ++j) buf[j] = qrow[j * q_stride_col];
            qrow = buf.data();
          }
          kernel(qrow, cols, scale[r * scale_stride], out_bytes + r * out_stride_row * esize);
        }
      },
      rows_grain(cols));
}

void check_common(const char* fn, int64_t rows, int64_t cols, int num_threads) {
  check_min(fn, "rows", rows, 0);
  check_min(fn, "cols", cols, 1);
  check_min(fn, "num_threads", num_threads, 1);
}

}  // namespace

namespace {
constexpr const char* kDTypeNames[] = {"float32", "float16", "bfloat16"};
}  // namespace

DType parse_dtype(const std::string& name) {
  DType dtype = DType::kFloat32;
  if (parse_enum(name, kDTypeNames, &dtype)) return dtype;
  throw std::invalid_argument("unsupported dtype '" + name +
                              "'; expected 'float32', 'float16' or 'bfloat16'");
}

const char* dtype_name(DType dtype) { return enum_name(dtype, kDTypeNames); }

void quantize_int8(const void* x, DType dtype, int64_t rows, int64_t cols, int64_t x_stride_row,
                   int64_t x_stride_col, int8_t* q, int64_t q_stride_row, float* scale,
                   int num_threads) {
  const char* fn = "quantize_int8";
  check_common(fn, rows, cols, num_threads);
  check_min(fn, "x_stride_row", x_stride_row, 1);
  check_min(fn, "x_stride_col", x_stride_col, 1);
  check_min(fn, "q_stride_row", q_stride_row, 1);
  if (q_stride_row < cols) {
    bad_arg(fn, "q_stride_row (" + std::to_string(q_stride_row) + ") must be >= cols (" +
                    std::to_string(cols) + ")");
  }
  if (rows == 0) return;
  check_not_null(fn, "x_ptr", x);
  check_not_null(fn, "q_ptr", q);
  check_not_null(fn, "scale_ptr", scale);
  dispatch_dtype(fn, dtype, [&](auto d) {
    quantize_impl<decltype(d)::value>(x, rows, cols, x_stride_row, x_stride_col, q,
                                      q_stride_row, scale, num_threads);
  });
}

void dequantize_int8(const int8_t* q, int64_t rows, int64_t cols, int64_t q_stride_row,
                     int64_t q_stride_col, const float* scale, int64_t scale_stride, void* out,
                     DType out_dtype, int64_t out_stride_row, int num_threads) {
  const char* fn = "dequantize_int8";
  check_common(fn, rows, cols, num_threads);
  check_min(fn, "q_stride_row", q_stride_row, 1);
  check_min(fn, "q_stride_col", q_stride_col, 1);
  check_min(fn, "scale_stride", scale_stride, 1);
  check_min(fn, "out_stride_row", out_stride_row, 1);
  if (out_stride_row < cols) {
    bad_arg(fn, "out_stride_row (" + std::to_string(out_stride_row) + ") must be >= cols (" +
                    std::to_string(cols) + ")");
  }
  if (rows == 0) return;
  check_not_null(fn, "q_ptr", q);
  check_not_null(fn, "scale_ptr", scale);
  check_not_null(fn, "out_ptr", out);
  dispatch_dtype(fn, out_dtype, [&](auto d) {
    dequantize_impl<decltype(d)::value>(q, rows, cols, q_stride_row, q_stride_col, scale,
                                        scale_stride, out, out_stride_row, num_threads);
  });
}

}  // namespace sentinel
