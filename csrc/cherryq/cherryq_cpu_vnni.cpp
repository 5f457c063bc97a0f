// CherryQ GEMV for CPUs with AVX-512 VNNI + VBMI (Zen 4, Ice Lake and later). Reached only when
// the running CPU has them (runtime check in cherryq_cpu.cpp); nothing outside this unit is
// compiled for these extensions.
//
// Why: the fp32 GEMV (cherryq_cpu_kernel.h) spends ~4 vector ops per 16 weights decoding codes
// into floats and FMA-ing them. Here 64 codes are decoded as bytes with two byte shuffles
// (vpermd + vpmultishiftqb per bit plane) and multiplied by x with vpdpbusd (64 u8 x s8 products
// per op). To keep fp32 accuracy x is not rounded to int8 but split, per group of group_size
// columns, into a 23-bit fixed-point value written as three balanced base-256 digits
// d0 + 256 d1 + 65536 d2 (each int8); one vpdpbusd per digit plane, recombined in int32 at the
// end of the group (no overflow: |sum| < 2^30 for group_size <= 256), then scaled in fp32.
#include <cstdint>

#include "cherryq/cherryq_cpu.h"
#include "common/cpu_isa.h"

#if !(defined(__x86_64__) || defined(_M_X64))
namespace pyfast::cherryq {
void gemv_rows_vnni(const CpuMatmulArgs& a, int64_t n0, int64_t n1) { gemv_rows_scalar(a, n0, n1); }
bool split_x_digits(const float*, int64_t, int64_t, int64_t, int8_t*, float*) { return false; }
}  // namespace pyfast::cherryq
#else
// GCC 12's AVX-512 headers trip -Wuninitialized on their own "undefined vector" idiom (bug 105593).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx512vnni,fma,f16c")

namespace pyfast::cherryq {
namespace {

#include "cherryq/cherryq_cpu_epilogue.h"

constexpr int kChunk = 64;            // codes per decode: two 32-code packs, one byte per code
constexpr int kPrefetchBytes = 2048;  // ~32 cache lines ahead of the packed-weight stream

// Byte j of output qword q (q = 0..7) receives code 8q + j of the chunk. vpmultishiftqb takes,
// for each output byte, the 8 bits of the same qword of its source starting at a chosen bit
// offset; vpermd first copies the right packed words into each source qword.
template <int BITS>
struct Decoder {
  __m512i idx_lo, ctl_lo, idx_hi, ctl_hi, mask;

  Decoder() {
    alignas(64) int32_t il[16], ih[16];
    alignas(64) uint8_t cl[64], ch[64];
    for (int q = 0; q < 8; ++q) {
      for (int j = 0; j < 8; ++j) {
        const int c = 8 * q + j;  // code index within the 64-code chunk
        if (BITS == 4) cl[8 * q + j] = static_cast<uint8_t>(4 * j);                    // word q, nibble j
        if (BITS == 2) cl[8 * q + j] = static_cast<uint8_t>(16 * (q % 2) + 2 * j);     // word q/2
        if (BITS == 3) {
          cl[8 * q + j] = static_cast<uint8_t>(2 * (c % 32));  // 2-bit plane: (w0, w1) of its pack
          ch[8 * q + j] = static_cast<uint8_t>((c % 32 + 62) % 64);  // 1-bit plane: bit c%32 -> bit 2
        }
      }
      // Source qword q = dwords (2q, 2q+1) of the permuted vector.
      const int pack = q / 4;  // 3-bit: packs are words [0..2] and [3..5]
      if (BITS == 4) il[2 * q] = il[2 * q + 1] = q;
      if (BITS == 2) il[2 * q] = il[2 * q + 1] = q / 2;
      if (BITS == 3) {
        il[2 * q] = 3 * pack, il[2 * q + 1] = 3 * pack + 1;
        ih[2 * q] = ih[2 * q + 1] = 3 * pack + 2;  // the 1-bit word twice: offsets wrap mod 64
      }
    }
    idx_lo = _mm512_load_si512(il);
    ctl_lo = _mm512_load_si512(cl);
    if (BITS == 3) {
      idx_hi = _mm512_load_si512(ih);
      ctl_hi = _mm512_load_si512(ch);
    }
    mask = _mm512_set1_epi8(static_cast<char>((1 << BITS) - 1));
  }

