// Python bindings for the CPU extension sentinel_kernels._C.
//
// Tensors cross the boundary as raw data pointers (Python ints from
// tensor.data_ptr()) plus sizes and strides in elements, so the extension does not
// link libtorch and one build works with any torch version.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "attention.h"
#include "cpu_features.h"
#include "int8_matmul.h"
#include "quantize.h"
#include "thread_pool.h"

namespace py = pybind11;

namespace {

constexpr int kAbiVersion = 1;

template <class T>
T* as_ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "sentinel_kernels CPU kernels (runtime-dispatched scalar / AVX2 / AVX-512)";
  m.attr("abi_version") = kAbiVersion;

  m.def(
      "cpu_features",
      [] {
        const sentinel::CpuFeatures& f = sentinel::cpu_features();
        py::dict d;
        d["avx2"] = f.avx2;
        d["fma"] = f.fma;
        d["f16c"] = f.f16c;
        d["avx512f"] = f.avx512f;
        d["avx512bw"] = f.avx512bw;
        d["avx512vl"] = f.avx512vl;
        d["avx512_vnni"] = f.avx512_vnni;
        d["os_avx"] = f.os_avx;
        d["os_avx512"] = f.os_avx512;
        return d;
      },
      "CPU features usable by this process (the CPU has them and the OS enables them).");

  m.def(
      "simd_level",
      [] { return std::string(sentinel::simd_level_name(sentinel::active_simd_level())); },
      "The active SIMD level: 'avx512_vnni', 'avx512', 'avx2' or 'scalar'.");

  m.def(
      "set_simd_level", [](const std::string& name) { sentinel::set_simd_level(name); },
      py::arg("name"),
      "Force the SIMD level used by every kernel (process-wide). Raises ValueError for an "
      "unknown name or a level this CPU does not support.");

  m.def(
      "supported_simd_levels",
      [] {
        std::vector<std::string> names;
        for (sentinel::SimdLevel level : sentinel::supported_simd_levels()) {
          names.emplace_back(sentinel::simd_level_name(level));
        }
        return names;
      },
      "SIMD levels this CPU supports, lowest ('scalar') first.");

  m.def("thread_pool_size", &sentinel::thread_pool_size,
        "Worker threads started so far by the extension's thread pool (diagnostics).");

  m.def(
      "quantize_int8",
      [](std::uintptr_t x_ptr, const std::string& dtype, int64_t rows, int64_t cols,
         int64_t x_stride_row, int64_t x_stride_col, std::uintptr_t q_ptr, int64_t q_stride_row,
         std::uintptr_t scale_ptr, int num_threads) {
        const sentinel::DType dt = sentinel::parse_dtype(dtype);
        py::gil_scoped_release no_gil;
        sentinel::quantize_int8(as_ptr<const void>(x_ptr), dt, rows, cols, x_stride_row,
                                x_stride_col, as_ptr<int8_t>(q_ptr), q_stride_row,
                                as_ptr<float>(scale_ptr), num_threads);
      },
      py::arg("x_ptr"), py::arg("dtype"), py::arg("rows"), py::arg("cols"),
      py::arg("x_stride_row"), py::arg("x_stride_col"), py::arg("q_ptr"),
      py::arg("q_stride_row"), py::arg("scale_ptr"), py::arg("num_threads"),
      "Row-wise absmax INT8 quantization. x: rows x cols of dtype ('float32' | 'float16' | "
      "'bfloat16') with strides in elements; q: int8 rows at q_ptr + r * q_stride_row; "
      "scale: contiguous float32[rows]. scale[r] = absmax / 127, q = clamp(round_half_even("
      "x * (127 / absmax)), -127, 127); all-zero rows get scale 0 and q 0.");

