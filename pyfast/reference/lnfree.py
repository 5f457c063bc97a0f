"""Executable spec of the LN-free linear layers, in float64 (cast back to x's dtype):
    linear_bias_gelu(x, w, b)          = gelu_tanh(x @ w^T + b)
    linear_bias_residual(x, w, b, r)   = x @ w^T + b + r
with GPT-2's GELU, gelu_tanh(v) = 0.5 v (1 + tanh(sqrt(2 / pi) (v + 0.044715 v^3))) (transformers'
"gelu_new", torch's approximate="tanh"). x [..., K], w [N, K] (F.linear's layout), b [N] or None,
r [..., N] or None."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.double(), weight.double(), None if bias is None else bias.double())


def linear_bias_gelu(x, weight, bias=None) -> torch.Tensor:
    return F.gelu(linear(x, weight, bias), approximate="tanh").to(x.dtype)


def linear_bias_residual(x, weight, bias=None, residual=None) -> torch.Tensor:
    y = linear(x, weight, bias)
    return (y if residual is None else y + residual.double()).to(x.dtype)
