"""Whole-model CherryQ tools: impact estimation (mean grad^2), quantize_model, safetensors I/O."""

from __future__ import annotations

import json
import warnings
from typing import Callable, Iterable

import torch
from torch import nn

from pyfast._validate import check_choice, check_int, fail, fail_type
from pyfast.cherryq.format import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, TENSOR_FIELDS, CherryQWeight, packed_layout
from pyfast.cherryq.modules import CherryQLinear, is_conv1d, linear_weight


def quantizable_layers(model: nn.Module, group_size: int = 128, skip: Iterable[str] = ()) -> dict[str, nn.Module]:
    """nn.Linear / Conv1D layers whose in_features is a multiple of group_size, minus names containing `skip`."""
    out = {}
    for name, mod in model.named_modules():
        if not (isinstance(mod, nn.Linear) or is_conv1d(mod)) or any(s in name for s in skip):
            continue
        if linear_weight(mod).shape[1] % group_size == 0:
            out[name] = mod
    return out


def causal_lm_loss(model: nn.Module, batch) -> torch.Tensor:
    """Next-token cross-entropy for a transformers causal LM on a LongTensor batch [B, T] (or a dict)."""
    inputs = batch if isinstance(batch, dict) else {"input_ids": batch}
    out = model(**inputs, labels=inputs["input_ids"])
    return out.loss


def estimate_impact(
    model: nn.Module,
    batches: Iterable,
    *,
    loss_fn: Callable[[nn.Module, object], torch.Tensor] = causal_lm_loss,
    layers: dict[str, nn.Module] | None = None,
) -> dict[str, torch.Tensor]:
    """CherryQ's impact criterion: mean over batches of grad^2 of each linear weight.

    Returns {layer name: float32 [out_features, in_features]} (Conv1D transposed to match).
    `loss_fn(model, batch)` defaults to the causal-LM loss of a transformers model.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
        >>> batches = [torch.randn(4, 128) for _ in range(3)]
        >>> impact = pyfast.estimate_impact(model, batches, loss_fn=lambda m, x: m(x).square().mean())
        >>> {name: tuple(t.shape) for name, t in impact.items()}
        {'0': (64, 128), '2': (8, 64)}
    """
    layers = quantizable_layers(model, group_size=1) if layers is None else layers
    sums = {name: torch.zeros_like(linear_weight(m), dtype=torch.float32) for name, m in layers.items()}
    was_training = model.training
    model.eval()
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for m in layers.values():
        m.weight.requires_grad_(True)
    count = 0
    try:
        for batch in batches:
            for m in layers.values():
                m.weight.grad = None
            loss_fn(model, batch).backward()
            for name, m in layers.items():
                g = linear_weight(m).grad if isinstance(m, nn.Linear) else m.weight.grad.t()
                sums[name] += g.float().square()
            count += 1
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
            p.grad = None
        model.train(was_training)
    if count == 0:
        fail("estimate_impact", "batches", "at least one batch", "none")
    return {name: s / count for name, s in sums.items()}


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _plan(model: nn.Module, group_size: int, fallback_group_size: int | None, skip: Iterable[str]):
    """-> ({name: (layer, group size)} to quantize, {name: reason} skipped), in module order."""
    skip = tuple(skip)
    todo, skipped = {}, {}
    for name, mod in model.named_modules():
        if not (isinstance(mod, nn.Linear) or is_conv1d(mod)):
            continue
        match = next((s for s in skip if s in name), None)
        k = linear_weight(mod).shape[1]
        if match is not None:
            skipped[name] = f"name matches skip {match!r}"
        elif k % group_size == 0:
            todo[name] = (mod, group_size)
        elif fallback_group_size is not None and k % fallback_group_size == 0:
            todo[name] = (mod, fallback_group_size)
        else:
            skipped[name] = f"in_features={k} is not a multiple of {_sizes(group_size, fallback_group_size)}"
    return todo, skipped


def _sizes(group_size: int, fallback_group_size: int | None) -> str:
    return f"group_size={group_size}" + ("" if fallback_group_size is None else
                                         f" or fallback_group_size={fallback_group_size}")


def _fallback_hint(ks: list[int], group_size: int) -> int | None:
    """The largest supported group size below group_size that divides every in_features in ks."""
    fits = [g for g in SUPPORTED_GROUP_SIZES if g < group_size and all(k % g == 0 for k in ks)]
    return max(fits, default=None)


