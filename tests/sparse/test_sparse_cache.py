"""SparseKVCache: appends, decode and prefill attention, unpadding, crop and the byte counters,
against pyfast/reference/sparse.py and F.scaled_dot_product_attention."""

import pytest
import torch
import torch.nn.functional as F

import pyfast
from pyfast.reference import sparse as ref
from pyfast.testing import assert_close, rel_tol


OPTS = dict(block_size=4, sink_blocks=1, local_blocks=2)


def _filled(lengths, *, hkv=2, d=40, tmax=61, dtype=torch.float32, topk=3, n_layers=2, backend=None):
    """A cache whose rows hold `lengths` random tokens, appended in uneven chunks."""
    cache = pyfast.SparseKVCache(n_layers, len(lengths), hkv, d, tmax, topk=topk, dtype=dtype, backend=backend, **OPTS)
    k = torch.randn(len(lengths), hkv, max(lengths), d, dtype=dtype)
    v = torch.randn_like(k)
    for layer in range(n_layers):
        for b, n in enumerate(lengths):  # row views, so the rows end at different lengths
            row = [t[b : b + 1] for t in (cache.k_cache[layer], cache.v_cache[layer], cache.block_keys[layer],
                                         cache.cache_seqlens[layer])]
            for lo, hi in ((0, n // 3), (n // 3, n - 1), (n - 1, n)):
                pyfast.append_kv(*row, k[b : b + 1, :, lo:hi], v[b : b + 1, :, lo:hi], block_size=4, backend=backend)
    return cache, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hq", [2, 6])
@pytest.mark.parametrize("backend", [None, "reference"])
def test_decode_matches_reference(dtype, hq, backend):
    cache, _, _ = _filled([45, 23, 9], dtype=dtype, backend=backend)
    q = torch.randn(3, hq, 40, dtype=dtype)
    args = (q, cache.k_cache[1], cache.v_cache[1], cache.cache_seqlens[1])
    out = cache.attend(1, q)
    want = ref.sparse_decode_attention(*args, cache.block_keys[1], topk=3, **OPTS)
    assert_close(out, want, rel_tol(dtype), "sparse decode")
    cache.topk = None  # dense
    assert_close(cache.attend(1, q.unsqueeze(2)), ref.decode_attention(*args).unsqueeze(2), rel_tol(dtype), "dense")


def test_append_keeps_block_means():
    cache, k, _ = _filled([45, 23, 9])
    for b, n in enumerate([45, 23, 9]):
        nfull = n // 4
        means = k[b, :, : nfull * 4].double().reshape(2, nfull, 4, 40).mean(2)
        assert_close(cache.block_keys[0][b, :, :nfull], means, rel_tol(torch.float32), f"block keys row {b}")
    assert cache.cache_seqlens[0].tolist() == [45, 23, 9]


def test_prefill_is_causal_attention():
    cache = pyfast.SparseKVCache(1, 2, 2, 40, 61, topk=3, **OPTS)
    k, v = torch.randn(2, 2, 30, 40), torch.randn(2, 2, 30, 40)
    q = torch.randn(2, 6, 30, 40)
    cache.append(0, k[:, :, :12], v[:, :, :12])
    cache.attend(0, q[:, :, :12])
    cache.append(0, k[:, :, 12:], v[:, :, 12:])  # a second chunk: queries at positions 12..29
    out = cache.attend(0, q[:, :, 12:])
    full = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), is_causal=True)
    assert_close(out, full[:, :, 12:], rel_tol(torch.float32), "chunked prefill")


