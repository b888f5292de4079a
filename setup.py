"""Builds pycomm._C with torch.utils.cpp_extension (ninja, incremental).

The CPU variant (gloo transport) is always built; see pycomm_build.py for how
the CUDA/NCCL variant is detected.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

# The extension is compiled against the torch it will run with (headers, C++
# ABI), so it can only be built in the environment that has that torch. pip's
# default isolated build would install a second torch (and its CUDA wheels,
# over a gigabyte) into a throwaway environment and build against that one;
# stop before anything is downloaded and say how to install.
try:
    from torch.utils.cpp_extension import BuildExtension
except ImportError:
    sys.exit(
        "pycomm: torch is not importable in this build environment; install torch first, "
        "then install pycomm with `pip install --no-build-isolation .`"
    )

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))  # build backends do not put the project on sys.path

import pycomm_build  # noqa: E402

setup(
    name="pycomm",
    version=pycomm_build.VERSION,
    description=(
        "Pooled duplicate communicators with dedicated all-gather and "
        "reduce-scatter lanes for FSDP trainers"
    ),
    python_requires=">=3.12",
    packages=find_packages(include=["pycomm", "pycomm.*"]),
    # scripts/setup.sh builds the extension in place first (ninja, incremental
    # in build/) and then installs editable with PYCOMM_PREBUILT=1, so the
    # install does not compile everything again in a temporary folder.
    ext_modules=[] if os.environ.get("PYCOMM_PREBUILT") else [pycomm_build.extension(ROOT)],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    install_requires=["torch>=2.11", "pyyaml", "rich", "tqdm", "matplotlib"],
    extras_require={"megatron": ["megatron-core>=0.19", "einops"]},
    entry_points={"console_scripts": ["pycomm=pycomm.__main__:main"]},
)
