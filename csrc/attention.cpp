#include "attention.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "args.h"
#include "cpu_features.h"
#include "dtype_access.h"
#include "softmax_simd.h"

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
// Masking. Each row has a visible key range [lo, hi) (from L_b, causal, window and the
// row's segment start when prompts are packed: lo >= seg_start[b, i]); the
// key mask is per key. A block that every row of the item sees completely (and with no
// masked key) runs without any masking; only blocks on the diagonal / window edge /
// padding compare key indices against the per-lane lo, hi. Blocks are aligned to the
// end of the item's key range, so the diagonal block ends exactly at the last row's
// last key and the short block (the remainder) is the first one. Blocks no row sees are
// never visited. Rows with no visible key keep l = 0 and are written as zeros.
//
// Threading (softmax_simd.h's work items). Items are sorted by estimated cost (largest
// first) and handed out through an atomic counter to the caller and num_threads - 1 pool
// workers, so causal tiles of very different lengths still balance. When there are fewer
// than 4 items per thread (decode: B * Hkv items of Sq * G rows), each item's key range
// is split into parts of at least kMinSplitKeys keys whose unnormalised (O, m, l) are
// merged with the log-sum-exp rule. Problems worth less than kMinParallelNs run on the
// calling thread. 2^x and the row-mode kernels are those of softmax_simd.h.
//
// Measured on the 2-vCPU AVX-512 VM (2.6 GHz, shared, so +-10%): B1 Hq9 Hkv3 S1024 D64
// causal fp32 prefill 8.4 ms on 1 thread (about 145 GFLOP/s counted on the computed
// tiles, ~87% of the FMA peak), 4.4 ms on 2; the HF eager sequence (repeat_kv, matmul,
// mask add, softmax, matmul) in torch fp32 took 83 ms (1 thread) / 115 ms (2 threads)
// there, and torch's SDPA 17 ms. With 4 of the 9 heads pruned: 0.42-0.57x the dense
// time depending on which heads (fewer rows per item when a group keeps one head).

