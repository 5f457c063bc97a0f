"""fold: a GPT-2 whose LayerNorms are all FakeLN (or hold the released LN-free encoding) -> LNFreeGPT2,
exactly, in float64.

A FakeLN in front of a linear layer (GPT-2's Conv1D: y = ln(x) W + b, W [d_in, d_out]) is
    ln(x) = (x - mean(x)) * a + beta,   a = gamma / sigma
    y     = x C diag(a) W + (beta W + b),   C = I - 1 1^T / d   (centering, symmetric)
so the layer reading it becomes W' = C diag(a) W (row i of diag(a) W minus the mean of its rows:
the centering folded into the reading weights) and b' = beta W + b. Every LN of a GPT-2 feeds
exactly one linear layer: ln_1 -> attn.c_attn, ln_2 -> mlp.c_fc, ln_f -> the unembedding (tied
to wte in GPT-2: it gets its own folded copy, U' = wte diag(a) C, and a bias beta wte^T). The
layers that read no LN (attn.c_proj, mlp.c_proj) and the embeddings are kept as they are. The
result is stored in F.linear's layout ([d_out, d_in]) in the model's dtype, cast after the float64
arithmetic.

The released LN-free checkpoints keep real LayerNorm modules with eps = 1e12 and weight
gamma * 1e6 / sigma: sqrt(var + 1e12) = 1e6 to within var / 2e12 for any real activation, so
a = weight / sqrt(eps) there (`ln_scale_of_encoded`).
"""

from __future__ import annotations

import torch

from pyfast._validate import fail
from pyfast.lnfree.fake import FakeLayerNorm

# A checkpoint whose LN eps is at least this holds the released encoding (1e12 there; real LNs
# use 1e-5).
ENCODED_EPS_MIN = 1e10


def _fail(arg: str, expected: str, got) -> None:
    fail("lnfree.fold", arg, expected, got)


def fold_reader(a: torch.Tensor, beta: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None):
    """The linear layer y = ln(x) w + b (w [d_in, d_out], Conv1D layout) with ln(x) = (x - mean) a + beta
    folded in: returns (weight [d_out, d_in], bias [d_out]) in float64 (F.linear layout)."""
    a, beta, w = a.double(), beta.double(), w.double()
    scaled = a[:, None] * w  # diag(a) W
    weight = scaled - scaled.mean(0, keepdim=True)  # C diag(a) W
    bias = beta @ w + (b.double() if b is not None else 0.0)
    return weight.T.contiguous(), bias


def ln_scale_of_fake(ln: FakeLayerNorm, name: str = "LayerNorm") -> tuple[torch.Tensor, torch.Tensor]:
    """(a = gamma / sigma, beta) of a FakeLayerNorm, float64."""
    if ln.sigma0 is not None:
        _fail(name, "one sigma for every position (fold cannot express a separate first-position sigma0)",
              f"sigma0 = {float(ln.sigma0):.6g}")
    beta = ln.bias.double() if ln.bias is not None else torch.zeros_like(ln.weight, dtype=torch.float64)
    return ln.weight.double() / ln.sigma.double(), beta


