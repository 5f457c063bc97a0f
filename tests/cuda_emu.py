"""Builds pyfast's CUDA kernels for the CPU emulation of csrc/emu (docs/design.md § Testing).

The real sources are compiled with the host compiler: csrc/emu/include shadows the CUDA headers,
and each .cu/.cuh file gets one mechanical rewrite (below) into the build directory, with a #line
directive so that compiler messages point at the checkout's file. The module binds the CUDA entry
points of csrc/kernels.h; `pyfast._ops.emulate_cuda(module)` makes the registry run them for
backend="cuda" on CPU tensors. Built with ninja in a directory per checkout and torch version, so
editing a kernel and re-running pytest rebuilds just what changed.

    python tests/cuda_emu.py          # build (or bring up to date) and print where it is
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
EMU = CSRC / "emu"
# The CUDA sources, found as setup.py and bench/nvcc_check.sh find them: every .cu is a translation
# unit (rewritten, below), every *_cuda_host.cpp an ATen host file (compiled as it is).
LAUNCHERS = tuple(sorted(str(p.relative_to(CSRC)) for p in CSRC.rglob("*.cu")))
HOSTS = tuple(sorted(str(p.relative_to(CSRC)) for p in CSRC.rglob("*_cuda_host.cpp")))
MODULE = "pyfast_cuda_emu"


def _code_mask(text: str) -> list[bool]:
    """True for each character outside comments and string / character literals."""
    mask = [True] * len(text)
    i, n = 0, len(text)
    while i < n:
        two = text[i:i + 2]
        if two == "//":
            j = text.find("\n", i)
            j = n if j < 0 else j
        elif two == "/*":
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
        elif text[i] in "\"'":
            j = i + 1
            while j < n and text[j] != text[i]:
                j += 2 if text[j] == "\\" else 1
            j += 1
        else:
            i += 1
            continue
        for k in range(i, min(j, n)):
            mask[k] = False
        i = j
    return mask


def _match_back(text: str, close: int, o: str, c: str) -> int:
    """Index of the `o` that opens the `c` at `close`."""
    depth = 0
    for i in range(close, -1, -1):
        depth += text[i] == c
        depth -= text[i] == o
        if depth == 0:
            return i
    raise ValueError(f"unbalanced {o}{c} before offset {close}")


def _match_forward(text: str, open_: int, o: str, c: str) -> int:
    depth = 0
    for i in range(open_, len(text)):
        depth += text[i] == o
        depth -= text[i] == c
        if depth == 0:
            return i
    raise ValueError(f"unbalanced {o}{c} after offset {open_}")


def _split_top(text: str) -> list[str]:
    """`text` split at commas outside (), [], {} and <>."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "([{<"
        depth -= ch in ")]}>"
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _rewrite_launches(text: str) -> str:
    """kernel<<<grid, block[, smem[, stream]]>>>(args) ->
    ::pyfast_emu::launch(::pyfast_emu::LaunchConfig(grid, block, ...), "kernel", [=] { kernel(args); })"""
    while True:
        mask = _code_mask(text)
        at = next((m.start() for m in re.finditer("<<<", text) if mask[m.start()]), None)
        if at is None:
            return text
        i = at - 1  # the kernel expression: identifiers, ::, template arguments
        while i >= 0:
            if text[i] == ">":
                i = _match_back(text, i, "<", ">") - 1
            elif text[i].isalnum() or text[i] in "_:":
                i -= 1
            else:
                break
        start = i + 1
        kernel = text[start:at]
        cfg_end = text.index(">>>", at)
        cfg = text[at + 3:cfg_end]
        open_ = cfg_end + 3
        while text[open_].isspace():
            open_ += 1
        close = _match_forward(text, open_, "(", ")")
        args = text[open_ + 1:close]
        text = (text[:start] + f'::pyfast_emu::launch(::pyfast_emu::LaunchConfig({cfg}), "{kernel.strip()}", '
                f"[=] {{ {kernel}({args}); }})" + text[close + 1:])


_SHARED = re.compile(r"(extern\s+)?__shared__\s+(?:__align__\s*\(\s*(\d+)\s*\)\s*)?")
_DECL = re.compile(r"^(?P<type>.*?)\s*\b(?P<name>[A-Za-z_]\w*)\s*(?P<dims>(?:\[[^\]]*\]\s*)*)$", re.S)


def _rewrite_shared(text: str) -> str:
    """`__shared__ [__align__(n)] T a[N], b;` -> references into the block's emulated shared memory
    (one static slot per declaration); `extern __shared__ T s[];` -> the dynamic shared memory."""
    while True:
        mask = _code_mask(text)
        m = next((m for m in _SHARED.finditer(text) if mask[m.start()]), None)
        if m is None:
            return text
        end = text.index(";", m.end())
        decl = text[m.end():end]
        align = m.group(2) or "16"
        if m.group(1):  # extern: the dynamic shared memory
            d = _DECL.match(decl.strip())
            out = (f"{d['type']}* const {d['name']} = "
                   f"static_cast<{d['type']}*>(::pyfast_emu::dynamic_shared());")
        else:
            parts = _split_top(decl)
            first = _DECL.match(parts[0].strip())
            if first is None:
                raise ValueError(f"cannot parse the __shared__ declaration {decl!r}")
            base, out = first["type"], []
            for k, p in enumerate(parts):
                d = first if k == 0 else _DECL.match(base + " " + p.strip())
                name, dims = d["name"], re.sub(r"\s+", "", d["dims"])
                slot = f"pyfast_emu_slot_{name}"
                out.append(f"static ::pyfast_emu::SharedSlot {slot}; "
                           f"auto& {name} = ::pyfast_emu::shared_var<{base}{dims}>({slot}, \"{name}\", {align});")
            out = " ".join(out)
        # Keep the line count: the declaration's newlines stay.
        text = text[:m.start()] + out + "\n" * decl.count("\n") + text[end + 1:]


def rewrite(text: str, path: Path) -> str:
    """The emulation's version of one .cu/.cuh file (same line numbers)."""
    return f'#line 1 "{path}"\n' + _rewrite_shared(_rewrite_launches(text))


def build_dir() -> Path:
    base = os.environ.get("PYFAST_EMU_BUILD_DIR") or Path.home() / ".cache" / "pyfast" / "cuda_emu"
    key = hashlib.sha256(f"{ROOT}|{torch.__version__}|{sys.version}".encode()).hexdigest()[:16]
    return Path(base) / key


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def generate(out: Path) -> list[Path]:
    """Writes the rewritten .cu/.cuh files under out/gen; returns the launchers' translation units."""
    gen = out / "gen"
    for src in sorted(CSRC.rglob("*.cu*")):
        if src.suffix not in (".cu", ".cuh"):
            continue
        rel = src.relative_to(CSRC)
        _write_if_changed(gen / rel, rewrite(src.read_text(), src))
    units = []
    for rel in LAUNCHERS:
        unit = gen / (rel.replace("/", "__").replace(".cu", "_cu") + ".cpp")
        _write_if_changed(unit, f'#include "{rel}"\n')
        units.append(unit)
    return units


def load(verbose: bool = False):
    """Builds (if anything changed) and imports the emulated module."""
    from torch.utils.cpp_extension import load as load_extension

    import pyfast  # noqa: F401  (the module reads the op registry when it is imported)

    out = build_dir()
    out.mkdir(parents=True, exist_ok=True)
    units = generate(out)
    sources = [EMU / "emu_runtime.cpp", EMU / "emu_module.cpp", *units, *(CSRC / h for h in HOSTS)]
    return load_extension(
        name=MODULE,
        sources=[str(s) for s in sources],
        extra_include_paths=[str(EMU / "include"), str(out / "gen"), str(CSRC)],
        # PYFAST_EMU_OPT: the optimisation level (default -O2; scripts/mutation_check.py builds its
        # mutants at -O1: half the compile time of the big launcher units, tests a little slower).
        extra_cflags=[os.environ.get("PYFAST_EMU_OPT", "-O2"), "-fno-strict-aliasing"],
        build_directory=str(out),
        with_cuda=False,
        verbose=verbose,
    )


if __name__ == "__main__":
    mod = load(verbose="-v" in sys.argv)
    print(mod.__file__)
