"""CUDA C++ kernel of torch.ops.pyfast.cherryq_matmul (batched dequant-GEMV) against the reference.

y[..., N] = x[..., K] @ dequantize(W).T + bias; the reference runs in float64 on the CPU.
Skipped without a GPU.
"""

import dataclasses

import pytest
import torch

def pyfast_cuda_kernels() -> bool:
    import pyfast

    return bool(pyfast.build_info()["cuda"])


pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not pyfast_cuda_kernels(), reason="needs a CUDA device and a build with the CUDA kernels"
)

N = 257  # odd: the last thread group of the last block has rows past N


def _op():
    import pyfast  # noqa: F401  (imported lazily: loads the extension that registers torch.ops.pyfast)

    try:
        import pyfast._C  # noqa: F401
    except ImportError:
        pass
    return torch.ops.pyfast.cherryq_matmul


def _quantize(n, k, bits, group_size, seed=0, **kw):
    from pyfast.cherryq.quantize import cherryq_quantize

    g = torch.Generator().manual_seed(seed)
    return cherryq_quantize(torch.randn(n, k, generator=g), bits=bits, group_size=group_size, **kw)


def _reference(x, qw_cpu, bias=None):
    from pyfast.reference.cherryq import matmul

    return matmul(x.float().cpu(), qw_cpu, None if bias is None else bias.float().cpu())


def _run(x, qw, bias=None):
    return _op()(x, *qw.tensors(), bias, qw.bits, qw.group_size)


def _check(out, ref, dtype, what):
    from pyfast.testing import assert_close, rel_tol

    assert_close(out, ref, rel_tol(dtype, "cuda"), what)  # fp32: 3e-4, fp16/bf16: 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("K", [128, 384, 4096])
@pytest.mark.parametrize("group_size", [64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_matches_reference(bits, group_size, K, dtype):
    qw_cpu = _quantize(N, K, bits, group_size)
    qw = qw_cpu.to("cuda")
    g = torch.Generator().manual_seed(1)
    for M in (1, 3, 8, 13):  # 13 = one block of 8 rows of x + a block of 5
        strided = M % 2 == 1
        if strided:  # a column slice of a wider tensor: rows are strided, the last dim contiguous
            x = torch.randn(M, K + 24, generator=g)[:, 8 : 8 + K].to(dtype).cuda()
        else:
            x = torch.randn(M, K, generator=g).to(dtype).cuda()
        bias = torch.randn(N, generator=g).to(dtype).cuda() if M != 8 else None
        out = _run(x, qw, bias)
        assert out.dtype == dtype and out.shape == (M, N)
        _check(out, _reference(x, qw_cpu, bias), dtype, f"bits={bits} gs={group_size} K={K} M={M} {dtype}")


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_unaligned_rows_and_mixed_bias_dtype(bits):
    # K % 128 != 0: 3-bit rows (and 2-bit rows when K % 64 != 0) are not 16-byte aligned and end in
    # a partial tile; a qweight view at an odd offset is misaligned for every bit width.
    K = 32 * 13
    qw_cpu = _quantize(N, K, bits, 32, seed=2)
    qw = qw_cpu.to("cuda")
    buf = torch.empty(qw.qweight.numel() + 1, dtype=torch.int32, device="cuda")
    shifted = buf[1:].view_as(qw.qweight)
    shifted.copy_(qw.qweight)
    x = torch.randn(5, K, dtype=torch.bfloat16, device="cuda")
    bias = torch.randn(N, device="cuda")  # float32 bias with bfloat16 x
    ref = _reference(x, qw_cpu, bias)
    _check(_run(x, qw, bias), ref, x.dtype, "aligned base")
    _check(_run(x, dataclasses.replace(qw, qweight=shifted), bias), ref, x.dtype, "misaligned base")


def test_batch_dims_and_long_rows():
    # [..., K] input; K large enough that x is staged in several chunks even at M = 1.
    K = 12288 + 64
    qw_cpu = _quantize(33, K, 3, 64, seed=3)
    x = torch.randn(2, 3, K, device="cuda")
    out = _run(x, qw_cpu.to("cuda"))
    assert out.shape == (2, 3, 33)
    _check(out, _reference(x, qw_cpu), x.dtype, "3-D x")
    _check(_run(x[0, :1], qw_cpu.to("cuda")), _reference(x[0, :1], qw_cpu), x.dtype, "M=1")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_stays_in_its_row(dtype):
    qw = _quantize(N, 384, 4, 128).to("cuda")
    x = torch.randn(4, 384, device="cuda").to(dtype)
    x[2, 100] = float("nan")
    nan = torch.isnan(_run(x, qw).float())
    assert nan[2].all(), "NaN in x[2] must make the whole output row NaN"
    assert not nan[[0, 1, 3]].any(), "NaN leaked into other rows"


def test_cherry_indices_out_of_range_are_skipped():
    K = 384
    qw_cpu = _quantize(N, K, 4, 64, seed=4, cherries_per_row=4)
    bad, val = qw_cpu.cherry_idx.clone(), qw_cpu.cherry_val.clone()
    for n, c, v in ((0, 1, -5), (5, 3, K), (256, 0, 2**31 - 1)):
        col = int(bad[n, c])
        val[n, c] = qw_cpu.zeros[n, col // 64]  # a skipped cherry leaves the code-0 value zeros[g]
        bad[n, c] = v
    x = torch.randn(3, K)
    out = _run(x.cuda(), dataclasses.replace(qw_cpu, cherry_idx=bad).to("cuda"))
    _check(out, _reference(x, dataclasses.replace(qw_cpu, cherry_val=val)), x.dtype, "bad cherry idx")
