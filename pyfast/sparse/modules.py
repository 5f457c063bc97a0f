"""SparseKVCache: a preallocated multi-layer KV cache for Kinetics block top-k decoding.

Layout (one slice per layer, views of four allocations; docs/design.md § Layouts):
    k_cache[i], v_cache[i]   [B, Hkv, Tmax, D]          token t of sequence b at [b, :, t]
    block_keys[i]            [B, Hkv, Tmax // bs, D]    mean key of every full block (kept by append_kv)
    cache_seqlens[i]         int32 [B]                  valid tokens per sequence (may differ per b)
Each layer keeps its own lengths because layers append one after the other within a forward.

Single-token decode runs pyfast.sparse_decode_attention (or pyfast.decode_attention when topk is
None); a multi-token step (prefill, chunked prefill) is exact causal attention over the cache with
F.scaled_dot_product_attention, which is fine for a reference-quality prefill.

Example:
    >>> cache = SparseKVCache(n_layers=2, batch_size=1, n_kv_heads=2, head_dim=64, max_length=4096, topk=8)
    >>> cache.append(0, k, v)                      # k, v [1, 2, Tn, 64]
    >>> out = cache.attend(0, q)                   # q [1, Hq, 64] -> [1, Hq, 64]
    >>> cache.stats()["kv_read_fraction"]          # share of the dense decode's KV bytes read so far
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pyfast._validate import check_int, check_tensor, fail
from pyfast.sparse.ops import append_kv, decode_attention, sparse_decode_attention

_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


class SparseKVCache:
    """Preallocated KV cache of `n_layers` layers with per-block mean keys.

    Args:
        n_layers, batch_size, n_kv_heads, head_dim: cache geometry.
        max_length: Tmax, the most tokens a sequence can hold (prompt + generated, padding included
            until `unpad_last` removes it).
        block_size, topk, sink_blocks, local_blocks: the selection rule of
            pyfast.sparse_decode_attention; topk=None means dense decoding (decode_attention).
        dtype, device: of the cache; queries must share the dtype.
        backend: passed to the pyfast ops (None: the device's default kernels).

    Stats (`stats()`) count single-token decode steps only: per (sequence, KV head, step) the bytes
    a decode kernel reads from the cache, i.e. K and V rows of the kept tokens plus, when there is a
    choice to make (0 < topk < candidate blocks), the mean key of every candidate block (as the
    CPU kernel does); the dense baseline reads K and V of every valid token.

    Example:
        >>> cache = pyfast.SparseKVCache(2, 1, 2, 64, max_length=512, topk=4)   # 2 layers, batch 1, 2 KV heads
        >>> cache.append(0, torch.randn(1, 2, 300, 64), torch.randn(1, 2, 300, 64))
        >>> cache.attend(0, torch.randn(1, 8, 64)).shape                        # GQA: 8 query heads
        torch.Size([1, 8, 64])
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        head_dim: int,
        max_length: int,
        *,
        block_size: int = 16,
        topk: int | None = 64,
        sink_blocks: int = 1,
        local_blocks: int = 4,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        backend: str | None = None,
    ):
        for name, v in (("n_layers", n_layers), ("batch_size", batch_size), ("n_kv_heads", n_kv_heads),
                        ("head_dim", head_dim), ("max_length", max_length), ("block_size", block_size)):
            check_int("SparseKVCache", name, v, minimum=1)
        self.block_size, self.topk, self.sink_blocks, self.local_blocks = block_size, topk, sink_blocks, local_blocks
        self.backend = backend
        self.max_length = max_length
        shape = (n_layers, batch_size, n_kv_heads, max_length, head_dim)
        # zeros, not empty: tokens past a sequence's length are never read by the ops, but a
        # prefill slice or a debugger may look at them, and they must not hold NaN garbage
        self._k = torch.zeros(shape, dtype=dtype, device=device)
        self._v = torch.zeros(shape, dtype=dtype, device=device)
        self._bk = torch.zeros(n_layers, batch_size, n_kv_heads, max_length // block_size, head_dim,
                               dtype=dtype, device=device)
        self._len = torch.zeros(n_layers, batch_size, dtype=torch.int32, device=device)
        self._bind_layers()
        # decode-step byte counters, on the device so that counting never syncs with the host
        self._read = torch.zeros((), dtype=torch.float64, device=device)
        self._dense = torch.zeros((), dtype=torch.float64, device=device)
        self._kept = torch.zeros((), dtype=torch.float64, device=device)
        self._layer_steps = [0] * n_layers  # single-token decode steps per layer (host ints: no sync)

    # -- geometry ---------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self._k.shape[0]

    @property
    def batch_size(self) -> int:
        return self._k.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self._k.dtype

    @property
    def device(self) -> torch.device:
        return self._k.device

    @property
    def dense(self) -> bool:
        return self.topk is None

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"pyfast.SparseKVCache: expected layer in [0, {self.n_layers}), got {layer}")

    # -- writing ----------------------------------------------------------------------------------
    def append(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Append k_new/v_new [B, Hkv, Tn, D] at each sequence's end (pyfast.append_kv)."""
        self._check_layer(layer)
        append_kv(self.k_cache[layer], self.v_cache[layer], self.block_keys[layer], self.cache_seqlens[layer],
                  k_new.to(self.dtype), v_new.to(self.dtype), block_size=self.block_size, backend=self.backend)

    def unpad_last(self, layer: int, keep: torch.Tensor) -> None:
        """Drop padding from the last Tn appended tokens: keep bool [B, Tn] marks the real ones.

        Rows with padding are rewound by Tn and their kept tokens appended again, so they end up
        contiguous from the row's previous end and the block keys are recomputed (left-padded
        prompts: each row then holds only its own tokens, with its own length).
        """
        self._check_layer(layer)
        tn = keep.shape[1]
        keep = keep.to(device="cpu", dtype=torch.bool)
        ends = self.cache_seqlens[layer].tolist()
        for b in range(self.batch_size):
            if bool(keep[b].all()):
                continue
            idx = torch.nonzero(keep[b]).flatten() + (ends[b] - tn)
            idx = idx.to(self.device)
            k = self.k_cache[layer][b : b + 1].index_select(2, idx)  # copies: the source is overwritten
            v = self.v_cache[layer][b : b + 1].index_select(2, idx)
            self.cache_seqlens[layer][b] = ends[b] - tn
            if idx.numel():
                append_kv(self.k_cache[layer][b : b + 1], self.v_cache[layer][b : b + 1],
                          self.block_keys[layer][b : b + 1], self.cache_seqlens[layer][b : b + 1], k, v,
                          block_size=self.block_size, backend=self.backend)

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last `tokens_to_remove` tokens of every sequence in every layer. Exact: block
        keys of blocks left full are unchanged, and later appends recompute the others."""
        if tokens_to_remove < 0:
            raise ValueError(f"pyfast.SparseKVCache.crop: expected tokens_to_remove >= 0, got {tokens_to_remove}")
        self._len.sub_(tokens_to_remove).clamp_(min=0)

    def reorder(self, index: torch.Tensor) -> None:
        """Reorder (or select with repetition) the sequences of the batch: row b <- row index[b]."""
        self._copy_rows(self._check_batch_index("reorder", index, exact_size=True))

    def select_batch(self, index: torch.Tensor) -> None:
        """Rebuild the batch from rows `index` (1-D, any length >= 1, repeats allowed): new row b
        <- old row index[b], with its tokens, block keys and length. A new batch size reallocates
        the cache (beam expansion: index = arange(B).repeat_interleave(n)); the same size reorders
        in place."""
        index = self._check_batch_index("select_batch", index, exact_size=False)
        if index.numel() == self.batch_size:
            self._copy_rows(index)
            return
        self._k, self._v, self._bk, self._len = (t.index_select(1, index) for t in (self._k, self._v, self._bk, self._len))
        self._bind_layers()

    def _copy_rows(self, index: torch.Tensor) -> None:
        for t in (self._k, self._v, self._bk, self._len):
            t.copy_(t.index_select(1, index))

    def _bind_layers(self) -> None:
        """The per-layer views (k_cache[i] etc.) of the four allocations."""
        self.k_cache, self.v_cache = list(self._k.unbind(0)), list(self._v.unbind(0))
        self.block_keys, self.cache_seqlens = list(self._bk.unbind(0)), list(self._len.unbind(0))

    def _check_batch_index(self, method: str, index, *, exact_size: bool) -> torch.Tensor:
        op = f"SparseKVCache.{method}"
        check_tensor(op, "index", index, dtypes=_INDEX_DTYPES, ndim=1)
        if exact_size and index.numel() != self.batch_size:
            fail(op, "index", f"with {self.batch_size} entries (the batch size)", index.numel())
        if index.numel() == 0:
            fail(op, "index", "with at least one entry", "an empty tensor")
        lo, hi = (int(v) for v in index.aminmax())
        if lo < 0 or hi >= self.batch_size:
            fail(op, "index", f"with entries in [0, {self.batch_size})", f"values in [{lo}, {hi}]")
        return index.to(self.device, torch.long)

    def reset(self) -> None:
        """Empty every sequence (lengths to 0) and clear the stats; keeps the allocation."""
        self._len.zero_()
        self.reset_stats()

    # -- attention --------------------------------------------------------------------------------
    def attend(self, layer: int, q: torch.Tensor, *, scale: float | None = None,
               keep: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of the newest tokens' queries over layer `layer` of the cache.

        q [B, Hq, D] or [B, Hq, Tq, D] (Hq a multiple of Hkv), in the cache's dtype; call after
        appending the same step's keys/values. Tq == 1: block top-k sparse decode (dense if topk is
        None). Tq > 1: query j of row b is the token at position L_b - Tq + j and attends causally
        with exact softmax; with `keep` (bool [B, Tq], left padding already removed by unpad_last)
        only the kept queries are real: they are the last keep[b].sum() tokens of row b, and the
        other queries get zeros. Returns q's shape.
        """
        self._check_layer(layer)
        if q.dim() == 3 or q.shape[2] == 1:
            out = self._decode(layer, q if q.dim() == 3 else q[:, :, 0], scale)
            return out if q.dim() == 3 else out.unsqueeze(2)
        return self._prefill(layer, q, scale, keep)

    def _decode(self, layer: int, q: torch.Tensor, scale: float | None) -> torch.Tensor:
        args = (q, self.k_cache[layer], self.v_cache[layer], self.cache_seqlens[layer])
        self._count(layer)
        if self.dense:
            return decode_attention(*args, scale=scale, backend=self.backend)
        return sparse_decode_attention(*args, self.block_keys[layer], block_size=self.block_size, topk=self.topk,
                                       sink_blocks=self.sink_blocks, local_blocks=self.local_blocks, scale=scale,
                                       backend=self.backend)

    def _prefill(self, layer: int, q: torch.Tensor, scale: float | None, keep: torch.Tensor | None) -> torch.Tensor:
        b_sz, hq, tq, d = q.shape
        hkv = self.k_cache[layer].shape[1]
        out = torch.zeros_like(q)
        lengths = self.cache_seqlens[layer].tolist()
        for b in range(b_sz):
            rows = torch.arange(tq, device=q.device) if keep is None else torch.nonzero(keep[b].to(q.device)).flatten()
            n, length = rows.numel(), lengths[b]
            if n == 0:
                continue
            k = self.k_cache[layer][b : b + 1, :, :length]
            v = self.v_cache[layer][b : b + 1, :, :length]
            qb = q[b : b + 1].index_select(2, rows)
            # query i sits at position length - n + i and sees the tokens up to it
            pos = torch.arange(length - n, length, device=q.device)
            mask = torch.arange(length, device=q.device)[None, :] <= pos[:, None]
            ob = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask, scale=scale, enable_gqa=hq != hkv)
            out[b : b + 1].index_copy_(2, rows, ob)
        return out

    # -- stats ------------------------------------------------------------------------------------
    def _count(self, layer: int) -> None:
        """Add one decode step of `layer` to the byte counters (token units: a K or V row of one
        KV head is D elements, a block key too; every head and layer has the same lengths)."""
        length = self.cache_seqlens[layer].to(torch.float64)
        self._dense += 2 * length.sum()
        self._layer_steps[layer] += 1
        if self.dense:
            self._read += 2 * length.sum()
            self._kept += length.sum()
            return
        bs = self.block_size
        nfull = torch.div(length, bs, rounding_mode="floor")
        ncand = (nfull - self.local_blocks - self.sink_blocks).clamp(min=0)
        kept_blocks = torch.where(ncand > 0, self.sink_blocks + self.local_blocks + ncand.clamp(max=self.topk), nfull)
        kept = kept_blocks * bs + (length - nfull * bs)
        # the candidates' block keys are read only when there is a choice to make
        scored = ncand * (ncand > self.topk) if self.topk > 0 else torch.zeros_like(ncand)
        self._read += (2 * kept + scored).sum()
        self._kept += kept.sum()

    def reset_stats(self) -> None:
        for t in (self._read, self._dense, self._kept):
            t.zero_()
        self._layer_steps = [0] * self.n_layers

    def stats(self) -> dict:
        """Counters since the last reset / reset_stats (fractions 1.0 before any step):

        - 'decode_steps': single-token decode steps, i.e. tokens decoded per sequence (a model's
          decode step runs every layer once; counted as the most steps any layer has run, so
          `generate(max_new_tokens=n)` gives n - 1: its first token comes from the prefill);
        - 'layer_steps': single-token attention calls summed over layers (decode_steps * n_layers
          when every layer decodes every step);
        - 'kv_read_fraction': KV bytes read / dense bytes; 'kept_token_fraction': attended tokens /
          valid tokens.
        """
        dense = float(self._dense)
        return {
            "decode_steps": max(self._layer_steps),
            "layer_steps": sum(self._layer_steps),
            "kv_read_fraction": float(self._read) / dense if dense else 1.0,
            "kept_token_fraction": 2 * float(self._kept) / dense if dense else 1.0,
        }
