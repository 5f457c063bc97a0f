"""The spec checks itself: the vectorized forms against the per-token / per-query loops, the
decode step against the attention rows, the window hybrid's two parts against torch's softmax
attention and a masked quadratic form, linear attention against flash-linear-attention's naive
PyTorch implementation (an independent oracle), gradients, NaN propagation and the rejected
arguments."""

import importlib.util
import pathlib

import pytest
import torch
import torch.nn.functional as F

from hedgehog_cases import SHAPES, cu_seqlens, make_features, make_problem, make_state, shape_id, to64
from pyfast.reference import hedgehog as ref
from pyfast.testing import assert_close

TOL = 1e-12  # float64 against float64


def _close_state(got, want, tol=TOL):
    assert_close(got[0], want[0], tol, "S")
    assert_close(got[1], want[1], tol, "z")


# ----------------------------------------------------------------------------- feature map


def test_feature_map_matches_loop_and_is_two_softmaxes():
    p = make_problem(2, 3, 3, 7, 5, 4, 2, torch.float64)
    phi = ref.feature_map(p["q"], p["q_weight"], p["q_bias"])
    assert phi.shape == (2, 3, 7, 8) and phi.dtype == torch.float64
    assert_close(phi, ref.feature_map_loop(p["q"], p["q_weight"], p["q_bias"]), TOL)
    assert_close(phi[..., :4].sum(-1), torch.ones(2, 3, 7, dtype=torch.float64), TOL, "first half sums to 1")
    assert_close(phi[..., 4:].sum(-1), torch.ones(2, 3, 7, dtype=torch.float64), TOL, "second half sums to 1")
    u = torch.einsum("bhtd,hdf->bhtf", p["q"], p["q_weight"])  # no bias: u = x @ W[h]
    assert_close(ref.feature_map(p["q"], p["q_weight"]), torch.cat([u.softmax(-1), (-u).softmax(-1)], -1), TOL)
    assert ref.hedgehog_feature_map is ref.feature_map
    assert ref.feature_map(p["q"].float(), p["q_weight"].float()).dtype == torch.float32


# ----------------------------------------------------------------------------- linear attention


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("state", [False, True], ids=["nostate", "state"])
@pytest.mark.parametrize("heads", [(3, 3), (6, 2)], ids=["mha", "gqa"])
def test_linear_attention_forms_agree(causal, state, heads):
    hq, hkv = heads
    b, t, f, dv = 2, 67, 5, 3  # T across the 64-token prefix-sum chunk
    q, k = make_features(b, hq, t, f, seed=1), make_features(b, hkv, t, f, seed=2)
    v = torch.randn(b, hkv, t, dv, dtype=torch.float64)
    init = make_state(b, hkv, f, dv, dtype=torch.float64, seed=3) if state else None
    kw = dict(causal=causal, eps=1e-3, initial_state=init, return_state=True)
    out, st = ref.linear_attention(q, k, v, **kw)
    out_l, st_l = ref.linear_attention_loop(q, k, v, **kw)
    assert_close(out, out_l, TOL)
    _close_state(st, st_l)
    assert st[0].shape == (b, hkv, f, dv) and st[1].shape == (b, hkv, f)
    assert torch.equal(ref.linear_attention(q, k, v, causal=causal, eps=1e-3, initial_state=init), out)


def test_linear_attention_noncausal_rows_use_the_final_state():
    q, k = make_features(2, 4, 9, 3, seed=1), make_features(2, 2, 9, 3, seed=2)
    v = torch.randn(2, 2, 9, 5, dtype=torch.float64)
    init = make_state(2, 2, 3, 5, dtype=torch.float64, seed=3)
    out, (s, z) = ref.linear_attention(q, k, v, causal=False, initial_state=init, return_state=True)
    causal, (s_c, z_c) = ref.linear_attention(q, k, v, causal=True, initial_state=init, return_state=True)
    _close_state((s, z), (s_c, z_c))  # the returned state does not depend on causal
    assert_close(out[:, :, -1], causal[:, :, -1], TOL, "last row")
    sq, zq = s.repeat_interleave(2, 1), z.repeat_interleave(2, 1)
    want = torch.einsum("bhtf,bhfd->bhtd", q, sq) / (torch.einsum("bhtf,bhf->bht", q, zq) + 1e-6)[..., None]
    assert_close(out, want, TOL)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("state", [False, True], ids=["nostate", "state"])
