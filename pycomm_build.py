"""Build configuration of pycomm._C: which sources, flags and libraries."""

from __future__ import annotations

import re
from pathlib import Path

from setuptools import Extension
from torch.utils.cpp_extension import CppExtension

# One place for the version: pycomm/__init__.py (read as text: the package
# cannot be imported before its extension is built).
VERSION = re.search(
    r'^__version__ = "([^"]+)"', (Path(__file__).parent / "pycomm" / "__init__.py").read_text(), re.M
).group(1)

# Sources every variant compiles; CUDA-only ones live in csrc/cuda/.
def cpu_sources(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in (root / "csrc").glob("*.cpp"))


def extension(root: Path) -> Extension:
    return CppExtension(
        name="pycomm._C",
        sources=cpu_sources(root),
        include_dirs=[str(root / "csrc")],
        extra_compile_args={"cxx": ["-O2", "-Wall", "-Wno-unused-parameter"]},
    )
