// Sizes shared by the sparse-decoding host code (CPU and CUDA). Layouts: caches [B, Hkv, Tmax, D],
// cache_seqlens int32 [B], block_keys [B, Hkv, Tmax / block_size, D], q [B, Hq, D], Hq % Hkv == 0;
// the registry (pyfast/sparse/ops.py) checked all of it before a kernel entry point runs.
#pragma once
#include <ATen/ATen.h>

#include <cmath>

namespace pyfast::sparse {

struct CacheShape {
  int64_t B, Hkv, Tmax, D;
};

inline CacheShape cache_shape(const at::Tensor& k_cache) {
  return {k_cache.size(0), k_cache.size(1), k_cache.size(2), k_cache.size(3)};
}

inline double softmax_scale(const c10::optional<double>& scale, int64_t D) {
  return scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(D));
}

}  // namespace pyfast::sparse
