// Sparse decoding on the CPU: append_kv, decode_attention, sparse_decode_attention.
//
// Both attention ops share one plan: every (b, KV head h) owns a list of kept token runs
// (dense: the single run [0, L_b); sparse: the selected blocks, merged where adjacent, plus the
// partial tail). The kept tokens of all heads are cut into splits of about equal size, so threads
// stay busy whether the work is many short sequences or one long one (split-K "flash-decoding").
// Each split runs the per-ISA kernel (sparse_cpu_kernel.h) for the G query heads of its group and
// leaves (max, sum, acc) partials; a merge rescales them to the global max and divides.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common/alloc.h"
#include "common/cpu_isa.h"
#include "common/host.h"
#include "kernels.h"
#include "sparse/sparse_cpu.h"
#include "sparse/sparse_shape.h"

namespace pyfast::sparse {
namespace {

constexpr int64_t kMinSplitTokens = 256;  // below this a split's fixed cost (q load, merge) dominates
constexpr int64_t kSplitsPerThread = 4;   // load balance across threads (sequences differ in length)
constexpr double kLog2e = 1.4426950408889634;

int64_t padded(int64_t d) { return (d + kLanes - 1) / kLanes * kLanes; }

// Kept token runs of every (b, h): runs[bh * stride + i] for i < nruns[bh]; kept[bh] tokens.
struct RunTable {
  int64_t stride = 1;
  std::vector<TokenRun> runs;
  std::vector<int64_t> nruns, kept;
};

CpuAttnArgs attn_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t G,
                      const c10::optional<double>& scale) {
  CpuAttnArgs a{};
  a.q = q.data_ptr();
  a.q_sb = q.stride(0), a.q_sh = q.stride(1);
  a.k = k.data_ptr();
  a.k_sb = k.stride(0), a.k_sh = k.stride(1), a.k_st = k.stride(2);
  a.v = v.data_ptr();
  a.v_sb = v.stride(0), a.v_sh = v.stride(1), a.v_st = v.stride(2);
  a.elem = elem_of(k);
  a.G = G, a.D = k.size(3), a.Dp = padded(a.D);
  a.scale_log2 = static_cast<float>(softmax_scale(scale, a.D) * kLog2e);
  return a;
}

// Split-K over the kept tokens of every (b, h), then the merge into out [B, Hq, D].
at::Tensor attend(const CpuAttnArgs& a, const RunTable& rt, int64_t B, int64_t Hkv, const at::Tensor& q) {
  const int64_t G = a.G, Dp = a.Dp, D = a.D, BH = B * Hkv;
  int64_t total = 0;
  for (int64_t n : rt.kept) total += n;
  const int64_t threads = at::get_num_threads();
  const int64_t chunk = std::max(kMinSplitTokens, (total + kSplitsPerThread * threads - 1) / (kSplitsPerThread * threads));

  // Splits of (b, h) are first[bh] .. first[bh + 1] - 1. Every (b, h) gets at least one, so a head
  // with no kept token still yields 0/0 = NaN (softmax over nothing), as the reference does.
  std::vector<int64_t> first(BH + 1, 0);
  for (int64_t bh = 0; bh < BH; ++bh) first[bh + 1] = first[bh] + std::max<int64_t>(1, (rt.kept[bh] + chunk - 1) / chunk);
  const int64_t nsplit = first[BH];
  std::vector<float> m(nsplit * G), l(nsplit * G), acc(nsplit * G * Dp);
  const int64_t scratch_per_thread = G * Dp + G * kTile;
  std::vector<float> scratch(threads * scratch_per_thread);
  const auto kernel = cpu_use_avx512() ? attend_split_avx512 : attend_split_scalar;

  at::parallel_for(0, nsplit, 1, [&](int64_t id0, int64_t id1) {
    float* qbuf = scratch.data() + at::get_thread_num() * scratch_per_thread;
    for (int64_t id = id0; id < id1; ++id) {
      const int64_t bh = std::upper_bound(first.begin(), first.end(), id) - first.begin() - 1;
      const int64_t s = id - first[bh], n = first[bh + 1] - first[bh], per = (rt.kept[bh] + n - 1) / n;
      const SplitWork w{bh / Hkv, bh % Hkv, rt.runs.data() + bh * rt.stride, rt.nruns[bh],
                        std::min(s * per, rt.kept[bh]), std::min((s + 1) * per, rt.kept[bh]),
                        m.data() + id * G, l.data() + id * G, acc.data() + id * G * Dp, qbuf, qbuf + G * Dp};
      kernel(a, w);
    }
  });

  // Merge: out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s with M = max_s m_s.
  at::Tensor out32 = at::empty({B, Hkv * G, D}, q.options().dtype(at::kFloat));
  float* o = out32.data_ptr<float>();
  at::parallel_for(0, BH * G, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t bh = i / G, g = i % G;
      float mx = -INFINITY;
      for (int64_t id = first[bh]; id < first[bh + 1]; ++id) mx = std::max(mx, m[id * G + g]);
      float den = 0.f;
      float* oi = o + i * D;
      std::fill(oi, oi + D, 0.f);
      for (int64_t id = first[bh]; id < first[bh + 1]; ++id) {
        const float w = std::exp2(m[id * G + g] - mx);  // NaN if every split was empty: 0/0 below
        den += w * l[id * G + g];
        const float* ac = acc.data() + (id * G + g) * Dp;
        for (int64_t d = 0; d < D; ++d) oi[d] += w * ac[d];
      }
      for (int64_t d = 0; d < D; ++d) oi[d] /= den;
    }
  });
  at::Tensor out = empty_output(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  out.copy_(out32);
  return out;
}

