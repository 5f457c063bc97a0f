// Hedgehog forward on the CPU: hedgehog_attention, linear_attention, hedgehog_feature_map,
// hedgehog_decode (the math: pyfast/reference/hedgehog.py; the loops: hedgehog_cpu_kernel.h).
//
// Plan: one unit of work per (sequence or packed segment, KV head), holding the running state
// of that KV head and serving its G query heads, so K/V features and the state are computed once
// per group. When there are fewer such units than threads, the query heads of a group are split
// over several units that each recompute the (cheap) key side. Units are handed out longest
// first from a shared counter, so packed segments of uneven length still keep every thread busy.
// Weights and biases are converted to fp32 contiguous once here (they are small); q/k/v are read
// in place through their strides.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "common/alloc.h"
#include "common/cpu_isa.h"
#include "common/host.h"
#include "hedgehog/hedgehog_cpu.h"
#include "kernels.h"

namespace pyfast::hedgehog {
namespace {

Strided strided(const at::Tensor& t) {  // [B, H, T, *] or [B, H, *]
  return Strided{t.data_ptr(), t.stride(0), t.stride(1), t.dim() == 4 ? t.stride(2) : 0};
}

at::Tensor f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

// fp32 contiguous bias [H, F], zeros when absent.
at::Tensor bias_f32(const c10::optional<at::Tensor>& b, int64_t H, int64_t F) {
  return b.has_value() ? f32(*b) : at::zeros({H, F}, at::TensorOptions().dtype(at::kFloat));
}

// fp32 scratch of `per` floats for each of `n` slots, each slot 64-byte aligned.
struct Scratch {
  int64_t per;
  at::Tensor buf;
  Scratch(int64_t n, int64_t per_) : per((per_ + 15) / 16 * 16) {
    buf = at::empty({n * per + 16}, at::TensorOptions().dtype(at::kFloat));
  }
  float* slot(int64_t i) const {
    auto p = reinterpret_cast<uintptr_t>(buf.data_ptr<float>());
    return reinterpret_cast<float*>((p + 63) / 64 * 64) + i * per;
  }
};

// Runs fn(item, scratch) for every item in [0, n), items taken in the given order from a shared
// counter by one task per thread (dynamic scheduling: items differ in cost).
template <class Fn>
void run_dynamic(const std::vector<int64_t>& order, int64_t scratch_floats, Fn&& fn) {
  const int64_t n = static_cast<int64_t>(order.size());
  if (n == 0) return;
  const int64_t tasks = std::min<int64_t>(at::get_num_threads(), n);
  const Scratch scratch(tasks, scratch_floats);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t i = next++; i < n; i = next++) fn(order[i], scratch.slot(t));
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor* q_weight,
    const at::Tensor* k_weight, const c10::optional<at::Tensor>& q_bias, const c10::optional<at::Tensor>& k_bias,
    bool causal, double eps, const c10::optional<at::Tensor>& initial_S, const c10::optional<at::Tensor>& initial_z,
    int64_t window, const c10::optional<at::Tensor>& alpha_, const c10::optional<at::Tensor>& beta_,
    c10::optional<double> scale, const c10::optional<at::Tensor>& cu_seqlens) {
  const at::Tensor q = last_dim_contiguous(q_), k = last_dim_contiguous(k_), v = last_dim_contiguous(v_);
  const int64_t B = q.size(0), Hq = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1), Dv = v.size(3);
  const int64_t F = q_weight ? q_weight->size(2) : 0, FF = q_weight ? 2 * F : D;

