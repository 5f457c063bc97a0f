"""CUDA C++ kernels of append_kv, decode_attention and sparse_decode_attention (backend="cuda")
against the float64 reference (pyfast/reference/sparse.py), plus opcheck and CUDA-graph capture.

Layouts: caches [B, Hkv, Tmax, D], cache_seqlens int32 [B], block_keys [B, Hkv, Tmax // bs, D],
q [B, Hq, D]. The reference runs on CPU copies. Skipped without a GPU.
"""

import pytest
import torch

import pyfast
from pyfast.reference import sparse as ref
from pyfast.testing import assert_close, rel_tol

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not pyfast.build_info()["cuda"], reason="needs a build with the CUDA kernels"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HEADS = [(4, 4), (6, 2), (8, 2), (12, 1)]  # (Hq, Hkv): G = 1, 3, 4 and 12 (> 8 heads: two head chunks)


def _randn(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def _block_means(k: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean of every block slot of k [B, H, Tmax, D] -> [B, H, Tmax // bs, D] (float64 mean, cast)."""
    b, h, tmax, d = k.shape
    nb = tmax // block_size
    return k[:, :, : nb * block_size].double().reshape(b, h, nb, block_size, d).mean(3).to(k.dtype)


def _problem(b, hq, hkv, tmax, d, dtype, lengths, block_size=16, seed=0, poison=True):
    """CPU tensors q, k, v, seqlens, block_keys (block keys = the block means append_kv keeps).
    With `poison`, tokens and block keys past each length are NaN: a kernel that reads them fails."""
    k = _randn(b, hkv, tmax, d, dtype=dtype, seed=seed)
    v = _randn(b, hkv, tmax, d, dtype=dtype, seed=seed + 1)
    q = _randn(b, hq, d, dtype=dtype, seed=seed + 2)
    n = torch.tensor(lengths, dtype=torch.int32)
    bk = _block_means(k, block_size)
    if poison:
        for i, length in enumerate(lengths):
            k[i, :, length:] = float("nan")
            v[i, :, length:] = float("nan")
            bk[i, :, length // block_size :] = float("nan")
    return q, k, v, n, bk


def _cuda(*ts):
    return [t.cuda() for t in ts]


def _check(out, expected, dtype, what):
    assert out.dtype == dtype and out.is_cuda
    assert_close(out, expected, rel_tol(dtype, "cuda"), what)  # fp32: 3e-4, fp16/bf16: 1e-2


# ---------------------------------------------------------------------------------------------
# decode_attention
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 128, 72])
@pytest.mark.parametrize("heads", HEADS)
def test_decode_matches_reference(heads, D, dtype):
    hq, hkv = heads
    q, k, v, n, _ = _problem(3, hq, hkv, 300, D, dtype, [300, 1, 137])
    out = pyfast.decode_attention(*_cuda(q, k, v, n), backend="cuda")
    _check(out, ref.decode_attention(q, k, v, n), dtype, f"Hq={hq} Hkv={hkv} D={D}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [40, 59, 96, 256])
def test_decode_odd_head_dims_and_long_sequences(D, dtype):
    # D = 59: no 16-byte rows (element loads, partial last chunk); 256: the largest bucket.
    # Tmax = 1100 splits each sequence over several CTAs (merge kernel); lengths differ.
    q, k, v, n, _ = _problem(2, 8, 2, 1100, D, dtype, [1100, 515], seed=3)
    out = pyfast.decode_attention(*_cuda(q, k, v, n), scale=0.3, backend="cuda")
    _check(out, ref.decode_attention(q, k, v, n, scale=0.3), dtype, f"D={D}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_decode_strided_views(dtype):
    b, hq, hkv, tmax, d = 2, 6, 2, 200, 64
    q, k, v, n, _ = _problem(b, hq, hkv, tmax, d, dtype, [200, 77], seed=5)
    expected = ref.decode_attention(q, k, v, n)
    # [B, Tmax, Hkv, D] storage seen as [B, Hkv, Tmax, D] (the flash-attn cache layout); q a slice.
    kt, vt = (x.transpose(1, 2).contiguous().cuda().transpose(1, 2) for x in (k, v))
    qs = torch.cat([q, q], dim=1).cuda()[:, hq:]
    _check(pyfast.decode_attention(qs, kt, vt, n.cuda(), backend="cuda"), expected, dtype, "transposed cache")
    # Rows of 65 elements: no row is 16-byte aligned -> element loads.
    pad = [torch.cat([x, x[..., :1]], dim=-1).cuda()[..., :d] for x in (k, v)]
    _check(pyfast.decode_attention(q.cuda(), *pad, n.cuda(), backend="cuda"), expected, dtype, "unaligned rows")
    # Last dim not contiguous: copied by the host code.
    nc = [x.transpose(2, 3).contiguous().cuda().transpose(2, 3) for x in (k, v)]
    _check(pyfast.decode_attention(q.cuda(), *nc, n.cuda(), backend="cuda"), expected, dtype, "strided last dim")


def test_decode_nan_stays_in_its_head():
    q, k, v, n, _ = _problem(2, 8, 2, 100, 64, torch.float16, [100, 40])
    q[1, 5, 3] = float("nan")
    out = pyfast.decode_attention(*_cuda(q, k, v, n), backend="cuda")
    nan = torch.isnan(out.float()).any(-1).cpu()
    expected = torch.zeros(2, 8, dtype=torch.bool)
    expected[1, 5] = True
    assert torch.equal(nan, expected), f"NaN heads {nan.nonzero().tolist()}, expected [[1, 5]]"


# ---------------------------------------------------------------------------------------------
# sparse_decode_attention
# ---------------------------------------------------------------------------------------------
# (block_size, topk, sink_blocks, local_blocks): typical, topk = 0, no sink/local, odd block size,
# everything kept.
BUDGETS = [(16, 3, 1, 2), (16, 0, 1, 1), (8, 5, 0, 0), (5, 2, 2, 1), (16, 64, 1, 4)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 128, 72])
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("budget", BUDGETS)
def test_sparse_matches_reference(budget, heads, D, dtype):
    bs, topk, sink, local = budget
    hq, hkv = heads
    # Tmax = 300 is not a multiple of the block sizes: a full sequence ends in a tail past the
    # last block-key slot. Lengths: full, shorter than a block, exactly one block, ragged.
    q, k, v, n, bk = _problem(4, hq, hkv, 300, D, dtype, [300, 7, 16, 203], block_size=bs, seed=7)
    opts = dict(block_size=bs, topk=topk, sink_blocks=sink, local_blocks=local)
    out = pyfast.sparse_decode_attention(*_cuda(q, k, v, n, bk), backend="cuda", **opts)
    _check(out, ref.sparse_decode_attention(q, k, v, n, bk, **opts), dtype, f"{opts} Hq={hq} Hkv={hkv} D={D}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sparse_long_context_many_candidates(dtype):
    # 256 candidate blocks (several score CTAs, several radix passes that matter), split-K merge.
    q, k, v, n, bk = _problem(2, 8, 2, 4100, 128, dtype, [4100, 2333], seed=11)
    opts = dict(block_size=16, topk=37, sink_blocks=1, local_blocks=4)
    out = pyfast.sparse_decode_attention(*_cuda(q, k, v, n, bk), backend="cuda", **opts)
    _check(out, ref.sparse_decode_attention(q, k, v, n, bk, **opts), dtype, "long context")


def test_sparse_with_large_topk_equals_dense():
    q, k, v, n, bk = _cuda(*_problem(2, 8, 2, 500, 128, torch.bfloat16, [500, 123], seed=13))
    sparse = pyfast.sparse_decode_attention(q, k, v, n, bk, topk=1000, backend="cuda")
    dense = pyfast.decode_attention(q, k, v, n, backend="cuda")
    assert_close(sparse, dense, 1e-2, "topk >= blocks vs dense")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sparse_ties_go_to_the_lower_block_and_nan_ranks_first(dtype):
    # Candidate blocks 1..14 (sink 1, local 1, 16 full blocks); blocks 3, 6, 9, 12 share one key
    # vector (exact ties), block 10 has a NaN key. topk = 3: NaN block + the two lowest tied
    # blocks, provided the tie beats every other candidate (its key is made large).
    q, k, v, n, bk = _problem(1, 4, 1, 256, 64, dtype, [256], seed=17)
    qbar = q.double().mean(1)[0]
    big = (qbar / qbar.norm() * 50).to(dtype)
    for j in (3, 6, 9, 12):
        bk[0, 0, j] = big
    bk[0, 0, 10, 7] = float("nan")
    v = v + torch.arange(256).to(dtype).view(1, 1, 256, 1) / 64  # blocks differ in their values
    opts = dict(block_size=16, topk=3, sink_blocks=1, local_blocks=1)
    mask = ref.kept_token_mask(q, bk, n, 256, **opts)[0, 0].view(16, 16).all(1)
    assert mask.nonzero().flatten().tolist() == [0, 3, 6, 10, 15], "the reference rule changed"
    out = pyfast.sparse_decode_attention(*_cuda(q, k, v, n, bk), backend="cuda", **opts)
    _check(out, ref.sparse_decode_attention(q, k, v, n, bk, **opts), dtype, "ties and NaN")


def test_sparse_nan_query_stays_in_its_head():
    # NaN in one query head makes every score of its group NaN (all tie: lowest blocks kept) and
    # that head's output NaN; the group's other heads stay finite, as in the reference.
    q, k, v, n, bk = _problem(2, 8, 2, 200, 64, torch.float16, [200, 90], seed=19)
    q[0, 2, 0] = float("nan")
    opts = dict(block_size=16, topk=2, sink_blocks=1, local_blocks=1)
    out = pyfast.sparse_decode_attention(*_cuda(q, k, v, n, bk), backend="cuda", **opts)
    _check(out, ref.sparse_decode_attention(q, k, v, n, bk, **opts), torch.float16, "NaN query")


# ---------------------------------------------------------------------------------------------
# append_kv
# ---------------------------------------------------------------------------------------------
def _append_both(k, v, bk, n, k_new, v_new, block_size):
    """Run the CUDA op on GPU copies and the reference on CPU copies; return both states."""
    cpu = [t.clone() for t in (k, v, bk, n)]
    ref.append_kv(*cpu, k_new, v_new, block_size=block_size)
    gpu = _cuda(k, v, bk, n)
    pyfast.append_kv(*gpu, *_cuda(k_new, v_new), block_size=block_size, backend="cuda")
    return gpu, cpu


def _check_state(gpu, cpu, dtype, what):
    names = ("k_cache", "v_cache", "block_keys", "cache_seqlens")
    for name, g, c in zip(names, gpu, cpu):
        if name == "block_keys":  # fp32 sum vs float64 mean: may differ in the last bit
            assert_close(g, c, rel_tol(dtype, "cuda"), f"{what}: {name}")
        else:
            assert torch.equal(g.cpu(), c), f"{what}: {name} differs from the reference"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 128, 72, 59])
@pytest.mark.parametrize("tn", [1, 20])
def test_append_matches_reference(tn, D, dtype):
    b, hkv, tmax, bs = 4, 3, 100, 16
    k = _randn(b, hkv, tmax, D, dtype=dtype, seed=1)
    v = _randn(b, hkv, tmax, D, dtype=dtype, seed=2)
    bk = _randn(b, hkv, tmax // bs, D, dtype=dtype, seed=3)  # untouched where no block fills up
    n = torch.tensor([0, 5, 16, 100 - tn], dtype=torch.int32)  # the last one ends exactly at Tmax
    k_new = _randn(b, hkv, tn, D, dtype=dtype, seed=4)
    v_new = _randn(b, hkv, tn, D, dtype=dtype, seed=5)
    gpu, cpu = _append_both(k, v, bk, n, k_new, v_new, bs)
    _check_state(gpu, cpu, dtype, f"Tn={tn} D={D}")


def test_append_token_by_token_and_strided_cache():
    # 40 single-token appends into a [B, Tmax, Hkv, D]-stored cache; block size 7; k_new a slice.
    b, hkv, tmax, d, bs = 2, 2, 64, 64, 7
    dtype = torch.bfloat16
    kc = _randn(b, tmax, hkv, d, dtype=dtype, seed=1).cuda().transpose(1, 2)
    vc = _randn(b, tmax, hkv, d, dtype=dtype, seed=2).cuda().transpose(1, 2)
    bk = _randn(b, hkv, tmax // bs, d, dtype=dtype, seed=3).cuda()
    n = torch.tensor([0, 3], dtype=torch.int32).cuda()
    cpu = [t.cpu().clone() for t in (kc, vc, bk, n)]
    for step in range(40):
        new = _randn(b, hkv, 2, d, dtype=dtype, seed=100 + step)
        k_new, v_new = new[:, :, :1], new[:, :, 1:]
        pyfast.append_kv(kc, vc, bk, n, k_new.cuda(), v_new.cuda(), block_size=bs, backend="cuda")
        ref.append_kv(*cpu, k_new, v_new, block_size=bs)
    _check_state([kc, vc, bk, n], cpu, dtype, "token by token")


def test_append_unaligned_rows():
    # D = 64 views of rows of 65 elements (sliced on the GPU: .cuda() of such a view would pack it):
    # element copies instead of 16-byte vectors.
    b, hkv, tmax, d, bs = 2, 2, 48, 64, 16
    dtype = torch.float16
    k_full, v_full = (_randn(b, hkv, tmax, d + 1, dtype=dtype, seed=s) for s in (1, 2))
    kn_full = _randn(b, hkv, 25, d + 1, dtype=dtype, seed=4)
    bk = _randn(b, hkv, tmax // bs, d, dtype=dtype, seed=3)
    n = torch.tensor([10, 0], dtype=torch.int32)
    v_new = _randn(b, hkv, 25, d, dtype=dtype, seed=5)
    cpu = [k_full[..., :d].clone(), v_full[..., :d].clone(), bk.clone(), n.clone()]
    ref.append_kv(*cpu, kn_full[..., 1:], v_new, block_size=bs)
    gpu = [k_full.cuda()[..., :d], v_full.cuda()[..., :d], bk.cuda(), n.cuda()]
    assert gpu[0].stride(2) == d + 1
    pyfast.append_kv(*gpu, kn_full.cuda()[..., 1:], v_new.cuda(), block_size=bs, backend="cuda")
    _check_state(gpu, cpu, dtype, "unaligned rows")


def test_append_overflow_is_rejected_without_writing():
    k, v = (_randn(2, 2, 32, 64, dtype=torch.float16, seed=s).cuda() for s in (1, 2))
    bk = _block_means(k, 16)
    n = torch.tensor([30, 4], dtype=torch.int32).cuda()
    k_new = _randn(2, 2, 3, 64, dtype=torch.float16, seed=3).cuda()
    before = [t.clone() for t in (k, v, bk, n)]
    with pytest.raises(ValueError, match="cache_seqlens"):
        pyfast.append_kv(k, v, bk, n, k_new, k_new, block_size=16, backend="cuda")
    with pytest.raises(RuntimeError, match="cache_seqlens"):
        torch.ops.pyfast.append_kv(k, v, bk, n, k_new, k_new, 16)
    for t, t0 in zip((k, v, bk, n), before):
        assert torch.equal(t, t0), "a rejected append wrote to the cache"


# ---------------------------------------------------------------------------------------------
# opcheck, CUDA graphs
# ---------------------------------------------------------------------------------------------
def test_opcheck():
    q, k, v, n, bk = _cuda(*_problem(2, 6, 2, 256, 64, torch.float16, [200, 33], seed=23, poison=False))
    torch.library.opcheck(torch.ops.pyfast.decode_attention.default, (q, k, v, n, None))
    torch.library.opcheck(torch.ops.pyfast.decode_attention.default, (q, k, v, n, 0.5))
    torch.library.opcheck(torch.ops.pyfast.sparse_decode_attention.default, (q, k, v, n, bk, 16, 2, 1, 1, None))
    # append_kv runs several times under opcheck: 2 tokens per call, room for 20+ calls.
    k_new = torch.randn(2, 2, 2, 64, dtype=torch.float16, device="cuda")
    n_small = torch.tensor([3, 17], dtype=torch.int32, device="cuda")
    torch.library.opcheck(torch.ops.pyfast.append_kv.default, (k, v, bk, n_small, k_new, k_new.clone(), 16))


def _decode_step(state, q, k_new, v_new):
    k, v, bk, n = state
    pyfast.append_kv(k, v, bk, n, k_new, v_new, block_size=16, backend="cuda")
    sparse = pyfast.sparse_decode_attention(
        q, k, v, n, bk, block_size=16, topk=3, sink_blocks=1, local_blocks=1, backend="cuda"
    )
    dense = pyfast.decode_attention(q, k, v, n, backend="cuda")
    return sparse, dense


def _capture(state, q, k_new, v_new):
    saved = [t.clone() for t in state]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (lazy init, allocator)
        _decode_step(state, q, k_new, v_new)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = _decode_step(state, q, k_new, v_new)
    for t, t0 in zip(state, saved):  # undo the warm-up
        t.copy_(t0)
    return graph, outs


def test_cuda_graph_replay_matches_eager():
    # append_kv + sparse_decode_attention + decode_attention captured once, replayed with new
    # q / k_new / v_new: every replay equals the eager step on a copy of the state.
    dtype = torch.float16
    q, k, v, n, bk = _cuda(*_problem(2, 8, 2, 256, 64, dtype, [40, 100], seed=29, poison=False))
    k_new = torch.randn(2, 2, 1, 64, dtype=dtype, device="cuda")
    v_new = torch.randn_like(k_new)
    state = [k, v, bk, n]
    graph, (g_sparse, g_dense) = _capture(state, q, k_new, v_new)
    for it in range(20):  # crosses block boundaries (block keys refreshed inside the graph)
        for t in (q, k_new, v_new):
            t.copy_(torch.randn_like(t))
        eager_state = [t.clone() for t in state]
        e_sparse, e_dense = _decode_step(eager_state, q, k_new, v_new)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(g_sparse, e_sparse), f"replay {it}: sparse output differs from eager"
        assert torch.equal(g_dense, e_dense), f"replay {it}: dense output differs from eager"
        for name, t, e in zip(("k_cache", "v_cache", "block_keys", "cache_seqlens"), state, eager_state):
            assert torch.equal(t, e), f"replay {it}: {name} differs from eager"
    assert n.tolist() == [60, 120]


def test_cuda_graph_append_past_tmax_leaves_the_sequence_untouched():
    # Under capture the host cannot read cache_seqlens; the kernels skip a sequence that would
    # pass Tmax (the first replay fills sequence 0 to Tmax, the second must not touch it).
    dtype = torch.bfloat16
    q, k, v, n, bk = _cuda(*_problem(2, 4, 2, 64, 64, dtype, [63, 10], seed=31, poison=False))
    k_new = torch.randn(2, 2, 1, 64, dtype=dtype, device="cuda")
    v_new = torch.randn_like(k_new)
    state = [k, v, bk, n]
    graph, _ = _capture(state, q, k_new, v_new)
    graph.replay()
    before = [t.clone() for t in state]
    graph.replay()
    torch.cuda.synchronize()
    assert n.tolist() == [64, 12]
    for name, t, t0 in zip(("k_cache", "v_cache", "block_keys"), state, before):
        assert torch.equal(t[0], t0[0]), f"{name} of the full sequence changed"
        assert not torch.equal(t[1], t0[1]) or name == "block_keys", f"{name} of sequence 1 not appended"
