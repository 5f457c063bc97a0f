// Hedgehog decode step: torch-free device code (launcher: hedgehog_cuda.cu).
//
// One CTA of kDecodeThreads = 256 threads per (kv head j, batch b), so the state of (b, j) is
// updated and then read by the same CTA: the update happens before the reads of every query head
// of the group without any grid-wide ordering.
//   1. phi_k = cat(softmax(u), softmax(-u)), u = k W_k + b_k: thread f computes u_f (a dot over D
//      with W read along f, coalesced), block reductions give both maxima and sums.
//   2. z += phi_k (thread f), kept in shared memory for the denominators.
//   3. Query heads in chunks of kHeadChunk: their phi_q rows in shared memory; warp i < chunk
//      computes head i's denominator phi_q . z.
//   4. S pass, 32 columns at a time: lane = column c, warp w = rows f = w, w + 8, ... Each thread
//      adds phi_k[f] v[c] to S[f, c] (first head chunk only), stores it, and accumulates
//      phi_q[i][f] S[f, c] for the chunk's heads; the 8 warps' partials are summed in shared
//      memory. A later head chunk re-reads S[f, c] from the thread that wrote it (no barrier).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "common/cuda_dtype.cuh"
#include "hedgehog/hedgehog_cuda.h"

namespace pyfast {
namespace hedgehog {
namespace dev {

constexpr int kDecodeThreads = 256;  // >= kMaxFeatures: one thread per feature
constexpr int kDecodeWarps = kDecodeThreads / 32;
constexpr int kHeadChunk = 8;  // query heads whose phi_q rows are held at once (<= kDecodeWarps)
constexpr int kMaxPhi = 2 * static_cast<int>(kMaxFeatures);
static_assert(kDecodeThreads >= kMaxFeatures && kHeadChunk <= kDecodeWarps, "decode CTA shape");

struct DecodeArgs {
  const void *q, *k, *v;
  int64_t q_sb, q_sh, k_sb, k_sh, v_sb, v_sh;
  const void *qw, *kw, *qb, *kb;
  float* S;
  float* z;
  void* out;
  int Hq, Hkv, G, D, F, Dv;
  float eps;
};

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
  return v;
}

// (a, b) reduced over the CTA (max or sum), returned to every thread. `red` holds 2 floats per
// warp; the leading barrier lets a previous call's readers finish before it is overwritten.
template <bool kMax>
__device__ __forceinline__ float2 block_reduce2(float a, float b, float* red) {
  a = kMax ? warp_max(a) : warp_sum(a);
  b = kMax ? warp_max(b) : warp_sum(b);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) red[2 * warp] = a, red[2 * warp + 1] = b;
  __syncthreads();
  a = red[0], b = red[1];
  for (int w = 1; w < kDecodeWarps; ++w) {
    a = kMax ? fmaxf(a, red[2 * w]) : a + red[2 * w];
    b = kMax ? fmaxf(b, red[2 * w + 1]) : b + red[2 * w + 1];
  }
  return make_float2(a, b);
}

// phi[0, 2F) = cat(softmax(u), softmax(-u)) of one row x [D]: thread f < F computes u_f. NaN in
// u makes every feature NaN (fmaxf skips it in the maxima, expf does not in the sums).
template <typename T>
__device__ void phi_row(const T* x, const T* w, const T* bias, int D, int F, float* phi, float* red) {
  const int f = threadIdx.x;
  const bool on = f < F;
  float u = 0.0f;
  if (on) {
    for (int d = 0; d < D; ++d) u = fmaf(to_float(x[d]), to_float(w[static_cast<int64_t>(d) * F + f]), u);
    if (bias != nullptr) u += to_float(bias[f]);
  }
  const float2 m = block_reduce2<true>(on ? u : -INFINITY, on ? -u : -INFINITY, red);
  const float ep = on ? expf(u - m.x) : 0.0f, en = on ? expf(-u - m.y) : 0.0f;
  const float2 s = block_reduce2<false>(ep, en, red);
  if (on) phi[f] = ep / s.x, phi[F + f] = en / s.y;
}

template <typename T>
__global__ void __launch_bounds__(kDecodeThreads) decode_kernel(const DecodeArgs a) {
  __shared__ float phik_s[kMaxPhi];
  __shared__ float z_s[kMaxPhi];
  __shared__ float phiq_s[kHeadChunk][kMaxPhi];
  __shared__ float part_s[kDecodeWarps][kHeadChunk][32];  // per-warp partial numerators
  __shared__ float den_s[kHeadChunk];
  __shared__ float red_s[2 * kDecodeWarps];

  const int j = blockIdx.x, b = blockIdx.y;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int F2 = 2 * a.F;
  const int64_t wsz = static_cast<int64_t>(a.D) * a.F;
  const T* k = static_cast<const T*>(a.k) + b * a.k_sb + j * a.k_sh;
  const T* v = static_cast<const T*>(a.v) + b * a.v_sb + j * a.v_sh;
  const T* kb = a.kb == nullptr ? nullptr : static_cast<const T*>(a.kb) + static_cast<int64_t>(j) * a.F;
  phi_row(k, static_cast<const T*>(a.kw) + j * wsz, kb, a.D, a.F, phik_s, red_s);
  __syncthreads();  // phik_s complete

  const int64_t bj = static_cast<int64_t>(b) * a.Hkv + j;
  float* S = a.S + bj * F2 * a.Dv;
  float* z = a.z + bj * F2;
  for (int f = tid; f < F2; f += kDecodeThreads) {
    const float zn = z[f] + phik_s[f];
    z[f] = zn;
    z_s[f] = zn;
  }

  for (int h0 = 0; h0 < a.G; h0 += kHeadChunk) {
    const int nh = min(kHeadChunk, a.G - h0);
    for (int i = 0; i < nh; ++i) {
      const int h = j * a.G + h0 + i;
      const T* q = static_cast<const T*>(a.q) + b * a.q_sb + h * a.q_sh;
      const T* qb = a.qb == nullptr ? nullptr : static_cast<const T*>(a.qb) + static_cast<int64_t>(h) * a.F;
      phi_row(q, static_cast<const T*>(a.qw) + h * wsz, qb, a.D, a.F, phiq_s[i], red_s);
    }
    __syncthreads();  // phiq_s and z_s complete; den_s / part_s of the previous chunk consumed
    if (warp < nh) {
      float d = 0.0f;
      for (int f = lane; f < F2; f += 32) d = fmaf(phiq_s[warp][f], z_s[f], d);
      d = warp_sum(d);
      if (lane == 0) den_s[warp] = d;
    }
    for (int c0 = 0; c0 < a.Dv; c0 += 32) {
      const int c = c0 + lane;
      float acc[kHeadChunk];
#pragma unroll
      for (int i = 0; i < kHeadChunk; ++i) acc[i] = 0.0f;
      if (c < a.Dv) {
        const float vc = h0 == 0 ? to_float(v[c]) : 0.0f;
        for (int f = warp; f < F2; f += kDecodeWarps) {
          float s = S[static_cast<int64_t>(f) * a.Dv + c];
          if (h0 == 0) {  // the update, once per kv head, before any read below
            s = fmaf(phik_s[f], vc, s);
            S[static_cast<int64_t>(f) * a.Dv + c] = s;
          }
#pragma unroll
          for (int i = 0; i < kHeadChunk; ++i) {
            if (i < nh) acc[i] = fmaf(phiq_s[i][f], s, acc[i]);  // rows i >= nh hold no phi
          }
        }
      }
#pragma unroll
      for (int i = 0; i < kHeadChunk; ++i) part_s[warp][i][lane] = acc[i];
      __syncthreads();  // partials (and den_s) complete
      for (int e = tid; e < nh * 32; e += kDecodeThreads) {
        const int i = e / 32, cc = c0 + e % 32;
        if (cc >= a.Dv) continue;
        float num = 0.0f;
        for (int w = 0; w < kDecodeWarps; ++w) num += part_s[w][i][e % 32];
        const int h = j * a.G + h0 + i;
        static_cast<T*>(a.out)[(static_cast<int64_t>(b) * a.Hq + h) * a.Dv + cc] = from_float<T>(num / (den_s[i] + a.eps));
      }
      __syncthreads();  // part_s is rewritten by the next column block
    }
  }
}

}  // namespace dev
}  // namespace hedgehog
}  // namespace pyfast
