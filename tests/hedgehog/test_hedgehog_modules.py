"""HedgehogFeatureMap and HedgehogAttention: the modules against the functional ops (the paper's
initialization, GQA, states, packed segments, the window hybrid's mixing factor), their
normalized attention weights against their own outputs, and the attention-distillation loss
against a direct per-query computation, its bounds and its training.

Modules are built with backend="reference" (the float64 spec): the CPU kernels of the Hedgehog ops
are written elsewhere; switch BACKEND to None once they are in."""

import math

import pytest
import torch

import pyfast
from pyfast.hedgehog.baselines import FixedFeatureMap
from pyfast.reference import hedgehog as ref
from pyfast.testing import assert_close

BACKEND = None
TOL = 1e-5  # float32 modules against the float64 spec / plain-PyTorch float32 weights


def _qkv(b=2, hq=4, hkv=2, t=9, d=8, dv=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, t, d, generator=g)
    k = torch.randn(b, hkv, t, d, generator=g)
    v = torch.randn(b, hkv, t, dv, generator=g)
    return q, k, v


def _randomize(module, seed=1, std=0.5):
    """Non-trivial parameters (the identity init would hide transposed weights)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


# ----------------------------------------------------------------------------- feature map


def test_feature_map_identity_init_and_equals_op():
    fm = pyfast.HedgehogFeatureMap(3, 8, backend=BACKEND)
    assert fm.weight.shape == (3, 8, 8) and fm.bias.shape == (3, 8) and fm.feature_dim == 8
    assert torch.equal(fm.weight, torch.eye(8).expand(3, 8, 8)) and torch.equal(fm.bias, torch.zeros(3, 8))
    x = torch.randn(2, 3, 5, 8)
    phi = fm(x)
    assert phi.shape == (2, 3, 5, 16)
    assert_close(phi, torch.cat([x.softmax(-1), (-x).softmax(-1)], -1), TOL, "identity init")
    _randomize(fm)
    assert_close(fm(x), pyfast.hedgehog_feature_map(x, fm.weight, fm.bias, backend=BACKEND), 0.0)
    assert_close(fm(x), ref.feature_map(x.double(), fm.weight.double(), fm.bias.double()), TOL)


def test_feature_map_random_init_without_bias():
    torch.manual_seed(0)
    fm = pyfast.HedgehogFeatureMap(2, 16, 4, bias=False, backend=BACKEND, dtype=torch.float16)
    assert fm.bias is None and fm.weight.dtype == torch.float16 and fm.weight.shape == (2, 16, 4)
    assert fm.weight.abs().max() <= 1 / math.sqrt(16) and fm.weight.float().std() > 0.05  # small, but not zero
    x = torch.randn(1, 2, 3, 16, dtype=torch.float16)
    phi = fm(x)
    assert phi.dtype == torch.float16
    assert_close(phi, ref.feature_map(x.double(), fm.weight.double()), 1e-3)
    assert "feature_dim=4" in repr(fm)


def test_feature_map_trains_through_the_op():
    fm = _randomize(pyfast.HedgehogFeatureMap(2, 6, 3, backend=BACKEND))
    x = torch.randn(1, 2, 4, 6)
    fm(x).pow(2).sum().backward()
    w, b = fm.weight.detach().double().requires_grad_(), fm.bias.detach().double().requires_grad_()
    ref.feature_map(x.double(), w, b).pow(2).sum().backward()
    assert_close(fm.weight.grad, w.grad, 1e-5, "weight grad")
    assert_close(fm.bias.grad, b.grad, 1e-5, "bias grad")


# ----------------------------------------------------------------------------- attention module


def test_attention_equals_op_with_gqa_and_state():
    attn = _randomize(pyfast.HedgehogAttention(4, 2, 8, 5, backend=BACKEND))
    assert attn.q_map.num_heads == 4 and attn.k_map.num_heads == 2 and attn.window_factor is None
    assert attn.alpha is None and attn.beta is None
    q, k, v = _qkv()
    w = (attn.q_map.weight, attn.k_map.weight, attn.q_map.bias, attn.k_map.bias)
    for causal in (True, False):
        got, (s, z) = attn(q, k, v, causal=causal, return_state=True)
        want, (s_w, z_w) = ref.hedgehog_attention(q.double(), k.double(), v.double(), *[p.double() for p in w],
                                                  causal=causal, return_state=True)
        assert_close(got, want, TOL, f"out causal={causal}")
        assert s.shape == (2, 2, 10, 6) and s.dtype == torch.float32
        assert_close(s, s_w, TOL, "S")
        assert_close(z, z_w, TOL, "z")
    # a chunked prefill from the returned state equals the whole sequence
    out1, state = attn(q[:, :, :4], k[:, :, :4], v[:, :, :4], return_state=True)
    out2 = attn(q[:, :, 4:], k[:, :, 4:], v[:, :, 4:], initial_state=state)
    assert_close(torch.cat([out1, out2], 2), attn(q, k, v), TOL, "chunked")


def test_attention_packed_segments_and_decode():
    attn = _randomize(pyfast.HedgehogAttention(4, 2, 8, 5, backend=BACKEND))
    q, k, v = _qkv(b=1, t=9)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    packed, (s, z) = attn(q, k, v, cu_seqlens=cu, return_state=True)
    assert s.shape[0] == 2
    for i, (a, e) in enumerate([(0, 4), (4, 9)]):
        seg, (s_i, z_i) = attn(q[:, :, a:e], k[:, :, a:e], v[:, :, a:e], return_state=True)
        assert_close(packed[:, :, a:e], seg, TOL, f"segment {i}")
        assert_close(s[i : i + 1], s_i, TOL, "segment state")
    # decode: the state after 8 tokens, then token 8 = the last row of the whole sequence
    _, (s8, z8) = attn(q[:, :, :8], k[:, :, :8], v[:, :, :8], return_state=True)
    s8, z8 = s8.contiguous(), z8.contiguous()
    with torch.no_grad():
        y = attn.decode(q[:, :, 8], k[:, :, 8], v[:, :, 8], (s8, z8))
    full, (s9, z9) = attn(q, k, v, return_state=True)
    assert_close(y, full[:, :, 8], TOL, "decode")
    assert_close(s8, s9, TOL, "state updated in place")


def test_window_hybrid_mixing_factor():
    attn = pyfast.HedgehogAttention(4, 2, 8, 5, window=3, backend=BACKEND)
    assert attn.window_factor.dtype == torch.float32 and attn.window_factor.shape == (4,)
    assert torch.equal(attn.alpha, torch.ones(4)) and torch.equal(attn.beta, torch.ones(4))  # the ops' defaults
    _randomize(attn)
    assert torch.all(attn.alpha > 0) and torch.all(attn.beta > 0)
    assert_close(attn.alpha + attn.beta, torch.full((4,), 2.0), 1e-6)
    q, k, v = _qkv()
    got = attn(q, k, v, scale=0.3)
    w = (attn.q_map.weight, attn.k_map.weight, attn.q_map.bias, attn.k_map.bias)
    want = ref.hedgehog_attention(q.double(), k.double(), v.double(), *[p.double() for p in w], window=3,
                                  alpha=attn.alpha.detach(), beta=attn.beta.detach(), scale=0.3)
    assert_close(got, want, TOL)
    got.sum().backward()  # the mixing factor learns through the op
    assert attn.window_factor.grad is not None and attn.window_factor.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="window"):
        attn.decode(q[:, :, 0], k[:, :, 0], v[:, :, 0], (torch.zeros(2, 2, 10, 6), torch.zeros(2, 2, 10)))


def test_attention_rejects_bad_geometry_and_sets_backend():
    with pytest.raises(ValueError, match="num_kv_heads"):
        pyfast.HedgehogAttention(4, 3, 8)
    with pytest.raises(ValueError, match="window"):
        pyfast.HedgehogAttention(4, 2, 8, window=-1)
    attn = pyfast.HedgehogAttention(4, 2, 8, backend="reference")
    assert attn.q_map.backend == attn.k_map.backend == "reference"
    attn.backend = None
    assert attn.backend is None and attn.q_map.backend is None and attn.k_map.backend is None
    assert "window=0" in repr(attn)


# ----------------------------------------------------------------------------- attention weights


@pytest.mark.parametrize("window,causal", [(0, True), (0, False), (3, True)], ids=["causal", "noncausal", "window3"])
def test_attention_weights_reproduce_the_output(window, causal):
    attn = _randomize(pyfast.HedgehogAttention(4, 2, 8, 5, window=window, backend=BACKEND))
    q, k, v = _qkv()
    a = attn.attention_weights(q, k, causal=causal, scale=0.4)
    assert a.shape == (2, 4, 9, 9) and a.dtype == torch.float32
    if causal:
        assert torch.all(a.triu(1) == 0)
    out = a @ v.repeat_interleave(2, dim=1)
    assert_close(out, attn(q, k, v, causal=causal, scale=0.4), TOL)


def test_attention_weights_padding_mask_drops_keys():
    attn = _randomize(pyfast.HedgehogAttention(2, 1, 8, 4, backend=BACKEND))
    q, k, v = _qkv(b=1, hq=2, hkv=1, t=7)
    mask = torch.tensor([[True, True, False, True, True, True, False]])
    a = attn.attention_weights(q, k, causal=False, mask=mask)
    assert torch.all(a[..., ~mask[0]] == 0)
    real = mask[0]
    want = attn(q[:, :, real], k[:, :, real], v[:, :, real], causal=False)  # the pads removed
    assert_close((a @ v.repeat_interleave(2, dim=1))[:, :, real], want, TOL)


# ----------------------------------------------------------------------------- distillation loss


def _direct_loss(attn, q, k, scale, causal):
    """-1/(B Hq T) sum_{b,h,t} sum_s p_ts log a_ts written one query at a time (MHA, window 0)."""
    b_sz, h_sz, t_sz, _ = q.shape
    total, n = 0.0, 0
    attn = attn.requires_grad_(False)
    for b in range(b_sz):
        for h in range(h_sz):
            wq, bq = attn.q_map.weight[h].double(), attn.q_map.bias[h].double()
            wk, bk = attn.k_map.weight[h].double(), attn.k_map.bias[h].double()
            for t in range(t_sz):
                keys = range(t + 1) if causal else range(t_sz)
                uq = q[b, h, t].double() @ wq + bq
                pq = torch.cat([torch.exp(uq) / torch.exp(uq).sum(), torch.exp(-uq) / torch.exp(-uq).sum()])
                lin, soft = [], []
                for s in keys:
                    uk = k[b, h, s].double() @ wk + bk
                    pk = torch.cat([torch.exp(uk) / torch.exp(uk).sum(), torch.exp(-uk) / torch.exp(-uk).sum()])
                    lin.append(pq @ pk)
                    soft.append(math.exp(scale * float(q[b, h, t].double() @ k[b, h, s].double())))
                den = sum(lin) + attn.eps
                total += -sum(p / sum(soft) * math.log(a / den) for p, a in zip(soft, lin))
                n += 1
    return total / n


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_distillation_loss_equals_direct_computation(causal):
    attn = _randomize(pyfast.HedgehogAttention(2, 2, 3, 2, backend=BACKEND), std=0.8)
    q, k, _ = _qkv(b=2, hq=2, hkv=2, t=4, d=3)
    got = attn.distillation_loss(q, k, causal=causal, scale=0.7)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(_direct_loss(attn, q, k, 0.7, causal), rel=1e-5)
    assert got.requires_grad


def test_distillation_loss_bounds_and_gradients():
    attn = _randomize(pyfast.HedgehogAttention(4, 2, 8, 5, backend=BACKEND))
    q, k, _ = _qkv()
    q.requires_grad_(), k.requires_grad_()
    loss = attn.distillation_loss(q, k)
    # cross-entropy >= the teacher's entropy (equality iff the weights match the softmax)
    p = torch.softmax(attn._logits(q, k, None).masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), -math.inf), -1)
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean()
    assert loss.item() >= entropy.item() - 1e-6
    loss.backward()
    assert q.grad is None and k.grad is None  # q, k are data here: the teacher and the student inputs are detached
    for name, prm in attn.named_parameters():
        assert prm.grad is not None and torch.isfinite(prm.grad).all() and prm.grad.abs().sum() > 0, name
    # one key per query (T = 1): the student's weight is 1 (up to eps) like the teacher's -> zero loss and gradient
    attn.zero_grad()
    loss1 = attn.distillation_loss(q[:, :, :1], k[:, :, :1])
    loss1.backward()
    assert abs(loss1.item()) < 1e-5
    assert all(prm.grad.abs().max() < 1e-5 for prm in attn.parameters())


def test_distillation_loss_with_window_and_padding():
    attn = _randomize(pyfast.HedgehogAttention(4, 2, 8, 5, window=2, backend=BACKEND))
    q, k, _ = _qkv(b=1, t=8)
    mask = torch.tensor([[False, False, True, True, True, True, True, True]])  # left padding
    loss = attn.distillation_loss(q, k, mask=mask)
    want = attn.distillation_loss(q[:, :, 2:], k[:, :, 2:])  # the pads are neither keys nor queries
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    loss.backward()
    assert attn.window_factor.grad.abs().sum() > 0


@pytest.mark.parametrize("window", [0, 3])
def test_distillation_decreases_the_loss(window):
    torch.manual_seed(0)
    attn = pyfast.HedgehogAttention(4, 2, 8, 8, window=window, backend=BACKEND)
    q, k, _ = _qkv(b=2, t=12, seed=3)
    q, k = q * 2, k * 2  # peaked softmax attention: the identity-initialized features start far from it
    opt = torch.optim.Adam(attn.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = attn.distillation_loss(q, k)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


# ----------------------------------------------------------------------------- fixed-nonlinearity baselines


def _fixed_phi64(kind, x, weight, bias):
    """The baselines' features in float64, written out: elu(u) + 1 or relu(u), u = x W_h + b_h."""
    u = torch.einsum("bhtd,hdf->bhtf", x.double(), weight.double()) + bias.double()[None, :, None, :]
    return torch.nn.functional.elu(u) + 1 if kind == "elu" else u.clamp_min(0)


