"""Shared test helpers: spawned gloo worlds come from pycomm.launch."""

from __future__ import annotations

import os
import sys
import tempfile
from importlib.util import find_spec

import pytest

# Worker functions live in the test modules; spawned ranks import them by name.
sys.path.insert(0, os.path.dirname(__file__))


def pytest_configure(config: pytest.Config) -> None:
    # torch's flight recorder is on by default and a rank dumps it at its first
    # timeout; the tests that time out on purpose dump into a folder of the
    # run's, not into torch's cache folder in the home directory.
    if "TORCH_FR_DUMP_TEMP_FILE" not in os.environ:
        folder = tempfile.mkdtemp(prefix="pycomm-fr-")
        os.environ["TORCH_FR_DUMP_TEMP_FILE"] = os.path.join(folder, "trace_rank_")
    # The Megatron tests' ranks (4 to 8 a world) find Megatron-Core imported
    # in the fork server instead of importing it each.
    if find_spec("megatron") is not None and find_spec("megatron.core") is not None:
        from pycomm.launch import preload_in_ranks

        preload_in_ranks("pycomm.megatron.quiet_import")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
