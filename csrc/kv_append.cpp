#include "kv_append.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "args.h"
#include "dtype_access.h"
#include "dtype_convert.h"
#include "kv_format.h"
#include "thread_pool.h"

// Design
// ======
// kv_append. One pass per token row (b, h, i): the row is read once into an fp32 buffer,
// each group's max / min, scale and codes are computed and stored. Every step of the
// quantization rule is one correctly rounded fp32 operation (division, subtraction,
// conversion to fp16 with round-to-nearest-even, rint half-to-even), exactly the
// operations of reference.quantize_kv, so the codes and scales are bit-identical to it
// (there is no multiply in the rule, so no multiply-add contraction can creep in). Token
// rows are spread over the thread pool; distinct tokens of one batch row land in distinct
// slots (wrap: only the last L tokens are written), so chunks never write the same row.
// With destination rows (`rows`), two batch rows may name one cache row: when their slot
// ranges overlap (rows_collide, an interval sweep over B entries) the append runs on the
// calling thread in batch order, so the later batch row's values stay whole, as in the
// reference, instead of two threads racing on one slot.
// The append is scalar at every SIMD level: its rounding rule is the contract, and one
// pass over a token row is cheap next to the model's projections.
//
// KIVI keys (kv_append_key_blocks) work per (b, h) row: each block the append completes
// is gathered channel-major ([D][T], its older keys from the ring) and every channel's T
// values go through quant_group_int4, the per-token quantizer, so the rule is shared bit
// for bit; then the new keys go to the ring.

