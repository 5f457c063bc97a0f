"""cherryq_matmul on every kernel backend (cpu, triton, cuda) against the float64 reference:
values, shapes, dtypes, strides, bias, cherries, NaN; then what only one backend has (CPU ISA
paths, the Triton GEMV/GEMM launchers and split-K, CUDA alignment); autograd, opcheck and
torch.compile. Bad input: tests/test_errors.py.

Each backend gets its own shapes where they differ (the Triton interpreter is slow: small ones);
the data comes from cherryq_cases.py, the backend list, devices and tolerances from conftest.py."""

import dataclasses

import pytest
import torch

import pyfast
from cherryq_cases import DTYPE_IDS, DTYPES, expected, make_bias, make_weight, make_x, raw_matmul
from conftest import HAS_TRITON, backends, device_for, per_backend, tol
from pyfast._registry import REGISTRY
from pyfast.reference.cherryq import matmul as ref_matmul
from pyfast.testing import assert_close, cpu_isa, rel_tol

if HAS_TRITON:
    from pyfast.kernels.cherryq import cherryq_gemm_triton, cherryq_gemv_triton, cherryq_matmul_triton

OP = "cherryq_matmul"


def only(*names):
    """Parametrize `backend` over the named backends of the op (a backend-specific test)."""
    return pytest.mark.parametrize("backend", backends(OP, only=names))


all_backends = pytest.mark.parametrize("backend", backends(OP))


# ---------------------------------------------------------------------------------------------
# Every backend against the reference
# ---------------------------------------------------------------------------------------------
# backend -> (bits, group_size) -> [(M, N, K, x row-strided, with bias)]. N odd: the last tile is
# partial everywhere. CUDA: M = 13 is one block of 8 rows of x and a block of 5, K = 4096 stages x
# in chunks. Triton: small K (interpreter).
MATMUL_SHAPES = {
    "cpu": lambda bits, gs: [(m, 67, 3 * gs, False, True) for m in (1, 3, 8, 9, 33)],
    "triton": lambda bits, gs: [(m, 33, 256 if (bits + m) % 2 else 128, False, m != 3) for m in (1, 3, 8, 17)],
    "cuda": lambda bits, gs: [(m, 257, k, m % 2 == 1, m != 8) for k in (128, 384, 4096) for m in (1, 3, 8, 13)],
}


def _matmul_params():
    params = []
    for b in backends(OP):
        backend = b.values[0]
        for bits in (2, 3, 4):
            for gs in (64, 128):
                for dtype in DTYPES:
                    for shape in MATMUL_SHAPES[backend](bits, gs):
                        m, n, k, strided, with_bias = shape
                        name = f"{b.id}-b{bits}-g{gs}-{DTYPE_IDS[dtype]}-m{m}-n{n}-k{k}"
                        name += ("-strided" if strided else "") + ("" if with_bias else "-nobias")
                        params.append(pytest.param(backend, bits, gs, dtype, shape, marks=b.marks, id=name))
    return params


@pytest.mark.parametrize("backend, bits, group_size, dtype, shape", _matmul_params())
def test_matches_reference(backend, bits, group_size, dtype, shape):
    m, n, k, strided, with_bias = shape
    dev = device_for(backend)
    qw = make_weight(n, k, bits, group_size, seed=m, device=dev)  # default cherries: ceil(K / 256) per row
    x = make_x(m, k, dtype, strided=strided, device=dev)
    if strided:
        assert x.stride() == (k + 24, 1)
    bias = make_bias(n, dtype, dev) if with_bias else None
    out = pyfast.cherryq_matmul(x, qw, bias, backend=backend)
    assert out.dtype == dtype and out.shape == (m, n) and out.device == x.device
    assert_close(out, expected(x, qw, bias), tol(dtype, backend), f"bits={bits} gs={group_size} M={m} N={n} K={k}")


@all_backends
@pytest.mark.parametrize("group_size", [32, 256])
@pytest.mark.parametrize("m", [1, 5, 11])
def test_other_group_sizes(backend, group_size, m):
    dev = device_for(backend)
    qw = make_weight(19, 2 * group_size, 3, group_size, device=dev)
    x = torch.randn(m, 2 * group_size, device=dev)
    assert_close(pyfast.cherryq_matmul(x, qw, backend=backend), expected(x, qw), tol(torch.float32, backend))


