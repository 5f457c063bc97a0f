// CPU feature detection and fp16/bf16 bit conversions shared by every family's CPU kernels
// (torch-free: included from the per-ISA translation units).
#pragma once
#include <cstdint>
#include <cstring>

namespace pyfast {

bool cpu_has_avx512();       // AVX-512 F/BW/VL/DQ + FMA + F16C: the *_avx512.cpp kernels
bool cpu_has_avx512_vnni();  // ... + VNNI (int8 dot products) + VBMI (byte shuffles): *_vnni.cpp

// The best kernel level the dispatchers may pick: 0 portable, 1 AVX-512, 2 AVX-512 + VNNI.
// Set from Python (pyfast._C.set_cpu_isa) so that tests reach every path on one machine.
enum CpuIsaLevel : int { kIsaScalar = 0, kIsaAvx512 = 1, kIsaAvx512Vnni = 2 };
int& cpu_isa_cap();
inline bool cpu_use_avx512() { return cpu_isa_cap() >= kIsaAvx512 && cpu_has_avx512(); }
inline bool cpu_use_avx512_vnni() { return cpu_isa_cap() >= kIsaAvx512Vnni && cpu_has_avx512_vnni(); }

// IEEE binary16 bits -> float (normals, subnormals, inf, NaN).
inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu, bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: renormalize
    exp = 113;
    while (!(man & 0x400u)) { man <<= 1; --exp; }
    bits = sign | (exp << 23) | ((man & 0x3FFu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// bfloat16 bits are the top half of a float.
inline float bf16_bits_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

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

}  // namespace pyfast
