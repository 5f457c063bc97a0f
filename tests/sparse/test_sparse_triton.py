"""Sparse-decoding Triton kernels (kernels/sparse.py) against the float64 reference
(pyfast/reference/sparse.py): append_kv, dense split-K decode, the on-device block selection
(exactly kept_token_mask: ties, NaN, +-0, topk 0 / huge, sink and local beyond the blocks,
L < block_size) and sparse decode; dtypes, GQA ratios 1/3/4, odd head dims, strided caches,
per-sequence lengths, split counts, out-of-range lengths, opcheck. Without CUDA they run on the
CPU through TRITON_INTERPRET=1 (tiny shapes only)."""

import os

import torch

# Must precede the first `import triton` (tests/conftest.py does the same; whichever runs first).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from pyfast.kernels import sparse as ks  # noqa: E402
from pyfast.reference import sparse as ref  # noqa: E402
from pyfast.sparse import ops  # noqa: E402
from pyfast.testing import assert_close, rel_tol  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


def tol(dtype: torch.dtype) -> float:
    # The interpreter computes fp32 dots exactly; GPUs get the Triton tolerance.
    return 1e-5 if dtype == torch.float32 and ks.INTERPRETED else rel_tol(dtype, DEVICE, backend="triton")


def seqlens(*lengths) -> torch.Tensor:
    return torch.tensor(lengths, dtype=torch.int32, device=DEVICE)


def make(b, hq, hkv, tmax, d, dtype, block_size=None):
    """q [B, Hq, D], caches [B, Hkv, Tmax, D] and (with block_size) the block means of the keys."""
    k = torch.randn(b, hkv, tmax, d, device=DEVICE).to(dtype)
    v = torch.randn(b, hkv, tmax, d, device=DEVICE).to(dtype)
    q = torch.randn(b, hq, d, device=DEVICE).to(dtype)
    if block_size is None:
        return q, k, v
    nb = tmax // block_size
    bk = k[:, :, : nb * block_size].double().unflatten(2, (nb, block_size)).mean(3).to(dtype)
    return q, k, v, bk


def token_mask(block_ids, counts, cache_seqlens, tmax, block_size) -> torch.Tensor:
    """bool [B, Hkv, tmax] from the kept-block list; also checks the list is strictly ascending."""
    b_sz, hkv, _ = block_ids.shape
    mask = torch.zeros(b_sz, hkv, tmax, dtype=torch.bool)
    for b in range(b_sz):
        length = int(cache_seqlens[b])
        for h in range(hkv):
            ids = block_ids[b, h, : int(counts[b, h])].cpu().tolist()
            assert ids == sorted(set(ids)), f"block list not strictly ascending: {ids}"
            for j in ids:
                mask[b, h, j * block_size : min((j + 1) * block_size, length)] = True
    return mask


# ---------------------------------------------------------------------------------------------
# decode_attention
# ---------------------------------------------------------------------------------------------
DECODE_CASES = [  # (B, Hq, Hkv, Tmax, D, lengths)
    (3, 4, 4, 50, 40, (50, 1, 23)),  # MHA, D not a power of two
    (2, 6, 2, 37, 72, (37, 16)),  # G = 3
    (2, 4, 1, 33, 16, (17, 33)),  # MQA, G = 4
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"hq{c[1]}hkv{c[2]}d{c[4]}")
def test_decode_attention(case, dtype):
    b, hq, hkv, tmax, d, lengths = case
    q, k, v = make(b, hq, hkv, tmax, d, dtype)
    n = seqlens(*lengths)
    out = ops.decode_attention(q, k, v, n, backend="triton")
    assert out.dtype == dtype and out.shape == (b, hq, d)
    assert_close(out, ref.decode_attention(q, k, v, n), tol(dtype))


