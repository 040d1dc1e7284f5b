// Lanes-mode kernels of attention.cpp (query rows along the SIMD lanes; see the design
// notes there), written once for both vector widths.
//
// No include guard: attention.cpp includes this once per SIMD level, inside a namespace
// that sees V (VecAvx2 or VecAvx512 of simd.h) and the outer_updates / store_tile of
// softmax_lanes.h for that level, and under `#pragma GCC target` of that level, so every
// function here is compiled for exactly that level (a function template cannot take its
// target attribute from a template argument). It uses BlockMask and kTile of
// attention.cpp.

using F = V::F;
constexpr int kW = V::kLanes;
// Vectors of rows per register tile: kTile x kMaxRv accumulators plus kMaxRv row vectors
// and a broadcast fit in the registers (AVX-512: 6 x 4 + 5 of 32; AVX2: 6 x 2 + 3 of 16).
constexpr int kMaxRv = V::kRegisters / 8;

// The register tile both products use, RV vectors of rows x NT keys (QK) or head dims
// (PV), an outer product accumulated over n steps:
//   kPv false (scores):  s[t * rp + W v] = sum_{d < D} a[d * rp + W v] * k[t * ks + d]
//     (a = QT, b = K rows, bs = ks, n = D, c = s),
//   kPv true (P.V):      o[t * rp + W v] = o[...] * alpha[W v]
//                                          + sum_{j < nj} a[j * rp + W v] * v[j * vs + t]
//     (a = P, b = V rows offset to the tile's first dim, bs = vs, n = nj, c = o).
template <bool kPv, int RV, int NT>
void outer_tile(const float* a, int64_t rp, const float* b, int64_t bs, int64_t n, float* c,
                const float* alpha) {
  F acc[NT][RV];
  #pragma GCC unroll 16
  for (int v = 0; v < RV; ++v) {
    const F sc = kPv ? V::load(alpha + kW * v) : V::zero();
    #pragma GCC unroll 16
    for (int t = 0; t < NT; ++t) acc[t][v] = kPv ? V::mul(V::load(c + t * rp + kW * v), sc) : sc;
  }
  // Step i reads b[i * bs + t] (P.V) or b[t * bs + i] (scores).
  outer_updates<NT, RV, false>(acc, a, rp, V::M{}, b, kPv ? bs : 1, kPv ? 1 : bs, n);
  store_tile(acc, c, rp);
}

using TileFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*,
                        const float*);
using Tiles = std::array<std::array<TileFn, kTile>, kMaxRv>;

// tiles<kPv>()[rv - 1][nt - 1] = outer_tile<kPv, rv, nt>.
template <bool kPv, int RV, size_t... NT>
constexpr std::array<TileFn, kTile> tiles_of(std::index_sequence<NT...>) {
  return {&outer_tile<kPv, RV, static_cast<int>(NT) + 1>...};
}
template <bool kPv, size_t... RV>
constexpr Tiles tiles(std::index_sequence<RV...>) {
  return {tiles_of<kPv, static_cast<int>(RV) + 1>(std::make_index_sequence<kTile>())...};
}

// The QK (kPv false) or P.V product of a block over all rp rows, NT = kTile keys / head
// dims (the last tile fewer) by up to kMaxRv vectors of rows at a time.
template <bool kPv>
void outer_product(const float* a, int64_t rp, const float* b, int64_t bs, int64_t n,
                   int64_t nt, float* c, const float* alpha) {
  static constexpr Tiles table = tiles<kPv>(std::make_index_sequence<kMaxRv>());
  const int64_t nv = rp / kW;
  for (int64_t v0 = 0; v0 < nv; v0 += kMaxRv) {
    const int rv = static_cast<int>(std::min<int64_t>(kMaxRv, nv - v0));
    for (int64_t t0 = 0; t0 < nt; t0 += kTile) {
      const int tt = static_cast<int>(std::min<int64_t>(kTile, nt - t0));
      table[rv - 1][tt - 1](a + kW * v0, rp, kPv ? b + t0 : b + t0 * bs, bs, n,
                            c + t0 * rp + kW * v0, kPv ? alpha + kW * v0 : nullptr);
    }
  }
}

// QkFn and PvFn of attention.cpp.
void qk(const float* qt, int64_t rp, const float* k, int64_t ks, int64_t nj, int64_t D,
        float* s) {
  outer_product<false>(qt, rp, k, ks, D, nj, s, nullptr);
}

void pv(const float* p, int64_t rp, const float* v, int64_t vs, int64_t nj, int64_t D, float* o,
        const float* alpha) {
  outer_product<true>(p, rp, v, vs, nj, D, o, alpha);
}

// The online-softmax step of SoftmaxFn (attention.cpp) on W lanes at a time.
void softmax(float* s, int64_t rp, int64_t nj, const BlockMask* bm, float* m, float* l,
             float* alpha) {
  const F neg_inf = V::set1(kNegInf);
  for (int64_t v = 0; v < rp; v += kW) {
    float* sv = s + v;
    F mx0 = neg_inf, mx1 = neg_inf;
    if (bm != nullptr) {
      const V::I lo = V::loadu_i32(bm->lo + v);
      const V::I hi = V::loadu_i32(bm->hi + v);
      for (int64_t j = 0; j < nj; ++j) {
        const V::I key = V::set1_i32(bm->j0 + static_cast<int32_t>(j));
        V::M vis = V::in_range(key, lo, hi);
        if (bm->km != nullptr && bm->km[j] == 0) vis = V::no_lanes();
        const F x = V::select(vis, V::load(sv + j * rp), neg_inf);
        V::store(sv + j * rp, x);
        mx0 = V::max(mx0, x);
      }
    } else {
      int64_t j = 0;
      for (; j + 2 <= nj; j += 2) {
        mx0 = V::max(mx0, V::load(sv + j * rp));
        mx1 = V::max(mx1, V::load(sv + (j + 1) * rp));
      }
      if (j < nj) mx0 = V::max(mx0, V::load(sv + j * rp));
    }
    const F m_old = V::load(m + v);
    const F m_new = V::max(m_old, V::max(mx0, mx1));
    const F m_use = V::neg_inf_to_zero(m_new, neg_inf);
    const F a = exp2_vec(V::sub(m_old, m_use));
    F sum0 = V::zero(), sum1 = V::zero();
    int64_t j = 0;
    for (; j + 2 <= nj; j += 2) {
      const F p0 = exp2_vec(V::sub(V::load(sv + j * rp), m_use));
      const F p1 = exp2_vec(V::sub(V::load(sv + (j + 1) * rp), m_use));
      V::store(sv + j * rp, p0);
      V::store(sv + (j + 1) * rp, p1);
      sum0 = V::add(sum0, p0);
      sum1 = V::add(sum1, p1);
    }
    if (j < nj) {
      const F p0 = exp2_vec(V::sub(V::load(sv + j * rp), m_use));
      V::store(sv + j * rp, p0);
      sum0 = V::add(sum0, p0);
    }
    V::store(l + v, V::fmadd(V::load(l + v), a, V::add(sum0, sum1)));
    V::store(m + v, m_new);
    V::store(alpha + v, a);
  }
}
