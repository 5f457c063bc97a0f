"""Triton kernels for Kinetics block top-k sparse decoding (and the dense decode baseline).

Layouts (the spec is pyfast/reference/sparse.py):
    k_cache, v_cache  [B, Hkv, Tmax, D]        any strides (a last-dim stride != 1 is copied)
    cache_seqlens     int32 [B]                L_b, clamped to [0, Tmax] by every kernel
    block_keys        [B, Hkv, NB, D]          NB = Tmax // block_size, mean key of each full block
    q, out            [B, Hq, D]               Hq = G * Hkv, query head h*G + g reads KV head h

Kernels:
    _append_kv_kernel       grid (n_copy + n_mean, Hkv, B). The first n_copy programs copy tiles of
                            k_new/v_new to [L_b, L_b + Tn); the others each write the fp32 mean
                            key of one block that becomes full, reading the block's old tokens
                            from the cache and its new ones from k_new (so they never wait for
                            the copy programs of the same launch).
    _advance_seqlens_kernel cache_seqlens += Tn, a second launch so that no program of the first
                            one can see an advanced length. A sequence that would pass Tmax
                            (possible only during CUDA-graph capture, when the host check cannot
                            read lengths) is left untouched by both.
    _select_blocks_kernel   grid (B*Hkv): the kept-block list of one (b, KV head). Scores the
                            candidate blocks with qbar = mean of the group's queries (= the mean of
                            the G dot products) in fp32, stores their order-preserving int32 image
                            in a scratch row, finds the topk-th largest by bisection over the
                            int32 range (32 passes that only read the row) and writes the kept
                            block ids in ascending order: sinks, chosen candidates, local blocks,
                            then the partial tail block, plus their count.
    _attention_kernel       grid (B*Hkv, S): split-K flash decoding. Program (bh, s) owns a
                            contiguous range of "virtual" tokens: dense = the tokens themselves,
                            sparse = block e of the kept list expanded to its block_size tokens.
                            All G query heads of the KV head share each K/V tile (two tl.dot with
                            the heads padded to 16 rows); online softmax in fp32 (exp2). With
                            S == 1 it writes the output, else fp32 partials (max, sum, acc).
    _merge_kernel           grid (B*Hq): log-sum-exp merge of the S partials.

Every size that decides an allocation or a grid (S, the kept-list length NSEL = min(sink + topk +
local, NB) + 1, the scratch rows) depends on shapes and options only, never on lengths or scores,
and no launcher reads device data: the ops are CUDA-graph safe.

D (head dim), G, block_size and the tile sizes are compile-time constants: one compiled variant
per model shape. D is padded to a power of two (>= 16) with masks. Each launcher runs its plan
(plan_append_kv, ...: the launches as a pure function of metadata and the Target, see
kernels/_utils.py), which bench/triton_aot.py also compiles for sm_80 and sm_90; the tile sizes
(`_tile_t`, `_copy_tile_t`, `_attention_warps`) are chosen spill-free from its report.

Under TRITON_INTERPRET=1 (CPU tensors) bf16 tl.dot is not supported, so bf16 operands are upcast
to fp32 there (UPCAST_DOT); fp32 dots use input_precision="ieee" everywhere.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from pyfast.kernels._utils import Launch, Target, run_plan

# exp(x) == exp2(x * LOG2E): the softmax runs in base 2 with the scale folded into LOG2E.
LOG2E = 1.4426950408889634
# tl.dot needs every dimension >= 16: the G query heads of a group are padded to this many rows.
MIN_DOT = 16
# Largest number of split-K programs per (b, KV head) and the fewest tiles one split should own.
MAX_SPLITS = 64
MIN_TILES_PER_SPLIT = 2
# Sequences per program of the seqlens update.
ADVANCE_BLOCK = 128


# ----------------------------------------------------------------------------------------------
# append_kv
# ----------------------------------------------------------------------------------------------


@triton.jit
def _append_kv_kernel(
    k_cache, v_cache, block_keys, cache_seqlens, k_new, v_new,
    Hkv, Tmax, Tn, N_COPY,
    s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_jb, s_jh, s_jj,
    s_knb, s_knh, s_knt, s_vnb, s_vnh, s_vnt, s_len,
    D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BT: tl.constexpr, BTM: tl.constexpr, BD: tl.constexpr,
):
    """Program (p, h, b): p < N_COPY copies new tokens [p*BT, (p+1)*BT) of k_new/v_new to the cache;
    p >= N_COPY writes block key j = L // BLOCK_SIZE + (p - N_COPY) if that block becomes full,
    summing its keys BTM tokens at a time."""
    i_p, i_h, i_b = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    n_old = tl.load(cache_seqlens + i_b * s_len)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    p_kc = k_cache + i_b * s_kb + i_h * s_kh
    p_kn = k_new + i_b * s_knb + i_h * s_knh
    # A sequence that would overflow (only possible during graph capture) is left untouched.
    if (n_old >= 0) & (n_old <= Tmax - Tn):
        if i_p < N_COPY:
            o_n = i_p * BT + tl.arange(0, BT)
            m_nd = (o_n < Tn)[:, None] & m_d[None, :]
            o_src = o_n.to(tl.int64)[:, None]
            o_dst = (n_old + o_n).to(tl.int64)[:, None]
            b_k = tl.load(p_kn + o_src * s_knt + o_d[None, :], mask=m_nd)
            tl.store(p_kc + o_dst * s_kt + o_d[None, :], b_k, mask=m_nd)
            p_vc = v_cache + i_b * s_vb + i_h * s_vh
            p_vn = v_new + i_b * s_vnb + i_h * s_vnh
            b_v = tl.load(p_vn + o_src * s_vnt + o_d[None, :], mask=m_nd)
            tl.store(p_vc + o_dst * s_vt + o_d[None, :], b_v, mask=m_nd)
        else:
            i_j = n_old // BLOCK_SIZE + (i_p - N_COPY)
            if i_j < (n_old + Tn) // BLOCK_SIZE:
                b_sum = tl.zeros([BD], dtype=tl.float32)
                for t0 in range(0, BLOCK_SIZE, BTM):
                    o_i = t0 + tl.arange(0, BTM)
                    o_t = i_j * BLOCK_SIZE + o_i
                    m_t = o_i < BLOCK_SIZE
                    m_new = o_t >= n_old  # token arrives in this append: read it from k_new
                    m_old = (m_t & ~m_new)[:, None] & m_d[None, :]
                    m_new = (m_t & m_new)[:, None] & m_d[None, :]
                    b_old = tl.load(p_kc + o_t.to(tl.int64)[:, None] * s_kt + o_d[None, :], mask=m_old, other=0)
                    b_new = tl.load(p_kn + (o_t - n_old).to(tl.int64)[:, None] * s_knt + o_d[None, :],
                                    mask=m_new, other=0)
                    b_sum += tl.sum(b_old.to(tl.float32) + b_new.to(tl.float32), axis=0)
                p_j = block_keys + i_b * s_jb + i_h * s_jh + i_j.to(tl.int64) * s_jj
                tl.store(p_j + o_d, (b_sum / BLOCK_SIZE).to(block_keys.dtype.element_ty), mask=m_d)


@triton.jit
def _advance_seqlens_kernel(cache_seqlens, B, Tmax, Tn, s_len, BB: tl.constexpr):
    """cache_seqlens[b] += Tn for every sequence _append_kv_kernel wrote."""
    o_b = tl.program_id(0) * BB + tl.arange(0, BB)
    m_b = o_b < B
    p_len = cache_seqlens + o_b.to(tl.int64) * s_len
    b_n = tl.load(p_len, mask=m_b, other=0)
    m_ok = (b_n >= 0) & (b_n <= Tmax - Tn)
    tl.store(p_len, tl.where(m_ok, b_n + Tn, b_n), mask=m_b)


# ----------------------------------------------------------------------------------------------
# Block selection
# ----------------------------------------------------------------------------------------------


@triton.jit
def _store_range(p_ids, pos, j_lo, j_hi, BN: tl.constexpr):
    """p_ids[pos + i] = j_lo + i for j_lo + i < j_hi (a run of consecutive block ids)."""
    for j0 in range(j_lo, j_hi, BN):
        o_j = j0 + tl.arange(0, BN)
        tl.store(p_ids + pos + (o_j - j_lo), o_j, mask=o_j < j_hi)


@triton.jit
def _select_blocks_kernel(
    q, block_keys, cache_seqlens, scores, block_ids, block_counts,
    Hkv, Tmax, NB, NSEL, topk, sink, local,
    s_qb, s_qh, s_jb, s_jh, s_jj, s_len,
    D: tl.constexpr, G: tl.constexpr, BLOCK_SIZE: tl.constexpr, BG: tl.constexpr, BD: tl.constexpr,
    BJ: tl.constexpr, BN: tl.constexpr,
):
    """Program bh: block_ids[bh, :count] = the kept blocks of (b, KV head h) in ascending order
    (the last one may be the partial tail block nfull), block_counts[bh] = count.

    Candidates are the full blocks [sink, nfull - local); when topk < their number, each gets
    key = order-preserving int32 image of its fp32 score (-0.0 and +0.0 -> 0, every NaN ->
    INT32_MAX, so NaN ranks highest and equal scores have equal keys), and the kept ones are those with
    key > T plus the lowest-index ones with key == T, T being the topk-th largest key.
    """
    i_bh = tl.program_id(0)
    i_b, i_h = (i_bh // Hkv).to(tl.int64), (i_bh % Hkv).to(tl.int64)
    n_len = tl.minimum(tl.maximum(tl.load(cache_seqlens + i_b * s_len), 0), Tmax)
    nfull = n_len // BLOCK_SIZE
    n_sink = tl.minimum(sink, nfull)
    c_lo, c_hi = sink, nfull - local  # candidate range
    n_cand = tl.maximum(c_hi - c_lo, 0)
    n_sel = tl.minimum(topk, n_cand)
    p_ids = block_ids + i_bh.to(tl.int64) * NSEL

    _store_range(p_ids, 0, 0, n_sink, BN)
    if n_sel == n_cand:  # every candidate is kept (also when there is none)
        _store_range(p_ids, n_sink, c_lo, c_hi, BN)
    else:
        p_key = scores + i_bh.to(tl.int64) * NB
        # qbar [BD] = mean of the G query rows of the group, fp32.
        o_g = tl.arange(0, BG)
        o_d = tl.arange(0, BD)
        m_d = o_d < D
        p_q = q + i_b * s_qb + (i_h * G + o_g).to(tl.int64)[:, None] * s_qh + o_d[None, :]
        b_q = tl.load(p_q, mask=(o_g < G)[:, None] & m_d[None, :], other=0).to(tl.float32)
        b_qbar = tl.sum(b_q, axis=0) / G
        p_j = block_keys + i_b * s_jb + i_h * s_jh
        for j0 in range(c_lo, c_hi, BJ):
            o_j = j0 + tl.arange(0, BJ)
            m_j = o_j < c_hi
            b_k = tl.load(p_j + o_j.to(tl.int64)[:, None] * s_jj + o_d[None, :],
                          mask=m_j[:, None] & m_d[None, :], other=0).to(tl.float32)
            b_s = tl.sum(b_k * b_qbar[None, :], axis=1)  # [BJ] scores
            # sign-magnitude -> two's complement: -|s| for negative floats, so -0.0 == +0.0
            b_bits = b_s.to(tl.int32, bitcast=True)
            b_key = tl.where(b_bits < 0, -(b_bits & 0x7FFFFFFF), b_bits)
            b_key = tl.where(b_s != b_s, 0x7FFFFFFF, b_key)  # any NaN above +inf
            tl.store(p_key + o_j, b_key, mask=m_j)
        tl.debug_barrier()  # the passes below read keys other threads stored

        # Bisection for T = max{t : #{key >= t} >= n_sel}; invariant #{key >= t_lo} >= n_sel.
        t_lo = tl.full([], -2147483648, tl.int64)
        t_hi = tl.full([], 2147483647, tl.int64)
        for _ in range(32):
            t_mid = t_lo + (t_hi - t_lo + 1) // 2
            n_ge = tl.zeros([], dtype=tl.int32)
            for j0 in range(c_lo, c_hi, BN):
                o_j = j0 + tl.arange(0, BN)
                b_key = tl.load(p_key + o_j, mask=o_j < c_hi, other=-2147483648)
                n_ge += tl.sum(((b_key >= t_mid) & (o_j < c_hi)).to(tl.int32), axis=0)
            m_ok = n_ge >= n_sel
            t_lo = tl.where(m_ok, t_mid, t_lo)
            t_hi = tl.where(m_ok, t_hi, t_mid - 1)

        n_gt = tl.zeros([], dtype=tl.int32)
        for j0 in range(c_lo, c_hi, BN):
            o_j = j0 + tl.arange(0, BN)
            b_key = tl.load(p_key + o_j, mask=o_j < c_hi, other=-2147483648)
            n_gt += tl.sum(((b_key > t_lo) & (o_j < c_hi)).to(tl.int32), axis=0)
        n_tie = n_sel - n_gt  # keys equal to T to keep, lowest index first
        n_kept = tl.zeros([], dtype=tl.int32)
        n_eq = tl.zeros([], dtype=tl.int32)
        for j0 in range(c_lo, c_hi, BN):
            o_j = j0 + tl.arange(0, BN)
            m_j = o_j < c_hi
            b_key = tl.load(p_key + o_j, mask=m_j, other=-2147483648)
            b_eq = ((b_key == t_lo) & m_j).to(tl.int32)
            b_rank = n_eq + tl.cumsum(b_eq, axis=0) - b_eq  # ties before this one
            b_keep = (((b_key > t_lo) & m_j) | ((b_eq != 0) & (b_rank < n_tie))).to(tl.int32)
            b_pos = n_sink + n_kept + tl.cumsum(b_keep, axis=0) - b_keep
            tl.store(p_ids + b_pos, o_j, mask=b_keep != 0)
            n_kept += tl.sum(b_keep, axis=0)
            n_eq += tl.sum(b_eq, axis=0)

    l_lo = tl.maximum(nfull - local, n_sink)  # local blocks [l_lo, nfull), after the sinks
    n_out = n_sink + n_sel
    _store_range(p_ids, n_out, l_lo, nfull, BN)
    n_out += nfull - l_lo
    if n_len > nfull * BLOCK_SIZE:  # partial tail block
        tl.store(p_ids + n_out, nfull)
        n_out += 1
    tl.store(block_counts + i_bh, n_out)


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------


@triton.jit
def _attention_kernel(
    q, k_cache, v_cache, cache_seqlens, block_ids, block_counts, out, part_m, part_l, part_acc,
    scale_log2, Hkv, Tmax, NSEL, V_PER_SPLIT,
    s_qb, s_qh, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_ob, s_oh, s_len,
    D: tl.constexpr, G: tl.constexpr, SPARSE: tl.constexpr, BLOCK_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BG: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """Program (bh, s): the G query heads of KV head h over virtual tokens
    [s*V_PER_SPLIT, (s+1)*V_PER_SPLIT). Dense: virtual token v is token v (< L). Sparse: v is
    offset v % BLOCK_SIZE of kept block block_ids[bh, v // BLOCK_SIZE] (v < count*BLOCK_SIZE,
    token < L, which trims the tail block). Masked tokens get score -inf."""
    i_bh, i_s = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // Hkv).to(tl.int64), (i_bh % Hkv).to(tl.int64)
    n_len = tl.minimum(tl.maximum(tl.load(cache_seqlens + i_b * s_len), 0), Tmax)
    if SPARSE:
        n_virt = tl.minimum(tl.maximum(tl.load(block_counts + i_bh), 0), NSEL) * BLOCK_SIZE
        p_ids = block_ids + i_bh.to(tl.int64) * NSEL
    else:
        n_virt = n_len
    v_lo = i_s * V_PER_SPLIT
    v_hi = tl.minimum(v_lo + V_PER_SPLIT, n_virt)

    o_g = tl.arange(0, BG)
    m_g = o_g < G
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    p_q = q + i_b * s_qb + (i_h * G + o_g).to(tl.int64)[:, None] * s_qh + o_d[None, :]
    b_q = tl.load(p_q, mask=m_g[:, None] & m_d[None, :], other=0)  # [BG, BD]
    if UPCAST_DOT:
        b_q = b_q.to(tl.float32)
    p_k = k_cache + i_b * s_kb + i_h * s_kh
    p_v = v_cache + i_b * s_vb + i_h * s_vh

    b_m = tl.full([BG], float("-inf"), dtype=tl.float32)  # running max (base-2 logits)
    b_l = tl.zeros([BG], dtype=tl.float32)  # running sum of exp2
    b_acc = tl.zeros([BG, BD], dtype=tl.float32)
    for v0 in range(v_lo, v_hi, BT):
        o_v = v0 + tl.arange(0, BT)
        m_t = o_v < v_hi
        if SPARSE:
            b_j = tl.load(p_ids + o_v // BLOCK_SIZE, mask=m_t, other=0)
            o_t = b_j * BLOCK_SIZE + o_v % BLOCK_SIZE
            m_t = m_t & (o_t >= 0) & (o_t < n_len)
        else:
            o_t = o_v
        o_t = o_t.to(tl.int64)
        m_td = m_t[:, None] & m_d[None, :]
        b_k = tl.load(p_k + o_t[:, None] * s_kt + o_d[None, :], mask=m_td, other=0)  # [BT, BD]
        b_v = tl.load(p_v + o_t[:, None] * s_vt + o_d[None, :], mask=m_td, other=0)  # [BT, BD]
        if UPCAST_DOT:
            b_k = b_k.to(tl.float32)
            b_v = b_v.to(tl.float32)
        # [BG, BD] @ [BD, BT] -> [BG, BT]
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * scale_log2
        b_s = tl.where(m_t[None, :], b_s, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
        # A row can still be all -inf (a split that starts in the masked end of a tail block):
        # subtract 0 then, so exp2 gives 0 instead of exp2(-inf + inf) = NaN.
        b_m_use = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
        b_alpha = tl.exp2(b_m - b_m_use)
        b_p = tl.exp2(b_s - b_m_use[:, None])
        b_l = b_l * b_alpha + tl.sum(b_p, axis=1)
        # [BG, BT] @ [BT, BD] -> [BG, BD]
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PRECISION)
        b_m = b_m_new

    if NUM_SPLITS == 1:
        p_o = out + i_b * s_ob + (i_h * G + o_g).to(tl.int64)[:, None] * s_oh + o_d[None, :]
        b_o = b_acc / b_l[:, None]
        tl.store(p_o, b_o.to(out.dtype.element_ty), mask=m_g[:, None] & m_d[None, :])
    else:
        # partials [B*Hkv, S, G] and [B*Hkv, S, G, D]
        o_row = (i_bh.to(tl.int64) * NUM_SPLITS + i_s) * G + o_g
        tl.store(part_m + o_row, b_m, mask=m_g)
        tl.store(part_l + o_row, b_l, mask=m_g)
        tl.store(part_acc + o_row[:, None] * D + o_d[None, :], b_acc, mask=m_g[:, None] & m_d[None, :])


@triton.jit
def _merge_kernel(
    part_m, part_l, part_acc, out, Hq, s_ob, s_oh,
    D: tl.constexpr, G: tl.constexpr, NUM_SPLITS: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr,
):
    """Program (b*Hq + head): out = sum_s w_s acc_s / sum_s w_s l_s, w_s = exp2(m_s - max_s m_s)."""
    i_bq = tl.program_id(0)
    i_b, i_hq = (i_bq // Hq).to(tl.int64), (i_bq % Hq).to(tl.int64)
    i_bh, i_g = i_bq // G, i_bq % G  # b*Hq + h*G + g = (b*Hkv + h)*G + g
    o_s = tl.arange(0, BS)
    m_s = o_s < NUM_SPLITS
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    o_row = (i_bh.to(tl.int64) * NUM_SPLITS + o_s) * G + i_g
    b_m = tl.load(part_m + o_row, mask=m_s, other=float("-inf"))
    b_l = tl.load(part_l + o_row, mask=m_s, other=0)
    b_acc = tl.load(part_acc + o_row[:, None] * D + o_d[None, :], mask=m_s[:, None] & m_d[None, :], other=0)
    b_max = tl.max(b_m, axis=0)
    b_w = tl.exp2(b_m - tl.where(b_max == float("-inf"), 0.0, b_max))  # empty splits: 0
    b_o = tl.sum(b_acc * b_w[:, None], axis=0) / tl.sum(b_l * b_w, axis=0)
    tl.store(out + i_b * s_ob + i_hq * s_oh + o_d, b_o.to(out.dtype.element_ty), mask=m_d)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """t with stride 1 in its last dim (the kernels index only the outer dims by stride)."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _vector_rows(D: int, *tensors: torch.Tensor) -> bool:
    """True when the JIT can load whole rows of `tensors` ([B, H, T, D], unit last stride) 16 bytes
    at a time: D, the outer strides (in elements) and the base addresses all multiples of 16, as
    Triton's specialisation of ints and pointers sees them. Otherwise every element of a tile is
    addressed and loaded on its own, which takes registers (see `_tile_t`)."""
    return D % 16 == 0 and all(s % 16 == 0 for t in tensors for s in t.stride()[:3]) and \
        all(t.data_ptr() % 16 == 0 for t in tensors)


