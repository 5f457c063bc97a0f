"""One valid call of every registered op, as {schema argument name: value}, and an adapter that
makes the same call through the op's public function. Shared by tests/test_errors.py (which
mutates the valid call) and tests/test_registry.py (opcheck, torch.compile, dispatch)."""

from __future__ import annotations

import torch

import pyfast
from pyfast import _registry
from pyfast.cherryq.format import CherryQWeight

HAS_TRITON = pyfast.build_info()["triton"]
# Every backend that runs here (Triton through its interpreter on a CPU-only machine).
BACKENDS = [b for b in ("cpu", "reference", "triton") if b != "triton" or HAS_TRITON]
if torch.cuda.is_available():
    BACKENDS.append("cuda")


def schema_order(op: str, a: dict) -> list:
    return [a[name] for name in _registry.REGISTRY[op].arg_names]


def _args_cherryq():
    qw = pyfast.cherryq_quantize(torch.randn(24, 128), bits=3, group_size=64, cherries_per_row=3)
    return dict(x=torch.randn(2, 128), qweight=qw.qweight, scales=qw.scales, zeros=qw.zeros,
                cherry_idx=qw.cherry_idx, cherry_val=qw.cherry_val, bias=torch.randn(24), bits=3, group_size=64)


def _public_cherryq(a, backend):
    fields = ("qweight", "scales", "zeros", "cherry_idx", "cherry_val", "bits", "group_size")
    qw = CherryQWeight(*(a[f] for f in fields))
    return pyfast.cherryq_matmul(a["x"], qw, a["bias"], backend=backend)


def _args_cache():
    from sparse.sparse_cases import make_cache, make_query

    k, v, bk, n = make_cache(2, 2, 64, 16, torch.float32, lengths=[40, 9])
    return dict(q=make_query(2, 4, 16, torch.float32), k_cache=k.nan_to_num(), v_cache=v.nan_to_num(),
                cache_seqlens=n, block_keys=bk.nan_to_num())


def _args_decode():
    a = _args_cache()
    del a["block_keys"]
    return a | dict(scale=None)


def _args_sparse():
    return _args_cache() | dict(block_size=16, topk=4, sink_blocks=1, local_blocks=1, scale=None)


def _args_append():
    a = _args_cache()
    del a["q"]
    return a | dict(k_new=torch.randn(2, 2, 20, 16), v_new=torch.randn(2, 2, 20, 16), block_size=16)


OPS = {  # op -> (valid call, the same call through pyfast.<op>(..., backend=backend))
    "cherryq_matmul": (_args_cherryq, _public_cherryq),
    "decode_attention": (
        _args_decode,
        lambda a, backend: pyfast.decode_attention(*list(a.values())[:4], scale=a["scale"], backend=backend),
    ),
    "sparse_decode_attention": (
        _args_sparse,
        lambda a, backend: pyfast.sparse_decode_attention(
            *list(a.values())[:5], **{k: a[k] for k in ("block_size", "topk", "sink_blocks", "local_blocks", "scale")},
            backend=backend),
    ),
    "append_kv": (
        _args_append,
        lambda a, backend: pyfast.append_kv(*(a[k] for k in ("k_cache", "v_cache", "block_keys", "cache_seqlens",
                                                              "k_new", "v_new")),
                                            block_size=a["block_size"], backend=backend),
    ),
}
assert set(OPS) == set(_registry.REGISTRY), "every registered op needs a valid call here"
