// The emulation's self-test kernels (emu_selftest.cu), for emu_module.cpp.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

namespace pyfast_emu_selftest {
cudaError_t run(const std::string& name, const float* in, float* out, int16_t* a, int16_t* b, int n);
}  // namespace pyfast_emu_selftest
