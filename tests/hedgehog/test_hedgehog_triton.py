"""The Hedgehog Triton kernels (kernels/hedgehog.py) through the registry with backend="triton",
against the float64 spec (pyfast/reference/hedgehog.py): forward with fused feature maps (causal
and not, states in and out, GQA, packed segments with empty ones, the window hybrid), linear
attention of given features, NaN placement, and the backward of every tensor argument. Without
a GPU they run in the Triton interpreter (tests/conftest.py), so the shapes are small but odd:
T = 1, 63, 65, 130 around the interpreter's 16-token chunk, D / F / Dv not powers of two. Outputs
are NaN-poisoned (tests/conftest.py), so an unwritten element fails. The gradient test of every
backend (test_hedgehog_gradients.py) covers more gradient cases; the window hybrid's backward has
its own battery (test_hedgehog_hybrid_backward.py)."""

from __future__ import annotations

import pytest
import torch

import pyfast
from conftest import HAS_TRITON, device_for, tol
from hedgehog.hedgehog_cases import DTYPE_IDS, DTYPES, make_features, make_problem, make_state, shape_id, to64
from pyfast import _registry
from pyfast.reference import hedgehog as ref
from pyfast.testing import assert_close

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
DEVICE = device_for("triton")
EPS = 1e-6
OPTIONAL = ("q_bias", "k_bias", "alpha", "beta", "cu_seqlens")


def state_tol(dtype: torch.dtype) -> float:
    """fp32 states of 16-bit inputs: the keys' features enter K^T V rounded to the input dtype."""
    return tol(torch.float32, "triton") if dtype == torch.float32 else tol(dtype, "triton")


def on_device(p: dict) -> dict:
    return {k: tuple(x.to(DEVICE) for x in v) if isinstance(v, tuple) else v.to(DEVICE) for k, v in p.items()}


def run(p: dict, **kw):
    """pyfast.hedgehog_attention(backend="triton") and the spec on the problem p -> (out, state), (want, state)."""
    window = kw.get("window", 0)
    args = [p[n] for n in ("q", "k", "v", "q_weight", "k_weight")]
    extra = {n: p[n] for n in OPTIONAL if n in p}
    got = pyfast.hedgehog_attention(*on_device(dict(zip(range(5), args))).values(), **on_device(extra),
                                    initial_state=on_device(p)["initial_state"] if "initial_state" in p else None,
                                    return_state=window == 0, eps=EPS, backend="triton", **kw)
    want = ref.hedgehog_attention(*args, **extra, initial_state=p.get("initial_state"), return_state=window == 0,
                                  eps=EPS, **kw)
    return (got, want) if window == 0 else ((got, None), (want, None))


def check(p: dict, dtype: torch.dtype, **kw) -> torch.Tensor:
    (out, state), (want, want_state) = run(p, **kw)
    assert out.dtype == dtype and out.device.type == DEVICE.type
    assert_close(out, want, tol(dtype, "triton"), "out")
    if want_state is not None:
        for name, a, b in zip(("S_T", "z_T"), state, want_state):
            assert a.dtype == torch.float32
            assert_close(a, b, state_tol(dtype), name)
    return out


