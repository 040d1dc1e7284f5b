#include "kv_cache.h"

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
// kv_append. One pass per token row (b, h, i): the row is read once into an fp32 buffer,
// each group's max / min, scale and codes are computed and stored. Every step of the
// quantization rule is one correctly rounded fp32 operation (division, subtraction,
// conversion to fp16 with round-to-nearest-even, rint half-to-even), exactly the
// operations of reference.quantize_kv, so the codes and scales are bit-identical to it
// (there is no multiply in the rule, so no multiply-add contraction can creep in). Token
// rows are spread over the thread pool; distinct tokens of one append land in distinct
// slots (wrap: only the last L tokens are written), so chunks never write the same row.
//
// decode_attention_kv. The structure of attention.cpp's row mode (rows = query rows in
// memory order, online softmax, scores in base 2 with log2(e) folded into the query
// scale): a work item is (batch row b, KV head g, tile of query positions) with the rows
// of every active query head of the group, so each K/V block it reads is shared by the G
// heads of the group. Keys are visited in blocks of positions that come from one store
// (the compressed cache or the recent ring) and sit in consecutive slots (blocks are cut
// at the recent boundary len - W, at multiples of L when the cache wraps and at multiples
// of W inside the ring), so a block is a base pointer plus a row stride. Per block the K
// and V rows are turned into fp32 in a small per-thread buffer (nb rows of D, at most
// 16 KiB each; never a copy of the cache):
//   * dense fp32 rows with unit stride are read in place; fp16 / bf16 rows are converted;
//   * int8 with one scale group per vector: the codes are only converted to fp32 and the
//     per-token scale is folded into the scores (s_j *= ks_j after the dot product) and
//     into the probabilities for V (p_j * vs_j), so nothing is multiplied per channel;
//   * int8 with G > 1 groups and int4 are dequantized (code * s, code * s + m).
// A key masked by the slot key mask gets a zero V row (and a zero V scale), since an
// unwritten slot may hold anything and 0 * NaN would leak into the other keys' sum.
// Blocks every row sees completely (and with no masked key) skip the masking.
//
// Threading as in attention.cpp: items handed out through an atomic counter; when there
// are fewer than 4 items per thread (decode: B * Hkv items), each item's key range is cut
// into parts of at least kMinSplitKeys keys whose unnormalised (O, m, l) are merged with
// the log-sum-exp rule out = sum_s 2^(m_s - M) O_s / sum_s 2^(m_s - M) l_s.
//
// SIMD: the score, softmax, P.V, dequantization and row-conversion kernels have scalar,
// AVX2 + FMA + F16C (8 lanes) and AVX-512 F + BW (16 lanes) versions chosen from
// active_simd_level() on every call (avx512_vnni uses the AVX-512 ones). Scores: one
// accumulator per key along D for 8 (16) keys, folded into one vector of 8 (16) scores
// by a transposing reduction; P.V: register tiles of up to 4 rows x 4 vectors of V. Group
// scales are broadcast per vector, so a group width that is not a multiple of the vector
// width falls back to the next narrower dequantization kernel (scalar at worst).
// kv_append is scalar at every level: its rounding rule is the contract, and one pass
// over a token row is cheap next to the model's projections.
//
// KIVI keys (key_block = T > 0). kv_append_key_blocks works per (b, h) row: each block the
// append completes is gathered channel-major ([D][T], its older keys from the ring) and
// every channel's T values go through quant_group_int4, the per-token quantizer, so the
// rule is shared bit for bit; then the new keys go to the ring. In decode, the ring
// boundary becomes floor(len / T) * T and a store block of keys is dequantized with the
// per-channel (s, m) of its KIVI block converted to fp32 once per block (deq_kivi: code *
// s[c] + m[c]); everything else (values, masks, splits) is the per-token path.

