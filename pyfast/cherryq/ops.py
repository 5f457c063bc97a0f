"""cherryq_matmul: the public function, backend dispatch, fake impls and autograd.

Implementations: "cpu" (C++, csrc/cherryq/cherryq_cpu.cpp), "cuda" (CUDA C++ GEMV,
csrc/cherryq/cherryq_cuda.cu), "triton" (kernels/cherryq.py: split-K GEMV and tensor-core
GEMM), "reference" (pyfast/reference/cherryq.py, float64).
"""

from __future__ import annotations

import torch

from pyfast import _ops  # noqa: F401  (registers torch.ops.pyfast.*)
from pyfast._validate import FLOAT_DTYPES, check_backend, check_tensor, fail
from pyfast.cherryq.format import PACK, SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, CherryQWeight
from pyfast.reference import cherryq as reference

OP = "cherryq_matmul"
GEMV_MAX_ROWS = 8  # above this many rows of x, CUDA devices use the Triton tensor-core GEMM
_CUDA_KERNELS = _ops.has_cuda_kernels()


def _signature(qw: CherryQWeight) -> tuple:
    return (qw.bits, qw.group_size, *((t.dtype, t.shape, t.device) for t in qw.tensors()))


def check_weight(op: str, qw) -> None:
    """A CherryQWeight whose five tensors agree with each other (see pyfast.cherryq.format).
    A weight that passed keeps the signature (dtypes, shapes, devices, bits, group size) it
    passed with, so a decode loop pays a tuple compare per call instead of the full check; any
    change to a tensor's dtype, shape or device (or a replaced tensor) checks it again."""
    if not isinstance(qw, CherryQWeight):
        fail(op, "qweight", "a CherryQWeight (from pyfast.cherryq_quantize)", type(qw).__name__)
    if torch.compiler.is_compiling():  # traced once per graph: check in full, keep no state
        _check_weight_fields(op, qw)
        return
    signature = _signature(qw)
    if qw.__dict__.get("_checked") == signature:
        return
    _check_weight_fields(op, qw)
    qw.__dict__["_checked"] = signature


