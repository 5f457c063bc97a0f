// CUDA implementations of torch.ops.pyfast.hedgehog_decode and hedgehog_attention (window 0,
// float16 / bfloat16; arguments checked by the registry, pyfast/hedgehog/ops.py, which also sends
// what these kernels do not cover elsewhere): dtype mapping, outputs, workspace, the launches. The
// device code (hedgehog_decode.cuh, hedgehog_chunk.cuh) and launchers (hedgehog_cuda.cu) are
// torch-free; this file is the only one that sees ATen.
#include <ATen/ATen.h>

#include "common/alloc.h"
#include "common/cuda_host.h"
#include "common/host.h"
#include "hedgehog/hedgehog_cuda.h"
#include "kernels.h"

namespace pyfast {
namespace hedgehog {
at::Tensor hedgehog_decode_cuda(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                                const at::Tensor& q_weight, const at::Tensor& k_weight,
                                const c10::optional<at::Tensor>& q_bias, const c10::optional<at::Tensor>& k_bias,
                                const at::Tensor& S, const at::Tensor& z, double eps) {
  const char* op = "hedgehog_decode";
  const CudaScope cuda(q_);
  const at::Tensor q = last_dim_contiguous(q_), k = last_dim_contiguous(k_), v = last_dim_contiguous(v_);
  const at::Tensor qw = q_weight.contiguous(), kw = k_weight.contiguous();
  const c10::optional<at::Tensor> qb = q_bias.has_value() ? c10::optional<at::Tensor>(q_bias->contiguous()) : q_bias;
  const c10::optional<at::Tensor> kb = k_bias.has_value() ? c10::optional<at::Tensor>(k_bias->contiguous()) : k_bias;
  at::Tensor out = empty_output({q.size(0), q.size(1), v.size(2)}, v.options());
  DecodeParams p{};
  p.q = q.data_ptr(), p.k = k.data_ptr(), p.v = v.data_ptr();
  p.q_sb = q.stride(0), p.q_sh = q.stride(1), p.k_sb = k.stride(0), p.k_sh = k.stride(1);
  p.v_sb = v.stride(0), p.v_sh = v.stride(1);
  p.q_weight = qw.data_ptr(), p.k_weight = kw.data_ptr(), p.q_bias = ptr_or_null(qb), p.k_bias = ptr_or_null(kb);
  p.S = S.data_ptr<float>(), p.z = z.data_ptr<float>(), p.out = out.data_ptr();
  p.B = q.size(0), p.Hq = q.size(1), p.Hkv = k.size(1), p.D = q.size(2), p.F = qw.size(2), p.Dv = v.size(2);
  p.eps = static_cast<float>(eps);
  p.dtype = to_dtype(op, q.scalar_type());
  check_launch(op, launch_decode(p, cuda.stream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> hedgehog_attention_cuda(
    const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& q_weight,
    const at::Tensor& k_weight, const c10::optional<at::Tensor>& q_bias, const c10::optional<at::Tensor>& k_bias,
    bool causal, double eps, const c10::optional<at::Tensor>& initial_S, const c10::optional<at::Tensor>& initial_z,
    int64_t window, const c10::optional<at::Tensor>& alpha, const c10::optional<at::Tensor>& beta,
    c10::optional<double> scale, const c10::optional<at::Tensor>& cu_seqlens) {
  const char* op = "hedgehog_attention";
  // The registry routes window > 0 and float32 elsewhere (pyfast/hedgehog/ops.py, cuda_unsupported).
  TORCH_CHECK_VALUE(window == 0, "pyfast.", op, ": expected window 0 on CUDA C++, got ", window);
  (void)alpha, (void)beta, (void)scale;  // the window hybrid's arguments
  const CudaScope cuda(q_);
  const at::Tensor q = last_dim_contiguous(q_), k = last_dim_contiguous(k_), v = last_dim_contiguous(v_);
  const at::Tensor qw = q_weight.contiguous(), kw = k_weight.contiguous();
  const c10::optional<at::Tensor> qb = q_bias.has_value() ? c10::optional<at::Tensor>(q_bias->contiguous()) : q_bias;
  const c10::optional<at::Tensor> kb = k_bias.has_value() ? c10::optional<at::Tensor>(k_bias->contiguous()) : k_bias;
  const int64_t B = q.size(0), Hq = q.size(1), T = q.size(2), Hkv = k.size(1), F = qw.size(2), Dv = v.size(3);
  const int64_t N = cu_seqlens.has_value() ? cu_seqlens->size(0) - 1 : B;
  const at::Tensor s0 = initial_S.has_value() ? initial_S->contiguous() : at::Tensor();
  const at::Tensor z0 = initial_z.has_value() ? initial_z->contiguous() : at::Tensor();
  at::Tensor out = empty_output({B, Hq, T, Dv}, v.options());
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor S = empty_output({N, Hkv, 2 * F, Dv}, f32), z = empty_output({N, Hkv, 2 * F}, f32);

  ForwardParams p{};
  p.q = q.data_ptr(), p.k = k.data_ptr(), p.v = v.data_ptr();
  p.q_sb = q.stride(0), p.q_sh = q.stride(1), p.q_st = q.stride(2);
  p.k_sb = k.stride(0), p.k_sh = k.stride(1), p.k_st = k.stride(2);
  p.v_sb = v.stride(0), p.v_sh = v.stride(1), p.v_st = v.stride(2);
  p.q_weight = qw.data_ptr(), p.k_weight = kw.data_ptr(), p.q_bias = ptr_or_null(qb), p.k_bias = ptr_or_null(kb);
  p.S0 = s0.defined() ? s0.data_ptr<float>() : nullptr, p.z0 = z0.defined() ? z0.data_ptr<float>() : nullptr;
  p.cu_seqlens = cu_seqlens.has_value() ? cu_seqlens->data_ptr<int32_t>() : nullptr;
  p.out = out.data_ptr(), p.S_out = S.data_ptr<float>(), p.z_out = z.data_ptr<float>();
  p.B = B, p.N = N, p.Hq = Hq, p.Hkv = Hkv, p.T = T, p.D = q.size(3), p.F = F, p.Dv = Dv;
  p.causal = causal, p.eps = static_cast<float>(eps), p.dtype = to_dtype(op, q.scalar_type());
  const at::Tensor ws = at::empty({static_cast<int64_t>(forward_workspace_floats(p))}, f32);
  p.workspace = ws.data_ptr<float>();
  check_launch(op, launch_forward(p, cuda.stream()));
  return {out, S, z};
}

}  // namespace hedgehog
}  // namespace pyfast
