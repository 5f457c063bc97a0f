"""Hedgehog attention inside transformers models: tiny randomly initialised Llama (GQA: 4 query
heads, 2 KV heads) and BERT (non-causal), built offline from configs. convert() runs exactly the
spec's Hedgehog attention on the model's q, k, v; softmax_attention / unconvert give back the
original logits bit for bit; padding is dropped; distill() trains only the feature maps; greedy
generation through the HedgehogStateCache (recurrent state, constant memory) reproduces the
converted model's own full-sequence predictions.

Models are converted with backend="reference" (the float64 spec): the CPU kernels of the
Hedgehog ops are written elsewhere; switch BACKEND to None once they are in."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import pyfast  # noqa: E402
from pyfast.hedgehog import model as hh_model  # noqa: E402
from pyfast.hedgehog import (  # noqa: E402
    HedgehogStateCache,
    convert,
    distill,
    hedgehog_modules,
    softmax_attention,
    unconvert,
)
from pyfast.reference import hedgehog as ref  # noqa: E402
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402

BACKEND = None
VOCAB, F_DIM = 64, 8


def _llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=16, intermediate_size=128, pad_token_id=0)
    return _peaked(transformers.LlamaForCausalLM(cfg))


def _bert(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    return _peaked(transformers.BertForMaskedLM(cfg))


def _peaked(model):
    """HF's init (std 0.02) makes attention almost uniform and logits almost flat; larger weights
    make attention peaked and greedy tokens well separated, so the checks below are real."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model.eval()


def _randomize_feature_maps(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for hh in hedgehog_modules(model):
            for p in hh.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _ids(b=1, t=10, seed=2):
    return torch.randint(1, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def _gen(model, ids, n, cache=None, **kw):
    extra = {} if cache is None else {hh_model.CACHE_KWARG: cache}
    return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0, **extra, **kw)


# An attention function that runs the spec directly on the q, k, v the model hands it: the
# converted model must compute exactly this.
def _spec_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    assert attention_mask is None  # no padding: transformers skips the mask
    hh = module.hedgehog
    if hh.feature_map != "hedgehog":  # the baselines: linear attention of their features, written out
        phi = [_fixed_phi64(hh.feature_map, x, m.weight, m.bias) for x, m in ((query, hh.q_map), (key, hh.k_map))]
        out = ref.linear_attention(*phi, value.double(), causal=module.is_causal, eps=hh.eps).to(value.dtype)
        return out.transpose(1, 2), None
    out = ref.hedgehog_attention(query, key, value, hh.q_map.weight, hh.k_map.weight, hh.q_map.bias, hh.k_map.bias,
                                 causal=module.is_causal, eps=hh.eps, window=hh.window, alpha=hh.alpha, beta=hh.beta,
                                 scale=scaling)
    return out.transpose(1, 2), None


def _fixed_phi64(kind, x, weight, bias):
    u = torch.einsum("bhtd,hdf->bhtf", x.double(), weight.double()) + bias.double()[None, :, None, :]
    return torch.nn.functional.elu(u) + 1 if kind == "elu" else u.clamp_min(0)


ALL_ATTENTION_FUNCTIONS.register("test_hedgehog_spec", _spec_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register("test_hedgehog_spec", sdpa_mask)


def _spec_logits(model, *args, **kwargs):
    with hh_model._attention_implementation(model, "test_hedgehog_spec"), torch.no_grad():
        return model(*args, **kwargs).logits


# ----------------------------------------------------------------------------- convert


def test_convert_attaches_feature_maps_and_freezes_the_rest():
    model = _llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert convert(model, feature_dim=F_DIM, backend=BACKEND) is model
    assert model.config._attn_implementation == hh_model.ATTN_IMPLEMENTATION
    mods = hedgehog_modules(model)
    assert len(mods) == 2
    for hh in mods:
        assert (hh.num_heads, hh.num_kv_heads, hh.head_dim, hh.feature_dim) == (4, 2, 16, F_DIM)
        assert hh.q_map.weight.shape == (4, 16, F_DIM) and hh.k_map.weight.shape == (2, 16, F_DIM)
        assert hh.backend == BACKEND and hh.window == 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if ".hedgehog." in n}
    assert len(trainable) == 2 * 4  # per layer: q_map / k_map weight and bias
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    with pytest.raises(ValueError, match="already converted"):
        convert(model)
    with pytest.raises(ValueError, match="no supported self-attention"):
        convert(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="causal"):
        convert(_bert(), window=2)
    with pytest.raises(ValueError, match="not converted"):
        HedgehogStateCache(_llama())


@pytest.mark.parametrize("window", [0, 3], ids=["linear", "window3"])
def test_converted_llama_runs_the_spec_on_the_models_qkv(window):
    model = convert(_llama(), feature_dim=F_DIM, window=window, backend=BACKEND)
    _randomize_feature_maps(model)
    ids = _ids(2, 11)
    with torch.no_grad():
        got = model(ids).logits
    want = _spec_logits(model, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with softmax_attention(model), torch.no_grad():
        soft = model(ids).logits
    assert (got - soft).abs().max() > 1e-2  # the conversion changed the attention


def test_softmax_context_and_unconvert_restore_the_exact_logits():
    model = _llama()
    model.lm_head.weight.requires_grad_(False)  # a flag convert() must restore as it was
    ids = _ids(2, 9)
    with torch.no_grad():
        original = model(ids).logits
    convert(model, feature_dim=F_DIM, backend=BACKEND)
    _randomize_feature_maps(model)
    with softmax_attention(model), torch.no_grad():
        assert model.config._attn_implementation == "sdpa"
        assert torch.equal(model(ids).logits, original)
    assert model.config._attn_implementation == hh_model.ATTN_IMPLEMENTATION
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, original, atol=1e-3)
    unconvert(model)
    assert model.config._attn_implementation == "sdpa" and not hedgehog_modules(model)
    assert not any(".hedgehog." in n for n, _ in model.named_parameters())
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == {"lm_head.weight"}
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original)
    with pytest.raises(ValueError, match="not converted"):
        unconvert(model)