  m.def(
      "dequantize_int8",
      [](std::uintptr_t q_ptr, int64_t rows, int64_t cols, int64_t q_stride_row,
         int64_t q_stride_col, std::uintptr_t scale_ptr, int64_t scale_stride,
         std::uintptr_t out_ptr, const std::string& out_dtype, int64_t out_stride_row,
         int num_threads) {
        const sentinel::DType dt = sentinel::parse_dtype(out_dtype);
        py::gil_scoped_release no_gil;
        sentinel::dequantize_int8(as_ptr<const int8_t>(q_ptr), rows, cols, q_stride_row,
                                  q_stride_col, as_ptr<const float>(scale_ptr), scale_stride,
                                  as_ptr<void>(out_ptr), dt, out_stride_row, num_threads);
      },
      py::arg("q_ptr"), py::arg("rows"), py::arg("cols"), py::arg("q_stride_row"),
      py::arg("q_stride_col"), py::arg("scale_ptr"), py::arg("scale_stride"), py::arg("out_ptr"),
      py::arg("out_dtype"), py::arg("out_stride_row"), py::arg("num_threads"),
      "out[r, j] = (float)q[r, j] * scale[r * scale_stride], rounded (nearest even) to "
      "out_dtype ('float32' | 'float16' | 'bfloat16'); out rows at out_ptr + r * "
      "out_stride_row elements.");

  m.def(
      "int8_linear_w8a16",
      [](std::uintptr_t x_ptr, const std::string& x_dtype, int64_t M, int64_t K,
         int64_t x_stride_row, std::uintptr_t w_ptr, int64_t N, int64_t w_stride_row,
         std::uintptr_t scale_ptr, int64_t group_size, int64_t scale_stride_row,
         std::uintptr_t bias_ptr, const std::string& bias_dtype, std::uintptr_t out_ptr,
         const std::string& out_dtype, int64_t out_stride_row, int num_threads) {
        const sentinel::DType xd = sentinel::parse_dtype(x_dtype);
        const sentinel::DType bd = sentinel::parse_dtype(bias_dtype);
        const sentinel::DType od = sentinel::parse_dtype(out_dtype);
        py::gil_scoped_release no_gil;
        sentinel::int8_linear_w8a16(as_ptr<const void>(x_ptr), xd, M, K, x_stride_row,
                                    as_ptr<const int8_t>(w_ptr), N, w_stride_row,
                                    as_ptr<const float>(scale_ptr), group_size, scale_stride_row,
                                    as_ptr<const void>(bias_ptr), bd, as_ptr<void>(out_ptr), od,
                                    out_stride_row, num_threads);
      },
      py::arg("x_ptr"), py::arg("x_dtype"), py::arg("M"), py::arg("K"), py::arg("x_stride_row"),
      py::arg("w_ptr"), py::arg("N"), py::arg("w_stride_row"), py::arg("scale_ptr"),
      py::arg("group_size"), py::arg("scale_stride_row"), py::arg("bias_ptr"),
      py::arg("bias_dtype"), py::arg("out_ptr"), py::arg("out_dtype"), py::arg("out_stride_row"),
      py::arg("num_threads"),
      "W8A16 linear: y[m, n] = sum_k x[m, k] * (w[n, k] * s(n, k)) + bias[n], fp32 "
      "accumulation. x: M x K rows (x_dtype 'float32' | 'float16' | 'bfloat16', row stride "
      "x_stride_row); w: int8 N x K rows (w_stride_row); scale: float32, s(n, k) = "
      "scale[n * scale_stride_row] if group_size == 0 else scale[n * scale_stride_row + k // "
      "group_size]; bias_ptr 0 = no bias, else bias_dtype[N]; out: out_dtype rows of "
      "out_stride_row. Strides in elements, unit column strides.");

  m.def(
      "int8_linear_w8a8",
      [](std::uintptr_t x_ptr, const std::string& x_dtype, int64_t M, int64_t K,
         int64_t x_stride_row, std::uintptr_t smooth_ptr, std::uintptr_t w_ptr, int64_t N,
         int64_t w_stride_row, std::uintptr_t w_scale_ptr, std::uintptr_t bias_ptr,
         const std::string& bias_dtype, std::uintptr_t out_ptr, const std::string& out_dtype,
         int64_t out_stride_row, int num_threads) {
        const sentinel::DType xd = sentinel::parse_dtype(x_dtype);
        const sentinel::DType bd = sentinel::parse_dtype(bias_dtype);
        const sentinel::DType od = sentinel::parse_dtype(out_dtype);
        py::gil_scoped_release no_gil;
        sentinel::int8_linear_w8a8(as_ptr<const void>(x_ptr), xd, M, K, x_stride_row,
                                   as_ptr<const float>(smooth_ptr), as_ptr<const int8_t>(w_ptr), N,
                                   w_stride_row, as_ptr<const float>(w_scale_ptr),
                                   as_ptr<const void>(bias_ptr), bd, as_ptr<void>(out_ptr), od,
                                   out_stride_row, num_threads);
      },
      py::arg("x_ptr"), py::arg("x_dtype"), py::arg("M"), py::arg("K"), py::arg("x_stride_row"),
      py::arg("smooth_ptr"), py::arg("w_ptr"), py::arg("N"), py::arg("w_stride_row"),
      py::arg("w_scale_ptr"), py::arg("bias_ptr"), py::arg("bias_dtype"), py::arg("out_ptr"),
      py::arg("out_dtype"), py::arg("out_stride_row"), py::arg("num_threads"),
      "W8A8 linear with dynamic per-token activation quantization: xs = x / smooth (smooth_ptr "
      "0 = none; float32[K]), q, a_scale = quantize_int8 rule per row of xs, acc = sum_k q * w "
      "(exact int32), y = ((float)acc * a_scale[m]) * w_scale[n] + bias[n]. w_scale: "
      "float32[N]; other arguments as int8_linear_w8a16. Bit-identical at every SIMD level.");