namespace sentinel {
namespace {

constexpr const char* kAppendFn = "kv_append";
constexpr const char* kDecodeFn = "decode_attention_kv";
constexpr const char* kKeyBlocksFn = "kv_append_key_blocks";

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr double kLog2e = 1.44269504088896340736;
constexpr float kF16Max = 65504.0f;
// 2^x is taken as exactly 0 below this (as in attention.cpp: such a term is below 2^-125
// relative to the row's largest one; also maps masked scores, -inf, to exact zeros).
constexpr float kExpFloor = -125.0f;
// 2^f ~ sum_i kExp2C[i] f^i on [-1/2, 1/2] (attention.cpp's fit, under 2 ulp in fp32).
constexpr float kExp2C0 = 1.0f;
constexpr float kExp2C1 = 6.931471825e-01f;
constexpr float kExp2C2 = 2.402264625e-01f;
constexpr float kExp2C3 = 5.550328642e-02f;
constexpr float kExp2C4 = 9.618488140e-03f;
constexpr float kExp2C5 = 1.339993323e-03f;
constexpr float kExp2C6 = 1.534603944e-04f;

constexpr int64_t kMaxD = 256;
constexpr int64_t kRowTarget = 64;      // query rows per item
constexpr int64_t kMinSplitKeys = 256;  // keys per part when an item's key range is split
constexpr int64_t kBlockBytes = 16384;  // fp32 K (or V) block buffer
// Score rows are padded to a multiple of this many keys (filled with -inf), so that the
// softmax kernels work on whole vectors.
constexpr int64_t kKeyPad = 16;
// Cost model of the threading decision: ns per (row + 2) x key x head dim (the +2 is
// the per-key conversion of K and V) and the least work worth a hand-off to the pool.
constexpr double kNsPerRowKeyDim = 0.03;
constexpr double kMinParallelNs = 3000.0;
// Below this many input elements per chunk an append is not worth a worker hand-off.
constexpr int64_t kAppendGrainElems = 8192;

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

[[noreturn]] void bad_arg(const char* fn, const std::string& msg) {
  throw std::invalid_argument(std::string(fn) + ": " + msg);
}

// ===========================================================================
// Argument checks shared by both entry points
// ===========================================================================

void check_size(const char* fn, const char* name, int64_t v, int64_t lo) {
  if (v < lo) {
    bad_arg(fn, std::string(name) + " must be >= " + std::to_string(lo) + ", got " +
                    std::to_string(v));
  }
}

void check_ptr(const char* fn, const char* name, const void* p) {
  if (p == nullptr) bad_arg(fn, std::string(name) + " is a null pointer");
}

std::string fmt_strides(const int64_t* s, int n) {
  std::string r = "(";
  for (int i = 0; i < n; ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + ")";
}

void check_nonneg(const char* fn, const char* name, const int64_t* s, int n) {
  for (int i = 0; i < n; ++i) {
    if (s[i] < 0) bad_arg(fn, std::string(name) + " must be >= 0, got " + fmt_strides(s, n));
  }
}

// True when the n-dim index space (sizes, strides) maps distinct index tuples to
// disjoint runs of `width` elements (width 1: distinct elements). Dims of size 1 are
// ignored (their stride is never stepped). Sufficient, not necessary: a layout whose
// dims interleave is refused even where it happens not to collide.
bool rows_disjoint(const int64_t* sizes, const int64_t* strides, int n, int64_t width) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size)
  for (int i = 0; i < n; ++i) {
    if (sizes[i] > 1) dims.emplace_back(strides[i], sizes[i]);
  }
  std::sort(dims.begin(), dims.end());
  int64_t extent = width;  // elements spanned by the dims visited so far
  for (const auto& [stride, size] : dims) {
    if (stride < extent) return false;
    extent = stride * (size - 1) + extent;
  }
  return true;
}

// Group width g = ceil(D / G), checked like reference.kv_groups.
int64_t group_width(const char* fn, int64_t D, int64_t G) {
  if (G < 1 || G > D) {
    bad_arg(fn, "n_groups must be in [1, D = " + std::to_string(D) + "], got " +
                    std::to_string(G));
  }
  const int64_t g = (D + G - 1) / G;
  if ((D + g - 1) / g != G) {
    bad_arg(fn, "D = " + std::to_string(D) + " cannot be cut into n_groups = " +
                    std::to_string(G) + " groups of ceil(D / n_groups) = " + std::to_string(g) +
                    " channels");
  }
  return g;
}

// ===========================================================================
// Quantize-on-append (scalar; bit-exact with reference.quantize_kv)
// ===========================================================================

// torch.minimum(v, 65504) then the clamp of reference._to_f16, then fp32 -> fp16 (round
// to nearest even). NaN stays NaN (both comparisons are false).
inline uint16_t to_f16_clamped(float v) {
  if (v > kF16Max) v = kF16Max;
  if (v < -kF16Max) v = -kF16Max;
  return float_to_half(v);
}

// clamp(rint(v), lo, hi) with rint half-to-even (std::nearbyint under the default
// rounding mode, which nothing in this extension changes); NaN -> 0.
inline int rint_clamp(float v, float lo, float hi) {
  if (!(v == v)) return 0;
  float r = std::nearbyint(v);
  r = std::min(std::max(r, lo), hi);
  return static_cast<int>(r);
}

// x: g fp32 values of one group. codes[c] (one per channel), returns the fp16 scale.
uint16_t quant_group_int8(const float* x, int64_t n, int8_t* codes) {
  float a = 0.0f;
  for (int64_t c = 0; c < n; ++c) {
    const float v = std::fabs(x[c]);
    if (v > a) a = v;  // NaN is ignored (as the reference's masked amax)
  }
  const float t = a / 127.0f;  // IEEE division (never a reciprocal multiply)
  const uint16_t s16 = to_f16_clamped(t);
  const float s = half_to_float(s16);
  for (int64_t c = 0; c < n; ++c) {
    codes[c] = s == 0.0f ? int8_t{0} : static_cast<int8_t>(rint_clamp(x[c] / s, -127.0f, 127.0f));
  }
  return s16;
}

// codes[c] in [0, 15]; sm[0] = fp16 scale, sm[1] = fp16 minimum.
void quant_group_int4(const float* x, int64_t n, uint8_t* codes, uint16_t* sm) {
  float lo = std::numeric_limits<float>::infinity();
  float hi = -std::numeric_limits<float>::infinity();
  for (int64_t c = 0; c < n; ++c) {
    const float v = x[c];
    if (v < lo) lo = v;
    if (v > hi) hi = v;
  }
  const float t = (hi - lo) / 15.0f;
  const uint16_t s16 = to_f16_clamped(t);
  const uint16_t m16 = to_f16_clamped(lo);
  const float s = half_to_float(s16);
  const float m = half_to_float(m16);
  for (int64_t c = 0; c < n; ++c) {
    const float d = x[c] - m;  // one rounding, then one more for the division
    codes[c] = s == 0.0f ? uint8_t{0} : static_cast<uint8_t>(rint_clamp(d / s, 0.0f, 15.0f));
  }
  sm[0] = s16;
  sm[1] = m16;
}

struct AppendProblem {
  const char* x;
  DType x_dtype;
  int64_t x_es;
  char* cache;
  DType cache_dtype;
  int64_t cache_es;
  uint16_t* scales;
  KvFormat fmt;
  int64_t B, H, S, D, L, G, gw;
  Strides4 xs;
  Strides3 cs, ss;
  const int32_t* start;
  bool wrap;
  int64_t i_first;  // first token written (wrap with S > L: the last L only)
};

// One token row: x[b, h, i] -> its slot (if written).
void append_token(const AppendProblem& p, int64_t b, int64_t h, int64_t i, float* buf,
                  uint8_t* codes) {
  const int64_t pos = static_cast<int64_t>(p.start[b]) + i;
  int64_t slot;
  if (p.wrap) {
    slot = pos % p.L;
  } else {
    if (pos >= p.L) return;
    slot = pos;
  }
  const char* src = p.x + (b * p.xs.b + h * p.xs.h + i * p.xs.s) * p.x_es;
  char* dst_row = p.cache + (b * p.cs.b + h * p.cs.h + slot * p.cs.l) *
                                (p.fmt == KvFormat::kDense ? p.cache_es : 1);
  if (p.fmt == KvFormat::kDense) {
    if (p.cache_dtype == p.x_dtype && p.xs.d == 1) {
      std::memcpy(dst_row, src, static_cast<size_t>(p.D * p.x_es));
    } else {
      for (int64_t c = 0; c < p.D; ++c) {
        store1(dst_row, p.cache_dtype, c, load1(src, p.x_dtype, c * p.xs.d));
      }
    }
    return;
  }
  for (int64_t c = 0; c < p.D; ++c) buf[c] = load1(src, p.x_dtype, c * p.xs.d);
  uint16_t* sc = p.scales + b * p.ss.b + h * p.ss.h + slot * p.ss.l;
  if (p.fmt == KvFormat::kInt8) {
    int8_t* q = reinterpret_cast<int8_t*>(dst_row);
    for (int64_t g = 0; g < p.G; ++g) {
      const int64_t c0 = g * p.gw;
      const int64_t n = std::min(p.gw, p.D - c0);
      sc[g] = quant_group_int8(buf + c0, n, q + c0);
    }
    return;
  }
  for (int64_t g = 0; g < p.G; ++g) {
    const int64_t c0 = g * p.gw;
    const int64_t n = std::min(p.gw, p.D - c0);
    quant_group_int4(buf + c0, n, codes + c0, sc + 2 * g);
  }
  uint8_t* packed = reinterpret_cast<uint8_t*>(dst_row);
  const int64_t nbytes = (p.D + 1) / 2;
  for (int64_t k = 0; k < nbytes; ++k) {
    const uint8_t lo = codes[2 * k];
    const uint8_t hi = 2 * k + 1 < p.D ? codes[2 * k + 1] : uint8_t{0};
    packed[k] = static_cast<uint8_t>(lo | (hi << 4));
  }
}

// ===========================================================================
// KIVI keys: per-channel int4 over blocks of T positions (scalar; bit-exact with
// reference.kv_append_key_blocks)
// ===========================================================================

// v rounded to dtype d and back (what a store to a tensor of dtype d keeps).
inline float round_to(DType d, float v) {
  if (d == DType::kFloat16) return half_to_float(float_to_half(v));
  if (d == DType::kBFloat16) return bf16_to_float(float_to_bf16(v));
  return v;
}

struct KeyBlockProblem {
  const char* x;
  DType x_dtype;
  int64_t x_es;
  uint8_t* codes;
  uint16_t* scales;
  char* ring;
  DType ring_dtype;
  int64_t ring_es;
  int64_t H, S, D, L, W, T;
  Strides4 xs;
  Strides3 cs, ss, rs;
  const int32_t* start;
};

// Scratch of one (b, h): vals [D][T] (channel-major, so a channel's T values are one run
// for quant_group_int4) and their codes q [D][T].
struct KeyBlockScratch {
  float* vals;
  uint8_t* q;
};

// Row (b, h): the blocks this append completes, then the ring writes (in that order: the
// first block may still need ring slots the chunk's last keys overwrite).
void append_key_blocks_row(const KeyBlockProblem& p, int64_t b, int64_t h,
                           const KeyBlockScratch& t) {
  const int64_t st = p.start[b];
  const int64_t end = st + p.S;
  const int64_t T = p.T, D = p.D;
  const char* xrow0 = p.x + (b * p.xs.b + h * p.xs.h) * p.x_es;
  char* ring0 = p.ring + (b * p.rs.b + h * p.rs.h) * p.ring_es;
  const int64_t blk_end = std::min(end / T, p.L / T);  // blocks past L are skipped
  for (int64_t i = st / T; i < blk_end; ++i) {
    for (int64_t k = 0; k < T; ++k) {
      const int64_t j = i * T + k;
      if (j < st) {
        const char* src = ring0 + (j % p.W) * p.rs.l * p.ring_es;
        for (int64_t c = 0; c < D; ++c) t.vals[c * T + k] = load1(src, p.ring_dtype, c);
      } else {
        // Rounded to the ring's dtype first: the block quantizes the numbers the ring
        // would have held, wherever its keys came from.
        const char* src = xrow0 + (j - st) * p.xs.s * p.x_es;
        for (int64_t c = 0; c < D; ++c) {
          t.vals[c * T + k] = round_to(p.ring_dtype, load1(src, p.x_dtype, c * p.xs.d));
        }
      }
    }
    uint16_t* sc = p.scales + b * p.ss.b + h * p.ss.h + i * p.ss.l;
    for (int64_t c = 0; c < D; ++c) quant_group_int4(t.vals + c * T, T, t.q + c * T, sc + 2 * c);
    const int64_t nbytes = (D + 1) / 2;
    for (int64_t k = 0; k < T; ++k) {
      uint8_t* dst = p.codes + b * p.cs.b + h * p.cs.h + (i * T + k) * p.cs.l;
      for (int64_t byte = 0; byte < nbytes; ++byte) {
        const uint8_t lo = t.q[(2 * byte) * T + k];
        const uint8_t hi = 2 * byte + 1 < D ? t.q[(2 * byte + 1) * T + k] : uint8_t{0};
        dst[byte] = static_cast<uint8_t>(lo | (hi << 4));
      }
    }
  }
  for (int64_t j = std::max(st, end - p.W); j < end; ++j) {
    const char* src = xrow0 + (j - st) * p.xs.s * p.x_es;
    char* dst = ring0 + (j % p.W) * p.rs.l * p.ring_es;
    if (p.ring_dtype == p.x_dtype && p.xs.d == 1) {
      std::memcpy(dst, src, static_cast<size_t>(D * p.x_es));
    } else {
      for (int64_t c = 0; c < D; ++c) {
        store1(dst, p.ring_dtype, c, load1(src, p.x_dtype, c * p.xs.d));
      }
    }
  }
}

// ===========================================================================
// Decode kernels
// ===========================================================================

// Visibility of the keys of one block for row r: lo[r] <= j0 + j < hi[r] and km[j] != 0.
struct RowMask {
  const int32_t* lo;
  const int32_t* hi;
  int32_t j0;
  const int8_t* km;  // nullptr: no key mask; else zero-padded to round_up(nj, kKeyPad)
};

// s[r * sst + j] = sum_d q[r * dp + d] * k[j * ks + d] (r < R, j < nj); the columns
// [nj, round_up(nj, kKeyPad)) of s are set to -inf.
using QkFn = void (*)(const float* q, int64_t R, int64_t dp, const float* k, int64_t ks,
                      int64_t nj, int64_t D, float* s, int64_t sst);
// Online-softmax step per row: hidden keys -> -inf, m_new = max(m, max_j s),
// alpha = 2^(m - m_new), s <- 2^(s - m_new), l <- l * alpha + sum_j s, m <- m_new
// (rows with m_new = -inf keep l = 0). Reads the columns up to round_up(nj, kKeyPad); km
// is zero-padded that far.
using SoftmaxFn = void (*)(float* s, int64_t sst, int64_t R, int64_t nj, const RowMask* rm,
                           float* m, float* l, float* alpha);
// o[r * dp + d] = o[r * dp + d] * alpha[r] + sum_j p[r * sst + j] * v[j * vs + d], d < D.
using PvFn = void (*)(const float* p, int64_t sst, int64_t R, const float* v, int64_t vs,
                      int64_t nj, int64_t D, float* o, int64_t dp, const float* alpha);
// n contiguous elements of dtype -> fp32, and back (round to nearest even).
using LoadRowFn = void (*)(const char* src, DType d, int64_t n, float* dst);
using StoreRowFn = void (*)(const float* src, int64_t n, char* dst, DType d);
// nj int8 rows (row j: D codes at codes + j * cst, its G fp16 scales at s + j * sst) ->
// fp32 rows dst + j * dp. fold: dst = code and mul[j] = the row's one scale (G == 1);
// else dst[c] = code[c] * s(c / gw).
using DeqInt8Fn = void (*)(const int8_t* codes, int64_t cst, const uint16_t* s, int64_t sst,
                           int64_t nj, int64_t D, int64_t gw, bool fold, float* dst,
                           int64_t dp, float* mul);
// nj packed int4 rows -> fp32: dst[c] = code[c] * s(g) + m(g), (s, m) = sm[2g], sm[2g + 1]
// of the row (g = c / gw).
using DeqInt4Fn = void (*)(const uint8_t* codes, int64_t cst, const uint16_t* sm, int64_t sst,
                           int64_t nj, int64_t D, int64_t gw, float* dst, int64_t dp);
// KIVI keys: nj packed int4 rows of one block -> fp32, dst[c] = code[c] * s[c] + m[c]
// with the block's per-channel (s, m) already in fp32.
using DeqKiviFn = void (*)(const uint8_t* codes, int64_t cst, int64_t nj, int64_t D,
                           const float* s, const float* m, float* dst, int64_t dp);

struct Kernels {
  QkFn qk;
  SoftmaxFn softmax;
  PvFn pv;
  LoadRowFn load_row;
  StoreRowFn store_row;
  DeqInt8Fn deq_int8;
  DeqInt4Fn deq_int4;
  DeqKiviFn deq_kivi;
};

// ---- scalar ------------------------------------------------------------------------

inline float exp2_scalar(float x) { return x < kExpFloor ? 0.0f : std::exp2(x); }

void qk_scalar(const float* q, int64_t R, int64_t dp, const float* k, int64_t ks, int64_t nj,
               int64_t D, float* s, int64_t sst) {
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

void softmax_scalar(float* s, int64_t sst, int64_t R, int64_t nj, const RowMask* rm, float* m,
                    float* l, float* alpha) {
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

void pv_scalar(const float* p, int64_t sst, int64_t R, const float* v, int64_t vs, int64_t nj,
               int64_t D, float* o, int64_t dp, const float* alpha) {
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

void deq_int8_scalar(const int8_t* codes, int64_t cst, const uint16_t* s, int64_t sst,
                     int64_t nj, int64_t D, int64_t gw, bool fold, float* dst, int64_t dp,
                     float* mul) {
  for (int64_t j = 0; j < nj; ++j) {
    const int8_t* cj = codes + j * cst;
    const uint16_t* sj = s + j * sst;
    float* dj = dst + j * dp;
    if (fold) {
      for (int64_t c = 0; c < D; ++c) dj[c] = static_cast<float>(cj[c]);
      mul[j] = half_to_float(sj[0]);
      continue;
    }
    for (int64_t c0 = 0, g = 0; c0 < D; c0 += gw, ++g) {
      const float sg = half_to_float(sj[g]);
      const int64_t c1 = std::min(D, c0 + gw);
      for (int64_t c = c0; c < c1; ++c) dj[c] = static_cast<float>(cj[c]) * sg;
    }
  }
}

void deq_int4_scalar(const uint8_t* codes, int64_t cst, const uint16_t* sm, int64_t sst,
                     int64_t nj, int64_t D, int64_t gw, float* dst, int64_t dp) {
  for (int64_t j = 0; j < nj; ++j) {
    const uint8_t* cj = codes + j * cst;
    const uint16_t* sj = sm + j * sst;
    float* dj = dst + j * dp;
    for (int64_t c0 = 0, g = 0; c0 < D; c0 += gw, ++g) {
      const float sg = half_to_float(sj[2 * g]);
      const float mg = half_to_float(sj[2 * g + 1]);
      const int64_t c1 = std::min(D, c0 + gw);
      for (int64_t c = c0; c < c1; ++c) {
        const int code = (cj[c >> 1] >> ((c & 1) * 4)) & 0xF;
        dj[c] = static_cast<float>(code) * sg + mg;
      }
    }
  }
}

void deq_kivi_scalar(const uint8_t* codes, int64_t cst, int64_t nj, int64_t D, const float* s,
                     const float* m, float* dst, int64_t dp) {
  for (int64_t j = 0; j < nj; ++j) {
    const uint8_t* cj = codes + j * cst;
    float* dj = dst + j * dp;
    for (int64_t c = 0; c < D; ++c) {
      const int code = (cj[c >> 1] >> ((c & 1) * 4)) & 0xF;
      dj[c] = static_cast<float>(code) * s[c] + m[c];
    }
  }
}

#if defined(SENTINEL_X86_64)

// ---- AVX2 + FMA + F16C (8 lanes) --------------------------------------------------

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

// Lanes [0, n) set (n in 0..8).
SK_TARGET_AVX2 inline __m256i lane_mask8(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

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

SK_TARGET_AVX2 void qk_avx2(const float* q, int64_t R, int64_t dp, const float* k, int64_t ks,
                            int64_t nj, int64_t D, float* s, int64_t sst) {
  const int64_t nfull = D / 8;
  const __m256i tmask = lane_mask8(D % 8);
  const __m256 neg_inf = _mm256_set1_ps(kNegInf);
  for (int64_t j0 = 0; j0 < nj; j0 += 8) {
    const int64_t nk = std::min<int64_t>(8, nj - j0);
    const float* kb = k + j0 * ks;
    if (nk == 8) {
      for (int64_t r = 0; r < R; ++r) {
        _mm256_storeu_ps(s + r * sst + j0, qk_row8_avx2<true>(q + r * dp, kb, ks, nfull, D, tmask, 8));
      }
    } else {
      const __m256i km = lane_mask8(nk);
      for (int64_t r = 0; r < R; ++r) {
        const __m256 res = qk_row8_avx2<false>(q + r * dp, kb, ks, nfull, D, tmask, nk);
        _mm256_storeu_ps(s + r * sst + j0, _mm256_blendv_ps(neg_inf, res, _mm256_castsi256_ps(km)));
      }
    }
  }
  const int64_t j8 = round_up(nj, 8);
  if (j8 < round_up(nj, kKeyPad)) {
    for (int64_t r = 0; r < R; ++r) _mm256_storeu_ps(s + r * sst + j8, neg_inf);
  }
}

SK_TARGET_AVX2 void softmax_avx2(float* s, int64_t sst, int64_t R, int64_t nj, const RowMask* rm,
                                 float* m, float* l, float* alpha) {
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
        const __m256i key = _mm256_add_epi32(iota, _mm256_set1_epi32(rm->j0 + static_cast<int32_t>(j)));
        // key >= lo and key < hi  <=>  !(lo > key) and (hi > key)
        __m256i vis = _mm256_andnot_si256(_mm256_cmpgt_epi32(lo, key), _mm256_cmpgt_epi32(hi, key));
        if (rm->km != nullptr) {
          const __m256i kmv = _mm256_cvtepi8_epi32(
              _mm_loadl_epi64(reinterpret_cast<const __m128i*>(rm->km + j)));
          vis = _mm256_andnot_si256(_mm256_cmpeq_epi32(kmv, _mm256_setzero_si256()), vis);
        }
        const __m256 x = _mm256_blendv_ps(neg_inf, _mm256_loadu_ps(sr + j), _mm256_castsi256_ps(vis));
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

// NR rows x NV vectors of 8 dims (kTail: the last vector has D % 8 dims, tmask).
template <int NR, int NV, bool kTail>
SK_TARGET_AVX2 void pv_tile_avx2(const float* p, int64_t sst, const float* v, int64_t vs,
                                 int64_t nj, __m256i tmask, float* o, int64_t dp,
                                 const float* alpha) {
  __m256 acc[NR][NV];
#pragma GCC unroll 4
  for (int r = 0; r < NR; ++r) {
    const __m256 a = _mm256_set1_ps(alpha[r]);
#pragma GCC unroll 4
    for (int w = 0; w < NV; ++w) acc[r][w] = _mm256_mul_ps(_mm256_load_ps(o + r * dp + 8 * w), a);
  }
  for (int64_t j = 0; j < nj; ++j) {
    const float* vj = v + j * vs;
    __m256 vv[NV];
#pragma GCC unroll 4
    for (int w = 0; w < NV; ++w) {
      vv[w] = (kTail && w == NV - 1) ? _mm256_maskload_ps(vj + 8 * w, tmask)
                                     : _mm256_loadu_ps(vj + 8 * w);
    }
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) {
      const __m256 b = _mm256_broadcast_ss(p + r * sst + j);
#pragma GCC unroll 4
      for (int w = 0; w < NV; ++w) acc[r][w] = _mm256_fmadd_ps(vv[w], b, acc[r][w]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
    for (int w = 0; w < NV; ++w) _mm256_store_ps(o + r * dp + 8 * w, acc[r][w]);
}

using PvTileFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, __m256i, float*,
                          int64_t, const float*);

#define SK_PV_ROW(nr, tail)                                                          \
  {&pv_tile_avx2<nr, 1, tail>, &pv_tile_avx2<nr, 2, tail>, &pv_tile_avx2<nr, 3, tail>, \
   &pv_tile_avx2<nr, 4, tail>}

SK_TARGET_AVX2 void pv_avx2(const float* p, int64_t sst, int64_t R, const float* v, int64_t vs,
                            int64_t nj, int64_t D, float* o, int64_t dp, const float* alpha) {
  static const PvTileFn table[2][4][4] = {
      {SK_PV_ROW(1, false), SK_PV_ROW(2, false), SK_PV_ROW(3, false), SK_PV_ROW(4, false)},
      {SK_PV_ROW(1, true), SK_PV_ROW(2, true), SK_PV_ROW(3, true), SK_PV_ROW(4, true)}};
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

#undef SK_PV_ROW

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

SK_TARGET_AVX2 inline float f16_scalar_avx2(uint16_t h) {
  return _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h)));
}

SK_TARGET_AVX2 inline __m256 i8x8_to_ps(const int8_t* p) {
  return _mm256_cvtepi32_ps(
      _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

SK_TARGET_AVX2 void deq_int8_avx2(const int8_t* codes, int64_t cst, const uint16_t* s,
                                  int64_t sst, int64_t nj, int64_t D, int64_t gw, bool fold,
                                  float* dst, int64_t dp, float* mul) {
  // A group boundary inside a vector of 8 channels: per-channel scales, scalar.
  if (!fold && gw < D && gw % 8 != 0) {
    deq_int8_scalar(codes, cst, s, sst, nj, D, gw, fold, dst, dp, mul);
    return;
  }
  const int64_t d8 = D / 8 * 8;
  for (int64_t j = 0; j < nj; ++j) {
    const int8_t* cj = codes + j * cst;
    const uint16_t* sj = s + j * sst;
    float* dj = dst + j * dp;
    if (fold) {
      mul[j] = f16_scalar_avx2(sj[0]);
      for (int64_t c = 0; c < d8; c += 8) _mm256_storeu_ps(dj + c, i8x8_to_ps(cj + c));
      for (int64_t c = d8; c < D; ++c) dj[c] = static_cast<float>(cj[c]);
      continue;
    }
    // Groups of a multiple of 8 channels (or one group): one broadcast scale per group.
    for (int64_t c0 = 0, g = 0; c0 < D; c0 += gw, ++g) {
      const float sg = f16_scalar_avx2(sj[g]);
      const __m256 sv = _mm256_set1_ps(sg);
      const int64_t c1 = std::min(D, c0 + gw);
      int64_t c = c0;
      for (; c + 8 <= c1; c += 8) _mm256_storeu_ps(dj + c, _mm256_mul_ps(i8x8_to_ps(cj + c), sv));
      for (; c < c1; ++c) dj[c] = static_cast<float>(cj[c]) * sg;
    }
  }
}

// 8 int4 codes (4 bytes, channels c .. c + 7 with c even) -> fp32.
SK_TARGET_AVX2 inline __m256 u4x8_to_ps(const uint8_t* p) {
  int32_t word;
  std::memcpy(&word, p, sizeof(word));
  const __m128i bytes = _mm_cvtsi32_si128(word);
  const __m128i low4 = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(bytes, low4);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low4);
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)));
}

SK_TARGET_AVX2 void deq_int4_avx2(const uint8_t* codes, int64_t cst, const uint16_t* sm,
                                  int64_t sst, int64_t nj, int64_t D, int64_t gw, float* dst,
                                  int64_t dp) {
  if (gw < D && gw % 8 != 0) {
    deq_int4_scalar(codes, cst, sm, sst, nj, D, gw, dst, dp);
    return;
  }
  for (int64_t j = 0; j < nj; ++j) {
    const uint8_t* cj = codes + j * cst;
    const uint16_t* sj = sm + j * sst;
    float* dj = dst + j * dp;
    for (int64_t c0 = 0, g = 0; c0 < D; c0 += gw, ++g) {
      const float sg = f16_scalar_avx2(sj[2 * g]);
      const float mg = f16_scalar_avx2(sj[2 * g + 1]);
      const __m256 sv = _mm256_set1_ps(sg), mv = _mm256_set1_ps(mg);
      const int64_t c1 = std::min(D, c0 + gw);
      int64_t c = c0;
      for (; c + 8 <= c1; c += 8) {
        _mm256_storeu_ps(dj + c, _mm256_fmadd_ps(u4x8_to_ps(cj + c / 2), sv, mv));
      }
      for (; c < c1; ++c) {
        const int code = (cj[c >> 1] >> ((c & 1) * 4)) & 0xF;
        dj[c] = static_cast<float>(code) * sg + mg;
      }
    }
  }
}

SK_TARGET_AVX2 void deq_kivi_avx2(const uint8_t* codes, int64_t cst, int64_t nj, int64_t D,
                                  const float* s, const float* m, float* dst, int64_t dp) {
  for (int64_t j = 0; j < nj; ++j) {
    const uint8_t* cj = codes + j * cst;
    float* dj = dst + j * dp;
    int64_t c = 0;
    for (; c + 8 <= D; c += 8) {
      _mm256_storeu_ps(dj + c, _mm256_fmadd_ps(u4x8_to_ps(cj + c / 2), _mm256_loadu_ps(s + c),
                                               _mm256_loadu_ps(m + c)));
    }
    for (; c < D; ++c) {
      const int code = (cj[c >> 1] >> ((c & 1) * 4)) & 0xF;
      dj[c] = static_cast<float>(code) * s[c] + m[c];
    }
  }
}

// ---- AVX-512 F + BW (16 lanes) ----------------------------------------------------

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

SK_TARGET_AVX512 inline __mmask16 tail_mask16(int64_t count) {
  return count >= 16 ? static_cast<__mmask16>(0xFFFF)
                     : static_cast<__mmask16>((1u << count) - 1u);
}

// Key t is accumulated in slot 4 (t % 4) + t / 4: the reduction tree below then yields
// the 16 sums in key order (attention.cpp's row mode uses the same tree).
constexpr int kSlotKey[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};

// Lane t of the result = the sum of the lanes of a[slot(t)].
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

// Scores of one query row for 16 keys (kFull: all 16 exist, else the first nk).
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

SK_TARGET_AVX512 void qk_avx512(const float* q, int64_t R, int64_t dp, const float* k,
                                int64_t ks, int64_t nj, int64_t D, float* s, int64_t sst) {
  const int64_t nd = (D + 15) / 16;
  const __mmask16 last = tail_mask16(D - 16 * (nd - 1));
  const __m512 neg_inf = _mm512_set1_ps(kNegInf);
  for (int64_t j0 = 0; j0 < nj; j0 += 16) {
    const int64_t nk = std::min<int64_t>(16, nj - j0);
    const float* kb = k + j0 * ks;
    for (int64_t r = 0; r < R; ++r) {
      if (nk == 16) {
        _mm512_storeu_ps(s + r * sst + j0, qk_row16_avx512<true>(q + r * dp, kb, ks, nd, last, 16));
      } else {
        const __m512 res = qk_row16_avx512<false>(q + r * dp, kb, ks, nd, last, nk);
        _mm512_storeu_ps(s + r * sst + j0, _mm512_mask_blend_ps(tail_mask16(nk), neg_inf, res));
      }
    }
  }
}

SK_TARGET_AVX512 void softmax_avx512(float* s, int64_t sst, int64_t R, int64_t nj,
                                     const RowMask* rm, float* m, float* l, float* alpha) {
  const __m512 neg_inf = _mm512_set1_ps(kNegInf);
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const int64_t njp = round_up(nj, kKeyPad);
  for (int64_t r = 0; r < R; ++r) {
    float* sr = s + r * sst;
    __m512 mx = neg_inf;
    if (rm != nullptr) {
      const __m512i lo = _mm512_set1_epi32(rm->lo[r]);
      const __m512i hi = _mm512_set1_epi32(rm->hi[r]);
      for (int64_t j = 0; j < njp; j += 16) {
        const __m512i key =
            _mm512_add_epi32(iota, _mm512_set1_epi32(rm->j0 + static_cast<int32_t>(j)));
        __mmask16 vis = _mm512_cmp_epi32_mask(key, lo, _MM_CMPINT_NLT) &
                        _mm512_cmp_epi32_mask(key, hi, _MM_CMPINT_LT);
        if (rm->km != nullptr) {
          const __m128i kmv = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rm->km + j));
          vis &= static_cast<__mmask16>(
              _mm512_cmp_epi32_mask(_mm512_cvtepi8_epi32(kmv), _mm512_setzero_si512(),
                                    _MM_CMPINT_NE));
        }
        const __m512 x = _mm512_mask_blend_ps(vis, neg_inf, _mm512_loadu_ps(sr + j));
        _mm512_storeu_ps(sr + j, x);
        mx = _mm512_max_ps(mx, x);
      }
    } else {
      for (int64_t j = 0; j < njp; j += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(sr + j));
    }
    const float m_new = std::max(m[r], _mm512_reduce_max_ps(mx));
    const float m_use = m_new == kNegInf ? 0.0f : m_new;
    const float a = exp2_scalar(m[r] - m_use);
    const __m512 mu = _mm512_set1_ps(m_use);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < njp; j += 16) {
      const __m512 p = exp2_avx512(_mm512_sub_ps(_mm512_loadu_ps(sr + j), mu));
      _mm512_storeu_ps(sr + j, p);
      sum = _mm512_add_ps(sum, p);
    }
    l[r] = l[r] * a + _mm512_reduce_add_ps(sum);
    m[r] = m_new;
    alpha[r] = a;
  }
}

