"""Whole-model CherryQ tools: impact estimation (mean grad^2), quantize_model, safetensors I/O."""

from __future__ import annotations

import json
from typing import Callable, Iterable

import torch
from torch import nn

from pyfast._validate import fail
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


def quantize_model(
    model: nn.Module,
    *,
    bits: int = 3,
    group_size: int = 128,
    cherries_per_row: int | None = None,
    impact: dict[str, torch.Tensor] | None = None,
    skip: Iterable[str] = ("lm_head",),
    qat: bool = False,
) -> nn.Module:
    """Replace (in place) every nn.Linear / GPT-2 Conv1D with in_features % group_size == 0 by a
    CherryQLinear. impact: {layer name: [out, in]} from `estimate_impact` (default |w|).
    cherries_per_row=0 gives plain round-to-nearest. qat=True leaves the layers in QAT mode."""
    for name, layer in quantizable_layers(model, group_size, skip).items():
        imp = None if impact is None else impact.get(name)
        _set_submodule(model, name, CherryQLinear.from_linear(
            layer, bits=bits, group_size=group_size, cherries_per_row=cherries_per_row, impact=imp, qat=qat))
    return model


def finish_qat(model: nn.Module) -> nn.Module:
    """Pack every CherryQLinear still in QAT mode."""
    for m in model.modules():
        if isinstance(m, CherryQLinear):
            m.finish_qat()
    return model


# ---- safetensors ---------------------------------------------------------------------------
_META_KEY = "pyfast.cherryq"


def save_quantized(model: nn.Module, path: str) -> None:
    """Save a model's state_dict with safetensors, plus each CherryQLinear's config as metadata."""
    from safetensors.torch import save_file

    config = {name: {"bits": m.bits, "group_size": m.group_size, "cherries_per_row": m.cherries_per_row,
                     "in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None}
              for name, m in model.named_modules() if isinstance(m, CherryQLinear)}
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, path, metadata={_META_KEY: json.dumps(config)})


def load_quantized(model: nn.Module, path: str, *, strict: bool = True) -> nn.Module:
    """Load a file from `save_quantized` into `model` (a float model of the same architecture):
    the layers named in the file's metadata become CherryQLinear first. Errors on a truncated,
    tampered or mismatched file."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        config = json.loads(meta[_META_KEY])
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"pyfast.load_quantized: expected a pyfast CherryQ safetensors file, got {path} ({e})") from e
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise ValueError(f"pyfast.load_quantized: cannot read {path}: {e}") from e
    for name, c in config.items():
        dev = next((t.device for t in model.get_submodule(name).parameters()), torch.device("cpu"))
        _set_submodule(model, name, CherryQLinear(c["in_features"], c["out_features"], c["bias"], bits=c["bits"],
                                                  group_size=c["group_size"], cherries_per_row=c["cherries_per_row"],
                                                  device=dev))
    try:
        model.load_state_dict(tensors, strict=strict)
    except RuntimeError as e:
        raise ValueError(f"pyfast.load_quantized: {path} does not match the model: {e}") from e
    for name in config:
        check_cherries(name, model.get_submodule(name).quantized_weight)
    return model


def check_cherries(name: str, qw) -> None:
    """What the kernels rely on and a tampered file could break: cherry columns in range and
    strictly ascending per row, and packed code 0 under every cherry."""
    from pyfast.cherryq.format import unpack_codes
    from pyfast.cherryq.ops import check_weight

    op = "load_quantized"
    check_weight(op, qw)
    idx = qw.cherry_idx.long()
    if not idx.numel():
        return
    if idx.min() < 0 or idx.max() >= qw.in_features:
        fail(op, f"{name}.cherry_idx", f"values in [0, {qw.in_features})", "out-of-range indices")
    if (idx[:, 1:] <= idx[:, :-1]).any():
        fail(op, f"{name}.cherry_idx", "strictly ascending columns per row", "repeated or unsorted columns")
    if unpack_codes(qw.qweight, qw.bits).gather(1, idx).any():
        fail(op, f"{name}.qweight", "code 0 under every cherry", "non-zero codes")
