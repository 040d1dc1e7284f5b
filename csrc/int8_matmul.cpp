#include "int8_matmul.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>

#include "args.h"
#include "cpu_features.h"
#include "dtype_access.h"
#include "dtype_convert.h"
#include "thread_pool.h"

#include "simd.h"

// Design
// ======
// W8A16 (int8_linear_w8a16): two kernel families, both accumulating in fp32.
//  * GEMV (M <= 12, the decode case): memory-bound on the int8 weights. Each thread owns
//    a contiguous range of output channels and walks its weight rows in order, one row
//    at a time, so it reads one ascending stream (with a software prefetch 2 KiB ahead);
//    each 16 (AVX-512) / 8 (AVX2) weights are converted int8 -> int32 -> fp32 in
//    registers and FMA'd with up to 4 rows of x (converted once to a zero-padded fp32
//    buffer); further 4-row tiles of x find the block of 64 rows in L1/L2. Per-channel
//    scales are applied after the dot product; group scales (group_size a multiple of the
//    vector width) multiply the converted weights in registers.
//  * GEMM (larger M, prefill; also any group size the GEMV cannot take): 32 (AVX-512) /
//    16 (AVX2) output channels are dequantized (w * scale) into an fp32 panel laid out
//    [k][32] (AVX-512 converts 16x16 blocks and transposes them in registers), x is
//    packed once per call into [k][12] tiles, and a 12 x 32 register tile accumulates
//    outer products (one broadcast of x, two panel loads, 24 FMAs per k). The panel is
//    reused by every M-tile from L2; the epilogue (bias, conversion) works on vectors.
//  Strategy choice: (a) "dequantize on the fly" is used for W8A16 at every M. Strategy
//  (b), dynamic per-token activation quantization + int8 dot products, is what
//  int8_linear_w8a8 implements. Measured (2 vCPUs with AVX-512 VNNI, 2 threads, data in
//  cache, us; (a) / (b)):  N x K = 576 x 576:  M=1 12.0 / 4.6, M=16 89 / 34,
//  M=64 202 / 108, M=512 1035 / 688;  1536 x 576: M=1 28.5 / 8.9, M=64 395 / 198,
//  M=512 2447 / 1487. (b) is 1.5-4x faster (vpdpbusd does 64 multiply-adds per
//  instruction, (a) spends two conversions per 16 weights) but rounds every activation
//  to 8 bits relative to its row absmax, an error of up to absmax / 254 per element:
//  orders of magnitude outside the W8A16 contract (fp32 accumulation given the int8
//  weights), so it is kept for W8A8. With the weights of a whole SmolLM2-135M decode
//  step streamed from memory (134 MB), (a) takes 9.8 ms against 20.4 ms for torch's
//  fp32 F.linear (537 MB), and (b) 6.3 ms.
//
// W8A8 (int8_linear_w8a8): x (optionally divided by the SmoothQuant factors) is quantized
// per row with quantize_int8 itself, so the rule is the same bit for bit. Products are
// summed exactly in int32:
//  * AVX-512 VNNI: vpdpbusd multiplies unsigned by signed bytes. The weights are the
//    unsigned operand, offset by 128 (w ^ 0x80 = w + 128 in [0, 255]); the activations
//    (in [-127, 127]) are the signed one; acc = sum (w + 128) q - 128 * sum q, where
//    sum q is computed once per token. M < 8 uses a row-wise dot-product kernel like the
//    W8A16 GEMV; larger M packs weights into the VNNI layout ([k/4][n][4], via 16x16
//    dword transposes) and runs a 12 x 32 outer-product kernel on broadcast activation
//    quads.
//  * AVX-512 BW and AVX2: int8 -> int16 sign extension and vpmaddwd (row-wise kernel).
//  * scalar: int32 loops.
//  Arithmetic mod 2^32 is exact whenever the true sum fits in int32 (K <= 132104), so
//  all levels give the same sums, and the epilogue ((float)acc * a_scale) * w_scale +
//  bias is evaluated with the same three fp32 roundings everywhere (no FMA
//  contraction: the products go through an optimisation barrier).
//
// Threading: parallel_for over output channels (panels for the GEMMs), with a minimum
// amount of work per chunk (kMinChunkNs below).

namespace sentinel {
namespace {

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// 64-byte aligned, uninitialised (or zeroed) scratch memory.
template <class T>
class Buffer {
 public:
  explicit Buffer(int64_t n, bool zero = false) {
    size_t bytes = static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(T);
    bytes = (bytes + 63) / 64 * 64;
    p_ = static_cast<T*>(std::aligned_alloc(64, bytes));
    if (p_ == nullptr) throw std::bad_alloc();
    if (zero) std::memset(static_cast<void*>(p_), 0, bytes);
  }
  ~Buffer() { std::free(p_); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  T* get() const { return p_; }

 private:
  T* p_;
};

// Threading: a chunk of work is only handed to a pool worker when it is worth at least
// kMinChunkNs of compute. Right after a call the pool's workers poll for the next job
// (see thread_pool.cpp), so a hand-off costs ~0.3 us to start plus ~0.3 us to collect,
// and a few tenths more to move x into the other core's cache. On the 2-vCPU VM this
// was tuned on, splitting pays from ~3 us of work on: M = 1, K = 576 W8A16 GEMVs go
// 4.3 -> 3.6 us (N = 192), 12.5 -> 8.0 us (N = 576), 33 -> 18 us (N = 1536); with
// 1.5 us the W8A8 N = 192 GEMV (2.1 us) got slower split, with 6 us the W8A8 N = 576
// one (13 us with cold weights) stayed on one thread. Estimated costs per multiply-add
// (one core, data in cache), by kernel family:
constexpr double kMinChunkNs = 3000.0;
constexpr double kNsPerMacW8A16Gemv = 0.035;
constexpr double kNsPerMacW8A16Gemm = 0.011;
constexpr double kNsPerMacW8A8Dot = 0.015;
constexpr double kNsPerMacW8A8Gemm = 0.006;

// Smallest number of parallel_for items per chunk, each item costing `macs_per_item`.
int64_t grain_for(int64_t macs_per_item, double ns_per_mac) {
  const double item_ns = static_cast<double>(std::max<int64_t>(1, macs_per_item)) * ns_per_mac;
  return std::max<int64_t>(1, static_cast<int64_t>(kMinChunkNs / item_ns));
}

// ---------------------------------------------------------------------------
// x rows -> fp32 (exact), zero padding [n, padded)
// ---------------------------------------------------------------------------

void to_f32_scalar(const void* src, DType d, int64_t n, float* dst) {
  switch (d) {
    case DType::kFloat32:
      std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
      return;
    case DType::kFloat16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (int64_t j = 0; j < n; ++j) dst[j] = half_to_float(s[j]);
      return;
    }
    case DType::kBFloat16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (int64_t j = 0; j < n; ++j) dst[j] = bf16_to_float(s[j]);
      return;
    }
  }
}

#if defined(SENTINEL_X86_64)
SK_TARGET_AVX2 void f16_to_f32_avx2(const uint16_t* s, int64_t n, float* dst) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + j));
    _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(h));
  }
  for (; j < n; ++j) dst[j] = half_to_float(s[j]);
}
#endif

void to_f32(const void* src, DType d, int64_t n, float* dst, SimdLevel level) {
#if defined(SENTINEL_X86_64)
  if (d == DType::kFloat16 && level >= SimdLevel::kAvx2) {
    f16_to_f32_avx2(static_cast<const uint16_t*>(src), n, dst);
    return;
  }
#else
  (void)level;
#endif
  to_f32_scalar(src, d, n, dst);
}

// rows x n (row stride src_stride elements) -> dst rows of dst_stride floats, padding zeroed.
void rows_to_f32(const void* src, DType d, int64_t rows, int64_t n, int64_t src_stride, float* dst,
                 int64_t dst_stride, SimdLevel level) {
  const char* s = static_cast<const char*>(src);
  const int64_t es = element_size(d);
  for (int64_t r = 0; r < rows; ++r) {
    float* drow = dst + r * dst_stride;
    to_f32(s + r * src_stride * es, d, n, drow, level);
    for (int64_t j = n; j < dst_stride; ++j) drow[j] = 0.0f;
  }
}

