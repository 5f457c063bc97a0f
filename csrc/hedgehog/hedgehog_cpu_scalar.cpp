// Hedgehog forward CPU kernels for any CPU: plain C++ over 16-float "vectors" that the compiler
// vectorizes for the baseline ISA. Used when AVX-512 is not available (and in tests via
// pyfast._C.set_cpu_isa("scalar")).
#include <cmath>
#include <cstdint>

#include "common/cpu_vec16_scalar.h"
#include "hedgehog/hedgehog_cpu.h"

namespace pyfast::hedgehog {
namespace {

struct Isa : Vec16 {
  static inline V max(const V& a, const V& b) { return map([&](int i) { return a.v[i] > b.v[i] ? a.v[i] : b.v[i]; }); }
  static inline V min(const V& a, const V& b) { return map([&](int i) { return a.v[i] < b.v[i] ? a.v[i] : b.v[i]; }); }
  static inline V div(const V& a, const V& b) { return map([&](int i) { return a.v[i] / b.v[i]; }); }
  static inline V keep(const V& v, int64_t lo, int64_t hi) { return map([&](int i) { return i >= lo && i < hi ? v.v[i] : 0.f; }); }
  static inline V mask(const V& v, int64_t lo, int64_t hi, float x) { return map([&](int i) { return i >= lo && i < hi ? v.v[i] : x; }); }
  // Subnormal results flushed to zero, as in the AVX-512 unit (NaN passes: the compare is false).
  static inline V exp(const V& x) { return map([&](int i) { return x.v[i] < -87.33f ? 0.f : std::exp(x.v[i]); }); }
};

#include "hedgehog/hedgehog_cpu_kernel.h"

}  // namespace

void fwd_work_scalar(const FwdArgs& a, const FwdWork& w) { Kernel::work(a, w); }
void fmap_chunk_scalar(const FmapArgs& a, int64_t b, int64_t h, int64_t t0, int64_t len, float* scratch) {
  Kernel::fmap_chunk(a, b, h, t0, len, scratch);
}
void decode_head_scalar(const DecodeArgs& a, int64_t b, int64_t j, float* scratch) { Kernel::decode_head(a, b, j, scratch); }

}  // namespace pyfast::hedgehog
