// Hedgehog backward CPU kernel for any CPU: plain C++ over 16-float "vectors" that the compiler
// vectorizes for the baseline ISA. Used when AVX-512 is not available (and in tests via
// pyfast._C.set_cpu_isa("scalar")).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <utility>

#include "common/cpu_vec16_scalar.h"
#include "hedgehog/hedgehog_cpu_backward.h"

namespace pyfast::hedgehog::bwd {
namespace {

struct Isa : Vec16 {
  static inline V maxv(const V& a, const V& b) { return map([&](int i) { return a.v[i] > b.v[i] ? a.v[i] : b.v[i]; }); }
  static inline V fill_tail(const V& a, int64_t n, float x) { return map([&](int i) { return i < n ? a.v[i] : x; }); }
};

#include "hedgehog/hedgehog_bwd_kernel.h"

}  // namespace

void backward_task_scalar(const Problem& p, const Layout& l, int64_t n, int64_t j, float* scratch, const Partials& acc) {
  backward_task(p, l, n, j, scratch, acc);
}

}  // namespace pyfast::hedgehog::bwd