  m.def(
      "attention_fwd",
      [](std::uintptr_t q_ptr, std::uintptr_t k_ptr, std::uintptr_t v_ptr, std::uintptr_t out_ptr,
         const std::string& dtype, int64_t B, int64_t Hq, int64_t Hkv, int64_t Sq, int64_t Sk,
         int64_t D, const std::vector<int64_t>& q_strides, const std::vector<int64_t>& k_strides,
         const std::vector<int64_t>& v_strides, const std::vector<int64_t>& out_strides,
         bool causal, double scale, int64_t window, std::uintptr_t key_mask_ptr,
         std::uintptr_t cache_lens_ptr, std::uintptr_t head_active_ptr, int threads) {
        const sentinel::DType dt = sentinel::parse_dtype(dtype);
        const sentinel::Strides4 qs = sentinel::make_strides4(q_strides, "q_strides");
        const sentinel::Strides4 ks = sentinel::make_strides4(k_strides, "k_strides");
        const sentinel::Strides4 vs = sentinel::make_strides4(v_strides, "v_strides");
        const sentinel::Strides4 os = sentinel::make_strides4(out_strides, "out_strides");
        py::gil_scoped_release no_gil;
        sentinel::attention_fwd(as_ptr<const void>(q_ptr), as_ptr<const void>(k_ptr),
                                as_ptr<const void>(v_ptr), as_ptr<void>(out_ptr), dt, B, Hq, Hkv,
                                Sq, Sk, D, qs, ks, vs, os, causal, scale, window,
                                as_ptr<const int8_t>(key_mask_ptr),
                                as_ptr<const int32_t>(cache_lens_ptr),
                                as_ptr<const int8_t>(head_active_ptr), threads);
      },
      py::arg("q_ptr"), py::arg("k_ptr"), py::arg("v_ptr"), py::arg("out_ptr"), py::arg("dtype"),
      py::arg("B"), py::arg("Hq"), py::arg("Hkv"), py::arg("Sq"), py::arg("Sk"), py::arg("D"),
      py::arg("q_strides"), py::arg("k_strides"), py::arg("v_strides"), py::arg("out_strides"),
      py::arg("causal"), py::arg("scale"), py::arg("window"), py::arg("key_mask_ptr"),
      py::arg("cache_lens_ptr"), py::arg("head_active_ptr"), py::arg("threads"),
      "Masked multi-head attention (flash style, fp32 math). q: [B, Hq, Sq, D], k, v: [B, Hkv, "
      "Sk, D], out: [B, Hq, Sq, D], all of dtype ('float32' | 'float16' | 'bfloat16'), given by "
      "data pointer and 4 element strides each. Query head h reads KV head h // (Hq // Hkv); "
      "query i of row b sits at p = L_b - Sq + i (L_b = cache_lens[b], or Sk) and sees key j "
      "iff j < L_b, key_mask[b, j] != 0, (not causal or j <= p) and (window == 0 or p - j < "
      "window). out = softmax(scale * q.k) v over the visible keys; rows with none and heads "
      "with head_active[b * Hq + h] == 0 get zeros. key_mask: int8 [B, Sk], cache_lens: int32 "
      "[B], head_active: int8 [B * Hq], all contiguous, 0 = not given.");
}
