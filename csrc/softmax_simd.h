// The CPU pieces both attention kernels share, attention.cpp (prefill) and
// decode_attention.cpp (decode over a compressed cache): the online-softmax constants
// and 2^x, the row-mode score / softmax / P.V kernels at every SIMD level, fp32 row
// conversions, per-thread scratch, and the work items of the drivers with the split of a
// key range and the log-sum-exp merge of its parts.
//
// Scores are in base 2 (log2(e) folded into the query scale), so the softmax needs 2^x
// for x <= 0, evaluated as 2^n * p(f), n = round(x), f = x - n in [-1/2, 1/2], p a
// degree-6 polynomial fitted (weighted least squares on Chebyshev nodes) to 2^f with
// relative error 1.9e-9 in exact arithmetic and 1.0e-7 (under 2 ulp) when evaluated in
// fp32 with FMA, checked on 2 million points: the same order as the fp32 rounding of the
// score itself (a score of magnitude 20 carries an absolute error of ~1e-6, i.e. a
// relative error of ~1e-6 in its exponential), so the approximation adds nothing visible
// to the fp32 error. x < -125 gives exactly 0 (such a term is below 2^-125 relative to
// the row's largest term and cannot change an fp32 sum); that also maps masked keys
// (score -inf) to exact zeros.
//
// Row mode keeps R query rows in memory order, s[r * sst + j]: scores by 8 (16) keys at a
// time, each a D-long dot product accumulated in its own vector and the 8 (16) vectors
// folded into one vector of scores by a transposing add tree; the softmax runs along a
// row; P.V accumulates broadcast(p) x V-row vectors into register tiles of up to 4 rows x
// 4 vectors. Every function here is inline; those for AVX2 / AVX-512 carry the
// SK_TARGET_* attribute of simd.h (the pieces of softmax_lanes.h, written once for both
// widths, the target of their namespace rows_avx2 / rows_avx512) and are only called
// after active_simd_level() allows it.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <vector>

#include "args.h"
#include "cpu_features.h"
#include "dtype_access.h"
#include "simd.h"
#include "thread_pool.h"

namespace sentinel {

inline constexpr float kNegInf = -std::numeric_limits<float>::infinity();
inline constexpr double kLog2e = 1.44269504088896340736;
// 2^x is taken as exactly 0 below this (see above).
inline constexpr float kExpFloor = -125.0f;
// 2^f ~ sum_i kExp2C[i] f^i on [-1/2, 1/2].
inline constexpr float kExp2C0 = 1.0f;
inline constexpr float kExp2C1 = 6.931471825e-01f;
inline constexpr float kExp2C2 = 2.402264625e-01f;
inline constexpr float kExp2C3 = 5.550328642e-02f;
inline constexpr float kExp2C4 = 9.618488140e-03f;
inline constexpr float kExp2C5 = 1.339993323e-03f;
inline constexpr float kExp2C6 = 1.534603944e-04f;

inline constexpr int64_t kMaxHeadDim = 256;
inline constexpr int64_t kRowTarget = 64;      // query rows per work item
inline constexpr int64_t kMinSplitKeys = 256;  // keys per part when an item's key range is split
// Row-mode score rows are padded to a multiple of this many keys (see qk_rows_*).
inline constexpr int64_t kKeyPad = 16;
// Cost model of the threading decision: ns per (row x key x head dim) of an item's cost
// and the least work worth a hand-off to the pool (see int8_matmul.cpp for its cost).
inline constexpr double kNsPerRowKeyDim = 0.03;
inline constexpr double kMinParallelNs = 3000.0;

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// ===========================================================================
// Per-thread scratch
// ===========================================================================

// 64-byte aligned floats that survive between calls (pool workers are persistent), so a
// decode step does not pay for allocations. Grows, never shrinks.
class Arena {
 public:
  Arena() = default;
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;
  ~Arena() { std::free(p_); }
  float* get(size_t floats) {
    if (floats > cap_) {
      std::free(p_);
      p_ = nullptr;
      cap_ = 0;
      const size_t bytes = (floats * sizeof(float) + 63) / 64 * 64;
      p_ = static_cast<float*>(std::aligned_alloc(64, bytes));
      if (p_ == nullptr) throw std::bad_alloc();
      cap_ = bytes / sizeof(float);
    }
    return p_;
  }

 private:
  float* p_ = nullptr;
  size_t cap_ = 0;
};

// At least `floats` floats of this thread's arena (contents undefined).
inline float* thread_scratch(size_t floats) {
  thread_local Arena arena;
  return arena.get(floats);
}

// ===========================================================================
// 2^x (exact 0 below kExpFloor)
// ===========================================================================

inline float exp2_scalar(float x) { return x < kExpFloor ? 0.0f : std::exp2(x); }

#if defined(SENTINEL_X86_64)

namespace rows_avx2 {
using V = VecAvx2;
SK_BEGIN_TARGET_AVX2
#include "softmax_lanes.h"
SK_END_TARGET
}  // namespace rows_avx2

namespace rows_avx512 {
using V = VecAvx512;
SK_BEGIN_TARGET_AVX512
#include "softmax_lanes.h"
SK_END_TARGET
}  // namespace rows_avx512

SK_TARGET_AVX2 inline __m256 exp2_avx2(__m256 x) {
  const __m256 floor = _mm256_set1_ps(kExpFloor);
  const __m256 keep = _mm256_cmp_ps(x, floor, _CMP_GE_OQ);
  x = _mm256_max_ps(x, floor);
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 p = rows_avx2::exp2_poly(_mm256_sub_ps(x, n));
  // n >= -125, p in [0.7, 1.5): adding n to the exponent field stays a normal number.
  const __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
  const __m256 r = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
  return _mm256_and_ps(r, keep);
}

SK_TARGET_AVX512 inline __m512 exp2_avx512(__m512 x) {
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kExpFloor), _CMP_GE_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(kExpFloor));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_maskz_scalef_ps(keep, rows_avx512::exp2_poly(_mm512_sub_ps(x, n)), n);
}

