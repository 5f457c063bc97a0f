// Floating dtypes understood by the torch-free CUDA launchers (csrc/<family>/*_cuda.h). Host files
// map at::ScalarType to it; device code never sees ATen.
#pragma once

#include <cstdint>

namespace pyfast {

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline bool valid_dtype(DType d) { return d == DType::kFloat32 || d == DType::kFloat16 || d == DType::kBFloat16; }

}  // namespace pyfast
