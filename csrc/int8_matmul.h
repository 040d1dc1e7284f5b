// INT8-weight linear layers on raw pointers: W8A16 (int8 weights dequantized in
// registers, fp32 accumulation) and W8A8 (dynamic per-token int8 activations, int32
// accumulation). The CPU backends of sk.ops.int8_linear and sk.ops.int8_linear_a8.
//
// All sizes and strides are in elements; every matrix has unit column stride. The
// backend (scalar, AVX2+FMA+F16C, AVX-512 F+BW, AVX-512 VNNI) is chosen from
// active_simd_level() on every call. Work is split over output channels (N) on the
// extension's thread pool.
#pragma once

#include <cstdint>

#include "quantize.h"  // DType

namespace sentinel {

// y[m, n] = sum_k x[m, k] * (w[n, k] * s(n, k)) + bias[n], accumulated in fp32, for
// m < M, n < N, where
//   x[m, k]   at x[m * x_stride_row + k]       (x_dtype: fp32 / fp16 / bf16)
//   w[n, k]   at w[n * w_stride_row + k]       (int8)
//   s(n, k) = scale[n * scale_stride_row]                       if group_size == 0
//             scale[n * scale_stride_row + k / group_size]      otherwise (the last group
//                                                               may be partial)
//   bias[n]   at bias[n] (bias_dtype), or 0 when bias == nullptr
//   y[m, n]   at out[m * out_stride_row + n]   (out_dtype, round to nearest even)
// Requires M >= 0 (M == 0 does nothing), K >= 1, N >= 1, x_stride_row >= K,
// w_stride_row >= K, out_stride_row >= N, group_size >= 0, scale_stride_row >= 1 and,
// with groups, >= ceil(K / group_size), num_threads >= 1, non-null pointers (bias
// excepted). Throws std::invalid_argument otherwise.
// The result is accurate to fp32 accumulation; its bits depend on the SIMD level and
// on M (the summation order differs between the GEMV and the GEMM kernels).
void int8_linear_w8a16(const void* x, DType x_dtype, int64_t M, int64_t K, int64_t x_stride_row,
                       const int8_t* w, int64_t N, int64_t w_stride_row, const float* scale,
                       int64_t group_size, int64_t scale_stride_row, const void* bias,
                       DType bias_dtype, void* out, DType out_dtype, int64_t out_stride_row,
                       int num_threads);

// Per token m (fp32 math throughout):
//   xs[k]   = x[m, k] / smooth[k]             (smooth == nullptr: xs = x)
//   a_scale = absmax(xs) / 127;  q[k] = clamp(round_half_even(xs[k] * (127 / absmax)),
//             -127, 127)                      (exactly quantize_int8's rule; zero row -> 0)
//   acc[n]  = sum_k q[k] * w[n, k]            (exact int32)
//   y[m, n] = ((float)acc[n] * a_scale) * w_scale[n] + bias[n]   (three roundings, no FMA)
// w_scale is contiguous float32[N], smooth contiguous float32[K]; other layouts and
// requirements as for int8_linear_w8a16. Since the int32 sums are exact and the
// epilogue is fixed, every SIMD level, thread count and M-tiling gives the same bits.
// K must also be <= 132104 so that |acc| <= K * 127 * 128 < 2^31.
void int8_linear_w8a8(const void* x, DType x_dtype, int64_t M, int64_t K, int64_t x_stride_row,
                      const float* smooth, const int8_t* w, int64_t N, int64_t w_stride_row,
                      const float* w_scale, const void* bias, DType bias_dtype, void* out,
                      DType out_dtype, int64_t out_stride_row, int num_threads);

}  // namespace sentinel
