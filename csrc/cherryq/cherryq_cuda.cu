// Launcher of the CherryQ CUDA kernels: argument sanity, launch geometry, dispatch on the x dtype
// (the kernels themselves are instantiated per dtype: cherryq_cuda_launch.cuh).
// Torch-free (CUDA headers only); the ATen side lives in cherryq_cuda_host.cpp.
#include <cuda_runtime.h>

#include <cstdint>

#include "cherryq/cherryq_cuda.h"
#include "cherryq/cherryq_cuda_launch.cuh"
#include "cherryq/cherryq_gemv.cuh"

namespace pyfast {
namespace cherryq {
namespace {

using detail::launch_dtype;
using gemv::GemvPlan;
using gemv::kMaxBatch;

constexpr int64_t kMaxGridY = 65535;

// One launch: grid_y blocks of `mb` rows of x each, starting at row m_begin.
cudaError_t launch_rows(const GemvParams& p, int mb, int64_t m_begin, unsigned grid_y, cudaStream_t stream) {
  const bool aligned = reinterpret_cast<uintptr_t>(p.qweight) % 16 == 0;
  const GemvPlan plan = gemv::make_plan(p.bits, mb, p.N, p.K, p.group_size, aligned);
  switch (p.x_dtype) {
    case DType::kFloat32: return launch_dtype<float>(p, mb, plan, m_begin, grid_y, stream);
    case DType::kFloat16: return launch_dtype<__half>(p, mb, plan, m_begin, grid_y, stream);
    case DType::kBFloat16: return launch_dtype<__nv_bfloat16>(p, mb, plan, m_begin, grid_y, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_gemv(const GemvParams& p, cudaStream_t stream) {
  const int64_t kIntMax = INT32_MAX;
  const bool ok = (p.bits == 2 || p.bits == 3 || p.bits == 4) &&
                  (p.group_size == 32 || p.group_size == 64 || p.group_size == 128 || p.group_size == 256) &&
                  p.M >= 0 && p.N >= 0 && p.C >= 0 && p.K > 0 && p.K % p.group_size == 0 &&
                  p.K <= kIntMax && p.N <= kIntMax && p.C <= kIntMax && p.K / 32 * p.bits <= kIntMax &&
                  p.x_row_stride >= 0 && valid_dtype(p.x_dtype) && (p.bias == nullptr || valid_dtype(p.bias_dtype));
  if (!ok) return cudaErrorInvalidValue;
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  if (p.x == nullptr || p.qweight == nullptr || p.scales == nullptr || p.zeros == nullptr || p.y == nullptr ||
      (p.C > 0 && (p.cherry_idx == nullptr || p.cherry_val == nullptr)))
    return cudaErrorInvalidValue;

  // Full blocks of 8 rows of x, at most 65535 along grid.y per launch, then the remainder.
  const int64_t full = p.M / kMaxBatch;
  for (int64_t b = 0; b < full; b += kMaxGridY) {
    const int64_t gy = full - b < kMaxGridY ? full - b : kMaxGridY;
    const cudaError_t err = launch_rows(p, kMaxBatch, b * kMaxBatch, static_cast<unsigned>(gy), stream);
    if (err != cudaSuccess) return err;
  }
  const int rem = static_cast<int>(p.M % kMaxBatch);
  if (rem > 0) return launch_rows(p, rem, full * kMaxBatch, 1u, stream);
  return cudaSuccess;
}

}  // namespace cherryq
}  // namespace pyfast
