"""Hedgehog linear attention (and the LoLCATs sliding-window hybrid): the executable spec
(float64 math, pure PyTorch).

Layouts (docs/design.md § Layouts; all attention tensors [B, H, T, *]):
    x                  [B, H, T, D]       input of a feature map (q or k)
    weight, bias       [H, D, F], [H, F]  per-head feature-map projection (bias may be None)
    q                  [B, Hq, T, D]      queries; Hq = G * Hkv, query head h reads KV head h // G (GQA)
    k                  [B, Hkv, T, D]     keys (k_weight [Hkv, D, F], k_bias [Hkv, F])
    v                  [B, Hkv, T, Dv]    values
    state = (S, z)     S [B, Hkv, F', Dv], z [B, Hkv, F'] float32, one per KV head (F' = 2F for
                       Hedgehog features); with cu_seqlens the leading dim is N, one per segment
    cu_seqlens         int32 [N + 1]      packed variable-length batch (B = 1): segment i is tokens
                       [cu[i], cu[i+1]) and is its own sequence (every sum below restarts there)
    alpha, beta        [Hq] float32       hybrid weights of the linear and the softmax part (default 1)
    decode: q [B, Hq, D], k [B, Hkv, D], v [B, Hkv, Dv], one token.

Feature map, per head h:
    u = x @ weight[h] + bias[h];   phi(x) = cat(softmax(u), softmax(-u))   [.., 2F], softmax over F.

Linear attention on non-negative features q, k (any width F'), per query head h, its KV head
j = h // G and query t:
    S_t = S0 + sum_{s <= t} k_s^T v_s,   z_t = z0 + sum_{s <= t} k_s     (KV head j)
    out_t = (q_t S_t) / (q_t . z_t + eps)
Non-causal: the sums run over every s of the sequence (plus S0, z0). The returned state is
(S_T, z_T) = (S0 + sum_s k_s^T v_s, z0 + sum_s k_s) over the whole sequence, causal or not.

Hedgehog attention, window = 0: linear attention of (phi_q(q), phi_k(k), v).
Window > 0 (causal only; no initial or returned state), for query t of head h (KV head j):
    e_s = exp(scale * q_t . k_s - m_t)    for t - window < s <= t  (m_t = max of scale * q_t . k_s
                                          over those keys; scale defaults to 1 / sqrt(D))
    l_s = phi_q(q)_t . phi_k(k)_s         for s <= t - window
    out_t = (beta_h sum e_s v_s + alpha_h sum l_s v_s) / (beta_h sum e_s + alpha_h sum l_s + eps)
The linear part is not scaled by exp(-m_t) (LoLCATs' hybrid): the result depends on m_t, which is
exactly the maximum above. With cu_seqlens, s only runs over the segment of t.

Decode: one step of the causal recurrence with the state updated in place:
    S += phi_k^T v, z += phi_k, then out = phi_q S / (phi_q . z + eps)   (from the state as stored),
i.e. the last row of hedgehog_attention(causal=True, window=0) over the whole sequence.

Dtypes: the math is float64; feature_map returns x's dtype, the attention functions v's dtype.
States are float32 in the ops; the reference accepts any float dtype for them and returns the
final state in the dtype of the initial one (float32 without one), and decode updates the state
in its own dtype, so the spec can be checked against itself in float64.
NaN propagate through the sums only: a NaN at token s reaches the rows (and states) whose sums
include s, never an earlier row, another segment or another KV group.

Two forms are tested against each other in tests/hedgehog/test_hedgehog_reference.py: the
vectorized one (prefix sums of k^T v in chunks; the window part on unfolded key bands) and a
per-token / per-query loop (`*_loop`, small shapes only), so the spec itself is checked.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CHUNK = 64  # tokens per prefix-sum chunk in the vectorized causal form (bounds memory, not the math)


# ----------------------------------------------------------------------------- helpers


def _groups(hq: int, hkv: int) -> int:
    if hkv <= 0 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    return hq // hkv


def _segments(cu_seqlens, b: int, t: int) -> list[tuple[int, int]] | None:
    """[(start, end)] of each packed segment, or None without cu_seqlens."""
    if cu_seqlens is None:
        return None
    if b != 1:
        raise ValueError(f"cu_seqlens needs B = 1, got B = {b}")
    cu = [int(c) for c in cu_seqlens.tolist()]
    if len(cu) < 2 or cu[0] != 0 or cu[-1] != t or any(a > e for a, e in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to T = {t}, got {cu}")
    return list(zip(cu[:-1], cu[1:]))


def _state64(initial_state, n: int, hkv: int, f: int, dv: int, like: torch.Tensor):
    if initial_state is None:
        return like.new_zeros(n, hkv, f, dv), like.new_zeros(n, hkv, f)
    s0, z0 = initial_state
    return s0.double(), z0.double()


def _state_out(s: torch.Tensor, z: torch.Tensor, initial_state):
    """The returned state, in the initial state's dtype (float32 without one)."""
    if initial_state is None:
        return s.float(), z.float()
    return s.to(initial_state[0].dtype), z.to(initial_state[1].dtype)


