"""Bad input, enumerated per op and run against every entry point that can run here.

Each op has one valid call (schema order) and a table of mutations with the exception type and the
argument the message must name. Every entry point must raise that same type with a message
`pyfast.<op>: expected <argument> ...`, before any kernel runs, leaving written tensors unchanged:
  public           pyfast.<op>(...)                       (default backend)
  public:<b>       pyfast.<op>(..., backend=b)            for every backend that runs here
  op               torch.ops.pyfast.<op>(...)             (the dispatcher: CPU key, or Meta/fake)
  op:<b>           torch.ops.pyfast.<op>(..., backend=b)
Mutations that only a Python caller can make (a float where the schema says int, an object that is
not a tensor) are `binding` cases: torch's own argument parser rejects them for the raw op with
its RuntimeError, so they run against the public entry points only (docs/design.md § Rules).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import op_cases
import pyfast
from pyfast import _registry

BACKENDS = op_cases.BACKENDS


@dataclasses.dataclass
class Case:
    id: str
    mutate: callable  # dict of named args -> None (edits in place)
    error: type
    names: str  # the argument the message names
    binding: bool = False  # a Python-only mutation (public entry points only)


def _set(**kw):
    return lambda a: a.update(kw)


def _edit(name, fn):
    def mutate(a):
        a[name] = fn(a[name], a)

    return mutate


def _cherry_idx_unsorted(a):
    idx = a["cherry_idx"].clone()
    idx[0] = idx[0].flip(0)
    a["cherry_idx"] = idx


def _code_under_cherry(a):
    q = a["qweight"].clone()
    q[0] = -1  # every code of row 0 becomes 7, the cherries' included
    a["qweight"] = q


CHERRYQ_CASES = [
    Case("x_last_dim", _edit("x", lambda t, a: t[:, :100]), ValueError, r"x\.shape\[-1\]"),
    Case("x_int", _edit("x", lambda t, a: t.int()), TypeError, "x"),
    Case("x_double", _edit("x", lambda t, a: t.double()), TypeError, "x"),
    Case("x_0d", _edit("x", lambda t, a: t[0, 0]), ValueError, "x"),
    Case("bias_shape", _edit("bias", lambda t, a: t[:5]), ValueError, "bias"),
    Case("bias_int", _edit("bias", lambda t, a: t.int()), TypeError, "bias"),
    Case("qweight_shape", _edit("qweight", lambda t, a: t[:, :-1].contiguous()), ValueError, "qweight"),
    Case("qweight_strided", _edit("qweight", lambda t, a: t.t().contiguous().t()), ValueError, "qweight"),
    Case("scales_dtype", _edit("scales", lambda t, a: t.float()), TypeError, "scales"),
    Case("scales_no_group", _edit("scales", lambda t, a: t[:, :0]), ValueError, "scales"),
    Case("zeros_shape", _edit("zeros", lambda t, a: t[:-1]), ValueError, "zeros"),
    Case("cherry_idx_dtype", _edit("cherry_idx", lambda t, a: t.long()), TypeError, "cherry_idx"),
    Case("cherry_idx_range", _edit("cherry_idx", lambda t, a: torch.full_like(t, 10**6)), ValueError, "cherry_idx"),
    Case("cherry_idx_negative", _edit("cherry_idx", lambda t, a: t - 1000), ValueError, "cherry_idx"),
    Case("cherry_idx_unsorted", _cherry_idx_unsorted, ValueError, "cherry_idx"),
    Case("cherry_idx_duplicate", _edit("cherry_idx", lambda t, a: t[:, :1].expand_as(t).contiguous()),
         ValueError, "cherry_idx"),
    Case("code_under_cherry", _code_under_cherry, ValueError, "qweight"),
    Case("cherry_val_shape", _edit("cherry_val", lambda t, a: t[:, :0]), ValueError, "cherry_val"),
    Case("bits", _set(bits=5), ValueError, "bits"),
    Case("group_size", _set(group_size=48), ValueError, "group_size"),
    Case("meta_x", _edit("x", lambda t, a: t.to("meta")), ValueError, "qweight"),
    Case("meta_bias", _edit("bias", lambda t, a: t.to("meta")), ValueError, "bias"),
    Case("scales_requires_grad", _edit("scales", lambda t, a: t.float().half().requires_grad_()), ValueError,
         "scales"),  # the packed weights are frozen: a gradient for them would silently be None
    Case("x_sparse_layout", _edit("x", lambda t, a: t.to_sparse()), TypeError, "x"),
    Case("bits_float", _set(bits=3.0), TypeError, "bits", binding=True),
    Case("group_size_str", _set(group_size="64"), TypeError, "group_size", binding=True),
    Case("x_list", _edit("x", lambda t, a: t.tolist()), TypeError, "x", binding=True),
]


def _seqlens(*values):
    return _set(cache_seqlens=torch.tensor(values, dtype=torch.int32))


def _grad_q(a):
    a["q"] = a["q"].clone().requires_grad_()


ATTENTION_CASES = [  # decode_attention and sparse_decode_attention
    Case("hq_not_multiple", _edit("q", lambda t, a: t[:, :3]), ValueError, r"q\.shape\[1\]"),
    Case("head_dim", _edit("q", lambda t, a: torch.randn(2, 4, 17)), ValueError, r"q\b"),
    Case("q_dtype", _edit("q", lambda t, a: t.half()), TypeError, r"q\b"),
    Case("v_shape", _edit("v_cache", lambda t, a: t[:, :, :-1]), ValueError, "v_cache"),
    Case("seqlens_dtype", _edit("cache_seqlens", lambda t, a: t.long()), TypeError, "cache_seqlens"),
    Case("seqlens_zero", _seqlens(0, 5), ValueError, "cache_seqlens"),
    Case("seqlens_too_long", _seqlens(65, 5), ValueError, "cache_seqlens"),
    Case("seqlens_strided", _edit("cache_seqlens", lambda t, a: torch.stack([t, t], 1)[:, 0]), ValueError,
         "cache_seqlens"),
    Case("cache_3d", _edit("k_cache", lambda t, a: t[0]), ValueError, "k_cache"),
    Case("cache_int", _edit("k_cache", lambda t, a: t.int()), TypeError, "k_cache"),
    Case("meta_q", _edit("q", lambda t, a: t.to("meta")), ValueError, "k_cache"),
    Case("meta_seqlens", _edit("cache_seqlens", lambda t, a: t.to("meta")), ValueError, "cache_seqlens"),
    Case("q_requires_grad", _grad_q, ValueError, r"q\b"),
    Case("q_sparse_layout", _edit("q", lambda t, a: t.to_sparse()), TypeError, r"q\b"),
    Case("scale_too_large", _set(scale=10**400), ValueError, "scale", binding=True),
    Case("q_list", _edit("q", lambda t, a: t.tolist()), TypeError, r"q\b", binding=True),
    Case("scale_str", _set(scale="0.1"), TypeError, "scale", binding=True),
]

SPARSE_OPTION_CASES = [
    Case("block_keys_shape", _edit("block_keys", lambda t, a: t[:, :, :-1]), ValueError, "block_keys"),
    Case("block_keys_dtype", _edit("block_keys", lambda t, a: t.half()), TypeError, "block_keys"),
    Case("topk", _set(topk=-1), ValueError, "topk"),
    Case("sink_blocks", _set(sink_blocks=-2), ValueError, "sink_blocks"),
    Case("local_blocks", _set(local_blocks=-1), ValueError, "local_blocks"),
    Case("block_size", _set(block_size=0), ValueError, "block_size"),
    Case("topk_huge", _set(topk=2**63), ValueError, "topk", binding=True),
    Case("topk_float", _set(topk=4.0), TypeError, "topk", binding=True),
]


def _append_overlapping_new(a):  # k_new is a view of k_cache's memory
    a["k_new"] = a["k_cache"][:, :, 40:60]


def _append_numpy_alias(a):  # two from_numpy views of one array: distinct storages, same memory
    buf = a["k_cache"].numpy()
    a["k_cache"], a["k_new"] = torch.from_numpy(buf), torch.from_numpy(buf[:, :, 40:60])


def _append_interleaved_cache(a):  # head 1 is head 0 shifted by one token: rows written twice
    a["k_cache"] = torch.zeros(1100).as_strided((2, 2, 64, 16), (0, 16, 16, 1)).clone().as_strided(
        (2, 2, 64, 16), (1100 // 2, 16, 16, 1))


APPEND_CASES = [
    Case("past_tmax", _edit("k_new", lambda t, a: torch.randn(2, 2, 30, 16)), ValueError, "v_new"),
    Case("past_tmax_values", lambda a: a.update(k_new=torch.randn(2, 2, 30, 16), v_new=torch.randn(2, 2, 30, 16)),
         ValueError, "cache_seqlens"),
    Case("tn_over_tmax", lambda a: a.update(k_new=torch.randn(2, 2, 100, 16), v_new=torch.randn(2, 2, 100, 16)),
         ValueError, "k_new"),
    Case("new_dtype", _edit("k_new", lambda t, a: t.half()), TypeError, "k_new"),
    Case("new_shape", _edit("v_new", lambda t, a: t[:, :, :-1]), ValueError, "v_new"),
    Case("block_keys", _edit("block_keys", lambda t, a: t[..., :-1]), ValueError, "block_keys"),
    Case("negative_len", _seqlens(-1, 3), ValueError, "cache_seqlens"),
    Case("expanded_seqlens", _edit("cache_seqlens", lambda t, a: t[:1].expand(2)), ValueError, "cache_seqlens"),
    Case("expanded_cache", _edit("v_cache", lambda t, a: t[:1].expand(2, -1, -1, -1)), ValueError, "v_cache"),
    Case("cache_strided", _edit("k_cache", lambda t, a: torch.cat([t, t], -1)[..., ::2]), ValueError, "k_cache"),
    Case("v_is_k", lambda a: a.update(v_cache=a["k_cache"]), ValueError, "k_cache not to share memory with v_cache"),
    Case("block_keys_in_k_cache", lambda a: a.update(block_keys=a["k_cache"][:, :, :4]), ValueError,
         "k_cache not to share memory with block_keys"),
    Case("k_new_overlaps_cache", _append_overlapping_new, ValueError, "k_cache not to share memory with k_new"),
    Case("meta_k_new", _edit("k_new", lambda t, a: t.to("meta")), ValueError, "k_new"),
    Case("k_new_numpy_alias", _append_numpy_alias, ValueError, "k_cache not to share memory with k_new"),
    Case("interleaved_cache", _append_interleaved_cache, ValueError, "k_cache without overlapping"),
    Case("k_new_requires_grad", _edit("k_new", lambda t, a: t.clone().requires_grad_()), ValueError, "k_new"),
    Case("k_cache_requires_grad", _edit("k_cache", lambda t, a: t.clone().requires_grad_()), ValueError,
         "k_cache"),
    Case("block_size_float", _set(block_size=16.0), TypeError, "block_size", binding=True),
]

def _hedgehog_batch2(a):
    a.update({n: torch.cat([a[n], a[n]]) for n in ("q", "k", "v")})


def _state_sharing_memory(a):  # z is a view into S's storage
    a["z"] = a["S"].view(-1)[: a["z"].numel()].view_as(a["z"])


HEDGEHOG_QKV_CASES = [  # linear_attention, hedgehog_attention and their backward ops
    Case("q_int", _edit("q", lambda t, a: t.int()), TypeError, r"q\b"),
    Case("q_3d", _edit("q", lambda t, a: t[0]), ValueError, r"q\b"),
    Case("k_dtype", _edit("k", lambda t, a: t.double()), TypeError, r"k\b"),
    Case("hkv_not_divisor", _edit("k", lambda t, a: torch.cat([t, t[:, :1]], 1)), ValueError, r"k\.shape\[1\]"),
    Case("k_length", _edit("k", lambda t, a: t[:, :, :-1]), ValueError, r"k\b"),
    Case("v_length", _edit("v", lambda t, a: t[:, :, :-1]), ValueError, r"v\b"),
    Case("eps_negative", _set(eps=-1.0), ValueError, "eps"),
    Case("eps_nan", _set(eps=float("nan")), ValueError, "eps"),
    Case("state_half", _set(initial_z=None), ValueError, "initial_S and initial_z"),
    Case("state_shape", _edit("initial_S", lambda t, a: t[:, :, :-1]), ValueError, "initial_S"),
    Case("state_dtype", _edit("initial_z", lambda t, a: t.double()), TypeError, "initial_z"),
    Case("cu_seqlens_dtype", _edit("cu_seqlens", lambda t, a: t.long()), TypeError, "cu_seqlens"),
    Case("cu_seqlens_end", _edit("cu_seqlens", lambda t, a: t - torch.tensor([0, 0, 1], dtype=t.dtype)),
         ValueError, "cu_seqlens"),
    Case("cu_seqlens_falling", _edit("cu_seqlens", lambda t, a: torch.tensor([0, 15, 7, 20], dtype=t.dtype)),
         ValueError, "initial_S"),  # 3 segments: the state (for 2) is checked first
    Case("cu_seqlens_batch", _hedgehog_batch2, ValueError, r"q\.shape\[0\] \(B\)"),
    Case("meta_v", _edit("v", lambda t, a: t.to("meta")), ValueError, r"v\b"),
    Case("q_sparse_layout", _edit("q", lambda t, a: t.to_sparse()), TypeError, r"q\b"),
    Case("eps_str", _set(eps="1e-6"), TypeError, "eps", binding=True),
    Case("q_list", _edit("q", lambda t, a: t.tolist()), TypeError, r"q\b", binding=True),
]

HEDGEHOG_OPTION_CASES = [  # hedgehog_attention and its backward op
    Case("q_weight_d", _edit("q_weight", lambda t, a: t[:, :-1]), ValueError, "q_weight"),
    Case("q_weight_dtype", _edit("q_weight", lambda t, a: t.half()), TypeError, "q_weight"),
    Case("k_weight_f", _edit("k_weight", lambda t, a: t[..., :-1]), ValueError, "k_weight"),
    Case("k_weight_heads", _edit("k_weight", lambda t, a: t[:1]), ValueError, "k_weight"),
    Case("k_bias_shape", _edit("k_bias", lambda t, a: t[:, :-1]), ValueError, "k_bias"),
    Case("window_negative", _set(window=-1, initial_S=None, initial_z=None), ValueError, "window"),
    Case("window_noncausal", _set(window=4, causal=False, initial_S=None, initial_z=None), ValueError, "window"),
    Case("window_with_state", _set(window=4), ValueError, "initial_state"),
    Case("alpha_shape", _set(alpha=torch.ones(3)), ValueError, "alpha"),
    Case("beta_dtype", _set(beta=torch.ones(4, dtype=torch.float16)), TypeError, "beta"),
    Case("scale_inf", _set(scale=float("inf")), ValueError, "scale"),
    Case("window_float", _set(window=4.0), TypeError, "window", binding=True),
]

HEDGEHOG_GRAD_CASES = [  # the backward ops
    Case("grad_out_shape", _edit("grad_out", lambda t, a: t[..., :-1]), ValueError, "grad_out"),
    Case("grad_out_dtype", _edit("grad_out", lambda t, a: t.double()), TypeError, "grad_out"),
    Case("grad_state_half", _set(grad_z=None), ValueError, "grad_S and grad_z"),
    Case("grad_S_shape", _edit("grad_S", lambda t, a: t[1:]), ValueError, "grad_S"),
]

HEDGEHOG_DECODE_CASES = [
    Case("q_4d", _edit("q", lambda t, a: t[:, :, None]), ValueError, r"q\b"),
    Case("hkv_not_divisor", _edit("k", lambda t, a: torch.cat([t, t[:, :1]], 1)), ValueError, r"k\.shape\[1\]"),
    Case("v_batch", _edit("v", lambda t, a: t[:1]), ValueError, r"v\b"),
    Case("k_weight_f", _edit("k_weight", lambda t, a: t[..., :-1]), ValueError, "k_weight"),
    Case("S_shape", _edit("S", lambda t, a: t[..., :-1]), ValueError, r"S\b"),
    Case("S_dtype", _edit("S", lambda t, a: t.double()), TypeError, r"S\b"),
    Case("z_strided", _edit("z", lambda t, a: torch.cat([t, t], -1)[..., ::2]), ValueError, r"z\b"),
    Case("z_in_S", _state_sharing_memory, ValueError, "S not to share memory with z"),
    Case("q_requires_grad", _grad_q, ValueError, r"q\b"),
    Case("eps_negative", _set(eps=-1e-3), ValueError, "eps"),
]

OPS = {  # op -> (valid call, public entry point, bad-input cases)
    "hedgehog_feature_map": (*op_cases.OPS["hedgehog_feature_map"], [
        Case("x_int", _edit("x", lambda t, a: t.int()), TypeError, r"x\b"),
        Case("x_3d", _edit("x", lambda t, a: t[0]), ValueError, r"x\b"),
        Case("weight_heads", _edit("weight", lambda t, a: t[:1]), ValueError, "weight"),
        Case("weight_dtype", _edit("weight", lambda t, a: t.double()), TypeError, "weight"),
        Case("bias_shape", _edit("bias", lambda t, a: t[:, 1:]), ValueError, "bias"),
    ]),
    "linear_attention": (*op_cases.OPS["linear_attention"], HEDGEHOG_QKV_CASES),
    "linear_attention_backward": (*op_cases.OPS["linear_attention_backward"],
                                  [c for c in HEDGEHOG_QKV_CASES if not c.binding] + HEDGEHOG_GRAD_CASES),
    "hedgehog_attention": (*op_cases.OPS["hedgehog_attention"], HEDGEHOG_QKV_CASES + HEDGEHOG_OPTION_CASES),
    "hedgehog_attention_backward": (*op_cases.OPS["hedgehog_attention_backward"],
                                    [c for c in HEDGEHOG_QKV_CASES + HEDGEHOG_OPTION_CASES if not c.binding]
                                    + HEDGEHOG_GRAD_CASES),
    "hedgehog_decode": (*op_cases.OPS["hedgehog_decode"], HEDGEHOG_DECODE_CASES),
    "cherryq_matmul": (*op_cases.OPS["cherryq_matmul"], CHERRYQ_CASES),
    "decode_attention": (*op_cases.OPS["decode_attention"], ATTENTION_CASES),
    "sparse_decode_attention": (*op_cases.OPS["sparse_decode_attention"], ATTENTION_CASES + SPARSE_OPTION_CASES),
    "append_kv": (*op_cases.OPS["append_kv"], APPEND_CASES),
}

def entry_points(op: str) -> list[str]:
    """The default entry points, and each with every backend of `op` that runs here."""
    impls = _registry.REGISTRY[op].impls
    return ["public", "op"] + [f"{e}:{b}" for e in ("public", "op") for b in BACKENDS if b in impls]


def _params():
    for op, (_, _, cases) in OPS.items():
        for case in cases:
            for entry in entry_points(op):
                if case.binding and (entry.startswith("op") or op in op_cases.INTERNAL):
                    continue
                yield pytest.param(op, case, entry, id=f"{op}-{case.id}-{entry}")


@pytest.mark.parametrize("op, case, entry", list(_params()))
def test_bad_input(op, case, entry):
    make, public, _ = OPS[op]
    a = make()
    valid_written = {a_name: a[a_name].clone() for i, a_name in enumerate(_registry.REGISTRY[op].arg_names)
                     if i in _registry.REGISTRY[op].written}
    case.mutate(a)
    kind, _, backend = entry.partition(":")
    backend = backend or None
    written = [(n, a[n]) for n in valid_written if isinstance(a[n], torch.Tensor) and a[n].device.type == "cpu"]
    before = [(n, t.clone()) for n, t in written]
    with pytest.raises(case.error, match=rf"^pyfast\.{op}: expected {case.names}"):
        if kind == "public":
            public(a, backend)
        else:
            _registry.REGISTRY[op].overload(*op_cases.schema_order(op, a), backend=backend)
    for (name, t), (_, want) in zip(written, before):
        assert torch.equal(t, want) or (t.isnan() == want.isnan()).all(), f"{name} was written"


@pytest.mark.parametrize("op", list(OPS))
def test_valid_call_passes_every_entry_point(op):
    """The table's valid call is valid: every entry point accepts it (so each case fails for its
    mutation alone)."""
    make, public, _ = OPS[op]
    for entry in entry_points(op):
        a = make()
        kind, _, backend = entry.partition(":")
        if kind == "public":
            public(a, backend or None)
        else:
            _registry.REGISTRY[op].overload(*op_cases.schema_order(op, a), backend=backend or None)


@pytest.mark.parametrize("op", list(OPS))
def test_unknown_and_unavailable_backend(op, monkeypatch):
    make, public, _ = OPS[op]
    with pytest.raises(ValueError, match=rf"^pyfast\.{op}: expected backend one of"):
        public(make(), "tpu")
    for wrong in () if op in op_cases.INTERNAL else (5, b"cpu"):
        with pytest.raises(TypeError, match=rf"^pyfast\.{op}: expected backend None or one of"):
            public(make(), wrong)
    if "cuda" in _registry.REGISTRY[op].impls:
        with pytest.raises(ValueError, match=rf"^pyfast\.{op}: expected tensors on a CUDA device"):
            public(make(), "cuda")
    if "triton" not in _registry.REGISTRY[op].impls:
        return
    import pyfast.kernels._utils as triton_utils

    monkeypatch.setattr(triton_utils, "INTERPRETED", False)  # as on a machine without a GPU driver
    with pytest.raises(ValueError, match=rf"^pyfast\.{op}: expected backend 'triton' only with"):
        public(make(), "triton")


@pytest.mark.parametrize("op", list(OPS))
def test_all_meta_follows_meta_semantics(op):
    """Every tensor on the meta device: the fake impl runs the rules and returns meta outputs."""
    make, _, _ = OPS[op]
    a = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in make().items()}
    out = _registry.REGISTRY[op].overload(*op_cases.schema_order(op, a))
    assert all(t.device.type == "meta" for t in (() if out is None else out if isinstance(out, tuple) else (out,)))
