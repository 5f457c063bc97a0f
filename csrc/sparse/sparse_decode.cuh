// Sparse-decoding kernels (Kinetics block top-k): torch-free device code.
//
// append_kv (3 kernels, one stream):
//   append_copy_kernel        k_new/v_new rows -> cache rows L .. L+Tn-1 (16-byte vectors when aligned)
//   append_block_keys_kernel  block_keys[j] = fp32 mean of the bs keys of each block that became full
//   append_advance_kernel     cache_seqlens += Tn, last, so the two kernels above read the old L
//   A sequence with L < 0 or L + Tn > Tmax is skipped by all three (left untouched).
//
// decode (dense and sparse share the attention and merge kernels):
//   score_kernel      sparse: score_j = qbar . block_keys[j] for the candidate full blocks, qbar the
//                     fp32 mean of the group's queries; stored once as order-preserving uint32 keys
//   select_kernel     sparse: one CTA per (b, kv head) finds the topk-th largest key by radix select
//                     (4 passes of 8 bits), then writes the kept full blocks in ascending order
//                     (sinks, selected, locals) and the partial tail last: a "block list" of
//                     kept_tokens tokens, at most nsel = min(sink + topk + local, NB) + 1 entries
//   attention_kernel  split-K flash-decoding over a list of tokens: dense = the implicit list
//                     0 .. L-1, sparse = the block list. Grid (splits, Hkv * head chunks, B); one
//                     CTA serves up to kMaxHeads query heads of one KV head, so K/V are read once
//                     per group
//   merge_kernel      combines the per-split partials (m, l, acc) when splits > 1
//
// Attention CTA (kAttnThreads = 128 threads), for a padded head dim DB in {64, 128, 256}:
//   * K and V tiles of NT tokens are staged in shared memory with cp.async (16-byte chunks, two
//     stages: the next tile loads while this one is computed). Tile row = DB elements, no padding:
//     every 16-byte access below is made by >= 8 lanes reading one row's consecutive chunks, which
//     is conflict-free per quarter-warp. Unaligned caches or head dims use element loads instead.
//   * A lane group of TPT lanes covers one row (NC chunks of EV elements per lane).
//     QK: group grp takes tokens grp, grp + HS, ...; each lane dots its chunks with every head's
//         query (fp32, in shared memory, pre-multiplied by scale * log2 e), the group reduces
//         with xor-shuffles and writes p_s[g][t] (base-2 logits).
//     softmax: one warp per head updates the running max m, sum l and the rescale factor alpha.
//     PV: lane group grp accumulates head g0 (+ HS, ...) in registers; when the CTA has fewer
//         heads than groups, HS / heads groups share a head, each taking every TP-th token, and
//         are summed through shared memory at the end.
//   * Softmax is in base 2 (exp2f); empty splits report m = -inf, l = 0. NaN in q or K reaches
//     only the affected heads' outputs (fmaxf skips NaN in the max, exp2f(NaN) poisons l).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "common/cuda_dtype.cuh"
#include "sparse/sparse_cuda.h"