// NR rows x NV vectors of 16 dims (the last one masked by `last`).
template <int NR, int NV>
SK_TARGET_AVX512 void pv_tile_avx512(const float* p, int64_t sst, const float* v, int64_t vs,
                                     int64_t nj, __mmask16 last, float* o, int64_t dp,
                                     const float* alpha) {
  __m512 acc[NR][NV];
#pragma GCC unroll 4
  for (int r = 0; r < NR; ++r) {
    const __m512 a = _mm512_set1_ps(alpha[r]);
#pragma GCC unroll 4
    for (int w = 0; w < NV; ++w) acc[r][w] = _mm512_mul_ps(_mm512_load_ps(o + r * dp + 16 * w), a);
  }
  for (int64_t j = 0; j < nj; ++j) {
    const float* vj = v + j * vs;
    __m512 vv[NV];
#pragma GCC unroll 4
    for (int w = 0; w < NV - 1; ++w) vv[w] = _mm512_loadu_ps(vj + 16 * w);
    vv[NV - 1] = _mm512_maskz_loadu_ps(last, vj + 16 * (NV - 1));
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) {
      const __m512 b = _mm512_set1_ps(p[r * sst + j]);
#pragma GCC unroll 4
      for (int w = 0; w < NV; ++w) acc[r][w] = _mm512_fmadd_ps(vv[w], b, acc[r][w]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
    for (int w = 0; w < NV; ++w) _mm512_store_ps(o + r * dp + 16 * w, acc[r][w]);
}

using PvTile512Fn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, __mmask16,
                             float*, int64_t, const float*);

SK_TARGET_AVX512 void pv_avx512(const float* p, int64_t sst, int64_t R, const float* v,
                                int64_t vs, int64_t nj, int64_t D, float* o, int64_t dp,
                                const float* alpha) {
#define SK_PV_ROW(nr) {&pv_tile_avx512<nr, 1>, &pv_tile_avx512<nr, 2>, \
                       &pv_tile_avx512<nr, 3>, &pv_tile_avx512<nr, 4>}
  static const PvTile512Fn table[4][4] = {SK_PV_ROW(1), SK_PV_ROW(2), SK_PV_ROW(3), SK_PV_ROW(4)};
#undef SK_PV_ROW
  const int64_t nd = (D + 15) / 16;
  for (int64_t c = 0; c < nd; c += 4) {
    const int nv = static_cast<int>(std::min<int64_t>(4, nd - c));
    const __mmask16 last = c + nv == nd ? tail_mask16(D - 16 * (nd - 1))
                                        : static_cast<__mmask16>(0xFFFF);
    for (int64_t r0 = 0; r0 < R; r0 += 4) {
      const int nr = static_cast<int>(std::min<int64_t>(4, R - r0));
      table[nr - 1][nv - 1](p + r0 * sst, sst, v + 16 * c, vs, nj, last, o + r0 * dp + 16 * c,
                            dp, alpha + r0);
    }
  }
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

// 16 int8 codes -> fp32 (the masked form reads only the lanes of k, the others are 0).
SK_TARGET_AVX512 inline __m512 i8x16_to_ps(const int8_t* p) {
  return _mm512_cvtepi32_ps(
      _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
SK_TARGET_AVX512 inline __m512 i8x16_to_ps(const int8_t* p, __mmask16 k) {
  const __m128i b = _mm512_castsi512_si128(_mm512_maskz_loadu_epi8(static_cast<__mmask64>(k), p));
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
}

SK_TARGET_AVX512 void deq_int8_avx512(const int8_t* codes, int64_t cst, const uint16_t* s,
                                      int64_t sst, int64_t nj, int64_t D, int64_t gw, bool fold,
                                      float* dst, int64_t dp, float* mul) {
  if (!fold && gw < D && gw % 16 != 0) {
    deq_int8_avx2(codes, cst, s, sst, nj, D, gw, fold, dst, dp, mul);
    return;
  }
  for (int64_t j = 0; j < nj; ++j) {
    const int8_t* cj = codes + j * cst;
    const uint16_t* sj = s + j * sst;
    float* dj = dst + j * dp;
    if (fold) {
      mul[j] = f16_scalar_avx2(sj[0]);
      int64_t c = 0;
      for (; c + 16 <= D; c += 16) _mm512_storeu_ps(dj + c, i8x16_to_ps(cj + c));
      if (c < D) {
        const __mmask16 k = tail_mask16(D - c);
        _mm512_mask_storeu_ps(dj + c, k, i8x16_to_ps(cj + c, k));
      }
      continue;
    }
    for (int64_t c0 = 0, g = 0; c0 < D; c0 += gw, ++g) {
      const __m512 sv = _mm512_set1_ps(f16_scalar_avx2(sj[g]));
      const int64_t c1 = std::min(D, c0 + gw);
      int64_t c = c0;
      for (; c + 16 <= c1; c += 16) _mm512_storeu_ps(dj + c, _mm512_mul_ps(i8x16_to_ps(cj + c), sv));
      if (c < c1) {
        const __mmask16 k = tail_mask16(c1 - c);
        _mm512_mask_storeu_ps(dj + c, k, _mm512_mul_ps(i8x16_to_ps(cj + c, k), sv));
      }
    }
  }
}

// 16 int4 codes (8 bytes, channels c .. c + 15 with c even) -> fp32.
SK_TARGET_AVX512 inline __m512 u4x16_to_ps(const uint8_t* p) {
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  const __m128i low4 = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(bytes, low4);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low4);
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)));
}

