"""Build configuration of pycomm._C: which sources, flags and libraries."""

from __future__ import annotations

from pathlib import Path

from setuptools import Extension
from torch.utils.cpp_extension import CppExtension

VERSION = "0.1.0"

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
