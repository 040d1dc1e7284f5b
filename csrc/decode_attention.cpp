#include "decode_attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "args.h"
#include "cpu_features.h"
#include "dtype_access.h"
#include "dtype_convert.h"
#include "kv_format.h"
#include "softmax_simd.h"

// Design
// ======
// The structure of attention.cpp's row mode (rows = query rows in memory order, online
// softmax, scores in base 2 with log2(e) folded into the query scale; the kernels of
// softmax_simd.h): a work item is (batch row b, KV head g, tile of query positions) with
// the rows of every active query head of the group, so each K/V block it reads is shared
// by the G heads of the group. Keys are visited in blocks of positions that come from one
// store (the compressed cache or the recent ring) and sit in consecutive slots (blocks
// are cut at the recent boundary len - W, at multiples of L when the cache wraps and at
// multiples of W inside the ring), so a block is a base pointer plus a row stride. Per
// block the K and V rows are turned into fp32 in a small per-thread buffer (nb rows of D,
// at most 16 KiB each; never a copy of the cache):
//   * dense fp32 rows with unit stride are read in place; fp16 / bf16 rows are converted;
//   * int8 with one scale group per vector: the codes are only converted to fp32 and the
//     per-token scale is folded into the scores (s_j *= ks_j after the dot product) and
//     into the probabilities for V (p_j * vs_j), so nothing is multiplied per channel;
//   * int8 with G > 1 groups and int4 are dequantized (code * s, code * s + m).
// A key masked by the slot key mask gets a zero V row (and a zero V scale), since an
// unwritten slot may hold anything and 0 * NaN would leak into the other keys' sum.
// Blocks every row sees completely (and with no masked key) skip the masking.
//
// Threading as in attention.cpp (softmax_simd.h's work items): items handed out through
// an atomic counter; when there are fewer than 4 items per thread (decode: B * Hkv
// items), each item's key range is cut into parts of at least kMinSplitKeys keys whose
// unnormalised (O, m, l) are merged with the log-sum-exp rule.
//
// SIMD: the score, softmax and P.V kernels (softmax_simd.h) and the dequantization ones
// here have scalar, AVX2 + FMA + F16C (8 lanes) and AVX-512 F + BW (16 lanes) versions
// chosen from active_simd_level() on every call (avx512_vnni uses the AVX-512 ones).
// Group scales are broadcast per vector, so a group width that is not a multiple of the
// vector width falls back to the next narrower dequantization kernel (scalar at worst).
//
// KIVI keys (key_block = T > 0): the ring boundary becomes floor(len / T) * T and a store
// block of keys is dequantized with the per-channel (s, m) of its KIVI block converted
// to fp32 once per block (deq_kivi: code * s[c] + m[c]); everything else (values, masks,
// splits) is the per-token path.

