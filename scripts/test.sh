#!/usr/bin/env bash
# The README's second command: set up (when needed, Megatron-Bridge included),
# then run the C++ unit tests (ctest) plain, under AddressSanitizer +
# LeakSanitizer and under ThreadSanitizer, then the whole pytest suite.
# Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TIMES=()
timed() {  # label, command...
  local label="$1" start=$SECONDS
  shift
  "$@"
  TIMES+=("$label $((SECONDS - start)) s")
}
timed setup bash "$ROOT/scripts/setup.sh" --with-bridge
timed "C++ tests" bash "$ROOT/scripts/ctest.sh"
timed "C++ tests, ASan+LSan" env PYCOMM_SANITIZE=address bash "$ROOT/scripts/ctest.sh"
timed "C++ tests, TSan" env PYCOMM_SANITIZE=thread bash "$ROOT/scripts/ctest.sh"
echo "test: $(printf '%s, ' "${TIMES[@]}")pytest next"
exec "$ROOT/.venv/bin/python" -m pytest -q "$@"
