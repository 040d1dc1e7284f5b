#include "cpu_features.h"

#include <atomic>
#include <cstdint>
#include <stdexcept>

#include "args.h"

#if defined(__x86_64__) || defined(_M_X64)
#define SENTINEL_X86_64 1
#if defined(_MSC_VER) && !defined(__clang__)
#include <immintrin.h>
#include <intrin.h>
#else
#include <cpuid.h>
#endif
#endif

namespace sentinel {
namespace {

#if defined(SENTINEL_X86_64)

struct CpuidRegs {
  uint32_t eax = 0, ebx = 0, ecx = 0, edx = 0;
};

CpuidRegs cpuid(uint32_t leaf, uint32_t subleaf) {
  CpuidRegs r;
#if defined(_MSC_VER) && !defined(__clang__)
  int regs[4];
  __cpuidex(regs, static_cast<int>(leaf), static_cast<int>(subleaf));
  r.eax = static_cast<uint32_t>(regs[0]);
  r.ebx = static_cast<uint32_t>(regs[1]);
  r.ecx = static_cast<uint32_t>(regs[2]);
  r.edx = static_cast<uint32_t>(regs[3]);
#else
  __cpuid_count(leaf, subleaf, r.eax, r.ebx, r.ecx, r.edx);
#endif
  return r;
}

// XCR0: which register states the OS saves on context switch. Only call when
// CPUID.1:ECX.OSXSAVE is set, otherwise XGETBV faults.
uint64_t read_xcr0() {
#if defined(_MSC_VER) && !defined(__clang__)
  return _xgetbv(0);
#else
  uint32_t lo = 0, hi = 0;
  // Raw opcode-free form: no need to compile this TU with -mxsave.
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
#endif
}

inline bool bit(uint32_t reg, int b) { return ((reg >> b) & 1u) != 0; }

CpuFeatures detect() {
  CpuFeatures f;
  const uint32_t max_leaf = cpuid(0, 0).eax;
  if (max_leaf < 1) return f;
  const CpuidRegs l1 = cpuid(1, 0);
  const bool osxsave = bit(l1.ecx, 27);
  const bool cpu_avx = bit(l1.ecx, 28);
  uint64_t xcr0 = 0;
  if (osxsave) xcr0 = read_xcr0();
  // XMM (bit 1) and YMM (bit 2) state.
  f.os_avx = osxsave && cpu_avx && (xcr0 & 0x6) == 0x6;
  // Plus opmask (5), ZMM_Hi256 (6), Hi16_ZMM (7).
  f.os_avx512 = f.os_avx && (xcr0 & 0xE0) == 0xE0;

  f.fma = f.os_avx && bit(l1.ecx, 12);
  f.f16c = f.os_avx && bit(l1.ecx, 29);
  if (max_leaf >= 7) {
    const CpuidRegs l7 = cpuid(7, 0);
    f.avx2 = f.os_avx && bit(l7.ebx, 5);
    f.avx512f = f.os_avx512 && bit(l7.ebx, 16);
    f.avx512bw = f.avx512f && bit(l7.ebx, 30);
    f.avx512vl = f.avx512f && bit(l7.ebx, 31);
    f.avx512_vnni = f.avx512f && bit(l7.ecx, 11);
  }
  return f;
}

#else  // not x86-64: scalar only

CpuFeatures detect() { return CpuFeatures{}; }

#endif

std::atomic<int>& active_level_storage() {
  static std::atomic<int> level{static_cast<int>(best_simd_level())};
  return level;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect();
  return features;
}

namespace {
constexpr const char* kSimdLevelNames[] = {"scalar", "avx2", "avx512", "avx512_vnni"};
}  // namespace

const char* simd_level_name(SimdLevel level) { return enum_name(level, kSimdLevelNames); }

bool parse_simd_level(const std::string& name, SimdLevel* out) {
  return parse_enum(name, kSimdLevelNames, out);
}

bool simd_level_supported(SimdLevel level) {
  const CpuFeatures& f = cpu_features();
  const bool avx2 = f.avx2 && f.fma && f.f16c;
  const bool avx512 = avx2 && f.avx512f && f.avx512bw;
  switch (level) {
    case SimdLevel::kScalar:
      return true;
    case SimdLevel::kAvx2:
      return avx2;
    case SimdLevel::kAvx512:
      return avx512;
    case SimdLevel::kAvx512Vnni:
      return avx512 && f.avx512_vnni;
  }
  return false;
}

SimdLevel best_simd_level() {
  static const SimdLevel best = [] {
    SimdLevel b = SimdLevel::kScalar;
    for (SimdLevel level : supported_simd_levels()) b = level;
    return b;
  }();
  return best;
}

std::vector<SimdLevel> supported_simd_levels() {
  std::vector<SimdLevel> out;
  for (int i = static_cast<int>(SimdLevel::kScalar); i <= static_cast<int>(SimdLevel::kAvx512Vnni);
       ++i) {
    const SimdLevel level = static_cast<SimdLevel>(i);
    if (simd_level_supported(level)) out.push_back(level);
  }
  return out;
}

SimdLevel active_simd_level() {
  return static_cast<SimdLevel>(active_level_storage().load(std::memory_order_relaxed));
}

void set_simd_level(SimdLevel level) {
  if (!simd_level_supported(level)) {
    throw std::invalid_argument(std::string("SIMD level '") + simd_level_name(level) +
                                "' is not supported by this CPU/OS (best available: '" +
                                simd_level_name(best_simd_level()) + "')");
  }
  active_level_storage().store(static_cast<int>(level), std::memory_order_relaxed);
}

void set_simd_level(const std::string& name) {
  SimdLevel level;
  if (!parse_simd_level(name, &level)) {
    throw std::invalid_argument("unknown SIMD level '" + name +
                                "'; expected one of 'scalar', 'avx2', 'avx512', 'avx512_vnni'");
  }
  set_simd_level(level);
}

}  // namespace sentinel
