#include "attention.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_features.h"
#include "dtype_access.h"
#include "dtype_convert.h"
#include "thread_pool.h"

#include "simd.h"

// Design
// ======
// Work items. The query rows of one (batch row b, KV head g) pair are the Sq positions of
// each *active* query head of the group (h = g * G + a). An item takes a tile of BM
// positions of all na active heads of the group, R = na * BM rows (BM = 64 / na, so
// R <= 64 unless a group has more than 64 active heads), and loops over the blocks of
// keys that any of its rows can see; every K/V block it loads is shared by the G heads
// of the group (GQA). Pruned heads produce no item; their output rows are zeroed.
//
// Transposed tiles ("lanes = query rows"). Inside an item everything is laid out with
// the R query rows along the SIMD lanes (padded to Rp, a multiple of the vector width):
//   QT[d][r]  = q[r, d] * scale * log2(e)   packed once per item,
//   S[j][r]   = sum_d K[j, d] * QT[d][r]    keys j of the block in rows,
//   O[d][r]  += sum_j V[j, d] * P[j][r]     accumulated over all blocks.
// The score micro-kernel is an outer product of a K row element (broadcast) with QT
// vectors, the P.V micro-kernel one of a V row element with P vectors, so K and V are
// read in their natural row layout (fp32 inputs straight from the caller's memory,
// fp16/bf16 converted once per block into a small buffer) and nothing is transposed
// per block. The online softmax (running max m, sum l per row) is then vertical: the
// per-row max over a block is an element-wise max of vectors, the rescale factor
// alpha = 2^(m_old - m_new) is a vector that the P.V kernel applies when it loads O.
// Register tiles: AVX-512 6 keys (or 6 dims of V) x 4 vectors of 16 rows = 24
// accumulators; AVX2 6 x 2 vectors of 8 rows = 12. (The small fixed-trip loops carry
// "#pragma GCC unroll": without it GCC kept a copy of the accumulator arrays on the
// stack and stored all of them on every iteration.)
//
// Row mode (AVX-512, items of R <= 8 rows: decode). Lanes mode pads R to 16 lanes, so
// 3 rows (Sq = 1, G = 3) would waste 13/16 of every FMA. Row mode keeps the rows in
// memory order: scores by 16 keys at a time, each a D-long dot product accumulated in
// its own vector and the 16 vectors folded into one vector of 16 scores by a transposing
// add tree; softmax horizontal per row; P.V as broadcast(p) x V-row vectors into R x
// (up to 64 dims) accumulators. K and V rows are read once per block from the caller's
// memory (L1 hits for the rows after the first). Measured (1 core, fp32, data in cache):
// B1 Hq9 Hkv3 Sq1 Sk1024 D64 104 us in lanes mode -> 46 us in row mode; with the cache
// of 30 layers streamed from memory each call takes ~85 us, at the ~11 GB/s one core
// of that VM reads, so decode is bandwidth-bound there.
//
// Masking. Each row has a visible key range [lo, hi) (from L_b, causal and window); the
// key mask is per key. A block that every row of the item sees completely (and with no
// masked key) runs without any masking; only blocks on the diagonal / window edge /
// padding compare key indices against the per-lane lo, hi. Blocks are aligned to the
// end of the item's key range, so the diagonal block ends exactly at the last row's
// last key and the short block (the remainder) is the first one. Blocks no row sees are
// never visited. Rows with no visible key keep l = 0 and are written as zeros.
//
// exp. Scores are computed in base 2 (log2(e) folded into the query scale), and 2^x
// for x <= 0 is evaluated as 2^n * p(f), n = round(x), f = x - n in [-1/2, 1/2], p a
// degree-6 polynomial fitted (weighted least squares on Chebyshev nodes) to 2^f with
// relative error 1.9e-9 in exact arithmetic and 1.0e-7 (under 2 ulp) when evaluated in
// fp32 with FMA, checked on 2 million points: the same order as the fp32 rounding of
// the score itself (a score of magnitude 20 carries an absolute error of ~1e-6, i.e. a
// relative error of ~1e-6 in its exponential), so the approximation adds nothing
// visible to the fp32 error. x < -125 gives exactly 0 (such a term is below 2^-125
// relative to the row's largest term and cannot change an fp32 sum); that also maps
// masked keys (score -inf) to exact zeros.
//
// Threading. Items are sorted by estimated cost (largest first) and handed out through
// an atomic counter to the caller and num_threads - 1 pool workers, so causal tiles of
// very different lengths still balance. When there are fewer than 4 items per thread
// (decode: B * Hkv items of Sq * G rows), each item's key range is split into parts of
// at least kMinSplitKeys keys; each part leaves its unnormalised (O, m, l) in a
// workspace and the caller merges the parts with the log-sum-exp rule
//   out = sum_s 2^(m_s - M) O_s / sum_s 2^(m_s - M) l_s,  M = max_s m_s.
// Problems worth less than kMinParallelNs run on the calling thread.
//
// Measured on the 2-vCPU AVX-512 VM (2.6 GHz, shared, so +-10%): B1 Hq9 Hkv3 S1024 D64
// causal fp32 prefill 8.4 ms on 1 thread (about 145 GFLOP/s counted on the computed
// tiles, ~87% of the FMA peak), 4.4 ms on 2; the HF eager sequence (repeat_kv, matmul,
// mask add, softmax, matmul) in torch fp32 took 83 ms (1 thread) / 115 ms (2 threads)
// there, and torch's SDPA 17 ms. With 4 of the 9 heads pruned: 0.42-0.57x the dense
// time depending on which heads (fewer rows per item when a group keeps one head).

