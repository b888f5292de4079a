#!/usr/bin/env bash
# The GPU checks in one command, for a machine with a GPU and torch already
# installed (no .venv needed): builds the CUDA variant in place, prints the
# doctor's table, runs the build and GPU tests (tests/test_cuda*.py) and the
# NCCL benchmark. Usage: bash scripts/gpu_check.sh [OUTPUT_DIR]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
OUT_DIR="${1:-pycomm-out/gpu}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1

echo "gpu_check: building the CUDA variant"
PYCOMM_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" setup.py -q build_ext --inplace > "$OUT_DIR/build-ext.log" 2>&1 \
  || { tail -40 "$OUT_DIR/build-ext.log" >&2; exit 1; }
"$PY" -m pycomm doctor || true  # informative; the tests below decide
status=0
"$PY" -m pytest -v -p no:cacheprovider tests/test_cuda_build.py tests/test_cuda.py 2>&1 \
  | tee "$OUT_DIR/test_cuda.log" || status=1
"$PY" -m pycomm bench-nccl --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/bench-nccl.log" || status=1
exit $status