SK_TARGET_AVX512 void deq_int4_avx512(const uint8_t* codes, int64_t cst, const uint16_t* sm,
                                      int64_t sst, int64_t nj, int64_t D, int64_t gw,
                                      float* dst, int64_t dp) {
  if (gw < D && gw % 16 != 0) {
    deq_int4_avx2(codes, cst, sm, sst, nj, D, gw, dst, dp);
    return;
  }
  for (int64_t j = 0; j < nj; ++j) {
    const uint8_t* cj = codes + j * cst;
    const uint16_t* sj = sm + j * sst;
    float* dj = dst + j * dp;
    for (int64_t c0 = 0, g = 0; c0 < D; c0 += gw, ++g) {
      const float sg = f16_scalar_avx2(sj[2 * g]);
      const float mg = f16_scalar_avx2(sj[2 * g + 1]);
      const __m512 sv = _mm512_set1_ps(sg), mv = _mm512_set1_ps(mg);
      const int64_t c1 = std::min(D, c0 + gw);
      int64_t c = c0;
      for (; c + 16 <= c1; c += 16) {
        _mm512_storeu_ps(dj + c, _mm512_fmadd_ps(u4x16_to_ps(cj + c / 2), sv, mv));
      }
      for (; c < c1; ++c) {
        const int code = (cj[c >> 1] >> ((c & 1) * 4)) & 0xF;
        dj[c] = static_cast<float>(code) * sg + mg;
      }
    }
  }
}

