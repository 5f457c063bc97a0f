"""The spec checks itself: the masked form against the token loop, and the selection rule."""

import torch

from pyfast.reference import sparse as ref
from pyfast.testing import assert_close
from sparse_cases import make_cache, make_query


def test_loop_equals_masked_form():
    k, v, bk, n = make_cache(2, 2, 70, 12, torch.float64, lengths=[70, 23], block_size=8)
    q = make_query(2, 6, 12, torch.float64)
    mask = ref.kept_token_mask(q, bk, n, 70, block_size=8, topk=2, sink_blocks=1, local_blocks=1)
    assert_close(ref.decode_attention_loop(q, k, v, mask), ref.masked_decode_attention(q, k, v, mask), 1e-12)


def test_kept_mask_rule():
    bs, tmax = 4, 64
    k, v, bk, n = make_cache(1, 1, tmax, 8, torch.float64, lengths=[50], block_size=bs)
    q = make_query(1, 3, 8, torch.float64)
    mask = ref.kept_token_mask(q, bk, n, tmax, block_size=bs, topk=3, sink_blocks=2, local_blocks=2)[0, 0]
    nfull = 50 // bs  # 12 full blocks + tail [48, 50)
    blocks = mask[: nfull * bs].reshape(nfull, bs)
    assert blocks.all(1).eq(blocks.any(1)).all(), "blocks are kept whole"
    kept = blocks.all(1)
    assert kept[:2].all() and kept[nfull - 2 :].all() and mask[48:50].all() and not mask[50:].any()
    scores = ref.block_scores(q, bk)[0, 0, 2 : nfull - 2]
    top = set((torch.topk(scores, 3).indices + 2).tolist())
    assert set(torch.nonzero(kept[2 : nfull - 2]).flatten().add(2).tolist()) == top


def test_large_topk_is_dense_and_ties_go_low():
    k, v, bk, n = make_cache(2, 2, 40, 8, torch.float64, lengths=[40, 17], block_size=4)
    q = make_query(2, 2, 8, torch.float64)
    dense = ref.decode_attention(q, k, v, n)
    assert_close(ref.sparse_decode_attention(q, k, v, n, bk, block_size=4, topk=10), dense, 1e-12)
    bk.zero_()  # all scores tie: the lowest candidate blocks win
    mask = ref.kept_token_mask(q, bk, n, 40, block_size=4, topk=2, sink_blocks=1, local_blocks=1)
    assert mask[0, 0, :12].all() and not mask[0, 0, 12:36].any() and mask[0, 0, 36:].all()


def test_append_builds_block_means():
    k, v, bk, n = make_cache(1, 2, 33, 5, torch.float64, lengths=[33], block_size=8)
    assert torch.allclose(bk[0, :, 3], k[0, :, 24:32].mean(1))
    assert bk.shape[2] == 4


def test_docstring_examples_run():
    """The examples in the public docstrings are executed (sparse == dense under the kept mask)."""
    import doctest

    import pyfast
    import pyfast.sparse.ops as ops

    for fn in (ops.sparse_decode_attention, ops.decode_attention, ops.append_kv):
        test = doctest.DocTestParser().get_doctest(fn.__doc__, {"torch": torch, "pyfast": pyfast}, fn.__name__, None, 0)
        result = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS).run(test)
        assert result.failed == 0 and result.attempted > 0, fn.__name__
