"""The Hedgehog CUDA C++ kernels (csrc/hedgehog/hedgehog_cuda.cu: decode step and fused
tensor-core forward) against the float64 spec, through the registry with backend="cuda": on a GPU
(id "cuda") and under the CPU emulation of csrc/emu (id "cuda_emu", every machine). Odd T around
the 64-token chunk, odd D / F / Dv (masks, several u tiles and Dv tiles), GQA, packed segments,
initial and returned states, NaN-poisoned outputs (tests/conftest.py), NaN placement, and what the
kernels refuse (the default rule then picks Triton). Emulated runs are slow: small shapes."""

from __future__ import annotations

import pytest
import torch

import pyfast
from conftest import backends, device_for
from hedgehog_cases import DTYPE_IDS, DTYPES, make_problem, make_state, shape_id
from pyfast.hedgehog.ops import DECODE_OP, HEDGEHOG_OP, cuda_unsupported
from pyfast.reference import hedgehog as ref
from pyfast.testing import REL_TOL, assert_close

EPS = 1e-6
HALF = (torch.float16, torch.bfloat16)
# States are float32 sums of tensor-core products of float16 / bfloat16 features (rounded once):
# their error is that of the input dtype, not float32's.
STATE_TOL = REL_TOL[torch.bfloat16]


def _on(p: dict, device) -> dict:
    def conv(x):
        if isinstance(x, tuple):
            return tuple(conv(y) for y in x)
        return x.to(device) if isinstance(x, torch.Tensor) else x
    return {k: conv(v) for k, v in p.items()}


def _forward(p, backend, causal):
    kw = {n: p.get(n) for n in ("q_bias", "k_bias", "initial_state", "cu_seqlens")}
    return pyfast.hedgehog_attention(p["q"], p["k"], p["v"], p["q_weight"], p["k_weight"], causal=causal, eps=EPS,
                                     return_state=True, backend=backend, **kw)


def _check_forward(p, backend, causal):
    want, (ws, wz) = ref.hedgehog_attention(
        p["q"], p["k"], p["v"], p["q_weight"], p["k_weight"], p.get("q_bias"), p.get("k_bias"), causal=causal,
        eps=EPS, initial_state=p.get("initial_state"), return_state=True, cu_seqlens=p.get("cu_seqlens"))
    out, (s, z) = _forward(_on(p, device_for(backend)), backend, causal)
    dtype = p["q"].dtype
    assert out.dtype == dtype and s.dtype == z.dtype == torch.float32
    assert_close(out, want, REL_TOL[dtype], "out")
    assert_close(s, ws, STATE_TOL, "S_T")
    assert_close(z, wz, STATE_TOL, "z_T")
    return out


cuda_backend = pytest.mark.parametrize("backend", backends("hedgehog_attention", only=("cuda",)))

# (B, Hq, Hkv, T, D, F, Dv, initial state): T across 1-3 chunks of 64 and odd; D, F, Dv odd and
# spanning several k steps (D), u tiles of 32 (F = 40, 72) and Dv tiles of 32 (Dv = 40, 72); GQA 3, 2, 4.
FORWARD_SHAPES = [
    (1, 3, 1, 70, 24, 16, 40, True),
    (2, 2, 2, 13, 17, 33, 16, False),
    (1, 4, 2, 129, 40, 72, 24, True),
    (1, 4, 1, 64, 16, 24, 72, True),
]


