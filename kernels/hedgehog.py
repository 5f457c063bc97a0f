"""Triton kernels for Hedgehog linear attention (forward and backward), chunked with tl.dot.

Layouts (the spec is pyfast/reference/hedgehog.py):
    q [B, Hq, T, D], k [B, Hkv, T, D], v [B, Hkv, T, Dv]   any strides (a last-dim stride != 1 is copied);
                                                       Hq = G * Hkv, query head h reads KV head h // G
    q_weight [Hq, D, F], k_weight [Hkv, D, F], biases [H, F]   (made contiguous)
    linear_attention: q, k are the features themselves, [B, H, T, F'] (FMAP = False)
    state S [N, Hkv, F', Dv], z [N, Hkv, F'] float32, F' = 2F with the feature map
    cu_seqlens int32 [N + 1] (VARLEN, B = 1): segment n is tokens [cu[n], cu[n+1])
    out [B, Hq, T, Dv] in v's dtype

Features. With FMAP the kernels compute phi(x) = [softmax(x W + b), softmax(-(x W + b))] of a
[BT, D] tile in registers (`_features`, x @ W by tl.dot) and keep the two halves as separate
[BT, BF] tiles (p, n), so the state is two [BF, BV] tiles (rows [0, F) and [F, 2F) of S): no
feature is ever written to memory, the backward recomputes them. Without FMAP the given features
are the `p` tile and the `n` half is never touched (every use sits under `if FMAP`).

Kernels (one sequence = a batch row, or a packed segment with VARLEN; chunks of BT tokens are
aligned to the sequence start, so nothing crosses a segment boundary):
    _fwd_kernel      grid (Dv tiles, Hq, N). Per chunk: A = Q K^T masked to s <= t (causal),
                     num = Q S + A V, den = Q . z + rowsum(A) + eps, then S += K^T V, z += sum K,
                     S, z in fp32 registers across chunks. Non-causal: one pass builds S, z, a second
                     writes out = Q S / (Q . z + eps). The program of the first query head of a
                     group stores the final state (Dv tile 0 also z).
    (window > 0: the sliding-window hybrid, forward and backward, is in kernels/hedgehog_hybrid.py,
    built from the helpers here; its linear part's key gradients reuse _bwd_kv_kernel, shifted.)
    _states_kernel   grid (Dv tiles, Hkv, N), backward pre-pass: the state entering every chunk
                     (causal) or the final state (non-causal) into fp32 slots; the slots of
                     sequence n start at chunk n * NCS (dense) or cu[n] // BT + n (packed; this
                     bound never overlaps the next segment's slots, see `_slot_base`).
    _bwd_q_kernel    grid (Hq, N): per chunk, from the slots: R = G S^T and P0 = G V^T over all Dv
                     tiles, den and gnum = G . num, r = 1 / den, k = -gnum / den^2 (stored per row
                     for the key pass), dQ = r R + k z^T + P K (P = r P0 + k on s <= t), then the
                     feature-map backward up to du_q (see below).
    _bwd_kv_kernel   grid (Hkv, N), last chunk first, all of Dv in one tile: running dS, dz of the
                     later chunks (grad_S, grad_z at the start). dK = V dS^T + dz and dV = K dS,
                     plus per query head of the group dV += M^T (r G), dK += P^T Q (masked
                     intra-chunk), then dS += Q^T (r G), dz += sum k Q. Non-causal: dS, dz over
                     every query first. Ends with dS0, dz0 = dS, dz. WINDOW > 0 (the hybrid's
                     linear part): query token t + WINDOW plays query t (the launcher passes q, grad
                     and r, k rows shifted by WINDOW) and the keys stop WINDOW before the end.
Weight and bias gradients: the backward kernels stop at du = d(x W + b) (fp32, [B, H, T, F]) and
the launcher finishes dx = du W^T, dW = x^T du, db = sum du with torch matmuls (deterministic;
see `_features_backward` for why not in the kernels).

Precision: accumulation, softmax, states and r, k in fp32. 16-bit inputs: the feature x feature
and feature x value/grad products take operands rounded to the input dtype (tensor cores); every
product with a state or an r-scaled gradient takes fp32 operands (TF32 on GPUs: a state summed
over many tokens would lose range or precision in fp16/bf16). fp32 inputs: "ieee" fp32 dots.
Under TRITON_INTERPRET=1 bf16 tl.dot is not supported, so bf16 operands are rounded to bf16 and
then upcast to fp32 (UPCAST: the same products). NaN: a NaN in q or k reaches exactly the rows the
spec puts it in (masks use tl.where); a NaN in v at token s also reaches the earlier rows of s's
chunk (0 x NaN in the masked A @ V product).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pyfast.kernels._utils import Launch, Target, run_plan

# tl.dot needs every dimension >= 16: D, F, Dv and the chunk are padded to at least this.
MIN_DOT = 16


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------


@triton.jit
def _mm(a, b, like, LOWP: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with an fp32 accumulator. LOWP: operands rounded to like's element type (the input
    dtype; upcast again with UPCAST, the interpreter's missing bf16 dot); else fp32 operands."""
    if LOWP:
        a = a.to(like.dtype.element_ty)
        b = b.to(like.dtype.element_ty)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    else:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _load_rows(p, s_t, o_t, m_t, W, BW: tl.constexpr):
    """Rows o_t (masked by m_t) of a [T, W] matrix with row stride s_t as an fp32 [BT, BW] tile, zero padded."""
    o_w = tl.arange(0, BW)
    m = m_t[:, None] & (o_w < W)[None, :]
    return tl.load(p + o_t.to(tl.int64)[:, None] * s_t + o_w[None, :], mask=m, other=0).to(tl.float32)


@triton.jit
def _store_rows(p, s_t, o_t, m_t, x, W, BW: tl.constexpr):
    o_w = tl.arange(0, BW)
    m = m_t[:, None] & (o_w < W)[None, :]
    tl.store(p + o_t.to(tl.int64)[:, None] * s_t + o_w[None, :], x.to(p.dtype.element_ty), mask=m)


@triton.jit
def _half_softmax(u, m_f):
    """Row softmax of u over the valid columns m_f (zero elsewhere)."""
    u = tl.where(m_f[None, :], u, float("-inf"))
    e = tl.exp(u - tl.max(u, axis=1)[:, None])
    return e / tl.sum(e, axis=1)[:, None]


# Feature-map contraction slice: x @ W runs over D in slices of this many columns, each x and W
# slice loaded in the loop. A whole [BT, D] x tile as a dot operand is replicated in every warp
# that splits the F columns (8 warps on a 32-row chunk: 64 registers per thread at D 128), and a
# [D, F] weight kept for the whole program costs 16-32 more per map: both spilled at the GPU bench
# shape. The slices are reread from L1/L2 per chunk.
BK_MAX = tl.constexpr(32)