namespace sentinel {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr double kLog2e = 1.44269504088896340736;
// 2^x is taken as exactly 0 below this (see the design notes).
constexpr float kExpFloor = -125.0f;
// 2^f ~ sum_i kExp2C[i] f^i on [-1/2, 1/2].
constexpr float kExp2C0 = 1.0f;
constexpr float kExp2C1 = 6.931471825e-01f;
constexpr float kExp2C2 = 2.402264625e-01f;
constexpr float kExp2C3 = 5.550328642e-02f;
constexpr float kExp2C4 = 9.618488140e-03f;
constexpr float kExp2C5 = 1.339993323e-03f;
constexpr float kExp2C6 = 1.534603944e-04f;

constexpr int64_t kBlockN = 64;         // keys per block
constexpr int64_t kRowTarget = 64;      // query rows per item
constexpr int64_t kMinSplitKeys = 256;  // keys per part when an item's key range is split
constexpr int64_t kMaxD = 256;
// Cost model for the threading decision: ns per (padded row x key x head dim) and the
// least work worth a hand-off to the pool (see int8_matmul.cpp for the hand-off cost).
constexpr double kNsPerRowKeyDim = 0.03;
constexpr double kMinParallelNs = 3000.0;

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Per-thread scratch that survives between calls (pool workers are persistent), so a
// decode step does not pay for allocations. Grows, never shrinks.
class Arena {
 public:
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

// Visibility of one block of keys [j0, j0 + nj) for each lane (query row).
struct BlockMask {
  const int32_t* lo;  // per lane: first visible key
  const int32_t* hi;  // per lane: one past the last visible key (hi <= lo: none)
  int32_t j0;
  const int8_t* km;   // key mask of the block (km[j] == 0: key j0 + j hidden), or nullptr
};

// s[j * rp + r] = sum_d k[j * ks + d] * qt[d * rp + r], j < nj, r < rp.
using QkFn = void (*)(const float* qt, int64_t rp, const float* k, int64_t ks, int64_t nj,
                      int64_t D, float* s);
// Online-softmax step over a block of scores s[j * rp + r] (bm == nullptr: all visible):
// m_new = max(m, max_j s), alpha = 2^(m - m_new), s <- 2^(s - m_new) (0 when hidden),
// l <- l * alpha + sum_j s, m <- m_new. Lanes with m_new = -inf keep l = 0.
using SoftmaxFn = void (*)(float* s, int64_t rp, int64_t nj, const BlockMask* bm, float* m,
                           float* l, float* alpha);
// o[d * rp + r] = o[d * rp + r] * alpha[r] + sum_j v[j * vs + d] * p[j * rp + r].
using PvFn = void (*)(const float* p, int64_t rp, const float* v, int64_t vs, int64_t nj,
                      int64_t D, float* o, const float* alpha);
// n contiguous elements of dtype -> fp32, and back (round to nearest even).
using LoadRowFn = void (*)(const char* src, DType d, int64_t n, float* dst);
using StoreRowFn = void (*)(const float* src, int64_t n, char* dst, DType d);

// Row mode (few query rows, e.g. decode): rows in memory order, lanes over keys / dims.
// Visibility of keys j0 + j for row r: lo[r] <= j0 + j < hi[r] and km[j] != 0.
struct RowMask {
  const int32_t* lo;
  const int32_t* hi;
  int32_t j0;
  const int8_t* km;
};
// s[r * sst + j] = sum_d qr[r * dp + d] * k[j * ks + d], r < R, j < nj (qr zero-padded
// to dp, a multiple of 16).
using QkRowsFn = void (*)(const float* qr, int64_t R, int64_t dp, const float* k, int64_t ks,
                          int64_t nj, int64_t D, float* s, int64_t sst);
// The SoftmaxFn step with rows in s[r * sst + j].
using SoftmaxRowsFn = void (*)(float* s, int64_t sst, int64_t R, int64_t nj, const RowMask* rm,
                               float* m, float* l, float* alpha);
// o[r * dp + d] = o[r * dp + d] * alpha[r] + sum_j p[r * sst + j] * v[j * vs + d], d < D.
using PvRowsFn = void (*)(const float* p, int64_t sst, int64_t R, const float* v, int64_t vs,
                          int64_t nj, int64_t D, float* o, int64_t dp, const float* alpha);

struct Kernels {
  int64_t lanes;
  QkFn qk;
  SoftmaxFn softmax;
  PvFn pv;
  LoadRowFn load_row;
  StoreRowFn store_row;
  // Row mode, used for items of at most kMaxRowModeRows rows (nullptr: not available).
  QkRowsFn qk_rows = nullptr;
  SoftmaxRowsFn softmax_rows = nullptr;
  PvRowsFn pv_rows = nullptr;
};

// ===========================================================================
// Scalar kernels (reference structure for the SIMD ones; 8 "lanes" of layout)
// ===========================================================================

inline float exp2_scalar(float x) { return x < kExpFloor ? 0.0f : std::exp2(x); }

inline bool lane_sees(const BlockMask* bm, int64_t r, int64_t j) {
  const int64_t key = bm->j0 + j;
  return key >= bm->lo[r] && key < bm->hi[r] && (bm->km == nullptr || bm->km[j] != 0);
}

void qk_scalar(const float* qt, int64_t rp, const float* k, int64_t ks, int64_t nj, int64_t D,
               float* s) {
  for (int64_t j = 0; j < nj; ++j) {
    float* sj = s + j * rp;
    const float* kj = k + j * ks;
    for (int64_t r = 0; r < rp; ++r) sj[r] = 0.0f;
    for (int64_t d = 0; d < D; ++d) {
      const float kv = kj[d];
      const float* qd = qt + d * rp;
      for (int64_t r = 0; r < rp; ++r) sj[r] += kv * qd[r];
    }
  }
}

void softmax_scalar(float* s, int64_t rp, int64_t nj, const BlockMask* bm, float* m, float* l,
                    float* alpha) {
  for (int64_t r = 0; r < rp; ++r) {
    float mx = kNegInf;
    for (int64_t j = 0; j < nj; ++j) {
      float& x = s[j * rp + r];
      if (bm != nullptr && !lane_sees(bm, r, j)) x = kNegInf;
      mx = std::max(mx, x);
    }
    const float m_new = std::max(m[r], mx);
    const float m_use = m_new == kNegInf ? 0.0f : m_new;
    const float a = exp2_scalar(m[r] - m_use);
    float sum = 0.0f;
    for (int64_t j = 0; j < nj; ++j) {
      float& x = s[j * rp + r];
      x = exp2_scalar(x - m_use);
      sum += x;
    }
    l[r] = l[r] * a + sum;
    m[r] = m_new;
    alpha[r] = a;
  }
}

void pv_scalar(const float* p, int64_t rp, const float* v, int64_t vs, int64_t nj, int64_t D,
               float* o, const float* alpha) {
  for (int64_t d = 0; d < D; ++d) {
    float* od = o + d * rp;
    for (int64_t r = 0; r < rp; ++r) od[r] *= alpha[r];
    for (int64_t j = 0; j < nj; ++j) {
      const float vv = v[j * vs + d];
      const float* pj = p + j * rp;
      for (int64_t r = 0; r < rp; ++r) od[r] += vv * pj[r];
    }
  }
}

void load_row_scalar(const char* src, DType d, int64_t n, float* dst) {
  if (d == DType::kFloat32) {
    std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
    return;
  }
  for (int64_t i = 0; i < n; ++i) dst[i] = load1(src, d, i);
}

void store_row_scalar(const float* src, int64_t n, char* dst, DType d) {
  if (d == DType::kFloat32) {
    std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
    return;
  }
  for (int64_t i = 0; i < n; ++i) store1(dst, d, i, src[i]);
}

#if defined(SENTINEL_X86_64)

// ===========================================================================
// AVX-512 kernels (16 lanes)
// ===========================================================================

SK_TARGET_AVX512 inline __m512 exp2_avx512(__m512 x) {
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kExpFloor), _CMP_GE_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(kExpFloor));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(kExp2C6);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2C5));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2C4));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2C3));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2C2));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2C1));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2C0));
  return _mm512_maskz_scalef_ps(keep, p, n);
}

template <int RV, int JT>
SK_TARGET_AVX512 void qk_tile_avx512(const float* qt, int64_t rp, const float* k, int64_t ks,
                                     int64_t D, float* s) {
  __m512 acc[JT][RV];
  #pragma GCC unroll 16
  for (int t = 0; t < JT; ++t)
    #pragma GCC unroll 16
    for (int v = 0; v < RV; ++v) acc[t][v] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const float* qd = qt + d * rp;
    __m512 qv[RV];
    #pragma GCC unroll 16
    for (int v = 0; v < RV; ++v) qv[v] = _mm512_load_ps(qd + 16 * v);
    #pragma GCC unroll 16
    for (int t = 0; t < JT; ++t) {
      const __m512 b = _mm512_set1_ps(k[t * ks + d]);
      #pragma GCC unroll 16
      for (int v = 0; v < RV; ++v) acc[t][v] = _mm512_fmadd_ps(qv[v], b, acc[t][v]);
    }
  }
  #pragma GCC unroll 16
  for (int t = 0; t < JT; ++t)
    #pragma GCC unroll 16
    for (int v = 0; v < RV; ++v) _mm512_store_ps(s + t * rp + 16 * v, acc[t][v]);
}

