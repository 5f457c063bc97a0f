// CherryQ GEMV for CPUs with AVX-512 VNNI + VBMI (Zen 4, Ice Lake and later). Reached only when
// the running CPU has them (runtime check in cherryq_cpu.cpp); nothing outside this unit is
// compiled for these extensions.
//
// Why: the fp32 GEMV (cherryq_cpu_kernel.h) spends ~4 vector ops per 16 weights decoding codes
// into floats and FMA-ing them. Here 64 codes are decoded as bytes (vpermd + vpmultishiftqb, and
// a masked byte add for the third bit of 3-bit codes) and multiplied by x with vpdpbusd (64 u8 x
// s8 products per op). To keep fp32 accuracy x is not rounded to int8 but split, per group of
// group_size columns, into a 23-bit fixed-point value written as three balanced base-256 digits
// d0 + 256 d1 + 65536 d2 (each int8); one vpdpbusd per digit plane, recombined in int32 at the
// end of the group (no overflow: each lane sums group_size/16 products, |sum| < 2^30 for
// group_size <= 256), then scaled in fp32. (Two planes would be ~20% faster but round x to 2^-15
// of its group's max: visible in outputs with cancellation, so not done, even for fp16/bf16 x.)
// On Zen 4 vpdpbusd, vpermd, vpmultishiftqb, shifts, cvt and FMA on zmm each issue about once per
// cycle, so speed is their count per group (~14 for 3-bit g128); the scales of 16 groups are
// converted at once for that reason.
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
// Smallest group max of x split into digits (split_x_digits). The epilogue multiplies the step
// (group max / 2^22) by the fp16 weight scale (>= 2^-24, its smallest subnormal) in fp32: from a
// group max of 2^-80 on, that product stays >= 2^-126, a normal float, so no precision is lost.
constexpr float kMinGroupMax = 0x1p-80f;
constexpr int kPrefetchBytes = 4096;  // ~64 cache lines (~2.7 rows of 4096 3-bit codes) ahead

// Decodes 64 codes (2 * BITS packed words) into one byte each, code c at byte c.
// The low (up to 2) bits: one vpermd puts the packed qword of each 32-code pack into the four
// output qwords that receive its codes, one vpmultishiftqb moves code 8q + j's bits of qword q to
// byte j, an AND clears the rest. 3 bits: the third bit of the 64 codes is the 1-bit word of each
// pack; the two words form a 64-bit mask, and a masked byte add puts 4 where it is set.
template <int BITS>
struct Decoder {
  __m512i idx, ctl, mask, four;

  Decoder() {
    alignas(64) int32_t il[16];
    alignas(64) uint8_t cl[64];
    constexpr int lo_bits = BITS == 3 ? 2 : BITS;
    for (int q = 0; q < 8; ++q) {
      for (int j = 0; j < 8; ++j) {
        const int c = 8 * q + j;  // code index within the chunk
        if (BITS == 4) cl[c] = static_cast<uint8_t>(4 * j);                 // word q, nibble j
        if (BITS == 2) cl[c] = static_cast<uint8_t>(16 * (q % 2) + 2 * j);  // word q/2
        if (BITS == 3) cl[c] = static_cast<uint8_t>(2 * (c % 32));          // 2-bit qword of pack q/4
      }
      if (BITS == 4) il[2 * q] = il[2 * q + 1] = q;
      if (BITS == 2) il[2 * q] = il[2 * q + 1] = q / 2;
      if (BITS == 3) il[2 * q] = 3 * (q / 4), il[2 * q + 1] = 3 * (q / 4) + 1;  // words (0,1) or (3,4)
    }
    idx = _mm512_load_si512(il);
    ctl = _mm512_load_si512(cl);
    mask = _mm512_set1_epi8(static_cast<char>((1 << lo_bits) - 1));
    four = _mm512_set1_epi8(4);
  }

  template <bool EXACT_LOAD>
  inline __m512i codes(const int32_t* w) const {
    __m512i raw;
    if (BITS == 4 || (BITS == 3 && !EXACT_LOAD))
      raw = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
    if (BITS == 2) raw = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
    if (BITS == 3 && EXACT_LOAD)
      raw = _mm512_inserti32x4(_mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))),
                               _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + 4)), 1);
    const __m512i lo = _mm512_and_si512(_mm512_multishift_epi64_epi8(ctl, _mm512_permutexvar_epi32(idx, raw)), mask);
    if (BITS != 3) return lo;
    const uint64_t hi = static_cast<uint32_t>(w[2]) | static_cast<uint64_t>(static_cast<uint32_t>(w[5])) << 32;
    return _mm512_mask_add_epi8(lo, _cvtu64_mask64(hi), lo, four);
  }
};

