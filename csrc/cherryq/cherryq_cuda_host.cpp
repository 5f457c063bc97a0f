// CUDA implementation of torch.ops.pyfast.cherryq_matmul (arguments checked by the registry):
// dtype mapping and the launch. The device code (cherryq_gemv.cuh) and its launcher (cherryq_cuda.cu) are
// torch-free; this file is the only one that sees ATen.
#include <ATen/ATen.h>

#include "cherryq/cherryq_cuda.h"
#include "common/alloc.h"
#include "common/cuda_host.h"
#include "common/host.h"
#include "kernels.h"

namespace pyfast {
namespace cherryq {
// y[..., N] = x[..., K] @ dequantize(W).T + bias (fp32 accumulation, y in x's dtype).
// Batched GEMV: rows of x are processed 8 at a time, each pass streaming the weights once.
at::Tensor cherryq_matmul_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                               const at::Tensor& zeros, const at::Tensor& cherry_idx, const at::Tensor& cherry_val,
                               const c10::optional<at::Tensor>& bias, int64_t bits, int64_t group_size) {
  const char* op = "cherryq_matmul";
  struct {
    int64_t M, N, K, C;
  } s;
  s.K = scales.size(1) * group_size, s.N = qweight.size(0), s.M = x.numel() / s.K, s.C = cherry_idx.size(1);
  const CudaScope cuda(x);

  // [..., K] -> [M, K]; a view whenever the leading dims allow it, rows may be strided.
  const at::Tensor x2 = last_dim_contiguous(x.reshape({s.M, s.K}));
  at::Tensor y = empty_output({s.M, s.N}, x.options());  // at::empty (NaN-poisoned under tests)
  if (s.M == 0 || s.N == 0) return y.view(with_last_size(x, s.N));
  at::Tensor b;
  if (bias.has_value()) b = bias->contiguous();

  GemvParams p{};
  p.x = x2.data_ptr();
  p.x_row_stride = x2.stride(0);
  p.x_dtype = to_dtype(op, x2.scalar_type());
  p.qweight = qweight.data_ptr<int32_t>();
  p.scales = scales.data_ptr();
  p.zeros = zeros.data_ptr();
  p.cherry_idx = cherry_idx.data_ptr<int32_t>();
  p.cherry_val = cherry_val.data_ptr();
  p.bias = b.defined() ? b.data_ptr() : nullptr;
  p.bias_dtype = b.defined() ? to_dtype(op, b.scalar_type()) : DType::kFloat32;
  p.y = y.data_ptr();
  p.M = s.M;
  p.N = s.N;
  p.K = s.K;
  p.C = s.C;
  p.bits = static_cast<int32_t>(bits);
  p.group_size = static_cast<int32_t>(group_size);

  check_launch(op, launch_gemv(p, cuda.stream()));
  return y.view(with_last_size(x, s.N));
}

}  // namespace cherryq
}  // namespace pyfast