def quantize_model(
    model: nn.Module,
    *,
    bits: int = 3,
    group_size: int = 128,
    cherries_per_row: int | None = None,
    impact: dict[str, torch.Tensor] | None = None,
    skip: Iterable[str] = ("lm_head",),
    qat: bool = False,
    fallback_group_size: int | None = None,
    return_summary: bool = False,
):
    """Replace (in place) every nn.Linear / GPT-2 Conv1D with in_features % group_size == 0 by a
    CherryQLinear, and return the model. impact: {layer name: [out, in]} from `estimate_impact`
    (default |w|). cherries_per_row=0 gives plain round-to-nearest. qat=True leaves the layers in
    QAT mode. Layers whose name contains a string of `skip` are left as they are.

    Layers whose in_features is not a multiple of group_size cannot use it: with
    `fallback_group_size` (a supported group size smaller than group_size) they are quantized
    with that one when it divides their in_features; the others stay in float, and a single
    UserWarning names them, why, and a fallback group size that would fit them (layers left out
    by `skip` are not warned about). `return_summary=True` returns `(model, summary)` instead,
    summary = {"quantized": {name: group size used}, "skipped": {name: reason}} over every
    nn.Linear / Conv1D of the model, in module order.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(256, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
        >>> model = pyfast.quantize_model(model, bits=3, group_size=128)  # in_features 64: kept, with a warning
        >>> [type(m).__name__ for m in model]
        ['CherryQLinear', 'ReLU', 'Linear']
        >>> model = torch.nn.Sequential(torch.nn.Linear(256, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
        >>> model, summary = pyfast.quantize_model(model, group_size=128, fallback_group_size=64, return_summary=True)
        >>> summary
        {'quantized': {'0': 128, '2': 64}, 'skipped': {}}
    """
    op = "quantize_model"
    check_choice(op, "group_size", group_size, SUPPORTED_GROUP_SIZES)
    if fallback_group_size is not None:
        check_choice(op, "fallback_group_size", fallback_group_size, SUPPORTED_GROUP_SIZES)
        if fallback_group_size >= group_size:
            fail(op, "fallback_group_size", f"None or a group size smaller than group_size={group_size}",
                 fallback_group_size)
    if not isinstance(return_summary, bool):
        fail_type(op, "return_summary", "a bool", f"{type(return_summary).__name__} {return_summary!r}")
    todo, skipped = _plan(model, group_size, fallback_group_size, skip)
    for name, (layer, g) in todo.items():
        imp = None if impact is None else impact.get(name)
        _set_submodule(model, name, CherryQLinear.from_linear(
            layer, bits=bits, group_size=g, cherries_per_row=cherries_per_row, impact=imp, qat=qat))
    summary = {"quantized": {name: g for name, (_, g) in todo.items()}, "skipped": skipped}
    by_shape = {name: reason for name, reason in skipped.items() if not reason.startswith("name matches skip")}
    if by_shape:
        modules = dict(model.named_modules())
        ks = {name: linear_weight(modules[name]).shape[1] for name in by_shape}
        hint = _fallback_hint(list(ks.values()), group_size)
        listed = _some([f"{name} (in_features={k})" for name, k in ks.items()])
        advice = (f"fallback_group_size={hint} would quantize them" if hint is not None and hint != fallback_group_size
                  else f"no supported group size below {group_size} divides them all")
        warnings.warn(f"pyfast.{op}: {len(ks)} of {len(todo) + len(ks)} linear layers left unquantized "
                      f"(in_features not a multiple of {_sizes(group_size, fallback_group_size)}): {listed}; {advice}",
                      UserWarning, stacklevel=2)
    return (model, summary) if return_summary else model


def finish_qat(model: nn.Module) -> nn.Module:
    """Pack every CherryQLinear still in QAT mode.

    Example:
        >>> model = pyfast.quantize_model(torch.nn.Sequential(torch.nn.Linear(128, 16)), group_size=64, qat=True)
        >>> model(torch.randn(2, 128)).sum().backward()          # train the float master weights ...
        >>> model = pyfast.finish_qat(model)                      # ... then pack them
        >>> model[0].qat
        False
    """
    for m in model.modules():
        if isinstance(m, CherryQLinear):
            m.finish_qat()
    return model


# ---- safetensors ---------------------------------------------------------------------------
_META_KEY = "pyfast.cherryq"


