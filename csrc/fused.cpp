#include "fused.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "args.h"
#include "cpu_features.h"
#include "dtype_access.h"
#include "dtype_convert.h"
#include "simd.h"
#include "thread_pool.h"

namespace sentinel {
namespace {

// Below this much work per chunk, waking a worker costs more than it saves.
constexpr int64_t kMinElemsPerChunk = 16 * 1024;

int64_t rows_grain(int64_t cols) {
  return std::max<int64_t>(1, kMinElemsPerChunk / std::max<int64_t>(1, cols));
}

// v rounded (to nearest even) to dtype D and back to fp32: what torch stores after an op
// (materialize(): the product that made v is not contracted into a following add).
template <DType D>
inline float round_to(float v) {
  if constexpr (D == DType::kFloat32) {
    return materialize(v);
  } else if constexpr (D == DType::kFloat16) {
    return half_to_float(float_to_half(v));
  } else {
    return bf16_to_float(float_to_bf16(v));
  }
}

// ---------------------------------------------------------------------------
// Arithmetic shared by the scalar and AVX2 paths
// ---------------------------------------------------------------------------
//
// Both paths do the same IEEE operations on every element, so they agree bit for bit (and
// a strided row, which takes the scalar path, gets the bits of a contiguous one):
// * the sum of squares has 32 partial sums, element j going to partial j % 32 with an fma,
//   combined by the fixed tree of reduce32();
// * exp is exp_f32() below, evaluated with explicit fmas;
// * no product is ever followed by an addition the compiler could contract (materialize()
//   where one is).

constexpr int kPartials = 32;

inline float reduce32(float* acc) {
  for (int w = kPartials / 2; w >= 1; w >>= 1) {
    for (int i = 0; i < w; ++i) acc[i] += acc[i + w];
  }
  return acc[0];
}

// exp(x) in fp32, within about 1 ulp: x = n ln2 + r (Cody-Waite, |r| <= ln2 / 2), exp(r) by
// its degree-7 Taylor polynomial (truncation < 0.1 ulp), times 2^n applied in two halves
// so that results down to the subnormals and up to overflow come out right.
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693147182464599609375f;        // fp32(ln 2)
constexpr float kLn2Lo = -1.904654323148236e-09f;         // ln 2 - kLn2Hi
constexpr float kExpMin = -104.0f;                        // exp underflows below
constexpr float kExpMax = 89.0f;                          // and overflows above
constexpr float kExpC[8] = {1.0f, 1.0f, 0.5f, 1.0f / 6, 1.0f / 24, 1.0f / 120, 1.0f / 720,
                            1.0f / 5040};

inline float exp_f32(float x) {
  x = std::fmin(std::fmax(x, kExpMin), kExpMax);  // NaN -> kExpMin, as _mm256_max_ps
  const float n = std::nearbyint(x * kLog2e);
  float r = std::fmaf(-n, kLn2Hi, x);
  r = std::fmaf(-n, kLn2Lo, r);
  float p = kExpC[7];
  for (int i = 6; i >= 0; --i) p = std::fmaf(p, r, kExpC[i]);
  const int ni = static_cast<int>(n);
  const int n1 = ni >> 1, n2 = ni - n1;
  const float s1 = bits_f32(static_cast<uint32_t>(n1 + 127) << 23);
  const float s2 = bits_f32(static_cast<uint32_t>(n2 + 127) << 23);
  return materialize(materialize(p * s1) * s2);
}

// silu(g) = g / (1 + exp(-g)), as torch computes it (fp32, one rounding per op).
inline float silu_f32(float g) { return g / (1.0f + exp_f32(-g)); }

// ---------------------------------------------------------------------------
// RMSNorm
// ---------------------------------------------------------------------------

struct RmsArgs {
  const char* x;
  int64_t x_stride_row, x_stride_col;
  const char* residual;
  int64_t res_stride_row, res_stride_col;
  char* residual_out;
  int64_t res_out_stride_row;
  const float* w32;  // the weight converted to fp32 (exact)
  float eps;
  char* y;
  int64_t y_stride_row;
  int64_t cols;
};

// Pass 1 of one row, scalar: buf = the (residual-added) row in fp32, exact since it holds
// XD values; returns the sum of squares.
template <DType XD>
float rms_pass1_scalar(const RmsArgs& a, const char* xr, const char* rr, char* ro, float* buf) {
  float acc[kPartials] = {};
  for (int64_t j = 0; j < a.cols; ++j) {
    float v = load1<XD>(xr, j * a.x_stride_col);
    if (rr != nullptr) {
      v = round_to<XD>(v + load1<XD>(rr, j * a.res_stride_col));
      store1<XD>(ro, j, v);
    }
    buf[j] = v;
    acc[j % kPartials] = std::fmaf(v, v, acc[j % kPartials]);
  }
  return reduce32(acc);
}

// Pass 2 of elements [j0, n), scalar: y = round_y(w * round_x(x * inv)).
template <DType XD, DType YD>
void rms_pass2_scalar(const float* buf, const float* w32, float inv, char* y, int64_t j0,
                      int64_t n) {
  for (int64_t j = j0; j < n; ++j) store1<YD>(y, j, w32[j] * round_to<XD>(buf[j] * inv));
}

inline float inv_rms(float sum, int64_t n, float eps) {
  const float mean = sum / static_cast<float>(n);
  return 1.0f / std::sqrt(mean + eps);  // torch's CPU rsqrt: 1 / sqrt, both rounded
}

#if defined(SENTINEL_X86_64)

// v rounded to D and back (round_to<D> on 8 lanes).
template <DType D>
SK_TARGET_AVX2 inline __m256 round8(__m256 v) {
  if constexpr (D == DType::kFloat32) {
    return v;
  } else if constexpr (D == DType::kFloat16) {
    return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    return _mm256_castsi256_ps(_mm256_slli_epi32(f32_to_bf16_avx2(v), 16));
  }
}

SK_TARGET_AVX2 inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(kExpMin));  // NaN -> kExpMin: the result is unused
  x = _mm256_min_ps(x, _mm256_set1_ps(kExpMax));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kExpC[7]);
  for (int i = 6; i >= 0; --i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpC[i]));
  const __m256i ni = _mm256_cvtps_epi32(n);  // exact: n is integral
  const __m256i n1 = _mm256_srai_epi32(ni, 1);
  const __m256i n2 = _mm256_sub_epi32(ni, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  return materialize(_mm256_mul_ps(materialize(_mm256_mul_ps(p, s1)), s2));
}

