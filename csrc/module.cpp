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

#include "args.h"
#include "attention.h"
#include "cpu_features.h"
#include "decode_attention.h"
#include "fused.h"
#include "int8_matmul.h"
#include "kv_append.h"
#include "quantize.h"
#include "spec_verify.h"
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
         std::uintptr_t cache_lens_ptr, std::uintptr_t head_active_ptr, int threads,
         std::uintptr_t seg_start_ptr) {
        constexpr const char* fn = "attention_fwd";
        const sentinel::DType dt = sentinel::parse_dtype(dtype);
        const sentinel::Strides4 qs = sentinel::strides4(q_strides, fn, "q_strides");
        const sentinel::Strides4 ks = sentinel::strides4(k_strides, fn, "k_strides");
        const sentinel::Strides4 vs = sentinel::strides4(v_strides, fn, "v_strides");
        const sentinel::Strides4 os = sentinel::strides4(out_strides, fn, "out_strides");
        py::gil_scoped_release no_gil;
        sentinel::attention_fwd(as_ptr<const void>(q_ptr), as_ptr<const void>(k_ptr),
                                as_ptr<const void>(v_ptr), as_ptr<void>(out_ptr), dt, B, Hq, Hkv,
                                Sq, Sk, D, qs, ks, vs, os, causal, scale, window,
                                as_ptr<const int8_t>(key_mask_ptr),
                                as_ptr<const int32_t>(cache_lens_ptr),
                                as_ptr<const int8_t>(head_active_ptr), threads,
                                as_ptr<const int32_t>(seg_start_ptr));
      },
      py::arg("q_ptr"), py::arg("k_ptr"), py::arg("v_ptr"), py::arg("out_ptr"), py::arg("dtype"),
      py::arg("B"), py::arg("Hq"), py::arg("Hkv"), py::arg("Sq"), py::arg("Sk"), py::arg("D"),
      py::arg("q_strides"), py::arg("k_strides"), py::arg("v_strides"), py::arg("out_strides"),
      py::arg("causal"), py::arg("scale"), py::arg("window"), py::arg("key_mask_ptr"),
      py::arg("cache_lens_ptr"), py::arg("head_active_ptr"), py::arg("threads"),
      py::arg("seg_start_ptr") = 0,
      "Masked multi-head attention (flash style, fp32 math). q: [B, Hq, Sq, D], k, v: [B, Hkv, "
      "Sk, D], out: [B, Hq, Sq, D], all of dtype ('float32' | 'float16' | 'bfloat16'), given by "
      "data pointer and 4 element strides each. Query head h reads KV head h // (Hq // Hkv); "
      "query i of row b sits at p = L_b - Sq + i (L_b = cache_lens[b], or Sk) and sees key j "
      "iff j < L_b, key_mask[b, j] != 0, (not causal or j <= p) and (window == 0 or p - j < "
      "window) and j >= seg_start[b, i] (packed prompts). out = softmax(scale * q.k) v over the "
      "visible keys; rows with none and heads with head_active[b * Hq + h] == 0 get zeros. "
      "key_mask: int8 [B, Sk], cache_lens: int32 [B], head_active: int8 [B * Hq], seg_start: "
      "int32 [B, Sq], all contiguous, 0 = not given.");

  m.def(
      "kv_append",
      [](std::uintptr_t x_ptr, const std::string& x_dtype, std::uintptr_t cache_ptr,
         std::uintptr_t scales_ptr, const std::string& kv_format, int64_t B, int64_t H,
         int64_t S, int64_t D, int64_t L, int64_t n_groups, const std::vector<int64_t>& x_strides,
         const std::vector<int64_t>& cache_strides, const std::vector<int64_t>& scale_strides,
         std::uintptr_t start_ptr, bool wrap, int num_threads, const std::string& cache_dtype,
         std::uintptr_t rows_ptr, int64_t Bc) {
        constexpr const char* fn = "kv_append";
        const sentinel::DType xd = sentinel::parse_dtype(x_dtype);
        const sentinel::DType cd = cache_dtype.empty() ? xd : sentinel::parse_dtype(cache_dtype);
        const sentinel::KvFormat fmt = sentinel::parse_kv_format(kv_format);
        const sentinel::Strides4 xs = sentinel::strides4(x_strides, fn, "x_strides");
        const sentinel::Strides3 cs = sentinel::strides3(cache_strides, fn, "cache_strides");
        const sentinel::Strides3 ss = sentinel::strides3(scale_strides, fn, "scale_strides");
        py::gil_scoped_release no_gil;
        sentinel::kv_append(as_ptr<const void>(x_ptr), xd, as_ptr<void>(cache_ptr), cd,
                            as_ptr<uint16_t>(scales_ptr), fmt, B, H, S, D, L, n_groups, xs, cs,
                            ss, as_ptr<const int32_t>(start_ptr), wrap, num_threads,
                            as_ptr<const int32_t>(rows_ptr), Bc);
      },
      py::arg("x_ptr"), py::arg("x_dtype"), py::arg("cache_ptr"), py::arg("scales_ptr"),
      py::arg("kv_format"), py::arg("B"), py::arg("H"), py::arg("S"), py::arg("D"), py::arg("L"),
      py::arg("n_groups"), py::arg("x_strides"), py::arg("cache_strides"),
      py::arg("scale_strides"), py::arg("start_ptr"), py::arg("wrap"), py::arg("num_threads"),
      py::arg("cache_dtype") = "", py::arg("rows_ptr") = 0, py::arg("Bc") = -1,
      "Quantize-on-append into a KV cache (in place), bit-exact with "
      "reference.kv_append.kv_append. x: [B, H, S, D] of x_dtype ('float32' | 'float16' | "
      "'bfloat16') with 4 element strides; cache: dense [Bc, H, L, D] of cache_dtype ('' = "
      "x_dtype), int8 [Bc, H, L, D] or int4 uint8 [Bc, H, L, ceil(D/2)], strides (b, h, l), "
      "unit last stride; scales: float16 [Bc, H, L, G] (int8) or [Bc, H, L, G, 2] (int4), "
      "strides (b, h, l), 0 for dense; start: int32 [B]. Token i of row b goes to slot "
      "start[b] + i (skipped when >= L) or, with wrap, (start[b] + i) % L (only the last L "
      "tokens when S > L), of cache row b, or of cache row rows[b] when rows_ptr (int32 [B], "
      "0 = none) is given (skipped when outside [0, Bc); where two batch rows write one slot, "
      "the later one stays). Bc: the cache's row count, -1 = B (without rows_ptr it must be "
      "B).");

  m.def(
      "decode_attention_kv",
      [](std::uintptr_t q_ptr, std::uintptr_t out_ptr, const std::string& dtype,
         const std::string& kv_format, std::uintptr_t k_ptr, std::uintptr_t v_ptr,
         std::uintptr_t k_scale_ptr, std::uintptr_t v_scale_ptr, std::uintptr_t k_recent_ptr,
         std::uintptr_t v_recent_ptr, int64_t B, int64_t Hq, int64_t Hkv, int64_t Sq, int64_t D,
         int64_t L, int64_t W, int64_t n_groups, const std::vector<int64_t>& q_strides,
         const std::vector<int64_t>& out_strides, const std::vector<int64_t>& k_strides,
         const std::vector<int64_t>& v_strides, const std::vector<int64_t>& ks_strides,
         const std::vector<int64_t>& vs_strides, const std::vector<int64_t>& kr_strides,
         const std::vector<int64_t>& vr_strides, double scale, int64_t window,
         std::uintptr_t key_mask_ptr, std::uintptr_t cache_lens_ptr,
         std::uintptr_t head_active_ptr, bool wrap, int64_t key_block, int num_threads) {
        constexpr const char* fn = "decode_attention_kv";
        sentinel::DecodeKvArgs a;
        a.q = as_ptr<const void>(q_ptr);
        a.out = as_ptr<void>(out_ptr);
        a.dtype = sentinel::parse_dtype(dtype);
        a.fmt = sentinel::parse_kv_format(kv_format);
        a.k = as_ptr<const void>(k_ptr);
        a.v = as_ptr<const void>(v_ptr);
        a.k_scale = as_ptr<const uint16_t>(k_scale_ptr);
        a.v_scale = as_ptr<const uint16_t>(v_scale_ptr);
        a.k_recent = as_ptr<const void>(k_recent_ptr);
        a.v_recent = as_ptr<const void>(v_recent_ptr);
        a.B = B;
        a.Hq = Hq;
        a.Hkv = Hkv;
        a.Sq = Sq;
        a.D = D;
        a.L = L;
        a.W = W;
        a.n_groups = n_groups;
        a.q_strides = sentinel::strides4(q_strides, fn, "q_strides");
        a.out_strides = sentinel::strides4(out_strides, fn, "out_strides");
        a.k_strides = sentinel::strides3(k_strides, fn, "k_strides");
        a.v_strides = sentinel::strides3(v_strides, fn, "v_strides");
        a.ks_strides = sentinel::strides3(ks_strides, fn, "ks_strides");
        a.vs_strides = sentinel::strides3(vs_strides, fn, "vs_strides");
        a.kr_strides = sentinel::strides3(kr_strides, fn, "kr_strides");
        a.vr_strides = sentinel::strides3(vr_strides, fn, "vr_strides");
        a.scale = scale;
        a.window = window;
        a.key_mask = as_ptr<const int8_t>(key_mask_ptr);
        a.cache_lens = as_ptr<const int32_t>(cache_lens_ptr);
        a.head_active = as_ptr<const int8_t>(head_active_ptr);
        a.wrap = wrap;
        a.key_block = key_block;
        a.num_threads = num_threads;
        py::gil_scoped_release no_gil;
        sentinel::decode_attention_kv(a);
      },
      py::arg("q_ptr"), py::arg("out_ptr"), py::arg("dtype"), py::arg("kv_format"),
      py::arg("k_ptr"), py::arg("v_ptr"), py::arg("k_scale_ptr"), py::arg("v_scale_ptr"),
      py::arg("k_recent_ptr"), py::arg("v_recent_ptr"), py::arg("B"), py::arg("Hq"),
      py::arg("Hkv"), py::arg("Sq"), py::arg("D"), py::arg("L"), py::arg("W"),
      py::arg("n_groups"), py::arg("q_strides"), py::arg("out_strides"), py::arg("k_strides"),
      py::arg("v_strides"), py::arg("ks_strides"), py::arg("vs_strides"), py::arg("kr_strides"),
      py::arg("vr_strides"), py::arg("scale"), py::arg("window"), py::arg("key_mask_ptr"),
      py::arg("cache_lens_ptr"), py::arg("head_active_ptr"), py::arg("wrap"),
      py::arg("key_block"), py::arg("num_threads"),
      "Decode attention over a dense / int8 / int4 KV cache with an optional full-precision "
      "recent ring and a wrapping cache (the rule of "
      "reference.decode_attention.decode_attention_kv). "
      "q, out: [B, Hq, Sq, D] of dtype (4 element strides each); k, v: the cache in kv_format "
      "(dense: of dtype) with strides (b, h, l); k_scale, v_scale: float16 scales, strides "
      "(b, h, l) (0 for dense); k_recent, v_recent: [B, Hkv, W, D] of dtype, strides (b, h, "
      "w), W = 0: none; key_mask: int8 [B, L] by slot; cache_lens: int32 [B] (required); "
      "head_active: int8 [B * Hq]; pointers 0 = not given. Query t of row b sits at position "
      "cache_lens[b] - Sq + t; fp32 math, output rounded once. key_block = T > 0: KIVI keys "
      "(int4, rings with W a multiple of T, no wrap): k_scale float16 [B, Hkv, L / T, D, 2] "
      "with strides (b, h, block), the rings hold the positions >= floor(len / T) * T.");

  m.def(
      "kv_append_key_blocks",
      [](std::uintptr_t x_ptr, const std::string& x_dtype, std::uintptr_t codes_ptr,
         std::uintptr_t scales_ptr, std::uintptr_t ring_ptr, const std::string& ring_dtype,
         int64_t B, int64_t H, int64_t S, int64_t D, int64_t L, int64_t W, int64_t block,
         const std::vector<int64_t>& x_strides, const std::vector<int64_t>& codes_strides,
         const std::vector<int64_t>& scales_strides, const std::vector<int64_t>& ring_strides,
         std::uintptr_t start_ptr, int num_threads) {
        constexpr const char* fn = "kv_append_key_blocks";
        const sentinel::DType xd = sentinel::parse_dtype(x_dtype);
        const sentinel::DType rd = sentinel::parse_dtype(ring_dtype);
        const sentinel::Strides4 xs = sentinel::strides4(x_strides, fn, "x_strides");
        const sentinel::Strides3 cs = sentinel::strides3(codes_strides, fn, "codes_strides");
        const sentinel::Strides3 ss = sentinel::strides3(scales_strides, fn, "scales_strides");
        const sentinel::Strides3 rs = sentinel::strides3(ring_strides, fn, "ring_strides");
        py::gil_scoped_release no_gil;
        sentinel::kv_append_key_blocks(as_ptr<const void>(x_ptr), xd, as_ptr<uint8_t>(codes_ptr),
                                       as_ptr<uint16_t>(scales_ptr), as_ptr<void>(ring_ptr), rd,
                                       B, H, S, D, L, W, block, xs, cs, ss, rs,
                                       as_ptr<const int32_t>(start_ptr), num_threads);
      },
      py::arg("x_ptr"), py::arg("x_dtype"), py::arg("codes_ptr"), py::arg("scales_ptr"),
      py::arg("ring_ptr"), py::arg("ring_dtype"), py::arg("B"), py::arg("H"), py::arg("S"),
      py::arg("D"), py::arg("L"), py::arg("W"), py::arg("block"), py::arg("x_strides"),
      py::arg("codes_strides"), py::arg("scales_strides"), py::arg("ring_strides"),
      py::arg("start_ptr"), py::arg("num_threads"),
      "KIVI keys (in place), bit-exact with reference.kv_append.kv_append_key_blocks: every "
      "block of `block` positions the append completes is quantized per channel (int4, its "
      "earlier keys from the ring) into codes uint8 [B, H, L, ceil(D/2)] (strides (b, h, l)) "
      "and scales float16 [B, H, L / block, D, 2] (strides (b, h, block)); then the new keys "
      "go to ring [B, H, W, D] of ring_dtype (strides (b, h, w)), slot j % W. x: [B, H, S, D] "
      "of x_dtype with 4 element strides; start: int32 [B].");

  m.def(
      "rms_norm",
      [](std::uintptr_t x_ptr, const std::string& x_dtype, int64_t rows, int64_t cols,
         int64_t x_stride_row, int64_t x_stride_col, std::uintptr_t residual_ptr,
         int64_t res_stride_row, int64_t res_stride_col, std::uintptr_t residual_out_ptr,
         int64_t res_out_stride_row, std::uintptr_t weight_ptr, const std::string& w_dtype,
         int64_t w_stride, double eps, std::uintptr_t y_ptr, const std::string& y_dtype,
         int64_t y_stride_row, int num_threads) {
        const sentinel::DType xd = sentinel::parse_dtype(x_dtype);
        const sentinel::DType wd = sentinel::parse_dtype(w_dtype);
        const sentinel::DType yd = sentinel::parse_dtype(y_dtype);
        py::gil_scoped_release no_gil;
        sentinel::rms_norm(as_ptr<const void>(x_ptr), xd, rows, cols, x_stride_row,
                           x_stride_col, as_ptr<const void>(residual_ptr), res_stride_row,
                           res_stride_col, as_ptr<void>(residual_out_ptr), res_out_stride_row,
                           as_ptr<const void>(weight_ptr), wd, w_stride,
                           static_cast<float>(eps), as_ptr<void>(y_ptr), yd, y_stride_row,
                           num_threads);
      },
      py::arg("x_ptr"), py::arg("x_dtype"), py::arg("rows"), py::arg("cols"),
      py::arg("x_stride_row"), py::arg("x_stride_col"), py::arg("residual_ptr"),
      py::arg("res_stride_row"), py::arg("res_stride_col"), py::arg("residual_out_ptr"),
      py::arg("res_out_stride_row"), py::arg("weight_ptr"), py::arg("w_dtype"),
      py::arg("w_stride"), py::arg("eps"), py::arg("y_ptr"), py::arg("y_dtype"),
      py::arg("y_stride_row"), py::arg("num_threads"),
      "RMSNorm of rows x cols (LlamaRMSNorm roundings): x' = x, or round_x(x + residual) "
      "written to residual_out when residual_ptr != 0; inv = 1 / sqrt(mean(x'^2) + eps) in "
      "fp32 (eps rounded to fp32); y = round_y(w * round_x(x' * inv)). Dtypes 'float32' | "
      "'float16' | 'bfloat16'; strides in elements; residual_out and y rows are contiguous "
      "at the given row strides.");

  m.def(
      "rotary_embedding",
      [](std::uintptr_t q_ptr, std::uintptr_t k_ptr, std::uintptr_t cos_ptr,
         std::uintptr_t sin_ptr, std::uintptr_t q_out_ptr, std::uintptr_t k_out_ptr,
         const std::string& dtype, int64_t B, int64_t Hq, int64_t Hkv, int64_t S, int64_t D,
         const std::vector<int64_t>& q_strides, const std::vector<int64_t>& k_strides,
         const std::vector<int64_t>& cos_strides, const std::vector<int64_t>& sin_strides,
         const std::vector<int64_t>& q_out_strides, const std::vector<int64_t>& k_out_strides,
         int num_threads) {
        constexpr const char* fn = "rotary_embedding";
        const sentinel::DType dt = sentinel::parse_dtype(dtype);
        const sentinel::Strides4 qs = sentinel::strides4(q_strides, fn, "q_strides");
        const sentinel::Strides4 ks = sentinel::strides4(k_strides, fn, "k_strides");
        const sentinel::Strides4 cs = sentinel::strides4(cos_strides, fn, "cos_strides");
        const sentinel::Strides4 ss = sentinel::strides4(sin_strides, fn, "sin_strides");
        const sentinel::Strides4 qos = sentinel::strides4(q_out_strides, fn, "q_out_strides");
        const sentinel::Strides4 kos = sentinel::strides4(k_out_strides, fn, "k_out_strides");
        py::gil_scoped_release no_gil;
        sentinel::rotary_embedding(as_ptr<const void>(q_ptr), as_ptr<const void>(k_ptr),
                                   as_ptr<const void>(cos_ptr), as_ptr<const void>(sin_ptr),
                                   as_ptr<void>(q_out_ptr), as_ptr<void>(k_out_ptr), dt, B, Hq,
                                   Hkv, S, D, qs, ks, cs, ss, qos, kos, num_threads);
      },
      py::arg("q_ptr"), py::arg("k_ptr"), py::arg("cos_ptr"), py::arg("sin_ptr"),
      py::arg("q_out_ptr"), py::arg("k_out_ptr"), py::arg("dtype"), py::arg("B"),
      py::arg("Hq"), py::arg("Hkv"), py::arg("S"), py::arg("D"), py::arg("q_strides"),
      py::arg("k_strides"), py::arg("cos_strides"), py::arg("sin_strides"),
      py::arg("q_out_strides"), py::arg("k_out_strides"), py::arg("num_threads"),
      "Rotary embedding (apply_rotary_pos_emb, rotate_half convention) of q [B, Hq, S, D] "
      "and k [B, Hkv, S, D] into q_out / k_out, all of dtype; cos / sin are [B, 1, S, D] "
      "(stride 0 where broadcast; the head stride is not read). 4 element strides per tensor. "
      "Each product and the sum rounded to dtype, as torch computes it.");

  m.def(
      "silu_mul",
      [](std::uintptr_t gate_ptr, std::uintptr_t up_ptr, std::uintptr_t y_ptr,
         const std::string& dtype, int64_t rows, int64_t cols, int64_t gate_stride_row,
         int64_t gate_stride_col, int64_t up_stride_row, int64_t up_stride_col,
         int64_t y_stride_row, int num_threads) {
        const sentinel::DType dt = sentinel::parse_dtype(dtype);
        py::gil_scoped_release no_gil;
        sentinel::silu_mul(as_ptr<const void>(gate_ptr), as_ptr<const void>(up_ptr),
                           as_ptr<void>(y_ptr), dt, rows, cols, gate_stride_row,
                           gate_stride_col, up_stride_row, up_stride_col, y_stride_row,
                           num_threads);
      },
      py::arg("gate_ptr"), py::arg("up_ptr"), py::arg("y_ptr"), py::arg("dtype"),
      py::arg("rows"), py::arg("cols"), py::arg("gate_stride_row"), py::arg("gate_stride_col"),
      py::arg("up_stride_row"), py::arg("up_stride_col"), py::arg("y_stride_row"),
      py::arg("num_threads"),
      "y = round(round(silu(gate)) * up) over rows x cols of dtype ('float32' | 'float16' | "
      "'bfloat16'), silu(g) = g / (1 + expf(-g)) in fp32; y rows contiguous at y_stride_row.");

  m.def(
      "speculative_verify",
      [](std::uintptr_t target_ptr, const std::string& target_dtype, int64_t B, int64_t K,
         int64_t V, const std::vector<int64_t>& target_strides, std::uintptr_t draft_ptr,
         bool draft_int32, int64_t draft_stride_b, int64_t draft_stride_k,
         std::uintptr_t draft_probs_ptr, std::uintptr_t draft_logits_ptr,
         const std::string& q_dtype, const std::vector<int64_t>& q_strides,
         std::uintptr_t thr_ptr, std::uintptr_t thr_q_ptr, bool greedy, double inv_t,
         std::uintptr_t rng_ptr, bool advance_rng, std::uintptr_t num_accepted_ptr,
         std::uintptr_t tokens_ptr, int64_t tokens_stride_b, int num_threads) {
        sentinel::SpecVerifyArgs a;
        a.target = as_ptr<const void>(target_ptr);
        a.target_dtype = sentinel::parse_dtype(target_dtype);
        a.target_strides = sentinel::spec_strides3(target_strides, "target_strides");
        a.B = B;
        a.K = K;
        a.V = V;
        a.draft = as_ptr<const void>(draft_ptr);
        a.draft_int32 = draft_int32;
        a.draft_stride_b = draft_stride_b;
        a.draft_stride_k = draft_stride_k;
        a.draft_probs = as_ptr<const void>(draft_probs_ptr);
        a.draft_logits = as_ptr<const void>(draft_logits_ptr);
        a.q_dtype = sentinel::parse_dtype(q_dtype);
        a.q_strides = sentinel::spec_strides3(q_strides, "q_strides");
        a.thr = as_ptr<const float>(thr_ptr);
        a.thr_q = as_ptr<const float>(thr_q_ptr);
        a.greedy = greedy;
        a.inv_t = static_cast<float>(inv_t);
        a.rng = as_ptr<int64_t>(rng_ptr);
        a.advance_rng = advance_rng;
        a.num_accepted = as_ptr<int64_t>(num_accepted_ptr);
        a.tokens = as_ptr<int64_t>(tokens_ptr);
        a.tokens_stride_b = tokens_stride_b;
        a.num_threads = num_threads;
        py::gil_scoped_release no_gil;
        sentinel::speculative_verify(a);
      },
      py::arg("target_ptr"), py::arg("target_dtype"), py::arg("B"), py::arg("K"), py::arg("V"),
      py::arg("target_strides"), py::arg("draft_ptr"), py::arg("draft_int32"),
      py::arg("draft_stride_b"), py::arg("draft_stride_k"), py::arg("draft_probs_ptr"),
      py::arg("draft_logits_ptr"), py::arg("q_dtype"), py::arg("q_strides"), py::arg("thr_ptr"),
      py::arg("thr_q_ptr"), py::arg("greedy"), py::arg("inv_t"), py::arg("rng_ptr"),
      py::arg("advance_rng"), py::arg("num_accepted_ptr"), py::arg("tokens_ptr"),
      py::arg("tokens_stride_b"), py::arg("num_threads"),
      "Speculative-decoding verification (rules of reference.spec_verify). target: [B, K+1, "
      "V] logits of target_dtype with 3 element strides; draft: [B, K] int64 (int32 when "
      "draft_int32); greedy: argmax match; else rejection sampling with draft_probs or "
      "draft_logits ([B, K, V] of q_dtype, q_strides; 0 = not given), inv_t = float32(1 / "
      "temperature), thr [B, K+1] / thr_q [B, K] contiguous float32 filter thresholds (0 = "
      "none) and rng int64 [2] = (seed, offset) (Philox4x32-10 counters, advanced by B * (K + "
      "V) when advance_rng). Writes num_accepted int64 [B] and tokens int64 [B, K+1] (rows at "
      "tokens_stride_b; -1 after the emitted token).");

  m.def(
      "philox_fill",
      [](int64_t seed, int64_t offset, int64_t count, std::uintptr_t out_ptr) {
        py::gil_scoped_release no_gil;
        sentinel::philox_fill(seed, offset, count, as_ptr<int64_t>(out_ptr));
      },
      py::arg("seed"), py::arg("offset"), py::arg("count"), py::arg("out_ptr"),
      "out[i] = first 32-bit word of Philox4x32-10 (key = seed, counter = offset + i), as "
      "int64, for i < count: the random numbers of speculative_verify and tl.randint.");
}
