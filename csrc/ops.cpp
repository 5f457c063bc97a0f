// The one schema file: every torch.ops.pyfast.* op is declared here, once.
// CPU implementations live in csrc/<family>/*_cpu.cpp, CUDA ones in csrc/<family>/*_cuda*.{cpp,cu};
// fake (meta) impls and autograd are registered from Python (pyfast/<family>/ops.py).
#include <torch/library.h>

TORCH_LIBRARY(pyfast, m) {
  // CherryQ: y[..., N] = x[..., K] @ dequantize(W).T + bias (layout: pyfast/cherryq/format.py).
  m.def(
      "cherryq_matmul(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor cherry_idx, "
      "Tensor cherry_val, Tensor? bias, int bits, int group_size) -> Tensor");
}