def test_left_padding_is_dropped():
    model = convert(_llama(), feature_dim=F_DIM, backend=BACKEND)
    _randomize_feature_maps(model)
    ids, mask = _ids(2, 10), torch.ones(2, 10, dtype=torch.long)
    ids[1, :3], mask[1, :3] = 0, 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        padded = model(ids, attention_mask=mask, position_ids=pos).logits
        alone = [model(ids[:1]).logits[0], model(ids[1:, 3:]).logits[0]]
    torch.testing.assert_close(padded[0], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded[1, 3:], alone[1], rtol=1e-5, atol=1e-5)


def test_converted_model_trains_through_the_ops():
    model = convert(_llama(), feature_dim=F_DIM, window=3, backend=BACKEND).train()
    ids, mask = _ids(2, 8), torch.ones(2, 8, dtype=torch.long)
    mask[1, :2] = 0
    model(ids, attention_mask=mask, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (".hedgehog." in name), name
    assert all(hh.window_factor.grad.abs().sum() > 0 for hh in hedgehog_modules(model))


def test_unsupported_masks_are_refused():
    t = 6
    causal = torch.ones(t, t, dtype=torch.bool).tril()[None, None]
    assert hh_model._keep(causal, 1, t, t, True) is None
    assert hh_model._keep(None, 1, t, t, True) is None
    padded = causal & torch.tensor([False, True, True, True, True, True])
    assert hh_model._keep(padded, 1, t, t, True).tolist() == [[False] + [True] * 5]
    additive = torch.zeros(1, 1, t, t).masked_fill(~padded, torch.finfo(torch.float32).min)
    assert torch.equal(hh_model._keep(additive, 1, t, t, True), hh_model._keep(padded, 1, t, t, True))
    sliding = causal & ~torch.ones(t, t, dtype=torch.bool).tril(-3)[None, None]
    with pytest.raises(ValueError, match="only the causal attention mask with padding"):
        hh_model._keep(sliding, 1, t, t, True)
    with pytest.raises(ValueError, match="bidirectional"):
        hh_model._keep(causal, 1, t, t, False)
    with pytest.raises(ValueError, match=r"\[B, 1, 6, 7\]"):
        hh_model._keep(causal, 1, t, t + 1, True)


# ----------------------------------------------------------------------------- BERT


def test_converted_bert_is_bidirectional_hedgehog_and_drops_padding():
    model = convert(_bert(), feature_dim=F_DIM, backend=BACKEND)
    assert len(hedgehog_modules(model)) == 2 and not any(m.is_causal for _, m in hh_model.attention_modules(model))
    _randomize_feature_maps(model)
    ids = _ids(2, 9)
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, _spec_logits(model, ids), rtol=1e-5, atol=1e-5)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits
        alone = model(ids[1:, :6]).logits
    torch.testing.assert_close(padded[1, :6], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded[0], got[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="causal"):
        HedgehogStateCache(model)
    history = distill(model, [{"input_ids": ids, "attention_mask": mask}], steps=3)
    assert len(history) == 3 and history[-1] < history[0]


# ----------------------------------------------------------------------------- distillation


def test_distill_trains_only_the_feature_maps_on_the_softmax_teacher():
    model = convert(_llama(), feature_dim=16, backend=BACKEND)  # F == D: identity init
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if ".hedgehog." not in n}
    maps = {n: p.detach().clone() for n, p in model.named_parameters() if ".hedgehog." in n}
    batches = [_ids(2, 12, seed=s) for s in range(2)]
    # the first loss is the sum over layers of the distillation loss on the softmax model's q, k
    captured = []
    hh_model._CAPTURE.append(captured)
    try:
        with hh_model._attention_implementation(model, hh_model.TEACHER_IMPLEMENTATION), torch.no_grad():
            model(batches[0], use_cache=False)
    finally:
        hh_model._CAPTURE.pop()
    assert len(captured) == 2 and captured[0][1].shape == (2, 4, 12, 16) and captured[0][2].shape == (2, 2, 12, 16)
    with torch.no_grad():
        first = sum(m.hedgehog.distillation_loss(q, k, scale=s) for m, q, k, _, s, _ in captured).item()
    model.train()
    steps = []
    history = distill(model, batches, steps=16, lr=1e-2, callback=lambda i, loss: steps.append(i))
    assert model.training and model.config._attn_implementation == hh_model.ATTN_IMPLEMENTATION
    assert steps == list(range(16)) and len(history) == 16
    assert history[0] == pytest.approx(first, rel=1e-5)
    assert history[-2] < history[0] - 0.05 and history[-1] < history[1] - 0.05, history  # batches alternate
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert any(not torch.equal(p, maps[n]) for n, p in model.named_parameters() if n in maps)