def ln_scale_of_encoded(weight: torch.Tensor, bias: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, beta) of a LayerNorm in the released LN-free encoding (weight = gamma / sigma * sqrt(eps))."""
    return weight.double() / (float(eps) ** 0.5), bias.double()


def gpt2_config_of(config) -> dict:
    """The LNFreeGPT2 config of a transformers GPT2Config; ValueError for what it cannot express."""
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    if cfg.get("model_type") != "gpt2":
        _fail("model", "a transformers GPT-2 (model_type 'gpt2')", repr(cfg.get("model_type")))
    act = cfg.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        _fail("config.activation_function", "'gelu_new' (GPT-2's tanh GELU)", repr(act))
    if cfg.get("add_cross_attention"):
        _fail("config.add_cross_attention", "False", True)
    d, heads, layers = cfg["n_embd"], cfg["n_head"], cfg["n_layer"]
    if d % heads:
        _fail("config.n_embd", f"a multiple of n_head = {heads}", d)
    scales = []
    for i in range(layers):
        s = (d // heads) ** -0.5 if cfg.get("scale_attn_weights", True) else 1.0
        if cfg.get("scale_attn_by_inverse_layer_idx", False):
            s /= float(i + 1)
        scales.append(s)
    eos = cfg.get("eos_token_id")
    return dict(vocab_size=cfg["vocab_size"], n_positions=cfg["n_positions"], n_embd=d, n_layer=layers,
                n_head=heads, n_inner=cfg.get("n_inner") or 4 * d, attn_scales=scales,
                eos_token_id=eos if isinstance(eos, int) else None)


def fold_gpt2_tensors(cfg: dict, get, ln_scale, head: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The LNFreeGPT2 state dict (float64) from GPT-2 weights: get(name) returns a transformers
    GPT-2 tensor by its name without the "transformer." prefix (e.g. "h.0.attn.c_attn.weight",
    Conv1D layout [d_in, d_out]); ln_scale(name) returns (a, beta) of the LN `name` ("h.0.ln_1");
    head: an untied lm_head weight [vocab, d] (default: the unembedding is wte, GPT-2's tie)."""
    out = {"wte": get("wte.weight").double(), "wpe": get("wpe.weight").double()}
    for i in range(cfg["n_layer"]):
        p = f"h.{i}."
        q = f"blocks.{i}."
        out[q + "attn_weight"], out[q + "attn_bias"] = fold_reader(*ln_scale(p + "ln_1"), get(p + "attn.c_attn.weight"),
                                                                   get(p + "attn.c_attn.bias"))
        out[q + "attn_proj_weight"] = get(p + "attn.c_proj.weight").double().T.contiguous()
        out[q + "attn_proj_bias"] = get(p + "attn.c_proj.bias").double()
        out[q + "fc_weight"], out[q + "fc_bias"] = fold_reader(*ln_scale(p + "ln_2"), get(p + "mlp.c_fc.weight"),
                                                               get(p + "mlp.c_fc.bias"))
        out[q + "proj_weight"] = get(p + "mlp.c_proj.weight").double().T.contiguous()
        out[q + "proj_bias"] = get(p + "mlp.c_proj.bias").double()
    unembed = get("wte.weight") if head is None else head
    weight, bias = fold_reader(*ln_scale("ln_f"), unembed.double().T, None)
    out["unembed_weight"], out["unembed_bias"] = weight, bias
    return out


@torch.no_grad()
def fold(model, dtype: torch.dtype | None = None):
    """A transformers GPT2LMHeadModel whose every LayerNorm is a FakeLayerNorm (after
    fake_layernorm / the removal fine-tune) -> an LNFreeGPT2 with no normalization left, computed in
    float64 and cast to `dtype` (default: the model's). Its logits equal the FakeLN model's. The
    model is not modified.

    Example:
        >>> fake_layernorm(gpt2, estimate_ln_scales(gpt2, [ids]))
        >>> lnfree = fold(gpt2)
        >>> torch.testing.assert_close(lnfree(ids), gpt2(ids).logits, rtol=1e-4, atol=1e-4)
    """
    from pyfast.lnfree.model import LNFreeGPT2

    cfg = gpt2_config_of(getattr(model, "config", {}))
    base = getattr(model, "transformer", None)
    if base is None or not hasattr(model, "lm_head"):
        _fail("model", "a GPT2LMHeadModel (with .transformer and .lm_head)", type(model).__name__)
    if model.lm_head.weight.data_ptr() != base.wte.weight.data_ptr() or getattr(model.lm_head, "bias", None) is not None:
        _fail("model.lm_head", "tied to transformer.wte without a bias (GPT-2's unembedding)", "an untied head")
    lns = {}
    for name, m in base.named_modules():
        if isinstance(m, torch.nn.LayerNorm):
            _fail(f"transformer.{name}", "a FakeLayerNorm (run fake_layernorm or the removal fine-tune first)",
                  "an nn.LayerNorm")
        if isinstance(m, FakeLayerNorm):
            lns[name] = m
    params = dict(base.named_parameters())
    params.update(base.named_buffers())

    def ln_scale(name):
        if name not in lns:
            _fail(f"transformer.{name}", "a FakeLayerNorm", type(base.get_submodule(name)).__name__)
        return ln_scale_of_fake(lns[name], f"transformer.{name}")

    tensors = fold_gpt2_tensors(cfg, params.__getitem__, ln_scale)
    dtype = dtype or base.wte.weight.dtype
    out = LNFreeGPT2(cfg, dtype=dtype, device=base.wte.weight.device)
    out.load_folded(tensors)
    return out
