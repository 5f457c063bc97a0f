"""Kinetics block top-k sparse decoding: the executable spec (float64 math, pure PyTorch).

Layouts (docs/design.md § Layouts):
    k_cache, v_cache  [B, Hkv, Tmax, D]          the KV cache, token t of sequence b at [b, :, t]
    cache_seqlens     int32 [B]                  L_b valid tokens per sequence
    block_keys        [B, Hkv, Tmax // bs, D]    mean of the keys of each *full* block of bs tokens
    q                 [B, Hq, D]                 one decode query per head, Hq = G * Hkv;
                                                 query head i reads KV head i // G (GQA)

Block selection, per (b, KV head h), with nfull = L_b // bs:
    always kept: sink blocks j < sink_blocks, local blocks nfull - local_blocks <= j < nfull and
                 the partial tail [nfull * bs, L_b);
    candidates:  the other full blocks, ranked by score_j = mean_g q_g . block_keys[b, h, j]
                 (g over the G query heads of group h); the `topk` highest are kept. Ties go to the
                 lower block index; NaN ranks above everything (torch.sort order).
Every query head then attends with exact softmax over the kept tokens only.

Two forms of attention (vectorized with a mask, and a per-token loop) are tested against each
other in tests/sparse/test_sparse_reference.py, so the spec itself is checked.
"""

from __future__ import annotations

import math

import torch


def _scale(scale: float | None, d: int) -> float:
    return 1.0 / math.sqrt(d) if scale is None else float(scale)