# ----------------------------------------------------------------------------- generation


def _teacher_forced_argmax(model, seq):
    with torch.no_grad():
        return model(seq, use_cache=False).logits.argmax(-1)


@pytest.mark.parametrize("batch", [1, 2])
def test_generate_with_state_cache_matches_the_full_forward(batch, monkeypatch):
    model = convert(_llama(), feature_dim=F_DIM, backend=BACKEND)
    _randomize_feature_maps(model)
    ids, n = _ids(batch, 10), 16
    cache = HedgehogStateCache(model)
    decode, calls = pyfast.HedgehogAttention.decode, []
    monkeypatch.setattr(pyfast.HedgehogAttention, "decode", lambda self, *a: calls.append(1) or decode(self, *a))
    out = _gen(model, ids, n, cache)
    assert out.shape == (batch, 10 + n) and len(calls) == 2 * (n - 1)  # one prefill, then n - 1 decode steps
    assert all(len(set(row[10:].tolist())) > 3 for row in out)  # not a degenerate repetition
    monkeypatch.undo()
    # every generated token is the converted model's own argmax at that position of the full sequence
    assert torch.equal(_teacher_forced_argmax(model, out)[:, 9:-1], out[:, 10:])
    # constant memory: per layer S [B, Hkv, 2F, Dv] and z [B, Hkv, 2F] float32, nothing else
    for s, z in cache.states():
        assert s.shape == (batch, 2, 2 * F_DIM, 16) and z.shape == (batch, 2, 2 * F_DIM) and s.dtype == torch.float32
    assert cache.nbytes() == 2 * 4 * batch * 2 * 2 * F_DIM * 17
    assert cache.get_seq_length() == 10 + n - 1
    # the same tokens without the state cache (transformers' DynamicCache: recomputed over all keys)
    assert torch.equal(_gen(model, ids, n), out)
    cache.reset()
    assert cache.nbytes() == 0 and torch.equal(_gen(model, ids, n, cache), out)


def test_generate_left_padded_batch_with_state_cache():
    model = convert(_llama(), feature_dim=F_DIM, backend=BACKEND)
    _randomize_feature_maps(model)
    ids, mask = _ids(2, 10, seed=5), torch.ones(2, 10, dtype=torch.long)
    ids[1, :4], mask[1, :4] = 0, 0
    out = _gen(model, ids, 12, HedgehogStateCache(model), attention_mask=mask)
    assert torch.equal(out[0], _gen(model, ids[:1], 12, HedgehogStateCache(model))[0])
    assert torch.equal(out[1, 4:], _gen(model, ids[1:, 4:], 12, HedgehogStateCache(model))[0])