// exp2_avx2 / exp2_avx512 by vector type (for kernels written once for both widths).
SK_TARGET_AVX2 inline __m256 exp2_vec(__m256 x) { return exp2_avx2(x); }
SK_TARGET_AVX512 inline __m512 exp2_vec(__m512 x) { return exp2_avx512(x); }

#endif  // SENTINEL_X86_64

// ===========================================================================
// Row-mode kernels: rows in memory order, lanes over keys / head dims
// ===========================================================================

// Visibility of the keys j0 + j of one block for row r: lo[r] <= j0 + j < hi[r] and
// km[j] != 0 (km == nullptr: no key mask).
struct RowMask {
  const int32_t* lo;
  const int32_t* hi;
  int32_t j0;
  const int8_t* km;
};

// s[r * sst + j] = sum_d q[r * dp + d] * k[j * ks + d] (r < R, j < nj; q zero-padded to
// dp, a multiple of 16); the columns [nj, round_up(nj, kKeyPad)) of s are set to -inf.
using QkRowsFn = void (*)(const float* q, int64_t R, int64_t dp, const float* k, int64_t ks,
                          int64_t nj, int64_t D, float* s, int64_t sst);
// Online-softmax step per row: hidden keys -> -inf, m_new = max(m, max_j s),
// alpha = 2^(m - m_new), s <- 2^(s - m_new), l <- l * alpha + sum_j s, m <- m_new
// (rows with m_new = -inf keep l = 0). The AVX2 kernel reads whole vectors: the columns
// up to round_up(nj, kKeyPad) (the -inf padding of qk_rows) and as many entries of km
// (zero-padded by the caller); the others read [0, nj).
using SoftmaxRowsFn = void (*)(float* s, int64_t sst, int64_t R, int64_t nj, const RowMask* rm,
                               float* m, float* l, float* alpha);
// o[r * dp + d] = o[r * dp + d] * alpha[r] + sum_j p[r * sst + j] * v[j * vs + d], d < D
// (o 64-byte aligned, dp a multiple of 16).
using PvRowsFn = void (*)(const float* p, int64_t sst, int64_t R, const float* v, int64_t vs,
                          int64_t nj, int64_t D, float* o, int64_t dp, const float* alpha);
// n contiguous elements of dtype -> fp32, and back (round to nearest even).
using LoadRowFn = void (*)(const char* src, DType d, int64_t n, float* dst);
using StoreRowFn = void (*)(const float* src, int64_t n, char* dst, DType d);

// ---- scalar ----------------------------------------------------------------------

inline void qk_rows_scalar(const float* q, int64_t R, int64_t dp, const float* k, int64_t ks,
                           int64_t nj, int64_t D, float* s, int64_t sst) {
  const int64_t njp = round_up(nj, kKeyPad);
  for (int64_t r = 0; r < R; ++r) {
    const float* qr = q + r * dp;
    float* sr = s + r * sst;
    for (int64_t j = 0; j < nj; ++j) {
      const float* kj = k + j * ks;
      float acc = 0.0f;
      for (int64_t d = 0; d < D; ++d) acc += qr[d] * kj[d];
      sr[j] = acc;
    }
    for (int64_t j = nj; j < njp; ++j) sr[j] = kNegInf;
  }
}

inline bool row_sees(const RowMask* rm, int64_t r, int64_t j) {
  const int64_t key = rm->j0 + j;
  return key >= rm->lo[r] && key < rm->hi[r] && (rm->km == nullptr || rm->km[j] != 0);
}

inline void softmax_rows_scalar(float* s, int64_t sst, int64_t R, int64_t nj, const RowMask* rm,
                                float* m, float* l, float* alpha) {
  for (int64_t r = 0; r < R; ++r) {
    float* sr = s + r * sst;
    float mx = kNegInf;
    for (int64_t j = 0; j < nj; ++j) {
      if (rm != nullptr && !row_sees(rm, r, j)) sr[j] = kNegInf;
      mx = std::max(mx, sr[j]);
    }
    const float m_new = std::max(m[r], mx);
    const float m_use = m_new == kNegInf ? 0.0f : m_new;
    const float a = exp2_scalar(m[r] - m_use);
    float sum = 0.0f;
    for (int64_t j = 0; j < nj; ++j) {
      sr[j] = exp2_scalar(sr[j] - m_use);
      sum += sr[j];
    }
    l[r] = l[r] * a + sum;
    m[r] = m_new;
    alpha[r] = a;
  }
}

inline void pv_rows_scalar(const float* p, int64_t sst, int64_t R, const float* v, int64_t vs,
                           int64_t nj, int64_t D, float* o, int64_t dp, const float* alpha) {
  for (int64_t r = 0; r < R; ++r) {
    float* orow = o + r * dp;
    const float* pr = p + r * sst;
    for (int64_t d = 0; d < D; ++d) orow[d] *= alpha[r];
    for (int64_t j = 0; j < nj; ++j) {
      const float pj = pr[j];
      const float* vj = v + j * vs;
      for (int64_t d = 0; d < D; ++d) orow[d] += pj * vj[d];
    }
  }
}

