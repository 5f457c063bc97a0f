"""sparse_decode_attention (block selection + attention over the kept blocks) on every kernel
backend (cpu, triton, cuda) against the float64 reference (pyfast/reference/sparse.py): budgets
(topk 0 / huge, sink and local), block sizes, dtypes, GQA ratios, strided views, ties and NaN;
then what only one backend has (the Triton launchers: on-device selection against
kept_token_mask, split-K, lengths clamped; CUDA: long contexts, CUDA-graph capture of a decode
step); opcheck and torch.compile. Bad input: tests/test_errors.py.

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
    seqlens, shape_id, token_mask

if HAS_TRITON:
    from pyfast.kernels import sparse as ks

OP = "sparse_decode_attention"


def only(*names):
    """Parametrize `backend` over the named backends of the op (a backend-specific test)."""
    return pytest.mark.parametrize("backend", backends(OP, only=names))


def _opts(budget):
    bs, topk, sink, local = budget
    return dict(block_size=bs, topk=topk, sink_blocks=sink, local_blocks=local)


# ---------------------------------------------------------------------------------------------
# Every backend against the reference
# ---------------------------------------------------------------------------------------------
# Budgets (block_size, topk, sink_blocks, local_blocks).
CPU_BUDGETS = [(16, 0, 1, 2), (16, 3, 1, 2), (16, 2, 0, 0), (16, 1000, 1, 4), (16, 4, 3, 0)]
# Typical, topk = 0, no sink/local, odd block size, everything kept.
CUDA_BUDGETS = [(16, 3, 1, 2), (16, 0, 1, 1), (8, 5, 0, 0), (5, 2, 2, 1), (16, 64, 1, 4)]

# backend -> [(B, Hq, Hkv, Tmax, D, lengths, budget, CPU ISA, seed)]
CASES = {
    "cpu": [(b, hkv * g, hkv, tmax, d, lengths, budget, isa, 0)
            for budget in CPU_BUDGETS for b, hkv, g, tmax, d, lengths in CPU_SHAPES for isa in ("auto", "scalar")],
    "triton": [(3, 8, 2, 59, 40, [59, 26, 3], (5, 3, 1, 2), None, 0)],  # more: the launcher tests below
    # Tmax = 300 is not a multiple of the block sizes: a full sequence ends in a tail past the
    # last block-key slot. Lengths: full, shorter than a block, exactly one block, ragged.
    "cuda": [(4, hq, hkv, 300, d, [300, 7, 16, 203], budget, None, 7)
             for budget in CUDA_BUDGETS for hq, hkv in CUDA_HEADS for d in (64, 128, 72)],
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("backend, case", per_backend(OP, CASES, ids=shape_id))
def test_matches_reference(backend, case, dtype):
    b, hq, hkv, tmax, d, lengths, budget, isa, seed = case
    dev = device_for(backend)
    opts = _opts(budget)
    q, k, v, n, bk = problem(b, hq, hkv, tmax, d, dtype, lengths, block_size=budget[0], seed=seed, device=dev)
    with cpu_isa(isa) if isa else contextlib.nullcontext():
        out = pyfast.sparse_decode_attention(q, k, v, n, bk, backend=backend, **opts)
    assert out.dtype == dtype and out.shape == q.shape and out.device == q.device
    mask = ref.kept_token_mask(q.cpu(), bk.cpu(), n.cpu(), tmax, **opts)
    expected = ref.masked_decode_attention(q.cpu(), k.cpu(), v.cpu(), mask)
    assert_close(out, expected, tol(dtype, backend), f"{opts} Hq={hq} Hkv={hkv} D={d}")


# backend -> [(B, Hq, Hkv, Tmax, D, dtype, lengths, topk, tolerance, seed)]
LARGE_TOPK_CASES = {
    "cpu": [(2, 8, 2, 200, 64, torch.float32, [200, 77], 100, 1e-6, 0)],
    "cuda": [(2, 8, 2, 500, 128, torch.bfloat16, [500, 123], 1000, 1e-2, 13)],
}


@pytest.mark.parametrize("backend, case", per_backend(OP, LARGE_TOPK_CASES, ids=shape_id))
def test_large_topk_equals_dense(backend, case):
    """Triton: test_triton_large_topk_equals_dense."""
    b, hq, hkv, tmax, d, dtype, lengths, topk, rtol, seed = case
    q, k, v, n, bk = problem(b, hq, hkv, tmax, d, dtype, lengths, seed=seed, device=device_for(backend))
    sparse = pyfast.sparse_decode_attention(q, k, v, n, bk, topk=topk, backend=backend)
    dense = pyfast.decode_attention(q, k, v, n, backend=backend)
    assert_close(sparse, dense, rtol, "topk >= blocks vs dense")


@pytest.mark.parametrize("backend", backends(OP))
def test_other_block_sizes_scale_and_strided_views(backend):
    dev = device_for(backend)
    k, v, bk, n = make_cache(2, 2, 90, 32, torch.float32, lengths=[90, 41], block_size=5, device=dev)
    big_q = make_query(2, 8, 64, torch.float32, device=dev)
    q = big_q[:, :, ::2]  # strided: last-dim stride 2 (copied), batch/head strides arbitrary
    kt, vt = k.transpose(1, 2).contiguous().transpose(1, 2), v[:, :, :, :]  # head/time strides permuted
    opts = dict(block_size=5, topk=3, sink_blocks=1, local_blocks=1, scale=0.3)
    out = pyfast.sparse_decode_attention(q, kt, vt, n, bk, backend=backend, **opts)
    t = tol(torch.float32, backend)
    assert_close(out, ref.sparse_decode_attention(q, k, v, n, bk, **opts), t)
    dense = pyfast.decode_attention(q, kt, vt, n, scale=0.3, backend=backend)
    assert_close(dense, ref.decode_attention(q, k, v, n, scale=0.3), t)


# backend -> [(B, Hq, Hkv, Tmax, D, dtype, lengths, NaN at (b, head, d), budget, seed, kept tokens of
# the NaN group or None)]. The group's mean query is NaN, so every block score is: the selection
# falls back to the lowest candidates (NaN ties go low); the NaN head gets NaN, the rest of the
# group a finite answer, as in the reference.
NAN_CASES = {
    "cpu": [(1, 2, 1, 64, 16, torch.float32, [64], (0, 1, 3), (16, 1, 1, 0), 0, 32)],  # candidates: blocks 1-3
    "triton": [(2, 6, 2, 40, 24, torch.float32, [40, 33], (0, 1, 5), (4, 2, 1, 1), 0, None)],
    "cuda": [(2, 8, 2, 200, 64, torch.float16, [200, 90], (0, 2, 0), (16, 2, 1, 1), 19, None)],
}


@pytest.mark.parametrize("backend, case", per_backend(OP, NAN_CASES, ids=shape_id))
def test_nan_query_stays_in_its_head(backend, case):
    b, hq, hkv, tmax, d, dtype, lengths, at, budget, seed, kept = case
    q, k, v, n, bk = problem(b, hq, hkv, tmax, d, dtype, lengths, block_size=budget[0], seed=seed)
    q[at] = float("nan")
    opts = _opts(budget)
    dev = device_for(backend)
    out = pyfast.sparse_decode_attention(*(t.to(dev) for t in (q, k, v, n, bk)), backend=backend, **opts)
    assert_close(out, ref.sparse_decode_attention(q, k, v, n, bk, **opts), tol(dtype, backend), "NaN query")
    nan = torch.isnan(out.float()).any(-1).cpu()
    want = torch.zeros(b, hq, dtype=torch.bool)
    want[at[:2]] = True
    assert torch.equal(nan, want), f"NaN heads {nan.nonzero().tolist()}, expected {[list(at[:2])]}"
    assert torch.isnan(out[at[:2]]).all()
    if kept is not None:
        mask = ref.kept_token_mask(q, bk, n, tmax, **opts)[at[0], at[1] // (hq // hkv)]
        assert mask[:kept].all() and not mask[kept:].any()


@only("cpu", "cuda")  # Triton: test_triton_selection_ties_nan_and_signed_zero
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
def test_ties_go_to_the_lower_block_and_nan_ranks_first(backend, dtype):
    # Candidate blocks 1..14 (sink 1, local 1, 16 full blocks); blocks 3, 6, 9, 12 share one key
    # vector (exact ties), block 10 has a NaN key. topk = 3: NaN block + the two lowest tied
    # blocks, provided the tie beats every other candidate (its key is made large).
    q, k, v, n, bk = problem(1, 4, 1, 256, 64, dtype, [256], seed=17)
    qbar = q.double().mean(1)[0]
    big = (qbar / qbar.norm() * 50).to(dtype)
    for j in (3, 6, 9, 12):
        bk[0, 0, j] = big
    bk[0, 0, 10, 7] = float("nan")
    v = v + torch.arange(256).to(dtype).view(1, 1, 256, 1) / 64  # blocks differ in their values
    opts = dict(block_size=16, topk=3, sink_blocks=1, local_blocks=1)
    mask = ref.kept_token_mask(q, bk, n, 256, **opts)[0, 0].view(16, 16).all(1)
    assert mask.nonzero().flatten().tolist() == [0, 3, 6, 10, 15], "the reference rule changed"
    dev = device_for(backend)
    out = pyfast.sparse_decode_attention(*(t.to(dev) for t in (q, k, v, n, bk)), backend=backend, **opts)
    assert_close(out, ref.sparse_decode_attention(q, k, v, n, bk, **opts), tol(dtype, backend), "ties and NaN")


@only("cuda")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
def test_cuda_long_context_many_candidates(backend, dtype):
    # 256 candidate blocks (several score CTAs, several radix passes that matter), split-K merge.
    q, k, v, n, bk = problem(2, 8, 2, 4100, 128, dtype, [4100, 2333], seed=11)
    opts = dict(block_size=16, topk=37, sink_blocks=1, local_blocks=4)
    dev = device_for(backend)
    out = pyfast.sparse_decode_attention(*(t.to(dev) for t in (q, k, v, n, bk)), backend=backend, **opts)
    assert_close(out, ref.sparse_decode_attention(q, k, v, n, bk, **opts), tol(dtype, backend), "long context")


# ---------------------------------------------------------------------------------------------
# Triton: the on-device block selection (exactly kept_token_mask) and the launchers
# ---------------------------------------------------------------------------------------------
SELECT_CASES = {  # name: (Hq, Hkv, Tmax, D, block_size, lengths, topk, sink, local)
    "basic": (6, 2, 61, 40, 4, (61, 30, 9), 3, 1, 2),
    "topk0": (4, 2, 48, 16, 4, (48, 21), 0, 1, 2),
    "topk_all": (4, 1, 48, 16, 4, (48, 21), 100, 1, 2),
    "no_sink_local": (3, 3, 48, 16, 4, (48, 37), 4, 0, 0),
    "sink_local_wide": (4, 2, 40, 16, 8, (40, 17), 2, 20, 20),
    "short": (8, 2, 30, 24, 8, (7, 1, 8), 2, 1, 1),  # L < block_size, L == block_size
    "many_blocks": (4, 1, 70, 16, 2, (70, 51), 9, 2, 3),  # > 16 candidates: several chunks
    "block1": (3, 1, 40, 16, 1, (40, 23), 7, 1, 4),
    "block20": (4, 2, 100, 16, 20, (100, 87, 45), 1, 1, 1),  # block > a 16-token tile
    "no_full_block": (4, 2, 6, 16, 8, (6, 3), 2, 1, 1),  # Tmax < block_size: block_keys [B, Hkv, 0, D]
}


def check_selection(q, bk, n, tmax, bs, topk, sink, local):
    ids, counts = ks.select_blocks(q, bk, n, tmax, bs, topk, sink, local)
    assert ids.shape == (*bk.shape[:2], min(sink + topk + local, bk.shape[2]) + 1)
    assert (counts >= 0).all() and (counts <= ids.shape[-1]).all()
    expected = ref.kept_token_mask(q, bk, n, tmax, block_size=bs, topk=topk, sink_blocks=sink, local_blocks=local)
    got = token_mask(ids, counts, n, tmax, bs)
    assert torch.equal(got, expected.cpu()), f"kept tokens differ at {torch.nonzero(got != expected.cpu()).tolist()}"
    return expected


@only("triton")
@pytest.mark.parametrize("name", list(SELECT_CASES))
def test_triton_selection_and_output(backend, name):
    dev = device_for(backend)
    hq, hkv, tmax, d, bs, lengths, topk, sink, local = SELECT_CASES[name]
    q, k, v, bk = make_dense(len(lengths), hq, hkv, tmax, d, torch.float32, block_size=bs, device=dev)
    n = seqlens(*lengths, device=dev)
    mask = check_selection(q, bk, n, tmax, bs, topk, sink, local)
    out = pyfast.sparse_decode_attention(q, k, v, n, bk, block_size=bs, topk=topk, sink_blocks=sink,
                                         local_blocks=local, backend=backend)
    assert_close(out, ref.masked_decode_attention(q, k, v, mask), tol(torch.float32, backend))


@only("triton")
def test_triton_selection_ties_nan_and_signed_zero(backend):
    """Equal scores keep the lower block index, every NaN (either sign) ranks highest, -0.0 ties
    with +0.0; every topk puts the threshold somewhere else in the order."""
    dev = device_for(backend)
    tmax, bs, d = 48, 4, 16
    q, _, _, bk = make_dense(2, 2, 1, tmax, d, torch.float32, block_size=bs, device=dev)
    q = q.abs() + 0.1  # positive q: a -0.0 key gives a -0.0 score
    bk[:, :, 5] = bk[:, :, 2]
    bk[:, :, 8] = bk[:, :, 2]
    bk[:, :, 3] = -0.0  # must still win the tie with the +0.0 of block 6
    bk[:, :, 6] = 0.0
    bk[:, :, 9] = bk[:, :, 4]
    bk[0, :, 7] = -float("nan")  # sign bit set: must still rank highest, before block 10's NaN
    bk[0, :, 10] = float("nan")
    bk[1, :, 1] = float("-inf")
    bk[1, :, 10] = float("inf")
    assert torch.signbit(bk[0, 0, 7, 0]) and torch.signbit(bk[0, 0, 3, 0])
    n = seqlens(48, 47, device=dev)
    for topk in range(0, 12):
        check_selection(q, bk, n, tmax, bs, topk, 1, 1)


@only("triton")
@pytest.mark.parametrize("topk", [5, 20])
def test_triton_selection_all_scores_equal(backend, topk):
    """All candidates tie (then all but one); the 28 candidates span two chunks of the passes."""
    dev = device_for(backend)
    tmax, bs = 128, 4
    q, _, _, bk = make_dense(1, 3, 1, tmax, 16, torch.float32, block_size=bs, device=dev)
    bk[:] = bk[:, :, :1]
    check_selection(q, bk, seqlens(126, device=dev), tmax, bs, topk, 1, 2)
    bk[:, :, 25] += q.mean(1)  # score + |qbar|^2: one higher score, in the second chunk
    check_selection(q, bk, seqlens(126, device=dev), tmax, bs, topk, 1, 2)


@only("triton")
@pytest.mark.parametrize("num_splits", [4, 8])
def test_triton_split_starts_in_masked_tail(backend, num_splits):
    """block_size 20 > the 16-token tile: the tail block's masked end fills whole tiles, and with
    8 splits of one tile a split holds only masked tokens (its softmax row stays -inf)."""
    dev = device_for(backend)
    tmax, bs = 100, 20
    q, k, v, bk = make_dense(2, 4, 2, tmax, 16, torch.float32, block_size=bs, device=dev)
    n = seqlens(87, 61, device=dev)
    mask = check_selection(q, bk, n, tmax, bs, 9, 1, 1)
    out = ks.sparse_decode_attention(q, k, v, n, bk, bs, 9, 1, 1, None, num_splits=num_splits)
    assert_close(out, ref.masked_decode_attention(q, k, v, mask), tol(torch.float32, backend))


@only("triton")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("num_splits", [None, 3])
def test_triton_dtypes_and_splits(backend, dtype, num_splits):
    dev = device_for(backend)
    tmax, bs = 59, 5
    q, k, v, bk = make_dense(3, 8, 2, tmax, 40, dtype, block_size=bs, device=dev)
    n = seqlens(59, 26, 3, device=dev)
    opts = dict(topk=3, sink_blocks=1, local_blocks=2)
    mask = check_selection(q, bk, n, tmax, bs, opts["topk"], opts["sink_blocks"], opts["local_blocks"])
    out = ks.sparse_decode_attention(q, k, v, n, bk, bs, *opts.values(), None, num_splits=num_splits)
    assert out.dtype == dtype
    assert_close(out, ref.masked_decode_attention(q, k, v, mask), tol(dtype, backend))


@only("triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS.get)
def test_triton_large_topk_equals_dense(backend, dtype):
    dev = device_for(backend)
    tmax, bs = 45, 4
    q, k, v, bk = make_dense(2, 3, 1, tmax, 24, dtype, block_size=bs, device=dev)
    n = seqlens(45, 30, device=dev)
    out = ks.sparse_decode_attention(q, k, v, n, bk, bs, tmax, 1, 2, 0.2, num_splits=2)
    dense = ks.decode_attention(q, k, v, n, 0.2, num_splits=2)
    assert_close(out, dense, tol(dtype, backend))
    assert_close(out, ref.decode_attention(q, k, v, n, scale=0.2), tol(dtype, backend))


@only("triton", "cuda")
def test_kernel_lengths_are_clamped(backend):
    """Lengths outside [0, Tmax] (possible only during CUDA-graph capture) read nothing out of
    bounds: L > Tmax acts as Tmax, L <= 0 attends to nothing. decode_attention:
    test_decode_attention.py."""
    dev = device_for(backend)
    tmax, bs = 40, 8
    q, k, v, bk = make_dense(3, 4, 2, tmax, 16, torch.float32, block_size=bs, device=dev)
    n = seqlens(tmax + 7, -3, 0, device=dev)
    clamped = seqlens(tmax, 0, 0, device=dev)
    # The kernel itself (the rules would refuse n); Triton with 2 splits.
    kernel = REGISTRY[OP].impls[backend] if backend == "cuda" else functools.partial(ks.sparse_decode_attention, num_splits=2)
    out = kernel(q, k, v, n, bk, bs, 2, 1, 1, None)
    mask = ref.kept_token_mask(q, bk, clamped, tmax, block_size=bs, topk=2, sink_blocks=1, local_blocks=1)
    assert_close(out, ref.masked_decode_attention(q, k, v, mask), tol(torch.float32, backend))


# ---------------------------------------------------------------------------------------------
# opcheck, torch.compile
# ---------------------------------------------------------------------------------------------
# backend -> [(B, Hq, Hkv, Tmax, D, dtype, lengths, poisoned cache, (block_size, topk, sink, local, scale))]
OPCHECK_CASES = {
    "cpu": [(2, 4, 2, 40, 16, torch.float32, [40, 9], True, (4, 2, 1, 1, 0.5))],
    "triton": [(2, 4, 2, 24, 16, torch.float32, [24, 9], False, (4, 1, 1, 1, 0.5))],
    "cuda": [(2, 6, 2, 256, 64, torch.float16, [200, 33], False, (16, 2, 1, 1, None))],
}


@pytest.mark.parametrize("backend, case", per_backend(OP, OPCHECK_CASES, ids=shape_id))
def test_opcheck(backend, case):
    b, hq, hkv, tmax, d, dtype, lengths, poison, opts = case
    q, k, v, n, bk = problem(b, hq, hkv, tmax, d, dtype, lengths, block_size=opts[0], poison=poison, seed=23,
                             device=device_for(backend))
    torch.library.opcheck(torch.ops.pyfast.sparse_decode_attention.default, (q, k, v, n, bk, *opts),
                          {"backend": backend})


# backend -> [(B, Hq, Hkv, Tmax, D, lengths, block_size, topk, tolerance)]
COMPILE_CASES = {
    "cpu": [(1, 4, 2, 64, 16, [50], 16, 1, 1e-6)],
    "triton": [(1, 4, 2, 48, 16, [45], 4, 2, 1e-5)],
    "cuda": [(1, 4, 2, 64, 16, [50], 16, 1, 1e-6)],
}


@pytest.mark.parametrize("backend, case", per_backend(OP, COMPILE_CASES, ids=shape_id))
def test_compile_fullgraph(backend, case):
    """sparse_decode_attention and decode_attention in one compiled step."""
    b, hq, hkv, tmax, d, lengths, bs, topk, rtol = case
    q, k, v, n, bk = problem(b, hq, hkv, tmax, d, torch.float32, lengths, block_size=bs, device=device_for(backend))

    def step(q):
        sparse = pyfast.sparse_decode_attention(q, k, v, n, bk, block_size=bs, topk=topk, backend=backend)
        return sparse + pyfast.decode_attention(q, k, v, n, backend=backend)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert_close(compiled(q), step(q), rtol)


# ---------------------------------------------------------------------------------------------
# CUDA graphs: a decode step (append_kv, sparse and dense attention) captured and replayed
# ---------------------------------------------------------------------------------------------
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


@pytest.mark.parametrize("backend", backends(OP, only=("cuda",), emulated=False))
def test_cuda_graph_replay_matches_eager(backend):
    # append_kv + sparse_decode_attention + decode_attention captured once, replayed with new
    # q / k_new / v_new: every replay equals the eager step on a copy of the state.
    dtype = torch.float16
    q, k, v, n, bk = problem(2, 8, 2, 256, 64, dtype, [40, 100], seed=29, poison=False, device="cuda")
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


@pytest.mark.parametrize("backend", backends(OP, only=("cuda",), emulated=False))
def test_cuda_graph_append_past_tmax_leaves_the_sequence_untouched(backend):
    # Under capture the host cannot read cache_seqlens; the kernels skip a sequence that would
    # pass Tmax (the first replay fills sequence 0 to Tmax, the second must not touch it).
    dtype = torch.bfloat16
    q, k, v, n, bk = problem(2, 4, 2, 64, 64, dtype, [63, 10], seed=31, poison=False, device="cuda")
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
