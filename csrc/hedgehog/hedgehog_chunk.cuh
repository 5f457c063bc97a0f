// Fused Hedgehog forward (window 0), float16 / bfloat16 on tensor cores (mma_m16n8k16, fp32
// accumulation): torch-free device code (launcher: hedgehog_cuda.cu).
//
// Grid (Dv tiles of kDvTile, query heads, sequences); kFwdThreads = 128 threads = 4 warps. The
// CTA walks its sequence in chunks of kChunk = 64 tokens; warp w owns rows 16w .. 16w + 15 of
// the chunk (one mma M tile). The feature maps are never written to global memory:
//   stats pass   u = x W + b is computed in tiles of kUTile = 32 features (A = x rows straight
//                from global memory, B = W columns), keeping per row the running max and sum of
//                exp(u) and of exp(-u) (online softmax) for q and for k;
//   feature pass the same u tiles again, now normalized: phi+ = exp(u - m+) / s+ and
//                phi- = exp(-u - m-) / s-, a tile of kFeat = 64 features (32 of each sign), used
//                at once:
//                  phi_q (registers, C fragments re-packed as A fragments):
//                      A_qk  += phi_q phi_k^T     (phi_k tile in shared memory, pk_s)
//                      O     += phi_q S           (S rows of the tile staged as T, st_s, scaled: below)
//                      den   += phi_q . z         (z in shared memory, float32)
//                  phi_k: S[tile rows] += phi_k^T V (warp w: 16 feature rows x kDvTile), z += sum phi_k
//   after the tiles, causal: O += mask(A_qk) V, den += rowsum(mask(A_qk)); out = O / (den + eps).
// Non-causal runs two passes: the state over the whole sequence (update only), then the outputs
// from it (no intra-chunk term). The running state S of each (sequence, query head) lives in a
// float32 workspace (2F x Dv can exceed shared memory; each query head of a GQA group keeps its
// own copy, so CTAs never share writes); z lives in shared memory. The group's first query head
// writes the final state.
//
// Masks instead of size requirements: rows past the sequence end load as 0 and their phi_k is
// forced to 0 (they add nothing to S, z or A_qk), columns past D / F / Dv load as 0 and features
// past F are 0, so any T, D, F <= kMaxFeatures, Dv work. Shared memory rows are padded by
// kPad elements so the 32-bit fragment reads of a warp spread over the banks.
// State scale: S sums every token plus the initial state, so it leaves float16's range (65504)
// where float32 holds it. Each chunk stages c S with c = 2^k chosen from the exact max |S| of the
// CTA's slice (every thread tracks the max |S| it writes: the S0 load, the S update, which rewrites
// the whole slice each chunk), so that 2^14 <= c max|S| < 2^15; O accumulates c phi_q S and is
// multiplied by 1 / c before the A_qk V term adds in. Powers of two keep both steps exact. The
// scale goes up as well as down: staged values then keep float16's relative precision down to
// 2^-28 max|S| instead of going subnormal below 2^-14 (a small state, e.g. early in a sequence).
// Uniform for bfloat16 (float32's range: the scale changes nothing there but the exponent).
// NaN: a NaN in q or k reaches the rows (and later chunks) whose sums include it; a NaN in v at
// token s also reaches the earlier rows of s's chunk (0 * NaN in the masked A_qk V product).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "common/cuda_dtype.cuh"
#include "common/cuda_mma.cuh"
#include "hedgehog/hedgehog_cuda.h"

