// LN-free linear layers for any CPU: plain C++ over 16-float "vectors" that the compiler
// vectorizes for the baseline ISA. Used when AVX-512 is not available.
#include <cmath>
#include <cstdint>

#include "common/cpu_vec16_scalar.h"
#include "lnfree/lnfree_cpu.h"

namespace pyfast::lnfree {
namespace {

struct Isa : Vec16 {};

#include "lnfree/lnfree_cpu_kernel.h"

}  // namespace

void linear_columns_scalar(const LinearArgs& a, int64_t n0, int64_t n1, float* scratch) {
  linear_columns(a, n0, n1, scratch);
}

}  // namespace pyfast::lnfree