def test_linear_attention_cu_seqlens(causal, state):
    lengths = [1, 9, 1, 70, 4, 1]  # uneven, length-1 segments, one across the chunk boundary
    t, hq, hkv, f, dv = sum(lengths), 4, 2, 3, 2
    q, k = make_features(1, hq, t, f, seed=1), make_features(1, hkv, t, f, seed=2)
    v = torch.randn(1, hkv, t, dv, dtype=torch.float64)
    init = make_state(len(lengths), hkv, f, dv, dtype=torch.float64, seed=3) if state else None
    kw = dict(causal=causal, initial_state=init, return_state=True, cu_seqlens=cu_seqlens(*lengths))
    out, st = ref.linear_attention(q, k, v, **kw)
    out_l, st_l = ref.linear_attention_loop(q, k, v, **kw)
    assert_close(out, out_l, TOL)
    _close_state(st, st_l)
    assert st[0].shape == (len(lengths), hkv, f, dv)
    a = 0
    for i, n in enumerate(lengths):  # each segment is its own sequence
        one = None if init is None else (init[0][i : i + 1], init[1][i : i + 1])
        o, (s, z) = ref.linear_attention(q[:, :, a : a + n], k[:, :, a : a + n], v[:, :, a : a + n], causal=causal,
                                         initial_state=one, return_state=True)
        assert_close(out[:, :, a : a + n], o, TOL, f"segment {i}")
        _close_state((st[0][i : i + 1], st[1][i : i + 1]), (s, z))
        a += n


def test_empty_segment_keeps_its_initial_state():
    q, k = make_features(1, 2, 5, 3, seed=1), make_features(1, 2, 5, 3, seed=2)
    v = torch.randn(1, 2, 5, 4, dtype=torch.float64)
    init = make_state(3, 2, 3, 4, dtype=torch.float64, seed=3)
    kw = dict(initial_state=init, return_state=True, cu_seqlens=cu_seqlens(2, 0, 3))
    out, st = ref.linear_attention(q, k, v, **kw)
    out_l, st_l = ref.linear_attention_loop(q, k, v, **kw)
    assert_close(out, out_l, TOL)
    _close_state(st, st_l)
    _close_state((st[0][1], st[1][1]), (init[0][1], init[1][1]))


# ----------------------------------------------------------------------------- hedgehog attention


@pytest.mark.parametrize("case", SHAPES, ids=shape_id)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_hedgehog_forms_agree(case, causal):
    p = to64(make_problem(*case, state=True, seed=sum(case)))
    out, st = ref.hedgehog_attention(**p, causal=causal, return_state=True)
    out_l, st_l = ref.hedgehog_attention_loop(**p, causal=causal, return_state=True)
    assert_close(out, out_l, TOL)
    _close_state(st, st_l)
    b, hq, hkv, t, d, f, dv = case
    assert out.shape == (b, hq, t, dv) and st[0].shape == (b, hkv, 2 * f, dv) and st[1].shape == (b, hkv, 2 * f)


def test_hedgehog_window0_is_linear_attention_of_the_features():
    p = to64(make_problem(2, 4, 2, 11, 6, 3, 5, state=True))
    phq = ref.feature_map(p["q"], p["q_weight"], p["q_bias"])
    phk = ref.feature_map(p["k"], p["k_weight"], p["k_bias"])
    out, st = ref.hedgehog_attention(**p, return_state=True)
    out_l, st_l = ref.linear_attention(phq, phk, p["v"], initial_state=p["initial_state"], return_state=True)
    assert_close(out, out_l, TOL)
    _close_state(st, st_l)


@pytest.mark.parametrize("window", [1, 2, 5, 12, 13, 40])
@pytest.mark.parametrize("heads", [(2, 2), (6, 2)], ids=["mha", "gqa"])
def test_window_forms_agree(window, heads):
    hq, hkv = heads
    p = to64(make_problem(2, hq, hkv, 13, 5, 3, 4, window_weights=True, seed=window))
    for scale in (None, 0.3):
        out = ref.hedgehog_attention(**p, window=window, scale=scale)
        assert_close(out, ref.hedgehog_attention_loop(**p, window=window, scale=scale), TOL, f"scale {scale}")


@pytest.mark.parametrize("window", [1, 3, 9, 100])
def test_window_cu_seqlens(window):
    lengths = [1, 9, 0, 17, 1, 4]  # uneven, one empty, length-1 segments
    p = to64(make_problem(1, 4, 2, sum(lengths), 5, 3, 4, window_weights=True, lengths=lengths, seed=window))
    out = ref.hedgehog_attention(**p, window=window)
    assert_close(out, ref.hedgehog_attention_loop(**p, window=window), TOL)
    cu = p.pop("cu_seqlens").tolist()
    for i, (a, e) in enumerate(zip(cu, cu[1:])):  # the window restarts per segment
        seg = {key: p[key][:, :, a:e] for key in ("q", "k", "v")}
        o = ref.hedgehog_attention(**{**p, **seg}, window=window)
        assert_close(out[:, :, a:e], o, TOL, f"segment {i}")


