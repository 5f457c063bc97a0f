"""The shared benchmark runner: each family module contributes `cases(device, quick)`; this
times them (median and 20/80 percentiles over rotating inputs), prints a table with GB/s and
TFLOP/s (where a case sets bytes / flops) and the speed-up over the PyTorch baseline of the same
run, and writes JSON + a PNG: by default ./pyfast-bench-<machine>-<timestamp>.{json,png} in the
current directory; --update-results refreshes the committed bench/results/<machine>.{json,png}
of the source checkout pyfast is imported from."""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import time
from typing import Callable

import torch

FAMILIES = ("copy", "cherryq", "sparse", "hedgehog", "lnfree", "overhead")


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
    flops: float = 0.0  # floating-point operations of one call (compute-heavy ops: report TFLOP/s); both may be set
    baseline: bool = False
    min_repeats: int = 0  # microsecond-scale cases need many samples for a stable median
    max_repeats: int = 0  # cases of seconds per call (CPU SDPA at 16k tokens) are capped (0: no cap)
    threads: int | None = None  # CPU threads while timing this case (None: the process default)


def add_arguments(p) -> None:
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--ops", default=",".join(FAMILIES), help="comma-separated families: " + ", ".join(FAMILIES))
    p.add_argument("--quick", action="store_true", help="fewer shapes and repeats (smoke run)")
    p.add_argument("--json", default=None,
                   help="output JSON (default ./pyfast-bench-<machine>-<timestamp>.json in the current directory)")
    p.add_argument("--plot", default=None, help="output PNG (default next to the JSON)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per case (at least 1)")
    p.add_argument("--update-results", action="store_true",
                   help="refresh the committed results of this source checkout: "
                        "<repo>/bench/results/<machine>.json and .png (maintainers)")


def repo_root() -> str:
    """The source checkout pyfast is imported from (the folder holding pyfast/, bench/results/ and
    pyproject.toml); SystemExit if pyfast is installed from a wheel or the tree lacks those."""
    import pyfast

    root = os.path.dirname(os.path.dirname(os.path.abspath(pyfast.__file__)))
    if not (os.path.isdir(os.path.join(root, "bench", "results"))
            and os.path.isfile(os.path.join(root, "pyproject.toml"))):
        raise SystemExit(
            f"pyfast bench: --update-results rewrites the results committed in a source checkout, but pyfast "
            f"is imported from {os.path.dirname(os.path.abspath(pyfast.__file__))}, which is not in one (no "
            f"bench/results/ and pyproject.toml in {root}). Install pyfast editable from a clone "
            f"(pip install --no-build-isolation -e .), or write elsewhere with --json PATH.")
    return root


def output_paths(args, name: str, now: datetime.datetime | None = None) -> tuple[str, str]:
    """(JSON, PNG) paths. --update-results: <repo>/bench/results/<machine>.json; --json: that;
    otherwise ./pyfast-bench-<machine>[-quick]-<YYYYmmdd-HHMMSS>.json in the current directory,
    so a run never overwrites the committed results nor an earlier run."""
    if args.update_results:
        if args.json or args.plot:
            raise SystemExit("pyfast bench: --update-results writes bench/results/<machine>.json and .png; "
                             "drop --json/--plot")
        if args.quick:
            raise SystemExit("pyfast bench: --update-results refuses --quick (a smoke run is not a result to commit)")
        out = os.path.join(repo_root(), "bench", "results", f"{name}.json")
    elif args.json:
        out = args.json
    else:
        stamp = (now or datetime.datetime.now()).strftime("%Y%m%d-%H%M%S")
        out = f"pyfast-bench-{name}{'-quick' if args.quick else ''}-{stamp}.json"
    return out, args.plot or os.path.splitext(out)[0] + ".png"


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
            t = time_case(c, device, min(max(repeats, c.min_repeats), c.max_repeats or 1 << 30))
        finally:
            torch.set_num_threads(threads)
        row = {"op": c.op, "shape": c.shape, "impl": c.impl, "baseline": c.baseline, **t}
        if c.bytes:
            row["GB/s"] = c.bytes / (t["ms"] * 1e-3) / 1e9
        if c.flops:
            row["TFLOP/s"] = c.flops / (t["ms"] * 1e-3) / 1e12
        rows.append(row)
    rows = [r for _, group in _groups(rows) for r in group]  # timed in the families' order, shown by (op, shape)
    for row in rows:  # speed-up over the PyTorch baseline of the same (op, shape)
        base = [r for r in rows if r["baseline"] and (r["op"], r["shape"]) == (row["op"], row["shape"])]
        row["speedup"] = base[0]["ms"] / row["ms"] if base else None
        if row["op"] == "overhead" and base:  # per-call cost above the bare kernel, in microseconds
            row["overhead_us"] = (row["ms"] - base[0]["ms"]) * 1e3
    return rows