@triton.jit
def _bias(p_b, F: tl.constexpr, HAS_BIAS: tl.constexpr, BF: tl.constexpr):
    """A head's feature-map bias [BF] in fp32 (zero without one)."""
    o_f = tl.arange(0, BF)
    if HAS_BIAS:
        b_b = tl.load(p_b + o_f, mask=o_f < F, other=0).to(tl.float32)
    else:
        b_b = tl.zeros([BF], dtype=tl.float32)
    return b_b


@triton.jit
def _features(p_x, s_xt, o_t, m_t, p_w, b_b, F: tl.constexpr, D: tl.constexpr, FMAP: tl.constexpr,
              BD: tl.constexpr, BF: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """(p, n) of tokens o_t: with FMAP, p, n = softmax(+-(x W + b)) [BT, BF] of the rows x of p_x
    and the head's weight p_w [D, F] (rows past m_t zero: a masked x row would still get
    softmax(b)); else p = the given features [BT, BF] (F wide) and n = p (unused)."""
    if FMAP:
        BK: tl.constexpr = BK_MAX if BD > BK_MAX else BD
        o_k, o_f = tl.arange(0, BK), tl.arange(0, BF)
        m_f = o_f < F
        b_u = b_b[None, :] + tl.zeros([o_t.shape[0], BF], dtype=tl.float32)
        for d0 in range(0, BD, BK):  # [BT, BK] @ [BK, BF] -> [BT, BF] per slice
            b_x = _load_rows(p_x + d0, s_xt, o_t, m_t, D - d0, BK)
            m_w = (d0 + o_k < D)[:, None] & m_f[None, :]
            b_w = tl.load(p_w + (d0 + o_k)[:, None] * F + o_f[None, :], mask=m_w, other=0)
            b_u += _mm(b_x, b_w, p_x, True, PREC, UPCAST)
        b_p = tl.where(m_t[:, None], _half_softmax(b_u, m_f), 0.0)
        b_n = tl.where(m_t[:, None], _half_softmax(-b_u, m_f), 0.0)
    else:
        b_p = _load_rows(p_x, s_xt, o_t, m_t, F, BF)
        b_n = b_p
    return b_p, b_n


@triton.jit
def _features_backward(b_p, b_n, b_dp, b_dn, FMAP: tl.constexpr):
    """What a backward kernel stores for feature gradients (dp, dn): with FMAP the gradient of the
    pre-softmax u = x W + b, du = p (dp - p.dp) - n (dn - n.dn) (fp32; the launcher finishes dx = du
    W^T, dW = x^T du, db = sum du with torch matmuls: a [BD, BF] dW accumulator and the x, W tiles
    of those products spilled at the GPU bench shape); x-less linear attention: dx = dp."""
    if FMAP:
        b_du = b_p * (b_dp - tl.sum(b_p * b_dp, axis=1)[:, None]) - b_n * (b_dn - tl.sum(b_n * b_dn, axis=1)[:, None])
    else:
        b_du = b_dp
    return b_du


@triton.jit
def _load_state(p_s, p_z, o_v, DV: tl.constexpr, F: tl.constexpr, FMAP: tl.constexpr, BF: tl.constexpr):
    """(S_p, S_n, z_p, z_n): the two feature halves of a state S [F', Dv] (columns o_v), z [F']."""
    o_f = tl.arange(0, BF)
    m = (o_f < F)[:, None] & (o_v < DV)[None, :]
    p = p_s + o_f[:, None] * DV + o_v[None, :]
    b_sp = tl.load(p, mask=m, other=0)
    b_zp = tl.load(p_z + o_f, mask=o_f < F, other=0)
    if FMAP:
        b_sn = tl.load(p + F * DV, mask=m, other=0)
        b_zn = tl.load(p_z + F + o_f, mask=o_f < F, other=0)
    else:
        b_sn = b_sp
        b_zn = b_zp
    return b_sp, b_sn, b_zp, b_zn


@triton.jit
def _state_or_zeros(p_s, p_z, o_v, HAS: tl.constexpr, DV: tl.constexpr, F: tl.constexpr, FMAP: tl.constexpr,
                    BF: tl.constexpr, BV: tl.constexpr):
    """_load_state when HAS (an initial state, or a state gradient), else a zero state."""
    if HAS:
        b_sp, b_sn, b_zp, b_zn = _load_state(p_s, p_z, o_v, DV, F, FMAP, BF)
    else:
        b_sp = tl.zeros([BF, BV], dtype=tl.float32)
        b_sn = tl.zeros([BF, BV], dtype=tl.float32)
        b_zp = tl.zeros([BF], dtype=tl.float32)
        b_zn = tl.zeros([BF], dtype=tl.float32)
    return b_sp, b_sn, b_zp, b_zn


@triton.jit
def _store_state(p_s, p_z, o_v, b_sp, b_sn, b_zp, b_zn, STORE_Z, DV: tl.constexpr, F: tl.constexpr,
                 FMAP: tl.constexpr, BF: tl.constexpr):
    o_f = tl.arange(0, BF)
    m = (o_f < F)[:, None] & (o_v < DV)[None, :]
    p = p_s + o_f[:, None] * DV + o_v[None, :]
    tl.store(p, b_sp, mask=m)
    if FMAP:
        tl.store(p + F * DV, b_sn, mask=m)
    if STORE_Z:
        tl.store(p_z + o_f, b_zp, mask=o_f < F)
        if FMAP:
            tl.store(p_z + F + o_f, b_zn, mask=o_f < F)


@triton.jit
def _absorb(b_kp, b_kn, b_v, b_sp, b_sn, b_zp, b_zn, p_v, FMAP: tl.constexpr, PREC: tl.constexpr,
            UPCAST: tl.constexpr):
    """S += K^T V, z += sum K over a chunk's keys (padded rows are zero)."""
    b_sp += _mm(tl.trans(b_kp), b_v, p_v, True, PREC, UPCAST)  # [BF, BT] @ [BT, BV] -> [BF, BV]
    b_zp += tl.sum(b_kp, axis=0)
    if FMAP:
        b_sn += _mm(tl.trans(b_kn), b_v, p_v, True, PREC, UPCAST)
        b_zn += tl.sum(b_kn, axis=0)
    return b_sp, b_sn, b_zp, b_zn


@triton.jit
def _scores(b_qp, b_qn, b_kp, b_kn, p_v, FMAP: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Q K^T of the feature tiles: [BT, BF] @ [BF, BT] -> [BT, BT] (both halves)."""
    b_a = _mm(b_qp, tl.trans(b_kp), p_v, True, PREC, UPCAST)
    if FMAP:
        b_a += _mm(b_qn, tl.trans(b_kn), p_v, True, PREC, UPCAST)
    return b_a


@triton.jit
def _inter(b_qp, b_qn, b_sp, b_sn, b_zp, b_zn, p_v, FMAP: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """(Q S, Q . z) of a query tile against a state."""
    b_num = _mm(b_qp, b_sp, p_v, False, PREC, UPCAST)  # [BT, BF] @ [BF, BV] -> [BT, BV]
    b_den = tl.sum(b_qp * b_zp[None, :], axis=1)
    if FMAP:
        b_num += _mm(b_qn, b_sn, p_v, False, PREC, UPCAST)
        b_den += tl.sum(b_qn * b_zn[None, :], axis=1)
    return b_num, b_den


@triton.jit
def _sequence(cu, i_n, T, VARLEN: tl.constexpr):
    """(batch row, first token, end token) of sequence i_n."""
    if VARLEN:
        bos = tl.load(cu + i_n)
        eos = tl.load(cu + i_n + 1)
        i_b = 0
    else:
        bos = 0
        eos = T
        i_b = i_n
    return i_b, bos, eos


@triton.jit
def _slot_base(cu, i_n, T, BT: tl.constexpr, VARLEN: tl.constexpr):
    """First chunk slot of sequence i_n: n * cdiv(T, BT) dense; cu[n] // BT + n packed (segment n
    has at most floor((cu[n] % BT + len) / BT) + 1 chunks, so it ends before the next one's base)."""
    if VARLEN:
        base = tl.load(cu + i_n) // BT + i_n
    else:
        base = i_n * tl.cdiv(T, BT)
    return base


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _fwd_kernel(
    q, k, v, wq, wk, bq, bk, s0, z0, out, s_out, z_out, cu,
    T, eps,
    s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_ob, s_oh, s_ot,
    G: tl.constexpr, D: tl.constexpr, F: tl.constexpr, DV: tl.constexpr, FMAP: tl.constexpr, CAUSAL: tl.constexpr,
    VARLEN: tl.constexpr, HAS_QB: tl.constexpr, HAS_KB: tl.constexpr, HAS_S0: tl.constexpr, STORE_STATE: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """Program (i_v, h, n): out[n, h, :, Dv tile i_v] of sequence n (module docstring)."""
    i_v, i_h, i_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    hkv = tl.num_programs(1) // G
    i_j = i_h // G
    i_b, bos, eos = _sequence(cu, i_n, T, VARLEN)
    FW: tl.constexpr = 2 * F if FMAP else F  # state rows
    o_v = i_v * BV + tl.arange(0, BV)
    o_i = tl.arange(0, BT)
    p_q = q + i_b * s_qb + i_h.to(tl.int64) * s_qh
    p_k = k + i_b * s_kb + i_j.to(tl.int64) * s_kh
    p_v = v + i_b * s_vb + i_j.to(tl.int64) * s_vh + i_v * BV
    p_o = out + i_b * s_ob + i_h.to(tl.int64) * s_oh + i_v * BV
    b_bq, b_bk = _bias(bq + i_h * F, F, HAS_QB, BF), _bias(bk + i_j * F, F, HAS_KB, BF)
    o_state = (i_n * hkv + i_j).to(tl.int64) * FW
    b_sp, b_sn, b_zp, b_zn = _state_or_zeros(s0 + o_state * DV, z0 + o_state, o_v, HAS_S0, DV, F, FMAP, BF, BV)
    n_chunks = tl.cdiv(eos - bos, BT)
    if not CAUSAL:  # the whole sequence's state first
        for c in range(0, n_chunks):
            o_t = bos + c * BT + o_i
            m_t = o_t < eos
            b_kp, b_kn = _features(p_k, s_kt, o_t, m_t, wk + i_j * D * F, b_bk, F, D, FMAP, BD, BF, PREC, UPCAST)
            b_v = _load_rows(p_v, s_vt, o_t, m_t, DV - i_v * BV, BV)
            b_sp, b_sn, b_zp, b_zn = _absorb(b_kp, b_kn, b_v, b_sp, b_sn, b_zp, b_zn, v, FMAP, PREC, UPCAST)
    for c in range(0, n_chunks):
        o_t = bos + c * BT + o_i
        m_t = o_t < eos
        b_qp, b_qn = _features(p_q, s_qt, o_t, m_t, wq + i_h * D * F, b_bq, F, D, FMAP, BD, BF, PREC, UPCAST)
        b_num, b_den = _inter(b_qp, b_qn, b_sp, b_sn, b_zp, b_zn, v, FMAP, PREC, UPCAST)
        if CAUSAL:
            b_kp, b_kn = _features(p_k, s_kt, o_t, m_t, wk + i_j * D * F, b_bk, F, D, FMAP, BD, BF, PREC, UPCAST)
            b_v = _load_rows(p_v, s_vt, o_t, m_t, DV - i_v * BV, BV)
            b_a = _scores(b_qp, b_qn, b_kp, b_kn, v, FMAP, PREC, UPCAST)
            b_a = tl.where(o_i[:, None] >= o_i[None, :], b_a, 0.0)  # keys s <= t of the chunk
            b_num += _mm(b_a, b_v, v, True, PREC, UPCAST)  # [BT, BT] @ [BT, BV] -> [BT, BV]
            b_den += tl.sum(b_a, axis=1)
            b_sp, b_sn, b_zp, b_zn = _absorb(b_kp, b_kn, b_v, b_sp, b_sn, b_zp, b_zn, v, FMAP, PREC, UPCAST)
        _store_rows(p_o, s_ot, o_t, m_t, b_num / (b_den + eps)[:, None], DV - i_v * BV, BV)
    if STORE_STATE:
        if i_h % G == 0:
            _store_state(s_out + o_state * DV, z_out + o_state, o_v, b_sp, b_sn, b_zp, b_zn, i_v == 0, DV, F,
                         FMAP, BF)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _states_kernel(
    k, v, wk, bk, s0, z0, slots_s, slots_z, cu,
    T, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt,
    D: tl.constexpr, F: tl.constexpr, DV: tl.constexpr, FMAP: tl.constexpr, CAUSAL: tl.constexpr,
    VARLEN: tl.constexpr, HAS_QB: tl.constexpr, HAS_KB: tl.constexpr, HAS_S0: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """Program (i_v, j, n): slot base + c = the state entering chunk c (causal), slot base = the
    final state (non-causal); slots [NSLOT, Hkv, F', Dv] / [NSLOT, Hkv, F']."""
    i_v, i_j, i_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    hkv = tl.num_programs(1)
    i_b, bos, eos = _sequence(cu, i_n, T, VARLEN)
    base = _slot_base(cu, i_n, T, BT, VARLEN)
    FW: tl.constexpr = 2 * F if FMAP else F
    o_v = i_v * BV + tl.arange(0, BV)
    o_i = tl.arange(0, BT)
    p_k = k + i_b * s_kb + i_j.to(tl.int64) * s_kh
    p_v = v + i_b * s_vb + i_j.to(tl.int64) * s_vh + i_v * BV
    b_bk = _bias(bk + i_j * F, F, HAS_KB, BF)
    o_state = (i_n * hkv + i_j).to(tl.int64) * FW
    b_sp, b_sn, b_zp, b_zn = _state_or_zeros(s0 + o_state * DV, z0 + o_state, o_v, HAS_S0, DV, F, FMAP, BF, BV)
    n_chunks = tl.cdiv(eos - bos, BT)
    for c in range(0, n_chunks):
        if CAUSAL:
            o_slot = ((base + c) * hkv + i_j).to(tl.int64) * FW
            _store_state(slots_s + o_slot * DV, slots_z + o_slot, o_v, b_sp, b_sn, b_zp, b_zn, i_v == 0, DV, F, FMAP, BF)
        o_t = bos + c * BT + o_i
        m_t = o_t < eos
        b_kp, b_kn = _features(p_k, s_kt, o_t, m_t, wk + i_j * D * F, b_bk, F, D, FMAP, BD, BF, PREC, UPCAST)
        b_v = _load_rows(p_v, s_vt, o_t, m_t, DV - i_v * BV, BV)
        b_sp, b_sn, b_zp, b_zn = _absorb(b_kp, b_kn, b_v, b_sp, b_sn, b_zp, b_zn, v, FMAP, PREC, UPCAST)
    if not CAUSAL:
        if n_chunks > 0:
            o_slot = (base * hkv + i_j).to(tl.int64) * FW
            _store_state(slots_s + o_slot * DV, slots_z + o_slot, o_v, b_sp, b_sn, b_zp, b_zn, i_v == 0, DV, F, FMAP, BF)


@triton.jit
def _bwd_q_kernel(
    q, k, v, wq, wk, bq, bk, go, slots_s, slots_z, rr, kk, dq, cu,
    T, eps,
    s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_gb, s_gh, s_gt,
    G: tl.constexpr, D: tl.constexpr, F: tl.constexpr, DV: tl.constexpr, FMAP: tl.constexpr, CAUSAL: tl.constexpr,
    VARLEN: tl.constexpr, HAS_QB: tl.constexpr, HAS_KB: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """Program (h, n): of query head h over sequence n, dq (x-less) or du_q [B, Hq, T, F] fp32
    (FMAP, `_features_backward`), and r and k per row into rr, kk [B, Hq, T]."""
    i_h, i_n = tl.program_id(0), tl.program_id(1)
    hq = tl.num_programs(0)
    hkv = hq // G
    i_j = i_h // G
    i_b, bos, eos = _sequence(cu, i_n, T, VARLEN)
    base = _slot_base(cu, i_n, T, BT, VARLEN)
    FW: tl.constexpr = 2 * F if FMAP else F
    o_i = tl.arange(0, BT)
    o_f = tl.arange(0, BF)
    p_q = q + i_b * s_qb + i_h.to(tl.int64) * s_qh
    p_k = k + i_b * s_kb + i_j.to(tl.int64) * s_kh
    p_v = v + i_b * s_vb + i_j.to(tl.int64) * s_vh
    p_g = go + i_b * s_gb + i_h.to(tl.int64) * s_gh
    p_dq = dq + (i_b * hq + i_h).to(tl.int64) * T * F
    p_r = rr + (i_b * hq + i_h).to(tl.int64) * T
    p_kk = kk + (i_b * hq + i_h).to(tl.int64) * T
    b_bq, b_bk = _bias(bq + i_h * F, F, HAS_QB, BF), _bias(bk + i_j * F, F, HAS_KB, BF)
    for c in range(0, tl.cdiv(eos - bos, BT)):
        o_t = bos + c * BT + o_i
        m_t = o_t < eos
        o_slot = ((base + (c if CAUSAL else 0)) * hkv + i_j).to(tl.int64) * FW
        b_qp, b_qn = _features(p_q, s_qt, o_t, m_t, wq + i_h * D * F, b_bq, F, D, FMAP, BD, BF, PREC, UPCAST)
        b_zp = tl.load(slots_z + o_slot + o_f, mask=o_f < F, other=0)
        b_den = tl.sum(b_qp * b_zp[None, :], axis=1)
        if FMAP:
            b_zn = tl.load(slots_z + o_slot + F + o_f, mask=o_f < F, other=0)
            b_den += tl.sum(b_qn * b_zn[None, :], axis=1)
        else:
            b_zn = b_zp
        if CAUSAL:
            b_kp, b_kn = _features(p_k, s_kt, o_t, m_t, wk + i_j * D * F, b_bk, F, D, FMAP, BD, BF, PREC, UPCAST)
            b_m = tl.where(o_i[:, None] >= o_i[None, :], _scores(b_qp, b_qn, b_kp, b_kn, v, FMAP, PREC, UPCAST), 0.0)
            b_den += tl.sum(b_m, axis=1)
        # R = G S^T and P0 = G V^T, over the Dv tiles.
        b_rp = tl.zeros([BT, BF], dtype=tl.float32)
        b_rn = tl.zeros([BT, BF], dtype=tl.float32)
        b_p0 = tl.zeros([BT, BT], dtype=tl.float32)
        for v0 in range(0, DV, BV):
            o_v = v0 + tl.arange(0, BV)
            b_g = _load_rows(p_g + v0, s_gt, o_t, m_t, DV - v0, BV)
            b_sp, b_sn, b_tzp, b_tzn = _load_state(slots_s + o_slot * DV, slots_z, o_v, DV, F, FMAP, BF)
            b_rp += _mm(b_g, tl.trans(b_sp), v, False, PREC, UPCAST)  # [BT, BV] @ [BV, BF] -> [BT, BF]
            if FMAP:
                b_rn += _mm(b_g, tl.trans(b_sn), v, False, PREC, UPCAST)
            if CAUSAL:
                b_v = _load_rows(p_v + v0, s_vt, o_t, m_t, DV - v0, BV)
                b_p0 += _mm(b_g, tl.trans(b_v), v, True, PREC, UPCAST)  # [BT, BV] @ [BV, BT] -> [BT, BT]
        b_gnum = tl.sum(b_qp * b_rp, axis=1)
        if FMAP:
            b_gnum += tl.sum(b_qn * b_rn, axis=1)
        if CAUSAL:
            b_gnum += tl.sum(b_m * b_p0, axis=1)
        b_r = tl.where(m_t, 1.0 / (b_den + eps), 0.0)  # padded rows: 0 (eps may be 0)
        b_k = -b_gnum * b_r * b_r
        tl.store(p_r + o_t, b_r, mask=m_t)
        tl.store(p_kk + o_t, b_k, mask=m_t)
        # dQ = r R + k z^T (+ P K)
        b_dqp = b_r[:, None] * b_rp + b_k[:, None] * b_zp[None, :]
        b_dqn = b_r[:, None] * b_rn + b_k[:, None] * b_zn[None, :]
        if CAUSAL:
            b_pm = tl.where(o_i[:, None] >= o_i[None, :], b_r[:, None] * b_p0 + b_k[:, None], 0.0)
            b_dqp += _mm(b_pm, b_kp, v, False, PREC, UPCAST)  # [BT, BT] @ [BT, BF] -> [BT, BF]
            if FMAP:
                b_dqn += _mm(b_pm, b_kn, v, False, PREC, UPCAST)
        _store_rows(p_dq, F, o_t, m_t, _features_backward(b_qp, b_qn, b_dqp, b_dqn, FMAP), F, BF)


@triton.jit
def _bwd_kv_kernel(
    q, k, v, wq, wk, bq, bk, go, rr, kk, gs, gz, dk, dv, ds0, dz0, cu,
    T, WINDOW,
    s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_gb, s_gh, s_gt,
    G: tl.constexpr, D: tl.constexpr, F: tl.constexpr, DV: tl.constexpr, FMAP: tl.constexpr, CAUSAL: tl.constexpr,
    VARLEN: tl.constexpr, HAS_QB: tl.constexpr, HAS_KB: tl.constexpr, HAS_GS: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """Program (j, n): of KV head j over sequence n, dk (x-less) or du_k [B, Hkv, T, F] fp32 (FMAP),
    dv (all of Dv in one BV tile), and dS0, dz0 [N, Hkv, F', Dv] / [N, Hkv, F']."""
    i_j, i_n = tl.program_id(0), tl.program_id(1)
    hkv = tl.num_programs(0)
    hq = hkv * G
    i_b, bos, eos = _sequence(cu, i_n, T, VARLEN)
    eos = tl.maximum(eos - WINDOW, bos)  # the keys some (shifted) query reads
    FW: tl.constexpr = 2 * F if FMAP else F
    o_v = tl.arange(0, BV)
    o_i = tl.arange(0, BT)
    o_f = tl.arange(0, BF)
    m_st = o_i[None, :] >= o_i[:, None]  # [s, t]: query t sees key s (transposed causal mask)
    p_k = k + i_b * s_kb + i_j.to(tl.int64) * s_kh
    p_v = v + i_b * s_vb + i_j.to(tl.int64) * s_vh
    p_dk = dk + (i_b * hkv + i_j).to(tl.int64) * T * F
    p_dv = dv + (i_b * hkv + i_j).to(tl.int64) * T * DV
    b_bk = _bias(bk + i_j * F, F, HAS_KB, BF)
    o_state = (i_n * hkv + i_j).to(tl.int64) * FW
    b_dsp, b_dsn, b_dzp, b_dzn = _state_or_zeros(gs + o_state * DV, gz + o_state, o_v, HAS_GS, DV, F, FMAP, BF, BV)
    n_chunks = tl.cdiv(eos - bos, BT)
    if not CAUSAL:  # every query reads every key: dS, dz over the whole sequence first
        for c in range(0, n_chunks):
            o_t = bos + c * BT + o_i
            m_t = o_t < eos
            for g in range(G):
                i_h = i_j * G + g
                b_g, b_qp, b_qn, b_r, b_k = _query_side(q, wq, bq, go, rr, kk, i_b, i_h, hq, T, o_t, m_t,
                                                        s_qb, s_qh, s_qt, s_gb, s_gh, s_gt, D, F, DV, FMAP,
                                                        HAS_QB, BD, BF, BV, PREC, UPCAST)
                b_dsp, b_dsn, b_dzp, b_dzn = _accumulate_ds(b_qp, b_qn, b_r[:, None] * b_g, b_k, b_dsp, b_dsn,
                                                            b_dzp, b_dzn, v, FMAP, PREC, UPCAST)
    for i in range(0, n_chunks):
        c = n_chunks - 1 - i
        o_t = bos + c * BT + o_i
        m_t = o_t < eos
        b_kp, b_kn = _features(p_k, s_kt, o_t, m_t, wk + i_j * D * F, b_bk, F, D, FMAP, BD, BF, PREC, UPCAST)
        b_v = _load_rows(p_v, s_vt, o_t, m_t, DV, BV)
        # Through the state of the later chunks (before this chunk's queries join dS).
        b_dkp = _mm(b_v, tl.trans(b_dsp), v, False, PREC, UPCAST) + b_dzp[None, :]  # [BT, BV] @ [BV, BF]
        b_dkn = _mm(b_v, tl.trans(b_dsn), v, False, PREC, UPCAST) + b_dzn[None, :]
        b_dv = _mm(b_kp, b_dsp, v, False, PREC, UPCAST)  # [BT, BF] @ [BF, BV] -> [BT, BV]
        if FMAP:
            b_dv += _mm(b_kn, b_dsn, v, False, PREC, UPCAST)
        if CAUSAL:
            for g in range(G):
                i_h = i_j * G + g
                b_g, b_qp, b_qn, b_r, b_k = _query_side(q, wq, bq, go, rr, kk, i_b, i_h, hq, T, o_t, m_t,
                                                        s_qb, s_qh, s_qt, s_gb, s_gh, s_gt, D, F, DV, FMAP,
                                                        HAS_QB, BD, BF, BV, PREC, UPCAST)
                b_rg = b_r[:, None] * b_g
                b_mt = tl.where(m_st, _scores(b_kp, b_kn, b_qp, b_qn, v, FMAP, PREC, UPCAST), 0.0)  # [s, t]
                b_pt = _mm(b_v, tl.trans(b_g), v, True, PREC, UPCAST)  # [BT, BV] @ [BV, BT] -> [s, t]
                b_pt = tl.where(m_st, b_pt * b_r[None, :] + b_k[None, :], 0.0)
                b_dv += _mm(b_mt, b_rg, v, False, PREC, UPCAST)  # [BT, BT] @ [BT, BV] -> [BT, BV]
                b_dkp += _mm(b_pt, b_qp, v, False, PREC, UPCAST)  # [BT, BT] @ [BT, BF] -> [BT, BF]
                if FMAP:
                    b_dkn += _mm(b_pt, b_qn, v, False, PREC, UPCAST)
                b_dsp, b_dsn, b_dzp, b_dzn = _accumulate_ds(b_qp, b_qn, b_rg, b_k, b_dsp, b_dsn, b_dzp, b_dzn, v,
                                                            FMAP, PREC, UPCAST)
        _store_rows(p_dk, F, o_t, m_t, _features_backward(b_kp, b_kn, b_dkp, b_dkn, FMAP), F, BF)
        _store_rows(p_dv, DV, o_t, m_t, b_dv, DV, BV)
    _store_state(ds0 + o_state * DV, dz0 + o_state, o_v, b_dsp, b_dsn, b_dzp, b_dzn, True, DV, F, FMAP, BF)


@triton.jit
def _query_side(q, wq, bq, go, rr, kk, i_b, i_h, hq, T, o_t, m_t, s_qb, s_qh, s_qt, s_gb, s_gh, s_gt,
                D: tl.constexpr, F: tl.constexpr, DV: tl.constexpr, FMAP: tl.constexpr, HAS_QB: tl.constexpr,
                BD: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """What the key pass needs of query head i_h at tokens o_t: (G, Q_p, Q_n, r, k)."""
    p_q = q + i_b * s_qb + i_h.to(tl.int64) * s_qh
    b_bq = _bias(bq + i_h * F, F, HAS_QB, BF)
    b_qp, b_qn = _features(p_q, s_qt, o_t, m_t, wq + i_h * D * F, b_bq, F, D, FMAP, BD, BF,
                              PREC, UPCAST)
    b_g = _load_rows(go + i_b * s_gb + i_h.to(tl.int64) * s_gh, s_gt, o_t, m_t, DV, BV)
    o_row = (i_b * hq + i_h).to(tl.int64) * T + o_t
    b_r = tl.load(rr + o_row, mask=m_t, other=0)
    b_k = tl.load(kk + o_row, mask=m_t, other=0)
    return b_g, b_qp, b_qn, b_r, b_k


@triton.jit
def _accumulate_ds(b_qp, b_qn, b_rg, b_k, b_dsp, b_dsn, b_dzp, b_dzn, p_v, FMAP: tl.constexpr, PREC: tl.constexpr,
                   UPCAST: tl.constexpr):
    """dS += Q^T (r G), dz += sum_t k_t Q_t."""
    b_dsp += _mm(tl.trans(b_qp), b_rg, p_v, False, PREC, UPCAST)  # [BF, BT] @ [BT, BV] -> [BF, BV]
    b_dzp += tl.sum(b_k[:, None] * b_qp, axis=0)
    if FMAP:
        b_dsn += _mm(tl.trans(b_qn), b_rg, p_v, False, PREC, UPCAST)
        b_dzn += tl.sum(b_k[:, None] * b_qn, axis=0)
    return b_dsp, b_dsn, b_dzp, b_dzn


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _unit_last(t):
    """t with stride 1 in its last dim (the kernels index only the outer dims by stride); None stays None."""
    return t if t is None or t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _pad(n: int) -> int:
    return max(MIN_DOT, triton.next_power_of_2(n))


def _tiles(d: int, f: int, dv: int, target: Target, backward: bool = False) -> dict:
    """Chunk and tile sizes and launch options. Interpreter: the 16-token minimum chunk (cheap there,
    and the tests see many chunks), all of Dv in one tile. GPUs: 8 warps, no software pipelining
    (its prefetch buffers only added registers and shared memory); forward 32-token chunks and Dv
    tiles of 64; backward (more live tiles per chunk) 16-token chunks and Dv tiles of 32. Measured
    by bench/triton_aot.py at the bench shape (D 128, F 64, Dv 128, bf16; Triton 3.9): 64-token
    chunks, 4 warps or the backward at 32 tokens spilled more; see bench/results/triton_aot.md for
    what still spills."""
    if target.interpreted:
        return dict(BT=MIN_DOT, BD=_pad(d), BF=_pad(f), BV=_pad(dv), num_warps=4)
    if backward:
        return dict(BT=16, BD=_pad(d), BF=_pad(f), BV=min(_pad(dv), 32), num_warps=8, num_stages=1)
    return dict(BT=32, BD=_pad(d), BF=_pad(f), BV=min(_pad(dv), 64), num_warps=8, num_stages=1)


def _precision(dtype: torch.dtype, target: Target) -> dict:
    """fp32 inputs: full fp32 dots; 16-bit: TF32 for the fp32-operand products (states, r-scaled
    gradients). The interpreter has no bf16 dot (UPCAST)."""
    return dict(PREC="ieee" if dtype == torch.float32 else "tf32",
                UPCAST=target.interpreted and dtype == torch.bfloat16)


def _dense(t):
    """A state-like tensor (S, z, their gradients, alpha, beta) as the kernels index it: contiguous
    (autograd may hand over expanded gradients with zero strides); None stays None."""
    return None if t is None else t.contiguous()


def _common(q, k, v, cu_seqlens):
    """(q, k, v with unit last strides, N, cu or a dummy pointer, VARLEN)."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    n = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return q, k, v, n, (q if cu_seqlens is None else cu_seqlens), cu_seqlens is not None


def _feature_args(fmap, q):
    """(wq, wk, bq, bk, D, F, {HAS_QB, HAS_KB}) as the kernels index them: contiguous, a dummy
    pointer for an absent bias; without a feature map (fmap None) D = 1, F = the feature width."""
    if fmap is None:
        return q, q, q, q, 1, q.shape[3], dict(HAS_QB=False, HAS_KB=False)
    q_weight, k_weight, q_bias, k_bias = fmap
    wq, wk = q_weight.contiguous(), k_weight.contiguous()
    bq = wq if q_bias is None else q_bias.contiguous()
    bk = wk if k_bias is None else k_bias.contiguous()
    return wq, wk, bq, bk, q.shape[3], wq.shape[2], dict(HAS_QB=q_bias is not None, HAS_KB=k_bias is not None)


def _plan_forward(q, k, v, fmap, causal, eps, s0, z0, cu_seqlens, target):
    """Shared plan of linear_attention (fmap None) and hedgehog_attention (fmap = the weights and
    biases); returns the launches and (out, S, z)."""
    B, Hq, T, _ = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    q, k, v, N, cu, varlen = _common(q, k, v, cu_seqlens)
    s0, z0 = _dense(s0), _dense(z0)
    wq, wk, bq, bk, D, F, biases = _feature_args(fmap, q)
    fw = F if fmap is None else 2 * F
    tiles = _tiles(D, F, Dv, target)
    out = torch.empty((B, Hq, T, Dv), dtype=v.dtype, device=v.device)
    grid = (triton.cdiv(Dv, tiles["BV"]), Hq, N)
    common = dict(G=Hq // Hkv, D=D, F=F, DV=Dv, VARLEN=varlen, **biases, **tiles,
                  **_precision(q.dtype, target))
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3])
    s = torch.empty((N, Hkv, fw, Dv), dtype=torch.float32, device=q.device)
    z = torch.empty((N, Hkv, fw), dtype=torch.float32, device=q.device)
    return [Launch(_fwd_kernel, grid, (
        q, k, v, wq, wk, bq, bk, s if s0 is None else s0, z if z0 is None else z0, out, s, z, cu, T, float(eps),
        *strides,
    ), dict(common, FMAP=fmap is not None, CAUSAL=bool(causal), HAS_S0=s0 is not None, STORE_STATE=True))], (out, s, z)


def plan_linear_attention(q, k, v, causal, eps, initial_S, initial_z, cu_seqlens, *, target: Target):
    """The launch of `linear_attention` on `target` and its (out, S_T, z_T) (see kernels/_utils.py)."""
    return _plan_forward(q, k, v, None, causal, eps, initial_S, initial_z, cu_seqlens, target)


def plan_hedgehog_attention(q, k, v, q_weight, k_weight, q_bias, k_bias, causal, eps, initial_S, initial_z, window,
                            alpha, beta, scale, cu_seqlens, *, target: Target):
    """The launch of `hedgehog_attention` on `target` and its (out, S_T, z_T) (empty states with window > 0:
    kernels/hedgehog_hybrid.py)."""
    if window > 0:
        from pyfast.kernels import hedgehog_hybrid

        return hedgehog_hybrid.plan_forward(q, k, v, q_weight, k_weight, q_bias, k_bias, eps, window, alpha, beta,
                                            scale, cu_seqlens, target=target)
    return _plan_forward(q, k, v, (q_weight, k_weight, q_bias, k_bias), causal, eps, initial_S, initial_z, cu_seqlens,
                         target)


def linear_attention(q, k, v, causal, eps, initial_S, initial_z, cu_seqlens):
    """Linear attention of given features (the op's arguments, schema order; the op checked them):
    q [B, Hq, T, F'], k [B, Hkv, T, F'], v [B, Hkv, T, Dv] -> (out [B, Hq, T, Dv] in v's dtype,
    S_T [N, Hkv, F', Dv], z_T [N, Hkv, F'] float32).

    Example:
        >>> out, S, z = linear_attention(q, k, v, True, 1e-6, None, None, None)
    """
    return run_plan(plan_linear_attention, q.device, q, k, v, causal, eps, initial_S, initial_z, cu_seqlens)


def hedgehog_attention(q, k, v, q_weight, k_weight, q_bias, k_bias, causal, eps, initial_S, initial_z, window,
                       alpha, beta, scale, cu_seqlens):
    """Fused Hedgehog attention (the op's arguments, schema order): the feature maps of q
    [B, Hq, T, D] and k [B, Hkv, T, D] are computed per chunk in registers. Returns (out, S_T, z_T),
    the states [N, Hkv, 2F, Dv] / [N, Hkv, 2F] float32 (empty with window > 0).

    Example:
        >>> out, S, z = hedgehog_attention(q, k, v, qw, kw, None, None, True, 1e-6, None, None, 0, None, None,
        ...                                None, None)
    """
    return run_plan(plan_hedgehog_attention, q.device, q, k, v, q_weight, k_weight, q_bias, k_bias, causal, eps,
                    initial_S, initial_z, window, alpha, beta, scale, cu_seqlens)


def _plan_backward(grad_out, grad_S, grad_z, q, k, v, fmap, causal, eps, s0, z0, cu_seqlens, target):
    """Shared plan of both backward ops: the launches and (dq, dk, dv, dS0, dz0); with a feature map
    dq, dk are the fp32 pre-softmax gradients du_q, du_k [B, H, T, F] that `_feature_grads` turns
    into dq, dk and the weight and bias gradients."""
    B, Hq, T, _ = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    q, k, v, N, cu, varlen = _common(q, k, v, cu_seqlens)
    grad_out = _unit_last(grad_out)
    grad_S, grad_z, s0, z0 = _dense(grad_S), _dense(grad_z), _dense(s0), _dense(z0)
    wq, wk, bq, bk, D, F, biases = _feature_args(fmap, q)
    fw = F if fmap is None else 2 * F
    tiles = _tiles(D, F, Dv, target, backward=True)
    BT = tiles["BT"]
    n_slots = T // BT + N if varlen else N * triton.cdiv(T, BT)
    dev, f32 = q.device, torch.float32
    slots_s = torch.empty((n_slots, Hkv, fw, Dv), dtype=f32, device=dev)
    slots_z = torch.empty((n_slots, Hkv, fw), dtype=f32, device=dev)
    rr = torch.empty((B, Hq, T), dtype=f32, device=dev)
    kk = torch.empty((B, Hq, T), dtype=f32, device=dev)
    if fmap is None:
        dq = torch.empty_like(q, memory_format=torch.contiguous_format)
        dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    else:  # zeros: tokens outside every segment (cu_seqlens[-1] < T) add nothing to dW
        dq = torch.zeros((B, Hq, T, F), dtype=f32, device=dev)
        dk = torch.zeros((B, Hkv, T, F), dtype=f32, device=dev)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    ds0 = torch.empty((N, Hkv, fw, Dv), dtype=f32, device=dev)
    dz0 = torch.empty((N, Hkv, fw), dtype=f32, device=dev)
    dummy = slots_z
    common = dict(D=D, F=F, DV=Dv, FMAP=fmap is not None, CAUSAL=bool(causal), VARLEN=varlen, **biases,
                  **tiles, **_precision(q.dtype, target))
    kstr, vstr, qstr, gstr = k.stride()[:3], v.stride()[:3], q.stride()[:3], grad_out.stride()[:3]
    full_v = dict(common, BV=_pad(Dv))  # the key pass holds all of dS: one Dv tile
    launches = [
        Launch(_states_kernel, (triton.cdiv(Dv, tiles["BV"]), Hkv, N), (
            k, v, wk, bk, dummy if s0 is None else s0, dummy if z0 is None else z0, slots_s, slots_z, cu,
            T, *kstr, *vstr,
        ), dict(common, HAS_S0=s0 is not None)),
        Launch(_bwd_q_kernel, (Hq, N), (
            q, k, v, wq, wk, bq, bk, grad_out, slots_s, slots_z, rr, kk, dq, cu, T, float(eps),
            *qstr, *kstr, *vstr, *gstr,
        ), dict(common, G=Hq // Hkv)),
        Launch(_bwd_kv_kernel, (Hkv, N), (
            q, k, v, wq, wk, bq, bk, grad_out, rr, kk, dummy if grad_S is None else grad_S,
            dummy if grad_z is None else grad_z, dk, dv, ds0, dz0, cu, T, 0, *qstr, *kstr, *vstr, *gstr,
        ), dict(full_v, G=Hq // Hkv, HAS_GS=grad_S is not None)),
    ]
    return launches, (dq, dk, dv, ds0, dz0)


def plan_linear_attention_backward(grad_out, grad_S, grad_z, q, k, v, causal, eps, initial_S, initial_z, cu_seqlens,
                                   *, target: Target):
    """The launches of `linear_attention_backward` on `target` (see _plan_backward)."""
    return _plan_backward(grad_out, grad_S, grad_z, q, k, v, None, causal, eps, initial_S, initial_z, cu_seqlens,
                          target)


def plan_hedgehog_attention_backward(grad_out, grad_S, grad_z, q, k, v, q_weight, k_weight, q_bias, k_bias, causal,
                                     eps, initial_S, initial_z, window, alpha, beta, scale, cu_seqlens, *,
                                     target: Target):
    """The launches of `hedgehog_attention_backward` on `target` (see _plan_backward; window > 0:
    kernels/hedgehog_hybrid.py)."""
    if window > 0:
        from pyfast.kernels import hedgehog_hybrid

        return hedgehog_hybrid.plan_backward(grad_out, q, k, v, q_weight, k_weight, q_bias, k_bias, eps, window, alpha,
                                             beta, scale, cu_seqlens, target=target)
    return _plan_backward(grad_out, grad_S, grad_z, q, k, v, (q_weight, k_weight, q_bias, k_bias), causal, eps,
                          initial_S, initial_z, cu_seqlens, target)


def _empty(like):
    return like.new_empty((0,))


def _feature_grads(x, du, weight, bias, dx_more=None):
    """(dx, dW, db) of u = x W + b [B, H, T, F] from the kernels' fp32 du: dx = du W^T (+ dx_more, an
    fp32 gradient of x by another path), dW = sum over tokens of x^T du, db = sum du, as fp32 torch
    matmuls (no TF32: torch's default for fp32)."""
    dx = torch.einsum("bhtf,hdf->bhtd", du, weight.float())
    dx = (dx if dx_more is None else dx + dx_more).to(x.dtype)
    dw = torch.einsum("bhtd,bhtf->hdf", x.float(), du).to(weight.dtype)
    db = _empty(x) if bias is None else du.sum((0, 2)).to(bias.dtype)
    return dx, dw, db


def linear_attention_backward(grad_out, grad_S, grad_z, q, k, v, causal, eps, initial_S, initial_z, cu_seqlens):
    """Gradients (dq, dk, dv, dS0, dz0) of linear_attention (the backward op's arguments, schema
    order); dS0, dz0 empty without an initial state."""
    dq, dk, dv, ds0, dz0 = run_plan(
        plan_linear_attention_backward, q.device, grad_out, grad_S, grad_z, q, k, v, causal, eps, initial_S,
        initial_z, cu_seqlens)
    if initial_S is None:
        ds0, dz0 = _empty(q), _empty(q)
    return dq, dk, dv, ds0, dz0


def hedgehog_attention_backward(grad_out, grad_S, grad_z, q, k, v, q_weight, k_weight, q_bias, k_bias, causal, eps,
                                initial_S, initial_z, window, alpha, beta, scale, cu_seqlens):
    """Gradients (dq, dk, dv, dq_weight, dk_weight, dq_bias, dk_bias, dS0, dz0, dalpha, dbeta) of
    hedgehog_attention (the backward op's arguments, schema order); absent arguments get empty
    tensors, alpha and beta (unused without a window) zeros. Window > 0: kernels/hedgehog_hybrid.py."""
    if window > 0:
        from pyfast.kernels import hedgehog_hybrid

        return hedgehog_hybrid.attention_backward(grad_out, q, k, v, q_weight, k_weight, q_bias, k_bias, eps, window,
                                                  alpha, beta, scale, cu_seqlens)
    du_q, du_k, dv, ds0, dz0 = run_plan(
        plan_hedgehog_attention_backward, q.device, grad_out, grad_S, grad_z, q, k, v, q_weight, k_weight, q_bias,
        k_bias, causal, eps, initial_S, initial_z, window, alpha, beta, scale, cu_seqlens)
    dq, dwq, dbq = _feature_grads(q, du_q, q_weight, q_bias)
    dk, dwk, dbk = _feature_grads(k, du_k, k_weight, k_bias)
    if initial_S is None:
        ds0, dz0 = _empty(q), _empty(q)
    da = _empty(q) if alpha is None else torch.zeros_like(alpha)
    dbt = _empty(q) if beta is None else torch.zeros_like(beta)
    return dq, dk, dv, dwq, dwk, dbq, dbk, ds0, dz0, da, dbt


# ----------------------------------------------------------------------------------------------
# hedgehog_feature_map: the standalone feature map (the attention kernels compute it inline)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _feature_map_kernel(x, w, b, out, T, s_xb, s_xh, s_xt, s_ob, s_oh, s_ot, H, F: tl.constexpr,
                        D: tl.constexpr, HAS_BIAS: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                        BF: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """grid (T tiles, B * H): phi of BT rows of one (b, h), both halves, into out [.., 2F]."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T
    b_b = _bias(b + i_h * F, F, HAS_BIAS, BF)
    p_x = x + i_b.to(tl.int64) * s_xb + i_h.to(tl.int64) * s_xh
    b_p, b_n = _features(p_x, s_xt, o_t, m_t, w + i_h * D * F, b_b, F, D, True, BD, BF, PREC, UPCAST)
    p_o = out + i_b.to(tl.int64) * s_ob + i_h.to(tl.int64) * s_oh
    _store_rows(p_o, s_ot, o_t, m_t, b_p, F, BF)
    _store_rows(p_o + F, s_ot, o_t, m_t, b_n, F, BF)


def plan_hedgehog_feature_map(x, weight, bias, *, target: Target):
    """The launch of `hedgehog_feature_map` on `target` and its output: one program per (BT rows,
    b, h), x @ W in D slices as in the attention kernels; 32 rows on GPUs (16 in the interpreter)."""
    b, h, t, d = x.shape
    f = weight.shape[2]
    x = _unit_last(x)
    out = torch.empty((b, h, t, 2 * f), dtype=x.dtype, device=x.device)
    bt = MIN_DOT if target.interpreted else 32
    w = weight.contiguous()
    bias_arg = w if bias is None else bias.contiguous()
    return [Launch(_feature_map_kernel, (triton.cdiv(t, bt), b * h), (
        x, w, bias_arg, out, t, *x.stride()[:3], *out.stride()[:3], h,
    ), dict(F=f, D=d, HAS_BIAS=bias is not None, BT=bt, BD=_pad(d), BF=_pad(f), **_precision(x.dtype, target),
            num_warps=4))], out


def hedgehog_feature_map(x, weight, bias):
    """phi(x) (the op's arguments, schema order; the op checked them): x [B, H, T, D] ->
    [B, H, T, 2F] in x's dtype."""
    return run_plan(plan_hedgehog_feature_map, x.device, x, weight, bias)
