"""linear_bias_gelu and linear_bias_residual on every kernel backend (cpu, triton) against the
float64 reference: dtypes, odd shapes (the GEMV rows path and the packed-panel GEMM path of the
CPU kernel, partial panels and K blocks), strided and 3-D inputs, optional bias/residual, NaN and
extreme magnitudes; the scalar CPU path. opcheck / torch.compile: tests/test_registry.py; bad
input: tests/test_errors.py and below."""

import pytest
import torch
import torch.nn.functional as F

from conftest import DTYPE_IDS, backends, device_for, per_backend, tol
from pyfast.lnfree import linear_bias_gelu, linear_bias_residual
from pyfast.testing import assert_close, cpu_isa

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (M, N, K): M <= 4 the CPU's GEMV rows path, above it the packed GEMM (M = 7: a 6-row block and a
# 1-row block); N = 67 / 130 leave partial 64-column panels, K = 300 / 513 partial vectors and a
# second 256-deep K block. The Triton interpreter gets small shapes.
SHAPES = {
    "cpu": [(1, 67, 33), (4, 130, 300), (5, 64, 16), (7, 67, 513), (70, 130, 257)],
    "triton": [(1, 33, 40), (5, 17, 33), (19, 70, 65)],
}


def _case(m, n, k, dtype, device, *, scale=1.0, strided=False):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x = (torch.randn(m, 2 * k if strided else k, generator=g) * scale).to(dtype)
    w = (torch.randn(n, 2 * k if strided else k, generator=g) * k ** -0.5).to(dtype)
    if strided:  # every other column: last-dim stride 2 (the ops copy such inputs)
        x, w = x[:, ::2], w[:, ::2]
    b = torch.randn(n, generator=g).to(dtype)
    r = torch.randn(m, n, generator=g).to(dtype)
    return [t.to(device) for t in (x, w, b, r)]


OPS = {
    "gelu": (linear_bias_gelu, lambda x, w, b, r: F.gelu(F.linear(x.double(), w.double(), b.double()), approximate="tanh")),
    "residual": (linear_bias_residual, lambda x, w, b, r: F.linear(x.double(), w.double(), b.double()) + r.double()),
}


def _call(kind, x, w, b, r, backend):
    if kind == "gelu":
        return linear_bias_gelu(x, w, b, backend=backend)
    return linear_bias_residual(x, w, b, r, backend=backend)


@pytest.mark.parametrize("kind", list(OPS))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("backend,shape", per_backend("linear_bias_gelu", SHAPES))
def test_against_reference(kind, dtype, backend, shape):
    x, w, b, r = _case(*shape, dtype, device_for(backend))
    out = _call(kind, x, w, b, r, backend)
    assert out.dtype == dtype and out.shape == (shape[0], shape[1])
    # the float64 reference of the same (rounded) inputs, rounded once to the dtype
    assert_close(out, OPS[kind][1](x, w, b, r).to(dtype), tol(dtype, backend))


@pytest.mark.parametrize("backend,shape", per_backend("linear_bias_gelu", {"cpu": [(3, 67, 40), (9, 67, 40)],
                                                                            "triton": [(3, 17, 40)]}))
def test_strided_3d_optional(backend, shape):
    """Strided x and weight (last-dim stride 2: copied), a 3-D x, no bias, no residual."""
    dev = device_for(backend)
    x, w, b, r = _case(*shape, torch.float32, dev, strided=True)
    t = tol(torch.float32, backend)
    assert_close(linear_bias_gelu(x, w, None, backend=backend),
                 F.gelu(F.linear(x.double(), w.double()), approximate="tanh"), t)
    assert_close(linear_bias_residual(x, w, backend=backend), F.linear(x.double(), w.double()), t)
    x3 = x.reshape(1, *x.shape)
    assert_close(linear_bias_residual(x3, w, b, r[None], backend=backend),
                 F.linear(x3.double(), w.double(), b.double()) + r.double()[None], t)
    assert linear_bias_gelu(x[:0], w, b, backend=backend).shape == (0, shape[1])


@pytest.mark.parametrize("m", [3, 9])
@pytest.mark.parametrize("backend", backends("linear_bias_gelu"))
def test_row_strides(backend, m):
    """weight and residual as column slices of wider tensors: row strides != K / N reach the kernels
    (ldw, ldr), both the GEMV rows path (3) and the GEMM (9)."""
    dev = device_for(backend)
    x, wide_w, b, _ = _case(m, 40, 83, torch.float32, dev)
    x, w, b = x[:, :76], wide_w[:33, :76], b[:33]  # weight rows 83 apart
    r = torch.randn(m, 50, device=dev)[:, :33]  # residual rows 50 apart
    assert w.stride(0) == 83 and r.stride(0) == 50
    assert_close(linear_bias_residual(x, w, b, r, backend=backend),
                 F.linear(x.double(), w.double(), b.double()) + r.double(), tol(torch.float32, backend))


@pytest.mark.parametrize("backend", backends("linear_bias_gelu"))
def test_nan_and_extremes(backend):
    """A NaN in x spoils exactly its row; huge pre-activations saturate the GELU (to v and 0),
    tiny ones stay accurate."""
    dev = device_for(backend)
    for scale in (1e-20, 1e4):
        x, w, b, r = _case(5, 33, 40, torch.float32, dev, scale=scale)
        b = b * scale
        ref = OPS["gelu"][1](x, w, b, r)
        assert_close(linear_bias_gelu(x, w, b, backend=backend), ref, tol(torch.float32, backend))
    x[2, 3] = float("nan")
    out = linear_bias_gelu(x, w, b, backend=backend)
    assert out[2].isnan().all() and not out[[0, 1, 3, 4]].isnan().any()


@pytest.mark.parametrize("shape", SHAPES["cpu"][:4])
def test_cpu_scalar_path(shape):
    with cpu_isa("scalar"):
        for kind in OPS:
            x, w, b, r = _case(*shape, torch.bfloat16, "cpu")
            assert_close(_call(kind, x, w, b, r, "cpu"), OPS[kind][1](x, w, b, r).to(torch.bfloat16), 1e-2)


def test_bad_input_names_the_argument():
    x, w, b, r = _case(3, 8, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"pyfast.linear_bias_gelu: expected weight shape \[N, 16\]"):
        linear_bias_gelu(x, w[:, :15], b)
    with pytest.raises(TypeError, match="pyfast.linear_bias_residual: expected bias dtype"):
        linear_bias_residual(x, w, b.double(), r)
    with pytest.raises(ValueError, match=r"expected residual shape \[3, 8\]"):
        linear_bias_residual(x, w, b, r[:2])
    with pytest.raises(ValueError, match=r"expected x.shape\[-1\] \(K\) >= 1"):
        linear_bias_gelu(x[:, :0], w[:, :0], b)
    with pytest.raises(ValueError, match="expected weight not to require grad"):
        linear_bias_gelu(x, w.requires_grad_(), b)