SK_TARGET_AVX512 void deq_kivi_avx512(const uint8_t* codes, int64_t cst, int64_t nj, int64_t D,
                                      const float* s, const float* m, float* dst, int64_t dp) {
  for (int64_t j = 0; j < nj; ++j) {
    const uint8_t* cj = codes + j * cst;
    float* dj = dst + j * dp;
    int64_t c = 0;
    for (; c + 16 <= D; c += 16) {
      _mm512_storeu_ps(dj + c, _mm512_fmadd_ps(u4x16_to_ps(cj + c / 2), _mm512_loadu_ps(s + c),
                                               _mm512_loadu_ps(m + c)));
    }
    for (; c < D; ++c) {
      const int code = (cj[c >> 1] >> ((c & 1) * 4)) & 0xF;
      dj[c] = static_cast<float>(code) * s[c] + m[c];
    }
  }
}

#endif  // SENTINEL_X86_64

Kernels kernels_for(SimdLevel level) {
#if defined(SENTINEL_X86_64)
  if (level >= SimdLevel::kAvx512) {
    return {&qk_avx512,        &softmax_avx512,  &pv_avx512,       &load_row_avx512,
            &store_row_avx512, &deq_int8_avx512, &deq_int4_avx512, &deq_kivi_avx512};
  }
  if (level >= SimdLevel::kAvx2) {
    return {&qk_avx2,        &softmax_avx2,  &pv_avx2,       &load_row_avx2,
            &store_row_avx2, &deq_int8_avx2, &deq_int4_avx2, &deq_kivi_avx2};
  }
#else
  (void)level;
#endif
  return {&qk_scalar,        &softmax_scalar,  &pv_scalar,       &load_row_scalar,
          &store_row_scalar, &deq_int8_scalar, &deq_int4_scalar, &deq_kivi_scalar};
}

// ===========================================================================
// Decode driver
// ===========================================================================

struct Problem {
  DecodeKvArgs a;
  int64_t es;  // bytes per element of a.dtype
  int64_t G;   // query heads per KV head
  int64_t gw;  // scale group width
  int64_t dp;  // D rounded up to 16
  int64_t nb;  // keys per block
  float qscale;  // scale * log2(e)
  Kernels kern;
};

struct Item {
  int64_t b, g;      // batch row, KV head
  int64_t i0, rows;  // query positions [i0, i0 + rows) of every active head of the group
  int64_t k0, k1;    // key positions [k0, k1) handled by this item
  int64_t slot;      // -1: writes out; else workspace slot of a partial (split key range)
  double cost;
};

// A tile whose key range was split: workspace slots [slot0, slot0 + parts).
struct SplitTile {
  int64_t b, g, i0, rows, slot0, parts;
};

inline bool head_on(const Problem& p, int64_t b, int64_t h) {
  return p.a.head_active == nullptr || p.a.head_active[b * p.a.Hq + h] != 0;
}

int64_t active_heads(const Problem& p, int64_t b, int64_t g, int32_t* heads) {
  int64_t na = 0;
  for (int64_t a = 0; a < p.G; ++a) {
    const int64_t h = g * p.G + a;
    if (head_on(p, b, h)) heads[na++] = static_cast<int32_t>(h);
  }
  return na;
}

// Readable positions of row b: [read_lo, read_hi).
inline void readable(const Problem& p, int64_t len, int64_t* lo, int64_t* hi) {
  if (p.a.wrap) {
    *lo = std::max<int64_t>(0, len - p.a.L);
    *hi = len;
  } else {
    *lo = 0;
    *hi = std::min(len, p.a.L);
  }
}

// Visible keys [lo, hi) of query i (of Sq) in row b with len positions.
inline void row_range(const Problem& p, int64_t len, int64_t i, int64_t* lo, int64_t* hi) {
  int64_t a = 0, e = 0;
  readable(p, len, &a, &e);
  const int64_t pos = len - p.a.Sq + i;
  if (p.a.window > 0) a = std::max(a, pos - p.a.window + 1);
  e = std::min(e, pos + 1);
  *lo = a;
  *hi = std::max(a, e);
}

inline const char* q_row(const Problem& p, int64_t b, int64_t h, int64_t i) {
  const Strides4& s = p.a.q_strides;
  return static_cast<const char*>(p.a.q) + (b * s.b + h * s.h + i * s.s) * p.es;
}
inline char* out_row(const Problem& p, int64_t b, int64_t h, int64_t i) {
  const Strides4& s = p.a.out_strides;
  return static_cast<char*>(p.a.out) + (b * s.b + h * s.h + i * s.s) * p.es;
}

void load_q(const Problem& p, const char* src, float* dst) {
  if (p.a.q_strides.d == 1) {
    p.kern.load_row(src, p.a.dtype, p.a.D, dst);
  } else {
    for (int64_t d = 0; d < p.a.D; ++d) dst[d] = load1(src, p.a.dtype, d * p.a.q_strides.d);
  }
}

void store_out(const Problem& p, const float* src, char* dst) {
  if (p.a.out_strides.d == 1) {
    p.kern.store_row(src, p.a.D, dst, p.a.dtype);
  } else {
    for (int64_t d = 0; d < p.a.D; ++d) store1(dst, p.a.dtype, d * p.a.out_strides.d, src[d]);
  }
}

// Per-thread scratch that survives between calls (pool workers are persistent).
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

struct Scratch {
  int32_t* heads;  // active heads of the group
  float* q;        // [rmax][dp] query rows, scaled
  float* o;        // [rmax][dp] unnormalised output rows
  float* s;        // [rmax][nbp] scores / probabilities of one block
  float* kbuf;     // [nb][dp] K block rows as fp32
  float* vbuf;     // [nb][dp] V block rows as fp32
  float* kmul;     // [nb] per-key factor of the scores (int8 G == 1), or unused
  float* vmul;     // [nb] per-key factor of the probabilities for V
  int8_t* km;      // [nbp] block key mask (zero padded)
  float* m;
  float* l;
  float* alpha;
  int32_t* lo;
  int32_t* hi;
  float* row;  // [dp]
  float* ksm;  // [2][dp] KIVI keys: one block's per-channel s (then m) in fp32
};

