// Hedgehog backward on the CPU: hedgehog_attention_backward_cpu, linear_attention_backward_cpu.
//
// The plan: one task per (sequence or packed segment n, KV head j), run by the per-ISA kernel
// (hedgehog_bwd_kernel.h: a forward scan recomputing features and den/gnum per chunk, then a reverse
// scan for dK/dv). Threads take tasks longest first from a shared counter (segments differ in
// length). Each task writes its own rows of fp32 dq/dk/dv and dS0/dz0; the sums over tasks (weight,
// bias, alpha, beta gradients) go to one zeroed buffer per thread, added up here at the end.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <numeric>
#include <vector>

#include "common/alloc.h"
#include "common/cpu_isa.h"
#include "common/host.h"
#include "hedgehog/hedgehog_cpu_backward.h"
#include "kernels.h"

namespace pyfast::hedgehog {
namespace {

using bwd::pad16;

bwd::Rows rows_of(const at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }

// [H, R, Cn] -> fp32 [H, R, pad16(Cn)], zero-padded (transposed first: [H, Cn, R] -> [H, Cn, pad16(R)]).
at::Tensor padded32(const at::Tensor& w, bool transposed) {
  const at::Tensor x = transposed ? w.transpose(1, 2) : w;
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = pad16(sizes.back());
  at::Tensor out = at::zeros(sizes, w.options().dtype(at::kFloat));
  out.narrow(-1, 0, x.size(-1)).copy_(x);
  return out;
}

const float* f32_ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

at::Tensor f32_contiguous(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->to(at::kFloat).contiguous() : at::Tensor();
}

// An fp32 buffer the kernel writes in full: the output itself for float32, else converted after.
at::Tensor f32_buffer(at::IntArrayRef sizes, const at::Tensor& like) {
  const auto opts = like.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous);
  return like.scalar_type() == at::kFloat ? empty_output(sizes, opts) : at::empty(sizes, opts);
}
at::Tensor finish(const at::Tensor& buf, at::ScalarType dtype) {
  if (dtype == at::kFloat) return buf;
  at::Tensor out = empty_output(buf.sizes(), buf.options().dtype(dtype));
  out.copy_(buf);
  return out;
}

struct Inputs {
  at::Tensor grad_out, q, k, v;
  c10::optional<at::Tensor> grad_S, grad_z, q_weight, k_weight, q_bias, k_bias, initial_S, initial_z, alpha, beta,
      cu_seqlens;
  bool causal = true;
  double eps = 1e-6;
  int64_t window = 0;
  c10::optional<double> scale;
};

// {dq, dk, dv, dq_weight, dk_weight, dq_bias, dk_bias, dinitial_S, dinitial_z, dalpha, dbeta}
std::vector<at::Tensor> backward(const Inputs& in) {
  const at::Tensor q = last_dim_contiguous(in.q), k = last_dim_contiguous(in.k), v = last_dim_contiguous(in.v);
  const at::Tensor go = last_dim_contiguous(in.grad_out).to(v.scalar_type());
  const bool fmap = in.q_weight.has_value();
  const int64_t B = q.size(0), Hq = q.size(1), T = q.size(2), Hkv = k.size(1), Dv = v.size(3);
  const int64_t F = fmap ? in.q_weight->size(2) : 0, D = q.size(3), F2 = fmap ? 2 * F : D;

  bwd::Problem p{};
  p.elem = elem_of(q);
  p.q = rows_of(q), p.k = rows_of(k), p.v = rows_of(v), p.go = rows_of(go);
  p.B = B, p.Hq = Hq, p.Hkv = Hkv, p.T = T, p.D = D, p.F = F, p.F2 = F2, p.Dv = Dv;
  p.feature_map = fmap, p.causal = in.causal, p.window = in.window;
  p.scale = static_cast<float>(in.scale.has_value() ? *in.scale : 1.0 / std::sqrt(static_cast<double>(D)));
  p.eps = static_cast<float>(in.eps);

  // Feature-map parameters, fp32 and zero-padded (small: converted once here).
  at::Tensor wq, wqt, bq, wk, wkt, bk;
  if (fmap) {
    wq = padded32(*in.q_weight, false), wqt = padded32(*in.q_weight, true);
    wk = padded32(*in.k_weight, false), wkt = padded32(*in.k_weight, true);
    if (in.q_bias.has_value()) bq = padded32(in.q_bias->unsqueeze(1), false);
    if (in.k_bias.has_value()) bk = padded32(in.k_bias->unsqueeze(1), false);
  }
  p.wq = f32_ptr_or_null(wq), p.wqt = f32_ptr_or_null(wqt), p.bq = f32_ptr_or_null(bq);
  p.wk = f32_ptr_or_null(wk), p.wkt = f32_ptr_or_null(wkt), p.bk = f32_ptr_or_null(bk);
  const at::Tensor alpha = f32_contiguous(in.alpha), beta = f32_contiguous(in.beta);
  p.alpha = f32_ptr_or_null(alpha), p.beta = f32_ptr_or_null(beta);
  const at::Tensor S0 = f32_contiguous(in.initial_S), z0 = f32_contiguous(in.initial_z);
  const at::Tensor gS = f32_contiguous(in.grad_S), gz = f32_contiguous(in.grad_z);
  p.S0 = f32_ptr_or_null(S0), p.z0 = f32_ptr_or_null(z0), p.gS = f32_ptr_or_null(gS), p.gz = f32_ptr_or_null(gz);

  // Sequences: the batch rows, or the packed segments.
  std::vector<int32_t> cu;
  if (in.cu_seqlens.has_value()) {
    const at::Tensor c = in.cu_seqlens->to(at::kInt).contiguous();
    cu.assign(c.data_ptr<int32_t>(), c.data_ptr<int32_t>() + c.numel());
  }
  p.cu = cu.empty() ? nullptr : cu.data();
  p.N = cu.empty() ? B : static_cast<int64_t>(cu.size()) - 1;
  auto seq_len = [&](int64_t n) -> int64_t { return cu.empty() ? T : cu[n + 1] - cu[n]; };
  int64_t tmax = 0;
  for (int64_t n = 0; n < p.N; ++n) tmax = std::max(tmax, seq_len(n));

  at::Tensor dq = f32_buffer({B, Hq, T, D}, q), dk = f32_buffer({B, Hkv, T, D}, k), dv = f32_buffer({B, Hkv, T, Dv}, v);
  at::Tensor dS0, dz0;
  if (S0.defined()) {
    const auto opts = q.options().dtype(at::kFloat);
    dS0 = empty_output({p.N, Hkv, F2, Dv}, opts), dz0 = empty_output({p.N, Hkv, F2}, opts);
  }
  p.dq = dq.data_ptr<float>(), p.dk = dk.data_ptr<float>(), p.dv = dv.data_ptr<float>();
  p.dS0 = dS0.defined() ? dS0.data_ptr<float>() : nullptr, p.dz0 = dz0.defined() ? dz0.data_ptr<float>() : nullptr;

  // Per-thread sums: dwq [Hq, D, Fp], dwk [Hkv, D, Fp], dbq [Hq, Fp], dbk [Hkv, Fp], dalpha, dbeta [Hq].
  const int64_t Fp = pad16(F), threads = at::get_num_threads();
  const int64_t o_dwk = Hq * D * Fp, o_dbq = o_dwk + Hkv * D * Fp, o_dbk = o_dbq + Hq * Fp, o_da = o_dbk + Hkv * Fp,
                o_db = o_da + Hq, per_thread = o_db + Hq;
  at::Tensor part = at::zeros({threads, per_thread}, q.options().dtype(at::kFloat));

  const bwd::Layout layout(p, tmax, backward_block_chunks());
  std::vector<std::pair<int64_t, int64_t>> tasks;  // (n, j), longest sequences first
  for (int64_t n = 0; n < p.N; ++n)
    for (int64_t j = 0; j < Hkv; ++j) tasks.emplace_back(n, j);
  std::stable_sort(tasks.begin(), tasks.end(), [&](auto& a, auto& b) { return seq_len(a.first) > seq_len(b.first); });
  const auto kernel = cpu_use_avx512() ? bwd::backward_task_avx512 : bwd::backward_task_scalar;
  std::atomic<int64_t> next{0};
  const int64_t ntasks = static_cast<int64_t>(tasks.size());
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    float* pt = part.data_ptr<float>() + at::get_thread_num() * per_thread;
    const bwd::Partials acc{pt, pt + o_dwk, pt + o_dbq, pt + o_dbk, pt + o_da, pt + o_db};
    const ZeroScratch scratch(layout.total);  // per thread, zero-filled
    for (int64_t i = next++; i < ntasks; i = next++) kernel(p, layout, tasks[i].first, tasks[i].second, scratch.data(), acc);
  });

  const at::Tensor sum = part.sum(0);
  auto slice = [&](int64_t off, std::vector<int64_t> shape, int64_t valid_last, at::ScalarType dt) {
    int64_t numel = 1;
    for (int64_t s : shape) numel *= s;
    at::Tensor t = sum.narrow(0, off, numel).view(shape).narrow(-1, 0, valid_last);
    at::Tensor out = empty_output(t.sizes(), t.options().dtype(dt));
    out.copy_(t);
    return out;
  };
  std::vector<at::Tensor> out(11);
  out[0] = finish(dq, q.scalar_type()), out[1] = finish(dk, k.scalar_type()), out[2] = finish(dv, v.scalar_type());
  if (fmap) {
    out[3] = slice(0, {Hq, D, Fp}, F, in.q_weight->scalar_type());
    out[4] = slice(o_dwk, {Hkv, D, Fp}, F, in.k_weight->scalar_type());
    if (in.q_bias.has_value()) out[5] = slice(o_dbq, {Hq, Fp}, F, in.q_bias->scalar_type());
    if (in.k_bias.has_value()) out[6] = slice(o_dbk, {Hkv, Fp}, F, in.k_bias->scalar_type());
  }
  out[7] = dS0, out[8] = dz0;
  if (in.alpha.has_value()) out[9] = slice(o_da, {Hq}, Hq, at::kFloat);
  if (in.beta.has_value()) out[10] = slice(o_db, {Hq}, Hq, at::kFloat);
  return out;
}

}  // namespace