// Pass 1 of a contiguous row (x and residual with unit column stride): as the scalar
// pass 1; a last partial block of 32 is zero-padded (adding 0 to a partial sum is exact).
template <DType XD>
SK_TARGET_AVX2 float rms_pass1_avx2(const RmsArgs& a, const char* xr, const char* rr, char* ro,
                                    float* buf) {
  const int64_t n = a.cols;
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                   _mm256_setzero_ps()};
  int64_t j = 0;
  for (; j + kPartials <= n; j += kPartials) {
    for (int k = 0; k < 4; ++k) {
      const int64_t jj = j + 8 * k;
      __m256 v = load8_avx2<XD>(xr, jj);
      if (rr != nullptr) {
        v = round8<XD>(_mm256_add_ps(v, load8_avx2<XD>(rr, jj)));
        store8_avx2<XD>(ro, jj, v);
      }
      _mm256_storeu_ps(buf + jj, v);
      acc[k] = _mm256_fmadd_ps(v, v, acc[k]);
    }
  }
  if (j < n) {
    float tail[kPartials] = {};
    for (int64_t t = j; t < n; ++t) {
      float v = load1<XD>(xr, t);
      if (rr != nullptr) {
        v = round_to<XD>(v + load1<XD>(rr, t));
        store1<XD>(ro, t, v);
      }
      buf[t] = v;
      tail[t - j] = v;
    }
    for (int k = 0; k < 4; ++k) {
      const __m256 v = _mm256_loadu_ps(tail + 8 * k);
      acc[k] = _mm256_fmadd_ps(v, v, acc[k]);
    }
  }
  float partial[kPartials];
  for (int k = 0; k < 4; ++k) _mm256_storeu_ps(partial + 8 * k, acc[k]);
  return reduce32(partial);
}

template <DType XD, DType YD>
SK_TARGET_AVX2 void rms_pass2_avx2(const float* buf, const float* w32, float inv, char* y,
                                   int64_t n) {
  const __m256 vinv = _mm256_set1_ps(inv);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 h = round8<XD>(_mm256_mul_ps(_mm256_loadu_ps(buf + j), vinv));
    store8_avx2<YD>(y, j, _mm256_mul_ps(_mm256_loadu_ps(w32 + j), h));
  }
  rms_pass2_scalar<XD, YD>(buf, w32, inv, y, j, n);
}

#endif  // SENTINEL_X86_64