inline int64_t r16(int64_t n) { return round_up(std::max<int64_t>(n, 1), 16); }

int64_t scratch_floats(int64_t G, int64_t rmax, int64_t dp, int64_t nb) {
  const int64_t nbp = round_up(nb, kKeyPad) + kKeyPad;
  return r16(G) + 2 * rmax * dp + r16(rmax * nbp) + 2 * nb * dp + 2 * r16(nb) + r16(nbp) +
         5 * r16(rmax) + 3 * dp;
}

Scratch carve(float* base, int64_t G, int64_t rmax, int64_t dp, int64_t nb) {
  const int64_t nbp = round_up(nb, kKeyPad) + kKeyPad;
  Scratch t;
  float* f = base;
  t.heads = reinterpret_cast<int32_t*>(f);
  f += r16(G);
  t.q = f;
  f += rmax * dp;
  t.o = f;
  f += rmax * dp;
  t.s = f;
  f += r16(rmax * nbp);
  t.kbuf = f;
  f += nb * dp;
  t.vbuf = f;
  f += nb * dp;
  t.kmul = f;
  f += r16(nb);
  t.vmul = f;
  f += r16(nb);
  t.km = reinterpret_cast<int8_t*>(f);
  f += r16(nbp);
  t.m = f;
  f += r16(rmax);
  t.l = f;
  f += r16(rmax);
  t.alpha = f;
  f += r16(rmax);
  t.lo = reinterpret_cast<int32_t*>(f);
  f += r16(rmax);
  t.hi = reinterpret_cast<int32_t*>(f);
  f += r16(rmax);
  t.row = f;
  f += dp;
  t.ksm = f;
  return t;
}

// One side (K or V) of a block: fp32 rows (row stride *rs) and, when the int8 scale is
// folded, mul[j] = the per-token scale. Returns the rows; *fold says whether mul is set.
const float* block_side(const Problem& p, bool recent, bool is_k, int64_t b, int64_t g,
                        int64_t slot, int64_t nj, float* buf, float* mul, int64_t* rs,
                        bool* fold) {
  const DecodeKvArgs& a = p.a;
  const int64_t D = a.D;
  *fold = false;
  if (recent || a.fmt == KvFormat::kDense) {
    const Strides3& st = recent ? (is_k ? a.kr_strides : a.vr_strides)
                                : (is_k ? a.k_strides : a.v_strides);
    const void* base = recent ? (is_k ? a.k_recent : a.v_recent) : (is_k ? a.k : a.v);
    const char* first =
        static_cast<const char*>(base) + (b * st.b + g * st.h + slot * st.l) * p.es;
    if (a.dtype == DType::kFloat32) {
      *rs = st.l;
      return reinterpret_cast<const float*>(first);
    }
    for (int64_t j = 0; j < nj; ++j) {
      p.kern.load_row(first + j * st.l * p.es, a.dtype, D, buf + j * p.dp);
    }
    *rs = p.dp;
    return buf;
  }
  const Strides3& st = is_k ? a.k_strides : a.v_strides;
  const Strides3& ss = is_k ? a.ks_strides : a.vs_strides;
  const uint8_t* codes = static_cast<const uint8_t*>(is_k ? a.k : a.v) + b * st.b + g * st.h +
                         slot * st.l;
  const uint16_t* sc = (is_k ? a.k_scale : a.v_scale) + b * ss.b + g * ss.h + slot * ss.l;
  if (a.fmt == KvFormat::kInt8) {
    *fold = a.n_groups == 1;
    p.kern.deq_int8(reinterpret_cast<const int8_t*>(codes), st.l, sc, ss.l, nj, D, p.gw, *fold,
                    buf, p.dp, mul);
  } else {
    p.kern.deq_int4(codes, st.l, sc, ss.l, nj, D, p.gw, buf, p.dp);
  }
  *rs = p.dp;
  return buf;
}

// KIVI keys of positions [j0, j0 + nj) (all in the store, no wrap) as fp32 rows of buf
// (row stride dp). The per-channel (s, m) of a block are converted once into sm[0 .. dp)
// and sm[dp .. 2 dp) and kept across calls of one item (*cur_blk: the block they hold).
const float* kivi_keys(const Problem& p, int64_t b, int64_t g, int64_t j0, int64_t nj,
                       float* buf, float* sm, int64_t* cur_blk) {
  const DecodeKvArgs& a = p.a;
  const int64_t T = a.key_block, D = a.D;
  const uint8_t* codes =
      static_cast<const uint8_t*>(a.k) + b * a.k_strides.b + g * a.k_strides.h;
  const uint16_t* sc = a.k_scale + b * a.ks_strides.b + g * a.ks_strides.h;
  for (int64_t j = j0; j < j0 + nj;) {
    const int64_t blk = j / T;
    const int64_t je = std::min(j0 + nj, (blk + 1) * T);
    if (blk != *cur_blk) {
      const uint16_t* sb = sc + blk * a.ks_strides.l;
      for (int64_t c = 0; c < D; ++c) {
        sm[c] = half_to_float(sb[2 * c]);
        sm[p.dp + c] = half_to_float(sb[2 * c + 1]);
      }
      *cur_blk = blk;
    }
    p.kern.deq_kivi(codes + j * a.k_strides.l, a.k_strides.l, je - j, D, sm, sm + p.dp,
                    buf + (j - j0) * p.dp, p.dp);
    j = je;
  }
  return buf;
}

void run_item(const Problem& p, const Item& it, const Scratch& t, float* ws,
              int64_t slot_floats) {
  const DecodeKvArgs& a = p.a;
  const int64_t D = a.D, dp = p.dp, nb = p.nb;
  const int64_t sst = round_up(nb, kKeyPad) + kKeyPad;
  const int64_t na = active_heads(p, it.b, it.g, t.heads);
  const int64_t rows = it.rows;
  const int64_t R = na * rows;
  const int64_t len = a.cache_lens[it.b];

  for (int64_t r = 0; r < R; ++r) {
    int64_t lo = 0, hi = 0;
    row_range(p, len, it.i0 + r % rows, &lo, &hi);
    t.lo[r] = static_cast<int32_t>(lo);
    t.hi[r] = static_cast<int32_t>(hi);
    t.m[r] = kNegInf;
    t.l[r] = 0.0f;
    float* qr = t.q + r * dp;
    load_q(p, q_row(p, it.b, t.heads[r / rows], it.i0 + r % rows), t.row);
    for (int64_t d = 0; d < D; ++d) qr[d] = t.row[d] * p.qscale;
    for (int64_t d = D; d < dp; ++d) qr[d] = 0.0f;
  }
  std::memset(t.o, 0, static_cast<size_t>(R * dp) * sizeof(float));
  // Keys every row sees: [lo of the last position, hi of the first).
  int64_t all_lo = 0, all_hi = 0, unused = 0;
  row_range(p, len, it.i0 + rows - 1, &all_lo, &unused);
  row_range(p, len, it.i0, &unused, &all_hi);

  // The rings hold the positions >= rec_lo: the last W, or (KIVI keys) those of the
  // block not quantized yet.
  const int64_t T = a.key_block;
  const int64_t rec_lo = a.W > 0 ? (T > 0 ? len / T * T : len - a.W)
                                 : std::numeric_limits<int64_t>::max();
  int64_t kivi_blk = -1;
  for (int64_t j0 = it.k0; j0 < it.k1;) {
    const bool recent = j0 >= rec_lo;
    int64_t j1 = std::min(it.k1, j0 + nb);
    if (!recent) j1 = std::min(j1, rec_lo);
    if (a.wrap) j1 = std::min(j1, (j0 / a.L + 1) * a.L);
    if (recent) j1 = std::min(j1, (j0 / a.W + 1) * a.W);
    const int64_t nj = j1 - j0;
    const int64_t cslot = a.wrap ? j0 % a.L : j0;  // cache slot (also the key mask's index)
    const int64_t slot = recent ? j0 % a.W : cslot;

    bool masked_keys = false;
    const int8_t* km = nullptr;
    if (a.key_mask != nullptr) {
      std::memcpy(t.km, a.key_mask + it.b * a.L + cslot, static_cast<size_t>(nj));
      std::memset(t.km + nj, 0, static_cast<size_t>(round_up(nj, kKeyPad) + kKeyPad - nj));
      masked_keys = std::memchr(t.km, 0, static_cast<size_t>(nj)) != nullptr;
      km = t.km;
    }

    int64_t kst = 0, vst = 0;
    bool kfold = false, vfold = false;
    const float* kp = nullptr;
    if (T > 0 && !recent) {
      kp = kivi_keys(p, it.b, it.g, j0, nj, t.kbuf, t.ksm, &kivi_blk);
      kst = dp;
    } else {
      kp = block_side(p, recent, true, it.b, it.g, slot, nj, t.kbuf, t.kmul, &kst, &kfold);
    }
    const float* vp = block_side(p, recent, false, it.b, it.g, slot, nj, t.vbuf, t.vmul, &vst,
                                 &vfold);
    if (masked_keys) {
      // Hidden keys' V rows may be anything (unwritten slots): make them exact zeros.
      if (vp != t.vbuf) {
        for (int64_t j = 0; j < nj; ++j) {
          std::memcpy(t.vbuf + j * dp, vp + j * vst, static_cast<size_t>(D) * sizeof(float));
        }
        vp = t.vbuf;
        vst = dp;
      }
      for (int64_t j = 0; j < nj; ++j) {
        if (t.km[j] != 0) continue;
        std::memset(t.vbuf + j * dp, 0, static_cast<size_t>(D) * sizeof(float));
        if (vfold) t.vmul[j] = 0.0f;
      }
    }

    p.kern.qk(t.q, R, dp, kp, kst, nj, D, t.s, sst);
    if (kfold) {
      for (int64_t r = 0; r < R; ++r) {
        float* sr = t.s + r * sst;
        for (int64_t j = 0; j < nj; ++j) sr[j] *= t.kmul[j];
      }
    }
    const bool full = j0 >= all_lo && j1 <= all_hi && !masked_keys;
    const RowMask rm{t.lo, t.hi, static_cast<int32_t>(j0), km};
    p.kern.softmax(t.s, sst, R, nj, full ? nullptr : &rm, t.m, t.l, t.alpha);
    if (vfold) {
      for (int64_t r = 0; r < R; ++r) {
        float* sr = t.s + r * sst;
        for (int64_t j = 0; j < nj; ++j) sr[j] *= t.vmul[j];
      }
    }
    p.kern.pv(t.s, sst, R, vp, vst, nj, D, t.o, dp, t.alpha);
    j0 = j1;
  }

  if (it.slot >= 0) {
    // Partial: O rows [R][D], then m[R], l[R].
    float* dst = ws + it.slot * slot_floats;
    for (int64_t r = 0; r < R; ++r) {
      std::memcpy(dst + r * D, t.o + r * dp, static_cast<size_t>(D) * sizeof(float));
      dst[R * D + r] = t.m[r];
      dst[R * D + R + r] = t.l[r];
    }
    return;
  }
  for (int64_t r = 0; r < R; ++r) {
    const float lr = t.l[r];
    const float inv = lr > 0.0f ? 1.0f / lr : 0.0f;
    const float* orow = t.o + r * dp;
    for (int64_t d = 0; d < D; ++d) t.row[d] = lr > 0.0f ? orow[d] * inv : 0.0f;
    store_out(p, t.row, out_row(p, it.b, t.heads[r / rows], it.i0 + r % rows));
  }
}

