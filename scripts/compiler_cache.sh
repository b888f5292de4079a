# Sourced by the build scripts: compile through ccache (requirements.txt
# installs it into .venv) with one cache in ~/.cache/ccache for every checkout
# of pycomm on this machine, so a fresh clone recompiles nothing that an
# earlier checkout already compiled. Expects ROOT and VENV.
# CCACHE_BASEDIR makes the paths inside the checkout relative before hashing
# (a clone in another folder hits the same entries); CCACHE_NOHASHDIR keeps
# the working directory, which -g builds would otherwise hash, out of the key.
# PYCOMM_CCACHE=0 compiles without the cache.
CCACHE=""
if [ "${PYCOMM_CCACHE:-1}" != 0 ] && [ -x "$VENV/bin/ccache" ]; then
  CCACHE="$VENV/bin/ccache"
  export CCACHE_BASEDIR="$ROOT" CCACHE_NOHASHDIR=1
  # torch's extension builder takes a compiler, not a launcher: a link named
  # c++ makes ccache find the real c++ on PATH (its masquerade mode).
  mkdir -p "$VENV/lib/ccache"
  ln -sf "$CCACHE" "$VENV/lib/ccache/c++"
fi
