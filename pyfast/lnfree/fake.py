"""FakeLN: LayerNorm with its per-token scale frozen to one scalar per LN, the tool of the LN-removal
fine-tune ("Transformers Don't Need LayerNorm at Inference Time", 2025).

    LayerNorm(x) = (x - mean(x)) / sqrt(var(x) + eps) * gamma + beta      (per token)
    FakeLN(x)    = (x - mean(x)) / sigma * gamma + beta                    (sigma fixed)

A FakeLN is linear in x, so a model whose every LN is a FakeLN folds into plain weights
(pyfast.lnfree.fold). The paper fine-tunes with the LNs switched to FakeLN one group at a time (the
MLP inputs ln_2 first, then the attention inputs ln_1, then the final ln_f), re-estimating sigma at
each switch: `LNRemovalSchedule` does that from a plain PyTorch training loop.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch
from torch import nn

# The paper's removal order: the groups of a GPT-2 (by the LN's attribute name), first to last.
GPT2_GROUPS = ("ln_2", "ln_1", "ln_f")


def _fail(fn: str, arg: str, expected: str, got) -> None:
    raise ValueError(f"pyfast.lnfree.{fn}: expected {arg} {expected}, got {got}")


class FakeLayerNorm(nn.Module):
    """(x - mean(x)) / sigma * weight + bias over the last dim, sigma a fixed positive scalar.

    weight, bias: [d] (the replaced LayerNorm's own Parameters, so an optimizer that holds them
    keeps training them); sigma: a float, kept as a float64 buffer. Computes in x's dtype."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, sigma: float):
        super().__init__()
        if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
            _fail("FakeLayerNorm", "sigma", "a finite positive float", repr(sigma))
        self.weight = weight
        self.bias = bias
        self.register_buffer("sigma", torch.tensor(float(sigma), dtype=torch.float64))
        self.normalized_shape = (weight.shape[0],)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x - x.mean(-1, keepdim=True)) / self.sigma.to(x.dtype) * self.weight
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"{self.normalized_shape[0]}, sigma={float(self.sigma):.6g}"