// ---------------------------------------------------------------------------
// Output stores (vector conversions are bit-identical to store1)
// ---------------------------------------------------------------------------

#if defined(SENTINEL_X86_64)

SK_TARGET_AVX2 inline void store8_out(void* base, DType d, int64_t idx, __m256 v, int count) {
  if (count < 8) {
    alignas(32) float t[8];
    _mm256_store_ps(t, v);
    for (int j = 0; j < count; ++j) store1(base, d, idx + j, t[j]);
    return;
  }
  switch (d) {
    case DType::kFloat32:
      _mm256_storeu_ps(static_cast<float*>(base) + idx, v);
      return;
    case DType::kFloat16:
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(base) + idx),
                       _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
      return;
    case DType::kBFloat16: {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(base) + idx),
                       f32_to_bf16x8_avx2(v));
      return;
    }
  }
}

// In-register transpose of a 16x16 block of 32-bit lanes: r[i] lane j -> r[j] lane i.
SK_TARGET_AVX512 inline void transpose16x16(__m512 (&r)[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // u[4g + c], 128-bit lane L: rows 4g..4g+3 of column 4L + c.
  __m512 u[16];
  for (int g = 0; g < 4; ++g) {
    u[4 * g + 0] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
    u[4 * g + 1] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0xEE);
    u[4 * g + 2] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
    u[4 * g + 3] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512 v0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x44);
    const __m512 v1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xEE);
    const __m512 v2 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x44);
    const __m512 v3 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xEE);
    r[0 + c] = _mm512_shuffle_f32x4(v0, v2, 0x88);
    r[4 + c] = _mm512_shuffle_f32x4(v0, v2, 0xDD);
    r[8 + c] = _mm512_shuffle_f32x4(v1, v3, 0x88);
    r[12 + c] = _mm512_shuffle_f32x4(v1, v3, 0xDD);
  }
}

#endif  // SENTINEL_X86_64

// ===========================================================================
// W8A16
// ===========================================================================

struct W8A16Problem {
  const void* x;
  DType x_dtype;
  int64_t M, K, x_stride;
  const int8_t* w;
  int64_t N, w_stride;
  const float* scale;
  int64_t group_size, scale_stride;
  const float* bias;  // fp32 copy, or nullptr
  void* out;
  DType out_dtype;
  int64_t out_stride;
  int num_threads;
};

inline float w_scale_at(const W8A16Problem& p, int64_t n, int64_t k) {
  const float* s = p.scale + n * p.scale_stride;
  return p.group_size == 0 ? s[0] : s[k / p.group_size];
}

// ---- scalar: y = sum_k x * (w * s) in fp32, then + bias --------------------------

void w8a16_scalar(const W8A16Problem& p, const float* xf, int64_t xf_stride) {
  const int64_t es = element_size(p.out_dtype);
  parallel_for(
      p.N, p.num_threads,
      [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; ++n) {
          const int8_t* wr = p.w + n * p.w_stride;
          const float* sr = p.scale + n * p.scale_stride;
          const int64_t gs = p.group_size == 0 ? p.K : p.group_size;
          for (int64_t m = 0; m < p.M; ++m) {
            const float* xr = xf + m * xf_stride;
            float acc = 0.0f;
            for (int64_t g0 = 0, g = 0; g0 < p.K; g0 += gs, ++g) {
              const float s = sr[p.group_size == 0 ? 0 : g];
              const int64_t g1 = std::min(p.K, g0 + gs);
              for (int64_t k = g0; k < g1; ++k) acc += xr[k] * (static_cast<float>(wr[k]) * s);
            }
            if (p.bias != nullptr) acc += p.bias[n];
            store1(static_cast<char*>(p.out) + m * p.out_stride * es, p.out_dtype, n, acc);
          }
        }
      },
      grain_for(p.M * p.K, 1.0));
}

// ---- GEMV family: dot products over K, weights converted in registers -----------
//
// Rows are processed one after another, each unrolled along K, so a thread reads its
// share of the weights as one ascending stream (the L2 streamer follows one forward
// stream per 4 KiB page; interleaving several rows defeats it), and a software prefetch
// runs kPrefetchBytes ahead of it.

constexpr int kGemvMR = 4;       // rows of x per kernel call
constexpr int kGemvCols = 64;    // weight rows (output columns) per kernel call
constexpr int kPrefetchBytes = 2048;

// res[i * kGemvCols + r] = sum_k xf[i][k] * w_r[k] (* s_r[k / gs] with groups) for
// r < nrows, w_r = w + r * w_stride, s_r = s + r * s_stride; xf rows zero-padded to a
// multiple of 16 floats.
using GemvFn = void (*)(const float* xf, int64_t xf_stride, const int8_t* w, int64_t w_stride,
                        int nrows, int64_t K, const float* s, int64_t s_stride, int64_t gs,
                        float* res);
// Stores vals[0 .. cnt) at out[0 .. cnt) (element index), converting to d.
using StoreFn = void (*)(void* out, DType d, const float* vals, int cnt);

void store_vals_scalar(void* out, DType d, const float* vals, int cnt) {
  for (int j = 0; j < cnt; ++j) store1(out, d, j, vals[j]);
}

#if defined(SENTINEL_X86_64)

SK_TARGET_AVX512 void store_vals_avx512(void* out, DType d, const float* vals, int cnt) {
  for (int j = 0; j < cnt; j += 16) {
    const __mmask16 k = tail_mask16(cnt - j);
    store16_masked(out, d, j, _mm512_maskz_loadu_ps(k, vals + j), k);
  }
}

SK_TARGET_AVX2 void store_vals_avx2(void* out, DType d, const float* vals, int cnt) {
  for (int j = 0; j < cnt; j += 8) {
    const int c = std::min(8, cnt - j);
    if (c == 8) {
      store8_out(out, d, j, _mm256_loadu_ps(vals + j), 8);
    } else {
      for (int t = 0; t < c; ++t) store1(out, d, j + t, vals[j + t]);
    }
  }
}

template <int MR, bool kGroups>
SK_TARGET_AVX512 void w8a16_gemv_avx512(const float* xf, int64_t xf_stride, const int8_t* w0,
                                        int64_t w_stride, int nrows, int64_t K, const float* s0,
                                        int64_t s_stride, int64_t gs, float* res) {
  constexpr int U = MR <= 2 ? 4 : 2;  // 16-wide steps per iteration
  const int64_t gstep = kGroups ? gs : K;
  for (int r = 0; r < nrows; ++r) {
    const int8_t* w = w0 + r * w_stride;
    const float* s = s0 + r * s_stride;
    __m512 acc[MR][U];
    for (int i = 0; i < MR; ++i)
      for (int u = 0; u < U; ++u) acc[i][u] = _mm512_setzero_ps();
    for (int64_t g0 = 0; g0 < K; g0 += gstep) {
      const int64_t g1 = std::min(K, g0 + gstep);
      __m512 sv = _mm512_setzero_ps();
      if constexpr (kGroups) sv = _mm512_set1_ps(s[g0 / gs]);
      int64_t k = g0;
      const int64_t e = g0 + ((g1 - g0) / (16 * U)) * (16 * U);
      for (; k < e; k += 16 * U) {
        for (int u = 0; u < U; u += 4) {
          _mm_prefetch(reinterpret_cast<const char*>(w + k + 16 * u + kPrefetchBytes),
                       _MM_HINT_T0);
        }
        for (int u = 0; u < U; ++u) {
          __m512 wf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k + 16 * u))));
          if constexpr (kGroups) wf = _mm512_mul_ps(wf, sv);
          for (int i = 0; i < MR; ++i) {
            acc[i][u] = _mm512_fmadd_ps(_mm512_loadu_ps(xf + i * xf_stride + k + 16 * u), wf,
                                        acc[i][u]);
          }
        }
      }
      for (; k < g1; k += 16) {  // partial steps only at the end of K (gs % 16 == 0)
        const int64_t cnt = g1 - k;
        const __m128i b =
            cnt >= 16 ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k))
                      : _mm512_castsi512_si128(_mm512_maskz_loadu_epi8(
                            static_cast<__mmask64>((uint64_t{1} << cnt) - 1u), w + k));
        __m512 wf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
        if constexpr (kGroups) wf = _mm512_mul_ps(wf, sv);
        for (int i = 0; i < MR; ++i)  // x is zero padded
          acc[i][0] = _mm512_fmadd_ps(_mm512_loadu_ps(xf + i * xf_stride + k), wf, acc[i][0]);
      }
    }
    for (int i = 0; i < MR; ++i) {
      __m512 t = acc[i][0];
      for (int u = 1; u < U; ++u) t = _mm512_add_ps(t, acc[i][u]);
      res[i * kGemvCols + r] = _mm512_reduce_add_ps(t);
    }
  }
}

