"""Sparse decoding ops: append_kv, decode_attention, sparse_decode_attention.

Public functions check their arguments (one helper per concept below), pick a backend and call
torch.ops.pyfast.* (C++ on CPU, CUDA C++ on GPUs) or the Triton custom ops registered here.
Implementations: "cpu" (csrc/sparse/sparse_cpu.cpp), "cuda" (csrc/sparse/sparse_cuda.cu),
"triton" (kernels/sparse.py), "reference" (pyfast/reference/sparse.py, float64).
Layouts and the selection rule: pyfast/reference/sparse.py.
"""

from __future__ import annotations

import torch

from pyfast import _ops  # noqa: F401  (registers torch.ops.pyfast.*)
from pyfast._validate import FLOAT_DTYPES, check_backend, check_int, check_tensor, fail
from pyfast.reference import sparse as reference

_CUDA_KERNELS = _ops.has_cuda_kernels()


# ---------------------------------------------------------------------------------------------
# Argument checks (one per concept; every public function and every backend goes through them)
# ---------------------------------------------------------------------------------------------
def check_cache(op: str, k_cache, v_cache, cache_seqlens) -> tuple[int, int, int, int]:
    """k_cache/v_cache [B, Hkv, Tmax, D] of one float dtype and device, cache_seqlens int32 [B]."""
    check_tensor(op, "k_cache", k_cache, dtypes=FLOAT_DTYPES, ndim=4)
    b, hkv, tmax, d = k_cache.shape
    if min(b, hkv, tmax, d) < 1:
        fail(op, "k_cache", "non-empty [B, Hkv, Tmax, D]", f"shape {list(k_cache.shape)}")
    check_tensor(op, "v_cache", v_cache, dtypes=(k_cache.dtype,), shape=(b, hkv, tmax, d), device=k_cache.device)
    check_tensor(op, "cache_seqlens", cache_seqlens, dtypes=(torch.int32,), shape=(b,), device=k_cache.device)
    if b > 1 and cache_seqlens.stride(0) != 1:  # kernels index it as a plain int32 array
        fail(op, "cache_seqlens", "contiguous", f"stride {cache_seqlens.stride()}")
    return b, hkv, tmax, d


