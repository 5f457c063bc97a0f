// Hedgehog forward CPU kernels for any CPU: plain C++ over 16-float "vectors" that the compiler
// vectorizes for the baseline ISA. Used when AVX-512 is not available (and in tests via
// pyfast._C.set_cpu_isa("scalar")).
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/cpu_vec16_scalar.h"
#include "hedgehog/hedgehog_cpu.h"

namespace pyfast::hedgehog {
namespace {

// float -> IEEE binary16 bits, rounded to nearest even (subnormals, overflow to inf, quiet NaN).
inline uint16_t float_to_half_bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const uint32_t sign = (x >> 16) & 0x8000u;
  x &= 0x7FFFFFFFu;
  if (x >= 0x7F800000u) return static_cast<uint16_t>(sign | 0x7C00u | (x > 0x7F800000u ? 0x200u : 0u));
  if (x >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // >= 65520 rounds to inf
  if (x < 0x38800000u) {                                                 // below 2^-14: subnormal
    if (x < 0x33000000u) return static_cast<uint16_t>(sign);             // below 2^-25: zero
    const uint32_t e = x >> 23, m = (x & 0x7FFFFFu) | 0x800000u, shift = 126 - e;  // units of 2^-24
    uint32_t h = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (h & 1u))) ++h;
    return static_cast<uint16_t>(sign | h);
  }
  uint32_t h = (x - 0x38000000u) >> 13;  // rebias 127 -> 15, keep 10 mantissa bits
  const uint32_t rem = x & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry into the exponent is right
  return static_cast<uint16_t>(sign | h);
}

// float -> bfloat16 bits, rounded to nearest even; NaN stays a quiet NaN.
inline uint16_t float_to_bf16_bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);
  return static_cast<uint16_t>((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

struct Isa : Vec16 {
  template <Elem E>
  static inline V load(const void* p, int64_t n) {
    return map([p, n](int i) -> float {
      if (i >= n) return 0.f;
      if constexpr (E == Elem::kF32) return static_cast<const float*>(p)[i];
      const uint16_t h = static_cast<const uint16_t*>(p)[i];
      return E == Elem::kF16 ? half_bits_to_float(h) : bf16_bits_to_float(h);
    });
  }
  template <Elem E>
  static inline void store(void* p, const V& v, int64_t n) {
    for (int i = 0; i < 16 && i < n; ++i) {
      if constexpr (E == Elem::kF32) static_cast<float*>(p)[i] = v.v[i];
      else if constexpr (E == Elem::kF16) static_cast<uint16_t*>(p)[i] = float_to_half_bits(v.v[i]);
      else static_cast<uint16_t*>(p)[i] = float_to_bf16_bits(v.v[i]);
    }
  }
  static inline V max(const V& a, const V& b) { return map([&](int i) { return a.v[i] > b.v[i] ? a.v[i] : b.v[i]; }); }
  static inline V min(const V& a, const V& b) { return map([&](int i) { return a.v[i] < b.v[i] ? a.v[i] : b.v[i]; }); }
  static inline V div(const V& a, const V& b) { return map([&](int i) { return a.v[i] / b.v[i]; }); }
  static inline V keep(const V& v, int64_t lo, int64_t hi) { return map([&](int i) { return i >= lo && i < hi ? v.v[i] : 0.f; }); }
  static inline V mask(const V& v, int64_t lo, int64_t hi, float x) { return map([&](int i) { return i >= lo && i < hi ? v.v[i] : x; }); }
  // Subnormal results flushed to zero, as in the AVX-512 unit (NaN passes: the compare is false).
  static inline V exp(const V& x) { return map([&](int i) { return x.v[i] < -87.33f ? 0.f : std::exp(x.v[i]); }); }
  static inline void transpose16(V (&r)[16]) {
    for (int i = 0; i < 16; ++i)
      for (int j = i + 1; j < 16; ++j) {
        const float t = r[i].v[j];
        r[i].v[j] = r[j].v[i];
        r[j].v[i] = t;
      }
  }
};

#include "hedgehog/hedgehog_cpu_kernel.h"

}  // namespace

void fwd_work_scalar(const FwdArgs& a, const FwdWork& w) { Kernel::work(a, w); }
void fmap_chunk_scalar(const FmapArgs& a, int64_t b, int64_t h, int64_t t0, int64_t len, float* scratch) {
  Kernel::fmap_chunk(a, b, h, t0, len, scratch);
}
void decode_head_scalar(const DecodeArgs& a, int64_t b, int64_t j, float* scratch) { Kernel::decode_head(a, b, j, scratch); }

}  // namespace pyfast::hedgehog
