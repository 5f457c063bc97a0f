// The one schema file: every torch.ops.pyfast.* op is declared here, once.
// CPU implementations live in csrc/<family>/*_cpu.cpp, CUDA ones in csrc/<family>/*_cuda*.{cpp,cu};
// fake (meta) impls and autograd are registered from Python (pyfast/<family>/ops.py).
#include <torch/library.h>

TORCH_LIBRARY(pyfast, m) {
  // CherryQ: y[..., N] = x[..., K] @ dequantize(W).T + bias (layout: pyfast/cherryq/format.py).
  m.def(
      "cherryq_matmul(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor cherry_idx, "
      "Tensor cherry_val, Tensor? bias, int bits, int group_size) -> Tensor");

  // Sparse decoding (Kinetics block top-k; layouts and selection rule: pyfast/reference/sparse.py).
  // Caches [B, Hkv, Tmax, D], cache_seqlens int32 [B], block_keys [B, Hkv, Tmax / block_size, D].
  m.def(
      "append_kv(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!) block_keys, Tensor(d!) cache_seqlens, "
      "Tensor k_new, Tensor v_new, int block_size) -> ()");
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, float? scale) -> Tensor");
  m.def(
      "sparse_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, Tensor block_keys, "
      "int block_size, int topk, int sink_blocks, int local_blocks, float? scale) -> Tensor");
}
