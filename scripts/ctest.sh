#!/usr/bin/env bash
# Builds the C++ core with CMake and runs its unit tests with ctest, the NCCL
# lane on the simulated GPU included (label simgpu).
# PYCOMM_SANITIZE=1 (or address) builds with AddressSanitizer + LeakSanitizer
# instead (build/cmake-asan), PYCOMM_SANITIZE=thread with ThreadSanitizer
# (build/cmake-tsan). Extra arguments go to ctest (e.g. -L simgpu).
# Compiles through ccache (scripts/compiler_cache.sh); PYCOMM_CTEST_JOBS sets
# how many tests run at once (default: one per core).
# Installs GoogleTest from Debian's packages when missing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ ! -f /usr/include/gtest/gtest.h ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "ctest: installing GoogleTest (libgtest-dev)"
    (apt-get install -y -q libgtest-dev >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q libgtest-dev >/dev/null; })
  else
    echo "ctest: GoogleTest is missing; install libgtest-dev (needs root)" >&2
    exit 1
  fi
fi
case "${PYCOMM_SANITIZE:-}" in
  ""|0) SANITIZER=""; BUILD="$ROOT/build/cmake" ;;
  1|address) SANITIZER=address; BUILD="$ROOT/build/cmake-asan" ;;
  thread) SANITIZER=thread; BUILD="$ROOT/build/cmake-tsan" ;;
  *) echo "ctest: PYCOMM_SANITIZE is 1, address or thread, got '$PYCOMM_SANITIZE'" >&2; exit 2 ;;
esac
mkdir -p "$ROOT/build"
VENV="$ROOT/.venv"
# shellcheck source=scripts/compiler_cache.sh
. "$ROOT/scripts/compiler_cache.sh"
GEN=()
command -v ninja >/dev/null 2>&1 && GEN=(-G Ninja)
[ -x "$VENV/bin/ninja" ] && GEN=(-G Ninja -DCMAKE_MAKE_PROGRAM="$VENV/bin/ninja")
start=$SECONDS
cmake -S "$ROOT" -B "$BUILD" "${GEN[@]}" -DPython3_EXECUTABLE="$VENV/bin/python" \
  -DCMAKE_CXX_COMPILER_LAUNCHER="$CCACHE" \
  -DPYCOMM_SANITIZE="$SANITIZER" -DCMAKE_BUILD_TYPE=RelWithDebInfo > "$BUILD.log" 2>&1 \
  || { tail -30 "$BUILD.log" >&2; exit 1; }
cmake --build "$BUILD" -j "$(nproc)" >> "$BUILD.log" 2>&1 || { tail -40 "$BUILD.log" >&2; exit 1; }
echo "ctest: built ${BUILD#"$ROOT/"} in $((SECONDS - start)) s"
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=0"
export LSAN_OPTIONS="suppressions=$ROOT/csrc/tests/lsan.supp:print_suppressions=0"
export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1:suppressions=$ROOT/csrc/tests/tsan.supp:print_suppressions=0"
# In parallel but for the tests that measure time (RUN_SERIAL, see
# CMakeLists.txt); most tests cost a process start, and under the sanitizers
# that start (torch's libraries) is most of their time.
start=$SECONDS
status=0
ctest --test-dir "$BUILD" --output-on-failure --timeout 300 --parallel "${PYCOMM_CTEST_JOBS:-$(nproc)}" "$@" || status=$?
echo "ctest: ran ${BUILD#"$ROOT/"} in $((SECONDS - start)) s"
exit $status
