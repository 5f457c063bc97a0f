// Torch-free launcher API of the Hedgehog CUDA kernels (raw pointers + cudaStream_t), included by
// the ATen host file (hedgehog_cuda_host.cpp) and the device code (hedgehog_decode.cuh,
// hedgehog_chunk.cuh). The math: pyfast/reference/hedgehog.py. Layouts: q [B, Hq, T, D],
// k [B, Hkv, T, D], v [B, Hkv, T, Dv], weights [H, D, F] and biases [H, F] contiguous, states
// S [N, Hkv, 2F, Dv] and z [N, Hkv, 2F] float32 contiguous; query head h reads KV head h / G.
// Strides are in elements; every q/k/v here has stride 1 in its last dim.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "common/dtype.h"

namespace pyfast {
namespace hedgehog {

constexpr int64_t kMaxFeatures = 256;  // F of both kernels (decode: one thread per feature)
constexpr int64_t kMaxGridYZ = 65535;  // heads and sequences sit on grid axes y / z

// One decode token: for every (b, kv head j), in place
//   S[b, j] += phi_k^T v,  z[b, j] += phi_k,
// then for each query head h of the group (h / G == j), reading the updated state:
//   out[b, h] = phi_q S[b, j] / (phi_q . z[b, j] + eps).
struct DecodeParams {
  const void* q;  // [B, Hq, D]
  const void* k;  // [B, Hkv, D]
  const void* v;  // [B, Hkv, Dv]
  int64_t q_sb, q_sh, k_sb, k_sh, v_sb, v_sh;
  const void* q_weight;  // [Hq, D, F]
  const void* k_weight;  // [Hkv, D, F]
  const void* q_bias;    // [Hq, F] or nullptr
  const void* k_bias;    // [Hkv, F] or nullptr
  float* S;              // [B, Hkv, 2F, Dv]
  float* z;              // [B, Hkv, 2F]
  void* out;             // [B, Hq, Dv], contiguous
  int64_t B, Hq, Hkv, D, F, Dv;
  float eps;
  DType dtype;  // of q, k, v, the weights, biases and out
};

// cudaErrorInvalidValue for arguments outside the contract (nothing launched), else the launch error.
cudaError_t launch_decode(const DecodeParams& p, cudaStream_t stream);

// Fused causal / non-causal forward (window 0), float16 / bfloat16 tensor-core kernel: per
// sequence n (a batch entry, or a segment [cu_seqlens[n], cu_seqlens[n+1]) of batch 0) and query
// head h, out = linear attention of (phi_q(q), phi_k(k), v) from the initial state (S0, z0) (zero
// without one); the final state is written for every (n, kv head) when S_out is given.
struct ForwardParams {
  const void* q;
  const void* k;
  const void* v;
  int64_t q_sb, q_sh, q_st, k_sb, k_sh, k_st, v_sb, v_sh, v_st;
  const void* q_weight;
  const void* k_weight;
  const void* q_bias;  // or nullptr
  const void* k_bias;  // or nullptr
  const float* S0;     // [N, Hkv, 2F, Dv] or nullptr (then z0 is nullptr too)
  const float* z0;     // [N, Hkv, 2F]
  const int32_t* cu_seqlens;  // [N + 1] (B == 1) or nullptr (N == B)
  void* out;                  // [B, Hq, T, Dv], contiguous
  float* S_out;               // [N, Hkv, 2F, Dv] or nullptr (no state returned)
  float* z_out;               // [N, Hkv, 2F] (with S_out)
  float* workspace;           // forward_workspace_floats(p) floats: the running states
  int64_t B, N, Hq, Hkv, T, D, F, Dv;
  bool causal;
  float eps;
  DType dtype;  // float16 or bfloat16
};

// Floats of device scratch launch_forward needs (the running state of every (n, query head)).
size_t forward_workspace_floats(const ForwardParams& p);
cudaError_t launch_forward(const ForwardParams& p, cudaStream_t stream);

}  // namespace hedgehog
}  // namespace pyfast