inline void load_row_scalar(const char* src, DType d, int64_t n, float* dst) {
  if (d == DType::kFloat32) {
    std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
    return;
  }
  for (int64_t i = 0; i < n; ++i) dst[i] = load1(src, d, i);
}

inline void store_row_scalar(const float* src, int64_t n, char* dst, DType d) {
  if (d == DType::kFloat32) {
    std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
    return;
  }
  for (int64_t i = 0; i < n; ++i) store1(dst, d, i, src[i]);
}

#if defined(SENTINEL_X86_64)

// ---- AVX2 + FMA + F16C (8 lanes) --------------------------------------------------

// Lane t of the result = the sum of the lanes of a[t].
SK_TARGET_AVX2 __attribute__((always_inline)) inline __m256 reduce8_avx2(const __m256* a) {
  const __m256 s01 = _mm256_hadd_ps(a[0], a[1]);
  const __m256 s23 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 s45 = _mm256_hadd_ps(a[4], a[5]);
  const __m256 s67 = _mm256_hadd_ps(a[6], a[7]);
  // Per 128-bit half: [a0, a1, a2, a3] (resp. a4..a7) partial sums of that half.
  const __m256 s0123 = _mm256_hadd_ps(s01, s23);
  const __m256 s4567 = _mm256_hadd_ps(s45, s67);
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20),
                       _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

// Scores of one query row for 8 keys (kFull: all 8 exist, else the first nk): one
// accumulator per key along D, folded by one transposing reduction.
template <bool kFull>
SK_TARGET_AVX2 __attribute__((always_inline)) inline __m256 qk_row8_avx2(
    const float* q, const float* kb, int64_t ks, int64_t nfull, int64_t D, __m256i tmask,
    int64_t nk) {
  __m256 acc[8];
#pragma GCC unroll 8
  for (int t = 0; t < 8; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t dv = 0; dv < nfull; ++dv) {
    const __m256 qv = _mm256_load_ps(q + 8 * dv);
    const float* kd = kb + 8 * dv;
#pragma GCC unroll 8
    for (int t = 0; t < 8; ++t) {
      if (kFull || t < nk) acc[t] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kd + t * ks), acc[t]);
    }
  }
  if (8 * nfull < D) {  // the last D % 8 channels (q is zero-padded, k is not read past D)
    const __m256 qv = _mm256_load_ps(q + 8 * nfull);
    const float* kd = kb + 8 * nfull;
#pragma GCC unroll 8
    for (int t = 0; t < 8; ++t) {
      if (kFull || t < nk) {
        acc[t] = _mm256_fmadd_ps(qv, _mm256_maskload_ps(kd + t * ks, tmask), acc[t]);
      }
    }
  }
  return reduce8_avx2(acc);
}

SK_TARGET_AVX2 inline void qk_rows_avx2(const float* q, int64_t R, int64_t dp, const float* k,
                                        int64_t ks, int64_t nj, int64_t D, float* s,
                                        int64_t sst) {
  const int64_t nfull = D / 8;
  const __m256i tmask = lane_mask8(D % 8);
  const __m256 neg_inf = _mm256_set1_ps(kNegInf);
  for (int64_t j0 = 0; j0 < nj; j0 += 8) {
    const int64_t nk = std::min<int64_t>(8, nj - j0);
    const float* kb = k + j0 * ks;
    if (nk == 8) {
      for (int64_t r = 0; r < R; ++r) {
        _mm256_storeu_ps(s + r * sst + j0,
                         qk_row8_avx2<true>(q + r * dp, kb, ks, nfull, D, tmask, 8));
      }
    } else {
      const __m256i km = lane_mask8(nk);
      for (int64_t r = 0; r < R; ++r) {
        const __m256 res = qk_row8_avx2<false>(q + r * dp, kb, ks, nfull, D, tmask, nk);
        _mm256_storeu_ps(s + r * sst + j0,
                         _mm256_blendv_ps(neg_inf, res, _mm256_castsi256_ps(km)));
      }
    }
  }
  const int64_t j8 = round_up(nj, 8);
  if (j8 < round_up(nj, kKeyPad)) {
    for (int64_t r = 0; r < R; ++r) _mm256_storeu_ps(s + r * sst + j8, neg_inf);
  }
}

