// Every compiled kernel entry point, bound into pyfast._C by module.cpp and called by the op
// registry (pyfast/_registry.py) as the "cpu" and "cuda" implementations of torch.ops.pyfast.*.
// The registry checks every argument before calling; these functions do not check again.
// Argument order and meaning: the op's schema in pyfast/<family>/ops.py.
#pragma once
#include <ATen/ATen.h>

#include <vector>

// The CUDA entry points as X(namespace, name), for module.cpp and the CPU emulation of the CUDA
// kernels (csrc/emu/emu_module.cpp), so both bind the same list.
#define PYFAST_CUDA_ENTRY_POINTS(X)                                                                 \
  X(cherryq, cherryq_matmul_cuda)                                                                    \
  X(hedgehog, hedgehog_attention_cuda)                                                               \
  X(hedgehog, hedgehog_decode_cuda)                                                                  \
  X(sparse, append_kv_cuda)                                                                          \
  X(sparse, decode_attention_cuda)                                                                   \
  X(sparse, sparse_decode_attention_cuda)

namespace pyfast {

namespace cherryq {
at::Tensor cherryq_matmul_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                              const at::Tensor& zeros, const at::Tensor& cherry_idx, const at::Tensor& cherry_val,
                              const c10::optional<at::Tensor>& bias, int64_t bits, int64_t group_size);
at::Tensor cherryq_matmul_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                               const at::Tensor& zeros, const at::Tensor& cherry_idx, const at::Tensor& cherry_val,
                               const c10::optional<at::Tensor>& bias, int64_t bits, int64_t group_size);
}  // namespace cherryq

namespace sparse {
void append_kv_cpu(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& block_keys,
                   const at::Tensor& cache_seqlens, const at::Tensor& k_new, const at::Tensor& v_new,
                   int64_t block_size);
at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& cache_seqlens, c10::optional<double> scale);
at::Tensor sparse_decode_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                       const at::Tensor& cache_seqlens, const at::Tensor& block_keys,
                                       int64_t block_size, int64_t topk, int64_t sink_blocks, int64_t local_blocks,
                                       c10::optional<double> scale);
void append_kv_cuda(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& block_keys,
                    const at::Tensor& cache_seqlens, const at::Tensor& k_new, const at::Tensor& v_new,
                    int64_t block_size);
at::Tensor decode_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& cache_seqlens, c10::optional<double> scale);
at::Tensor sparse_decode_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                        const at::Tensor& cache_seqlens, const at::Tensor& block_keys,
                                        int64_t block_size, int64_t topk, int64_t sink_blocks, int64_t local_blocks,
                                        c10::optional<double> scale);
}  // namespace sparse

namespace lnfree {
// y = x @ weight^T + bias, then GPT-2's tanh GELU / + residual (csrc/lnfree/lnfree_cpu.cpp).
at::Tensor linear_bias_gelu_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias);
at::Tensor linear_bias_residual_cpu(const at::Tensor& x, const at::Tensor& weight,
                                    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual);
}  // namespace lnfree

namespace hedgehog {
// Forward (csrc/hedgehog/hedgehog_cpu.cpp). States float32: S [N, Hkv, 2F, Dv], z [N, Hkv, 2F]
// (N = B, or the number of segments of cu_seqlens); with window > 0 the returned S, z are [0].
std::tuple<at::Tensor, at::Tensor, at::Tensor> hedgehog_attention_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& q_weight,
    const at::Tensor& k_weight, const c10::optional<at::Tensor>& q_bias, const c10::optional<at::Tensor>& k_bias,
    bool causal, double eps, const c10::optional<at::Tensor>& initial_S, const c10::optional<at::Tensor>& initial_z,
    int64_t window, const c10::optional<at::Tensor>& alpha, const c10::optional<at::Tensor>& beta,
    c10::optional<double> scale, const c10::optional<at::Tensor>& cu_seqlens);  // -> (out, S_T, z_T)
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_attention_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal, double eps,
    const c10::optional<at::Tensor>& initial_S, const c10::optional<at::Tensor>& initial_z,
    const c10::optional<at::Tensor>& cu_seqlens);  // q, k: features [B, Hq, T, F'], [B, Hkv, T, F']
at::Tensor hedgehog_feature_map_cpu(const at::Tensor& x, const at::Tensor& weight,
                                    const c10::optional<at::Tensor>& bias);
at::Tensor hedgehog_decode_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& q_weight, const at::Tensor& k_weight,
                               const c10::optional<at::Tensor>& q_bias, const c10::optional<at::Tensor>& k_bias,
                               const at::Tensor& S, const at::Tensor& z, double eps);  // S, z updated in place
// CUDA (csrc/hedgehog/hedgehog_cuda_host.cpp): the forward for window 0 and float16 / bfloat16
// only (the registry sends the rest elsewhere); same arguments and results as the CPU entry points.
std::tuple<at::Tensor, at::Tensor, at::Tensor> hedgehog_attention_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& q_weight,
    const at::Tensor& k_weight, const c10::optional<at::Tensor>& q_bias, const c10::optional<at::Tensor>& k_bias,
    bool causal, double eps, const c10::optional<at::Tensor>& initial_S, const c10::optional<at::Tensor>& initial_z,
    int64_t window, const c10::optional<at::Tensor>& alpha, const c10::optional<at::Tensor>& beta,
    c10::optional<double> scale, const c10::optional<at::Tensor>& cu_seqlens);
at::Tensor hedgehog_decode_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& q_weight, const at::Tensor& k_weight,
                                const c10::optional<at::Tensor>& q_bias, const c10::optional<at::Tensor>& k_bias,
                                const at::Tensor& S, const at::Tensor& z, double eps);
// Backward (csrc/hedgehog/hedgehog_cpu_backward.cpp) of hedgehog_attention / linear_attention
// (grad_S, grad_z: gradients of the returned state, absent when not needed), then every forward
// argument in schema order. Returns {dq, dk, dv, dq_weight, dk_weight, dq_bias, dk_bias,
// dinitial_S, dinitial_z, dalpha, dbeta} resp. {dq, dk, dv, dinitial_S, dinitial_z}, undefined where
// the forward argument was absent.
std::vector<at::Tensor> hedgehog_attention_backward_cpu(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_S, const c10::optional<at::Tensor>& grad_z,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& q_weight,
    const at::Tensor& k_weight, const c10::optional<at::Tensor>& q_bias, const c10::optional<at::Tensor>& k_bias,
    bool causal, double eps, const c10::optional<at::Tensor>& initial_S, const c10::optional<at::Tensor>& initial_z,
    int64_t window, const c10::optional<at::Tensor>& alpha, const c10::optional<at::Tensor>& beta,
    c10::optional<double> scale, const c10::optional<at::Tensor>& cu_seqlens);
std::vector<at::Tensor> linear_attention_backward_cpu(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_S, const c10::optional<at::Tensor>& grad_z,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal, double eps,
    const c10::optional<at::Tensor>& initial_S, const c10::optional<at::Tensor>& initial_z,
    const c10::optional<at::Tensor>& cu_seqlens);
// Chunks per block of the causal backward's slots (0: as many as kStateBytes holds); tests set a few
// to reach the checkpointed path (pyfast._C.set_hedgehog_backward_block_chunks).
int64_t& backward_block_chunks();
}  // namespace hedgehog

}  // namespace pyfast
