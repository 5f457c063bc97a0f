// CherryQ CPU kernels, torch-free. This header is included by one translation unit per ISA
// (cherryq_cpu_avx512.cpp, cherryq_cpu_scalar.cpp) *inside that unit's own namespace* after
// an `Isa` struct is defined, so every inline function here is compiled once per ISA and
// never shared across units (no ODR mixing of AVX-512 and baseline code).
//
// The Isa struct derives from Vec16 (common/cpu_vec16_*.h: V = 16 fp32 lanes, zero, loadf,
// storef, set1, add, fma, reduce_add, half(u16) -> float, ...) and adds
// decode<BITS>(words, c0, c1), which turns one pack of 32
// codes (layout in pyfast/cherryq/format.py) into two V's of "biased" floats c = 1 + code * 2^-BITS
// (codes 0..15, 16..31). The bias makes decoding cheap (bits OR'd into 1.0f) and is folded
// into the per-group constants: scale * code + zero = (scale * 2^BITS) * c + (zero - scale * 2^BITS).
//
// GEMV math, per output row n and x row m, with G groups of `gs` columns:
//   y[m,n] = sum_g sb[n,g] * (sum_{k in g} c[n,k] * x[m,k]) + zb[n,g] * xsum[m,g]
//   with sb = scale * 2^BITS, zb = zero - sb (the biased codes c above)
//          + sum_c x[m, idx_c] * (cherry_c - zero[n, idx_c / gs])        (code is 0 at a cherry)
//          + bias[n]
// so the inner loop is decode + FMA only; the per-group zero term uses precomputed sums of x.

#include "cherryq/cherryq_cpu_epilogue.h"

constexpr int kPrefetchBytes = 2048;  // ~32 cache lines ahead of the packed-weight stream

struct Kernel {
  // acc[m][J], acc[m][J+1] += codes of one pack * x[m, col : col+32]. J is a compile-time
  // constant so the accumulators stay in registers.
  template <int BITS, int MB, int J>
  static inline void pack_fma(const int32_t* pw, const float* const* xrow, int64_t col,
                              typename Isa::V (&acc)[MB][4]) {
    typename Isa::V c0, c1;
    Isa::template decode<BITS>(pw, c0, c1);
    for (int m = 0; m < MB; ++m) {
      acc[m][J] = Isa::fma(c0, Isa::loadf(xrow[m] + col), acc[m][J]);
      acc[m][J + 1] = Isa::fma(c1, Isa::loadf(xrow[m] + col + 16), acc[m][J + 1]);
    }
  }

  // PPG: packs per group when known at compile time (group 64 / 128), 0 = read from `a`.
  template <int BITS, int MB, int PPG>
  static void gemv_row(const CpuMatmulArgs& a, int64_t n, int m0) {
    const int64_t K = a.K, G = K / a.group_size, words_per_row = K / 32 * BITS;
    const int packs_per_group = PPG ? PPG : a.group_size / 32;
    const int32_t* wrow = a.qweight + n * words_per_row;
    const uint16_t* srow = a.scales + n * G;
    const uint16_t* zrow = a.zeros + n * G;
    const float* xrow[MB];
    for (int m = 0; m < MB; ++m) xrow[m] = a.x + (m0 + m) * a.ldx;

    typename Isa::V tot[MB];
    float ztot[MB];
    for (int m = 0; m < MB; ++m) {
      tot[m] = Isa::zero();
      ztot[m] = 0.f;
    }
    // 4 independent accumulators per x row (2 packs x 2 halves) so the FMA latency chain
    // is not the bottleneck at MB = 1.
    for (int64_t g = 0; g < G; ++g) {
      typename Isa::V acc[MB][4];
      for (int m = 0; m < MB; ++m)
        for (int j = 0; j < 4; ++j) acc[m][j] = Isa::zero();
      const int32_t* pw = wrow + g * packs_per_group * BITS;
      const int64_t col0 = g * a.group_size;
      // The weight stream is the only traffic that misses cache: ask for it well ahead.
      __builtin_prefetch(reinterpret_cast<const char*>(pw) + kPrefetchBytes);
      int p = 0;
      for (; p + 2 <= packs_per_group; p += 2, pw += 2 * BITS) {
        pack_fma<BITS, MB, 0>(pw, xrow, col0 + p * 32, acc);
        pack_fma<BITS, MB, 2>(pw + BITS, xrow, col0 + p * 32 + 32, acc);
      }
      if (p < packs_per_group) pack_fma<BITS, MB, 0>(pw, xrow, col0 + p * 32, acc);
      const float sb = Isa::half(srow[g]) * (1 << BITS);
      const float zb = Isa::half(zrow[g]) - sb;
      for (int m = 0; m < MB; ++m) {
        const typename Isa::V sum = Isa::add(Isa::add(acc[m][0], acc[m][1]), Isa::add(acc[m][2], acc[m][3]));
        tot[m] = Isa::fma(sum, Isa::set1(sb), tot[m]);
        ztot[m] += zb * a.xsum[(m0 + m) * G + g];
      }
    }
    float out[MB];
    for (int m = 0; m < MB; ++m) out[m] = Isa::reduce_add(tot[m]) + ztot[m];
    add_cherries_and_store<MB>(a, n, m0, out, Isa::half);
  }

