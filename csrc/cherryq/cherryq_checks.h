// Checks of the cherryq_matmul arguments, shared by the CPU and CUDA implementations.
#pragma once
#include "common/checks.h"

namespace pyfast::cherryq {

struct MatmulShape {
  int64_t M, N, K, C;  // rows of x, out_features, in_features, cherries per row
};

inline MatmulShape check_matmul_args(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                     const at::Tensor& zeros, const at::Tensor& cherry_idx,
                                     const at::Tensor& cherry_val, const c10::optional<at::Tensor>& bias,
                                     int64_t bits, int64_t group_size) {
  const char* op = "cherryq_matmul";
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4, "pyfast.", op, ": expected bits in (2, 3, 4), got ", bits);
  TORCH_CHECK(group_size == 32 || group_size == 64 || group_size == 128 || group_size == 256, "pyfast.", op,
              ": expected group_size in (32, 64, 128, 256), got ", group_size);
  check_float_dtype(op, "x", x);
  TORCH_CHECK(x.dim() >= 1, "pyfast.", op, ": expected x with at least 1 dim, got a 0-D tensor");
  check_dtype(op, "qweight", qweight, at::kInt);
  check_dtype(op, "scales", scales, at::kHalf);
  check_dtype(op, "zeros", zeros, at::kHalf);
  check_dtype(op, "cherry_idx", cherry_idx, at::kInt);
  check_dtype(op, "cherry_val", cherry_val, at::kHalf);
  TORCH_CHECK(qweight.dim() == 2, "pyfast.", op, ": expected qweight 2-D [N, K/32*bits], got shape ",
              shape_str(qweight.sizes()));
  TORCH_CHECK(scales.dim() == 2, "pyfast.", op, ": expected scales 2-D [N, K/group_size], got shape ",
              shape_str(scales.sizes()));
  const int64_t N = qweight.size(0), G = scales.size(1), K = G * group_size;
  TORCH_CHECK(G > 0, "pyfast.", op, ": expected scales with at least one group, got shape ", shape_str(scales.sizes()));
  TORCH_CHECK(x.size(-1) == K, "pyfast.", op, ": expected x.shape[-1] == in_features = ", K, ", got ", x.size(-1));
  check_shape(op, "qweight", qweight, {N, K / 32 * bits});
  check_shape(op, "scales", scales, {N, G});
  check_shape(op, "zeros", zeros, {N, G});
  TORCH_CHECK(cherry_idx.dim() == 2, "pyfast.", op, ": expected cherry_idx 2-D [N, C], got shape ",
              shape_str(cherry_idx.sizes()));
  const int64_t C = cherry_idx.size(1);
  check_shape(op, "cherry_idx", cherry_idx, {N, C});
  check_shape(op, "cherry_val", cherry_val, {N, C});
  for (auto* t : {&qweight, &scales, &zeros, &cherry_idx, &cherry_val}) {
    TORCH_CHECK(t->is_contiguous(), "pyfast.", op, ": expected contiguous quantized-weight tensors");
    check_same_device(op, "quantized-weight tensors", *t, x, "x");
  }
  if (bias.has_value()) {
    check_shape(op, "bias", *bias, {N});
    check_float_dtype(op, "bias", *bias);
    check_same_device(op, "bias", *bias, x, "x");
  }
  return {x.numel() / K, N, K, C};
}

inline std::vector<int64_t> out_sizes(const at::Tensor& x, int64_t N) {
  auto s = x.sizes().vec();
  s.back() = N;
  return s;
}

}  // namespace pyfast::cherryq