template <DType XD, DType YD>
void rms_norm_rows(const RmsArgs& a, int64_t r0, int64_t r1) {
  constexpr int64_t es = element_size(XD);
  constexpr int64_t ys = element_size(YD);
  const int64_t n = a.cols;
  const bool contiguous =
      a.x_stride_col == 1 && (a.residual == nullptr || a.res_stride_col == 1);
#if defined(SENTINEL_X86_64)
  const bool avx2 = active_simd_level() >= SimdLevel::kAvx2;
#else
  const bool avx2 = false;
#endif
  std::vector<float> buf(static_cast<size_t>(n));
  for (int64_t r = r0; r < r1; ++r) {
    const char* xr = a.x + r * a.x_stride_row * es;
    const char* rr = a.residual != nullptr ? a.residual + r * a.res_stride_row * es : nullptr;
    char* ro = a.residual != nullptr ? a.residual_out + r * a.res_out_stride_row * es : nullptr;
    char* yr = a.y + r * a.y_stride_row * ys;
#if defined(SENTINEL_X86_64)
    if (avx2) {
      const float sum = contiguous ? rms_pass1_avx2<XD>(a, xr, rr, ro, buf.data())
                                   : rms_pass1_scalar<XD>(a, xr, rr, ro, buf.data());
      rms_pass2_avx2<XD, YD>(buf.data(), a.w32, inv_rms(sum, n, a.eps), yr, n);
      continue;
    }
#endif
    (void)avx2;
    (void)contiguous;
    const float sum = rms_pass1_scalar<XD>(a, xr, rr, ro, buf.data());
    rms_pass2_scalar<XD, YD>(buf.data(), a.w32, inv_rms(sum, n, a.eps), yr, 0, n);
  }
}

// ---------------------------------------------------------------------------
// Rotary embedding
// ---------------------------------------------------------------------------

template <DType D>
void rope_row(const char* x, const Strides4& xs, const char* c, const Strides4& cs,
              const char* s, const Strides4& ss, char* out, const Strides4& os, int64_t half) {
  for (int64_t j = 0; j < half; ++j) {
    const int64_t j2 = j + half;
    const float x1 = load1<D>(x, j * xs.d), x2 = load1<D>(x, j2 * xs.d);
    const float c1 = load1<D>(c, j * cs.d), c2 = load1<D>(c, j2 * cs.d);
    const float s1 = load1<D>(s, j * ss.d), s2 = load1<D>(s, j2 * ss.d);
    // torch: (x * cos) + (cat(-x2, x1) * sin), each op rounded to the dtype.
    const float a1 = round_to<D>(x1 * c1), b1 = round_to<D>(-x2 * s1);
    const float a2 = round_to<D>(x2 * c2), b2 = round_to<D>(x1 * s2);
    store1<D>(out, j * os.d, a1 + b1);
    store1<D>(out, j2 * os.d, a2 + b2);
  }
}

struct RopeArgs {
  const char *q, *k, *cos, *sin;
  char *q_out, *k_out;
  int64_t Hq, Hkv, S, D;
  Strides4 qs, ks, cs, ss, qos, kos;
};

template <DType D>
void rope_rows(const RopeArgs& a, int64_t i0, int64_t i1) {
  constexpr int64_t es = element_size(D);
  const int64_t H = a.Hq + a.Hkv;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t b = i / (H * a.S);
    const int64_t h = (i / a.S) % H;
    const int64_t t = i % a.S;
    const char* c = a.cos + (b * a.cs.b + t * a.cs.s) * es;
    const char* s = a.sin + (b * a.ss.b + t * a.ss.s) * es;
    if (h < a.Hq) {
      rope_row<D>(a.q + (b * a.qs.b + h * a.qs.h + t * a.qs.s) * es, a.qs, c, a.cs, s, a.ss,
                  a.q_out + (b * a.qos.b + h * a.qos.h + t * a.qos.s) * es, a.qos, a.D / 2);
    } else {
      const int64_t hk = h - a.Hq;
      rope_row<D>(a.k + (b * a.ks.b + hk * a.ks.h + t * a.ks.s) * es, a.ks, c, a.cs, s, a.ss,
                  a.k_out + (b * a.kos.b + hk * a.kos.h + t * a.kos.s) * es, a.kos, a.D / 2);
    }
  }
}

// ---------------------------------------------------------------------------
// SiLU * up
// ---------------------------------------------------------------------------

struct SiluArgs {
  const char *gate, *up;
  char* y;
  int64_t cols, gs_r, gs_c, us_r, us_c, ys_r;
};