template <int MR, bool kGroups>
SK_TARGET_AVX2 void w8a16_gemv_avx2(const float* xf, int64_t xf_stride, const int8_t* w0,
                                    int64_t w_stride, int nrows, int64_t K, const float* s0,
                                    int64_t s_stride, int64_t gs, float* res) {
  constexpr int U = MR <= 2 ? 4 : 2;  // 8-wide steps per iteration
  const int64_t gstep = kGroups ? gs : K;
  for (int r = 0; r < nrows; ++r) {
    const int8_t* w = w0 + r * w_stride;
    const float* s = s0 + r * s_stride;
    __m256 acc[MR][U];
    for (int i = 0; i < MR; ++i)
      for (int u = 0; u < U; ++u) acc[i][u] = _mm256_setzero_ps();
    for (int64_t g0 = 0; g0 < K; g0 += gstep) {
      const int64_t g1 = std::min(K, g0 + gstep);
      __m256 sv = _mm256_setzero_ps();
      if constexpr (kGroups) sv = _mm256_set1_ps(s[g0 / gs]);
      int64_t k = g0;
      const int64_t e = g0 + ((g1 - g0) / (8 * U)) * (8 * U);
      for (; k < e; k += 8 * U) {
        _mm_prefetch(reinterpret_cast<const char*>(w + k + kPrefetchBytes), _MM_HINT_T0);
        for (int u = 0; u < U; ++u) {
          __m256 wf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
              _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + k + 8 * u))));
          if constexpr (kGroups) wf = _mm256_mul_ps(wf, sv);
          for (int i = 0; i < MR; ++i) {
            acc[i][u] = _mm256_fmadd_ps(_mm256_loadu_ps(xf + i * xf_stride + k + 8 * u), wf,
                                        acc[i][u]);
          }
        }
      }
      for (; k < g1; k += 8) {  // partial steps only at the end of K (gs % 8 == 0)
        int64_t t = 0;
        std::memcpy(&t, w + k, static_cast<size_t>(std::min<int64_t>(8, g1 - k)));
        __m256 wf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(t)));
        if constexpr (kGroups) wf = _mm256_mul_ps(wf, sv);
        for (int i = 0; i < MR; ++i)
          acc[i][0] = _mm256_fmadd_ps(_mm256_loadu_ps(xf + i * xf_stride + k), wf, acc[i][0]);
      }
    }
    for (int i = 0; i < MR; ++i) {
      __m256 t = acc[i][0];
      for (int u = 1; u < U; ++u) t = _mm256_add_ps(t, acc[i][u]);
      res[i * kGemvCols + r] = hsum8(t);
    }
  }
}

#endif  // SENTINEL_X86_64

struct GemvKernels {
  GemvFn fn[kGemvMR + 1] = {};  // fn[mr], mr = 1 .. kGemvMR; null: no GEMV at this level
  StoreFn store = &store_vals_scalar;
  int64_t group_multiple = 1;  // group sizes handled: 0 or multiples of this
};

GemvKernels gemv_kernels(SimdLevel level, bool groups) {
  GemvKernels k;
#if defined(SENTINEL_X86_64)
  if (level >= SimdLevel::kAvx512) {
    k.group_multiple = 16;
    k.store = &store_vals_avx512;
    if (groups) {
      k.fn[1] = &w8a16_gemv_avx512<1, true>, k.fn[2] = &w8a16_gemv_avx512<2, true>;
      k.fn[3] = &w8a16_gemv_avx512<3, true>, k.fn[4] = &w8a16_gemv_avx512<4, true>;
    } else {
      k.fn[1] = &w8a16_gemv_avx512<1, false>, k.fn[2] = &w8a16_gemv_avx512<2, false>;
      k.fn[3] = &w8a16_gemv_avx512<3, false>, k.fn[4] = &w8a16_gemv_avx512<4, false>;
    }
    return k;
  }
  if (level >= SimdLevel::kAvx2) {
    k.group_multiple = 8;
    k.store = &store_vals_avx2;
    if (groups) {
      k.fn[1] = &w8a16_gemv_avx2<1, true>, k.fn[2] = &w8a16_gemv_avx2<2, true>;
      k.fn[3] = &w8a16_gemv_avx2<3, true>, k.fn[4] = &w8a16_gemv_avx2<4, true>;
    } else {
      k.fn[1] = &w8a16_gemv_avx2<1, false>, k.fn[2] = &w8a16_gemv_avx2<2, false>;
      k.fn[3] = &w8a16_gemv_avx2<3, false>, k.fn[4] = &w8a16_gemv_avx2<4, false>;
    }
    return k;
  }
#else
  (void)level;
  (void)groups;
#endif
  return k;
}

void w8a16_gemv(const W8A16Problem& p, const GemvKernels& kern, const float* xf,
                int64_t xf_stride) {
  const int64_t es = element_size(p.out_dtype);
  const bool groups = p.group_size != 0;
  parallel_for(
      p.N, p.num_threads,
      [&](int64_t c0, int64_t c1) {
        alignas(64) float res[kGemvMR * kGemvCols];
        for (int64_t nb = c0; nb < c1; nb += kGemvCols) {
          const int nc = static_cast<int>(std::min<int64_t>(kGemvCols, c1 - nb));
          const float* sb = p.scale + nb * p.scale_stride;
          for (int64_t m0 = 0; m0 < p.M; m0 += kGemvMR) {
            // With several M-tiles the block's rows come from L1/L2 after the first.
            const int mr = static_cast<int>(std::min<int64_t>(kGemvMR, p.M - m0));
            kern.fn[mr](xf + m0 * xf_stride, xf_stride, p.w + nb * p.w_stride, p.w_stride, nc,
                        p.K, sb, p.scale_stride, p.group_size, res);
            for (int i = 0; i < mr; ++i) {
              float* v = res + i * kGemvCols;
              if (!groups) {
                for (int j = 0; j < nc; ++j) v[j] *= sb[j * p.scale_stride];
              }
              if (p.bias != nullptr) {
                for (int j = 0; j < nc; ++j) v[j] += p.bias[nb + j];
              }
              kern.store(static_cast<char*>(p.out) + ((m0 + i) * p.out_stride + nb) * es,
                         p.out_dtype, v, nc);
            }
          }
        }
      },
      grain_for(p.M * p.K, kNsPerMacW8A16Gemv));
}

// ---- GEMM family: dequantized weight panels [k][NP], packed x tiles [k][MR] ------

// Dequantizes rows n0 .. n0+nv-1 (nv <= np) into panel[k * np + j] = w[n0+j][k] * s;
// columns j >= nv are zero. Works for any group size.
void pack_w8a16_panel_generic(const W8A16Problem& p, int64_t n0, int nv, int np, float* panel) {
  const int64_t K = p.K;
  if (nv < np) {
    for (int64_t k = 0; k < K; ++k)
      for (int j = nv; j < np; ++j) panel[k * np + j] = 0.0f;
  }
  const int64_t gs = p.group_size == 0 ? K : p.group_size;
  for (int j = 0; j < nv; ++j) {
    const int8_t* wr = p.w + (n0 + j) * p.w_stride;
    const float* sr = p.scale + (n0 + j) * p.scale_stride;
    for (int64_t g0 = 0, g = 0; g0 < K; g0 += gs, ++g) {
      const float s = sr[p.group_size == 0 ? 0 : g];
      const int64_t g1 = std::min(K, g0 + gs);
      for (int64_t k = g0; k < g1; ++k) panel[k * np + j] = static_cast<float>(wr[k]) * s;
    }
  }
}