def save_quantized(model: nn.Module, path: str) -> None:
    """Save a model's state_dict with safetensors, plus each CherryQLinear's config as metadata.

    Example (and the way back, `load_quantized`):
        >>> import os, tempfile
        >>> model = pyfast.quantize_model(torch.nn.Sequential(torch.nn.Linear(128, 16)), group_size=64)
        >>> path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
        >>> pyfast.save_quantized(model, path)
        >>> fresh = pyfast.load_quantized(torch.nn.Sequential(torch.nn.Linear(128, 16)), path)
        >>> x = torch.randn(3, 128)
        >>> torch.equal(fresh(x), model(x))
        True
    """
    from safetensors.torch import save_file

    config = {name: {"bits": m.bits, "group_size": m.group_size, "cherries_per_row": m.cherries_per_row,
                     "in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None}
              for name, m in model.named_modules() if isinstance(m, CherryQLinear)}
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, path, metadata={_META_KEY: json.dumps(config)})


def load_quantized(model: nn.Module, path: str, *, strict: bool = True) -> nn.Module:
    """Load a file from `save_quantized` into `model` (a float model of the same architecture):
    the layers named in the file's metadata become CherryQLinear. Every tensor must have the
    dtype and shape the model (and the CherryQ format) gives it: no silent conversion. Errors on
    a truncated, tampered or mismatched file (TypeError for a dtype, ValueError otherwise), from
    the header before reading any data, and leave the model unchanged.

    Example: see `save_quantized`.
        >>> pyfast.load_quantized(torch.nn.Linear(4, 4), "/nonexistent.safetensors")
        Traceback (most recent call last):
        ...
        ValueError: pyfast.load_quantized: expected path a readable safetensors file, got /nonexistent.safetensors ...
    """
    from safetensors import safe_open

    op = "load_quantized"
    try:
        # header only: the "numpy" view maps nothing into torch (the "pt" one maps the whole file,
        # which fails or costs memory for a header claiming terabytes)
        with safe_open(path, framework="numpy") as f:
            meta = f.metadata() or {}
            header = {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise ValueError(f"pyfast.{op}: expected path a readable safetensors file, got {path} ({e})") from e
    try:
        config = json.loads(meta[_META_KEY])
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"pyfast.{op}: expected a pyfast CherryQ safetensors file, got {path} ({e})") from e
    layers = _check_config(op, model, config)
    expected = {k: (v.dtype, tuple(v.shape)) for k, v in model.state_dict().items()
                if not any(k.startswith(name + ".") for name in layers)}
    for name, (layer, c) in layers.items():
        expected.update({f"{name}.{k}": spec for k, spec in _layer_tensors(c, _bias_dtype(layer)).items()})
    keys = _check_header(op, header, expected, strict, required=[k for k in expected if k.rpartition(".")[0] in layers])
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in keys}
    except Exception as e:
        raise ValueError(f"pyfast.{op}: expected path a readable safetensors file, got {path} ({e})") from e
    new = {}
    for name, (layer, c) in layers.items():
        check_cherries(name, CherryQWeight(*(tensors[f"{name}.{f}"] for f in TENSOR_FIELDS), bits=c["bits"],
                                           group_size=c["group_size"]))
        new[name] = CherryQLinear(c["in_features"], c["out_features"], c["bias"], bits=c["bits"],
                                  group_size=c["group_size"], cherries_per_row=c["cherries_per_row"],
                                  device=_device(layer), dtype=_bias_dtype(layer) or torch.float32)
    # everything is checked: only now is the model changed
    for name, q in new.items():
        _set_submodule(model, name, q)
    try:
        model.load_state_dict(tensors, strict=strict)
    except RuntimeError as e:
        for name, (layer, _) in layers.items():
            _set_submodule(model, name, layer)
        raise ValueError(f"pyfast.{op}: {path} does not match the model: {e}") from e
    return model


def _some(keys: list[str]) -> str:
    return ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")


_CONFIG_INTS = {"bits": 1, "group_size": 1, "cherries_per_row": 0, "in_features": 1, "out_features": 1}
_HEADER_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                  torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                  torch.bool: "BOOL"}


