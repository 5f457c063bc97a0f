"""cherryq_matmul: its declaration in the op registry (rules, fake, autograd, backends) and the
public function.

Implementations: "cpu" (C++, csrc/cherryq/cherryq_cpu.cpp), "cuda" (CUDA C++ GEMV,
csrc/cherryq/cherryq_cuda.cu), "triton" (kernels/cherryq.py: split-K GEMV and tensor-core
GEMM), "reference" (pyfast/reference/cherryq.py, float64). Storage format: pyfast/cherryq/format.py.
"""

from __future__ import annotations

import torch

from pyfast import _ops, _registry
from pyfast._validate import FLOAT_DTYPES, check_choice, check_tensor, fail, fail_type
from pyfast.cherryq.format import (SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, CherryQWeight, codes_at, packed_layout,
                                   packed_layout_cached)
from pyfast.reference import cherryq as reference

OP = "cherryq_matmul"
GEMV_MAX_ROWS = 8  # above this many rows of x, CUDA devices use the Triton tensor-core GEMM


# ---------------------------------------------------------------------------------------------
# Rules of a packed weight (shared with cherryq_dequantize)
# ---------------------------------------------------------------------------------------------
def check_packed(op: str, qweight, scales, zeros, cherry_idx, cherry_val, bits, group_size) -> tuple[int, int]:
    """The five tensors of a CherryQ weight agree with each other and with (bits, group_size);
    metadata only. Returns (N, K)."""
    check_choice(op, "bits", bits, SUPPORTED_BITS)
    check_choice(op, "group_size", group_size, SUPPORTED_GROUP_SIZES)
    if type(scales) is not torch.Tensor or scales.dim() != 2:  # (dtypes: in the loop below)
        check_tensor(op, "scales", scales, dtypes=(torch.float16,), ndim=2)
    n, g = scales.shape
    if g < 1:
        fail(op, "scales", "[N, K / group_size] with at least one group (K >= group_size)", f"shape {list(scales.shape)}")
    k = g * group_size
    if type(cherry_idx) is not torch.Tensor or cherry_idx.dim() != 2:
        check_tensor(op, "cherry_idx", cherry_idx, dtypes=(torch.int32,), ndim=2)
    c = cherry_idx.shape[1]
    # Every tensor as the format lays it out, and contiguous (kernels read them as flat row-major
    # arrays). One loop without calls in the common case (decode makes many small calls);
    # check_tensor reports what is wrong otherwise.
    plain_sizes = type(n) is int and type(c) is int  # not symbolic (torch.compile's dynamic shapes)
    layout = (packed_layout_cached if plain_sizes else packed_layout)(n, k, c, bits, group_size)
    for (name, (dtype, shape)), t in zip(layout.items(), (qweight, scales, zeros, cherry_idx, cherry_val)):
        if type(t) is not torch.Tensor or t.dtype != dtype or t.shape != shape or not t.is_contiguous():
            check_tensor(op, name, t, dtypes=(dtype,), shape=shape)  # a tensor subclass may pass here
            if not t.is_contiguous():
                fail(op, name, "contiguous (a packed weight tensor)", f"strides {list(t.stride())}")
    return n, k


def check_packed_data(op: str, qweight, cherry_idx, bits: int, k: int) -> None:
    """Each row's cherry columns are in [0, K) and strictly ascending (no duplicates), and the packed
    code under each cherry is 0 (kernels add a cherry as a fix-up on top of code 0). Reads the
    indices once per weight: the result is remembered on cherry_idx until it or qweight changes."""
    if cherry_idx.numel() == 0:
        return
    # Inference tensors keep no version counter: remembered by address only (like data written
    # behind torch's back, e.g. through numpy, an in-place edit of them is not seen; the CPU and
    # GPU kernels skip a column out of range, so that can never read out of bounds).
    versions = (None, None) if torch.is_inference(qweight) or torch.is_inference(cherry_idx) else (
        qweight._version, cherry_idx._version)
    key = (qweight.data_ptr(), cherry_idx.data_ptr(), *versions, bits, k)
    if cherry_idx.__dict__.get("_pyfast_checked") == key:
        return
    idx = cherry_idx.to(torch.int64)
    lo, hi = (int(v) for v in torch.stack(torch.aminmax(idx)).tolist())
    if lo < 0 or hi >= k:
        fail(op, "cherry_idx", f"column indices in [0, {k})", f"values in [{lo}, {hi}]")
    if idx.shape[1] > 1 and not bool((idx[:, 1:] > idx[:, :-1]).all()):
        fail(op, "cherry_idx", "strictly ascending in every row (no duplicate cherries)", "a row that is not")
    if bool(codes_at(qweight, bits, idx).any()):
        fail(op, "qweight", "code 0 under every cherry (the format of pyfast.cherryq.format)", "a non-zero code")
    cherry_idx.__dict__["_pyfast_checked"] = key