def _fmt_rate(v: float) -> str:
    """At least 3 significant digits, fixed point (CPU TFLOP/s are often below 0.1)."""
    if v >= 100:
        return f"{v:.0f}"
    if v >= 0.1:
        return f"{v:.2f}" if v < 10 else f"{v:.1f}"
    return f"{v:.2g}" if v < 1e-3 else f"{v:.4f}"


_COLUMNS = (  # (header, cell of a row, right-aligned)
    ("op", lambda r: r["op"], False),
    ("shape", lambda r: r["shape"], False),
    ("impl", lambda r: r["impl"] + (" *" if r["baseline"] else ""), False),
    ("ms", lambda r: f"{r['ms']:.4f}", True),
    ("p20-p80 ms", lambda r: f"{r['ms_p20']:.4f}-{r['ms_p80']:.4f}", True),
    ("GB/s", lambda r: _fmt_rate(r["GB/s"]) if "GB/s" in r else "", True),
    ("TFLOP/s", lambda r: _fmt_rate(r["TFLOP/s"]) if "TFLOP/s" in r else "", True),
    ("speedup", lambda r: f"{r['speedup']:.2f}x" if r["speedup"] else "", True),
)


def format_table(rows: list[dict]) -> str:
    """A fixed-width table, every column as wide as its longest cell (all lines the same width);
    `*` marks the baseline of each (op, shape), which the speed-up is relative to."""
    cells = [[h for h, _, _ in _COLUMNS]] + [[cell(r) for _, cell, _ in _COLUMNS] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(_COLUMNS))]

    def line(cs):
        return "  ".join(c.rjust(w) if right else c.ljust(w) for c, w, (_, _, right) in zip(cs, widths, _COLUMNS))

    lines = [line(cells[0]), "-" * (sum(widths) + 2 * (len(widths) - 1))] + [line(c) for c in cells[1:]]
    return "\n".join(lines)