namespace pyfast {
namespace sparse {
namespace dev {

constexpr int kAttnThreads = 128;
constexpr int kAttnWarps = kAttnThreads / 32;
constexpr int kMaxHeads = static_cast<int>(kMaxHeadsPerCta);  // query heads per attention CTA
constexpr int kTileBytes = 8192;     // bytes of one K (or V) tile: 2 stages x (K + V) = 32 KiB smem
constexpr int kMaxSplits = 64;       // split-K partitions at most
constexpr int kMergeThreads = 128;
constexpr int kScoreThreads = 256;
constexpr int kScoreWarps = kScoreThreads / 32;
constexpr int kScoreBlocks = 64;     // candidate blocks scored per CTA
constexpr int kSelectThreads = 256;
constexpr int kSelectWarps = kSelectThreads / 32;
constexpr int kCopyThreads = 256;
constexpr int kBlockKeyThreads = 128;
constexpr float kLog2e = 1.4426950408889634f;

struct AttnArgs {
  const void* q;
  int64_t q_sb, q_sh;
  const void* k;
  const void* v;
  Strides3 ks, vs;
  const int32_t* seqlens;      // dense: tokens 0 .. clamp(L, 0, Tmax) - 1
  const int32_t* kept;         // sparse: [B, Hkv, nsel] block list, or nullptr (dense)
  const int32_t* kept_tokens;  // sparse: [B, Hkv] tokens in the block list
  int nsel, block_size;
  int Hq, Hkv, G, heads_per_cta, head_chunks, Tmax, D;
  int num_splits;
  float qscale;  // softmax scale * log2(e)
  bool vec;      // K/V base, strides and D allow 16-byte loads
  void* out;           // [B, Hq, D] (written here when num_splits == 1)
  float* part_acc;     // [B, Hq, splits, D] unnormalized sum p * v
  float2* part_ml;     // [B, Hq, splits] (running max m in base 2, sum l)
};

struct ScoreArgs {
  const void* q;
  int64_t q_sb, q_sh;
  const void* bk;
  Strides3 bks;
  const int32_t* seqlens;
  uint32_t* keys;  // [B, Hkv, nb]
  int Hkv, G, Tmax, D, nb, block_size, topk, sink, local;
  bool vec;
};

struct SelectArgs {
  const int32_t* seqlens;
  const uint32_t* keys;  // [B, Hkv, nb]
  int32_t* kept;         // [B, Hkv, nsel]
  int32_t* kept_tokens;  // [B, Hkv]
  int Hkv, Tmax, nb, block_size, topk, sink, local, nsel;
};

struct AppendArgs {
  void* kc;
  void* vc;
  Strides3 kcs, vcs;
  void* bk;
  Strides3 bks;
  int32_t* seqlens;
  const void* kn;
  const void* vn;
  Strides3 kns, vns;
  int Hkv, Tmax, D, Tn, block_size;
  int nch;   // chunks per row: D * elem / 16 (vec) or D
  bool vec;  // every base and stride 16-byte aligned
};

// ---------------------------------------------------------------------------------------------
// Helpers

__device__ __forceinline__ int clampi(int v, int lo, int hi) { return v < lo ? lo : v > hi ? hi : v; }
__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// cp.async (sm_80+): 16 bytes global -> shared without a register round trip, L1 bypassed (.cg).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
#else
  *static_cast<uint4*>(smem) = *static_cast<const uint4*>(gmem);
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Wait until at most N committed groups of this thread are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// Order-preserving uint32 image of a score: a > b  <=>  key(a) > key(b). Every NaN maps to the top
// (it ranks above everything, as in torch.sort) and -0 to +0 (they tie).
__device__ __forceinline__ uint32_t order_key(float s) {
  if (s != s) return 0xFFFFFFFFu;
  if (s == 0.0f) return 0x80000000u;
  const uint32_t u = __float_as_uint(s);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Exclusive count of `flag` over the CTA's earlier threads, and the CTA total. Every thread must
// call it (two barriers); warp_counts: kSelectWarps ints of shared memory.
__device__ __forceinline__ int cta_exclusive_count(bool flag, int* warp_counts, int& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned ball = __ballot_sync(0xffffffffu, flag);
  if (lane == 0) warp_counts[warp] = __popc(ball);
  __syncthreads();
  int before = 0;
  total = 0;
#pragma unroll
  for (int w = 0; w < kSelectWarps; ++w) {
    const int c = warp_counts[w];
    before += w < warp ? c : 0;
    total += c;
  }
  __syncthreads();
  return before + __popc(ball & ((1u << lane) - 1u));
}

// ---------------------------------------------------------------------------------------------
// append_kv

// E: a raw element of the cache dtype (uint16_t or uint32_t); the copy moves bits.
// Grid (ceil(Tn * nch / kCopyThreads), Hkv, B): thread i copies chunk i % nch of new token i / nch.
template <typename E>
__global__ void __launch_bounds__(kCopyThreads) append_copy_kernel(const AppendArgs a) {
  const int i = static_cast<int>(blockIdx.x) * kCopyThreads + static_cast<int>(threadIdx.x);
  if (i >= a.Tn * a.nch) return;
  const int t = i / a.nch, c = i % a.nch;
  const int64_t h = blockIdx.y, b = blockIdx.z;
  const int L = a.seqlens[b];
  if (L < 0 || L > a.Tmax - a.Tn) return;  // would pass Tmax: the sequence is left untouched
  const int64_t dst_t = L + t;
  const E* ks = static_cast<const E*>(a.kn) + b * a.kns.b + h * a.kns.h + t * a.kns.t;
  const E* vs = static_cast<const E*>(a.vn) + b * a.vns.b + h * a.vns.h + t * a.vns.t;
  E* kd = static_cast<E*>(a.kc) + b * a.kcs.b + h * a.kcs.h + dst_t * a.kcs.t;
  E* vd = static_cast<E*>(a.vc) + b * a.vcs.b + h * a.vcs.h + dst_t * a.vcs.t;
  if (a.vec) {
    reinterpret_cast<uint4*>(kd)[c] = ld_ro(reinterpret_cast<const uint4*>(ks) + c);
    reinterpret_cast<uint4*>(vd)[c] = ld_ro(reinterpret_cast<const uint4*>(vs) + c);
  } else {
    kd[c] = ld_ro(ks + c);
    vd[c] = ld_ro(vs + c);
  }
}

// Grid (min(NB, ceil(Tn / bs)), Hkv, B): CTA x recomputes block L / bs + x if it became full.
template <typename T>
__global__ void __launch_bounds__(kBlockKeyThreads) append_block_keys_kernel(const AppendArgs a) {
  const int64_t h = blockIdx.y, b = blockIdx.z;
  const int L = a.seqlens[b];
  if (L < 0 || L > a.Tmax - a.Tn) return;
  const int bs = a.block_size;
  const int j = L / bs + static_cast<int>(blockIdx.x);
  if (j >= (L + a.Tn) / bs) return;
  const T* k = static_cast<const T*>(a.kc) + b * a.kcs.b + h * a.kcs.h + static_cast<int64_t>(j) * bs * a.kcs.t;
  T* dst = static_cast<T*>(a.bk) + b * a.bks.b + h * a.bks.h + static_cast<int64_t>(j) * a.bks.t;
  for (int d = threadIdx.x; d < a.D; d += kBlockKeyThreads) {
    float s = 0.0f;
    for (int t = 0; t < bs; ++t) s += to_float(k[t * a.kcs.t + d]);
    dst[d] = from_float<T>(s / static_cast<float>(bs));
  }
}

__global__ void append_advance_kernel(int32_t* seqlens, int B, int Tmax, int Tn) {
  const int b = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (b >= B) return;
  const int L = seqlens[b];
  if (L >= 0 && L <= Tmax - Tn) seqlens[b] = L + Tn;
}

// ---------------------------------------------------------------------------------------------
// Sparse: block scores and top-k selection

// Grid (ceil(nb / kScoreBlocks), Hkv, B); dynamic shared memory: D floats (qbar).
// Warps score blocks (lanes over D, 16-byte loads when aligned).
// (min 2 CTAs/SM caps registers at 128; left to itself ptxas picks 32-64 here and spills)
template <typename T>
__global__ void __launch_bounds__(kScoreThreads, 2) score_kernel(const ScoreArgs a) {
  extern __shared__ float4 score_smem[];
  float* qbar = reinterpret_cast<float*>(score_smem);
  constexpr int EV = kVec16<T>;
  const int h = blockIdx.y, b = blockIdx.z;
  const int L = clampi(a.seqlens[b], 0, a.Tmax);
  const int nfull = L / a.block_size;
  const int lo = a.sink, hi = nfull - a.local;  // candidates [lo, hi)
  if (a.topk == 0 || hi - lo <= a.topk) return;  // select keeps none / all: no scores needed
  const int jb = max(lo, static_cast<int>(blockIdx.x) * kScoreBlocks);
  const int je = min(hi, static_cast<int>(blockIdx.x) * kScoreBlocks + kScoreBlocks);
  if (jb >= je) return;

  const T* q = static_cast<const T*>(a.q) + b * a.q_sb + static_cast<int64_t>(h) * a.G * a.q_sh;
  for (int d = threadIdx.x; d < a.D; d += kScoreThreads) {
    float s = 0.0f;
    for (int g = 0; g < a.G; ++g) s += to_float(ld_ro(q + g * a.q_sh + d));
    qbar[d] = s / static_cast<float>(a.G);
  }
  __syncthreads();

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const T* bk = static_cast<const T*>(a.bk) + b * a.bks.b + h * a.bks.h;
  uint32_t* keys = a.keys + (static_cast<int64_t>(b) * a.Hkv + h) * a.nb;
  // Two rows per warp and step (j and j + kScoreWarps), loads of both issued before any math.
  for (int j = jb + warp; j < je; j += 2 * kScoreWarps) {
    const int j1 = j + kScoreWarps;
    const bool two = j1 < je;
    const T* r0 = bk + static_cast<int64_t>(j) * a.bks.t;
    const T* r1 = bk + static_cast<int64_t>(two ? j1 : j) * a.bks.t;
    float s0 = 0.0f, s1 = 0.0f;
    if (a.vec) {
      for (int c = lane; c < a.D / EV; c += 32) {
        const uint4 u0 = ld_ro(reinterpret_cast<const uint4*>(r0) + c);
        const uint4 u1 = ld_ro(reinterpret_cast<const uint4*>(r1) + c);
        float f0[EV], f1[EV];
        unpack16<T>(u0, f0);
        unpack16<T>(u1, f1);
#pragma unroll
        for (int e = 0; e < EV; ++e) {
          s0 = fmaf(qbar[c * EV + e], f0[e], s0);
          s1 = fmaf(qbar[c * EV + e], f1[e], s1);
        }
      }
    } else {
      for (int d = lane; d < a.D; d += 32) {
        const float x0 = to_float(ld_ro(r0 + d)), x1 = to_float(ld_ro(r1 + d));
        s0 = fmaf(qbar[d], x0, s0);
        s1 = fmaf(qbar[d], x1, s1);
      }
    }
    s0 = warp_sum(s0);
    s1 = warp_sum(s1);
    if (lane == 0) {
      keys[j] = order_key(s0);
      if (two) keys[j1] = order_key(s1);
    }
  }
}

// Grid (Hkv, B), one CTA per (b, kv head).
//   1. Radix select over the candidates' keys, 8 bits per pass from the top: after 4 passes
//      `thr` is the topk-th largest key and `need` the number of keys equal to thr to keep
//      (count(key > thr) = topk - need).
//   2. One ascending sweep over the full blocks writes the kept ones: forced (sink, local) or
//      key > thr or (key == thr and among the first `need` such candidates: ties -> lower index).
__global__ void __launch_bounds__(kSelectThreads) select_kernel(const SelectArgs a) {
  __shared__ int hist[256];
  __shared__ int warp_counts[kSelectWarps];
  __shared__ int pick_digit, pick_rank;
  const int tid = threadIdx.x, lane = tid & 31;
  const int h = blockIdx.x, b = blockIdx.y;
  const int64_t bh = static_cast<int64_t>(b) * a.Hkv + h;
  const int bs = a.block_size;
  const int L = clampi(a.seqlens[b], 0, a.Tmax);
  const int nfull = L / bs;
  const int lo = a.sink, hi = nfull - a.local;
  const uint32_t* keys = a.keys + bh * a.nb;
  // Otherwise every candidate is kept (hi - lo <= topk) or none (topk == 0).
  const bool ranked = a.topk > 0 && hi - lo > a.topk;

  uint32_t thr = 0;
  int need = 0;
  if (ranked) {
    uint32_t prefix = 0, mask = 0;
    int k = a.topk;  // rank (from the top) of the wanted key among those matching prefix
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int i = tid; i < 256; i += kSelectThreads) hist[i] = 0;
      __syncthreads();
      for (int j = lo + tid; j < hi; j += kSelectThreads) {
        const uint32_t u = ld_ro(keys + j);
        if ((u & mask) == prefix) atomicAdd(&hist[(u >> shift) & 0xFFu], 1);
      }
      __syncthreads();
      if (tid < 32) {
        // Lane l owns digits 8l .. 8l+7; suf = keys with digit >= 8l (suffix sum over lanes).
        int c = 0;
#pragma unroll
        for (int i = 0; i < 8; ++i) c += hist[lane * 8 + i];
        int suf = c;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
          const int v = __shfl_down_sync(0xffffffffu, suf, o);
          if (lane + o < 32) suf += v;
        }
        // The highest lane whose suffix reaches k holds the digit (suf of lane 0 >= k always).
        const unsigned reach = __ballot_sync(0xffffffffu, suf >= k);
        if (lane == 31 - __clz(reach)) {
          int above = suf - c;  // keys with a digit in higher lanes (< k)
          for (int i = 7; i >= 0; --i) {
            const int n = hist[lane * 8 + i];
            if (above + n >= k) {
              pick_digit = lane * 8 + i;
              pick_rank = k - above;
              break;
            }
            above += n;
          }
        }
      }
      __syncthreads();
      prefix |= static_cast<uint32_t>(pick_digit) << shift;
      mask |= 0xFFu << shift;
      k = pick_rank;
    }
    thr = prefix;
    need = k;
  }