  template <int BITS, int MB>
  static void gemv_rows_mb(const CpuMatmulArgs& a, int64_t n0, int64_t n1, int m0) {
    if (a.group_size == 128)
      for (int64_t n = n0; n < n1; ++n) gemv_row<BITS, MB, 4>(a, n, m0);
    else if (a.group_size == 64)
      for (int64_t n = n0; n < n1; ++n) gemv_row<BITS, MB, 2>(a, n, m0);
    else
      for (int64_t n = n0; n < n1; ++n) gemv_row<BITS, MB, 0>(a, n, m0);
  }

  // y[m, n0:n1] for all m < M, x rows in register blocks of up to 4 (each weight decoded once per block).
  template <int BITS>
  static void gemv_rows(const CpuMatmulArgs& a, int64_t n0, int64_t n1) {
    for (int m0 = 0; m0 < a.M;) {
      const int mb = a.M - m0 >= 4 ? 4 : static_cast<int>(a.M - m0);
      switch (mb) {
        case 4: gemv_rows_mb<BITS, 4>(a, n0, n1, m0); break;
        case 3: gemv_rows_mb<BITS, 3>(a, n0, n1, m0); break;
        case 2: gemv_rows_mb<BITS, 2>(a, n0, n1, m0); break;
        default: gemv_rows_mb<BITS, 1>(a, n0, n1, m0); break;
      }
      m0 += mb;
    }
  }

  // Dense fp32 weights of rows [n0, n1) into out [(n1 - n0), K] (cherries applied), for the GEMM path.
  template <int BITS>
  static void dequant_rows(const CpuMatmulArgs& a, int64_t n0, int64_t n1, float* out) {
    const int64_t K = a.K, G = K / a.group_size, words_per_row = K / 32 * BITS;
    const int packs_per_group = a.group_size / 32;
    for (int64_t n = n0; n < n1; ++n) {
      float* orow = out + (n - n0) * K;
      const int32_t* pw = a.qweight + n * words_per_row;
      for (int64_t g = 0; g < G; ++g) {
        const float sb = Isa::half(a.scales[n * G + g]) * (1 << BITS);
        const typename Isa::V s = Isa::set1(sb);
        const typename Isa::V z = Isa::set1(Isa::half(a.zeros[n * G + g]) - sb);
        for (int p = 0; p < packs_per_group; ++p, pw += BITS) {
          typename Isa::V c0, c1;
          Isa::template decode<BITS>(pw, c0, c1);
          float* o = orow + g * a.group_size + p * 32;
          Isa::storef(o, Isa::fma(c0, s, z));
          Isa::storef(o + 16, Isa::fma(c1, s, z));
        }
      }
      for (int64_t c = 0; c < a.C; ++c) {
        const int64_t k = a.cherry_idx[n * a.C + c];
        if (k >= 0 && k < K) orow[k] = Isa::half(a.cherry_val[n * a.C + c]);
      }
    }
  }