namespace sentinel {
namespace {

constexpr const char* kDecodeFn = "decode_attention_kv";

constexpr int64_t kBlockBytes = 16384;  // fp32 K (or V) block buffer

// ===========================================================================
// Dequantization kernels
// ===========================================================================

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

struct DeqKernels {
  DeqInt8Fn int8;
  DeqInt4Fn int4;
  DeqKiviFn kivi;
};

// ---- scalar ------------------------------------------------------------------------

// Channels [c, c1) of one row, one at a time (the scalar kernels and the tails of the
// SIMD ones): int8 codes times sg (kScale) or as they are.
template <bool kScale>
inline void int8_channels(const int8_t* cj, int64_t c, int64_t c1, float sg, float* dj) {
  for (; c < c1; ++c) dj[c] = kScale ? static_cast<float>(cj[c]) * sg : static_cast<float>(cj[c]);
}

// Int4 codes times sg plus mg.
inline void int4_channels(const uint8_t* cj, int64_t c, int64_t c1, float sg, float mg,
                          float* dj) {
  for (; c < c1; ++c) {
    const int code = int4_code(cj, c);
    dj[c] = static_cast<float>(code) * sg + mg;
  }
}

// Int4 codes times s[c] plus m[c] (KIVI keys).
inline void kivi_channels(const uint8_t* cj, int64_t c, int64_t c1, const float* s,
                          const float* m, float* dj) {
  for (; c < c1; ++c) {
    const int code = int4_code(cj, c);
    dj[c] = static_cast<float>(code) * s[c] + m[c];
  }
}

void deq_int8_scalar(const int8_t* codes, int64_t cst, const uint16_t* s, int64_t sst,
                     int64_t nj, int64_t D, int64_t gw, bool fold, float* dst, int64_t dp,
                     float* mul) {
  for (int64_t j = 0; j < nj; ++j) {
    const int8_t* cj = codes + j * cst;
    const uint16_t* sj = s + j * sst;
    float* dj = dst + j * dp;
    if (fold) {
      int8_channels<false>(cj, 0, D, 1.0f, dj);
      mul[j] = half_to_float(sj[0]);
      continue;
    }
    for (int64_t c0 = 0, g = 0; c0 < D; c0 += gw, ++g) {
      int8_channels<true>(cj, c0, std::min(D, c0 + gw), half_to_float(sj[g]), dj);
    }
  }
}

void deq_int4_scalar(const uint8_t* codes, int64_t cst, const uint16_t* sm, int64_t sst,
                     int64_t nj, int64_t D, int64_t gw, float* dst, int64_t dp) {
  for (int64_t j = 0; j < nj; ++j) {
    const uint8_t* cj = codes + j * cst;
    const uint16_t* sj = sm + j * sst;
    for (int64_t c0 = 0, g = 0; c0 < D; c0 += gw, ++g) {
      int4_channels(cj, c0, std::min(D, c0 + gw), half_to_float(sj[2 * g]),
                    half_to_float(sj[2 * g + 1]), dst + j * dp);
    }
  }
}

void deq_kivi_scalar(const uint8_t* codes, int64_t cst, int64_t nj, int64_t D, const float* s,
                     const float* m, float* dst, int64_t dp) {
  for (int64_t j = 0; j < nj; ++j) kivi_channels(codes + j * cst, 0, D, s, m, dst + j * dp);
}

#if defined(SENTINEL_X86_64)

// ---- AVX2 + FMA + F16C (8 lanes) --------------------------------------------------

// The int4 codes in the low 8 bytes of `bytes` as 16 bytes, one code each in channel
// order (low nibble first; SSE2, the baseline).
inline __m128i u4_nibbles(__m128i bytes) {
  const __m128i low4 = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(bytes, low4);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low4);
  return _mm_unpacklo_epi8(lo, hi);
}

SK_TARGET_AVX2 inline float f16_scalar_avx2(uint16_t h) {
  return _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h)));
}

namespace deq_avx2 {
using V = VecAvx2;

// 8 int8 codes -> fp32.
SK_TARGET_AVX2 inline __m256 i8_to_ps(const int8_t* p) {
  return _mm256_cvtepi32_ps(
      _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// The channels [c, c1) after the last whole vector of int8_part.
template <bool kScale>
SK_TARGET_AVX2 inline void int8_tail(const int8_t* cj, int64_t c, int64_t c1, float sg, __m256,
                                     float* dj) {
  int8_channels<kScale>(cj, c, c1, sg, dj);
}

// 8 int4 codes (4 bytes, channels c .. c + 7 with c even) -> fp32.
SK_TARGET_AVX2 inline __m256 u4_to_ps(const uint8_t* p) {
  int32_t word;
  std::memcpy(&word, p, sizeof(word));
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(u4_nibbles(_mm_cvtsi32_si128(word))));
}

// Groups that do not fill whole vectors go to this level.
constexpr DeqInt8Fn kDeqInt8Narrower = &deq_int8_scalar;
constexpr DeqInt4Fn kDeqInt4Narrower = &deq_int4_scalar;
SK_BEGIN_TARGET_AVX2
#include "decode_deq_lanes.h"
SK_END_TARGET
}  // namespace deq_avx2

// ---- AVX-512 F + BW (16 lanes) ----------------------------------------------------

namespace deq_avx512 {
using V = VecAvx512;

// 16 int8 codes -> fp32 (the lanes of k only: the others are 0, their bytes not read).
SK_TARGET_AVX512 inline __m512 i8_to_ps(const int8_t* p,
                                        __mmask16 k = static_cast<__mmask16>(0xFFFF)) {
  const __m128i b = k == 0xFFFF ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p))
                                : _mm512_castsi512_si128(
                                      _mm512_maskz_loadu_epi8(static_cast<__mmask64>(k), p));
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
}