@pytest.mark.parametrize("num_splits", [1, 2, 3, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_splits(dtype, num_splits):
    """Split-K with a log-sum-exp merge; splits past a short sequence's end are empty."""
    q, k, v = make(3, 6, 2, 100, 24, dtype)
    n = seqlens(100, 5, 64)
    out = ks.decode_attention(q, k, v, n, 0.3, num_splits=num_splits)
    assert_close(out, ref.decode_attention(q, k, v, n, scale=0.3), tol(dtype))


def test_decode_strided_inputs():
    """Caches as views (token-major storage, a window of a longer buffer) and q with a non-unit
    last-dim stride (copied by the launcher)."""
    b, hq, hkv, tmax, d = 2, 4, 2, 41, 40
    k = torch.randn(b, tmax + 9, hkv, d, device=DEVICE).transpose(1, 2)[:, :, 4 : 4 + tmax]
    v = torch.randn(b, hkv, tmax, 2 * d, device=DEVICE)[..., d:]
    q = torch.randn(b, d, hq, device=DEVICE).transpose(1, 2)
    assert q.stride(-1) != 1 and not k.is_contiguous() and not v.is_contiguous()
    n = seqlens(41, 19)
    out = ops.decode_attention(q, k, v, n, backend="triton")
    assert_close(out, ref.decode_attention(q, k, v, n), tol(torch.float32))


def test_lengths_are_clamped():
    """Lengths outside [0, Tmax] (possible only during CUDA-graph capture) read nothing out of
    bounds: L > Tmax acts as Tmax, L <= 0 attends to nothing (NaN, like the reference)."""
    tmax, bs = 40, 8
    q, k, v, bk = make(3, 4, 2, tmax, 16, torch.float32, block_size=bs)
    n = seqlens(tmax + 7, -3, 0)
    clamped = seqlens(tmax, 0, 0)
    out = ks.decode_attention(q, k, v, n, None, num_splits=2)
    assert_close(out, ref.decode_attention(q, k, v, clamped), tol(torch.float32))
    assert torch.isnan(out[1:]).all()
    out = ks.sparse_decode_attention(q, k, v, n, bk, bs, 2, 1, 1, None, num_splits=2)
    mask = ref.kept_token_mask(q, bk, clamped, tmax, block_size=bs, topk=2, sink_blocks=1, local_blocks=1)
    assert_close(out, ref.masked_decode_attention(q, k, v, mask), tol(torch.float32))


def test_nan_query_stays_in_its_head():
    q, k, v, bk = make(2, 6, 2, 40, 24, torch.float32, block_size=4)
    q[0, 1, 5] = float("nan")
    n = seqlens(40, 33)
    dense = ks.decode_attention(q, k, v, n, None, num_splits=3)
    assert_close(dense, ref.decode_attention(q, k, v, n), tol(torch.float32))
    assert torch.isnan(dense[0, 1]).all() and torch.isfinite(dense[0, [0, 2, 3, 4, 5]]).all()
    # The NaN score makes every block of group 0 tie (NaN ranks highest): lowest indices win.
    opts = dict(block_size=4, topk=2, sink_blocks=1, local_blocks=1)
    out = ops.sparse_decode_attention(q, k, v, n, bk, backend="triton", **opts)
    mask = ref.kept_token_mask(q, bk, n, 40, **opts)
    assert_close(out, ref.masked_decode_attention(q, k, v, mask), tol(torch.float32))


# ---------------------------------------------------------------------------------------------
# Block selection and sparse_decode_attention
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


@pytest.mark.parametrize("name", list(SELECT_CASES))
def test_sparse_selection_and_output(name):
    hq, hkv, tmax, d, bs, lengths, topk, sink, local = SELECT_CASES[name]
    q, k, v, bk = make(len(lengths), hq, hkv, tmax, d, torch.float32, block_size=bs)
    n = seqlens(*lengths)
    mask = check_selection(q, bk, n, tmax, bs, topk, sink, local)
    out = ops.sparse_decode_attention(q, k, v, n, bk, block_size=bs, topk=topk, sink_blocks=sink,
                                      local_blocks=local, backend="triton")
    assert_close(out, ref.masked_decode_attention(q, k, v, mask), tol(torch.float32))


def test_selection_ties_nan_and_signed_zero():
    """Equal scores keep the lower block index, every NaN (either sign) ranks highest, -0.0 ties
    with +0.0; every topk puts the threshold somewhere else in the order."""
    tmax, bs, d = 48, 4, 16
    q, _, _, bk = make(2, 2, 1, tmax, d, torch.float32, block_size=bs)
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
    n = seqlens(48, 47)
    for topk in range(0, 12):
        check_selection(q, bk, n, tmax, bs, topk, 1, 1)


@pytest.mark.parametrize("topk", [5, 20])
def test_selection_all_scores_equal(topk):
    """All candidates tie (then all but one); the 28 candidates span two chunks of the passes."""
    tmax, bs = 128, 4
    q, _, _, bk = make(1, 3, 1, tmax, 16, torch.float32, block_size=bs)
    bk[:] = bk[:, :, :1]
    check_selection(q, bk, seqlens(126), tmax, bs, topk, 1, 2)
    bk[:, :, 25] += q.mean(1)  # score + |qbar|^2: one higher score, in the second chunk
    check_selection(q, bk, seqlens(126), tmax, bs, topk, 1, 2)


@pytest.mark.parametrize("num_splits", [4, 8])
def test_sparse_split_starts_in_masked_tail(num_splits):
    """block_size 20 > the 16-token tile: the tail block's masked end fills whole tiles, and with
    8 splits of one tile a split holds only masked tokens (its softmax row stays -inf)."""
    tmax, bs = 100, 20
    q, k, v, bk = make(2, 4, 2, tmax, 16, torch.float32, block_size=bs)
    n = seqlens(87, 61)
    mask = check_selection(q, bk, n, tmax, bs, 9, 1, 1)
    out = ks.sparse_decode_attention(q, k, v, n, bk, bs, 9, 1, 1, None, num_splits=num_splits)
    assert_close(out, ref.masked_decode_attention(q, k, v, mask), tol(torch.float32))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("num_splits", [None, 3])
def test_sparse_dtypes_and_splits(dtype, num_splits):
    tmax, bs = 59, 5
    q, k, v, bk = make(3, 8, 2, tmax, 40, dtype, block_size=bs)
    n = seqlens(59, 26, 3)
    opts = dict(topk=3, sink_blocks=1, local_blocks=2)
    mask = check_selection(q, bk, n, tmax, bs, opts["topk"], opts["sink_blocks"], opts["local_blocks"])
    out = ks.sparse_decode_attention(q, k, v, n, bk, bs, *opts.values(), None, num_splits=num_splits)
    assert out.dtype == dtype
    assert_close(out, ref.masked_decode_attention(q, k, v, mask), tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_sparse_with_large_topk_equals_dense(dtype):
    tmax, bs = 45, 4
    q, k, v, bk = make(2, 3, 1, tmax, 24, dtype, block_size=bs)
    n = seqlens(45, 30)
    out = ks.sparse_decode_attention(q, k, v, n, bk, bs, tmax, 1, 2, 0.2, num_splits=2)
    dense = ks.decode_attention(q, k, v, n, 0.2, num_splits=2)
    assert_close(out, dense, tol(dtype))
    assert_close(out, ref.decode_attention(q, k, v, n, scale=0.2), tol(dtype))


# ---------------------------------------------------------------------------------------------
# append_kv
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("block_size", [4, 5, 20])
def test_append_kv_matches_reference(block_size, dtype):
    """A prefill that crosses block boundaries, Tn=1 decode steps, then a longer append; the
    cache is a window of a longer buffer and k_new is token-major (strided)."""
    b, hkv, tmax, d = 3, 2, 47, 40
    buf = torch.randn(b, hkv, tmax + 6, d, device=DEVICE).to(dtype)
    k_cache = buf[:, :, 3 : 3 + tmax]
    v_cache = torch.randn(b, hkv, tmax, d, device=DEVICE).to(dtype)
    bk = torch.randn(b, hkv, tmax // block_size, d, device=DEVICE).to(dtype)
    n = seqlens(0, 3, 10)
    r_k, r_v, r_bk, r_n = k_cache.clone(), v_cache.clone(), bk.clone(), n.clone()
    for tn in (9, 1, 1, 1, 1, 1, 1, 14):
        k_new = torch.randn(b, tn, hkv, d, device=DEVICE).to(dtype).transpose(1, 2)
        v_new = torch.randn(b, hkv, tn, d, device=DEVICE).to(dtype)
        ops.append_kv(k_cache, v_cache, bk, n, k_new, v_new, block_size=block_size, backend="triton")
        ref.append_kv(r_k, r_v, r_bk, r_n, k_new, v_new, block_size=block_size)
        assert torch.equal(n, r_n)
        assert torch.equal(k_cache, r_k) and torch.equal(v_cache, r_v)
        assert_close(bk, r_bk, tol(dtype), "block_keys")
    assert n.tolist() == [29, 32, 39]
    empty, bk_before = torch.randn(b, hkv, 0, d, device=DEVICE).to(dtype), bk.clone()
    ops.append_kv(k_cache, v_cache, bk, n, empty, empty, block_size=block_size, backend="triton")  # Tn = 0
    assert n.tolist() == [29, 32, 39] and torch.equal(k_cache, r_k) and torch.equal(bk, bk_before)


def test_append_kv_overflow_leaves_sequence_untouched():
    """The launcher itself (no host check, as during graph capture): a sequence that would pass
    Tmax is neither written nor advanced; the others are appended."""
    b, hkv, tmax, d, bs = 2, 1, 12, 16, 4
    k_cache = torch.randn(b, hkv, tmax, d, device=DEVICE)
    v_cache = torch.randn_like(k_cache)
    bk = torch.randn(b, hkv, tmax // bs, d, device=DEVICE)
    n = seqlens(10, 2)
    k_new, v_new = torch.randn(b, hkv, 3, d, device=DEVICE), torch.randn(b, hkv, 3, d, device=DEVICE)
    before = [t.clone() for t in (k_cache, v_cache, bk)]
    ks.append_kv(k_cache, v_cache, bk, n, k_new, v_new, bs)
    assert n.tolist() == [10, 5]
    for t, t0 in zip((k_cache, v_cache, bk), before):
        assert torch.equal(t[0], t0[0])
    assert torch.equal(k_cache[1, :, 2:5], k_new[1]) and torch.equal(v_cache[1, :, 2:5], v_new[1])
    assert_close(bk[1, :, 0], k_cache[1, :, :4].double().mean(1), 1e-6)


# ---------------------------------------------------------------------------------------------
# The ops with backend="triton" (one op per schema; the backend is a keyword of the op)
# ---------------------------------------------------------------------------------------------
def test_opcheck():
    tmax, bs = 24, 4
    q, k, v, bk = make(2, 4, 2, tmax, 16, torch.float32, block_size=bs)
    n = seqlens(24, 9)
    triton = {"backend": "triton"}
    torch.library.opcheck(torch.ops.pyfast.decode_attention.default, (q, k, v, n, None), triton)
    torch.library.opcheck(torch.ops.pyfast.sparse_decode_attention.default, (q, k, v, n, bk, bs, 1, 1, 1, 0.5),
                          triton)
    n = seqlens(3, 0)
    k_new, v_new = torch.randn(2, 2, 2, 16, device=DEVICE), torch.randn(2, 2, 2, 16, device=DEVICE)
    torch.library.opcheck(torch.ops.pyfast.append_kv.default, (k, v, bk, n, k_new, v_new, bs), triton)



def test_triton_ops_compile_fullgraph():
    q, k, v, bk = make(1, 4, 2, 48, 16, torch.float32, block_size=4)
    n = seqlens(45)

    def step(q):
        sparse = ops.sparse_decode_attention(q, k, v, n, bk, block_size=4, topk=2, backend="triton")
        return sparse + ops.decode_attention(q, k, v, n, backend="triton")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert_close(compiled(q), step(q), 1e-5)