SK_TARGET_AVX2 inline void softmax_rows_avx2(float* s, int64_t sst, int64_t R, int64_t nj,
                                             const RowMask* rm, float* m, float* l,
                                             float* alpha) {
  const __m256 neg_inf = _mm256_set1_ps(kNegInf);
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const int64_t njp = round_up(nj, kKeyPad);
  for (int64_t r = 0; r < R; ++r) {
    float* sr = s + r * sst;
    __m256 mx = neg_inf;
    if (rm != nullptr) {
      const __m256i lo = _mm256_set1_epi32(rm->lo[r]);
      const __m256i hi = _mm256_set1_epi32(rm->hi[r]);
      for (int64_t j = 0; j < njp; j += 8) {
        const __m256i key =
            _mm256_add_epi32(iota, _mm256_set1_epi32(rm->j0 + static_cast<int32_t>(j)));
        // key >= lo and key < hi  <=>  !(lo > key) and (hi > key)
        __m256i vis =
            _mm256_andnot_si256(_mm256_cmpgt_epi32(lo, key), _mm256_cmpgt_epi32(hi, key));
        if (rm->km != nullptr) {
          const __m256i kmv = _mm256_cvtepi8_epi32(
              _mm_loadl_epi64(reinterpret_cast<const __m128i*>(rm->km + j)));
          vis = _mm256_andnot_si256(_mm256_cmpeq_epi32(kmv, _mm256_setzero_si256()), vis);
        }
        const __m256 x =
            _mm256_blendv_ps(neg_inf, _mm256_loadu_ps(sr + j), _mm256_castsi256_ps(vis));
        _mm256_storeu_ps(sr + j, x);
        mx = _mm256_max_ps(mx, x);
      }
    } else {
      for (int64_t j = 0; j < njp; j += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(sr + j));
    }
    const float m_new = std::max(m[r], hmax8(mx));
    const float m_use = m_new == kNegInf ? 0.0f : m_new;
    const float a = exp2_scalar(m[r] - m_use);
    const __m256 mu = _mm256_set1_ps(m_use);
    __m256 sum0 = _mm256_setzero_ps(), sum1 = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= njp; j += 16) {
      const __m256 p0 = exp2_avx2(_mm256_sub_ps(_mm256_loadu_ps(sr + j), mu));
      const __m256 p1 = exp2_avx2(_mm256_sub_ps(_mm256_loadu_ps(sr + j + 8), mu));
      _mm256_storeu_ps(sr + j, p0);
      _mm256_storeu_ps(sr + j + 8, p1);
      sum0 = _mm256_add_ps(sum0, p0);
      sum1 = _mm256_add_ps(sum1, p1);
    }
    if (j < njp) {
      const __m256 p0 = exp2_avx2(_mm256_sub_ps(_mm256_loadu_ps(sr + j), mu));
      _mm256_storeu_ps(sr + j, p0);
      sum0 = _mm256_add_ps(sum0, p0);
    }
    l[r] = l[r] * a + hsum8(_mm256_add_ps(sum0, sum1));
    m[r] = m_new;
    alpha[r] = a;
  }
}

using PvRowsTile8Fn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, __m256i,
                               float*, int64_t, const float*);

SK_TARGET_AVX2 inline void pv_rows_avx2(const float* p, int64_t sst, int64_t R, const float* v,
                                        int64_t vs, int64_t nj, int64_t D, float* o, int64_t dp,
                                        const float* alpha) {
#define SK_PV_ROW(nr, tail)                                                               \
  {&rows_avx2::pv_rows_tile<nr, 1, tail>, &rows_avx2::pv_rows_tile<nr, 2, tail>,          \
   &rows_avx2::pv_rows_tile<nr, 3, tail>, &rows_avx2::pv_rows_tile<nr, 4, tail>}
  static const PvRowsTile8Fn table[2][4][4] = {
      {SK_PV_ROW(1, false), SK_PV_ROW(2, false), SK_PV_ROW(3, false), SK_PV_ROW(4, false)},
      {SK_PV_ROW(1, true), SK_PV_ROW(2, true), SK_PV_ROW(3, true), SK_PV_ROW(4, true)}};
#undef SK_PV_ROW
  // Vectors per tile so that NR * NV accumulators + NV rows of V fit in 16 registers.
  static const int kMaxNv[4] = {4, 4, 3, 2};
  const int64_t nd = (D + 7) / 8;
  const __m256i tmask = lane_mask8(D % 8 == 0 ? 8 : D % 8);
  for (int64_t r0 = 0; r0 < R; r0 += 4) {
    const int nr = static_cast<int>(std::min<int64_t>(4, R - r0));
    for (int64_t c = 0; c < nd;) {
      const int nv = static_cast<int>(std::min<int64_t>(kMaxNv[nr - 1], nd - c));
      const bool tail = c + nv == nd && D % 8 != 0;
      table[tail][nr - 1][nv - 1](p + r0 * sst, sst, v + 8 * c, vs, nj, tmask,
                                  o + r0 * dp + 8 * c, dp, alpha + r0);
      c += nv;
    }
  }
}

SK_TARGET_AVX2 inline void load_row_avx2(const char* src, DType d, int64_t n, float* dst) {
  if (d == DType::kFloat32) {
    std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
    return;
  }
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
    const __m256 f = d == DType::kFloat16
                         ? _mm256_cvtph_ps(h)
                         : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    _mm256_storeu_ps(dst + i, f);
  }
  for (; i < n; ++i) dst[i] = load1(src, d, i);
}

SK_TARGET_AVX2 inline void store_row_avx2(const float* src, int64_t n, char* dst, DType d) {
  if (d == DType::kFloat32) {
    std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
    return;
  }
  uint16_t* o = reinterpret_cast<uint16_t*>(dst);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(src + i);
    __m128i h;
    if (d == DType::kFloat16) {
      h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {
      h = f32_to_bf16x8_avx2(v);
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + i), h);
  }
  for (; i < n; ++i) store1(dst, d, i, src[i]);
}

// ---- AVX-512 F + BW (16 lanes) ----------------------------------------------------

// Key t is accumulated in slot 4 (t % 4) + t / 4: the reduction tree below then yields
// the 16 sums in key order.
inline constexpr int kSlotKey[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};

