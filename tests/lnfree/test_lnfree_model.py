"""The LN-free path on tiny random GPT-2s: FakeLN and its scales, the exact fold (logits equal the
FakeLN model's), LNFreeGPT2.generate against transformers' generate of the FakeLN model (greedy,
batch 1 and a left-padded batch), sampling, EOS, direct logit attribution, files (save /
from_pretrained, the released LN-free encoding), the removal fine-tune schedule, and bad input."""

import json
import os

import pytest
import torch

from lnfree_cases import EOS, VOCAB, fake_gpt2, left_padded, prompts, tiny_gpt2
from pyfast import lnfree
from pyfast.lnfree import FakeLayerNorm, LNFreeGPT2
from pyfast.testing import assert_close


def test_scales_are_the_mean_token_std():
    model = tiny_gpt2()
    ids = prompts(3, 10)
    seen = {}
    h = model.transformer.h[1].ln_2.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].detach()))
    scales = lnfree.estimate_ln_scales(model, [ids])
    h.remove()
    x = seen["x"].double()
    expect = (x.var(-1, unbiased=False) + model.config.layer_norm_epsilon).sqrt().mean().item()
    assert scales["transformer.h.1.ln_2"] == pytest.approx(expect, rel=1e-9)
    assert set(scales) == {n for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    # a mask excludes its tokens: the mean over the real ones only
    ids2, mask = left_padded(ids, [4, 0, 2])
    seen.clear()
    h = model.transformer.ln_f.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].detach()))
    masked = lnfree.estimate_ln_scales(model, [{"input_ids": ids2, "attention_mask": mask}])
    h.remove()
    std = (seen["x"].double().var(-1, unbiased=False) + model.config.layer_norm_epsilon).sqrt()
    assert masked["transformer.ln_f"] == pytest.approx(std[mask.bool()].mean().item(), rel=1e-9)
    assert masked["transformer.ln_f"] != pytest.approx(std.mean().item(), rel=1e-6)
    with pytest.raises(ValueError, match="attention_mask"):
        lnfree.estimate_ln_scales(model, [{"input_ids": ids2, "attention_mask": mask[:, 1:]}])
    with pytest.raises(ValueError, match="no left padding with separate_first"):
        lnfree.estimate_ln_scales(model, [{"input_ids": ids2, "attention_mask": mask}], separate_first=True)


def test_fake_layernorm_keeps_parameters_and_is_ln_at_sigma():
    model = tiny_gpt2()
    ln = model.transformer.h[0].ln_1
    w = ln.weight
    lnfree.fake_layernorm(model, {"transformer.h.0.ln_1": 2.5})
    fake = model.transformer.h[0].ln_1
    assert isinstance(fake, FakeLayerNorm) and fake.weight is w
    x = torch.randn(3, 48)
    assert_close(fake(x), (x - x.mean(-1, keepdim=True)) / 2.5 * w + ln.bias, 1e-6)


@pytest.mark.parametrize("inverse_layer_scale", [False, True])
def test_fold_logits_equal_fakeln(inverse_layer_scale):
    model = fake_gpt2(inverse_layer_scale=inverse_layer_scale)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = prompts(3, 20)
    ref = model(ids).logits
    folded = lnfree.fold(model)
    assert not any(isinstance(m, (torch.nn.LayerNorm, FakeLayerNorm)) for m in folded.modules())
    assert_close(folded(ids), ref, 1e-5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is unchanged
    # float64: each folded reader equals FakeLN followed by the original layer to float64 rounding
    model64 = model.double()
    folded64 = lnfree.fold(model64, dtype=torch.float64)
    x = torch.randn(5, 48, dtype=torch.float64) * 3 + 1
    blk, h = folded64.blocks[1], model64.transformer.h[1]
    for ln, conv, (w, b) in ((h.ln_1, h.attn.c_attn, (blk.attn_weight, blk.attn_bias)),
                             (h.ln_2, h.mlp.c_fc, (blk.fc_weight, blk.fc_bias)),
                             (model64.transformer.ln_f, model64.lm_head, (folded64.unembed_weight, folded64.unembed_bias))):
        assert_close(torch.nn.functional.linear(x, w, b), conv(ln(x)), 1e-12)


def test_generate_greedy_equals_transformers():
    model = fake_gpt2()
    folded = lnfree.fold(model)
    ids = prompts(1, 12)
    hf = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=EOS, eos_token_id=None)
    out = folded.generate(ids, 24, eos_token_id=None)
    assert len(set(out[0, 12:].tolist())) > 3, "the tiny model should not just repeat one token"
    assert torch.equal(out, hf)
    # a left-padded batch, rows of different lengths
    ids, mask = left_padded(prompts(3, 12, seed=3), [0, 5, 9])
    hf = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=EOS,
                        eos_token_id=None)
    assert torch.equal(folded.generate(ids, 16, attention_mask=mask, eos_token_id=None), hf)


