// Torch-free launcher API of the CherryQ CUDA kernels (raw pointers + cudaStream_t).
// Included by the ATen host file (cherryq_cuda_host.cpp) and by the device code
// (cherryq_gemv.cuh); storage format and bit layout: pyfast/cherryq/format.py.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/dtype.h"

namespace pyfast {
namespace cherryq {

// x, bias and y are in any pyfast::DType. float16 tensors of the format (scales, zeros,
// cherry_val) are always float16 and are passed as raw 16-bit patterns.

// y[M, N] = x[M, K] @ dequantize(W).T + bias, accumulated in float32.
struct GemvParams {
  const void* x;          // [M, K] in x_dtype, last dim contiguous
  int64_t x_row_stride;   // elements between consecutive rows of x
  DType x_dtype;
  const int32_t* qweight;     // [N, K/32*bits] packed codes, contiguous
  const void* scales;         // [N, K/group_size] float16, contiguous
  const void* zeros;          // [N, K/group_size] float16, contiguous
  const int32_t* cherry_idx;  // [N, C] columns of the cherries, contiguous (indices outside [0, K) are skipped)
  const void* cherry_val;     // [N, C] float16, contiguous
  const void* bias;           // [N] in bias_dtype, or nullptr
  DType bias_dtype;
  void* y;                    // [M, N] in x_dtype, contiguous
  int64_t M, N, K, C;
  int32_t bits;        // 2, 3 or 4
  int32_t group_size;  // 32, 64, 128 or 256 (K % group_size == 0)
};

// Batched dequant-GEMV: M is processed 8 rows of x at a time, so any M is correct, but the
// weights are streamed once per 8 rows (meant for M <= 8; large M belongs to a GEMM).
// Returns cudaErrorInvalidValue for arguments outside the contract above (nothing is
// launched then), otherwise the error of the launch (cudaGetLastError).
cudaError_t launch_gemv(const GemvParams& p, cudaStream_t stream);

}  // namespace cherryq
}  // namespace pyfast
