"""Random sparse-decoding problems shared by the sparse tests of every backend: filled caches
(poisoned past each length), queries, the block-list -> token-mask helper of the Triton
selection tests, and the per-backend shape lists."""

from __future__ import annotations

import torch

from conftest import DTYPE_IDS, shape_id  # noqa: F401  (re-exported: the family's tests import them from here)
from pyfast.reference import sparse as reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# CPU kernel shapes (B, Hkv, G, Tmax, D, lengths): odd head dims, GQA ratios 1/3/4, lengths
# differing per sequence.
CPU_SHAPES = [
    (3, 2, 3, 100, 72, [100, 1, 37]),
    (1, 1, 1, 20, 64, [15]),
    (2, 3, 4, 300, 128, [300, 161]),
    (1, 2, 2, 1000, 40, [999]),
    (2, 1, 5, 64, 17, [64, 48]),
]
# CUDA kernel head layouts (Hq, Hkv): G = 1, 3, 4 and 12 (> 8 heads: two head chunks).
CUDA_HEADS = [(4, 4), (6, 2), (8, 2), (12, 1)]


def make_cache(b, hkv, tmax, d, dtype, *, lengths=None, block_size=16, device="cpu", seed=0, poison=True):
    """A filled cache: random K/V, block keys built by the reference append (so they are the
    true block means), and cache_seqlens = lengths (random in [1, tmax] by default). With `poison`
    (the default), tokens and block keys past each sequence's length are NaN, so a kernel that
    reads them fails."""
    gen = torch.Generator().manual_seed(seed)
    if lengths is None:
        lengths = torch.randint(1, tmax + 1, (b,), generator=gen).tolist()
    k = torch.randn(b, hkv, tmax, d, generator=gen).to(dtype)
    v = torch.randn(b, hkv, tmax, d, generator=gen).to(dtype)
    bk = torch.full((b, hkv, tmax // block_size, d), float("nan"), dtype=dtype)
    n = torch.zeros(b, dtype=torch.int32)
    kc, vc = torch.zeros_like(k), torch.zeros_like(v)
    reference.append_kv(kc, vc, bk, n, k, v, block_size=block_size)  # every block key = its mean
    n.copy_(torch.tensor(list(lengths), dtype=torch.int32))
    for i, length in enumerate(lengths if poison else ()):  # what no kernel may read: past L
        kc[i, :, length:] = float("nan")
        vc[i, :, length:] = float("nan")
        bk[i, :, length // block_size :] = float("nan")
    to = dict(device=device)
    return kc.to(**to), vc.to(**to), bk.to(**to), n.to(**to)


def make_query(b, hq, d, dtype, *, device="cpu", seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, hq, d, generator=gen).to(dtype).to(device)


def problem(b, hq, hkv, tmax, d, dtype, lengths, *, block_size=16, seed=0, poison=True, device="cpu"):
    """q, k_cache, v_cache, cache_seqlens, block_keys of one decode step (make_cache, make_query)."""
    k, v, bk, n = make_cache(b, hkv, tmax, d, dtype, lengths=lengths, block_size=block_size, device=device,
                             seed=seed, poison=poison)
    return make_query(b, hq, d, dtype, device=device, seed=seed + 1), k, v, n, bk


def make_dense(b, hq, hkv, tmax, d, dtype, *, block_size=None, device="cpu"):
    """q [B, Hq, D], full caches [B, Hkv, Tmax, D] from the global generator (no poison: the
    lengths are chosen afterwards) and (with block_size) the block means of the keys."""
    k = torch.randn(b, hkv, tmax, d, device=device).to(dtype)
    v = torch.randn(b, hkv, tmax, d, device=device).to(dtype)
    q = torch.randn(b, hq, d, device=device).to(dtype)
    if block_size is None:
        return q, k, v
    return q, k, v, block_means(k, block_size)


def block_means(k: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean of every block slot of k [B, H, Tmax, D] -> [B, H, Tmax // bs, D] (float64 mean, cast)."""
    nb = k.shape[2] // block_size
    return k[:, :, : nb * block_size].double().unflatten(2, (nb, block_size)).mean(3).to(k.dtype)


def seqlens(*lengths, device="cpu") -> torch.Tensor:
    return torch.tensor(lengths, dtype=torch.int32, device=device)


def randn(*shape, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(device)


def token_mask(block_ids, counts, cache_seqlens, tmax, block_size) -> torch.Tensor:
    """bool [B, Hkv, tmax] from a kept-block list; also checks the list is strictly ascending."""
    b_sz, hkv, _ = block_ids.shape
    mask = torch.zeros(b_sz, hkv, tmax, dtype=torch.bool)
    for b in range(b_sz):
        length = int(cache_seqlens[b])
        for h in range(hkv):
            ids = block_ids[b, h, : int(counts[b, h])].cpu().tolist()
            assert ids == sorted(set(ids)), f"block list not strictly ascending: {ids}"
            for j in ids:
                mask[b, h, j * block_size : min((j + 1) * block_size, length)] = True
    return mask
