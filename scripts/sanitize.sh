#!/usr/bin/env bash
# Runs pytest against an ASan + UBSan build of the CPU extension (PYFAST_SANITIZE=1, see setup.py).
#
#   bash scripts/sanitize.sh [pytest args...]
#   e.g. bash scripts/sanitize.sh tests/sparse/test_decode_attention.py -k "not triton and not cuda"
#
# The sanitized build never touches this checkout's own install: the source is copied to
# $VENV/src and installed (non-editable) into a venv at ${PYFAST_SANITIZE_VENV:-/tmp/pyfast-sanitize-venv}
# made with --system-site-packages (torch, triton, pytest come from the system Python). The
# install is skipped when the copied sources, compiler, Python and torch are unchanged; the
# build folder is kept, so a change recompiles only what it touches. pytest then runs from this
# checkout's root with PYTHONSAFEPATH=1 (cwd not on sys.path, in subprocesses too), so
# `import pyfast` resolves to the venv's copy (checked before and during the run). Exits
# non-zero on a test failure and on any sanitizer report.
#
# Environment: PYTHON (base interpreter, default python), PYFAST_SANITIZE_VENV, MAX_JOBS (default 2),
# ASAN_OPTIONS / UBSAN_OPTIONS (appended to the defaults below).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python}
VENV=${PYFAST_SANITIZE_VENV:-/tmp/pyfast-sanitize-venv}
export MAX_JOBS=${MAX_JOBS:-2}
export PIP_DISABLE_PIP_VERSION_CHECK=1