namespace sentinel {
namespace {

constexpr const char* kFn = "attention_fwd";
constexpr int64_t kBlockN = 64;  // keys per block

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
struct Kernels {
  int64_t lanes;
  QkFn qk;
  SoftmaxFn softmax;
  PvFn pv;
  // Row mode (softmax_simd.h), used for items of at most kMaxRowModeRows rows where
  // row_mode is set; load_row / store_row at every level.
  RowKernels rows;
  bool row_mode;
};

// ===========================================================================
// Scalar kernels (reference structure for the SIMD ones; 8 "lanes" of layout)
// ===========================================================================

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

#if defined(SENTINEL_X86_64)

constexpr int kTile = 6;  // keys (QK) / head dims (PV) per register tile

// AVX-512 kernels (16 lanes) and AVX2 + FMA kernels (8 lanes); rows_* holds V and the
// register tile helpers of the level.
namespace lanes_avx512 {
using namespace rows_avx512;
SK_BEGIN_TARGET_AVX512
#include "attention_lanes.h"
SK_END_TARGET
}  // namespace lanes_avx512

namespace lanes_avx2 {
using namespace rows_avx2;
SK_BEGIN_TARGET_AVX2
#include "attention_lanes.h"
SK_END_TARGET
}  // namespace lanes_avx2

#endif  // SENTINEL_X86_64

Kernels kernels_for(SimdLevel level) {
  const RowKernels rows = row_kernels(level);
#if defined(SENTINEL_X86_64)
  if (level >= SimdLevel::kAvx512) {
    return {16, &lanes_avx512::qk, &lanes_avx512::softmax, &lanes_avx512::pv, rows, true};
  }
  if (level >= SimdLevel::kAvx2) {
    return {8, &lanes_avx2::qk, &lanes_avx2::softmax, &lanes_avx2::pv, rows, false};
  }
#endif
  return {8, &qk_scalar, &softmax_scalar, &pv_scalar, rows, false};
}

// ===========================================================================
// Driver
// ===========================================================================

struct Problem {
  AttnIo io;  // q, out
  const char* k;
  const char* v;
  int64_t B, Hq, Hkv, Sq, Sk, D, G;
  Strides4 ks, vs;
  bool causal;
  float qscale;  // scale * log2(e)
  int64_t window;
  const int8_t* key_mask;
  const int32_t* cache_lens;
  const int8_t* head_active;
  const int32_t* seg_start;  // [B, Sq] contiguous, or null
  Kernels kern;
};

inline int64_t key_len(const Problem& p, int64_t b) {
  return p.cache_lens != nullptr ? p.cache_lens[b] : p.Sk;
}

// Visible keys [lo, hi) of query position i of batch row b, in a row of L keys.
inline void row_range(const Problem& p, int64_t b, int64_t L, int64_t i, int64_t* lo,
                      int64_t* hi) {
  const int64_t pos = L - p.Sq + i;
  int64_t a = 0, e = L;
  if (p.causal) e = std::min(L, pos + 1);
  if (p.window > 0) a = std::max<int64_t>(0, pos - p.window + 1);
  if (p.seg_start != nullptr) a = std::max<int64_t>(a, p.seg_start[b * p.Sq + i]);
  *lo = a;
  *hi = std::max(a, e);
}

// Rows of one K or V block as fp32: the caller's memory when it already is fp32 rows
// with unit stride along D, else converted into buf (row stride D).
const float* block_rows(const Problem& p, const char* base, const Strides4& st, int64_t b,
                        int64_t g, int64_t j0, int64_t nj, float* buf, int64_t* row_stride) {
  const int64_t es = p.io.es;
  const char* first = base + (b * st.b + g * st.h + j0 * st.s) * es;
  if (p.io.dtype == DType::kFloat32 && st.d == 1) {
    *row_stride = st.s;
    return reinterpret_cast<const float*>(first);
  }
  for (int64_t j = 0; j < nj; ++j) p.io.load(first + j * st.s * es, st.d, buf + j * p.D);
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
  return p.kern.row_mode && R <= kMaxRowModeRows;
}

// Parts of split key ranges are kept in the lanes-mode layout: O^T [D][rp], then m[rp],
// l[rp] (rp = R rounded up to the lanes).
PartLayout part_layout(const Problem& p, int64_t R) {
  const int64_t rp = round_up(R, p.kern.lanes);
  return PartLayout{1, rp, p.D * rp, p.D * rp + rp};
}

void run_item(const Problem& p, const AttnItem& it, float* scratch, int64_t rp_max, float* ws,
              int64_t slot_floats) {
  const int64_t D = p.D;
  const int64_t dp = round_up(D, 16);
  const ItemBufs t = carve(scratch, rp_max, dp);
  const int64_t na = active_heads(p.head_active, p.Hq, p.G, it.b, it.g, t.heads);
  const int64_t bm_rows = it.rows;
  const int64_t R = na * bm_rows;
  const int64_t rp = round_up(R, p.kern.lanes);
  const bool rows_mode = use_row_mode(p, R);
  const AttnIo& io = p.io;

  const int64_t L = key_len(p, it.b);
  for (int64_t r = 0; r < rp; ++r) {
    int64_t a = 0, e = 0;
    if (r < R) row_range(p, it.b, L, it.i0 + r % bm_rows, &a, &e);
    t.lo[r] = static_cast<int32_t>(a);
    t.hi[r] = static_cast<int32_t>(e);
    t.m[r] = kNegInf;
    t.l[r] = 0.0f;
  }
  // Keys every row sees: [the largest lo, the smallest hi) over the item's positions
  // (segment starts need not grow with the position, so every position is looked at).
  int64_t all_lo = 0, all_hi = std::numeric_limits<int64_t>::max();
  for (int64_t r = 0; r < bm_rows; ++r) {
    all_lo = std::max<int64_t>(all_lo, t.lo[r]);
    all_hi = std::min<int64_t>(all_hi, t.hi[r]);
  }

  if (rows_mode) {
    for (int64_t r = 0; r < R; ++r) {
      float* qr = t.q + r * dp;
      io.load(io.q_row(it.b, t.heads[r / bm_rows], it.i0 + r % bm_rows), io.qs.d, t.row);
      for (int64_t d = 0; d < D; ++d) qr[d] = t.row[d] * p.qscale;
      for (int64_t d = D; d < dp; ++d) qr[d] = 0.0f;
    }
    std::memset(t.o, 0, static_cast<size_t>(R * dp) * sizeof(float));
  } else {
    for (int64_t d = 0; d < D; ++d) {
      for (int64_t r = R; r < rp; ++r) t.q[d * rp + r] = 0.0f;
    }
    for (int64_t r = 0; r < R; ++r) {
      io.load(io.q_row(it.b, t.heads[r / bm_rows], it.i0 + r % bm_rows), io.qs.d, t.row);
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
      p.kern.rows.qk(t.q, R, dp, kp, kst, nj, D, t.s, kBlockN);
      p.kern.rows.softmax(t.s, kBlockN, R, nj, full ? nullptr : &rm, t.m, t.l, t.alpha);
      p.kern.rows.pv(t.s, kBlockN, R, vp, vst, nj, D, t.o, dp, t.alpha);
    } else {
      const BlockMask bm{t.lo, t.hi, static_cast<int32_t>(j0), km};
      p.kern.qk(t.q, rp, kp, kst, nj, D, t.s);
      p.kern.softmax(t.s, rp, nj, full ? nullptr : &bm, t.m, t.l, t.alpha);
      p.kern.pv(t.s, rp, vp, vst, nj, D, t.o, t.alpha);
    }
    j0 = j1;
  }

  // O of row r, dim d, in either layout.
  finish_item(io, it, t.heads, R, t.o, rows_mode ? dp : 1, rows_mode ? 1 : rp, t.m, t.l,
              part_layout(p, R), ws, slot_floats, t.row);
}

}  // namespace

void attention_fwd(const void* q, const void* k, const void* v, void* out, DType dtype,
                   int64_t B, int64_t Hq, int64_t Hkv, int64_t Sq, int64_t Sk, int64_t D,
                   const Strides4& q_strides, const Strides4& k_strides,
                   const Strides4& v_strides, const Strides4& out_strides, bool causal,
                   double scale, int64_t window, const int8_t* key_mask,
                   const int32_t* cache_lens, const int8_t* head_active, int num_threads,
                   const int32_t* seg_start) {
  check_min(kFn, "B", B, 0);
  check_min(kFn, "Hq", Hq, 0);
  check_min(kFn, "Hkv", Hkv, 1);
  check_min(kFn, "Sq", Sq, 0);
  check_min(kFn, "Sk", Sk, 0);
  check_min(kFn, "D", D, 1);
  if (D > kMaxHeadDim) {
    bad_arg(kFn, "D must be <= " + std::to_string(kMaxHeadDim) + ", got " + std::to_string(D));
  }
  if (Hq % Hkv != 0) {
    bad_arg(kFn, "Hq (" + std::to_string(Hq) + ") must be a multiple of Hkv (" +
                     std::to_string(Hkv) + ")");
  }
  constexpr int64_t kMaxSeq = std::numeric_limits<int32_t>::max();
  if (Sq >= kMaxSeq || Sk >= kMaxSeq) bad_arg(kFn, "Sq and Sk must be < 2^31");
  check_nonneg(kFn, "q_strides", q_strides);
  check_nonneg(kFn, "k_strides", k_strides);
  check_nonneg(kFn, "v_strides", v_strides);
  check_nonneg(kFn, "out_strides", out_strides);
  check_min(kFn, "window", window, 0);
  if (!std::isfinite(scale)) bad_arg(kFn, "scale must be finite, got " + std::to_string(scale));
  check_min(kFn, "threads", num_threads, 1);
  if (B == 0 || Hq == 0 || Sq == 0) return;
  check_not_null(kFn, "q_ptr", q);
  check_not_null(kFn, "out_ptr", out);
  if (Sk > 0) {
    check_not_null(kFn, "k_ptr", k);
    check_not_null(kFn, "v_ptr", v);
  }
  if (cache_lens != nullptr) {
    for (int64_t b = 0; b < B; ++b) {
      if (cache_lens[b] < 0 || cache_lens[b] > Sk) {
        bad_arg(kFn, "cache_lens[" + std::to_string(b) + "] = " + std::to_string(cache_lens[b]) +
                         " is outside [0, Sk = " + std::to_string(Sk) + "]");
      }
    }
  }

  const Kernels kern = kernels_for(active_simd_level());
  const Problem p{AttnIo{static_cast<const char*>(q), static_cast<char*>(out), dtype,
                         element_size(dtype), D, q_strides, out_strides, kern.rows},
                  static_cast<const char*>(k),
                  static_cast<const char*>(v),
                  B, Hq, Hkv, Sq, Sk, D, Hq / Hkv,
                  k_strides, v_strides,
                  causal,
                  static_cast<float>(scale * kLog2e),
                  window,
                  key_mask, cache_lens, head_active, seg_start,
                  kern};

  // Work items over (b, g, query tile); pruned heads are zeroed here.
  std::vector<AttnItem> items;
  const auto key_range = [&](int64_t b, int64_t i, int64_t* lo, int64_t* hi) {
    row_range(p, b, key_len(p, b), i, lo, hi);
  };
  // Row mode costs about 1.5 lanes-mode rows per row (see kMaxRowModeRows).
  const auto cost = [&](int64_t R, int64_t keys) {
    const double eff_rows = use_row_mode(p, R) ? 1.5 * static_cast<double>(R)
                                               : static_cast<double>(round_up(R, kern.lanes));
    return eff_rows * static_cast<double>(keys + 8) * static_cast<double>(D);
  };
  const int64_t r_max = make_items(p.io, B, Hq, Hkv, Sq, head_active, key_range, cost, &items);
  if (items.empty()) return;
  const int64_t rp_max = round_up(std::max<int64_t>(r_max, p.G), kern.lanes);

  const int threads = threads_for(items, num_threads);
  // Few items for the threads (decode): split key ranges into parts merged afterwards.
  std::vector<SplitTile> splits;
  const int64_t slots = split_and_sort(items, threads, &splits);
  const int64_t slot_floats = D * rp_max + 2 * rp_max;
  std::vector<float> ws(static_cast<size_t>(std::max<int64_t>(1, slots * slot_floats)));
  const size_t need = static_cast<size_t>(scratch_floats(rp_max, round_up(D, 16)));
  run_items(items, threads, need, [&](const AttnItem& it, float* scratch) {
    run_item(p, it, scratch, rp_max, ws.data(), slot_floats);
  });
  merge_splits(p.io, splits, ws.data(), slot_floats, head_active, Hq, p.G,
               [&](int64_t R) { return part_layout(p, R); });
}

}  // namespace sentinel
