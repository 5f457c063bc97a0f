"""The RMSNorm (Llama family) side of pyfast.lnfree on a tiny random Llama with GQA: sigma is the
mean per-token RMS, FakeRMSNorm is x / sigma * gamma (equal to the RMSNorm on a token whose RMS is
sigma), and the removal schedule (LLAMA_GROUPS) trains and leaves no RMSNorm."""

import pytest
import torch
import transformers

from pyfast import lnfree
from pyfast.lnfree import FakeRMSNorm
from pyfast.testing import assert_close


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__.endswith("RMSNorm"):
                m.weight.uniform_(0.5, 2.0)
    return model


def test_rms_scales_and_fake_rmsnorm():
    model = tiny_llama()
    ids = torch.randint(0, 101, (3, 12))
    seen = {}
    norm = model.model.layers[1].post_attention_layernorm
    h = norm.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].detach()))
    scales = lnfree.estimate_ln_scales(model, [ids])
    h.remove()
    assert len(scales) == 2 * 2 + 1
    x = seen["x"].double()
    expect = (x.pow(2).mean(-1) + norm.variance_epsilon).sqrt().mean().item()
    assert scales["model.layers.1.post_attention_layernorm"] == pytest.approx(expect, rel=1e-9)
    lnfree.fake_layernorm(model, scales)
    fake = model.model.layers[1].post_attention_layernorm
    assert isinstance(fake, FakeRMSNorm) and fake.weight is norm.weight
    sigma = scales["model.layers.1.post_attention_layernorm"]
    t = torch.randn(5, 64, dtype=torch.float64)
    t = t / t.pow(2).mean(-1, keepdim=True).sqrt() * (sigma ** 2 - norm.variance_epsilon) ** 0.5
    assert_close(fake(t.float()), norm(t.float()), 1e-5)  # a token with sqrt(mean(x^2) + eps) = sigma: the same
    assert not any(type(m).__name__ == "LlamaRMSNorm" for m in model.modules())
    assert torch.isfinite(model(ids).logits).all()


def test_llama_removal_schedule():
    model = tiny_llama()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = lnfree.LNRemovalSchedule(model, [torch.randint(0, 101, (2, 16))], switch_steps=(0, 1, 2),
                                     groups=lnfree.LLAMA_GROUPS)
    for step in range(4):
        sched.step(step)
        ids = torch.randint(0, 101, (2, 16))
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        assert torch.isfinite(loss)
    assert sched.done and sum(isinstance(m, FakeRMSNorm) for m in model.modules()) == 5