// x rows m0 .. m0+mr-1 (fp32) -> ap[k * mr + i].
void pack_x_tile(const float* xf, int64_t xf_stride, int64_t K, int mr, float* ap) {
  for (int64_t k = 0; k < K; ++k)
    for (int i = 0; i < mr; ++i) ap[k * mr + i] = xf[i * xf_stride + k];
}

using PanelFn = void (*)(const W8A16Problem& p, int64_t n0, int nv, float* panel);
// One MR x NP tile over the whole K, plus the epilogue (bias, store of nv columns).
using GemmFn = void (*)(const float* ap, const float* panel, int64_t K, const float* bias,
                        void* out, DType od, int64_t out_stride, int nv);

#if defined(SENTINEL_X86_64)

SK_TARGET_AVX512 void pack_w8a16_panel_avx512(const W8A16Problem& p, int64_t n0, int nv,
                                              float* panel) {
  constexpr int kNP = 32;
  const int64_t K = p.K;
  const int64_t gs = p.group_size;
  const bool per_lane_scale = gs != 0 && gs % 16 != 0;
  alignas(64) int32_t gidx[16] = {};
  for (int64_t k0 = 0; k0 < K; k0 += 16) {
    const int64_t cnt = std::min<int64_t>(16, K - k0);
    const __mmask16 kmask = tail_mask16(cnt);
    const __mmask64 bmask = static_cast<__mmask64>(kmask);
    if (per_lane_scale) {
      for (int l = 0; l < 16; ++l) gidx[l] = static_cast<int32_t>(std::min(k0 + l, K - 1) / gs);
    }
    const __m512i vidx = _mm512_load_si512(gidx);
    for (int h = 0; h < 2; ++h) {
      __m512 r[16];
      for (int j = 0; j < 16; ++j) {
        const int row = 16 * h + j;
        if (row >= nv) {
          r[j] = _mm512_setzero_ps();
          continue;
        }
        const int8_t* wp = p.w + (n0 + row) * p.w_stride + k0;
        const float* sp = p.scale + (n0 + row) * p.scale_stride;
        const __m128i b = cnt == 16 ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(wp))
                                    : _mm512_castsi512_si128(_mm512_maskz_loadu_epi8(bmask, wp));
        __m512 sv;
        if (gs == 0) {
          sv = _mm512_set1_ps(sp[0]);
        } else if (!per_lane_scale) {
          sv = _mm512_set1_ps(sp[k0 / gs]);
        } else {
          sv = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), kmask, vidx, sp, 4);
        }
        r[j] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), sv);
      }
      if (16 * h >= nv) {
        for (int t = 0; t < 16; ++t) _mm512_store_ps(panel + (k0 + t) * kNP + 16 * h, r[t]);
        continue;
      }
      transpose16x16(r);
      for (int t = 0; t < 16; ++t) _mm512_store_ps(panel + (k0 + t) * kNP + 16 * h, r[t]);
    }
  }
}

template <int MR>
SK_TARGET_AVX512 void w8a16_gemm_avx512(const float* ap, const float* panel, int64_t K,
                                        const float* bias, void* out, DType od,
                                        int64_t out_stride, int nv) {
  __m512 c0[MR], c1[MR];
  for (int i = 0; i < MR; ++i) c0[i] = c1[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m512 b0 = _mm512_load_ps(panel + k * 32);
    const __m512 b1 = _mm512_load_ps(panel + k * 32 + 16);
    const float* a = ap + k * MR;
    for (int i = 0; i < MR; ++i) {
      const __m512 av = _mm512_set1_ps(a[i]);
      c0[i] = _mm512_fmadd_ps(av, b0, c0[i]);
      c1[i] = _mm512_fmadd_ps(av, b1, c1[i]);
    }
  }
  const __mmask16 m0 = tail_mask16(nv), m1 = tail_mask16(nv - 16);
  __m512 bv0 = _mm512_setzero_ps(), bv1 = _mm512_setzero_ps();
  if (bias != nullptr) {
    bv0 = _mm512_load_ps(bias);
    bv1 = _mm512_load_ps(bias + 16);
  }
  for (int i = 0; i < MR; ++i) {
    if (bias != nullptr) {
      c0[i] = _mm512_add_ps(c0[i], bv0);
      c1[i] = _mm512_add_ps(c1[i], bv1);
    }
    store16_masked(out, od, i * out_stride, c0[i], m0);
    if (m1 != 0) store16_masked(out, od, i * out_stride + 16, c1[i], m1);
  }
}

template <int MR>
SK_TARGET_AVX2 void w8a16_gemm_avx2(const float* ap, const float* panel, int64_t K,
                                    const float* bias, void* out, DType od, int64_t out_stride,
                                    int nv) {
  __m256 c0[MR], c1[MR];
  for (int i = 0; i < MR; ++i) c0[i] = c1[i] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_load_ps(panel + k * 16);
    const __m256 b1 = _mm256_load_ps(panel + k * 16 + 8);
    const float* a = ap + k * MR;
    for (int i = 0; i < MR; ++i) {
      const __m256 av = _mm256_broadcast_ss(a + i);
      c0[i] = _mm256_fmadd_ps(av, b0, c0[i]);
      c1[i] = _mm256_fmadd_ps(av, b1, c1[i]);
    }
  }
  const int cnt0 = std::min(nv, 8), cnt1 = std::max(nv - 8, 0);
  for (int i = 0; i < MR; ++i) {
    if (bias != nullptr) {
      c0[i] = _mm256_add_ps(c0[i], _mm256_load_ps(bias));
      c1[i] = _mm256_add_ps(c1[i], _mm256_load_ps(bias + 8));
    }
    store8_out(out, od, i * out_stride, c0[i], cnt0);
    if (cnt1 > 0) store8_out(out, od, i * out_stride + 8, c1[i], cnt1);
  }
}

#endif  // SENTINEL_X86_64

struct GemmKernels {
  int np = 0;  // panel width (output channels)
  int mr = 0;  // rows of x per tile; fn[1..mr] valid
  PanelFn pack = nullptr;
  GemmFn fn[13] = {};
};

void pack_generic_16(const W8A16Problem& p, int64_t n0, int nv, float* panel) {
  pack_w8a16_panel_generic(p, n0, nv, 16, panel);
}

GemmKernels gemm_kernels(SimdLevel level) {
  GemmKernels k;
#if defined(SENTINEL_X86_64)
  if (level >= SimdLevel::kAvx512) {
    k.np = 32;
    k.mr = 12;
    k.pack = &pack_w8a16_panel_avx512;
    k.fn[1] = &w8a16_gemm_avx512<1>;
    k.fn[2] = &w8a16_gemm_avx512<2>;
    k.fn[3] = &w8a16_gemm_avx512<3>;
    k.fn[4] = &w8a16_gemm_avx512<4>;
    k.fn[5] = &w8a16_gemm_avx512<5>;
    k.fn[6] = &w8a16_gemm_avx512<6>;
    k.fn[7] = &w8a16_gemm_avx512<7>;
    k.fn[8] = &w8a16_gemm_avx512<8>;
    k.fn[9] = &w8a16_gemm_avx512<9>;
    k.fn[10] = &w8a16_gemm_avx512<10>;
    k.fn[11] = &w8a16_gemm_avx512<11>;
    k.fn[12] = &w8a16_gemm_avx512<12>;
    return k;
  }
  if (level >= SimdLevel::kAvx2) {
    k.np = 16;
    k.mr = 6;
    k.pack = &pack_generic_16;
    k.fn[1] = &w8a16_gemm_avx2<1>;
    k.fn[2] = &w8a16_gemm_avx2<2>;
    k.fn[3] = &w8a16_gemm_avx2<3>;
    k.fn[4] = &w8a16_gemm_avx2<4>;
    k.fn[5] = &w8a16_gemm_avx2<5>;
    k.fn[6] = &w8a16_gemm_avx2<6>;
    return k;
  }
#else
  (void)level;
#endif
  return k;
}

