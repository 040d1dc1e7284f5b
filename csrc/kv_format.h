// Storage formats of the KV cache, shared by kv_append.cpp (the writer) and
// decode_attention.cpp (the reader); the rules are those of
// python/sentinel_kernels/reference/kv_formats.py.
//
//   dense: [.., L, D] of a float dtype.
//   int8:  [.., L, D] int8 codes, G float16 group scales per token: x ~ code * s.
//   int4:  [.., L, ceil(D / 2)] uint8, channel c in byte c / 2 (low nibble for even c),
//          G (s, m) float16 pairs per token: x ~ code * s + m. KIVI keys keep one (s, m)
//          pair per channel per block of T tokens instead.
// A group is g = ceil(D / G) consecutive channels (the last one may be shorter).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "args.h"

namespace sentinel {

enum class KvFormat { kDense, kInt8, kInt4 };

// "dense" | "int8" | "int4"; throws std::invalid_argument otherwise.
inline KvFormat parse_kv_format(const std::string& name) {
  if (name == "dense") return KvFormat::kDense;
  if (name == "int8") return KvFormat::kInt8;
  if (name == "int4") return KvFormat::kInt4;
  throw std::invalid_argument("kv_format must be 'dense', 'int8' or 'int4', got '" + name + "'");
}

// Group width g = ceil(D / G), checked like reference.kv_groups (std::invalid_argument
// naming `fn` when 1 <= G <= D fails or D does not cut into G groups of g channels).
inline int64_t kv_group_width(const char* fn, int64_t D, int64_t G) {
  if (G < 1 || G > D) {
    bad_arg(fn, "n_groups must be in [1, D = " + std::to_string(D) + "], got " +
                    std::to_string(G));
  }
  const int64_t g = (D + G - 1) / G;
  if ((D + g - 1) / g != G) {
    bad_arg(fn, "D = " + std::to_string(D) + " cannot be cut into n_groups = " +
                    std::to_string(G) + " groups of ceil(D / n_groups) = " + std::to_string(g) +
                    " channels");
  }
  return g;
}

// The int4 code of channel c of a packed row.
inline int int4_code(const uint8_t* row, int64_t c) { return (row[c >> 1] >> ((c & 1) * 4)) & 0xF; }

}  // namespace sentinel