def test_generate_eos_and_sampling():
    folded = lnfree.fold(fake_gpt2())
    ids = prompts(2, 8)
    greedy = folded.generate(ids, 12, eos_token_id=None)
    # stop on EOS: declare the token row 0 produces at step 3 the EOS
    eos = int(greedy[0, 8 + 3])
    out = folded.generate(ids, 12, eos_token_id=eos)
    assert torch.equal(out[0, :12], greedy[0, :12])
    row1 = greedy[1, 8:].tolist()
    if eos not in row1:  # row 1 never stops: the run lasts all 12 steps, row 0 padded after its EOS
        assert out.shape[1] == 20 and (out[0, 12:] == eos).all()
    # sampling: reproducible with a seed, top_k=1 is greedy
    a = folded.generate(ids, 10, do_sample=True, temperature=0.8, top_p=0.9, seed=3, eos_token_id=None)
    b = folded.generate(ids, 10, do_sample=True, temperature=0.8, top_p=0.9, seed=3, eos_token_id=None)
    assert torch.equal(a, b)
    assert torch.equal(folded.generate(ids, 10, do_sample=True, top_k=1, seed=0, eos_token_id=None),
                       greedy[:, :18])
    assert torch.equal(folded.generate(ids, 0), ids)
    # eos_token_id: the config's by default, None never stops
    folded.config["eos_token_id"] = eos
    assert torch.equal(folded.generate(ids, 12), out)
    assert torch.equal(folded.generate(ids, 12, eos_token_id=None), greedy)


def test_sample_next_filters():
    """top-k keeps the k largest, top-p the smallest set whose probability reaches p (the most
    likely token always), temperature scales before both (transformers' order)."""
    from pyfast.lnfree.model import sample_next

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(4000, 4)
    g = torch.Generator().manual_seed(0)

    def draws(**kw):
        return torch.bincount(sample_next(logits, do_sample=True, generator=g, **{**dict(temperature=1.0, top_k=0,
                                                                                        top_p=1.0), **kw}), minlength=4)
    assert draws(top_p=0.5).tolist() == [4000, 0, 0, 0]  # 0.5 alone reaches p
    counts = draws(top_p=0.8)  # {0.5, 0.3}: renormalized 0.625 / 0.375
    assert counts[2:].sum() == 0 and abs(counts[0] / 4000 - 0.625) < 0.03
    counts = draws(top_k=3)
    assert counts[3] == 0 and abs(counts[2] / 4000 - 0.15 / 0.95) < 0.03
    assert draws(temperature=1e-4).tolist() == [4000, 0, 0, 0]
    assert sample_next(logits[:2], do_sample=False, temperature=1.0, top_k=0, top_p=1.0, generator=None).tolist() == [0, 0]


def test_direct_logit_attribution_sums_to_logits():
    folded = lnfree.fold(fake_gpt2(layers=3))
    ids, mask = left_padded(prompts(2, 10), [0, 3])
    contrib, names = folded.direct_logit_attribution(ids, mask, position=-1)
    assert len(names) == contrib.shape[1] == 1 + 3 * (4 + 2) + 1
    assert names[0] == "embed" and names[1] == "blocks.0.attn.head0" and names[-1] == "unembed.bias"
    assert_close(contrib.sum(1), folded(ids, mask)[:, -1], 1e-5)
    contrib5, _ = folded.direct_logit_attribution(ids, position=5)
    assert_close(contrib5.sum(1), folded(ids)[:, 5], 1e-5)


def test_save_and_from_pretrained_roundtrip(tmp_path):
    folded = lnfree.fold(fake_gpt2())
    folded.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = LNFreeGPT2.from_pretrained(tmp_path)
    ids = prompts(2, 9)
    assert torch.equal(loaded(ids), folded(ids))


def _write_released_encoding(model, directory, eps=1e12):
    """A transformers GPT-2 directory in the released LN-free encoding: each FakeLN (gamma, beta,
    sigma) stored as a real LayerNorm with weight gamma * sqrt(eps) / sigma, eps = 1e12."""
    import transformers

    cfg = transformers.GPT2Config(**{**model.config.to_dict(), "layer_norm_epsilon": eps})
    out = transformers.GPT2LMHeadModel(cfg)
    sd = {}
    for name, m in model.named_modules():
        if isinstance(m, FakeLayerNorm):
            sd[name + ".weight"] = m.weight.detach().double() * eps ** 0.5 / m.sigma
            sd[name + ".bias"] = m.bias.detach()
    full = {k: v for k, v in model.state_dict().items() if not k.endswith("sigma")}
    full.update({k: v.float() for k, v in sd.items()})
    out.load_state_dict(full, strict=False)
    out.save_pretrained(directory)
    return out


