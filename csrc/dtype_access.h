// Element access by run-time dtype: one fp32 value in or out of a float32 / float16 /
// bfloat16 buffer (the scalar paths and tails of the CPU kernels).
#pragma once

#include <cstdint>
#include <type_traits>

#include "args.h"  // bad_arg
#include "dtype_convert.h"
#include "quantize.h"  // DType

namespace sentinel {

constexpr int64_t element_size(DType d) { return d == DType::kFloat32 ? 4 : 2; }

// Element i of `base` (i counts elements of dtype d), converted to fp32 exactly.
inline float load1(const void* base, DType d, int64_t i) {
  switch (d) {
    case DType::kFloat32:
      return static_cast<const float*>(base)[i];
    case DType::kFloat16:
      return half_to_float(static_cast<const uint16_t*>(base)[i]);
    case DType::kBFloat16:
      return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
  }
  return 0.0f;
}

// Stores v as element i of `base`, rounded to nearest even for fp16 / bf16.
inline void store1(void* base, DType d, int64_t i, float v) {
  switch (d) {
    case DType::kFloat32:
      static_cast<float*>(base)[i] = v;
      return;
    case DType::kFloat16:
      static_cast<uint16_t*>(base)[i] = float_to_half(v);
      return;
    case DType::kBFloat16:
      static_cast<uint16_t*>(base)[i] = float_to_bf16(v);
      return;
  }
}

// The same with the dtype known at compile time (the switch folds away).
template <DType D>
inline float load1(const void* base, int64_t i) {
  return load1(base, D, i);
}

template <DType D>
inline void store1(void* base, int64_t i, float v) {
  store1(base, D, i, v);
}

// f(std::integral_constant<DType, d>{}): runs code templated on the dtype for the run-time
// dtype d; throws std::invalid_argument ("fn: unsupported dtype") for any other value.
template <class F>
void dispatch_dtype(const char* fn, DType d, const F& f) {
  switch (d) {
    case DType::kFloat32:
      return f(std::integral_constant<DType, DType::kFloat32>{});
    case DType::kFloat16:
      return f(std::integral_constant<DType, DType::kFloat16>{});
    case DType::kBFloat16:
      return f(std::integral_constant<DType, DType::kBFloat16>{});
  }
  bad_arg(fn, "unsupported dtype");
}

}  // namespace sentinel
