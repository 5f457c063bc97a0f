// The Hedgehog forward CPU loops, written once over an `Isa` struct and compiled per ISA: include
// this after defining `Isa` inside an anonymous namespace (see hedgehog_cpu_avx512.cpp). Isa
// derives from Vec16 (common/cpu_vec16_*.h: V = 16 fp32 lanes, zero, set1, add, sub, mul,
// fma(a, b, c) = a*b + c, reduce_add, reduce_max, loadf/storef, load<E>(p, n) / store<E>(p, v, n):
// n <= 16 lanes of element type E, loads give zeros past n, stores write n) and adds max, min, div,
// exp (~1e-7 relative, NaN-propagating, subnormal results flushed to zero), keep(v, lo, hi) (lanes
// [lo, hi) of v, zeros elsewhere) and mask(v, lo, hi, x) (x elsewhere); transpose16 (a 16 x 16
// block held in 16 vectors) comes from Vec16 too.
//
// Chunked causal linear attention (pyfast/reference/hedgehog.py), per KV head and chunk of 64
// tokens, all in fp32 with the running state S [FF, Dv], z [FF]:
//   features   U^T = W^T X^T + b ([F x D] x [D x 64]), then softmax over F down the columns;
//              features are kept transposed, FT [FF x 64], and never leave the scratch;
//   scores     A = Q K^T masked to keys j <= i ([64 x FF] x [FF x 64], lower triangle only);
//   output     num = Q S + A V ([64 x FF] x [FF x Dv] + [64 x 64] x [64 x Dv]),
//              den = Q z + rowsum(A), out = num / (den + eps);
//   state      S += K^T V ([FF x 64] x [64 x Dv]), z += colsum(K).
// Every product runs through one register-blocked micro-kernel, mm<R, NV>: an R x (16 NV) tile of
// C in registers (R <= 6 rows, NV <= 4 vectors: 24 accumulators), A broadcast one element at a
// time from any strided layout, B loaded as row vectors. Masked score entries are set to zero,
// never multiplied by it, and the A V product skips keys above the diagonal, so a NaN at token s
// reaches only rows t >= s (and the state), as in the reference.
//
// The sliding-window hybrid reuses the loop with the key block shifted back by `window`: query
// row t of chunk c0 reads the linear state of keys s <= t - window, i.e. the state before key
// c0 - window plus keys [c0 - window, t - window] of the shifted block (the same lower triangle).
// The softmax part of its band (t - window, t] runs flash-style over blocks of 64 raw keys
// (window_band), through the same micro-kernel.
//
// Measured (fp32, B1 H8 D=F=Dv=64, T=8192, one thread of this VM's Xeon): ~45 ms, ~90 GFLOP/s
// of the ~200 a core peaks at; the products take ~75% of the time, the two softmaxes of the
// feature maps ~12%, the transposed loads ~5%.

struct Kernel {
  using V = typename Isa::V;
  static constexpr int kMaxNV = 4;  // B vectors per micro-tile (64 columns)

  // ------------------------------------------------------------------ element access
  static inline int64_t esize(Elem e) { return e == Elem::kF32 ? 4 : 2; }
  static inline const void* at(const void* p, Elem e, int64_t off) { return static_cast<const char*>(p) + off * esize(e); }
  static inline void* at(void* p, Elem e, int64_t off) { return static_cast<char*>(p) + off * esize(e); }

  static inline V load_e(const void* p, Elem e, int64_t n) {
    switch (e) {
      case Elem::kF32: return Isa::template load<Elem::kF32>(p, n);
      case Elem::kF16: return Isa::template load<Elem::kF16>(p, n);
      default: return Isa::template load<Elem::kBF16>(p, n);
    }
  }
  static inline void store_e(void* p, Elem e, V v, int64_t n) {
    switch (e) {
      case Elem::kF32: Isa::template store<Elem::kF32>(p, v, n); break;
      case Elem::kF16: Isa::template store<Elem::kF16>(p, v, n); break;
      default: Isa::template store<Elem::kBF16>(p, v, n); break;
    }
  }
  static inline int64_t lanes(int64_t n, int64_t c) { return n - c < kLanes ? n - c : kLanes; }

  // One row of n elements (any type) into fp32 dst, zero-padded to a multiple of 16.
  static void load_row(const void* x, Elem e, int64_t n, float* dst) {
    for (int64_t c = 0; c < n; c += kLanes) Isa::storef(dst + c, load_e(at(x, e, c), e, lanes(n, c)));
  }

