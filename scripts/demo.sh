#!/usr/bin/env bash
# The README's first command: set up what the demo needs (not the
# Megatron-Bridge stack, which only scripts/test.sh installs), then run it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pycomm demo "$@"
