"""Tiny GPT-2s for the LN-free tests: random weights (no model hub), LayerNorm parameters far from
(1, 0) so a fold that ignored them would show, and sizes that give varied greedy continuations."""

from __future__ import annotations

import torch
import transformers

from pyfast import lnfree

VOCAB, EOS = 97, 5


def tiny_gpt2(seed: int = 0, *, layers: int = 2, d: int = 48, heads: int = 4, positions: int = 64,
              inverse_layer_scale: bool = False) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=positions, n_embd=d, n_layer=layers, n_head=heads,
                                  eos_token_id=EOS, bos_token_id=EOS, initializer_range=0.2,
                                  scale_attn_by_inverse_layer_idx=inverse_layer_scale)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 2.0)
                m.bias.normal_(0, 0.3)
    return model


def prompts(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=g)
    return ids.masked_fill(ids == EOS, EOS + 1)  # no EOS inside a prompt


def fake_gpt2(seed: int = 0, **kw) -> transformers.GPT2LMHeadModel:
    """tiny_gpt2 with every LayerNorm switched to FakeLN (sigma estimated on random prompts)."""
    model = tiny_gpt2(seed, **kw)
    lnfree.fake_layernorm(model, lnfree.estimate_ln_scales(model, [prompts(4, 16, seed + 7)]))
    return model


def left_padded(ids: torch.Tensor, pads: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """ids with the first pads[b] tokens of row b replaced by padding (EOS), and the mask."""
    ids = ids.clone()
    mask = torch.ones_like(ids)
    for b, n in enumerate(pads):
        ids[b, :n], mask[b, :n] = EOS, 0
    return ids, mask