  at::Tensor wq, wk, bq, bk, alpha, beta, S0, z0;
  FwdArgs a{};
  a.q = strided(q), a.k = strided(k), a.v = strided(v);
  a.elem = elem_of(v);
  a.Hq = Hq, a.Hkv = Hkv, a.G = Hq / Hkv, a.T = T, a.D = D, a.Dv = Dv, a.Dvp = round16(Dv);
  a.F = F, a.FF = FF;
  if (q_weight) {
    wq = f32(*q_weight), wk = f32(*k_weight), bq = bias_f32(q_bias, Hq, F), bk = bias_f32(k_bias, Hkv, F);
    a.wq = wq.data_ptr<float>(), a.wk = wk.data_ptr<float>(), a.bq = bq.data_ptr<float>(), a.bk = bk.data_ptr<float>();
  }
  a.causal = causal;
  a.eps = static_cast<float>(eps);
  a.window = window;
  a.scale = static_cast<float>(scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(D)));
  if (alpha_.has_value()) alpha = f32(*alpha_), a.alpha = alpha.data_ptr<float>();
  if (beta_.has_value()) beta = f32(*beta_), a.beta = beta.data_ptr<float>();
  if (initial_S.has_value()) {
    S0 = f32(*initial_S), z0 = f32(*initial_z);
    a.S0 = S0.data_ptr<float>(), a.z0 = z0.data_ptr<float>();
  }

  // Sequences: batch rows, or the packed segments of cu_seqlens (B == 1).
  std::vector<int64_t> starts, lens;
  if (cu_seqlens.has_value()) {
    const at::Tensor cu = cu_seqlens->to(at::kLong).contiguous();
    const int64_t* c = cu.data_ptr<int64_t>();
    for (int64_t i = 0; i + 1 < cu.numel(); ++i) starts.push_back(c[i]), lens.push_back(c[i + 1] - c[i]);
  } else {
    starts.assign(B, 0), lens.assign(B, T);
  }
  const int64_t N = static_cast<int64_t>(lens.size());

  const auto f32opts = q.options().dtype(at::kFloat);
  at::Tensor out = empty_output({B, Hq, T, Dv}, v.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor ST = window > 0 ? empty_output({0}, f32opts) : empty_output({N, Hkv, FF, Dv}, f32opts);
  at::Tensor zT = window > 0 ? empty_output({0}, f32opts) : empty_output({N, Hkv, FF}, f32opts);
  a.out = out.data_ptr();
  if (window == 0) a.ST = ST.data_ptr<float>(), a.zT = zT.data_ptr<float>();

  // Units: (sequence, KV head, query-head split); splits only when units < threads.
  const int64_t threads = at::get_num_threads();
  const int64_t splits = std::min<int64_t>(a.G, std::max<int64_t>(1, threads / std::max<int64_t>(1, N * Hkv)));
  std::vector<FwdWork> units;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < Hkv; ++j)
      for (int64_t s = 0; s < splits; ++s)
        units.push_back(FwdWork{n, cu_seqlens.has_value() ? 0 : n, starts[n], lens[n], j, s * a.G / splits,
                                (s + 1) * a.G / splits, nullptr});
  std::vector<int64_t> order(units.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
  // Longest first; the cost of a unit grows with its length (quadratically in the window part).
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) {
    return units[x].len * (units[x].g1 - units[x].g0) > units[y].len * (units[y].g1 - units[y].g0);
  });
  const auto kernel = cpu_use_avx512() ? fwd_work_avx512 : fwd_work_scalar;
  run_dynamic(order, FwdScratch(a).total, [&](int64_t i, float* scratch) {
    FwdWork w = units[i];
    w.scratch = scratch;
    kernel(a, w);
  });
  return {out, ST, zT};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> hedgehog_attention_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& q_weight,
    const at::Tensor& k_weight, const c10::optional<at::Tensor>& q_bias, const c10::optional<at::Tensor>& k_bias,
    bool causal, double eps, const c10::optional<at::Tensor>& initial_S, const c10::optional<at::Tensor>& initial_z,
    int64_t window, const c10::optional<at::Tensor>& alpha, const c10::optional<at::Tensor>& beta,
    c10::optional<double> scale, const c10::optional<at::Tensor>& cu_seqlens) {
  return forward(q, k, v, &q_weight, &k_weight, q_bias, k_bias, causal, eps, initial_S, initial_z, window, alpha, beta,
                 scale, cu_seqlens);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_attention_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal, double eps,
    const c10::optional<at::Tensor>& initial_S, const c10::optional<at::Tensor>& initial_z,
    const c10::optional<at::Tensor>& cu_seqlens) {
  return forward(q, k, v, nullptr, nullptr, c10::nullopt, c10::nullopt, causal, eps, initial_S, initial_z, 0,
                 c10::nullopt, c10::nullopt, c10::nullopt, cu_seqlens);
}

at::Tensor hedgehog_feature_map_cpu(const at::Tensor& x_, const at::Tensor& weight,
                                    const c10::optional<at::Tensor>& bias) {
  const at::Tensor x = last_dim_contiguous(x_);
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3), F = weight.size(2);
  const at::Tensor w = f32(weight), b = bias_f32(bias, H, F);
  at::Tensor out = empty_output({B, H, T, 2 * F}, x.options().memory_format(at::MemoryFormat::Contiguous));
  FmapArgs a{strided(x), out.data_ptr(), elem_of(x), H, T, D, F, w.data_ptr<float>(), b.data_ptr<float>()};
  const int64_t chunks = (T + kChunk - 1) / kChunk, n = B * H * chunks;
  std::vector<int64_t> order(n);
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  const auto kernel = cpu_use_avx512() ? fmap_chunk_avx512 : fmap_chunk_scalar;
  run_dynamic(order, fmap_scratch_floats(a), [&](int64_t i, float* scratch) {
    const int64_t bh = i / chunks, t0 = i % chunks * kChunk;
    kernel(a, bh / H, bh % H, t0, std::min<int64_t>(kChunk, T - t0), scratch);
  });
  return out;
}

at::Tensor hedgehog_decode_cpu(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                               const at::Tensor& q_weight, const at::Tensor& k_weight,
                               const c10::optional<at::Tensor>& q_bias, const c10::optional<at::Tensor>& k_bias,
                               const at::Tensor& S, const at::Tensor& z, double eps) {
  const at::Tensor q = last_dim_contiguous(q_), k = last_dim_contiguous(k_), v = last_dim_contiguous(v_);
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k.size(1), Dv = v.size(2), F = q_weight.size(2);
  const at::Tensor wq = f32(q_weight), wk = f32(k_weight), bq = bias_f32(q_bias, Hq, F), bk = bias_f32(k_bias, Hkv, F);
  at::Tensor out = empty_output({B, Hq, Dv}, v.options().memory_format(at::MemoryFormat::Contiguous));
  DecodeArgs a{strided(q), strided(k), strided(v), out.data_ptr(), elem_of(v), Hkv, Hq / Hkv, D, F, Dv,
               wq.data_ptr<float>(), wk.data_ptr<float>(), bq.data_ptr<float>(), bk.data_ptr<float>(),
               S.data_ptr<float>(), z.data_ptr<float>(), static_cast<float>(eps)};
  std::vector<int64_t> order(B * Hkv);
  for (int64_t i = 0; i < B * Hkv; ++i) order[i] = i;
  const auto kernel = cpu_use_avx512() ? decode_head_avx512 : decode_head_scalar;
  run_dynamic(order, decode_scratch_floats(a), [&](int64_t i, float* scratch) { kernel(a, i / Hkv, i % Hkv, scratch); });
  return out;
}

}  // namespace pyfast::hedgehog
