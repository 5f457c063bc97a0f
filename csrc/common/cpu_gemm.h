// Register-blocked fp32 matrix products for the CPU kernels, written once over an `Isa` struct
// (Vec16 of common/cpu_vec16_*.h): include inside the per-ISA unit's anonymous namespace after
// defining `Isa` (as the kernel headers that use it are). Used by the Hedgehog backward
// (hedgehog_bwd_kernel.h) and the LN-free linear layers (lnfree/lnfree_cpu_kernel.h).
#pragma once
#include <cstdint>

// Which part of C = A B a row block [i0, i1) needs (the masked matrices are triangular).
enum class Tri {
  kFull,
  kOutLower,  // only the column vectors holding some j < i1 (the caller zeroes j > i afterwards)
  kKLower,    // A(i, k) = 0 for k > i: k < i1
  kKUpper,    // A(i, k) = 0 for k < i: k >= i0
};

struct Gemm {
  using V = typename Isa::V;
  static constexpr int64_t kLanes = 16;  // fp32 lanes per vector
  // Rows per register block: kMR x 4 accumulator vectors + 4 of B + 1 broadcast = 29 of the 32
  // AVX-512 registers, 24 FMAs per 4 vectors of B loaded. Alone (B in L1/L2) the products of this
  // kernel run at 72-85 GFMA/s against 72-81 with 4-row blocks (56 against 73 for the triangular
  // M = Q K^T) on a 100 GFMA/s core; in the whole backward the difference is within noise (~2%).
  static constexpr int kMR = 6;

  // C[i, 16 NV] = (Cin[i, 16 NV] +) sum_{k0 <= k < k1} A(i, k) B[k, 16 NV] for MR rows, A(i, k) =
  // a[i * ars + k * acs]; Cin is C itself unless given (same ldc).
  template <int MR, int NV>
  static inline void block(int64_t k0, int64_t k1, const float* a, int64_t ars, int64_t acs, const float* b,
                           int64_t ldb, float* c, int64_t ldc, bool acc, const float* cin) {
    V r[MR][NV];
    for (int i = 0; i < MR; ++i)
      for (int v = 0; v < NV; ++v) r[i][v] = acc ? Isa::loadf(cin + i * ldc + v * kLanes) : Isa::zero();
    const float* bp = b + k0 * ldb;
    const float* ap = a + k0 * acs;
    for (int64_t k = k0; k < k1; ++k, bp += ldb, ap += acs) {
      V bv[NV];
      for (int v = 0; v < NV; ++v) bv[v] = Isa::loadf(bp + v * kLanes);
      for (int i = 0; i < MR; ++i) {
        const V av = Isa::set1(ap[i * ars]);
        for (int v = 0; v < NV; ++v) r[i][v] = Isa::fma(av, bv[v], r[i][v]);
      }
    }
    for (int i = 0; i < MR; ++i)
      for (int v = 0; v < NV; ++v) Isa::storef(c + i * ldc + v * kLanes, r[i][v]);
  }

  template <int MR>
  static void row_block(int64_t nv, int64_t k0, int64_t k1, const float* a, int64_t ars, int64_t acs, const float* b,
                        int64_t ldb, float* c, int64_t ldc, bool acc, const float* cin) {
    for (int64_t v0 = 0; v0 < nv; v0 += 4) {
      const int64_t o = v0 * kLanes;
      switch (nv - v0 < 4 ? nv - v0 : 4) {
        case 1: block<MR, 1>(k0, k1, a, ars, acs, b + o, ldb, c + o, ldc, acc, cin + o); break;
        case 2: block<MR, 2>(k0, k1, a, ars, acs, b + o, ldb, c + o, ldc, acc, cin + o); break;
        case 3: block<MR, 3>(k0, k1, a, ars, acs, b + o, ldb, c + o, ldc, acc, cin + o); break;
        default: block<MR, 4>(k0, k1, a, ars, acs, b + o, ldb, c + o, ldc, acc, cin + o); break;
      }
    }
  }

  // C [m, 16 nv] (+)= A [m, K] B [K, 16 nv] (row-major B and C; A through its strides, so A^T B
  // is ars = 1, acs = lda). Rows of B are whole vectors: padded columns must be zero in B. With
  // acc and cin, C = Cin + A B out of place (Cin laid out as C; a copy saved).
  static void run(int64_t m, int64_t nv, int64_t K, const float* a, int64_t ars, int64_t acs, const float* b,
                  int64_t ldb, float* c, int64_t ldc, bool acc, Tri tri = Tri::kFull, const float* cin = nullptr) {
    for (int64_t i0 = 0; i0 < m; i0 += kMR) {
      const int64_t mr = m - i0 < kMR ? m - i0 : kMR, i1 = i0 + mr;
      int64_t k0 = 0, k1 = K, nvb = nv;
      if (tri == Tri::kKLower) k1 = K < i1 ? K : i1;
      if (tri == Tri::kKUpper) k0 = i0 < K ? i0 : K;
      if (tri == Tri::kOutLower) nvb = (i1 - 1) / kLanes + 1 < nv ? (i1 - 1) / kLanes + 1 : nv;
      const float* ai = a + i0 * ars;
      float* ci = c + i0 * ldc;
      const float* cii = (cin ? cin : c) + i0 * ldc;
      switch (mr) {
        case 1: row_block<1>(nvb, k0, k1, ai, ars, acs, b, ldb, ci, ldc, acc, cii); break;
        case 2: row_block<2>(nvb, k0, k1, ai, ars, acs, b, ldb, ci, ldc, acc, cii); break;
        case 3: row_block<3>(nvb, k0, k1, ai, ars, acs, b, ldb, ci, ldc, acc, cii); break;
        case 4: row_block<4>(nvb, k0, k1, ai, ars, acs, b, ldb, ci, ldc, acc, cii); break;
        case 5: row_block<5>(nvb, k0, k1, ai, ars, acs, b, ldb, ci, ldc, acc, cii); break;
        default: row_block<6>(nvb, k0, k1, ai, ars, acs, b, ldb, ci, ldc, acc, cii); break;
      }
    }
  }
};