// Lane t of the result = the sum of the lanes of a[slot(t)] (15 adds of shuffled pairs).
SK_TARGET_AVX512 __attribute__((always_inline)) inline __m512 reduce16_avx512(const __m512* a) {
  __m512 b[8];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
  __m512 c[4];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  }
  const __m512 e0 = _mm512_add_ps(_mm512_unpacklo_ps(c[0], c[1]), _mm512_unpackhi_ps(c[0], c[1]));
  const __m512 e1 = _mm512_add_ps(_mm512_unpacklo_ps(c[2], c[3]), _mm512_unpackhi_ps(c[2], c[3]));
  const __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(e0), _mm512_castps_pd(e1));
  const __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(e0), _mm512_castps_pd(e1));
  return _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
}

// Scores of one query row for 16 keys (kFull: all 16 exist, else the first nk). K rows
// are re-read from L1 for every query row.
template <bool kFull>
SK_TARGET_AVX512 __attribute__((always_inline)) inline __m512 qk_row16_avx512(
    const float* q, const float* kb, int64_t ks, int64_t nd, __mmask16 last, int64_t nk) {
  __m512 acc[16];
#pragma GCC unroll 16
  for (int slot = 0; slot < 16; ++slot) acc[slot] = _mm512_setzero_ps();
  for (int64_t dv = 0; dv < nd; ++dv) {
    const __m512 qv = _mm512_load_ps(q + 16 * dv);
    const __mmask16 dm = dv == nd - 1 ? last : static_cast<__mmask16>(0xFFFF);
    const float* kd = kb + 16 * dv;
#pragma GCC unroll 16
    for (int slot = 0; slot < 16; ++slot) {
      const int key = kSlotKey[slot];
      if (kFull || key < nk) {
        acc[slot] = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(dm, kd + key * ks), acc[slot]);
      }
    }
  }
  return reduce16_avx512(acc);
}

SK_TARGET_AVX512 inline void qk_rows_avx512(const float* q, int64_t R, int64_t dp,
                                            const float* k, int64_t ks, int64_t nj, int64_t D,
                                            float* s, int64_t sst) {
  const int64_t nd = (D + 15) / 16;
  const __mmask16 last = tail_mask16(D - 16 * (nd - 1));
  const __m512 neg_inf = _mm512_set1_ps(kNegInf);
  for (int64_t j0 = 0; j0 < nj; j0 += 16) {
    const int64_t nk = std::min<int64_t>(16, nj - j0);
    const float* kb = k + j0 * ks;
    for (int64_t r = 0; r < R; ++r) {
      if (nk == 16) {
        _mm512_storeu_ps(s + r * sst + j0,
                         qk_row16_avx512<true>(q + r * dp, kb, ks, nd, last, 16));
      } else {
        const __m512 res = qk_row16_avx512<false>(q + r * dp, kb, ks, nd, last, nk);
        _mm512_storeu_ps(s + r * sst + j0, _mm512_mask_blend_ps(tail_mask16(nk), neg_inf, res));
      }
    }
  }
}

SK_TARGET_AVX512 inline void softmax_rows_avx512(float* s, int64_t sst, int64_t R, int64_t nj,
                                                 const RowMask* rm, float* m, float* l,
                                                 float* alpha) {
  const __m512 neg_inf = _mm512_set1_ps(kNegInf);
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t r = 0; r < R; ++r) {
    float* sr = s + r * sst;
    __m512 mx = neg_inf;
    for (int64_t j = 0; j < nj; j += 16) {
      const __mmask16 k = tail_mask16(nj - j);
      __m512 x = _mm512_mask_loadu_ps(neg_inf, k, sr + j);
      if (rm != nullptr) {
        const __m512i key =
            _mm512_add_epi32(iota, _mm512_set1_epi32(rm->j0 + static_cast<int32_t>(j)));
        __mmask16 vis =
            _mm512_cmp_epi32_mask(key, _mm512_set1_epi32(rm->lo[r]), _MM_CMPINT_NLT) &
            _mm512_cmp_epi32_mask(key, _mm512_set1_epi32(rm->hi[r]), _MM_CMPINT_LT);
        if (rm->km != nullptr) {
          const __m512i kmv = _mm512_maskz_loadu_epi8(static_cast<__mmask64>(k), rm->km + j);
          vis &= static_cast<__mmask16>(_mm512_test_epi8_mask(kmv, kmv));
        }
        x = _mm512_mask_blend_ps(vis, neg_inf, x);
        _mm512_mask_storeu_ps(sr + j, k, x);
      }
      mx = _mm512_max_ps(mx, x);
    }
    const float m_new = std::max(m[r], _mm512_reduce_max_ps(mx));
    const float m_use = m_new == kNegInf ? 0.0f : m_new;
    const float a = exp2_scalar(m[r] - m_use);
    const __m512 mu = _mm512_set1_ps(m_use);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < nj; j += 16) {
      const __mmask16 k = tail_mask16(nj - j);
      const __m512 p = exp2_avx512(_mm512_sub_ps(_mm512_mask_loadu_ps(neg_inf, k, sr + j), mu));
      _mm512_mask_storeu_ps(sr + j, k, p);
      sum = _mm512_add_ps(sum, p);
    }
    l[r] = l[r] * a + _mm512_reduce_add_ps(sum);
    m[r] = m_new;
    alpha[r] = a;
  }
}

using PvRowsTile16Fn = void (*)(const float*, int64_t, const float*, int64_t, int64_t,
                                __mmask16, float*, int64_t, const float*);