# (B, Hq, Hkv, T, D, F, Dv, initial state): GQA 2 and 3, MQA, odd sizes in 16..40.
SHAPES = [
    (2, 4, 2, 65, 16, 24, 20, True),
    (1, 3, 3, 1, 20, 16, 16, False),
    (1, 3, 1, 63, 24, 17, 33, True),
    (1, 2, 2, 130, 16, 16, 16, False),
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", SHAPES, ids=shape_id)
def test_forward(case, dtype, causal):
    *shape, state = case
    check(make_problem(*shape, dtype, state=state, bias=shape[3] != 63), dtype, causal=causal)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_segments(dtype, causal):
    lengths = [1, 33, 0, 16, 19, 0]  # length 1 and 0 (also last), exactly one chunk, across chunks
    check(make_problem(1, 4, 2, sum(lengths), 16, 16, 24, dtype, state=True, lengths=lengths), dtype, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("window", [1, 5, 20, 200])
def test_window(window, dtype):
    p = make_problem(1, 4, 2, 70, 24, 16, 20, dtype, window_weights=True)
    check(p, dtype, window=window, scale=0.3 if window == 5 else None)


def test_window_segments():
    lengths = [1, 40, 0, 29]
    p = make_problem(1, 2, 1, sum(lengths), 16, 16, 16, window_weights=True, lengths=lengths, bias=False)
    check(p, torch.float32, window=18)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_linear_attention(dtype, causal):
    q = make_features(1, 4, 50, 20, seed=1).to(dtype)
    k = make_features(1, 2, 50, 20, seed=2).to(dtype)
    v = torch.randn(1, 2, 50, 17).to(dtype)
    cu = torch.tensor([0, 1, 1, 50], dtype=torch.int32)
    s0, z0 = make_state(3, 2, 20, 17)
    want, (ws, wz) = ref.linear_attention(q, k, v, causal=causal, eps=EPS, initial_state=(s0, z0), return_state=True,
                                          cu_seqlens=cu)
    d = [x.to(DEVICE) for x in (q, k, v, s0, z0, cu)]
    out, (s, z) = pyfast.linear_attention(*d[:3], causal=causal, eps=EPS, initial_state=(d[3], d[4]),
                                          return_state=True, cu_seqlens=d[5], backend="triton")
    assert_close(out, want, tol(dtype, "triton"), "out")
    assert_close(s, ws, state_tol(dtype), "S_T")
    assert_close(z, wz, state_tol(dtype), "z_T")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", [(2, 3, 33, 20, 17), (1, 1, 1, 16, 16), (1, 2, 70, 130, 40)], ids=shape_id)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_feature_map(shape, dtype, bias):
    """The standalone feature map (the attention kernels compute it inline): odd T around the
    16-row tile, D above the 32-column slice, F not a power of two, a strided x (every other row)."""
    b, h, t, d, f = shape
    p = make_problem(b, h, h, 2 * t, d, f, 16, dtype, bias=bias)
    x = p["q"][:, :, ::2]
    got = pyfast.hedgehog_feature_map(x.to(DEVICE), p["q_weight"].to(DEVICE),
                                      p["q_bias"].to(DEVICE) if bias else None, backend="triton")
    want = ref.feature_map(x, p["q_weight"], p.get("q_bias"))
    assert got.dtype == dtype and got.shape == (b, h, t, 2 * f)
    assert_close(got, want, tol(dtype, "triton"), "phi")


@pytest.mark.parametrize("where", ["q", "k"])
@pytest.mark.parametrize("window", [0, 3])
def test_nan_reaches_only_where_the_reference_puts_it(window, where):
    """q, k: exact placement (masked with tl.where). A NaN in v also reaches the earlier rows of its
    chunk (0 x NaN in the masked tensor-core product), which the kernels' docstring states."""
    p = make_problem(1, 4, 2, 60, 16, 16, 16, lengths=[30, 30], window_weights=window > 0)
    p[where][0, 1, 37, 3] = float("nan")  # token 7 of the second segment
    out = check(p, torch.float32, window=window)
    assert out.isnan().any() and not out[:, :, :37].isnan().any()


# ----------------------------------------------------------------------------- backward


GRAD_TENSORS = ("q", "k", "v", "q_weight", "k_weight", "q_bias", "k_bias")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", [
    (2, 4, 2, 33, 16, 20, 17, dict(causal=True, state=True)),
    (1, 3, 1, 40, 20, 16, 24, dict(causal=False, state=True)),
    (1, 4, 2, 50, 16, 16, 16, dict(causal=True, state=True, lengths=[1, 0, 31, 18])),
    (1, 2, 2, 1, 16, 16, 16, dict(causal=True, state=True)),  # one token: dq is ~eps without a state
], ids=lambda c: shape_id(c[:7]) + "-" + "-".join(k for k, v in c[7].items() if v))
def test_backward(case, dtype):
    """Every gradient (q, k, v, weights, biases, initial S and z) through the registry's autograd with
    the returned state in the loss, against autograd of the float64 spec."""
    *shape, opts = case
    opts = dict(opts)
    causal = opts.pop("causal")
    p = make_problem(*shape, dtype, **opts)
    p64 = to64(p)
    leaves = {n: p[n].to(DEVICE).requires_grad_() for n in GRAD_TENSORS}
    leaves64 = {n: p64[n].requires_grad_() for n in GRAD_TENSORS}
    state = state64 = None
    if "initial_state" in p:
        state = tuple(s.to(DEVICE).requires_grad_() for s in p["initial_state"])
        state64 = tuple(s.requires_grad_() for s in p64["initial_state"])
    cu = p.get("cu_seqlens")
    out, (s, z) = pyfast.hedgehog_attention(*leaves.values(), causal=causal, eps=EPS, initial_state=state,
                                            return_state=True, cu_seqlens=None if cu is None else cu.to(DEVICE),
                                            backend="triton")
    out64, (s64, z64) = ref.hedgehog_attention(*leaves64.values(), causal=causal, eps=EPS, initial_state=state64,
                                               return_state=True, cu_seqlens=cu)
    g = torch.Generator().manual_seed(7)
    seeds = [torch.randn(x.shape, generator=g) for x in (out, s, z)]
    sum((x.float() * w.to(DEVICE)).sum() for x, w in zip((out, s, z), seeds)).backward()
    sum((x * w.double()).sum() for x, w in zip((out64, s64, z64), seeds)).backward()
    rtol = tol(dtype, "triton") * (3 if dtype == torch.float32 else 2)  # long reductions (weights: over B, T)
    named = list(zip(GRAD_TENSORS, leaves.values(), leaves64.values()))
    if state is not None:
        named += [("initial_S", state[0], state64[0]), ("initial_z", state[1], state64[1])]
    for name, a, b in named:
        assert a.grad is not None and a.grad.dtype == a.dtype, name
        assert_close(a.grad, b.grad, rtol, f"d{name}")


def test_backward_op_without_grad_state_and_nan():
    """The backward op alone: no grad_S / grad_z, no biases, no initial state (empty gradients);
    then a NaN in grad_out reaches exactly its own row of dq."""
    p = make_problem(1, 4, 2, 40, 16, 16, 16, bias=False)
    grad = torch.randn(1, 4, 40, 16)

    def call(backend, device):
        return _registry.REGISTRY["hedgehog_attention_backward"].overload(
            grad.to(device), None, None, *[p[n].to(device) for n in GRAD_TENSORS[:5]], None, None, True, EPS, None,
            None, 0, None, None, None, None, backend=backend)

    want, got = call("reference", "cpu"), call("triton", DEVICE)
    for name, a, b in zip(("dq", "dk", "dv", "dq_weight", "dk_weight"), got, want):
        assert_close(a, b, 3 * tol(torch.float32, "triton"), name)
    assert all(g.numel() == 0 for g in got[5:])
    grad[0, 3, 20, 5] = float("nan")
    nan = call("triton", DEVICE)[0].cpu().isnan()
    assert nan[0, 3, 20].all() and nan.sum() == nan[0, 3, 20].numel()


def test_default_on_cuda_is_triton():
    for op in ("hedgehog_feature_map", "linear_attention", "linear_attention_backward", "hedgehog_attention_backward"):
        assert _registry.REGISTRY[op].default_cuda() == "triton", op
