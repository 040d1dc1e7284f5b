// The dequantization kernels of decode_attention.cpp (DeqInt8Fn, DeqInt4Fn, DeqKiviFn there),
// written once for both vector widths.
//
// No include guard: decode_attention.cpp includes this once per SIMD level, inside a
// namespace that defines V (VecAvx2 or VecAvx512 of simd.h), i8_to_ps / u4_to_ps
// (V::kLanes int8 / int4 codes -> fp32), int8_tail (the channels after the last whole
// vector of a run of int8 channels) and kDeqInt8Narrower /
// kDeqInt4Narrower (the next lower level's kernels), under `#pragma GCC target` of that
// level (see attention_lanes.h for why).

constexpr int64_t kW = V::kLanes;

// dj[c .. c1) = the int8 codes times sg (kScale) or as they are.
template <bool kScale>
inline void int8_part(const int8_t* cj, int64_t c, int64_t c1, float sg, float* dj) {
  const V::F sv = V::set1(sg);
  for (; c + kW <= c1; c += kW) {
    const V::F x = i8_to_ps(cj + c);
    V::storeu(dj + c, kScale ? V::mul(x, sv) : x);
  }
  int8_tail<kScale>(cj, c, c1, sg, sv, dj);
}

void deq_int8(const int8_t* codes, int64_t cst, const uint16_t* s, int64_t sst, int64_t nj,
              int64_t D, int64_t gw, bool fold, float* dst, int64_t dp, float* mul) {
  // A group boundary inside a vector: the lower level.
  if (!fold && gw < D && gw % kW != 0) {
    kDeqInt8Narrower(codes, cst, s, sst, nj, D, gw, fold, dst, dp, mul);
    return;
  }
  for (int64_t j = 0; j < nj; ++j) {
    const int8_t* cj = codes + j * cst;
    const uint16_t* sj = s + j * sst;
    float* dj = dst + j * dp;
    if (fold) {
      mul[j] = f16_scalar_avx2(sj[0]);
      int8_part<false>(cj, 0, D, 1.0f, dj);
      continue;
    }
    // Groups of a multiple of kW channels (or one group): one broadcast scale per group.
    for (int64_t c0 = 0, g = 0; c0 < D; c0 += gw, ++g) {
      int8_part<true>(cj, c0, std::min(D, c0 + gw), f16_scalar_avx2(sj[g]), dj);
    }
  }
}

void deq_int4(const uint8_t* codes, int64_t cst, const uint16_t* sm, int64_t sst, int64_t nj,
              int64_t D, int64_t gw, float* dst, int64_t dp) {
  // A group boundary inside a vector: the lower level.
  if (gw < D && gw % kW != 0) {
    kDeqInt4Narrower(codes, cst, sm, sst, nj, D, gw, dst, dp);
    return;
  }
  for (int64_t j = 0; j < nj; ++j) {
    const uint8_t* cj = codes + j * cst;
    const uint16_t* sj = sm + j * sst;
    float* dj = dst + j * dp;
    for (int64_t c0 = 0, g = 0; c0 < D; c0 += gw, ++g) {
      const float sg = f16_scalar_avx2(sj[2 * g]);
      const float mg = f16_scalar_avx2(sj[2 * g + 1]);
      const V::F sv = V::set1(sg), mv = V::set1(mg);
      const int64_t c1 = std::min(D, c0 + gw);
      int64_t c = c0;
      for (; c + kW <= c1; c += kW) V::storeu(dj + c, V::fmadd(u4_to_ps(cj + c / 2), sv, mv));
      int4_channels(cj, c, c1, sg, mg, dj);
    }
  }
}

void deq_kivi(const uint8_t* codes, int64_t cst, int64_t nj, int64_t D, const float* s,
              const float* m, float* dst, int64_t dp) {
  for (int64_t j = 0; j < nj; ++j) {
    const uint8_t* cj = codes + j * cst;
    float* dj = dst + j * dp;
    int64_t c = 0;
    for (; c + kW <= D; c += kW) {
      V::storeu(dj + c, V::fmadd(u4_to_ps(cj + c / 2), V::loadu(s + c), V::loadu(m + c)));
    }
    kivi_channels(cj, c, D, s, m, dj);
  }
}
