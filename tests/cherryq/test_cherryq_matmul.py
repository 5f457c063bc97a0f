"""cherryq_matmul on the CPU kernel (and the reference itself): values, shapes, dtypes, strides,
NaN, autograd, opcheck, torch.compile and bad input. Triton and CUDA have their own files."""

import pytest
import torch

import pyfast
from pyfast.reference.cherryq import matmul as ref_matmul
from pyfast.testing import assert_close, cpu_isa, rel_tol


def make(n, k, bits, group_size, cherries=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * (1 + torch.rand(n, 1, generator=g))
    return pyfast.cherryq_quantize(w, bits=bits, group_size=group_size, cherries_per_row=cherries)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [64, 128])
@pytest.mark.parametrize("m", [1, 3, 8, 9, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_matches_reference(bits, group_size, m, dtype):
    n, k = 67, 3 * group_size
    qw = make(n, k, bits, group_size, seed=m)
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n).to(dtype)
    out = pyfast.cherryq_matmul(x, qw, bias, backend="cpu")
    assert out.dtype == dtype and out.shape == (m, n)
    assert_close(out, ref_matmul(x, qw, bias), rel_tol(dtype))


@pytest.mark.parametrize("group_size", [32, 256])
@pytest.mark.parametrize("m", [1, 5, 11])
def test_cpu_other_group_sizes(group_size, m):
    qw = make(19, 2 * group_size, 3, group_size)
    x = torch.randn(m, 2 * group_size)
    assert_close(pyfast.cherryq_matmul(x, qw, backend="cpu"), ref_matmul(x, qw), 1e-5)


@pytest.mark.parametrize("isa", ["scalar", "avx512", "avx512_vnni"])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("m", [1, 2, 6, 10])
@pytest.mark.parametrize("group_size", [64, 128, 256])
def test_cpu_isa_paths(isa, bits, m, group_size):
    """Every CPU code path, whatever this machine picks by default (the portable one runs on
    CPUs without AVX-512)."""
    have = pyfast.build_info()["cpu_isa"]
    if isa == "avx512" and not have.startswith("avx512") or isa == "avx512_vnni" and have != "avx512_vnni":
        pytest.skip(f"CPU without {isa}")
    k = 3 * group_size
    qw = make(21, k, bits, group_size, cherries=2)
    x, bias = torch.randn(m, k) * torch.logspace(-3, 3, k), torch.randn(21)  # wide dynamic range in x
    x[0, 5] = 0.0
    with cpu_isa(isa):
        out = pyfast.cherryq_matmul(x, qw, bias, backend="cpu")
        x_nan = x.clone()
        x_nan[-1, 7] = float("nan")  # NaN in a row: NaN out in that row only (VNNI falls back)
        out_nan = pyfast.cherryq_matmul(x_nan, qw, bias, backend="cpu")
    assert_close(out, ref_matmul(x, qw, bias), 1e-5)
    assert torch.isnan(out_nan[-1]).all() and not torch.isnan(out_nan[:-1]).any()


@pytest.mark.parametrize("groups", [16, 19, 35])
@pytest.mark.parametrize("m", [1, 2])
def test_cpu_vnni_many_groups(groups, m):
    """The VNNI GEMV converts scales 16 groups at a time: full blocks and a partial tail."""
    if pyfast.build_info()["cpu_isa"] != "avx512_vnni":
        pytest.skip("CPU without avx512_vnni")
    k = 64 * groups
    qw = make(13, k, 3, 64, seed=groups)
    x, bias = torch.randn(m, k), torch.randn(13)
    with cpu_isa("avx512_vnni"):
        out = pyfast.cherryq_matmul(x, qw, bias, backend="cpu")
    assert_close(out, ref_matmul(x, qw, bias), 1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("group_size", [64, 128, 256])
def test_cpu_vnni_half_x(dtype, bits, m, group_size):
    """fp16/bf16 x through the VNNI path (x split into int8 digit planes): within the dtype's
    tolerance of the reference and within one ulp of the fp32 kernel, outputs with cancellation
    included (x spans four decades, so a coarse split of x would show)."""
    if pyfast.build_info()["cpu_isa"] != "avx512_vnni":
        pytest.skip("CPU without avx512_vnni")
    k = 3 * group_size
    qw = make(37, k, bits, group_size, cherries=2, seed=bits)
    x = (torch.randn(m, k) * torch.logspace(-2, 2, k)).to(dtype)
    bias = torch.randn(37).to(dtype)
    ref = ref_matmul(x, qw, bias)
    with cpu_isa("avx512_vnni"):
        out = pyfast.cherryq_matmul(x, qw, bias, backend="cpu")
    with cpu_isa("avx512"):
        exact = pyfast.cherryq_matmul(x, qw, bias, backend="cpu")  # fp32 kernel, fp32 accumulation
    assert_close(out, ref, rel_tol(dtype))
    # Each output within one unit in the last place of the fp32 kernel's (both err far below half
    # a unit before the final rounding, so only some roundings differ).
    big = torch.maximum(out.float().abs(), exact.float().abs()).clamp_min(torch.finfo(dtype).tiny)
    ulp = torch.exp2(torch.floor(torch.log2(big)) - {torch.float16: 10, torch.bfloat16: 7}[dtype])
    assert ((out.float() - exact.float()).abs() <= ulp).all()


@pytest.mark.parametrize("cherries", [0, 1, 5])
@pytest.mark.parametrize("m", [2, 12])
def test_cherries_counted_once(cherries, m):
    qw = make(16, 256, 3, 128, cherries=cherries)
    x = torch.randn(m, 256)
    w = pyfast.cherryq_dequantize(qw).double()
    assert_close(pyfast.cherryq_matmul(x, qw), (x.double() @ w.T).float(), 1e-5)


def test_batched_and_strided_input():
    qw = make(40, 256, 4, 64)
    x = torch.randn(2, 3, 512)[..., ::2]  # non-unit stride in the last dim
    assert not x.is_contiguous()
    out = pyfast.cherryq_matmul(x, qw)
    assert out.shape == (2, 3, 40)
    assert_close(out, ref_matmul(x, qw), 1e-5)
    xt = torch.randn(256, 5).t()  # transposed view
    assert_close(pyfast.cherryq_matmul(xt, qw), ref_matmul(xt, qw), 1e-5)


@pytest.mark.parametrize("m", [1, 4, 12])
def test_nan_row_stays_in_its_row(m):
    qw = make(24, 128, 3, 64)
    x = torch.randn(m, 128)
    x[m // 2, 17] = float("nan")
    out = pyfast.cherryq_matmul(x, qw)
    assert torch.isnan(out[m // 2]).all()
    rows = [i for i in range(m) if i != m // 2]
    assert torch.isfinite(out[rows]).all()


def test_reference_backend_and_default_dispatch():
    qw = make(24, 128, 2, 64)
    x = torch.randn(3, 128)
    r = pyfast.cherryq_matmul(x, qw, backend="reference")
    assert_close(pyfast.cherryq_matmul(x, qw), r, 1e-5)
    assert_close(torch.ops.pyfast.cherryq_matmul(x, *qw.tensors(), None, qw.bits, qw.group_size), r, 1e-5)


def test_grad_wrt_x():
    qw = make(24, 128, 3, 64)
    x = torch.randn(5, 128, requires_grad=True)
    g = torch.randn(5, 24)
    (pyfast.cherryq_matmul(x, qw) * g).sum().backward()
    w = pyfast.cherryq_dequantize(qw)
    assert_close(x.grad, g @ w, 1e-5)


@pytest.mark.parametrize("m", [1, 12])
def test_opcheck(m):
    qw = make(24, 128, 3, 64)
    x = torch.randn(m, 128, requires_grad=True)
    torch.library.opcheck(torch.ops.pyfast.cherryq_matmul.default, (x, *qw.tensors(), torch.randn(24), 3, 64))


def test_torch_compile_fullgraph():
    lin = pyfast.CherryQLinear.from_linear(torch.nn.Linear(128, 24), bits=4)
    x = torch.randn(3, 128)
    compiled = torch.compile(lin, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x), lin(x), 1e-6)


def _replace(qw, **kw):
    import dataclasses

    return dataclasses.replace(qw, **kw)


def test_weight_rules_see_changes_after_a_call():
    """The weight's rules run on every call: a tensor replaced or edited in place after a call that
    passed is checked again (the data rules remember a checked weight only until it changes)."""
    qw = make(16, 256, 3, 128, cherries=2)
    x = torch.randn(1, 256)
    pyfast.cherryq_matmul(x, qw)
    qw.zeros = qw.zeros[:, :1]
    with pytest.raises(ValueError, match="zeros"):
        pyfast.cherryq_matmul(x, qw)
    qw = make(16, 256, 3, 128, cherries=2)
    pyfast.cherryq_matmul(x, qw)
    qw.cherry_idx[3, 1] = 10**6  # in place: the remembered check no longer holds
    with pytest.raises(ValueError, match="cherry_idx"):
        pyfast.cherryq_matmul(x, qw)
