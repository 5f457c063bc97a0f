"""load_quantized on tampered files: a header that declares another dtype (even of the same size),
shapes or metadata that do not fit the model, missing or ill-typed metadata. Each gives a clear
TypeError (dtypes) or ValueError (the rest) naming the key, before any large allocation, and
leaves the model as it was. Tampered files are written by hand: 8-byte little-endian header
length + JSON header + data."""

import json
import struct
import time

import pytest
import torch
from torch import nn

import pyfast

safetensors = pytest.importorskip("safetensors")  # a GPU image may lack it

from test_cherryq_linear import TinyMLP  # noqa: E402

META = "pyfast.cherryq"
ITEMSIZE = {"F64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1}
HEADER_DTYPE = {torch.float32: "F32", torch.int32: "I32", torch.float16: "F16", torch.bfloat16: "BF16"}


def _quantized(dtype=torch.float32):
    """TinyMLP with up and down quantized (head stays a float nn.Linear)."""
    return pyfast.quantize_model(TinyMLP().to(dtype), bits=3, group_size=128, cherries_per_row=2, skip=("head",))


def _write(path, tensors: dict, config, claims: dict | None = None) -> None:
    """A safetensors file of `tensors` with `config` as the pyfast metadata (a JSON-able object,
    or a str written as is). claims {key: (dtype, shape)} replaces what the header declares for
    that key; a claim bigger than the data is put last and backed by a sparse file."""
    claims = claims or {}
    order = sorted(tensors, key=lambda k: k in claims)
    meta = config if isinstance(config, str) else json.dumps(config)
    header, chunks, offset = {"__metadata__": {META: meta}}, [], 0
    for k in order:
        t = tensors[k].contiguous()
        dtype, shape = claims.get(k, (HEADER_DTYPE[t.dtype], list(t.shape)))
        nbytes = ITEMSIZE[dtype] * (torch.Size(shape).numel())
        header[k] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        chunks.append(t.view(torch.uint8).numpy().tobytes()[:nbytes])
        offset += nbytes
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb + b"".join(chunks))
        f.truncate(8 + len(hb) + offset)