  int32_t* kept = a.kept + bh * a.nsel;
  const int cap = a.nsel - 1;  // full blocks the list holds; the last slot is the tail's
  int n_kept = 0, n_ties = 0;
  for (int j0 = 0; j0 < nfull; j0 += kSelectThreads) {  // uniform trip count
    const int j = j0 + tid;
    const bool in = j < nfull;
    const bool forced = in && (j < a.sink || j >= nfull - a.local);
    const bool cand = in && !forced;  // lo <= j < hi
    const uint32_t u = cand && ranked ? ld_ro(keys + j) : 0u;
    const bool tie = cand && ranked && u == thr;
    int tie_total, keep_total;
    const int tie_rank = n_ties + cta_exclusive_count(tie, warp_counts, tie_total);
    const bool sel = cand && (ranked ? (u > thr || (tie && tie_rank < need)) : a.topk > 0);
    const bool keep = forced || sel;
    const int pos = n_kept + cta_exclusive_count(keep, warp_counts, keep_total);
    if (keep && pos < cap) kept[pos] = j;
    n_ties += tie_total;
    n_kept += keep_total;
  }
  if (tid == 0) {
    n_kept = min(n_kept, cap);  // never clips: kept <= sink + topk + local and <= nfull <= nb
    const int tail = L - nfull * bs;
    if (tail > 0) kept[n_kept] = nfull;
    a.kept_tokens[bh] = n_kept * bs + tail;
  }
}

// ---------------------------------------------------------------------------------------------
// Split-K attention over a token list (dense: 0 .. L-1; sparse: the select kernel's block list)

template <typename T, int DB>
struct AttnShape {
  static constexpr int EV = kVec16<T>;                          // elements per 16-byte chunk
  static constexpr int CH = DB / EV;                            // chunks per row
  static constexpr int TPT = CH < 32 ? CH : 32;                 // lanes per row (power of two)
  static constexpr int NC = CH / TPT;                           // chunks per lane
  static constexpr int HS = kAttnThreads / TPT;                 // lane groups per CTA
  static constexpr int NT0 = kTileBytes / (DB * static_cast<int>(sizeof(T)));
  static constexpr int NT = NT0 > HS ? NT0 : HS;                // tokens per tile
  static constexpr int HPT = (kMaxHeads + HS - 1) / HS;         // heads per lane group in PV, at most
  static constexpr int TILE = NT * DB;                          // elements of one K or V tile
  static constexpr int LOADS = NT * CH / kAttnThreads;          // 16-byte chunks per thread per tile
  static_assert(NT % HS == 0 && (NT * CH) % kAttnThreads == 0, "tile must split evenly over the CTA");
  static_assert(NT <= 64, "softmax phase handles at most 2 tokens per lane");
  static_assert(HS * DB * 4 <= 4 * TILE * static_cast<int>(sizeof(T)), "PV reduction reuses the tiles");
};

template <typename T, int DB>
__global__ void __launch_bounds__(kAttnThreads, 4) attention_kernel(const AttnArgs a) {
  using S = AttnShape<T, DB>;
  constexpr int EV = S::EV, NC = S::NC, TPT = S::TPT, HS = S::HS, NT = S::NT, HPT = S::HPT;
  constexpr float kNegInf = -INFINITY;
  // kv_raw: [stage 0, 1][K, V][NT tokens][DB] elements of T.
  __shared__ __align__(16) unsigned char kv_raw[4 * S::TILE * sizeof(T)];
  __shared__ __align__(16) float q_s[kMaxHeads][DB];
  __shared__ float p_s[kMaxHeads][NT];
  __shared__ float m_s[kMaxHeads], l_s[kMaxHeads], alpha_s[kMaxHeads];
  auto tile = [&](int stage, int which) { return reinterpret_cast<T*>(kv_raw) + (2 * stage + which) * S::TILE; };

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int grp = tid / TPT, tx = tid % TPT;
  const int split = blockIdx.x;
  const int hkv = blockIdx.y / a.head_chunks;
  const int g_first = (blockIdx.y % a.head_chunks) * a.heads_per_cta;
  const int ng = min(a.heads_per_cta, a.G - g_first);  // query heads of this CTA (<= kMaxHeads)
  if (ng <= 0) return;
  const int64_t b = blockIdx.z;
  const int64_t bh = b * a.Hkv + hkv;
  const int64_t hq0 = static_cast<int64_t>(hkv) * a.G + g_first;
  const int D = a.D;
  const int nchv = a.vec ? D / EV : ceil_div(D, EV);  // chunks holding head-dim elements

  // The token list of (b, hkv): n_tok entries, entry v at cache position token_of(v).
  const int32_t* kept = a.kept != nullptr ? a.kept + bh * a.nsel : nullptr;
  const int n_tok = clampi(kept != nullptr ? a.kept_tokens[bh] : a.seqlens[b], 0, a.Tmax);
  const int bs = a.block_size;
  auto token_of = [&](int v) -> int64_t {
    return kept != nullptr ? static_cast<int64_t>(ld_ro(kept + v / bs)) * bs + v % bs : v;
  };
  // This split's entries: an equal share, rounded up to whole tiles (trailing splits may be empty).
  const int per_split = ceil_div(ceil_div(n_tok, a.num_splits), NT) * NT;
  const int v_begin = min(split * per_split, n_tok);
  const int v_end = min(v_begin + per_split, n_tok);
  const int ntiles = ceil_div(v_end - v_begin, NT);

  const T* kbase = static_cast<const T*>(a.k) + b * a.ks.b + hkv * a.ks.h;
  const T* vbase = static_cast<const T*>(a.v) + b * a.vs.b + hkv * a.vs.h;

  // Queries of this CTA's heads, times scale * log2(e), zero past D and for absent heads.
  const T* q = static_cast<const T*>(a.q) + b * a.q_sb + hq0 * a.q_sh;
  for (int i = tid; i < kMaxHeads * DB; i += kAttnThreads) {
    const int g = i / DB, d = i % DB;
    q_s[g][d] = g < ng && d < D ? to_float(ld_ro(q + g * a.q_sh + d)) * a.qscale : 0.0f;
  }
  if (tid < kMaxHeads) m_s[tid] = kNegInf, l_s[tid] = 0.0f;

  // PV roles. ng <= HS: TP = HS / ng groups per head, group grp = g0 + tp * ng takes tokens
  // tp, tp + TP, ... of head g0 (groups past ng * TP idle). ng > HS: group grp takes every token
  // of heads grp, grp + HS, ... (nh of them, <= HPT).
  int TP, g0, tp, nh;
  if (ng <= HS) {
    TP = HS / ng, g0 = grp % ng, tp = grp / ng, nh = tp < TP ? 1 : 0;
  } else {
    TP = 1, g0 = grp, tp = 0, nh = (ng - grp + HS - 1) / HS;
  }

  // Stage tile `it` (entries v_begin + it*NT ...) into buffer it & 1.
  auto issue = [&](int it) {
    T* kd = tile(it & 1, 0);
    T* vd = tile(it & 1, 1);
    const int v0 = v_begin + it * NT;
    const int nt = min(NT, v_end - v0);
#pragma unroll
    for (int i = 0; i < S::LOADS; ++i) {
      const int idx = i * kAttnThreads + tid;
      const int t = idx / S::CH, c = idx % S::CH;
      if (t < nt && c < nchv) {
        const int64_t tok = token_of(v0 + t);
        const T* ksrc = kbase + tok * a.ks.t + c * EV;
        const T* vsrc = vbase + tok * a.vs.t + c * EV;
        T* kdst = kd + t * DB + c * EV;
        T* vdst = vd + t * DB + c * EV;
        if (a.vec) {
          cp_async16(kdst, ksrc);
          cp_async16(vdst, vsrc);
        } else {  // element loads; the partial last chunk is zero-filled past D
#pragma unroll
          for (int e = 0; e < EV; ++e) {
            const bool in = c * EV + e < D;
            kdst[e] = in ? ksrc[e] : from_float<T>(0.0f);
            vdst[e] = in ? vsrc[e] : from_float<T>(0.0f);
          }
        }
      }
    }
  };

  float acc[HPT][NC][EV];
#pragma unroll
  for (int i = 0; i < HPT; ++i)
#pragma unroll
    for (int c = 0; c < NC; ++c)
#pragma unroll
      for (int e = 0; e < EV; ++e) acc[i][c][e] = 0.0f;

  if (ntiles > 0) issue(0);
  cp_async_commit();
  for (int it = 0; it < ntiles; ++it) {
    if (it + 1 < ntiles) issue(it + 1);
    cp_async_commit();
    cp_async_wait<1>();  // this thread's copies of tile `it` have landed
    __syncthreads();     // ... and everyone's (also publishes q_s, m_s, l_s on the first pass)
    const int nt = min(NT, v_end - (v_begin + it * NT));
    const T* kt = tile(it & 1, 0);
    const T* vt = tile(it & 1, 1);

    // QK: p_s[g][t] = q_g . k_t (base-2 logits), -inf past the tile's end.
#pragma unroll
    for (int t0 = 0; t0 < NT; t0 += HS) {
      const int t = t0 + grp;
      const bool valid = t < nt;
      float kf[NC][EV];
#pragma unroll
      for (int c = 0; c < NC; ++c) {
        const int ch = c * TPT + tx;
        if (valid && ch < nchv) {
          unpack16<T>(*reinterpret_cast<const uint4*>(kt + t * DB + ch * EV), kf[c]);
        } else {
#pragma unroll
          for (int e = 0; e < EV; ++e) kf[c][e] = 0.0f;
        }
      }
      for (int g = 0; g < ng; ++g) {  // uniform: the shuffles below see every lane
        float s = 0.0f;
#pragma unroll
        for (int c = 0; c < NC; ++c) {
          const float4* qv = reinterpret_cast<const float4*>(&q_s[g][(c * TPT + tx) * EV]);
#pragma unroll
          for (int e4 = 0; e4 < EV / 4; ++e4) {
            const float4 qq = qv[e4];
            s = fmaf(qq.x, kf[c][4 * e4 + 0], s);
            s = fmaf(qq.y, kf[c][4 * e4 + 1], s);
            s = fmaf(qq.z, kf[c][4 * e4 + 2], s);
            s = fmaf(qq.w, kf[c][4 * e4 + 3], s);
          }
        }
#pragma unroll
        for (int o = TPT / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (tx == 0) p_s[g][t] = valid ? s : kNegInf;
      }
    }
    __syncthreads();

    // Online softmax, one warp per head: p_s becomes exp2(logit - m_new).
    for (int g = warp; g < ng; g += kAttnWarps) {
      float mt = kNegInf;
      for (int t = lane; t < NT; t += 32) mt = fmaxf(mt, p_s[g][t]);
      mt = warp_max(mt);
      const float m_old = m_s[g];
      const float m_new = fmaxf(m_old, mt);
      const float m_use = m_new == kNegInf ? 0.0f : m_new;  // all -inf so far: keep exp2 finite
      float ls = 0.0f;
      for (int t = lane; t < NT; t += 32) {
        const float p = exp2f(p_s[g][t] - m_use);
        p_s[g][t] = p;
        ls += p;
      }
      ls = warp_sum(ls);
      if (lane == 0) {
        const float alpha = exp2f(m_old - m_use);
        alpha_s[g] = alpha;
        m_s[g] = m_new;
        l_s[g] = l_s[g] * alpha + ls;
      }
    }
    __syncthreads();

    // PV: acc = acc * alpha + sum_t p_t v_t over this group's tokens.
    if (nh > 0) {
#pragma unroll
      for (int i = 0; i < HPT; ++i) {
        if (i < nh) {
          const float alpha = alpha_s[g0 + i * HS];
#pragma unroll
          for (int c = 0; c < NC; ++c)
#pragma unroll
            for (int e = 0; e < EV; ++e) acc[i][c][e] *= alpha;
        }
      }
      for (int t = tp; t < nt; t += TP) {
        float vf[NC][EV];
#pragma unroll
        for (int c = 0; c < NC; ++c) {
          const int ch = c * TPT + tx;
          if (ch < nchv) {
            unpack16<T>(*reinterpret_cast<const uint4*>(vt + t * DB + ch * EV), vf[c]);
          } else {
#pragma unroll
            for (int e = 0; e < EV; ++e) vf[c][e] = 0.0f;
          }
        }
#pragma unroll
        for (int i = 0; i < HPT; ++i) {
          if (i < nh) {
            const float p = p_s[g0 + i * HS][t];
#pragma unroll
            for (int c = 0; c < NC; ++c)
#pragma unroll
              for (int e = 0; e < EV; ++e) acc[i][c][e] = fmaf(p, vf[c][e], acc[i][c][e]);
          }
        }
      }
    }
    __syncthreads();  // tile `it & 1` and p_s are reused next
  }
  cp_async_wait<0>();
  __syncthreads();

  // Groups sharing a head: sum their accumulators through shared memory (the tiles are free).
  if (ng <= HS && TP > 1) {
    float* red = reinterpret_cast<float*>(kv_raw);  // [HS][DB]
    if (nh > 0) {
#pragma unroll
      for (int c = 0; c < NC; ++c)
#pragma unroll
        for (int e = 0; e < EV; ++e) red[grp * DB + (c * TPT + tx) * EV + e] = acc[0][c][e];
    }
    __syncthreads();
    if (nh > 0 && tp == 0) {
      for (int r = 1; r < TP; ++r) {
#pragma unroll
        for (int c = 0; c < NC; ++c)
#pragma unroll
          for (int e = 0; e < EV; ++e) acc[0][c][e] += red[(g0 + r * ng) * DB + (c * TPT + tx) * EV + e];
      }
    }
  }

  if (nh == 0 || tp != 0) return;
#pragma unroll
  for (int i = 0; i < HPT; ++i) {
    if (i >= nh) continue;
    const int g = g0 + i * HS;
    const int64_t row = b * a.Hq + hq0 + g;
    const float l = l_s[g];
    if (a.num_splits == 1) {
      T* o = static_cast<T*>(a.out) + row * D;
#pragma unroll
      for (int c = 0; c < NC; ++c)
#pragma unroll
        for (int e = 0; e < EV; ++e) {
          const int d = (c * TPT + tx) * EV + e;
          if (d < D) o[d] = from_float<T>(acc[i][c][e] / l);  // l = 0 (no token): NaN
        }
    } else {
      const int64_t prow = row * a.num_splits + split;
      float* o = a.part_acc + prow * D;
#pragma unroll
      for (int c = 0; c < NC; ++c)
#pragma unroll
        for (int e = 0; e < EV; ++e) {
          const int d = (c * TPT + tx) * EV + e;
          if (d < D) o[d] = acc[i][c][e];
        }
      if (tx == 0) a.part_ml[prow] = make_float2(m_s[g], l_s[g]);
    }
  }
}

// Grid (B * Hq): out = sum_s w_s acc_s / sum_s w_s l_s with w_s = exp2(m_s - max m).
// Empty splits (m = -inf) weigh 0; no token at all gives 0 / 0 = NaN.
template <typename T>
__global__ void __launch_bounds__(kMergeThreads) merge_kernel(const float* part_acc, const float2* part_ml, void* out,
                                                              int num_splits, int D) {
  __shared__ float w_s[kMaxSplits];
  __shared__ float l_total;
  const int64_t row = blockIdx.x;
  const float2* ml = part_ml + row * num_splits;
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    float m = -INFINITY;
    for (int s = lane; s < num_splits; s += 32) m = fmaxf(m, ml[s].x);
    m = warp_max(m);
    float l = 0.0f;
    for (int s = lane; s < num_splits; s += 32) {
      const float2 v = ml[s];
      const float w = v.x == -INFINITY ? 0.0f : exp2f(v.x - m);
      w_s[s] = w;
      l = fmaf(w, v.y, l);
    }
    l = warp_sum(l);
    if (lane == 0) l_total = l;
  }
  __syncthreads();
  const float* acc = part_acc + row * num_splits * D;
  for (int d = threadIdx.x; d < D; d += kMergeThreads) {
    float o = 0.0f;
    for (int s = 0; s < num_splits; ++s) o = fmaf(w_s[s], acc[static_cast<int64_t>(s) * D + d], o);
    static_cast<T*>(out)[row * D + d] = from_float<T>(o / l_total);
  }
}

}  // namespace dev
}  // namespace sparse
}  // namespace pyfast
