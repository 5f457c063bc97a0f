"""Sparse-decoding microbenchmark (Kinetics block top-k): one decode step of B=1, Hq=32, Hkv=8,
D=128 over a context of L = 4k, 32k (and 128k on GPUs) tokens; block 16, top-k 64 with 1 sink
and 4 local blocks. Dense and sparse pyfast decode vs F.scaled_dot_product_attention (the
baseline) in the same run. GB/s counts the bytes each method needs: all K/V for dense and SDPA;
the kept K/V blocks plus every block key for sparse. TFLOP/s counts the attention math
(q.k and p.v: 4*B*Hq*L*D for dense and SDPA; for sparse the kept tokens instead of L, plus
2*B*Hq*(L/block)*D for scoring every block key). Caches rotate when they could fit in a
last-level cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import pyfast
from pyfast._registry import REGISTRY, kernel_backends
from pyfast.bench.runner import Case

B, HQ, HKV, D = 1, 32, 8, 128
BLOCK, TOPK, SINK, LOCAL = 16, 64, 1, 4
CACHE_BYTES = 256 << 20  # rotate enough caches to exceed this (larger than any LLC here)


def _caches(device: str, dtype: torch.dtype, length: int, count: int):
    out = []
    gen = torch.Generator().manual_seed(0)
    for _ in range(count):
        k = torch.randn(B, HKV, length, D, generator=gen).to(device, dtype)
        v = torch.randn(B, HKV, length, D, generator=gen).to(device, dtype)
        kc, vc = torch.empty_like(k), torch.empty_like(v)
        bk = torch.zeros(B, HKV, length // BLOCK, D, device=device, dtype=dtype)
        n = torch.zeros(B, dtype=torch.int32, device=device)
        pyfast.append_kv(kc, vc, bk, n, k, v, block_size=BLOCK)
        out.append((kc, vc, bk, n))
    return out


def _length_cases(device: str, length: int) -> list[Case]:
    dtype = cache_dtype(device)
    esize = torch.finfo(dtype).bits // 8
    kv_bytes = 2 * B * HKV * length * D * esize
    rotate = max(1, min(8, -(-CACHE_BYTES // kv_bytes)))
    caches = _caches(device, dtype, length, rotate)
    q = torch.randn(B, HQ, D, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    shape = f"L={length // 1024}k Hq={HQ} Hkv={HKV} D={D}"
    nblocks = length // BLOCK
    kept_tokens = min(nblocks, SINK + TOPK + LOCAL) * BLOCK + length % BLOCK
    sparse_bytes = 2 * B * HKV * kept_tokens * D * esize + B * HKV * nblocks * D * esize
    dense_flops = 4 * B * HQ * length * D
    sparse_flops = 4 * B * HQ * kept_tokens * D + 2 * B * HQ * nblocks * D

    def sdpa(i):
        kc, vc, _, _ = caches[i]
        return F.scaled_dot_product_attention(q[:, :, None], kc, vc, enable_gqa=True)

    cases = [Case("decode_attention", shape, "SDPA", sdpa, rotate, bytes=kv_bytes, flops=dense_flops, baseline=True)]
    for be in kernel_backends(REGISTRY["decode_attention"], device):
        cases.append(Case("decode_attention", shape, f"pyfast {be} dense",
                          lambda i, be=be: pyfast.decode_attention(q, *caches[i][:2], caches[i][3], backend=be),
                          rotate, bytes=kv_bytes, flops=dense_flops))
        cases.append(Case("decode_attention", shape, f"pyfast {be} sparse top{TOPK}",
                          lambda i, be=be: pyfast.sparse_decode_attention(
                              q, *caches[i][:2], caches[i][3], caches[i][2], block_size=BLOCK, topk=TOPK,
                              sink_blocks=SINK, local_blocks=LOCAL, backend=be),
                          rotate, bytes=sparse_bytes, flops=sparse_flops))
    return cases


def cache_dtype(device: str) -> torch.dtype:
    """The dtype of q and the caches: fp32 on the CPU, fp16 on GPUs."""
    return torch.float32 if device == "cpu" else torch.float16


def lengths(device: str, quick: bool) -> list[int]:
    """The context lengths timed (bench/triton_aot.py compiles the Triton kernels for the GPU ones)."""
    if quick:
        return [2048]
    return [4096, 32768] + ([131072] if device == "cuda" else [])


def cases(device: str, quick: bool) -> list[Case]:
    out = []
    for length in lengths(device, quick):
        out += _length_cases(device, length)
    return out