def _tile_t(bd: int, dtype: torch.dtype, vector_rows: bool, target: Target) -> int:
    """Tokens per attention tile.

    GPUs: 64 up to BD = 128, 32 above, halved for float32 ("ieee" dots hold twice the operand
    registers), and halved again for a tile of more than 4096 elements whose rows cannot be loaded
    as 16-byte vectors (`_vector_rows`; e.g. D = 72). Measured by bench/triton_aot.py (Triton 3.9,
    ptxas of sm_80 and sm_90; bench/results/triton_aot.md): every tested and benchmarked
    configuration compiles spill-free. With vector rows a 16-bit [64, 128] tile takes 78-103
    registers (the benchmark, G = 4); without, it took all 255 and spilled 50-190 bytes per
    thread (16-bit, D = 66..78), while [32, 128] takes at most 217; unvectorized tiles of up to
    4096 elements take up to 254 spill-free (float32 [32, 64] on sm_90). Beyond the tests, dense
    decode up to D = 512 is spill-free for G <= 32 (with `_attention_warps`). Interpreter: 16 (the
    tl.dot minimum), where small tiles cost nothing and tests see more tiles."""
    if target.interpreted:
        return MIN_DOT
    bt = 64 if bd <= 128 else 32
    if dtype == torch.float32:
        bt //= 2
    if not vector_rows and bt * bd > 4096:
        bt //= 2
    return max(bt, MIN_DOT)


