"""Executable spec of CherryQ: dequantization and the matmul, in float64.

Two forms of dequantization are kept and tested against each other: a vectorized
one (used by every test as the reference) and a per-element loop written straight
from the layout description in `pyfast.cherryq.format` (small shapes only).
"""

from __future__ import annotations

import torch

from pyfast.cherryq.format import PACK, CherryQWeight, unpack_codes


def dequantize(qw: CherryQWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W [N, K] = zeros + code * scales per group, cherries written over their columns."""
    n, k = qw.shape
    codes = unpack_codes(qw.qweight, qw.bits).to(torch.float64).reshape(n, -1, qw.group_size)
    w = qw.zeros.double().unsqueeze(-1) + codes * qw.scales.double().unsqueeze(-1)
    w = w.reshape(n, k)
    w.scatter_(1, qw.cherry_idx.long(), qw.cherry_val.double())
    return w.to(dtype)


def dequantize_loop(qw: CherryQWeight) -> torch.Tensor:
    """Same as `dequantize`, one weight at a time from the bit-layout formulas (slow)."""
    n, k = qw.shape
    words = (qw.qweight.to(torch.int64) & 0xFFFFFFFF).tolist()
    scales, zeros = qw.scales.double().tolist(), qw.zeros.double().tolist()
    out = torch.empty(n, k, dtype=torch.float64)
    b = qw.bits
    for r in range(n):
        for col in range(k):
            w = words[r][col // PACK * b : col // PACK * b + b]
            i = col % PACK
            if b == 4:
                code = (w[i >> 3] >> (4 * (i & 7))) & 15
            elif b == 2:
                code = (w[i >> 4] >> (2 * (i & 15))) & 3
            else:
                code = ((w[i >> 4] >> (2 * (i & 15))) & 3) | (((w[2] >> i) & 1) << 2)
            g = col // qw.group_size
            out[r, col] = zeros[r][g] + code * scales[r][g]
        for c, v in zip(qw.cherry_idx[r].tolist(), qw.cherry_val[r].double().tolist()):
            out[r, c] = v
    return out


def matmul(x: torch.Tensor, qw: CherryQWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y [..., N] = x [..., K] @ dequantize(qw).T + bias, computed in float64, returned in x.dtype."""
    w = dequantize(qw, torch.float64).to(x.device)
    y = x.double() @ w.T
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype)
