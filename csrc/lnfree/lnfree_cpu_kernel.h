// The LN-free linear layers' CPU kernel, written once over an `Isa` struct (Vec16 of
// common/cpu_vec16_*.h, with exp) and compiled per ISA: include inside the unit's anonymous
// namespace after defining `Isa`.
//
// A thread owns a range of output columns and computes them for every row of x:
// - up to kGemvRows rows (decode): each output is a dot product of an x row with a w row along K
//   (w rows are contiguous in F.linear's layout), 4 w rows at a time: w is read once, straight
//   from memory, which is what bounds this case;
// - more rows (prefill, batches): per panel of kPanel columns and block of kDepth along K, the
//   w block is transposed once into an fp32 [kDepth, kPanel] panel (L2-resident), then the
//   register-blocked product (common/cpu_gemm.h: 6 rows x 4 vectors) runs over every row of x,
//   accumulating into an fp32 [M, kPanel] buffer.
// Then the epilogue (bias, GELU or residual, conversion) writes each finished output row once.

#include "common/cpu_gemm.h"

using V = typename Isa::V;

// GPT-2's GELU: 0.5 v (1 + tanh(sqrt(2/pi) (v + 0.044715 v^3))), tanh(u) = 1 - 2 / (1 + e^{2u})
// (e^{2u} -> inf gives 1, -> 0 gives -1; NaN stays NaN).
inline V gelu_tanh(V v) {
  const V u = Isa::mul(Isa::set1(1.5957691216057308f),  // 2 sqrt(2/pi)
                       Isa::fma(Isa::mul(Isa::set1(0.044715f), Isa::mul(v, v)), v, v));
  const V t = Isa::sub(Isa::set1(1.f), Isa::div(Isa::set1(2.f), Isa::add(Isa::set1(1.f), Isa::exp(u))));
  return Isa::mul(Isa::mul(Isa::set1(0.5f), v), Isa::add(Isa::set1(1.f), t));
}

template <Elem E>
struct Linear {
  using T = typename ElemT<E>::T;
  const LinearArgs& a;

  // Columns [n0, n0 + nn) of row m from the fp32 accumulators acc[0, nn).
  void epilogue(const float* acc, int64_t m, int64_t n0, int64_t nn) const {
    T* y = static_cast<T*>(a.y) + m * a.N + n0;
    const T* b = a.bias ? static_cast<const T*>(a.bias) + n0 : nullptr;
    const T* r = a.residual ? static_cast<const T*>(a.residual) + m * a.ldr + n0 : nullptr;
    for (int64_t c = 0; c < nn; c += kLanes) {
      const int64_t left = nn - c;
      V v = Isa::template load<Elem::kF32>(acc + c, left);
      if (b) v = Isa::add(v, Isa::template load<E>(b + c, left));
      if (a.gelu) v = gelu_tanh(v);
      if (r) v = Isa::add(v, Isa::template load<E>(r + c, left));
      Isa::template store<E>(y + c, v, left);
    }
  }

  // Rows of x (<= kGemvRows) times w rows [n0, n1), a panel of kPanel outputs at a time: 4 w
  // rows per pass over K, their dot products with every x row.
  void gemv(int64_t n0, int64_t n1, float* acc) const {
    const int64_t M = a.M, K = a.K, Kp = pad16(K);
    for (int64_t p = n0; p < n1; p += kPanel) {
      const int64_t nn = n1 - p < kPanel ? n1 - p : kPanel;
      for (int64_t n = p; n < p + nn; n += 4) {
        const int64_t nr = p + nn - n < 4 ? p + nn - n : 4;
        V s[kGemvRows][4];
        for (int64_t m = 0; m < M; ++m)
          for (int j = 0; j < 4; ++j) s[m][j] = Isa::zero();
        const T* w[4];  // past nr: row n again (read, not used)
        for (int j = 0; j < 4; ++j) w[j] = static_cast<const T*>(a.w) + (n + (j < nr ? j : 0)) * a.ldw;
        for (int64_t k = 0; k < Kp; k += kLanes) {
          V wv[4];
          for (int j = 0; j < 4; ++j) wv[j] = Isa::template load<E>(w[j] + k, K - k);
          for (int64_t m = 0; m < M; ++m) {
            const V xv = Isa::loadf(a.x + m * Kp + k);
            for (int j = 0; j < 4; ++j) s[m][j] = Isa::fma(xv, wv[j], s[m][j]);
          }
        }
        for (int64_t m = 0; m < M; ++m)
          for (int64_t j = 0; j < nr; ++j) acc[m * kPanel + n - p + j] = Isa::reduce_add(s[m][j]);
      }
      for (int64_t m = 0; m < M; ++m) epilogue(acc + m * kPanel, m, p, nn);
    }
  }

  // w rows [n0, n0 + nn) x columns [k0, k0 + kc) -> panel[k][c] (fp32, zero past nn), 16 x 16
  // blocks transposed in registers.
  void pack(int64_t n0, int64_t nn, int64_t k0, int64_t kc, float* panel) const {
    V t[kLanes];
    for (int64_t c0 = 0; c0 < kPanel; c0 += kLanes)
      for (int64_t kk = 0; kk < kc; kk += kLanes) {
        for (int64_t i = 0; i < kLanes; ++i)
          t[i] = c0 + i < nn ? Isa::template load<E>(static_cast<const T*>(a.w) + (n0 + c0 + i) * a.ldw + k0 + kk,
                                                     kc - kk)
                             : Isa::zero();
        Isa::transpose16(t);
        for (int64_t i = 0; i < kLanes && kk + i < kc; ++i) Isa::storef(panel + (kk + i) * kPanel + c0, t[i]);
      }
  }

  void gemm(int64_t n0, int64_t n1, float* scratch) const {
    const int64_t M = a.M, K = a.K, Kp = pad16(K);
    float* panel = scratch;
    float* acc = scratch + kDepth * kPanel;
    for (int64_t p = n0; p < n1; p += kPanel) {
      const int64_t nn = n1 - p < kPanel ? n1 - p : kPanel;
      for (int64_t k0 = 0; k0 < K; k0 += kDepth) {
        const int64_t kc = K - k0 < kDepth ? K - k0 : kDepth;
        pack(p, nn, k0, kc, panel);
        // acc [M, kPanel] (+)= x[:, k0:k0+kc] [M, kc] @ panel [kc, kPanel]
        Gemm::run(M, kPanel / kLanes, kc, a.x + k0, Kp, 1, panel, kPanel, acc, kPanel, k0 > 0);
      }
      for (int64_t m = 0; m < M; ++m) epilogue(acc + m * kPanel, m, p, nn);
    }
  }

  void run(int64_t n0, int64_t n1, float* scratch) const {
    if (a.M <= kGemvRows) gemv(n0, n1, scratch);
    else gemm(n0, n1, scratch);
  }
};

inline void linear_columns(const LinearArgs& a, int64_t n0, int64_t n1, float* scratch) {
  switch (a.elem) {
    case Elem::kF32: Linear<Elem::kF32>{a}.run(n0, n1, scratch); break;
    case Elem::kF16: Linear<Elem::kF16>{a}.run(n0, n1, scratch); break;
    case Elem::kBF16: Linear<Elem::kBF16>{a}.run(n0, n1, scratch); break;
  }
}
