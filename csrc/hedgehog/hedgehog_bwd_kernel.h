// The Hedgehog backward CPU kernel, written once over an `Isa` struct and compiled per ISA: include
// this after defining `Isa` inside an anonymous namespace (see hedgehog_cpu_backward_avx512.cpp).
// Isa derives from Vec16 (common/cpu_vec16_*.h: load<E>/store<E> of n <= 16 lanes, transpose16) and
// adds maxv, exp and fill_tail(v, n, x) (lanes >= n set to x).
//
// Math (pyfast/reference/hedgehog.py; per query head h, its KV head j, features Q = phi_q(q),
// K = phi_k(k)). Forward: num_t = Q_t S_t, den_t = Q_t . z_t + eps, out_t = num_t / den_t (the hybrid
// adds the window part to both). With g_t = grad_out_t:
//     dnum_t = r_t g_t, dden_t = k_t,   r_t = 1 / den_t, k_t = -(g_t . num_t) / den_t^2
// so only den_t and gnum_t = g_t . num_t are needed, never num_t itself. Then (z as one more value
// column whose "value" is 1 and whose gradient is k_t):
//     dQ_t = r_t (g_t S_t^T) + k_t z_t,   dS_s = sum_{t >= s} Q_t^T r_t g_t (+ grad_S)
//     dK_s = dS_s v_s + dz_s,  dv_s = K_s dS_s,  dz_s = sum_{t >= s} k_t Q_t (+ grad_z)
// Causal, chunked (64 tokens): a forward pre-pass recomputes K per chunk and keeps the state entering
// each chunk (S^T, z) and the chunk's K ("slots"); the reverse pass then does everything else chunk
// by chunk, last first, with the running dS, dz of the later chunks. Per chunk, R = G S^T serves gnum and dQ; the
// causal parts inside the chunk are masked [C, C] matrices M = Q K^T and P0 = G V^T:
//     den_t += sum_s M_ts, gnum_t += sum_s M_ts P0_ts, dQ += P K, dK += P^T Q, dv += M^T (r g)
// with P_ts = r_t P0_ts + k_t (s <= t). Non-causal: one state for the whole sequence, then a query
// pass (dQ, dS) and a key pass (dK, dv). The feature map's gradient: phi = [p, n] = [softmax(u),
// softmax(-u)], du = p (dp - p.dp) - n (dn - n.dn), dx = du W^T, dW += x^T du, db += sum du.
// Window hybrid: the linear part of query t reads the keys s <= t - window, i.e. linear index
// i = t - window over the keys [0, T - window); its gradients carry alpha. The window part is done
// row by row (band_row).
//
// Cost, causal, multiply-adds per token at D = F = Dv = 64 (2F = 128 features): the forward does
// ~31k (features 8k, intra-chunk Q K^T and A V 6k, Q S and the state update 16k); this backward
// ~82k = 2.7x: the pre-pass 12k (key features, state update), query features 4k, five masked
// intra-chunk products 17k (M, P0, P K, M^T (r G), P^T Q), four state products 33k (R, dS, dK, dv)
// and the feature-map gradients 16k (dx and dW of q and k). Even with the chunk states stored by
// the forward (no pre-pass, key features then computed in the reverse pass) it would be 76k = 2.45x.
// Measured (2-core Xeon VM, B1 H8 T = 8k, 2 threads): the backward takes ~2.9x the forward (both
// ~20% page faults on their fresh outputs, 48 vs 16 MiB), so forward+backward ~3.9x. CPU time with
// one part switched off at a time (results wrong, timing only): pre-pass 16%, feature-map gradients
// 17.5%, intra-chunk products 11.5%, feature maps ~10%, the rest (state products, row loads) 38%:
// each part close to its share of the multiply-adds, the backward ~8% less efficient per
// multiply-add than the forward.

using V = typename Isa::V;

#include "common/cpu_gemm.h"  // Gemm::run (register-blocked fp32 products), Tri

inline V vload(const float* p, int64_t n) { return Isa::template load<Elem::kF32>(p, n); }
inline void vstore(float* p, const V& v, int64_t n) { Isa::template store<Elem::kF32>(p, v, n); }

// dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols; zero for rows <= r < ldd (ldd a
// multiple of kLanes): 16 x 16 blocks transposed in registers (shuffles, not a gather per column).
inline void transpose(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst, int64_t ldd) {
  V b[kLanes];
  for (int64_t r0 = 0; r0 < ldd; r0 += kLanes)
    for (int64_t c0 = 0; c0 < cols; c0 += kLanes) {
      for (int64_t i = 0; i < kLanes; ++i) b[i] = r0 + i < rows ? vload(src + (r0 + i) * lds + c0, cols - c0) : Isa::zero();
      Isa::transpose16(b);
      for (int64_t c = 0; c < kLanes && c0 + c < cols; ++c) Isa::storef(dst + (c0 + c) * ldd + r0, b[c]);
    }
}