def _check_config(op: str, model: nn.Module, config) -> dict[str, tuple[nn.Module, dict]]:
    """The file's metadata {layer name: CherryQLinear config}, checked against the model's layers
    (in/out features, bias) and the format (bits, group size, cherries). -> {name: (layer, config)}."""
    if not isinstance(config, dict):
        fail(op, f"metadata {_META_KEY}", "a JSON object {layer name: config}", type(config).__name__)
    modules = dict(model.named_modules())
    out = {}
    for name, c in config.items():
        layer = modules.get(name) if name else None
        if not (isinstance(layer, (nn.Linear, CherryQLinear)) or is_conv1d(layer)):
            fail(op, f"metadata layer name {name!r}", "an nn.Linear, Conv1D or CherryQLinear of the model",
                 type(modules[name]).__name__ if name in modules else "no such submodule")
        if not isinstance(c, dict):
            fail(op, f"metadata {name}", "an object " + str({k: "int" for k in _CONFIG_INTS} | {"bias": "bool"}),
                 type(c).__name__)
        for k in (*_CONFIG_INTS, "bias"):
            if k not in c:
                fail(op, f"metadata {name}.{k}", "present", "missing")
        for k, minimum in _CONFIG_INTS.items():
            check_int(op, f"metadata {name}.{k}", c[k], minimum=minimum)
        check_choice(op, f"metadata {name}.bits", c["bits"], SUPPORTED_BITS)
        check_choice(op, f"metadata {name}.group_size", c["group_size"], SUPPORTED_GROUP_SIZES)
        q = isinstance(layer, CherryQLinear)
        n, k = (layer.out_features, layer.in_features) if q else linear_weight(layer).shape
        for key, want in (("in_features", k), ("out_features", n)):
            if c[key] != want:
                fail(op, f"metadata {name}.{key}", f"== {want} (the model's layer)", c[key])
        if k % c["group_size"]:
            fail(op, f"metadata {name}.in_features", f"a multiple of group_size={c['group_size']}", k)
        if c["cherries_per_row"] > k:
            fail(op, f"metadata {name}.cherries_per_row", f"in [0, {k}]", c["cherries_per_row"])
        if not isinstance(c["bias"], bool):
            fail(op, f"metadata {name}.bias", "True or False", repr(c["bias"]))
        if c["bias"] != (layer.bias is not None):
            fail(op, f"metadata {name}.bias", f"{layer.bias is not None} (as the model's layer)", c["bias"])
        out[name] = (layer, c)
    return out


def _bias_dtype(layer: nn.Module) -> torch.dtype | None:
    return None if layer.bias is None else layer.bias.dtype


def _device(layer: nn.Module) -> torch.device:
    return next((t.device for t in layer.state_dict().values()), torch.device("cpu"))


def _layer_tensors(c: dict, bias_dtype: torch.dtype | None) -> dict[str, tuple[torch.dtype, tuple]]:
    """{tensor name: (dtype, shape)} of a CherryQLinear with config c (see pyfast.cherryq.format)."""
    n = c["out_features"]
    out = dict(packed_layout(n, c["in_features"], c["cherries_per_row"], c["bits"], c["group_size"]))
    if bias_dtype is not None:
        out["bias"] = (bias_dtype, (n,))
    return out


def _check_header(op: str, header: dict, expected: dict, strict: bool, required: list[str]) -> list[str]:
    """Check the header's {key: (dtype string, shape)} against expected {key: (dtype, shape)}:
    every key of a quantized layer (and with strict every key) present, no unknown key with
    strict, dtypes and shapes exact. Returns the keys to read."""
    missing = [k for k in (expected if strict else required) if k not in header]
    if missing:
        fail(op, "tensors " + _some(missing), "in the file", "missing")
    unexpected = [k for k in header if k not in expected]
    if strict and unexpected:
        fail(op, "only tensors of the model", "in the file (strict=False ignores others)", "also " + _some(unexpected))
    keys = [k for k in header if k in expected]
    for key in keys:
        (dtype, shape), (got_dtype, got_shape) = expected[key], header[key]
        want = _HEADER_DTYPES.get(dtype)
        if want is not None and got_dtype != want:
            fail_type(op, key, f"of dtype {dtype} ({want})", got_dtype)
        if tuple(got_shape) != shape:
            fail(op, key, f"of shape {list(shape)}", f"shape {list(got_shape)}")
    return keys


def check_cherries(name: str, qw) -> None:
    """The rules of a packed weight (pyfast.cherryq.ops.check_weight: shapes, dtypes, cherry columns
    in range and strictly ascending, code 0 under every cherry), naming the layer on failure."""
    from pyfast.cherryq.ops import check_weight

    try:
        check_weight("load_quantized", qw)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{e} (layer {name})") from None
