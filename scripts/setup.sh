#!/usr/bin/env bash
# Sets up .venv at the repository root (Python 3.12 found on this machine),
# installs the pinned requirements and builds + installs pycomm (editable, so
# ninja rebuilds only what changed). Safe to run again: it skips what is done.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"

is_python312() { "$@" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; }

find_python312() {
  if command -v python3.12 >/dev/null 2>&1 && is_python312 python3.12; then
    echo "python3.12"; return 0
  fi
  if command -v pyenv >/dev/null 2>&1; then
    local v
    for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.[0-9]+)?$' | sort -rV); do
      if PYENV_VERSION="$v" is_python312 pyenv exec python3.12; then
        echo "$(PYENV_VERSION="$v" pyenv which python3.12)"; return 0
      fi
    done
  fi
  for candidate in python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 && is_python312 "$candidate"; then
      echo "$candidate"; return 0
    fi
  done
  return 1
}

if [ ! -x "$VENV/bin/python" ] || ! is_python312 "$VENV/bin/python"; then
  PY="$(find_python312)" || { echo "setup: Python 3.12 is needed (megatron-core requires it); install python3.12" >&2; exit 1; }
  echo "setup: creating $VENV with $PY"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
fi

STAMP="$VENV/.pycomm-requirements.sha"
WANT="$(cat requirements.txt requirements-bridge.txt requirements-bridge-source.txt | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "setup: installing requirements (torch takes about a minute)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -r requirements.txt
  # Megatron-Bridge for its tests, without Bridge's own requirements
  # (requirements-bridge.txt says why); then Transformer Engine's torch
  # extension, built from source against this torch (tens of minutes on 2 cores).
  "$VENV/bin/python" -m pip install -q --no-deps -r requirements-bridge.txt
  NVTE_FRAMEWORK=pytorch NVTE_PYTORCH_FORCE_BUILD=TRUE NVTE_BUILD_USE_NVIDIA_WHEELS=1 \
    CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" CPATH="${CUDA_HOME:-/usr/local/cuda}/include${CPATH:+:$CPATH}" \
    MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -r requirements-bridge-source.txt
  echo "$WANT" > "$STAMP"
fi

echo "setup: building pycomm (ninja; only what changed)"
MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$VENV/bin/python" setup.py -q build_ext --inplace > "$ROOT/build-ext.log" 2>&1 \
  || { tail -40 "$ROOT/build-ext.log" >&2; echo "setup: build failed, full log in build-ext.log" >&2; exit 1; }
if ! (cd /tmp && "$VENV/bin/python" -c 'import pycomm' >/dev/null 2>&1); then
  PYCOMM_PREBUILT=1 "$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps -e .
fi
"$VENV/bin/python" -c 'import pycomm, json; print("setup: pycomm", json.dumps(pycomm.build_info()))'
