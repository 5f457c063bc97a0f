"""Random sparse-decoding problems shared by the sparse tests of every backend."""

from __future__ import annotations

import torch

from pyfast.reference import sparse as reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def make_cache(b, hkv, tmax, d, dtype, *, lengths=None, block_size=16, device="cpu", seed=0):
    """A filled cache: random K/V, block keys built by the reference append (so they are the
    true block means), and cache_seqlens = lengths (random in [1, tmax] by default). Tokens and
    block keys past each sequence's length are NaN, so a kernel that reads them fails."""
    gen = torch.Generator().manual_seed(seed)
    if lengths is None:
        lengths = torch.randint(1, tmax + 1, (b,), generator=gen).tolist()
    k = torch.randn(b, hkv, tmax, d, generator=gen).to(dtype)
    v = torch.randn(b, hkv, tmax, d, generator=gen).to(dtype)
    bk = torch.full((b, hkv, tmax // block_size, d), float("nan"), dtype=dtype)
    n = torch.zeros(b, dtype=torch.int32)
    kc, vc = torch.zeros_like(k), torch.zeros_like(v)
    reference.append_kv(kc, vc, bk, n, k, v, block_size=block_size)  # every block key = its mean
    n.copy_(torch.tensor(lengths, dtype=torch.int32))
    for i, length in enumerate(lengths):  # what no kernel may read: tokens and block keys past L
        kc[i, :, length:] = float("nan")
        vc[i, :, length:] = float("nan")
        bk[i, :, length // block_size :] = float("nan")
    to = dict(device=device)
    return kc.to(**to), vc.to(**to), bk.to(**to), n.to(**to)


def make_query(b, hq, d, dtype, *, device="cpu", seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, hq, d, generator=gen).to(dtype).to(device)
