"""The CPU backward kernels pyfast._C.hedgehog_attention_backward_cpu and
linear_attention_backward_cpu against torch.autograd through the float64 reference
(pyfast/reference/hedgehog.py): random grad_out (and grad_S, grad_z for a returned state), every
gradient compared by relative error (fp32 1e-5, fp16/bf16 1e-2), over causal/non-causal, states,
GQA, packed segments (uneven, length 1 and 0), the window hybrid (window 1, 5, > T), odd T
(1, 63, 65, 130) and head dims, strided inputs, both ISA levels and the checkpointed state path.

The kernel entry points are unchecked and take the op schema's arguments in order:
hedgehog: (grad_out, grad_S, grad_z, q, k, v, q_weight, k_weight, q_bias, k_bias, causal, eps,
initial_S, initial_z, window, alpha, beta, scale, cu_seqlens) -> [dq, dk, dv, dq_weight, dk_weight,
dq_bias, dk_bias, dinitial_S, dinitial_z, dalpha, dbeta]; linear: (grad_out, grad_S, grad_z, q, k,
v, causal, eps, initial_S, initial_z, cu_seqlens) -> [dq, dk, dv, dinitial_S, dinitial_z]."""

import contextlib

import pytest
import torch

from hedgehog_cases import DTYPE_IDS, make_features, make_problem, make_state, shape_id, to64
from pyfast import _C
from pyfast.reference import hedgehog as ref
from pyfast.testing import REL_TOL, assert_close, cpu_isa

EPS = 1e-6
HH_NAMES = ("q", "k", "v", "q_weight", "k_weight", "q_bias", "k_bias", "initial_S", "initial_z", "alpha", "beta")
LIN_NAMES = ("q", "k", "v", "initial_S", "initial_z")
ISAS = ["scalar"] + (["avx512"] if _C.build_info()["cpu_isa"] != "scalar" else [])

# (B, Hq, Hkv, T, D, F, Dv): T = 1, 63, 65, 130 around the 64-token chunk; head dims 16/24/64 and
# odd ones (tails of the 16-lane vectors); GQA ratios 1, 2, 3.
SHAPES = [
    (2, 2, 2, 1, 16, 16, 16),
    (2, 2, 2, 63, 16, 24, 64),
    (1, 4, 2, 65, 24, 16, 24),
    (1, 3, 1, 130, 64, 64, 16),
    (2, 6, 2, 70, 9, 5, 3),
]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _grad_out(shape, dtype, seed):
    return torch.randn(*shape, generator=_gen(seed)).to(dtype)


def _reference_grads(fn, inputs: dict, kwargs: dict, grad_out, grad_state=None) -> dict:
    """{name: gradient} of sum(out * grad_out) (+ S_T * grad_S + z_T * grad_z) through the float64
    reference `fn`; zeros for an input the output does not depend on."""
    leaves = {n: x.detach().double().requires_grad_() for n, x in inputs.items() if x is not None}
    kw = dict(kwargs)
    if "initial_S" in leaves:
        kw["initial_state"] = (leaves["initial_S"], leaves["initial_z"])
    for n in ("alpha", "beta"):
        if n in leaves:
            kw[n] = leaves[n]
    pos = [leaves.get(n) for n in ("q", "k", "v", "q_weight", "k_weight", "q_bias", "k_bias") if n in inputs]
    out = fn(*pos, **kw)
    loss = 0
    if grad_state is not None:
        out, (s, z) = out
        loss = (s.double() * grad_state[0].double()).sum() + (z.double() * grad_state[1].double()).sum()
    loss = loss + (out.double() * grad_out.double()).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return {n: torch.zeros_like(x) if g is None else g for (n, x), g in zip(leaves.items(), grads)}


def _check(got: list, names, inputs: dict, want: dict, dtype) -> None:
    assert len(got) == len(names)
    for name, g in zip(names, got):
        x = inputs.get(name)
        if x is None:
            assert g is None, f"{name}: expected no gradient for an absent argument"
            continue
        assert g.dtype == x.dtype and g.shape == x.shape, f"{name}: {g.dtype} {tuple(g.shape)} vs input {x.dtype} {tuple(x.shape)}"
        assert_close(g, want[name], REL_TOL[g.dtype], name)


