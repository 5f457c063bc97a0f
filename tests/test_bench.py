"""The benchmark runner (python -m pyfast bench): where it writes, what the JSON and the table hold.
Tiny subsets with few repeats; nothing here asserts a timing."""

import json
import os

import pytest
import torch

import pyfast
from pyfast.__main__ import main
from pyfast.bench import runner
from pyfast.bench.runner import Case, format_table, run_cases

try:
    import matplotlib  # noqa: F401

    HAS_MPL = True
except ImportError:
    HAS_MPL = False

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _table_lines(out: str) -> list[str]:
    """The table of a bench run's stdout: from the header line to the line before the footnote."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("op "))
    end = next(i for i, line in enumerate(lines) if line.startswith("* baseline"))
    return lines[start:end]


def test_default_output_goes_to_the_current_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--device", "cpu", "--quick", "--ops", "copy,sparse", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    name = runner.device_name("cpu")
    made = sorted(os.listdir(tmp_path))
    jsons = [f for f in made if f.endswith(".json")]
    assert len(jsons) == 1 and jsons[0].startswith(f"pyfast-bench-{name}-quick-"), made
    assert not (tmp_path / "bench").exists()  # never bench/results relative to the cwd
    path = tmp_path / jsons[0]
    assert f"wrote {path}" in out  # the absolute path is printed at the end
    if HAS_MPL:
        png = path.with_suffix(".png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(png) in out

    report = json.loads(path.read_text())
    assert report["quick"] is True and report["device"] == name
    rows = report["rows"]
    copy = [r for r in rows if r["op"] == "copy"]
    attn = [r for r in rows if r["op"] == "decode_attention"]
    assert len(copy) == 1 and "GB/s" in copy[0] and "TFLOP/s" not in copy[0]  # bytes only
    assert {r["impl"] for r in attn} >= {"SDPA", "pyfast cpu dense", "pyfast cpu sparse top64"}
    dense_flops = 4 * 1 * 32 * 2048 * 128  # quick: B=1, Hq=32, L=2k, D=128
    for r in attn:  # both columns where a case sets bytes and flops
        assert r["GB/s"] > 0 and r["TFLOP/s"] > 0
        if "sparse" not in r["impl"]:
            assert r["TFLOP/s"] == pytest.approx(dense_flops / (r["ms"] * 1e-3) / 1e12)
    sparse = next(r for r in attn if "sparse" in r["impl"])
    # sparse counts the kept tokens (+ block scoring), fewer flops than dense: at L=2k, 128 blocks,
    # 69 kept (1 sink + 64 top-k + 4 local) -> 4*32*1104*128 + 2*32*128*128
    assert sparse["TFLOP/s"] * sparse["ms"] == pytest.approx((4 * 32 * 1104 * 128 + 2 * 32 * 128 * 128) * 1e-9)

    lines = _table_lines(out)
    assert len(lines) == 2 + len(rows)
    assert len({len(line) for line in lines}) == 1, lines  # every line the same width
    assert "TFLOP/s" in lines[0] and "GB/s" in lines[0]


def test_update_results_writes_to_the_repository(tmp_path, monkeypatch, capsys):
    repo = tmp_path / "repo"
    (repo / "bench" / "results").mkdir(parents=True)
    monkeypatch.setattr(runner, "repo_root", lambda: str(repo))
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert main(["bench", "--device", "cpu", "--ops", "overhead", "--repeats", "2", "--update-results"]) == 0
    name = runner.device_name("cpu")
    target = repo / "bench" / "results" / f"{name}.json"
    assert target.is_file() and os.listdir(cwd) == []
    assert f"wrote {target}" in capsys.readouterr().out
    assert (repo / "bench" / "results" / f"{name}.png").is_file() == HAS_MPL
    rows = json.loads(target.read_text())["rows"]
    assert rows and all(r["op"] == "overhead" and "overhead_us" in r for r in rows if not r["baseline"])


@pytest.mark.parametrize("extra", [["--quick"], ["--json", "x.json"], ["--plot", "x.png"]])
def test_update_results_refuses_conflicting_flags(tmp_path, monkeypatch, extra):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runner, "repo_root", lambda: pytest.fail("must refuse before looking for the checkout"))
    with pytest.raises(SystemExit, match="--update-results"):
        main(["bench", "--device", "cpu", "--ops", "copy", "--update-results", *extra])
    assert os.listdir(tmp_path) == []


def test_repo_root():
    """pyfast imported from a source checkout (an editable install): --update-results writes there."""
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(pyfast.__file__)))
    if not os.path.isdir(os.path.join(pkg_root, "bench", "results")):
        pytest.skip("pyfast is imported from an installed copy (e.g. the sanitizer venv), not a checkout")
    assert os.path.samefile(runner.repo_root(), pkg_root)


def test_repo_root_outside_a_checkout(tmp_path, monkeypatch):
    pkg = tmp_path / "site-packages" / "pyfast"
    pkg.mkdir(parents=True)
    monkeypatch.setattr(pyfast, "__file__", str(pkg / "__init__.py"))
    with pytest.raises(SystemExit, match="not in one.*--json"):
        runner.repo_root()


def test_bad_arguments(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="unknown family 'nope'"):
        main(["bench", "--device", "cpu", "--ops", "copy,nope"])
    with pytest.raises(SystemExit, match="--repeats must be at least 1"):
        main(["bench", "--device", "cpu", "--ops", "copy", "--repeats", "-1"])
    assert os.listdir(tmp_path) == []


def test_cherryq_cases_count_flops():
    from pyfast.bench import cherryq

    cases = cherryq._shape_cases("cpu", 2, 256, 256)
    assert {c.impl for c in cases} >= {"F.linear fp32", "pyfast cpu 3b g128"}
    assert all(c.flops == 2 * 2 * 256 * 256 and c.bytes > 0 for c in cases)


def test_table_columns_line_up_with_long_names():
    x = torch.ones(4)
    cases = [Case("op", "tiny", "baseline", lambda i: x + 1, 1, bytes=32, baseline=True),
             Case("op", "tiny", "a very long implementation name, longer than the rest " * 2, lambda i: x * 2, 1,
                  bytes=32, flops=4),
             Case("another_op_with_a_long_name", "shape " * 10, "no rates", lambda i: x - 1, 1)]
    rows = run_cases(cases, "cpu", 3)
    lines = format_table(rows).splitlines()
    assert len({len(line) for line in lines}) == 1, lines
    header = lines[0]
    for col in ("ms", "GB/s", "TFLOP/s", "speedup"):  # right-aligned: a cell ends where its header ends
        end = header.index(col) + len(col)
        for line in lines[2:]:
            assert line[end:end + 1] in ("", " "), (col, line)
        assert lines[3][end - 1] != " ", (col, lines[3])  # the long-named row has every column
    assert "TFLOP/s" in rows[1] and "TFLOP/s" not in rows[0] and rows[2]["speedup"] is None


def test_hedgehog_composite_baseline_is_hedgehog_attention():
    """The PyTorch composite the Hedgehog bench compares against computes the same attention (T not a
    multiple of its chunk)."""
    from pyfast.bench import hedgehog
    from pyfast.reference.hedgehog import hedgehog_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 150, 16, generator=g) for _ in range(3))
    qw, kw = (torch.randn(2, 16, 8, generator=g) for _ in range(2))
    qb, kb = (torch.randn(2, 8, generator=g) for _ in range(2))
    want = hedgehog_attention(q, k, v, qw, kw, qb, kb)
    torch.testing.assert_close(hedgehog.composite(q, k, v, qw, kw, qb, kb), want, rtol=1e-5, atol=1e-5)


def test_hedgehog_cases_cover_every_backend_and_the_baselines():
    from pyfast.bench import hedgehog

    cases = hedgehog.cases("cpu", quick=True)
    impls = {(c.op, c.impl) for c in cases}
    for op in ("hedgehog_attention fwd", "hedgehog_attention fwd+bwd"):
        assert {(op, "SDPA causal"), (op, "PyTorch chunked composite"), (op, "pyfast cpu")} <= impls
    assert {("decode step", "pyfast cpu hedgehog_decode"), ("decode step", "pyfast cpu decode_attention")} <= impls
    assert all(c.flops > 0 for c in cases if c.op.startswith("hedgehog_attention"))
    assert sum(c.baseline for c in cases) == 3  # one per (op, shape)


def test_lnfree_quick_run_reports_generation_against_transformers(tmp_path, capsys):
    """The LN-free family: the linear-op cases with their PyTorch baselines and the generation
    cases against transformers' generate, with tokens/s target lines that say whether the greedy
    tokens were identical."""
    out_json = tmp_path / "b.json"
    assert main(["bench", "--device", "cpu", "--quick", "--ops", "lnfree", "--repeats", "1",
                 "--json", str(out_json)]) == 0
    report = json.loads(out_json.read_text())
    impls = {(r["op"], r["impl"]) for r in report["rows"]}
    assert {("linear_bias_gelu", "F.gelu(F.linear)"), ("linear_bias_gelu", "pyfast cpu"),
            ("linear_bias_residual", "pyfast cpu"), ("generate", "transformers generate (FakeLN)"),
            ("generate", "pyfast LNFreeGPT2"), ("generate", "pyfast LNFreeGPT2 CherryQ 3b")} <= impls
    lines = [t for t in report["targets"] if "LNFreeGPT2 small" in t]
    assert len(lines) == 2 and all("greedy tokens identical: True" in t for t in lines)
