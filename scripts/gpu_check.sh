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
# The lent H200 image's compiler (CXX, and first on PATH) is a g++ wrapper
# whose builds crash at the first std::ostream insertion inside _C
# (measured: SIGSEGV in basic_ostream::_M_insert<long>, libstdc++ code linked
# into _C itself), so the distribution's own compiler is taken where there
# is one; PYCOMM_CXX chooses another.
if [ -n "${PYCOMM_CXX:-}" ]; then export CXX="$PYCOMM_CXX"
elif [ -x /usr/bin/g++ ]; then export CXX=/usr/bin/g++; fi
status=0
step() { echo "gpu_check: $*" | tee -a "$OUT_DIR/summary.txt"; }

step "$("$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "nccl", torch.cuda.nccl.version(), "gpus", torch.cuda.device_count(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")')"
step "building the CUDA variant"
start=$SECONDS
PYCOMM_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" setup.py -q build_ext --inplace > "$OUT_DIR/build-ext.log" 2>&1 \
  || { tail -40 "$OUT_DIR/build-ext.log" >&2; step "build FAILED"; exit 1; }
step "built in $((SECONDS - start)) s with ${CXX:-the default compiler}"
# A toolchain that links its own libstdc++ pieces into _C fails here, named,
# rather than as a segfault inside every test.
if ! "$PY" -c 'from pycomm import _C; s = _C.PooledGroupSpec(); s.global_ranks = [0, 1]; assert "0,1" in s.label()' \
    > "$OUT_DIR/smoke.log" 2>&1; then
  step "the built extension crashes at its first string formatting (compiler ${CXX:-default}): set PYCOMM_CXX to another compiler"
  exit 1
fi
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
# Two ranks on one GPU need NCCL 2.30 (NCCL_MULTI_RANK_GPU_ENABLE); before
# it NCCL refuses them ("Duplicate GPU detected").
# The NCCL torch runs with (torch.cuda.nccl.version() is the one it was
# built with on some versions).
nccl_code=$("$PY" -c 'from pycomm.nccl import torch_nccl_runtime_version as v; print(v())')
if ! "$PY" -c "import sys, torch; sys.exit(not (torch.cuda.device_count() >= 2 or $nccl_code >= 23000))"; then
  step "bench-nccl skipped: 2 ranks need 2 GPUs or NCCL 2.30, torch runs NCCL $nccl_code"
elif "$PY" -m pycomm bench-nccl --gpus 2 --iters 10 --out "$OUT_DIR" > "$OUT_DIR/bench-nccl.log" 2>&1; then
  step "bench-nccl: $OUT_DIR/bench-nccl.json"
else
  status=1; step "bench-nccl FAILED: $(tail -3 "$OUT_DIR/bench-nccl.log")"
fi
step "done in $SECONDS s, status $status"
exit $status