def test_unpad_last_equals_unpadded_append():
    keep = torch.ones(2, 14, dtype=torch.bool)
    keep[1, :5] = False  # left padding of row 1
    k, v = torch.randn(2, 2, 14, 40), torch.randn(2, 2, 14, 40)
    padded = pyfast.SparseKVCache(1, 2, 2, 40, 61, **OPTS)
    padded.append(0, k[:, :, :3], v[:, :, :3])  # some history before the padded chunk
    padded.append(0, k, v)
    padded.unpad_last(0, keep)
    assert padded.cache_seqlens[0].tolist() == [17, 12]
    row1 = pyfast.SparseKVCache(1, 1, 2, 40, 61, **OPTS)
    row1.append(0, k[1:, :, :3], v[1:, :, :3])
    row1.append(0, k[1:, :, 5:], v[1:, :, 5:])
    assert torch.equal(padded.k_cache[0][1, :, :12], row1.k_cache[0][0, :, :12])
    assert torch.equal(padded.v_cache[0][1, :, :12], row1.v_cache[0][0, :, :12])
    assert torch.equal(padded.block_keys[0][1, :, :3], row1.block_keys[0][0, :, :3])
    # prefill attention of the kept queries only; padded queries get zeros
    q = torch.randn(2, 4, 14, 40)
    out = padded.attend(0, q, keep=keep)
    assert torch.equal(out[1, :, :5], torch.zeros(4, 5, 40))
    assert_close(out[1:, :, 5:], row1.attend(0, q[1:, :, 5:]), rel_tol(torch.float32), "unpadded prefill")


def test_crop_then_append_is_exact():
    k, v = torch.randn(1, 2, 40, 40), torch.randn(1, 2, 40, 40)
    a = pyfast.SparseKVCache(1, 1, 2, 40, 61, topk=2, **OPTS)
    a.append(0, k[:, :, :30], v[:, :, :30])
    a.append(0, torch.randn(1, 2, 7, 40), torch.randn(1, 2, 7, 40))
    a.crop(7)
    a.append(0, k[:, :, 30:], v[:, :, 30:])
    b = pyfast.SparseKVCache(1, 1, 2, 40, 61, topk=2, **OPTS)
    b.append(0, k, v)
    assert a.cache_seqlens[0].tolist() == [40]
    assert torch.equal(a.k_cache[0][:, :, :40], b.k_cache[0][:, :, :40])
    assert torch.equal(a.block_keys[0][:, :, :10], b.block_keys[0][:, :, :10])


@pytest.mark.parametrize("topk", [0, 2, 5, None])
def test_stats_count_kept_tokens(topk):
    """kept_token_fraction equals the kept-token count of the reference mask, summed over steps."""
    lengths = [3, 4, 9, 12, 13, 27, 44]
    cache = pyfast.SparseKVCache(1, len(lengths), 2, 8, 61, topk=topk, **OPTS)
    cache.append(0, torch.randn(len(lengths), 2, 1, 8), torch.randn(len(lengths), 2, 1, 8))
    cache.cache_seqlens[0].copy_(torch.tensor(lengths, dtype=torch.int32))  # only lengths matter here
    q = torch.randn(len(lengths), 4, 8)
    cache.attend(0, q)
    n = cache.cache_seqlens[0]
    if topk is None:
        kept, scored = sum(lengths), 0
    else:
        mask = ref.kept_token_mask(q, cache.block_keys[0], n, 61, topk=topk, **OPTS)
        kept = int(mask[:, 0].sum())
        ncand = [max(L // 4 - 3, 0) for L in lengths]
        scored = sum(c for c in ncand if c > topk) if topk > 0 else 0  # no choice, no scores
    st = cache.stats()
    assert st["decode_steps"] == 1 and st["layer_steps"] == 1
    assert st["kept_token_fraction"] == pytest.approx(kept / sum(lengths))
    assert st["kv_read_fraction"] == pytest.approx((2 * kept + scored) / (2 * sum(lengths)))
    cache.reset_stats()
    assert cache.stats()["decode_steps"] == 0 and cache.stats()["layer_steps"] == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_length"):
        pyfast.SparseKVCache(1, 1, 2, 8, 0)
    cache = pyfast.SparseKVCache(1, 1, 2, 8, 10)
    with pytest.raises(ValueError, match="layer"):
        cache.append(1, torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))
    with pytest.raises(ValueError, match="k_new"):  # more than Tmax new tokens: pyfast.append_kv refuses
        cache.append(0, torch.randn(1, 2, 11, 8), torch.randn(1, 2, 11, 8))
    cache.append(0, torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8))
    with pytest.raises(ValueError, match="cache_seqlens"):  # 6 + 5 past Tmax
        cache.append(0, torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8))


