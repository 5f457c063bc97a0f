// CherryQ CPU kernels for AVX-512 (F, BW, VL, DQ) + F16C. Only reached when the running CPU
// has these (runtime check in cherryq_cpu.cpp). No torch or std headers past the pragma:
// everything compiled under it stays in this unit.
#include <cstdint>

#include "cherryq/cherryq_cpu.h"

#if !(defined(__x86_64__) || defined(_M_X64))
// Not an x86 CPU: cpu_has_avx512() is false, these are never called; keep the symbols linkable.
namespace pyfast::cherryq {
void gemv_rows_avx512(const CpuMatmulArgs& a, int64_t n0, int64_t n1) { gemv_rows_scalar(a, n0, n1); }
void gemm_rows_avx512(const CpuMatmulArgs& a, int64_t n0, int64_t rows, float* panel) { gemm_rows_scalar(a, n0, rows, panel); }
}  // namespace pyfast::cherryq
#else
// GCC 12's AVX-512 headers build "undefined" vectors as `__m512 __Y = __Y;` and warn about it at
// every inlined use (GCC bug 105593, fixed in 13): silence that for this unit only.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")

#include "common/cpu_vec16_avx512.h"

namespace pyfast::cherryq {
namespace {

struct Isa : Vec16 {
  // One pack of 32 codes (BITS int32 words) -> two vectors of 1 + code * 2^-BITS (codes 0..15,
  // 16..31). Each code is rotated into the top mantissa bits of 1.0f and OR'd with 1.0f's bits
  // (one vprold + one vpternlogd), which replaces mask + int->float conversion.
  template <int BITS>
  static inline void decode(const int32_t* w, V& c0, V& c1) {
    const __m512i one = _mm512_set1_epi32(0x3F800000);  // 1.0f
    constexpr int kTernAndOr = 0xEA;                     // (a & b) | c
    if constexpr (BITS == 4) {
      // 8 nibbles per word: lane l of c0 takes word l/8 (words 0, 1), of c1 word 2 + l/8;
      // nibble l%8 (at bit 4*(l%8)) is rotated to bits [19, 23).
      const __m512i rot = _mm512_setr_epi32(19, 15, 11, 7, 3, 31, 27, 23, 19, 15, 11, 7, 3, 31, 27, 23);
      const __m512i lo_words = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
      const __m512i hi_words = _mm512_setr_epi32(2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
      const __m512i mask = _mm512_set1_epi32(0xF << 19);
      const __m512i words = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
      const __m512i q0 = _mm512_rolv_epi32(_mm512_permutexvar_epi32(lo_words, words), rot);
      const __m512i q1 = _mm512_rolv_epi32(_mm512_permutexvar_epi32(hi_words, words), rot);
      c0 = _mm512_castsi512_ps(_mm512_ternarylogic_epi32(q0, mask, one, kTernAndOr));
      c1 = _mm512_castsi512_ps(_mm512_ternarylogic_epi32(q1, mask, one, kTernAndOr));
    } else {
      // 2-bit plane: 16 codes per word, lane l at bits [2l, 2l+2), rotated to the top two
      // mantissa bits (bits 21-22 for BITS = 2; bits 20-21 for BITS = 3, whose bit 2 goes to 22).
      constexpr int top = BITS == 2 ? 21 : 20;
      const __m512i rot = _mm512_and_si512(
          _mm512_sub_epi32(_mm512_set1_epi32(top + 32),
                           _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)),
          _mm512_set1_epi32(31));
      const __m512i mask = _mm512_set1_epi32(3 << top);
      __m512i q0 = _mm512_ternarylogic_epi32(_mm512_rolv_epi32(_mm512_set1_epi32(w[0]), rot), mask, one, kTernAndOr);
      __m512i q1 = _mm512_ternarylogic_epi32(_mm512_rolv_epi32(_mm512_set1_epi32(w[1]), rot), mask, one, kTernAndOr);
      if constexpr (BITS == 3) {
        // 1-bit plane (word 2): bit i is bit 2 of code i; its halves are exactly lane masks.
        const uint32_t hi = static_cast<uint32_t>(w[2]);
        const __m512i bit2 = _mm512_set1_epi32(1 << 22);
        q0 = _mm512_mask_or_epi32(q0, static_cast<__mmask16>(hi & 0xFFFFu), q0, bit2);
        q1 = _mm512_mask_or_epi32(q1, static_cast<__mmask16>(hi >> 16), q1, bit2);
      }
      c0 = _mm512_castsi512_ps(q0);
      c1 = _mm512_castsi512_ps(q1);
    }
  }
};

#include "cherryq/cherryq_cpu_kernel.h"

}  // namespace

void gemv_rows_avx512(const CpuMatmulArgs& a, int64_t n0, int64_t n1) { gemv_rows(a, n0, n1); }
void gemm_rows_avx512(const CpuMatmulArgs& a, int64_t n0, int64_t rows, float* panel) { gemm_rows(a, n0, rows, panel); }

}  // namespace pyfast::cherryq

#pragma GCC pop_options
#endif  // x86