@cuda_backend
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("dtype", HALF, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", FORWARD_SHAPES, ids=shape_id)
def test_forward(backend, case, dtype, causal):
    *shape, state = case
    _check_forward(make_problem(*shape, dtype, seed=shape[3], state=state), backend, causal)


@cuda_backend
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_forward_segments(backend, causal):
    lengths = [1, 70, 0, 5, 64]  # length 1 and 0, across and exactly one chunk
    p = make_problem(1, 4, 2, sum(lengths), 16, 16, 24, torch.bfloat16, state=True, lengths=lengths, bias=False)
    _check_forward(p, backend, causal)


@cuda_backend
def test_forward_strided_inputs(backend):
    p = make_problem(2, 2, 1, 40, 16, 16, 16, torch.float16, state=True)
    for name in ("q", "k", "v"):  # B and H swapped in memory, T padded, the last dim cut from a wider row
        x = p[name]
        buf = torch.full((x.shape[1], x.shape[0], x.shape[2] + 3, x.shape[3] + 5), float("nan"), dtype=x.dtype)
        view = buf.transpose(0, 1)[:, :, 1:-2, 2:-3]
        view.copy_(x)
        p[name] = view
    _check_forward(p, backend, True)


@cuda_backend
@pytest.mark.parametrize("where", ["q", "k"])
def test_forward_nan_placement(backend, where):
    """A NaN in q at token s reaches out row s only; in k, rows >= s and the state (causal)."""
    p = make_problem(1, 2, 1, 80, 16, 16, 16, torch.bfloat16)
    p[where][0, 0, 37, 3] = float("nan")
    out = _check_forward(p, backend, True)  # assert_close requires NaN exactly where the reference has it
    assert out.isnan().any()


# The state S is a float32 sum over every token plus the initial state, far outside float16's
# range (65504) for long sequences; the kernel stages it for the tensor cores under a power-of-two
# scale. State ~1e6 (z too, so that the outputs stay in float16's range): staged unscaled it
# overflows to inf. State and v ~1e-6 (S stays tiny): staged unscaled it goes subnormal in float16
# (relative error 2e-2 .. 6e-2 measured; 3e-3 .. 5e-3 scaled up); the scale, chosen from the tiny
# initial state first, must follow S as the chunks change it.
@cuda_backend
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("state_mag, v_mag", [(1e6, 1.0), (1e-6, 1e-6)], ids=["1e6", "1e-6"])
def test_forward_float16_state_range(backend, state_mag, v_mag, causal):
    p = make_problem(1, 2, 1, 150, 24, 40, 40, torch.float16, seed=3, state=True)
    s0, z0 = p["initial_state"]
    p["initial_state"] = (s0 * state_mag, z0 * state_mag)
    p["v"] = (p["v"].float() * v_mag).to(torch.float16)
    _check_forward(p, backend, causal)


def _decode(p, s, z, backend):
    return pyfast.hedgehog_decode(p["q"][:, :, 0], p["k"][:, :, 0], p["v"][:, :, 0], p["q_weight"], p["k_weight"],
                                  p.get("q_bias"), p.get("k_bias"), state=(s, z), eps=EPS, backend=backend)


# (B, Hq, Hkv, D, F, Dv): GQA 1, 3 and 10 (two chunks of 8 heads), odd sizes, F up to 256 (a thread
# per feature), Dv past one 32-column block.
DECODE_SHAPES = [(2, 3, 3, 24, 16, 40), (1, 6, 2, 17, 33, 16), (1, 10, 1, 16, 256, 72), (3, 2, 1, 72, 20, 24)]


@pytest.mark.parametrize("backend", backends("hedgehog_decode", only=("cuda",)))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", DECODE_SHAPES, ids=shape_id)
def test_decode(backend, case, dtype):
    b, hq, hkv, d, f, dv = case
    p = make_problem(b, hq, hkv, 1, d, f, dv, dtype, seed=d)
    s, z = make_state(b, hkv, 2 * f, dv)
    ws, wz = s.double(), z.double()
    want = ref.hedgehog_decode(p["q"][:, :, 0], p["k"][:, :, 0], p["v"][:, :, 0], p["q_weight"], p["k_weight"],
                               p["q_bias"], p["k_bias"], state=(ws, wz), eps=EPS)
    dev = device_for(backend)
    s, z = s.to(dev), z.to(dev)
    out = _decode(_on(p, dev), s, z, backend)
    assert out.dtype == dtype
    assert_close(out, want, REL_TOL[dtype], "out")
    assert_close(s, ws, REL_TOL[torch.float32], "S (in place)")  # float32 FMA path: state exact to fp32
    assert_close(z, wz, REL_TOL[torch.float32], "z (in place)")


@pytest.mark.parametrize("backend", backends("hedgehog_decode", only=("cuda",)))
def test_decode_steps_continue_the_forward(backend):
    """Decoding token by token from the forward's returned state gives the forward's last rows."""
    p = make_problem(1, 4, 2, 70, 16, 16, 24, torch.bfloat16, seed=5)
    dev = device_for(backend)
    pd = _on(p, dev)
    full = pyfast.hedgehog_attention(pd["q"], pd["k"], pd["v"], pd["q_weight"], pd["k_weight"], pd["q_bias"],
                                     pd["k_bias"], backend=backend)
    head = {n: x[:, :, :67] if n in "qkv" else x for n, x in pd.items()}
    _, (s, z) = pyfast.hedgehog_attention(head["q"], head["k"], head["v"], pd["q_weight"], pd["k_weight"],
                                          pd["q_bias"], pd["k_bias"], return_state=True, backend=backend)
    for t in range(67, 70):
        step = {n: x[:, :, t:t + 1] if n in "qkv" else x for n, x in pd.items()}
        assert_close(_decode(step, s, z, backend), full[:, :, t], REL_TOL[torch.bfloat16], f"token {t}")


@pytest.mark.parametrize("backend", backends("hedgehog_decode", only=("cuda",)))
def test_decode_nan_stays_in_its_kv_group(backend):
    p = make_problem(1, 4, 2, 1, 16, 16, 16, torch.float32)
    p["k"][0, 1, 0, 2] = float("nan")  # KV head 1: query heads 2 and 3
    s, z = make_state(1, 2, 32, 16)
    dev = device_for(backend)
    s, z = s.to(dev), z.to(dev)
    out = _decode(_on(p, dev), s, z, backend).cpu()
    assert not out[0, :2].isnan().any() and out[0, 2:].isnan().all()
    assert not s[0, 0].isnan().any() and s[0, 1].isnan().all()


def _args(dtype=torch.bfloat16, window=0, f=16, lengths=None):
    t = 10 if lengths is None else sum(lengths)
    p = make_problem(1, 2, 1, t, 16, f, 16, dtype, lengths=lengths)
    return [p["q"], p["k"], p["v"], p["q_weight"], p["k_weight"], None, None, True, EPS, None, None, window, None,
            None, None, p.get("cu_seqlens")]


@pytest.mark.parametrize("backend", backends("hedgehog_attention", only=("cuda",)))
@pytest.mark.parametrize("change, exc, name", [
    (dict(dtype=torch.float32), TypeError, "q"),
    (dict(window=3), ValueError, "window"),
    (dict(f=257), ValueError, r"q_weight\.shape\[2\] \(F\)"),
])
def test_forward_refuses_what_it_does_not_cover(backend, change, exc, name):
    """The registry's error for backend="cuda", nothing run; backend=None on CUDA tensors picks
    Triton for the same arguments (when it is there)."""
    a = _args(**change)
    assert cuda_unsupported("hedgehog_attention", a) is not None
    a_pub = dict(window=a[11])
    with pytest.raises(exc, match=rf"^pyfast\.hedgehog_attention: expected {name} "):
        pyfast.hedgehog_attention(*(x.to(device_for(backend)) for x in a[:5]), causal=True, backend=backend, **a_pub)
    want = "triton" if "triton" in HEDGEHOG_OP.impls else "cuda"
    assert HEDGEHOG_OP.default_cuda(*a) == want


def test_default_rule(monkeypatch):
    """CUDA C++ where the build has it and it covers the arguments (meta tensors: no GPU needed)."""
    from pyfast import _ops

    monkeypatch.setattr(_ops, "has_cuda_kernels", lambda: True)
    assert HEDGEHOG_OP.default_cuda(*_args()) == "cuda"
    assert HEDGEHOG_OP.default_cuda(*_args(lengths=[3, 7])) == "cuda"
    fallback = "triton" if "triton" in HEDGEHOG_OP.impls else "cuda"
    assert HEDGEHOG_OP.default_cuda(*_args(dtype=torch.float32)) == fallback
    q = torch.empty(1, 2, 16, device="meta")
    dec = [q, q[:, :1], q[:, :1], torch.empty(2, 16, 8, device="meta"), torch.empty(1, 16, 8, device="meta")]
    assert DECODE_OP.default_cuda(*dec, None, None, None, None, EPS) == "cuda"
    monkeypatch.setattr(_ops, "has_cuda_kernels", lambda: False)
    assert DECODE_OP.default_cuda(*dec, None, None, None, None, EPS) == ("triton" if "triton" in DECODE_OP.impls
                                                                          else "cuda")
