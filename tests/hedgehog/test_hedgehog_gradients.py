"""Gradients of hedgehog_attention and linear_attention through the op registry's autograd (the
backward ops, on each kernel backend) against torch.autograd of the float64 reference, for every
tensor argument: q, k, v, both weights and biases, alpha/beta and the initial state."""

from __future__ import annotations

import pytest
import torch

import pyfast
from conftest import backends, tol
from hedgehog.hedgehog_cases import DTYPE_IDS, make_problem, to64
from pyfast.reference import hedgehog as ref
from pyfast.testing import assert_close

# (B, Hq, Hkv, T, D, F, Dv, options): odd sizes, T across chunks of 64, GQA, packed segments.
CASES = [
    (2, 3, 3, 13, 16, 8, 12, dict(causal=True)),
    (1, 4, 2, 70, 16, 16, 16, dict(causal=True, state=True)),
    (2, 2, 1, 67, 24, 8, 16, dict(causal=False, state=True)),
    (1, 4, 2, 90, 16, 8, 8, dict(causal=True, state=True, lengths=[1, 40, 49])),
    (1, 4, 2, 75, 16, 8, 12, dict(causal=True, window=5, window_weights=True)),
    (1, 2, 2, 40, 16, 8, 8, dict(causal=True, window=64, window_weights=True, lengths=[17, 23])),
]
TENSORS = ("q", "k", "v", "q_weight", "k_weight", "q_bias", "k_bias", "alpha", "beta")


def _case_id(c):
    b, hq, hkv, t, d, f, dv, o = c
    return f"{b}-{hq}-{hkv}-{t}-{d}-{f}-{dv}-" + "-".join(f"{k}{v if not isinstance(v, list) else len(v)}"
                                                         for k, v in o.items())


def _run(p, state, fn, **kw):
    """out, (S, z) and a loss with random seeds for all three, from the problem dict `p`."""
    args = {k: p[k] for k in TENSORS[:5]}
    extra = {k: p[k] for k in ("q_bias", "k_bias", "alpha", "beta", "cu_seqlens") if k in p}
    out = fn(**args, **extra, initial_state=state, return_state=kw.get("window", 0) == 0, **kw)
    return out if isinstance(out, tuple) else (out, None)


@pytest.mark.parametrize("backend", backends("hedgehog_attention"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_hedgehog_attention_gradients(backend, dtype, case):
    b, hq, hkv, t, d, f, dv, opts = case
    opts = dict(opts)
    causal, window = opts.pop("causal"), opts.pop("window", 0)
    p = make_problem(b, hq, hkv, t, d, f, dv, dtype, seed=t, **opts)
    p64 = to64(p)
    leaves, leaves64 = {}, {}
    for name in TENSORS:
        if name in p:
            p[name] = leaves[name] = p[name].detach().requires_grad_()
            p64[name] = leaves64[name] = p64[name].detach().requires_grad_()
    state = state64 = None
    if "initial_state" in p:
        state = tuple(s.detach().requires_grad_() for s in p.pop("initial_state"))
        state64 = tuple(s.detach().requires_grad_() for s in p64.pop("initial_state"))
    if backend == "cuda" and (dtype == torch.float32 or window > 0):  # outside the CUDA C++ forward's coverage
        with pytest.raises((TypeError, ValueError), match=r"^pyfast\.hedgehog_attention: expected .* with backend='cuda'"):
            _run(p, state, pyfast.hedgehog_attention, causal=causal, window=window, backend=backend)
        return
    g = torch.Generator().manual_seed(1)
    out, st = _run(p, state, pyfast.hedgehog_attention, causal=causal, window=window, backend=backend)
    out64, st64 = _run(p64, state64, ref.hedgehog_attention, causal=causal, window=window)
    seed = torch.randn(out.shape, generator=g)
    loss, loss64 = (out.float() * seed).sum(), (out64 * seed.double()).sum()
    if st is not None:
        s_seed, z_seed = torch.randn(st[0].shape, generator=g), torch.randn(st[1].shape, generator=g)
        loss = loss + (st[0] * s_seed).sum() + (st[1] * z_seed).sum()
        loss64 = loss64 + (st64[0] * s_seed.double()).sum() + (st64[1] * z_seed.double()).sum()
    loss.backward()
    loss64.backward()
    rtol = tol(dtype, backend) * (3 if dtype == torch.float32 else 2)  # long reductions (sum over B, T)
    for name, leaf in list(leaves.items()) + ([("initial_S", state[0]), ("initial_z", state[1])] if state else []):
        want = leaves64[name].grad if name in leaves64 else (state64[0] if name == "initial_S" else state64[1]).grad
        assert leaf.grad is not None, f"no gradient for {name}"
        assert leaf.grad.dtype == leaf.dtype, name
        if want is None:  # unused by the reference (e.g. the feature maps when the window covers all)
            assert not leaf.grad.any(), f"d{name} should be zero"
            continue
        assert_close(leaf.grad, want, rtol, f"d{name}")


@pytest.mark.parametrize("backend", backends("linear_attention"))
@pytest.mark.parametrize("causal", [True, False])
def test_linear_attention_gradients(backend, causal):
    g = torch.Generator().manual_seed(3)
    q, k = torch.rand(1, 4, 70, 12, generator=g), torch.rand(1, 2, 70, 12, generator=g)
    v = torch.randn(1, 2, 70, 9, generator=g)
    s0, z0 = torch.randn(2, 2, 12, 9, generator=g), torch.rand(2, 2, 12, generator=g) + 0.5
    cu = torch.tensor([0, 33, 70], dtype=torch.int32)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, s0, z0)]
    leaves64 = [t.double().requires_grad_() for t in (q, k, v, s0, z0)]
    out, (s, z) = pyfast.linear_attention(*leaves[:3], causal=causal, initial_state=tuple(leaves[3:]),
                                          return_state=True, cu_seqlens=cu, backend=backend)
    out64, (s64, z64) = ref.linear_attention(*leaves64[:3], causal=causal, initial_state=tuple(leaves64[3:]),
                                             return_state=True, cu_seqlens=cu)
    seeds = [torch.randn(x.shape, generator=g) for x in (out, s, z)]
    sum(((x * w).sum() for x, w in zip((out, s, z), seeds))).backward()
    sum(((x * w.double()).sum() for x, w in zip((out64, s64, z64), seeds))).backward()
    for name, a, b in zip(("q", "k", "v", "initial_S", "initial_z"), leaves, leaves64):
        assert_close(a.grad, b.grad, 3 * tol(torch.float32, backend), f"d{name}")
