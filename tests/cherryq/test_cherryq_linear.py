"""CherryQLinear, model tools (quantize_model, estimate_impact), safetensors I/O and QAT."""

import warnings

import pytest
import torch
from torch import nn

import pyfast
from pyfast.testing import assert_close


class TinyMLP(nn.Module):
    def __init__(self, d=128, h=256):
        super().__init__()
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, d, bias=False)
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        return self.head(self.down(torch.relu(self.up(x))))


def test_bias_gets_gradient():
    q = pyfast.CherryQLinear.from_linear(nn.Linear(128, 8), bits=3, group_size=64)
    x = torch.randn(2, 3, 128, requires_grad=True)
    g = torch.randn(2, 3, 8)
    (q(x) * g).sum().backward()
    assert_close(q.bias.grad, g.sum((0, 1)), 1e-6)
    assert x.grad is not None


def test_from_linear_matches_dequantized():
    lin = nn.Linear(256, 48)
    q = pyfast.CherryQLinear.from_linear(lin, bits=3, group_size=128)
    x = torch.randn(5, 256)
    w = pyfast.cherryq_dequantize(q.quantized_weight)
    assert_close(q(x), x @ w.T + lin.bias.detach(), 1e-5)
    assert "bits=3" in repr(q)


def test_gpt2_conv1d_drop_in():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(48, 128)  # nf=48 outputs, nx=128 inputs; weight [128, 48]
    nn.init.normal_(conv.weight)
    nn.init.normal_(conv.bias)
    q = pyfast.CherryQLinear.from_linear(conv, bits=4, group_size=64, cherries_per_row=0)
    x = torch.randn(2, 7, 128)
    ref = conv(x)
    assert q(x).shape == ref.shape
    # 4-bit rounding error only: within 10% relative of the float layer
    assert ((q(x) - ref).norm() / ref.norm()) < 0.1


def test_state_dict_roundtrip():
    q = pyfast.CherryQLinear.from_linear(nn.Linear(128, 40), bits=2, group_size=64)
    fresh = pyfast.CherryQLinear(128, 40, bits=2, group_size=64)
    fresh.load_state_dict(q.state_dict())
    x = torch.randn(3, 128)
    assert torch.equal(fresh(x), q(x))


