"""The backward of the sliding-window hybrid (hedgehog_attention with window > 0) on the kernel
backends ("cpu": csrc/hedgehog/hedgehog_bwd_kernel.h; "triton": kernels/hedgehog_hybrid.py, in the
interpreter without a GPU) through the registry's autograd, against torch.autograd of the float64
reference: every gradient (q, k, v, both weights and biases, alpha, beta), one battery for both.

The battery: windows 1, 5, 64 and wider than T; T = 1, 63, 65, 130 around the interpreter's
16-token chunk (and the CPU's 64); odd D / F / Dv; GQA 2 and 3; packed segments with empty ones;
fp32 / fp16 / bf16; alpha = 0 on the first head and beta = 0 on the last; runs of repeated keys, so
the band max is tied (torch.amax splits its gradient evenly over the tied keys: the key gradients
of the run differ from any single-argmax rule). Outputs and gradients the launchers allocate are
NaN-poisoned (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

import pyfast
from conftest import backends, device_for, tol
from hedgehog.hedgehog_cases import DTYPE_IDS, DTYPES, make_problem, to64
from pyfast import _registry
from pyfast.reference import hedgehog as ref
from pyfast.testing import assert_close

EPS = 1e-6
TENSORS = ("q", "k", "v", "q_weight", "k_weight", "q_bias", "k_bias", "alpha", "beta")

# (B, Hq, Hkv, T, D, F, Dv, window, segment lengths or None)
CASES = [
    (1, 4, 2, 65, 20, 17, 23, 5, None),
    (2, 3, 1, 63, 16, 16, 16, 1, None),
    (1, 2, 2, 130, 24, 16, 17, 64, None),
    (1, 2, 1, 40, 16, 24, 16, 200, None),  # wider than T: no linear part (the feature maps get no gradient)
    (1, 2, 2, 1, 16, 16, 16, 5, None),
    (1, 4, 2, 70, 16, 16, 20, 7, [1, 0, 33, 36, 0]),
]


def _case_id(c):
    *shape, window, lengths = c
    return "-".join(map(str, shape)) + f"-w{window}" + ("" if lengths is None else f"-seg{len(lengths)}")


def hybrid_problem(case, dtype):
    """make_problem with alpha = 0 on head 0, beta = 0 on the last head, and a run of equal keys
    (tokens 10..17 of every sequence or segment long enough, all KV heads) so bands tie at the max."""
    *shape, window, lengths = case
    p = make_problem(*shape, dtype, seed=shape[3] + window, window_weights=True, lengths=lengths)
    p["alpha"][0] = 0.0
    p["beta"][-1] = 0.0
    starts = [0] if lengths is None else torch.tensor([0, *lengths]).cumsum(0)[:-1].tolist()
    for s0, n in zip(starts, [shape[3]] if lengths is None else lengths):
        if n > 17:
            p["k"][:, :, s0 + 10 : s0 + 18] = p["k"][:, :, s0 + 10 : s0 + 11]
    return p, window


@pytest.mark.parametrize("backend", backends("hedgehog_attention", only=("cpu", "triton")))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_hybrid_gradients(case, dtype, backend):
    _check_gradients(*hybrid_problem(case, dtype), dtype, backend)


@pytest.mark.parametrize("backend", backends("hedgehog_attention", only=("cpu", "triton")))
def test_hybrid_gradients_strided(backend):
    """q, k, v as [B, H, T, D] views of [B, T, H, D] memory (token stride H * D, head stride D), as a
    model's projections hand them over: the shifted query views of the linear part walk those strides."""
    p, window = hybrid_problem(CASES[0], torch.float32)
    for n in ("q", "k", "v"):
        p[n] = p[n].transpose(1, 2).contiguous().transpose(1, 2)
        assert not p[n].is_contiguous()
    _check_gradients(p, window, torch.float32, backend)


def _check_gradients(p, window, dtype, backend):
    """Every gradient of hedgehog_attention(window) on `backend` against autograd of the float64 spec."""
    device = device_for(backend)
    cu = p.get("cu_seqlens")
    leaves64 = {n: x.requires_grad_() for n, x in to64({n: p[n] for n in TENSORS}).items()}
    leaves = {n: p[n].to(device).requires_grad_() for n in TENSORS}
    kw = dict(causal=True, eps=EPS, window=window, scale=0.3 if window == 5 else None)
    out = pyfast.hedgehog_attention(*(leaves[n] for n in TENSORS[:7]), alpha=leaves["alpha"], beta=leaves["beta"],
                                    cu_seqlens=None if cu is None else cu.to(device), backend=backend, **kw)
    out64 = ref.hedgehog_attention(*(leaves64[n] for n in TENSORS[:7]), alpha=leaves64["alpha"],
                                   beta=leaves64["beta"], cu_seqlens=cu, **kw)
    # The seed in out's dtype: the gradient the backward receives is rounded to it, so the reference
    # gets the same one (dalpha sums differences of nearly equal terms: a rounded gradient alone
    # moved it by 2-3e-2 in fp16 with window 64, on the CPU kernel as on Triton).
    seed = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    (out * seed.to(device)).sum().backward()
    (out64 * seed.double()).sum().backward()
    rtol = tol(dtype, backend) * (3 if dtype == torch.float32 else 2)  # as the window-0 backward tests
    for name in TENSORS:
        got, want = leaves[name].grad, leaves64[name].grad
        assert got is not None and got.dtype == leaves[name].dtype, name
        if want is None:  # unused by the reference (the feature maps when the window covers every key)
            assert not got.any(), f"d{name} should be zero"
            continue
        assert_close(got, want, rtol, f"d{name}")


@pytest.mark.parametrize("backend", backends("hedgehog_attention", only=("cpu", "triton")))
def test_backward_op_without_alpha_beta(backend):
    """The backward op alone: alpha and beta absent (ones; their gradients empty), no biases, GQA 2;
    then a NaN in grad_out reaches exactly its own row of dq."""
    p = make_problem(1, 4, 2, 50, 16, 16, 16, bias=False)
    grad = torch.randn(1, 4, 50, 16)
    device = device_for(backend)

    def call(backend, device):
        return _registry.REGISTRY["hedgehog_attention_backward"].overload(
            grad.to(device), None, None, *[p[n].to(device) for n in TENSORS[:5]], None, None, True, EPS, None, None, 6,
            None, None, None, None, backend=backend)

    want, got = call("reference", "cpu"), call(backend, device)
    for name, a, b in zip(("dq", "dk", "dv", "dq_weight", "dk_weight"), got, want):
        assert_close(a, b, 3 * tol(torch.float32, backend), name)
    assert all(g.numel() == 0 for g in got[5:])
    grad[0, 1, 40, 3] = float("nan")
    nan = call(backend, device)[0].cpu().isnan()
    assert nan[0, 1, 40].all() and nan.sum() == nan[0, 1, 40].numel()