template <int RV, int DT>
SK_TARGET_AVX512 void pv_tile_avx512(const float* p, int64_t rp, const float* v, int64_t vs,
                                     int64_t nj, float* o, const float* alpha) {
  __m512 acc[DT][RV];
  #pragma GCC unroll 16
  for (int w = 0; w < RV; ++w) {
    const __m512 a = _mm512_load_ps(alpha + 16 * w);
    #pragma GCC unroll 16
    for (int t = 0; t < DT; ++t) acc[t][w] = _mm512_mul_ps(_mm512_load_ps(o + t * rp + 16 * w), a);
  }
  for (int64_t j = 0; j < nj; ++j) {
    const float* pj = p + j * rp;
    const float* vj = v + j * vs;
    __m512 pv[RV];
    #pragma GCC unroll 16
    for (int w = 0; w < RV; ++w) pv[w] = _mm512_load_ps(pj + 16 * w);
    #pragma GCC unroll 16
    for (int t = 0; t < DT; ++t) {
      const __m512 b = _mm512_set1_ps(vj[t]);
      #pragma GCC unroll 16
      for (int w = 0; w < RV; ++w) acc[t][w] = _mm512_fmadd_ps(pv[w], b, acc[t][w]);
    }
  }
  #pragma GCC unroll 16
  for (int t = 0; t < DT; ++t)
    #pragma GCC unroll 16
    for (int w = 0; w < RV; ++w) _mm512_store_ps(o + t * rp + 16 * w, acc[t][w]);
}

using QkTileFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*);
using PvTileFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*,
                          const float*);

#define SK_ROW6(fn, rv) &fn<rv, 1>, &fn<rv, 2>, &fn<rv, 3>, &fn<rv, 4>, &fn<rv, 5>, &fn<rv, 6>

constexpr int kTile = 6;  // keys (QK) / head dims (PV) per register tile

SK_TARGET_AVX512 void qk_avx512(const float* qt, int64_t rp, const float* k, int64_t ks,
                                int64_t nj, int64_t D, float* s) {
  static const QkTileFn table[4][kTile] = {{SK_ROW6(qk_tile_avx512, 1)},
                                           {SK_ROW6(qk_tile_avx512, 2)},
                                           {SK_ROW6(qk_tile_avx512, 3)},
                                           {SK_ROW6(qk_tile_avx512, 4)}};
  const int64_t nv = rp / 16;
  for (int64_t v0 = 0; v0 < nv; v0 += 4) {
    const int rv = static_cast<int>(std::min<int64_t>(4, nv - v0));
    for (int64_t j = 0; j < nj; j += kTile) {
      const int jt = static_cast<int>(std::min<int64_t>(kTile, nj - j));
      table[rv - 1][jt - 1](qt + 16 * v0, rp, k + j * ks, ks, D, s + j * rp + 16 * v0);
    }
  }
}

SK_TARGET_AVX512 void pv_avx512(const float* p, int64_t rp, const float* v, int64_t vs,
                                int64_t nj, int64_t D, float* o, const float* alpha) {
  static const PvTileFn table[4][kTile] = {{SK_ROW6(pv_tile_avx512, 1)},
                                           {SK_ROW6(pv_tile_avx512, 2)},
                                           {SK_ROW6(pv_tile_avx512, 3)},
                                           {SK_ROW6(pv_tile_avx512, 4)}};
  const int64_t nv = rp / 16;
  for (int64_t v0 = 0; v0 < nv; v0 += 4) {
    const int rv = static_cast<int>(std::min<int64_t>(4, nv - v0));
    for (int64_t d0 = 0; d0 < D; d0 += kTile) {
      const int dt = static_cast<int>(std::min<int64_t>(kTile, D - d0));
      table[rv - 1][dt - 1](p + 16 * v0, rp, v + d0, vs, nj, o + d0 * rp + 16 * v0,
                            alpha + 16 * v0);
    }
  }
}

SK_TARGET_AVX512 void softmax_avx512(float* s, int64_t rp, int64_t nj, const BlockMask* bm,
                                     float* m, float* l, float* alpha) {
  const __m512 neg_inf = _mm512_set1_ps(kNegInf);
  for (int64_t v = 0; v < rp; v += 16) {
    float* sv = s + v;
    __m512 mx0 = neg_inf, mx1 = neg_inf;
    if (bm != nullptr) {
      const __m512i lo = _mm512_loadu_si512(bm->lo + v);
      const __m512i hi = _mm512_loadu_si512(bm->hi + v);
      for (int64_t j = 0; j < nj; ++j) {
        const __m512i key = _mm512_set1_epi32(bm->j0 + static_cast<int32_t>(j));
        __mmask16 vis = _mm512_cmp_epi32_mask(key, lo, _MM_CMPINT_NLT) &
                        _mm512_cmp_epi32_mask(key, hi, _MM_CMPINT_LT);
        if (bm->km != nullptr && bm->km[j] == 0) vis = 0;
        const __m512 x = _mm512_mask_blend_ps(vis, neg_inf, _mm512_load_ps(sv + j * rp));
        _mm512_store_ps(sv + j * rp, x);
        mx0 = _mm512_max_ps(mx0, x);
      }
    } else {
      int64_t j = 0;
      for (; j + 2 <= nj; j += 2) {
        mx0 = _mm512_max_ps(mx0, _mm512_load_ps(sv + j * rp));
        mx1 = _mm512_max_ps(mx1, _mm512_load_ps(sv + (j + 1) * rp));
      }
      if (j < nj) mx0 = _mm512_max_ps(mx0, _mm512_load_ps(sv + j * rp));
    }
    const __m512 m_old = _mm512_load_ps(m + v);
    const __m512 m_new = _mm512_max_ps(m_old, _mm512_max_ps(mx0, mx1));
    const __m512 m_use = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(m_new, neg_inf, _CMP_EQ_OQ),
                                              m_new, _mm512_setzero_ps());
    const __m512 a = exp2_avx512(_mm512_sub_ps(m_old, m_use));
    __m512 sum0 = _mm512_setzero_ps(), sum1 = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 2 <= nj; j += 2) {
      const __m512 p0 = exp2_avx512(_mm512_sub_ps(_mm512_load_ps(sv + j * rp), m_use));
      const __m512 p1 = exp2_avx512(_mm512_sub_ps(_mm512_load_ps(sv + (j + 1) * rp), m_use));
      _mm512_store_ps(sv + j * rp, p0);
      _mm512_store_ps(sv + (j + 1) * rp, p1);
      sum0 = _mm512_add_ps(sum0, p0);
      sum1 = _mm512_add_ps(sum1, p1);
    }
    if (j < nj) {
      const __m512 p0 = exp2_avx512(_mm512_sub_ps(_mm512_load_ps(sv + j * rp), m_use));
      _mm512_store_ps(sv + j * rp, p0);
      sum0 = _mm512_add_ps(sum0, p0);
    }
    _mm512_store_ps(l + v, _mm512_fmadd_ps(_mm512_load_ps(l + v), a, _mm512_add_ps(sum0, sum1)));
    _mm512_store_ps(m + v, m_new);
    _mm512_store_ps(alpha + v, a);
  }
}

SK_TARGET_AVX512 inline __mmask16 tail_mask16(int64_t count) {
  return count >= 16 ? static_cast<__mmask16>(0xFFFF)
                     : static_cast<__mmask16>((1u << count) - 1u);
}

SK_TARGET_AVX512 void load_row_avx512(const char* src, DType d, int64_t n, float* dst) {
  if (d == DType::kFloat32) {
    std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
    return;
  }
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = tail_mask16(n - i);
    const __m256i h = _mm512_castsi512_si256(
        _mm512_maskz_loadu_epi16(static_cast<__mmask32>(k), s + i));
    const __m512 f = d == DType::kFloat16
                         ? _mm512_cvtph_ps(h)
                         : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    _mm512_mask_storeu_ps(dst + i, k, f);
  }
}