def test_quantize_model_and_safetensors_roundtrip(tmp_path):
    pytest.importorskip("safetensors")  # a GPU image may lack it
    model = TinyMLP()
    x = torch.randn(4, 128)
    qmodel = pyfast.quantize_model(model, bits=3, group_size=128, skip=("head",))
    assert isinstance(qmodel.up, pyfast.CherryQLinear) and isinstance(qmodel.down, pyfast.CherryQLinear)
    assert isinstance(qmodel.head, nn.Linear)
    path = str(tmp_path / "q.safetensors")
    pyfast.save_quantized(qmodel, path)
    loaded = pyfast.load_quantized(TinyMLP(), path)
    assert isinstance(loaded.up, pyfast.CherryQLinear)
    assert torch.equal(loaded(x), qmodel(x))


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_quantize_model_reports_skipped_layers_and_falls_back():
    """hidden 64, intermediate 128: at group_size 128 only down_proj fits; the other 12 linears
    are named in one warning (with the fallback that fits them) and in the summary."""
    model = _tiny_llama()
    with pytest.warns(UserWarning) as caught:
        out, summary = pyfast.quantize_model(model, bits=3, group_size=128, return_summary=True)
    assert out is model and len(caught) == 1
    msg = str(caught[0].message)
    assert msg.startswith("pyfast.quantize_model: 12 of 14 linear layers left unquantized")
    assert "model.layers.0.self_attn.q_proj (in_features=64)" in msg and "fallback_group_size=64" in msg
    assert "lm_head" not in msg  # skipped by name, as asked: no warning for it
    assert summary["quantized"] == {f"model.layers.{i}.mlp.down_proj": 128 for i in range(2)}
    assert summary["skipped"]["lm_head"] == "name matches skip 'lm_head'"
    assert summary["skipped"]["model.layers.1.mlp.up_proj"] == "in_features=64 is not a multiple of group_size=128"
    assert len(summary["skipped"]) == 13
    assert isinstance(model.model.layers[0].mlp.down_proj, pyfast.CherryQLinear)
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)

    model = _tiny_llama()
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        want = model(ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # everything fits: no warning
        out, summary = pyfast.quantize_model(model, bits=4, group_size=128, fallback_group_size=64,
                                             return_summary=True)
    assert summary["skipped"] == {"lm_head": "name matches skip 'lm_head'"}
    assert sorted(set(summary["quantized"].values())) == [64, 128] and len(summary["quantized"]) == 14
    assert model.model.layers[0].self_attn.q_proj.group_size == 64
    assert model.model.layers[0].mlp.down_proj.group_size == 128
    with torch.no_grad():
        got = model(ids).logits
    assert torch.isfinite(got).all() and ((got - want).norm() / want.norm()) < 0.2  # 4-bit error only


def test_quantize_model_fallback_that_does_not_fit_and_backward_compat():
    model = nn.Sequential(nn.Linear(96, 32), nn.Linear(32, 8))  # 96 = 3 * 32: only 32 divides both
    with pytest.warns(UserWarning, match=r"2 of 2 linear layers .* group_size=128 or fallback_group_size=64\): "
                                         r"0 \(in_features=96\), 1 \(in_features=32\); fallback_group_size=32"):
        out = pyfast.quantize_model(model, group_size=128, fallback_group_size=64)
    assert out is model and all(type(m) is nn.Linear for m in model)  # plain return value by default
    with pytest.warns(UserWarning, match="no supported group size below 128"):
        pyfast.quantize_model(nn.Sequential(nn.Linear(48, 8)), group_size=128)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(fallback_group_size=128), ValueError, "expected fallback_group_size None or a group size smaller than "
                                                "group_size=128, got 128"),
    (dict(fallback_group_size=48), ValueError, r"expected fallback_group_size one of \(32, 64, 128, 256\), got 48"),
    (dict(fallback_group_size=64.0), TypeError, "expected fallback_group_size an int"),
    (dict(group_size=100), ValueError, "expected group_size one of"),
    (dict(return_summary=1), TypeError, "expected return_summary a bool, got int 1"),
])
def test_quantize_model_rejects_bad_options(kwargs, error, match):
    model = TinyMLP()
    with pytest.raises(error, match="pyfast.quantize_model: " + match):
        pyfast.quantize_model(model, **kwargs)
    assert type(model.up) is nn.Linear  # nothing replaced