def check_block_keys(op: str, block_keys, k_cache, block_size: int, *, written: bool = False) -> None:
    """block_keys [B, Hkv, Tmax // block_size, D] in the cache's dtype; written in place (append)
    it needs a unit last stride, read-only it is copied otherwise."""
    check_int(op, "block_size", block_size, minimum=1)
    b, hkv, tmax, d = k_cache.shape
    check_tensor(op, "block_keys", block_keys, dtypes=(k_cache.dtype,), shape=(b, hkv, tmax // block_size, d),
                 device=k_cache.device)
    if written and block_keys.numel() and block_keys.stride(-1) != 1:
        fail(op, "block_keys", "with stride 1 in its last dim (it is written in place)", f"strides {block_keys.stride()}")


def check_query(op: str, q, k_cache) -> None:
    """q [B, Hq, D] in the cache's dtype with Hq a multiple of Hkv."""
    b, hkv, _, d = k_cache.shape
    check_tensor(op, "q", q, dtypes=(k_cache.dtype,), ndim=3, device=k_cache.device)
    if q.shape[0] != b or q.shape[2] != d:
        fail(op, "q", f"shape [{b}, Hq, {d}] (batch and head dim of k_cache)", f"shape {list(q.shape)}")
    if q.shape[1] < 1 or q.shape[1] % hkv:
        fail(op, "q.shape[1] (Hq)", f"a positive multiple of Hkv = {hkv}", q.shape[1])


def _host_checks_allowed(t: torch.Tensor) -> bool:
    """Value checks read cache_seqlens on the host; skipped while torch.compile traces (the C++
    ops repeat them at run time) and while a CUDA graph is being captured (the kernels clamp
    lengths to [0, Tmax], so nothing is read or written out of bounds)."""
    if torch.compiler.is_compiling():
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def check_seqlens(op: str, cache_seqlens, tmax: int, *, lo: int = 1, hi: int | None = None) -> None:
    """lo <= cache_seqlens[b] <= hi (default Tmax) for every sequence. One device-to-host read
    (eager mode only). The C++ ops run the same check themselves; this one serves the Triton and
    reference implementations."""
    hi = tmax if hi is None else hi
    if cache_seqlens.numel() and _host_checks_allowed(cache_seqlens):
        mn, mx = torch.stack(torch.aminmax(cache_seqlens)).tolist()
        if mn < lo or mx > hi:
            fail(op, "cache_seqlens", f"in [{lo}, {hi}]", f"values in [{mn}, {mx}]")


def check_written(op: str, **tensors) -> None:
    """Tensors written in place must not have elements that share memory (e.g. expand() views)."""
    for name, t in tensors.items():
        if torch._debug_has_internal_overlap(t) == 1:  # 1 = YES (2 = too hard to tell: allowed)
            fail(op, name, "without overlapping elements (it is written in place)", f"strides {t.stride()}")


def check_budget(op: str, topk: int, sink_blocks: int, local_blocks: int) -> None:
    for name, v in (("topk", topk), ("sink_blocks", sink_blocks), ("local_blocks", local_blocks)):
        check_int(op, name, v, minimum=0)


def check_scale(op: str, scale) -> None:
    if scale is not None and not isinstance(scale, (int, float)):
        fail(op, "scale", "a float or None", type(scale).__name__)


def _check_here(chosen: str, cache_seqlens) -> bool:
    """Whether the public function checks cache_seqlens values itself (a ValueError before any
    kernel): always on the CPU (free) and for the reference; on GPUs the op checks them once
    (C++ host code, or the Triton op body) so eager decode pays a single device-to-host read."""
    return chosen == "reference" or not cache_seqlens.is_cuda


CUDA_MAX_HEAD_DIM = 256  # the CUDA C++ kernels' head-dim buckets end here; Triton takes any D


def _resolve(op: str, backend: str | None, device: torch.device, head_dim: int) -> str:
    chosen = check_backend(op, backend, device)
    if chosen == "cuda" and backend is None and _ops.has_triton() and (
        not _CUDA_KERNELS or head_dim > CUDA_MAX_HEAD_DIM
    ):
        return "triton"
    if chosen == "cuda" and not _CUDA_KERNELS:
        fail(op, "backend", "'cuda' only in a build with the CUDA kernels (rebuild with nvcc present)", "a CPU-only build")
    return chosen


# ---------------------------------------------------------------------------------------------
# Triton custom ops (same schemas as the C++ ones in csrc/ops.cpp) and fake impls
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("pyfast::append_kv_triton", mutates_args=("k_cache", "v_cache", "block_keys", "cache_seqlens"))
def append_kv_triton(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_keys: torch.Tensor,
    cache_seqlens: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    block_size: int,
) -> None:
    """Triton implementation of torch.ops.pyfast.append_kv."""
    from pyfast.kernels.sparse import append_kv as launch

    check_seqlens("append_kv", cache_seqlens, k_cache.shape[2], lo=0, hi=k_cache.shape[2] - k_new.shape[2])
    launch(k_cache, v_cache, block_keys, cache_seqlens, k_new, v_new, block_size)


@torch.library.custom_op("pyfast::decode_attention_triton", mutates_args=())
def decode_attention_triton(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor, scale: float | None
) -> torch.Tensor:
    """Triton implementation of torch.ops.pyfast.decode_attention."""
    from pyfast.kernels.sparse import decode_attention as launch

    check_seqlens("decode_attention", cache_seqlens, k_cache.shape[2])
    return launch(q, k_cache, v_cache, cache_seqlens, scale)


@torch.library.custom_op("pyfast::sparse_decode_attention_triton", mutates_args=())
def sparse_decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_keys: torch.Tensor,
    block_size: int,
    topk: int,
    sink_blocks: int,
    local_blocks: int,
    scale: float | None,
) -> torch.Tensor:
    """Triton implementation of torch.ops.pyfast.sparse_decode_attention."""
    from pyfast.kernels.sparse import sparse_decode_attention as launch

    check_seqlens("sparse_decode_attention", cache_seqlens, k_cache.shape[2])
    return launch(q, k_cache, v_cache, cache_seqlens, block_keys, block_size, topk, sink_blocks, local_blocks, scale)