namespace pyfast {
namespace hedgehog {
namespace dev {

constexpr int kChunk = 64;
constexpr int kFwdThreads = 128;
constexpr int kUTile = 32;            // u columns per tile (per sign: phi tile = 2 * kUTile features)
constexpr int kFeat = 2 * kUTile;     // features per phi tile
constexpr int kDvTile = 32;           // value columns per CTA
constexpr int kDvN = kDvTile / 8;      // their mma N tiles
constexpr int kPad = 8;               // shared row padding (elements)
constexpr int kRowStride = 64 + kPad;  // of pk_s [key][feature], st_s [dv][feature], vt_s [dv][key]
constexpr float kStatInit = -3.0e38f;  // running max before any column (finite: no inf - inf)
constexpr int kScaleTarget = 14;      // c max|S| in [2^14, 2^15): float16's largest binade is 2^15
constexpr int kScaleMax = 113;        // |k| <= 113: c and 1 / c stay normal floats; any finite max fits
static_assert(kFwdThreads / 32 * 16 == kChunk && kFeat == 64 && kDvN % 2 == 0, "tiling");

struct ForwardArgs {
  const void *q, *k, *v;
  int64_t q_sb, q_sh, q_st, k_sb, k_sh, k_st, v_sb, v_sh, v_st;
  const void *qw, *kw, *qb, *kb;
  const float *S0, *z0;
  const int32_t* cu;
  void* out;
  float *S_out, *z_out, *ws;
  int Hq, Hkv, G, T, D, F, Dv;
  float eps;
};

__device__ __forceinline__ uint16_t bits(__half h) { return static_cast<__half_raw>(h).x; }
__device__ __forceinline__ uint16_t bits(__nv_bfloat16 h) { return static_cast<__nv_bfloat16_raw>(h).x; }
template <typename T>
__device__ __forceinline__ float bits_to_float(uint16_t b) {
  if constexpr (std::is_same<T, __half>::value) {
    return __half2float(__half_raw{b});
  } else {
    return __uint_as_float(static_cast<uint32_t>(b) << 16);
  }
}
template <typename T>
__device__ __forceinline__ uint32_t pack(float lo, float hi) {
  return bits(from_float<T>(lo)) | static_cast<uint32_t>(bits(from_float<T>(hi))) << 16;
}
// Element (r, c) of a row-major matrix as T bits, 0 outside [0, nr) x [0, nc).
template <typename T>
__device__ __forceinline__ uint32_t elem(const T* p, int64_t ld, int r, int c, int nr, int nc) {
  return r < nr && c < nc ? bits(p[r * ld + c]) : 0u;
}
__device__ __forceinline__ uint32_t ld32(const uint16_t* p) { return *reinterpret_cast<const uint32_t*>(p); }
__device__ __forceinline__ uint32_t join(uint16_t lo, uint16_t hi) { return lo | static_cast<uint32_t>(hi) << 16; }

// u[j] (C fragments of n tile j: columns f0 + 8j + 2t + {0, 1}, rows g, g + 8) of x W + bias for
// the warp's 16 rows of x (row stride ld, nrow valid rows).
template <typename T>
__device__ void u_tile(float (&u)[4][4], const T* x, int64_t ld, int nrow, const T* w, const T* bias, int D, int F,
                       int f0, int g, int t) {
#pragma unroll
  for (int j = 0; j < 4; ++j) u[j][0] = u[j][1] = u[j][2] = u[j][3] = 0.0f;
  for (int k0 = 0; k0 < D; k0 += 16) {
    uint32_t a[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // A: row g + 8 (i % 2), columns k0 + 2t + 8 (i / 2) + {0, 1}
      const int r = g + 8 * (i & 1), c = k0 + 2 * t + 8 * (i >> 1);
      a[i] = elem(x, ld, r, c, nrow, D) | elem(x, ld, r, c + 1, nrow, D) << 16;
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // B (col-major K x N = W[k0.., f0 + 8j..]): rows 2t + 8i + {0, 1}, column g
      const int n = f0 + 8 * j + g;
      const uint32_t b[2] = {elem(w, F, k0 + 2 * t, n, D, F) | elem(w, F, k0 + 2 * t + 1, n, D, F) << 16,
                             elem(w, F, k0 + 2 * t + 8, n, D, F) | elem(w, F, k0 + 2 * t + 9, n, D, F) << 16};
      mma_m16n8k16<T>(u[j], a, b, u[j]);
    }
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int f = f0 + 8 * j + 2 * t + (i & 1);
      if (bias != nullptr && f < F) u[j][i] += to_float(bias[f]);
    }
  }
}

// Softmax statistics of u and -u for the lane's two rows (g, g + 8): running max m and sum s.
struct RowStats {
  float mp[2], sp[2], mn[2], sn[2];
  __device__ void init() {
#pragma unroll
    for (int r = 0; r < 2; ++r) mp[r] = mn[r] = kStatInit, sp[r] = sn[r] = 0.0f;
  }
  // Online update with one u tile (columns >= F skipped).
  __device__ void add(const float (&u)[4][4], int f0, int F, int t) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float tp = kStatInit, tn = kStatInit;
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int c = 0; c < 2; ++c)
          if (f0 + 8 * j + 2 * t + c < F) tp = fmaxf(tp, u[j][2 * r + c]), tn = fmaxf(tn, -u[j][2 * r + c]);
      const float np = fmaxf(mp[r], tp), nn = fmaxf(mn[r], tn);
      float ap = sp[r] * expf(mp[r] - np), an = sn[r] * expf(mn[r] - nn);
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int c = 0; c < 2; ++c)
          if (f0 + 8 * j + 2 * t + c < F) ap += expf(u[j][2 * r + c] - np), an += expf(-u[j][2 * r + c] - nn);
      mp[r] = np, mn[r] = nn, sp[r] = ap, sn[r] = an;
    }
  }
  // Combine the 4 lanes (t = 0..3) of each row, then keep 1 / sum.
  __device__ void finish() {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      for (int o = 1; o < 4; o <<= 1) {
        const float op = __shfl_xor_sync(0xFFFFFFFFu, mp[r], o), os = __shfl_xor_sync(0xFFFFFFFFu, sp[r], o);
        const float on = __shfl_xor_sync(0xFFFFFFFFu, mn[r], o), ons = __shfl_xor_sync(0xFFFFFFFFu, sn[r], o);
        const float np = fmaxf(mp[r], op), nn = fmaxf(mn[r], on);
        sp[r] = sp[r] * expf(mp[r] - np) + os * expf(op - np);
        sn[r] = sn[r] * expf(mn[r] - nn) + ons * expf(on - nn);
        mp[r] = np, mn[r] = nn;
      }
      sp[r] = 1.0f / sp[r], sn[r] = 1.0f / sn[r];
    }
  }
};

