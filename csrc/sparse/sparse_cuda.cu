// Launchers of the sparse-decoding CUDA kernels: argument sanity, split planning, workspace layout,
// template dispatch (dtype x head-dim bucket 64 / 128 / 256). Torch-free (CUDA headers only); the
// ATen side lives in sparse_cuda_host.cpp, the kernels in sparse_decode.cuh.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "sparse/sparse_cuda.h"
#include "sparse/sparse_decode.cuh"

namespace pyfast {
namespace sparse {
namespace {

using dev::ceil_div;

// Lengths and token indices are int in the kernels; half the int range leaves room for sums.
constexpr int64_t kMaxLen = INT32_MAX / 2;
constexpr int64_t kMaxGridYZ = 65535;
constexpr int kCtasPerSm = 4;             // attention CTAs aimed for per multiprocessor
constexpr int64_t kMinSplitTokens = 128;  // a split shorter than this costs more to merge than it saves
constexpr size_t kAlign = 256;            // workspace region alignment

int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }
size_t align_up(size_t v) { return (v + kAlign - 1) / kAlign * kAlign; }
int64_t elem_size(DType d) { return d == DType::kFloat32 ? 4 : 2; }
bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// 16-byte accesses to rows of a [n0, n1, n2, D] tensor: base, row length and every stride that
// is ever multiplied by a non-zero index (dims of size 1 never are) must be multiples of 16 bytes.
bool rows_aligned16(const void* base, const Strides3& s, int64_t n0, int64_t n1, int64_t n2, int64_t D, int64_t es) {
  auto ok = [&](int64_t stride, int64_t n) { return n == 1 || (stride * es) % 16 == 0; };
  return aligned16(base) && (D * es) % 16 == 0 && ok(s.b, n0) && ok(s.h, n1) && ok(s.t, n2);
}

// Calls f(T{}) with T the storage type of `d`.
template <typename F>
cudaError_t with_dtype(DType d, F&& f) {
  switch (d) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// ---------------------------------------------------------------------------------------------
// Decode plan: everything here depends on shapes, options and the SM count only.

struct DecodePlan {
  int G, heads_per_cta, head_chunks, num_splits, db;
  int64_t nb, nsel, topk, sink, local;  // sparse: blocks, list length, budgets clamped to [0, nb]
  size_t off_ml, off_acc, off_keys, off_kept, off_count, bytes;
};

DecodePlan make_plan(const DecodeParams& p) {
  DecodePlan pl{};
  pl.G = static_cast<int>(p.Hq / p.Hkv);
  // Heads per CTA <= kMaxHeads, spread evenly over the fewest chunks (no chunk empty).
  pl.head_chunks = ceil_div(pl.G, dev::kMaxHeads);
  pl.heads_per_cta = ceil_div(pl.G, pl.head_chunks);
  pl.head_chunks = ceil_div(pl.G, pl.heads_per_cta);
  pl.db = p.D <= 64 ? 64 : p.D <= 128 ? 128 : 256;

  int64_t max_tokens = p.Tmax;  // longest token list of one (b, kv head)
  if (p.sparse) {
    pl.nb = p.Tmax / p.block_size;
    pl.topk = std::min(p.topk, pl.nb);
    pl.sink = std::min(p.sink_blocks, pl.nb);
    pl.local = std::min(p.local_blocks, pl.nb);
    pl.nsel = std::min(pl.sink + pl.topk + pl.local, pl.nb) + 1;  // kept full blocks + the tail
    max_tokens = std::min(p.Tmax, pl.nsel * p.block_size);
  }
  // Enough CTAs to fill the device kCtasPerSm times over, but no split under kMinSplitTokens.
  const int64_t ctas = p.B * p.Hkv * pl.head_chunks;
  const int64_t want = ceil_div64(static_cast<int64_t>(kCtasPerSm) * std::max(p.num_sms, 1), ctas);
  const int64_t useful = ceil_div64(max_tokens, kMinSplitTokens);
  pl.num_splits = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({want, useful, dev::kMaxSplits})));