@all_backends
@pytest.mark.parametrize("cherries", [0, 1, 5])
@pytest.mark.parametrize("m", [2, 12])
def test_cherries_counted_once(backend, cherries, m):
    dev = device_for(backend)
    qw = make_weight(16, 256, 3, 128, cherries=cherries, device=dev)
    x = torch.randn(m, 256, device=dev)
    w = pyfast.cherryq_dequantize(qw).double()
    out = pyfast.cherryq_matmul(x, qw, backend=backend)
    assert_close(out, (x.double() @ w.T).float(), tol(torch.float32, backend))


@all_backends
def test_batched_and_strided_input(backend):
    dev = device_for(backend)
    qw = make_weight(40, 256, 4, 64, device=dev)
    x = torch.randn(2, 3, 512, device=dev)[..., ::2]  # non-unit stride in the last dim
    assert not x.is_contiguous()
    out = pyfast.cherryq_matmul(x, qw, backend=backend)
    assert out.shape == (2, 3, 40)
    assert_close(out, expected(x, qw), tol(torch.float32, backend))
    xt = torch.randn(256, 5, device=dev).t()  # transposed view
    assert_close(pyfast.cherryq_matmul(xt, qw, backend=backend), expected(xt, qw), tol(torch.float32, backend))


@all_backends
@pytest.mark.parametrize("m", [1, 3, 17])
def test_strided_x(backend, m):
    dev = device_for(backend)
    k = 128
    wide = torch.randn(m, 2 * k + 7, device=dev).to(torch.bfloat16)
    x = wide[:, 5 : 5 + k]  # row stride 2K+7, unit last-dim stride: used in place
    qw = make_weight(33, k, 3, 128, seed=5, device=dev)
    assert x.stride() == (2 * k + 7, 1)
    out = pyfast.cherryq_matmul(x, qw, backend=backend)
    assert_close(out, expected(x, qw), tol(torch.bfloat16, backend))
    xt = torch.randn(k, m, device=dev).t()  # last-dim stride != 1: copied
    assert_close(pyfast.cherryq_matmul(xt, qw, backend=backend), expected(xt, qw), tol(torch.float32, backend))


@only("cpu", "cuda")  # K = 12352 is too long for the Triton interpreter
def test_batch_dims_and_long_rows(backend):
    # [..., K] input; K large enough that x is staged in several chunks (CUDA) even at M = 1.
    dev = device_for(backend)
    k = 12288 + 64
    qw = make_weight(33, k, 3, 64, seed=3, device=dev)
    x = torch.randn(2, 3, k, device=dev)
    out = pyfast.cherryq_matmul(x, qw, backend=backend)
    assert out.shape == (2, 3, 33)
    assert_close(out, expected(x, qw), tol(x.dtype, backend), "3-D x")
    assert_close(pyfast.cherryq_matmul(x[0, :1], qw, backend=backend), expected(x[0, :1], qw), tol(x.dtype, backend),
                 "M=1")


# backend -> [(M, dtype, N, K, bits, group_size)]
NAN_CASES = {
    "cpu": [(m, torch.float32, 24, 128, 3, 64) for m in (1, 4, 12)],
    "triton": [(m, dtype, 33, 128, 3, 64) for dtype in (torch.float32, torch.bfloat16) for m in (2, 9)],
    "cuda": [(4, dtype, 257, 384, 4, 128) for dtype in (torch.float32, torch.bfloat16)],
}


@pytest.mark.parametrize("backend, case", per_backend(OP, NAN_CASES, ids=lambda c: f"m{c[0]}-{DTYPE_IDS[c[1]]}"))
def test_nan_row_stays_in_its_row(backend, case):
    m, dtype, n, k, bits, gs = case
    dev = device_for(backend)
    qw = make_weight(n, k, bits, gs, seed=6, device=dev)
    x = torch.randn(m, k, device=dev).to(dtype)
    row = m // 2
    x[row, 77] = float("nan")
    out = pyfast.cherryq_matmul(x, qw, torch.randn(n, device=dev), backend=backend)
    assert torch.isnan(out[row]).all(), "NaN in x must make the whole output row NaN"
    rows = [i for i in range(m) if i != row]
    assert torch.isfinite(out[rows]).all(), "NaN leaked into other rows"


@all_backends
def test_empty_input(backend):  # bad input: tests/test_errors.py (every op, every entry point)
    dev = device_for(backend)
    qw = make_weight(33, 128, 4, 64, seed=7, device=dev)
    out = pyfast.cherryq_matmul(torch.randn(0, 128, device=dev), qw, backend=backend)
    assert out.shape == (0, 33)


