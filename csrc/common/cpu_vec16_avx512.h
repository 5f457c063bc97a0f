// 16-lane fp32 vector operations shared by the AVX-512 units of every family (cherryq, hedgehog,
// sparse). Include after <immintrin.h> and `#pragma GCC target("avx512f,...,f16c")`; each family's
// `Isa` derives from Vec16 and adds its own operations. Internal linkage (anonymous namespace):
// nothing compiled for AVX-512 can leak into code that runs on other CPUs.
#pragma once
#include <cstdint>

#include "common/cpu_elem.h"  // an enum and type traits only: no code compiled under the pragma

namespace pyfast {
namespace {

struct Vec16 {
  using V = __m512;
  static inline V zero() { return _mm512_setzero_ps(); }
  static inline V set1(float f) { return _mm512_set1_ps(f); }
  static inline V add(V a, V b) { return _mm512_add_ps(a, b); }
  static inline V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static inline V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static inline V div(V a, V b) { return _mm512_div_ps(a, b); }
  static inline V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static inline float reduce_add(V v) { return _mm512_reduce_add_ps(v); }
  static inline float reduce_max(V v) { return _mm512_reduce_max_ps(v); }
  static inline V loadf(const float* p) { return _mm512_loadu_ps(p); }
  static inline void storef(float* p, V v) { _mm512_storeu_ps(p, v); }
  static inline float half(uint16_t h) { return _cvtsh_ss(h); }

  // The lanes [0, n) (n clamped to [0, 16]).
  static inline __mmask16 first(int64_t n) {
    return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n > 0 ? n : 0)) - 1u);
  }

  // n <= 16 elements of type E as fp32, zeros past n; masked loads never touch memory past element n.
  template <Elem E>
  static inline V load(const void* p, int64_t n) {
    if constexpr (E == Elem::kF32) {
      return n >= 16 ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(first(n), p);
    } else {
      const __m256i h = n >= 16 ? _mm256_loadu_si256(static_cast<const __m256i*>(p)) : _mm256_maskz_loadu_epi16(first(n), p);
      if constexpr (E == Elem::kF16) return _mm512_cvtph_ps(h);
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));  // bf16 = top half of fp32
    }
  }

  // The first n lanes of v as type E, rounded to nearest even (NaN stays NaN); nothing past n is written.
  template <Elem E>
  static inline void store(void* p, V v, int64_t n) {
    if constexpr (E == Elem::kF32) {
      if (n >= 16) _mm512_storeu_ps(p, v);
      else _mm512_mask_storeu_ps(p, first(n), v);
    } else {
      __m256i h;
      if constexpr (E == Elem::kF16) {
        h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      } else {
        // bf16: add 0x7FFF plus the lowest kept bit, keep the top 16 bits; NaN: quiet, truncated.
        const __m512i x = _mm512_castps_si512(v);
        const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
        const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(x, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
        const __m512i q = _mm512_or_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(0x40));
        h = _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), r, q));
      }
      if (n >= 16) _mm256_storeu_si256(static_cast<__m256i*>(p), h);
      else _mm256_mask_storeu_epi16(p, first(n), h);
    }
  }

  // e^r for |r| <= ln 2 / 2 (the reduced argument of the exp / exp2 kernels, which scale the
  // result by 2^n with scalef): the degree-7 Taylor series by Horner's rule, truncation error
  // < 1e-8 relative.
  static inline V exp_taylor7(V r) {
    V p = _mm512_set1_ps(1.f / 5040.f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  }

  // e^x = 2^n e^r, n = round(x log2 e), r = x - n ln 2 in two parts (Cody-Waite, |r| <= ln2 / 2),
  // e^r by its degree-7 Taylor series (exp_taylor7, truncation < 1e-8 relative). x is clamped to
  // [-104, 88.7] so -inf gives 0 and scalef never sees an infinite exponent; NaN passes through
  // max/min/scalef.
  static inline V exp(V x) {
    x = _mm512_min_ps(_mm512_set1_ps(88.7f), _mm512_max_ps(_mm512_set1_ps(-104.f), x));
    const V n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    V r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln 2 = 0.693359375 - 2.12194440e-4
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    return _mm512_scalef_ps(exp_taylor7(r), n);
  }

  // r[i][c] -> r[c][i]. Per 128-bit lane: 32-bit interleave of row pairs, 64-bit interleave of
  // pair pairs (u[4q + c] holds column 4L + c of rows 4q..4q+3 in lane L), then two 128-bit lane
  // shuffles gather lane L of u[c], u[4 + c], u[8 + c], u[12 + c] into row 4L + c.
  static inline V lo64(V a, V b) { return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b))); }
  static inline V hi64(V a, V b) { return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b))); }
  static inline void transpose16(V (&r)[16]) {
    V t[16], u[16];
    for (int i = 0; i < 16; i += 2) {
      t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int q = 0; q < 16; q += 4) {
      u[q] = lo64(t[q], t[q + 2]);
      u[q + 1] = hi64(t[q], t[q + 2]);
      u[q + 2] = lo64(t[q + 1], t[q + 3]);
      u[q + 3] = hi64(t[q + 1], t[q + 3]);
    }
    for (int c = 0; c < 4; ++c) {
      const V v0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88), w0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xDD);
      const V v1 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88), w1 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xDD);
      r[c] = _mm512_shuffle_f32x4(v0, v1, 0x88);
      r[8 + c] = _mm512_shuffle_f32x4(v0, v1, 0xDD);
      r[4 + c] = _mm512_shuffle_f32x4(w0, w1, 0x88);
      r[12 + c] = _mm512_shuffle_f32x4(w0, w1, 0xDD);
    }
  }
};

}  // namespace
}  // namespace pyfast
