#!/usr/bin/env bash
# The GPU checks in one command, for a lent GPU machine with torch already
# installed (no .venv, no registry needed): builds the CUDA variant in place,
# prints the doctor's table, runs the GPU tests at world sizes 1, 2 and 4 on
# the GPUs there are (several ranks share a GPU with
# NCCL_MULTI_RANK_GPU_ENABLE=1), then bench-nccl at 2 ranks. Everything lands
# in OUT_DIR: logs, JUnit XML, bench-nccl.json, a summary.
# Usage: bash scripts/gpu_check.sh OUT_DIR   (about 8 minutes with the build)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
OUT_DIR="${1:-pycomm-out/gpu}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 NCCL_MULTI_RANK_GPU_ENABLE=1
status=0
step() { echo "gpu_check: $*" | tee -a "$OUT_DIR/summary.txt"; }

step "$("$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")')"
step "building the CUDA variant"
start=$SECONDS
PYCOMM_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" setup.py -q build_ext --inplace > "$OUT_DIR/build-ext.log" 2>&1 \
  || { tail -40 "$OUT_DIR/build-ext.log" >&2; step "build FAILED"; exit 1; }
step "built in $((SECONDS - start)) s"
"$PY" -m pycomm doctor > "$OUT_DIR/doctor.txt" 2>&1 || true  # informative; the tests decide

run_tests() {  # name, pytest arguments...
  local name="$1"; shift
  if "$PY" -m pytest -v -p no:cacheprovider --junitxml="$OUT_DIR/$name.xml" "$@" > "$OUT_DIR/$name.log" 2>&1; then
    step "$name: $(tail -1 "$OUT_DIR/$name.log")"
  else
    status=1; step "$name FAILED: $(tail -1 "$OUT_DIR/$name.log")"
  fi
}
run_tests build tests/test_cuda_build.py
run_tests single-rank tests/test_cuda.py
run_tests multi-rank tests/test_cuda_multirank.py
if "$PY" -m pycomm bench-nccl --gpus 2 --iters 10 --out "$OUT_DIR" > "$OUT_DIR/bench-nccl.log" 2>&1; then
  step "bench-nccl: $OUT_DIR/bench-nccl.json"
else
  status=1; step "bench-nccl FAILED: $(tail -3 "$OUT_DIR/bench-nccl.log")"
fi
step "done in $SECONDS s, status $status"
exit $status