SK_TARGET_AVX512 void store_row_avx512(const float* src, int64_t n, char* dst, DType d) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = tail_mask16(n - i);
    const __m512 v = _mm512_maskz_loadu_ps(k, src + i);
    switch (d) {
      case DType::kFloat32:
        _mm512_mask_storeu_ps(reinterpret_cast<float*>(dst) + i, k, v);
        break;
      case DType::kFloat16: {
        const __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm512_mask_storeu_epi16(reinterpret_cast<uint16_t*>(dst) + i,
                                 static_cast<__mmask32>(k), _mm512_castsi256_si512(h));
        break;
      }
      case DType::kBFloat16:
        _mm512_mask_cvtepi32_storeu_epi16(reinterpret_cast<uint16_t*>(dst) + i, k,
                                          f32_to_bf16_avx512(v));
        break;
    }
  }
}

// ---- AVX-512 row mode -------------------------------------------------------------
//
// Scores: for one row and 16 keys, 16 accumulators of q . k partial sums along D, then
// one transposing reduction tree (15 adds of shuffled pairs) turns them into the 16
// scores in one vector. Key t is accumulated in slot 4 (t % 4) + t / 4, which makes the
// tree's output come out in key order. K rows are re-read from L1 for every query row.

constexpr int kRowSlotKey[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};

// out lane t = sum of the lanes of a[slot(t)], slot(t) = 4 (t % 4) + t / 4.
SK_TARGET_AVX512 __attribute__((always_inline)) inline __m512 reduce16_avx512(const __m512* a) {
  __m512 b[8];
  for (int i = 0; i < 8; ++i) {
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
  __m512 c[4];
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

// Scores of one row for 16 keys (kFull: all 16 exist, else only the first nk).
template <bool kFull>
SK_TARGET_AVX512 __attribute__((always_inline)) inline __m512 qk_row16_avx512(const float* q, const float* kb, int64_t ks,
                                               int64_t nd, __mmask16 last, int64_t nk) {
  __m512 acc[16];
#pragma GCC unroll 16
  for (int slot = 0; slot < 16; ++slot) acc[slot] = _mm512_setzero_ps();
  for (int64_t dv = 0; dv < nd; ++dv) {
    const __m512 qv = _mm512_load_ps(q + 16 * dv);
    const __mmask16 dm = dv == nd - 1 ? last : static_cast<__mmask16>(0xFFFF);
    const float* kd = kb + 16 * dv;
#pragma GCC unroll 16
    for (int slot = 0; slot < 16; ++slot) {
      const int key = kRowSlotKey[slot];
      if (kFull || key < nk) {
        acc[slot] = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(dm, kd + key * ks), acc[slot]);
      }
    }
  }
  return reduce16_avx512(acc);
}

SK_TARGET_AVX512 void qk_rows_avx512(const float* qr, int64_t R, int64_t dp, const float* k,
                                     int64_t ks, int64_t nj, int64_t D, float* s, int64_t sst) {
  const int64_t nd = (D + 15) / 16;
  const __mmask16 last = tail_mask16(D - 16 * (nd - 1));
  for (int64_t j0 = 0; j0 < nj; j0 += 16) {
    const int64_t nk = std::min<int64_t>(16, nj - j0);
    const float* kb = k + j0 * ks;
    for (int64_t r = 0; r < R; ++r) {
      const __m512 res = nk == 16 ? qk_row16_avx512<true>(qr + r * dp, kb, ks, nd, last, 16)
                                  : qk_row16_avx512<false>(qr + r * dp, kb, ks, nd, last, nk);
      _mm512_mask_storeu_ps(s + r * sst + j0, tail_mask16(nk), res);
    }
  }
}

SK_TARGET_AVX512 void softmax_rows_avx512(float* s, int64_t sst, int64_t R, int64_t nj,
                                          const RowMask* rm, float* m, float* l, float* alpha) {
  const __m512 neg_inf = _mm512_set1_ps(kNegInf);
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t r = 0; r < R; ++r) {
    float* sr = s + r * sst;
    __m512 mx = neg_inf;
    for (int64_t j = 0; j < nj; j += 16) {
      const __mmask16 k = tail_mask16(nj - j);
      __m512 x = _mm512_mask_loadu_ps(neg_inf, k, sr + j);
      if (rm != nullptr) {
        const __m512i key = _mm512_add_epi32(iota, _mm512_set1_epi32(rm->j0 + static_cast<int32_t>(j)));
        __mmask16 vis = _mm512_cmp_epi32_mask(key, _mm512_set1_epi32(rm->lo[r]), _MM_CMPINT_NLT) &
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

// NR rows x NV vectors of 16 dims (the last one masked by `last`).
template <int NR, int NV>
SK_TARGET_AVX512 void pv_rows_tile_avx512(const float* p, int64_t sst, const float* v, int64_t vs,
                                          int64_t nj, __mmask16 last, float* o, int64_t dp,
                                          const float* alpha) {
  __m512 acc[NR][NV];
  #pragma GCC unroll 16
  for (int r = 0; r < NR; ++r) {
    const __m512 a = _mm512_set1_ps(alpha[r]);
    #pragma GCC unroll 16
    for (int w = 0; w < NV; ++w) acc[r][w] = _mm512_mul_ps(_mm512_load_ps(o + r * dp + 16 * w), a);
  }
  for (int64_t j = 0; j < nj; ++j) {
    const float* vj = v + j * vs;
    __m512 vv[NV];
    #pragma GCC unroll 16
    for (int w = 0; w < NV - 1; ++w) vv[w] = _mm512_loadu_ps(vj + 16 * w);
    vv[NV - 1] = _mm512_maskz_loadu_ps(last, vj + 16 * (NV - 1));
    #pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) {
      const __m512 b = _mm512_set1_ps(p[r * sst + j]);
      #pragma GCC unroll 16
      for (int w = 0; w < NV; ++w) acc[r][w] = _mm512_fmadd_ps(vv[w], b, acc[r][w]);
    }
  }
  #pragma GCC unroll 16
  for (int r = 0; r < NR; ++r)
    #pragma GCC unroll 16
    for (int w = 0; w < NV; ++w) _mm512_store_ps(o + r * dp + 16 * w, acc[r][w]);
}

using PvRowsTileFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, __mmask16,
                              float*, int64_t, const float*);

SK_TARGET_AVX512 void pv_rows_avx512(const float* p, int64_t sst, int64_t R, const float* v,
                                     int64_t vs, int64_t nj, int64_t D, float* o, int64_t dp,
                                     const float* alpha) {
#define SK_ROW4(nr) &pv_rows_tile_avx512<nr, 1>, &pv_rows_tile_avx512<nr, 2>, \
                    &pv_rows_tile_avx512<nr, 3>, &pv_rows_tile_avx512<nr, 4>
  static const PvRowsTileFn table[4][4] = {{SK_ROW4(1)}, {SK_ROW4(2)}, {SK_ROW4(3)}, {SK_ROW4(4)}};
#undef SK_ROW4
  const int64_t nd = (D + 15) / 16;
  for (int64_t c = 0; c < nd; c += 4) {
    const int nv = static_cast<int>(std::min<int64_t>(4, nd - c));
    const __mmask16 last = c + nv == nd ? tail_mask16(D - 16 * (nd - 1))
                                        : static_cast<__mmask16>(0xFFFF);
    for (int64_t r0 = 0; r0 < R; r0 += 4) {
      const int nr = static_cast<int>(std::min<int64_t>(4, R - r0));
      table[nr - 1][nv - 1](p + r0 * sst, sst, v + 16 * c, vs, nj, last, o + r0 * dp + 16 * c, dp,
                            alpha + r0);
    }
  }
}

// ===========================================================================
// AVX2 + FMA kernels (8 lanes)
// ===========================================================================

SK_TARGET_AVX2 inline __m256 exp2_avx2(__m256 x) {
  const __m256 floor = _mm256_set1_ps(kExpFloor);
  const __m256 keep = _mm256_cmp_ps(x, floor, _CMP_GE_OQ);
  x = _mm256_max_ps(x, floor);
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(x, n);
  __m256 p = _mm256_set1_ps(kExp2C6);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2C5));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2C4));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2C3));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2C2));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2C1));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2C0));
  // n >= -125, p in [0.7, 1.5): adding n to the exponent field stays a normal number.
  const __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
  const __m256 r = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
  return _mm256_and_ps(r, keep);
}

