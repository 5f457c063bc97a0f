// Sparse-decoding CPU kernels for any CPU: plain C++ over 16-float "vectors" that the compiler
// vectorizes for the baseline ISA. Used when AVX-512 is not available (and in tests via
// pyfast._C.set_cpu_isa("scalar")).
#include <cmath>
#include <cstdint>

#include "common/cpu_isa.h"
#include "sparse/sparse_cpu.h"

namespace pyfast::sparse {
namespace {

struct Isa {
  struct V {
    float v[16];
  };
  template <class F>
  static inline V map(F f) { V r; for (int i = 0; i < 16; ++i) r.v[i] = f(i); return r; }
  static inline V zero() { return map([](int) { return 0.f; }); }
  static inline V set1(float x) { return map([x](int) { return x; }); }
  static inline V add(const V& a, const V& b) { return map([&](int i) { return a.v[i] + b.v[i]; }); }
  static inline V sub(const V& a, const V& b) { return map([&](int i) { return a.v[i] - b.v[i]; }); }
  static inline V mul(const V& a, const V& b) { return map([&](int i) { return a.v[i] * b.v[i]; }); }
  static inline V fma(const V& a, const V& b, const V& c) { return map([&](int i) { return std::fma(a.v[i], b.v[i], c.v[i]); }); }
  static inline float reduce_add(const V& a) { float s = 0.f; for (int i = 0; i < 16; ++i) s += a.v[i]; return s; }
  static inline float reduce_max(const V& a) {
    float s = a.v[0];
    for (int i = 1; i < 16; ++i) s = (a.v[i] > s || std::isnan(a.v[i])) ? a.v[i] : s;
    return s;
  }
  static inline V loadf(const float* p) { return map([p](int i) { return p[i]; }); }
  static inline void storef(float* p, const V& a) { for (int i = 0; i < 16; ++i) p[i] = a.v[i]; }

  template <Elem E>
  static inline V load(const void* p, int64_t n) {
    return map([p, n](int i) -> float {
      if (i >= n) return 0.f;
      if constexpr (E == Elem::kF32) return static_cast<const float*>(p)[i];
      const uint16_t h = static_cast<const uint16_t*>(p)[i];
      return E == Elem::kF16 ? half_bits_to_float(h) : bf16_bits_to_float(h);
    });
  }

  static inline V exp2(const V& x) { return map([&](int i) { return std::exp2(x.v[i]); }); }
};

#include "sparse/sparse_cpu_kernel.h"

}  // namespace

void attend_split_scalar(const CpuAttnArgs& a, const SplitWork& w) { Kernel::attend_split(a, w); }
void block_scores_scalar(const float* qbar, const void* keys, int64_t ld, Elem elem, int64_t n, int64_t D, float* out) {
  Kernel::block_scores(qbar, keys, ld, elem, n, D, out);
}

}  // namespace pyfast::sparse
