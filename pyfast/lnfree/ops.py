"""The LN-free linear layers as ops: linear_bias_gelu and linear_bias_residual, declared once each
in the op registry (pyfast/_registry.py): rules, fake impl and backends. Inference ops (no
backward: the registry refuses inputs that require grad while grad mode is on).

    linear_bias_gelu(x, weight, bias=None)                  = gelu_tanh(x @ weight^T + bias)
    linear_bias_residual(x, weight, bias=None, residual=None) = x @ weight^T + bias + residual

Implementations: "cpu" (csrc/lnfree/lnfree_cpu.cpp), "triton" (kernels/lnfree.py; the default on
CUDA), "reference" (pyfast/reference/lnfree.py, float64).
"""

from __future__ import annotations

import torch

from pyfast import _ops, _registry
from pyfast._validate import FLOAT_DTYPES, check_tensor, fail
from pyfast.reference import lnfree as reference


def check_linear(op: str, x, weight, bias, residual=None) -> None:
    """x [..., K], weight [N, K] (F.linear's layout), bias [N], residual [..., N] (x's leading
    dims), all of x's float dtype."""
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, min_ndim=1)
    if x.shape[-1] < 1:  # K = 0: the kernels assume at least one column (the output would be the bias alone)
        fail(op, "x.shape[-1] (K)", ">= 1", f"shape {list(x.shape)}")
    check_tensor(op, "weight", weight, dtypes=(x.dtype,), ndim=2)
    if weight.shape[1] != x.shape[-1]:
        fail(op, "weight", f"shape [N, {x.shape[-1]}] (K = x.shape[-1])", f"shape {list(weight.shape)}")
    n = weight.shape[0]
    if bias is not None:
        check_tensor(op, "bias", bias, dtypes=(x.dtype,), shape=(n,))
    if residual is not None:
        check_tensor(op, "residual", residual, dtypes=(x.dtype,), shape=(*x.shape[:-1], n))


def _fake(x, weight, *rest):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _triton(gelu: bool):
    def run(x, weight, bias, residual=None):
        from pyfast.kernels.lnfree import linear_epilogue_triton

        x2d = x.reshape(-1, x.shape[-1])
        r2d = None if residual is None else residual.reshape(-1, weight.shape[0])
        return linear_epilogue_triton(x2d, weight, bias, r2d, gelu).reshape(*x.shape[:-1], weight.shape[0])
    return run


def _default_cuda(*args) -> str:
    return "triton"


LINEAR_BIAS_GELU = _registry.define(_registry.OpDef(
    name="linear_bias_gelu",
    schema="(Tensor x, Tensor weight, Tensor? bias) -> Tensor",
    check=lambda x, weight, bias: check_linear("linear_bias_gelu", x, weight, bias),
    fake=_fake,
    impls={"cpu": _ops.kernel("linear_bias_gelu_cpu"), "triton": _triton(True),
           "reference": reference.linear_bias_gelu},
    default_cuda=_default_cuda,
))

LINEAR_BIAS_RESIDUAL = _registry.define(_registry.OpDef(
    name="linear_bias_residual",
    schema="(Tensor x, Tensor weight, Tensor? bias, Tensor? residual) -> Tensor",
    check=lambda x, weight, bias, residual: check_linear("linear_bias_residual", x, weight, bias, residual),
    fake=_fake,
    impls={"cpu": _ops.kernel("linear_bias_residual_cpu"), "triton": _triton(False),
           "reference": reference.linear_bias_residual},
    default_cuda=_default_cuda,
))


def linear_bias_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                     backend: str | None = None) -> torch.Tensor:
    """y [..., N] = gelu_tanh(x [..., K] @ weight [N, K]^T + bias [N]): GPT-2's MLP input layer
    (transformers' "gelu_new"), fp32 accumulation, in x's dtype (float32/float16/bfloat16; weight
    and bias the same). backend: None (C++ on CPU, Triton on CUDA), "cpu", "triton", "reference".

    Example:
        >>> x, w, b = torch.randn(2, 768), torch.randn(3072, 768), torch.randn(3072)
        >>> y = pyfast.lnfree.linear_bias_gelu(x, w, b)                        # [2, 3072]
        >>> torch.testing.assert_close(y, F.gelu(F.linear(x, w, b), approximate="tanh"), rtol=1e-4, atol=1e-4)
    """
    return LINEAR_BIAS_GELU.call(x, weight, bias, backend=backend)


def linear_bias_residual(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                         residual: torch.Tensor | None = None, *, backend: str | None = None) -> torch.Tensor:
    """y [..., N] = x [..., K] @ weight [N, K]^T + bias [N] + residual [..., N]: a linear layer whose
    output joins the residual stream (without residual: a plain linear layer with bias), fp32
    accumulation, in x's dtype. backend: as linear_bias_gelu.

    Example:
        >>> x, w, b, r = torch.randn(2, 3072), torch.randn(768, 3072), torch.randn(768), torch.randn(2, 768)
        >>> y = pyfast.lnfree.linear_bias_residual(x, w, b, r)                 # [2, 768]
        >>> torch.testing.assert_close(y, F.linear(x, w, b) + r, rtol=1e-4, atol=1e-4)
    """
    return LINEAR_BIAS_RESIDUAL.call(x, weight, bias, residual, backend=backend)