template <int RV, int JT>
SK_TARGET_AVX2 void qk_tile_avx2(const float* qt, int64_t rp, const float* k, int64_t ks,
                                 int64_t D, float* s) {
  __m256 acc[JT][RV];
  #pragma GCC unroll 16
  for (int t = 0; t < JT; ++t)
    #pragma GCC unroll 16
    for (int v = 0; v < RV; ++v) acc[t][v] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const float* qd = qt + d * rp;
    __m256 qv[RV];
    #pragma GCC unroll 16
    for (int v = 0; v < RV; ++v) qv[v] = _mm256_load_ps(qd + 8 * v);
    #pragma GCC unroll 16
    for (int t = 0; t < JT; ++t) {
      const __m256 b = _mm256_broadcast_ss(k + t * ks + d);
      #pragma GCC unroll 16
      for (int v = 0; v < RV; ++v) acc[t][v] = _mm256_fmadd_ps(qv[v], b, acc[t][v]);
    }
  }
  #pragma GCC unroll 16
  for (int t = 0; t < JT; ++t)
    #pragma GCC unroll 16
    for (int v = 0; v < RV; ++v) _mm256_store_ps(s + t * rp + 8 * v, acc[t][v]);
}

template <int RV, int DT>
SK_TARGET_AVX2 void pv_tile_avx2(const float* p, int64_t rp, const float* v, int64_t vs,
                                 int64_t nj, float* o, const float* alpha) {
  __m256 acc[DT][RV];
  #pragma GCC unroll 16
  for (int w = 0; w < RV; ++w) {
    const __m256 a = _mm256_load_ps(alpha + 8 * w);
    #pragma GCC unroll 16
    for (int t = 0; t < DT; ++t) acc[t][w] = _mm256_mul_ps(_mm256_load_ps(o + t * rp + 8 * w), a);
  }
  for (int64_t j = 0; j < nj; ++j) {
    const float* pj = p + j * rp;
    const float* vj = v + j * vs;
    __m256 pv[RV];
    #pragma GCC unroll 16
    for (int w = 0; w < RV; ++w) pv[w] = _mm256_load_ps(pj + 8 * w);
    #pragma GCC unroll 16
    for (int t = 0; t < DT; ++t) {
      const __m256 b = _mm256_broadcast_ss(vj + t);
      #pragma GCC unroll 16
      for (int w = 0; w < RV; ++w) acc[t][w] = _mm256_fmadd_ps(pv[w], b, acc[t][w]);
    }
  }
  #pragma GCC unroll 16
  for (int t = 0; t < DT; ++t)
    #pragma GCC unroll 16
    for (int w = 0; w < RV; ++w) _mm256_store_ps(o + t * rp + 8 * w, acc[t][w]);
}

SK_TARGET_AVX2 void qk_avx2(const float* qt, int64_t rp, const float* k, int64_t ks, int64_t nj,
                            int64_t D, float* s) {
  static const QkTileFn table[2][kTile] = {{SK_ROW6(qk_tile_avx2, 1)},
                                           {SK_ROW6(qk_tile_avx2, 2)}};
  const int64_t nv = rp / 8;
  for (int64_t v0 = 0; v0 < nv; v0 += 2) {
    const int rv = static_cast<int>(std::min<int64_t>(2, nv - v0));
    for (int64_t j = 0; j < nj; j += kTile) {
      const int jt = static_cast<int>(std::min<int64_t>(kTile, nj - j));
      table[rv - 1][jt - 1](qt + 8 * v0, rp, k + j * ks, ks, D, s + j * rp + 8 * v0);
    }
  }
}

SK_TARGET_AVX2 void pv_avx2(const float* p, int64_t rp, const float* v, int64_t vs, int64_t nj,
                            int64_t D, float* o, const float* alpha) {
  static const PvTileFn table[2][kTile] = {{SK_ROW6(pv_tile_avx2, 1)},
                                           {SK_ROW6(pv_tile_avx2, 2)}};
  const int64_t nv = rp / 8;
  for (int64_t v0 = 0; v0 < nv; v0 += 2) {
    const int rv = static_cast<int>(std::min<int64_t>(2, nv - v0));
    for (int64_t d0 = 0; d0 < D; d0 += kTile) {
      const int dt = static_cast<int>(std::min<int64_t>(kTile, D - d0));
      table[rv - 1][dt - 1](p + 8 * v0, rp, v + d0, vs, nj, o + d0 * rp + 8 * v0,
                            alpha + 8 * v0);
    }
  }
}

#undef SK_ROW6

SK_TARGET_AVX2 void softmax_avx2(float* s, int64_t rp, int64_t nj, const BlockMask* bm, float* m,
                                 float* l, float* alpha) {
  const __m256 neg_inf = _mm256_set1_ps(kNegInf);
  for (int64_t v = 0; v < rp; v += 8) {
    float* sv = s + v;
    __m256 mx0 = neg_inf, mx1 = neg_inf;
    if (bm != nullptr) {
      const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bm->lo + v));
      const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bm->hi + v));
      for (int64_t j = 0; j < nj; ++j) {
        const __m256i key = _mm256_set1_epi32(bm->j0 + static_cast<int32_t>(j));
        // key >= lo and key < hi  <=>  !(lo > key) and (hi > key)
        __m256i vis = _mm256_andnot_si256(_mm256_cmpgt_epi32(lo, key), _mm256_cmpgt_epi32(hi, key));
        if (bm->km != nullptr && bm->km[j] == 0) vis = _mm256_setzero_si256();
        const __m256 x = _mm256_blendv_ps(neg_inf, _mm256_load_ps(sv + j * rp),
                                          _mm256_castsi256_ps(vis));
        _mm256_store_ps(sv + j * rp, x);
        mx0 = _mm256_max_ps(mx0, x);
      }
    } else {
      int64_t j = 0;
      for (; j + 2 <= nj; j += 2) {
        mx0 = _mm256_max_ps(mx0, _mm256_load_ps(sv + j * rp));
        mx1 = _mm256_max_ps(mx1, _mm256_load_ps(sv + (j + 1) * rp));
      }
      if (j < nj) mx0 = _mm256_max_ps(mx0, _mm256_load_ps(sv + j * rp));
    }
    const __m256 m_old = _mm256_load_ps(m + v);
    const __m256 m_new = _mm256_max_ps(m_old, _mm256_max_ps(mx0, mx1));
    const __m256 m_use = _mm256_andnot_ps(_mm256_cmp_ps(m_new, neg_inf, _CMP_EQ_OQ), m_new);
    const __m256 a = exp2_avx2(_mm256_sub_ps(m_old, m_use));
    __m256 sum0 = _mm256_setzero_ps(), sum1 = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 2 <= nj; j += 2) {
      const __m256 p0 = exp2_avx2(_mm256_sub_ps(_mm256_load_ps(sv + j * rp), m_use));
      const __m256 p1 = exp2_avx2(_mm256_sub_ps(_mm256_load_ps(sv + (j + 1) * rp), m_use));
      _mm256_store_ps(sv + j * rp, p0);
      _mm256_store_ps(sv + (j + 1) * rp, p1);
      sum0 = _mm256_add_ps(sum0, p0);
      sum1 = _mm256_add_ps(sum1, p1);
    }
    if (j < nj) {
      const __m256 p0 = exp2_avx2(_mm256_sub_ps(_mm256_load_ps(sv + j * rp), m_use));
      _mm256_store_ps(sv + j * rp, p0);
      sum0 = _mm256_add_ps(sum0, p0);
    }
    _mm256_store_ps(l + v, _mm256_fmadd_ps(_mm256_load_ps(l + v), a, _mm256_add_ps(sum0, sum1)));
    _mm256_store_ps(m + v, m_new);
    _mm256_store_ps(alpha + v, a);
  }
}