def _check_weight_fields(op: str, qw: CherryQWeight) -> None:
    if qw.bits not in SUPPORTED_BITS:
        fail(op, "qw.bits", f"one of {SUPPORTED_BITS}", qw.bits)
    if qw.group_size not in SUPPORTED_GROUP_SIZES:
        fail(op, "qw.group_size", f"one of {SUPPORTED_GROUP_SIZES}", qw.group_size)
    check_tensor(op, "qw.scales", qw.scales, dtypes=(torch.float16,), ndim=2)
    n, g = qw.scales.shape
    k = g * qw.group_size
    dev = qw.scales.device
    check_tensor(op, "qw.qweight", qw.qweight, dtypes=(torch.int32,), shape=(n, k // PACK * qw.bits), device=dev)
    check_tensor(op, "qw.zeros", qw.zeros, dtypes=(torch.float16,), shape=(n, g), device=dev)
    check_tensor(op, "qw.cherry_idx", qw.cherry_idx, dtypes=(torch.int32,), ndim=2, device=dev)
    c = qw.cherry_idx.shape[1]
    check_tensor(op, "qw.cherry_idx", qw.cherry_idx, shape=(n, c))
    check_tensor(op, "qw.cherry_val", qw.cherry_val, dtypes=(torch.float16,), shape=(n, c), device=dev)


def check_matmul_args(x, qw, bias) -> None:
    check_weight(OP, qw)
    n, k = qw.shape
    check_tensor(OP, "x", x, dtypes=FLOAT_DTYPES, min_ndim=1, device=qw.device)
    if x.shape[-1] != k:
        fail(OP, "x.shape[-1]", f"== in_features = {k}", f"shape {list(x.shape)}")
    if bias is not None:
        check_tensor(OP, "bias", bias, dtypes=FLOAT_DTYPES, shape=(n,), device=qw.device)


def _dense_weight(qweight, scales, zeros, cherry_idx, cherry_val, bits, group_size) -> torch.Tensor:
    qw = CherryQWeight(qweight, scales, zeros, cherry_idx, cherry_val, bits, group_size)
    return reference.dequantize(qw, torch.float32)


def _setup_context(ctx, inputs, output):
    x, *weight, bias, bits, group_size = inputs
    ctx.save_for_backward(*weight)
    ctx.meta = (bits, group_size, x.dtype, None if bias is None else bias.dtype)


def _backward(ctx, grad):
    """dL/dx = grad @ W (W dequantized in fp32), dL/dbias = grad summed over rows. The packed
    weights are frozen (QAT trains a float master weight instead, see CherryQLinear)."""
    bits, group_size, dtype, bias_dtype = ctx.meta
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        w = _dense_weight(*ctx.saved_tensors, bits, group_size)
        grad_x = (grad.float() @ w).to(dtype)
    if bias_dtype is not None and ctx.needs_input_grad[6]:
        grad_bias = grad.float().reshape(-1, grad.shape[-1]).sum(0).to(bias_dtype)
    return grad_x, None, None, None, None, None, grad_bias, None, None


def _fake(x, qweight, scales, zeros, cherry_idx, cherry_val, bias, bits, group_size):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@torch.library.custom_op("pyfast::cherryq_matmul_triton", mutates_args=())
def cherryq_matmul_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    cherry_idx: torch.Tensor,
    cherry_val: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """Triton implementation of torch.ops.pyfast.cherryq_matmul (same schema)."""
    from pyfast.kernels.cherryq import cherryq_matmul_triton as launch

    x2d = x.reshape(-1, x.shape[-1])
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    y = launch(x2d, qweight, scales, zeros, cherry_idx, cherry_val, bias, bits, group_size)
    return y.reshape(*x.shape[:-1], qweight.shape[0])


torch.library.register_fake("pyfast::cherryq_matmul")(_fake)
cherryq_matmul_triton.register_fake(_fake)
for _op in ("pyfast::cherryq_matmul", "pyfast::cherryq_matmul_triton"):
    torch.library.register_autograd(_op, _backward, setup_context=_setup_context)


def cherryq_matmul(
    x: torch.Tensor, qw: CherryQWeight, bias: torch.Tensor | None = None, *, backend: str | None = None
) -> torch.Tensor:
    """y [..., N] = x [..., K] @ dequantize(qw).T + bias, accumulated in fp32, returned in x.dtype.

    x: float32/float16/bfloat16 [..., K] (strided views accepted); qw: a CherryQWeight of shape
    [N, K] on x's device; bias: [N] or None. Differentiable in x.
    backend: None (the device's fastest: C++ on CPU; on CUDA the CUDA GEMV for up to 8 rows of x
    and the Triton tensor-core GEMM above), "cpu", "cuda", "triton" or "reference".

    Example:
        >>> qw = pyfast.cherryq_quantize(torch.randn(512, 1024), bits=3)
        >>> y = pyfast.cherryq_matmul(torch.randn(2, 1024), qw)      # [2, 512]
        >>> torch.testing.assert_close(y, torch.randn(2, 1024) @ pyfast.cherryq_dequantize(qw).T)  # up to x
    """
    check_matmul_args(x, qw, bias)
    chosen = check_backend(OP, backend, x.device)
    if chosen == "cuda" and not _CUDA_KERNELS:
        if backend == "cuda" or not _ops.has_triton():
            fail(OP, "backend", "'cuda' only in a build with the CUDA kernels (rebuild with nvcc present)", "a CPU-only build")
        chosen = "triton"
    if backend is None and chosen == "cuda" and x.numel() // max(x.shape[-1], 1) > GEMV_MAX_ROWS and _ops.has_triton():
        chosen = "triton"
    if chosen == "reference":
        return reference.matmul(x, qw, bias)
    args = (x, *qw.tensors(), bias, qw.bits, qw.group_size)
    if chosen == "triton":
        return torch.ops.pyfast.cherryq_matmul_triton(*args)
    return torch.ops.pyfast.cherryq_matmul(*args)
