// Pieces of softmax_simd.h written once for both vector widths: the 2^f polynomial and
// the row-mode P.V register tile.
//
// No include guard: softmax_simd.h includes this once per SIMD level, inside a namespace
// that defines V (VecAvx2 or VecAvx512 of simd.h), under `#pragma GCC target` of that
// level (see attention_lanes.h for why).

// 2^f ~ sum_i kExp2C[i] f^i for f in [-1/2, 1/2] (Horner with FMA).
__attribute__((always_inline)) inline V::F exp2_poly(V::F f) {
  V::F p = V::set1(kExp2C6);
  p = V::fmadd(p, f, V::set1(kExp2C5));
  p = V::fmadd(p, f, V::set1(kExp2C4));
  p = V::fmadd(p, f, V::set1(kExp2C3));
  p = V::fmadd(p, f, V::set1(kExp2C2));
  p = V::fmadd(p, f, V::set1(kExp2C1));
  return V::fmadd(p, f, V::set1(kExp2C0));
}

// The register tile of the score and P.V products (row mode here, lanes mode in
// attention_lanes.h), an outer product accumulated over n steps:
//   acc[t][w] += sum_{i < n} a_i[w] * b[i * bi + t * bt]
// for NT broadcast scalars x NW vectors, a_i[w] = the vector at a + i * as + W w (the last
// one only the lanes of `tail` when kTail).
template <int NT, int NW, bool kTail>
__attribute__((always_inline)) inline void outer_updates(V::F (&acc)[NT][NW], const float* a,
                                                         int64_t as, V::M tail, const float* b,
                                                         int64_t bi, int64_t bt, int64_t n) {
  constexpr int kW = V::kLanes;
  for (int64_t i = 0; i < n; ++i) {
    const float* ai = a + i * as;
    V::F av[NW];
#pragma GCC unroll 16
    for (int w = 0; w < NW; ++w) {
      av[w] = (kTail && w == NW - 1) ? V::load_masked(ai + kW * w, tail) : V::loadu(ai + kW * w);
    }
#pragma GCC unroll 16
    for (int t = 0; t < NT; ++t) {
      const V::F bv = V::set1(b[i * bi + t * bt]);
#pragma GCC unroll 16
      for (int w = 0; w < NW; ++w) acc[t][w] = V::fmadd(av[w], bv, acc[t][w]);
    }
  }
}

// c[t * ct + W w] = acc[t][w] (c 64-byte aligned).
template <int NT, int NW>
__attribute__((always_inline)) inline void store_tile(const V::F (&acc)[NT][NW], float* c,
                                                      int64_t ct) {
#pragma GCC unroll 16
  for (int t = 0; t < NT; ++t)
#pragma GCC unroll 16
    for (int w = 0; w < NW; ++w) V::store(c + t * ct + V::kLanes * w, acc[t][w]);
}

// Row mode P.V for NR rows x NV vectors of V::kLanes dims (kTail: the last vector holds
// the dims of `tail` only): o[r * dp + d] = o[r * dp + d] * alpha[r]
// + sum_j p[r * sst + j] * v[j * vs + d].
template <int NR, int NV, bool kTail>
void pv_rows_tile(const float* p, int64_t sst, const float* v, int64_t vs, int64_t nj, V::M tail,
                  float* o, int64_t dp, const float* alpha) {
  V::F acc[NR][NV];
#pragma GCC unroll 4
  for (int r = 0; r < NR; ++r) {
    const V::F a = V::set1(alpha[r]);
#pragma GCC unroll 4
    for (int w = 0; w < NV; ++w) acc[r][w] = V::mul(V::load(o + r * dp + V::kLanes * w), a);
  }
  outer_updates<NR, NV, kTail>(acc, v, vs, tail, p, 1, sst, nj);
  store_tile(acc, o, dp);
}