SK_TARGET_AVX512 inline void pv_rows_avx512(const float* p, int64_t sst, int64_t R,
                                            const float* v, int64_t vs, int64_t nj, int64_t D,
                                            float* o, int64_t dp, const float* alpha) {
  // The last vector of a tile is always loaded under `last` (all lanes when D fills it).
#define SK_PV_ROW(nr)                                                                     \
  {&rows_avx512::pv_rows_tile<nr, 1, true>, &rows_avx512::pv_rows_tile<nr, 2, true>,      \
   &rows_avx512::pv_rows_tile<nr, 3, true>, &rows_avx512::pv_rows_tile<nr, 4, true>}
  static const PvRowsTile16Fn table[4][4] = {SK_PV_ROW(1), SK_PV_ROW(2), SK_PV_ROW(3),
                                             SK_PV_ROW(4)};
#undef SK_PV_ROW
  const int64_t nd = (D + 15) / 16;
  for (int64_t c = 0; c < nd; c += 4) {
    const int nv = static_cast<int>(std::min<int64_t>(4, nd - c));
    const __mmask16 last =
        c + nv == nd ? tail_mask16(D - 16 * (nd - 1)) : static_cast<__mmask16>(0xFFFF);
    for (int64_t r0 = 0; r0 < R; r0 += 4) {
      const int nr = static_cast<int>(std::min<int64_t>(4, R - r0));
      table[nr - 1][nv - 1](p + r0 * sst, sst, v + 16 * c, vs, nj, last, o + r0 * dp + 16 * c,
                            dp, alpha + r0);
    }
  }
}

SK_TARGET_AVX512 inline void load_row_avx512(const char* src, DType d, int64_t n, float* dst) {
  if (d == DType::kFloat32) {
    std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
    return;
  }
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = tail_mask16(n - i);
    const __m256i h =
        _mm512_castsi512_si256(_mm512_maskz_loadu_epi16(static_cast<__mmask32>(k), s + i));
    const __m512 f = d == DType::kFloat16
                         ? _mm512_cvtph_ps(h)
                         : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    _mm512_mask_storeu_ps(dst + i, k, f);
  }
}

SK_TARGET_AVX512 inline void store_row_avx512(const float* src, int64_t n, char* dst, DType d) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = tail_mask16(n - i);
    store16_masked(dst, d, i, _mm512_maskz_loadu_ps(k, src + i), k);
  }
}

#endif  // SENTINEL_X86_64

// The row-mode kernels and row conversions of one SIMD level (avx512_vnni uses the
// AVX-512 ones).
struct RowKernels {
  QkRowsFn qk;
  SoftmaxRowsFn softmax;
  PvRowsFn pv;
  LoadRowFn load_row;
  StoreRowFn store_row;
};

inline RowKernels row_kernels(SimdLevel level) {
#if defined(SENTINEL_X86_64)
  if (level >= SimdLevel::kAvx512) {
    return {&qk_rows_avx512, &softmax_rows_avx512, &pv_rows_avx512, &load_row_avx512,
            &store_row_avx512};
  }
  if (level >= SimdLevel::kAvx2) {
    return {&qk_rows_avx2, &softmax_rows_avx2, &pv_rows_avx2, &load_row_avx2, &store_row_avx2};
  }
#else
  (void)level;
#endif
  return {&qk_rows_scalar, &softmax_rows_scalar, &pv_rows_scalar, &load_row_scalar,
          &store_row_scalar};
}

// ===========================================================================
// Query / output rows
// ===========================================================================

// The query and output tensors of an attention call ([B, H, S, D] of one dtype, any
// element strides) with the row conversions of the active SIMD level.
struct AttnIo {
  const char* q;
  char* out;
  DType dtype;
  int64_t es;  // bytes per element
  int64_t D;
  Strides4 qs, os;
  RowKernels kern;

  const char* q_row(int64_t b, int64_t h, int64_t i) const {
    return q + (b * qs.b + h * qs.h + i * qs.s) * es;
  }
  char* out_row(int64_t b, int64_t h, int64_t i) const {
    return out + (b * os.b + h * os.h + i * os.s) * es;
  }
  // D elements of dtype at src (element stride sd) -> dst as fp32.
  void load(const char* src, int64_t sd, float* dst) const {
    if (sd == 1) {
      kern.load_row(src, dtype, D, dst);
    } else {
      for (int64_t d = 0; d < D; ++d) dst[d] = load1(src, dtype, d * sd);
    }
  }
  // D fp32 values -> the output row at dst (rounded to nearest even).
  void store_out(const float* src, char* dst) const {
    if (os.d == 1) {
      kern.store_row(src, D, dst, dtype);
    } else {
      for (int64_t d = 0; d < D; ++d) store1(dst, dtype, d * os.d, src[d]);
    }
  }
  // +0.0 into the Sq output rows of head h of batch row b (zeros: D fp32 zeros).
  void zero_head(int64_t b, int64_t h, int64_t Sq, const float* zeros) const {
    for (int64_t i = 0; i < Sq; ++i) {
      char* dst = out_row(b, h, i);
      if (os.d == 1) {
        std::memset(dst, 0, static_cast<size_t>(D * es));  // +0.0 in every dtype
      } else {
        store_out(zeros, dst);
      }
    }
  }
};