# ---------------------------------------------------------------------------------------------
# CPU: every ISA path
# ---------------------------------------------------------------------------------------------
@only("cpu")
@pytest.mark.parametrize("isa", ["scalar", "avx512", "avx512_vnni"])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("m", [1, 2, 6, 10])
@pytest.mark.parametrize("group_size", [64, 128, 256])
def test_cpu_isa_paths(backend, isa, bits, m, group_size):
    """Every CPU code path, whatever this machine picks by default (the portable one runs on
    CPUs without AVX-512)."""
    have = pyfast.build_info()["cpu_isa"]
    if isa == "avx512" and not have.startswith("avx512") or isa == "avx512_vnni" and have != "avx512_vnni":
        pytest.skip(f"CPU without {isa}")
    k = 3 * group_size
    qw = make_weight(21, k, bits, group_size, cherries=2)
    x, bias = torch.randn(m, k) * torch.logspace(-3, 3, k), torch.randn(21)  # wide dynamic range in x
    x[0, 5] = 0.0
    with cpu_isa(isa):
        out = pyfast.cherryq_matmul(x, qw, bias, backend=backend)
        x_nan = x.clone()
        x_nan[-1, 7] = float("nan")  # NaN in a row: NaN out in that row only (VNNI falls back)
        out_nan = pyfast.cherryq_matmul(x_nan, qw, bias, backend=backend)
    assert_close(out, ref_matmul(x, qw, bias), 1e-5)
    assert torch.isnan(out_nan[-1]).all() and not torch.isnan(out_nan[:-1]).any()


@only("cpu")
@pytest.mark.parametrize("groups", [16, 19, 35])
@pytest.mark.parametrize("m", [1, 2])
def test_cpu_vnni_many_groups(backend, groups, m):
    """The VNNI GEMV converts scales 16 groups at a time: full blocks and a partial tail."""
    if pyfast.build_info()["cpu_isa"] != "avx512_vnni":
        pytest.skip("CPU without avx512_vnni")
    k = 64 * groups
    qw = make_weight(13, k, 3, 64, seed=groups)
    x, bias = torch.randn(m, k), torch.randn(13)
    with cpu_isa("avx512_vnni"):
        out = pyfast.cherryq_matmul(x, qw, bias, backend=backend)
    assert_close(out, ref_matmul(x, qw, bias), 1e-5)


@only("cpu")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("group_size", [64, 128, 256])
def test_cpu_vnni_half_x(backend, dtype, bits, m, group_size):
    """fp16/bf16 x through the VNNI path (x split into int8 digit planes): within the dtype's
    tolerance of the reference and within one ulp of the fp32 kernel, outputs with cancellation
    included (x spans four decades, so a coarse split of x would show)."""
    if pyfast.build_info()["cpu_isa"] != "avx512_vnni":
        pytest.skip("CPU without avx512_vnni")
    k = 3 * group_size
    qw = make_weight(37, k, bits, group_size, cherries=2, seed=bits)
    x = (torch.randn(m, k) * torch.logspace(-2, 2, k)).to(dtype)
    bias = torch.randn(37).to(dtype)
    ref = ref_matmul(x, qw, bias)
    with cpu_isa("avx512_vnni"):
        out = pyfast.cherryq_matmul(x, qw, bias, backend=backend)
    with cpu_isa("avx512"):
        exact = pyfast.cherryq_matmul(x, qw, bias, backend=backend)  # fp32 kernel, fp32 accumulation
    assert_close(out, ref, rel_tol(dtype))
    # Each output within one unit in the last place of the fp32 kernel's (both err far below half
    # a unit before the final rounding, so only some roundings differ).
    big = torch.maximum(out.float().abs(), exact.float().abs()).clamp_min(torch.finfo(dtype).tiny)
    ulp = torch.exp2(torch.floor(torch.log2(big)) - {torch.float16: 10, torch.bfloat16: 7}[dtype])
    assert ((out.float() - exact.float()).abs() <= ulp).all()


# ---------------------------------------------------------------------------------------------
# Triton: the launchers of kernels/cherryq.py called directly (split-K GEMV, tensor-core GEMM)
# ---------------------------------------------------------------------------------------------
N = 33  # odd: the last N tile is partial in every kernel


@only("triton")
@pytest.mark.parametrize("cherries", [0, None, 12], ids=["none", "default", "many"])
@pytest.mark.parametrize("kernel", ["gemv", "gemm"])
def test_triton_kernel_cherries(backend, kernel, cherries):
    dev = device_for(backend)
    qw = make_weight(N, 256, 3, 64, cherries=cherries, seed=1, device=dev)
    assert qw.cherry_idx.shape == (N, {0: 0, None: 1, 12: 12}[cherries])
    x = torch.randn(5, 256, device=dev)
    bias = torch.randn(N, device=dev)
    fn, kw = (cherryq_gemv_triton, {"split_k": 3}) if kernel == "gemv" else (cherryq_gemm_triton, {})
    assert_close(raw_matmul(x, qw, bias, fn=fn, **kw), expected(x, qw, bias), tol(torch.float32, backend))


