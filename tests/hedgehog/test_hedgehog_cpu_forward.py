"""The Hedgehog forward CPU kernels (pyfast._C.hedgehog_attention_cpu, linear_attention_cpu,
hedgehog_feature_map_cpu, hedgehog_decode_cpu) against the float64 spec
(pyfast/reference/hedgehog.py), on both CPU ISA paths (the best this CPU runs and the portable
one): causal and not, states in and out, GQA, packed segments, the window hybrid, odd T and head
sizes, the three dtypes, strided inputs, decode steps, NaN placement and extreme magnitudes.

These call the unchecked entry points directly (arguments in schema order); the registry op and
its argument checks come separately. Outputs are NaN-poisoned (tests/conftest.py), so an
unwritten element fails."""

import pytest
import torch

from hedgehog_cases import DTYPE_IDS, DTYPES, make_features, make_problem, make_state, shape_id
from pyfast import _C
from pyfast.reference import hedgehog as ref
from pyfast.testing import REL_TOL, assert_close, cpu_isa

ISAS = ("auto", "scalar")
EPS = 1e-6
STATE_TOL = REL_TOL[torch.float32]  # states are float32 whatever the input dtype


def attention(p, *, causal=True, window=0, scale=None):
    """pyfast._C.hedgehog_attention_cpu on a make_problem dict -> (out, S_T, z_T)."""
    s0, z0 = p.get("initial_state", (None, None))
    return _C.hedgehog_attention_cpu(p["q"], p["k"], p["v"], p["q_weight"], p["k_weight"], p.get("q_bias"),
                                     p.get("k_bias"), causal, EPS, s0, z0, window, p.get("alpha"), p.get("beta"),
                                     scale, p.get("cu_seqlens"))


def reference(p, *, causal=True, window=0, scale=None):
    """The spec on the same problem -> (out, (S_T, z_T) or None)."""
    kw = {n: p.get(n) for n in ("q_bias", "k_bias", "initial_state", "alpha", "beta", "cu_seqlens")}
    r = ref.hedgehog_attention(p["q"], p["k"], p["v"], p["q_weight"], p["k_weight"], causal=causal, eps=EPS,
                               return_state=window == 0, window=window, scale=scale, **kw)
    return r if window == 0 else (r, None)


def check(p, dtype, **kw):
    """The kernel on both ISA paths against one reference run; returns the output."""
    want, state = reference(p, **kw)
    for isa in ISAS:
        with cpu_isa(isa):
            out, s, z = attention(p, **kw)
        assert out.dtype == dtype and out.is_contiguous()
        assert_close(out, want, REL_TOL[dtype], f"out ({isa})")
        if state is None:
            assert s.shape == (0,) and z.shape == (0,)
        else:
            assert s.dtype == z.dtype == torch.float32
            assert_close(s, state[0], STATE_TOL, f"S_T ({isa})")
            assert_close(z, state[1], STATE_TOL, f"z_T ({isa})")
    return out


