"""TransformerLens as a second, independent oracle of the fold: its own LayerNorm folding (the
HookedTransformer processing: gamma into the reading weights, beta into their biases, centred
weights and unembedding), with every LN's per-token scale replaced through its `hook_scale` hook by
our fixed sigma, which is how the LN-removal paper's authors ran FakeLN. Its log-probabilities must
equal LNFreeGPT2's. transformer-lens is pinned in the `eval` extra (4.x: TransformerBridge; 4.0
removed HookedTransformer), so CI runs this test; it reads the model from a local directory."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from pyfast import lnfree

from lnfree_cases import prompts, tiny_gpt2

pytest.importorskip("transformer_lens", reason="the TransformerLens oracle needs pip install transformer-lens==4.3.0")


def _tl_hook(hf_name: str) -> str:
    """transformers' LN module name -> TransformerLens' scale hook name."""
    if hf_name == "transformer.ln_f":
        return "ln_final.hook_scale"
    layer, which = re.fullmatch(r"transformer\.h\.(\d+)\.ln_([12])", hf_name).groups()
    return f"blocks.{layer}.ln{which}.hook_scale"


def _close_log_probs(a: torch.Tensor, b: torch.Tensor) -> float:
    # TransformerLens centres the unembedding: logits shift by a per-position constant, so compare
    # log-probabilities (the shift cancels) relative to their largest magnitude.
    a, b = a.double().log_softmax(-1), b.double().log_softmax(-1)
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("seed", [0, 3])
def test_fold_equals_transformer_lens_with_fixed_scales(tmp_path, seed):
    from transformer_lens.model_bridge import TransformerBridge

    model = tiny_gpt2(seed, layers=3)
    scales = lnfree.estimate_ln_scales(model, [prompts(4, 16, seed + 7)])
    model.save_pretrained(tmp_path)
    bridge = TransformerBridge.boot_transformers(str(tmp_path), tokenizer=None)
    bridge.enable_compatibility_mode(disable_warnings=True)  # fold_ln, centred writing weights / unembedding
    fixed = [(_tl_hook(n), lambda scale, hook, s=s: torch.full_like(scale, s)) for n, s in scales.items()]
    assert len({h for h, _ in fixed}) == len(scales) == 3 * 2 + 1

    ids = prompts(3, 14, seed + 1)
    with torch.no_grad():
        oracle = bridge.run_with_hooks(ids, return_type="logits", fwd_hooks=fixed)
        with_ln = bridge(ids, return_type="logits")
        folded = lnfree.fold(lnfree.fake_layernorm(copy.deepcopy(model), scales))(ids)
    assert torch.isfinite(folded).all()
    assert _close_log_probs(folded, oracle) < 1e-5
    # The hooks took effect (the real LNs give other numbers), so the comparison above can fail.
    assert _close_log_probs(with_ln, oracle) > 1e-2