def test_state_cache_steps_equal_the_full_forward():
    model = convert(_llama(), feature_dim=F_DIM, backend=BACKEND)
    _randomize_feature_maps(model)
    seq = _ids(2, 14)
    with torch.no_grad():
        want = model(seq, use_cache=False).logits
        cache = HedgehogStateCache(model)
        kw = {hh_model.CACHE_KWARG: cache}
        got = [model(seq[:, :5], **kw).logits, model(seq[:, 5:9], **kw).logits]  # prefill in two chunks
        got += [model(seq[:, t : t + 1], **kw).logits for t in range(9, 14)]  # then decode steps
    torch.testing.assert_close(torch.cat(got, 1), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cropped"):
        cache.crop(3)
    # beam-style reordering of the states
    s0 = [s.clone() for s, _ in cache.states()]
    cache.reorder_cache(torch.tensor([1, 0]))
    assert all(torch.equal(s, w.flip(0)) for (s, _), w in zip(cache.states(), s0))
    cache.batch_repeat_interleave(2)
    assert cache.states()[0][0].shape[0] == 4
    cache.batch_select_indices(torch.tensor([3]))
    assert torch.equal(cache.states()[0][0][0], s0[0][0])


def test_window_hybrid_generates_without_the_state_cache():
    model = convert(_llama(), feature_dim=F_DIM, window=4, backend=BACKEND)
    _randomize_feature_maps(model)
    with pytest.raises(ValueError, match="window=0"):
        HedgehogStateCache(model)
    ids = _ids(1, 8)
    out = _gen(model, ids, 8)  # transformers' DynamicCache: the hybrid over all keys at every step
    assert torch.equal(_teacher_forced_argmax(model, out)[:, 7:-1], out[:, 8:])


def test_pyfast_exports():
    assert pyfast.HedgehogStateCache is HedgehogStateCache
    assert "HedgehogStateCache" in pyfast.__all__ and "convert" in pyfast.hedgehog.__all__
    assert pyfast.hedgehog.convert is convert and pyfast.hedgehog.distill is distill


# ----------------------------------------------------------------------------- fixed feature maps (baselines)


@pytest.mark.parametrize("feature_map", ["elu", "t2r"])
def test_fixed_feature_map_conversion_runs_linear_attention_and_generates(feature_map):
    model = convert(_llama(), feature_dim=F_DIM, feature_map=feature_map, backend=BACKEND)
    mods = hedgehog_modules(model)
    width = F_DIM if feature_map == "elu" else 2 * F_DIM
    assert all(hh.feature_map == feature_map and hh.q_map.out_features == width for hh in mods)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if ".hedgehog." in n} and len(trainable) == 2 * 4
    _randomize_feature_maps(model)
    ids = _ids(2, 11)
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, _spec_logits(model, ids), rtol=1e-5, atol=1e-5)
    with softmax_attention(model), torch.no_grad():
        assert (got - model(ids).logits).abs().max() > 1e-2
    # greedy tokens through the recurrent state (linear_attention steps) = the full forward's argmax
    cache = HedgehogStateCache(model)
    out = _gen(model, ids[:1], 12, cache)
    assert len(set(out[0, 11:].tolist())) > 3
    assert torch.equal(_teacher_forced_argmax(model, out)[:, 10:-1], out[:, 11:])
    assert all(s.shape == (1, 2, width, 16) and z.shape == (1, 2, width) for s, z in cache.states())


@pytest.mark.parametrize("feature_map", ["elu", "t2r"])
def test_distill_trains_the_fixed_feature_maps_linear_part(feature_map):
    model = convert(_llama(), feature_dim=16, feature_map=feature_map, backend=BACKEND)  # F == D: textbook init
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if ".hedgehog." not in n}
    history = distill(model, [_ids(2, 12, seed=s) for s in range(2)], steps=16, lr=1e-2)
    assert history[-2] < history[0] - 0.05 and history[-1] < history[1] - 0.05, history
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_convert_refuses_a_window_with_a_fixed_feature_map():
    model = _llama()
    with pytest.raises(ValueError, match="window"):
        convert(model, window=4, feature_map="t2r")
    with pytest.raises(ValueError, match="feature_map"):
        convert(model, feature_map="cosformer")
    assert model.config._attn_implementation == "sdpa" and not hedgehog_modules(model)


def test_distill_reuse_teacher_runs_the_teacher_once_per_batch(monkeypatch):
    batches = [_ids(2, 12, seed=s) for s in range(3)]
    histories, runs = [], []
    record = hh_model._record_teacher
    monkeypatch.setattr(hh_model, "_record_teacher", lambda m, b: runs.append(1) or record(m, b))
    for reuse in (False, True):
        runs.clear()
        model = convert(_llama(), feature_dim=F_DIM, backend=BACKEND)
        histories.append(distill(model, batches, steps=7, lr=1e-2, reuse_teacher=reuse))
        assert len(runs) == (3 if reuse else 7)
    assert histories[0] == pytest.approx(histories[1], rel=1e-6)  # the same teacher q, k either way
