"""Sparse decoding inside transformers models: tiny randomly initialised Llama (GQA), Qwen2 and
GPT-2 (no downloads). With topk covering every block, greedy decoding through the pyfast cache
reproduces HF's dense decoding token for token; with a small topk it runs, reads less, and its
byte counters match the selection rule. Tests that pass the cache run under both spellings of
the keyword: `cache=` (transformers >= 5.24; must not warn) and `past_key_values=` (older
versions; deprecated with a FutureWarning from 5.24)."""

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import pyfast  # noqa: E402
from pyfast.sparse.model import ATTN_IMPLEMENTATION, CACHE_KWARG  # noqa: E402

BLOCK = 4  # small blocks, so a 37-token prompt has 9 of them and the selection matters
PROMPT, NEW = 37, 24
SPARSE = dict(block_size=BLOCK, sink_blocks=1, local_blocks=2)


def _tiny(family: str):
    torch.manual_seed(0)
    common = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    if family == "llama":
        cfg = transformers.LlamaConfig(**common, intermediate_size=128, num_key_value_heads=2, pad_token_id=0)
        model = transformers.LlamaForCausalLM(cfg)
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(**common, intermediate_size=128, num_key_value_heads=1, pad_token_id=0)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model = transformers.GPT2LMHeadModel(cfg)
    # HF's init (std 0.02) makes attention almost uniform; larger weights make it peaked, so that
    # dropping blocks changes the output and exact equality below is a real check
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    # An inference model: pyfast's decode attention has no backward and refuses inputs that
    # require grad (a forward outside torch.no_grad() would otherwise record no gradient).
    return model.eval().requires_grad_(False)


def _greedy(model, ids, cache, n_new, spelling="past_key_values"):
    """A manual greedy loop: prefill, then one token at a time."""
    out = []
    logits = model(ids, **{spelling: cache}, use_cache=True).logits[:, -1]
    for _ in range(n_new):
        nxt = logits.argmax(-1, keepdim=True)
        out.append(nxt)
        logits = model(nxt, **{spelling: cache}, use_cache=True).logits[:, -1]
    return torch.cat(out, 1)


@pytest.fixture(params=["llama", "qwen2", "gpt2"])
def family(request):
    return request.param


@pytest.fixture(params=[
    "past_key_values",
    pytest.param("cache", marks=pytest.mark.skipif(CACHE_KWARG != "cache",
                                                   reason="transformers < 5.24 has no cache= keyword")),
])
def spelling(request):
    """The keyword the cache is passed under to model(...) and model.generate(...). The current
    spelling must not warn; the deprecated one's FutureWarning (transformers >= 5.24) is expected."""
    with warnings.catch_warnings():  # set up inside pytest's per-test filters, so it lasts the test
        if request.param == "cache":
            warnings.simplefilter("error", FutureWarning)
        else:
            warnings.filterwarnings("ignore", "`past_key_values` is deprecated", FutureWarning)
        yield request.param


def test_cache_kwarg_matches_transformers():
    import inspect

    forward = inspect.signature(transformers.LlamaForCausalLM.forward).parameters
    assert CACHE_KWARG in forward
    assert ("cache" in forward) == (CACHE_KWARG == "cache")


def test_full_budget_equals_dense_hf(family, spelling):
    model = _tiny(family)
    ids = torch.randint(3, 97, (1, PROMPT))
    want = model.generate(ids, max_new_tokens=NEW, do_sample=False)  # sdpa + DynamicCache
    n_blocks = (PROMPT + NEW) // BLOCK
    cache = pyfast.enable_sparse_decoding(model, max_length=PROMPT + NEW + 3, topk=n_blocks, **SPARSE)
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    got = model.generate(ids, max_new_tokens=NEW, do_sample=False, **{spelling: cache})
    assert torch.equal(got, want)
    st = cache.stats()
    # NEW tokens: the first from the prefill, then NEW - 1 decode steps of both layers
    assert st["decode_steps"] == NEW - 1 and st["layer_steps"] == (NEW - 1) * 2
    assert st["kept_token_fraction"] == 1.0
    assert cache.kv.cache_seqlens[1].tolist() == [PROMPT + NEW - 1]

    cache.reset()  # the manual loop through the same cache, then dense mode
    assert torch.equal(_greedy(model, ids, cache, NEW, spelling), want[:, PROMPT:])
    assert cache.stats()["decode_steps"] == NEW  # the manual loop also decodes the last token's successor
    cache.reset()
    cache.kv.topk = None
    assert torch.equal(_greedy(model, ids, cache, NEW, spelling), want[:, PROMPT:])
    pyfast.disable_sparse_decoding(model)
    assert model.config._attn_implementation == "sdpa"