  // Rows of the next chunk to prefetch into L2 while this one computes, a few per row block of
  // chunk_rows so that the requests spread over the FMA work instead of stalling in one burst.
  struct Prefetch {
    const void* q = nullptr;  // next chunk's query rows of this head
    const void* k = nullptr;  // next key block's k and v rows (first query head only)
    const void* v = nullptr;
    int64_t nq = 0, nk = 0;
  };
  static void prefetch_rows(const void* x, Elem e, int64_t st, int64_t n, int64_t r0, int64_t r1) {
    const int64_t bytes = n * esize(e);
    for (int64_t t = r0; t < r1; ++t) {
      const char* r = static_cast<const char*>(at(x, e, t * st));
      for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(r + off, 0, 2);
    }
  }

  // dst[d * 64 + t] = x[t * st + d] for tokens t in [lo, hi) and d < n; every other token of the
  // chunk and the padding rows d in [n, round16(n)) are zero. 16 x 16 blocks through registers.
  static void load_transposed(const void* x, Elem e, int64_t st, int64_t n, int64_t lo, int64_t hi, float* dst) {
    for (int64_t tb = 0; tb < kChunk; tb += kLanes) {
      const bool empty = tb >= hi || tb + kLanes <= lo;
      for (int64_t db = 0; db < n; db += kLanes) {
        V r[kLanes];
        for (int i = 0; i < kLanes; ++i) {
          const int64_t t = tb + i;
          r[i] = !empty && t >= lo && t < hi ? load_e(at(x, e, t * st + db), e, lanes(n, db)) : Isa::zero();
        }
        if (!empty) Isa::transpose16(r);
        for (int i = 0; i < kLanes; ++i) Isa::storef(dst + (db + i) * kChunk + tb, r[i]);
      }
    }
  }

