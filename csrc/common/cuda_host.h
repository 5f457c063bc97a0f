// Helpers shared by the ATen host files of the CUDA kernels (csrc/<family>/*_cuda_host.cpp, built
// only in a CUDA build, and under the tests' CPU emulation, tests/cuda_emu.py). Kept apart from
// host.h, which CPU-only builds include and so must not see CUDA headers.
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "common/dtype.h"

namespace pyfast {

// The launchers' dtype of a tensor (the registry admits only these three floating dtypes).
inline DType to_dtype(const char* op, at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "pyfast.", op, ": expected float32, float16 or bfloat16, got ", t);
  }
}

// A CUDA runtime call's error as a torch error naming the op and the call (`what`).
inline void check_cuda(const char* op, const char* what, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "pyfast.", op, ": ", what, " failed: ", cudaGetErrorString(err));
}

// The error a launcher returned (a bad configuration; a fault in the kernel shows up later, at a sync).
inline void check_launch(const char* op, cudaError_t err) { check_cuda(op, "CUDA kernel launch", err); }

inline const void* ptr_or_null(const c10::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr() : nullptr; }

// For the scope of a host function: the device of its tensors made current (outputs and workspaces
// are allocated there) and the stream every launch goes to, that device's current stream.
class CudaScope {
 public:
  explicit CudaScope(const at::Tensor& t) : guard_(t.device()) {}
  cudaStream_t stream() const { return c10::cuda::getCurrentCUDAStream().stream(); }

 private:
  c10::cuda::CUDAGuard guard_;
};

}  // namespace pyfast