// The order-preserving integer image of a float score: larger score -> larger key; NaN is the
// largest (torch.sort order), so a NaN block is always chosen and poisons the output.
uint32_t rank_key(float s) {
  if (std::isnan(s)) return 0xFFFFFFFFu;
  if (s == 0.f) s = 0.f;  // -0.0 ties with +0.0, as in torch.sort
  uint32_t u;
  std::memcpy(&u, &s, sizeof u);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Block selection for one (b, h) (pyfast/reference/sparse.py): writes the kept runs, returns
// (number of runs, kept tokens). `scores` is scratch of Tmax / bs floats; `order` of as many ints.
std::pair<int64_t, int64_t> select_runs(const CpuAttnArgs& a, const at::Tensor& block_keys, int64_t b, int64_t h,
                                        int64_t L, int64_t bs, int64_t topk, int64_t sink, int64_t local, float* qbar,
                                        float* scores, std::vector<int64_t>& order, std::vector<char>& keep,
                                        TokenRun* runs) {
  const int64_t nfull = L / bs, lo = std::min(sink, nfull), hi = std::max(nfull - local, lo);
  keep.assign(nfull + 1, 0);
  std::fill(keep.begin(), keep.begin() + lo, 1);
  std::fill(keep.begin() + hi, keep.begin() + nfull, 1);
  const int64_t ncand = hi - lo;
  if (ncand > 0 && topk > 0) {
    if (topk >= ncand) {
      std::fill(keep.begin() + lo, keep.begin() + hi, 1);
    } else {
      // qbar = mean of the group's queries: mean_g q_g . k = qbar . k, one dot per block.
      const int64_t G = a.G, D = a.D;
      std::fill(qbar, qbar + a.Dp, 0.f);
      for (int64_t g = 0; g < G; ++g) {
        const int64_t off = b * a.q_sb + (h * G + g) * a.q_sh;
        for (int64_t d = 0; d < D; ++d) {
          const float x = a.elem == Elem::kF32 ? static_cast<const float*>(a.q)[off + d]
                        : a.elem == Elem::kF16 ? half_bits_to_float(static_cast<const uint16_t*>(a.q)[off + d])
                                               : bf16_bits_to_float(static_cast<const uint16_t*>(a.q)[off + d]);
          qbar[d] += x;
        }
      }
      for (int64_t d = 0; d < D; ++d) qbar[d] /= static_cast<float>(G);
      const char* bk = static_cast<const char*>(block_keys.data_ptr()) +
                       (b * block_keys.stride(0) + h * block_keys.stride(1) + lo * block_keys.stride(2)) *
                           block_keys.element_size();
      (cpu_use_avx512() ? block_scores_avx512 : block_scores_scalar)(qbar, bk, block_keys.stride(2), a.elem, ncand, D,
                                                                      scores);
      order.resize(ncand);
      for (int64_t j = 0; j < ncand; ++j) order[j] = j;
      std::nth_element(order.begin(), order.begin() + topk, order.end(), [&](int64_t x, int64_t y) {
        const uint32_t kx = rank_key(scores[x]), ky = rank_key(scores[y]);
        return kx != ky ? kx > ky : x < y;  // higher score first, ties to the lower block index
      });
      for (int64_t j = 0; j < topk; ++j) keep[lo + order[j]] = 1;
    }
  }
  keep[nfull] = L > nfull * bs;  // the partial tail
  int64_t nruns = 0, kept = 0;
  for (int64_t j = 0; j <= nfull; ++j) {
    if (!keep[j]) continue;
    const int64_t start = j * bs, len = std::min(L, start + bs) - start;
    if (nruns && runs[nruns - 1].start + runs[nruns - 1].len == start) runs[nruns - 1].len += len;
    else runs[nruns++] = TokenRun{start, len};
    kept += len;
  }
  return {nruns, kept};
}

std::vector<int64_t> lengths_of(const at::Tensor& cache_seqlens) {
  const at::Tensor c = cache_seqlens.contiguous();
  const int32_t* p = c.data_ptr<int32_t>();
  return std::vector<int64_t>(p, p + c.numel());
}

}  // namespace