def _copy_tile_t(bd: int, dtype: torch.dtype, vector_rows: bool, target: Target) -> int:
    """Tokens per append_kv copy tile (and at most per block-mean step): as an attention tile where
    rows load as 16-byte vectors; otherwise at most 1024 elements (8 per thread), each addressed on
    its own: [32, 64] tiles took 64 registers and spilled 8 bytes on sm_90 (D = 40, every dtype),
    [16, 64] take 40 spill-free (bench/triton_aot.py, Triton 3.9)."""
    bt = _tile_t(bd, dtype, True, target)
    if target.interpreted or vector_rows:
        return bt
    return min(bt, max(1, 1024 // bd))


def plan_append_kv(k_cache, v_cache, block_keys, cache_seqlens, k_new, v_new, block_size: int, *,
                   target: Target) -> tuple[list[Launch], None]:
    """The launches of `append_kv` on `target` (see kernels/_utils.py)."""
    B, Hkv, Tmax, D = k_cache.shape
    Tn = k_new.shape[2]
    NB = block_keys.shape[2]
    if Tn == 0:
        return [], None
    k_new, v_new = _unit_last(k_new), _unit_last(v_new)
    BD = triton.next_power_of_2(D)
    BT = _copy_tile_t(BD, k_cache.dtype, _vector_rows(D, k_cache, v_cache, k_new, v_new), target)
    n_copy = triton.cdiv(Tn, BT)
    n_mean = min(triton.cdiv(Tn, block_size), NB)  # the most blocks one append of Tn tokens completes
    # p on grid axis 0 (2^31 - 1 programs): a long prefill with a small block size needs many
    # (head, batch) on axes 1 and 2 (each capped at 65535 programs; B * Hkv may exceed that).
    return [
        Launch(_append_kv_kernel, (n_copy + n_mean, Hkv, B), (
            k_cache, v_cache, block_keys, cache_seqlens, k_new, v_new,
            Hkv, Tmax, Tn, n_copy,
            *k_cache.stride()[:3], *v_cache.stride()[:3], *block_keys.stride()[:3],
            *k_new.stride()[:3], *v_new.stride()[:3], cache_seqlens.stride(0),
        ), dict(D=D, BLOCK_SIZE=block_size, BT=BT, BTM=min(BT, triton.next_power_of_2(block_size)), BD=BD)),
        Launch(_advance_seqlens_kernel, (triton.cdiv(B, ADVANCE_BLOCK),), (
            cache_seqlens, B, Tmax, Tn, cache_seqlens.stride(0),
        ), dict(BB=ADVANCE_BLOCK)),
    ], None


def append_kv(k_cache, v_cache, block_keys, cache_seqlens, k_new, v_new, block_size: int) -> None:
    """In place: write k_new/v_new [B, Hkv, Tn, D] at each sequence's end, refresh the block keys
    (fp32 mean, cast to the cache dtype) of blocks that become full, advance cache_seqlens by Tn.

    k_cache/v_cache [B, Hkv, Tmax, D] and block_keys [B, Hkv, Tmax // block_size, D] need stride 1
    in the last dim (they are written in place); any other strides. No host sync: a sequence with
    L_b < 0 or L_b + Tn > Tmax (the op's rules reject those in eager mode) is left untouched.
    """
    run_plan(plan_append_kv, k_cache.device, k_cache, v_cache, block_keys, cache_seqlens, k_new, v_new, block_size)


def _attention_warps(bg: int) -> int:
    """Warps of an attention program: 4, or 8 from 32 padded query rows (G > 16), where 4 warps
    hold too much of the [BG, BD] accumulator and q tile per thread. Measured beyond the tests'
    shapes (bench/triton_aot.py's compile, Triton 3.9, dense decode): at G = 32, 4 warps spilled
    for D = 512 (16-bit, ~100 bytes) and D >= 256 (float32, ~1.5 KB), 8 warps compile spill-free
    up to D = 512; G = 64 is spill-free with 8 warps up to D = 256 and spills at D = 512, G = 128
    spills from D = 128 (registers are capped at 128 with 16 warps)."""
    return 4 if bg <= MIN_DOT else 8


def _dot_options(dtype: torch.dtype, target: Target) -> dict:
    """fp32 dots in full fp32 ("ieee": decode is memory-bound, TF32 would cost accuracy for
    nothing); bf16 operands upcast in the interpreter, which has no bf16 tl.dot."""
    return dict(
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
        UPCAST_DOT=target.interpreted and dtype == torch.bfloat16,
    )


def _split_plan(n_programs: int, n_virt: int, bt: int, sms: int, num_splits: int | None):
    """(S, virtual tokens per split): ~2 waves of programs over the SMs, each split >= 2 tiles.
    Depends on shapes only (n_virt is Tmax or the kept-list capacity), never on lengths."""
    tiles = triton.cdiv(max(n_virt, 1), bt)
    if num_splits is None:
        waves = triton.cdiv(2 * sms, n_programs)
        num_splits = min(waves, triton.cdiv(tiles, MIN_TILES_PER_SPLIT), MAX_SPLITS)
    num_splits = max(1, min(int(num_splits), tiles))
    per_split = triton.cdiv(tiles, num_splits) * bt
    return triton.cdiv(tiles * bt, per_split), per_split


def _plan_attention(q, k_cache, v_cache, cache_seqlens, scale, block_ids, block_counts, block_size, num_splits,
                    target: Target) -> tuple[list[Launch], torch.Tensor]:
    """Shared plan of the dense (block_ids None) and sparse attention; the output is [B, Hq, D]."""
    B, Hq, D = q.shape
    Hkv, Tmax = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    q, k_cache, v_cache = _unit_last(q), _unit_last(k_cache), _unit_last(v_cache)
    sparse = block_ids is not None
    nsel = block_ids.shape[-1] if sparse else 1
    n_virt = nsel * block_size if sparse else Tmax
    BD = max(MIN_DOT, triton.next_power_of_2(D))
    BG = max(MIN_DOT, triton.next_power_of_2(G))
    BT = _tile_t(BD, q.dtype, _vector_rows(D, k_cache, v_cache), target)
    S, per_split = _split_plan(B * Hkv, n_virt, BT, target.sms, num_splits)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)

    out = torch.empty((B, Hq, D), dtype=q.dtype, device=q.device)
    if S > 1:
        part_m = torch.empty((B * Hkv, S, G), dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty((B * Hkv, S, G, D), dtype=torch.float32, device=q.device)
    else:
        part_m = part_l = part_acc = out  # unused
    if not sparse:
        block_ids = block_counts = cache_seqlens  # unused
    launches = [Launch(_attention_kernel, (B * Hkv, S), (
        q, k_cache, v_cache, cache_seqlens, block_ids, block_counts, out, part_m, part_l, part_acc,
        scale * LOG2E, Hkv, Tmax, nsel, per_split,
        *q.stride()[:2], *k_cache.stride()[:3], *v_cache.stride()[:3], *out.stride()[:2], cache_seqlens.stride(0),
    ), dict(D=D, G=G, SPARSE=sparse, BLOCK_SIZE=block_size if sparse else 1, NUM_SPLITS=S,
            BG=BG, BT=BT, BD=BD, **_dot_options(q.dtype, target), num_warps=_attention_warps(BG)))]
    if S > 1:
        launches.append(Launch(_merge_kernel, (B * Hq,), (
            part_m, part_l, part_acc, out, Hq, *out.stride()[:2],
        ), dict(D=D, G=G, NUM_SPLITS=S, BS=triton.next_power_of_2(S), BD=triton.next_power_of_2(D), num_warps=4)))
    return launches, out


def plan_decode_attention(q, k_cache, v_cache, cache_seqlens, scale=None, *, target: Target,
                          num_splits: int | None = None) -> tuple[list[Launch], torch.Tensor]:
    """The launches of `decode_attention` on `target` and its output (see kernels/_utils.py)."""
    return _plan_attention(q, k_cache, v_cache, cache_seqlens, scale, None, None, 1, num_splits, target)


def decode_attention(q, k_cache, v_cache, cache_seqlens, scale=None, *, num_splits: int | None = None) -> torch.Tensor:
    """Dense decode attention, split-K flash decoding. Returns out [B, Hq, D] in q's dtype.

    q [B, Hq, D]; k_cache, v_cache [B, Hkv, Tmax, D] (any strides); cache_seqlens int32 [B]
    (clamped to [0, Tmax]; L_b == 0 gives NaN, as the reference). scale defaults to 1/sqrt(D).
    num_splits: split-K programs per (b, KV head) (default: sized to the GPU from Tmax).

    Example:
        >>> k = torch.randn(2, 2, 100, 64, device="cuda"); v = torch.randn_like(k)
        >>> q = torch.randn(2, 8, 64, device="cuda"); n = torch.tensor([100, 37], dtype=torch.int32, device="cuda")
        >>> out = decode_attention(q, k, v, n)  # [2, 8, 64]
    """
    return run_plan(plan_decode_attention, q.device, q, k_cache, v_cache, cache_seqlens, scale,
                    num_splits=num_splits)


def plan_select_blocks(q, block_keys, cache_seqlens, tmax: int, block_size: int, topk: int, sink_blocks: int,
                       local_blocks: int, *, target: Target) -> tuple[list[Launch], tuple[torch.Tensor, torch.Tensor]]:
    """The launch of `select_blocks` on `target` and its outputs (see kernels/_utils.py)."""
    B, Hq, D = q.shape
    Hkv, NB = block_keys.shape[1], block_keys.shape[2]
    G = Hq // Hkv
    q = _unit_last(q)
    if block_keys.stride(-1) != 1 and D > 1:
        block_keys = block_keys.contiguous()
    topk, sink_blocks, local_blocks = (min(int(x), NB) for x in (topk, sink_blocks, local_blocks))
    nsel = min(sink_blocks + topk + local_blocks, NB) + 1
    block_ids = torch.empty((B, Hkv, nsel), dtype=torch.int32, device=q.device)
    block_counts = torch.empty((B, Hkv), dtype=torch.int32, device=q.device)
    scores = torch.empty((B * Hkv, max(NB, 1)), dtype=torch.int32, device=q.device)
    BD = triton.next_power_of_2(D)
    BJ = MIN_DOT if target.interpreted else max(1, min(64, 8192 // BD))
    BN = MIN_DOT if target.interpreted else 1024
    return [Launch(_select_blocks_kernel, (B * Hkv,), (
        q, block_keys, cache_seqlens, scores, block_ids, block_counts,
        Hkv, tmax, NB, nsel, topk, sink_blocks, local_blocks,
        *q.stride()[:2], *block_keys.stride()[:3], cache_seqlens.stride(0),
    ), dict(D=D, G=G, BLOCK_SIZE=block_size, BG=triton.next_power_of_2(G), BD=BD, BJ=BJ, BN=BN, num_warps=4))], \
        (block_ids, block_counts)


def select_blocks(q, block_keys, cache_seqlens, tmax: int, block_size: int, topk: int, sink_blocks: int,
                  local_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept blocks of every (b, KV head): (block_ids int32 [B, Hkv, NSEL], counts int32 [B, Hkv]).

    block_ids[b, h, :counts[b, h]] lists the kept blocks in ascending order (sinks, chosen
    candidates, local blocks, then the partial tail block L_b // block_size when L_b is not a
    multiple of block_size); entries past the count are unspecified. NSEL = min(sink_blocks +
    topk + local_blocks, NB) + 1 with NB = tmax // block_size. Selection rule:
    pyfast.reference.sparse.kept_token_mask.
    """
    return run_plan(plan_select_blocks, q.device, q, block_keys, cache_seqlens, tmax, block_size, topk,
                    sink_blocks, local_blocks)


def plan_sparse_decode_attention(q, k_cache, v_cache, cache_seqlens, block_keys, block_size: int, topk: int,
                                 sink_blocks: int, local_blocks: int, scale=None, *, target: Target,
                                 num_splits: int | None = None) -> tuple[list[Launch], torch.Tensor]:
    """The launches of `sparse_decode_attention` on `target` (selection, then attention) and its output."""
    select, (block_ids, block_counts) = plan_select_blocks(q, block_keys, cache_seqlens, k_cache.shape[2], block_size,
                                                           topk, sink_blocks, local_blocks, target=target)
    attend, out = _plan_attention(q, k_cache, v_cache, cache_seqlens, scale, block_ids, block_counts, block_size,
                                  num_splits, target)
    return select + attend, out


def sparse_decode_attention(q, k_cache, v_cache, cache_seqlens, block_keys, block_size: int, topk: int,
                            sink_blocks: int, local_blocks: int, scale=None, *,
                            num_splits: int | None = None) -> torch.Tensor:
    """Kinetics block top-k decode attention. Returns out [B, Hq, D] in q's dtype.

    Shapes as decode_attention plus block_keys [B, Hkv, Tmax // block_size, D]. Selects the kept
    blocks on the device (select_blocks), then runs split-K attention over the kept-block list
    only (its capacity NSEL * block_size virtual tokens sizes the splits). Equals
    masked_decode_attention under pyfast.reference.sparse.kept_token_mask.

    Example:
        >>> out = sparse_decode_attention(q, k, v, n, block_keys, 16, 64, 1, 4)  # [B, Hq, D]
    """
    return run_plan(plan_sparse_decode_attention, q.device, q, k_cache, v_cache, cache_seqlens, block_keys,
                    block_size, topk, sink_blocks, local_blocks, scale, num_splits=num_splits)