case "$VENV" in
  "$ROOT"|"$ROOT"/*) echo "sanitize.sh: PYFAST_SANITIZE_VENV must be outside the repo ($ROOT)" >&2; exit 2 ;;
esac

LIBASAN=$(gcc -print-file-name=libasan.so)
LIBUBSAN=$(gcc -print-file-name=libubsan.so)
for lib in "$LIBASAN" "$LIBUBSAN"; do
  [ -f "$lib" ] || { echo "sanitize.sh: $lib not found (gcc without sanitizer runtimes?)" >&2; exit 2; }
done

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv --system-site-packages "$VENV"
fi
VPY="$VENV/bin/python"
"$VPY" -c 'import sys; assert sys.version_info >= (3, 11), "needs Python >= 3.11 (PYTHONSAFEPATH)"'

# --- source snapshot: tracked + untracked-not-ignored files (mtimes kept, so ninja stays incremental)
list_sources() {
  if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$ROOT" ls-files -z --cached --others --exclude-standard
  else
    (cd "$ROOT" && find . \( -path ./build -o -path ./dist -o -path ./.git -o -name '*.egg-info' \
      -o -name __pycache__ -o -name .pytest_cache \) -prune -o -type f ! -name '*.so' -print0)
  fi
}
SRC="$VENV/src"
mkdir -p "$SRC"
find "$SRC" -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
# ls-files also lists tracked files deleted in the work tree: copy only those that exist.
(cd "$ROOT" && list_sources | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
  | tar --null -T - -cf -) | tar -C "$SRC" -xf -

STAMP=$( { (cd "$SRC" && find . -path ./build -prune -o -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum);
           gcc --version | head -1; "$VPY" -c "import sys, torch; print(sys.version, torch.__version__)"; } | sha256sum | cut -d' ' -f1)
if [ -f "$VENV/.pyfast-stamp" ] && [ "$(cat "$VENV/.pyfast-stamp")" = "$STAMP" ]; then
  echo "== sanitized build: sources unchanged, reusing $VENV =="
else
  echo "== sanitized build (ASan + UBSan, MAX_JOBS=$MAX_JOBS) into $VENV =="
  rm -f "$VENV/.pyfast-stamp"
  # Keep build/temp* (ninja's objects, for an incremental rebuild); drop the staged package
  # trees so a module deleted from the source does not linger in the install.
  rm -rf "$SRC"/build/lib.* "$SRC"/build/bdist.*
  t0=$(date +%s)
  (cd "$SRC" && PYFAST_SANITIZE=1 "$VPY" -m pip install -q --no-build-isolation --no-deps --force-reinstall .)
  echo "sanitized build: $(( $(date +%s) - t0 )) s"
  echo "$STAMP" > "$VENV/.pyfast-stamp"
fi

# --- run: sanitizer runtimes preloaded (python itself is not instrumented)
LOGS="$VENV/logs"
rm -rf "$LOGS" && mkdir -p "$LOGS"
# Python and its extensions leak by design: no leak check. ASan reports also go to files (caught
# even from a subprocess whose stderr a test swallows); UBSan ignores log_path when ASan is loaded,
# its reports go to stderr only.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:halt_on_error=1:log_path=$LOGS/asan${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
export PYTHONDONTWRITEBYTECODE=1  # nothing written into the checkout (with -p no:cacheprovider)
# cwd never on sys.path (python -P), also in subprocesses a test starts (`python -m pyfast ...`):
# pytest runs from the repo root, whose source pyfast/ must not shadow the venv's copy.
export PYTHONSAFEPATH=1

# Every pyfast module comes from the venv (the system's editable install of this checkout is
# visible through --system-site-packages, but behind the venv's site-packages), and libasan is in.
mkdir -p "$VENV/check"
cat > "$VENV/check/pyfast_sanitize_check.py" <<'PY'
import os, sys

def check_pyfast_modules():
    venv = os.path.realpath(os.environ["PYFAST_SANITIZE_VENV_DIR"])
    for name, mod in list(sys.modules.items()):
        f = getattr(mod, "__file__", None)
        if (name == "pyfast" or name.startswith("pyfast.")) and f and not os.path.realpath(f).startswith(venv + os.sep):
            raise RuntimeError(f"{name} imported from {f}, not from the sanitize venv {venv}")

def pytest_collection_finish(session):  # as a pytest plugin: after tests/conftest.py imported pyfast
    check_pyfast_modules()
PY
export PYFAST_SANITIZE_VENV_DIR="$VENV"
LD_PRELOAD="$LIBASAN:$LIBUBSAN" PYTHONPATH="$VENV/check${PYTHONPATH:+:$PYTHONPATH}" "$VPY" - <<'PY'
import pyfast, pyfast._C, pyfast.kernels, pyfast.testing
from pyfast_sanitize_check import check_pyfast_modules
check_pyfast_modules()
with open("/proc/self/maps") as maps:
    assert "libasan" in maps.read(), "libasan not loaded"
print("sanitized pyfast:", pyfast.__file__, pyfast.build_info())
PY

# --capture=sys: pytest captures Python-level output only, so a report written to fd 2 right
# before the sanitizer kills the process is not lost in pytest's fd capture (pass -s or
# --capture=fd after it to override). The output is kept in $LOGS/pytest.log and searched.
echo "== pytest under ASan + UBSan: $* =="
t0=$(date +%s)
set +e
(cd "$ROOT" && PYTHONPATH="$VENV/check${PYTHONPATH:+:$PYTHONPATH}" \
  LD_PRELOAD="$LIBASAN:$LIBUBSAN" "$VPY" -m pytest -p no:cacheprovider -p pyfast_sanitize_check \
  --capture=sys "$@") 2>&1 | tee "$LOGS/pytest.log"
rc=${PIPESTATUS[0]}
set -e
echo "pytest under sanitizers: $(( $(date +%s) - t0 )) s, exit $rc"

found=0
if grep -qE ': runtime error: |ERROR: AddressSanitizer|SUMMARY: (Address|UndefinedBehavior)Sanitizer' "$LOGS/pytest.log"; then
  echo "== sanitizer report in the pytest output (above) ==" >&2
  found=1
fi
if compgen -G "$LOGS/asan.*" >/dev/null; then
  echo "== ASan reports ==" >&2
  for f in "$LOGS"/asan.*; do echo "--- $f" >&2; cat "$f" >&2; done
  found=1
fi
if [ "$found" -ne 0 ] && [ "$rc" -eq 0 ]; then rc=1; fi
exit "$rc"
