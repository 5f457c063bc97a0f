"""Norm removal on a real RMSNorm model (SmolLM2-135M, the Llama family): held-out perplexity of
  - the original model,
  - every RMSNorm switched to FakeRMSNorm at once, no fine-tuning (sigma from calibration chunks):
    with one sigma per norm (the first position's outsized residual, ~8x the mean RMS, then
    blows up through the gated MLPs: inf / NaN), and with the first position's own sigma0,
  - after a short removal fine-tune: LNRemovalSchedule switching the MLP-input norms, then the
    attention-input norms, then the final norm (sigma re-estimated at each switch), AdamW on the
    training chunks, all weights trained.
Used by bench/quality_lnfree.py (the README table) and the slow test on a smaller run."""

from __future__ import annotations

import copy
import math
import time

import torch

from pyfast import lnfree
from pyfast.eval.smollm2 import perplexity


def schedule_groups(model, kind: str) -> list[str]:
    """"groups": the paper's three groups (LLAMA_GROUPS); "layers": one norm at a time, each layer's
    MLP-input norm then its attention-input norm, first layer to last, then the final norm."""
    if kind == "groups":
        return list(lnfree.LLAMA_GROUPS)
    names = list(lnfree.fake.layernorms(model))
    per_layer = [n for n in names if n.endswith(".post_attention_layernorm") or n.endswith(".input_layernorm")]
    per_layer.sort(key=lambda n: (int(n.split(".layers.")[1].split(".")[0]), n.endswith(".input_layernorm")))
    return per_layer + [n for n in names if n not in per_layer]


def removal_fine_tune(model, train, calib, *, steps: int, lr: float, schedule: str = "groups",
                      separate_first: bool = True, log=print) -> list[float]:
    """Fine-tune `model` in place on the `train` chunks (one per step, cycling) with the norms
    switched to Fake group by group (schedule_groups), the switches spread evenly over the first
    two thirds of the steps. Returns the losses; stops early (the last loss not finite) if the
    model diverges."""
    groups = schedule_groups(model, schedule)
    span = max(1, 2 * steps // 3)
    sched = lnfree.LNRemovalSchedule(model, calib, switch_steps=[i * span // len(groups) for i in range(len(groups))],
                                     groups=groups, separate_first=separate_first)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    t0 = time.perf_counter()
    for step in range(steps):
        for g in sched.step(step):
            log(f"  step {step}: {g} switched to FakeRMSNorm")
        ids = train[step % len(train)]
        loss = model(ids, labels=ids).loss
        if not torch.isfinite(loss):
            log(f"  step {step}: loss {loss.item()}: diverged")
            losses.append(loss.item())
            break
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % max(1, steps // 8) == 0 or step == steps - 1:
            log(f"  step {step}: loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)")
    model.eval()
    return losses


def lnfree_quality(model, train, calib, held_out, *, steps: int, lr: float, schedule: str = "groups",
                   log=print) -> list[dict]:
    """The three rows (config, held-out perplexity); `model` is left unchanged (copies are trained)."""
    rows = [{"config": "original (RMSNorm)", "ppl": perplexity(model, held_out)}]
    log(f"original: ppl {rows[-1]['ppl']:.2f}")
    fake = copy.deepcopy(model)
    lnfree.fake_layernorm(fake, lnfree.estimate_ln_scales(fake, calib))
    rows.append({"config": "FakeRMSNorm (one sigma), no fine-tune", "ppl": perplexity(fake, held_out)})
    log(f"FakeRMSNorm (one sigma) without fine-tuning: ppl {rows[-1]['ppl']:.2f}")
    fake = copy.deepcopy(model)
    lnfree.fake_layernorm(fake, lnfree.estimate_ln_scales(fake, calib, separate_first=True))
    rows.append({"config": "FakeRMSNorm (own sigma for position 0), no fine-tune", "ppl": perplexity(fake, held_out)})
    log(f"FakeRMSNorm (position 0 apart) without fine-tuning: ppl {rows[-1]['ppl']:.2f}")
    del fake
    tuned = copy.deepcopy(model)
    try:
        losses = removal_fine_tune(tuned, train, calib, steps=steps, lr=lr, schedule=schedule, log=log)
    except ValueError as e:  # a sigma estimate on a model that already diverged
        log(f"  diverged: {e}")
        losses = [float("nan")]
    done = len(losses) == steps and all(map(math.isfinite, losses))
    rows.append({"config": f"FakeRMSNorm (position 0 apart) after the removal fine-tune ({schedule}, {steps} steps)"
                 + ("" if done else f": diverged at step {len(losses) - 1}"),
                 "ppl": perplexity(tuned, held_out) if done else float("nan"),
                 "first_loss": losses[0], "last_loss": losses[-1]})
    log(f"after the removal fine-tune: ppl {rows[-1]['ppl']:.2f}")
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| model | held-out perplexity |", "|---|---|"]
    lines += [f"| {r['config']} | {r['ppl']:.2f} |" for r in rows]
    return "\n".join(lines)