// Combines the partials of a split tile (log-sum-exp) and writes its rows.
void merge_tile(const Problem& p, const SplitTile& st, const float* ws, int64_t slot_floats,
                int32_t* heads, float* row, float* acc) {
  const int64_t D = p.a.D;
  const int64_t na = active_heads(p, st.b, st.g, heads);
  const int64_t R = na * st.rows;
  for (int64_t r = 0; r < R; ++r) {
    float mx = kNegInf;
    for (int64_t s = 0; s < st.parts; ++s) {
      mx = std::max(mx, ws[(st.slot0 + s) * slot_floats + R * D + r]);
    }
    std::fill(acc, acc + D, 0.0f);
    float lsum = 0.0f;
    if (mx != kNegInf) {
      for (int64_t s = 0; s < st.parts; ++s) {
        const float* part = ws + (st.slot0 + s) * slot_floats;
        const float ms = part[R * D + r];
        if (ms == kNegInf) continue;
        const float w = std::exp2(ms - mx);
        lsum += w * part[R * D + R + r];
        for (int64_t d = 0; d < D; ++d) acc[d] += w * part[r * D + d];
      }
    }
    const float inv = lsum > 0.0f ? 1.0f / lsum : 0.0f;
    for (int64_t d = 0; d < D; ++d) row[d] = lsum > 0.0f ? acc[d] * inv : 0.0f;
    store_out(p, row, out_row(p, st.b, heads[r / st.rows], st.i0 + r % st.rows));
  }
}

void zero_head(const Problem& p, int64_t b, int64_t h, const float* zeros) {
  for (int64_t i = 0; i < p.a.Sq; ++i) {
    char* dst = out_row(p, b, h, i);
    if (p.a.out_strides.d == 1) {
      std::memset(dst, 0, static_cast<size_t>(p.a.D * p.es));  // +0.0 in every dtype
    } else {
      store_out(p, zeros, dst);
    }
  }
}

void check_strides3(const char* name, const Strides3& s) {
  const int64_t v[3] = {s.b, s.h, s.l};
  check_nonneg(kDecodeFn, name, v, 3);
}

}  // namespace

KvFormat parse_kv_format(const std::string& name) {
  if (name == "dense") return KvFormat::kDense;
  if (name == "int8") return KvFormat::kInt8;
  if (name == "int4") return KvFormat::kInt4;
  throw std::invalid_argument("kv_format must be 'dense', 'int8' or 'int4', got '" + name + "'");
}

Strides3 kv_strides3(const std::vector<int64_t>& v, const char* fn, const char* name) {
  if (v.size() != 3) {
    bad_arg(fn, std::string(name) + " must have 3 entries (B, H, L strides in elements), got " +
                    std::to_string(v.size()));
  }
  return Strides3{v[0], v[1], v[2]};
}

Strides4 kv_strides4(const std::vector<int64_t>& v, const char* fn, const char* name) {
  if (v.size() != 4) {
    bad_arg(fn, std::string(name) + " must have 4 entries (B, H, S, D strides in elements), " +
                    "got " + std::to_string(v.size()));
  }
  return Strides4{v[0], v[1], v[2], v[3]};
}

void kv_append(const void* x, DType x_dtype, void* cache, DType cache_dtype, uint16_t* scales,
               KvFormat fmt, int64_t B, int64_t H, int64_t S, int64_t D, int64_t L,
               int64_t n_groups, const Strides4& x_strides, const Strides3& cache_strides,
               const Strides3& scale_strides, const int32_t* start, bool wrap,
               int num_threads) {
  const char* fn = kAppendFn;
  check_size(fn, "B", B, 0);
  check_size(fn, "H", H, 0);
  check_size(fn, "S", S, 0);
  check_size(fn, "D", D, 1);
  check_size(fn, "L", L, 1);
  const int64_t gw = fmt == KvFormat::kDense ? D : group_width(fn, D, n_groups);
  const int64_t G = fmt == KvFormat::kDense ? 1 : n_groups;
  const int64_t xs[4] = {x_strides.b, x_strides.h, x_strides.s, x_strides.d};
  const int64_t cs[3] = {cache_strides.b, cache_strides.h, cache_strides.l};
  const int64_t ss[3] = {scale_strides.b, scale_strides.h, scale_strides.l};
  check_nonneg(fn, "x_strides", xs, 4);
  check_nonneg(fn, "cache_strides", cs, 3);
  if (fmt != KvFormat::kDense) check_nonneg(fn, "scale_strides", ss, 3);
  check_size(fn, "num_threads", num_threads, 1);
  const int64_t sizes[3] = {B, H, L};
  const int64_t width = fmt == KvFormat::kInt4 ? (D + 1) / 2 : D;
  if (!rows_disjoint(sizes, cs, 3, width)) {
    bad_arg(fn, "cache rows overlap: strides " + fmt_strides(cs, 3) + " for [B, H, L] = [" +
                    std::to_string(B) + ", " + std::to_string(H) + ", " + std::to_string(L) +
                    "] rows of " + std::to_string(width) + " elements");
  }
  if (fmt != KvFormat::kDense) {
    const int64_t sw = fmt == KvFormat::kInt8 ? G : 2 * G;
    if (!rows_disjoint(sizes, ss, 3, sw)) {
      bad_arg(fn, "scale rows overlap: strides " + fmt_strides(ss, 3) + " for [B, H, L] = [" +
                      std::to_string(B) + ", " + std::to_string(H) + ", " + std::to_string(L) +
                      "] rows of " + std::to_string(sw) + " float16");
    }
  }
  if (B == 0 || H == 0 || S == 0) return;
  check_ptr(fn, "x_ptr", x);
  check_ptr(fn, "cache_ptr", cache);
  if (fmt != KvFormat::kDense) check_ptr(fn, "scales_ptr", scales);
  check_ptr(fn, "start_ptr", start);
  for (int64_t b = 0; b < B; ++b) {
    if (start[b] < 0) {
      bad_arg(fn, "start[" + std::to_string(b) + "] = " + std::to_string(start[b]) +
                      " is negative");
    }
  }

  AppendProblem p{static_cast<const char*>(x),
                  x_dtype,
                  element_size(x_dtype),
                  static_cast<char*>(cache),
                  cache_dtype,
                  element_size(cache_dtype),
                  scales,
                  fmt,
                  B, H, S, D, L, G, gw,
                  x_strides, cache_strides, scale_strides,
                  start,
                  wrap,
                  wrap ? std::max<int64_t>(0, S - L) : 0};
  const int64_t ns = S - p.i_first;
  const int64_t n = B * H * ns;
  const int64_t grain = std::max<int64_t>(1, kAppendGrainElems / D);
  parallel_for(
      n, num_threads,
      [&](int64_t begin, int64_t end) {
        thread_local std::vector<float> buf;
        thread_local std::vector<uint8_t> codes;
        if (static_cast<int64_t>(buf.size()) < D) buf.resize(static_cast<size_t>(D));
        if (static_cast<int64_t>(codes.size()) < D + 1) codes.resize(static_cast<size_t>(D + 1));
        for (int64_t t = begin; t < end; ++t) {
          const int64_t i = p.i_first + t % ns;
          const int64_t bh = t / ns;
          append_token(p, bh / H, bh % H, i, buf.data(), codes.data());
        }
      },
      grain);
}

