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
};

#include "hedgehog/hedgehog_bwd_kernel.h"

}  // namespace

void backward_task_avx512(const Problem& p, const Layout& l, int64_t n, int64_t j, float* scratch, const Partials& acc) {
  backward_task(p, l, n, j, scratch, acc);
}

}  // namespace pyfast::hedgehog::bwd

#pragma GCC pop_options
#endif
