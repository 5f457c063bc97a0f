// Sparse-decoding CPU kernels for any CPU: plain C++ over 16-float "vectors" that the compiler
// vectorizes for the baseline ISA. Used when AVX-512 is not available (and in tests via
// pyfast._C.set_cpu_isa("scalar")).
#include <cmath>
#include <cstdint>

#include "common/cpu_vec16_scalar.h"
#include "sparse/sparse_cpu.h"

namespace pyfast::sparse {
namespace {

struct Isa : Vec16 {
  static inline V exp2(const V& x) { return map([&](int i) { return std::exp2(x.v[i]); }); }
};

#include "sparse/sparse_cpu_kernel.h"

}  // namespace

void attend_split_scalar(const CpuAttnArgs& a, const SplitWork& w) { Kernel::attend_split(a, w); }
void block_scores_scalar(const float* qbar, const void* keys, int64_t ld, Elem elem, int64_t n, int64_t D, float* out) {
  Kernel::block_scores(qbar, keys, ld, elem, n, D, out);
}

}  // namespace pyfast::sparse
