#include "spec_verify.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "args.h"
#include "cpu_features.h"
#include "dtype_access.h"
#include "simd.h"
#include "thread_pool.h"

namespace sentinel {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
// Below this many logits per chunk of work, waking a worker costs more than it saves.
constexpr int64_t kMinElemsPerChunk = 16 * 1024;

// Philox4x32-10 (Salmon et al. 2011), first output word, exactly as Triton's
// tl.randint(seed, counter): key (seed_lo, seed_hi), counter (c_lo, c_hi, 0, 0).
inline uint32_t philox(uint64_t seed, uint64_t counter) {
  constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
  constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    const uint64_t pb = static_cast<uint64_t>(kRoundB) * c2;
    const uint64_t pa = static_cast<uint64_t>(kRoundA) * c0;
    const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(pb);
    c3 = static_cast<uint32_t>(pa);
    c0 = n0;
    c2 = n2;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  return c0;
}

// u in (0, 1), exact in fp32: 23 random bits plus one half, times 2^-23.
inline float uniform(uint64_t seed, uint64_t counter) {
  return (static_cast<float>(philox(seed, counter) >> 9) + 0.5f) * 0x1p-23f;
}

struct Row {
  const char* base;
  DType dtype;
  int64_t stride;
  float at(int64_t j) const { return load1(base, dtype, j * stride); }
  // The row as contiguous fp32: the data itself when it already is, else converted into
  // buf (exact) so that the loops below run on plain floats.
  const float* floats(int64_t V, std::vector<float>& buf) const {
    if (dtype == DType::kFloat32 && stride == 1) return reinterpret_cast<const float*>(base);
    buf.resize(static_cast<size_t>(V));
    for (int64_t j = 0; j < V; ++j) buf[j] = at(j);
    return buf.data();
  }
};

Row row_of(const void* p, DType d, const Strides3V& s, int64_t b, int64_t i) {
  return {static_cast<const char*>(p) + (b * s.b + i * s.p) * element_size(d), d, s.v};
}

// max_j x[j] ignoring NaN (-inf for none); the maximum is exact, so every path agrees.
float max_scalar(const float* x, int64_t n) {
  float m = -kInf;
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

#if defined(SENTINEL_X86_64)
SK_TARGET_AVX2 float max_avx2(const float* x, int64_t n) {
  __m256 m0 = _mm256_set1_ps(-kInf), m1 = m0, m2 = m0, m3 = m0;
  int64_t j = 0;
  // _mm256_max_ps(x, m) returns m when x is NaN: NaN is skipped as in max_scalar
  for (; j + 32 <= n; j += 32) {
    m0 = _mm256_max_ps(_mm256_loadu_ps(x + j), m0);
    m1 = _mm256_max_ps(_mm256_loadu_ps(x + j + 8), m1);
    m2 = _mm256_max_ps(_mm256_loadu_ps(x + j + 16), m2);
    m3 = _mm256_max_ps(_mm256_loadu_ps(x + j + 24), m3);
  }
  for (; j + 8 <= n; j += 8) m0 = _mm256_max_ps(_mm256_loadu_ps(x + j), m0);
  m0 = _mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m0);
  float m = max_scalar(lanes, 8);
  for (; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}
#endif

float row_max(const float* x, int64_t n) {
#if defined(SENTINEL_X86_64)
  if (active_simd_level() >= SimdLevel::kAvx2) return max_avx2(x, n);
#endif
  return max_scalar(x, n);
}

// Softmax statistics of the kept entries (x * inv_t >= thr) of one row: max and
// sum exp(x - max).
struct Stats {
  float m = -kInf, s = 0.0f;
};

Stats row_stats(const Row& r, int64_t V, float inv_t, float thr, std::vector<float>& buf) {
  const float* x = r.floats(V, buf);
  Stats st;
  // x * inv_t is monotone in x (inv_t > 0): the kept maximum is max(x) * inv_t when
  // that passes the threshold, which it does (the threshold is a kept value or -inf).
  st.m = row_max(x, V) * inv_t;
  if (!(st.m >= thr) || st.m == -kInf) {
    st.m = -kInf;
    for (int64_t j = 0; j < V; ++j) {
      const float xs = x[j] * inv_t;
      if (xs >= thr && xs > st.m) st.m = xs;
    }
    if (st.m == -kInf) return st;
  }
  for (int64_t j = 0; j < V; ++j) {
    const float xs = x[j] * inv_t;
    if (xs >= thr) st.s += std::exp(xs - st.m);
  }
  return st;
}

int64_t row_argmax(const Row& r, int64_t V, std::vector<float>& buf) {
  const float* x = r.floats(V, buf);
  const float m = row_max(x, V);
  for (int64_t j = 0; j < V; ++j) {
    if (x[j] == m) return j;  // the lowest index among ties
  }
  return 0;  // no comparable value (all NaN): index 0
}

int64_t draft_at(const SpecVerifyArgs& a, int64_t b, int64_t i) {
  const int64_t off = b * a.draft_stride_b + i * a.draft_stride_k;
  return a.draft_int32 ? static_cast<int64_t>(static_cast<const int32_t*>(a.draft)[off])
                       : static_cast<const int64_t*>(a.draft)[off];
}

void write_row(const SpecVerifyArgs& a, int64_t b, int64_t n, int64_t last) {
  int64_t* out = a.tokens + b * a.tokens_stride_b;
  for (int64_t i = 0; i <= a.K; ++i) out[i] = i < n ? draft_at(a, b, i) : (i == n ? last : -1);
  a.num_accepted[b] = n;
}

void run_greedy(const SpecVerifyArgs& a) {
  const int64_t P = a.K + 1;
  std::vector<int64_t> t(static_cast<size_t>(a.B * P));
  parallel_for(
      a.B * P, a.num_threads,
      [&](int64_t p0, int64_t p1) {
        std::vector<float> buf;
        for (int64_t p = p0; p < p1; ++p) {
          t[p] = row_argmax(row_of(a.target, a.target_dtype, a.target_strides, p / P, p % P),
                            a.V, buf);
        }
      },
      std::max<int64_t>(1, kMinElemsPerChunk / a.V));
  for (int64_t b = 0; b < a.B; ++b) {
    int64_t n = 0;
    while (n < a.K && draft_at(a, b, n) == t[b * P + n]) ++n;
    write_row(a, b, n, t[b * P + n]);
  }
}

void run_sample(const SpecVerifyArgs& a) {
  const int64_t K = a.K, V = a.V, P = a.K + 1;
  const bool has_y = a.draft_logits != nullptr;
  const void* q = has_y ? a.draft_logits : a.draft_probs;
  const uint64_t seed = static_cast<uint64_t>(a.rng[0]);
  const uint64_t offset = static_cast<uint64_t>(a.rng[1]);
  auto thr_of = [&](int64_t b, int64_t i) { return a.thr ? a.thr[b * P + i] : -kInf; };
  auto thr_q_of = [&](int64_t b, int64_t i) { return a.thr_q ? a.thr_q[b * K + i] : -kInf; };

  // normalisers of the target (and the draft logits) at every draft position
  std::vector<Stats> st(static_cast<size_t>(a.B * K)), stq(has_y ? a.B * K : 0);
  parallel_for(
      a.B * K, a.num_threads,
      [&](int64_t p0, int64_t p1) {
        std::vector<float> buf;
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t b = p / K, i = p % K;
          st[p] = row_stats(row_of(a.target, a.target_dtype, a.target_strides, b, i), V,
                            a.inv_t, thr_of(b, i), buf);
          if (has_y) {
            stq[p] = row_stats(row_of(q, a.q_dtype, a.q_strides, b, i), V, a.inv_t,
                               thr_q_of(b, i), buf);
          }
        }
      },
      std::max<int64_t>(1, kMinElemsPerChunk / V));

  parallel_for(
      a.B, a.num_threads,
      [&](int64_t b0, int64_t b1) {
        std::vector<float> buf_x, buf_q;
        for (int64_t b = b0; b < b1; ++b) {
          const uint64_t base = offset + static_cast<uint64_t>(b) * static_cast<uint64_t>(K + V);
          // the accept scan
          int64_t n = 0;
          for (; n < K; ++n) {
            const int64_t x = draft_at(a, b, n);
            float px = 0.0f, qx = 0.0f;
            if (x >= 0 && x < V) {
              const Stats& s = st[b * K + n];
              const Row tr = row_of(a.target, a.target_dtype, a.target_strides, b, n);
              const float xs = tr.at(x) * a.inv_t;
              if (xs >= thr_of(b, n)) px = std::exp(xs - s.m) / s.s;
              const Row qr = row_of(q, a.q_dtype, a.q_strides, b, n);
              if (has_y) {
                const Stats& sq = stq[b * K + n];
                const float ys = qr.at(x) * a.inv_t;
                if (ys >= thr_q_of(b, n)) qx = std::exp(ys - sq.m) / sq.s;
              } else {
                qx = qr.at(x);
              }
            }
            if (!(uniform(seed, base + static_cast<uint64_t>(n)) * qx < px)) break;
          }
          // the race of position n: residual max(0, p - q) when n < K, else p
          const bool has_res = n < K;
          const Row tr = row_of(a.target, a.target_dtype, a.target_strides, b, n);
          const float thr = thr_of(b, n);
          Stats s, sq;
          float thr_q = -kInf;
          Row qr{};
          if (has_res) {
            s = st[b * K + n];
            qr = row_of(q, a.q_dtype, a.q_strides, b, n);
            if (has_y) {
              sq = stq[b * K + n];
              thr_q = thr_q_of(b, n);
            }
          }
          const float* xr = tr.floats(V, buf_x);
          const float* qv = has_res ? qr.floats(V, buf_q) : nullptr;
          float r_best = 0.0f, p_best = -kInf;
          int64_t r_idx = -1, p_idx = -1;
          for (int64_t j = 0; j < V; ++j) {
            const float xs = xr[j] * a.inv_t;
            const bool kept = xs >= thr;
            const float e = -std::log(uniform(seed, base + static_cast<uint64_t>(K + j)));
            const float pkey = kept ? xs - std::log(e) : -kInf;
            if (pkey > p_best || p_idx < 0) {
              p_best = pkey;
              p_idx = j;
            }
            if (has_res) {
              const float p = kept ? std::exp(xs - s.m) / s.s : 0.0f;
              float qj;
              if (has_y) {
                const float ys = qv[j] * a.inv_t;
                qj = ys >= thr_q ? std::exp(ys - sq.m) / sq.s : 0.0f;
              } else {
                qj = qv[j];
              }
              const float rkey = std::max(p - qj, 0.0f) / e;
              if (rkey > r_best) {
                r_best = rkey;
                r_idx = j;
              }
            }
          }
          write_row(a, b, n, r_best > 0.0f ? r_idx : p_idx);
        }
      },
      std::max<int64_t>(1, kMinElemsPerChunk / V));
  if (a.advance_rng) a.rng[1] = static_cast<int64_t>(offset + static_cast<uint64_t>(a.B * (K + V)));
}

constexpr const char* kFn = "speculative_verify";

void check_strides(const char* name, const Strides3V& s) {
  const int64_t v[3] = {s.b, s.p, s.v};
  check_nonneg(kFn, name, v, 3);
}

}  // namespace

