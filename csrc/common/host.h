// Small helpers shared by the ATen host code of every op (CPU and CUDA). The arguments were
// checked by the op registry (pyfast/_registry.py, rules in pyfast/<family>/ops.py) before any
// kernel entry point in csrc/kernels.h is called, so host code only reads sizes and strides.
#pragma once
#include <ATen/ATen.h>

#include <vector>

#include "common/cpu_elem.h"

namespace pyfast {

// Only the last dim needs stride 1 (docs/design.md § Layouts); anything else is copied once.
inline at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// x's sizes with the last one replaced by n ([..., K] -> [..., N]).
inline std::vector<int64_t> with_last_size(const at::Tensor& x, int64_t n) {
  auto s = x.sizes().vec();
  s.back() = n;
  return s;
}

// The CPU kernels' element type of t (csrc/common/cpu_elem.h).
inline Elem elem_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return Elem::kF32;
    case at::kHalf: return Elem::kF16;
    default: return Elem::kBF16;  // the registry admits float32, float16 and bfloat16 only
  }
}

}  // namespace pyfast