def test_select_batch_and_reorder():
    cache, _, _ = _filled([45, 23, 9])
    before = [t.clone() for t in (cache._k, cache._v, cache._bk, cache._len)]
    q = torch.randn(3, 4, 40)
    want = cache.attend(1, q)
    cache.reorder(torch.tensor([2, 0, 1]))  # same size: in place
    assert_close(cache.attend(1, q[[2, 0, 1]]), want[[2, 0, 1]], 1e-6)
    cache.reorder(torch.tensor([1, 2, 0]))
    index = torch.tensor([0, 0, 2, 1, 2])  # new batch size: reallocated, rows copied with their lengths
    cache.select_batch(index)
    assert cache.batch_size == 5 and cache.k_cache[0].shape[0] == 5
    assert cache.cache_seqlens[1].tolist() == [45, 45, 9, 23, 9]
    for t, b in zip((cache._k, cache._v, cache._bk, cache._len), before):
        assert torch.equal(t, b[:, index])
    assert_close(cache.attend(1, q[index]), want[index], 1e-6)
    cache.append(0, torch.randn(5, 2, 2, 40), torch.randn(5, 2, 2, 40))  # keeps working
    assert cache.cache_seqlens[0].tolist() == [47, 47, 11, 25, 11]


# A wrong value is a ValueError, a wrong type or dtype a TypeError.
@pytest.mark.parametrize("index, match", [
    (torch.tensor([0, 3, 1]), r"index with entries in \[0, 3\)"),
    (torch.tensor([-1, 0, 1]), r"index with entries in \[0, 3\)"),
    (torch.tensor([[0]]), "index a 1-D tensor"),
    (torch.tensor([0.0]), "index dtype"),
    (torch.tensor([], dtype=torch.long), "index with at least one entry"),
    ([0, 1], "index a torch.Tensor"),
])
def test_select_batch_bad_index_changes_nothing(index, match):
    cache, _, _ = _filled([45, 23, 9])
    before = [t.clone() for t in (cache._k, cache._len)]
    error = TypeError if "dtype" in match or "torch.Tensor" in match else ValueError
    with pytest.raises(error, match=match):
        cache.select_batch(index)
    if isinstance(index, torch.Tensor) and index.shape == (3,):
        with pytest.raises(error, match=match):
            cache.reorder(index)
    with pytest.raises(ValueError, match="index with 3 entries"):
        cache.reorder(torch.tensor([0, 1]))
    assert torch.equal(cache._k, before[0]) and torch.equal(cache._len, before[1]) and cache.batch_size == 3


def test_stats_count_tokens_and_layer_steps():
    """decode_steps counts decode steps (tokens), not layer calls; layer_steps counts those."""
    cache = pyfast.SparseKVCache(3, 1, 2, 8, 32, topk=2, **OPTS)
    for layer in range(3):
        cache.append(layer, torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8))
    assert cache.stats()["decode_steps"] == 0 and cache.stats()["layer_steps"] == 0  # a prefill is no decode step
    for _ in range(5):  # 5 tokens through all 3 layers
        for layer in range(3):
            cache.append(layer, torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))
            cache.attend(layer, torch.randn(1, 4, 8))
    st = cache.stats()
    assert (st["decode_steps"], st["layer_steps"]) == (5, 15)
    cache.attend(0, torch.randn(1, 4, 8))  # one more step of layer 0 only
    assert (cache.stats()["decode_steps"], cache.stats()["layer_steps"]) == (6, 16)
    cache.reset()
    assert (cache.stats()["decode_steps"], cache.stats()["layer_steps"]) == (0, 0)
