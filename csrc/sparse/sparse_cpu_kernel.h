// The sparse-decoding CPU inner loops, written once over an `Isa` struct and compiled per ISA:
// include this after defining `Isa` inside an anonymous namespace (see sparse_cpu_avx512.cpp).
// Isa derives from Vec16 (common/cpu_vec16_*.h: V = 16 fp32 lanes, zero, set1, add, sub, mul,
// fma(a, b, c) = a*b + c, reduce_add, reduce_max, loadf/storef, load<E>(p, n): n <= 16 lanes of
// element type E as fp32, zeros beyond n) and adds exp2(v) (~1e-7 relative, NaN-propagating).
//
// attend(): online softmax over tiles of kTile tokens. Per tile, every query head g of the group
// gets a vector of kTile scores (q_g . k_t, already scaled into the log2 domain), one max, one
// exp2 of the vector, and the accumulator update acc_g += p_gt * v_t, kept in a [G, Dp] fp32
// buffer (L1-resident). K and V rows are read once per group: the memory traffic of GQA decode.

struct Kernel {
  using V = typename Isa::V;

  static inline int64_t lanes_at(int64_t D, int64_t c) { return D - c < kLanes ? D - c : kLanes; }

  template <Elem E>
  static float dot(const float* a, const typename ElemT<E>::T* x, int64_t D) {
    V s = Isa::zero();
    for (int64_t c = 0; c < D; c += kLanes) s = Isa::fma(Isa::loadf(a + c), Isa::template load<E>(x + c, lanes_at(D, c)), s);
    return Isa::reduce_add(s);
  }

  static constexpr int kHeadsPerPass = 4;  // query heads sharing one load of each K/V vector

  // Scores of one tile for query heads [g0, g0 + NG): s[g * kTile + i] = q_g . k_i (log2 domain),
  // -inf past the nt valid tokens. Each K vector is loaded once for the NG heads.
  template <Elem E, int NG, bool FULL>
  static void tile_scores(const CpuAttnArgs& a, const SplitWork& w, const typename ElemT<E>::T* kt, int64_t nt,
                          int64_t g0) {
    const int64_t D = a.D, Dp = a.Dp;
    const float* q = w.qbuf + g0 * Dp;
    for (int64_t i = 0; i < nt; ++i) {
      const auto* kr = kt + i * a.k_st;
      V acc[NG];
      for (int j = 0; j < NG; ++j) acc[j] = Isa::zero();
      for (int64_t c = 0; c < D; c += kLanes) {
        const V x = Isa::template load<E>(kr + c, FULL ? kLanes : lanes_at(D, c));
        for (int j = 0; j < NG; ++j) acc[j] = Isa::fma(Isa::loadf(q + j * Dp + c), x, acc[j]);
      }
      for (int j = 0; j < NG; ++j) w.pbuf[(g0 + j) * kTile + i] = Isa::reduce_add(acc[j]);
    }
    for (int64_t i = nt; i < kTile; ++i)
      for (int j = 0; j < NG; ++j) w.pbuf[(g0 + j) * kTile + i] = -__builtin_inff();
  }