# (B, Hq, Hkv, T, D, F, Dv, initial state): odd T around the 64-token chunk, GQA 3 and 2, MQA,
# every D / F / Dv in {16, 24, 64, 72}. The last has one KV head for two or more threads: its
# query heads are split over work units that each rebuild the state (hedgehog_cpu.cpp).
SHAPES = [
    (2, 6, 2, 65, 16, 24, 72, True),
    (1, 4, 4, 130, 72, 64, 16, False),
    (3, 3, 1, 1, 24, 16, 24, True),
    (1, 4, 2, 63, 64, 72, 64, True),
    (1, 5, 1, 70, 16, 16, 24, True),
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", SHAPES, ids=shape_id)
def test_attention(case, dtype, causal):
    *shape, state = case
    check(make_problem(*shape, dtype, state=state), dtype, causal=causal)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_segments(dtype, causal):
    lengths = [1, 70, 0, 5, 64, 1, 29]  # uneven, length 1 and 0, across and exactly one chunk
    p = make_problem(1, 6, 2, sum(lengths), 24, 16, 24, dtype, state=True, lengths=lengths, bias=False)
    check(p, dtype, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("window", [1, 5, 64, 200])
def test_window(window, dtype):
    p = make_problem(1, 6, 2, 130, 24, 16, 72, dtype, window_weights=True)
    check(p, dtype, window=window, scale=0.3 if window == 5 else None)


@pytest.mark.parametrize("window", [1, 5, 100])
def test_window_segments(window):
    lengths = [1, 70, 4, 0, 66]
    p = make_problem(1, 4, 4, sum(lengths), 16, 24, 16, window_weights=True, lengths=lengths)
    check(p, torch.float32, window=window)


def strided(x: torch.Tensor) -> torch.Tensor:
    """The same values as a view whose only unit stride is the last dim: every other dim strided
    (T padded, B and H swapped in memory, the last dim cut from a wider buffer)."""
    b, h, t, d = x.shape
    buf = torch.full((h, b, t + 3, d + 5), float("nan"), dtype=x.dtype)
    view = buf.transpose(0, 1)[:, :, 1 : t + 1, 2 : d + 2]
    view.copy_(x)
    return view


@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_strided_inputs(dtype, window):
    p = make_problem(2, 4, 2, 70, 24, 16, 24, dtype, state=window == 0, window_weights=window > 0)
    for name in ("q", "k", "v"):
        p[name] = strided(p[name])
        assert p[name].stride(-1) == 1 and not p[name].is_contiguous()
    p["q_weight"] = p["q_weight"].transpose(1, 2).contiguous().transpose(1, 2)  # weights: any layout
    check(p, dtype, window=window)
    # A last dim that is not unit-stride is copied once by the host code.
    p["v"] = p["v"].transpose(2, 3).contiguous().transpose(2, 3)
    check(p, dtype, window=window)


# ----------------------------------------------------------------------------- linear attention


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", [(2, 6, 2, 65, 5, 72, False), (1, 2, 2, 130, 64, 16, True),
                                  (1, 3, 1, 70, 24, 24, True)], ids=shape_id)
def test_linear_attention(case, dtype, causal):
    b, hq, hkv, t, f, dv, segmented = case
    q = make_features(b, hq, t, f, seed=1).to(dtype)
    k = make_features(b, hkv, t, f, seed=2).to(dtype)
    v = torch.randn(b, hkv, t, dv).to(dtype)
    lengths = [1, 63, 0, 66] if segmented and t == 130 else [t - 1, 1] if segmented else None
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32) if lengths else None
    s0, z0 = make_state(len(lengths) if lengths else b, hkv, f, dv)
    want, (ws, wz) = ref.linear_attention(q, k, v, causal=causal, eps=EPS, initial_state=(s0, z0),
                                          return_state=True, cu_seqlens=cu)
    for isa in ISAS:
        with cpu_isa(isa):
            out, s, z = _C.linear_attention_cpu(q, k, v, causal, EPS, s0, z0, cu)
        assert_close(out, want, REL_TOL[dtype], f"out ({isa})")
        assert_close(s, ws, STATE_TOL, f"S_T ({isa})")
        assert_close(z, wz, STATE_TOL, f"z_T ({isa})")


# ----------------------------------------------------------------------------- feature map


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", [(2, 3, 65, 16, 24, True), (1, 2, 1, 72, 64, False), (1, 1, 130, 24, 72, True)],
                         ids=shape_id)
def test_feature_map(case, dtype):
    b, h, t, d, f, with_bias = case
    p = make_problem(b, h, h, t, d, f, 1, dtype)
    x, bias = strided(p["q"]), p["q_bias"] if with_bias else None
    want = ref.feature_map(x, p["q_weight"], bias)
    for isa in ISAS:
        with cpu_isa(isa):
            out = _C.hedgehog_feature_map_cpu(x, p["q_weight"], bias)
        assert out.dtype == dtype and out.shape == (b, h, t, 2 * f)
        assert_close(out, want, REL_TOL[dtype], f"features ({isa})")