void kv_append_key_blocks(const void* x, DType x_dtype, uint8_t* codes, uint16_t* scales,
                          void* ring, DType ring_dtype, int64_t B, int64_t H, int64_t S,
                          int64_t D, int64_t L, int64_t W, int64_t block,
                          const Strides4& x_strides, const Strides3& codes_strides,
                          const Strides3& scales_strides, const Strides3& ring_strides,
                          const int32_t* start, int num_threads) {
  const char* fn = kKeyBlocksFn;
  check_size(fn, "B", B, 0);
  check_size(fn, "H", H, 0);
  check_size(fn, "S", S, 0);
  check_size(fn, "D", D, 1);
  check_size(fn, "block", block, 1);
  if (L < block || L % block != 0) {
    bad_arg(fn, "the cache length L = " + std::to_string(L) + " must be a positive multiple "
                "of block = " + std::to_string(block));
  }
  if (W < block || W % block != 0) {
    bad_arg(fn, "the ring must hold a positive multiple of block = " + std::to_string(block) +
                    " slots, got W = " + std::to_string(W));
  }
  const int64_t xs[4] = {x_strides.b, x_strides.h, x_strides.s, x_strides.d};
  const int64_t cs[3] = {codes_strides.b, codes_strides.h, codes_strides.l};
  const int64_t ss[3] = {scales_strides.b, scales_strides.h, scales_strides.l};
  const int64_t rs[3] = {ring_strides.b, ring_strides.h, ring_strides.l};
  check_nonneg(fn, "x_strides", xs, 4);
  check_nonneg(fn, "codes_strides", cs, 3);
  check_nonneg(fn, "scales_strides", ss, 3);
  check_nonneg(fn, "ring_strides", rs, 3);
  check_size(fn, "num_threads", num_threads, 1);
  const auto disjoint = [&](const char* name, const int64_t* st, int64_t rows, int64_t width,
                            const char* unit) {
    const int64_t sizes[3] = {B, H, rows};
    if (!rows_disjoint(sizes, st, 3, width)) {
      bad_arg(fn, std::string(name) + " rows overlap: strides " + fmt_strides(st, 3) +
                      " for [B, H, rows] = [" + std::to_string(B) + ", " + std::to_string(H) +
                      ", " + std::to_string(rows) + "] rows of " + std::to_string(width) + " " +
                      unit);
    }
  };
  disjoint("codes", cs, L, (D + 1) / 2, "bytes");
  disjoint("scales", ss, L / block, 2 * D, "float16");
  disjoint("ring", rs, W, D, "elements");
  if (B == 0 || H == 0 || S == 0) return;
  check_ptr(fn, "x_ptr", x);
  check_ptr(fn, "codes_ptr", codes);
  check_ptr(fn, "scales_ptr", scales);
  check_ptr(fn, "ring_ptr", ring);
  check_ptr(fn, "start_ptr", start);
  for (int64_t b = 0; b < B; ++b) {
    if (start[b] < 0) {
      bad_arg(fn, "start[" + std::to_string(b) + "] = " + std::to_string(start[b]) +
                      " is negative");
    }
  }

  const KeyBlockProblem p{static_cast<const char*>(x),
                          x_dtype,
                          element_size(x_dtype),
                          codes,
                          scales,
                          static_cast<char*>(ring),
                          ring_dtype,
                          element_size(ring_dtype),
                          H, S, D, L, W, block,
                          x_strides, codes_strides, scales_strides, ring_strides,
                          start};
  // Rows (b, h) are independent (each owns its codes, scales and ring slots); the work of
  // one is about (S + T) * D elements.
  const int64_t grain = std::max<int64_t>(1, kAppendGrainElems / ((S + block) * D));
  parallel_for(
      B * H, num_threads,
      [&](int64_t begin, int64_t end) {
        thread_local std::vector<float> vals;
        thread_local std::vector<uint8_t> q;
        const size_t n = static_cast<size_t>(block * D);
        if (vals.size() < n) vals.resize(n);
        if (q.size() < n) q.resize(n);
        const KeyBlockScratch t{vals.data(), q.data()};
        for (int64_t bh = begin; bh < end; ++bh) append_key_blocks_row(p, bh / H, bh % H, t);
      },
      grain);
}

void decode_attention_kv(const DecodeKvArgs& a) {
  const char* fn = kDecodeFn;
  check_size(fn, "B", a.B, 0);
  check_size(fn, "Hq", a.Hq, 0);
  check_size(fn, "Hkv", a.Hkv, 1);
  check_size(fn, "Sq", a.Sq, 0);
  check_size(fn, "D", a.D, 1);
  if (a.D > kMaxD) {
    bad_arg(fn, "D must be <= " + std::to_string(kMaxD) + ", got " + std::to_string(a.D));
  }
  check_size(fn, "L", a.L, 1);
  check_size(fn, "W", a.W, 0);
  if (a.Hq % a.Hkv != 0) {
    bad_arg(fn, "Hq (" + std::to_string(a.Hq) + ") must be a multiple of Hkv (" +
                    std::to_string(a.Hkv) + ")");
  }
  constexpr int64_t kMaxSeq = std::numeric_limits<int32_t>::max();
  if (a.Sq >= kMaxSeq || a.L >= kMaxSeq || a.W >= kMaxSeq) {
    bad_arg(fn, "Sq, L and W must be < 2^31");
  }
  const int64_t gw =
      a.fmt == KvFormat::kDense ? a.D : group_width(fn, a.D, a.n_groups);
  {
    const Strides4& q = a.q_strides;
    const Strides4& o = a.out_strides;
    const int64_t qs[4] = {q.b, q.h, q.s, q.d};
    const int64_t os[4] = {o.b, o.h, o.s, o.d};
    check_nonneg(fn, "q_strides", qs, 4);
    check_nonneg(fn, "out_strides", os, 4);
    const int64_t sizes[4] = {a.B, a.Hq, a.Sq, a.D};
    if (!rows_disjoint(sizes, os, 4, 1)) {
      bad_arg(fn, "out elements overlap: strides " + fmt_strides(os, 4) + " for [B, Hq, Sq, D] "
                  "= [" + std::to_string(a.B) + ", " + std::to_string(a.Hq) + ", " +
                  std::to_string(a.Sq) + ", " + std::to_string(a.D) + "]");
    }
  }
  check_strides3("k_strides", a.k_strides);
  check_strides3("v_strides", a.v_strides);
  check_strides3("ks_strides", a.ks_strides);
  check_strides3("vs_strides", a.vs_strides);
  check_strides3("kr_strides", a.kr_strides);
  check_strides3("vr_strides", a.vr_strides);
  check_size(fn, "window", a.window, 0);
  check_size(fn, "key_block", a.key_block, 0);
  if (a.key_block > 0) {
    const std::string T = std::to_string(a.key_block);
    if (a.fmt != KvFormat::kInt4) {
      bad_arg(fn, "key_block = " + T + " (KIVI keys) needs kv_format 'int4'");
    }
    if (a.wrap) bad_arg(fn, "key_block = " + T + " (KIVI keys) does not take a wrapping cache");
    if (a.W < a.key_block || a.W % a.key_block != 0) {
      bad_arg(fn, "key_block = " + T + " needs recent rings of a positive multiple of " + T +
                      " slots, got W = " + std::to_string(a.W));
    }
    if (a.L % a.key_block != 0) {
      bad_arg(fn, "key_block = " + T + " needs the cache length L to be a multiple of it, got "
                  "L = " + std::to_string(a.L));
    }
  }
  if (!std::isfinite(a.scale)) bad_arg(fn, "scale must be finite, got " + std::to_string(a.scale));
  check_size(fn, "num_threads", a.num_threads, 1);
  if (a.B == 0 || a.Hq == 0 || a.Sq == 0) return;
  check_ptr(fn, "q_ptr", a.q);
  check_ptr(fn, "out_ptr", a.out);
  check_ptr(fn, "k_ptr", a.k);
  check_ptr(fn, "v_ptr", a.v);
  if (a.fmt != KvFormat::kDense) {
    check_ptr(fn, "k_scale_ptr", a.k_scale);
    check_ptr(fn, "v_scale_ptr", a.v_scale);
  }
  if (a.W > 0) {
    check_ptr(fn, "k_recent_ptr", a.k_recent);
    check_ptr(fn, "v_recent_ptr", a.v_recent);
  }
  check_ptr(fn, "cache_lens_ptr", a.cache_lens);
  for (int64_t b = 0; b < a.B; ++b) {
    if (a.cache_lens[b] < 0) {
      bad_arg(fn, "cache_lens[" + std::to_string(b) + "] = " + std::to_string(a.cache_lens[b]) +
                      " is negative");
    }
  }

  Problem p;
  p.a = a;
  p.es = element_size(a.dtype);
  p.G = a.Hq / a.Hkv;
  p.gw = gw;
  p.dp = round_up(a.D, 16);
  p.nb = std::clamp<int64_t>(kBlockBytes / (4 * p.dp) / 8 * 8, 16, 64);
  p.qscale = static_cast<float>(a.scale * kLog2e);
  p.kern = kernels_for(active_simd_level());

  // Work items over (b, g, query tile); pruned heads are zeroed here.
  std::vector<int32_t> heads(static_cast<size_t>(p.G));
  std::vector<float> zeros(static_cast<size_t>(a.D), 0.0f);
  std::vector<Item> items;
  int64_t rmax = 1;
  for (int64_t b = 0; b < a.B; ++b) {
    const int64_t len = a.cache_lens[b];
    for (int64_t g = 0; g < a.Hkv; ++g) {
      const int64_t na = active_heads(p, b, g, heads.data());
      for (int64_t h = g * p.G; h < (g + 1) * p.G; ++h) {
        if (!head_on(p, b, h)) zero_head(p, b, h, zeros.data());
      }
      if (na == 0) continue;
      const int64_t bm_rows = std::min(a.Sq, std::max<int64_t>(1, kRowTarget / na));
      for (int64_t i0 = 0; i0 < a.Sq; i0 += bm_rows) {
        const int64_t rows = std::min(bm_rows, a.Sq - i0);
        int64_t k0 = 0, k1 = 0, unused = 0;
        row_range(p, len, i0, &k0, &unused);
        row_range(p, len, i0 + rows - 1, &unused, &k1);
        k1 = std::max(k0, k1);
        const int64_t R = na * rows;
        rmax = std::max(rmax, R);
        items.push_back({b, g, i0, rows, k0, k1, -1,
                         static_cast<double>(R + 2) * static_cast<double>(k1 - k0 + 8) *
                             static_cast<double>(a.D)});
      }
    }
  }
  if (items.empty()) return;

  double total = 0.0;
  for (const Item& it : items) total += it.cost;
  int threads = a.num_threads;
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
                   [](const Item& x, const Item& y) { return x.cost > y.cost; });

  const int64_t slot_floats = rmax * (a.D + 2);
  std::vector<float> ws(static_cast<size_t>(std::max<int64_t>(1, slots * slot_floats)));
  const int64_t n_items = static_cast<int64_t>(items.size());
  threads = static_cast<int>(std::min<int64_t>(threads, n_items));
  const size_t need = static_cast<size_t>(scratch_floats(p.G, rmax, p.dp, p.nb));
  std::atomic<int64_t> next{0};
  auto worker = [&](int64_t, int64_t) {
    thread_local Arena arena;
    const Scratch t = carve(arena.get(need), p.G, rmax, p.dp, p.nb);
    for (;;) {
      const int64_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= n_items) break;
      run_item(p, items[static_cast<size_t>(i)], t, ws.data(), slot_floats);
    }
  };
  parallel_for(threads, threads, worker, 1);

  if (!splits.empty()) {
    std::vector<float> row(static_cast<size_t>(a.D)), acc(static_cast<size_t>(a.D));
    for (const SplitTile& st : splits) {
      merge_tile(p, st, ws.data(), slot_floats, heads.data(), row.data(), acc.data());
    }
  }
}

}  // namespace sentinel