def test_released_encoding_checkpoint(tmp_path):
    model = fake_gpt2()
    encoded = _write_released_encoding(model, tmp_path)
    assert any(f.endswith(".safetensors") for f in os.listdir(tmp_path))
    ids = prompts(2, 14)
    ref = model(ids).logits
    assert_close(encoded.eval()(ids).logits, ref, 1e-5)  # the encoding itself (transformers, fp32 LN)
    loaded = LNFreeGPT2.from_pretrained(tmp_path)
    assert_close(loaded(ids), ref, 1e-5)
    assert torch.equal(loaded.generate(ids, 8, eos_token_id=None),
                       model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=EOS, eos_token_id=None))


def test_released_encoding_with_an_untied_head(tmp_path):
    import transformers

    model = fake_gpt2()
    encoded = _write_released_encoding(model, tmp_path / "tied")
    cfg = transformers.GPT2Config(**{**encoded.config.to_dict(), "tie_word_embeddings": False})
    untied = transformers.GPT2LMHeadModel(cfg).eval()
    untied.load_state_dict(encoded.state_dict(), strict=False)
    with torch.no_grad():
        untied.lm_head.weight.normal_()
    untied.save_pretrained(tmp_path / "untied")
    ids = prompts(2, 9)
    assert_close(LNFreeGPT2.from_pretrained(tmp_path / "untied")(ids), untied(ids).logits, 1e-5)


def test_from_pretrained_rejects_what_it_cannot_read(tmp_path):
    real = tiny_gpt2()
    real.save_pretrained(tmp_path / "real")
    with pytest.raises(ValueError, match="layer_norm_epsilon = 1e-05"):
        LNFreeGPT2.from_pretrained(tmp_path / "real")
    with pytest.raises(ValueError, match="config.json"):
        LNFreeGPT2.from_pretrained(tmp_path / "nothing")
    model = fake_gpt2()
    _write_released_encoding(model, tmp_path / "enc")
    # a wrong shape in config.json
    cfg = json.loads((tmp_path / "enc" / "config.json").read_text())
    (tmp_path / "enc" / "config.json").write_text(json.dumps({**cfg, "n_inner": 100}))
    with pytest.raises(ValueError, match=r"shape \[48, 100\]"):
        LNFreeGPT2.from_pretrained(tmp_path / "enc")
    (tmp_path / "enc" / "config.json").write_text(json.dumps(cfg))
    # a truncated (tampered) weights file
    f = next(p for p in (tmp_path / "enc").iterdir() if p.suffix == ".safetensors")
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match="readable safetensors"):
        LNFreeGPT2.from_pretrained(tmp_path / "enc")
    # a save_pretrained directory whose config cannot describe the model
    lnfree.fold(model).save_pretrained(tmp_path / "native")
    cfg = json.loads((tmp_path / "native" / "config.json").read_text())
    (tmp_path / "native" / "config.json").write_text(json.dumps({**cfg, "n_head": 5}))
    with pytest.raises(ValueError, match="n_embd"):
        LNFreeGPT2.from_pretrained(tmp_path / "native")
    # pickle only: never read
    f.unlink()
    torch.save({}, tmp_path / "enc" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle checkpoints are never read"):
        LNFreeGPT2.from_pretrained(tmp_path / "enc")


def test_removal_schedule_trains_and_folds():
    model = tiny_gpt2()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    calib = [prompts(4, 16, seed=9)]
    sched = lnfree.LNRemovalSchedule(model, calib, switch_steps=(0, 2, 4))
    switched = []
    for step in range(6):
        switched += sched.step(step)
        ids = prompts(4, 16, seed=100 + step)
        loss = model(ids, labels=ids).loss
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert switched == ["ln_2", "ln_1", "ln_f"] and sched.done
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in model.modules())
    # sigma of ln_1 was estimated at its switch (step 2) with ln_2 already fake and 2 updates in
    assert set(sched.switched["ln_1"]) == {"transformer.h.0.ln_1", "transformer.h.1.ln_1"}
    model.eval()
    ids = prompts(2, 10)
    assert_close(lnfree.fold(model)(ids), model(ids).logits, 1e-5)