def test_fixed_feature_maps_start_at_their_textbook_form():
    x = torch.randn(2, 3, 5, 8)
    elu = FixedFeatureMap("elu", 3, 8)
    assert elu.out_features == 8 and elu.weight.shape == (3, 8, 8)
    assert_close(elu(x), torch.nn.functional.elu(x) + 1, 1e-6, "elu(x) + 1")
    t2r = FixedFeatureMap("t2r", 3, 8)
    assert t2r.out_features == 16 and t2r.weight.shape == (3, 8, 16)
    assert torch.equal(t2r(x), torch.cat([x.relu(), (-x).relu()], -1))
    small = FixedFeatureMap("t2r", 3, 8, 4, bias=False)  # F != D: small random, no bias
    assert small.bias is None and small.out_features == 8 and 0 < small.weight.abs().max() <= 1 / math.sqrt(8)
    with pytest.raises(ValueError, match="kind"):
        FixedFeatureMap("cos", 3, 8)


@pytest.mark.parametrize("kind", ["elu", "t2r"])
def test_attention_with_fixed_feature_map_is_linear_attention_of_its_features(kind):
    attn = _randomize(pyfast.HedgehogAttention(4, 2, 8, 5, feature_map=kind, backend=BACKEND))
    width = 5 if kind == "elu" else 10
    q, k, v = _qkv(b=1, t=9)
    w = (attn.q_map.weight, attn.q_map.bias), (attn.k_map.weight, attn.k_map.bias)
    pq, pk = _fixed_phi64(kind, q, *w[0]), _fixed_phi64(kind, k, *w[1])
    for causal in (True, False):
        got, (s, z) = attn(q, k, v, causal=causal, return_state=True)
        want, (s_w, _) = ref.linear_attention(pq, pk, v.double(), causal=causal, return_state=True)
        assert_close(got, want, TOL, f"{kind} causal={causal}")
        assert s.shape == (1, 2, width, 6) and z.shape == (1, 2, width)
        assert_close(s, s_w, TOL, "S")
    # the weights the distillation loss sees reproduce the output
    a = attn.attention_weights(q, k)
    assert_close(a @ v.repeat_interleave(2, dim=1), attn(q, k, v), TOL, "attention_weights")
    # decode: one step from the state after 8 tokens, state updated in place
    _, (s8, z8) = attn(q[:, :, :8], k[:, :, :8], v[:, :, :8], return_state=True)
    with torch.no_grad():
        y = attn.decode(q[:, :, 8], k[:, :, 8], v[:, :, 8], (s8, z8))
    full, (s9, z9) = attn(q, k, v, return_state=True)
    assert_close(y, full[:, :, 8], TOL, "decode")
    assert_close(s8, s9, TOL, "S updated in place")
    assert_close(z8, z9, TOL, "z updated in place")
    # gradients reach the map's parameters through the op
    attn(q, k, v).pow(2).sum().backward()
    assert attn.q_map.weight.grad.abs().sum() > 0 and attn.k_map.bias.grad.abs().sum() > 0


def test_fixed_feature_map_refuses_the_window_and_unknown_maps():
    with pytest.raises(ValueError, match="window"):
        pyfast.HedgehogAttention(4, 2, 8, window=3, feature_map="elu")
    with pytest.raises(ValueError, match="feature_map"):
        pyfast.HedgehogAttention(4, 2, 8, feature_map="performer")
