"""bench/triton_aot.py, the ahead-of-time compile of every Triton kernel configuration for sm_80 and
sm_90 (docs/design.md § Kernels): a cheap run compiles one benchmarked configuration for sm_80 (no
GPU needed) and must report it with its registers. The full run is a CI step (.ci/run)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from conftest import HAS_TRITON

import pyfast

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "triton_aot.py")


def _bundled_ptxas() -> bool:
    spec = importlib.util.find_spec("triton")
    return spec is not None and os.path.exists(
        os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", "ptxas"))


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.skipif(not _bundled_ptxas(), reason="needs the ptxas bundled with triton")
def test_compiles_a_benchmarked_configuration_for_sm80(tmp_path):
    out = tmp_path / "aot.json"
    # A fresh interpreter without TRITON_INTERPRET (tests/conftest.py sets it here), importing the
    # pyfast under test.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = os.path.dirname(os.path.dirname(os.path.abspath(pyfast.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([here] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--no-tests", "--arch", "80", "--kernel", "_advance_seqlens_kernel",
         "--workers", "1", "--json", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["configs"]
    assert rows, report
    for row in rows:
        assert (row["kernel"], row["arch"]) == ("_advance_seqlens_kernel", "sm_80")
        assert row["regs"] > 0 and row["spill_stores"] == row["spill_loads"] == 0, row
        assert row["benchmarked"], row
    assert report["summary"][0]["max_regs"] == max(row["regs"] for row in rows)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_a_test_run_records_its_triton_calls_for_the_aot_compile(tmp_path):
    # PYFAST_RECORD_TRITON_CALLS (tests/conftest.py): .ci/run's one test run records the Triton
    # launcher calls that bench/triton_aot.py --calls then compiles for the GPUs.
    calls = tmp_path / "calls.jsonl"
    here = os.path.dirname(os.path.dirname(os.path.abspath(pyfast.__file__)))
    env = dict(os.environ, PYFAST_RECORD_TRITON_CALLS=str(calls),
               PYTHONPATH=os.pathsep.join([here] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    test = "tests/sparse/test_append_kv.py"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test, "-k", "triton"],
                          cwd=os.path.dirname(os.path.dirname(SCRIPT)), env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [json.loads(line) for line in calls.read_text().splitlines()]
    assert len(lines) >= 2, lines
    assert len({json.dumps([c["args"], c["kwargs"]]) for c in lines}) == len(lines)  # distinct calls only
    for c in lines:
        assert c["plan"] == "pyfast.kernels.sparse:plan_append_kv", c
        assert c["source"].startswith(test + "::") and "triton" in c["source"], c
        assert all(isinstance(a, dict) and "tensor" in a for a in c["args"][:4]), c