def test_bad_input():
    model = fake_gpt2()
    folded = lnfree.fold(model)
    ids = prompts(1, 10)
    with pytest.raises(ValueError, match="prompt length \\+ max_new_tokens"):
        folded.generate(ids, 60)
    with pytest.raises(ValueError, match="at most n_positions"):
        folded(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids in"):
        folded(ids + VOCAB)
    with pytest.raises(TypeError, match="input_ids"):
        folded(ids.float())
    for kw, match in ((dict(temperature=0.0), "temperature"), (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k")):
        with pytest.raises(ValueError, match=match):
            folded.generate(ids, 4, do_sample=True, **kw)
    with pytest.raises(ValueError, match="0/1 values"):
        folded(ids, torch.full(ids.shape, 0.5).index_fill(1, torch.tensor([9]), 1.0))
    mask = torch.ones_like(ids)
    mask[0, -1] = 0  # right padding
    with pytest.raises(ValueError, match="left padding"):
        folded.generate(ids, 4, attention_mask=mask)
    with pytest.raises(ValueError, match="FakeLayerNorm"):
        lnfree.fold(tiny_gpt2())  # real LayerNorms left
    with pytest.raises(ValueError, match="model_type"):
        lnfree.fold(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="finite positive"):
        lnfree.fake_layernorm(tiny_gpt2(), {"transformer.ln_f": 0.0})
    with pytest.raises(ValueError, match="nn.LayerNorm / RMSNorm modules"):
        lnfree.fake_layernorm(tiny_gpt2(), {"transformer.h.0.attn": 1.0})
    with pytest.raises(ValueError, match="switch_steps"):
        lnfree.LNRemovalSchedule(tiny_gpt2(), [ids], switch_steps=(3, 1, 5))


def test_generate_with_cherryq_and_sparse():
    """quantize= runs the linear layers on CherryQ weights (the float logits change a little);
    sparse= with a top-k covering every block equals dense decoding."""
    folded = lnfree.fold(fake_gpt2(d=128, heads=4))
    ids = prompts(2, 40)
    dense = folded.generate(ids, 10, eos_token_id=None)
    assert torch.equal(folded.generate(ids, 10, eos_token_id=None, sparse=dict(topk=64, local_blocks=1)), dense)
    q = lnfree.fold(fake_gpt2(d=128, heads=4))
    out = q.generate(ids, 10, eos_token_id=None, quantize=dict(bits=4, group_size=64))
    assert out.shape == dense.shape and len(q.quantized) == 2 * 4 + 1
    x = torch.randn(3, 128)
    quantized, exact = q.unembed(x), torch.nn.functional.linear(x, q.unembed_weight, q.unembed_bias)
    assert 0 < ((quantized - exact).norm() / exact.norm()).item() < 0.1  # 4-bit weights: close, not equal
    with pytest.raises(ValueError, match="sparse"):
        folded.generate(ids, 2, sparse=dict(block_size=32))
    with pytest.raises(ValueError, match=r"sparse\['topk'\]"):
        folded.generate(ids, 2, sparse=dict(topk=-1))
    with pytest.raises(ValueError, match="CherryQ weights"):
        q.direct_logit_attribution(ids)
    q.float()  # moving / casting drops the CherryQ weights (they belong to the old tensors)
    assert not q.quantized
    with pytest.raises(ValueError, match="prompt length"):  # a refused call quantizes nothing
        q.generate(ids, 1000, quantize=dict(bits=4, group_size=64))
    assert not q.quantized
    with pytest.raises(ValueError, match="group_size"):
        q.quantize_(group_size=0)


def test_separate_first_position_sigma():
    """estimate_ln_scales(separate_first=True): sigma0 from position 0, sigma from the rest; the fake
    divides row 0 of a multi-token input by sigma0 and every other row (and single-token inputs)
    by sigma; fold refuses it (one weight per position cannot hold two scales)."""
    model = tiny_gpt2()
    ids = prompts(3, 10)
    seen = {}
    h = model.transformer.h[0].ln_2.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].detach()))
    scales = lnfree.estimate_ln_scales(model, [ids], separate_first=True)
    h.remove()
    std = (seen["x"].double().var(-1, unbiased=False) + 1e-5).sqrt()
    sigma, sigma0 = scales["transformer.h.0.ln_2"]
    assert sigma == pytest.approx(std[:, 1:].mean().item(), rel=1e-9)
    assert sigma0 == pytest.approx(std[:, 0].mean().item(), rel=1e-9)
    lnfree.fake_layernorm(model, scales)
    fake = model.transformer.h[0].ln_2
    x = torch.randn(2, 4, 48)
    c = x - x.mean(-1, keepdim=True)
    out = fake(x)
    assert_close(out[:, 0], c[:, 0] / sigma0 * fake.weight + fake.bias, 1e-6)
    assert_close(out[:, 1:], c[:, 1:] / sigma * fake.weight + fake.bias, 1e-6)
    assert_close(fake(x[:, :1]), c[:, :1] / sigma * fake.weight + fake.bias, 1e-6)  # a decode step
    with pytest.raises(ValueError, match="sigma0"):
        lnfree.fold(model)
    with pytest.raises(ValueError, match=r"scales\['transformer.ln_f'\]\[1\]"):
        lnfree.fake_layernorm(tiny_gpt2(), {"transformer.ln_f": (1.0, -2.0)})