// One side (q or k) of the warp: where its rows are and their statistics.
template <typename T>
struct Side {
  const T* x;  // the warp's first row
  int64_t ld;
  int nrow;  // valid rows (<= 0: none)
  const T *w, *bias;
  RowStats st;

  __device__ void stats(int D, int F, int g, int t) {
    st.init();
    for (int f0 = 0; f0 < F; f0 += kUTile) {
      float u[4][4];
      u_tile(u, x, ld, nrow, w, bias, D, F, f0, g, t);
      st.add(u, f0, F, t);
    }
    st.finish();
  }
  // phi[s][j]: sign s (0: +, 1: -) C fragments of the features f0 + 8j + 2t + {0, 1}; 0 past F and
  // on rows past nrow.
  __device__ void features(float (&phi)[2][4][4], int D, int F, int f0, int g, int t) {
    float u[4][4];
    u_tile(u, x, ld, nrow, w, bias, D, F, f0, g, t);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = i >> 1;
        const bool on = f0 + 8 * j + 2 * t + (i & 1) < F && g + 8 * r < nrow;
        phi[0][j][i] = on ? expf(u[j][i] - st.mp[r]) * st.sp[r] : 0.0f;
        phi[1][j][i] = on ? expf(-u[j][i] - st.mn[r]) * st.sn[r] : 0.0f;
      }
    }
  }
};

// 2^k as a float from its exponent bits (|k| <= 126).
__device__ __forceinline__ float pow2(int k) { return __int_as_float((127 + k) << 23); }

// The max |S| of the CTA's state slice, for the state scale. Kept in shared memory and read at
// each use, not held in registers: the forward kernel has none to spare (ptxas spilled when the
// scale or a running max stayed live across the tile loop, or when publish sat inside chunk()).
struct StateMax {
  float thread[kFwdThreads];     // max |S| each thread wrote since the slice was last rewritten
  float warp[kFwdThreads / 32];  // their warp maxima as a chunk starts: published before its first
                                 // barrier, read until its last tile's middle barrier, so every
                                 // reader is done before any warp publishes the next chunk's