int64_t& backward_block_chunks() {
  static int64_t chunks = 0;
  return chunks;
}

std::vector<at::Tensor> hedgehog_attention_backward_cpu(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_S, const c10::optional<at::Tensor>& grad_z,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& q_weight,
    const at::Tensor& k_weight, const c10::optional<at::Tensor>& q_bias, const c10::optional<at::Tensor>& k_bias,
    bool causal, double eps, const c10::optional<at::Tensor>& initial_S, const c10::optional<at::Tensor>& initial_z,
    int64_t window, const c10::optional<at::Tensor>& alpha, const c10::optional<at::Tensor>& beta,
    c10::optional<double> scale, const c10::optional<at::Tensor>& cu_seqlens) {
  Inputs in;
  in.grad_out = grad_out, in.grad_S = grad_S, in.grad_z = grad_z, in.q = q, in.k = k, in.v = v;
  in.q_weight = q_weight, in.k_weight = k_weight, in.q_bias = q_bias, in.k_bias = k_bias;
  in.causal = causal, in.eps = eps, in.initial_S = initial_S, in.initial_z = initial_z;
  in.window = window, in.alpha = alpha, in.beta = beta, in.scale = scale, in.cu_seqlens = cu_seqlens;
  return backward(in);
}

std::vector<at::Tensor> linear_attention_backward_cpu(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_S, const c10::optional<at::Tensor>& grad_z,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal, double eps,
    const c10::optional<at::Tensor>& initial_S, const c10::optional<at::Tensor>& initial_z,
    const c10::optional<at::Tensor>& cu_seqlens) {
  Inputs in;
  in.grad_out = grad_out, in.grad_S = grad_S, in.grad_z = grad_z, in.q = q, in.k = k, in.v = v;
  in.causal = causal, in.eps = eps, in.initial_S = initial_S, in.initial_z = initial_z, in.cu_seqlens = cu_seqlens;
  std::vector<at::Tensor> g = backward(in);
  return {g[0], g[1], g[2], g[7], g[8]};
}

}  // namespace pyfast::hedgehog