def test_small_budget_reads_less(family, spelling):
    model = _tiny(family)
    ids = torch.randint(3, 97, (1, PROMPT))
    full = model.generate(ids, max_new_tokens=NEW, do_sample=False)
    want = model(full).logits[0, PROMPT - 1 : -1]  # dense next-token logits along the continuation
    cache = pyfast.enable_sparse_decoding(model, max_length=PROMPT + NEW, topk=1, **SPARSE)
    # teacher-forced on the dense continuation: the prefill is exact, later steps drop blocks
    got = [model(ids, **{spelling: cache}).logits[0, -1]]
    for t in range(PROMPT, PROMPT + NEW - 1):
        got.append(model(full[:, t : t + 1], **{spelling: cache}).logits[0, -1])
    got = torch.stack(got)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
    assert torch.isfinite(got).all() and (got - want).abs().max() > 1e-3  # the selection matters
    # decode lengths 38..60: 9..15 full blocks, 6..12 candidates of which 1 kept, 4 always-kept blocks
    lengths = torch.arange(PROMPT + 1, PROMPT + NEW, dtype=torch.float64)
    nfull = lengths.div(BLOCK, rounding_mode="floor")
    kept = 4 * BLOCK + lengths - nfull * BLOCK
    st = cache.stats()
    assert st["decode_steps"] == NEW - 1 and st["layer_steps"] == 2 * (NEW - 1)
    assert st["kept_token_fraction"] == pytest.approx(float(kept.sum() / lengths.sum()))
    assert st["kv_read_fraction"] == pytest.approx(float((2 * kept + nfull - 3).sum() / (2 * lengths.sum())))
    assert st["kv_read_fraction"] < 0.6
    # free-running greedy decoding runs too
    cache.reset()
    assert _greedy(model, ids, cache, NEW - 1, spelling).shape == (1, NEW - 1)


def test_left_padded_batch_equals_dense_hf(spelling):
    model = _tiny("llama")
    ids = torch.randint(3, 97, (3, PROMPT))
    mask = torch.ones_like(ids)
    for b, pad in ((1, 5), (2, 11)):
        ids[b, :pad], mask[b, :pad] = 0, 0
    want = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    cache = pyfast.enable_sparse_decoding(model, max_length=PROMPT + NEW, batch_size=3, topk=64, **SPARSE)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, **{spelling: cache})
    assert torch.equal(got, want)
    # every row holds only its own tokens
    assert cache.kv.cache_seqlens[0].tolist() == [PROMPT + NEW - 1, PROMPT + NEW - 6, PROMPT + NEW - 12]


def test_switched_model_is_exact_without_the_cache():
    model = _tiny("llama")
    ids = torch.randint(3, 97, (2, 19))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    want = model(ids, attention_mask=mask).logits
    pyfast.enable_sparse_decoding(model, max_length=8, **SPARSE)
    got = model(ids, attention_mask=mask).logits  # no SparseDecodingCache: SDPA
    torch.testing.assert_close(got, want)
    got = model.generate(ids[:1], max_new_tokens=5, do_sample=False)  # DynamicCache: SDPA
    pyfast.disable_sparse_decoding(model)
    assert torch.equal(got, model.generate(ids[:1], max_new_tokens=5, do_sample=False))


def test_rejects_sliding_window_layers():
    cfg = transformers.Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                                   sliding_window=8, max_window_layers=0)
    with pytest.raises(ValueError, match="full-attention"):
        pyfast.SparseDecodingCache(transformers.Qwen2ForCausalLM(cfg), max_length=16)


def test_beam_search_equals_dense_hf(spelling):
    """generate(num_beams=n) expands the batch before the prefill: a cache built for batch * n
    beams, reordered in place by transformers, gives HF's dense beam search exactly."""
    model = _tiny("llama")
    ids = torch.randint(3, 97, (2, PROMPT))
    mask = torch.ones_like(ids)
    ids[1, :6], mask[1, :6] = 0, 0
    want = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, num_beams=3,
                          num_return_sequences=2)
    cache = pyfast.enable_sparse_decoding(model, max_length=PROMPT + NEW, batch_size=6, topk=64, **SPARSE)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, num_beams=3,
                         num_return_sequences=2, **{spelling: cache})
    assert torch.equal(got, want)


def test_batch_repeat_interleave_and_select_follow_dynamic_cache(spelling):
    model = _tiny("qwen2")
    ids = torch.randint(3, 97, (2, PROMPT))

    def run(cache):
        logits = [model(ids, **{spelling: cache}).logits[:, -1]]
        cache.batch_repeat_interleave(3)  # [a, a, a, b, b, b]
        nxt = torch.randint(3, 97, (6, 1), generator=torch.Generator().manual_seed(1))
        for _ in range(5):
            logits.append(model(nxt, **{spelling: cache}).logits[:, -1])
            nxt = logits[-1].argmax(-1, keepdim=True)
        keep = torch.tensor([4, 0, 2])
        cache.batch_select_indices(keep)
        nxt = nxt[keep]
        for _ in range(4):
            logits.append(model(nxt, **{spelling: cache}).logits[:, -1])
            nxt = logits[-1].argmax(-1, keepdim=True)
        return logits

    want = run(transformers.DynamicCache(config=model.config))
    cache = pyfast.enable_sparse_decoding(model, max_length=PROMPT + 9, batch_size=2, topk=64, **SPARSE)
    got = run(cache)
    assert [g.shape[0] for g in got] == [2] + [6] * 5 + [3] * 4
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    assert cache.kv.batch_size == 3 and cache.layers[0].keys.shape[0] == 3
    assert cache.kv.cache_seqlens[0].tolist() == [PROMPT + 9] * 3
    with pytest.raises(ValueError, match="repeats"):
        cache.batch_repeat_interleave(0)
    assert cache.kv.batch_size == 3