  __device__ void note(float s) { thread[threadIdx.x] = fmaxf(thread[threadIdx.x], fabsf(s)); }
  // Before a chunk (its first barrier follows): the warp's max. fmaxf skips NaN (a NaN of S stays
  // NaN when staged).
  __device__ void publish() {
    float m = thread[threadIdx.x];
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xFFFFFFFFu, m, o));
    if (threadIdx.x % 32 == 0) warp[threadIdx.x / 32] = m;
  }
  // After it: k of c = 2^k for the CTA's max m (0, subnormal, inf: k clamped).
  __device__ int scale() const {
    const float m = fmaxf(fmaxf(warp[0], warp[1]), fmaxf(warp[2], warp[3]));
    const int e = (__float_as_int(m) >> 23) & 0xFF;  // m >= 0: floor(log2 m) = e - 127 when normal
    return max(-kScaleMax, min(kScaleMax, kScaleTarget + 127 - e));
  }
};
static_assert(kFwdThreads / 32 == 4, "StateMax::scale reads 4 warp maxima");

// Global row of tile feature i (0..63): + features f0 .. f0 + 31, then - features F + f0 ...
__device__ __forceinline__ int feat_row(int i, int f0, int F) { return (i < kUTile ? 0 : F) + f0 + i % kUTile; }
__device__ __forceinline__ bool feat_ok(int i, int f0, int F) { return f0 + i % kUTile < F; }

