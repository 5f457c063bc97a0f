// Torch-free interface between the sparse-decoding CPU host code (sparse_cpu.cpp) and its per-ISA
// kernels (sparse_cpu_{avx512,scalar}.cpp, both built from sparse_cpu_kernel.h).
#pragma once
#include <cstdint>

#include "common/cpu_elem.h"  // Elem: the cache/query element type

namespace pyfast::sparse {

constexpr int kLanes = 16;  // fp32 lanes per vector; head dims are padded to Dp = a multiple of 16
constexpr int kTile = 16;   // tokens scored together (one vector of scores per query head)

struct CpuAttnArgs {
  const void* q;  // [B, Hq, D], strides in elements
  int64_t q_sb, q_sh;
  const void* k;  // k_cache [B, Hkv, Tmax, D]
  int64_t k_sb, k_sh, k_st;
  const void* v;  // v_cache [B, Hkv, Tmax, D]
  int64_t v_sb, v_sh, v_st;
  Elem elem;
  int64_t G, D, Dp;  // query heads per KV head, head dim, head dim padded to kLanes
  float scale_log2;  // softmax scale * log2(e): scores live in the log2 domain (exp2 in the kernel)
};

struct TokenRun {  // kept tokens [start, start + len) of one (b, KV head)
  int64_t start, len;
};

// One split of the work: the kept tokens [k0, k1) of KV head (b, h), counted along the
// concatenation of its runs, for all G query heads of the group. Results, per query head g:
// m[g] running max (log2 domain), l[g] = sum of 2^(s - m), acc[g * Dp + d] = sum of 2^(s - m) v.
struct SplitWork {
  int64_t b, h;
  const TokenRun* runs;
  int64_t nruns, k0, k1;
  float* m;
  float* l;
  float* acc;
  float* qbuf;  // scratch [G * Dp]: the group's queries in fp32, pre-scaled
  float* pbuf;  // scratch [G * kTile]: scores, then probabilities, of one tile
};

void attend_split_avx512(const CpuAttnArgs& a, const SplitWork& w);
void attend_split_scalar(const CpuAttnArgs& a, const SplitWork& w);

// out[j] = qbar . keys[j * ld : j * ld + D] for j < n (qbar fp32 [D]).
void block_scores_avx512(const float* qbar, const void* keys, int64_t ld, Elem elem, int64_t n, int64_t D, float* out);
void block_scores_scalar(const float* qbar, const void* keys, int64_t ld, Elem elem, int64_t n, int64_t D, float* out);

}  // namespace pyfast::sparse