def _phi(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The feature map in float64: x [B, H, T, D] -> [B, H, T, 2F]."""
    u = torch.einsum("bhtd,hdf->bhtf", x.double(), weight.double())
    if bias is not None:
        u = u + bias.double()[None, :, None, :]
    return torch.cat([torch.softmax(u, dim=-1), torch.softmax(-u, dim=-1)], dim=-1)


def _linear_core(q, k, v, s0, z0, causal: bool):
    """One sequence per batch row, float64: numerator [B, Hq, T, Dv], denominator [B, Hq, T]
    (q_t S_t and q_t . z_t) and the final state (S_T, z_T) per KV head."""
    b, hq, t, f = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    g = _groups(hq, hkv)
    qg = q.reshape(b, hkv, g, t, f)  # query head h = j * G + i reads KV head j
    if not causal:
        s = s0 + torch.einsum("bjtf,bjtd->bjfd", k, v)
        z = z0 + k.sum(dim=2)
        num = torch.einsum("bjitf,bjfd->bjitd", qg, s)
        den = torch.einsum("bjitf,bjf->bjit", qg, z)
        return num.reshape(b, hq, t, dv), den.reshape(b, hq, t), s, z
    s, z, nums, dens = s0, z0, [], []
    for c in range(0, t, CHUNK):
        kc, vc, qc = k[:, :, c : c + CHUNK], v[:, :, c : c + CHUNK], qg[:, :, :, c : c + CHUNK]
        st = s[:, :, None] + torch.einsum("bjtf,bjtd->bjtfd", kc, vc).cumsum(dim=2)  # S_t in the chunk
        zt = z[:, :, None] + kc.cumsum(dim=2)
        nums.append(torch.einsum("bjitf,bjtfd->bjitd", qc, st))
        dens.append(torch.einsum("bjitf,bjtf->bjit", qc, zt))
        s, z = st[:, :, -1], zt[:, :, -1]
    num = torch.cat(nums, dim=3) if nums else q.new_zeros(b, hkv, g, 0, dv)
    den = torch.cat(dens, dim=3) if dens else q.new_zeros(b, hkv, g, 0)
    return num.reshape(b, hq, t, dv), den.reshape(b, hq, t), s, z


def _hybrid_core(q, k, pq, pk, v, window: int, alpha, beta, scale: float, eps: float):
    """Sliding-window hybrid of one sequence per batch row, float64 (module docstring)."""
    b, hq, t, d = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    g = _groups(hq, hkv)
    if t == 0:  # an empty packed segment
        return q.new_zeros(b, hq, 0, dv)
    # Linear part: query t reads the prefix state S_{t-window} (keys s <= t - window), i.e. a causal
    # linear attention of the queries shifted by `window` over the first T - window tokens.
    num_l, den_l = q.new_zeros(b, hq, t, dv), q.new_zeros(b, hq, t)
    if t > window:
        zs = q.new_zeros(b, hkv, pk.shape[-1], dv), q.new_zeros(b, hkv, pk.shape[-1])
        n, dn, _, _ = _linear_core(pq[:, :, window:], pk[:, :, : t - window], v[:, :, : t - window], *zs, True)
        num_l = torch.cat([num_l[:, :, :window], n], dim=2)
        den_l = torch.cat([den_l[:, :, :window], dn], dim=2)
    # Softmax part on the band of the last w keys: kw[..., t, :, i] is key t - (w - 1) + i.
    w = max(min(window, t), 1)
    kw = F.pad(k, (0, 0, w - 1, 0)).unfold(2, w, 1)  # [B, Hkv, T, D, w]
    vw = F.pad(v, (0, 0, w - 1, 0)).unfold(2, w, 1)  # [B, Hkv, T, Dv, w]
    pos = torch.arange(t, device=q.device)[:, None] - (w - 1) + torch.arange(w, device=q.device)[None, :]
    sc = torch.einsum("bjitd,bjtdw->bjitw", q.reshape(b, hkv, g, t, d), kw) * scale
    sc = sc.masked_fill(pos < 0, float("-inf"))  # band slots before the sequence start
    e = torch.exp(sc - sc.amax(dim=-1, keepdim=True))
    num_s = torch.einsum("bjitw,bjtdw->bjitd", e, vw).reshape(b, hq, t, dv)
    den_s = e.sum(dim=-1).reshape(b, hq, t)
    a, be = alpha.double()[None, :, None], beta.double()[None, :, None]
    return (be[..., None] * num_s + a[..., None] * num_l) / (be * den_s + a * den_l + eps)[..., None]


def _scale(scale: float | None, d: int) -> float:
    return 1.0 / math.sqrt(d) if scale is None else float(scale)


def _alpha_beta(alpha, beta, hq: int, like: torch.Tensor):
    ones = like.new_ones(hq)
    return (ones if alpha is None else alpha), (ones if beta is None else beta)


def _check_window(window: int, causal: bool, initial_state, return_state: bool) -> None:
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    if window > 0 and not causal:
        raise ValueError("window > 0 needs causal=True")
    if window > 0 and (initial_state is not None or return_state):
        raise ValueError("window > 0 supports neither initial_state nor return_state")


# ----------------------------------------------------------------------------- the spec


def feature_map(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """phi(x) = cat(softmax(u), softmax(-u)), u = x @ weight[h] + bias[h]: [B, H, T, D] -> [B, H, T, 2F]
    in x's dtype."""
    return _phi(x, weight, bias).to(x.dtype)


hedgehog_feature_map = feature_map  # the op's name (DESIGN.md § Hedgehog)


def linear_attention(q, k, v, *, causal=True, eps=1e-6, initial_state=None, return_state=False, cu_seqlens=None):
    """out [B, Hq, T, Dv] (v's dtype) = (q_t S_t) / (q_t . z_t + eps) on non-negative features
    q [B, Hq, T, F'], k [B, Hkv, T, F']; with return_state, (out, (S_T, z_T))."""
    b, _, t, f = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    q64, k64, v64 = q.double(), k.double(), v.double()
    segs = _segments(cu_seqlens, b, t)
    s0, z0 = _state64(initial_state, b if segs is None else len(segs), hkv, f, dv, q64)
    if segs is None:
        num, den, s, z = _linear_core(q64, k64, v64, s0, z0, causal)
    else:
        parts = [_linear_core(q64[:, :, a:e], k64[:, :, a:e], v64[:, :, a:e], s0[i : i + 1], z0[i : i + 1], causal)
                 for i, (a, e) in enumerate(segs)]
        num, den = torch.cat([p[0] for p in parts], dim=2), torch.cat([p[1] for p in parts], dim=2)
        s, z = torch.cat([p[2] for p in parts]), torch.cat([p[3] for p in parts])
    out = (num / (den + eps)[..., None]).to(v.dtype)
    return (out, _state_out(s, z, initial_state)) if return_state else out


def hedgehog_attention(
    q, k, v, q_weight, k_weight, q_bias=None, k_bias=None, *, causal=True, eps=1e-6, initial_state=None,
    return_state=False, window=0, alpha=None, beta=None, scale=None, cu_seqlens=None,
):
    """Linear attention of the Hedgehog features of q and k (window = 0), or the sliding-window
    hybrid (window > 0, causal only); out [B, Hq, T, Dv] in v's dtype. alpha, beta and scale only
    matter when window > 0."""
    _check_window(window, causal, initial_state, return_state)
    pq, pk = _phi(q, q_weight, q_bias), _phi(k, k_weight, k_bias)
    if window == 0:
        return linear_attention(pq, pk, v, causal=causal, eps=eps, initial_state=initial_state,
                                return_state=return_state, cu_seqlens=cu_seqlens)
    b, hq, t, d = q.shape
    alpha, beta = _alpha_beta(alpha, beta, hq, pq)
    args = (q.double(), k.double(), pq, pk, v.double())
    segs = _segments(cu_seqlens, b, t)
    if segs is None:
        out = _hybrid_core(*args, window, alpha, beta, _scale(scale, d), eps)
    else:
        out = torch.cat([_hybrid_core(*(x[:, :, a:e] for x in args), window, alpha, beta, _scale(scale, d), eps)
                         for a, e in segs], dim=2)
    return out.to(v.dtype)


def hedgehog_decode(q, k, v, q_weight, k_weight, q_bias=None, k_bias=None, *, state, eps=1e-6):
    """One token (q [B, Hq, D], k [B, Hkv, D], v [B, Hkv, Dv]): state (S, z) += (phi_k^T v, phi_k)
    in place, then out [B, Hq, Dv] = phi_q S / (phi_q . z + eps) in v's dtype."""
    s, z = state
    b, hq, _ = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    g = _groups(hq, hkv)
    pq = _phi(q[:, :, None], q_weight, q_bias)[:, :, 0]
    pk = _phi(k[:, :, None], k_weight, k_bias)[:, :, 0]
    s.copy_(s.double() + torch.einsum("bjf,bjd->bjfd", pk, v.double()))
    z.copy_(z.double() + pk)
    qg = pq.reshape(b, hkv, g, -1)
    num = torch.einsum("bjif,bjfd->bjid", qg, s.double()).reshape(b, hq, dv)
    den = torch.einsum("bjif,bjf->bji", qg, z.double()).reshape(b, hq)
    return (num / (den + eps)[..., None]).to(v.dtype)


# ----------------------------------------------------------------------------- loop forms (tests)


def feature_map_loop(x, weight, bias=None) -> torch.Tensor:
    """feature_map one (b, h, t) row at a time, softmax written out (max-shifted exponentials)."""
    b_sz, h_sz, t_sz, _ = x.shape
    f = weight.shape[-1]
    out = torch.zeros(b_sz, h_sz, t_sz, 2 * f, dtype=torch.float64)
    for b in range(b_sz):
        for h in range(h_sz):
            for t in range(t_sz):
                u = x[b, h, t].double() @ weight[h].double()
                if bias is not None:
                    u = u + bias[h].double()
                for half, sign in enumerate((1.0, -1.0)):
                    ex = torch.exp(sign * u - torch.max(sign * u))
                    out[b, h, t, half * f : (half + 1) * f] = ex / ex.sum()
    return out.to(x.dtype)


def linear_attention_loop(q, k, v, *, causal=True, eps=1e-6, initial_state=None, return_state=False,
                          cu_seqlens=None):
    """linear_attention as the recurrence, one query head and one token at a time: per (sequence,
    query head h) the state of KV head h // G is rebuilt token by token from S0, z0."""
    b_sz, hq, t_sz, f = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    g = hq // hkv
    segs = _segments(cu_seqlens, b_sz, t_sz)
    seqs = [(b, b, 0, t_sz) for b in range(b_sz)] if segs is None else [(0, i, a, e) for i, (a, e) in enumerate(segs)]
    out = torch.zeros(b_sz, hq, t_sz, dv, dtype=torch.float64)
    s_fin = torch.zeros(len(seqs), hkv, f, dv, dtype=torch.float64)
    z_fin = torch.zeros(len(seqs), hkv, f, dtype=torch.float64)
    for b, n, a, e in seqs:
        for h in range(hq):
            j = h // g
            s = torch.zeros(f, dv, dtype=torch.float64) if initial_state is None else initial_state[0][n, j].double()
            z = torch.zeros(f, dtype=torch.float64) if initial_state is None else initial_state[1][n, j].double()
            if not causal:
                for t in range(a, e):
                    s = s + torch.outer(k[b, j, t].double(), v[b, j, t].double())
                    z = z + k[b, j, t].double()
            for t in range(a, e):
                if causal:
                    s = s + torch.outer(k[b, j, t].double(), v[b, j, t].double())
                    z = z + k[b, j, t].double()
                qt = q[b, h, t].double()
                out[b, h, t] = (qt @ s) / (qt @ z + eps)
            s_fin[n, j], z_fin[n, j] = s, z
    out = out.to(v.dtype)
    return (out, _state_out(s_fin, z_fin, initial_state)) if return_state else out


def hedgehog_attention_loop(
    q, k, v, q_weight, k_weight, q_bias=None, k_bias=None, *, causal=True, eps=1e-6, initial_state=None,
    return_state=False, window=0, alpha=None, beta=None, scale=None, cu_seqlens=None,
):
    """hedgehog_attention from the loop forms: window = 0 through feature_map_loop and
    linear_attention_loop; window > 0 one query at a time, its window keys and older keys
    split by position as in the module docstring."""
    _check_window(window, causal, initial_state, return_state)
    pq = feature_map_loop(q.double(), q_weight, q_bias)
    pk = feature_map_loop(k.double(), k_weight, k_bias)
    if window == 0:
        return linear_attention_loop(pq, pk, v, causal=causal, eps=eps, initial_state=initial_state,
                                     return_state=return_state, cu_seqlens=cu_seqlens)
    b_sz, hq, t_sz, d = q.shape
    g = hq // k.shape[1]
    sc = _scale(scale, d)
    alpha, beta = _alpha_beta(alpha, beta, hq, pq)
    segs = _segments(cu_seqlens, b_sz, t_sz)
    seqs = [(b, 0, t_sz) for b in range(b_sz)] if segs is None else [(0, a, e) for a, e in segs]
    out = torch.zeros(b_sz, hq, t_sz, v.shape[-1], dtype=torch.float64)
    for b, a, e in seqs:
        for h in range(hq):
            j = h // g
            al, be = float(alpha[h]), float(beta[h])
            for t in range(a, e):
                win = list(range(max(a, t - window + 1), t + 1))  # t - window < s <= t
                old = list(range(a, t - window + 1))  # s <= t - window
                scores = torch.stack([sc * (q[b, h, t].double() @ k[b, j, s].double()) for s in win])
                ex = torch.exp(scores - torch.max(scores))
                num = be * sum(ex[i] * v[b, j, s].double() for i, s in enumerate(win))
                den = be * ex.sum()
                for s in old:
                    l_s = pq[b, h, t] @ pk[b, j, s]
                    num = num + al * l_s * v[b, j, s].double()
                    den = den + al * l_s
                out[b, h, t] = num / (den + eps)
    return out.to(v.dtype)
