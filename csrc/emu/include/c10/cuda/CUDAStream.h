// CPU emulation of the current-stream query: one emulated stream (launches run synchronously).
#pragma once
#include "../../../emu.h"

namespace c10 {
namespace cuda {
struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(int = -1) { return {}; }
}  // namespace cuda
}  // namespace c10