void w8a16_gemm(const W8A16Problem& p, const GemmKernels& kern, SimdLevel level) {
  const int64_t M = p.M, K = p.K;
  const int mr = kern.mr, np = kern.np;
  const int64_t ntiles = (M + mr - 1) / mr;
  // x, converted to fp32 and packed per tile: tile t (rows t*mr ..) at ap + t*mr*K.
  Buffer<float> ap(M * K);
  parallel_for(
      ntiles, p.num_threads,
      [&](int64_t t0, int64_t t1) {
        Buffer<float> rows(static_cast<int64_t>(mr) * K);
        const int64_t es = element_size(p.x_dtype);
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t m0 = t * mr;
          const int r = static_cast<int>(std::min<int64_t>(mr, M - m0));
          rows_to_f32(static_cast<const char*>(p.x) + m0 * p.x_stride * es, p.x_dtype, r, K,
                      p.x_stride, rows.get(), K, level);
          pack_x_tile(rows.get(), K, K, r, ap.get() + m0 * K);
        }
      },
      grain_for(int64_t{mr} * K, 0.5));  // ~0.5 ns per element (conversion and transpose)

  const int64_t npanels = (p.N + np - 1) / np;
  const int64_t es = element_size(p.out_dtype);
  parallel_for(
      npanels, p.num_threads,
      [&](int64_t q0, int64_t q1) {
        Buffer<float> panel(round_up(K, 16) * np);
        alignas(64) float bias[32];
        for (int64_t q = q0; q < q1; ++q) {
          const int64_t n0 = q * np;
          const int nv = static_cast<int>(std::min<int64_t>(np, p.N - n0));
          kern.pack(p, n0, nv, panel.get());
          if (p.bias != nullptr) {
            for (int j = 0; j < np; ++j) bias[j] = j < nv ? p.bias[n0 + j] : 0.0f;
          }
          for (int64_t m0 = 0; m0 < M; m0 += mr) {
            const int r = static_cast<int>(std::min<int64_t>(mr, M - m0));
            kern.fn[r](ap.get() + m0 * K, panel.get(), K, p.bias != nullptr ? bias : nullptr,
                       static_cast<char*>(p.out) + (m0 * p.out_stride + n0) * es, p.out_dtype,
                       p.out_stride, nv);
          }
        }
      },
      grain_for(M * K * np, kNsPerMacW8A16Gemm));
}

// Largest M that takes the GEMV kernels. Measured on one core (K = 576, N = 192 / 576):
// the GEMV re-converts the weights once per 4 rows of x, the GEMM dequantizes once per
// call but pays for packing; they cross between M = 12 and 16.
constexpr int64_t kW8A16GemvMaxM = 12;

void w8a16_impl(const W8A16Problem& p, SimdLevel level) {
  const bool groups = p.group_size != 0;
  const GemvKernels gemv = gemv_kernels(level, groups);
  const GemmKernels gemm = gemm_kernels(level);
  const bool gemv_ok =
      gemv.fn[1] != nullptr && (!groups || p.group_size % gemv.group_multiple == 0);
  if (gemv_ok && (p.M <= kW8A16GemvMaxM || gemm.np == 0)) {
    const int64_t xs = round_up(p.K, 16);
    Buffer<float> xf(p.M * xs);
    rows_to_f32(p.x, p.x_dtype, p.M, p.K, p.x_stride, xf.get(), xs, level);
    w8a16_gemv(p, gemv, xf.get(), xs);
    return;
  }
  if (gemm.np > 0) {
    w8a16_gemm(p, gemm, level);
    return;
  }
  Buffer<float> xf(p.M * p.K);
  rows_to_f32(p.x, p.x_dtype, p.M, p.K, p.x_stride, xf.get(), p.K, level);
  w8a16_scalar(p, xf.get(), p.K);
}

// ===========================================================================
// W8A8
// ===========================================================================

struct W8A8Problem {
  int64_t M, K;
  const int8_t* q;  // quantized activations [M][kq], zero padded
  int64_t kq;
  const float* a_scale;   // [M]
  const int32_t* qsum;    // [M]: sum_k q[m, k]
  const int8_t* w;
  int64_t N, w_stride;
  const float* w_scale;  // [N]
  const float* bias;     // fp32 [N] or nullptr
  void* out;
  DType out_dtype;
  int64_t out_stride;
  int num_threads;
};

inline float w8a8_value(int32_t acc, float as, float ws, const float* bias, int64_t n) {
  float v = materialize(static_cast<float>(acc) * as);
  v = materialize(v * ws);
  if (bias != nullptr) v = v + bias[n];
  return v;
}

// out_row[j] for j < cnt from acc[j] (columns n0 + j).
using W8A8EpiFn = void (*)(const int32_t* acc, float as, const float* ws, const float* bias,
                           void* out_row, DType od, int cnt);

void w8a8_epilogue_scalar(const int32_t* acc, float as, const float* ws, const float* bias,
                          void* out_row, DType od, int cnt) {
  for (int j = 0; j < cnt; ++j) store1(out_row, od, j, w8a8_value(acc[j], as, ws[j], bias, j));
}

#if defined(SENTINEL_X86_64)

// 16 columns from int32 sums (lanes outside k unused).
SK_TARGET_AVX512 inline void w8a8_epi16_avx512(__m512i acc, float as, const float* ws,
                                               const float* bias, void* out_row, DType od,
                                               int64_t idx, __mmask16 k) {
  __m512 v = materialize(_mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(as)));
  v = materialize(_mm512_mul_ps(v, _mm512_maskz_loadu_ps(k, ws)));
  if (bias != nullptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, bias));
  store16_masked(out_row, od, idx, v, k);
}

SK_TARGET_AVX512 void w8a8_epilogue_avx512(const int32_t* acc, float as, const float* ws,
                                           const float* bias, void* out_row, DType od, int cnt) {
  for (int j = 0; j < cnt; j += 16) {
    const __mmask16 k = tail_mask16(cnt - j);
    w8a8_epi16_avx512(_mm512_maskz_loadu_epi32(k, acc + j), as, ws + j,
                      bias != nullptr ? bias + j : nullptr, out_row, od, j, k);
  }
}

SK_TARGET_AVX2 void w8a8_epilogue_avx2(const int32_t* acc, float as, const float* ws,
                                       const float* bias, void* out_row, DType od, int cnt) {
  int j = 0;
  for (; j + 8 <= cnt; j += 8) {
    __m256 v = materialize(_mm256_mul_ps(
        _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + j))),
        _mm256_set1_ps(as)));
    v = materialize(_mm256_mul_ps(v, _mm256_loadu_ps(ws + j)));
    if (bias != nullptr) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + j));
    store8_out(out_row, od, j, v, 8);
  }
  for (; j < cnt; ++j) store1(out_row, od, j, w8a8_value(acc[j], as, ws[j], bias, j));
}

#endif  // SENTINEL_X86_64

// ---- dot-product kernels (small M): one weight row at a time, exact int32 ----------

// res[i * kGemvCols + r] = sum_k q[i][k] * w_r[k] for r < nrows, w_r = w + r * w_stride.
// qa: int8 [rows][qs] (VNNI, scalar) or int16 [rows][qs] (madd paths), zero padded to qs.
using W8A8DotFn = void (*)(const void* qa, int64_t qs, const int8_t* w, int64_t w_stride,
                           int nrows, int64_t K, const int32_t* qsum, int32_t* res);

template <int MR>
void w8a8_dot_scalar(const void* qa, int64_t qs, const int8_t* w0, int64_t w_stride, int nrows,
                     int64_t K, const int32_t* /*qsum*/, int32_t* res) {
  const int8_t* q = static_cast<const int8_t*>(qa);
  for (int r = 0; r < nrows; ++r) {
    const int8_t* w = w0 + r * w_stride;
    for (int i = 0; i < MR; ++i) {
      int32_t acc = 0;  // |acc| <= K * 127 * 128 < 2^31
      for (int64_t k = 0; k < K; ++k) acc += static_cast<int32_t>(q[i * qs + k]) * w[k];
      res[i * kGemvCols + r] = acc;
    }
  }
}