Strides3V spec_strides3(const std::vector<int64_t>& v, const char* name) {
  if (v.size() != 3) {
    bad_arg(kFn, std::string(name) + " must have 3 entries (b, position, vocab), got " +
                     std::to_string(v.size()));
  }
  return {v[0], v[1], v[2]};
}

void speculative_verify(const SpecVerifyArgs& a) {
  check_min(kFn, "B", a.B, 0);
  check_min(kFn, "K", a.K, 0);
  check_min(kFn, "V", a.V, 1);
  check_min(kFn, "num_threads", a.num_threads, 1);
  check_strides("target_strides", a.target_strides);
  check_min(kFn, "draft_stride_b", a.draft_stride_b, 0);
  check_min(kFn, "draft_stride_k", a.draft_stride_k, 0);
  check_min(kFn, "tokens_stride_b", a.tokens_stride_b, a.K + 1);
  if (!a.greedy) {
    if (a.draft_probs != nullptr && a.draft_logits != nullptr) {
      bad_arg(kFn, "give draft_probs or draft_logits, not both");
    }
    if (a.K > 0 && a.draft_probs == nullptr && a.draft_logits == nullptr) {
      bad_arg(kFn, "sampling needs draft_probs or draft_logits");
    }
    if (!(std::isfinite(a.inv_t) && a.inv_t > 0.0f)) {
      bad_arg(kFn, "inv_t must be finite and > 0, got " + std::to_string(a.inv_t));
    }
    if (a.thr_q != nullptr && a.draft_logits == nullptr) {
      bad_arg(kFn, "thr_q is only used with draft_logits");
    }
    check_strides("q_strides", a.q_strides);
  }
  if (a.B == 0) return;
  check_not_null(kFn, "target_ptr", a.target);
  check_not_null(kFn, "num_accepted_ptr", a.num_accepted);
  check_not_null(kFn, "tokens_ptr", a.tokens);
  if (a.K > 0) check_not_null(kFn, "draft_ptr", a.draft);
  if (a.greedy) {
    run_greedy(a);
  } else {
    check_not_null(kFn, "rng_ptr", a.rng);
    run_sample(a);
  }
}

void philox_fill(int64_t seed, int64_t offset, int64_t count, int64_t* out) {
  check_min(kFn, "count", count, 0);
  if (count > 0) check_not_null(kFn, "out_ptr", out);
  for (int64_t i = 0; i < count; ++i) {
    out[i] = philox(static_cast<uint64_t>(seed),
                    static_cast<uint64_t>(offset) + static_cast<uint64_t>(i));
  }
}

}  // namespace sentinel
