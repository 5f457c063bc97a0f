"""The shared benchmark runner: each family module contributes `cases(device, quick)`; this
times them (median and 20/80 percentiles over rotating inputs), prints a table with GB/s or
TFLOP/s and the speed-up over the PyTorch baseline of the same run, and writes JSON + a PNG."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import statistics
import time
from typing import Callable

import torch

FAMILIES = ("copy", "cherryq", "sparse", "overhead")


@dataclasses.dataclass
class Case:
    """One timed implementation. fn(i) runs on the i-th of `rotate` input sets (so caches do not
    flatter); `baseline` marks the PyTorch implementation the others are compared against."""

    op: str
    shape: str
    impl: str
    fn: Callable[[int], object]
    rotate: int
    bytes: float = 0.0  # bytes that must move (memory-bound ops: report GB/s)
    flops: float = 0.0  # report TFLOP/s when bytes == 0
    baseline: bool = False
    min_repeats: int = 0  # microsecond-scale cases need many samples for a stable median
    threads: int | None = None  # CPU threads while timing this case (None: the process default)


def add_arguments(p) -> None:
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--ops", default=",".join(FAMILIES), help="comma-separated families: " + ", ".join(FAMILIES))
    p.add_argument("--quick", action="store_true", help="fewer shapes and repeats (smoke run)")
    p.add_argument("--json", default=None, help="output JSON (default bench/results/<device>.json)")
    p.add_argument("--plot", default=None, help="output PNG (default next to the JSON)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per case")


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name().replace(" ", "-")
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    model = model.replace("(R)", "").replace("(TM)", "")  # a file name, not a trademark notice
    return f"cpu-{os.cpu_count()}core-{model}".replace(" ", "-")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_case(case: Case, device: str, repeats: int) -> dict:
    """Median and 20/80 percentiles (ms) of single calls, cycling through the rotated inputs."""
    for i in range(min(case.rotate, 3) + 1):  # warm-up (and compile/autotune)
        case.fn(i % case.rotate)
    _sync(device)
    samples = []
    for r in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            case.fn(r % case.rotate)
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            case.fn(r % case.rotate)
            samples.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(samples, n=10) if len(samples) >= 2 else samples * 9
    return {"ms": statistics.median(samples), "ms_p20": q[1], "ms_p80": q[7]}


def run_cases(cases: list[Case], device: str, repeats: int) -> list[dict]:
    rows = []
    for c in cases:
        threads = torch.get_num_threads()
        torch.set_num_threads(c.threads or threads)
        try:
            t = time_case(c, device, max(repeats, c.min_repeats))
        finally:
            torch.set_num_threads(threads)
        row = {"op": c.op, "shape": c.shape, "impl": c.impl, "baseline": c.baseline, **t}
        if c.bytes:
            row["GB/s"] = c.bytes / (t["ms"] * 1e-3) / 1e9
        if c.flops:
            row["TFLOP/s"] = c.flops / (t["ms"] * 1e-3) / 1e12
        rows.append(row)
    for row in rows:  # speed-up over the PyTorch baseline of the same (op, shape)
        base = [r for r in rows if r["baseline"] and (r["op"], r["shape"]) == (row["op"], row["shape"])]
        row["speedup"] = base[0]["ms"] / row["ms"] if base else None
        if row["op"] == "overhead" and base:  # per-call cost above the bare kernel, in microseconds
            row["overhead_us"] = (row["ms"] - base[0]["ms"]) * 1e3
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'op':<16} {'shape':<28} {'impl':<22} {'ms':>9} {'p20-p80':>17} {'GB/s':>8} {'TFLOP/s':>8} {'speedup':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        gb = f"{r['GB/s']:8.1f}" if "GB/s" in r else " " * 8
        tf = f"{r['TFLOP/s']:8.3f}" if "TFLOP/s" in r else " " * 8
        sp = f"{r['speedup']:7.2f}x" if r["speedup"] else " " * 8
        lines.append(f"{r['op']:<16} {r['shape']:<28} {r['impl']:<22} {r['ms']:9.4f} "
                     f"{r['ms_p20']:8.4f}-{r['ms_p80']:<8.4f} {gb} {tf} {sp}")
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    labels = [f"{r['op']} {r['shape']}\n{r['impl']}" for r in rows]
    vals = [r["speedup"] or 0 for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(rows)), 5))
    ax.bar(range(len(rows)), vals, color=["grey" if r["baseline"] else "tab:blue" for r in rows])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(rows)), labels, rotation=90, fontsize=6)
    ax.set_ylabel("speed-up over PyTorch baseline (same run)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run(args) -> int:
    import importlib

    import pyfast

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("pyfast bench: --device cuda but no CUDA device is available")
    repeats = args.repeats or (8 if args.quick else 40)
    cases: list[Case] = []
    for fam in args.ops.split(","):
        if fam not in FAMILIES:
            raise SystemExit(f"pyfast bench: unknown family {fam!r}; expected one of {FAMILIES}")
        cases += importlib.import_module(f"pyfast.bench.{fam}").cases(device, args.quick)
    rows = run_cases(cases, device, repeats)
    name = device_name(device)
    print(f"pyfast {pyfast.__version__} bench on {name} (torch {torch.__version__}, threads {torch.get_num_threads()})")
    print(format_table(rows))
    out = args.json or os.path.join("bench", "results", f"{'quick-' if args.quick else ''}{name}.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    report = {
        "device": name,
        "date": datetime.date.today().isoformat(),
        "pyfast": pyfast.build_info(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "rows": rows,
    }
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    png = args.plot or os.path.splitext(out)[0] + ".png"
    wrote_png = plot(rows, png, f"pyfast on {name}")
    print(f"wrote {out}" + (f" and {png}" if wrote_png else " (no matplotlib: no plot)"))
    return 0
