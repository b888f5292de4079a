#!/usr/bin/env bash
# The README's second command: set up (when needed), then run the C++ unit
# tests (ctest) and the whole pytest suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
bash "$ROOT/scripts/ctest.sh"
# The same C++ unit tests under AddressSanitizer + LeakSanitizer, then the
# threaded ones (the NCCL lane on the simulated GPU, the lane, the backend)
# under ThreadSanitizer.
PYCOMM_SANITIZE=address bash "$ROOT/scripts/ctest.sh"
PYCOMM_SANITIZE=thread bash "$ROOT/scripts/ctest.sh"
exec "$ROOT/.venv/bin/python" -m pytest -q "$@"