def _groups(rows: list[dict]) -> list[tuple[tuple[str, str], list[dict]]]:
    """Rows grouped by (op, shape), in order of first appearance."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["op"], r["shape"]), []).append(r)
    return list(groups.items())


def plot(rows: list[dict], path: str, title: str) -> bool:
    """Horizontal bars of the speed-up over the baseline on a log axis, one group of bars per
    (op, shape) under a header, a gap between groups; the baseline is a grey hatched bar and a
    line marks 1x; each bar is labelled with its implementation, ratio and time."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
        from matplotlib.ticker import FuncFormatter, NullFormatter
    except ImportError:
        return False
    groups = [(k, [r for r in g if r["speedup"]]) for k, g in _groups(rows)]
    groups = [(k, g) for k, g in groups if g]
    if not groups:
        return False
    vals = [r["speedup"] for _, g in groups for r in g]
    lo, hi = min(vals + [1.0]), max(vals + [1.0])
    left = lo / 2.5
    # the right end leaves ~20% of the (log) axis after the longest bar for its label
    right = math.exp((math.log(hi * 1.1) - 0.2 * math.log(left)) / 0.8)
    colors = {"baseline": "lightgrey", "pyfast": "tab:blue", "other": "tab:orange"}

    def kind(r):
        return "baseline" if r["baseline"] else "pyfast" if "pyfast" in r["impl"].lower() else "other"

    y, ticks, labels, headers = 0.0, [], [], []
    bars = []  # (y, row)
    for (op, shape), g in groups:
        headers.append((y, f"{op}  {shape}"))
        y += 1
        for r in g:
            bars.append((y, r))
            ticks.append(y)
            labels.append(r["impl"])
            y += 1
        y += 0.6  # gap between groups
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.26 * y))
    for yy, r in bars:
        k = kind(r)
        ax.barh(yy, r["speedup"] - left, left=left, height=0.78, color=colors[k],
                hatch="///" if k == "baseline" else None, edgecolor="dimgrey" if k == "baseline" else colors[k],
                linewidth=0.6)
        ms = r["ms"]
        t = f"{ms * 1e3:.1f} \u00b5s" if ms < 0.1 else f"{ms:.3g} ms"
        ax.text(r["speedup"] * 1.08, yy, f"{r['speedup']:.2f}x  ({t})", va="center", fontsize=7)
    for yy, text in headers:
        ax.text(left * 1.05, yy, text, va="center", ha="left", fontsize=8, fontweight="bold",
                bbox=dict(facecolor="white", edgecolor="none", pad=1.0))
    ax.axvline(1.0, color="k", lw=0.9, zorder=0)
    ax.set_xscale("log")
    ax.set_xlim(left, right)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(y - 0.4, -0.8)
    ax.set_yticks(ticks, labels, fontsize=7)
    ax.tick_params(axis="y", length=0)
    ax.set_xlabel("speed-up over the PyTorch baseline of the same (op, shape), same run (log scale; 1x = baseline)",
                  fontsize=8)
    ax.grid(axis="x", which="both", alpha=0.25)
    ax.set_title(title, fontsize=9, loc="left")
    used = {kind(r) for _, r in bars}
    handles = [Patch(facecolor="lightgrey", edgecolor="dimgrey", hatch="///", label="baseline (1x)")]
    handles += [Patch(color=colors[k], label=label) for k, label in (("pyfast", "pyfast"), ("other", "other PyTorch"))
                if k in used]
    ax.legend(handles=handles,
              loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=3, fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return True


def run(args) -> int:
    import importlib

    import pyfast

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("pyfast bench: --device cuda but no CUDA device is available")
    if args.repeats is not None and args.repeats < 1:
        raise SystemExit(f"pyfast bench: --repeats must be at least 1, got {args.repeats}")
    repeats = args.repeats or (8 if args.quick else 40)
    families = [f.strip() for f in args.ops.split(",") if f.strip()]
    for fam in families:
        if fam not in FAMILIES:
            raise SystemExit(f"pyfast bench: unknown family {fam!r}; expected one of {FAMILIES}")
    name = device_name(device)
    out, png = output_paths(args, name)  # before any setup: a bad flag fails fast
    cases: list[Case] = []
    modules = [importlib.import_module(f"pyfast.bench.{fam}") for fam in families]
    for mod in modules:
        cases += mod.cases(device, args.quick)
    rows = run_cases(cases, device, repeats)
    print(f"pyfast {pyfast.__version__} bench on {name} (torch {torch.__version__}, threads {torch.get_num_threads()})")
    print(format_table(rows))
    print("* baseline of its (op, shape): speedup = baseline ms / ms")
    targets = [line for mod in modules if hasattr(mod, "targets") for line in mod.targets(rows, device)]
    for line in targets:  # a family's stated targets, checked on this run's rows
        print("target:", line)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    report = {
        "device": name,
        "date": datetime.date.today().isoformat(),
        "pyfast": pyfast.build_info(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "quick": bool(args.quick),
        "rows": rows,
        "targets": targets,
    }
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    os.makedirs(os.path.dirname(png) or ".", exist_ok=True)
    wrote_png = plot(rows, png, f"pyfast {pyfast.__version__} on {name} (torch {torch.__version__})")
    print(f"wrote {os.path.abspath(out)}" + (f"\n  and {os.path.abspath(png)}" if wrote_png else
                                             " (no plot: pip install matplotlib)"))
    return 0
