// LN-free linear layers for AVX-512 (F, BW, VL, DQ) + F16C. Only reached when the running CPU has
// these (runtime check in lnfree_cpu.cpp). Everything compiled under the target pragma stays in
// this unit (anonymous namespace).
#include <cstdint>

#include "lnfree/lnfree_cpu.h"

#if !(defined(__x86_64__) || defined(_M_X64))
// Not an x86 CPU: cpu_has_avx512() is false, this is never called; keep the symbol linkable.
namespace pyfast::lnfree {
void linear_columns_avx512(const LinearArgs& a, int64_t n0, int64_t n1, float* scratch) {
  linear_columns_scalar(a, n0, n1, scratch);
}
}  // namespace pyfast::lnfree
#else
// GCC 12's AVX-512 headers build "undefined" vectors as `__m512 __Y = __Y;` and warn about it at
// every inlined use (GCC bug 105593, fixed in 13): silence that for this unit only.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")

#include "common/cpu_vec16_avx512.h"

namespace pyfast::lnfree {
namespace {

struct Isa : Vec16 {};

#include "lnfree/lnfree_cpu_kernel.h"

}  // namespace

void linear_columns_avx512(const LinearArgs& a, int64_t n0, int64_t n1, float* scratch) {
  linear_columns(a, n0, n1, scratch);
}

}  // namespace pyfast::lnfree

#pragma GCC pop_options
#endif
