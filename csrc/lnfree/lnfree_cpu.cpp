// LN-free linear layers on the CPU: linear_bias_gelu_cpu, linear_bias_residual_cpu (host side).
// x [..., K] is flattened to rows and converted once to fp32 (zero-padded to whole vectors; the
// kernels broadcast its elements), then threads split the output columns into panels of kPanel
// and run the per-ISA kernel (lnfree_cpu_kernel.h) over every row.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <vector>

#include "common/alloc.h"
#include "common/cpu_isa.h"
#include "common/host.h"
#include "kernels.h"
#include "lnfree/lnfree_cpu.h"

namespace pyfast::lnfree {

int64_t scratch_floats(int64_t M) { return kDepth * kPanel + (M > kGemvRows ? M : kGemvRows) * kPanel; }

namespace {

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                  const c10::optional<at::Tensor>& residual, bool gelu) {
  const int64_t K = x.size(-1), N = weight.size(0), M = x.numel() / (K > 0 ? K : 1);
  const at::Tensor xf = at::zeros({M, pad16(K)}, x.options().dtype(at::kFloat));
  if (M > 0 && K > 0) xf.narrow(1, 0, K).copy_(x.reshape({M, K}));
  const at::Tensor w = last_dim_contiguous(weight);
  at::Tensor b, r;
  if (bias.has_value()) b = bias->contiguous();
  if (residual.has_value()) r = last_dim_contiguous(residual->reshape({M, N}));
  at::Tensor y = empty_output(with_last_size(x, N), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (M == 0 || N == 0) return y;

  LinearArgs a{};
  a.elem = elem_of(x);
  a.x = xf.data_ptr<float>(), a.M = M, a.K = K, a.N = N;
  a.w = w.data_ptr(), a.ldw = w.stride(0);
  a.bias = b.defined() ? b.data_ptr() : nullptr;
  a.residual = r.defined() ? r.data_ptr() : nullptr, a.ldr = r.defined() ? r.stride(0) : 0;
  a.y = y.data_ptr(), a.gelu = gelu;
  const auto kernel = cpu_use_avx512() ? linear_columns_avx512 : linear_columns_scalar;
  const int64_t panels = (N + kPanel - 1) / kPanel;
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> scratch(scratch_floats(M));
    const int64_t n1 = p1 * kPanel < N ? p1 * kPanel : N;
    kernel(a, p0 * kPanel, n1, scratch.data());
  });
  return y;
}

}  // namespace

at::Tensor linear_bias_gelu_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  return linear(x, weight, bias, c10::nullopt, true);
}

at::Tensor linear_bias_residual_cpu(const at::Tensor& x, const at::Tensor& weight,
                                    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual) {
  return linear(x, weight, bias, residual, false);
}

}  // namespace pyfast::lnfree