  // The 2 * BITS packed words of one chunk -> 64 codes as bytes. For 3 bits (6 words) a single
  // 32-byte load reads 2 words past the chunk: only allowed when more packed words follow
  // (EXACT_LOAD = false); the last row of the matrix takes the exact 16 + 8-byte loads.
  template <bool EXACT_LOAD>
  inline __m512i codes(const int32_t* w) const {
    __m512i raw;
    if (BITS == 4 || (BITS == 3 && !EXACT_LOAD))
      raw = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
    if (BITS == 2) raw = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
    if (BITS == 3 && EXACT_LOAD)
      raw = _mm512_inserti32x4(_mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))),
                               _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + 4)), 1);
    const __m512i lo = _mm512_multishift_epi64_epi8(ctl_lo, _mm512_permutexvar_epi32(idx_lo, raw));
    if (BITS != 3) return _mm512_and_si512(lo, mask);
    const __m512i hi = _mm512_multishift_epi64_epi8(ctl_hi, _mm512_permutexvar_epi32(idx_hi, raw));
    // bits 0-1 from the 2-bit plane, bit 2 from the 1-bit plane: (lo & 3) | (hi & ~3), then & 7
    constexpr int kSelect = 0xE4;  // ternlog: C ? A : B
    return _mm512_and_si512(_mm512_ternarylogic_epi32(lo, hi, _mm512_set1_epi8(3), kSelect), mask);
  }
};

// CHUNKS = group_size / 64 at compile time, so the chunk loop unrolls and the MB x 3
// accumulators of a group stay in registers.
template <int BITS, int MB, int CHUNKS, bool EXACT_LOAD>
void gemv_rows_block(const CpuMatmulArgs& a, const Decoder<BITS>& shared, int64_t n0, int64_t n1, int m0) {
  const Decoder<BITS> dec = shared;  // a local copy: the shuffle constants stay in registers
  const int64_t K = a.K, G = K / a.group_size, words_per_row = K / 32 * BITS;
  constexpr int chunks = CHUNKS;
  const int8_t* d[MB][3];
  for (int m = 0; m < MB; ++m)
    for (int p = 0; p < 3; ++p) d[m][p] = a.xdig + (p * a.M + m0 + m) * K;
  for (int64_t n = n0; n < n1; ++n) {
    const int32_t* wrow = a.qweight + n * words_per_row;
    __m512 tot[MB];
    float ztot[MB];
    for (int m = 0; m < MB; ++m) tot[m] = _mm512_setzero_ps(), ztot[m] = 0.f;
    for (int64_t g = 0; g < G; ++g) {
      const int32_t* pw = wrow + g * a.group_size / 32 * BITS;
      __builtin_prefetch(reinterpret_cast<const char*>(pw) + kPrefetchBytes);
      __m512i acc[MB][3];
      for (int m = 0; m < MB; ++m)
        for (int p = 0; p < 3; ++p) acc[m][p] = _mm512_setzero_si512();
      for (int c = 0; c < chunks; ++c, pw += 2 * BITS) {
        const __m512i codes = dec.template codes<EXACT_LOAD>(pw);
        const int64_t k = g * a.group_size + c * kChunk;
        for (int m = 0; m < MB; ++m)
          for (int p = 0; p < 3; ++p) acc[m][p] = _mm512_dpbusd_epi32(acc[m][p], codes, _mm512_loadu_si512(d[m][p] + k));
      }
      const float scale = _cvtsh_ss(a.scales[n * G + g]), zero = _cvtsh_ss(a.zeros[n * G + g]);
      for (int m = 0; m < MB; ++m) {
        const __m512i s = _mm512_add_epi32(acc[m][0], _mm512_add_epi32(_mm512_slli_epi32(acc[m][1], 8),
                                                                        _mm512_slli_epi32(acc[m][2], 16)));
        tot[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(scale * a.xstep[(m0 + m) * G + g]), tot[m]);
        ztot[m] += zero * a.xsum[(m0 + m) * G + g];
      }
    }
    float out[MB];
    for (int m = 0; m < MB; ++m) out[m] = _mm512_reduce_add_ps(tot[m]) + ztot[m];
    add_cherries_and_store<MB>(a, n, m0, out, [](uint16_t h) { return _cvtsh_ss(h); });
  }
}

