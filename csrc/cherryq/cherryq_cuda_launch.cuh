// Template dispatch of the CherryQ GEMV launch: bit width x rows of x per block (1..8) ->
// gemv_kernel<T, BITS, MB, VEC>. For one x dtype that is 3 x 8 x 2 = 48 kernels, so each dtype is
// instantiated in its own translation unit (cherryq_cuda_{f32,f16,bf16}.cu): one nvcc run over
// all 144 took 49-116 s for sm_80 + sm_90a on the 2-core VM, past a compile-checker's time limit.
// cherryq_cuda.cu sees only the explicit-instantiation declarations at the bottom.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cherryq/cherryq_cuda.h"
#include "cherryq/cherryq_gemv.cuh"

namespace pyfast {
namespace cherryq {
namespace detail {

template <typename T, int BITS, int MB>
cudaError_t launch_batch(const GemvParams& p, const gemv::GemvPlan& plan, int64_t m_begin, unsigned grid_y,
                         cudaStream_t stream) {
  const dim3 grid(plan.grid_x, grid_y);
  if (plan.vec) {
    gemv::gemv_kernel<T, BITS, MB, true><<<grid, gemv::kThreads, plan.smem_bytes, stream>>>(p, plan, m_begin);
  } else {
    gemv::gemv_kernel<T, BITS, MB, false><<<grid, gemv::kThreads, plan.smem_bytes, stream>>>(p, plan, m_begin);
  }
  return cudaGetLastError();
}

template <typename T, int BITS>
cudaError_t launch_bits(const GemvParams& p, int mb, const gemv::GemvPlan& plan, int64_t m_begin, unsigned grid_y,
                        cudaStream_t stream) {
  switch (mb) {
    case 1: return launch_batch<T, BITS, 1>(p, plan, m_begin, grid_y, stream);
    case 2: return launch_batch<T, BITS, 2>(p, plan, m_begin, grid_y, stream);
    case 3: return launch_batch<T, BITS, 3>(p, plan, m_begin, grid_y, stream);
    case 4: return launch_batch<T, BITS, 4>(p, plan, m_begin, grid_y, stream);
    case 5: return launch_batch<T, BITS, 5>(p, plan, m_begin, grid_y, stream);
    case 6: return launch_batch<T, BITS, 6>(p, plan, m_begin, grid_y, stream);
    case 7: return launch_batch<T, BITS, 7>(p, plan, m_begin, grid_y, stream);
    case 8: return launch_batch<T, BITS, 8>(p, plan, m_begin, grid_y, stream);
    default: return cudaErrorInvalidValue;
  }
}

// One launch of grid_y blocks of `mb` rows of x each (mb in 1..gemv::kMaxBatch), x of type T.
template <typename T>
cudaError_t launch_dtype(const GemvParams& p, int mb, const gemv::GemvPlan& plan, int64_t m_begin, unsigned grid_y,
                         cudaStream_t stream) {
  switch (p.bits) {
    case 2: return launch_bits<T, 2>(p, mb, plan, m_begin, grid_y, stream);
    case 3: return launch_bits<T, 3>(p, mb, plan, m_begin, grid_y, stream);
    case 4: return launch_bits<T, 4>(p, mb, plan, m_begin, grid_y, stream);
    default: return cudaErrorInvalidValue;
  }
}

// Defined in cherryq_cuda_f32.cu, cherryq_cuda_f16.cu and cherryq_cuda_bf16.cu.
extern template cudaError_t launch_dtype<float>(const GemvParams&, int, const gemv::GemvPlan&, int64_t, unsigned,
                                                cudaStream_t);
extern template cudaError_t launch_dtype<__half>(const GemvParams&, int, const gemv::GemvPlan&, int64_t, unsigned,
                                                 cudaStream_t);
extern template cudaError_t launch_dtype<__nv_bfloat16>(const GemvParams&, int, const gemv::GemvPlan&, int64_t,
                                                        unsigned, cudaStream_t);

}  // namespace detail
}  // namespace cherryq
}  // namespace pyfast
