// CUDA implementations of torch.ops.pyfast.append_kv / decode_attention / sparse_decode_attention
// (arguments checked by the registry, pyfast/sparse/ops.py): the launchers' own size limits, dtype
// mapping, scratch allocation and the launches. The device code (sparse_decode.cuh) and its launchers (sparse_cuda.cu) are
// torch-free; this file is the only one that sees ATen.
//
// CUDA-graph safety: no host sync and no data-dependent allocation on the launch path. The
// registry's value check of cache_seqlens (a device-to-host read) runs only while the current
// stream is not capturing; the kernels clamp lengths to [0, Tmax] (append skips a sequence that would overflow),
// so unchecked values cannot cause an out-of-bounds access. Scratch size depends on shapes only.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>

#include "common/alloc.h"
#include "common/cuda_host.h"
#include "common/host.h"
#include "kernels.h"
#include "sparse/sparse_cuda.h"
#include "sparse/sparse_shape.h"

namespace pyfast {
namespace sparse {
namespace {

Strides3 strides3(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// Limits of the launchers (sparse_cuda.cu): B and Hkv index grid dims y / z, lengths are int.
void check_cuda_limits(const char* op, const CacheShape& s) {
  TORCH_CHECK_VALUE(s.B <= 65535 && s.Hkv <= 65535 && s.Tmax <= INT32_MAX / 2, "pyfast.", op,
              ": expected B <= 65535, Hkv <= 65535 and Tmax <= 2^30 on CUDA, got B = ", s.B, ", Hkv = ", s.Hkv,
              ", Tmax = ", s.Tmax);
}

// Multiprocessors of the device (sets the split-K count; a cached driver attribute, no sync).
int32_t sm_count(const char* op, const at::Device& device) {
  int n = 0;
  check_cuda(op, "cudaDeviceGetAttribute", cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device.index()));
  return n;
}

}  // namespace

void append_kv_cuda(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& block_keys,
                    const at::Tensor& cache_seqlens, const at::Tensor& k_new, const at::Tensor& v_new,
                    int64_t block_size) {
  const char* op = "append_kv";
  const CacheShape s = cache_shape(k_cache);
  check_cuda_limits(op, s);
  const int64_t tn = k_new.size(2);
  TORCH_CHECK_VALUE(tn * s.D <= (int64_t{1} << 30), "pyfast.", op, ": expected k_new with Tn * D <= 2^30 on CUDA, got Tn = ", tn,
              ", D = ", s.D);
  const CudaScope cuda(k_cache);
  if (tn == 0) return;

  const at::Tensor kn = last_dim_contiguous(k_new), vn = last_dim_contiguous(v_new);
  AppendParams p{};
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.k_cache_stride = strides3(k_cache);
  p.v_cache_stride = strides3(v_cache);
  p.block_keys = block_keys.numel() > 0 ? block_keys.data_ptr() : nullptr;
  p.block_keys_stride = strides3(block_keys);
  p.cache_seqlens = cache_seqlens.data_ptr<int32_t>();
  p.k_new = kn.data_ptr();
  p.v_new = vn.data_ptr();
  p.k_new_stride = strides3(kn);
  p.v_new_stride = strides3(vn);
  p.B = s.B;
  p.Hkv = s.Hkv;
  p.Tmax = s.Tmax;
  p.D = s.D;
  p.Tn = tn;
  p.block_size = block_size;
  p.dtype = to_dtype(op, k_cache.scalar_type());
  check_launch(op, launch_append_kv(p, cuda.stream()));
}

namespace {

// Shared by both attention ops: block_keys undefined = dense decode.
at::Tensor decode_cuda(const char* op, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& cache_seqlens, const at::Tensor& block_keys, int64_t block_size, int64_t topk,
                       int64_t sink_blocks, int64_t local_blocks, const c10::optional<double>& scale) {
  const CacheShape s = cache_shape(k_cache);
  const bool sparse = block_keys.defined();
  if (sparse) {
    TORCH_CHECK_VALUE(block_size <= (int64_t{1} << 30), "pyfast.", op, ": expected block_size <= 2^30 on CUDA, got ",
                block_size);
  }
  check_cuda_limits(op, s);
  TORCH_CHECK_VALUE(s.D <= kMaxHeadDim, "pyfast.", op, ": expected head dim D <= ", kMaxHeadDim, " on CUDA, got ", s.D);
  // One CTA serves up to kMaxHeadsPerCta query heads of a KV head: grid axis 1 holds Hkv * head chunks.
  const int64_t head_chunks = (q.size(1) / s.Hkv + kMaxHeadsPerCta - 1) / kMaxHeadsPerCta;
  TORCH_CHECK_VALUE(s.Hkv * head_chunks <= 65535, "pyfast.", op, ": expected Hkv * ceil((Hq / Hkv) / ", kMaxHeadsPerCta,
              ") <= 65535 on CUDA, got Hq = ", q.size(1), ", Hkv = ", s.Hkv);
  const CudaScope cuda(k_cache);

  // Only the last dim needs stride 1; anything else is handled through strides.
  const at::Tensor q2 = last_dim_contiguous(q), k2 = last_dim_contiguous(k_cache), v2 = last_dim_contiguous(v_cache);
  at::Tensor out = empty_output({s.B, q.size(1), s.D}, q.options());

  DecodeParams p{};
  p.q = q2.data_ptr();
  p.q_stride_b = q2.stride(0);
  p.q_stride_h = q2.stride(1);
  p.k_cache = k2.data_ptr();
  p.v_cache = v2.data_ptr();
  p.k_stride = strides3(k2);
  p.v_stride = strides3(v2);
  p.cache_seqlens = cache_seqlens.data_ptr<int32_t>();
  p.out = out.data_ptr();
  p.B = s.B;
  p.Hq = q.size(1);
  p.Hkv = s.Hkv;
  p.Tmax = s.Tmax;
  p.D = s.D;
  p.scale = static_cast<float>(softmax_scale(scale, s.D));
  p.dtype = to_dtype(op, q.scalar_type());
  p.num_sms = sm_count(op, k_cache.device());
  p.sparse = sparse;
  const at::Tensor bk2 = sparse ? last_dim_contiguous(block_keys) : at::Tensor();
  if (sparse) {
    p.block_keys = bk2.numel() > 0 ? bk2.data_ptr() : nullptr;
    p.block_keys_stride = strides3(bk2);
    p.block_size = block_size;
    p.topk = topk;
    p.sink_blocks = sink_blocks;
    p.local_blocks = local_blocks;
  }
  const size_t bytes = decode_workspace_bytes(p);
  const at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, q.options().dtype(at::kByte));
  check_launch(op, launch_decode(p, bytes > 0 ? workspace.data_ptr() : nullptr, bytes, cuda.stream()));
  return out;
}

}  // namespace

at::Tensor decode_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& cache_seqlens, const c10::optional<double> scale) {
  return decode_cuda("decode_attention", q, k_cache, v_cache, cache_seqlens, at::Tensor(), 1, 0, 0, 0, scale);
}

at::Tensor sparse_decode_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                        const at::Tensor& cache_seqlens, const at::Tensor& block_keys,
                                        int64_t block_size, int64_t topk, int64_t sink_blocks, int64_t local_blocks,
                                        const c10::optional<double> scale) {
  return decode_cuda("sparse_decode_attention", q, k_cache, v_cache, cache_seqlens, block_keys, block_size, topk,
                     sink_blocks, local_blocks, scale);
}

}  // namespace sparse
}  // namespace pyfast
