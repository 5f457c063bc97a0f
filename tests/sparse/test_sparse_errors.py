"""Bad input: a clear error naming the argument, raised before any kernel runs, nothing written."""

import pytest
import torch

import pyfast
from sparse_cases import make_cache, make_query

B, HKV, TMAX, D = 2, 2, 64, 16


@pytest.fixture
def cache():
    k, v, bk, n = make_cache(B, HKV, TMAX, D, torch.float32, lengths=[40, 9])
    return k.nan_to_num(), v.nan_to_num(), bk.nan_to_num(), n


def _attention_calls(q, k, v, n, bk, **kw):
    return [
        lambda: pyfast.decode_attention(q, k, v, n, **kw),
        lambda: pyfast.sparse_decode_attention(q, k, v, n, bk, **kw),
        lambda: torch.ops.pyfast.decode_attention(q, k, v, n, None),
        lambda: torch.ops.pyfast.sparse_decode_attention(q, k, v, n, bk, 16, 4, 1, 1, None),
    ]


@pytest.mark.parametrize(
    "case, match",
    [
        ("hq_not_multiple", "Hq"),
        ("head_dim", r"expected q\b"),
        ("q_dtype", r"expected q\b"),
        ("v_shape", "v_cache"),
        ("seqlens_dtype", "cache_seqlens"),
        ("seqlens_zero", "cache_seqlens"),
        ("seqlens_too_long", "cache_seqlens"),
        ("cache_3d", "k_cache"),
        ("seqlens_strided", "cache_seqlens"),
        ("cache_int", "k_cache"),
    ],
)
def test_attention_bad_input(cache, case, match):
    k, v, bk, n = cache
    q = make_query(B, 4, D, torch.float32)
    if case == "hq_not_multiple":
        q = make_query(B, 3, D, torch.float32)
    elif case == "head_dim":
        q = make_query(B, 4, D + 1, torch.float32)
    elif case == "q_dtype":
        q = q.half()
    elif case == "v_shape":
        v = v[:, :, :-1]
    elif case == "seqlens_dtype":
        n = n.long()
    elif case == "seqlens_zero":
        n = torch.tensor([0, 5], dtype=torch.int32)
    elif case == "seqlens_too_long":
        n = torch.tensor([TMAX + 1, 5], dtype=torch.int32)
    elif case == "seqlens_strided":
        n = torch.tensor([[40, 0], [9, 0]], dtype=torch.int32)[:, 0]
    elif case == "cache_3d":
        k = k[0]
    elif case == "cache_int":
        k = k.int()
    for call in _attention_calls(q, k, v, n, bk):
        with pytest.raises((ValueError, RuntimeError), match=match):
            call()


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(block_keys_shape=True), "block_keys"),
        (dict(topk=-1), "topk"),
        (dict(sink_blocks=-2), "sink_blocks"),
        (dict(local_blocks=-1), "local_blocks"),
        (dict(block_size=0), "block_size"),
    ],
)
def test_sparse_bad_options(cache, kw, match):
    k, v, bk, n = cache
    q = make_query(B, 4, D, torch.float32)
    if kw.pop("block_keys_shape", False):
        bk = bk[:, :, :-1]
    with pytest.raises((ValueError, RuntimeError), match=match):
        pyfast.sparse_decode_attention(q, k, v, n, bk, **kw)
    opts = dict(block_size=16, topk=4, sink_blocks=1, local_blocks=1) | kw
    with pytest.raises(RuntimeError, match=match):
        torch.ops.pyfast.sparse_decode_attention(q, k, v, n, bk, *opts.values(), None)


@pytest.mark.parametrize("op", ["public", "torch.ops"])
@pytest.mark.parametrize(
    "case, match",
    [
        ("past_tmax", "cache_seqlens"),
        ("new_dtype", "k_new"),
        ("new_shape", "v_new"),
        ("block_keys", "block_keys"),
        ("negative_len", "cache_seqlens"),
        ("expanded_seqlens", "cache_seqlens"),
        ("expanded_cache", "v_cache"),
    ],
)
def test_append_bad_input_writes_nothing(cache, op, case, match):
    k, v, bk, n = cache
    kn, vn = torch.randn(B, HKV, 20, D), torch.randn(B, HKV, 20, D)
    if case == "past_tmax":  # sequence 0 has 40 tokens: 40 + 30 > 64, sequence 1 would fit
        kn, vn = torch.randn(B, HKV, 30, D), torch.randn(B, HKV, 30, D)
    elif case == "new_dtype":
        kn = kn.half()
    elif case == "new_shape":
        vn = vn[:, :, :-1]
    elif case == "block_keys":
        bk = bk[..., :-1]
    elif case == "negative_len":
        n = torch.tensor([-1, 3], dtype=torch.int32)
    elif case == "expanded_seqlens":  # one element seen twice: would be advanced twice
        n = torch.tensor([1], dtype=torch.int32).expand(B)
    elif case == "expanded_cache":
        v = v[:1].expand(B, -1, -1, -1)
    before = [t.clone() for t in (k, v, bk, n)]
    with pytest.raises((ValueError, RuntimeError), match=match):
        if op == "public":
            pyfast.append_kv(k, v, bk, n, kn, vn, block_size=16)
        else:
            torch.ops.pyfast.append_kv(k, v, bk, n, kn, vn, 16)
    for got, want in zip((k, v, bk, n), before):
        assert torch.equal(got, want)


def test_unknown_backend(cache):
    k, v, bk, n = cache
    with pytest.raises(ValueError, match="backend"):
        pyfast.decode_attention(make_query(B, 4, D, torch.float32), k, v, n, backend="tpu")
