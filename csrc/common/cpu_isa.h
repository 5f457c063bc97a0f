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

}  // namespace pyfast