template <bool kScale>
SK_TARGET_AVX512 inline void int8_tail(const int8_t* cj, int64_t c, int64_t c1, float,
                                       __m512 sv, float* dj) {
  if (c < c1) {
    const __mmask16 k = tail_mask16(c1 - c);
    const __m512 x = i8_to_ps(cj + c, k);
    _mm512_mask_storeu_ps(dj + c, k, kScale ? _mm512_mul_ps(x, sv) : x);
  }
}

// 16 int4 codes (8 bytes, channels c .. c + 15 with c even) -> fp32.
SK_TARGET_AVX512 inline __m512 u4_to_ps(const uint8_t* p) {
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(u4_nibbles(bytes)));
}

constexpr DeqInt8Fn kDeqInt8Narrower = &deq_avx2::deq_int8;
constexpr DeqInt4Fn kDeqInt4Narrower = &deq_avx2::deq_int4;
SK_BEGIN_TARGET_AVX512
#include "decode_deq_lanes.h"
SK_END_TARGET
}  // namespace deq_avx512

#endif  // SENTINEL_X86_64

DeqKernels deq_kernels(SimdLevel level) {
#if defined(SENTINEL_X86_64)
  if (level >= SimdLevel::kAvx512) {
    return {&deq_avx512::deq_int8, &deq_avx512::deq_int4, &deq_avx512::deq_kivi};
  }
  if (level >= SimdLevel::kAvx2) {
    return {&deq_avx2::deq_int8, &deq_avx2::deq_int4, &deq_avx2::deq_kivi};
  }
#else
  (void)level;
#endif
  return {&deq_int8_scalar, &deq_int4_scalar, &deq_kivi_scalar};
}

// ===========================================================================
// Driver
// ===========================================================================

struct Problem {
  DecodeKvArgs a;
  AttnIo io;
  int64_t G;     // query heads per KV head
  int64_t gw;    // scale group width
  int64_t dp;    // D rounded up to 16
  int64_t nb;    // keys per block
  float qscale;  // scale * log2(e)
  DeqKernels deq;
};

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
  // The next n floats of the scratch.
  const auto take = [&f](int64_t n) {
    float* p = f;
    f += n;
    return p;
  };
  t.heads = reinterpret_cast<int32_t*>(take(r16(G)));
  t.q = take(rmax * dp);
  t.o = take(rmax * dp);
  t.s = take(r16(rmax * nbp));
  t.kbuf = take(nb * dp);
  t.vbuf = take(nb * dp);
  t.kmul = take(r16(nb));
  t.vmul = take(r16(nb));
  t.km = reinterpret_cast<int8_t*>(take(r16(nbp)));
  t.m = take(r16(rmax));
  t.l = take(r16(rmax));
  t.alpha = take(r16(rmax));
  t.lo = reinterpret_cast<int32_t*>(take(r16(rmax)));
  t.hi = reinterpret_cast<int32_t*>(take(r16(rmax)));
  t.row = take(dp);
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
        static_cast<const char*>(base) + (b * st.b + g * st.h + slot * st.l) * p.io.es;
    if (a.dtype == DType::kFloat32) {
      *rs = st.l;
      return reinterpret_cast<const float*>(first);
    }
    for (int64_t j = 0; j < nj; ++j) {
      p.io.kern.load_row(first + j * st.l * p.io.es, a.dtype, D, buf + j * p.dp);
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
    p.deq.int8(reinterpret_cast<const int8_t*>(codes), st.l, sc, ss.l, nj, D, p.gw, *fold, buf,
               p.dp, mul);
  } else {
    p.deq.int4(codes, st.l, sc, ss.l, nj, D, p.gw, buf, p.dp);
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
    p.deq.kivi(codes + j * a.k_strides.l, a.k_strides.l, je - j, D, sm, sm + p.dp,
               buf + (j - j0) * p.dp, p.dp);
    j = je;
  }
  return buf;
}

