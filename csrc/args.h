// Kernel arguments shared by the CPU kernels: element strides built from the Python
// lists the bindings receive, and the checks that turn a bad size, stride or pointer into
// std::invalid_argument (ValueError in Python) naming the function and the argument.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace sentinel {

// Element strides of a 4-D [B, H, S, D] tensor.
struct Strides4 {
  int64_t b = 0, h = 0, s = 0, d = 0;
};

// Element strides of the (batch, head, slot) dims of a KV cache, scale or ring tensor.
struct Strides3 {
  int64_t b = 0, h = 0, l = 0;
};

// The name of enum value v where names[i] names the value i ("unknown" for a value
// outside them).
template <class E, size_t N>
const char* enum_name(E v, const char* const (&names)[N]) {
  const auto i = static_cast<size_t>(v);
  return i < N ? names[i] : "unknown";
}

// The enum value that `name` names in names[] (as enum_name) into *out; false for none.
template <class E, size_t N>
bool parse_enum(const std::string& name, const char* const (&names)[N], E* out) {
  for (size_t i = 0; i < N; ++i) {
    if (name == names[i]) {
      *out = static_cast<E>(i);
      return true;
    }
  }
  return false;
}

// Throws std::invalid_argument("fn: msg").
[[noreturn]] inline void bad_arg(const char* fn, const std::string& msg) {
  throw std::invalid_argument(std::string(fn) + ": " + msg);
}

// "name must be >= lo, got v" unless v >= lo.
inline void check_min(const char* fn, const char* name, int64_t v, int64_t lo) {
  if (v < lo) {
    bad_arg(fn, std::string(name) + " must be >= " + std::to_string(lo) + ", got " +
                    std::to_string(v));
  }
}

inline void check_not_null(const char* fn, const char* name, const void* p) {
  if (p == nullptr) bad_arg(fn, std::string(name) + " is a null pointer");
}

// "(s0, s1, ...)" of n values.
inline std::string fmt_strides(const int64_t* s, int n) {
  std::string r = "(";
  for (int i = 0; i < n; ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + ")";
}

// "name must be >= 0, got (s0, s1, ...)" unless every s[i] >= 0.
inline void check_nonneg(const char* fn, const char* name, const int64_t* s, int n) {
  for (int i = 0; i < n; ++i) {
    if (s[i] < 0) bad_arg(fn, std::string(name) + " must be >= 0, got " + fmt_strides(s, n));
  }
}

inline void check_nonneg(const char* fn, const char* name, const Strides4& s) {
  const int64_t v[4] = {s.b, s.h, s.s, s.d};
  check_nonneg(fn, name, v, 4);
}

inline void check_nonneg(const char* fn, const char* name, const Strides3& s) {
  const int64_t v[3] = {s.b, s.h, s.l};
  check_nonneg(fn, name, v, 3);
}

// True when the n-dim index space (sizes, strides) maps distinct index tuples to
// disjoint runs of `width` elements (width 1: distinct elements). Dims of size 1 are
// ignored (their stride is never stepped). Sufficient, not necessary: a layout whose
// dims interleave is refused even where it happens not to collide.
inline bool rows_disjoint(const int64_t* sizes, const int64_t* strides, int n, int64_t width) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size)
  for (int i = 0; i < n; ++i) {
    if (sizes[i] > 1) dims.emplace_back(strides[i], sizes[i]);
  }
  std::sort(dims.begin(), dims.end());
  int64_t extent = width;  // elements spanned by the dims visited so far
  for (const auto& [stride, size] : dims) {
    if (stride < extent) return false;
    extent = stride * (size - 1) + extent;
  }
  return true;
}

// Strides4 from a Python sequence of 4 ints; throws std::invalid_argument (naming `fn`
// and `name`) for another length.
inline Strides4 strides4(const std::vector<int64_t>& v, const char* fn, const char* name) {
  if (v.size() != 4) {
    bad_arg(fn, std::string(name) + " must have 4 entries (B, H, S, D strides in elements), " +
                    "got " + std::to_string(v.size()));
  }
  return Strides4{v[0], v[1], v[2], v[3]};
}

// Strides3 from a Python sequence of 3 ints, likewise.
inline Strides3 strides3(const std::vector<int64_t>& v, const char* fn, const char* name) {
  if (v.size() != 3) {
    bad_arg(fn, std::string(name) + " must have 3 entries (B, H, L strides in elements), got " +
                    std::to_string(v.size()));
  }
  return Strides3{v[0], v[1], v[2]};
}

}  // namespace sentinel