inline float dot(const float* a, const float* b, int64_t n) {  // n a multiple of kLanes
  V s = Isa::zero();
  for (int64_t c = 0; c < n; c += kLanes) s = Isa::fma(Isa::loadf(a + c), Isa::loadf(b + c), s);
  return Isa::reduce_add(s);
}

// y[0, n) (+)= a * x (y an output row of n floats, x a padded scratch row)
inline void axpy_row(float* y, float a, const float* x, int64_t n, bool add = true) {
  const V av = Isa::set1(a);
  for (int64_t c = 0; c < n; c += kLanes)
    vstore(y + c, add ? Isa::fma(av, Isa::loadf(x + c), vload(y + c, n - c)) : Isa::mul(av, Isa::loadf(x + c)), n - c);
}

template <Elem E>
struct Task {
  using T = typename ElemT<E>::T;
  static constexpr int64_t C = kChunk;

  const Problem& p;
  const Layout& l;
  const Partials& acc;
  float* sp;
  int64_t n, j, b, t0, len, G, w, nlin;
  int64_t D, Dp, F, Fp, F2, F2p, Dv, Dvp;

  Task(const Problem& p_, const Layout& l_, int64_t n_, int64_t j_, float* scratch, const Partials& acc_)
      : p(p_), l(l_), acc(acc_), sp(scratch), n(n_), j(j_) {
    b = p.cu ? 0 : n;
    t0 = p.cu ? p.cu[n] : 0;
    len = p.cu ? p.cu[n + 1] - p.cu[n] : p.T;
    G = l.G, w = p.window, nlin = len > w ? len - w : 0;
    D = p.D, Dp = l.Dp, F = p.F, Fp = l.Fp, F2 = p.F2, F2p = l.F2p, Dv = p.Dv, Dvp = l.Dvp;
  }

  float* buf(int64_t off) const { return sp + off; }
  int64_t chunk_rows(int64_t c) const { return nlin - c * C < C ? nlin - c * C : C; }  // linear rows of chunk c
  const T* in_row(const Rows& r, int64_t h, int64_t tok) const {
    return static_cast<const T*>(r.p) + b * r.sb + h * r.sh + tok * r.st;
  }
  float* out_row(float* base, int64_t H, int64_t h, int64_t tok, int64_t width) const {
    return base + ((b * H + h) * p.T + tok) * width;
  }
  float alpha(int64_t h) const { return w > 0 && p.alpha ? p.alpha[h] : 1.f; }
  float beta(int64_t h) const { return p.beta ? p.beta[h] : 1.f; }

  // nr rows of `width` elements from token tok of head h, as fp32 rows of ld (zero-padded).
  void load(const Rows& r, int64_t h, int64_t tok, int64_t nr, int64_t width, float* dst, int64_t ld) const {
    for (int64_t i = 0; i < nr; ++i) {
      const T* s = in_row(r, h, tok + i);
      for (int64_t c = 0; c < ld; c += kLanes)
        Isa::storef(dst + i * ld + c, c < width ? Isa::template load<E>(s + c, width - c) : Isa::zero());
    }
  }

  // f[r] = [softmax(u_r), softmax(-u_r), 0...] with u = x w + bias, for nr rows of x [., Dp].
  void phi(const float* x, int64_t nr, const float* wt, const float* bias, float* f) const {
    float* u = buf(l.u);
    Gemm::run(nr, Fp / kLanes, D, x, Dp, 1, wt, Fp, u, Fp, false);
    const float inf = __builtin_inff();
    for (int64_t r = 0; r < nr; ++r) {
      float* ur = u + r * Fp;
      float* fr = f + r * F2p;
      V mx = Isa::set1(-inf), mn = Isa::set1(-inf);
      for (int64_t c = 0; c < Fp; c += kLanes) {
        V x = Isa::loadf(ur + c);
        if (bias) x = Isa::add(x, Isa::loadf(bias + c));
        Isa::storef(ur + c, x);
        mx = Isa::maxv(mx, Isa::fill_tail(x, F - c, -inf));
        mn = Isa::maxv(mn, Isa::fill_tail(Isa::sub(Isa::zero(), x), F - c, -inf));
      }
      const V m1 = Isa::set1(Isa::reduce_max(mx)), m2 = Isa::set1(Isa::reduce_max(mn));
      V sp_ = Isa::zero(), sn = Isa::zero();
      for (int64_t c = 0; c < Fp; c += kLanes) {
        const V x = Isa::loadf(ur + c);
        const V ep = Isa::exp(Isa::fill_tail(Isa::sub(x, m1), F - c, -inf));
        const V en = Isa::exp(Isa::fill_tail(Isa::sub(Isa::sub(Isa::zero(), x), m2), F - c, -inf));
        vstore(fr + c, ep, F - c);
        vstore(fr + F + c, en, F - c);
        sp_ = Isa::add(sp_, ep), sn = Isa::add(sn, en);
      }
      const V ip = Isa::set1(1.f / Isa::reduce_add(sp_)), in = Isa::set1(1.f / Isa::reduce_add(sn));
      for (int64_t c = 0; c < F; c += kLanes) {
        vstore(fr + c, Isa::mul(vload(fr + c, F - c), ip), F - c);
        vstore(fr + F + c, Isa::mul(vload(fr + F + c, F - c), in), F - c);
      }
      for (int64_t c = 2 * F; c < F2p; ++c) fr[c] = 0.f;
    }
  }

