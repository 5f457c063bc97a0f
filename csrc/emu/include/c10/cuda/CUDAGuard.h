// CPU emulation of c10::cuda::CUDAGuard: the emulated device is the CPU, there is nothing to switch.
#pragma once
#include <c10/core/Device.h>

#include "../../../emu.h"

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace cuda
}  // namespace c10