// ===========================================================================
// Work items of the drivers
// ===========================================================================
//
// An item is a tile of query positions of every active query head of one (batch row,
// KV head) group over a range of keys, so each K / V block it reads serves the G heads of
// the group. Items are sorted by estimated cost (largest first) and handed out through an
// atomic counter to the caller and num_threads - 1 pool workers. When there are fewer
// than 4 items per thread (decode: B * Hkv items), each item's key range is cut into
// parts of at least kMinSplitKeys keys; each part leaves its unnormalised (O, m, l) in a
// workspace slot and the caller merges the parts with the log-sum-exp rule
//   out = sum_s 2^(m_s - M) O_s / sum_s 2^(m_s - M) l_s,  M = max_s m_s.

struct AttnItem {
  int64_t b, g;      // batch row, KV head
  int64_t i0, rows;  // query positions [i0, i0 + rows) of every active head of the group
  int64_t k0, k1;    // key positions [k0, k1) handled by this item
  int64_t slot;      // -1: writes out; else workspace slot of a partial (split key range)
  double cost;
};

// A tile whose key range was split: workspace slots [slot0, slot0 + parts) hold its parts.
struct SplitTile {
  int64_t b, g, i0, rows, slot0, parts;
};

// Where a part (of a split tile) of R rows keeps its unnormalised output: O of row r, dim d at
// [r * o_row + d * o_dim], m at [m_at + r], l at [l_at + r].
struct PartLayout {
  int64_t o_row, o_dim, m_at, l_at;
};

// head_active == nullptr: every head is active.
inline bool head_on(const int8_t* head_active, int64_t Hq, int64_t b, int64_t h) {
  return head_active == nullptr || head_active[b * Hq + h] != 0;
}

// The active query heads of KV group g of row b (G query heads per KV head) into
// heads[]; returns their number.
inline int64_t active_heads(const int8_t* head_active, int64_t Hq, int64_t G, int64_t b,
                            int64_t g, int32_t* heads) {
  int64_t na = 0;
  for (int64_t a = 0; a < G; ++a) {
    const int64_t h = g * G + a;
    if (head_on(head_active, Hq, b, h)) heads[na++] = static_cast<int32_t>(h);
  }
  return na;
}

// The work items of an attention call: for every (batch row b, KV head g) with active
// heads, tiles of min(Sq, max(1, kRowTarget / na)) query positions of its na active heads
// over the keys those rows see, key_range(b, i, &lo, &hi) giving the keys [lo, hi) of
// query position i (the item takes the union over its positions) and cost(R, keys) an
// item's estimated cost. The output rows of
// pruned heads are zeroed here. Returns the most rows (heads x positions) of an item.
template <class KeyRange, class Cost>
int64_t make_items(const AttnIo& io, int64_t B, int64_t Hq, int64_t Hkv, int64_t Sq,
                   const int8_t* head_active, const KeyRange& key_range, const Cost& cost,
                   std::vector<AttnItem>* items) {
  const int64_t G = Hq / Hkv;
  std::vector<int32_t> heads(static_cast<size_t>(G));
  std::vector<float> zeros(static_cast<size_t>(io.D), 0.0f);
  int64_t r_max = 1;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t g = 0; g < Hkv; ++g) {
      const int64_t na = active_heads(head_active, Hq, G, b, g, heads.data());
      for (int64_t h = g * G; h < (g + 1) * G; ++h) {
        if (!head_on(head_active, Hq, b, h)) io.zero_head(b, h, Sq, zeros.data());
      }
      if (na == 0) continue;
      const int64_t bm_rows = std::min(Sq, std::max<int64_t>(1, kRowTarget / na));
      for (int64_t i0 = 0; i0 < Sq; i0 += bm_rows) {
        const int64_t rows = std::min(bm_rows, Sq - i0);
        // The keys any row sees: [smallest lo, largest hi) over the tile's positions
        // (each looked at: packed prompts' segment starts need not grow with i).
        int64_t k0 = std::numeric_limits<int64_t>::max(), k1 = 0;
        for (int64_t i = i0; i < i0 + rows; ++i) {
          int64_t lo = 0, hi = 0;
          key_range(b, i, &lo, &hi);
          if (hi > lo) {
            k0 = std::min(k0, lo);
            k1 = std::max(k1, hi);
          }
        }
        if (k1 == 0) k0 = 0;  // no row sees a key
        k1 = std::max(k0, k1);
        const int64_t R = na * rows;
        r_max = std::max(r_max, R);
        items->push_back({b, g, i0, rows, k0, k1, -1, cost(R, k1 - k0)});
      }
    }
  }
  return r_max;
}

// The number of threads worth using for items of this total cost.
inline int threads_for(const std::vector<AttnItem>& items, int num_threads) {
  double total = 0.0;
  for (const AttnItem& it : items) total += it.cost;
  return total * kNsPerRowKeyDim < kMinParallelNs ? 1 : num_threads;
}

// Splits the key ranges of the items when there are fewer than 4 per thread (appending
// the split tiles to *splits), then sorts them by cost, largest first. Returns the number
// of workspace slots the parts use.
inline int64_t split_and_sort(std::vector<AttnItem>& items, int threads,
                              std::vector<SplitTile>* splits) {
  int64_t slots = 0;
  const int64_t base_items = static_cast<int64_t>(items.size());
  if (threads > 1 && base_items < 4 * static_cast<int64_t>(threads)) {
    const int64_t want = (4 * threads + base_items - 1) / base_items;
    std::vector<AttnItem> split_items;
    for (const AttnItem& it : items) {
      const int64_t n = it.k1 - it.k0;
      const int64_t parts = std::min(want, n / kMinSplitKeys);
      if (parts <= 1) {
        split_items.push_back(it);
        continue;
      }
      splits->push_back({it.b, it.g, it.i0, it.rows, slots, parts});
      for (int64_t s = 0; s < parts; ++s) {
        AttnItem part = it;
        part.k0 = it.k0 + n * s / parts;
        part.k1 = it.k0 + n * (s + 1) / parts;
        part.slot = slots++;
        part.cost = it.cost / static_cast<double>(parts);
        split_items.push_back(part);
      }
    }
    items.swap(split_items);
  }
  std::stable_sort(items.begin(), items.end(),
                   [](const AttnItem& x, const AttnItem& y) { return x.cost > y.cost; });
  return slots;
}

