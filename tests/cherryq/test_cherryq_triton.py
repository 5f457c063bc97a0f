"""cherryq_matmul Triton kernels (kernels/cherryq.py): split-K GEMV, tensor-core GEMM and the
dispatcher against the float64 reference; bits, group sizes, dtypes, bias, cherries (none,
default, many, out of range), strided x, split-K, NaN. Without CUDA they run on the CPU through
TRITON_INTERPRET=1 (small shapes only)."""

import os

import torch

# Must precede the first `import triton` (tests/conftest.py does the same; whichever runs first).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from pyfast.cherryq.quantize import cherryq_quantize  # noqa: E402
from pyfast.kernels.cherryq import (  # noqa: E402
    INTERPRETED,
    cherryq_gemm_triton,
    cherryq_gemv_triton,
    cherryq_matmul_triton,
)
from pyfast.reference.cherryq import matmul as ref_matmul  # noqa: E402
from pyfast.testing import assert_close, rel_tol  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
N = 33  # odd: the last N tile is partial in every kernel


def tol(dtype: torch.dtype) -> float:
    # The interpreter computes fp32 dots exactly; GPUs may use TF32 tensor cores.
    return 1e-5 if dtype == torch.float32 and INTERPRETED else rel_tol(dtype, DEVICE, backend="triton")


def make(k, bits, group_size, cherries=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, k, generator=g) * (1 + torch.rand(N, 1, generator=g))
    return cherryq_quantize(w, bits=bits, group_size=group_size, cherries_per_row=cherries).to(DEVICE)


def expected(x, qw, bias=None):
    """The exact (float64) product: x is upcast so the reference is not rounded to x's dtype."""
    return ref_matmul(x.double(), qw, None if bias is None else bias.double())


def run(fn, x, qw, bias=None, **kw):
    return fn(x, *qw.tensors(), bias, qw.bits, qw.group_size, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("m", [1, 3, 8, 17])
@pytest.mark.parametrize("group_size", [64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_matches_reference(bits, group_size, m, dtype):
    k = 256 if (bits + m) % 2 else 128
    qw = make(k, bits, group_size, seed=m)  # default cherries: ceil(K / 256) per row
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    bias = torch.randn(N, device=DEVICE).to(dtype) if m != 3 else None
    out = run(cherryq_matmul_triton, x, qw, bias)
    assert out.dtype == dtype and out.shape == (m, N) and out.device == x.device
    assert_close(out, expected(x, qw, bias), tol(dtype))


@pytest.mark.parametrize("cherries", [0, None, 12], ids=["none", "default", "many"])
@pytest.mark.parametrize("kernel", ["gemv", "gemm"])
def test_cherries(kernel, cherries):
    qw = make(256, 3, 64, cherries=cherries, seed=1)
    assert qw.cherry_idx.shape == (N, {0: 0, None: 1, 12: 12}[cherries])
    x = torch.randn(5, 256, device=DEVICE)
    bias = torch.randn(N, device=DEVICE)
    fn, kw = (cherryq_gemv_triton, {"split_k": 3}) if kernel == "gemv" else (cherryq_gemm_triton, {})
    assert_close(run(fn, x, qw, bias, **kw), expected(x, qw, bias), tol(torch.float32))


@pytest.mark.parametrize("kernel", ["gemv", "gemm"])
def test_out_of_range_cherries_are_skipped(kernel):
    """Cherry indices outside [0, K) add nothing and are never dereferenced."""
    k = 128
    qw = make(k, 4, 64, cherries=2, seed=2)
    bad = torch.tensor([-(2**31), -1, k, k + 1, 2**31 - 1], dtype=torch.int32, device=DEVICE)
    idx = torch.cat([qw.cherry_idx, bad.expand(N, -1)], dim=1).contiguous()
    val = torch.cat([qw.cherry_val, torch.full((N, bad.numel()), 1e4, dtype=torch.float16, device=DEVICE)], 1)
    x = torch.randn(4, k, device=DEVICE)
    fn = cherryq_gemv_triton if kernel == "gemv" else cherryq_gemm_triton
    out = fn(x, qw.qweight, qw.scales, qw.zeros, idx, val.contiguous(), None, qw.bits, qw.group_size)
    assert_close(out, expected(x, qw), tol(torch.float32))


@pytest.mark.parametrize("split_k", [1, 2, 3, 4])
def test_gemv_split_k(split_k):
    """Every split count (also uneven ones: 4 groups in 3 splits -> 2 splits of 2) gives the same
    result; split_k > 1 goes through the fp32 workspace and the reduction kernel."""
    qw = make(256, 2, 64, cherries=6, seed=3)
    x = torch.randn(3, 256, device=DEVICE).to(torch.float16)
    bias = torch.randn(N, device=DEVICE)
    out = run(cherryq_gemv_triton, x, qw, bias, split_k=split_k)
    assert_close(out, expected(x, qw, bias), tol(torch.float16))


@pytest.mark.parametrize("m", [8, 12])
def test_gemv_and_gemm_agree_across_the_dispatch_boundary(m):
    qw = make(128, 4, 128, seed=4)
    x = torch.randn(m, 128, device=DEVICE)
    ref = expected(x, qw)
    assert_close(run(cherryq_gemv_triton, x, qw), ref, tol(torch.float32), "gemv")
    assert_close(run(cherryq_gemm_triton, x, qw), ref, tol(torch.float32), "gemm")


@pytest.mark.parametrize("m", [1, 3, 17])
def test_strided_x(m):
    k = 128
    wide = torch.randn(m, 2 * k + 7, device=DEVICE).to(torch.bfloat16)
    x = wide[:, 5 : 5 + k]  # row stride 2K+7, unit last-dim stride: used in place
    qw = make(k, 3, 128, seed=5)
    assert x.stride() == (2 * k + 7, 1)
    assert_close(run(cherryq_matmul_triton, x, qw), expected(x, qw), tol(torch.bfloat16))
    xt = torch.randn(k, m, device=DEVICE).t()  # last-dim stride != 1: copied by the launcher
    assert_close(run(cherryq_matmul_triton, xt, qw), expected(xt, qw), tol(torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("m", [2, 9])
def test_nan_row_stays_in_its_row(m, dtype):
    qw = make(128, 3, 64, seed=6)
    x = torch.randn(m, 128, device=DEVICE).to(dtype)
    x[1, 77] = float("nan")
    out = run(cherryq_matmul_triton, x, qw, torch.randn(N, device=DEVICE))
    assert torch.isnan(out[1]).all()
    rows = [i for i in range(m) if i != 1]
    assert torch.isfinite(out[rows]).all()


def test_empty_input():  # bad input: tests/test_errors.py (every op, every entry point)
    qw = make(128, 4, 64, seed=7)
    out = run(cherryq_matmul_triton, torch.randn(0, 128, device=DEVICE), qw)
    assert out.shape == (0, N)
