"""Device copy bandwidth (dst.copy_(src) of a buffer far larger than any cache): the yardstick
for the "fraction of copy bandwidth" targets of the memory-bound kernels. GB/s counts the read
and the write."""

from __future__ import annotations

import torch

from pyfast.bench.runner import Case


def cases(device: str, quick: bool) -> list[Case]:
    nbytes = (64 << 20) if quick else (1 << 30 if device == "cuda" else 256 << 20)
    src = [torch.ones(nbytes // 4, device=device) for _ in range(2)]
    dst = [torch.empty_like(s) for s in src]
    return [Case("copy", f"{nbytes >> 20} MiB", "torch copy_", lambda i: dst[i].copy_(src[i]), 2,
                 bytes=2 * nbytes, baseline=True)]