  // out[m, n] (row stride ldy) = bias[n] + sum_k x[m, k] * w[n, k] for an MB x NB tile: MB*NB vector
  // accumulators over K (K % 32 == 0), each x and w vector loaded once per 16 columns.
  template <int MB, int NB>
  static void dot_tile(const float* x, int64_t ldx, const float* w, int64_t K, const float* bias, float* out,
                       int64_t ldy) {
    typename Isa::V acc[MB][NB];
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < NB; ++j) acc[i][j] = Isa::zero();
    for (int64_t k = 0; k < K; k += 16) {
      typename Isa::V wv[NB];
      for (int j = 0; j < NB; ++j) wv[j] = Isa::loadf(w + j * K + k);
      for (int i = 0; i < MB; ++i) {
        const typename Isa::V xv = Isa::loadf(x + i * ldx + k);
        for (int j = 0; j < NB; ++j) acc[i][j] = Isa::fma(xv, wv[j], acc[i][j]);
      }
    }
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < NB; ++j) out[i * ldy + j] = Isa::reduce_add(acc[i][j]) + (bias ? bias[j] : 0.f);
  }

  template <int MB>
  static void dot_tile_nb(int nb, const float* x, int64_t ldx, const float* w, int64_t K, const float* bias,
                          float* out, int64_t ldy) {
    switch (nb) {
      case 4: dot_tile<MB, 4>(x, ldx, w, K, bias, out, ldy); break;
      case 3: dot_tile<MB, 3>(x, ldx, w, K, bias, out, ldy); break;
      case 2: dot_tile<MB, 2>(x, ldx, w, K, bias, out, ldy); break;
      default: dot_tile<MB, 1>(x, ldx, w, K, bias, out, ldy); break;
    }
  }

  // y[:, n0:n0+rows] = x @ panel.T + bias, panel = dequantized weight rows [rows, K].
  static void gemm_panel(const CpuMatmulArgs& a, int64_t n0, int64_t rows, const float* panel) {
    for (int64_t j = 0; j < rows; j += 4) {
      const int nb = rows - j >= 4 ? 4 : static_cast<int>(rows - j);
      const float* w = panel + j * a.K;
      const float* bias = a.bias ? a.bias + n0 + j : nullptr;
      for (int64_t i = 0; i < a.M; i += 4) {
        const int mb = a.M - i >= 4 ? 4 : static_cast<int>(a.M - i);
        const float* x = a.x + i * a.ldx;
        float* out = a.y + i * a.ldy + n0 + j;
        switch (mb) {
          case 4: dot_tile_nb<4>(nb, x, a.ldx, w, a.K, bias, out, a.ldy); break;
          case 3: dot_tile_nb<3>(nb, x, a.ldx, w, a.K, bias, out, a.ldy); break;
          case 2: dot_tile_nb<2>(nb, x, a.ldx, w, a.K, bias, out, a.ldy); break;
          default: dot_tile_nb<1>(nb, x, a.ldx, w, a.K, bias, out, a.ldy); break;
        }
      }
    }
  }
};

inline void gemv_rows(const CpuMatmulArgs& a, int64_t n0, int64_t n1) {
  if (a.bits == 2) Kernel::gemv_rows<2>(a, n0, n1);
  else if (a.bits == 3) Kernel::gemv_rows<3>(a, n0, n1);
  else Kernel::gemv_rows<4>(a, n0, n1);
}

// GEMM path: dequantize rows [n0, n0 + rows) into `panel` [rows, K], then multiply by all of x.
inline void gemm_rows(const CpuMatmulArgs& a, int64_t n0, int64_t rows, float* panel) {
  if (a.bits == 2) Kernel::dequant_rows<2>(a, n0, n0 + rows, panel);
  else if (a.bits == 3) Kernel::dequant_rows<3>(a, n0, n0 + rows, panel);
  else Kernel::dequant_rows<4>(a, n0, n0 + rows, panel);
  Kernel::gemm_panel(a, n0, rows, panel);
}
