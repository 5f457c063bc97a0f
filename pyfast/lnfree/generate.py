"""LNFreeGPT2.generate: prefill the prompts as one batch, then one token per row per step through a
KV cache preallocated for the whole run ([B, H, T + max_new_tokens, hd] per layer).

Left-padded prompts: each row's real tokens are written to the front of its cache rows (a row's
cache holds only its own tokens, cache_seqlens[b] of them), so decode_attention never sees a pad;
positions count real tokens, as transformers' generate numbers them.
"""

from __future__ import annotations

import torch

from pyfast._validate import check_int
from pyfast.lnfree.model import BLOCK_SIZE, FROM_CONFIG, OP, LNFreeGPT2, _check_sampling, _fail, sample_next
from pyfast.sparse import append_kv, decode_attention, sparse_decode_attention

SPARSE_KEYS = {"topk", "sink_blocks", "local_blocks"}  # block_size is the cache's (BLOCK_SIZE)


class Generator:
    def __init__(self, model: LNFreeGPT2, input_ids, max_new_tokens, *, attention_mask, do_sample, temperature,
                 top_k, top_p, seed, eos_token_id, pad_token_id, sparse=None):
        model.check_input_ids("generate", input_ids, attention_mask)
        check_int(f"{OP}.generate", "max_new_tokens", max_new_tokens, minimum=0)
        _check_sampling(do_sample, temperature, top_k, top_p, seed)
        cfg = model.config
        b, t = input_ids.shape
        if t + max_new_tokens > cfg["n_positions"]:
            _fail("generate", "prompt length + max_new_tokens", f"<= n_positions = {cfg['n_positions']} "
                  "(the position table)", f"{t} + {max_new_tokens}")
        for name, tok in (("eos_token_id", None if eos_token_id is FROM_CONFIG else eos_token_id),
                          ("pad_token_id", pad_token_id)):
            if tok is not None and (isinstance(tok, bool) or not isinstance(tok, int) or not 0 <= tok < cfg["vocab_size"]):
                _fail("generate", name, f"None or a token id in [0, {cfg['vocab_size']})", repr(tok))
        self.model, self.ids, self.mask = model, input_ids.long(), attention_mask
        self.n = max_new_tokens
        self.sampling = dict(do_sample=do_sample, temperature=float(temperature), top_k=top_k, top_p=float(top_p))
        self.generator = None
        if do_sample:
            self.generator = torch.Generator(device=input_ids.device)
            self.generator.manual_seed(seed if seed is not None else torch.seed())
        if sparse is not None and (not isinstance(sparse, dict) or not set(sparse) <= SPARSE_KEYS):
            _fail("generate", "sparse", f"None or a dict with keys among {sorted(SPARSE_KEYS)}", repr(sparse))
        for k, v in (sparse or {}).items():  # before the prefill runs
            check_int(f"{OP}.generate", f"sparse[{k!r}]", v, minimum=0)
        self.sparse = sparse
        self.eos = cfg.get("eos_token_id") if eos_token_id is FROM_CONFIG else eos_token_id
        self.pad = pad_token_id if pad_token_id is not None else self.eos

    def _allocate(self, tmax: int):
        """Per layer: k_cache, v_cache [B, H, tmax, hd], block_keys, cache_seqlens (all empty)."""
        m = self.model
        b, dev, dt = self.ids.shape[0], self.ids.device, m.wte.dtype
        heads = m.config["n_head"]
        hd = m.config["n_embd"] // heads
        caches = []
        for _ in m.blocks:
            k = torch.zeros(b, heads, tmax, hd, dtype=dt, device=dev)
            caches.append((k, torch.zeros_like(k), torch.zeros(b, heads, tmax // BLOCK_SIZE, hd, dtype=dt, device=dev),
                           torch.zeros(b, dtype=torch.int32, device=dev)))
        return caches

    def _prefill(self, caches) -> torch.Tensor:
        """The prompts through the model as one batch; their k, v into the caches (each row's real
        tokens at the front). Returns the last position's logits [B, V]."""
        m, ids, mask = self.model, self.ids, self.mask
        x, kvs = m._run(ids, mask, keep_kv=True)
        t = ids.shape[1]
        lengths = [t] * ids.shape[0] if mask is None else mask.long().sum(1).tolist()
        for (k, v), (kc, vc, bk, n) in zip(kvs, caches):
            for row, length in enumerate(lengths):  # a row's real tokens are its last `length` (left padding)
                sl = slice(row, row + 1)
                append_kv(kc[sl], vc[sl], bk[sl], n[sl], k[sl, :, t - length:], v[sl, :, t - length:],
                          block_size=BLOCK_SIZE)
        return m.unembed(x[:, -1])

    def _step(self, tokens: torch.Tensor, caches) -> torch.Tensor:
        """One token per row [B] -> the next logits [B, V]."""
        m = self.model
        positions = caches[0][3].long()  # each row's real tokens so far
        x = m._embed(tokens, positions)
        for blk, (kc, vc, bk, n) in zip(m.blocks, caches):
            q, k, v = blk.split_heads(m.linear(x, blk.attn_weight, blk.attn_bias))  # [B, H, hd]
            append_kv(kc, vc, bk, n, k[:, :, None], v[:, :, None], block_size=BLOCK_SIZE)
            if self.sparse is None:
                z = decode_attention(q.contiguous(), kc, vc, n, scale=blk.scale)
            else:
                z = sparse_decode_attention(q.contiguous(), kc, vc, n, bk, block_size=BLOCK_SIZE, scale=blk.scale,
                                            **self.sparse)
            x = m.linear(z.flatten(1), blk.attn_proj_weight, blk.attn_proj_bias, x)
            x = blk.mlp(x, m)
        return m.unembed(x)

    def run(self, progress=None) -> torch.Tensor:
        b, t = self.ids.shape
        if self.n == 0:
            return self.ids.clone()
        caches = self._allocate(t + self.n)
        logits = self._prefill(caches)
        out = torch.empty(b, self.n, dtype=torch.long, device=self.ids.device)
        done = torch.zeros(b, dtype=torch.bool, device=self.ids.device)
        steps = 0
        for i in range(self.n):
            tok = sample_next(logits.float(), generator=self.generator, **self.sampling)
            if self.pad is not None:
                tok = tok.masked_fill(done, self.pad)
            out[:, i] = tok
            steps = i + 1
            if progress is not None:
                progress(steps, self.n)
            if self.eos is not None:
                done |= tok == self.eos
                if bool(done.all()):
                    break
            if i + 1 < self.n:
                logits = self._step(tok, caches)
        return torch.cat([self.ids, out[:, :steps]], 1)