template <int BITS, int MB, int CHUNKS>
void gemv_block(const CpuMatmulArgs& a, const Decoder<BITS>& dec, int64_t n0, int64_t n1, int m0) {
  const int64_t n_fast = n1 < a.N ? n1 : a.N - 1;  // rows followed by more packed words
  gemv_rows_block<BITS, MB, CHUNKS, false>(a, dec, n0, n_fast, m0);
  if (n_fast < n1) gemv_rows_block<BITS, MB, CHUNKS, true>(a, dec, n_fast, n1, m0);
}

template <int BITS, int MB>
void gemv_block_gs(const CpuMatmulArgs& a, const Decoder<BITS>& dec, int64_t n0, int64_t n1, int m0) {
  switch (a.group_size) {
    case 64: gemv_block<BITS, MB, 1>(a, dec, n0, n1, m0); break;
    case 128: gemv_block<BITS, MB, 2>(a, dec, n0, n1, m0); break;
    default: gemv_block<BITS, MB, 4>(a, dec, n0, n1, m0); break;  // 256 (the host sends only these)
  }
}

template <int BITS>
void gemv_rows_bits(const CpuMatmulArgs& a, int64_t n0, int64_t n1) {
  const Decoder<BITS> dec;
  for (int m0 = 0; m0 < a.M;) {  // x rows in blocks of up to 4: each chunk decoded once per block
    const int mb = a.M - m0 >= 4 ? 4 : static_cast<int>(a.M - m0);
    switch (mb) {
      case 4: gemv_block_gs<BITS, 4>(a, dec, n0, n1, m0); break;
      case 3: gemv_block_gs<BITS, 3>(a, dec, n0, n1, m0); break;
      case 2: gemv_block_gs<BITS, 2>(a, dec, n0, n1, m0); break;
      default: gemv_block_gs<BITS, 1>(a, dec, n0, n1, m0); break;
    }
    m0 += mb;
  }
}

}  // namespace

bool split_x_digits(const float* x, int64_t M, int64_t K, int64_t gs, int8_t* dig, float* step) {
  const int64_t G = K / gs;
  const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  const __m512 inf = _mm512_set1_ps(__builtin_inff());
  const __m512i half_base = _mm512_set1_epi32(128), byte = _mm512_set1_epi32(255);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < G; ++g) {
      const float* xg = x + m * K + g * gs;
      __m512 mx = _mm512_setzero_ps();
      __mmask16 bad = 0;
      for (int64_t k = 0; k < gs; k += 16) {
        const __m512 ax = _mm512_and_ps(_mm512_loadu_ps(xg + k), abs_mask);
        bad |= _mm512_cmp_ps_mask(ax, inf, _CMP_NLT_UQ);  // |x| >= inf, or NaN
        mx = _mm512_max_ps(mx, ax);
      }
      if (bad) return false;
      const float gmax = _mm512_reduce_max_ps(mx);
      step[m * G + g] = gmax / 4194304.0f;  // 2^22 units per group max
      const __m512 inv = _mm512_set1_ps(gmax > 0.f ? 4194304.0f / gmax : 0.f);
      for (int64_t k = 0; k < gs; k += 16) {
        // x * 2^22 / max rounded to the nearest integer (|xi| <= 2^22), then balanced digits:
        // d0 = ((xi + 128) & 255) - 128, r = (xi - d0) / 256 (exact), d1 likewise, d2 = rest.
        const __m512i xi = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xg + k), inv));
        const __m512i d0 = _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(xi, half_base), byte), half_base);
        const __m512i r = _mm512_srai_epi32(_mm512_sub_epi32(xi, d0), 8);
        const __m512i d1 = _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(r, half_base), byte), half_base);
        const __m512i d2 = _mm512_srai_epi32(_mm512_sub_epi32(r, d1), 8);
        const int64_t i = m * K + g * gs + k;
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dig + i), _mm512_cvtepi32_epi8(d0));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dig + M * K + i), _mm512_cvtepi32_epi8(d1));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dig + 2 * M * K + i), _mm512_cvtepi32_epi8(d2));
      }
    }
  }
  return true;
}

void gemv_rows_vnni(const CpuMatmulArgs& a, int64_t n0, int64_t n1) {
  switch (a.bits) {
    case 2: gemv_rows_bits<2>(a, n0, n1); break;
    case 3: gemv_rows_bits<3>(a, n0, n1); break;
    default: gemv_rows_bits<4>(a, n0, n1); break;
  }
}

}  // namespace pyfast::cherryq

#pragma GCC pop_options
#endif  // x86