namespace sentinel {
namespace {

constexpr const char* kAppendFn = "kv_append";
constexpr const char* kKeyBlocksFn = "kv_append_key_blocks";

constexpr float kF16Max = 65504.0f;
// Below this many input elements per chunk an append is not worth a worker hand-off.
constexpr int64_t kAppendGrainElems = 8192;

// "start[b] = v is negative" for the first negative entry of start[0 .. B).
void check_starts(const char* fn, const int32_t* start, int64_t B) {
  for (int64_t b = 0; b < B; ++b) {
    if (start[b] < 0) {
      bad_arg(fn, "start[" + std::to_string(b) + "] = " + std::to_string(start[b]) +
                      " is negative");
    }
  }
}

// The sizes of x [B, H, S, D].
void check_x_sizes(const char* fn, int64_t B, int64_t H, int64_t S, int64_t D) {
  check_min(fn, "B", B, 0);
  check_min(fn, "H", H, 0);
  check_min(fn, "S", S, 0);
  check_min(fn, "D", D, 1);
}

// "<name> rows overlap" unless the [B, H, rows] rows of `width` units at strides s are
// disjoint.
void check_disjoint(const char* fn, const char* name, const Strides3& s, int64_t B, int64_t H,
                    int64_t rows, const char* rows_name, int64_t width, const char* unit) {
  const int64_t sizes[3] = {B, H, rows};
  const int64_t st[3] = {s.b, s.h, s.l};
  if (!rows_disjoint(sizes, st, 3, width)) {
    bad_arg(fn, std::string(name) + " rows overlap: strides " + fmt_strides(st, 3) +
                    " for [B, H, " + rows_name + "] = [" + std::to_string(B) + ", " +
                    std::to_string(H) + ", " + std::to_string(rows) + "] rows of " +
                    std::to_string(width) + " " + unit);
  }
}

// D elements of x_dtype at src (element stride sd) -> D elements of dst_dtype at dst.
void copy_row(const char* src, DType x_dtype, int64_t sd, char* dst, DType dst_dtype,
              int64_t D) {
  if (dst_dtype == x_dtype && sd == 1) {
    std::memcpy(dst, src, static_cast<size_t>(D * element_size(x_dtype)));
    return;
  }
  for (int64_t c = 0; c < D; ++c) store1(dst, dst_dtype, c, load1(src, x_dtype, c * sd));
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

// Packs the D int4 codes code(c) = codes[c * step] into ceil(D / 2) bytes (channel c in
// byte c / 2, low nibble for even c; an odd D leaves the last high nibble 0).
void pack_int4(const uint8_t* codes, int64_t step, int64_t D, uint8_t* packed) {
  const int64_t nbytes = (D + 1) / 2;
  for (int64_t k = 0; k < nbytes; ++k) {
    const uint8_t lo = codes[2 * k * step];
    const uint8_t hi = 2 * k + 1 < D ? codes[(2 * k + 1) * step] : uint8_t{0};
    packed[k] = static_cast<uint8_t>(lo | (hi << 4));
  }
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
  const int32_t* rows;  // destination cache row of each batch row; nullptr: row b
  int64_t Bc;           // cache rows
};

// Whether two batch rows write one (cache row, slot): the [row, lo, hi) slot ranges of
// the written tokens (a wrapping range split at L) sorted, then swept for an overlap.
// One batch row's ranges never overlap each other (its tokens have distinct slots).
bool rows_collide(const AppendProblem& p) {
  std::vector<std::array<int64_t, 3>> ranges;
  ranges.reserve(static_cast<size_t>(2 * p.B));
  const int64_t n = p.S - p.i_first;
  for (int64_t b = 0; b < p.B; ++b) {
    const int64_t r = p.rows[b];
    if (r < 0 || r >= p.Bc) continue;
    const int64_t lo = static_cast<int64_t>(p.start[b]) + p.i_first;
    if (p.wrap) {
      const int64_t a = lo % p.L;
      if (a + n <= p.L) {
        ranges.push_back({r, a, a + n});
      } else {
        ranges.push_back({r, a, p.L});
        ranges.push_back({r, 0, a + n - p.L});
      }
    } else if (lo < p.L) {
      ranges.push_back({r, lo, std::min(lo + n, p.L)});
    }
  }
  std::sort(ranges.begin(), ranges.end());
  // Sorted by (row, lo): until the first overlap, the ranges of a row are disjoint, so
  // the first overlap is one with the previous range.
  for (size_t k = 1; k < ranges.size(); ++k) {
    if (ranges[k][0] == ranges[k - 1][0] && ranges[k][1] < ranges[k - 1][2]) return true;
  }
  return false;
}

// One token row: x[b, h, i] -> its slot (if written).
void append_token(const AppendProblem& p, int64_t b, int64_t h, int64_t i, float* buf,
                  uint8_t* codes) {
  int64_t row = b;
  if (p.rows != nullptr) {
    row = p.rows[b];
    if (row < 0 || row >= p.Bc) return;  // device values: skipped, as slots past L
  }
  const int64_t pos = static_cast<int64_t>(p.start[b]) + i;
  int64_t slot;
  if (p.wrap) {
    slot = pos % p.L;
  } else {
    if (pos >= p.L) return;
    slot = pos;
  }
  const char* src = p.x + (b * p.xs.b + h * p.xs.h + i * p.xs.s) * p.x_es;
  char* dst_row = p.cache + (row * p.cs.b + h * p.cs.h + slot * p.cs.l) *
                                (p.fmt == KvFormat::kDense ? p.cache_es : 1);
  if (p.fmt == KvFormat::kDense) {
    copy_row(src, p.x_dtype, p.xs.d, dst_row, p.cache_dtype, p.D);
    return;
  }
  for (int64_t c = 0; c < p.D; ++c) buf[c] = load1(src, p.x_dtype, c * p.xs.d);
  uint16_t* sc = p.scales + row * p.ss.b + h * p.ss.h + slot * p.ss.l;
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
  pack_int4(codes, 1, p.D, reinterpret_cast<uint8_t*>(dst_row));
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
    for (int64_t k = 0; k < T; ++k) {
      pack_int4(t.q + k, T, D, p.codes + b * p.cs.b + h * p.cs.h + (i * T + k) * p.cs.l);
    }
  }
  for (int64_t j = std::max(st, end - p.W); j < end; ++j) {
    copy_row(xrow0 + (j - st) * p.xs.s * p.x_es, p.x_dtype, p.xs.d,
             ring0 + (j % p.W) * p.rs.l * p.ring_es, p.ring_dtype, D);
  }
}

}  // namespace

void kv_append(const void* x, DType x_dtype, void* cache, DType cache_dtype, uint16_t* scales,
               KvFormat fmt, int64_t B, int64_t H, int64_t S, int64_t D, int64_t L,
               int64_t n_groups, const Strides4& x_strides, const Strides3& cache_strides,
               const Strides3& scale_strides, const int32_t* start, bool wrap,
               int num_threads, const int32_t* rows, int64_t Bc) {
  const char* fn = kAppendFn;
  check_x_sizes(fn, B, H, S, D);
  check_min(fn, "L", L, 1);
  if (Bc == -1) Bc = B;
  if (rows != nullptr) {
    check_min(fn, "Bc", Bc, 1);
  } else if (Bc != B) {
    bad_arg(fn, "Bc = " + std::to_string(Bc) + " must be B = " + std::to_string(B) +
                    " (or -1) without rows_ptr");
  }
  const int64_t gw = fmt == KvFormat::kDense ? D : kv_group_width(fn, D, n_groups);
  const int64_t G = fmt == KvFormat::kDense ? 1 : n_groups;
  check_nonneg(fn, "x_strides", x_strides);
  check_nonneg(fn, "cache_strides", cache_strides);
  if (fmt != KvFormat::kDense) check_nonneg(fn, "scale_strides", scale_strides);
  check_min(fn, "num_threads", num_threads, 1);
  const int64_t width = fmt == KvFormat::kInt4 ? (D + 1) / 2 : D;
  check_disjoint(fn, "cache", cache_strides, Bc, H, L, "L", width, "elements");
  if (fmt != KvFormat::kDense) {
    check_disjoint(fn, "scale", scale_strides, Bc, H, L, "L", fmt == KvFormat::kInt8 ? G : 2 * G,
                   "float16");
  }
  if (B == 0 || H == 0 || S == 0) return;
  check_not_null(fn, "x_ptr", x);
  check_not_null(fn, "cache_ptr", cache);
  if (fmt != KvFormat::kDense) check_not_null(fn, "scales_ptr", scales);
  check_not_null(fn, "start_ptr", start);
  check_starts(fn, start, B);

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
                  wrap ? std::max<int64_t>(0, S - L) : 0,
                  rows,
                  Bc};
  // Colliding destinations: one thread in batch order (the later batch row stays).
  const int threads = num_threads > 1 && rows != nullptr && rows_collide(p) ? 1 : num_threads;
  const int64_t ns = S - p.i_first;
  const int64_t n = B * H * ns;
  const int64_t grain = std::max<int64_t>(1, kAppendGrainElems / D);
  parallel_for(
      n, threads,
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
  check_x_sizes(fn, B, H, S, D);
  check_min(fn, "block", block, 1);
  if (L < block || L % block != 0) {
    bad_arg(fn, "the cache length L = " + std::to_string(L) + " must be a positive multiple "
                "of block = " + std::to_string(block));
  }
  if (W < block || W % block != 0) {
    bad_arg(fn, "the ring must hold a positive multiple of block = " + std::to_string(block) +
                    " slots, got W = " + std::to_string(W));
  }
  check_nonneg(fn, "x_strides", x_strides);
  check_nonneg(fn, "codes_strides", codes_strides);
  check_nonneg(fn, "scales_strides", scales_strides);
  check_nonneg(fn, "ring_strides", ring_strides);
  check_min(fn, "num_threads", num_threads, 1);
  check_disjoint(fn, "codes", codes_strides, B, H, L, "rows", (D + 1) / 2, "bytes");
  check_disjoint(fn, "scales", scales_strides, B, H, L / block, "rows", 2 * D, "float16");
  check_disjoint(fn, "ring", ring_strides, B, H, W, "rows", D, "elements");
  if (B == 0 || H == 0 || S == 0) return;
  check_not_null(fn, "x_ptr", x);
  check_not_null(fn, "codes_ptr", codes);
  check_not_null(fn, "scales_ptr", scales);
  check_not_null(fn, "ring_ptr", ring);
  check_not_null(fn, "start_ptr", start);
  check_starts(fn, start, B);

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

}  // namespace sentinel