// CHUNKS = group_size / 64 at compile time, so the chunk loop unrolls and a group's codes and
// the MB accumulators stay in registers.
template <int BITS, int MB, int CHUNKS, bool EXACT_LOAD>
void gemv_rows_block(const CpuMatmulArgs& a, const Decoder<BITS>& shared, int64_t n0, int64_t n1, int m0) {
  const Decoder<BITS> dec = shared;  // a local copy: the shuffle constants stay in registers
  const int64_t K = a.K, G = K / a.group_size, words_per_row = K / 32 * BITS;
  const int8_t* d[MB][3];
  for (int m = 0; m < MB; ++m)
    for (int p = 0; p < 3; ++p) d[m][p] = a.xdig + (p * a.M + m0 + m) * K;
  for (int64_t n = n0; n < n1; ++n) {
    const int32_t* wrow = a.qweight + n * words_per_row;
    const uint16_t* srow = a.scales + n * G;
    const uint16_t* zrow = a.zeros + n * G;
    __m512 tot[MB], ztot[MB];
    for (int m = 0; m < MB; ++m) tot[m] = ztot[m] = _mm512_setzero_ps();
    for (int64_t g0 = 0; g0 < G; g0 += 16) {
      // 16 groups' fp16 scales at once, times x's step: one broadcast load per group below.
      const int64_t g1 = G - g0 >= 16 ? g0 + 16 : G;
      const __mmask16 live = static_cast<__mmask16>((1u << (g1 - g0)) - 1);
      const __m512 sc = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(live, srow + g0));
      const __m512 ze = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(live, zrow + g0));
      alignas(64) float sx[MB][16];
      for (int m = 0; m < MB; ++m) {
        const int64_t xg = (m0 + m) * G + g0;
        _mm512_store_ps(sx[m], _mm512_mul_ps(sc, _mm512_maskz_loadu_ps(live, a.xstep + xg)));
        ztot[m] = _mm512_fmadd_ps(ze, _mm512_maskz_loadu_ps(live, a.xsum + xg), ztot[m]);
      }
      for (int64_t g = g0; g < g1; ++g) {
        const int32_t* pw = wrow + g * a.group_size / 32 * BITS;
        __builtin_prefetch(reinterpret_cast<const char*>(pw) + kPrefetchBytes);
        __m512i codes[CHUNKS];
        for (int c = 0; c < CHUNKS; ++c) codes[c] = dec.template codes<EXACT_LOAD>(pw + c * 2 * BITS);
        const int64_t k = g * a.group_size;
        for (int m = 0; m < MB; ++m) {
          // One accumulator per digit plane (short dependency chains), recombined in int32.
          __m512i acc[3];
          for (int p = 0; p < 3; ++p) {
            acc[p] = _mm512_setzero_si512();
            for (int c = 0; c < CHUNKS; ++c)
              acc[p] = _mm512_dpbusd_epi32(acc[p], codes[c], _mm512_loadu_si512(d[m][p] + k + c * kChunk));
          }
          const __m512i s = _mm512_add_epi32(acc[0], _mm512_add_epi32(_mm512_slli_epi32(acc[1], 8),
                                                                      _mm512_slli_epi32(acc[2], 16)));
          tot[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(sx[m][g - g0]), tot[m]);
        }
      }
    }
    float out[MB];
    for (int m = 0; m < MB; ++m) out[m] = _mm512_reduce_add_ps(_mm512_add_ps(tot[m], ztot[m]));
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
  for (int m0 = 0; m0 < a.M; m0 += 2) {  // x rows in pairs: each chunk decoded once per pair
    if (a.M - m0 >= 2)
      gemv_block_gs<BITS, 2>(a, dec, n0, n1, m0);
    else
      gemv_block_gs<BITS, 1>(a, dec, n0, n1, m0);
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
      // Below kMinGroupMax the step times a small weight scale goes subnormal (and below ~2^-104
      // 2^22 / gmax overflows to inf: wrong results, even in sign): such x goes to the fp32
      // kernel, which keeps fp32 accuracy at any magnitude.
      if (gmax > 0.f && gmax < kMinGroupMax) return false;
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
