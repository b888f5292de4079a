#!/usr/bin/env bash
# Line coverage of the NCCL lane (csrc/cuda/*.cpp) by the CPU tests: builds
# the C++ tests with gcov instrumentation (build/cmake-coverage), runs them
# (the simulated GPU and the real layers without a GPU) and prints gcovr's
# summary; the last line is the total percentage. Extra arguments go to gcovr
# (e.g. --html-details build/coverage.html).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
[ -x .venv/bin/python ] || bash scripts/setup.sh
BUILD="$ROOT/build/cmake-coverage"
GEN=()
[ -x "$ROOT/.venv/bin/ninja" ] && GEN=(-G Ninja -DCMAKE_MAKE_PROGRAM="$ROOT/.venv/bin/ninja")
cmake -S "$ROOT" -B "$BUILD" "${GEN[@]}" -DPython3_EXECUTABLE="$ROOT/.venv/bin/python" \
  -DPYCOMM_COVERAGE=ON -DCMAKE_BUILD_TYPE=Debug > "$BUILD.log" 2>&1 || { tail -30 "$BUILD.log" >&2; exit 1; }
cmake --build "$BUILD" -j "$(nproc)" >> "$BUILD.log" 2>&1 || { tail -40 "$BUILD.log" >&2; exit 1; }
find "$BUILD" -name '*.gcda' -delete
ctest --test-dir "$BUILD" -L simgpu --timeout 300 > "$BUILD.ctest.log" 2>&1 || { tail -40 "$BUILD.ctest.log" >&2; exit 1; }
.venv/bin/python -m gcovr --root "$ROOT" --filter 'csrc/cuda/.*\.cpp' \
  --gcov-executable gcov "$@" "$BUILD" --txt --sort uncovered-percent | tee "$BUILD.txt"
