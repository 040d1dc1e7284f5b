// Runtime CPU feature detection and the process-wide SIMD dispatch level.
#pragma once

#include <string>
#include <vector>

namespace sentinel {

// What the CPU *and* the operating system support: a flag is only true when the
// instruction set exists and the OS saves the register state it needs (XCR0).
struct CpuFeatures {
  bool avx2 = false;
  bool fma = false;
  bool f16c = false;
  bool avx512f = false;
  bool avx512bw = false;
  bool avx512vl = false;
  bool avx512_vnni = false;
  bool os_avx = false;     // OS saves XMM/YMM state
  bool os_avx512 = false;  // OS saves opmask/ZMM state
};

// Detected once (thread-safe static initialisation) and cached.
const CpuFeatures& cpu_features();

// Ordered: a higher level implies every lower one.
enum class SimdLevel : int {
  kScalar = 0,
  kAvx2 = 1,        // AVX2 + FMA + F16C
  kAvx512 = 2,      // AVX-512 F + BW (+ the AVX2 level)
  kAvx512Vnni = 3,  // AVX-512 level + AVX512_VNNI
};

const char* simd_level_name(SimdLevel level);
// Returns false for an unknown name.
bool parse_simd_level(const std::string& name, SimdLevel* out);

bool simd_level_supported(SimdLevel level);
SimdLevel best_simd_level();
// Supported levels from lowest ("scalar") to highest.
std::vector<SimdLevel> supported_simd_levels();

// The level kernels dispatch on; defaults to best_simd_level().
SimdLevel active_simd_level();
// Throws std::invalid_argument if the CPU/OS lacks the level.
void set_simd_level(SimdLevel level);
// Throws std::invalid_argument for an unknown name or an unsupported level.
void set_simd_level(const std::string& name);

}  // namespace sentinel
