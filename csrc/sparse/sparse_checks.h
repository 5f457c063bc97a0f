// Checks of the sparse-decoding arguments, shared by the CPU and CUDA implementations
// (the same rules as pyfast/sparse/ops.py, for callers of torch.ops.pyfast.* directly).
// Layouts: caches [B, Hkv, Tmax, D], cache_seqlens int32 [B], block_keys [B, Hkv, Tmax / bs, D],
// q [B, Hq, D] with Hq % Hkv == 0.
#pragma once
#include <ATen/MemoryOverlap.h>

#include <utility>

#include "common/checks.h"

namespace pyfast::sparse {

struct CacheShape {
  int64_t B, Hkv, Tmax, D;
};

inline CacheShape check_cache(const char* op, const at::Tensor& k_cache, const at::Tensor& v_cache,
                              const at::Tensor& cache_seqlens) {
  check_float_dtype(op, "k_cache", k_cache);
  TORCH_CHECK(k_cache.dim() == 4, "pyfast.", op, ": expected k_cache 4-D [B, Hkv, Tmax, D], got shape ",
              shape_str(k_cache.sizes()));
  const CacheShape s{k_cache.size(0), k_cache.size(1), k_cache.size(2), k_cache.size(3)};
  TORCH_CHECK(s.B > 0 && s.Hkv > 0 && s.Tmax > 0 && s.D > 0, "pyfast.", op,
              ": expected k_cache non-empty [B, Hkv, Tmax, D], got shape ", shape_str(k_cache.sizes()));
  check_shape(op, "v_cache", v_cache, {s.B, s.Hkv, s.Tmax, s.D});
  check_dtype(op, "v_cache", v_cache, k_cache.scalar_type());
  check_same_device(op, "v_cache", v_cache, k_cache, "k_cache");
  check_shape(op, "cache_seqlens", cache_seqlens, {s.B});
  check_dtype(op, "cache_seqlens", cache_seqlens, at::kInt);
  check_same_device(op, "cache_seqlens", cache_seqlens, k_cache, "k_cache");
  TORCH_CHECK(s.B == 1 || cache_seqlens.stride(0) == 1, "pyfast.", op,
              ": expected cache_seqlens contiguous (kernels index it as an int32 array), got stride ",
              cache_seqlens.stride(0));
  return s;
}

// Written in place by append_kv it needs a unit last stride; the attention ops copy it otherwise.
inline void check_block_keys(const char* op, const at::Tensor& block_keys, const at::Tensor& k_cache,
                             const CacheShape& s, int64_t block_size, bool written) {
  TORCH_CHECK(block_size >= 1, "pyfast.", op, ": expected block_size >= 1, got ", block_size);
  check_shape(op, "block_keys", block_keys, {s.B, s.Hkv, s.Tmax / block_size, s.D});
  check_dtype(op, "block_keys", block_keys, k_cache.scalar_type());
  check_same_device(op, "block_keys", block_keys, k_cache, "k_cache");
  TORCH_CHECK(!written || block_keys.numel() == 0 || block_keys.stride(-1) == 1, "pyfast.", op,
              ": expected block_keys with stride 1 in its last dim (it is written in place), got strides ",
              shape_str(block_keys.strides()));
}

// Returns Hq / Hkv (query heads per KV head).
inline int64_t check_query(const char* op, const at::Tensor& q, const at::Tensor& k_cache, const CacheShape& s) {
  check_dtype(op, "q", q, k_cache.scalar_type());
  check_same_device(op, "q", q, k_cache, "k_cache");
  TORCH_CHECK(q.dim() == 3 && q.size(0) == s.B && q.size(2) == s.D, "pyfast.", op, ": expected q shape [", s.B,
              ", Hq, ", s.D, "], got shape ", shape_str(q.sizes()));
  TORCH_CHECK(q.size(1) >= 1 && q.size(1) % s.Hkv == 0, "pyfast.", op, ": expected q.shape[1] (Hq) a multiple of Hkv = ",
              s.Hkv, ", got ", q.size(1));
  return q.size(1) / s.Hkv;
}

inline void check_budget(const char* op, int64_t topk, int64_t sink_blocks, int64_t local_blocks) {
  TORCH_CHECK(topk >= 0, "pyfast.", op, ": expected topk >= 0, got ", topk);
  TORCH_CHECK(sink_blocks >= 0, "pyfast.", op, ": expected sink_blocks >= 0, got ", sink_blocks);
  TORCH_CHECK(local_blocks >= 0, "pyfast.", op, ": expected local_blocks >= 0, got ", local_blocks);
}

// The appended chunk: k_new, v_new [B, Hkv, Tn, D] in the cache's dtype and device, caches with a
// unit last stride (written in place). Returns Tn.
inline int64_t check_append(const char* op, const at::Tensor& k_cache, const at::Tensor& v_cache, const CacheShape& s,
                            const at::Tensor& k_new, const at::Tensor& v_new) {
  TORCH_CHECK(k_cache.stride(-1) == 1 && v_cache.stride(-1) == 1, "pyfast.", op,
              ": expected k_cache and v_cache with stride 1 in their last dim (they are written in place), got strides ",
              shape_str(k_cache.strides()), " and ", shape_str(v_cache.strides()));
  check_shape(op, "k_new", k_new, {s.B, s.Hkv, -1, s.D});
  const int64_t tn = k_new.size(2);
  check_shape(op, "v_new", v_new, {s.B, s.Hkv, tn, s.D});
  check_dtype(op, "k_new", k_new, k_cache.scalar_type());
  check_dtype(op, "v_new", v_new, k_cache.scalar_type());
  check_same_device(op, "k_new", k_new, k_cache, "k_cache");
  check_same_device(op, "v_new", v_new, k_cache, "k_cache");
  return tn;
}

// Tensors written in place must not have elements sharing memory (e.g. expand() views).
inline void check_written(const char* op, std::initializer_list<std::pair<const char*, const at::Tensor*>> tensors) {
  for (const auto& [name, t] : tensors)
    TORCH_CHECK(at::has_internal_overlap(*t) != at::MemOverlap::Yes, "pyfast.", op, ": expected ", name,
                " without overlapping elements (it is written in place), got strides ", shape_str(t->strides()));
}

// lo <= cache_seqlens[b] <= hi for a CPU tensor (GPU callers check on the host when not capturing).
inline void check_seqlens_values(const char* op, const at::Tensor& cache_seqlens, int64_t lo, int64_t hi) {
  if (cache_seqlens.numel() == 0) return;
  const auto [mn_t, mx_t] = at::aminmax(cache_seqlens);
  const at::Tensor both = at::stack({mn_t, mx_t}).to(at::kCPU);  // one device-to-host read
  const int64_t mn = both[0].item<int64_t>(), mx = both[1].item<int64_t>();
  TORCH_CHECK(mn >= lo && mx <= hi, "pyfast.", op, ": expected cache_seqlens in [", lo, ", ", hi, "], got values in [",
              mn, ", ", mx, "]");
}

inline double softmax_scale(const c10::optional<double>& scale, int64_t D) {
  return scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(D));
}

}  // namespace pyfast::sparse