#if defined(SENTINEL_X86_64)

template <int MR>
SK_TARGET_VNNI void w8a8_dot_vnni(const void* qa, int64_t qs, const int8_t* w0, int64_t w_stride,
                                  int nrows, int64_t K, const int32_t* qsum, int32_t* res) {
  constexpr int U = MR <= 2 ? 2 : 1;  // 64-byte steps per iteration
  const int8_t* q = static_cast<const int8_t*>(qa);
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int r = 0; r < nrows; ++r) {
    const int8_t* w = w0 + r * w_stride;
    __m512i acc[MR][U];
    for (int i = 0; i < MR; ++i)
      for (int u = 0; u < U; ++u) acc[i][u] = _mm512_setzero_si512();
    int64_t k = 0;
    const int64_t e = (K / (64 * U)) * (64 * U);
    for (; k < e; k += 64 * U) {
      for (int u = 0; u < U; ++u) {
        _mm_prefetch(reinterpret_cast<const char*>(w + k + 64 * u + kPrefetchBytes), _MM_HINT_T0);
      }
      for (int u = 0; u < U; ++u) {
        const __m512i wv = _mm512_xor_si512(_mm512_loadu_si512(w + k + 64 * u), flip);
        for (int i = 0; i < MR; ++i) {
          acc[i][u] =
              _mm512_dpbusd_epi32(acc[i][u], wv, _mm512_loadu_si512(q + i * qs + k + 64 * u));
        }
      }
    }
    for (; k < K; k += 64) {
      // Masked-off weight bytes read as 0 (128 after the flip) and meet q == 0 (padding).
      const int64_t cnt = K - k;
      const __m512i wb =
          cnt >= 64 ? _mm512_loadu_si512(w + k)
                    : _mm512_maskz_loadu_epi8(static_cast<__mmask64>((uint64_t{1} << cnt) - 1u),
                                              w + k);
      const __m512i wv = _mm512_xor_si512(wb, flip);
      for (int i = 0; i < MR; ++i)
        acc[i][0] = _mm512_dpbusd_epi32(acc[i][0], wv, _mm512_loadu_si512(q + i * qs + k));
    }
    for (int i = 0; i < MR; ++i) {
      __m512i t = acc[i][0];
      for (int u = 1; u < U; ++u) t = _mm512_add_epi32(t, acc[i][u]);
      const uint32_t sum = static_cast<uint32_t>(_mm512_reduce_add_epi32(t));
      res[i * kGemvCols + r] =
          static_cast<int32_t>(sum - 128u * static_cast<uint32_t>(qsum[i]));  // mod 2^32
    }
  }
}

template <int MR>
SK_TARGET_AVX512 void w8a8_dot_avx512(const void* qa, int64_t qs, const int8_t* w0,
                                      int64_t w_stride, int nrows, int64_t K,
                                      const int32_t* /*qsum*/, int32_t* res) {
  constexpr int U = MR <= 2 ? 4 : 2;  // 32-byte steps per iteration
  const int16_t* q = static_cast<const int16_t*>(qa);
  for (int r = 0; r < nrows; ++r) {
    const int8_t* w = w0 + r * w_stride;
    __m512i acc[MR][U];
    for (int i = 0; i < MR; ++i)
      for (int u = 0; u < U; ++u) acc[i][u] = _mm512_setzero_si512();
    int64_t k = 0;
    const int64_t e = (K / (32 * U)) * (32 * U);
    for (; k < e; k += 32 * U) {
      for (int u = 0; u < U; u += 2) {
        _mm_prefetch(reinterpret_cast<const char*>(w + k + 32 * u + kPrefetchBytes), _MM_HINT_T0);
      }
      for (int u = 0; u < U; ++u) {
        const __m512i wv = _mm512_cvtepi8_epi16(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k + 32 * u)));
        for (int i = 0; i < MR; ++i) {
          acc[i][u] = _mm512_add_epi32(
              acc[i][u], _mm512_madd_epi16(_mm512_loadu_si512(q + i * qs + k + 32 * u), wv));
        }
      }
    }
    for (; k < K; k += 32) {
      const int64_t cnt = K - k;
      const __m256i b =
          cnt >= 32 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k))
                    : _mm512_castsi512_si256(_mm512_maskz_loadu_epi8(
                          static_cast<__mmask64>((uint64_t{1} << cnt) - 1u), w + k));
      const __m512i wv = _mm512_cvtepi8_epi16(b);
      for (int i = 0; i < MR; ++i) {
        acc[i][0] =
            _mm512_add_epi32(acc[i][0], _mm512_madd_epi16(_mm512_loadu_si512(q + i * qs + k), wv));
      }
    }
    for (int i = 0; i < MR; ++i) {
      __m512i t = acc[i][0];
      for (int u = 1; u < U; ++u) t = _mm512_add_epi32(t, acc[i][u]);
      res[i * kGemvCols + r] = _mm512_reduce_add_epi32(t);
    }
  }
}

template <int MR>
SK_TARGET_AVX2 void w8a8_dot_avx2(const void* qa, int64_t qs, const int8_t* w0, int64_t w_stride,
                                  int nrows, int64_t K, const int32_t* /*qsum*/, int32_t* res) {
  constexpr int U = MR <= 2 ? 4 : 2;  // 16-byte steps per iteration
  const int16_t* q = static_cast<const int16_t*>(qa);
  for (int r = 0; r < nrows; ++r) {
    const int8_t* w = w0 + r * w_stride;
    __m256i acc[MR][U];
    for (int i = 0; i < MR; ++i)
      for (int u = 0; u < U; ++u) acc[i][u] = _mm256_setzero_si256();
    int64_t k = 0;
    const int64_t e = (K / (16 * U)) * (16 * U);
    for (; k < e; k += 16 * U) {
      _mm_prefetch(reinterpret_cast<const char*>(w + k + kPrefetchBytes), _MM_HINT_T0);
      for (int u = 0; u < U; ++u) {
        const __m256i wv = _mm256_cvtepi8_epi16(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k + 16 * u)));
        for (int i = 0; i < MR; ++i) {
          acc[i][u] = _mm256_add_epi32(
              acc[i][u],
              _mm256_madd_epi16(
                  _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i * qs + k + 16 * u)),
                  wv));
        }
      }
    }
    for (; k < K; k += 16) {
      alignas(16) int8_t t[16] = {};
      std::memcpy(t, w + k, static_cast<size_t>(std::min<int64_t>(16, K - k)));
      const __m256i wv = _mm256_cvtepi8_epi16(_mm_load_si128(reinterpret_cast<const __m128i*>(t)));
      for (int i = 0; i < MR; ++i) {
        acc[i][0] = _mm256_add_epi32(
            acc[i][0],
            _mm256_madd_epi16(
                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i * qs + k)), wv));
      }
    }
    for (int i = 0; i < MR; ++i) {
      __m256i t = acc[i][0];
      for (int u = 1; u < U; ++u) t = _mm256_add_epi32(t, acc[i][u]);
      res[i * kGemvCols + r] = hsum8_epi32(t);
    }
  }
}

// ---- VNNI GEMM: weight panels in VNNI layout, broadcast activation quads -----------

// panel[t * 32 + j] = bytes w[n0+j][4t .. 4t+3] ^ 0x80 (zero bytes past K / rows past nv,
// i.e. 0x80 after the flip), for t < kq / 4.
SK_TARGET_VNNI void pack_w8a8_panel_vnni(const W8A8Problem& p, int64_t n0, int nv,
                                         int32_t* panel) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const int64_t K = p.K;
  for (int64_t k0 = 0; k0 < p.kq; k0 += 64) {
    const int64_t cnt = std::min<int64_t>(64, K - k0);
    const __mmask64 mk =
        cnt >= 64 ? ~__mmask64{0}
                  : (cnt <= 0 ? __mmask64{0} : static_cast<__mmask64>((uint64_t{1} << cnt) - 1u));
    int32_t* dst = panel + (k0 / 4) * 32;
    for (int h = 0; h < 2; ++h) {
      __m512 r[16];
      for (int j = 0; j < 16; ++j) {
        const int row = 16 * h + j;
        __m512i v = _mm512_setzero_si512();
        if (row < nv && cnt > 0) {
          const int8_t* wp = p.w + (n0 + row) * p.w_stride + k0;
          v = cnt >= 64 ? _mm512_loadu_si512(wp) : _mm512_maskz_loadu_epi8(mk, wp);
        }
        r[j] = _mm512_castsi512_ps(v);
      }
      transpose16x16(r);
      for (int t = 0; t < 16; ++t) {
        _mm512_store_si512(dst + t * 32 + 16 * h,
                           _mm512_xor_si512(_mm512_castps_si512(r[t]), flip));
      }
    }
  }
}