def check_weight(op: str, qw) -> tuple[int, int]:
    """A CherryQWeight whose tensors follow every rule above. Returns (N, K)."""
    if not isinstance(qw, CherryQWeight):
        fail_type(op, "qw", "a CherryQWeight (from pyfast.cherryq_quantize)", type(qw).__name__)
    n, k = check_packed(op, *qw.tensors(), qw.bits, qw.group_size)
    devices = {t.device for t in qw.tensors()}
    if len(devices) > 1:
        fail(op, "qw", "tensors on one device", sorted(map(str, devices)))
    check_packed_data(op, qw.qweight, qw.cherry_idx, qw.bits, k)
    return n, k


# ---------------------------------------------------------------------------------------------
# The op
# ---------------------------------------------------------------------------------------------
def _check(x, qweight, scales, zeros, cherry_idx, cherry_val, bias, bits, group_size) -> None:
    n, k = check_packed(OP, qweight, scales, zeros, cherry_idx, cherry_val, bits, group_size)
    check_tensor(OP, "x", x, dtypes=FLOAT_DTYPES, min_ndim=1)
    if x.shape[-1] != k:
        fail(OP, "x.shape[-1]", f"== in_features = {k}", f"shape {list(x.shape)}")
    if bias is not None:
        check_tensor(OP, "bias", bias, dtypes=FLOAT_DTYPES, shape=(n,))


def _check_data(x, qweight, scales, zeros, cherry_idx, cherry_val, bias, bits, group_size) -> None:
    check_packed_data(OP, qweight, cherry_idx, bits, scales.shape[1] * group_size)


def _fake(x, qweight, scales, zeros, cherry_idx, cherry_val, bias, bits, group_size):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


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
        w = reference.dequantize(CherryQWeight(*ctx.saved_tensors, bits, group_size), torch.float32)
        grad_x = (grad.float() @ w).to(dtype)
    if bias_dtype is not None and ctx.needs_input_grad[6]:
        grad_bias = grad.float().reshape(-1, grad.shape[-1]).sum(0).to(bias_dtype)
    return grad_x, None, None, None, None, None, grad_bias, None, None


def _triton(x, qweight, scales, zeros, cherry_idx, cherry_val, bias, bits, group_size):
    from pyfast.kernels.cherryq import cherryq_matmul_triton as launch

    y = launch(x.reshape(-1, x.shape[-1]), qweight, scales, zeros, cherry_idx, cherry_val, bias, bits, group_size)
    return y.reshape(*x.shape[:-1], qweight.shape[0])


def _reference(x, qweight, scales, zeros, cherry_idx, cherry_val, bias, bits, group_size):
    return reference.matmul(x, CherryQWeight(qweight, scales, zeros, cherry_idx, cherry_val, bits, group_size), bias)


def _default_cuda(x, *args) -> str:
    """The CUDA C++ GEMV up to GEMV_MAX_ROWS rows of x, the Triton tensor-core GEMM above (and
    wherever the build has no CUDA kernels)."""
    rows = x.numel() // max(x.shape[-1], 1)
    if _ops.has_cuda_kernels() and (rows <= GEMV_MAX_ROWS or not _ops.has_triton()):
        return "cuda"
    return "triton" if _ops.has_triton() else "cuda"


CHERRYQ_MATMUL = _registry.define(_registry.OpDef(
    name=OP,
    schema="(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor cherry_idx, Tensor cherry_val, "
           "Tensor? bias, int bits, int group_size) -> Tensor",
    check=_check,
    check_data=_check_data,
    fake=_fake,
    autograd=_registry.Autograd(_backward, _setup_context),
    differentiable=("x", "bias"),  # the packed weights are frozen (QAT trains a float master weight)
    impls={
        "cpu": _ops.kernel("cherryq_matmul_cpu"),
        "cuda": _ops.kernel("cherryq_matmul_cuda"),
        "triton": _triton,
        "reference": _reference,
    },
    default_cuda=_default_cuda,
))


def cherryq_matmul(
    x: torch.Tensor, qw: CherryQWeight, bias: torch.Tensor | None = None, *, backend: str | None = None
) -> torch.Tensor:
    """y [..., N] = x [..., K] @ dequantize(qw).T + bias, accumulated in fp32, returned in x.dtype.

    x: float32/float16/bfloat16 [..., K] (strided views accepted); qw: a CherryQWeight of shape
    [N, K] on x's device; bias: [N] or None. Differentiable in x (and bias).
    backend: None (the device's fastest: C++ on CPU; on CUDA the CUDA GEMV for up to 8 rows of x
    and the Triton tensor-core GEMM above, as torch.ops.pyfast.cherryq_matmul), "cpu", "cuda",
    "triton" or "reference".

    Example:
        >>> qw = pyfast.cherryq_quantize(torch.randn(512, 1024), bits=3)
        >>> x = torch.randn(2, 1024)
        >>> y = pyfast.cherryq_matmul(x, qw)                                  # [2, 512]
        >>> torch.testing.assert_close(y, x @ pyfast.cherryq_dequantize(qw).T, rtol=1e-4, atol=1e-4)
    """
    if not isinstance(qw, CherryQWeight):
        fail_type(OP, "qw", "a CherryQWeight (from pyfast.cherryq_quantize)", type(qw).__name__)
    return CHERRYQ_MATMUL.call(x, *qw.tensors(), bias, qw.bits, qw.group_size, backend=backend)
