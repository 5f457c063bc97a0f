"""Sparse decoding ops: append_kv, decode_attention, sparse_decode_attention.

Each op is declared once in the op registry (pyfast/_registry.py) below: its rules (one helper
per concept), fake impl and backends. The public functions bind the Python arguments and call the
op. Implementations: "cpu" (csrc/sparse/sparse_cpu.cpp), "cuda" (csrc/sparse/sparse_cuda.cu),
"triton" (kernels/sparse.py), "reference" (pyfast/reference/sparse.py, float64).
Layouts and the selection rule: pyfast/reference/sparse.py.
"""

from __future__ import annotations

import torch

from pyfast import _ops, _registry
from pyfast._validate import FLOAT_DTYPES, check_int, check_tensor, fail
from pyfast.reference import sparse as reference


# ---------------------------------------------------------------------------------------------
# Rules (one helper per concept)
# ---------------------------------------------------------------------------------------------
_INT32 = (torch.int32,)


def check_cache(op: str, k_cache, v_cache, cache_seqlens) -> tuple[int, int, int, int]:
    """k_cache/v_cache [B, Hkv, Tmax, D] of one float dtype, cache_seqlens int32 [B] contiguous."""
    check_tensor(op, "k_cache", k_cache, dtypes=FLOAT_DTYPES, ndim=4)
    b, hkv, tmax, d = k_cache.shape
    if min(b, hkv, tmax, d) < 1:
        fail(op, "k_cache", "non-empty [B, Hkv, Tmax, D]", f"shape {list(k_cache.shape)}")
    check_tensor(op, "v_cache", v_cache, dtypes=(k_cache.dtype,), shape=(b, hkv, tmax, d))
    check_tensor(op, "cache_seqlens", cache_seqlens, dtypes=_INT32, shape=(b,))
    if b > 1 and cache_seqlens.stride(0) != 1:  # kernels index it as a plain int32 array
        fail(op, "cache_seqlens", "contiguous", f"stride {cache_seqlens.stride()}")
    return b, hkv, tmax, d


def check_unit_last_stride(op: str, name: str, t) -> None:
    """A tensor written in place needs stride 1 in its last dim (read-only ones are copied)."""
    if t.numel() and t.shape[-1] > 1 and t.stride(-1) != 1:
        fail(op, name, "with stride 1 in its last dim (it is written in place)", f"strides {list(t.stride())}")