@pytest.mark.parametrize("window", [1, 4, 13, 20])
def test_window_softmax_part_is_banded_sdpa(window):
    """alpha = 0, eps = 0: exactly softmax attention over keys t - window < s <= t (torch SDPA)."""
    b, hq, hkv, t, d = 2, 6, 2, 13, 5
    p = to64(make_problem(b, hq, hkv, t, d, 3, 4, window_weights=True))
    p["alpha"] = torch.zeros(hq, dtype=torch.float64)
    out = ref.hedgehog_attention(**p, window=window, eps=0.0, scale=0.7)
    pos = torch.arange(t)
    band = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)  # [query, key]
    g = hq // hkv
    want = F.scaled_dot_product_attention(p["q"], p["k"].repeat_interleave(g, 1), p["v"].repeat_interleave(g, 1),
                                          attn_mask=band, scale=0.7)
    assert_close(out, want, TOL)


@pytest.mark.parametrize("window", [1, 3, 12])
def test_window_linear_part_is_masked_quadratic_form(window):
    """beta = 0: out_t = sum_{s <= t - window} l_s v_s / (sum l_s + eps), rows t < window are 0."""
    b, hq, hkv, t = 1, 4, 2, 13
    p = to64(make_problem(b, hq, hkv, t, 5, 3, 4, window_weights=True))
    p["beta"] = torch.zeros(hq, dtype=torch.float64)
    out = ref.hedgehog_attention(**p, window=window, eps=1e-2)
    phq = ref.feature_map(p["q"], p["q_weight"], p["q_bias"])
    phk = ref.feature_map(p["k"], p["k_weight"], p["k_bias"]).repeat_interleave(hq // hkv, 1)
    pos = torch.arange(t)
    old = pos[None, :] <= pos[:, None] - window
    a = (phq @ phk.transpose(-1, -2)) * old * p["alpha"][:, None, None]
    want = (a @ p["v"].repeat_interleave(hq // hkv, 1)) / (a.sum(-1, keepdim=True) + 1e-2)
    assert_close(out, want, TOL)
    assert not out[:, :, :window].any()


# ----------------------------------------------------------------------------- decode


@pytest.mark.parametrize("heads", [(3, 3), (6, 2)], ids=["mha", "gqa"])
def test_decode_steps_equal_attention_rows(heads):
    hq, hkv = heads
    b, t, d, f, dv = 2, 9, 5, 3, 4
    p = to64(make_problem(b, hq, hkv, t, d, f, dv, state=True, state_dtype=torch.float64))
    rows, (s_t, z_t) = ref.hedgehog_attention(**p, return_state=True)
    s, z = (x.clone() for x in p.pop("initial_state"))
    ptr = s.data_ptr(), z.data_ptr()
    w = {key: p[key] for key in ("q_weight", "k_weight", "q_bias", "k_bias")}
    for i in range(t):
        out = ref.hedgehog_decode(p["q"][:, :, i], p["k"][:, :, i], p["v"][:, :, i], **w, state=(s, z))
        assert_close(out, rows[:, :, i], TOL, f"step {i}")
    assert (s.data_ptr(), z.data_ptr()) == ptr and s.dtype == z.dtype == torch.float64
    _close_state((s, z), (s_t, z_t))


def test_decode_float32_state_in_place():
    p = make_problem(1, 4, 2, 6, 5, 3, 4, dtype=torch.float32, state=True, seed=4)
    rows = ref.hedgehog_attention(**to64(p))
    s, z = p.pop("initial_state")
    s0 = s.clone()
    w = {key: p[key] for key in ("q_weight", "k_weight", "q_bias", "k_bias")}
    for i in range(6):
        out = ref.hedgehog_decode(p["q"][:, :, i], p["k"][:, :, i], p["v"][:, :, i], **w, state=(s, z))
        assert out.dtype == torch.float32 and s.dtype == z.dtype == torch.float32
        assert_close(out, rows[:, :, i], 1e-6, f"step {i}")  # float32 state: rounded every step
    assert not torch.equal(s, s0), "the state is updated in place"


# ----------------------------------------------------------------------------- dtypes, errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dtypes(dtype):
    p = make_problem(1, 2, 1, 5, 4, 3, 2, dtype=dtype, state=True)
    out, (s, z) = ref.hedgehog_attention(**p, return_state=True)
    assert out.dtype == dtype and s.dtype == z.dtype == torch.float32
    p.pop("initial_state")
    out, (s, z) = ref.hedgehog_attention(**p, return_state=True)
    assert s.dtype == z.dtype == torch.float32
    assert ref.hedgehog_attention(**p, window=2).dtype == dtype
    assert_close(ref.hedgehog_attention(**p, window=2), ref.hedgehog_attention(**to64(p), window=2),
                 1e-2 if dtype == torch.bfloat16 else 1e-6)


def test_rejected_arguments():
    p = make_problem(2, 4, 2, 6, 4, 3, 2, state=True)
    with pytest.raises(ValueError, match="causal"):
        ref.hedgehog_attention(**{**p, "initial_state": None}, window=2, causal=False)
    with pytest.raises(ValueError, match="initial_state"):
        ref.hedgehog_attention(**p, window=2)
    with pytest.raises(ValueError, match="return_state"):
        ref.hedgehog_attention(**{**p, "initial_state": None}, window=2, return_state=True)
    with pytest.raises(ValueError, match="window"):
        ref.hedgehog_attention(**p, window=-1)
    with pytest.raises(ValueError, match="B = 1"):
        ref.hedgehog_attention(**p, cu_seqlens=cu_seqlens(3, 3))
    with pytest.raises(ValueError, match="multiple"):
        ref.linear_attention(make_features(1, 3, 4, 2), make_features(1, 2, 4, 2), torch.randn(1, 2, 4, 2))
    one = make_problem(1, 2, 2, 6, 4, 3, 2)
    with pytest.raises(ValueError, match="cu_seqlens"):
        ref.hedgehog_attention(**one, cu_seqlens=cu_seqlens(2, 3))  # sums to 5, not T = 6


# ----------------------------------------------------------------------------- NaN


@pytest.mark.parametrize("window", [0, 3])
def test_nan_reaches_only_later_rows_of_its_group_and_segment(window):
    lengths = [6, 10]
    p = to64(make_problem(1, 4, 2, 16, 5, 3, 4, window_weights=True, lengths=lengths))
    s = 9  # token 3 of the second segment, KV head 1 (query heads 2, 3)
    p["k"][0, 1, s, 2] = float("nan")
    kw = dict(window=window)
    if window == 0:
        p["alpha"], p["beta"] = None, None
    out = ref.hedgehog_attention(**p, **kw)
    want = torch.zeros_like(out, dtype=torch.bool)
    want[0, 2:, s:] = True
    assert torch.equal(torch.isnan(out), want)
    assert torch.equal(torch.isnan(ref.hedgehog_attention_loop(**p, **kw)), want)
    if window == 0:
        p["initial_state"] = make_state(2, 2, 6, 4, dtype=torch.float64)
        _, (s_t, z_t) = ref.hedgehog_attention(**p, causal=False, return_state=True)
        assert torch.isnan(s_t[1, 1]).all() and not torch.isnan(s_t[0]).any() and not torch.isnan(s_t[1, 0]).any()
        assert torch.isnan(z_t[1, 1]).all() and not torch.isnan(z_t[0]).any()


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_gradcheck_linear(causal):
    p = to64(make_problem(1, 2, 1, 5, 3, 2, 2, state=True, state_dtype=torch.float64, seed=5))
    names = ["q", "k", "v", "q_weight", "k_weight", "q_bias", "k_bias"]
    inputs = [p[n].clone().requires_grad_() for n in names]
    inputs += [x.clone().requires_grad_() for x in p["initial_state"]]

    def fn(*xs):
        out, (s, z) = ref.hedgehog_attention(*xs[:7], causal=causal, eps=1e-3, initial_state=xs[7:],
                                             return_state=True)
        return out, s, z

    assert torch.autograd.gradcheck(fn, inputs)


def test_gradcheck_window():
    p = to64(make_problem(1, 2, 1, 7, 3, 2, 2, window_weights=True, lengths=[3, 4], seed=6,
                          state_dtype=torch.float64))
    names = ["q", "k", "v", "q_weight", "k_weight", "q_bias", "k_bias", "alpha", "beta"]
    inputs = [p[n].clone().requires_grad_() for n in names]

    def fn(*xs):
        return ref.hedgehog_attention(*xs[:7], alpha=xs[7], beta=xs[8], window=2, eps=1e-3,
                                      cu_seqlens=p["cu_seqlens"])

    assert torch.autograd.gradcheck(fn, inputs)


# ----------------------------------------------------------------------------- fla (independent oracle)


def _fla_naive():
    """flash-linear-attention's pure-PyTorch linear attention (fla/ops/linear_attn/naive.py of
    fla-core, tested with 0.6.0). The file imports only torch and einops, so it is loaded on its
    own: importing the `fla` package pulls in its Triton kernels (~8 s and a CPU warning)."""
    pytest.importorskip("einops", reason="fla's naive linear attention needs einops (pip install fla-core==0.6.0)")
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("flash-linear-attention is not installed (pip install fla-core==0.6.0)")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "ops" / "linear_attn" / "naive.py"
    if not path.is_file():
        pytest.skip(f"no fla naive linear attention at {path}")
    mod_spec = importlib.util.spec_from_file_location("_fla_linear_attn_naive", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


def _bthd(x):
    return x.transpose(1, 2)  # ours [B, H, T, *] -> fla's [B, T, H, *]


@pytest.mark.parametrize("heads", [(3, 3), (6, 2)], ids=["mha", "gqa"])
def test_fla_recurrent_oracle(heads):
    """fla's naive_recurrent_linear_attn(normalize=True, scale=1) computes, in float32,
    o_t = q_t S_t / (q_t . (z0 + cumsum k)_t + 1e-10) with S_t = S0 + sum k^T v, and returns
    (S_T, z_T): our linear_attention with eps = 1e-10. fla has no GQA, no packed segments and no
    non-causal mode: K/V are repeated per query head (our head map h -> h // G), each segment is
    a separate fla call, and the non-causal output is built from fla's final state."""
    naive = _fla_naive()
    hq, hkv = heads
    g = hq // hkv
    lengths = [7, 1, 20]
    t, f, dv = sum(lengths), 4, 3
    q, k = make_features(1, hq, t, f, seed=1), make_features(1, hkv, t, f, seed=2)
    v = torch.randn(1, hkv, t, dv, dtype=torch.float64)
    init = make_state(len(lengths), hkv, f, dv, dtype=torch.float64, seed=3)
    cu = cu_seqlens(*lengths)
    out, (s_t, z_t) = ref.linear_attention(q, k, v, eps=1e-10, initial_state=init, return_state=True, cu_seqlens=cu)
    out_nc = ref.linear_attention(q, k, v, causal=False, eps=1e-10, initial_state=init, cu_seqlens=cu)
    a = 0
    for i, n in enumerate(lengths):
        seg = slice(a, a + n)
        kr, vr = k[:, :, seg].repeat_interleave(g, 1), v[:, :, seg].repeat_interleave(g, 1)
        s0, z0 = init[0][i : i + 1].repeat_interleave(g, 1), init[1][i : i + 1].repeat_interleave(g, 1)
        o, (s_f, z_f) = naive.naive_recurrent_linear_attn(
            _bthd(q[:, :, seg]), _bthd(kr), _bthd(vr), scale=1.0, initial_state=(s0.float(), z0[:, None].float()),
            output_final_state=True, normalize=True)
        assert_close(_bthd(o), out[:, :, seg], 1e-5, f"segment {i} output")
        assert_close(s_f, s_t[i : i + 1].repeat_interleave(g, 1), 1e-5, f"segment {i} S_T")
        assert_close(z_f[:, 0], z_t[i : i + 1].repeat_interleave(g, 1), 1e-5, f"segment {i} z_T")
        qs = q[:, :, seg].float()
        den = torch.einsum("bhtf,bhf->bht", qs, z_f[:, 0]) + 1e-10
        nc = torch.einsum("bhtf,bhfd->bhtd", qs, s_f) / den[..., None]
        assert_close(nc, out_nc[:, :, seg], 1e-5, f"segment {i} non-causal")
        a += n


def test_fla_chunk_oracle():
    """fla's naive_chunk_linear_attn (the quadratic intra-chunk + inter-chunk state form, no
    initial state, T a multiple of 64) keeps the input dtype, so it is compared in float64:
    normalize=True, scale=1 is our causal linear_attention with eps = 1e-10."""
    naive = _fla_naive()
    q, k = make_features(2, 3, 128, 5, seed=1), make_features(2, 3, 128, 5, seed=2)
    v = torch.randn(2, 3, 128, 4, dtype=torch.float64)
    o = naive.naive_chunk_linear_attn(_bthd(q), _bthd(k), _bthd(v), scale=1.0, normalize=True)
    assert_close(_bthd(o), ref.linear_attention(q, k, v, eps=1e-10), TOL)