// ap[t * MR + i] = quad t of activation row i; one MR x 32 tile over all quads + epilogue.
template <int MR>
SK_TARGET_VNNI void w8a8_gemm_vnni(const int32_t* ap, const int32_t* panel, int64_t nq,
                                   const float* as, const int32_t* qsum, const float* ws,
                                   const float* bias, void* out, DType od, int64_t out_stride,
                                   int nv) {
  __m512i c0[MR], c1[MR];
  for (int i = 0; i < MR; ++i) c0[i] = c1[i] = _mm512_setzero_si512();
  for (int64_t t = 0; t < nq; ++t) {
    const __m512i b0 = _mm512_load_si512(panel + t * 32);
    const __m512i b1 = _mm512_load_si512(panel + t * 32 + 16);
    const int32_t* a = ap + t * MR;
    for (int i = 0; i < MR; ++i) {
      const __m512i av = _mm512_set1_epi32(a[i]);
      c0[i] = _mm512_dpbusd_epi32(c0[i], b0, av);
      c1[i] = _mm512_dpbusd_epi32(c1[i], b1, av);
    }
  }
  const __mmask16 m0 = tail_mask16(nv), m1 = tail_mask16(nv - 16);
  for (int i = 0; i < MR; ++i) {
    const __m512i comp =
        _mm512_set1_epi32(static_cast<int32_t>(128u * static_cast<uint32_t>(qsum[i])));
    w8a8_epi16_avx512(_mm512_sub_epi32(c0[i], comp), as[i], ws, bias, out, od, i * out_stride, m0);
    if (m1 != 0) {
      w8a8_epi16_avx512(_mm512_sub_epi32(c1[i], comp), as[i], ws + 16,
                        bias != nullptr ? bias + 16 : nullptr, out, od, i * out_stride + 16, m1);
    }
  }
}

using W8A8GemmFn = decltype(&w8a8_gemm_vnni<1>);

#endif  // SENTINEL_X86_64

struct W8A8DotKernels {
  W8A8DotFn fn[kGemvMR + 1] = {};  // fn[mr], mr = 1 .. kGemvMR
  bool int16_acts = false;         // the madd kernels take int16 activations
  W8A8EpiFn epilogue = &w8a8_epilogue_scalar;
};

W8A8DotKernels w8a8_dot_kernels(SimdLevel level) {
  W8A8DotKernels k;
#if defined(SENTINEL_X86_64)
  if (level >= SimdLevel::kAvx512Vnni) {
    k.epilogue = &w8a8_epilogue_avx512;
    k.fn[1] = &w8a8_dot_vnni<1>, k.fn[2] = &w8a8_dot_vnni<2>;
    k.fn[3] = &w8a8_dot_vnni<3>, k.fn[4] = &w8a8_dot_vnni<4>;
    return k;
  }
  if (level >= SimdLevel::kAvx512) {
    k.epilogue = &w8a8_epilogue_avx512;
    k.int16_acts = true;
    k.fn[1] = &w8a8_dot_avx512<1>, k.fn[2] = &w8a8_dot_avx512<2>;
    k.fn[3] = &w8a8_dot_avx512<3>, k.fn[4] = &w8a8_dot_avx512<4>;
    return k;
  }
  if (level >= SimdLevel::kAvx2) {
    k.epilogue = &w8a8_epilogue_avx2;
    k.int16_acts = true;
    k.fn[1] = &w8a8_dot_avx2<1>, k.fn[2] = &w8a8_dot_avx2<2>;
    k.fn[3] = &w8a8_dot_avx2<3>, k.fn[4] = &w8a8_dot_avx2<4>;
    return k;
  }
#else
  (void)level;
#endif
  k.fn[1] = &w8a8_dot_scalar<1>, k.fn[2] = &w8a8_dot_scalar<2>;
  k.fn[3] = &w8a8_dot_scalar<3>, k.fn[4] = &w8a8_dot_scalar<4>;
  return k;
}

void w8a8_dot(const W8A8Problem& p, const W8A8DotKernels& kern, const void* qa) {
  const int64_t es = element_size(p.out_dtype);
  const int64_t qelem = kern.int16_acts ? 2 : 1;
  parallel_for(
      p.N, p.num_threads,
      [&](int64_t c0, int64_t c1) {
        alignas(64) int32_t res[kGemvMR * kGemvCols];
        for (int64_t nb = c0; nb < c1; nb += kGemvCols) {
          const int nc = static_cast<int>(std::min<int64_t>(kGemvCols, c1 - nb));
          for (int64_t m0 = 0; m0 < p.M; m0 += kGemvMR) {
            const int mr = static_cast<int>(std::min<int64_t>(kGemvMR, p.M - m0));
            kern.fn[mr](static_cast<const char*>(qa) + m0 * p.kq * qelem, p.kq,
                        p.w + nb * p.w_stride, p.w_stride, nc, p.K, p.qsum + m0, res);
            for (int i = 0; i < mr; ++i) {
              void* orow = static_cast<char*>(p.out) + ((m0 + i) * p.out_stride + nb) * es;
              kern.epilogue(res + i * kGemvCols, p.a_scale[m0 + i], p.w_scale + nb,
                            p.bias != nullptr ? p.bias + nb : nullptr, orow, p.out_dtype, nc);
            }
          }
        }
      },
      grain_for(p.M * p.K, kNsPerMacW8A8Dot));
}

#if defined(SENTINEL_X86_64)

constexpr int kVnniMR = 12;

W8A8GemmFn vnni_gemm_fn(int mr) {
  static const W8A8GemmFn table[kVnniMR + 1] = {
      nullptr,           &w8a8_gemm_vnni<1>,  &w8a8_gemm_vnni<2>,  &w8a8_gemm_vnni<3>,
      &w8a8_gemm_vnni<4>, &w8a8_gemm_vnni<5>,  &w8a8_gemm_vnni<6>,  &w8a8_gemm_vnni<7>,
      &w8a8_gemm_vnni<8>, &w8a8_gemm_vnni<9>,  &w8a8_gemm_vnni<10>, &w8a8_gemm_vnni<11>,
      &w8a8_gemm_vnni<12>};
  return table[mr];
}

void w8a8_gemm_vnni_driver(const W8A8Problem& p) {
  const int64_t M = p.M;
  const int64_t nq = p.kq / 4;
  constexpr int mr = kVnniMR;
  // Activation quads per tile: tile rows m0.. at ap + m0 * nq, layout [t][r].
  Buffer<int32_t> ap(M * nq);
  for (int64_t m0 = 0; m0 < M; m0 += mr) {
    const int r = static_cast<int>(std::min<int64_t>(mr, M - m0));
    int32_t* dst = ap.get() + m0 * nq;
    for (int i = 0; i < r; ++i) {
      const int8_t* src = p.q + (m0 + i) * p.kq;
      for (int64_t t = 0; t < nq; ++t) std::memcpy(dst + t * r + i, src + 4 * t, 4);
    }
  }
  const int64_t npanels = (p.N + 31) / 32;
  const int64_t es = element_size(p.out_dtype);
  const int64_t nq_used = (p.K + 3) / 4;
  parallel_for(
      npanels, p.num_threads,
      [&](int64_t q0, int64_t q1) {
        Buffer<int32_t> panel(nq * 32);
        for (int64_t q = q0; q < q1; ++q) {
          const int64_t n0 = q * 32;
          const int nv = static_cast<int>(std::min<int64_t>(32, p.N - n0));
          pack_w8a8_panel_vnni(p, n0, nv, panel.get());
          // Columns past nv are never stored; their w_scale / bias lanes are masked off.
          for (int64_t m0 = 0; m0 < M; m0 += mr) {
            const int r = static_cast<int>(std::min<int64_t>(mr, M - m0));
            // The quads are laid out with stride r in the last (partial) tile.
            vnni_gemm_fn(r)(ap.get() + m0 * nq, panel.get(), nq_used, p.a_scale + m0,
                            p.qsum + m0, p.w_scale + n0, p.bias != nullptr ? p.bias + n0 : nullptr,
                            static_cast<char*>(p.out) + (m0 * p.out_stride + n0) * es,
                            p.out_dtype, p.out_stride, nv);
          }
        }
      },
      grain_for(M * p.K * 32, kNsPerMacW8A8Gemm));
}