def _hedgehog_case(p: dict, *, causal=True, window=0, scale=None, return_state=False, state=True, seed=0, eps=EPS):
    """Runs the kernel and the reference on the problem dict of make_problem; checks every gradient."""
    q, v = p["q"], p["v"]
    inputs = {n: p.get(n) for n in HH_NAMES[:7]}
    init = p.get("initial_state") if state else None
    inputs["initial_S"], inputs["initial_z"] = init if init is not None else (None, None)
    inputs["alpha"], inputs["beta"] = p.get("alpha"), p.get("beta")
    b, hq, t, _ = q.shape
    go = _grad_out((b, hq, t, v.shape[-1]), v.dtype, seed + 10)
    gst = None
    if return_state:
        n = b if "cu_seqlens" not in p else p["cu_seqlens"].numel() - 1
        gst = make_state(n, p["k"].shape[1], 2 * p["q_weight"].shape[-1], v.shape[-1], seed=seed + 20)
        gst = (gst[0], torch.randn(gst[1].shape, generator=_gen(seed + 21)))  # grad_z of either sign
    kw = dict(causal=causal, eps=eps, return_state=return_state, window=window, scale=scale,
              cu_seqlens=p.get("cu_seqlens"))
    want = _reference_grads(ref.hedgehog_attention, inputs, kw, go, gst)
    got = _C.hedgehog_attention_backward_cpu(
        go, *(gst if gst else (None, None)), *(inputs[n] for n in HH_NAMES[:7]), causal, eps,
        inputs["initial_S"], inputs["initial_z"], window, inputs["alpha"], inputs["beta"], scale, p.get("cu_seqlens"))
    _check(got, HH_NAMES, inputs, want, q.dtype)


def _linear_case(b, hq, hkv, t, f2, dv, dtype, *, causal=True, state=False, return_state=False, lengths=None, seed=0,
                 eps=EPS):
    q = make_features(b, hq, t, f2, seed=seed, dtype=dtype)
    k = make_features(b, hkv, t, f2, seed=seed + 1, dtype=dtype)
    v = torch.randn(b, hkv, t, dv, generator=_gen(seed + 2)).to(dtype)
    cu = None
    if lengths is not None:
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    n = b if lengths is None else len(lengths)
    init = make_state(n, hkv, f2, dv, seed=seed + 3) if state else (None, None)
    inputs = dict(q=q, k=k, v=v, initial_S=init[0], initial_z=init[1])
    go = _grad_out((b, hq, t, dv), dtype, seed + 4)
    gst = make_state(n, hkv, f2, dv, seed=seed + 5) if return_state else None
    kw = dict(causal=causal, eps=eps, return_state=return_state, cu_seqlens=cu)
    want = _reference_grads(ref.linear_attention, inputs, kw, go, gst)
    got = _C.linear_attention_backward_cpu(go, *(gst if gst else (None, None)), q, k, v, causal, eps, *init, cu)
    _check(got, LIN_NAMES, inputs, want, dtype)


def _eps(t, state):
    """T = 1 without an initial state: out = v up to eps, so the queries' gradient is O(eps), in fp32
    only the rounding of a difference of O(1) terms; a large eps makes it a real gradient."""
    return 0.1 if t == 1 and not state else EPS


@contextlib.contextmanager
def _block_chunks(n):
    _C.set_hedgehog_backward_block_chunks(n)
    try:
        yield
    finally:
        _C.set_hedgehog_backward_block_chunks(0)


