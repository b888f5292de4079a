"""Shared test helpers: spawned gloo worlds come from pycomm.launch."""

from __future__ import annotations

import os
import sys

import pytest

# Worker functions live in the test modules; spawned ranks import them by name.
sys.path.insert(0, os.path.dirname(__file__))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