  // du[r] = p (dp - p.dp) - n (dn - n.dn) for features f = [p, n] and their gradient df.
  void phi_grad(const float* f, const float* df, int64_t nr, float* du) const {
    for (int64_t r = 0; r < nr; ++r) {
      const float* fr = f + r * F2p;
      const float* dr = df + r * F2p;
      V a = Isa::zero(), bb = Isa::zero();
      for (int64_t c = 0; c < F; c += kLanes) {
        a = Isa::fma(vload(fr + c, F - c), vload(dr + c, F - c), a);
        bb = Isa::fma(vload(fr + F + c, F - c), vload(dr + F + c, F - c), bb);
      }
      const V s1 = Isa::set1(Isa::reduce_add(a)), s2 = Isa::set1(Isa::reduce_add(bb));
      for (int64_t c = 0; c < Fp; c += kLanes) {
        const V pv = vload(fr + c, F - c), dp = vload(dr + c, F - c);
        const V nv = vload(fr + F + c, F - c), dn = vload(dr + F + c, F - c);
        Isa::storef(du + r * Fp + c, Isa::sub(Isa::mul(pv, Isa::sub(dp, s1)), Isa::mul(nv, Isa::sub(dn, s2))));
      }
    }
  }

  // Features of query head h (into qf; raw rows into xq) for nr tokens from tok.
  void q_features(int64_t h, int64_t tok, int64_t nr) const {
    if (!p.feature_map) return load(p.q, h, tok, nr, F2, buf(l.qf), F2p);
    load(p.q, h, tok, nr, D, buf(l.xq), Dp);
    phi(buf(l.xq), nr, p.wq + h * D * Fp, p.bq ? p.bq + h * Fp : nullptr, buf(l.qf));
  }
  void k_features(int64_t tok, int64_t nr, float* kf) const {
    if (!p.feature_map) return load(p.k, j, tok, nr, F2, kf, F2p);
    load(p.k, j, tok, nr, D, buf(l.xk), Dp);
    phi(buf(l.xk), nr, p.wk + j * D * Fp, p.bk ? p.bk + j * Fp : nullptr, kf);
  }

  // Feature gradient df [nr, F2p] of rows x (features f) back into dx rows (stored to out [., D], or
  // added to it with the window part, which also writes those rows), dW [D, Fp] and db [Fp].
  void features_backward(const float* x, const float* f, const float* df, int64_t nr, const float* wt, float* out,
                          float* dw, float* db) const {
    const bool add = w > 0;
    if (!p.feature_map) {
      for (int64_t r = 0; r < nr; ++r) axpy_row(out + r * D, 1.f, df + r * F2p, D, add);
      return;
    }
    float* du = buf(l.du);
    float* dx = buf(l.dx);
    phi_grad(f, df, nr, du);
    Gemm::run(nr, Dp / kLanes, F, du, Fp, 1, wt, Dp, dx, Dp, false);        // dx = du W^T   [nr, F] @ [F, D]
    for (int64_t r = 0; r < nr; ++r) axpy_row(out + r * D, 1.f, dx + r * Dp, D, add);
    Gemm::run(D, Fp / kLanes, nr, x, 1, Dp, du, Fp, dw, Fp, true);          // dW += x^T du  [D, nr] @ [nr, F]
    if (db)
      for (int64_t r = 0; r < nr; ++r)
        for (int64_t c = 0; c < Fp; c += kLanes) Isa::storef(db + c, Isa::add(Isa::loadf(db + c), Isa::loadf(du + r * Fp + c)));
  }

  // Zero M[t][s] for s > t (the whole C-wide row: Tri::kOutLower leaves later vectors unwritten, and
  // the kKLower / kKUpper products read up to the end of their row block).
  static void mask_upper(float* m, int64_t nr) {
    for (int64_t t = 0; t < nr; ++t) {
      float* row = m + t * C;
      const int64_t c0 = t / kLanes * kLanes;
      Isa::storef(row + c0, Isa::fill_tail(Isa::loadf(row + c0), t - c0 + 1, 0.f));
      for (int64_t c = c0 + kLanes; c < C; c += kLanes) Isa::storef(row + c, Isa::zero());
    }
  }

