// Fused RMSNorm (optionally after a residual add), rotary embedding and SiLU * up on raw
// pointers: the CPU backend of sk.ops.rms_norm / add_rms_norm / rotary_embedding /
// silu_mul.
//
// Every function reproduces the roundings of transformers' eager code (each torch op on a
// 16-bit tensor computes in fp32 and rounds its result to the dtype, to nearest even):
//
//   rms_norm:  x' = residual ? round_x(x + residual) : x
//              inv = 1 / sqrt(sum_j(x'_j^2) / cols + eps)       (fp32, correctly rounded)
//              y_j = round_y(w_j * round_x(x'_j * inv))
//   rotary:    out_j       = round(round(x_j * cos_j)       + round(-x_{j+D/2} * sin_j))
//              out_{j+D/2} = round(round(x_{j+D/2} * cos_{j+D/2}) + round(x_j * sin_{j+D/2}))
//   silu_mul:  y_j = round(round(g_j / (1 + exp(-g_j))) * u_j)
//
// The sum of squares is fp32 with 32 interleaved partial sums (fma) combined by a fixed
// tree: its order differs from torch's, so the mean may differ in its last bits. exp is
// this file's own fp32 exp (Cody-Waite reduction, degree-7 polynomial, within about 1 ulp;
// torch's vectorised CPU exp is a different <= 1 ulp approximation), so fp32 silu can
// differ from torch's by an ulp or two. Everything else is bit-exact with torch's formula.
// Contiguous rows of rms_norm and silu_mul run AVX2 code (F16C, FMA) when the CPU has it;
// the scalar code does the same IEEE operations, so every SIMD level (and a strided row)
// gives the same bits. Rotary is scalar. Rows are spread over the thread pool.
// Bad arguments throw std::invalid_argument naming the function and the argument.
#pragma once

#include <cstdint>

#include "args.h"      // Strides4
#include "quantize.h"  // DType

namespace sentinel {

// Rows of x (dtype x_dtype): element (r, j) at x[r * x_stride_row + j * x_stride_col].
// residual (x_dtype, nullptr = none) likewise with its own strides; with a residual,
// residual_out (x_dtype, required) receives round_x(x + residual) at
// residual_out[r * res_out_stride_row + j]. weight[j * w_stride] (w_dtype); y (y_dtype)
// at y[r * y_stride_row + j]; y_dtype must be x_dtype or float32 (what torch's promotion
// of weight and x gives). Requirements: rows >= 0, cols >= 1, column strides >= 1
// (row strides and w_stride >= 0), output row strides >= cols, finite eps >= 0,
// num_threads >= 1, non-null pointers when rows > 0.
void rms_norm(const void* x, DType x_dtype, int64_t rows, int64_t cols, int64_t x_stride_row,
              int64_t x_stride_col, const void* residual, int64_t res_stride_row,
              int64_t res_stride_col, void* residual_out, int64_t res_out_stride_row,
              const void* weight, DType w_dtype, int64_t w_stride, float eps, void* y,
              DType y_dtype, int64_t y_stride_row, int num_threads);

// q: [B, Hq, S, D], k: [B, Hkv, S, D], q_out / k_out likewise, cos / sin: [B, 1, S, D]
// given as Strides4 (a broadcast dimension has stride 0), all of one dtype. Element
// (b, h, s, d) of x lives at x[b * st.b + h * st.h + s * st.s + d * st.d]. Requirements:
// sizes >= 0, D even and >= 2, strides >= 0, num_threads >= 1, non-null pointers for
// every tensor with elements.
void rotary_embedding(const void* q, const void* k, const void* cos, const void* sin,
                      void* q_out, void* k_out, DType dtype, int64_t B, int64_t Hq,
                      int64_t Hkv, int64_t S, int64_t D, const Strides4& q_strides,
                      const Strides4& k_strides, const Strides4& cos_strides,
                      const Strides4& sin_strides, const Strides4& q_out_strides,
                      const Strides4& k_out_strides, int num_threads);

// y[r * y_stride_row + j] = silu(gate[r, j]) * up[r, j], all of dtype; gate / up rows and
// columns at the given strides. Requirements: rows, cols >= 0, input strides >= 0,
// y_stride_row >= cols, num_threads >= 1, non-null pointers when not empty.
void silu_mul(const void* gate, const void* up, void* y, DType dtype, int64_t rows,
              int64_t cols, int64_t gate_stride_row, int64_t gate_stride_col,
              int64_t up_stride_row, int64_t up_stride_col, int64_t y_stride_row,
              int num_threads);

}  // namespace sentinel
