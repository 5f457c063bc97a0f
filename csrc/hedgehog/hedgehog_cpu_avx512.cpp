// Hedgehog forward CPU kernels for AVX-512 (F, BW, VL, DQ) + F16C. Only reached when the running
// CPU has these (runtime check in hedgehog_cpu.cpp). No torch or std headers past the pragma:
// everything compiled under it stays in this unit (anonymous namespace).
#include <cstdint>

#include "hedgehog/hedgehog_cpu.h"

#if !(defined(__x86_64__) || defined(_M_X64))
// Not an x86 CPU: cpu_has_avx512() is false, these are never called; keep the symbols linkable.
namespace pyfast::hedgehog {
void fwd_work_avx512(const FwdArgs& a, const FwdWork& w) { fwd_work_scalar(a, w); }
void fmap_chunk_avx512(const FmapArgs& a, int64_t b, int64_t h, int64_t t0, int64_t len, float* scratch) {
  fmap_chunk_scalar(a, b, h, t0, len, scratch);
}
void decode_head_avx512(const DecodeArgs& a, int64_t b, int64_t j, float* scratch) { decode_head_scalar(a, b, j, scratch); }
}  // namespace pyfast::hedgehog
#else
// GCC 12's AVX-512 headers build "undefined" vectors as `__m512 __Y = __Y;` and warn about it at
// every inlined use (GCC bug 105593, fixed in 13): silence that for this unit only.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")

#include "common/cpu_vec16_avx512.h"

namespace pyfast::hedgehog {
namespace {

struct Isa : Vec16 {
  static inline V max(V a, V b) { return _mm512_max_ps(a, b); }
  static inline V min(V a, V b) { return _mm512_min_ps(a, b); }
  static inline V div(V a, V b) { return _mm512_div_ps(a, b); }

  // Lanes [lo, hi) of v (bounds clamped to [0, 16]), zeros elsewhere.
  static inline V keep(V v, int64_t lo, int64_t hi) {
    return _mm512_maskz_mov_ps(static_cast<__mmask16>(first(hi) & ~first(lo)), v);
  }
  // Lanes [lo, hi) of v (bounds clamped to [0, 16]), x elsewhere.
  static inline V mask(V v, int64_t lo, int64_t hi, float x) {
    return _mm512_mask_mov_ps(_mm512_set1_ps(x), static_cast<__mmask16>(first(hi) & ~first(lo)), v);
  }

  // e^x = 2^n e^r, n = round(x log2 e), r = x - n ln 2 with ln 2 in two parts (|r| <= 0.35), e^r
  // by its degree-7 Taylor series (exp_taylor7, truncation error < 6e-9 relative). Results that
  // would be subnormal (x < -87.33) are flushed to zero: a sharp softmax makes many of them, and
  // every later FMA on a subnormal operand would take a microcode assist. x is clamped to at most
  // 89 so large x gives inf through scalef; NaN passes through max/min (the second operand is
  // returned when either is NaN), scalef and the unordered compare.
  static inline V exp(V x) {
    const __mmask16 normal = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.33f), _CMP_NLT_UQ);
    x = _mm512_min_ps(_mm512_set1_ps(89.f), _mm512_max_ps(_mm512_set1_ps(-88.f), x));
    const V n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    V r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-6f), r);
    return _mm512_maskz_mov_ps(normal, _mm512_scalef_ps(exp_taylor7(r), n));
  }

};

#include "hedgehog/hedgehog_cpu_kernel.h"

}  // namespace

void fwd_work_avx512(const FwdArgs& a, const FwdWork& w) { Kernel::work(a, w); }
void fmap_chunk_avx512(const FmapArgs& a, int64_t b, int64_t h, int64_t t0, int64_t len, float* scratch) {
  Kernel::fmap_chunk(a, b, h, t0, len, scratch);
}
void decode_head_avx512(const DecodeArgs& a, int64_t b, int64_t j, float* scratch) { Kernel::decode_head(a, b, j, scratch); }

}  // namespace pyfast::hedgehog

#pragma GCC pop_options
#endif
