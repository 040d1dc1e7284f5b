#include "fused.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "dtype_access.h"
#include "dtype_convert.h"
#include "thread_pool.h"

namespace sentinel {
namespace {

// Below this much work per chunk, waking a worker costs more than it saves.
constexpr int64_t kMinElemsPerChunk = 16 * 1024;

int64_t rows_grain(int64_t cols) {
  return std::max<int64_t>(1, kMinElemsPerChunk / std::max<int64_t>(1, cols));
}

// Forces v to be a rounded fp32 value held in a register: keeps the compiler from
// contracting a product with a following addition into an FMA (GCC contracts by default
// wherever FMA is available), which would skip the rounding torch does after each op.
inline float materialize(float v) {
#if defined(__GNUC__) && defined(__x86_64__)
  __asm__("" : "+x"(v));
#elif defined(__GNUC__) && defined(__aarch64__)
  __asm__("" : "+w"(v));
#else
  volatile float held = v;
  v = held;
#endif
  return v;
}

// v rounded (to nearest even) to dtype D and back to fp32: what torch stores after an op.
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

template <DType D>
inline float load(const void* base, int64_t i) {
  return load1(base, D, i);  // the switch folds away: D is a constant
}

template <DType D>
inline void store(void* base, int64_t i, float v) {
  store1(base, D, i, v);
}

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
  const void* weight;
  DType w_dtype;
  int64_t w_stride;
  float eps;
  char* y;
  DType y_dtype;
  int64_t y_stride_row;
  int64_t cols;
};

template <DType XD>
void rms_norm_rows(const RmsArgs& a, int64_t r0, int64_t r1) {
  constexpr int64_t es = element_size(XD);
  const int64_t ys = element_size(a.y_dtype);
  const int64_t n = a.cols;
  std::vector<float> buf(static_cast<size_t>(n));
  for (int64_t r = r0; r < r1; ++r) {
    const char* xr = a.x + r * a.x_stride_row * es;
    // Pass 1: the (residual-added) row in fp32 (exact: it holds XD values) and its sum
    // of squares in 8 interleaved partial sums.
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (a.residual != nullptr) {
      const char* rr = a.residual + r * a.res_stride_row * es;
      char* ro = a.residual_out + r * a.res_out_stride_row * es;
      for (int64_t j = 0; j < n; ++j) {
        const float v = round_to<XD>(load<XD>(xr, j * a.x_stride_col) +
                                     load<XD>(rr, j * a.res_stride_col));
        store<XD>(ro, j, v);
        buf[j] = v;
        acc[j & 7] += v * v;
      }
    } else {
      for (int64_t j = 0; j < n; ++j) {
        const float v = load<XD>(xr, j * a.x_stride_col);
        buf[j] = v;
        acc[j & 7] += v * v;
      }
    }
    const float sum =
        ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    const float mean = sum / static_cast<float>(n);
    const float inv = 1.0f / std::sqrt(mean + a.eps);  // torch's CPU rsqrt: 1 / sqrt
    // Pass 2: h = round_x(x * inv); y = round_y(w * h).
    char* yr = a.y + r * a.y_stride_row * ys;
    for (int64_t j = 0; j < n; ++j) {
      const float h = round_to<XD>(buf[j] * inv);
      const float w = load1(a.weight, a.w_dtype, j * a.w_stride);
      store1(yr, a.y_dtype, j, w * h);
    }
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
    const float x1 = load<D>(x, j * xs.d), x2 = load<D>(x, j2 * xs.d);
    const float c1 = load<D>(c, j * cs.d), c2 = load<D>(c, j2 * cs.d);
    const float s1 = load<D>(s, j * ss.d), s2 = load<D>(s, j2 * ss.d);
    // torch: (x * cos) + (cat(-x2, x1) * sin), each op rounded to the dtype.
    const float a1 = round_to<D>(x1 * c1), b1 = round_to<D>(-x2 * s1);
    const float a2 = round_to<D>(x2 * c2), b2 = round_to<D>(x1 * s2);
    store<D>(out, j * os.d, a1 + b1);
    store<D>(out, j2 * os.d, a2 + b2);
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
void silu_mul_rows(const SiluArgs& a, int64_t r0, int64_t r1) {
  constexpr int64_t es = element_size(D);
  for (int64_t r = r0; r < r1; ++r) {
    const char* g = a.gate + r * a.gs_r * es;
    const char* u = a.up + r * a.us_r * es;
    char* y = a.y + r * a.ys_r * es;
    for (int64_t j = 0; j < a.cols; ++j) {
      const float gv = load<D>(g, j * a.gs_c);
      const float silu = round_to<D>(gv / (1.0f + std::exp(-gv)));
      store<D>(y, j, silu * load<D>(u, j * a.us_c));
    }
  }
}

// ---------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------

[[noreturn]] void bad_arg(const char* fn, const std::string& msg) {
  throw std::invalid_argument(std::string(fn) + ": " + msg);
}

void check_min(const char* fn, const char* name, int64_t v, int64_t lo) {
  if (v < lo) {
    bad_arg(fn, std::string(name) + " must be >= " + std::to_string(lo) + ", got " +
                    std::to_string(v));
  }
}

void check_not_null(const char* fn, const char* name, const void* p) {
  if (p == nullptr) bad_arg(fn, std::string(name) + " is a null pointer");
}

void check_strides(const char* fn, const char* name, const Strides4& s) {
  if (s.b < 0 || s.h < 0 || s.s < 0 || s.d < 0) {
    bad_arg(fn, std::string(name) + " must be >= 0, got (" + std::to_string(s.b) + ", " +
                    std::to_string(s.h) + ", " + std::to_string(s.s) + ", " +
                    std::to_string(s.d) + ")");
  }
}

void check_threads(const char* fn, int num_threads) {
  if (num_threads < 1) {
    bad_arg(fn, "num_threads must be >= 1, got " + std::to_string(num_threads));
  }
}

}  // namespace

Strides4 fused_strides4(const std::vector<int64_t>& v, const char* fn, const char* name) {
  if (v.size() != 4) {
    bad_arg(fn, std::string(name) +
                    " must have 4 entries (B, H, S, D strides in elements), got " +
                    std::to_string(v.size()));
  }
  return Strides4{v[0], v[1], v[2], v[3]};
}

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
  check_threads(fn, num_threads);
  if (!(std::isfinite(eps) && eps >= 0.0f)) {
    bad_arg(fn, "eps must be finite and >= 0, got " + std::to_string(eps));
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

  const RmsArgs a{static_cast<const char*>(x), x_stride_row, x_stride_col,
                  static_cast<const char*>(residual), res_stride_row, res_stride_col,
                  static_cast<char*>(residual_out), res_out_stride_row, weight, w_dtype,
                  w_stride, eps, static_cast<char*>(y), y_dtype, y_stride_row, cols};
  auto run = [&](auto body) {
    parallel_for(rows, num_threads, [&](int64_t r0, int64_t r1) { body(a, r0, r1); },
                 rows_grain(cols));
  };
  switch (x_dtype) {
    case DType::kFloat32:
      return run(rms_norm_rows<DType::kFloat32>);
    case DType::kFloat16:
      return run(rms_norm_rows<DType::kFloat16>);
    case DType::kBFloat16:
      return run(rms_norm_rows<DType::kBFloat16>);
  }
  bad_arg(fn, "unsupported dtype");
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
  check_strides(fn, "q_strides", q_strides);
  check_strides(fn, "k_strides", k_strides);
  check_strides(fn, "cos_strides", cos_strides);
  check_strides(fn, "sin_strides", sin_strides);
  check_strides(fn, "q_out_strides", q_out_strides);
  check_strides(fn, "k_out_strides", k_out_strides);
  check_threads(fn, num_threads);
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
  switch (dtype) {
    case DType::kFloat32:
      return run(rope_rows<DType::kFloat32>);
    case DType::kFloat16:
      return run(rope_rows<DType::kFloat16>);
    case DType::kBFloat16:
      return run(rope_rows<DType::kBFloat16>);
  }
  bad_arg(fn, "unsupported dtype");
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
  check_threads(fn, num_threads);
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
  switch (dtype) {
    case DType::kFloat32:
      return run(silu_mul_rows<DType::kFloat32>);
    case DType::kFloat16:
      return run(silu_mul_rows<DType::kFloat16>);
    case DType::kBFloat16:
      return run(silu_mul_rows<DType::kBFloat16>);
  }
  bad_arg(fn, "unsupported dtype");
}

}  // namespace sentinel