  // acc_g += sum_i p_gi v_i for heads [g0, g0 + NG): NG x CW accumulator vectors stay in
  // registers across the tile and each V vector is loaded once for all NG heads.
  template <Elem E, int NG, bool FULL>
  static void tile_values(const CpuAttnArgs& a, const SplitWork& w, const typename ElemT<E>::T* vt, int64_t nt,
                          int64_t g0) {
    const int64_t D = a.D, Dp = a.Dp;
    const float* p = w.pbuf + g0 * kTile;
    constexpr int CW = 4;  // vectors of a row handled per pass: NG * CW accumulators in registers
    for (int64_t c0 = 0; c0 < D; c0 += CW * kLanes) {
      float* acc = w.acc + g0 * Dp + c0;
      const int64_t nv = (D - c0 + kLanes - 1) / kLanes < CW ? (D - c0 + kLanes - 1) / kLanes : CW;
      V ac[NG][CW];
      for (int j = 0; j < NG; ++j)
        for (int u = 0; u < CW; ++u) ac[j][u] = u < nv ? Isa::loadf(acc + j * Dp + u * kLanes) : Isa::zero();
      for (int64_t i = 0; i < nt; ++i) {
        const auto* vr = vt + i * a.v_st + c0;
        for (int u = 0; u < CW; ++u) {
          if (u >= nv) break;
          const V x = Isa::template load<E>(vr + u * kLanes, FULL ? kLanes : lanes_at(D, c0 + u * kLanes));
          for (int j = 0; j < NG; ++j) ac[j][u] = Isa::fma(Isa::set1(p[j * kTile + i]), x, ac[j][u]);
        }
      }
      for (int j = 0; j < NG; ++j)
        for (int u = 0; u < CW; ++u)
          if (u < nv) Isa::storef(acc + j * Dp + u * kLanes, ac[j][u]);
    }
  }

  // Runs F<NG, FULL>(g0) over the query heads in passes of up to kHeadsPerPass.
  template <template <int, bool> class F, class... Args>
  static void per_head_pass(const CpuAttnArgs& a, Args&&... args) {
    const bool full = a.D % kLanes == 0;
    for (int64_t g0 = 0; g0 < a.G; g0 += kHeadsPerPass) {
      const int64_t ng = a.G - g0 < kHeadsPerPass ? a.G - g0 : kHeadsPerPass;
      switch (ng * 2 + full) {
        case 2: F<1, false>::run(args..., g0); break;
        case 3: F<1, true>::run(args..., g0); break;
        case 4: F<2, false>::run(args..., g0); break;
        case 5: F<2, true>::run(args..., g0); break;
        case 6: F<3, false>::run(args..., g0); break;
        case 7: F<3, true>::run(args..., g0); break;
        case 8: F<4, false>::run(args..., g0); break;
        default: F<4, true>::run(args..., g0); break;
      }
    }
  }
  template <Elem E> struct Scores { template <int NG, bool FULL> struct F {
    template <class... A> static void run(A&&... x) { tile_scores<E, NG, FULL>(x...); } }; };
  template <Elem E> struct Values { template <int NG, bool FULL> struct F {
    template <class... A> static void run(A&&... x) { tile_values<E, NG, FULL>(x...); } }; };

  // Online-softmax update of every query head for one tile of scores in pbuf: new running max,
  // rescale of l and acc, and the scores replaced by p = 2^(s - m).
  static void tile_softmax(const CpuAttnArgs& a, const SplitWork& w) {
    for (int64_t g = 0; g < a.G; ++g) {
      float* s = w.pbuf + g * kTile;
      const V sv = Isa::loadf(s);
      const float mt = Isa::reduce_max(sv);
      const float m_new = w.m[g] > mt ? w.m[g] : mt;
      // Nothing finite yet (all -inf, no NaN): keep m = -inf, l = 0, acc = 0, and p = 0. A NaN
      // score goes on and poisons l (NaN in -> NaN out), whatever reduce_max made of it.
      if (m_new == -__builtin_inff() && !__builtin_isnan(Isa::reduce_add(sv))) {
        Isa::storef(s, Isa::zero());
        continue;
      }
      const float alpha = __builtin_exp2f(w.m[g] - m_new);  // 0 on the first tile (m = -inf)
      const V p = Isa::exp2(Isa::sub(sv, Isa::set1(m_new)));
      Isa::storef(s, p);
      w.l[g] = w.l[g] * alpha + Isa::reduce_add(p);
      w.m[g] = m_new;
      if (alpha != 1.f) {
        float* acc = w.acc + g * a.Dp;
        for (int64_t c = 0; c < a.Dp; c += kLanes) Isa::storef(acc + c, Isa::mul(Isa::loadf(acc + c), Isa::set1(alpha)));
      }
    }
  }