#endif  // SENTINEL_X86_64

// Smallest M that takes the VNNI GEMM kernel (measured: the row-wise VNNI dot kernel is
// faster up to M = 4, the two are even for M = 6 .. 12, the GEMM wins from M = 16).
constexpr int64_t kW8A8GemmMinM = 8;

void w8a8_compute(const W8A8Problem& p, SimdLevel level) {
#if defined(SENTINEL_X86_64)
  if (level >= SimdLevel::kAvx512Vnni && p.M >= kW8A8GemmMinM) {
    w8a8_gemm_vnni_driver(p);
    return;
  }
#endif
  const W8A8DotKernels kern = w8a8_dot_kernels(level);
  if (!kern.int16_acts) {
    w8a8_dot(p, kern, p.q);
    return;
  }
  Buffer<int16_t> q16(p.M * p.kq);
  for (int64_t i = 0; i < p.M * p.kq; ++i) q16.get()[i] = p.q[i];
  w8a8_dot(p, kern, q16.get());
}

// ===========================================================================
// Argument checks
// ===========================================================================

void check_at_least(const char* fn, const char* name, int64_t v, int64_t lo,
                    const std::string& what) {
  if (v < lo) {
    bad_arg(fn, std::string(name) + " must be >= " + what + ", got " + std::to_string(v));
  }
}

void check_common(const char* fn, int64_t M, int64_t K, int64_t x_stride_row, int64_t N,
                  int64_t w_stride_row, int64_t out_stride_row, int num_threads) {
  check_at_least(fn, "M", M, 0, "0");
  check_at_least(fn, "K", K, 1, "1");
  check_at_least(fn, "N", N, 1, "1");
  check_at_least(fn, "x_stride_row", x_stride_row, K, "K (" + std::to_string(K) + ")");
  check_at_least(fn, "w_stride_row", w_stride_row, K, "K (" + std::to_string(K) + ")");
  check_at_least(fn, "out_stride_row", out_stride_row, N, "N (" + std::to_string(N) + ")");
  check_at_least(fn, "num_threads", num_threads, 1, "1");
}

// bias (any dtype) -> fp32 in storage; nullptr when there is no bias.
const float* bias_to_f32(const void* bias, DType d, int64_t N, SimdLevel level,
                         const Buffer<float>& storage) {
  if (bias == nullptr) return nullptr;
  to_f32(bias, d, N, storage.get(), level);
  return storage.get();
}

}  // namespace

void int8_linear_w8a16(const void* x, DType x_dtype, int64_t M, int64_t K, int64_t x_stride_row,
                       const int8_t* w, int64_t N, int64_t w_stride_row, const float* scale,
                       int64_t group_size, int64_t scale_stride_row, const void* bias,
                       DType bias_dtype, void* out, DType out_dtype, int64_t out_stride_row,
                       int num_threads) {
  const char* fn = "int8_linear_w8a16";
  check_common(fn, M, K, x_stride_row, N, w_stride_row, out_stride_row, num_threads);
  check_at_least(fn, "group_size", group_size, 0, "0");
  if (group_size == 0) {
    check_at_least(fn, "scale_stride_row", scale_stride_row, 1, "1");
  } else {
    const int64_t groups = (K + group_size - 1) / group_size;
    check_at_least(fn, "scale_stride_row", scale_stride_row, groups,
                   "the number of groups ceil(K / group_size) (" + std::to_string(groups) + ")");
  }
  if (M == 0) return;
  check_not_null(fn, "x_ptr", x);
  check_not_null(fn, "w_ptr", w);
  check_not_null(fn, "scale_ptr", scale);
  check_not_null(fn, "out_ptr", out);

  const SimdLevel level = active_simd_level();
  Buffer<float> bias_storage(bias != nullptr ? N : 1);
  const float* bias_f32 = bias_to_f32(bias, bias_dtype, N, level, bias_storage);
  W8A16Problem p{x,
                 x_dtype,
                 M,
                 K,
                 x_stride_row,
                 w,
                 N,
                 w_stride_row,
                 scale,
                 group_size,
                 scale_stride_row,
                 bias_f32,
                 out,
                 out_dtype,
                 out_stride_row,
                 num_threads};
  w8a16_impl(p, level);
}

void int8_linear_w8a8(const void* x, DType x_dtype, int64_t M, int64_t K, int64_t x_stride_row,
                      const float* smooth, const int8_t* w, int64_t N, int64_t w_stride_row,
                      const float* w_scale, const void* bias, DType bias_dtype, void* out,
                      DType out_dtype, int64_t out_stride_row, int num_threads) {
  const char* fn = "int8_linear_w8a8";
  check_common(fn, M, K, x_stride_row, N, w_stride_row, out_stride_row, num_threads);
  // |q| <= 127 and |w| <= 128: K * 127 * 128 must stay below 2^31.
  constexpr int64_t kMaxK = ((int64_t{1} << 31) - 1) / (127 * 128);  // 132104
  if (K > kMaxK) {
    bad_arg(fn, "K must be <= " + std::to_string(kMaxK) +
                    " (int32 accumulation), got " + std::to_string(K));
  }
  if (M == 0) return;
  check_not_null(fn, "x_ptr", x);
  check_not_null(fn, "w_ptr", w);
  check_not_null(fn, "w_scale_ptr", w_scale);
  check_not_null(fn, "out_ptr", out);

  const SimdLevel level = active_simd_level();
  const int64_t kq = round_up(K, 64);
  Buffer<int8_t> q(M * kq, /*zero=*/true);
  Buffer<float> a_scale(M);
  if (smooth != nullptr) {
    Buffer<float> xs(M * K);
    const int64_t es = element_size(x_dtype);
    parallel_for(
        M, num_threads,
        [&](int64_t m0, int64_t m1) {
          for (int64_t m = m0; m < m1; ++m) {
            float* row = xs.get() + m * K;
            to_f32(static_cast<const char*>(x) + m * x_stride_row * es, x_dtype, K, row, level);
            for (int64_t k = 0; k < K; ++k) row[k] = row[k] / smooth[k];
          }
        },
        grain_for(K, 1.0));  // ~1 ns per element (conversion and division)
    quantize_int8(xs.get(), DType::kFloat32, M, K, K, 1, q.get(), kq, a_scale.get(),
                  num_threads);
  } else {
    quantize_int8(x, x_dtype, M, K, x_stride_row, 1, q.get(), kq, a_scale.get(), num_threads);
  }
  Buffer<int32_t> qsum(M);
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* r = q.get() + m * kq;
    int32_t s = 0;
    for (int64_t k = 0; k < K; ++k) s += r[k];
    qsum.get()[m] = s;
  }
  Buffer<float> bias_storage(bias != nullptr ? N : 1);
  const float* bias_f32 = bias_to_f32(bias, bias_dtype, N, level, bias_storage);
  W8A8Problem p{M,
                K,
                q.get(),
                kq,
                a_scale.get(),
                qsum.get(),
                w,
                N,
                w_stride_row,
                w_scale,
                bias_f32,
                out,
                out_dtype,
                out_stride_row,
                num_threads};
  w8a8_compute(p, level);
}

}  // namespace sentinel
