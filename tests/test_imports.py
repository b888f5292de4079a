"""How pycomm loads, each in a fresh interpreter: any import order works, and
nothing of torch's extension build tooling is imported at run time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The message torch's build tooling logs when it is imported on a machine with
# a CUDA toolkit and no GPU.
BUILD_TOOLING_WARNING = "No CUDA runtime is found"


def run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


def test_the_extension_can_be_the_first_import() -> None:
    result = run_python("import pycomm._C as C; print(C.CommPool.roles())")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ag" in result.stdout


def test_importing_pycomm_alone_does_not_load_torch() -> None:
    result = run_python("import sys, pycomm; assert 'torch' not in sys.modules, 'torch was loaded'")
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.timeout(120)
def test_a_pooled_world_imports_no_build_tooling() -> None:
    code = (
        "import sys\n"
        "import pycomm, pycomm.pool, pycomm.info, pycomm.fsdp, pycomm.launch, pycomm.bench.cpu\n"
        "from pycomm.launch import run_world\n"
        "from world_checks import pooled_all_gather_world\n"
        "assert run_world(pooled_all_gather_world, 2) == [[0.0, 1.0]] * 2\n"
        "assert 'torch.utils.cpp_extension' not in sys.modules\n"
    )
    env_path = os.pathsep.join([str(ROOT / "tests")])
    result = run_python(f"import sys; sys.path.insert(0, {env_path!r})\n" + code, timeout=110)
    assert result.returncode == 0, result.stderr[-3000:]
    assert BUILD_TOOLING_WARNING not in result.stderr
