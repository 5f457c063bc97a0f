// 16-lane fp32 "vectors" in plain C++ (the compiler vectorizes the loops for the baseline ISA),
// shared by the portable CPU units of every family; the counterpart of cpu_vec16_avx512.h.
// a * b + c, not std::fma: without hardware FMA in the baseline ISA std::fma is a libm call per
// lane, which would stop vectorization.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/cpu_elem.h"
#include "common/cpu_isa.h"

namespace pyfast {
namespace {

struct Vec16 {
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
  static inline V div(const V& a, const V& b) { return map([&](int i) { return a.v[i] / b.v[i]; }); }
  static inline V fma(const V& a, const V& b, const V& c) { return map([&](int i) { return a.v[i] * b.v[i] + c.v[i]; }); }
  static inline float reduce_add(const V& a) { float s = 0.f; for (int i = 0; i < 16; ++i) s += a.v[i]; return s; }
  static inline float reduce_max(const V& a) {  // NaN wins, so a NaN score is never dropped
    float s = a.v[0];
    for (int i = 1; i < 16; ++i) s = (a.v[i] > s || std::isnan(a.v[i])) ? a.v[i] : s;
    return s;
  }
  static inline V exp(const V& a) { return map([&](int i) { return std::exp(a.v[i]); }); }
  static inline V loadf(const float* p) { return map([p](int i) { return p[i]; }); }
  static inline void storef(float* p, const V& a) { for (int i = 0; i < 16; ++i) p[i] = a.v[i]; }
  static inline float half(uint16_t h) { return half_bits_to_float(h); }

  // n <= 16 elements of type E as fp32, zeros past n (nothing past n is read).
  template <Elem E>
  static inline V load(const void* p, int64_t n) {
    return map([p, n](int i) -> float {
      if (i >= n) return 0.f;
      if constexpr (E == Elem::kF32) return static_cast<const float*>(p)[i];
      const uint16_t h = static_cast<const uint16_t*>(p)[i];
      return E == Elem::kF16 ? half_bits_to_float(h) : bf16_bits_to_float(h);
    });
  }
  // The first n lanes of v as type E, rounded to nearest even (NaN stays NaN); nothing past n is written.
  template <Elem E>
  static inline void store(void* p, const V& v, int64_t n) {
    for (int i = 0; i < 16 && i < n; ++i) {
      if constexpr (E == Elem::kF32) static_cast<float*>(p)[i] = v.v[i];
      else if constexpr (E == Elem::kF16) static_cast<uint16_t*>(p)[i] = float_to_half_bits(v.v[i]);
      else static_cast<uint16_t*>(p)[i] = float_to_bf16_bits(v.v[i]);
    }
  }
  // r[i][c] -> r[c][i] (a 16 x 16 block held in 16 vectors).
  static inline void transpose16(V (&r)[16]) {
    for (int i = 0; i < 16; ++i)
      for (int j = i + 1; j < 16; ++j) {
        const float t = r[i].v[j];
        r[i].v[j] = r[j].v[i];
        r[j].v[i] = t;
      }
  }
};

}  // namespace
}  // namespace pyfast