@only("triton")
@pytest.mark.parametrize("kernel", ["gemv", "gemm"])
def test_triton_kernel_out_of_range_cherries_are_skipped(backend, kernel):
    """Cherry indices outside [0, K) add nothing and are never dereferenced."""
    dev = device_for(backend)
    k = 128
    qw = make_weight(N, k, 4, 64, cherries=2, seed=2, device=dev)
    bad = torch.tensor([-(2**31), -1, k, k + 1, 2**31 - 1], dtype=torch.int32, device=dev)
    idx = torch.cat([qw.cherry_idx, bad.expand(N, -1)], dim=1).contiguous()
    val = torch.cat([qw.cherry_val, torch.full((N, bad.numel()), 1e4, dtype=torch.float16, device=dev)], 1)
    x = torch.randn(4, k, device=dev)
    fn = cherryq_gemv_triton if kernel == "gemv" else cherryq_gemm_triton
    out = fn(x, qw.qweight, qw.scales, qw.zeros, idx, val.contiguous(), None, qw.bits, qw.group_size)
    assert_close(out, expected(x, qw), tol(torch.float32, backend))


@only("triton")
@pytest.mark.parametrize("split_k", [1, 2, 3, 4])
def test_triton_gemv_split_k(backend, split_k):
    """Every split count (also uneven ones: 4 groups in 3 splits -> 2 splits of 2) gives the same
    result; split_k > 1 goes through the fp32 workspace and the reduction kernel."""
    dev = device_for(backend)
    qw = make_weight(N, 256, 2, 64, cherries=6, seed=3, device=dev)
    x = torch.randn(3, 256, device=dev).to(torch.float16)
    bias = torch.randn(N, device=dev)
    out = raw_matmul(x, qw, bias, fn=cherryq_gemv_triton, split_k=split_k)
    assert_close(out, expected(x, qw, bias), tol(torch.float16, backend))


@only("triton")
@pytest.mark.parametrize("m", [8, 12])
def test_triton_gemv_and_gemm_agree_across_the_dispatch_boundary(backend, m):
    dev = device_for(backend)
    qw = make_weight(N, 128, 4, 128, seed=4, device=dev)
    x = torch.randn(m, 128, device=dev)
    ref = expected(x, qw)
    assert_close(raw_matmul(x, qw, fn=cherryq_gemv_triton), ref, tol(torch.float32, backend), "gemv")
    assert_close(raw_matmul(x, qw, fn=cherryq_gemm_triton), ref, tol(torch.float32, backend), "gemm")
    assert_close(raw_matmul(x, qw, fn=cherryq_matmul_triton), ref, tol(torch.float32, backend), "dispatcher")


# ---------------------------------------------------------------------------------------------
# CUDA: alignment and out-of-range cherries in the CUDA C++ kernel
# ---------------------------------------------------------------------------------------------
@only("cuda")
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_cuda_unaligned_rows_and_mixed_bias_dtype(backend, bits):
    # K % 128 != 0: 3-bit rows (and 2-bit rows when K % 64 != 0) are not 16-byte aligned and end in
    # a partial tile; a qweight view at an odd offset is misaligned for every bit width.
    k, dev = 32 * 13, device_for(backend)
    qw = make_weight(257, k, bits, 32, seed=2, device=dev)
    buf = torch.empty(qw.qweight.numel() + 1, dtype=torch.int32, device=dev)
    shifted = buf[1:].view_as(qw.qweight)
    shifted.copy_(qw.qweight)
    x = torch.randn(5, k, dtype=torch.bfloat16, device=dev)
    bias = torch.randn(257, device=dev)  # float32 bias with bfloat16 x
    ref = expected(x, qw, bias)
    assert_close(raw_matmul(x, qw, bias, backend=backend), ref, tol(x.dtype, backend), "aligned base")
    assert_close(raw_matmul(x, dataclasses.replace(qw, qweight=shifted), bias, backend=backend), ref,
                 tol(x.dtype, backend), "misaligned base")


