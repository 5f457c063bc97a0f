#!/usr/bin/env bash
# Compile-check every torch-free CUDA source for sm_80 and sm_90a (no CUDA torch needed).
# Prints the ptxas register/spill report. Skips with a message when nvcc is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "nvcc not found: skipping the CUDA compile-check"
  exit 0
fi
# csrc/emu is the tests' CPU emulation (its self-test kernels have deliberate bugs); the bench/
# file instantiates device templates that no kernel uses yet.
files="$(find csrc -name "*.cu" -not -path "csrc/emu/*" | sort) bench/nvcc_instantiate.cu"
[ -n "$files" ] || { echo "no .cu files"; exit 0; }
for f in $files; do
  if grep -qE "#include <(torch|ATen|c10)" "$f"; then
    echo "error: $f includes torch headers; device code must be torch-free" >&2
    exit 1
  fi
  echo "-- $f"
  if ! out=$("$NVCC" -std=c++17 -O3 -c -Icsrc -gencode=arch=compute_80,code=sm_80 \
      -gencode=arch=compute_90a,code=sm_90a -Xptxas -v -o /dev/null "$f" 2>&1); then
    echo "$out" >&2
    exit 1
  fi
  echo "$out" | grep -E "warning|[1-9][0-9]* bytes spill" || true  # any spill or warning, in full
  kernels=$(echo "$out" | grep -c "Compiling entry" || true)
  maxreg=$(echo "$out" | grep -oE "Used [0-9]+ registers" | grep -oE "[0-9]+" | sort -n | tail -1 || true)
  if [ "$kernels" -eq 0 ]; then
    echo "   no kernels (a launcher: the kernels are instantiated in other units)"
  else
    echo "   $kernels kernel variants, at most ${maxreg:-?} registers (set NVCC_VERBOSE=1 for the full ptxas report)"
  fi
  [ -z "${NVCC_VERBOSE:-}" ] || echo "$out"
done
echo "nvcc compile-check: $(echo $files | wc -w) file(s) OK"

# The ATen host side of the CUDA kernels (*_cuda_host.cpp, and module.cpp's CUDA bindings) needs a
# CUDA build of torch to compile; with a CPU torch, check it for syntax and types against torch's
# headers and the toolkit's (the one header a CPU wheel lacks, cuda_cmake_macros.h, is stubbed).
CUDA_INC=$(dirname "$(dirname "$(readlink -f "$(command -v "$NVCC")")")")/include
[ -f "$CUDA_INC/cuda_runtime_api.h" ] || CUDA_INC=$(ls -d /usr/local/cuda*/include 2>/dev/null | head -1)
stub=$(mktemp -d)
mkdir -p "$stub/c10/cuda/impl" && echo "#pragma once" > "$stub/c10/cuda/impl/cuda_cmake_macros.h"
torch_inc=$(python -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")
for f in $(find csrc -name "*_cuda_host.cpp" | sort) csrc/module.cpp; do
  echo "-- $f (host, syntax)"
  # shellcheck disable=SC2086
  g++ -std=c++17 -fsyntax-only -DPYFAST_WITH_CUDA -DTORCH_EXTENSION_NAME=_C -Icsrc $torch_inc -I"$stub" \
      -I"$CUDA_INC" $(python3-config --includes) "$f"
done
rm -rf "$stub"
echo "CUDA host syntax check: OK"
