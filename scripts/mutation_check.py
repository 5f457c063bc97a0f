"""Mutation check of the CUDA kernels' tests (CI): each mutant below is a one-token bug in a CUDA
source (a loop bound off by one, a dropped warp-reduction step, a missing barrier, a wrong
operand...). For each, the emulated CUDA tests of its family (pytest -m cuda_emu, tests/cuda_emu.py)
must fail. Mutants are applied to a copy of csrc/ and tests/ in a scratch directory (the checkout
is never modified), one copy per worker (--jobs, default one per core); the emulation's incremental
build recompiles only the mutated unit, at -O1 (PYFAST_EMU_OPT).

    python scripts/mutation_check.py [--only SUBSTRING] [--scratch DIR] [--jobs N]

Exit status 1 if a mutant survives (or does not apply / compile: fix the list below).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (file under csrc/, exact original text (must occur once), replacement, what the bug is)
MUTANTS = [
    # cherryq: dequant GEMV
    ("cherryq/cherryq_gemv.cuh", "for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync",
     "for (int o = 16; o > 1; o >>= 1) v += __shfl_xor_sync", "warp_sum drops its last shuffle step"),
    ("cherryq/cherryq_gemv.cuh", "u[1] = (w[q] >> 4) & 0x0F0F0F0Fu;", "u[1] = (w[q] >> 3) & 0x0F0F0F0Fu;",
     "4-bit high nibbles decoded from the wrong bit"),
    ("cherryq/cherryq_gemv.cuh", "    if (k0 > 0) __syncthreads();  // every lane is done reading the previous chunk",
     "    if (k0 > 0) {}", "missing barrier before x of the next K-chunk is staged"),
    ("cherryq/cherryq_gemv.cuh", "for (int pk = 0; pk < npk; ++pk) {", "for (int pk = 0; pk < npk - 1; ++pk) {",
     "off-by-one: the last pack of every tile skipped"),
    ("cherryq/cherryq_gemv.cuh", "    if (n >= N) continue;", "    if (n > N) continue;",
     "off-by-one: stores one row past N"),
    ("cherryq/cherryq_gemv.cuh", "if (static_cast<unsigned>(idx) < static_cast<unsigned>(K)) {",
     "if (static_cast<unsigned>(idx) <= static_cast<unsigned>(K)) {", "cherry index K not skipped"),
    ("cherryq/cherryq_cuda.cu", "if (rem > 0) return launch_rows", "if (rem > 1) return launch_rows",
     "a single trailing row of x never launched"),
    ("cherryq/cherryq_cuda.cu", "reinterpret_cast<uintptr_t>(p.qweight) % 16 == 0", "reinterpret_cast<uintptr_t>(p.qweight) % 4 == 0",
     "16-byte loads from a misaligned qweight"),
    # sparse: append, score, select, attention, merge
    ("sparse/sparse_decode.cuh", "if (j >= (L + a.Tn) / bs) return;", "if (j > (L + a.Tn) / bs) return;",
     "append: the mean of a block that is not full yet is written"),
    ("sparse/sparse_decode.cuh", "for (int o = TPT / 2; o > 0; o >>= 1) s += __shfl_xor_sync",
     "for (int o = TPT / 2; o > 1; o >>= 1) s += __shfl_xor_sync", "QK dot product drops a shuffle step"),
    ("sparse/sparse_decode.cuh", "const float alpha = exp2f(m_old - m_use);", "const float alpha = exp2f(m_use - m_old);",
     "online softmax rescales the wrong way"),
    ("sparse/sparse_decode.cuh", "    __syncthreads();  // tile `it & 1` and p_s are reused next",
     "    // (barrier removed)", "missing barrier before a shared tile is reused"),
    ("sparse/sparse_decode.cuh", "if (lane + o < 32) suf += v;", "if (lane + o <= 32) suf += v;",
     "radix select: suffix sums off by one lane"),
    ("sparse/sparse_decode.cuh", "const float w = v.x == -INFINITY ? 0.0f : exp2f(v.x - m);",
     "const float w = v.x == -INFINITY ? 0.0f : exp2f(m - v.x);", "merge weighs splits the wrong way"),
    ("sparse/sparse_cuda.cu", "pl.nsel = std::min(pl.sink + pl.topk + pl.local, pl.nb) + 1;",
     "pl.nsel = std::min(pl.sink + pl.topk + pl.local, pl.nb);", "no slot for the partial tail block"),
    ("sparse/sparse_cuda.cu", "a.qscale = p.scale * dev::kLog2e;", "a.qscale = p.scale;",
     "softmax in base 2 without the log2(e) factor"),
    ("sparse/sparse_cuda.cu", "const int64_t fill = std::min(nb, ceil_div64(p.Tn, p.block_size));",
     "const int64_t fill = std::min(nb, p.Tn / p.block_size);", "append: too few block-mean CTAs"),
    # hedgehog: fused forward, decode step
    ("hedgehog/hedgehog_chunk.cuh", "c[i] = key <= q ? c[i] : 0.0f;", "c[i] = key < q ? c[i] : 0.0f;",
     "causal mask drops the diagonal (key == query)"),
    ("hedgehog/hedgehog_chunk.cuh", "    __syncthreads();  // pk_s, st_s (and vt_s) complete", "    // (barrier removed)",
     "missing barrier before the phi_k / S tiles are read"),
    ("hedgehog/hedgehog_chunk.cuh", "phi[1][j][i] = on ? expf(-u[j][i] - st.mn[r])",
     "phi[1][j][i] = on ? expf(u[j][i] - st.mn[r])", "softmax(-u) features with the wrong sign"),
    ("hedgehog/hedgehog_chunk.cuh", "ks.nrow = len - r0;", "ks.nrow = len - r0 + 1;",
     "off-by-one: the key after the sequence end enters the state"),
    ("hedgehog/hedgehog_chunk.cuh", "for (int i = 0; i < 4; ++i) o[n][i] *= inv;", "for (int i = 0; i < 4; ++i) {}",
     "the phi_q S part of O keeps the state scale c (1 / c dropped)"),
    ("hedgehog/hedgehog_chunk.cuh", "        smax.note(m);", "",
     "the state scale ignores the S update (stale max from the previous state)"),
    ("hedgehog/hedgehog_decode.cuh", "            S[static_cast<int64_t>(f) * a.Dv + c] = s;", "",
     "decode: the state update is not stored"),
    ("hedgehog/hedgehog_decode.cuh", "for (int w = 1; w < kDecodeWarps; ++w) {", "for (int w = 1; w < kDecodeWarps - 1; ++w) {",
     "decode: block reduction skips the last warp"),
    # shared device helpers
    ("common/cuda_dtype.cuh", "f[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);",
     "f[2 * i + 1] = __uint_as_float(w[i] & 0x7FFF0000u);", "bf16 unpack drops the sign of odd elements"),
]

# The emulated tests that run for a mutant of each folder (in this order; -x stops at the first failure).
FAMILY_TESTS = {"cherryq": ["tests/cherryq"], "sparse": ["tests/sparse"], "hedgehog": ["tests/hedgehog"],
                "common": ["tests/sparse", "tests/cherryq"]}


def _copy_tree(scratch: Path) -> None:
    for name in ("csrc", "tests"):
        dst = scratch / name
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(ROOT / name, dst, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.o"))
    shutil.copy(ROOT / "pyproject.toml", scratch / "pyproject.toml")


def _env() -> dict:
    # One compile job and one torch thread per worker (the workers share the cores); -O1 halves the
    # compile of the big launcher units, which dominates a mutant's time (tests/cuda_emu.py).
    return dict(os.environ, MAX_JOBS="1", OMP_NUM_THREADS="1", PYFAST_EMU_OPT=os.environ.get("PYFAST_EMU_OPT", "-O1"))


def _run(cmd: list[str], cwd: Path, timeout: int) -> tuple[int, str]:
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=_env())
    except subprocess.TimeoutExpired:
        return 124, "timed out"
    return r.returncode, r.stdout + r.stderr


def _pytest(scratch: Path, targets: list[str], timeout: int) -> tuple[int, str]:
    return _run([sys.executable, "-m", "pytest", *targets, "-m", "cuda_emu", "-x", "-q", "-p", "no:cacheprovider"],
                scratch, timeout)


def _baseline(scratch: Path, timeout: int) -> str | None:
    """Copies the tree into scratch and builds its emulation (the copy's own build folder: cuda_emu
    keys it by the tree's path); None if it builds, else the build's output. The unmutated copy
    must build, else every mutant would be "killed"."""
    scratch.mkdir(parents=True, exist_ok=True)
    _copy_tree(scratch)
    rc, out = _run([sys.executable, str(scratch / "tests" / "cuda_emu.py")], scratch, timeout)
    return None if rc == 0 else out[-3000:]


def _try(scratch: Path, mutant, timeout: int) -> tuple[str, float, str]:
    """Applies one mutant in scratch, runs its family's emulated tests, restores the file: returns
    (verdict, seconds, output)."""
    path, old, new, what = mutant
    src = scratch / "csrc" / path
    original = (ROOT / "csrc" / path).read_text()
    src.write_text(original.replace(old, new))
    start = time.time()
    try:
        rc, out = _pytest(scratch, FAMILY_TESTS[path.split("/")[0]], timeout)
    finally:
        src.write_text(original)
    if "Error building extension" in out or "error:" in out and rc != 0 and "FAILED" not in out:
        verdict = "BUILD ERROR"
    elif rc == 0:
        verdict = "SURVIVED"
    else:
        failed = next((ln for ln in out.splitlines() if ln.startswith(("FAILED", "ERROR"))), "failed")
        verdict = "killed: " + failed.split(" ", 1)[-1][:110]
    return verdict, time.time() - start, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="run only mutants whose file or description contains this")
    ap.add_argument("--scratch", default=os.environ.get("PYFAST_MUTANT_DIR", "/tmp/pyfast-mutants"))
    ap.add_argument("--timeout", type=int, default=900, help="seconds per mutant")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                    help="mutants tried at once, each in its own copy of the tree (default: one per core)")
    args = ap.parse_args()
    t0 = time.time()
    mutants, broken = [], []
    for m in MUTANTS:
        path, old, _, what = m
        if args.only and args.only not in path and args.only not in what:
            continue
        count = (ROOT / "csrc" / path).read_text().count(old)
        if count != 1:
            broken.append(f"{path}: {what}: the original text occurs {count} times")
        else:
            mutants.append(m)
    jobs = max(1, min(args.jobs, len(mutants)))
    # Worker w tries mutants w, w + jobs, ... in the list's order, so a family's mutants stay
    # together in each copy (switching family rebuilds the unit the last mutant left mutated).
    scratches = [Path(args.scratch) / f"w{w}" for w in range(jobs)]
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        for scratch, err in zip(scratches, pool.map(lambda d: _baseline(d, args.timeout), scratches)):
            if err is not None:
                print(f"the unmutated copy in {scratch} does not build:\n{err}")
                return 1
        print(f"baseline emulation built in {jobs} copies in {time.time() - t0:.0f} s", flush=True)
        lock = threading.Lock()
        survived = []

        def worker(w: int) -> None:
            for mutant in mutants[w::jobs]:
                path, _, _, what = mutant
                verdict, secs, out = _try(scratches[w], mutant, args.timeout)
                with lock:
                    print(f"{path:28s} {what:58s} {secs:5.0f} s  {verdict}", flush=True)
                    if verdict == "SURVIVED":
                        survived.append(f"{path}: {what}")
                    elif verdict == "BUILD ERROR":
                        broken.append(f"{path}: {what}: did not build\n{out[-2000:]}")

        for f in [pool.submit(worker, w) for w in range(jobs)]:
            f.result()
    print(f"{len(mutants)} mutants, {len(survived)} survived, {len(broken)} broken, {time.time() - t0:.0f} s in all")
    for s in survived:
        print("SURVIVED:", s)
    for b in broken:
        print("BROKEN MUTANT:", b)
    return 1 if survived or broken else 0


if __name__ == "__main__":
    sys.exit(main())