// Parts of split key ranges: O rows [R][D], then m[R], l[R].
PartLayout part_layout(const Problem& p, int64_t R) {
  return PartLayout{p.a.D, 1, R * p.a.D, R * p.a.D + R};
}

void run_item(const Problem& p, const AttnItem& it, const Scratch& t, float* ws,
              int64_t slot_floats) {
  const DecodeKvArgs& a = p.a;
  const RowKernels& kern = p.io.kern;
  const int64_t D = a.D, dp = p.dp, nb = p.nb;
  const int64_t sst = round_up(nb, kKeyPad) + kKeyPad;
  const int64_t na = active_heads(a.head_active, a.Hq, p.G, it.b, it.g, t.heads);
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
    p.io.load(p.io.q_row(it.b, t.heads[r / rows], it.i0 + r % rows), a.q_strides.d, t.row);
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

    kern.qk(t.q, R, dp, kp, kst, nj, D, t.s, sst);
    if (kfold) {
      for (int64_t r = 0; r < R; ++r) {
        float* sr = t.s + r * sst;
        for (int64_t j = 0; j < nj; ++j) sr[j] *= t.kmul[j];
      }
    }
    const bool full = j0 >= all_lo && j1 <= all_hi && !masked_keys;
    const RowMask rm{t.lo, t.hi, static_cast<int32_t>(j0), km};
    kern.softmax(t.s, sst, R, nj, full ? nullptr : &rm, t.m, t.l, t.alpha);
    if (vfold) {
      for (int64_t r = 0; r < R; ++r) {
        float* sr = t.s + r * sst;
        for (int64_t j = 0; j < nj; ++j) sr[j] *= t.vmul[j];
      }
    }
    kern.pv(t.s, sst, R, vp, vst, nj, D, t.o, dp, t.alpha);
    j0 = j1;
  }

  finish_item(p.io, it, t.heads, R, t.o, dp, 1, t.m, t.l, part_layout(p, R), ws, slot_floats,
              t.row);
}

}  // namespace

