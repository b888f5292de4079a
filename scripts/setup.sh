#!/usr/bin/env bash
# Sets up .venv at the repository root (Python 3.12 found on this machine),
# installs the pinned requirements and builds + installs pycomm (editable, so
# ninja rebuilds only what changed). Safe to run again: it skips what is done.
#   --with-bridge  also installs Megatron-Bridge and Transformer Engine's torch
#                  extension, which only tests/test_megatron_bridge.py needs
#                  (scripts/test.sh asks for them; the demo does not).
# Each stage keeps its own stamp in .venv: the plain set-up never redoes or
# undoes the bridge stage, and the bridge stage never redoes the plain one.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
WITH_BRIDGE=0
for arg in "$@"; do
  case "$arg" in
    --with-bridge) WITH_BRIDGE=1 ;;
    *) echo "setup: unknown option '$arg' (only --with-bridge)" >&2; exit 2 ;;
  esac
done

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

# PyPI downloads here are sometimes cut off mid-wheel (torch is 550 MB): pip
# resumes a cut download itself, and a whole attempt that still fails is
# tried again after a pause rather than failing the set-up.
pip_install() {
  local attempt
  for attempt in 1 2 3 4; do
    if "$VENV/bin/python" -m pip install -q --resume-retries 20 "$@"; then return 0; fi
    [ "$attempt" = 4 ] && break
    echo "setup: pip install $* failed (attempt $attempt of 4); trying again in $((attempt * 15)) s" >&2
    sleep $((attempt * 15))
  done
  echo "setup: pip install $* failed 4 times; see pip's error above" >&2
  return 1
}

stamp_matches() { [ "$(cat "$VENV/.pycomm-$1.sha" 2>/dev/null)" = "$2" ]; }

WANT="$(sha256sum requirements.txt | cut -d' ' -f1)"
if ! stamp_matches requirements "$WANT"; then
  echo "setup: installing requirements.txt (torch takes a minute or two)"
  start=$SECONDS
  "$VENV/bin/python" -m pip install -q --upgrade pip
  pip_install -r requirements.txt
  echo "$WANT" > "$VENV/.pycomm-requirements.sha"
  echo "setup: requirements.txt installed in $((SECONDS - start)) s"
fi

if [ "$WITH_BRIDGE" = 1 ]; then
  # Transformer Engine's extension is built against the installed torch: a
  # new torch redoes this stage, whatever else requirements.txt changed.
  TORCH_VERSION="$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("torch"))')"
  WANT="$( (cat requirements-bridge.txt requirements-bridge-source.txt; echo "torch $TORCH_VERSION") | sha256sum | cut -d' ' -f1)"
  if ! stamp_matches bridge "$WANT"; then
    echo "setup: installing Megatron-Bridge and Transformer Engine (a first build of its extension takes about half an hour on 2 cores; pip keeps the wheel)"
    start=$SECONDS
    # Without Bridge's own requirements (requirements-bridge.txt says why).
    pip_install --no-deps -r requirements-bridge.txt
    NVTE_FRAMEWORK=pytorch NVTE_PYTORCH_FORCE_BUILD=TRUE NVTE_BUILD_USE_NVIDIA_WHEELS=1 \
      CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" CPATH="${CUDA_HOME:-/usr/local/cuda}/include${CPATH:+:$CPATH}" \
      MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
      pip_install --no-deps --no-build-isolation -r requirements-bridge-source.txt
    echo "$WANT" > "$VENV/.pycomm-bridge.sha"
    echo "setup: Megatron-Bridge set installed in $((SECONDS - start)) s"
  fi
fi

# shellcheck source=scripts/compiler_cache.sh
. "$ROOT/scripts/compiler_cache.sh"
if [ -n "$CCACHE" ] && [ -z "${CXX:-}" ]; then export CXX="$VENV/lib/ccache/c++"; fi

echo "setup: building pycomm (ninja; only what changed)"
start=$SECONDS
MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$VENV/bin/python" setup.py -q build_ext --inplace > "$ROOT/build-ext.log" 2>&1 \
  || { tail -40 "$ROOT/build-ext.log" >&2; echo "setup: build failed, full log in build-ext.log" >&2; exit 1; }
echo "setup: pycomm built in $((SECONDS - start)) s"
if ! (cd "$VENV" && "$VENV/bin/python" -c 'import pycomm' >/dev/null 2>&1); then
  PYCOMM_PREBUILT=1 "$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps -e .
fi
"$VENV/bin/python" -c 'import pycomm, json; print("setup: pycomm", json.dumps(pycomm.build_info()))'