at::Tensor decode_attention_cpu(const at::Tensor& q_, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& cache_seqlens, c10::optional<double> scale) {
  const CacheShape s = cache_shape(k_cache);
  const int64_t G = q_.size(1) / s.Hkv;
  const at::Tensor q = last_dim_contiguous(q_), k = last_dim_contiguous(k_cache), v = last_dim_contiguous(v_cache);
  const std::vector<int64_t> len = lengths_of(cache_seqlens);
  RunTable rt;
  rt.runs.resize(s.B * s.Hkv);
  rt.nruns.assign(s.B * s.Hkv, 1);
  rt.kept.resize(s.B * s.Hkv);
  for (int64_t bh = 0; bh < s.B * s.Hkv; ++bh) {
    rt.runs[bh] = TokenRun{0, len[bh / s.Hkv]};
    rt.kept[bh] = len[bh / s.Hkv];
  }
  return attend(attn_args(q, k, v, G, scale), rt, s.B, s.Hkv, q_);
}

at::Tensor sparse_decode_attention_cpu(const at::Tensor& q_, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                       const at::Tensor& cache_seqlens, const at::Tensor& block_keys_,
                                       int64_t block_size, int64_t topk, int64_t sink_blocks, int64_t local_blocks,
                                       c10::optional<double> scale) {
  const CacheShape s = cache_shape(k_cache);
  const int64_t G = q_.size(1) / s.Hkv;
  const at::Tensor q = last_dim_contiguous(q_), k = last_dim_contiguous(k_cache), v = last_dim_contiguous(v_cache);
  const at::Tensor block_keys = last_dim_contiguous(block_keys_);
  const CpuAttnArgs a = attn_args(q, k, v, G, scale);
  const std::vector<int64_t> len = lengths_of(cache_seqlens);

  const int64_t BH = s.B * s.Hkv, NB = s.Tmax / block_size;
  RunTable rt;
  rt.stride = NB + 1;  // at most every full block plus the tail
  rt.runs.resize(BH * rt.stride);
  rt.nruns.resize(BH);
  rt.kept.resize(BH);
  at::parallel_for(0, BH, 1, [&](int64_t bh0, int64_t bh1) {
    std::vector<float> qbar(a.Dp), scores(NB);
    std::vector<int64_t> order;
    std::vector<char> keep;
    for (int64_t bh = bh0; bh < bh1; ++bh) {
      const auto [nruns, kept] =
          select_runs(a, block_keys, bh / s.Hkv, bh % s.Hkv, len[bh / s.Hkv], block_size, topk, sink_blocks,
                      local_blocks, qbar.data(), scores.data(), order, keep, rt.runs.data() + bh * rt.stride);
      rt.nruns[bh] = nruns;
      rt.kept[bh] = kept;
    }
  });
  return attend(a, rt, s.B, s.Hkv, q_);
}