void decode_attention_kv(const DecodeKvArgs& a) {
  const char* fn = kDecodeFn;
  check_min(fn, "B", a.B, 0);
  check_min(fn, "Hq", a.Hq, 0);
  check_min(fn, "Hkv", a.Hkv, 1);
  check_min(fn, "Sq", a.Sq, 0);
  check_min(fn, "D", a.D, 1);
  if (a.D > kMaxHeadDim) {
    bad_arg(fn, "D must be <= " + std::to_string(kMaxHeadDim) + ", got " + std::to_string(a.D));
  }
  check_min(fn, "L", a.L, 1);
  check_min(fn, "W", a.W, 0);
  if (a.Hq % a.Hkv != 0) {
    bad_arg(fn, "Hq (" + std::to_string(a.Hq) + ") must be a multiple of Hkv (" +
                    std::to_string(a.Hkv) + ")");
  }
  constexpr int64_t kMaxSeq = std::numeric_limits<int32_t>::max();
  if (a.Sq >= kMaxSeq || a.L >= kMaxSeq || a.W >= kMaxSeq) {
    bad_arg(fn, "Sq, L and W must be < 2^31");
  }
  const int64_t gw = a.fmt == KvFormat::kDense ? a.D : kv_group_width(fn, a.D, a.n_groups);
  check_nonneg(fn, "q_strides", a.q_strides);
  check_nonneg(fn, "out_strides", a.out_strides);
  {
    const Strides4& o = a.out_strides;
    const int64_t os[4] = {o.b, o.h, o.s, o.d};
    const int64_t sizes[4] = {a.B, a.Hq, a.Sq, a.D};
    if (!rows_disjoint(sizes, os, 4, 1)) {
      bad_arg(fn, "out elements overlap: strides " + fmt_strides(os, 4) + " for [B, Hq, Sq, D] "
                  "= [" + std::to_string(a.B) + ", " + std::to_string(a.Hq) + ", " +
                  std::to_string(a.Sq) + ", " + std::to_string(a.D) + "]");
    }
  }
  check_nonneg(fn, "k_strides", a.k_strides);
  check_nonneg(fn, "v_strides", a.v_strides);
  check_nonneg(fn, "ks_strides", a.ks_strides);
  check_nonneg(fn, "vs_strides", a.vs_strides);
  check_nonneg(fn, "kr_strides", a.kr_strides);
  check_nonneg(fn, "vr_strides", a.vr_strides);
  check_min(fn, "window", a.window, 0);
  check_min(fn, "key_block", a.key_block, 0);
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
  check_min(fn, "num_threads", a.num_threads, 1);
  if (a.B == 0 || a.Hq == 0 || a.Sq == 0) return;
  check_not_null(fn, "q_ptr", a.q);
  check_not_null(fn, "out_ptr", a.out);
  check_not_null(fn, "k_ptr", a.k);
  check_not_null(fn, "v_ptr", a.v);
  if (a.fmt != KvFormat::kDense) {
    check_not_null(fn, "k_scale_ptr", a.k_scale);
    check_not_null(fn, "v_scale_ptr", a.v_scale);
  }
  if (a.W > 0) {
    check_not_null(fn, "k_recent_ptr", a.k_recent);
    check_not_null(fn, "v_recent_ptr", a.v_recent);
  }
  check_not_null(fn, "cache_lens_ptr", a.cache_lens);
  for (int64_t b = 0; b < a.B; ++b) {
    if (a.cache_lens[b] < 0) {
      bad_arg(fn, "cache_lens[" + std::to_string(b) + "] = " + std::to_string(a.cache_lens[b]) +
                      " is negative");
    }
  }

  const SimdLevel level = active_simd_level();
  Problem p;
  p.a = a;
  p.io = AttnIo{static_cast<const char*>(a.q),
                static_cast<char*>(a.out),
                a.dtype,
                element_size(a.dtype),
                a.D,
                a.q_strides,
                a.out_strides,
                row_kernels(level)};
  p.G = a.Hq / a.Hkv;
  p.gw = gw;
  p.dp = round_up(a.D, 16);
  p.nb = std::clamp<int64_t>(kBlockBytes / (4 * p.dp) / 8 * 8, 16, 64);
  p.qscale = static_cast<float>(a.scale * kLog2e);
  p.deq = deq_kernels(level);

  // Work items over (b, g, query tile); pruned heads are zeroed here.
  std::vector<AttnItem> items;
  const auto key_range = [&](int64_t b, int64_t i, int64_t* lo, int64_t* hi) {
    row_range(p, a.cache_lens[b], i, lo, hi);
  };
  // The +2 rows stand for the per-key conversion of K and V.
  const auto cost = [&](int64_t R, int64_t keys) {
    return static_cast<double>(R + 2) * static_cast<double>(keys + 8) *
           static_cast<double>(a.D);
  };
  const int64_t rmax =
      make_items(p.io, a.B, a.Hq, a.Hkv, a.Sq, a.head_active, key_range, cost, &items);
  if (items.empty()) return;

  const int threads = threads_for(items, a.num_threads);
  // Few items for the threads (decode): split key ranges into parts merged afterwards.
  std::vector<SplitTile> splits;
  const int64_t slots = split_and_sort(items, threads, &splits);
  const int64_t slot_floats = rmax * (a.D + 2);
  std::vector<float> ws(static_cast<size_t>(std::max<int64_t>(1, slots * slot_floats)));
  const size_t need = static_cast<size_t>(scratch_floats(p.G, rmax, p.dp, p.nb));
  run_items(items, threads, need, [&](const AttnItem& it, float* scratch) {
    run_item(p, it, carve(scratch, p.G, rmax, p.dp, p.nb), ws.data(), slot_floats);
  });
  merge_splits(p.io, splits, ws.data(), slot_floats, a.head_active, a.Hq, p.G,
               [&](int64_t R) { return part_layout(p, R); });
}

}  // namespace sentinel