template <DType D>
void silu_mul_scalar(const char* g, int64_t gs, const char* u, int64_t us, char* y, int64_t j0,
                     int64_t n) {
  for (int64_t j = j0; j < n; ++j) {
    const float silu = round_to<D>(silu_f32(load1<D>(g, j * gs)));
    store1<D>(y, j, silu * load1<D>(u, j * us));
  }
}

#if defined(SENTINEL_X86_64)
template <DType D>
SK_TARGET_AVX2 void silu_mul_avx2(const char* g, const char* u, char* y, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 gv = load8_avx2<D>(g, j);
    const __m256 e = exp8(_mm256_xor_ps(gv, sign));
    const __m256 silu = round8<D>(_mm256_div_ps(gv, _mm256_add_ps(one, e)));
    store8_avx2<D>(y, j, _mm256_mul_ps(silu, load8_avx2<D>(u, j)));
  }
  silu_mul_scalar<D>(g, 1, u, 1, y, j, n);
}
#endif

template <DType D>
void silu_mul_rows(const SiluArgs& a, int64_t r0, int64_t r1) {
  constexpr int64_t es = element_size(D);
#if defined(SENTINEL_X86_64)
  const bool avx2 =
      active_simd_level() >= SimdLevel::kAvx2 && a.gs_c == 1 && a.us_c == 1;
#endif
  for (int64_t r = r0; r < r1; ++r) {
    const char* g = a.gate + r * a.gs_r * es;
    const char* u = a.up + r * a.us_r * es;
    char* y = a.y + r * a.ys_r * es;
#if defined(SENTINEL_X86_64)
    if (avx2) {
      silu_mul_avx2<D>(g, u, y, a.cols);
      continue;
    }
#endif
    silu_mul_scalar<D>(g, a.gs_c, u, a.us_c, y, 0, a.cols);
  }
}

}  // namespace

void rms_norm(const void* x, DType x_dtype, int64_t rows, int64_t cols, int64_t x_stride_row,
              int64_t x_stride_col, const void* residual, int64_t res_stride_row,
              int64_t res_stride_col, void* residual_out, int64_t res_out_stride_row,
              const void* weight, DType w_dtype, int64_t w_stride, float eps, void* y,
              DType y_dtype, int64_t y_stride_row, int num_threads) {
  const char* fn = residual != nullptr ? "add_rms_norm" : "rms_norm";
  check_min(fn, "rows", rows, 0);
  check_min(fn, "cols", cols, 1);
  check_min(fn, "x_stride_row", x_stride_row, 0);
  check_min(fn, "x_stride_col", x_stride_col, 1);
  check_min(fn, "w_stride", w_stride, 0);
  check_min(fn, "y_stride_row", y_stride_row, cols);
  check_min(fn, "num_threads", num_threads, 1);
  if (!(std::isfinite(eps) && eps >= 0.0f)) {
    bad_arg(fn, "eps must be finite and >= 0, got " + std::to_string(eps));
  }
  if (y_dtype != x_dtype && y_dtype != DType::kFloat32) {
    bad_arg(fn, std::string("y_dtype must be x_dtype or float32 (torch's promotion of weight "
                            "and x), got ") + dtype_name(y_dtype) + " for x " +
                    dtype_name(x_dtype));
  }
  if (residual != nullptr) {
    check_min(fn, "res_stride_row", res_stride_row, 0);
    check_min(fn, "res_stride_col", res_stride_col, 1);
    check_min(fn, "res_out_stride_row", res_out_stride_row, cols);
  }
  if (rows == 0) return;
  check_not_null(fn, "x_ptr", x);
  check_not_null(fn, "weight_ptr", weight);
  check_not_null(fn, "y_ptr", y);
  if (residual != nullptr) check_not_null(fn, "residual_out_ptr", residual_out);

  // The weight in fp32 (exact), once per call: the row loops then read plain floats.
  std::vector<float> w32(static_cast<size_t>(cols));
  for (int64_t j = 0; j < cols; ++j) w32[j] = load1(weight, w_dtype, j * w_stride);

  const RmsArgs a{static_cast<const char*>(x), x_stride_row, x_stride_col,
                  static_cast<const char*>(residual), res_stride_row, res_stride_col,
                  static_cast<char*>(residual_out), res_out_stride_row, w32.data(), eps,
                  static_cast<char*>(y), y_stride_row, cols};
  auto run = [&](auto body) {
    parallel_for(rows, num_threads, [&](int64_t r0, int64_t r1) { body(a, r0, r1); },
                 rows_grain(cols));
  };
  dispatch_dtype(fn, x_dtype, [&](auto xd) {
    constexpr DType XD = decltype(xd)::value;  // y is x's dtype or float32
    if (y_dtype == DType::kFloat32) {
      run(rms_norm_rows<XD, DType::kFloat32>);
    } else {
      run(rms_norm_rows<XD, XD>);
    }
  });
}

