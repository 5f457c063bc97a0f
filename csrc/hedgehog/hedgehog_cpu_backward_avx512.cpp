// Hedgehog backward CPU kernel for AVX-512 (F, BW, VL, DQ) + F16C. Only reached when the running CPU
// has these (runtime check in hedgehog_cpu_backward.cpp). Everything compiled under the target
// pragma stays in this unit (anonymous namespace).
#include <algorithm>
#include <cstdint>
#include <tuple>
#include <utility>

#include "hedgehog/hedgehog_cpu_backward.h"

#if !(defined(__x86_64__) || defined(_M_X64))
// Not an x86 CPU: cpu_has_avx512() is false, this is never called; keep the symbol linkable.
namespace pyfast::hedgehog::bwd {
void backward_task_avx512(const Problem& p, const Layout& l, int64_t n, int64_t j, float* scratch, const Partials& acc) {
  backward_task_scalar(p, l, n, j, scratch, acc);
}
}  // namespace pyfast::hedgehog::bwd
#else
// GCC 12's AVX-512 headers build "undefined" vectors as `__m512 __Y = __Y;` and warn about it at
// every inlined use (GCC bug 105593, fixed in 13): silence that for this unit only.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")

#include "common/cpu_vec16_avx512.h"

namespace pyfast::hedgehog::bwd {
namespace {

struct Isa : Vec16 {
  static inline V maxv(V a, V b) { return _mm512_max_ps(a, b); }
  static inline V fill_tail(V a, int64_t n, float x) { return _mm512_mask_blend_ps(first(n), _mm512_set1_ps(x), a); }

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
};

#include "hedgehog/hedgehog_bwd_kernel.h"

}  // namespace

void backward_task_avx512(const Problem& p, const Layout& l, int64_t n, int64_t j, float* scratch, const Partials& acc) {
  backward_task(p, l, n, j, scratch, acc);
}

}  // namespace pyfast::hedgehog::bwd

#pragma GCC pop_options
#endif
