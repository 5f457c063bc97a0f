"""decode_attention (dense decode over the cache) on every kernel backend (cpu, triton, cuda)
against the float64 reference (pyfast/reference/sparse.py): dtypes, GQA ratios, odd head dims,
per-sequence lengths, strided caches, NaN; then what only one backend has (the CPU's ISA paths
as a case parameter, the Triton launcher's split-K and length clamping); opcheck. Bad input:
tests/test_errors.py.

Each backend keeps its own shapes (the Triton interpreter is slow: small ones); data from
sparse_cases.py, backends, devices and tolerances from conftest.py."""

import contextlib
import functools

import pytest
import torch

import pyfast
from conftest import HAS_TRITON, backends, device_for, per_backend, tol
from pyfast._registry import REGISTRY
from pyfast.reference import sparse as ref
from pyfast.testing import assert_close, cpu_isa
from sparse_cases import CPU_SHAPES, CUDA_HEADS, DTYPE_IDS, DTYPES, make_cache, make_dense, make_query, problem, \
    seqlens, shape_id

if HAS_TRITON:
    from pyfast.kernels import sparse as ks

OP = "decode_attention"


def only(*names):
    """Parametrize `backend` over the named backends of the op (a backend-specific test)."""
    return pytest.mark.parametrize("backend", backends(OP, only=names))