@only("cuda")
def test_cuda_cherry_indices_out_of_range_are_skipped(backend):
    k, n = 384, 257
    qw_cpu = make_weight(n, k, 4, 64, seed=4, cherries=4)
    bad, val = qw_cpu.cherry_idx.clone(), qw_cpu.cherry_val.clone()
    for row, c, v in ((0, 1, -5), (5, 3, k), (256, 0, 2**31 - 1)):
        col = int(bad[row, c])
        val[row, c] = qw_cpu.zeros[row, col // 64]  # a skipped cherry leaves the code-0 value zeros[g]
        bad[row, c] = v
    x = torch.randn(3, k)
    # The kernel itself (the rules reject such indices in eager mode; under CUDA-graph capture they
    # cannot read them, and the kernel must skip them), as the Triton test calls its launchers.
    kernel = REGISTRY[OP].impls[backend]
    dev = device_for(backend)
    out = raw_matmul(x.to(dev), dataclasses.replace(qw_cpu, cherry_idx=bad).to(dev), fn=kernel)
    assert_close(out, expected(x, dataclasses.replace(qw_cpu, cherry_val=val)), tol(x.dtype, backend), "bad cherry idx")


# ---------------------------------------------------------------------------------------------
# Default dispatch, autograd, opcheck, torch.compile, rules re-checked
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("m", [3, 13])  # on CUDA: the GEMV (<= 8 rows) and the GEMM above
def test_reference_backend_and_default_dispatch(device, m):
    qw = make_weight(24, 128, 2, 64, device=device)
    x = torch.randn(m, 128, device=device)
    r = pyfast.cherryq_matmul(x, qw, backend="reference")
    t = tol(torch.float32, "cuda" if device == "cuda" else "cpu")
    assert_close(pyfast.cherryq_matmul(x, qw), r, t)
    assert_close(torch.ops.pyfast.cherryq_matmul(x, *qw.tensors(), None, qw.bits, qw.group_size), r, t)


def test_grad_wrt_x():
    qw = make_weight(24, 128, 3, 64)
    x = torch.randn(5, 128, requires_grad=True)
    g = torch.randn(5, 24)
    (pyfast.cherryq_matmul(x, qw) * g).sum().backward()
    w = pyfast.cherryq_dequantize(qw)
    assert_close(x.grad, g @ w, 1e-5)


@pytest.mark.parametrize("m", [1, 12])
def test_opcheck(m):
    qw = make_weight(24, 128, 3, 64)
    x = torch.randn(m, 128, requires_grad=True)
    torch.library.opcheck(torch.ops.pyfast.cherryq_matmul.default, (x, *qw.tensors(), torch.randn(24), 3, 64))


def test_torch_compile_fullgraph():
    lin = pyfast.CherryQLinear.from_linear(torch.nn.Linear(128, 24), bits=4)
    x = torch.randn(3, 128)
    compiled = torch.compile(lin, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x), lin(x), 1e-6)


def test_weight_rules_see_changes_after_a_call():
    """The weight's rules run on every call: a tensor replaced or edited in place after a call that
    passed is checked again (the data rules remember a checked weight only until it changes)."""
    qw = make_weight(16, 256, 3, 128, cherries=2)
    x = torch.randn(1, 256)
    pyfast.cherryq_matmul(x, qw)
    qw.zeros = qw.zeros[:, :1]
    with pytest.raises(ValueError, match="zeros"):
        pyfast.cherryq_matmul(x, qw)
    qw = make_weight(16, 256, 3, 128, cherries=2)
    pyfast.cherryq_matmul(x, qw)
    qw.cherry_idx[3, 1] = 10**6  # in place: the remembered check no longer holds
    with pytest.raises(ValueError, match="cherry_idx"):
        pyfast.cherryq_matmul(x, qw)


def test_weights_made_under_inference_mode():
    """Inference tensors keep no version counter: the weight's data rules still run (and are
    remembered) for a weight quantized, and used, under torch.inference_mode()."""
    with torch.inference_mode():
        qw = pyfast.cherryq_quantize(torch.randn(64, 128), bits=3, group_size=32, cherries_per_row=2)
        x = torch.randn(2, 128)
        y = pyfast.cherryq_matmul(x, qw)
    assert_close(y, ref_matmul(x, qw), 1e-5)
    x2 = torch.randn(2, 128)  # outside inference mode too
    assert_close(pyfast.cherryq_matmul(x2, qw), ref_matmul(x2, qw), 1e-5)
    with torch.inference_mode():
        bad = pyfast.CherryQWeight(qw.qweight, qw.scales, qw.zeros, qw.cherry_idx.flip(1).contiguous(),
                                   qw.cherry_val, qw.bits, qw.group_size)
        with pytest.raises(ValueError, match="cherry_idx"):
            pyfast.cherryq_matmul(x, bad)
