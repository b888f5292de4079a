#!/usr/bin/env bash
# Builds pycomm against another torch release and runs the whole test suite
# with it, e.g. `bash scripts/test_other_torch.sh 2.11.0` (the oldest torch
# pycomm supports). Needs the main set-up first (bash scripts/setup.sh).
#
# Only torch itself is installed (about 900 MB, without its dependencies) into
# a throw-away venv; everything else, the CUDA and NCCL wheels included, comes
# from .venv through a .pth file that sits behind the venv's own packages. The
# checkout is copied, so the build of .venv is untouched.
set -euo pipefail

VERSION="${1:?usage: scripts/test_other_torch.sh TORCH_VERSION [pytest args...]}"
shift
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MAIN_SITE="$("$ROOT/.venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/pycomm-torch-$VERSION.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

"$ROOT/.venv/bin/python" -m venv --without-pip "$WORK/venv"
"$ROOT/.venv/bin/python" -m pip --python "$WORK/venv/bin/python" install -q --no-deps "torch==$VERSION"
SITE="$("$WORK/venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')"
echo "$MAIN_SITE" > "$SITE/zz-pycomm-main-venv.pth"

mkdir -p "$WORK/src" && (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
  | xargs -0 -I{} cp --parents {} "$WORK/src/")
cd "$WORK/src"
export PATH="$ROOT/.venv/bin:$PATH"  # ninja
echo "test_other_torch: building pycomm against torch $VERSION"
MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$WORK/venv/bin/python" setup.py -q build_ext --inplace > build-ext.log 2>&1 \
  || { tail -40 build-ext.log >&2; exit 1; }
"$WORK/venv/bin/python" -c 'import json, pycomm; print("test_other_torch:", json.dumps(pycomm.build_info()))'
# The checkout's pycomm for the tests' own subprocesses too (.venv's editable
# install is behind a .pth that the borrowed site directory does not run).
export PYTHONPATH="$WORK/src${PYTHONPATH:+:$PYTHONPATH}"
"$WORK/venv/bin/python" -m pytest -q -p no:cacheprovider tests/ "$@"
