"""FakeLN: LayerNorm with its per-token scale frozen to one scalar per LN, the tool of the LN-removal
fine-tune ("Transformers Don't Need LayerNorm at Inference Time", 2025).

    LayerNorm(x) = (x - mean(x)) / sqrt(var(x) + eps) * gamma + beta      (per token)
    FakeLN(x)    = (x - mean(x)) / sigma * gamma + beta                    (sigma fixed)

A FakeLN is linear in x, so a model whose every LN is a FakeLN folds into plain weights
(pyfast.lnfree.fold). The paper fine-tunes with the LNs switched to FakeLN one group at a time (the
MLP inputs ln_2 first, then the attention inputs ln_1, then the final ln_f), re-estimating sigma at
each switch: `LNRemovalSchedule` does that from a plain PyTorch training loop.

RMSNorm models (the Llama family: x / sqrt(mean(x^2) + eps) * gamma) get the same treatment
without the centering: FakeRMSNorm(x) = x / sigma * gamma. estimate_ln_scales, fake_layernorm and
LNRemovalSchedule take both kinds (an RMSNorm is any module whose class name ends in "RMSNorm"
with a `weight` and an eps, as transformers' LlamaRMSNorm); LLAMA_GROUPS is their removal order.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch
from torch import nn

from pyfast._validate import fail

# The paper's removal order: the groups of a GPT-2 (by the LN's attribute name), first to last,
# and the same order for the Llama family's RMSNorms (MLP inputs, attention inputs, final norm).
GPT2_GROUPS = ("ln_2", "ln_1", "ln_f")
LLAMA_GROUPS = ("post_attention_layernorm", "input_layernorm", "norm")


def _fail(fn: str, arg: str, expected: str, got) -> None:
    fail(f"lnfree.{fn}", arg, expected, got)


def _check_sigma(fn: str, arg: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        _fail(fn, arg, "a finite positive float", repr(value))
    return float(value)


class _FixedScale(nn.Module):
    """The fixed divisor of a fake norm: sigma, and optionally sigma0 for a sequence's first
    position (where models keep their "attention sink", a residual many times larger than the
    others: SmolLM2's first token has ~8x the mean RMS). sigma0 applies to row 0 of an input of
    T >= 2 rows ([..., T, d]: a full or prefill sequence starting at position 0, no left padding);
    single-row inputs (decode steps) use sigma. Both float64 buffers."""

    def __init__(self, fn: str, sigma, sigma0=None):
        super().__init__()
        self.register_buffer("sigma", torch.tensor(_check_sigma(fn, "sigma", sigma), dtype=torch.float64))
        self.register_buffer("sigma0", None if sigma0 is None else
                             torch.tensor(_check_sigma(fn, "sigma0", sigma0), dtype=torch.float64))

    def divide(self, x: torch.Tensor) -> torch.Tensor:
        if self.sigma0 is None or x.dim() < 2 or x.shape[-2] < 2:
            return x / self.sigma.to(x.dtype)
        s = self.sigma.to(x.dtype).expand(x.shape[-2]).clone()
        s[0] = self.sigma0.to(x.dtype)
        return x / s[:, None]

    def extra_repr(self) -> str:
        first = "" if self.sigma0 is None else f", sigma0={float(self.sigma0):.6g}"
        return f"{self.weight.shape[0]}, sigma={float(self.sigma):.6g}{first}"


class FakeLayerNorm(_FixedScale):
    """(x - mean(x)) / sigma * weight + bias over the last dim, sigma a fixed positive scalar
    (sigma0, if given, for the first position of multi-token inputs; see _FixedScale).

    weight, bias: [d] (the replaced LayerNorm's own Parameters, so an optimizer that holds them
    keeps training them); sigma: a float, kept as a float64 buffer. Computes in x's dtype."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, sigma: float, sigma0: float | None = None):
        super().__init__("FakeLayerNorm", sigma, sigma0)
        self.weight = weight
        self.bias = bias
        self.normalized_shape = (weight.shape[0],)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.divide(x - x.mean(-1, keepdim=True)) * self.weight
        return y + self.bias if self.bias is not None else y


class FakeRMSNorm(_FixedScale):
    """x / sigma * weight over the last dim, sigma a fixed positive scalar (a float64 buffer;
    sigma0 as for FakeLayerNorm); weight: the replaced RMSNorm's own Parameter. Computes in fp32,
    returns x's dtype (as transformers' RMSNorm does)."""

    def __init__(self, weight: nn.Parameter, sigma: float, sigma0: float | None = None):
        super().__init__("FakeRMSNorm", sigma, sigma0)
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * self.divide(x.float()).to(x.dtype)


def is_rmsnorm(m: nn.Module) -> bool:
    return (type(m).__name__.endswith("RMSNorm") and isinstance(getattr(m, "weight", None), torch.Tensor)
            and _eps(m) is not None)


def _eps(m: nn.Module) -> float | None:
    for attr in ("variance_epsilon", "eps"):
        v = getattr(m, attr, None)
        if isinstance(v, (int, float)):
            return float(v)
    return None


def is_norm(m: nn.Module) -> bool:
    """A real normalization pyfast.lnfree can replace: nn.LayerNorm or an RMSNorm."""
    return isinstance(m, nn.LayerNorm) or is_rmsnorm(m)


def layernorms(model: nn.Module, kinds=None) -> dict[str, nn.Module]:
    """{qualified name: module} of every real normalization (nn.LayerNorm, RMSNorm), or of every
    module of `kinds`, in model order."""
    test = is_norm if kinds is None else (lambda m: isinstance(m, kinds))
    return {name: m for name, m in model.named_modules() if test(m)}


def _forward(model: nn.Module, batch) -> None:
    """Run one calibration batch: a dict of model keyword arguments or a tensor of input ids."""
    if isinstance(batch, Mapping):
        model(**batch)
    else:
        model(batch)


@torch.no_grad()
def estimate_ln_scales(model: nn.Module, batches: Iterable, names: Iterable[str] | None = None, *,
                       separate_first: bool = False) -> dict:
    """{LN name: sigma}: at the input of each LayerNorm (or FakeLayerNorm) of `model`, the mean over
    tokens of the per-token standard deviation sqrt(var(x) + eps) (the divisor the LN itself applies;
    eps 0 for a FakeLayerNorm), over the tokens of `batches` (masked-out tokens excluded). For an
    RMSNorm (or FakeRMSNorm) the per-token root mean square sqrt(mean(x^2) + eps) instead.
    separate_first: {name: (sigma, sigma0)}, sigma0 the mean over the first position of every
    sequence and sigma over the others (for models whose first position carries an outsized
    residual; batches then must not be left-padded).

    batches: an iterable of input-id tensors [B, T] or of dicts of model keyword arguments (with
    `attention_mask` to exclude padding). names: only these LNs (default: all). The model runs in
    eval mode for the estimate and gets its training flag back.

    Example:
        >>> scales = estimate_ln_scales(gpt2, [ids])          # {"transformer.h.0.ln_1": 2.7, ...}
        >>> fake_layernorm(gpt2, scales)
    """
    found = {n: m for n, m in model.named_modules() if is_norm(m) or isinstance(m, (FakeLayerNorm, FakeRMSNorm))}
    wanted = list(found) if names is None else list(names)
    for n in wanted:
        if n not in found:
            _fail("estimate_ln_scales", "names", f"LayerNorm modules of the model (e.g. {next(iter(found), None)!r})",
                  repr(n))
    sums = {n: [0.0, 0] for n in wanted}
    first = {n: [0.0, 0] for n in wanted}  # position 0 (separate_first)
    current_mask: list[torch.Tensor | None] = [None]

    def hook(name, eps, centered):
        def record(module, args):
            x = args[0].detach().double()
            spread = x.var(-1, unbiased=False) if centered else x.pow(2).mean(-1)
            std = (spread + eps).sqrt()  # [..., T]
            if separate_first and std.dim() >= 1 and std.shape[-1] >= 2:
                first[name][0] += float(std[..., 0].sum())
                first[name][1] += std[..., 0].numel()
                std = std[..., 1:]
            mask = current_mask[0]
            if mask is not None and separate_first:
                mask = mask[..., 1:]
            if mask is not None and mask.shape != std.shape:
                _fail("estimate_ln_scales", "attention_mask", f"the shape of the tokens reaching {name} "
                      f"({list(std.shape)})", f"shape {list(mask.shape)}")
            if mask is not None:
                keep = mask.to(torch.bool)
                sums[name][0] += float(std[keep].sum())
                sums[name][1] += int(keep.sum())
            else:
                sums[name][0] += float(std.sum())
                sums[name][1] += std.numel()
        return record

    handles = []
    for n in wanted:
        m = found[n]
        eps = _eps(m) if is_norm(m) else 0.0  # a fake divides by sigma alone
        handles.append(m.register_forward_pre_hook(hook(n, eps, isinstance(m, (nn.LayerNorm, FakeLayerNorm)))))
    training = model.training
    model.eval()
    try:
        for batch in batches:
            mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
            if mask is not None and separate_first and not bool((mask[..., 0] != 0).all()):
                _fail("estimate_ln_scales", "attention_mask", "no left padding with separate_first (every "
                      "sequence's first token real)", "a padded first position")
            current_mask[0] = mask
            _forward(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(training)
    out = {}
    for n, (total, count) in sums.items():
        if count == 0 or (separate_first and first[n][1] == 0):
            _fail("estimate_ln_scales", "batches", f"tokens that reach {n}" + (" (sequences of >= 2 tokens)"
                  if separate_first else ""), "none")
        out[n] = (total / count, first[n][0] / first[n][1]) if separate_first else total / count
    return out


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def fake_layernorm(model: nn.Module, scales: Mapping[str, float]) -> nn.Module:
    """Replace the normalizations named in `scales` (all of them when `scales` names every one, as
    estimate_ln_scales returns it) in place, each LayerNorm by a FakeLayerNorm and each RMSNorm by
    a FakeRMSNorm with that sigma (a (sigma, sigma0) pair: sigma0 for the first position, as
    estimate_ln_scales(separate_first=True) returns them); returns model.

    Each fake takes over the norm's weight (and bias) Parameters (an optimizer built before the
    switch keeps updating them). Every name must be a LayerNorm or RMSNorm of the model and every
    sigma a finite positive number: nothing is replaced otherwise."""
    found = layernorms(model)
    for n, s in scales.items():
        if n not in found:
            _fail("fake_layernorm", "scales", "keys naming nn.LayerNorm / RMSNorm modules of the model", repr(n))
        for i, v in enumerate(s if isinstance(s, tuple) and len(s) == 2 else (s,)):
            _check_sigma("fake_layernorm", f"scales[{n!r}]" + ("" if not isinstance(s, tuple) else f"[{i}]"), v)
        m = found[n]
        if isinstance(m, nn.LayerNorm) and (not m.elementwise_affine or len(m.normalized_shape) != 1):
            _fail("fake_layernorm", f"{n}", "a LayerNorm over the last dim with weight and bias", repr(m))
    for n, s in scales.items():
        m = found[n]
        sigma, sigma0 = s if isinstance(s, tuple) else (s, None)
        fake = FakeLayerNorm(m.weight, m.bias, sigma, sigma0) if isinstance(m, nn.LayerNorm) else \
            FakeRMSNorm(m.weight, sigma, sigma0)
        _set_module(model, n, fake.to(m.weight.device))
    return model


class LNRemovalSchedule:
    """Switch a model's LayerNorms to FakeLN one group at a time during fine-tuning (the paper's
    order: every block's ln_2, then ln_1, then ln_f), re-estimating sigma of each group from
    `batches` with the model as trained so far at the moment of its switch.

    groups: attribute names (every norm so named is one group, as GPT2_GROUPS / LLAMA_GROUPS) or
    full module names (one norm each: the finest schedule, one norm at a time).
    switch_steps: the training step at which each group switches (one per group, non-decreasing).
    Call `step(i)` once per training step (before the forward); it returns the groups switched at
    that call. separate_first: give each fake its own first-position sigma0 (estimate_ln_scales). The Parameters stay the same objects, so the optimizer needs no rebuilding.

    Example:
        >>> sched = LNRemovalSchedule(gpt2, calib_batches, switch_steps=(0, 100, 200))
        >>> for i, batch in enumerate(loader):
        ...     sched.step(i)
        ...     loss = gpt2(**batch, labels=batch["input_ids"]).loss; loss.backward(); opt.step(); opt.zero_grad()
        >>> assert sched.done                                  # no nn.LayerNorm left: ready for fold()
    """

    def __init__(self, model: nn.Module, batches: Iterable, switch_steps: Iterable[int],
                 groups: Iterable[str] = GPT2_GROUPS, *, separate_first: bool = False):
        self.model, self.batches, self.separate_first = model, list(batches), separate_first
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
        return [n for n in layernorms(self.model) if n == group or n.rpartition(".")[2] == group]

    def step(self, i: int) -> list[str]:
        done = []
        for g, at in zip(self.groups, self.switch_steps):
            if g not in self.switched and i >= at:
                scales = estimate_ln_scales(self.model, self.batches, self._members(g),
                                            separate_first=self.separate_first)
                fake_layernorm(self.model, scales)
                self.switched[g] = scales
                done.append(g)
        return done

    @property
    def done(self) -> bool:
        return len(self.switched) == len(self.groups)