SK_TARGET_AVX2 void load_row_avx2(const char* src, DType d, int64_t n, float* dst) {
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

SK_TARGET_AVX2 void store_row_avx2(const float* src, int64_t n, char* dst, DType d) {
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

#endif  // SENTINEL_X86_64

Kernels kernels_for(SimdLevel level) {
#if defined(SENTINEL_X86_64)
  if (level >= SimdLevel::kAvx512) {
    return {16,
            &qk_avx512,
            &softmax_avx512,
            &pv_avx512,
            &load_row_avx512,
            &store_row_avx512,
            &qk_rows_avx512,
            &softmax_rows_avx512,
            &pv_rows_avx512};
  }
  if (level >= SimdLevel::kAvx2) {
    return {8, &qk_avx2, &softmax_avx2, &pv_avx2, &load_row_avx2, &store_row_avx2};
  }
#else
  (void)level;
#endif
  return {8, &qk_scalar, &softmax_scalar, &pv_scalar, &load_row_scalar, &store_row_scalar};
}

// ===========================================================================
// Driver
// ===========================================================================

struct Problem {
  const char* q;
  const char* k;
  const char* v;
  char* out;
  DType dtype;
  int64_t es;  // bytes per element
  int64_t B, Hq, Hkv, Sq, Sk, D, G;
  Strides4 qs, ks, vs, os;
  bool causal;
  float qscale;  // scale * log2(e)
  int64_t window;
  const int8_t* key_mask;
  const int32_t* cache_lens;
  const int8_t* head_active;
  Kernels kern;
};

struct Item {
  int64_t b, g;      // batch row, KV head
  int64_t i0, rows;  // query positions [i0, i0 + rows) of every active head of the group
  int64_t k0, k1;    // keys [k0, k1) handled by this item
  int64_t slot;      // -1: writes out; else workspace slot of a partial (split key range)
  double cost;
};

// A tile whose key range was split: slots [slot0, slot0 + parts) hold its partials.
struct SplitTile {
  int64_t b, g, i0, rows, slot0, parts;
};

inline int64_t key_len(const Problem& p, int64_t b) {
  return p.cache_lens != nullptr ? p.cache_lens[b] : p.Sk;
}

inline bool head_on(const Problem& p, int64_t b, int64_t h) {
  return p.head_active == nullptr || p.head_active[b * p.Hq + h] != 0;
}

// Visible keys [lo, hi) of query position i in a row of L keys.
inline void row_range(const Problem& p, int64_t L, int64_t i, int64_t* lo, int64_t* hi) {
  const int64_t pos = L - p.Sq + i;
  int64_t a = 0, e = L;
  if (p.causal) e = std::min(L, pos + 1);
  if (p.window > 0) a = std::max<int64_t>(0, pos - p.window + 1);
  *lo = a;
  *hi = std::max(a, e);
}

// Active query heads of group (b, g) into heads[]; returns their number.
int64_t active_heads(const Problem& p, int64_t b, int64_t g, int32_t* heads) {
  int64_t na = 0;
  for (int64_t a = 0; a < p.G; ++a) {
    const int64_t h = g * p.G + a;
    if (head_on(p, b, h)) heads[na++] = static_cast<int32_t>(h);
  }
  return na;
}

int64_t tile_rows(int64_t na) { return std::max<int64_t>(1, kRowTarget / na); }

// Row r of an item: head heads[r / rows], position i0 + r % rows.
inline const char* q_row(const Problem& p, int64_t b, int64_t h, int64_t i) {
  return p.q + (b * p.qs.b + h * p.qs.h + i * p.qs.s) * p.es;
}
inline char* out_row(const Problem& p, int64_t b, int64_t h, int64_t i) {
  return p.out + (b * p.os.b + h * p.os.h + i * p.os.s) * p.es;
}

void load_vec(const Problem& p, const char* src, int64_t stride_d, float* dst) {
  if (stride_d == 1) {
    p.kern.load_row(src, p.dtype, p.D, dst);
  } else {
    for (int64_t d = 0; d < p.D; ++d) dst[d] = load1(src, p.dtype, d * stride_d);
  }
}

void store_vec(const Problem& p, const float* src, char* dst) {
  if (p.os.d == 1) {
    p.kern.store_row(src, p.D, dst, p.dtype);
  } else {
    for (int64_t d = 0; d < p.D; ++d) store1(dst, p.dtype, d * p.os.d, src[d]);
  }
}

// Rows of one K or V block as fp32: the caller's memory when it already is fp32 rows
// with unit stride along D, else converted into buf (row stride D).
const float* block_rows(const Problem& p, const char* base, const Strides4& st, int64_t b,
                        int64_t g, int64_t j0, int64_t nj, float* buf, int64_t* row_stride) {
  const char* first = base + (b * st.b + g * st.h + j0 * st.s) * p.es;
  if (p.dtype == DType::kFloat32 && st.d == 1) {
    *row_stride = st.s;
    return reinterpret_cast<const float*>(first);
  }
  for (int64_t j = 0; j < nj; ++j) load_vec(p, first + j * st.s * p.es, st.d, buf + j * p.D);
  *row_stride = p.D;
  return buf;
}

// Scratch of one thread, for items of up to rp_max padded rows and dp = round_up(D, 16).
struct ItemBufs {
  int32_t* heads;  // active query heads of the group (rp_max >= G entries)
  float* q;        // QT [D][rp] (lanes mode) or Q rows [R][dp] (row mode)
  float* o;        // O^T [D][rp] or O rows [R][dp]
  float* s;        // scores / probabilities of one block: [kBlockN][rp] or [R][kBlockN]
  float* kbuf;     // K block converted to fp32 rows (row stride D)
  float* vbuf;     // V block likewise
  float* row;      // one row of D floats
  float* m;
  float* l;
  float* alpha;
  int32_t* lo;
  int32_t* hi;
};

// Every piece is a multiple of 16 floats, so all stay 64-byte aligned.
int64_t scratch_floats(int64_t rp_max, int64_t dp) {
  return rp_max + 2 * dp * rp_max + kBlockN * rp_max + 2 * kBlockN * dp + dp + 5 * rp_max;
}

ItemBufs carve(float* scratch, int64_t rp_max, int64_t dp) {
  ItemBufs t;
  t.heads = reinterpret_cast<int32_t*>(scratch);
  t.q = scratch + rp_max;
  t.o = t.q + dp * rp_max;
  t.s = t.o + dp * rp_max;
  t.kbuf = t.s + kBlockN * rp_max;
  t.vbuf = t.kbuf + kBlockN * dp;
  t.row = t.vbuf + kBlockN * dp;
  t.m = t.row + dp;
  t.l = t.m + rp_max;
  t.alpha = t.l + rp_max;
  t.lo = reinterpret_cast<int32_t*>(t.alpha + rp_max);
  t.hi = t.lo + rp_max;
  return t;
}

// Items of at most this many rows use the row-mode kernels where the level has them:
// lanes mode pads R to 16 lanes and costs ~2 D FMAs per key whatever R, row mode ~R (D
// / 16 + 3) FMAs plus a reduction per key (measured break-even around R = 10 for D = 64).
constexpr int64_t kMaxRowModeRows = 8;

bool use_row_mode(const Problem& p, int64_t R) {
  return p.kern.qk_rows != nullptr && R <= kMaxRowModeRows;
}

void run_item(const Problem& p, const Item& it, float* scratch, int64_t rp_max, float* ws,
              int64_t slot_floats) {
  const int64_t D = p.D;
  const int64_t dp = round_up(D, 16);
  const ItemBufs t = carve(scratch, rp_max, dp);
  const int64_t na = active_heads(p, it.b, it.g, t.heads);
  const int64_t bm_rows = it.rows;
  const int64_t R = na * bm_rows;
  const int64_t rp = round_up(R, p.kern.lanes);
  const bool rows_mode = use_row_mode(p, R);

  const int64_t L = key_len(p, it.b);
  for (int64_t r = 0; r < rp; ++r) {
    int64_t a = 0, e = 0;
    if (r < R) row_range(p, L, it.i0 + r % bm_rows, &a, &e);
    t.lo[r] = static_cast<int32_t>(a);
    t.hi[r] = static_cast<int32_t>(e);
    t.m[r] = kNegInf;
    t.l[r] = 0.0f;
  }
  // Keys every row sees: [lo of the last position, hi of the first).
  int64_t all_lo = 0, all_hi = 0, unused = 0;
  row_range(p, L, it.i0 + bm_rows - 1, &all_lo, &unused);
  row_range(p, L, it.i0, &unused, &all_hi);

  if (rows_mode) {
    for (int64_t r = 0; r < R; ++r) {
      float* qr = t.q + r * dp;
      load_vec(p, q_row(p, it.b, t.heads[r / bm_rows], it.i0 + r % bm_rows), p.qs.d, t.row);
      for (int64_t d = 0; d < D; ++d) qr[d] = t.row[d] * p.qscale;
      for (int64_t d = D; d < dp; ++d) qr[d] = 0.0f;
    }
    std::memset(t.o, 0, static_cast<size_t>(R * dp) * sizeof(float));
  } else {
    for (int64_t d = 0; d < D; ++d) {
      for (int64_t r = R; r < rp; ++r) t.q[d * rp + r] = 0.0f;
    }
    for (int64_t r = 0; r < R; ++r) {
      load_vec(p, q_row(p, it.b, t.heads[r / bm_rows], it.i0 + r % bm_rows), p.qs.d, t.row);
      for (int64_t d = 0; d < D; ++d) t.q[d * rp + r] = t.row[d] * p.qscale;
    }
    std::memset(t.o, 0, static_cast<size_t>(D * rp) * sizeof(float));
  }

  const int8_t* km_row = p.key_mask != nullptr ? p.key_mask + it.b * p.Sk : nullptr;
  const int64_t n = it.k1 - it.k0;
  for (int64_t j0 = it.k0; j0 < it.k1;) {
    // The first block takes the remainder so that the last one ends at k1.
    const int64_t nj = j0 == it.k0 && n % kBlockN != 0 ? n % kBlockN : kBlockN;
    const int64_t j1 = j0 + nj;
    int64_t kst = 0, vst = 0;
    const float* kp = block_rows(p, p.k, p.ks, it.b, it.g, j0, nj, t.kbuf, &kst);
    const float* vp = block_rows(p, p.v, p.vs, it.b, it.g, j0, nj, t.vbuf, &vst);
    const int8_t* km = km_row != nullptr ? km_row + j0 : nullptr;
    const bool full = j0 >= all_lo && j1 <= all_hi &&
                      (km == nullptr || std::memchr(km, 0, static_cast<size_t>(nj)) == nullptr);
    if (rows_mode) {
      const RowMask rm{t.lo, t.hi, static_cast<int32_t>(j0), km};
      p.kern.qk_rows(t.q, R, dp, kp, kst, nj, D, t.s, kBlockN);
      p.kern.softmax_rows(t.s, kBlockN, R, nj, full ? nullptr : &rm, t.m, t.l, t.alpha);
      p.kern.pv_rows(t.s, kBlockN, R, vp, vst, nj, D, t.o, dp, t.alpha);
    } else {
      const BlockMask bm{t.lo, t.hi, static_cast<int32_t>(j0), km};
      p.kern.qk(t.q, rp, kp, kst, nj, D, t.s);
      p.kern.softmax(t.s, rp, nj, full ? nullptr : &bm, t.m, t.l, t.alpha);
      p.kern.pv(t.s, rp, vp, vst, nj, D, t.o, t.alpha);
    }
    j0 = j1;
  }

  // O of row r, dim d, in either layout.
  const int64_t o_row = rows_mode ? dp : 1;
  const int64_t o_dim = rows_mode ? 1 : rp;
  if (it.slot >= 0) {
    // Partials are kept in the lanes-mode layout [D][rp], then m[rp], l[rp].
    float* dst = ws + it.slot * slot_floats;
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t d = 0; d < D; ++d) dst[d * rp + r] = t.o[r * o_row + d * o_dim];
      dst[D * rp + r] = t.m[r];
      dst[D * rp + rp + r] = t.l[r];
    }
    return;
  }
  for (int64_t r = 0; r < R; ++r) {
    const float lr = t.l[r];
    const float inv = lr > 0.0f ? 1.0f / lr : 0.0f;
    for (int64_t d = 0; d < D; ++d) t.row[d] = lr > 0.0f ? t.o[r * o_row + d * o_dim] * inv : 0.0f;
    store_vec(p, t.row, out_row(p, it.b, t.heads[r / bm_rows], it.i0 + r % bm_rows));
  }
}