def layernorms(model: nn.Module, kinds=(nn.LayerNorm,)) -> dict[str, nn.Module]:
    """{qualified name: module} of every module of `kinds` in model, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, kinds)}


def _forward(model: nn.Module, batch) -> torch.Tensor | None:
    """Run one calibration batch: a dict of model keyword arguments (its attention_mask, if any, says
    which tokens count) or a tensor of input ids. Returns the token mask [B, T] or None."""
    if isinstance(batch, Mapping):
        model(**batch)
        return batch.get("attention_mask")
    model(batch)
    return None


@torch.no_grad()
def estimate_ln_scales(model: nn.Module, batches: Iterable, names: Iterable[str] | None = None) -> dict[str, float]:
    """{LN name: sigma}: at the input of each LayerNorm (or FakeLayerNorm) of `model`, the mean over
    tokens of the per-token standard deviation sqrt(var(x) + eps) (the divisor the LN itself applies;
    eps 0 for a FakeLayerNorm), over the tokens of `batches` (masked-out tokens excluded).

    batches: an iterable of input-id tensors [B, T] or of dicts of model keyword arguments (with
    `attention_mask` to exclude padding). names: only these LNs (default: all). The model runs in
    eval mode for the estimate and gets its training flag back.

    Example:
        >>> scales = estimate_ln_scales(gpt2, [ids])          # {"transformer.h.0.ln_1": 2.7, ...}
        >>> fake_layernorm(gpt2, scales)
    """
    found = layernorms(model, (nn.LayerNorm, FakeLayerNorm))
    wanted = list(found) if names is None else list(names)
    for n in wanted:
        if n not in found:
            _fail("estimate_ln_scales", "names", f"LayerNorm modules of the model (e.g. {next(iter(found), None)!r})",
                  repr(n))
    sums = {n: [0.0, 0] for n in wanted}
    current_mask: list[torch.Tensor | None] = [None]

    def hook(name, eps):
        def record(module, args):
            x = args[0].detach().double()
            std = (x.var(-1, unbiased=False) + eps).sqrt()  # [..., T]
            mask = current_mask[0]
            if mask is not None and mask.shape == std.shape:
                keep = mask.to(torch.bool)
                sums[name][0] += float(std[keep].sum())
                sums[name][1] += int(keep.sum())
            else:
                sums[name][0] += float(std.sum())
                sums[name][1] += std.numel()
        return record

    handles = [found[n].register_forward_pre_hook(hook(n, getattr(found[n], "eps", 0.0)
                                                       if isinstance(found[n], nn.LayerNorm) else 0.0))
               for n in wanted]
    training = model.training
    model.eval()
    try:
        for batch in batches:
            if isinstance(batch, Mapping):
                current_mask[0] = batch.get("attention_mask")
            else:
                current_mask[0] = None
            _forward(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(training)
    out = {}
    for n, (total, count) in sums.items():
        if count == 0:
            _fail("estimate_ln_scales", "batches", f"tokens that reach {n}", "none")
        out[n] = total / count
    return out


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def fake_layernorm(model: nn.Module, scales: Mapping[str, float]) -> nn.Module:
    """Replace the LayerNorms named in `scales` (all of them when `scales` names every LN, as
    estimate_ln_scales returns it) by FakeLayerNorm with that sigma, in place; returns model.

    Each FakeLayerNorm takes over the LN's weight and bias Parameters (an optimizer built before
    the switch keeps updating them). Every name must be a LayerNorm of the model and every sigma a
    finite positive number: nothing is replaced otherwise."""
    found = layernorms(model)
    for n, s in scales.items():
        if n not in found:
            _fail("fake_layernorm", "scales", "keys naming nn.LayerNorm modules of the model", repr(n))
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
            _fail("fake_layernorm", f"scales[{n!r}]", "a finite positive float", repr(s))
        if not found[n].elementwise_affine or len(found[n].normalized_shape) != 1:
            _fail("fake_layernorm", f"{n}", "a LayerNorm over the last dim with weight and bias",
                  repr(found[n]))
    for n, s in scales.items():
        ln = found[n]
        _set_module(model, n, FakeLayerNorm(ln.weight, ln.bias, float(s)).to(ln.weight.device))
    return model


class LNRemovalSchedule:
    """Switch a model's LayerNorms to FakeLN one group at a time during fine-tuning (the paper's
    order: every block's ln_2, then ln_1, then ln_f), re-estimating sigma of each group from
    `batches` with the model as trained so far at the moment of its switch.

    switch_steps: the training step at which each group switches (one per group, non-decreasing).
    Call `step(i)` once per training step (before the forward); it returns the groups switched at
    that call. The Parameters stay the same objects, so the optimizer needs no rebuilding.

    Example:
        >>> sched = LNRemovalSchedule(gpt2, calib_batches, switch_steps=(0, 100, 200))
        >>> for i, batch in enumerate(loader):
        ...     sched.step(i)
        ...     loss = gpt2(**batch, labels=batch["input_ids"]).loss; loss.backward(); opt.step(); opt.zero_grad()
        >>> assert sched.done                                  # no nn.LayerNorm left: ready for fold()
    """

    def __init__(self, model: nn.Module, batches: Iterable, switch_steps: Iterable[int],
                 groups: Iterable[str] = GPT2_GROUPS):
        self.model, self.batches = model, list(batches)
        self.groups, self.switch_steps = tuple(groups), tuple(switch_steps)
        if len(self.switch_steps) != len(self.groups):
            _fail("LNRemovalSchedule", "switch_steps", f"{len(self.groups)} steps, one per group {self.groups}",
                  self.switch_steps)
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.switch_steps) or \
                list(self.switch_steps) != sorted(self.switch_steps):
            _fail("LNRemovalSchedule", "switch_steps", "non-negative ints in non-decreasing order", self.switch_steps)
        if not self.batches:
            _fail("LNRemovalSchedule", "batches", "at least one calibration batch", "none")
        for g in self.groups:
            if not self._members(g):
                _fail("LNRemovalSchedule", "groups", "names of LayerNorm attributes in the model", repr(g))
        self.switched: dict[str, dict[str, float]] = {}  # group -> the sigmas it got

    def _members(self, group: str) -> list[str]:
        return [n for n in layernorms(self.model) if n.rpartition(".")[2] == group]

    def step(self, i: int) -> list[str]:
        done = []
        for g, at in zip(self.groups, self.switch_steps):
            if g not in self.switched and i >= at:
                scales = estimate_ln_scales(self.model, self.batches, self._members(g))
                fake_layernorm(self.model, scales)
                self.switched[g] = scales
                done.append(g)
        return done

    @property
    def done(self) -> bool:
        return len(self.switched) == len(self.groups)
