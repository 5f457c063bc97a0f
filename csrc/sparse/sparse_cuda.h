// Torch-free launcher API of the sparse-decoding CUDA kernels (raw pointers + cudaStream_t).
// Included by the ATen host file (sparse_cuda_host.cpp) and by the device code (sparse_decode.cuh).
// Layouts (pyfast/reference/sparse.py): caches [B, Hkv, Tmax, D], cache_seqlens int32 [B],
// block_keys [B, Hkv, Tmax / block_size, D], q and out [B, Hq, D] with Hq = G * Hkv (query head i
// reads KV head i / G). Strides are in elements; every tensor here has stride 1 in its last dim.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "common/dtype.h"

namespace pyfast {
namespace sparse {

constexpr int64_t kMaxHeadDim = 256;  // largest D of the attention kernels (buckets 64, 128, 256)
constexpr int64_t kMaxHeadsPerCta = 8;  // query heads per attention CTA (more -> several head chunks)

// Strides of dims 0..2 of a [B, H, T, D] tensor (dim 3 has stride 1).
struct Strides3 {
  int64_t b, h, t;
};

// In place, per sequence b with L = cache_seqlens[b] (the old length):
//   k_cache[b, :, L + t] = k_new[b, :, t] (same for v) for t < Tn,
//   block_keys[b, :, j] = mean of k_cache[b, :, j*bs : (j+1)*bs] (fp32 sum, cast to the cache dtype)
//     for every block j that became full (L / bs <= j < (L + Tn) / bs),
//   cache_seqlens[b] = L + Tn.
// A sequence with L < 0 or L + Tn > Tmax is left untouched (the host rejects it when it can read
// the lengths; under CUDA-graph capture it cannot).
struct AppendParams {
  void* k_cache;  // [B, Hkv, Tmax, D]
  void* v_cache;
  Strides3 k_cache_stride, v_cache_stride;
  void* block_keys;  // [B, Hkv, Tmax / block_size, D]
  Strides3 block_keys_stride;
  int32_t* cache_seqlens;  // [B]
  const void* k_new;       // [B, Hkv, Tn, D]
  const void* v_new;
  Strides3 k_new_stride, v_new_stride;
  int64_t B, Hkv, Tmax, D, Tn, block_size;
  DType dtype;  // of every floating tensor above
};

// Three launches: copy, block means, length advance (last, so the first two read the old lengths).
// cudaErrorInvalidValue for arguments outside the contract (nothing launched), else the launch error.
cudaError_t launch_append_kv(const AppendParams& p, cudaStream_t stream);

// Decode attention of one query token per head:
//   out[b, i] = softmax(scale * q[b, i] . k[b, i/G, t]) v[b, i/G, t] over the attended tokens t,
// all of the L_b = clamp(cache_seqlens[b], 0, Tmax) valid tokens (dense), or (sparse = true) the
// tokens of the kept blocks of (b, i/G): sink blocks, local blocks, the partial tail and the topk
// best-scoring other full blocks (score_j = mean over the group's query heads of q . block_keys[j];
// ties to the lower index; NaN ranks highest).
struct DecodeParams {
  const void* q;  // [B, Hq, D]
  int64_t q_stride_b, q_stride_h;
  const void* k_cache;  // [B, Hkv, Tmax, D]
  const void* v_cache;
  Strides3 k_stride, v_stride;
  const int32_t* cache_seqlens;  // [B]
  void* out;                     // [B, Hq, D], contiguous
  int64_t B, Hq, Hkv, Tmax, D;
  float scale;
  DType dtype;  // of q, the caches, block_keys and out
  int32_t num_sms;  // multiprocessors of the device: sets the split count (never the data)
  // Sparse decoding only (ignored when sparse == false).
  bool sparse;
  const void* block_keys;  // [B, Hkv, Tmax / block_size, D]
  Strides3 block_keys_stride;
  int64_t block_size, topk, sink_blocks, local_blocks;
};

// Bytes of device scratch launch_decode needs: a function of the shapes, options and num_sms only
// (never of cache_seqlens), so the host can allocate it inside a CUDA graph capture.
size_t decode_workspace_bytes(const DecodeParams& p);

// Sparse: block scoring, top-k selection, split-K attention, merge. Dense: the last two.
// cudaErrorInvalidValue for arguments outside the contract (e.g. D > kMaxHeadDim, a workspace
// smaller than decode_workspace_bytes) with nothing launched, else the launch error.
cudaError_t launch_decode(const DecodeParams& p, void* workspace, size_t workspace_bytes, cudaStream_t stream);

}  // namespace sparse
}  // namespace pyfast
