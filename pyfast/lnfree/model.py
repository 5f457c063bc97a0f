"""LNFreeGPT2: a GPT-2 with every LayerNorm folded away (pyfast.lnfree.fold), run on pyfast kernels.

A block is only matmuls, GELU, attention and residual adds:
    qkv = x Wqkv^T + bqkv                               linear_bias_residual (no residual)
    x   = attn(qkv) Wo^T + bo + x                       linear_bias_residual
    x   = gelu_tanh(x Wfc^T + bfc) Wp^T + bp + x        linear_bias_gelu, linear_bias_residual
    logits = x U^T + bU                                  the untied, folded unembedding
Weights are kept in F.linear's layout [out, in]. The prompt runs as one batch of rows (the "fused
prefill": every linear layer one GEMM over all prompt tokens, attention by SDPA); each generated
token then goes through a preallocated KV cache with pyfast's append_kv and decode_attention.

With no normalization the logits are a sum of per-component terms (the residual stream's parts
times U, plus bU): `direct_logit_attribution` returns them per block, per attention head and per
MLP, summing exactly (up to rounding) to the logits.
"""

from __future__ import annotations

import json
import math
import os
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pyfast._validate import check_int, fail, fail_type
from pyfast.lnfree.ops import linear_bias_gelu, linear_bias_residual

CONFIG_FLAG = "pyfast_lnfree"  # marks a directory written by LNFreeGPT2.save_pretrained
WEIGHTS_FILE = "model.safetensors"
BLOCK_SIZE = 16  # append_kv's block of block_keys (needed by sparse decoding; dense ignores it)
FROM_CONFIG = object()  # generate's eos_token_id default: the config's (None: never stop)


OP = "lnfree.LNFreeGPT2"  # errors read "pyfast.lnfree.LNFreeGPT2.<method>: expected ..."


def _fail(fn: str, arg: str, expected: str, got, error=ValueError) -> None:
    (fail if error is ValueError else fail_type)(f"{OP}.{fn}", arg, expected, got)


