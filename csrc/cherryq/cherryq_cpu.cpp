// CherryQ matmul on the CPU: x in fp32 and the split over threads (arguments checked by the registry).
//   M <= kGemvMaxRows: GEMV, threads split the output rows; each weight is decoded once per
//                      block of 4 x rows and FMA'd against x straight from L1. For 1-2 rows,
//                      CPUs with AVX-512 VNNI + VBMI use int8 dot products against x split
//                      into three int8 digit planes instead (cherryq_cpu_vnni.cpp).
//   M >  kGemvMaxRows: GEMM, threads split the output rows into panels of kPanelRows; each
//                      panel is dequantized to fp32 once (L2-sized) and multiplied by all of x
//                      in 4x4 register tiles.
// The per-ISA inner loops live in cherryq_cpu_{avx512,scalar}.cpp (torch-free).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cherryq/cherryq_cpu.h"
#include "common/alloc.h"
#include "common/cpu_isa.h"
#include "common/host.h"
#include "kernels.h"

namespace pyfast {

namespace cherryq {
namespace {

constexpr int64_t kGemvMaxRows = 8;
// The VNNI GEMV wins while decoding dominates (1-2 rows of x: 1.2-1.3x on Zen 4); from 3 rows on,
// its 3 int8 dot products per row and chunk cost more than the fp32 kernel's FMAs.
constexpr int64_t kVnniMaxRows = 2;
constexpr int64_t kPanelRows = 64;  // 64 rows x K=4096 fp32 = 1 MiB: stays in a 2 MiB L2

using RowsFn = void (*)(const CpuMatmulArgs&, int64_t, int64_t);
using PanelFn = void (*)(const CpuMatmulArgs&, int64_t, int64_t, float*);

// Sum of x over each quantization group: xsum [M, G].
std::vector<float> group_sums(const float* x, int64_t ldx, int64_t M, int64_t K, int64_t gs) {
  const int64_t G = K / gs;
  std::vector<float> out(M * G);
  at::parallel_for(0, M * G, 256, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const float* p = x + (i / G) * ldx + (i % G) * gs;
      float s = 0.f;
      for (int64_t k = 0; k < gs; ++k) s += p[k];
      out[i] = s;
    }
  });
  return out;
}

}  // namespace

at::Tensor cherryq_matmul_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                              const at::Tensor& zeros, const at::Tensor& cherry_idx, const at::Tensor& cherry_val,
                              const c10::optional<at::Tensor>& bias, int64_t bits, int64_t group_size) {
  const int64_t K = scales.size(1) * group_size, N = qweight.size(0), M = x.numel() / K;

  // x as fp32 rows with unit stride in the last dim (one conversion, outside the hot loop).
  const at::Tensor xc = x.reshape({M, K}).to(at::kFloat).contiguous();
  const at::Tensor bf = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor y = empty_output({M, N}, x.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return y.to(x.scalar_type()).reshape(with_last_size(x, N));

  const std::vector<float> xsum = group_sums(xc.data_ptr<float>(), K, M, K, group_size);
  CpuMatmulArgs a{};
  a.x = xc.data_ptr<float>();
  a.ldx = K;
  a.xsum = xsum.data();
  a.qweight = qweight.data_ptr<int32_t>();
  a.scales = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  a.zeros = reinterpret_cast<const uint16_t*>(zeros.data_ptr<at::Half>());
  a.cherry_idx = cherry_idx.data_ptr<int32_t>();
  a.cherry_val = reinterpret_cast<const uint16_t*>(cherry_val.data_ptr<at::Half>());
  a.bias = bf.defined() ? bf.data_ptr<float>() : nullptr;
  a.y = y.data_ptr<float>();
  a.ldy = N;
  a.M = M, a.N = N, a.K = K, a.C = cherry_idx.size(1);
  a.bits = static_cast<int>(bits), a.group_size = static_cast<int>(group_size);

  const bool avx512 = cpu_use_avx512();
  std::vector<int8_t> xdig;
  std::vector<float> xstep;
  bool vnni = M <= kVnniMaxRows && group_size % 64 == 0 && cpu_use_avx512_vnni();
  if (vnni) {
    xdig.resize(3 * M * K);
    xstep.resize(M * (K / group_size));
    vnni = split_x_digits(a.x, M, K, group_size, xdig.data(), xstep.data());
  }
  a.xdig = xdig.data();
  a.xstep = xstep.data();
  if (M <= kGemvMaxRows) {
    const RowsFn rows = vnni ? gemv_rows_vnni : avx512 ? gemv_rows_avx512 : gemv_rows_scalar;
    // Grain: enough rows that each task streams >= ~64 KiB of packed weights.
    const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, K / 32 * bits * 4));
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { rows(a, n0, n1); });
  } else {
    const PanelFn panel = avx512 ? gemm_rows_avx512 : gemm_rows_scalar;
    const int64_t panels = (N + kPanelRows - 1) / kPanelRows;
    at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
      std::vector<float> w(kPanelRows * K);
      for (int64_t p = p0; p < p1; ++p) panel(a, p * kPanelRows, std::min(kPanelRows, N - p * kPanelRows), w.data());
    });
  }
  return y.to(x.scalar_type()).reshape(with_last_size(x, N));
}

}  // namespace cherryq
}  // namespace pyfast
