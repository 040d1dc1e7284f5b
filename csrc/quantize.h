// Row-wise symmetric absmax INT8 quantization / dequantization on raw pointers.
//
// Every backend (scalar, AVX2+F16C+FMA, AVX-512 F+BW) produces bit-identical
// results; the backend is chosen from active_simd_level() on every call.
#pragma once

#include <cstdint>
#include <string>

namespace sentinel {

enum class DType { kFloat32, kFloat16, kBFloat16 };

// "float32" | "float16" | "bfloat16"; throws std::invalid_argument otherwise.
DType parse_dtype(const std::string& name);
const char* dtype_name(DType dtype);

// Per row r (strides in elements):
//   absmax = max_j |x[r, j]| (fp32);  scale[r] = absmax / 127
//   absmax == 0: scale[r] = 0, q[r, :] = 0
//   else: inv = 127 / absmax; q[r, j] = clamp(round_half_even(x[r, j] * inv), -127, 127)
// q[r, j] lives at q[r * q_stride_row + j]; scale is contiguous fp32 of length rows.
// NaN products quantize to 0. Throws std::invalid_argument on bad arguments.
void quantize_int8(const void* x, DType dtype, int64_t rows, int64_t cols, int64_t x_stride_row,
                   int64_t x_stride_col, int8_t* q, int64_t q_stride_row, float* scale,
                   int num_threads);

// out[r * out_stride_row + j] = to_dtype((float)q[r * q_stride_row + j * q_stride_col] *
//                                        scale[r * scale_stride])
// with round-to-nearest-even conversion. Throws std::invalid_argument on bad arguments.
void dequantize_int8(const int8_t* q, int64_t rows, int64_t cols, int64_t q_stride_row,
                     int64_t q_stride_col, const float* scale, int64_t scale_stride, void* out,
                     DType out_dtype, int64_t out_stride_row, int num_threads);

}  // namespace sentinel
