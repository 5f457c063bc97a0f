"""Random CherryQ problems shared by the cherryq_matmul tests of every backend: the quantized
weight, x (optionally a row-strided view), bias, and the exact (float64) product."""

from __future__ import annotations

import torch

import pyfast
from conftest import DTYPE_IDS  # noqa: F401  (re-exported: the family's tests import it from here)
from pyfast.reference.cherryq import matmul as ref_matmul

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def make_weight(n, k, bits, group_size, cherries=None, seed=0, device="cpu"):
    """A CherryQWeight [N, K] of a random matrix whose rows differ in scale (so the per-group
    scales and zeros differ); `cherries` per row (None: the quantizer's default, ceil(K / 256))."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * (1 + torch.rand(n, 1, generator=g))
    return pyfast.cherryq_quantize(w, bits=bits, group_size=group_size, cherries_per_row=cherries).to(device)


def make_x(m, k, dtype=torch.float32, *, strided=False, device="cpu"):
    """x [M, K] in `dtype`; with `strided` a column window of a wider tensor (row stride K + 24,
    unit last-dim stride)."""
    if strided:  # sliced last: .to() of a strided view would return a packed copy
        return torch.randn(m, k + 24).to(dtype).to(device)[:, 8 : 8 + k]
    return torch.randn(m, k).to(dtype).to(device)


def make_bias(n, dtype=torch.float32, device="cpu"):
    return torch.randn(n).to(dtype).to(device)


def expected(x, qw, bias=None):
    """The exact product in float64 on the CPU: x is upcast, so the reference is not rounded to
    x's dtype."""
    return ref_matmul(x.double().cpu(), qw.to("cpu"), None if bias is None else bias.double().cpu())


def raw_matmul(x, qw, bias=None, **kw):
    """torch.ops.pyfast.cherryq_matmul (or a Triton launcher, `fn=`) on the weight's tensors."""
    fn = kw.pop("fn", torch.ops.pyfast.cherryq_matmul)
    return fn(x, *qw.tensors(), bias, qw.bits, qw.group_size, **kw)
