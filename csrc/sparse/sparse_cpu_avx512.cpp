// Sparse-decoding CPU kernels for AVX-512 (F, BW, VL, DQ) + F16C. Only reached when the running
// CPU has these (runtime check in sparse_cpu.cpp). No torch or std headers past the pragma:
// everything compiled under it stays in this unit (anonymous namespace).
#include <cstdint>

#include "sparse/sparse_cpu.h"

#if !(defined(__x86_64__) || defined(_M_X64))
// Not an x86 CPU: cpu_has_avx512() is false, these are never called; keep the symbols linkable.
namespace pyfast::sparse {
void attend_split_avx512(const CpuAttnArgs& a, const SplitWork& w) { attend_split_scalar(a, w); }
void block_scores_avx512(const float* qbar, const void* keys, int64_t ld, Elem elem, int64_t n, int64_t D, float* out) {
  block_scores_scalar(qbar, keys, ld, elem, n, D, out);
}
}  // namespace pyfast::sparse
#else
// GCC 12's AVX-512 headers build "undefined" vectors as `__m512 __Y = __Y;` and warn about it at
// every inlined use (GCC bug 105593, fixed in 13): silence that for this unit only.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")

#include "common/cpu_vec16_avx512.h"

namespace pyfast::sparse {
namespace {

struct Isa : Vec16 {
  // 2^x = 2^n * 2^f with n = round(x), |f| <= 1/2; 2^f = e^(f ln 2) by its degree-7 Taylor series
  // (exp_taylor7, truncation error < 1e-8 relative). x is clamped to [-150, 128] so -inf gives 0
  // (2^-150 underflows) and scalef never sees an infinite exponent; NaN passes through
  // max/min/scalef.
  static inline V exp2(V x) {
    x = _mm512_min_ps(_mm512_set1_ps(128.f), _mm512_max_ps(_mm512_set1_ps(-150.f), x));
    const V n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const V f = _mm512_mul_ps(_mm512_sub_ps(x, n), _mm512_set1_ps(0.69314718055994531f));  // f * ln 2
    return _mm512_scalef_ps(exp_taylor7(f), n);
  }
};

#include "sparse/sparse_cpu_kernel.h"

}  // namespace

void attend_split_avx512(const CpuAttnArgs& a, const SplitWork& w) { Kernel::attend_split(a, w); }
void block_scores_avx512(const float* qbar, const void* keys, int64_t ld, Elem elem, int64_t n, int64_t D, float* out) {
  Kernel::block_scores(qbar, keys, ld, elem, n, D, out);
}

}  // namespace pyfast::sparse

#pragma GCC pop_options
#endif