  // ------------------------------------------------------------------ the micro-kernel
  // acc[r][u] += sum_{k0 <= k < k1} A(r, k) * B[k * ldb + 16 u ...], A(r, k) = a[r * ars + k * aks].
  template <int R, int NV>
  static inline void mm(V (&acc)[R][NV], const float* a, int64_t ars, int64_t aks, const float* b, int64_t ldb,
                        int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const float* bk = b + k * ldb;
      const float* ak = a + k * aks;
      V bv[NV];
#pragma GCC unroll 4
      for (int u = 0; u < NV; ++u) bv[u] = Isa::loadf(bk + u * kLanes);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const V ar = Isa::set1(ak[r * ars]);
#pragma GCC unroll 4
        for (int u = 0; u < NV; ++u) acc[r][u] = Isa::fma(ar, bv[u], acc[r][u]);
      }
    }
  }

  template <int R, int NV>
  static inline void zero(V (&acc)[R][NV]) {
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < NV; ++u) acc[r][u] = Isa::zero();
  }

  // f.template operator()<R>(i0) over row blocks covering [0, m): blocks of 6 rows, then 4, 2, 1.
  template <class Fn>
  static inline void row_blocks(int64_t m, Fn&& f) {
    int64_t i = 0;
    for (; i + 6 <= m; i += 6) f.template operator()<6>(i);
    if (i + 4 <= m) { f.template operator()<4>(i); i += 4; }
    if (i + 2 <= m) { f.template operator()<2>(i); i += 2; }
    if (i < m) f.template operator()<1>(i);
  }

  // f.template operator()<NV>() for a runtime nv in [1, 4].
  template <class Fn>
  static inline void with_nv(int64_t nv, Fn&& f) {
    switch (nv) {
      case 1: f.template operator()<1>(); break;
      case 2: f.template operator()<2>(); break;
      case 3: f.template operator()<3>(); break;
      default: f.template operator()<4>(); break;
    }
  }

  // ------------------------------------------------------------------ features
  // Features of chunk tokens [lo, hi) (row t at x + t * st), transposed: ft[f * 64 + t], f < FF.
  // Token lanes outside [lo, hi) of the first ceil(hi / 16) vectors are zero; later vectors are
  // never read. F == 0: x already holds features (linear_attention), FF = n.
  // F > 0: u = x W + b over the n = D inputs, ft = cat(softmax(u), softmax(-u)) over F.
  static void features(const void* x, Elem e, int64_t st, int64_t n, int64_t F, int64_t lo, int64_t hi,
                       const float* W, const float* bias, float* xt, float* ut, float* ft) {
    if (F == 0) {
      load_transposed(x, e, st, n, lo, hi, ft);
      return;
    }
    load_transposed(x, e, st, n, lo, hi, xt);
    const int64_t nt = (hi + kLanes - 1) / kLanes;
    // U^T [F x 64] = W^T [F x D] X^T [D x 64] + b: A(f, d) = W[d * F + f].
    with_nv(nt, [&]<int NV>() {
      row_blocks(F, [&]<int R>(int64_t f0) {
        V acc[R][NV];
        for (int r = 0; r < R; ++r)
          for (int u = 0; u < NV; ++u) acc[r][u] = Isa::set1(bias[f0 + r]);
        mm<R, NV>(acc, W + f0, 1, F, xt, kChunk, 0, n);
        for (int r = 0; r < R; ++r)
          for (int u = 0; u < NV; ++u) Isa::storef(ut + (f0 + r) * kChunk + u * kLanes, acc[r][u]);
      });
    });
    // Softmax over f of each token lane: max / min, exponentials, sums, scale. softmax(-u) =
    // exp(min(u) - u) / sum. A NaN in u makes its sum, hence its whole column, NaN.
    for (int64_t u = 0; u < nt; ++u) {
      const int64_t off = u * kLanes;
      V mx = Isa::loadf(ut + off), mn = mx;
      for (int64_t f = 1; f < F; ++f) {
        const V x = Isa::loadf(ut + f * kChunk + off);
        mx = Isa::max(mx, x);
        mn = Isa::min(mn, x);
      }
      V sp = Isa::zero(), sn = Isa::zero();
      for (int64_t f = 0; f < F; ++f) {
        const V x = Isa::loadf(ut + f * kChunk + off);
        const V ep = Isa::exp(Isa::sub(x, mx)), en = Isa::exp(Isa::sub(mn, x));
        Isa::storef(ft + f * kChunk + off, ep);
        Isa::storef(ft + (F + f) * kChunk + off, en);
        sp = Isa::add(sp, ep);
        sn = Isa::add(sn, en);
      }
      const V ip = Isa::div(Isa::set1(1.f), sp), in = Isa::div(Isa::set1(1.f), sn);
      const int64_t klo = lo - off, khi = hi - off;  // valid lanes of this vector
      const bool full = klo <= 0 && khi >= kLanes;
      for (int64_t f = 0; f < F; ++f) {
        float* p = ft + f * kChunk + off;
        float* q = ft + (F + f) * kChunk + off;
        V a = Isa::mul(Isa::loadf(p), ip), b = Isa::mul(Isa::loadf(q), in);
        if (!full) a = Isa::keep(a, klo, khi), b = Isa::keep(b, klo, khi);
        Isa::storef(p, a);
        Isa::storef(q, b);
      }
    }
  }

  // ------------------------------------------------------------------ attention
  struct Bufs {
    float *xt, *ut, *kt, *qt, *vb, *am, *s, *z, *den, *bkt, *bvb, *ns, *ds, *bm;
    Bufs(const FwdScratch& l, float* p)
        : xt(p + l.xt), ut(p + l.ut), kt(p + l.kt), qt(p + l.qt), vb(p + l.vb), am(p + l.am), s(p + l.s), z(p + l.z),
          den(p + l.den), bkt(p + l.bkt), bvb(p + l.bvb), ns(p + l.ns), ds(p + l.ds), bm(p + l.bm) {}
  };

  // Key features and fp32 values of chunk keys [j0, L) (rows at kx, vx: key block start).
  static void load_keys(const FwdArgs& a, const FwdWork& w, const Bufs& bf, const void* kx, const void* vx,
                        int64_t j0, int64_t L) {
    const int64_t F = a.F;
    features(kx, a.elem, a.k.st, a.D, F, j0, L, F ? a.wk + w.j * a.D * F : nullptr, F ? a.bk + w.j * F : nullptr,
             bf.xt, bf.ut, bf.kt);
    for (int64_t j = j0; j < L; ++j) load_row(at(vx, a.elem, j * a.v.st), a.elem, a.Dv, bf.vb + j * a.Dvp);
  }

  // S += K^T V over keys [j0, L): A(f, j) = kt[f * 64 + j]; z += the key features' row sums.
  static void update_state(const FwdArgs& a, const Bufs& bf, int64_t j0, int64_t L) {
    const int64_t Dvp = a.Dvp;
    row_blocks(a.FF, [&]<int R>(int64_t f0) {
      for (int64_t cb = 0; cb < Dvp; cb += kMaxNV * kLanes) {
        with_nv((Dvp - cb) / kLanes, [&]<int NV>() {
          V acc[R][NV];
          for (int r = 0; r < R; ++r)
            for (int u = 0; u < NV; ++u) acc[r][u] = Isa::loadf(bf.s + (f0 + r) * Dvp + cb + u * kLanes);
          mm<R, NV>(acc, bf.kt + f0 * kChunk, kChunk, 1, bf.vb + cb, Dvp, j0, L);
          for (int r = 0; r < R; ++r)
            for (int u = 0; u < NV; ++u) Isa::storef(bf.s + (f0 + r) * Dvp + cb + u * kLanes, acc[r][u]);
        });
      }
    });
    const int64_t nt = (L + kLanes - 1) / kLanes;
    for (int64_t f = 0; f < a.FF; ++f) {
      V sum = Isa::zero();
      for (int64_t u = 0; u < nt; ++u) sum = Isa::add(sum, Isa::loadf(bf.kt + f * kChunk + u * kLanes));
      bf.z[f] += Isa::reduce_add(sum);
    }
  }

  // den[i] = q_i . z for the chunk rows (vectors along the tokens: no horizontal sums).
  static void query_dot_z(const FwdArgs& a, const Bufs& bf, int64_t L) {
    const int64_t nt = (L + kLanes - 1) / kLanes;
    for (int64_t u = 0; u < nt; ++u) {
      V acc = Isa::zero();
      for (int64_t f = 0; f < a.FF; ++f) acc = Isa::fma(Isa::set1(bf.z[f]), Isa::loadf(bf.qt + f * kChunk + u * kLanes), acc);
      Isa::storef(bf.den + u * kLanes, acc);
    }
  }

  // Softmax part of the window hybrid for the rows of chunk c0 of query head h, whose raw queries
  // are in xt (left there by features()): ns[i] = sum e_s v_s, ds[i] = sum e_s over the keys s of
  // row t = c0 + i's band (t - window, t], e_s = exp(scale q_t . k_s - m_t). Flash-style over
  // blocks of 64 band keys: scores [R x 64] = Q [R x D] K^T [D x 64] (raw keys transposed into
  // bkt), masked to each row's band, a running max per row (bm) with the sums rescaled when it
  // grows, then ns += P V. Keys outside a row's band never meet its row: those score lanes are
  // set to -inf, and the P V product gives edge keys of the band only to the rows that see them.
  static void window_band(const FwdArgs& a, const FwdWork& w, const Bufs& bf, int64_t h, int64_t c0, int64_t L) {
    const Elem e = a.elem;
    const int64_t D = a.D, Dvp = a.Dvp, W = a.window;
    const float ninf = -__builtin_inff();
    const void* kx = at(a.k.p, e, w.b * a.k.sb + w.j * a.k.sh + w.t0 * a.k.st);
    const void* vx = at(a.v.p, e, w.b * a.v.sb + w.j * a.v.sh + w.t0 * a.v.st);
    for (int64_t i = 0; i < L; ++i) {
      bf.bm[i] = ninf;
      bf.ds[i] = 0.f;
      for (int64_t c = 0; c < Dvp; c += kLanes) Isa::storef(bf.ns + i * Dvp + c, Isa::zero());
    }
    for (int64_t s0 = c0 - W + 1 > 0 ? c0 - W + 1 : 0; s0 < c0 + L; s0 += kChunk) {
      const int64_t nk = c0 + L - s0 < kChunk ? c0 + L - s0 : kChunk;
      load_transposed(at(kx, e, s0 * a.k.st), e, a.k.st, D, 0, nk, bf.bkt);
      for (int64_t j = 0; j < nk; ++j) load_row(at(vx, e, (s0 + j) * a.v.st), e, a.Dv, bf.bvb + j * Dvp);
      row_blocks(L, [&]<int R>(int64_t i0) {
        // Row r sees block keys [lo + r, hi + r) (clamped to [0, nk)): t - W < s0 + j <= t.
        const int64_t lo = c0 + i0 - W + 1 - s0, hi = c0 + i0 + 1 - s0;
        if (hi + R - 1 <= 0 || lo >= nk) return;
        const int64_t kmax = hi + R - 1 < nk ? hi + R - 1 : nk;  // keys past the last row's band end
        with_nv((kmax + kLanes - 1) / kLanes, [&]<int NV>() {
          V acc[R][NV];
          zero(acc);
          mm<R, NV>(acc, bf.xt + i0, 1, kChunk, bf.bkt, kChunk, 0, D);
          for (int r = 0; r < R; ++r) {
            float* p = bf.am + r * kChunk;
            const int64_t i = i0 + r;
            V mx = Isa::set1(ninf);
            for (int u = 0; u < NV; ++u) {
              acc[r][u] = Isa::mask(Isa::mul(acc[r][u], Isa::set1(a.scale)), lo + r - u * kLanes, hi + r - u * kLanes, ninf);
              mx = Isa::max(mx, acc[r][u]);
            }
            if ((lo + r > 0 ? lo + r : 0) >= (hi + r < nk ? hi + r : nk)) continue;  // no key of the band here
            // A NaN score makes the row NaN: through m (NaN wins here) or through its exp.
            const float mt = Isa::reduce_max(mx), m_old = bf.bm[i];
            const float m_new = mt > m_old || mt != mt ? mt : m_old;
            V sum = Isa::zero();
            for (int u = 0; u < NV; ++u) {
              const V x = Isa::exp(Isa::sub(acc[r][u], Isa::set1(m_new)));
              Isa::storef(p + u * kLanes, x);
              sum = Isa::add(sum, x);
            }
            const float rescale = m_old == m_new ? 1.f : __builtin_expf(m_old - m_new);  // 0 for the first keys
            bf.ds[i] = bf.ds[i] * rescale + Isa::reduce_add(sum);
            bf.bm[i] = m_new;
            if (rescale != 1.f)
              for (int64_t c = 0; c < Dvp; c += kLanes)
                Isa::storef(bf.ns + i * Dvp + c, Isa::mul(Isa::loadf(bf.ns + i * Dvp + c), Isa::set1(rescale)));
          }
        });
        // ns += P V: keys [lo + R - 1, hi) are in every row's band (one micro-kernel call); the
        // others, [lo, lo + R - 1) and [hi, hi + R - 1), only in some rows' (their own loop).
        const int64_t all_lo = lo + R - 1 > 0 ? lo + R - 1 : 0, all_hi = hi < nk ? hi : nk;
        const int64_t any_lo = lo > 0 ? lo : 0, any_hi = hi + R - 1 < nk ? hi + R - 1 : nk;
        for (int64_t cb = 0; cb < Dvp; cb += kMaxNV * kLanes) {
          with_nv((Dvp - cb) / kLanes, [&]<int NV>() {
            V acc[R][NV];
            for (int r = 0; r < R; ++r)
              for (int u = 0; u < NV; ++u) acc[r][u] = Isa::loadf(bf.ns + (i0 + r) * Dvp + cb + u * kLanes);
            if (all_lo < all_hi) mm<R, NV>(acc, bf.am, kChunk, 1, bf.bvb + cb, Dvp, all_lo, all_hi);
            for (int64_t j = any_lo; j < any_hi; ++j) {
              if (j >= all_lo && j < all_hi) continue;
              V bv[NV];
              for (int u = 0; u < NV; ++u) bv[u] = Isa::loadf(bf.bvb + j * Dvp + cb + u * kLanes);
#pragma GCC unroll 8
              for (int r = 0; r < R; ++r) {
                if (j < lo + r || j >= hi + r) continue;
                const V pr = Isa::set1(bf.am[r * kChunk + j]);
                for (int u = 0; u < NV; ++u) acc[r][u] = Isa::fma(pr, bv[u], acc[r][u]);
              }
            }
            for (int r = 0; r < R; ++r)
              for (int u = 0; u < NV; ++u) Isa::storef(bf.ns + (i0 + r) * Dvp + cb + u * kLanes, acc[r][u]);
          });
        }
      });
    }
  }

  // Output rows of one chunk (tokens c0 + [0, L)) for query head h, whose features are in qt.
  // Causal: keys [j0, i] of the (shifted) key block in kt / vb are visible to row i.
  static void chunk_rows(const FwdArgs& a, const FwdWork& w, const Bufs& bf, int64_t h, int64_t c0, int64_t L,
                         int64_t j0, const Prefetch& pf) {
    const int64_t FF = a.FF, Dvp = a.Dvp, Dv = a.Dv;
    const bool causal = a.causal, hybrid = a.window > 0;
    const float alpha = a.alpha ? a.alpha[h] : 1.f, beta = a.beta ? a.beta[h] : 1.f;
    query_dot_z(a, bf, L);
    if (hybrid) window_band(a, w, bf, h, c0, L);
    row_blocks(L, [&]<int R>(int64_t i0) {
      float rs[R];  // row sums of the masked scores
      for (int r = 0; r < R; ++r) rs[r] = 0.f;
      if (causal && j0 < i0 + R) {
        // A = Q K^T for rows [i0, i0 + R), key vectors up to the diagonal; keys outside [j0, i]
        // are set to zero (not multiplied: K may hold NaN there).
        with_nv((i0 + R - 1) / kLanes + 1, [&]<int NV>() {
          V acc[R][NV];
          zero(acc);
          mm<R, NV>(acc, bf.qt + i0, 1, kChunk, bf.kt, kChunk, 0, FF);
          for (int r = 0; r < R; ++r) {
            V sum = Isa::zero();
            for (int u = 0; u < NV; ++u) {
              const V x = Isa::keep(acc[r][u], j0 - u * kLanes, i0 + r + 1 - u * kLanes);
              Isa::storef(bf.am + r * kChunk + u * kLanes, x);
              sum = Isa::add(sum, x);
            }
            rs[r] = Isa::reduce_add(sum);
          }
        });
      }
      if (pf.q) prefetch_rows(pf.q, a.elem, a.q.st, a.D, i0, i0 + R < pf.nq ? i0 + R : pf.nq);
      if (pf.k) {
        prefetch_rows(pf.k, a.elem, a.k.st, a.D, i0, i0 + R < pf.nk ? i0 + R : pf.nk);
        prefetch_rows(pf.v, a.elem, a.v.st, a.Dv, i0, i0 + R < pf.nk ? i0 + R : pf.nk);
      }
      float inv[R], cl[R];  // out = (cl * num_linear + beta * ns) * inv
      for (int r = 0; r < R; ++r) {
        const float den = bf.den[i0 + r] + rs[r];
        cl[r] = hybrid ? alpha : 1.f;
        inv[r] = 1.f / (hybrid ? beta * bf.ds[i0 + r] + alpha * den + a.eps : den + a.eps);
      }
      void* orow = at(a.out, a.elem, ((w.b * a.Hq + h) * a.T + w.t0 + c0 + i0) * Dv);
      for (int64_t cb = 0; cb < Dvp; cb += kMaxNV * kLanes) {
        with_nv((Dvp - cb) / kLanes, [&]<int NV>() {
          V acc[R][NV];
          zero(acc);
          mm<R, NV>(acc, bf.qt + i0, 1, kChunk, bf.s + cb, Dvp, 0, FF);  // Q S: the keys before the block
          if (causal) {
            mm<R, NV>(acc, bf.am, kChunk, 1, bf.vb + cb, Dvp, j0, i0);  // keys below the row block
            // Diagonal block: key i0 + jj is visible to rows r >= jj only.
#pragma GCC unroll 8
            for (int jj = 0; jj < R; ++jj) {
              const int64_t j = i0 + jj;
              if (j < j0) continue;
              V bv[NV];
              for (int u = 0; u < NV; ++u) bv[u] = Isa::loadf(bf.vb + j * Dvp + cb + u * kLanes);
#pragma GCC unroll 8
              for (int r = jj; r < R; ++r) {
                const V ar = Isa::set1(bf.am[r * kChunk + j]);
                for (int u = 0; u < NV; ++u) acc[r][u] = Isa::fma(ar, bv[u], acc[r][u]);
              }
            }
          }
          for (int r = 0; r < R; ++r) {
            const float* ns = bf.ns + (i0 + r) * Dvp + cb;
            for (int u = 0; u < NV; ++u) {
              V x = Isa::mul(acc[r][u], Isa::set1(cl[r]));
              if (hybrid) x = Isa::fma(Isa::set1(beta), Isa::loadf(ns + u * kLanes), x);
              const int64_t c = cb + u * kLanes;
              store_e(at(orow, a.elem, r * Dv + c), a.elem, Isa::mul(x, Isa::set1(inv[r])), lanes(Dv, c));
            }
          }
        });
      }
    });
  }

  static void work(const FwdArgs& a, const FwdWork& w) {
    const FwdScratch layout(a);
    const Bufs bf(layout, w.scratch);
    const Elem e = a.elem;
    const int64_t FF = a.FF, Dv = a.Dv, Dvp = a.Dvp, state = w.n * a.Hkv + w.j;
    for (int64_t f = 0; f < FF; ++f) {
      float* row = bf.s + f * Dvp;
      if (a.S0) load_row(a.S0 + (state * FF + f) * Dv, Elem::kF32, Dv, row);
      else for (int64_t c = 0; c < Dvp; c += kLanes) Isa::storef(row + c, Isa::zero());
      bf.z[f] = a.z0 ? a.z0[state * FF + f] : 0.f;
    }
    const void* kx = at(a.k.p, e, w.b * a.k.sb + w.j * a.k.sh + w.t0 * a.k.st);
    const void* vx = at(a.v.p, e, w.b * a.v.sb + w.j * a.v.sh + w.t0 * a.v.st);
    auto query_features = [&](int64_t h, int64_t c0, int64_t L) {
      const void* qx = at(a.q.p, e, w.b * a.q.sb + h * a.q.sh + (w.t0 + c0) * a.q.st);
      features(qx, e, a.q.st, a.D, a.F, 0, L, a.F ? a.wq + h * a.D * a.F : nullptr, a.F ? a.bq + h * a.F : nullptr,
               bf.xt, bf.ut, bf.qt);
    };
    // The rows chunk c0 + 64 will read: query head g's, and the key block starting at nkb (keys
    // before the sequence start left out; nkb <= -64: no keys).
    auto next_rows = [&](int64_t g, int64_t c0, int64_t nkb) {
      Prefetch pf;
      const int64_t c1 = c0 + kChunk, nL = w.len - c1 < kChunk ? w.len - c1 : kChunk;
      if (nL <= 0) return pf;
      pf.q = at(a.q.p, e, w.b * a.q.sb + (w.j * a.G + g) * a.q.sh + (w.t0 + c1) * a.q.st), pf.nq = nL;
      if (nkb > -kChunk) {
        const int64_t lo = nkb < 0 ? -nkb : 0;
        pf.k = at(kx, e, (nkb + lo) * a.k.st), pf.v = at(vx, e, (nkb + lo) * a.v.st), pf.nk = nL - lo;
      }
      return pf;
    };
    if (!a.causal) {  // the whole sequence's state first, then every row reads it
      for (int64_t c0 = 0; c0 < w.len; c0 += kChunk) {
        const int64_t L = w.len - c0 < kChunk ? w.len - c0 : kChunk;
        load_keys(a, w, bf, at(kx, e, c0 * a.k.st), at(vx, e, c0 * a.v.st), 0, L);
        update_state(a, bf, 0, L);
      }
      for (int64_t c0 = 0; c0 < w.len; c0 += kChunk) {
        const int64_t L = w.len - c0 < kChunk ? w.len - c0 : kChunk;
        for (int64_t g = w.g0; g < w.g1; ++g) {
          query_features(w.j * a.G + g, c0, L);
          chunk_rows(a, w, bf, w.j * a.G + g, c0, L, 0, next_rows(g, c0, -kChunk));
        }
      }
    } else {
      for (int64_t c0 = 0; c0 < w.len; c0 += kChunk) {
        const int64_t L = w.len - c0 < kChunk ? w.len - c0 : kChunk;
        // Key block [c0 - window, c0 - window + L); keys before the sequence start are absent.
        const int64_t kb = c0 - a.window, j0 = kb < 0 ? (-kb < L ? -kb : L) : 0;
        if (j0 < L) load_keys(a, w, bf, at(kx, e, kb * a.k.st), at(vx, e, kb * a.v.st), j0, L);
        for (int64_t g = w.g0; g < w.g1; ++g) {
          query_features(w.j * a.G + g, c0, L);
          chunk_rows(a, w, bf, w.j * a.G + g, c0, L, j0, next_rows(g, c0, g == w.g0 ? kb + kChunk : -1));
        }
        if (j0 < L) update_state(a, bf, j0, L);
      }
    }
    if (a.ST && w.g0 == 0) {
      for (int64_t f = 0; f < FF; ++f) {
        for (int64_t c = 0; c < Dv; c += kLanes)
          Isa::template store<Elem::kF32>(a.ST + (state * FF + f) * Dv + c, Isa::loadf(bf.s + f * Dvp + c), lanes(Dv, c));
        a.zT[state * FF + f] = bf.z[f];
      }
    }
  }

  // ------------------------------------------------------------------ feature map entry
  static void fmap_chunk(const FmapArgs& a, int64_t b, int64_t h, int64_t t0, int64_t len, float* scratch) {
    const int64_t D = a.D, F = a.F, FF = 2 * F;
    float* xt = scratch;
    float* ut = xt + round16(D) * kChunk;
    float* ft = ut + F * kChunk;
    features(at(a.x.p, a.elem, b * a.x.sb + h * a.x.sh + t0 * a.x.st), a.elem, a.x.st, D, F, 0, len, a.w + h * D * F,
             a.b + h * F, xt, ut, ft);
    void* out = at(a.out, a.elem, ((b * a.H + h) * a.T + t0) * FF);
    for (int64_t tb = 0; tb < len; tb += kLanes) {
      for (int64_t fb = 0; fb < FF; fb += kLanes) {
        V r[kLanes];
        for (int i = 0; i < kLanes; ++i) r[i] = fb + i < FF ? Isa::loadf(ft + (fb + i) * kChunk + tb) : Isa::zero();
        Isa::transpose16(r);
        for (int64_t i = 0; i < kLanes && tb + i < len; ++i) store_e(at(out, a.elem, (tb + i) * FF + fb), a.elem, r[i], lanes(FF, fb));
      }
    }
  }

  // ------------------------------------------------------------------ decode
  // phi(x) of one row into pos[Fp] | neg[Fp] (softmax(u), softmax(-u); padding lanes zero).
  static void phi_row(const void* x, Elem e, int64_t D, int64_t F, const float* W, const float* bias, float* xrow,
                      float* pos, float* neg) {
    const int64_t Fp = round16(F);
    load_row(x, e, D, xrow);
    for (int64_t c = 0; c < Fp; c += kLanes) {
      V acc = Isa::template load<Elem::kF32>(bias + c, lanes(F, c));
      for (int64_t d = 0; d < D; ++d) acc = Isa::fma(Isa::set1(xrow[d]), Isa::template load<Elem::kF32>(W + d * F + c, lanes(F, c)), acc);
      Isa::storef(pos + c, Isa::mask(acc, 0, lanes(F, c), -__builtin_inff()));
      Isa::storef(neg + c, Isa::mask(Isa::sub(Isa::zero(), acc), 0, lanes(F, c), -__builtin_inff()));
    }
    float* halves[2] = {pos, neg};
    for (float* p : halves) {
      V mx = Isa::loadf(p);
      for (int64_t c = kLanes; c < Fp; c += kLanes) mx = Isa::max(mx, Isa::loadf(p + c));
      const V m = Isa::set1(Isa::reduce_max(mx));
      V sum = Isa::zero();
      for (int64_t c = 0; c < Fp; c += kLanes) {
        const V ex = Isa::keep(Isa::exp(Isa::sub(Isa::loadf(p + c), m)), 0, lanes(F, c));
        Isa::storef(p + c, ex);
        sum = Isa::add(sum, ex);
      }
      const V inv = Isa::set1(1.f / Isa::reduce_add(sum));
      for (int64_t c = 0; c < Fp; c += kLanes) Isa::storef(p + c, Isa::mul(Isa::loadf(p + c), inv));
    }
  }

  static void decode_head(const DecodeArgs& a, int64_t b, int64_t j, float* scratch) {
    const Elem e = a.elem;
    const int64_t D = a.D, F = a.F, FF = 2 * F, Fp = round16(F), Dv = a.Dv;
    float* xrow = scratch;
    float* pk = xrow + round16(D);  // [pos | neg], 2 Fp
    float* pq = pk + 2 * Fp;
    float* vrow = pq + 2 * Fp;
    auto feat = [Fp, F](const float* p, int64_t f) { return f < F ? p[f] : p[Fp + f - F]; };
    float* S = a.S + (b * a.Hkv + j) * FF * Dv;
    float* z = a.z + (b * a.Hkv + j) * FF;
    phi_row(at(a.k.p, e, b * a.k.sb + j * a.k.sh), e, D, F, a.wk + j * D * F, a.bk + j * F, xrow, pk, pk + Fp);
    load_row(at(a.v.p, e, b * a.v.sb + j * a.v.sh), e, Dv, vrow);
    for (int64_t f = 0; f < FF; ++f) {
      const V p = Isa::set1(feat(pk, f));
      for (int64_t c = 0; c < Dv; c += kLanes) {
        float* s = S + f * Dv + c;
        const int64_t n = lanes(Dv, c);
        Isa::template store<Elem::kF32>(s, Isa::fma(p, Isa::loadf(vrow + c), Isa::template load<Elem::kF32>(s, n)), n);
      }
      z[f] += feat(pk, f);
    }
    for (int64_t g = 0; g < a.G; ++g) {
      const int64_t h = j * a.G + g;
      phi_row(at(a.q.p, e, b * a.q.sb + h * a.q.sh), e, D, F, a.wq + h * D * F, a.bq + h * F, xrow, pq, pq + Fp);
      for (int64_t c = 0; c < Dv; c += kLanes) Isa::storef(vrow + c, Isa::zero());  // the numerator
      float den = 0.f;
      for (int64_t f = 0; f < FF; ++f) {
        const float q = feat(pq, f);
        const V p = Isa::set1(q);
        for (int64_t c = 0; c < Dv; c += kLanes)
          Isa::storef(vrow + c, Isa::fma(p, Isa::template load<Elem::kF32>(S + f * Dv + c, lanes(Dv, c)), Isa::loadf(vrow + c)));
        den += q * z[f];
      }
      const V inv = Isa::set1(1.f / (den + a.eps));
      void* out = at(a.out, e, (b * a.Hkv * a.G + h) * Dv);
      for (int64_t c = 0; c < Dv; c += kLanes) store_e(at(out, e, c), e, Isa::mul(Isa::loadf(vrow + c), inv), lanes(Dv, c));
    }
  }
};
