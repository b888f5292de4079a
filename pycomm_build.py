"""Build configuration of pycomm._C: which variant, sources, paths and libraries.

The CUDA+NCCL variant is built whenever torch has CUDA and a CUDA toolkit and
NCCL's header are found; the CPU-only variant (gloo transport) otherwise.
PYCOMM_CUDA=0 forces the CPU variant, PYCOMM_CUDA=1 makes a missing CUDA piece
an error instead of a fallback. Every path is found here; no GPU is needed to
build.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils.cpp_extension as cpp_extension
from setuptools import Extension

logger = logging.getLogger("pycomm_build")

# One place for the version: pycomm/__init__.py (read as text: the package
# cannot be imported before its extension is built).
VERSION = re.search(
    r'^__version__ = "([^"]+)"', (Path(__file__).parent / "pycomm" / "__init__.py").read_text(), re.M
).group(1)

# torch cannot guess target architectures without a GPU; these cover A100, H100
# and B200 and are used only when the builder set none. The extension compiles
# no device code today, but torch's build helpers still read the list.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0;10.0+PTX"

# Python's own CFLAGS (sysconfig) put -g -O3 before these; the later flags win.
# Debug information makes the objects 27 times larger (31 MB against 1.1 MB)
# and a build on 2 cores 1.5 times longer (146 s against 98 s, no compiler
# cache), for symbols only a debugger needs: PYCOMM_DEBUG_INFO=1 keeps them.
COMPILE_FLAGS = ["-O2", "-Wall", "-Wno-unused-parameter"]


def compile_flags() -> list[str]:
    debug_info = os.environ.get("PYCOMM_DEBUG_INFO", "0").lower() in ("1", "on", "yes", "true")
    return [*COMPILE_FLAGS, "-g" if debug_info else "-g0"]


@dataclass(frozen=True)
class CudaPaths:
    toolkit: Path  # holds include/cuda_runtime.h
    include_dirs: list[Path]
    library_dirs: list[Path]


class CudaNotFound(Exception):
    """A piece the CUDA variant needs is missing; the message names it."""


def _has_runtime_header(folder: Path) -> bool:
    return (folder / "include" / "cuda_runtime.h").is_file()


def _toolkit_from_nvcc(nvcc: str) -> Path | None:
    """The toolkit nvcc really belongs to. nvcc on PATH may be a wrapper script
    in /usr/local/bin, so its own folder proves nothing; its dry run prints the
    toolkit it runs from (TOP=...)."""
    candidate = Path(nvcc).resolve().parent.parent
    if _has_runtime_header(candidate):
        return candidate
    try:
        dry_run = subprocess.run(
            [nvcc, "--dryrun", "-c", "pycomm_probe.cu"],
            capture_output=True, text=True, timeout=60, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"^#\$ TOP=(\S+)", dry_run.stdout + dry_run.stderr, re.M)
    if match:
        top = Path(match.group(1)).resolve()
        for folder in (top, top.parent):
            if _has_runtime_header(folder):
                return folder
    return None


def find_cuda_toolkit() -> Path | None:
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(variable)
        if value and _has_runtime_header(Path(value)):
            return Path(value)
    nvcc = shutil.which("nvcc")
    if nvcc:
        found = _toolkit_from_nvcc(nvcc)
        if found:
            return found
    for folder in [Path("/usr/local/cuda"), *sorted(Path("/usr/local").glob("cuda-*"), reverse=True)]:
        if _has_runtime_header(folder):
            return folder
    return None


def _wheel_folder(package: str) -> Path | None:
    """Folder of an nvidia-* wheel package (namespace packages: no __file__)."""
    try:
        spec = importlib.util.find_spec(package)
    except ModuleNotFoundError:
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def find_cuda_paths() -> CudaPaths:
    if not torch.version.cuda:
        raise CudaNotFound(f"torch {torch.__version__} was built without CUDA")
    toolkit = find_cuda_toolkit()
    if toolkit is None:
        raise CudaNotFound(
            "no CUDA toolkit with include/cuda_runtime.h (looked at CUDA_HOME, "
            "CUDA_PATH, nvcc on PATH, /usr/local/cuda*)"
        )
    nccl = _wheel_folder("nvidia.nccl")
    if nccl is None or not (nccl / "include" / "nccl.h").is_file():
        raise CudaNotFound("nccl.h not found (install the nvidia-nccl-cu* wheel torch uses)")
    if not (nccl / "lib" / "libnccl.so.2").is_file():
        raise CudaNotFound(f"libnccl.so.2 not found under {nccl / 'lib'}")
    include_dirs = [nccl / "include"]
    # torch's CUDA headers include CUDA library headers (cusparse, cublas...)
    # that a runtime-only toolkit lacks; the CUDA wheels torch depends on have them.
    major = torch.version.cuda.split(".")[0]
    for package in (f"nvidia.cu{major}", "nvidia.cuda_runtime"):
        folder = _wheel_folder(package)
        if folder is not None and (folder / "include").is_dir():
            include_dirs.append(folder / "include")
    return CudaPaths(toolkit=toolkit, include_dirs=include_dirs, library_dirs=[nccl / "lib"])


def cuda_paths_or_none() -> CudaPaths | None:
    """The CUDA variant's paths, or None for the CPU variant (see PYCOMM_CUDA)."""
    wanted = os.environ.get("PYCOMM_CUDA", "auto").lower()
    if wanted in ("0", "off", "no", "false"):
        return None
    try:
        return find_cuda_paths()
    except CudaNotFound as e:
        if wanted in ("1", "on", "yes", "true"):
            raise SystemExit(f"PYCOMM_CUDA={wanted} but the CUDA variant cannot be built: {e}")
        logger.warning("building the CPU-only variant: %s", e)
        return None


def sources(root: Path, cuda: bool) -> list[str]:
    """csrc/*.cpp in every variant; csrc/cuda/*.cpp only in the CUDA variant."""
    files = sorted((root / "csrc").glob("*.cpp"))
    if cuda:
        files += sorted((root / "csrc" / "cuda").glob("*.cpp"))
    return [str(p.relative_to(root)) for p in files]


def extension(root: Path) -> Extension:
    cuda = cuda_paths_or_none()
    if cuda is None:
        return cpp_extension.CppExtension(
            name="pycomm._C",
            sources=sources(root, cuda=False),
            include_dirs=[str(root / "csrc")],
            extra_compile_args={"cxx": compile_flags()},
        )
    # torch.utils.cpp_extension fixed CUDA_HOME at import from nvcc's folder;
    # CUDAExtension reads the module global, so point it at the real toolkit.
    cpp_extension.CUDA_HOME = str(cuda.toolkit)
    os.environ["CUDA_HOME"] = str(cuda.toolkit)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
    logger.info("building the CUDA+NCCL variant with the toolkit in %s", cuda.toolkit)
    library_dirs = [str(p) for p in cuda.library_dirs]
    return cpp_extension.CUDAExtension(
        name="pycomm._C",
        sources=sources(root, cuda=True),
        include_dirs=[str(root / "csrc"), *(str(p) for p in cuda.include_dirs)],
        library_dirs=library_dirs,
        # libnccl.so.2 has no unversioned link name in the wheel: link by file.
        extra_link_args=[
            *(f"-Wl,-rpath,{d}" for d in library_dirs),
            "-l:libnccl.so.2",
        ],
        define_macros=[("PYCOMM_CUDA", "1")],
        extra_compile_args={"cxx": compile_flags(), "nvcc": ["-O2"]},
    )