# ----------------------------------------------------------------------------- decode


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("heads", [(6, 2), (4, 4)], ids=["gqa", "mha"])
def test_decode_steps_equal_attention_rows(heads, dtype):
    hq, hkv = heads
    t, f, dv = 9, 24, 72
    p = make_problem(2, hq, hkv, t, 16, f, dv, dtype, state=True)
    want, (ws, wz) = reference(p)
    for isa in ISAS:
        s, z = (x.clone() for x in p["initial_state"])
        s_ptr, z_ptr = s.data_ptr(), z.data_ptr()
        rows = []
        with cpu_isa(isa):
            for i in range(t):
                rows.append(_C.hedgehog_decode_cpu(p["q"][:, :, i], p["k"][:, :, i], p["v"][:, :, i], p["q_weight"],
                                                   p["k_weight"], p["q_bias"], p["k_bias"], s, z, EPS))
        assert rows[0].dtype == dtype and rows[0].shape == (2, hq, dv)
        assert_close(torch.stack(rows, 2), want, REL_TOL[dtype], f"rows ({isa})")
        assert s.data_ptr() == s_ptr and z.data_ptr() == z_ptr  # updated in place
        assert_close(s, ws, STATE_TOL, f"S ({isa})")
        assert_close(z, wz, STATE_TOL, f"z ({isa})")


# ----------------------------------------------------------------------------- NaN, magnitudes


@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("window", [0, 3])
def test_nan_reaches_only_where_the_reference_puts_it(window, where):
    lengths = [70, 60]
    p = make_problem(1, 4, 2, 130, 16, 16, 16, lengths=lengths, window_weights=window > 0)
    p[where][0, 1, 75, 3] = float("nan")  # token 5 of the second segment, head 1
    out = check(p, torch.float32, window=window)  # NaN exactly where the reference has it
    assert 0 < int(torch.isnan(out).sum()) < out.numel() // 4
    if window == 0:  # the final state of that segment and head only
        check(p, torch.float32, causal=False)


def test_extreme_magnitudes():
    p = make_problem(1, 2, 2, 70, 16, 16, 16)
    p["q"], p["k"] = p["q"] * 1e3, p["k"] * 1e3  # u ~ 1e3: the softmax must subtract its max
    want_phi, want = ref.feature_map(p["q"], p["q_weight"], p["q_bias"]), reference(p)[0]
    for isa in ISAS:
        with cpu_isa(isa):
            phi = _C.hedgehog_feature_map_cpu(p["q"], p["q_weight"], p["q_bias"])
            out, _, _ = attention(p)
        assert torch.isfinite(phi).all() and torch.isfinite(out).all()
        # u = x W is only as exact as fp32 makes it at |u| ~ 1e3: the features are off by 4e-6
        # (as plain fp32 PyTorch's are), the output by 1.4e-5, so 1e-4 instead of the usual 1e-5.
        assert_close(phi, want_phi, 1e-4, f"features ({isa})")
        assert_close(out, want, 1e-4, f"out ({isa})")


def test_long_bf16_sequence_stays_finite():
    t, tail = 65536, 64  # fp32 states and sums over 64k tokens
    p = make_problem(1, 2, 1, t, 16, 16, 16, torch.bfloat16)
    out, s, z = attention(p)
    assert torch.isfinite(out).all() and torch.isfinite(s).all() and torch.isfinite(z).all()
    assert_close(z.sum(-1), torch.full((1, 1), 2.0 * t), 1e-4, "z_T sums 2 per token")
    # The last rows: the spec over the tail, started from the kernel's state after the prefix.
    head = {n: x[:, :, : t - tail] if n in ("q", "k", "v") else x for n, x in p.items()}
    tail_p = {n: x[:, :, t - tail :] if n in ("q", "k", "v") else x for n, x in p.items()}
    _, s0, z0 = attention(head)
    tail_p["initial_state"] = (s0, z0)
    assert_close(out[:, :, t - tail :], reference(tail_p)[0], REL_TOL[torch.bfloat16])