def append_kv(k_cache, v_cache, block_keys, cache_seqlens, k_new, v_new, *, block_size: int) -> None:
    """In place: write k_new/v_new [B, Hkv, Tn, D] at each sequence's end, refresh the block keys
    of blocks that became full (mean in float64 of the stored keys, cast to the cache dtype) and
    advance cache_seqlens by Tn. The caller has checked that no sequence passes Tmax."""
    tn = k_new.shape[2]
    for b in range(k_cache.shape[0]):
        start = int(cache_seqlens[b])
        k_cache[b, :, start : start + tn] = k_new[b]
        v_cache[b, :, start : start + tn] = v_new[b]
        for j in range(start // block_size, (start + tn) // block_size):
            blk = k_cache[b, :, j * block_size : (j + 1) * block_size].double()
            block_keys[b, :, j] = blk.mean(dim=1).to(block_keys.dtype)
    cache_seqlens += tn


def block_scores(q: torch.Tensor, block_keys: torch.Tensor) -> torch.Tensor:
    """score [B, Hkv, NB] (float64) = mean over each group's query heads of q_g . block_keys,
    computed as (mean_g q_g) . block_keys: equal in exact arithmetic, and the form every kernel
    uses (one dot per block), so infinities and NaN rank the same way everywhere."""
    b, hq, d = q.shape
    hkv = block_keys.shape[1]
    qbar = q.double().reshape(b, hkv, hq // hkv, d).mean(dim=2)
    return torch.einsum("bhd,bhjd->bhj", qbar, block_keys.double())


def kept_token_mask(
    q: torch.Tensor,
    block_keys: torch.Tensor,
    cache_seqlens: torch.Tensor,
    tmax: int,
    *,
    block_size: int = 16,
    topk: int = 64,
    sink_blocks: int = 1,
    local_blocks: int = 4,
) -> torch.Tensor:
    """bool [B, Hkv, tmax]: True for every token sparse_decode_attention attends to."""
    b_sz, hkv = block_keys.shape[:2]
    scores = block_scores(q, block_keys)
    mask = torch.zeros(b_sz, hkv, tmax, dtype=torch.bool, device=q.device)
    for b in range(b_sz):
        length = int(cache_seqlens[b])
        nfull = length // block_size
        keep = torch.zeros(hkv, nfull + 1, dtype=torch.bool, device=q.device)  # last = partial tail
        keep[:, : min(sink_blocks, nfull)] = True
        keep[:, max(nfull - local_blocks, 0) : nfull] = True
        keep[:, nfull] = True
        lo, hi = sink_blocks, nfull - local_blocks
        if hi > lo and topk > 0:
            order = torch.sort(scores[b, :, lo:hi], dim=1, descending=True, stable=True).indices
            chosen = order[:, :topk] + lo
            keep.scatter_(1, chosen, True)
        tok = keep.repeat_interleave(block_size, dim=1)[:, :length]
        mask[b, :, :length] = tok
    return mask


def masked_decode_attention(q, k_cache, v_cache, mask, scale=None) -> torch.Tensor:
    """out [B, Hq, D] = softmax(scale * q . k) v over the tokens where mask [B, Hkv, Tmax] is True."""
    b, hq, d = q.shape
    hkv = k_cache.shape[1]
    g = hq // hkv
    keep = mask.repeat_interleave(g, dim=1)  # [B, Hq, Tmax]
    # Unkept tokens are never read (they may hold anything, NaN included): zero them first.
    k = k_cache.double().repeat_interleave(g, dim=1).masked_fill(~keep[..., None], 0.0)  # [B, Hq, Tmax, D]
    v = v_cache.double().repeat_interleave(g, dim=1).masked_fill(~keep[..., None], 0.0)
    s = torch.einsum("bhd,bhtd->bht", q.double(), k) * _scale(scale, d)
    s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.einsum("bht,bhtd->bhd", p, v).to(q.dtype)


def length_mask(cache_seqlens: torch.Tensor, hkv: int, tmax: int) -> torch.Tensor:
    """bool [B, Hkv, tmax]: the first L_b tokens of each sequence."""
    t = torch.arange(tmax, device=cache_seqlens.device)
    return (t[None, :] < cache_seqlens[:, None].long())[:, None, :].expand(-1, hkv, -1)


def decode_attention(q, k_cache, v_cache, cache_seqlens, *, scale=None) -> torch.Tensor:
    """Dense decode: exact softmax attention of q [B, Hq, D] over the L_b valid tokens."""
    mask = length_mask(cache_seqlens, k_cache.shape[1], k_cache.shape[2])
    return masked_decode_attention(q, k_cache, v_cache, mask, scale)


def sparse_decode_attention(
    q, k_cache, v_cache, cache_seqlens, block_keys, *, block_size=16, topk=64, sink_blocks=1, local_blocks=4, scale=None
) -> torch.Tensor:
    """Block top-k decode: decode attention restricted to kept_token_mask (see module docstring)."""
    mask = kept_token_mask(
        q, block_keys, cache_seqlens, k_cache.shape[2],
        block_size=block_size, topk=topk, sink_blocks=sink_blocks, local_blocks=local_blocks,
    )
    return masked_decode_attention(q, k_cache, v_cache, mask, scale)


def decode_attention_loop(q, k_cache, v_cache, mask, scale=None) -> torch.Tensor:
    """The same math one token at a time with a running max and sum (the form kernels use)."""
    b_sz, hq, d = q.shape
    g = hq // k_cache.shape[1]
    out = torch.empty(b_sz, hq, d, dtype=torch.float64)
    sc = _scale(scale, d)
    for b in range(b_sz):
        for i in range(hq):
            m, l_sum, acc = float("-inf"), 0.0, torch.zeros(d, dtype=torch.float64)
            for t in torch.nonzero(mask[b, i // g]).flatten().tolist():
                s = float(q[b, i].double() @ k_cache[b, i // g, t].double()) * sc
                m_new = max(m, s)
                alpha = math.exp(m - m_new) if m != float("-inf") else 0.0
                p = math.exp(s - m_new)
                l_sum = l_sum * alpha + p
                acc = acc * alpha + p * v_cache[b, i // g, t].double()
                m = m_new
            out[b, i] = acc / l_sum
    return out.to(q.dtype)