// Runs run(item, scratch) for every item on min(threads, items) threads, each with
// `scratch_floats` floats of its own 64-byte aligned scratch.
template <class Run>
void run_items(const std::vector<AttnItem>& items, int threads, size_t scratch_floats,
               const Run& run) {
  const int64_t n_items = static_cast<int64_t>(items.size());
  threads = static_cast<int>(std::min<int64_t>(threads, n_items));
  std::atomic<int64_t> next{0};
  auto worker = [&](int64_t, int64_t) {
    float* scratch = thread_scratch(scratch_floats);
    for (;;) {
      const int64_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= n_items) break;
      run(items[static_cast<size_t>(i)], scratch);
    }
  };
  parallel_for(threads, threads, worker, 1);
}

// The end of an item of R rows (row r: query head heads[r / it.rows], position
// it.i0 + r % it.rows) whose unnormalised output of row r, dim d is
// o[r * o_row + d * o_dim]: a whole item writes out = O / l (zeros where l = 0); a part
// of a split key range (it.slot >= 0) leaves O, m and l in its workspace slot, laid out
// as `part`. row: D floats of scratch.
inline void finish_item(const AttnIo& io, const AttnItem& it, const int32_t* heads, int64_t R,
                        const float* o, int64_t o_row, int64_t o_dim, const float* m,
                        const float* l, const PartLayout& part, float* ws, int64_t slot_floats,
                        float* row) {
  const int64_t D = io.D;
  if (it.slot >= 0) {
    float* dst = ws + it.slot * slot_floats;
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t d = 0; d < D; ++d) {
        dst[r * part.o_row + d * part.o_dim] = o[r * o_row + d * o_dim];
      }
      dst[part.m_at + r] = m[r];
      dst[part.l_at + r] = l[r];
    }
    return;
  }
  for (int64_t r = 0; r < R; ++r) {
    const float lr = l[r];
    const float inv = lr > 0.0f ? 1.0f / lr : 0.0f;
    for (int64_t d = 0; d < D; ++d) row[d] = lr > 0.0f ? o[r * o_row + d * o_dim] * inv : 0.0f;
    io.store_out(row, io.out_row(it.b, heads[r / it.rows], it.i0 + r % it.rows));
  }
}

// Row r of a split tile, merged over its parts: each part (slot_floats floats from
// ws + slot * slot_floats) holds O of row r, dim d at [r * o_row + d * o_dim], m at
// [m_at + r] and l at [l_at + r]. Writes the normalised row (zeros when no part saw a
// key) to row[0 .. D), using acc[0 .. D).
inline void merge_row(const SplitTile& t, const float* ws, int64_t slot_floats, int64_t r,
                      int64_t D, int64_t o_row, int64_t o_dim, int64_t m_at, int64_t l_at,
                      float* acc, float* row) {
  float mx = kNegInf;
  for (int64_t s = 0; s < t.parts; ++s) {
    mx = std::max(mx, ws[(t.slot0 + s) * slot_floats + m_at + r]);
  }
  std::fill(acc, acc + D, 0.0f);
  float lsum = 0.0f;
  if (mx != kNegInf) {
    for (int64_t s = 0; s < t.parts; ++s) {
      const float* part = ws + (t.slot0 + s) * slot_floats;
      const float ms = part[m_at + r];
      if (ms == kNegInf) continue;
      const float w = std::exp2(ms - mx);
      lsum += w * part[l_at + r];
      for (int64_t d = 0; d < D; ++d) acc[d] += w * part[r * o_row + d * o_dim];
    }
  }
  const float inv = lsum > 0.0f ? 1.0f / lsum : 0.0f;
  for (int64_t d = 0; d < D; ++d) row[d] = lsum > 0.0f ? acc[d] * inv : 0.0f;
}

// Merges the parts of every split tile and writes its rows; layout(R) is the PartLayout
// of a part of R rows.
template <class Layout>
void merge_splits(const AttnIo& io, const std::vector<SplitTile>& splits, const float* ws,
                  int64_t slot_floats, const int8_t* head_active, int64_t Hq, int64_t G,
                  const Layout& layout) {
  if (splits.empty()) return;
  std::vector<int32_t> heads(static_cast<size_t>(G));
  std::vector<float> row(static_cast<size_t>(io.D)), acc(static_cast<size_t>(io.D));
  for (const SplitTile& t : splits) {
    const int64_t na = active_heads(head_active, Hq, G, t.b, t.g, heads.data());
    const int64_t R = na * t.rows;
    const PartLayout pl = layout(R);
    for (int64_t r = 0; r < R; ++r) {
      merge_row(t, ws, slot_floats, r, io.D, pl.o_row, pl.o_dim, pl.m_at, pl.l_at, acc.data(),
                row.data());
      io.store_out(row.data(), io.out_row(t.b, heads[r / t.rows], t.i0 + r % t.rows));
    }
  }
}

}  // namespace sentinel