template <typename T, bool kOut, bool kUpdate>
__device__ void chunk(const ForwardArgs& a, Side<T>& qs, Side<T>& ks, int t0, int len, int dv0, float* S,
                      uint16_t (&pk_s)[kChunk][kRowStride], uint16_t (&st_s)[kDvTile][kRowStride],
                      uint16_t (&vt_s)[kDvTile][kRowStride], float* z_s, StateMax& smax, T* out_rows) {
  constexpr bool kIntra = kOut && kUpdate;  // causal: both in one pass
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int F = a.F, Dv = a.Dv;
  const int rows = min(kChunk, len - t0);  // valid tokens of the chunk
  __syncthreads();  // the previous chunk's readers of vt_s are done; smax.warp (published) complete
  if (kUpdate) smax.thread[tid] = 0.0f;  // this chunk rewrites the whole slice
  if (kUpdate || kIntra) {
    const T* v = static_cast<const T*>(a.v);
    for (int e = tid; e < kChunk * kDvTile; e += kFwdThreads) {  // coalesced along dv
      const int key = e / kDvTile, dv = e % kDvTile;
      vt_s[dv][key] = static_cast<uint16_t>(elem(v, a.v_st, key, dv0 + dv, rows, Dv));
    }
  }
  if (kOut) qs.stats(a.D, F, g, t);
  if (kUpdate) ks.stats(a.D, F, g, t);

  float o[kDvN][4] = {}, s_qk[8][4] = {}, den[2] = {0.0f, 0.0f};
  for (int f0 = 0; f0 < F; f0 += kUTile) {
    uint32_t pq[4][4];  // phi_q as A fragments of the 4 k steps (features 16s .. 16s + 15 of the tile)
    if (kOut) {
      float phi[2][4][4];
      qs.features(phi, a.D, F, f0, g, t);
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        const float(&lo)[4] = phi[s / 2][2 * (s % 2)];
        const float(&hi)[4] = phi[s / 2][2 * (s % 2) + 1];
        pq[s][0] = pack<T>(lo[0], lo[1]), pq[s][1] = pack<T>(lo[2], lo[3]);
        pq[s][2] = pack<T>(hi[0], hi[1]), pq[s][3] = pack<T>(hi[2], hi[3]);
      }
#pragma unroll
      for (int s = 0; s < 2; ++s)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int f = f0 + 8 * j + 2 * t + (i & 1);
            if (f < F) den[i >> 1] = fmaf(phi[s][j][i], z_s[s * F + f], den[i >> 1]);
          }
      for (int e = tid; e < kFeat * kDvTile; e += kFwdThreads) {  // S rows of the tile, as T, transposed
        const int i = e / kDvTile, dv = e % kDvTile;
        const bool ok = feat_ok(i, f0, F) && dv0 + dv < Dv;
        const float x = ok ? S[static_cast<int64_t>(feat_row(i, f0, F)) * Dv + dv0 + dv] * pow2(smax.scale()) : 0.0f;
        st_s[dv][i] = bits(from_float<T>(x));
      }
    }
    if (kUpdate) {
      float phi[2][4][4];
      ks.features(phi, a.D, F, f0, g, t);
#pragma unroll
      for (int s = 0; s < 2; ++s)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int c = s * kUTile + 8 * j + 2 * t, r = 16 * warp + g;
          *reinterpret_cast<uint32_t*>(&pk_s[r][c]) = pack<T>(phi[s][j][0], phi[s][j][1]);
          *reinterpret_cast<uint32_t*>(&pk_s[r + 8][c]) = pack<T>(phi[s][j][2], phi[s][j][3]);
        }
    }
    __syncthreads();  // pk_s, st_s (and vt_s) complete
    if (kOut) {
#pragma unroll
      for (int n = 0; n < kDvN; ++n)
#pragma unroll
        for (int s = 0; s < 4; ++s) {  // O[16, dv] += phi_q[16, feat] S[feat, dv]: B(k, n) = st_s[n][k]
          const uint32_t b[2] = {ld32(&st_s[8 * n + g][16 * s + 2 * t]), ld32(&st_s[8 * n + g][16 * s + 2 * t + 8])};
          mma_m16n8k16<T>(o[n], pq[s], b, o[n]);
        }
      if (f0 + kUTile >= F) {  // last tile: O = c phi_q S, complete; undo the state scale (before A_qk V)
        const float inv = pow2(-smax.scale());
#pragma unroll
        for (int n = 0; n < kDvN; ++n)
#pragma unroll
          for (int i = 0; i < 4; ++i) o[n][i] *= inv;
      }
    }
    if (kIntra) {
#pragma unroll
      for (int n = 0; n < 8; ++n)
#pragma unroll
        for (int s = 0; s < 4; ++s) {  // A_qk[16, key] += phi_q[16, feat] phi_k[key, feat]^T
          const uint32_t b[2] = {ld32(&pk_s[8 * n + g][16 * s + 2 * t]), ld32(&pk_s[8 * n + g][16 * s + 2 * t + 8])};
          mma_m16n8k16<T>(s_qk[n], pq[s], b, s_qk[n]);
        }
    }
    if (kUpdate) {
      // S[feat 16w.., dv] += phi_k^T[feat, key] V[key, dv]: A(m = feat, k = key) = pk_s[key][feat].
      const int m0 = 16 * warp;
      const int r0 = feat_row(m0 + g, f0, F), r1 = feat_row(m0 + g + 8, f0, F);
      const bool ok0 = feat_ok(m0 + g, f0, F), ok1 = feat_ok(m0 + g + 8, f0, F);
      // In two halves of kDvTile / 2 columns (fewer live accumulators).
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        float acc[kDvN / 2][4];
#pragma unroll
        for (int n = 0; n < kDvN / 2; ++n)
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int dv = dv0 + 8 * (kDvN / 2 * half + n) + 2 * t + (i & 1);
            const bool ok = (i < 2 ? ok0 : ok1) && dv < Dv;
            acc[n][i] = ok ? S[static_cast<int64_t>(i < 2 ? r0 : r1) * Dv + dv] : 0.0f;
          }
#pragma unroll
        for (int s = 0; s < 4; ++s) {
          const int k0 = 16 * s + 2 * t;
          const uint32_t af[4] = {join(pk_s[k0][m0 + g], pk_s[k0 + 1][m0 + g]),
                                  join(pk_s[k0][m0 + g + 8], pk_s[k0 + 1][m0 + g + 8]),
                                  join(pk_s[k0 + 8][m0 + g], pk_s[k0 + 9][m0 + g]),
                                  join(pk_s[k0 + 8][m0 + g + 8], pk_s[k0 + 9][m0 + g + 8])};
#pragma unroll
          for (int n = 0; n < kDvN / 2; ++n) {  // B(k = key, n = dv) = vt_s[dv][key]
            const int c = 8 * (kDvN / 2 * half + n) + g;
            const uint32_t b[2] = {ld32(&vt_s[c][k0]), ld32(&vt_s[c][k0 + 8])};
            mma_m16n8k16<T>(acc[n], af, b, acc[n]);
          }
        }
