#!/usr/bin/env bash
# On a CUDA machine with no network (torch + CUDA, triton, nvcc and pytest preinstalled): build the
# extension in place, run the GPU tests, run the benchmark; logs + results JSON go to OUTDIR.
#
#   bash bench/gpu_check.sh OUTDIR [STAGE ...]     stages: build tests bench (default: all three)
#
# Time limits per stage (seconds; env overrides): build 240, tests 420, bench 240. The tests'
# first run JIT-compiles ~150-200 Triton specializations, which alone may take minutes, so the
# budget is large and the Triton cache lives in build/triton-cache: kept between calls on the
# device machine, so a second call (e.g. `bench` after `build tests`) starts warm. With a
# 10-minute limit per call, run `build tests` in one call and `bench` in the next.
# The CPU emulation of the CUDA kernels (pytest -m cuda_emu) is left to CI: this is about the GPU.
set -uo pipefail
OUT=${1:?usage: bash bench/gpu_check.sh OUTDIR [build] [tests] [bench]}
shift
STAGES=${*:-build tests bench}
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/build/triton-cache}
mkdir -p "$TRITON_CACHE_DIR"
status=0
has() { [[ " $STAGES " == *" $1 "* ]]; }

if has build; then
  # Build only for the GPU in this machine (faster than the default 8.0;9.0a).
  arch=$(python -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}' + ('a' if c[0] == 9 else ''))")
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch}
  echo "== build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
  SECONDS=0
  MAX_JOBS=${MAX_JOBS:-$(nproc)} timeout "${BUILD_TIMEOUT:-240}" python setup.py build_ext --inplace >"$OUT/build.log" 2>&1 ||
    { status=1; tail -30 "$OUT/build.log"; }
  echo "build: ${SECONDS} s"
  python -m pyfast info | tee "$OUT/info.json" || status=1
fi
if has tests; then
  echo "== tests (Triton cache: $TRITON_CACHE_DIR, $(find "$TRITON_CACHE_DIR" -name '*.json' | wc -l) entries)"
  SECONDS=0
  timeout "${TESTS_TIMEOUT:-420}" python -m pytest tests -q --maxfail=50 -m "not slow and not cuda_emu" -rs \
    --durations=15 2>&1 | tee "$OUT/tests.log" | tail -40
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  echo "tests: ${SECONDS} s"
fi
if has bench; then
  echo "== bench"
  SECONDS=0
  timeout "${BENCH_TIMEOUT:-240}" python -m pyfast bench --device cuda --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  echo "bench: ${SECONDS} s"
fi
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem,memory.total --format=csv >"$OUT/gpu.txt" 2>&1
exit $status