  size_t off = 0;
  auto region = [&](size_t bytes) {
    const size_t at = off;
    off += align_up(bytes);
    return at;
  };
  const size_t rows = static_cast<size_t>(p.B * p.Hq);
  const size_t parts = pl.num_splits > 1 ? rows * pl.num_splits : 0;
  pl.off_ml = region(parts * sizeof(float2));
  pl.off_acc = region(parts * p.D * sizeof(float));
  const size_t bh = p.sparse ? static_cast<size_t>(p.B * p.Hkv) : 0;
  pl.off_keys = region(bh * pl.nb * sizeof(uint32_t));
  pl.off_kept = region(bh * pl.nsel * sizeof(int32_t));
  pl.off_count = region(bh * sizeof(int32_t));
  pl.bytes = off;
  return pl;
}

bool valid_decode(const DecodeParams& p) {
  const bool shapes = p.B >= 1 && p.Hkv >= 1 && p.Hq >= 1 && p.Hq % p.Hkv == 0 && p.D >= 1 && p.D <= kMaxHeadDim &&
                      p.Tmax >= 1 && p.Tmax <= kMaxLen && p.B <= kMaxGridYZ && p.Hq <= kMaxLen &&
                      p.Hkv * ceil_div64(p.Hq / p.Hkv, dev::kMaxHeads) <= kMaxGridYZ;
  const bool ptrs = p.q != nullptr && p.k_cache != nullptr && p.v_cache != nullptr && p.cache_seqlens != nullptr &&
                    p.out != nullptr;
  const bool sparse = !p.sparse || (p.block_size >= 1 && p.block_size <= kMaxLen && p.topk >= 0 &&
                                    p.sink_blocks >= 0 && p.local_blocks >= 0 &&
                                    (p.Tmax / p.block_size == 0 || p.block_keys != nullptr));
  return shapes && ptrs && sparse && valid_dtype(p.dtype) && p.num_sms >= 1;
}

template <typename T>
cudaError_t launch_attention(const dev::AttnArgs& a, int db, dim3 grid, cudaStream_t stream) {
  switch (db) {
    case 64: dev::attention_kernel<T, 64><<<grid, dev::kAttnThreads, 0, stream>>>(a); break;
    case 128: dev::attention_kernel<T, 128><<<grid, dev::kAttnThreads, 0, stream>>>(a); break;
    case 256: dev::attention_kernel<T, 256><<<grid, dev::kAttnThreads, 0, stream>>>(a); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

size_t decode_workspace_bytes(const DecodeParams& p) { return valid_decode(p) ? make_plan(p).bytes : 0; }

cudaError_t launch_decode(const DecodeParams& p, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (!valid_decode(p)) return cudaErrorInvalidValue;
  const DecodePlan pl = make_plan(p);
  if (workspace_bytes < pl.bytes || (pl.bytes > 0 && workspace == nullptr)) return cudaErrorInvalidValue;
  char* ws = static_cast<char*>(workspace);
  const int64_t es = elem_size(p.dtype);
  const dim3 bh_grid(static_cast<unsigned>(p.Hkv), static_cast<unsigned>(p.B));

  dev::AttnArgs a{};
  a.q = p.q;
  a.q_sb = p.q_stride_b;
  a.q_sh = p.q_stride_h;
  a.k = p.k_cache;
  a.v = p.v_cache;
  a.ks = p.k_stride;
  a.vs = p.v_stride;
  a.seqlens = p.cache_seqlens;
  a.block_size = 1;
  a.Hq = static_cast<int>(p.Hq);
  a.Hkv = static_cast<int>(p.Hkv);
  a.G = pl.G;
  a.heads_per_cta = pl.heads_per_cta;
  a.head_chunks = pl.head_chunks;
  a.Tmax = static_cast<int>(p.Tmax);
  a.D = static_cast<int>(p.D);
  a.num_splits = pl.num_splits;
  a.qscale = p.scale * dev::kLog2e;
  a.vec = rows_aligned16(p.k_cache, p.k_stride, p.B, p.Hkv, p.Tmax, p.D, es) &&
          rows_aligned16(p.v_cache, p.v_stride, p.B, p.Hkv, p.Tmax, p.D, es);
  a.out = p.out;
  a.part_acc = reinterpret_cast<float*>(ws + pl.off_acc);
  a.part_ml = reinterpret_cast<float2*>(ws + pl.off_ml);

  cudaError_t err = with_dtype(p.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    if (p.sparse) {
      auto* keys = reinterpret_cast<uint32_t*>(ws + pl.off_keys);
      auto* kept = reinterpret_cast<int32_t*>(ws + pl.off_kept);
      auto* count = reinterpret_cast<int32_t*>(ws + pl.off_count);
      if (pl.nb > 0 && pl.topk > 0) {
        dev::ScoreArgs s{};
        s.q = p.q;
        s.q_sb = p.q_stride_b;
        s.q_sh = p.q_stride_h;
        s.bk = p.block_keys;
        s.bks = p.block_keys_stride;
        s.seqlens = p.cache_seqlens;
        s.keys = keys;
        s.Hkv = a.Hkv;
        s.G = pl.G;
        s.Tmax = a.Tmax;
        s.D = a.D;
        s.nb = static_cast<int>(pl.nb);
        s.block_size = static_cast<int>(p.block_size);
        s.topk = static_cast<int>(pl.topk);
        s.sink = static_cast<int>(pl.sink);
        s.local = static_cast<int>(pl.local);
        s.vec = rows_aligned16(p.block_keys, p.block_keys_stride, p.B, p.Hkv, pl.nb, p.D, es);
        const dim3 grid(static_cast<unsigned>(ceil_div64(pl.nb, dev::kScoreBlocks)), static_cast<unsigned>(p.Hkv),
                        static_cast<unsigned>(p.B));
        dev::score_kernel<T><<<grid, dev::kScoreThreads, p.D * sizeof(float), stream>>>(s);
        const cudaError_t e = cudaGetLastError();  // each launch checked where it happens
        if (e != cudaSuccess) return e;
      }
      dev::SelectArgs sel{};
      sel.seqlens = p.cache_seqlens;
      sel.keys = keys;
      sel.kept = kept;
      sel.kept_tokens = count;
      sel.Hkv = a.Hkv;
      sel.Tmax = a.Tmax;
      sel.nb = static_cast<int>(pl.nb);
      sel.block_size = static_cast<int>(p.block_size);
      sel.topk = static_cast<int>(pl.topk);
      sel.sink = static_cast<int>(pl.sink);
      sel.local = static_cast<int>(pl.local);
      sel.nsel = static_cast<int>(pl.nsel);
      dev::select_kernel<<<bh_grid, dev::kSelectThreads, 0, stream>>>(sel);
      const cudaError_t e = cudaGetLastError();
      if (e != cudaSuccess) return e;
      a.kept = kept;
      a.kept_tokens = count;
      a.nsel = sel.nsel;
      a.block_size = sel.block_size;
    }
    const dim3 grid(static_cast<unsigned>(pl.num_splits), static_cast<unsigned>(p.Hkv * pl.head_chunks),
                    static_cast<unsigned>(p.B));
    cudaError_t e = launch_attention<T>(a, pl.db, grid, stream);
    if (e != cudaSuccess || pl.num_splits == 1) return e;
    dev::merge_kernel<T><<<static_cast<unsigned>(p.B * p.Hq), dev::kMergeThreads, 0, stream>>>(
        a.part_acc, a.part_ml, p.out, pl.num_splits, a.D);
    return cudaGetLastError();
  });
  return err;
}

cudaError_t launch_append_kv(const AppendParams& p, cudaStream_t stream) {
  const bool ok = valid_dtype(p.dtype) && p.B >= 1 && p.Hkv >= 1 && p.Tmax >= 1 && p.D >= 1 && p.Tn >= 0 &&
                  p.block_size >= 1 && p.B <= kMaxGridYZ && p.Hkv <= kMaxGridYZ && p.Tmax <= kMaxLen &&
                  p.Tn <= kMaxLen && p.D <= kMaxLen && p.block_size <= kMaxLen && p.Tn * p.D <= kMaxLen;
  if (!ok) return cudaErrorInvalidValue;
  if (p.Tn == 0) return cudaSuccess;
  const int64_t nb = p.Tmax / p.block_size;
  if (p.k_cache == nullptr || p.v_cache == nullptr || p.cache_seqlens == nullptr || p.k_new == nullptr ||
      p.v_new == nullptr || (nb > 0 && p.block_keys == nullptr))
    return cudaErrorInvalidValue;
  const int64_t es = elem_size(p.dtype);

  dev::AppendArgs a{};
  a.kc = p.k_cache;
  a.vc = p.v_cache;
  a.kcs = p.k_cache_stride;
  a.vcs = p.v_cache_stride;
  a.bk = p.block_keys;
  a.bks = p.block_keys_stride;
  a.seqlens = p.cache_seqlens;
  a.kn = p.k_new;
  a.vn = p.v_new;
  a.kns = p.k_new_stride;
  a.vns = p.v_new_stride;
  a.Hkv = static_cast<int>(p.Hkv);
  a.Tmax = static_cast<int>(p.Tmax);
  a.D = static_cast<int>(p.D);
  a.Tn = static_cast<int>(p.Tn);
  a.block_size = static_cast<int>(p.block_size);
  a.vec = rows_aligned16(p.k_cache, p.k_cache_stride, p.B, p.Hkv, p.Tmax, p.D, es) &&
          rows_aligned16(p.v_cache, p.v_cache_stride, p.B, p.Hkv, p.Tmax, p.D, es) &&
          rows_aligned16(p.k_new, p.k_new_stride, p.B, p.Hkv, p.Tn, p.D, es) &&
          rows_aligned16(p.v_new, p.v_new_stride, p.B, p.Hkv, p.Tn, p.D, es);
  a.nch = static_cast<int>(a.vec ? p.D * es / 16 : p.D);

  const dim3 copy_grid(static_cast<unsigned>(ceil_div64(p.Tn * a.nch, dev::kCopyThreads)),
                       static_cast<unsigned>(p.Hkv), static_cast<unsigned>(p.B));
  if (es == 4) {
    dev::append_copy_kernel<uint32_t><<<copy_grid, dev::kCopyThreads, 0, stream>>>(a);
  } else {
    dev::append_copy_kernel<uint16_t><<<copy_grid, dev::kCopyThreads, 0, stream>>>(a);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  // At most ceil(Tn / bs) blocks fill up per sequence (and never more than exist).
  const int64_t fill = std::min(nb, ceil_div64(p.Tn, p.block_size));
  if (fill > 0) {
    const dim3 grid(static_cast<unsigned>(fill), static_cast<unsigned>(p.Hkv), static_cast<unsigned>(p.B));
    err = with_dtype(p.dtype, [&](auto tag) -> cudaError_t {
      dev::append_block_keys_kernel<decltype(tag)><<<grid, dev::kBlockKeyThreads, 0, stream>>>(a);
      return cudaGetLastError();
    });
    if (err != cudaSuccess) return err;
  }
  dev::append_advance_kernel<<<static_cast<unsigned>(ceil_div64(p.B, 256)), 256, 0, stream>>>(
      p.cache_seqlens, static_cast<int>(p.B), a.Tmax, a.Tn);
  return cudaGetLastError();
}

}  // namespace sparse
}  // namespace pyfast