  // Tokens [t0, t1) of one (b, h), tile by tile: scores, softmax update, V accumulation.
  template <Elem E>
  static void attend_range(const CpuAttnArgs& a, const SplitWork& w, const typename ElemT<E>::T* kb,
                           const typename ElemT<E>::T* vb, int64_t t0, int64_t t1) {
    const int64_t row_bytes = a.D * static_cast<int64_t>(sizeof(typename ElemT<E>::T));
    for (int64_t t = t0; t < t1; t += kTile) {
      const int64_t nt = t1 - t < kTile ? t1 - t : kTile;
      // Software prefetch of the next tile's K and V rows: decode is a pure stream of K/V, and the
      // V loop walks a tile in passes of 4 vectors per row (strided), which the hardware
      // prefetchers follow less well than a plain sequential read.
      for (int64_t i = t + kTile; i < t + 2 * kTile && i < t1; ++i) {
        const char* kr = reinterpret_cast<const char*>(kb + i * a.k_st);
        const char* vr = reinterpret_cast<const char*>(vb + i * a.v_st);
        for (int64_t off = 0; off < row_bytes; off += 64) {
          __builtin_prefetch(kr + off);
          __builtin_prefetch(vr + off);
        }
      }
      per_head_pass<Scores<E>::template F>(a, a, w, kb + t * a.k_st, nt);
      tile_softmax(a, w);
      per_head_pass<Values<E>::template F>(a, a, w, vb + t * a.v_st, nt);
    }
  }

  template <Elem E>
  static void attend(const CpuAttnArgs& a, const SplitWork& w) {
    using T = typename ElemT<E>::T;
    const int64_t G = a.G, D = a.D, Dp = a.Dp;
    const T* qb = static_cast<const T*>(a.q) + w.b * a.q_sb + w.h * G * a.q_sh;
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t c = 0; c < Dp; c += kLanes) {
        const V x = c < D ? Isa::template load<E>(qb + g * a.q_sh + c, lanes_at(D, c)) : Isa::zero();
        Isa::storef(w.qbuf + g * Dp + c, Isa::mul(x, Isa::set1(a.scale_log2)));
        Isa::storef(w.acc + g * Dp + c, Isa::zero());
      }
      w.m[g] = -__builtin_inff();
      w.l[g] = 0.f;
    }
    const T* kb = static_cast<const T*>(a.k) + w.b * a.k_sb + w.h * a.k_sh;
    const T* vb = static_cast<const T*>(a.v) + w.b * a.v_sb + w.h * a.v_sh;
    int64_t off = 0;  // position of the current run along the kept tokens
    for (int64_t r = 0; r < w.nruns && off < w.k1; ++r) {
      const TokenRun run = w.runs[r];
      const int64_t lo = w.k0 > off ? w.k0 : off, hi = w.k1 < off + run.len ? w.k1 : off + run.len;
      if (lo < hi) attend_range<E>(a, w, kb, vb, run.start + (lo - off), run.start + (hi - off));
      off += run.len;
    }
  }

  static void attend_split(const CpuAttnArgs& a, const SplitWork& w) {
    switch (a.elem) {
      case Elem::kF32: attend<Elem::kF32>(a, w); break;
      case Elem::kF16: attend<Elem::kF16>(a, w); break;
      case Elem::kBF16: attend<Elem::kBF16>(a, w); break;
    }
  }

  template <Elem E>
  static void scores(const float* qbar, const void* keys, int64_t ld, int64_t n, int64_t D, float* out) {
    const auto* k = static_cast<const typename ElemT<E>::T*>(keys);
    for (int64_t j = 0; j < n; ++j) out[j] = dot<E>(qbar, k + j * ld, D);
  }

  static void block_scores(const float* qbar, const void* keys, int64_t ld, Elem elem, int64_t n, int64_t D, float* out) {
    switch (elem) {
      case Elem::kF32: scores<Elem::kF32>(qbar, keys, ld, n, D, out); break;
      case Elem::kF16: scores<Elem::kF16>(qbar, keys, ld, n, D, out); break;
      case Elem::kBF16: scores<Elem::kBF16>(qbar, keys, ld, n, D, out); break;
    }
  }
};