def _config(qmodel) -> dict:
    return {name: {"bits": m.bits, "group_size": m.group_size, "cherries_per_row": m.cherries_per_row,
                   "in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None}
            for name, m in qmodel.named_modules() if isinstance(m, pyfast.CherryQLinear)}


def _state(qmodel) -> dict:
    return {k: v.detach().clone() for k, v in qmodel.state_dict().items()}


def _load_fails(path, error, match, **kw):
    """load_quantized into a fresh float model fails with `error` and leaves the model unchanged."""
    target = TinyMLP()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(error, match=match):
        pyfast.load_quantized(target, str(path), **kw)
    assert all(type(m) is nn.Linear for m in (target.up, target.down, target.head))
    after = target.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_handwritten_file_loads(tmp_path):
    """The writer used below produces a file load_quantized accepts (so the failures are the tampering)."""
    qmodel = _quantized()
    _write(tmp_path / "ok.safetensors", _state(qmodel), _config(qmodel))
    loaded = pyfast.load_quantized(TinyMLP(), str(tmp_path / "ok.safetensors"))
    x = torch.randn(3, 128)
    assert torch.equal(loaded(x), qmodel(x))


@pytest.mark.parametrize("key, claimed", [
    ("up.scales", "BF16"), ("up.scales", "I16"), ("up.zeros", "BF16"), ("down.cherry_val", "BF16"),
    ("up.cherry_idx", "F32"), ("up.qweight", "F32"), ("up.bias", "I32"), ("head.weight", "I32"),
])
def test_header_dtype_of_the_same_size_is_rejected(tmp_path, key, claimed):
    qmodel = _quantized()
    sd = _state(qmodel)
    path = tmp_path / "dtype.safetensors"
    _write(path, sd, _config(qmodel), {key: (claimed, list(sd[key].shape))})
    _load_fails(path, TypeError, rf"pyfast.load_quantized: expected {key} of dtype {sd[key].dtype}.*got .*{claimed}")


def test_bias_keeps_the_model_dtype(tmp_path):
    """The bias is stored in the float layer's dtype and loaded back in it (not widened to fp32)."""
    qmodel = _quantized(torch.float16)
    path = tmp_path / "fp16.safetensors"
    pyfast.save_quantized(qmodel, str(path))
    loaded = pyfast.load_quantized(TinyMLP().half(), str(path))
    assert loaded.up.bias.dtype == torch.float16
    x = torch.randn(3, 128, dtype=torch.float16)
    assert torch.equal(loaded(x), qmodel(x))
    with pytest.raises(TypeError, match=r"bias of dtype torch.float32 \(F32\), got F16"):  # fp32 model: no silent cast
        pyfast.load_quantized(TinyMLP(), str(path))


def test_huge_header_shape_fails_fast(tmp_path):
    """A header claiming a [2**20, 2**20] fp16 tensor (2 TiB, a sparse file) fails from the header alone."""
    qmodel = _quantized()
    path = tmp_path / "huge.safetensors"
    try:
        _write(path, _state(qmodel), _config(qmodel), {"up.scales": ("F16", [2**20, 2**20])})
    except OSError:
        pytest.skip("the file system has no 2 TiB sparse files")
    start = time.perf_counter()
    _load_fails(path, ValueError, r"expected up.scales of shape \[256, 1\], got shape \[1048576, 1048576\]")
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("field", ["in_features", "out_features"])
def test_huge_metadata_shape_fails_fast(tmp_path, field):
    """Metadata asking for a 2**20-wide layer fails before allocating it (up to 384 GiB of codes)."""
    qmodel = _quantized()
    config = _config(qmodel)
    config["up"][field] = 2**20
    path = tmp_path / "meta.safetensors"
    _write(path, _state(qmodel), config)
    start = time.perf_counter()
    _load_fails(path, ValueError, rf"expected metadata up.{field} == {128 if field == 'in_features' else 256}")
    assert time.perf_counter() - start < 5


def _edit(config, path, value):
    """Set config[path[0]][path[1]]... = value (value DELETE removes the key)."""
    *parents, last = path
    for p in parents:
        config = config[p]
    if value is DELETE:
        del config[last]
    else:
        config[last] = value


DELETE = object()


# A value of the wrong type is a TypeError, a wrong value a ValueError (docs/design.md § Rules).
@pytest.mark.parametrize("path, value, match", [
    (("up", "bits"), DELETE, r"metadata up.bits .*missing"),
    (("up", "bits"), "3", r"metadata up.bits .*int.*'3'"),
    (("up", "bits"), 3.0, r"metadata up.bits .*int.*3.0"),
    (("up", "bits"), True, r"metadata up.bits"),
    (("up", "bits"), 5, r"metadata up.bits one of \(2, 3, 4\), got 5"),
    (("up", "group_size"), 48, r"metadata up.group_size one of"),
    (("up", "group_size"), 256, r"metadata up.in_features a multiple of group_size=256, got 128"),
    (("up", "cherries_per_row"), -1, r"metadata up.cherries_per_row"),
    (("up", "cherries_per_row"), 10**6, r"metadata up.cherries_per_row in \[0, 128\]"),
    (("up", "bias"), "yes", r"metadata up.bias True or False"),
    (("up", "bias"), False, r"metadata up.bias True \(as the model's layer\), got False"),
    (("down", "in_features"), 128, r"metadata down.in_features == 256"),
    (("up",), [3], r"metadata up an object"),
    (("nope",), {}, r"metadata layer name 'nope' .*Linear"),
])
def test_tampered_metadata_is_a_clear_value_error(tmp_path, path, value, match):
    qmodel = _quantized()
    config = _config(qmodel)
    _edit(config, path, value)
    file = tmp_path / "meta.safetensors"
    _write(file, _state(qmodel), config)
    error = TypeError if path == ("up", "bits") and isinstance(value, (str, float, bool)) else ValueError
    _load_fails(file, error, "pyfast.load_quantized: expected " + match)


@pytest.mark.parametrize("config, match", [
    ('["up"]', r"metadata pyfast.cherryq a JSON object"),
    ("{not json", r"pyfast CherryQ safetensors file"),
])
def test_metadata_not_an_object(tmp_path, config, match):
    qmodel = _quantized()
    file = tmp_path / "meta.safetensors"
    _write(file, _state(qmodel), config)
    _load_fails(file, ValueError, match)


@pytest.mark.parametrize("strict", [True, False])
def test_missing_quantized_tensor(tmp_path, strict):
    """Even with strict=False a quantized layer needs all of its tensors (no zero-filled layer)."""
    qmodel = _quantized()
    sd = _state(qmodel)
    del sd["up.scales"]
    file = tmp_path / "missing.safetensors"
    _write(file, sd, _config(qmodel))
    _load_fails(file, ValueError, r"up.scales.*missing", strict=strict)


def test_unexpected_and_missing_float_tensors(tmp_path):
    qmodel = _quantized()
    sd = _state(qmodel)
    sd["extra"] = torch.zeros(2)
    file = tmp_path / "extra.safetensors"
    _write(file, sd, _config(qmodel))
    _load_fails(file, ValueError, r"extra")
    loaded = pyfast.load_quantized(TinyMLP(), str(file), strict=False)  # ignored, never read
    assert isinstance(loaded.up, pyfast.CherryQLinear)
    del sd["extra"], sd["head.bias"]
    _write(file, sd, _config(qmodel))
    _load_fails(file, ValueError, r"head.bias.*missing")


def test_dequantize_rejects_a_tensor():
    with pytest.raises(TypeError, match=r"^pyfast.cherryq_dequantize: expected qw a CherryQWeight .*, got Tensor$"):
        pyfast.cherryq_dequantize(torch.randn(4, 128))