#pragma unroll
        for (int n = 0; n < kDvN / 2; ++n)
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int dv = dv0 + 8 * (kDvN / 2 * half + n) + 2 * t + (i & 1);
            if ((i < 2 ? ok0 : ok1) && dv < Dv) S[static_cast<int64_t>(i < 2 ? r0 : r1) * Dv + dv] = acc[n][i];
          }
        float m = 0.0f;  // acc is 0 (or NaN, which fmaxf skips) outside the slice: no mask needed
#pragma unroll
        for (int n = 0; n < kDvN / 2; ++n)
#pragma unroll
          for (int i = 0; i < 4; ++i) m = fmaxf(m, fabsf(acc[n][i]));
        smax.note(m);
      }
      if (tid < kFeat && feat_ok(tid, f0, F)) {  // z += sum over the chunk's keys (the phi_k used for S)
        float sum = 0.0f;
        for (int key = 0; key < kChunk; ++key) sum += bits_to_float<T>(pk_s[key][tid]);
        z_s[feat_row(tid, f0, F)] += sum;
      }
    }
    __syncthreads();  // pk_s / st_s are rewritten by the next tile; z_s rows of this tile final
  }
  if (!kOut) return;
  if (kIntra) {  // O += mask(A_qk) V, keys s <= query t (rows past the end have phi_k = 0)
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      uint32_t af[4];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float(&c)[4] = s_qk[2 * s + h];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int q = 16 * warp + g + 8 * (i >> 1), key = 8 * (2 * s + h) + 2 * t + (i & 1);
          c[i] = key <= q ? c[i] : 0.0f;  // a select: NaN of a later key stays out
          den[i >> 1] += c[i];
        }
        af[2 * h] = pack<T>(c[0], c[1]), af[2 * h + 1] = pack<T>(c[2], c[3]);
      }
#pragma unroll
      for (int n = 0; n < kDvN; ++n) {
        const uint32_t b[2] = {ld32(&vt_s[8 * n + g][16 * s + 2 * t]), ld32(&vt_s[8 * n + g][16 * s + 2 * t + 8])};
        mma_m16n8k16<T>(o[n], af, b, o[n]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    den[r] += __shfl_xor_sync(0xFFFFFFFFu, den[r], 1);
    den[r] += __shfl_xor_sync(0xFFFFFFFFu, den[r], 2);
    den[r] = 1.0f / (den[r] + a.eps);
  }
#pragma unroll
  for (int n = 0; n < kDvN; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = 16 * warp + g + 8 * (i >> 1), dv = dv0 + 8 * n + 2 * t + (i & 1);
      if (row < rows && dv < Dv) out_rows[static_cast<int64_t>(row) * Dv + dv] = from_float<T>(o[n][i] * den[i >> 1]);
    }
}

