#!/usr/bin/env bash
# On a CUDA machine with no network (torch + CUDA, triton, nvcc and pytest preinstalled):
# build the extension in place, run every test (GPU ones included), run the benchmark, and
# write logs + results JSON to OUTDIR, within 10 minutes (240 + 210 + 140 s). Usage: bash bench/gpu_check.sh OUTDIR
set -uo pipefail
OUT=${1:?usage: bash bench/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Build only for the GPU in this machine (faster than the default 8.0;9.0a).
arch=$(python -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}' + ('a' if c[0] == 9 else ''))")
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch}
status=0
echo "== build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
MAX_JOBS=${MAX_JOBS:-$(nproc)} timeout 240 python setup.py build_ext --inplace >"$OUT/build.log" 2>&1 || { status=1; tail -30 "$OUT/build.log"; }
python -m pyfast info | tee "$OUT/info.json" || status=1
echo "== tests"
timeout 210 python -m pytest tests -q --maxfail=50 -m "not slow" -rs 2>&1 | tee "$OUT/tests.log" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "== bench"
timeout 140 python -m pyfast bench --device cuda --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem,memory.total --format=csv >"$OUT/gpu.txt" 2>&1
exit $status
