// Launchers of the Hedgehog CUDA kernels: argument sanity, grid shapes, dtype dispatch. Torch-free
// (CUDA headers only); the ATen side lives in hedgehog_cuda_host.cpp, the kernels in
// hedgehog_decode.cuh (decode step) and hedgehog_chunk.cuh (fused forward).
#include <cuda_runtime.h>

#include <cstdint>

#include "hedgehog/hedgehog_chunk.cuh"
#include "hedgehog/hedgehog_cuda.h"
#include "hedgehog/hedgehog_decode.cuh"

namespace pyfast {
namespace hedgehog {
namespace {

constexpr int64_t kMaxLen = INT32_MAX / 2;  // sizes and token indices are int in the kernels

bool sizes_ok(int64_t D, int64_t F, int64_t Dv) {
  return D >= 1 && D <= kMaxLen && F >= 1 && F <= kMaxFeatures && Dv >= 1 && Dv <= kMaxLen &&
         2 * F * Dv <= kMaxLen && D * F <= kMaxLen;
}

}  // namespace

cudaError_t launch_decode(const DecodeParams& p, cudaStream_t stream) {
  const bool ok = valid_dtype(p.dtype) && p.B >= 1 && p.Hkv >= 1 && p.Hq >= p.Hkv && p.Hq % p.Hkv == 0 &&
                  p.Hkv <= kMaxGridYZ && p.B <= kMaxGridYZ && p.Hq <= kMaxLen && sizes_ok(p.D, p.F, p.Dv) &&
                  p.q != nullptr && p.k != nullptr && p.v != nullptr && p.q_weight != nullptr &&
                  p.k_weight != nullptr && p.S != nullptr && p.z != nullptr && p.out != nullptr;
  if (!ok) return cudaErrorInvalidValue;
  dev::DecodeArgs a{p.q, p.k, p.v, p.q_sb, p.q_sh, p.k_sb, p.k_sh, p.v_sb, p.v_sh, p.q_weight, p.k_weight,
                    p.q_bias, p.k_bias, p.S, p.z, p.out, static_cast<int>(p.Hq), static_cast<int>(p.Hkv),
                    static_cast<int>(p.Hq / p.Hkv), static_cast<int>(p.D), static_cast<int>(p.F),
                    static_cast<int>(p.Dv), p.eps};
  const dim3 grid(static_cast<unsigned>(p.Hkv), static_cast<unsigned>(p.B));
  switch (p.dtype) {
    case DType::kFloat32: dev::decode_kernel<float><<<grid, dev::kDecodeThreads, 0, stream>>>(a); break;
    case DType::kFloat16: dev::decode_kernel<__half><<<grid, dev::kDecodeThreads, 0, stream>>>(a); break;
    case DType::kBFloat16: dev::decode_kernel<__nv_bfloat16><<<grid, dev::kDecodeThreads, 0, stream>>>(a); break;
  }
  return cudaGetLastError();
}

size_t forward_workspace_floats(const ForwardParams& p) {
  return static_cast<size_t>(p.N) * p.Hq * 2 * p.F * p.Dv;
}

cudaError_t launch_forward(const ForwardParams& p, cudaStream_t stream) {
  const bool ok = (p.dtype == DType::kFloat16 || p.dtype == DType::kBFloat16) && p.B >= 1 && p.N >= 1 &&
                  p.Hkv >= 1 && p.Hq % p.Hkv == 0 && p.Hq <= kMaxGridYZ && p.N <= kMaxGridYZ && p.T >= 0 &&
                  p.T <= kMaxLen && sizes_ok(p.D, p.F, p.Dv) && (p.cu_seqlens == nullptr ? p.N == p.B : p.B == 1) &&
                  (p.S0 == nullptr) == (p.z0 == nullptr) && (p.S_out == nullptr) == (p.z_out == nullptr) &&
                  p.q != nullptr && p.k != nullptr && p.v != nullptr && p.q_weight != nullptr &&
                  p.k_weight != nullptr && p.out != nullptr && p.workspace != nullptr;
  if (!ok) return cudaErrorInvalidValue;
  dev::ForwardArgs a{};
  a.q = p.q, a.k = p.k, a.v = p.v;
  a.q_sb = p.q_sb, a.q_sh = p.q_sh, a.q_st = p.q_st;
  a.k_sb = p.k_sb, a.k_sh = p.k_sh, a.k_st = p.k_st;
  a.v_sb = p.v_sb, a.v_sh = p.v_sh, a.v_st = p.v_st;
  a.qw = p.q_weight, a.kw = p.k_weight, a.qb = p.q_bias, a.kb = p.k_bias;
  a.S0 = p.S0, a.z0 = p.z0, a.cu = p.cu_seqlens;
  a.out = p.out, a.S_out = p.S_out, a.z_out = p.z_out, a.ws = p.workspace;
  a.Hq = static_cast<int>(p.Hq), a.Hkv = static_cast<int>(p.Hkv), a.G = static_cast<int>(p.Hq / p.Hkv);
  a.T = static_cast<int>(p.T), a.D = static_cast<int>(p.D), a.F = static_cast<int>(p.F);
  a.Dv = static_cast<int>(p.Dv), a.eps = p.eps;
  const dim3 grid(static_cast<unsigned>((p.Dv + dev::kDvTile - 1) / dev::kDvTile), static_cast<unsigned>(p.Hq),
                  static_cast<unsigned>(p.N));
  if (p.dtype == DType::kFloat16) {
    dev::forward_kernel<__half><<<grid, dev::kFwdThreads, 0, stream>>>(a, p.causal);
  } else {
    dev::forward_kernel<__nv_bfloat16><<<grid, dev::kFwdThreads, 0, stream>>>(a, p.causal);
  }
  return cudaGetLastError();
}

}  // namespace hedgehog
}  // namespace pyfast