void rotary_embedding(const void* q, const void* k, const void* cos, const void* sin,
                      void* q_out, void* k_out, DType dtype, int64_t B, int64_t Hq,
                      int64_t Hkv, int64_t S, int64_t D, const Strides4& q_strides,
                      const Strides4& k_strides, const Strides4& cos_strides,
                      const Strides4& sin_strides, const Strides4& q_out_strides,
                      const Strides4& k_out_strides, int num_threads) {
  const char* fn = "rotary_embedding";
  check_min(fn, "B", B, 0);
  check_min(fn, "Hq", Hq, 0);
  check_min(fn, "Hkv", Hkv, 0);
  check_min(fn, "S", S, 0);
  check_min(fn, "D", D, 2);
  if (D % 2 != 0) bad_arg(fn, "D must be even, got " + std::to_string(D));
  check_nonneg(fn, "q_strides", q_strides);
  check_nonneg(fn, "k_strides", k_strides);
  check_nonneg(fn, "cos_strides", cos_strides);
  check_nonneg(fn, "sin_strides", sin_strides);
  check_nonneg(fn, "q_out_strides", q_out_strides);
  check_nonneg(fn, "k_out_strides", k_out_strides);
  check_min(fn, "num_threads", num_threads, 1);
  const int64_t rows = B * (Hq + Hkv) * S;
  if (rows == 0) return;
  check_not_null(fn, "cos_ptr", cos);
  check_not_null(fn, "sin_ptr", sin);
  if (Hq > 0) {
    check_not_null(fn, "q_ptr", q);
    check_not_null(fn, "q_out_ptr", q_out);
  }
  if (Hkv > 0) {
    check_not_null(fn, "k_ptr", k);
    check_not_null(fn, "k_out_ptr", k_out);
  }
  const RopeArgs a{static_cast<const char*>(q), static_cast<const char*>(k),
                   static_cast<const char*>(cos), static_cast<const char*>(sin),
                   static_cast<char*>(q_out), static_cast<char*>(k_out), Hq, Hkv, S, D,
                   q_strides, k_strides, cos_strides, sin_strides, q_out_strides,
                   k_out_strides};
  auto run = [&](auto body) {
    parallel_for(rows, num_threads, [&](int64_t i0, int64_t i1) { body(a, i0, i1); },
                 rows_grain(D));
  };
  dispatch_dtype(fn, dtype, [&](auto d) { run(rope_rows<decltype(d)::value>); });
}

void silu_mul(const void* gate, const void* up, void* y, DType dtype, int64_t rows,
              int64_t cols, int64_t gate_stride_row, int64_t gate_stride_col,
              int64_t up_stride_row, int64_t up_stride_col, int64_t y_stride_row,
              int num_threads) {
  const char* fn = "silu_mul";
  check_min(fn, "rows", rows, 0);
  check_min(fn, "cols", cols, 0);
  check_min(fn, "gate_stride_row", gate_stride_row, 0);
  check_min(fn, "gate_stride_col", gate_stride_col, 0);
  check_min(fn, "up_stride_row", up_stride_row, 0);
  check_min(fn, "up_stride_col", up_stride_col, 0);
  check_min(fn, "y_stride_row", y_stride_row, cols);
  check_min(fn, "num_threads", num_threads, 1);
  if (rows == 0 || cols == 0) return;
  check_not_null(fn, "gate_ptr", gate);
  check_not_null(fn, "up_ptr", up);
  check_not_null(fn, "y_ptr", y);
  const SiluArgs a{static_cast<const char*>(gate), static_cast<const char*>(up),
                   static_cast<char*>(y), cols, gate_stride_row, gate_stride_col,
                   up_stride_row, up_stride_col, y_stride_row};
  auto run = [&](auto body) {
    parallel_for(rows, num_threads, [&](int64_t r0, int64_t r1) { body(a, r0, r1); },
                 rows_grain(cols));
  };
  dispatch_dtype(fn, dtype, [&](auto d) { run(silu_mul_rows<decltype(d)::value>); });
}

}  // namespace sentinel
