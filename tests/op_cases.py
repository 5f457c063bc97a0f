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


def _args_hedgehog():
    from hedgehog.hedgehog_cases import make_problem

    p = make_problem(1, 4, 2, 20, 16, 8, 12, lengths=[7, 13], state=True)
    s0, z0 = p.pop("initial_state")
    return dict(q=p["q"], k=p["k"], v=p["v"], q_weight=p["q_weight"], k_weight=p["k_weight"], q_bias=p["q_bias"],
                k_bias=p["k_bias"], causal=True, eps=1e-6, initial_S=s0, initial_z=z0, window=0, alpha=None,
                beta=None, scale=None, cu_seqlens=p["cu_seqlens"])


def _public_hedgehog(a, backend):
    return pyfast.hedgehog_attention(
        *(a[k] for k in ("q", "k", "v", "q_weight", "k_weight", "q_bias", "k_bias")),
        causal=a["causal"], eps=a["eps"], initial_state=None if a["initial_S"] is None else (a["initial_S"], a["initial_z"]),
        window=a["window"], alpha=a["alpha"], beta=a["beta"], scale=a["scale"], cu_seqlens=a["cu_seqlens"],
        backend=backend)


def _args_hedgehog_window():
    """hedgehog_attention with the sliding-window hybrid: no state, alpha and beta given."""
    from hedgehog.hedgehog_cases import make_problem

    p = make_problem(1, 4, 2, 20, 16, 8, 12, lengths=[7, 13], window_weights=True)
    return dict(q=p["q"], k=p["k"], v=p["v"], q_weight=p["q_weight"], k_weight=p["k_weight"], q_bias=p["q_bias"],
                k_bias=p["k_bias"], causal=True, eps=1e-6, initial_S=None, initial_z=None, window=5, alpha=p["alpha"],
                beta=p["beta"], scale=None, cu_seqlens=p["cu_seqlens"])


def _args_hedgehog_window_backward():
    """Its backward op's call: grad_out only (the hybrid returns no state)."""
    a = _args_hedgehog_window()
    return dict(grad_out=torch.randn(*a["q"].shape[:3], a["v"].shape[3]), grad_S=None, grad_z=None) | a


def _args_linear():
    a = _args_hedgehog()
    q, k = (pyfast.hedgehog_feature_map(a[x], a[f"{x}_weight"], a[f"{x}_bias"], backend="reference") for x in "qk")
    return dict(q=q, k=k, v=a["v"], causal=True, eps=1e-6, initial_S=a["initial_S"], initial_z=a["initial_z"],
                cu_seqlens=a["cu_seqlens"])


def _public_linear(a, backend):
    return pyfast.linear_attention(a["q"], a["k"], a["v"], causal=a["causal"], eps=a["eps"],
                                   initial_state=None if a["initial_S"] is None else (a["initial_S"], a["initial_z"]),
                                   cu_seqlens=a["cu_seqlens"], backend=backend)


def _with_grads(make):
    """A backward op's valid call: the forward's plus grad_out, grad_S, grad_z."""
    def args():
        a = make()
        n, hkv, width, dv = a["initial_S"].shape
        return dict(grad_out=torch.randn(*a["q"].shape[:3], dv), grad_S=torch.randn(n, hkv, width, dv),
                    grad_z=torch.randn(n, hkv, width)) | a
    return args


def _args_feature_map():
    a = _args_hedgehog()
    return dict(x=a["q"], weight=a["q_weight"], bias=a["q_bias"])


def _args_hedgehog_decode():
    from hedgehog.hedgehog_cases import make_problem, make_state

    p = make_problem(2, 4, 2, 1, 16, 8, 12)
    s, z = make_state(2, 2, 16, 12)
    return dict(q=p["q"][:, :, 0], k=p["k"][:, :, 0], v=p["v"][:, :, 0], q_weight=p["q_weight"],
                k_weight=p["k_weight"], q_bias=p["q_bias"], k_bias=p["k_bias"], S=s, z=z, eps=1e-6)


def _args_linear_bias_gelu():
    return dict(x=torch.randn(2, 3, 40), weight=torch.randn(24, 40), bias=torch.randn(24))


def _args_linear_bias_residual():
    return _args_linear_bias_gelu() | dict(residual=torch.randn(2, 3, 24))


def _raw(op):
    return lambda a, backend: _registry.REGISTRY[op].overload(*schema_order(op, a), backend=backend)


OPS = {  # op -> (valid call, the same call through pyfast.<op>(..., backend=backend))
    "hedgehog_feature_map": (_args_feature_map,
                             lambda a, backend: pyfast.hedgehog_feature_map(a["x"], a["weight"], a["bias"],
                                                                             backend=backend)),
    "linear_attention": (_args_linear, _public_linear),
    "linear_attention_backward": (_with_grads(_args_linear), _raw("linear_attention_backward")),
    "hedgehog_attention": (_args_hedgehog, _public_hedgehog),
    "hedgehog_attention_backward": (_with_grads(_args_hedgehog), _raw("hedgehog_attention_backward")),
    "hedgehog_decode": (
        _args_hedgehog_decode,
        lambda a, backend: pyfast.hedgehog_decode(*(a[k] for k in ("q", "k", "v", "q_weight", "k_weight", "q_bias",
                                                                  "k_bias")), state=(a["S"], a["z"]),
                                                  eps=a["eps"], backend=backend),
    ),
    "cherryq_matmul": (_args_cherryq, _public_cherryq),
    "linear_bias_gelu": (_args_linear_bias_gelu,
                         lambda a, backend: pyfast.lnfree.linear_bias_gelu(*a.values(), backend=backend)),
    "linear_bias_residual": (_args_linear_bias_residual,
                             lambda a, backend: pyfast.lnfree.linear_bias_residual(*a.values(), backend=backend)),
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
# More valid calls of some ops, for the opcheck / torch.compile tests (tests/test_registry.py):
# op -> {variant: (valid call, public entry point)}.
VARIANTS = {
    "hedgehog_attention": {"window": (_args_hedgehog_window, _public_hedgehog)},
    "hedgehog_attention_backward": {"window": (_args_hedgehog_window_backward, _raw("hedgehog_attention_backward"))},
}


def calls(op: str) -> dict:
    """{variant: (valid call, public entry point)} of `op`: OPS[op] as variant "" and its VARIANTS."""
    return {"": OPS[op], **VARIANTS.get(op, {})}
# Ops without a public function (called by another op's autograd): their "public" entry is the raw op.
INTERNAL = {"linear_attention_backward", "hedgehog_attention_backward"}