def check_block_keys(op: str, block_keys, k_cache, block_size: int) -> None:
    """block_keys [B, Hkv, Tmax // block_size, D] in the cache's dtype."""
    check_int(op, "block_size", block_size, minimum=1)
    b, hkv, tmax, d = k_cache.shape
    check_tensor(op, "block_keys", block_keys, dtypes=(k_cache.dtype,), shape=(b, hkv, tmax // block_size, d))


def check_query(op: str, q, k_cache) -> None:
    """q [B, Hq, D] in the cache's dtype with Hq a positive multiple of Hkv."""
    b, hkv, _, d = k_cache.shape
    check_tensor(op, "q", q, dtypes=(k_cache.dtype,), ndim=3)
    if q.shape[0] != b or q.shape[2] != d:
        fail(op, "q", f"shape [{b}, Hq, {d}] (batch and head dim of k_cache)", f"shape {list(q.shape)}")
    if q.shape[1] < 1 or q.shape[1] % hkv:
        fail(op, "q.shape[1] (Hq)", f"a positive multiple of Hkv = {hkv}", q.shape[1])


def check_budget(op: str, topk: int, sink_blocks: int, local_blocks: int) -> None:
    check_int(op, "topk", topk, minimum=0)
    check_int(op, "sink_blocks", sink_blocks, minimum=0)
    check_int(op, "local_blocks", local_blocks, minimum=0)


def check_seqlens(op: str, cache_seqlens, lo: int, hi: int) -> None:
    """lo <= cache_seqlens[b] <= hi for every sequence: one device-to-host read. The registry runs
    it in eager mode; during CUDA-graph capture the kernels clamp lengths to [0, Tmax] instead."""
    if cache_seqlens.is_cpu and cache_seqlens.numel() <= 8:  # a Python list is cheapest here
        values = cache_seqlens.tolist()
        mn, mx = min(values), max(values)
    else:
        mn, mx = torch.stack(torch.aminmax(cache_seqlens)).tolist()
    if mn < lo or mx > hi:
        fail(op, "cache_seqlens", f"in [{lo}, {hi}]", f"values in [{mn}, {mx}]")


CUDA_MAX_HEAD_DIM = 256  # the CUDA C++ kernels' head-dim buckets end here; Triton takes any D


CUDA_MAX_GRID_YZ = 65535  # the CUDA C++ launchers put B and Hkv on grid axes y / z


def _default_cuda(*args) -> str:
    """CUDA C++ where the build has it and the shape fits its launchers (D in its buckets, B and
    Hkv within grid limits), else Triton."""
    head_dim = args[0].shape[-1]  # q (decode ops) or k_cache (append_kv): D is the last dim of both
    cache = args[0] if args[0].dim() == 4 else args[1]  # k_cache
    fits = head_dim <= CUDA_MAX_HEAD_DIM and max(cache.shape[0], cache.shape[1]) <= CUDA_MAX_GRID_YZ
    if _ops.has_cuda_kernels() and (fits or not _ops.has_triton()):
        return "cuda"
    return "triton" if _ops.has_triton() else "cuda"


def _kernels(name: str) -> dict:
    """The C++ entry points and the Triton launcher of op `name`."""

    def triton(*args):
        from pyfast.kernels import sparse as launchers

        return getattr(launchers, name)(*args)

    return {
        "cpu": _ops.kernel(f"{name}_cpu"),
        "cuda": _ops.kernel(f"{name}_cuda"),
        "triton": triton,
    }


# ---------------------------------------------------------------------------------------------
# append_kv
# ---------------------------------------------------------------------------------------------
def _check_append(k_cache, v_cache, block_keys, cache_seqlens, k_new, v_new, block_size) -> None:
    op = "append_kv"
    b, hkv, tmax, d = check_cache(op, k_cache, v_cache, cache_seqlens)
    check_unit_last_stride(op, "k_cache", k_cache)
    check_unit_last_stride(op, "v_cache", v_cache)
    check_block_keys(op, block_keys, k_cache, block_size)
    check_unit_last_stride(op, "block_keys", block_keys)
    check_tensor(op, "k_new", k_new, dtypes=(k_cache.dtype,), shape=(b, hkv, None, d))
    tn = k_new.shape[2]
    check_tensor(op, "v_new", v_new, dtypes=(k_cache.dtype,), shape=(b, hkv, tn, d))
    if tn > tmax:
        fail(op, "k_new", f"at most Tmax = {tmax} new tokens (k_new.shape[2])", f"shape {list(k_new.shape)}")


def _check_append_data(k_cache, v_cache, block_keys, cache_seqlens, k_new, v_new, block_size) -> None:
    check_seqlens("append_kv", cache_seqlens, 0, k_cache.shape[2] - k_new.shape[2])


APPEND_KV = _registry.define(_registry.OpDef(
    name="append_kv",
    schema="(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!) block_keys, Tensor(d!) cache_seqlens, "
           "Tensor k_new, Tensor v_new, int block_size) -> ()",
    check=_check_append,
    check_data=_check_append_data,
    fake=lambda *args: None,
    impls={**_kernels("append_kv"), "reference": lambda *a: reference.append_kv(*a[:-1], block_size=a[-1])},
    default_cuda=_default_cuda,
))


# ---------------------------------------------------------------------------------------------
# decode_attention, sparse_decode_attention
# ---------------------------------------------------------------------------------------------
def _check_decode(q, k_cache, v_cache, cache_seqlens, scale) -> None:
    check_cache("decode_attention", k_cache, v_cache, cache_seqlens)
    check_query("decode_attention", q, k_cache)


def _check_sparse(q, k_cache, v_cache, cache_seqlens, block_keys, block_size, topk, sink_blocks, local_blocks,
                  scale) -> None:
    op = "sparse_decode_attention"
    check_cache(op, k_cache, v_cache, cache_seqlens)
    check_query(op, q, k_cache)
    check_block_keys(op, block_keys, k_cache, block_size)
    check_budget(op, topk, sink_blocks, local_blocks)


def _attended_lengths(op: str):
    """The data rule of both attention ops: 1 <= cache_seqlens[b] <= Tmax."""
    return lambda q, k_cache, v_cache, cache_seqlens, *rest: check_seqlens(op, cache_seqlens, 1, k_cache.shape[2])


def _fake_decode(q, *args):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


DECODE_ATTENTION = _registry.define(_registry.OpDef(
    name="decode_attention",
    schema="(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, float? scale) -> Tensor",
    check=_check_decode,
    check_data=_attended_lengths("decode_attention"),
    fake=_fake_decode,
    impls={**_kernels("decode_attention"), "reference": lambda *a: reference.decode_attention(*a[:-1], scale=a[-1])},
    default_cuda=_default_cuda,
))


def _sparse_reference(q, k_cache, v_cache, cache_seqlens, block_keys, block_size, topk, sink_blocks, local_blocks,
                      scale):
    return reference.sparse_decode_attention(q, k_cache, v_cache, cache_seqlens, block_keys, block_size=block_size,
                                             topk=topk, sink_blocks=sink_blocks, local_blocks=local_blocks, scale=scale)


SPARSE_DECODE_ATTENTION = _registry.define(_registry.OpDef(
    name="sparse_decode_attention",
    schema="(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, Tensor block_keys, int block_size, "
           "int topk, int sink_blocks, int local_blocks, float? scale) -> Tensor",
    check=_check_sparse,
    check_data=_attended_lengths("sparse_decode_attention"),
    fake=_fake_decode,
    impls={**_kernels("sparse_decode_attention"), "reference": _sparse_reference},
    default_cuda=_default_cuda,
))


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
    APPEND_KV.call(k_cache, v_cache, block_keys, cache_seqlens, k_new, v_new, block_size, backend=backend)


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
    return DECODE_ATTENTION.call(q, k_cache, v_cache, cache_seqlens, scale, backend=backend)


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
    return SPARSE_DECODE_ATTENTION.call(q, k_cache, v_cache, cache_seqlens, block_keys, block_size, topk,
                                        sink_blocks, local_blocks, scale, backend=backend)
