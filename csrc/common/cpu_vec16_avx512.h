// 16-lane fp32 vector operations shared by the AVX-512 units of every family (cherryq, sparse).
// Include after <immintrin.h> and `#pragma GCC target("avx512f,...,f16c")`; each family's `Isa`
// derives from Vec16 and adds its own loads and decoders. Internal linkage (anonymous
// namespace): nothing compiled for AVX-512 can leak into code that runs on other CPUs.
#pragma once
#include <cstdint>

namespace pyfast {
namespace {

struct Vec16 {
  using V = __m512;
  static inline V zero() { return _mm512_setzero_ps(); }
  static inline V set1(float f) { return _mm512_set1_ps(f); }
  static inline V add(V a, V b) { return _mm512_add_ps(a, b); }
  static inline V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static inline V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static inline V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static inline float reduce_add(V v) { return _mm512_reduce_add_ps(v); }
  static inline float reduce_max(V v) { return _mm512_reduce_max_ps(v); }
  static inline V loadf(const float* p) { return _mm512_loadu_ps(p); }
  static inline void storef(float* p, V v) { _mm512_storeu_ps(p, v); }
  static inline float half(uint16_t h) { return _cvtsh_ss(h); }
};

}  // namespace
}  // namespace pyfast