def _fake_append(k_cache, v_cache, block_keys, cache_seqlens, k_new, v_new, block_size):
    return None


def _fake_decode(q, k_cache, v_cache, cache_seqlens, *rest):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


for _name, _fake in (
    ("append_kv", _fake_append),
    ("decode_attention", _fake_decode),
    ("sparse_decode_attention", _fake_decode),
):
    torch.library.register_fake(f"pyfast::{_name}")(_fake)
    torch.library.register_fake(f"pyfast::{_name}_triton")(_fake)


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------
def append_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_keys: torch.Tensor,
    cache_seqlens: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    *,
    block_size: int = 16,
    backend: str | None = None,
) -> None:
    """Append k_new/v_new [B, Hkv, Tn, D] to the cache in place.

    Writes token t of k_new[b] at k_cache[b, :, cache_seqlens[b] + t] (same for v), recomputes
    block_keys[b, :, j] (mean of the block's keys, fp32 sum) for every block that became full, and
    advances cache_seqlens by Tn. If any sequence would pass Tmax nothing is written and a
    ValueError names cache_seqlens (during CUDA-graph capture the check cannot read lengths; such
    a sequence is then left untouched by the kernel).

    Example:
        >>> k = torch.zeros(1, 2, 64, 8); v = torch.zeros_like(k); bk = torch.zeros(1, 2, 4, 8)
        >>> n = torch.zeros(1, dtype=torch.int32)
        >>> pyfast.append_kv(k, v, bk, n, torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8))
        >>> n                                       # bk[:, :, 0] is now the mean of the first 16 keys
        tensor([20], dtype=torch.int32)
    """
    op = "append_kv"
    b, hkv, tmax, d = check_cache(op, k_cache, v_cache, cache_seqlens)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            fail(op, name, "with stride 1 in its last dim (it is written in place)", f"strides {t.stride()}")
    check_block_keys(op, block_keys, k_cache, block_size, written=True)
    check_written(op, k_cache=k_cache, v_cache=v_cache, block_keys=block_keys, cache_seqlens=cache_seqlens)
    check_tensor(op, "k_new", k_new, dtypes=(k_cache.dtype,), shape=(b, hkv, None, d), device=k_cache.device)
    tn = k_new.shape[2]
    check_tensor(op, "v_new", v_new, dtypes=(k_cache.dtype,), shape=(b, hkv, tn, d), device=k_cache.device)
    chosen = _resolve(op, backend, k_cache.device, d)
    if _check_here(chosen, cache_seqlens):
        check_seqlens(op, cache_seqlens, tmax, lo=0, hi=tmax - tn)
    if chosen == "reference":
        reference.append_kv(k_cache, v_cache, block_keys, cache_seqlens, k_new, v_new, block_size=block_size)
    elif chosen == "triton":
        torch.ops.pyfast.append_kv_triton(k_cache, v_cache, block_keys, cache_seqlens, k_new, v_new, block_size)
    else:
        torch.ops.pyfast.append_kv(k_cache, v_cache, block_keys, cache_seqlens, k_new, v_new, block_size)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Dense decode attention (split-K "flash-decoding" over the sequence).

    q [B, Hq, D]; k_cache, v_cache [B, Hkv, Tmax, D] (Hq % Hkv == 0, query head i reads KV head
    i // (Hq // Hkv)); cache_seqlens int32 [B] with 1 <= L_b <= Tmax. Returns [B, Hq, D] in q's
    dtype: exact softmax(scale * q . k) v over the first L_b tokens, accumulated in fp32.
    scale defaults to 1/sqrt(D).

    Example:
        >>> k = torch.randn(2, 2, 100, 64); v = torch.randn_like(k); q = torch.randn(2, 8, 64)
        >>> o = pyfast.decode_attention(q, k, v, torch.tensor([100, 37], dtype=torch.int32))  # [2, 8, 64]
    """
    op = "decode_attention"
    _, _, tmax, _ = check_cache(op, k_cache, v_cache, cache_seqlens)
    check_query(op, q, k_cache)
    check_scale(op, scale)
    chosen = _resolve(op, backend, q.device, q.shape[-1])
    if _check_here(chosen, cache_seqlens):
        check_seqlens(op, cache_seqlens, tmax)
    if chosen == "reference":
        return reference.decode_attention(q, k_cache, v_cache, cache_seqlens, scale=scale)
    fn = torch.ops.pyfast.decode_attention_triton if chosen == "triton" else torch.ops.pyfast.decode_attention
    return fn(q, k_cache, v_cache, cache_seqlens, None if scale is None else float(scale))


def sparse_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_keys: torch.Tensor,
    *,
    block_size: int = 16,
    topk: int = 64,
    sink_blocks: int = 1,
    local_blocks: int = 4,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Kinetics block top-k decode attention.

    Shapes as decode_attention, plus block_keys [B, Hkv, Tmax // block_size, D] (kept by append_kv).
    Per (b, KV head h), with nfull = L_b // block_size: the sink blocks (j < sink_blocks), the last
    local_blocks full blocks and the partial tail are always kept; among the other full blocks the
    topk with the highest mean-over-the-group q . block_keys are kept (ties: lower index). Each
    query head attends with exact softmax over the kept tokens. Returns [B, Hq, D] in q's dtype.
    With topk >= the number of blocks this equals decode_attention.

    Example (the result is dense attention under the kept-token mask):
        >>> import torch, pyfast
        >>> from pyfast.reference.sparse import kept_token_mask, masked_decode_attention
        >>> k, v = torch.zeros(2, 2, 512, 64), torch.zeros(2, 2, 512, 64)
        >>> bk, n = torch.zeros(2, 2, 32, 64), torch.zeros(2, dtype=torch.int32)
        >>> pyfast.append_kv(k, v, bk, n, torch.randn(2, 2, 400, 64), torch.randn(2, 2, 400, 64))
        >>> q = torch.randn(2, 8, 64)                                        # GQA: 4 query heads per KV head
        >>> o = pyfast.sparse_decode_attention(q, k, v, n, bk, topk=4)       # 10 of 25 blocks + tail
        >>> mask = kept_token_mask(q, bk, n, 512, topk=4)                    # bool [B, Hkv, Tmax]
        >>> torch.testing.assert_close(o, masked_decode_attention(q, k, v, mask))
        >>> bool((o - pyfast.decode_attention(q, k, v, n)).abs().max() > 1e-3)  # not dense attention
        True
    """
    op = "sparse_decode_attention"
    _, _, tmax, _ = check_cache(op, k_cache, v_cache, cache_seqlens)
    check_query(op, q, k_cache)
    check_block_keys(op, block_keys, k_cache, block_size)
    check_budget(op, topk, sink_blocks, local_blocks)
    check_scale(op, scale)
    chosen = _resolve(op, backend, q.device, q.shape[-1])
    opts = dict(block_size=block_size, topk=topk, sink_blocks=sink_blocks, local_blocks=local_blocks)
    if _check_here(chosen, cache_seqlens):
        check_seqlens(op, cache_seqlens, tmax)
    if chosen == "reference":
        return reference.sparse_decode_attention(q, k_cache, v_cache, cache_seqlens, block_keys, scale=scale, **opts)
    fn = (
        torch.ops.pyfast.sparse_decode_attention_triton
        if chosen == "triton"
        else torch.ops.pyfast.sparse_decode_attention
    )
    return fn(q, k_cache, v_cache, cache_seqlens, block_keys, block_size, topk, sink_blocks, local_blocks,
              None if scale is None else float(scale))
