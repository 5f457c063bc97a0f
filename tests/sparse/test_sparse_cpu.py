"""CPU C++ kernels (torch.ops.pyfast.* on CPU tensors) against the reference, both ISA paths."""

import pytest
import torch

import pyfast
from pyfast.reference import sparse as ref
from pyfast.testing import assert_close, cpu_isa, rel_tol
from sparse_cases import DTYPES, make_cache, make_query

# (B, Hkv, G, Tmax, D, lengths): odd head dims, GQA ratios 1/3/4, lengths differing per sequence.
SHAPES = [
    (3, 2, 3, 100, 72, [100, 1, 37]),
    (1, 1, 1, 20, 64, [15]),
    (2, 3, 4, 300, 128, [300, 161]),
    (1, 2, 2, 1000, 40, [999]),
    (2, 1, 5, 64, 17, [64, 48]),
]


@pytest.fixture(params=["auto", "scalar"])
def isa(request):
    with cpu_isa(request.param):
        yield request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_decode_attention(shape, dtype, isa):
    b, hkv, g, tmax, d, lengths = shape
    k, v, _, n = make_cache(b, hkv, tmax, d, dtype, lengths=lengths)
    q = make_query(b, hkv * g, d, dtype)
    out = pyfast.decode_attention(q, k, v, n)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, ref.decode_attention(q, k, v, n), rel_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("budget", [(0, 1, 2), (3, 1, 2), (2, 0, 0), (1000, 1, 4), (4, 3, 0)])
def test_sparse_decode_attention(shape, dtype, budget, isa):
    b, hkv, g, tmax, d, lengths = shape
    topk, sink, local = budget
    k, v, bk, n = make_cache(b, hkv, tmax, d, dtype, lengths=lengths)
    q = make_query(b, hkv * g, d, dtype)
    opts = dict(block_size=16, topk=topk, sink_blocks=sink, local_blocks=local)
    out = pyfast.sparse_decode_attention(q, k, v, n, bk, **opts)
    mask = ref.kept_token_mask(q, bk, n, tmax, **opts)
    assert_close(out, ref.masked_decode_attention(q, k, v, mask), rel_tol(dtype))


def test_sparse_with_large_topk_equals_dense():
    k, v, bk, n = make_cache(2, 2, 200, 64, torch.float32, lengths=[200, 77])
    q = make_query(2, 8, 64, torch.float32)
    dense = pyfast.decode_attention(q, k, v, n)
    assert_close(pyfast.sparse_decode_attention(q, k, v, n, bk, topk=100), dense, 1e-6)


def test_other_block_sizes_scale_and_strided_views():
    k, v, bk, n = make_cache(2, 2, 90, 32, torch.float32, lengths=[90, 41], block_size=5)
    big_q = make_query(2, 8, 64, torch.float32)
    q = big_q[:, :, ::2]  # strided: last-dim stride 2 (copied), batch/head strides arbitrary
    kt, vt = k.transpose(1, 2).contiguous().transpose(1, 2), v[:, :, :, :]  # head/time strides permuted
    opts = dict(block_size=5, topk=3, sink_blocks=1, local_blocks=1, scale=0.3)
    out = pyfast.sparse_decode_attention(q, kt, vt, n, bk, **opts)
    assert_close(out, ref.sparse_decode_attention(q, k, v, n, bk, **opts), 1e-5)
    assert_close(pyfast.decode_attention(q, kt, vt, n, scale=0.3), ref.decode_attention(q, k, v, n, scale=0.3), 1e-5)


def test_nan_in_query_gives_nan():
    k, v, bk, n = make_cache(1, 1, 64, 16, torch.float32, lengths=[64])
    q = make_query(1, 2, 16, torch.float32)
    q[0, 1, 3] = float("nan")
    out = pyfast.decode_attention(q, k, v, n)
    assert torch.isnan(out[0, 1]).all() and not torch.isnan(out[0, 0]).any()
    # The group's mean query is NaN, so every block score is: the selection falls back to the lowest
    # candidate (NaN ties go low), head 0 still gets a finite answer, head 1 NaN, as the reference.
    opts = dict(topk=1, sink_blocks=1, local_blocks=0)  # candidates: blocks 1, 2, 3
    out = pyfast.sparse_decode_attention(q, k, v, n, bk, **opts)
    assert_close(out, ref.sparse_decode_attention(q, k, v, n, bk, **opts), 1e-5)
    mask = ref.kept_token_mask(q, bk, n, 64, **opts)[0, 0]
    assert mask[:32].all() and not mask[32:].any()
    assert torch.isnan(out[0, 1]).all() and not torch.isnan(out[0, 0]).any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_append_kv_matches_reference(dtype):
    b, hkv, tmax, d, bs = 3, 2, 50, 24, 8
    gen = torch.Generator().manual_seed(3)
    state = [torch.randn(b, hkv, tmax, d, generator=gen).to(dtype) for _ in range(2)]
    state += [torch.randn(b, hkv, tmax // bs, d, generator=gen).to(dtype), torch.tensor([0, 5, 7], dtype=torch.int32)]
    expect = [t.clone() for t in state]
    for tn in (1, 9, 1, 16, 0, 3):  # decode steps and chunks that cross block boundaries
        kn = torch.randn(b, hkv, tn, d, generator=gen).to(dtype)
        vn = torch.randn(b, hkv, tn, d, generator=gen).to(dtype)
        pyfast.append_kv(*state, kn, vn, block_size=bs)
        ref.append_kv(*expect, kn, vn, block_size=bs)
    for got, want, name in zip(state, expect, ("k_cache", "v_cache", "block_keys", "cache_seqlens")):
        assert torch.equal(got, want), name


def test_opcheck():
    k, v, bk, n = make_cache(2, 2, 40, 16, torch.float32, lengths=[40, 9], block_size=4)
    q = make_query(2, 4, 16, torch.float32)
    torch.library.opcheck(torch.ops.pyfast.decode_attention.default, (q, k, v, n, None))
    torch.library.opcheck(torch.ops.pyfast.sparse_decode_attention.default, (q, k, v, n, bk, 4, 2, 1, 1, 0.5))
    kc, vc, bkc, nc = (t.clone() for t in (k, v, bk, torch.tensor([3, 30], dtype=torch.int32)))
    kc.nan_to_num_(), vc.nan_to_num_(), bkc.nan_to_num_()
    kn = torch.randn(2, 2, 5, 16)
    torch.library.opcheck(torch.ops.pyfast.append_kv.default, (kc, vc, bkc, nc, kn, kn.clone(), 4))


def test_compile_fullgraph():
    k, v, bk, n = make_cache(1, 2, 64, 16, torch.float32, lengths=[50])
    q = make_query(1, 4, 16, torch.float32)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(q):
        return pyfast.sparse_decode_attention(q, k, v, n, bk, topk=1) + pyfast.decode_attention(q, k, v, n)

    expect = pyfast.sparse_decode_attention(q, k, v, n, bk, topk=1) + pyfast.decode_attention(q, k, v, n)
    assert_close(step(q), expect, 1e-6)