class LNFreeBlock(nn.Module):
    def __init__(self, d: int, inner: int, heads: int, scale: float, **kw):
        super().__init__()
        self.heads, self.scale = heads, scale
        for name, shape in (("attn_weight", (3 * d, d)), ("attn_bias", (3 * d,)), ("attn_proj_weight", (d, d)),
                            ("attn_proj_bias", (d,)), ("fc_weight", (inner, d)), ("fc_bias", (inner,)),
                            ("proj_weight", (d, inner)), ("proj_bias", (d,))):
            self.register_buffer(name, torch.empty(*shape, **kw))

    def split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[..., 3d] -> q, k, v [..., H, hd]."""
        hd = qkv.shape[-1] // (3 * self.heads)
        return tuple(t.unflatten(-1, (self.heads, hd)) for t in qkv.chunk(3, -1))

    def mlp(self, x: torch.Tensor, model: "LNFreeGPT2") -> torch.Tensor:
        """x + MLP(x)."""
        return model.linear(model.linear(x, self.fc_weight, self.fc_bias, gelu=True), self.proj_weight,
                            self.proj_bias, x)


class LNFreeGPT2(nn.Module):
    """GPT-2 without LayerNorm: build it with pyfast.lnfree.fold(model) or LNFreeGPT2.from_pretrained.

    forward(input_ids [B, T], attention_mask=None) -> logits [B, T, vocab]; generate(...) decodes
    with a preallocated KV cache; direct_logit_attribution(...) splits logits by component.
    config: vocab_size, n_positions, n_embd, n_layer, n_head, n_inner, attn_scales (per layer),
    eos_token_id. backend: the linear layers' backend (None: the device's default kernels; "cpu",
    "triton" or "reference" as for pyfast.lnfree.linear_bias_gelu)."""

    def __init__(self, config: dict, *, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.backend: str | None = None
        self.quantized: dict = {}  # id(weight buffer) -> CherryQWeight (quantize_)
        self.config = dict(config)
        c = self.config
        kw = dict(dtype=dtype, device=device)
        d = c["n_embd"]
        # Inference weights: plain tensors (buffers, in the state dict), not Parameters, so every op
        # call takes the registry's eager fast path.
        self.register_buffer("wte", torch.empty(c["vocab_size"], d, **kw))
        self.register_buffer("wpe", torch.empty(c["n_positions"], d, **kw))
        self.blocks = nn.ModuleList(LNFreeBlock(d, c["n_inner"], c["n_head"], s, **kw) for s in c["attn_scales"])
        self.register_buffer("unembed_weight", torch.empty(c["vocab_size"], d, **kw))
        self.register_buffer("unembed_bias", torch.empty(c["vocab_size"], **kw))

    @torch.no_grad()
    def load_folded(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy a full state dict (any float dtype; cast here) into the parameters: every key, every
        shape must match (ValueError naming the first that does not, nothing copied before)."""
        own = dict(self.named_buffers())
        missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        if missing or extra:
            _fail("load", "the LNFreeGPT2 tensors", f"exactly {len(own)} named as state_dict()",
                  f"missing {missing[:3]}, unexpected {extra[:3]}")
        for k, p in own.items():
            if tuple(tensors[k].shape) != tuple(p.shape):
                _fail("load", f"tensor {k!r}", f"shape {list(p.shape)}", f"shape {list(tensors[k].shape)}")
            if not tensors[k].is_floating_point():
                _fail("load", f"tensor {k!r}", "a float tensor", tensors[k].dtype, TypeError)
        for k, p in own.items():
            p.copy_(tensors[k])
        self.quantized = {}  # made from the old values

    def _apply(self, fn, *args, **kwargs):
        self.quantized = {}  # .to / .half / .cuda make new buffers: CherryQ weights of the old ones are dropped
        return super()._apply(fn, *args, **kwargs)

    # ------------------------------------------------------------------ full-sequence forward
    def _embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.wte[ids] + self.wpe[positions]

    @staticmethod
    def _positions(input_ids, attention_mask):
        """Position ids as transformers' generate makes them: count of real tokens before, pads at 1."""
        if attention_mask is None:
            return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)

    def _attend(self, blk: LNFreeBlock, x: torch.Tensor, mask: torch.Tensor | None):
        """Causal self-attention of x [B, T, d] (mask [B, T] of real tokens or None): the heads'
        outputs [B, T, H, hd] and (k, v) [B, H, T, hd]."""
        q, k, v = (t.transpose(1, 2) for t in blk.split_heads(self.linear(x, blk.attn_weight, blk.attn_bias)))
        t = x.shape[1]
        allowed = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        if mask is not None:  # a pad key is never seen; a pad query sees itself only (its row is unused)
            allowed = (allowed & mask.bool()[:, None, None, :]) | torch.eye(t, dtype=torch.bool, device=x.device)
        z = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=blk.scale)
        return z.transpose(1, 2), (k, v)

    def _run(self, input_ids, attention_mask, *, keep_kv=False, parts=None):
        x = self._embed(input_ids, self._positions(input_ids, attention_mask))
        if parts is not None:
            parts.append(("embed", x))
        kvs = []
        for i, blk in enumerate(self.blocks):
            z, kv = self._attend(blk, x, attention_mask)
            if keep_kv:
                kvs.append(kv)
            if parts is not None:  # per head: z_h W_O[:, h]^T; the projection bias on its own
                hd = z.shape[-1]
                w = blk.attn_proj_weight.unflatten(1, (blk.heads, hd))  # [d, H, hd]
                heads = torch.einsum("bthe,dhe->bthd", z, w)
                parts += [(f"blocks.{i}.attn.head{h}", heads[:, :, h]) for h in range(blk.heads)]
                parts.append((f"blocks.{i}.attn.bias", blk.attn_proj_bias.expand_as(x)))
            x = self.linear(z.flatten(2), blk.attn_proj_weight, blk.attn_proj_bias, x)
            before = x
            x = blk.mlp(x, self)
            if parts is not None:
                parts.append((f"blocks.{i}.mlp", x - before))
        return x, kvs

    def check_input_ids(self, fn: str, input_ids, attention_mask=None) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
            _fail(fn, "input_ids", "an int64 tensor [B, T]",
                  getattr(input_ids, "dtype", type(input_ids).__name__), TypeError)
        if input_ids.dim() != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
            _fail(fn, "input_ids", "shape [B, T] with B, T >= 1", f"shape {list(input_ids.shape)}")
        if input_ids.shape[1] > self.config["n_positions"]:
            _fail(fn, "input_ids", f"at most n_positions = {self.config['n_positions']} tokens (the position table)",
                  f"{input_ids.shape[1]} tokens")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config["vocab_size"]:
            _fail(fn, "input_ids", f"token ids in [0, {self.config['vocab_size']})", f"values in [{lo}, {hi}]")
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
                _fail(fn, "attention_mask", f"a tensor of shape {list(input_ids.shape)} (as input_ids)",
                      f"shape {list(getattr(attention_mask, 'shape', []))}")
            if bool(((attention_mask != 0) & (attention_mask != 1)).any()):
                _fail(fn, "attention_mask", "0/1 values", "other values")
            m = attention_mask.long()
            if bool((m.sum(1) == 0).any()) or bool((m[:, 1:] < m[:, :-1]).any()):
                _fail(fn, "attention_mask", "left padding: each row 0...0 1...1 with at least one 1", "another pattern")

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """logits [B, T, vocab] of input_ids [B, T] (attention_mask [B, T]: 1 for real tokens, left padding)."""
        self.check_input_ids("forward", input_ids, attention_mask)
        x, _ = self._run(input_ids, attention_mask)
        return self.unembed(x)

    def linear(self, x, weight, bias, residual=None, *, gelu=False):
        """x @ weight^T + bias, then GELU (gelu) or + residual: the fused ops, or with CherryQ weights
        (quantize_) cherryq_matmul with the epilogue in PyTorch."""
        q = self.quantized.get(id(weight))
        if q is None:
            if gelu:
                return linear_bias_gelu(x, weight, bias, backend=self.backend)
            return linear_bias_residual(x, weight, bias, residual, backend=self.backend)
        from pyfast.cherryq import cherryq_matmul

        y = cherryq_matmul(x, q, bias)
        if gelu:
            return F.gelu(y, approximate="tanh")
        return y if residual is None else y + residual

    @torch.no_grad()
    def quantize_(self, *, bits: int = 3, group_size: int = 128, include_unembed: bool = True) -> "LNFreeGPT2":
        """Quantize every block's linear weights (and the unembedding, unless include_unembed is
        False) with CherryQ (pyfast.cherryq_quantize: `bits`-bit groups of group_size plus fp16
        cherries per row); the linear layers then run cherryq_matmul. The float weights stay (for
        direct_logit_attribution and save_pretrained); calling it again re-quantizes; moving or
        casting the model (.to, .half, ...) or load_folded drops the quantized weights (they were
        made from the old tensors)."""
        from pyfast.cherryq import cherryq_quantize

        check_int(f"{OP}.quantize_", "bits", bits, minimum=1)
        check_int(f"{OP}.quantize_", "group_size", group_size, minimum=1)
        weights = [w for blk in self.blocks for w in (blk.attn_weight, blk.attn_proj_weight, blk.fc_weight,
                                                       blk.proj_weight)]
        if include_unembed:
            weights.append(self.unembed_weight)
        for w in weights:
            if w.shape[1] % group_size:
                _fail("quantize_", "group_size", f"dividing every in_features (here {w.shape[1]})", group_size)
        self.quantized = {id(w): cherryq_quantize(w.float(), bits=bits, group_size=group_size) for w in weights}
        return self

    def unembed(self, x):
        return self.linear(x, self.unembed_weight, self.unembed_bias)

    @torch.no_grad()
    def direct_logit_attribution(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                                 position: int = -1) -> tuple[torch.Tensor, list[str]]:
        """The logits at `position` split into the residual stream's parts: (contributions
        [B, C, vocab], names [C]) with the components "embed" (token + position embedding), per block
        "blocks.{i}.attn.head{h}" for every head, "blocks.{i}.attn.bias" (the output projection's
        bias) and "blocks.{i}.mlp", and "unembed.bias". contributions.sum(1) equals the logits at
        `position` (no LayerNorm: the unembedding is linear in the residual stream).

        Example:
            >>> contrib, names = lnfree.direct_logit_attribution(ids)
            >>> torch.testing.assert_close(contrib.sum(1), lnfree(ids)[:, -1], rtol=1e-4, atol=1e-4)
        """
        self.check_input_ids("direct_logit_attribution", input_ids, attention_mask)
        if self.quantized:
            _fail("direct_logit_attribution", "the model", "with float weights (the attribution is exact for those; "
                  "call it on an unquantized LNFreeGPT2)", "CherryQ weights (quantize_)")
        t = input_ids.shape[1]
        if isinstance(position, bool) or not isinstance(position, int) or not -t <= position < t:
            _fail("direct_logit_attribution", "position", f"an int in [-{t}, {t})", repr(position))
        parts: list = []
        self._run(input_ids, attention_mask, parts=parts)
        names = [n for n, _ in parts] + ["unembed.bias"]
        resid = torch.stack([p[:, position] for _, p in parts], 1)  # [B, C, d]
        contrib = resid @ self.unembed_weight.T
        bias = self.unembed_bias.expand(contrib.shape[0], 1, -1)
        return torch.cat([contrib, bias], 1), names

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, attention_mask: torch.Tensor | None = None,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | None = None, eos_token_id=FROM_CONFIG, pad_token_id: int | None = None,
                 quantize: dict | None = None, sparse: dict | None = None, progress=None) -> torch.Tensor:
        """Decode up to max_new_tokens after the prompts input_ids [B, T] (left-padded when
        attention_mask [B, T] is given) -> [B, T + n] (input_ids, then the new tokens; a row that
        produced eos_token_id is filled with pad_token_id after it, as transformers does; n <
        max_new_tokens when every row has stopped). eos_token_id: default the config's; None never
        stops. pad_token_id: default the EOS.

        Greedy by default; do_sample=True samples with temperature, then top_k (0: off), then top_p
        (1: off), from a generator seeded with `seed`. The prompt runs as one batch (prefill), then
        each step is one token per row through a KV cache allocated once for T + max_new_tokens
        (append_kv, decode_attention). quantize: CherryQ weights first (the keyword arguments of
        quantize_, e.g. dict(bits=3); kept for later calls). sparse: Kinetics block top-k decoding
        instead of dense (the keyword arguments of pyfast.sparse_decode_attention but block_size,
        which is the cache's, 16: topk, sink_blocks, local_blocks). progress: called as
        progress(step, n) after each token.

        Example:
            >>> out = lnfree.generate(ids, 32)                        # greedy, [1, T + 32]
            >>> out = lnfree.generate(ids, 32, do_sample=True, top_p=0.9, seed=0)
        """
        from pyfast.lnfree.generate import Generator

        gen = Generator(self, input_ids, max_new_tokens, attention_mask=attention_mask, do_sample=do_sample,
                        temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, eos_token_id=eos_token_id,
                        pad_token_id=pad_token_id, sparse=sparse)  # every check before anything changes
        if quantize is not None:
            if not isinstance(quantize, dict):
                _fail("generate", "quantize", "None or a dict of quantize_ arguments", repr(quantize), TypeError)
            self.quantize_(**quantize)
        return gen.run(progress)

    # ------------------------------------------------------------------ files
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write config.json (with "pyfast_lnfree": 1) and model.safetensors (the folded weights)."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()},
                  os.path.join(directory, WEIGHTS_FILE))
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump({CONFIG_FLAG: 1, **self.config, "torch_dtype": str(self.wte.dtype).removeprefix("torch.")},
                      f, indent=1)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, dtype: torch.dtype | None = None,
                        device=None) -> "LNFreeGPT2":
        """Read a local directory: one written by save_pretrained, or a transformers GPT-2 checkpoint
        in the released LN-free encoding (LayerNorm eps >= 1e10, weight = gamma * sqrt(eps) / sigma;
        folded here in float64). Safetensors only. A checkpoint with real LayerNorms (eps 1e-5), or
        tensors missing or of the wrong shape, raise ValueError naming what is wrong; nothing is
        half-loaded (the model is built only once every tensor is read and checked).

        Example:
            >>> lnfree = LNFreeGPT2.from_pretrained("gpt2-small-lnfree/")
        """
        from pyfast.lnfree.checkpoint import load_directory

        config, tensors, file_dtype = load_directory(directory)
        model = cls(config, dtype=dtype or file_dtype, device=device)
        model.load_folded(tensors)
        return model


def sample_next(logits: torch.Tensor, *, do_sample: bool, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row of logits [B, V] (fp32): argmax, or a sample after temperature, top-k and
    top-p filtering (transformers' order)."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), -1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum <= 1 - top_p
        drop_sorted[..., -1] = False  # the most likely token always stays
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), -math.inf)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _check_sampling(do_sample, temperature, top_k, top_p, seed) -> None:
    if not isinstance(do_sample, bool):
        _fail("generate", "do_sample", "a bool", repr(do_sample), TypeError)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and temperature > 0):
        _fail("generate", "temperature", "a finite float > 0", repr(temperature))
    check_int(f"{OP}.generate", "top_k", top_k, minimum=0)
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        _fail("generate", "top_p", "a float in (0, 1] (1: off)", repr(top_p))
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        _fail("generate", "seed", "None or an int", repr(seed), TypeError)


__all__: Sequence[str] = ("LNFreeGPT2", "sample_next")