// Combines the partials of a split tile (log-sum-exp) and writes its rows.
void merge_tile(const Problem& p, const SplitTile& t, const float* ws, int64_t slot_floats,
                int32_t* heads, float* row, float* acc) {
  const int64_t D = p.D;
  const int64_t na = active_heads(p, t.b, t.g, heads);
  const int64_t R = na * t.rows;
  const int64_t rp = round_up(R, p.kern.lanes);
  for (int64_t r = 0; r < R; ++r) {
    float mx = kNegInf;
    for (int64_t s = 0; s < t.parts; ++s) {
      mx = std::max(mx, ws[(t.slot0 + s) * slot_floats + D * rp + r]);
    }
    std::fill(acc, acc + D, 0.0f);
    float lsum = 0.0f;
    if (mx != kNegInf) {
      for (int64_t s = 0; s < t.parts; ++s) {
        const float* part = ws + (t.slot0 + s) * slot_floats;
        const float ms = part[D * rp + r];
        if (ms == kNegInf) continue;
        const float w = std::exp2(ms - mx);
        lsum += w * part[D * rp + rp + r];
        for (int64_t d = 0; d < D; ++d) acc[d] += w * part[d * rp + r];
      }
    }
    const float inv = lsum > 0.0f ? 1.0f / lsum : 0.0f;
    for (int64_t d = 0; d < D; ++d) row[d] = lsum > 0.0f ? acc[d] * inv : 0.0f;
    store_vec(p, row, out_row(p, t.b, heads[r / t.rows], t.i0 + r % t.rows));
  }
}

void zero_head(const Problem& p, int64_t b, int64_t h, const float* zeros) {
  for (int64_t i = 0; i < p.Sq; ++i) {
    char* dst = out_row(p, b, h, i);
    if (p.os.d == 1) {
      std::memset(dst, 0, static_cast<size_t>(p.D * p.es));  // +0.0 in every dtype
    } else {
      store_vec(p, zeros, dst);
    }
  }
}

// ===========================================================================
// Argument checks
// ===========================================================================

constexpr const char* kFn = "attention_fwd";

[[noreturn]] void bad_arg(const std::string& msg) {
  throw std::invalid_argument(std::string(kFn) + ": " + msg);
}