# ----------------------------------------------------------------------------- hedgehog_attention


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("state", [False, True], ids=["nostate", "state"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_hedgehog_backward(shape, causal, state, dtype):
    """Every gradient, with (initial state and returned state's gradient) or without states."""
    p = make_problem(*shape, dtype, seed=1, state=state)
    _hedgehog_case(p, causal=causal, return_state=state, eps=_eps(shape[3], state))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("which", ["initial", "returned"])
def test_hedgehog_backward_one_state_side(which, causal):
    """An initial state without a returned state's gradient, and the reverse; no biases."""
    p = make_problem(2, 4, 2, 65, 16, 24, 16, seed=2, state=which == "initial", bias=False)
    _hedgehog_case(p, causal=causal, return_state=which == "returned")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_hedgehog_backward_cu_seqlens(causal, dtype):
    """Packed segments of uneven lengths, including 1 and 0 tokens; a state per segment."""
    lengths = [1, 64, 1, 0, 37, 27]
    p = make_problem(1, 6, 2, sum(lengths), 24, 16, 24, dtype, seed=3, state=True, lengths=lengths)
    _hedgehog_case(p, causal=causal, return_state=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("window", [1, 5, 64, 137])
@pytest.mark.parametrize("case", [(1, 4, 2, 130, 16, 24, 16, None), (2, 3, 3, 63, 24, 16, 64, None),
                                  (1, 6, 3, 130, 16, 16, 24, [1, 70, 2, 57])], ids=shape_id)
def test_hedgehog_backward_window(case, window, dtype):
    """The sliding-window hybrid (causal): window 1 (the softmax part of one key), 5, 64 (one chunk),
    and more than T (no linear part: the weights' gradients are zero); alpha, beta, scale given."""
    *shape, lengths = case
    p = make_problem(*shape, dtype, seed=4, lengths=lengths, window_weights=True)
    _hedgehog_case(p, window=window, scale=0.3)


def test_hedgehog_backward_window_defaults():
    """alpha, beta and scale absent (ones, 1/sqrt(D)): no dalpha/dbeta outputs."""
    p = make_problem(1, 2, 1, 70, 16, 16, 16, seed=5)
    _hedgehog_case(p, window=7)


def test_hedgehog_backward_alpha_beta_unused_without_window():
    """window = 0: alpha, beta do not enter the output, their gradients are zero."""
    p = make_problem(1, 2, 2, 65, 16, 16, 16, seed=6, window_weights=True)
    _hedgehog_case(p)


def test_hedgehog_backward_strided_inputs():
    """Heads-major views of [B, T, H, D] tensors, a T slice, and a last dim of stride 2 (copied)."""
    b, hq, hkv, t, d, f, dv = 2, 4, 2, 65, 16, 24, 16
    p = make_problem(b, hq, hkv, t, d, f, dv, seed=7, state=True)
    g = _gen(8)
    p["q"] = torch.randn(b, t, hq, d, generator=g).transpose(1, 2)
    p["k"] = torch.randn(b, hkv, t + 9, d, generator=g)[:, :, 5 : 5 + t]
    p["v"] = torch.randn(b, hkv, t, 2 * dv, generator=g)[..., ::2]
    p["q_weight"] = torch.randn(hq, f, d, generator=g).transpose(1, 2) * d**-0.5
    assert not p["q"].is_contiguous() and p["v"].stride(-1) == 2
    _hedgehog_case(p, return_state=True)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", [dict(causal=True), dict(causal=False), dict(window=5)], ids=["causal", "noncausal", "window"])
def test_hedgehog_backward_isa(isa, case):
    """The portable kernel and the AVX-512 one (where the CPU has it) on odd dims and fp16 loads."""
    for dtype in (torch.float32, torch.float16):
        p = make_problem(1, 4, 2, 70, 9, 5, 3, dtype, seed=9, state="window" not in case,
                         window_weights="window" in case)
        with cpu_isa(isa):
            _hedgehog_case(p, return_state="window" not in case, state="window" not in case, **case)


@pytest.mark.parametrize("window", [0, 5], ids=["linear", "window"])
@pytest.mark.parametrize("chunks", [1, 3], ids=["one_chunk", "three_chunks"])
def test_hedgehog_backward_checkpointed_states(chunks, window):
    """Sequences longer than a block of kept chunk states: blocks recomputed from checkpoints (1 chunk
    per block; 3 chunks per block with a shorter last block), segments of several lengths; with
    states, or the window hybrid (whose linear part walks the same blocks)."""
    lengths = [260, 1, 130]
    p = make_problem(1, 2, 1, sum(lengths), 16, 24, 16, seed=10, state=window == 0, lengths=lengths,
                     window_weights=window > 0)
    with _block_chunks(chunks):
        _hedgehog_case(p, return_state=window == 0, state=window == 0, window=window)


# ----------------------------------------------------------------------------- linear_attention


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("state", [False, True], ids=["nostate", "state"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("shape", [(2, 2, 2, 63, 16, 64), (1, 6, 2, 130, 24, 7), (3, 3, 1, 1, 5, 16)], ids=shape_id)
def test_linear_attention_backward(shape, causal, state, dtype):
    """Features given directly (no feature map): dq, dk, dv, the initial state's gradients."""
    _linear_case(*shape, dtype, causal=causal, state=state, return_state=state, eps=_eps(shape[3], state))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_linear_attention_backward_cu_seqlens(causal):
    lengths = [1, 65, 0, 3, 61]
    _linear_case(1, 4, 2, sum(lengths), 16, 24, torch.float32, causal=causal, state=True, return_state=True,
                 lengths=lengths)
