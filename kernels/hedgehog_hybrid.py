"""Triton kernels of the Hedgehog sliding-window hybrid (window > 0): forward and backward.

Math (pyfast/reference/hedgehog.py), per query t of head h, KV head j = h // G, a = alpha_h,
b = beta_h, W = window:
    band   t - W < s <= t:  e_ts = exp(sc_ts - m_t), sc = scale q_t . k_s, m_t = max over the band
    linear s <= t - W:      l_ts = phi_q(q_t) . phi_k(k_s)
    out_t = (b Ne_t + a Nl_t) / den_t,  den_t = b De_t + a Dl_t + eps
(Ne = sum e v, De = sum e, Nl = sum l v, Dl = sum l). Backward, with g' = gO / den and
d' = (gO . out) / den: de'_ts = g'_t . v_s - d'_t, and
    linear: dl_ts = a de'_ts: the window-0 backward with the mask shifted by W and its r, k scaled
            by a (r_t = a / den_t, k_t = -a d'_t);
    band:   dsc_ts = b e_ts de'_ts, minus b sum_s(e_ts de'_ts) / ties at the keys where sc_ts == m_t
            (torch.amax splits its gradient evenly over ties; a token repeated inside the window ties);
            dq += scale dsc k, dk += scale dsc^T q, dv += b e^T g';
    dalpha_h = sum_t (gNl (b De + eps) - b gNe Dl) / den^2, dbeta_h = sum_t (gNe (a Dl + eps) - a gNl De)
            / den^2 (gNe = gO . Ne, gNl = gO . Nl): d out / d alpha . gO without the cancellation of
            its two terms (equal up to eps without a linear part), and no division by a or b (either
            may be 0).

Kernels (layouts and helpers: kernels/hedgehog.py; chunks of BT tokens aligned to the sequence start):
    _hybrid_kernel        grid (Dv tiles, Hq, N). Query chunk c reads the running linear state of the
                          key chunks wholly older than its band, then walks the key chunks from there
                          to c once, adding both the masked linear part (s <= t - W) and an online
                          softmax over the band (exp2 with scale * log2(e) folded in; the linear part
                          is not rescaled, as the spec says: out depends on m_t). STATS (the backward's
                          pre-pass, all of Dv in one tile): instead of out, per row m_t (base 2),
                          1 / den, d', a / den and -a d' into `rows` [5, B, Hq, T], and the program's
                          sums of dalpha_t, dbeta_t into `part` [N, Hq, 2] (summed over N in torch).
    _hybrid_bwd_q_kernel  grid (Hq, N): per query chunk, the running state as in the forward, then the
                          same key walk: du_q [B, Hq, T, F] (linear part, through the feature map as in
                          kernels/hedgehog.py) and dq of the band [B, Hq, T, D] fp32 (with the argmax
                          term), and corr_t = b sum_s(e de') / ties per row for the key pass.
    _bwd_kv_kernel        (kernels/hedgehog.py) the linear part's du_k and dv, queries shifted by W.
    _hybrid_bwd_kv_kernel grid (Hkv, N): per key chunk, the query chunks whose band reaches it, for
                          each query head of the group: dk of the band [B, Hkv, T, D] fp32 and dv
                          (the linear part's dv added, written in v's dtype).
The argmax term needs sc_ts == m_t to hold exactly where the forward's max came from: the stats
pass, the q and the key pass compute sc by the same `_band_scores` (same tl.dot orientation, tiles,
chunking and launch options), so the comparison is exact. torch finishes dq = du_q W_q^T + dq_band,
dk likewise, dW, db (kernels/hedgehog.py `_feature_grads`) and sums the dalpha/dbeta partials.

Precision as in kernels/hedgehog.py: fp32 accumulation; input-dtype operands for products of inputs
(q k^T, gO v^T), fp32 (TF32 on GPUs for 16-bit inputs) for products with r-scaled or e-weighted terms.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from pyfast.kernels import hedgehog as kh
from pyfast.kernels._utils import Launch, Target, run_plan
from pyfast.kernels.hedgehog import (_absorb, _bias, _features, _features_backward, _inter, _load_rows, _mm, _scores,
                                     _sequence, _store_rows)

# exp(x) == exp2(x * LOG2E): the band's softmax runs in base 2 with scale * LOG2E folded.
LOG2E = 1.4426950408889634
# The planes of the stats pass's `rows` [5, B, Hq, T] (fp32): band max m_t (base 2), 1 / den_t,
# d'_t = (gO . out) / den_t, and the linear part's r_t = a / den_t, k_t = -a d'_t (read by _bwd_kv_kernel).
# (constexpr: the compiler reads globals only as constexpr; the interpreter does not check.)
ROW_M, ROW_RINV, ROW_DP, ROW_R, ROW_K = (tl.constexpr(i) for i in range(5))


@triton.jit
def _absorb_chunks(p_k, s_kt, p_v, s_vt, bos, eos, kc0, kc1, p_wk, b_bk, b_sp, b_sn, b_zp, b_zn, DVT, p_like,
                   F: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr,
                   BV: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """The state plus the key chunks [kc0, kc1) (DVT value columns from p_v; K^T V operands rounded to
    p_like's element type)."""
    o_i = tl.arange(0, BT)
    for kc in range(kc0, kc1):
        o_s = bos + kc * BT + o_i
        m_s = o_s < eos
        b_kp, b_kn = _features(p_k, s_kt, o_s, m_s, p_wk, b_bk, F, D, True, BD, BF, PREC, UPCAST)
        b_v = _load_rows(p_v, s_vt, o_s, m_s, DVT, BV)
        b_sp, b_sn, b_zp, b_zn = _absorb(b_kp, b_kn, b_v, b_sp, b_sn, b_zp, b_zn, p_like, True, PREC, UPCAST)
    return b_sp, b_sn, b_zp, b_zn


@triton.jit
def _first_band_chunk(c, WINDOW, BT: tl.constexpr):
    """The first key chunk some query of chunk c sees in its band (older chunks are linear for every row)."""
    return tl.maximum(c * BT - WINDOW + 1, 0) // BT


@triton.jit
def _band_scores(b_x, b_kx, o_t, o_s, m_s, WINDOW, scale_log2, p_like, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """scale * log2(e) * q_t . k_s of the query rows b_x [BT, BD] (tokens o_t) against the key rows
    b_kx (tokens o_s, valid m_s): [t, s], -inf off the band t - WINDOW < s <= t. Every hybrid kernel
    calls this on the same tiles, so the backward's sc == m_t tests are exact."""
    o_d = o_t[:, None] - o_s[None, :]
    m_band = (o_d >= 0) & (o_d < WINDOW) & m_s[None, :]
    b_sc = _mm(b_x, tl.trans(b_kx), p_like, True, PREC, UPCAST) * scale_log2  # [BT, BD] @ [BD, BT]
    return tl.where(m_band, b_sc, float("-inf"))


@triton.jit
def _hybrid_kernel(
    q, k, v, wq, wk, bq, bk, alpha, beta, o, rows, part, cu,
    T, eps, scale_log2, WINDOW, NROW,
    s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_ob, s_oh, s_ot,
    G: tl.constexpr, D: tl.constexpr, F: tl.constexpr, DV: tl.constexpr, VARLEN: tl.constexpr,
    HAS_QB: tl.constexpr, HAS_KB: tl.constexpr, STATS: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
    BF: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """Program (i_v, h, n): the hybrid of sequence n into o = out; with STATS, o = grad_out (read, one
    Dv tile) and the backward's per-row statistics into rows (NROW = B * Hq * T per plane), part."""
    i_v, i_h, i_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    hq = tl.num_programs(1)
    i_j = i_h // G
    i_b, bos, eos = _sequence(cu, i_n, T, VARLEN)
    o_i = tl.arange(0, BT)
    p_q = q + i_b * s_qb + i_h.to(tl.int64) * s_qh
    p_k = k + i_b * s_kb + i_j.to(tl.int64) * s_kh
    p_v = v + i_b * s_vb + i_j.to(tl.int64) * s_vh + i_v * BV
    p_o = o + i_b * s_ob + i_h.to(tl.int64) * s_oh + i_v * BV
    p_row = rows + (i_b * hq + i_h).to(tl.int64) * T
    b_bq, b_bk = _bias(bq + i_h * F, F, HAS_QB, BF), _bias(bk + i_j * F, F, HAS_KB, BF)
    b_al, b_be = tl.load(alpha + i_h), tl.load(beta + i_h)
    b_sp = tl.zeros([BF, BV], dtype=tl.float32)
    b_sn = tl.zeros([BF, BV], dtype=tl.float32)
    b_zp = tl.zeros([BF], dtype=tl.float32)
    b_zn = tl.zeros([BF], dtype=tl.float32)
    # The products of features and e with values take input-dtype operands (tensor cores), except in
    # the STATS pass: fp32 there (an fp32 pointer as the rounding type, and the launcher's
    # PREC="ieee", so not TF32 either, whose 10-bit mantissa is fp16's), as dalpha and dbeta sum
    # differences of nearly equal terms (bf16 operands moved them by up to 6e-2 at window 64).
    p_lp = v
    if STATS:
        p_lp = alpha
    b_da = tl.zeros([BT], dtype=tl.float32)  # STATS: dalpha, dbeta per row slot, summed at the end
    b_db = tl.zeros([BT], dtype=tl.float32)
    n_done = 0  # key chunks [0, n_done) are in the state
    for c in range(0, tl.cdiv(eos - bos, BT)):
        o_t = bos + c * BT + o_i
        m_t = o_t < eos
        lo = _first_band_chunk(c, WINDOW, BT)
        b_sp, b_sn, b_zp, b_zn = _absorb_chunks(p_k, s_kt, p_v, s_vt, bos, eos, n_done, lo, wk + i_j * D * F, b_bk,
                                                b_sp, b_sn, b_zp, b_zn, DV - i_v * BV, p_lp, F, D, BT, BD, BF, BV,
                                                PREC, UPCAST)
        n_done = tl.maximum(n_done, lo)
        b_qp, b_qn = _features(p_q, s_qt, o_t, m_t, wq + i_h * D * F, b_bq, F, D, True, BD, BF, PREC, UPCAST)
        b_x = _load_rows(p_q, s_qt, o_t, m_t, D, BD)  # raw rows for the band's softmax scores
        b_num_l, b_den_l = _inter(b_qp, b_qn, b_sp, b_sn, b_zp, b_zn, v, True, PREC, UPCAST)
        b_m = tl.full([BT], float("-inf"), dtype=tl.float32)  # running band max (base 2)
        b_num_e = tl.zeros([BT, BV], dtype=tl.float32)
        b_den_e = tl.zeros([BT], dtype=tl.float32)
        for kc in range(lo, c + 1):
            o_s = bos + kc * BT + o_i
            m_s = o_s < eos
            b_kp, b_kn = _features(p_k, s_kt, o_s, m_s, wk + i_j * D * F, b_bk, F, D, True, BD, BF, PREC, UPCAST)
            b_kx = _load_rows(p_k, s_kt, o_s, m_s, D, BD)
            b_v = _load_rows(p_v, s_vt, o_s, m_s, DV - i_v * BV, BV)
            m_lin = (o_t[:, None] - o_s[None, :]) >= WINDOW
            b_a = tl.where(m_lin, _scores(b_qp, b_qn, b_kp, b_kn, p_lp, True, PREC, UPCAST), 0.0)
            b_num_l += _mm(b_a, b_v, p_lp, True, PREC, UPCAST)  # [BT, BT] @ [BT, BV] -> [BT, BV]
            b_den_l += tl.sum(b_a, axis=1)
            b_sc = _band_scores(b_x, b_kx, o_t, o_s, m_s, WINDOW, scale_log2, v, PREC, UPCAST)
            b_m_new = tl.maximum(b_m, tl.max(b_sc, axis=1))
            b_ref = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)  # rows with no band key yet
            b_e = tl.exp2(b_sc - b_ref[:, None])
            b_r = tl.exp2(b_m - b_ref)
            b_num_e = b_num_e * b_r[:, None] + _mm(b_e, b_v, p_lp, True, PREC, UPCAST)
            b_den_e = b_den_e * b_r + tl.sum(b_e, axis=1)
            b_m = b_m_new
        if STATS:
            b_g = _load_rows(p_o, s_ot, o_t, m_t, DV, BV)
            b_ri = tl.where(m_t, 1.0 / (b_be * b_den_e + b_al * b_den_l + eps), 0.0)
            b_gne, b_gnl = tl.sum(b_g * b_num_e, axis=1), tl.sum(b_g * b_num_l, axis=1)
            b_dp = (b_be * b_gne + b_al * b_gnl) * b_ri * b_ri
            b_da += (b_gnl * (b_be * b_den_e + eps) - b_be * b_gne * b_den_l) * b_ri * b_ri
            b_db += (b_gne * (b_al * b_den_l + eps) - b_al * b_gnl * b_den_e) * b_ri * b_ri
            tl.store(p_row + ROW_M * NROW.to(tl.int64) + o_t, b_m, mask=m_t)
            tl.store(p_row + ROW_RINV * NROW.to(tl.int64) + o_t, b_ri, mask=m_t)
            tl.store(p_row + ROW_DP * NROW.to(tl.int64) + o_t, b_dp, mask=m_t)
            tl.store(p_row + ROW_R * NROW.to(tl.int64) + o_t, b_al * b_ri, mask=m_t)
            tl.store(p_row + ROW_K * NROW.to(tl.int64) + o_t, -b_al * b_dp, mask=m_t)
        else:
            b_out = (b_be * b_num_e + b_al * b_num_l) / (b_be * b_den_e + b_al * b_den_l + eps)[:, None]
            _store_rows(p_o, s_ot, o_t, m_t, b_out, DV - i_v * BV, BV)
    if STATS:
        tl.store(part + (i_n * hq + i_h) * 2, tl.sum(b_da))
        tl.store(part + (i_n * hq + i_h) * 2 + 1, tl.sum(b_db))


@triton.jit
def _load_row_stats(p_row, NROW, o_t, m_t):
    """(m, 1 / den, d', r, k) of the rows o_t (zeros past m_t)."""
    b_m = tl.load(p_row + ROW_M * NROW.to(tl.int64) + o_t, mask=m_t, other=0)
    b_ri = tl.load(p_row + ROW_RINV * NROW.to(tl.int64) + o_t, mask=m_t, other=0)
    b_dp = tl.load(p_row + ROW_DP * NROW.to(tl.int64) + o_t, mask=m_t, other=0)
    b_r = tl.load(p_row + ROW_R * NROW.to(tl.int64) + o_t, mask=m_t, other=0)
    b_k = tl.load(p_row + ROW_K * NROW.to(tl.int64) + o_t, mask=m_t, other=0)
    return b_m, b_ri, b_dp, b_r, b_k


@triton.jit
def _hybrid_bwd_q_kernel(
    q, k, v, wq, wk, bq, bk, beta, go, rows, corr, duq, dqx, cu,
    T, scale, scale_log2, WINDOW, NROW,
    s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_gb, s_gh, s_gt,
    G: tl.constexpr, D: tl.constexpr, F: tl.constexpr, DV: tl.constexpr, VARLEN: tl.constexpr,
    HAS_QB: tl.constexpr, HAS_KB: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr,
    BV: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """Program (h, n): du_q [B, Hq, T, F] and the band's dq [B, Hq, T, D] (fp32) of query head h over
    sequence n, and corr [B, Hq, T] (module docstring). All of Dv in one tile."""
    i_h, i_n = tl.program_id(0), tl.program_id(1)
    hq = tl.num_programs(0)
    i_j = i_h // G
    i_b, bos, eos = _sequence(cu, i_n, T, VARLEN)
    o_i = tl.arange(0, BT)
    p_q = q + i_b * s_qb + i_h.to(tl.int64) * s_qh
    p_k = k + i_b * s_kb + i_j.to(tl.int64) * s_kh
    p_v = v + i_b * s_vb + i_j.to(tl.int64) * s_vh
    p_g = go + i_b * s_gb + i_h.to(tl.int64) * s_gh
    o_bh = (i_b * hq + i_h).to(tl.int64) * T
    b_bq, b_bk = _bias(bq + i_h * F, F, HAS_QB, BF), _bias(bk + i_j * F, F, HAS_KB, BF)
    b_be = tl.load(beta + i_h)
    b_sp = tl.zeros([BF, BV], dtype=tl.float32)
    b_sn = tl.zeros([BF, BV], dtype=tl.float32)
    b_zp = tl.zeros([BF], dtype=tl.float32)
    b_zn = tl.zeros([BF], dtype=tl.float32)
    n_done = 0
    for c in range(0, tl.cdiv(eos - bos, BT)):
        o_t = bos + c * BT + o_i
        m_t = o_t < eos
        lo = _first_band_chunk(c, WINDOW, BT)
        b_sp, b_sn, b_zp, b_zn = _absorb_chunks(p_k, s_kt, p_v, s_vt, bos, eos, n_done, lo, wk + i_j * D * F, b_bk,
                                                b_sp, b_sn, b_zp, b_zn, DV, v, F, D, BT, BD, BF, BV, PREC, UPCAST)
        n_done = tl.maximum(n_done, lo)
        b_qp, b_qn = _features(p_q, s_qt, o_t, m_t, wq + i_h * D * F, b_bq, F, D, True, BD, BF, PREC, UPCAST)
        b_x = _load_rows(p_q, s_qt, o_t, m_t, D, BD)
        b_g = _load_rows(p_g, s_gt, o_t, m_t, DV, BV)
        b_m, b_ri, b_dp, b_r, b_k = _load_row_stats(rows + o_bh, NROW, o_t, m_t)
        # Linear part through the state: dphi_q = r (G S^T) + k z^T
        b_dqp = b_r[:, None] * _mm(b_g, tl.trans(b_sp), v, False, PREC, UPCAST) + b_k[:, None] * b_zp[None, :]
        b_dqn = b_r[:, None] * _mm(b_g, tl.trans(b_sn), v, False, PREC, UPCAST) + b_k[:, None] * b_zn[None, :]
        b_dx = tl.zeros([BT, BD], dtype=tl.float32)  # sum_s b e de' k_s
        b_kt = tl.zeros([BT, BD], dtype=tl.float32)  # sum of the keys at the band max (ties)
        b_sig = tl.zeros([BT], dtype=tl.float32)  # sum_s b e de'
        b_nt = tl.zeros([BT], dtype=tl.float32)  # ties
        for kc in range(lo, c + 1):
            o_s = bos + kc * BT + o_i
            m_s = o_s < eos
            b_kp, b_kn = _features(p_k, s_kt, o_s, m_s, wk + i_j * D * F, b_bk, F, D, True, BD, BF, PREC, UPCAST)
            b_kx = _load_rows(p_k, s_kt, o_s, m_s, D, BD)
            b_v = _load_rows(p_v, s_vt, o_s, m_s, DV, BV)
            b_p0 = _mm(b_g, tl.trans(b_v), v, True, PREC, UPCAST)  # gO_t . v_s  [BT, BV] @ [BV, BT]
            m_lin = (o_t[:, None] - o_s[None, :]) >= WINDOW
            b_pl = tl.where(m_lin, b_r[:, None] * b_p0 + b_k[:, None], 0.0)  # dl = a de' on the linear keys
            b_dqp += _mm(b_pl, b_kp, v, False, PREC, UPCAST)  # [BT, BT] @ [BT, BF]
            b_dqn += _mm(b_pl, b_kn, v, False, PREC, UPCAST)
            b_sc = _band_scores(b_x, b_kx, o_t, o_s, m_s, WINDOW, scale_log2, v, PREC, UPCAST)
            # b e de' (0 off the band), rounded as the key pass rounds it: one band key gives dq = 0 exactly
            # with ieee products (TF32 rounds b_ew in the product below but not in b_cr * b_kt: ~2^-11 ew k)
            b_ew = (b_be * tl.exp2(b_sc - b_m[:, None])) * (b_ri[:, None] * b_p0 - b_dp[:, None])
            b_sig += tl.sum(b_ew, axis=1)
            b_dx += _mm(b_ew, b_kx, v, False, PREC, UPCAST)  # [BT, BT] @ [BT, BD]
            b_tie = tl.where((b_sc == b_m[:, None]) & m_t[:, None], 1.0, 0.0)
            b_nt += tl.sum(b_tie, axis=1)
            b_kt += _mm(b_tie, b_kx, v, False, PREC, UPCAST)
        b_cr = b_sig / tl.maximum(b_nt, 1.0)
        tl.store(corr + o_bh + o_t, b_cr, mask=m_t)
        _store_rows(dqx + o_bh * D, D, o_t, m_t, scale * (b_dx - b_cr[:, None] * b_kt), D, BD)
        _store_rows(duq + o_bh * F, F, o_t, m_t, _features_backward(b_qp, b_qn, b_dqp, b_dqn, True), F, BF)


@triton.jit
def _hybrid_bwd_kv_kernel(
    q, k, v, beta, go, rows, corr, dv_lin, dkx, dv, cu,
    T, scale, scale_log2, WINDOW, NROW,
    s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_gb, s_gh, s_gt,
    G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, VARLEN: tl.constexpr, HAS_LIN: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """Program (j, n): the band's dk [B, Hkv, T, D] (fp32) and dv = the linear part's dv_lin (fp32,
    read when HAS_LIN) + b e^T g' [B, Hkv, T, Dv] (v's dtype) of KV head j over sequence n."""
    i_j, i_n = tl.program_id(0), tl.program_id(1)
    hkv = tl.num_programs(0)
    hq = hkv * G
    i_b, bos, eos = _sequence(cu, i_n, T, VARLEN)
    o_i = tl.arange(0, BT)
    p_k = k + i_b * s_kb + i_j.to(tl.int64) * s_kh
    p_v = v + i_b * s_vb + i_j.to(tl.int64) * s_vh
    o_bj = (i_b * hkv + i_j).to(tl.int64) * T
    n_chunks = tl.cdiv(eos - bos, BT)
    n_up = (WINDOW + BT - 2) // BT  # query chunks after kc whose band reaches back into kc (WINDOW >= 1)
    for kc in range(0, n_chunks):
        o_s = bos + kc * BT + o_i
        m_s = o_s < eos
        b_kx = _load_rows(p_k, s_kt, o_s, m_s, D, BD)
        b_v = _load_rows(p_v, s_vt, o_s, m_s, DV, BV)
        b_dk = tl.zeros([BT, BD], dtype=tl.float32)
        if HAS_LIN:
            b_dv = _load_rows(dv_lin + o_bj * DV, DV, o_s, m_s, DV, BV)
        else:
            b_dv = tl.zeros([BT, BV], dtype=tl.float32)
        for g in range(G):
            i_h = i_j * G + g
            b_be = tl.load(beta + i_h)
            p_q = q + i_b * s_qb + i_h.to(tl.int64) * s_qh
            p_g = go + i_b * s_gb + i_h.to(tl.int64) * s_gh
            o_bh = (i_b * hq + i_h).to(tl.int64) * T
            for c in range(kc, tl.minimum(n_chunks, kc + 1 + n_up)):
                o_t = bos + c * BT + o_i
                m_t = o_t < eos
                b_x = _load_rows(p_q, s_qt, o_t, m_t, D, BD)
                b_g = _load_rows(p_g, s_gt, o_t, m_t, DV, BV)
                b_m, b_ri, b_dp, b_r, b_k = _load_row_stats(rows + o_bh, NROW, o_t, m_t)
                b_cr = tl.load(corr + o_bh + o_t, mask=m_t, other=0)
                b_sc = _band_scores(b_x, b_kx, o_t, o_s, m_s, WINDOW, scale_log2, v, PREC, UPCAST)  # [t, s]
                b_e = b_be * tl.exp2(b_sc - b_m[:, None])
                b_p0 = _mm(b_g, tl.trans(b_v), v, True, PREC, UPCAST)  # [t, s]
                b_ds = b_e * (b_ri[:, None] * b_p0 - b_dp[:, None])
                b_ds -= tl.where((b_sc == b_m[:, None]) & m_t[:, None], b_cr[:, None], 0.0)
                b_dk += _mm(tl.trans(b_ds), b_x, v, False, PREC, UPCAST)  # [s, t] @ [t, BD]
                b_dv += _mm(tl.trans(b_e * b_ri[:, None]), b_g, v, False, PREC, UPCAST)  # [s, t] @ [t, BV]
        _store_rows(dkx + o_bj * D, D, o_s, m_s, scale * b_dk, D, BD)
        _store_rows(dv + o_bj * DV, DV, o_s, m_s, b_dv, DV, BV)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _mixing(alpha, beta, hq: int, device):
    """alpha, beta as the kernels read them: contiguous float32 [Hq], ones where absent."""
    ones = torch.ones(hq, dtype=torch.float32, device=device) if alpha is None or beta is None else None
    return (ones if alpha is None else alpha.contiguous()), (ones if beta is None else beta.contiguous())


def _setup(q, k, v, q_weight, k_weight, q_bias, k_bias, window, alpha, beta, scale, cu_seqlens):
    """What both plans share: (q, k, v, N, cu, weights and biases, D, F, their flags, alpha, beta,
    the window clipped to T (a wider one sees the same keys; keeps int32 index math from
    overflowing), scale, and scale * log2(e))."""
    q, k, v, N, cu, varlen = kh._common(q, k, v, cu_seqlens)
    wq, wk, bq, bk, D, F, biases = kh._feature_args((q_weight, k_weight, q_bias, k_bias), q)
    alpha, beta = _mixing(alpha, beta, q.shape[1], q.device)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    window = min(int(window), max(q.shape[2], 1))
    return (q, k, v, N, cu, (wq, wk, bq, bk), dict(D=D, F=F, VARLEN=varlen, **biases), alpha, beta, window, scale,
            scale * LOG2E)


def plan_forward(q, k, v, q_weight, k_weight, q_bias, k_bias, eps, window, alpha, beta, scale, cu_seqlens, *,
                 target: Target):
    """The launch of hedgehog_attention with window > 0 and its (out, S, z) (S, z empty)."""
    B, Hq, T, _ = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    q, k, v, N, cu, weights, shape, alpha, beta, window, _, scale_log2 = _setup(
        q, k, v, q_weight, k_weight, q_bias, k_bias, window, alpha, beta, scale, cu_seqlens)
    tiles = kh._tiles(shape["D"], shape["F"], Dv, target)
    out = torch.empty((B, Hq, T, Dv), dtype=v.dtype, device=v.device)
    s, z = (torch.empty((0,), dtype=torch.float32, device=q.device) for _ in range(2))  # two: outputs never alias
    return [Launch(_hybrid_kernel, (triton.cdiv(Dv, tiles["BV"]), Hq, N), (
        q, k, v, *weights, alpha, beta, out, alpha, alpha, cu, T, float(eps), scale_log2, window, 0,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
    ), dict(G=Hq // Hkv, DV=Dv, STATS=False, **shape, **tiles, **kh._precision(q.dtype, target)))], (out, s, z)


def plan_backward(grad_out, q, k, v, q_weight, k_weight, q_bias, k_bias, eps, window, alpha, beta, scale, cu_seqlens,
                  *, target: Target):
    """The launches of hedgehog_attention_backward with window > 0 and (du_q, dq_band, du_k, dk_band,
    dv, part): the stats pass, the query pass, the linear part's key pass (kernels/hedgehog.py, when
    some query has a linear part) and the band's key pass (module docstring)."""
    B, Hq, T, _ = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    q, k, v, N, cu, weights, shape, alpha, beta, window, scale, scale_log2 = _setup(
        q, k, v, q_weight, k_weight, q_bias, k_bias, window, alpha, beta, scale, cu_seqlens)
    D, F = shape["D"], shape["F"]
    grad_out = kh._unit_last(grad_out)
    # One tiling for every launch (the sc == m_t tests need the forward's chunks), all of Dv in one tile.
    tiles = dict(kh._tiles(D, F, Dv, target, backward=True), BV=kh._pad(Dv))
    common = dict(G=Hq // Hkv, DV=Dv, **tiles, **kh._precision(q.dtype, target))
    dev, f32 = q.device, torch.float32
    rows = torch.empty((5, B, Hq, T), dtype=f32, device=dev)
    part = torch.empty((N, Hq, 2), dtype=f32, device=dev)
    corr = torch.empty((B, Hq, T), dtype=f32, device=dev)
    du_q = torch.empty((B, Hq, T, F), dtype=f32, device=dev)
    dq_band = torch.empty((B, Hq, T, D), dtype=f32, device=dev)
    du_k = torch.zeros((B, Hkv, T, F), dtype=f32, device=dev)  # keys past eos - window: no linear part
    dk_band = torch.empty((B, Hkv, T, D), dtype=f32, device=dev)
    dv_lin = torch.zeros((B, Hkv, T, Dv), dtype=f32, device=dev)
    dv = torch.empty((B, Hkv, T, Dv), dtype=v.dtype, device=dev)
    qstr, kstr, vstr, gstr = q.stride()[:3], k.stride()[:3], v.stride()[:3], grad_out.stride()[:3]
    nrow = B * Hq * T
    launches = [
        Launch(_hybrid_kernel, (1, Hq, N), (
            q, k, v, *weights, alpha, beta, grad_out, rows, part, cu, T, float(eps), scale_log2, window, nrow,
            *qstr, *kstr, *vstr, *gstr,
        ), dict(common, STATS=True, **shape, PREC="ieee")),  # fp32 operands must stay fp32, not TF32 (above)
        Launch(_hybrid_bwd_q_kernel, (Hq, N), (
            q, k, v, *weights, beta, grad_out, rows, corr, du_q, dq_band, cu, T, scale, scale_log2, window, nrow,
            *qstr, *kstr, *vstr, *gstr,
        ), dict(common, **shape)),
    ]
    has_lin = T > window  # else no sequence has a key older than some query's band
    if has_lin:  # query t + window of q, grad_out and the r, k rows plays query t of the window-0 key pass
        ds, dz = torch.empty((N, Hkv, 2 * F, Dv), dtype=f32, device=dev), torch.empty((N, Hkv, 2 * F), dtype=f32,
                                                                                       device=dev)
        launches.append(Launch(kh._bwd_kv_kernel, (Hkv, N), (
            q[:, :, window:], k, v, *weights, grad_out[:, :, window:], rows[ROW_R.value, :, :, window:],
            rows[ROW_K.value, :, :, window:], ds, dz, du_k, dv_lin, ds, dz, cu, T, window, *qstr, *kstr, *vstr, *gstr,
        ), dict(common, FMAP=True, CAUSAL=True, HAS_GS=False, **shape)))
    launches.append(Launch(_hybrid_bwd_kv_kernel, (Hkv, N), (
        q, k, v, beta, grad_out, rows, corr, dv_lin, dk_band, dv, cu, T, scale, scale_log2, window, nrow,
        *qstr, *kstr, *vstr, *gstr,
    ), dict({n: x for n, x in common.items() if n != "BF"}, D=D, VARLEN=shape["VARLEN"], HAS_LIN=has_lin)))
    return launches, (du_q, dq_band, du_k, dk_band, dv, part)


def attention_backward(grad_out, q, k, v, q_weight, k_weight, q_bias, k_bias, eps, window, alpha, beta, scale,
                       cu_seqlens):
    """hedgehog_attention_backward's 11 gradients for window > 0 (no state: dS0, dz0 empty; dalpha,
    dbeta empty where absent)."""
    du_q, dq_band, du_k, dk_band, dv, part = run_plan(
        plan_backward, q.device, grad_out, q, k, v, q_weight, k_weight, q_bias, k_bias, eps, window, alpha, beta,
        scale, cu_seqlens)
    dq, dwq, dbq = kh._feature_grads(q, du_q, q_weight, q_bias, dq_band)
    dk, dwk, dbk = kh._feature_grads(k, du_k, k_weight, k_bias, dk_band)
    # the per-sequence partials, summed one output at a time (two views of one sum would alias)
    da = kh._empty(q) if alpha is None else part[:, :, 0].sum(0).to(alpha.dtype)
    db = kh._empty(q) if beta is None else part[:, :, 1].sum(0).to(beta.dtype)
    return dq, dk, dv, dwq, dwk, dbq, dbk, kh._empty(q), kh._empty(q), da, db