# backend -> [(B, Hq, Hkv, Tmax, D, lengths, scale, CPU ISA)]
CASES = {
    "cpu": [(b, hkv * g, hkv, tmax, d, lengths, None, isa)
            for b, hkv, g, tmax, d, lengths in CPU_SHAPES for isa in ("auto", "scalar")],
    "triton": [
        (3, 4, 4, 50, 40, [50, 1, 23], None, None),  # MHA, D not a power of two
        (2, 6, 2, 37, 72, [37, 16], None, None),  # G = 3
        (2, 4, 1, 33, 16, [17, 33], None, None),  # MQA, G = 4
    ],
    # D = 59: no 16-byte rows (element loads, partial last chunk); 256: the largest bucket.
    # Tmax = 1100 splits each sequence over several CTAs (merge kernel).
    "cuda": [(3, hq, hkv, 300, d, [300, 1, 137], None, None) for hq, hkv in CUDA_HEADS for d in (64, 128, 72)]
    + [(2, 8, 2, 1100, d, [1100, 515], 0.3, None) for d in (40, 59, 96, 256)],
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("backend, case", per_backend(OP, CASES, ids=shape_id))
def test_matches_reference(backend, case, dtype):
    b, hq, hkv, tmax, d, lengths, scale, isa = case
    dev = device_for(backend)
    k, v, _, n = make_cache(b, hkv, tmax, d, dtype, lengths=lengths, device=dev)
    q = make_query(b, hq, d, dtype, device=dev)
    with cpu_isa(isa) if isa else contextlib.nullcontext():
        out = pyfast.decode_attention(q, k, v, n, scale=scale, backend=backend)
    assert out.dtype == dtype and out.shape == q.shape and out.device == q.device
    expected = ref.decode_attention(q.cpu(), k.cpu(), v.cpu(), n.cpu(), scale=scale)
    assert_close(out, expected, tol(dtype, backend), f"Hq={hq} Hkv={hkv} D={d} lengths={lengths}")


@pytest.mark.parametrize("backend", backends(OP))
def test_strided_inputs(backend):
    """Caches as views (token-major storage, a window of a longer buffer) and q with a non-unit
    last-dim stride (copied)."""
    dev = device_for(backend)
    b, hq, hkv, tmax, d = 2, 4, 2, 41, 40
    k = torch.randn(b, tmax + 9, hkv, d, device=dev).transpose(1, 2)[:, :, 4 : 4 + tmax]
    v = torch.randn(b, hkv, tmax, 2 * d, device=dev)[..., d:]
    q = torch.randn(b, d, hq, device=dev).transpose(1, 2)
    assert q.stride(-1) != 1 and not k.is_contiguous() and not v.is_contiguous()
    n = seqlens(41, 19, device=dev)
    out = pyfast.decode_attention(q, k, v, n, backend=backend)
    assert_close(out, ref.decode_attention(q, k, v, n), tol(torch.float32, backend))


@only("cpu", "cuda")  # Triton: test_strided_inputs (the interpreter is slow)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=DTYPE_IDS.get)
def test_strided_views(backend, dtype):
    dev = device_for(backend)
    b, hq, hkv, tmax, d = 2, 6, 2, 200, 64
    q, k, v, n, _ = problem(b, hq, hkv, tmax, d, dtype, [200, 77], seed=5)
    expected = ref.decode_attention(q, k, v, n)
    # [B, Tmax, Hkv, D] storage seen as [B, Hkv, Tmax, D] (the flash-attn cache layout); q a slice.
    kt, vt = (x.transpose(1, 2).contiguous().to(dev).transpose(1, 2) for x in (k, v))
    qs = torch.cat([q, q], dim=1).to(dev)[:, hq:]
    nd = n.to(dev)
    assert_close(pyfast.decode_attention(qs, kt, vt, nd, backend=backend), expected, tol(dtype, backend),
                 "transposed cache")
    # Rows of 65 elements: no row is 16-byte aligned -> element loads.
    pad = [torch.cat([x, x[..., :1]], dim=-1).to(dev)[..., :d] for x in (k, v)]
    assert pad[0].stride(2) == d + 1
    assert_close(pyfast.decode_attention(q.to(dev), *pad, nd, backend=backend), expected, tol(dtype, backend),
                 "unaligned rows")
    # Last dim not contiguous: copied by the host code.
    nc = [x.transpose(2, 3).contiguous().to(dev).transpose(2, 3) for x in (k, v)]
    assert_close(pyfast.decode_attention(q.to(dev), *nc, nd, backend=backend), expected, tol(dtype, backend),
                 "strided last dim")


# backend -> [(B, Hq, Hkv, Tmax, D, dtype, lengths, NaN at (b, head, d))]
NAN_CASES = {
    "cpu": [(1, 2, 1, 64, 16, torch.float32, [64], (0, 1, 3))],
    "triton": [(2, 6, 2, 40, 24, torch.float32, [40, 33], (0, 1, 5))],
    "cuda": [(2, 8, 2, 100, 64, torch.float16, [100, 40], (1, 5, 3))],
}


@pytest.mark.parametrize("backend, case", per_backend(OP, NAN_CASES, ids=shape_id))
def test_nan_query_stays_in_its_head(backend, case):
    b, hq, hkv, tmax, d, dtype, lengths, at = case
    dev = device_for(backend)
    q, k, v, n, _ = problem(b, hq, hkv, tmax, d, dtype, lengths, device=dev)
    q[at] = float("nan")
    out = pyfast.decode_attention(q, k, v, n, backend=backend)
    assert_close(out, ref.decode_attention(q.cpu(), k.cpu(), v.cpu(), n.cpu()), tol(dtype, backend))
    nan = torch.isnan(out.float()).any(-1).cpu()
    want = torch.zeros(b, hq, dtype=torch.bool)
    want[at[:2]] = True
    assert torch.equal(nan, want), f"NaN heads {nan.nonzero().tolist()}, expected {[list(at[:2])]}"
    assert torch.isnan(out[at[:2]]).all()


# ---------------------------------------------------------------------------------------------
# Triton: the launcher of kernels/sparse.py called directly (split-K, lengths clamped)
# ---------------------------------------------------------------------------------------------
@only("triton")
@pytest.mark.parametrize("num_splits", [1, 2, 3, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_triton_splits(backend, dtype, num_splits):
    """Split-K with a log-sum-exp merge; splits past a short sequence's end are empty."""
    dev = device_for(backend)
    q, k, v = make_dense(3, 6, 2, 100, 24, dtype, device=dev)
    n = seqlens(100, 5, 64, device=dev)
    out = ks.decode_attention(q, k, v, n, 0.3, num_splits=num_splits)
    assert_close(out, ref.decode_attention(q, k, v, n, scale=0.3), tol(dtype, backend))


@only("triton")
def test_triton_nan_query_split_k(backend):
    dev = device_for(backend)
    q, k, v, bk = make_dense(2, 6, 2, 40, 24, torch.float32, block_size=4, device=dev)
    q[0, 1, 5] = float("nan")
    n = seqlens(40, 33, device=dev)
    dense = ks.decode_attention(q, k, v, n, None, num_splits=3)
    assert_close(dense, ref.decode_attention(q, k, v, n), tol(torch.float32, backend))
    assert torch.isnan(dense[0, 1]).all() and torch.isfinite(dense[0, [0, 2, 3, 4, 5]]).all()


@only("triton", "cuda")
def test_kernel_lengths_are_clamped(backend):
    """Lengths outside [0, Tmax] (possible only during CUDA-graph capture) read nothing out of
    bounds: L > Tmax acts as Tmax, L <= 0 attends to nothing (NaN, like the reference).
    sparse_decode_attention: test_sparse_decode_attention.py."""
    dev = device_for(backend)
    tmax = 40
    q, k, v, bk = make_dense(3, 4, 2, tmax, 16, torch.float32, block_size=8, device=dev)
    n = seqlens(tmax + 7, -3, 0, device=dev)
    clamped = seqlens(tmax, 0, 0, device=dev)
    # The kernel itself (the rules would refuse n); Triton with 2 splits, one of them past Tmax.
    kernel = REGISTRY[OP].impls[backend] if backend == "cuda" else functools.partial(ks.decode_attention, num_splits=2)
    out = kernel(q, k, v, n, None)
    assert_close(out, ref.decode_attention(q, k, v, clamped), tol(torch.float32, backend))
    assert torch.isnan(out[1:]).all()


# ---------------------------------------------------------------------------------------------
# opcheck (torch.ops.pyfast.decode_attention with backend=...)
# ---------------------------------------------------------------------------------------------
# backend -> [(B, Hq, Hkv, Tmax, D, dtype, lengths, poisoned cache)]
OPCHECK_CASES = {
    "cpu": [(2, 4, 2, 40, 16, torch.float32, [40, 9], True)],
    "triton": [(2, 4, 2, 24, 16, torch.float32, [24, 9], False)],
    "cuda": [(2, 6, 2, 256, 64, torch.float16, [200, 33], False)],
}


@pytest.mark.parametrize("backend, case", per_backend(OP, OPCHECK_CASES, ids=shape_id))
def test_opcheck(backend, case):
    b, hq, hkv, tmax, d, dtype, lengths, poison = case
    q, k, v, n, _ = problem(b, hq, hkv, tmax, d, dtype, lengths, block_size=4, poison=poison, seed=23,
                            device=device_for(backend))
    for scale in (None, 0.5):
        torch.library.opcheck(torch.ops.pyfast.decode_attention.default, (q, k, v, n, scale), {"backend": backend})