void check_size(const char* name, int64_t v, int64_t lo) {
  if (v < lo) bad_arg(std::string(name) + " must be >= " + std::to_string(lo) + ", got " +
                      std::to_string(v));
}

void check_strides(const char* name, const Strides4& s) {
  if (s.b < 0 || s.h < 0 || s.s < 0 || s.d < 0) {
    bad_arg(std::string(name) + " must be >= 0, got (" + std::to_string(s.b) + ", " +
            std::to_string(s.h) + ", " + std::to_string(s.s) + ", " + std::to_string(s.d) + ")");
  }
}

void check_not_null(const char* name, const void* ptr) {
  if (ptr == nullptr) bad_arg(std::string(name) + " is a null pointer");
}

}  // namespace

Strides4 make_strides4(const std::vector<int64_t>& v, const char* name) {
  if (v.size() != 4) {
    bad_arg(std::string(name) + " must have 4 entries (B, H, S, D strides in elements), got " +
            std::to_string(v.size()));
  }
  return Strides4{v[0], v[1], v[2], v[3]};
}

void attention_fwd(const void* q, const void* k, const void* v, void* out, DType dtype,
                   int64_t B, int64_t Hq, int64_t Hkv, int64_t Sq, int64_t Sk, int64_t D,
                   const Strides4& q_strides, const Strides4& k_strides,
                   const Strides4& v_strides, const Strides4& out_strides, bool causal,
                   double scale, int64_t window, const int8_t* key_mask,
                   const int32_t* cache_lens, const int8_t* head_active, int num_threads) {
  check_size("B", B, 0);
  check_size("Hq", Hq, 0);
  check_size("Hkv", Hkv, 1);
  check_size("Sq", Sq, 0);
  check_size("Sk", Sk, 0);
  check_size("D", D, 1);
  if (D > kMaxD) bad_arg("D must be <= " + std::to_string(kMaxD) + ", got " + std::to_string(D));
  if (Hq % Hkv != 0) {
    bad_arg("Hq (" + std::to_string(Hq) + ") must be a multiple of Hkv (" +
            std::to_string(Hkv) + ")");
  }
  constexpr int64_t kMaxSeq = std::numeric_limits<int32_t>::max();
  if (Sq >= kMaxSeq || Sk >= kMaxSeq) bad_arg("Sq and Sk must be < 2^31");
  check_strides("q_strides", q_strides);
  check_strides("k_strides", k_strides);
  check_strides("v_strides", v_strides);
  check_strides("out_strides", out_strides);
  check_size("window", window, 0);
  if (!std::isfinite(scale)) bad_arg("scale must be finite, got " + std::to_string(scale));
  check_size("threads", num_threads, 1);
  if (B == 0 || Hq == 0 || Sq == 0) return;
  check_not_null("q_ptr", q);
  check_not_null("out_ptr", out);
  if (Sk > 0) {
    check_not_null("k_ptr", k);
    check_not_null("v_ptr", v);
  }
  if (cache_lens != nullptr) {
    for (int64_t b = 0; b < B; ++b) {
      if (cache_lens[b] < 0 || cache_lens[b] > Sk) {
        bad_arg("cache_lens[" + std::to_string(b) + "] = " + std::to_string(cache_lens[b]) +
                " is outside [0, Sk = " + std::to_string(Sk) + "]");
      }
    }
  }

  Problem p{static_cast<const char*>(q),
            static_cast<const char*>(k),
            static_cast<const char*>(v),
            static_cast<char*>(out),
            dtype,
            element_size(dtype),
            B, Hq, Hkv, Sq, Sk, D, Hq / Hkv,
            q_strides, k_strides, v_strides, out_strides,
            causal,
            static_cast<float>(scale * kLog2e),
            window,
            key_mask, cache_lens, head_active,
            kernels_for(active_simd_level())};

  // Work items over (b, g, query tile); pruned heads are zeroed here.
  std::vector<int32_t> heads(static_cast<size_t>(p.G));
  std::vector<float> zeros(static_cast<size_t>(D), 0.0f);
  std::vector<Item> items;
  int64_t r_max = 1;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = key_len(p, b);
    for (int64_t g = 0; g < Hkv; ++g) {
      const int64_t na = active_heads(p, b, g, heads.data());
      for (int64_t a = 0; a < p.G; ++a) {
        if (!head_on(p, b, g * p.G + a)) zero_head(p, b, g * p.G + a, zeros.data());
      }
      if (na == 0) continue;
      const int64_t bm_rows = std::min(Sq, tile_rows(na));
      for (int64_t i0 = 0; i0 < Sq; i0 += bm_rows) {
        const int64_t rows = std::min(bm_rows, Sq - i0);
        int64_t k0 = 0, k1 = 0, unused = 0;
        row_range(p, L, i0, &k0, &unused);
        row_range(p, L, i0 + rows - 1, &unused, &k1);
        k1 = std::max(k0, k1);
        const int64_t R = na * rows;
        r_max = std::max(r_max, R);
        // Row mode costs about 1.5 lanes-mode rows per row (see kMaxRowModeRows).
        const double eff_rows = use_row_mode(p, R) ? 1.5 * static_cast<double>(R)
                                                   : static_cast<double>(round_up(R, p.kern.lanes));
        items.push_back({b, g, i0, rows, k0, k1, -1,
                         eff_rows * static_cast<double>(k1 - k0 + 8) * static_cast<double>(D)});
      }
    }
  }
  if (items.empty()) return;
  const int64_t rp_max = round_up(std::max<int64_t>(r_max, p.G), p.kern.lanes);

  double total = 0.0;
  for (const Item& it : items) total += it.cost;
  int threads = num_threads;
  if (total * kNsPerRowKeyDim < kMinParallelNs) threads = 1;

  // Few items for the threads (decode): split key ranges into parts merged afterwards.
  std::vector<SplitTile> splits;
  int64_t slots = 0;
  const int64_t base_items = static_cast<int64_t>(items.size());
  if (threads > 1 && base_items < 4 * static_cast<int64_t>(threads)) {
    const int64_t want = (4 * threads + base_items - 1) / base_items;
    std::vector<Item> split_items;
    for (const Item& it : items) {
      const int64_t n = it.k1 - it.k0;
      const int64_t parts = std::min(want, n / kMinSplitKeys);
      if (parts <= 1) {
        split_items.push_back(it);
        continue;
      }
      splits.push_back({it.b, it.g, it.i0, it.rows, slots, parts});
      for (int64_t s = 0; s < parts; ++s) {
        Item part = it;
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
                   [](const Item& a, const Item& b) { return a.cost > b.cost; });

  const int64_t slot_floats = D * rp_max + 2 * rp_max;
  std::vector<float> ws(static_cast<size_t>(std::max<int64_t>(1, slots * slot_floats)));
  const int64_t n_items = static_cast<int64_t>(items.size());
  threads = static_cast<int>(std::min<int64_t>(threads, n_items));
  std::atomic<int64_t> next{0};
  auto worker = [&](int64_t, int64_t) {
    thread_local Arena arena;
    float* scratch = arena.get(static_cast<size_t>(scratch_floats(rp_max, round_up(D, 16))));
    for (;;) {
      const int64_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= n_items) break;
      run_item(p, items[static_cast<size_t>(i)], scratch, rp_max, ws.data(), slot_floats);
    }
  };
  parallel_for(threads, threads, worker, 1);

  if (!splits.empty()) {
    std::vector<float> row(static_cast<size_t>(D)), acc(static_cast<size_t>(D));
    for (const SplitTile& t : splits) {
      merge_tile(p, t, ws.data(), slot_floats, heads.data(), row.data(), acc.data());
    }
  }
}

}  // namespace sentinel