template <typename T>
__global__ void __launch_bounds__(kFwdThreads) forward_kernel(const ForwardArgs a, bool causal) {
  __shared__ __align__(16) uint16_t pk_s[kChunk][kRowStride];
  __shared__ __align__(16) uint16_t st_s[kDvTile][kRowStride];
  __shared__ __align__(16) uint16_t vt_s[kDvTile][kRowStride];
  __shared__ float z_s[2 * kMaxFeatures];
  __shared__ StateMax smax;

  const int dv0 = blockIdx.x * kDvTile, h = blockIdx.y, n = blockIdx.z, j = h / a.G;
  const int tid = threadIdx.x, warp = tid / 32;
  const int F2 = 2 * a.F, Dv = a.Dv;
  const int b = a.cu == nullptr ? n : 0;
  const int start = a.cu == nullptr ? 0 : a.cu[n];
  const int len = a.cu == nullptr ? a.T : a.cu[n + 1] - start;
  const int64_t wq = static_cast<int64_t>(a.D) * a.F;

  // The running state: this (sequence, query head)'s workspace slice, columns dv0 .. of every row.
  float* S = a.ws + (static_cast<int64_t>(n) * a.Hq + h) * F2 * Dv;
  const int64_t state = (static_cast<int64_t>(n) * a.Hkv + j) * F2;
  smax.thread[tid] = 0.0f;
  for (int e = tid; e < F2 * kDvTile; e += kFwdThreads) {
    const int f = e / kDvTile, dv = dv0 + e % kDvTile;
    if (dv < Dv) {
      const float s0 = a.S0 == nullptr ? 0.0f : a.S0[(state + f) * Dv + dv];
      S[static_cast<int64_t>(f) * Dv + dv] = s0;
      smax.note(s0);
    }
  }
  for (int f = tid; f < F2; f += kFwdThreads) z_s[f] = a.z0 == nullptr ? 0.0f : a.z0[state + f];

  const T* q = static_cast<const T*>(a.q) + b * a.q_sb + h * a.q_sh + static_cast<int64_t>(start) * a.q_st;
  const T* k = static_cast<const T*>(a.k) + b * a.k_sb + j * a.k_sh + static_cast<int64_t>(start) * a.k_st;
  const T* v = static_cast<const T*>(a.v) + b * a.v_sb + j * a.v_sh + static_cast<int64_t>(start) * a.v_st;
  T* out = static_cast<T*>(a.out) + ((static_cast<int64_t>(b) * a.Hq + h) * a.T + start) * Dv;
  const T* qb = a.qb == nullptr ? nullptr : static_cast<const T*>(a.qb) + static_cast<int64_t>(h) * a.F;
  const T* kb = a.kb == nullptr ? nullptr : static_cast<const T*>(a.kb) + static_cast<int64_t>(j) * a.F;
  Side<T> qs{}, ks{};
  qs.w = static_cast<const T*>(a.qw) + h * wq, qs.bias = qb, qs.ld = a.q_st;
  ks.w = static_cast<const T*>(a.kw) + j * wq, ks.bias = kb, ks.ld = a.k_st;

  ForwardArgs c = a;  // v shifted to the chunk's first row below
  for (int pass = causal ? 1 : 0; pass < 2; ++pass) {
    for (int t0 = 0; t0 < len; t0 += kChunk) {
      const int r0 = t0 + 16 * warp;
      qs.x = q + static_cast<int64_t>(r0) * a.q_st, qs.nrow = len - r0;
      ks.x = k + static_cast<int64_t>(r0) * a.k_st, ks.nrow = len - r0;
      c.v = v + static_cast<int64_t>(t0) * a.v_st;
      T* rows = out + static_cast<int64_t>(t0) * Dv;
      if (causal || pass == 1) smax.publish();  // max |S| as the chunk starts: S0 or the last rewrite
      if (causal) {
        chunk<T, true, true>(c, qs, ks, t0, len, dv0, S, pk_s, st_s, vt_s, z_s, smax, rows);
      } else if (pass == 0) {
        chunk<T, false, true>(c, qs, ks, t0, len, dv0, S, pk_s, st_s, vt_s, z_s, smax, rows);
      } else {
        chunk<T, true, false>(c, qs, ks, t0, len, dv0, S, pk_s, st_s, vt_s, z_s, smax, rows);
      }
    }
  }

  if (a.S_out == nullptr || h % a.G != 0) return;  // the group's first query head writes the state
  __syncthreads();  // z_s final (also for a sequence of length 0)
  for (int e = tid; e < F2 * kDvTile; e += kFwdThreads) {
    const int f = e / kDvTile, dv = dv0 + e % kDvTile;
    if (dv < Dv) a.S_out[(state + f) * Dv + dv] = S[static_cast<int64_t>(f) * Dv + dv];
  }
  if (blockIdx.x == 0)
    for (int f = tid; f < F2; f += kFwdThreads) a.z_out[state + f] = z_s[f];
}

}  // namespace dev
}  // namespace hedgehog
}  // namespace pyfast
