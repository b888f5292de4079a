"""The install: `pip install --no-build-isolation .` is the way, and a plain
(isolated) `pip install .` stops at once with that advice instead of fetching
a torch of its own and the CUDA wheels into a throwaway build environment."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ADVICE = "pip install --no-build-isolation ."


def _wheel_of_installed(name: str, folder: Path) -> None:
    """Packs an installed pure-Python distribution back into a wheel, so an
    offline index can serve the build backend without a download."""
    dist = importlib.metadata.distribution(name)
    version = dist.version
    path = folder / f"{dist.metadata['Name'].replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as whl:
        for file in dist.files or []:
            if file.parts[0] == ".." or "__pycache__" in file.parts:
                continue  # console scripts and bytecode: pip makes its own
            whl.write(dist.locate_file(file), file.as_posix())


def test_isolated_pip_install_fails_fast_with_the_advice(tmp_path: Path) -> None:
    # An offline index with only the build backend: the build itself cannot
    # download anything, torch included, whatever pyproject.toml asks for.
    index = tmp_path / "index"
    index.mkdir()
    for name in ("setuptools",):
        _wheel_of_installed(name, index)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull  # no machine-wide index, links or constraints
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(index),
         "--no-cache-dir", "--no-deps", "--target", str(tmp_path / "target"), str(ROOT)],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )
    elapsed = time.monotonic() - start
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert ADVICE in output, output
    assert "pycomm: torch is not importable" in output, output
    assert "requirement torch" not in output.lower(), output  # never asked the index for it
    assert elapsed < 60, f"took {elapsed:.0f} s:\n{output}"
    assert not (tmp_path / "target").exists() or not any((tmp_path / "target").iterdir())