  // ------------------------------------------------------------------ window part (hybrid)

  // Query row `rel` (segment-relative) of head h: the window softmax part forward, the combination
  // with the linear part (dl = its den, gl = its g.num), then the window part's gradients into dq,
  // dk, dv and the alpha/beta sums. x: the raw q row, g: the grad_out row (fp32, padded).
  // Returns (r, k) = (1 / den, -gnum / den^2) of the row.
  std::pair<float, float> band_row(int64_t h, int64_t rel, const float* x, const float* g, float dl, float gl) const {
    const int64_t lo = rel - w + 1 > 0 ? rel - w + 1 : 0, nb = rel - lo + 1;
    float* sc = buf(l.sc);
    float* e = buf(l.e);
    float* gv = buf(l.gv);
    float* qs = buf(l.qs);
    float* dqr = buf(l.dqrow);
    const V sv = Isa::set1(p.scale);
    for (int64_t c = 0; c < Dp; c += kLanes) Isa::storef(qs + c, Isa::mul(Isa::loadf(x + c), sv));
    float mx = -__builtin_inff();
    for (int64_t i = 0; i < nb; ++i) {
      const T* kr = in_row(p.k, j, t0 + lo + i);
      V a = Isa::zero();
      for (int64_t c = 0; c < D; c += kLanes) a = Isa::fma(Isa::loadf(qs + c), Isa::template load<E>(kr + c, D - c), a);
      sc[i] = Isa::reduce_add(a);
      mx = sc[i] > mx ? sc[i] : mx;
    }
    V ds = Isa::zero(), gs = Isa::zero();
    for (int64_t i = 0; i < nb; ++i) {
      const T* vr = in_row(p.v, j, t0 + lo + i);
      V a = Isa::zero();
      for (int64_t c = 0; c < Dv; c += kLanes) a = Isa::fma(Isa::loadf(g + c), Isa::template load<E>(vr + c, Dv - c), a);
      gv[i] = Isa::reduce_add(a);
    }
    for (int64_t i = 0; i < nb; i += kLanes) {
      const V ev = Isa::exp(Isa::fill_tail(Isa::sub(vload(sc + i, nb - i), Isa::set1(mx)), nb - i, -__builtin_inff()));
      vstore(e + i, ev, nb - i);
      ds = Isa::add(ds, ev);
      gs = Isa::fma(ev, vload(gv + i, nb - i), gs);
    }
    const float den_s = Isa::reduce_add(ds), gnum_s = Isa::reduce_add(gs);
    const float al = alpha(h), be = beta(h);
    const float den = be * den_s + al * dl + p.eps, gnum = be * gnum_s + al * gl;
    const float r0 = 1.f / den, k0 = -gnum * r0 * r0;
    // d out / d beta . g = gnum_s / den - gnum den_s / den^2, written without the cancellation of the
    // two terms (which are equal up to eps when there is no linear part); alpha likewise.
    const float r2 = r0 * r0;
    acc.dalpha[h] += (gl * (be * den_s + p.eps) - be * gnum_s * dl) * r2;
    acc.dbeta[h] += (gnum_s * (al * dl + p.eps) - al * gl * den_s) * r2;
    // dsc_i = e_i de_i - [sc_i is the max] sum_i e_i de_i / ties, de_i = beta (r0 g.v_i + k0): the
    // exponent is sc_i - m_t and m_t = max_i sc_i (torch.amax splits its gradient over ties).
    float tot = 0.f;
    int64_t ties = 0;
    for (int64_t i = 0; i < nb; ++i) {
      gv[i] = e[i] * be * (r0 * gv[i] + k0);
      tot += gv[i];
      ties += sc[i] == mx;
    }
    const float corr = ties ? tot / static_cast<float>(ties) : 0.f;
    for (int64_t c = 0; c < Dp; c += kLanes) Isa::storef(dqr + c, Isa::zero());
    for (int64_t i = 0; i < nb; ++i) {
      const float dsc = gv[i] - (sc[i] == mx ? corr : 0.f);
      const T* kr = in_row(p.k, j, t0 + lo + i);
      const V dv = Isa::set1(dsc);
      for (int64_t c = 0; c < D; c += kLanes)
        Isa::storef(dqr + c, Isa::fma(dv, Isa::template load<E>(kr + c, D - c), Isa::loadf(dqr + c)));
      axpy_row(out_row(p.dk, p.Hkv, j, t0 + lo + i, D), dsc, qs, D);
      axpy_row(out_row(p.dv, p.Hkv, j, t0 + lo + i, Dv), be * e[i] * r0, g, Dv);
    }
    axpy_row(out_row(p.dq, p.Hq, h, t0 + rel, D), p.scale, dqr, D);
    return {r0, k0};
  }