namespace {

// Writes the new tokens, refreshes the means of blocks that became full (summed in double, so the
// result is the correctly rounded mean in the cache dtype for every practical block size), then
// advances the lengths. The registry checked every argument (lengths included): nothing is
// written on bad input.
template <typename T>
void append_typed(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& block_keys,
                  const std::vector<int64_t>& len, const at::Tensor& k_new, const at::Tensor& v_new, int64_t bs) {
  const int64_t B = k_cache.size(0), H = k_cache.size(1), D = k_cache.size(3), Tn = k_new.size(2);
  T* kc = k_cache.data_ptr<T>();
  T* vc = v_cache.data_ptr<T>();
  T* bk = block_keys.data_ptr<T>();
  const T* kn = k_new.data_ptr<T>();
  const T* vn = v_new.data_ptr<T>();
  at::parallel_for(0, B * H, 1, [&](int64_t bh0, int64_t bh1) {
    std::vector<double> sum(D);
    for (int64_t bh = bh0; bh < bh1; ++bh) {
      const int64_t b = bh / H, h = bh % H, L = len[b];
      const int64_t kc_off = b * k_cache.stride(0) + h * k_cache.stride(1), vc_off = b * v_cache.stride(0) + h * v_cache.stride(1);
      for (int64_t t = 0; t < Tn; ++t) {
        std::memcpy(kc + kc_off + (L + t) * k_cache.stride(2),
                    kn + b * k_new.stride(0) + h * k_new.stride(1) + t * k_new.stride(2), D * sizeof(T));
        std::memcpy(vc + vc_off + (L + t) * v_cache.stride(2),
                    vn + b * v_new.stride(0) + h * v_new.stride(1) + t * v_new.stride(2), D * sizeof(T));
      }
      for (int64_t j = L / bs; j < (L + Tn) / bs; ++j) {
        std::fill(sum.begin(), sum.end(), 0.0);
        for (int64_t t = j * bs; t < (j + 1) * bs; ++t) {
          const T* row = kc + kc_off + t * k_cache.stride(2);
          for (int64_t d = 0; d < D; ++d) sum[d] += static_cast<double>(static_cast<float>(row[d]));
        }
        T* out = bk + b * block_keys.stride(0) + h * block_keys.stride(1) + j * block_keys.stride(2);
        for (int64_t d = 0; d < D; ++d) out[d] = static_cast<T>(static_cast<float>(sum[d] / bs));
      }
    }
  });
}

}  // namespace

void append_kv_cpu(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& block_keys,
                   const at::Tensor& cache_seqlens, const at::Tensor& k_new_, const at::Tensor& v_new_,
                   int64_t block_size) {
  const int64_t Tn = k_new_.size(2);
  const at::Tensor k_new = last_dim_contiguous(k_new_), v_new = last_dim_contiguous(v_new_);
  const std::vector<int64_t> len = lengths_of(cache_seqlens);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k_cache.scalar_type(), "append_kv", [&] {
    append_typed<scalar_t>(k_cache, v_cache, block_keys, len, k_new, v_new, block_size);
  });
  cache_seqlens.add_(Tn);
}

}  // namespace pyfast::sparse