def test_load_rejects_truncated_and_tampered(tmp_path):
    pytest.importorskip("safetensors")  # a GPU image may lack it
    qmodel = pyfast.quantize_model(TinyMLP(), bits=3, group_size=128, cherries_per_row=2)
    path = tmp_path / "q.safetensors"
    pyfast.save_quantized(qmodel, str(path))
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="load_quantized"):
        pyfast.load_quantized(TinyMLP(), str(tmp_path / "trunc.safetensors"))
    (tmp_path / "garbage.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="load_quantized"):
        pyfast.load_quantized(TinyMLP(), str(tmp_path / "garbage.safetensors"))
    # tampered cherry indices (out of range) are caught after loading
    sd = {k: v.clone() for k, v in qmodel.state_dict().items()}
    sd["up.cherry_idx"].fill_(10**6)
    from safetensors.torch import save_file
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    save_file(sd, str(tmp_path / "tampered.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="cherry_idx"):
        pyfast.load_quantized(TinyMLP(), str(tmp_path / "tampered.safetensors"))
    sd = {k: v.clone() for k, v in qmodel.state_dict().items()}
    sd["up.cherry_idx"][:, 0] = sd["up.cherry_idx"][:, 1]  # a repeated cherry column
    save_file(sd, str(tmp_path / "dup.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="ascending"):
        pyfast.load_quantized(TinyMLP(), str(tmp_path / "dup.safetensors"))
    sd = {k: v.clone() for k, v in qmodel.state_dict().items()}
    sd["up.qweight"].fill_(-1)  # every code non-zero, cherries included
    save_file(sd, str(tmp_path / "codes.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="code 0"):
        pyfast.load_quantized(TinyMLP(), str(tmp_path / "codes.safetensors"))
    # a plain (non-pyfast) safetensors file
    save_file({"a": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="pyfast CherryQ"):
        pyfast.load_quantized(TinyMLP(), str(tmp_path / "plain.safetensors"))


def test_estimate_impact_is_mean_grad_squared():
    model = TinyMLP()
    batches = [torch.randn(8, 128) for _ in range(3)]

    def loss_fn(m, b):
        return m(b).square().mean()

    impact = pyfast.estimate_impact(model, batches, loss_fn=loss_fn)
    assert set(impact) == {"up", "down", "head"}
    assert all(p.grad is None for p in model.parameters())
    want = torch.zeros_like(model.up.weight)
    for b in batches:
        model.zero_grad()
        loss_fn(model, b).backward()
        want += model.up.weight.grad.square()
    assert_close(impact["up"], want / 3, 1e-5)


def test_bad_layer_and_shape():
    with pytest.raises(ValueError, match="in_features"):
        pyfast.CherryQLinear(100, 10, group_size=64)
    with pytest.raises(ValueError, match="layer"):
        pyfast.CherryQLinear.from_linear(nn.Conv2d(3, 3, 3))


def test_qat_beats_round_to_nearest():
    """A few QAT steps (STE on the non-cherry part, exact cherry gradients) give a lower loss
    after packing than plain round-to-nearest of the same float model (the paper's claim)."""
    torch.manual_seed(0)
    teacher = TinyMLP()
    data = [torch.randn(64, 128) for _ in range(8)]
    targets = [teacher(x).detach() for x in data]

    def loss(model):
        with torch.no_grad():
            return sum(torch.nn.functional.mse_loss(model(x), y) for x, y in zip(data, targets)).item()

    import copy

    rtn = pyfast.quantize_model(copy.deepcopy(teacher), bits=2, group_size=64, skip=("head",))
    qat = pyfast.quantize_model(copy.deepcopy(teacher), bits=2, group_size=64, skip=("head",), qat=True)
    assert qat.up.qat and qat.up.weight.requires_grad
    opt = torch.optim.Adam([p for p in qat.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(4):
        for x, y in zip(data, targets):
            opt.zero_grad()
            torch.nn.functional.mse_loss(qat(x), y).backward()
            opt.step()
    pyfast.finish_qat(qat)
    assert not qat.up.qat and qat.up.weight is None
    assert loss(qat) < 0.9 * loss(rtn), (loss(qat), loss(rtn))


def test_qat_cherries_get_exact_gradient():
    q = pyfast.CherryQLinear.from_linear(nn.Linear(128, 8, bias=False), bits=2, group_size=64, qat=True)
    x = torch.randn(4, 128)
    g = torch.randn(4, 8)
    (q(x) * g).sum().backward()
    # straight-through: d out / d W = g^T x for every weight, cherry or not
    assert_close(q.weight.grad, g.T @ x, 1e-5)
    # the forward weight: cherries exactly the master weight, the rest on the quantization grid
    from pyfast.cherryq.quantize import fake_quantize

    fq = fake_quantize(q.weight, q.keep_mask, q.bits, q.group_size).detach()
    cherry = ~q.keep_mask
    assert torch.equal(fq[cherry], q.weight.detach()[cherry])
    assert (fq[~cherry] != q.weight.detach()[~cherry]).float().mean() > 0.9