  // Rows [0, min(window, len)) have no linear part: the window part only.
  void prologue() const {
    const int64_t rows = w < len ? w : len;
    for (int64_t r0 = 0; r0 < rows; r0 += C) {
      const int64_t nr = rows - r0 < C ? rows - r0 : C;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = j * G + g;
        load(p.q, h, t0 + r0, nr, D, buf(l.xq), Dp);
        load(p.go, h, t0 + r0, nr, Dv, buf(l.gr), Dvp);
        for (int64_t t = 0; t < nr; ++t) band_row(h, r0 + t, buf(l.xq) + t * Dp, buf(l.gr) + t * Dvp, 0.f, 0.f);
      }
    }
  }

  // ------------------------------------------------------------------ linear part

  // S^T += V^T K, z += sum K over the nr keys in kf, vv (the state kept transposed: R = G S^T reads it);
  // into (st_out, z_out) instead when given (out of place: the next chunk's slot, no copy).
  void state_update(int64_t nr, float* st, float* z, const float* kf, float* st_out = nullptr,
                    float* z_out = nullptr) const {
    Gemm::run(Dv, F2p / kLanes, nr, buf(l.vv), 1, Dvp, kf, F2p, st_out ? st_out : st, F2p, true, Tri::kFull, st);  // [Dv, nr] @ [nr, F2]
    for (int64_t c = 0; c < F2p; c += kLanes) {
      V s = Isa::loadf(z + c);
      for (int64_t r = 0; r < nr; ++r) s = Isa::add(s, Isa::loadf(kf + r * F2p + c));
      Isa::storef((z_out ? z_out : z) + c, s);
    }
  }

  // Keys [i0, i0 + nr) of the linear part: features (computed into `into`, default the scratch, or
  // read from a slot's `cached` ones with only the raw rows reloaded for the feature-map gradient;
  // returns where they are), v (and the transposes the causal parts need).
  const float* load_keys(int64_t i0, int64_t nr, bool transposes, const float* cached = nullptr,
                         float* into = nullptr) const {
    const float* kf = cached;
    if (!cached) {
      float* f = into ? into : buf(l.kf);
      k_features(t0 + i0, nr, f);
      kf = f;
    } else if (p.feature_map) {
      load(p.k, j, t0 + i0, nr, D, buf(l.xk), Dp);
    }
    load(p.v, j, t0 + i0, nr, Dv, buf(l.vv), Dvp);
    if (transposes) {
      transpose(kf, F2p, nr, F2, buf(l.kft), C);
      transpose(buf(l.vv), Dvp, nr, Dv, buf(l.vt), C);
    }
    return kf;
  }

  // Ask for the input rows chunk [i0, i0 + nr) will read (k, v; q and grad_out of the query heads
  // when `queries`) while the current chunk computes: each chunk's rows start a new run of pages
  // that the hardware prefetchers would only pick up after a few misses. (The row loads took ~10%
  // of the backward in a profile; what this gains was within this VM's run-to-run noise.)
  void prefetch_chunk(int64_t i0, int64_t nr, bool queries) const {
    if (i0 < 0 || nr <= 0) return;
    auto rows = [&](const Rows& r, int64_t h, int64_t tok, int64_t width) {
      for (int64_t i = 0; i < nr; ++i) {
        const char* row = reinterpret_cast<const char*>(in_row(r, h, tok + i));
        for (int64_t o = 0; o < width * static_cast<int64_t>(sizeof(T)); o += 64) __builtin_prefetch(row + o, 0, 2);
      }
    };
    rows(p.k, j, t0 + i0, D), rows(p.v, j, t0 + i0, Dv);
    if (queries)
      for (int64_t g = 0; g < G; ++g) rows(p.q, j * G + g, t0 + w + i0, D), rows(p.go, j * G + g, t0 + w + i0, Dv);
  }

  // The masked intra-chunk matrices of the current qf, gr: M = Q K^T, pm = G V^T (s <= t).
  void intra(int64_t nr) const {
    Gemm::run(nr, C / kLanes, F2, buf(l.qf), F2p, 1, buf(l.kft), C, buf(l.m), C, false, Tri::kOutLower);  // [nr, F2] @ [F2, nr]
    Gemm::run(nr, C / kLanes, Dv, buf(l.gr), Dvp, 1, buf(l.vt), C, buf(l.pm), C, false, Tri::kOutLower);  // [nr, Dv] @ [Dv, nr]
    mask_upper(buf(l.m), nr);
    mask_upper(buf(l.pm), nr);
  }

  // pm <- P = r_t pm + k_t on s <= t (zero above, as pm was).
  void make_p(int64_t nr, const float* rr, const float* kk) const {
    float* pm = buf(l.pm);
    for (int64_t t = 0; t < nr; ++t) {
      const V rv = Isa::set1(rr[t]), kv = Isa::set1(kk[t]);
      for (int64_t c = 0; c <= t; c += kLanes) {
        float* v = pm + t * C + c;
        Isa::storef(v, Isa::fill_tail(Isa::fma(rv, Isa::loadf(v), kv), t - c + 1, 0.f));
      }
    }
  }

  // The gradients of the queries of head h at linear rows [i0, i0 + nr) (query tokens i + window)
  // given the state entering the chunk (st, z) and, when causal, the chunk's keys (kf, kft, vt):
  // den and gnum (with the window part), r and k per row, dQ into dq rows, dW_q, db_q. Leaves qf,
  // gr, pm = P and m = M for the key gradients.
  void query_rows(int64_t h, int64_t i0, int64_t nr, const float* st, const float* z, const float* kf) const {
    const bool causal = p.causal;
    const int64_t tq = t0 + w + i0;
    float* qf = buf(l.qf);
    float* gr = buf(l.gr);
    float* m = buf(l.m);
    float* pm = buf(l.pm);
    float* R = buf(l.r);
    float* dqf = buf(l.dqf);
    float* rr = buf(l.rows);
    float* kk = rr + C;
    q_features(h, tq, nr);
    load(p.go, h, tq, nr, Dv, gr, Dvp);
    if (causal) intra(nr);
    Gemm::run(nr, F2p / kLanes, Dv, gr, Dvp, 1, st, F2p, R, F2p, false);  // R = G S^T  [nr, Dv] @ [Dv, F2]
    const float al = alpha(h);
    for (int64_t t = 0; t < nr; ++t) {
      float dl = dot(qf + t * F2p, z, F2p), gl = dot(qf + t * F2p, R + t * F2p, F2p);
      if (causal) {
        V a = Isa::zero(), c = Isa::zero();
        for (int64_t s = 0; s <= t; s += kLanes) {  // vectors holding s <= t (masked zero past t)
          const V mv = Isa::loadf(m + t * C + s);
          a = Isa::add(a, mv);
          c = Isa::fma(mv, Isa::loadf(pm + t * C + s), c);
        }
        dl += Isa::reduce_add(a), gl += Isa::reduce_add(c);
      }
      float r0, k0;
      if (w > 0) {
        std::tie(r0, k0) = band_row(h, w + i0 + t, buf(l.xq) + t * Dp, gr + t * Dvp, dl, gl);
      } else {
        r0 = 1.f / (dl + p.eps), k0 = -gl * r0 * r0;
      }
      rr[t] = al * r0, kk[t] = al * k0;
    }
    // dQ = r R + k z^T (+ P K)
    for (int64_t t = 0; t < nr; ++t) {
      const V rv = Isa::set1(rr[t]), kv = Isa::set1(kk[t]);
      for (int64_t c = 0; c < F2p; c += kLanes)
        Isa::storef(dqf + t * F2p + c, Isa::fma(rv, Isa::loadf(R + t * F2p + c), Isa::mul(kv, Isa::loadf(z + c))));
    }
    if (causal) {
      make_p(nr, rr, kk);
      Gemm::run(nr, F2p / kLanes, nr, pm, C, 1, kf, F2p, dqf, F2p, true, Tri::kKLower);  // [nr, nr] @ [nr, F2]
    }
    features_backward(buf(l.xq), qf, dqf, nr, p.feature_map ? p.wqt + h * F * Dp : nullptr,
                      out_row(p.dq, p.Hq, h, tq, D), acc.dwq ? acc.dwq + h * D * Fp : nullptr,
                      p.bq ? acc.dbq + h * Fp : nullptr);
  }

  // dS += Q^T (r G), dz += sum_t k_t Q_t for the current qf, gr, rows (ga <- r G).
  void accumulate_ds(int64_t nr) const {
    const float* qf = buf(l.qf);
    const float* gr = buf(l.gr);
    const float* rr = buf(l.rows);
    const float* kk = rr + C;
    float* ga = buf(l.ga);
    float* dz = buf(l.dz);
    for (int64_t t = 0; t < nr; ++t) {
      const V rv = Isa::set1(rr[t]), kv = Isa::set1(kk[t]);
      for (int64_t c = 0; c < Dvp; c += kLanes) Isa::storef(ga + t * Dvp + c, Isa::mul(rv, Isa::loadf(gr + t * Dvp + c)));
      for (int64_t c = 0; c < F2p; c += kLanes)
        Isa::storef(dz + c, Isa::fma(kv, Isa::loadf(qf + t * F2p + c), Isa::loadf(dz + c)));
    }
    Gemm::run(F2, Dvp / kLanes, nr, qf, 1, F2p, ga, Dvp, buf(l.ds), Dvp, true);  // [F2, nr] @ [nr, Dv]
  }

  // The key gradients of the chunk [i0, i0 + nr) through the running dS, dz (the later queries):
  // dK = V dS^T + dz into dkf, dv = K dS into dva.
  void keys_through_state(int64_t nr, const float* kf) const {
    float* dkf = buf(l.dkf);
    transpose(buf(l.ds), Dvp, F2, Dv, buf(l.dst), F2p);
    Gemm::run(nr, F2p / kLanes, Dv, buf(l.vv), Dvp, 1, buf(l.dst), F2p, dkf, F2p, false);  // [nr, Dv] @ [Dv, F2]
    const float* dz = buf(l.dz);
    for (int64_t t = 0; t < nr; ++t)
      for (int64_t c = 0; c < F2p; c += kLanes) Isa::storef(dkf + t * F2p + c, Isa::add(Isa::loadf(dkf + t * F2p + c), Isa::loadf(dz + c)));
    Gemm::run(nr, Dvp / kLanes, F2, kf, F2p, 1, buf(l.ds), Dvp, buf(l.dva), Dvp, false);  // [nr, F2] @ [F2, Dv]
  }

  // dK (dkf) and dv (dva) of the chunk's keys [i0, i0 + nr) into dk, dv, dW_k, db_k.
  void key_rows_out(int64_t i0, int64_t nr, const float* kf) const {
    features_backward(buf(l.xk), kf, buf(l.dkf), nr, p.feature_map ? p.wkt + j * F * Dp : nullptr,
                      out_row(p.dk, p.Hkv, j, t0 + i0, D), acc.dwk ? acc.dwk + j * D * Fp : nullptr,
                      p.bk ? acc.dbk + j * Fp : nullptr);
    float* dvo = out_row(p.dv, p.Hkv, j, t0 + i0, Dv);
    const float* dva = buf(l.dva);
    for (int64_t t = 0; t < nr; ++t) axpy_row(dvo + t * Dv, 1.f, dva + t * Dvp, Dv, w > 0);
  }

  // Causal, one reverse step: chunk [i0, i0 + nr) with the state entering it (st, z) and its key
  // features kf.
  void reverse_chunk(int64_t i0, int64_t nr, const float* st, const float* z, const float* kf) const {
    kf = load_keys(i0, nr, true, kf);
    keys_through_state(nr, kf);  // before this chunk's queries join dS
    float* dkf = buf(l.dkf);
    float* dva = buf(l.dva);
    for (int64_t g = 0; g < G; ++g) {
      query_rows(j * G + g, i0, nr, st, z, kf);
      accumulate_ds(nr);
      Gemm::run(nr, Dvp / kLanes, nr, buf(l.m), 1, C, buf(l.ga), Dvp, dva, Dvp, true, Tri::kKUpper);  // dv += M^T (r G)
      Gemm::run(nr, F2p / kLanes, nr, buf(l.pm), 1, C, buf(l.qf), F2p, dkf, F2p, true, Tri::kKUpper);  // dK += P^T Q
    }
    key_rows_out(i0, nr, kf);
  }

  // Causal: the pre-pass keeps the state entering each chunk of a block and the chunk's key
  // features in the slots (and the state entering each block in its checkpoint), then the reverse
  // pass goes block by block, last first, refilling a block's slots from its checkpoint (only when
  // there is more than one block).
  void causal_passes(int64_t nchunks) const {
    const int64_t ns = l.nslots, nblocks = (nchunks + ns - 1) / ns, sz = Dv * F2p;
    float* st = buf(l.st);
    float* z = buf(l.z);
    auto save = [&](float* to) { std::copy_n(st, sz, to), std::copy_n(z, F2p, to + sz); };
    // The states entering chunks [c0, c1) and their K into the slots: the block's entering state
    // (st, z) copied into its first slot, each later slot's state written by the update from the one
    // before (out of place: no copy of the ~33 KiB state a chunk).
    auto fill = [&](int64_t c0, int64_t c1) {
      save(buf(l.slots));
      for (int64_t c = c0; c < c1; ++c) {
        float* slot = buf(l.slots) + (c - c0) * l.slot;
        prefetch_chunk((c + 1) * C, c + 1 < c1 ? chunk_rows(c + 1) : 0, false);
        const float* kf = load_keys(c * C, chunk_rows(c), false, nullptr, slot + l.state);
        if (c + 1 < c1) state_update(C, slot, slot + sz, kf, slot + l.slot, slot + l.slot + sz);
      }
    };
    for (int64_t bk = 0; bk + 1 < nblocks; ++bk) {  // checkpoints only
      save(buf(l.ckpts) + bk * l.state);
      for (int64_t c = bk * ns; c < (bk + 1) * ns; ++c) {
        state_update(C, st, z, load_keys(c * C, C, false));
      }
    }
    for (int64_t bk = nblocks - 1; bk >= 0; --bk) {
      const int64_t c0 = bk * ns, c1 = c0 + ns < nchunks ? c0 + ns : nchunks;
      if (bk + 1 < nblocks) {
        const float* ck = buf(l.ckpts) + bk * l.state;
        std::copy_n(ck, sz, st), std::copy_n(ck + sz, F2p, z);
      }
      fill(c0, c1);
      for (int64_t c = c1 - 1; c >= c0; --c) {
        const float* sl = buf(l.slots) + (c - c0) * l.slot;
        if (c > c0) {  // the next slot back into L2 too: the slots outgrow it (~1 KiB a token)
          prefetch_chunk((c - 1) * C, C, true);
          for (int64_t o = 0; o < l.slot; o += 16) __builtin_prefetch(sl - l.slot + o, 0, 2);
        }
        reverse_chunk(c * C, chunk_rows(c), sl, sl + sz, sl + l.state);
      }
    }
  }

  // Non-causal: the whole sequence's state, a query pass (dQ; dS, dz), a key pass (dK, dv).
  void noncausal_passes(int64_t nchunks) const {
    float* st = buf(l.st);
    float* z = buf(l.z);
    for (int64_t c = 0; c < nchunks; ++c) {
      const int64_t nr = chunk_rows(c);
      state_update(nr, st, z, load_keys(c * C, nr, false));
    }
    for (int64_t c = 0; c < nchunks; ++c) {
      const int64_t nr = chunk_rows(c);
      for (int64_t g = 0; g < G; ++g) {
        query_rows(j * G + g, c * C, nr, st, z, nullptr);  // non-causal: no intra-chunk product
        accumulate_ds(nr);
      }
    }
    for (int64_t c = 0; c < nchunks; ++c) {
      const int64_t nr = chunk_rows(c);
      const float* kf = load_keys(c * C, nr, false);
      keys_through_state(nr, kf);
      key_rows_out(c * C, nr, kf);
    }
  }

  void run() const {
    if (w > 0) {  // the window part and the linear part both add to these rows
      for (int64_t g = 0; g < G; ++g) std::fill_n(out_row(p.dq, p.Hq, j * G + g, t0, D), len * D, 0.f);
      std::fill_n(out_row(p.dk, p.Hkv, j, t0, D), len * D, 0.f);
      std::fill_n(out_row(p.dv, p.Hkv, j, t0, Dv), len * Dv, 0.f);
    }
    // Initial state (kept as S^T) and the returned state's gradient, zero-padded.
    float* st = buf(l.st);
    float* z = buf(l.z);
    float* dS = buf(l.ds);
    float* dz = buf(l.dz);
    std::fill_n(st, Dvp * F2p, 0.f), std::fill_n(z, F2p, 0.f), std::fill_n(dS, F2p * Dvp, 0.f), std::fill_n(dz, F2p, 0.f);
    const int64_t so = (n * p.Hkv + j) * F2;
    for (int64_t f = 0; f < F2; ++f) {
      for (int64_t d = 0; d < Dv; ++d) {
        if (p.S0) st[d * F2p + f] = p.S0[(so + f) * Dv + d];
        if (p.gS) dS[f * Dvp + d] = p.gS[(so + f) * Dv + d];
      }
      if (p.z0) z[f] = p.z0[so + f];
      if (p.gz) dz[f] = p.gz[so + f];
    }
    if (w > 0) prologue();
    const int64_t nchunks = (nlin + C - 1) / C;
    if (nchunks > 0) {
      if (p.causal) causal_passes(nchunks);
      else noncausal_passes(nchunks);
    }
    if (p.dS0) {
      for (int64_t f = 0; f < F2; ++f) {
        for (int64_t d = 0; d < Dv; ++d) p.dS0[(so + f) * Dv + d] = dS[f * Dvp + d];
        p.dz0[so + f] = dz[f];
      }
    }
  }
};
inline void backward_task(const Problem& p, const Layout& l, int64_t n, int64_t j, float* scratch, const Partials& acc) {
  switch (p.elem) {
    case Elem::kF32: Task<Elem::kF32>(p, l, n, j, scratch, acc).run(); break;
    case Elem::kF16: Task<Elem::kF16>(p, l, n, j, scratch, acc).run(); break;
    case Elem::kBF16: Task<Elem::kBF16>(p, l, n, j, scratch, acc).run(); break;
  }
}
