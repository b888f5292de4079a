"""Megatron-Core's parallel_state, imported quietly.

megatron.core imports torch's extension build tooling, whose import guesses a
CUDA toolkit and, on a machine without a GPU, warns that it found none; a
rank that builds nothing should not say so. Importing this module imports
parallel_state with that warning held back: the demo's ranks do, and the
demo's fork server preloads it (`pycomm.launch.preload_in_ranks`), so a rank
finds Megatron-Core imported instead of spending about 6 s of CPU on it.
"""

from __future__ import annotations

import logging
from types import ModuleType


def _import_parallel_state() -> ModuleType:
    build_tooling_log = logging.getLogger("torch.utils.cpp_extension")
    level = build_tooling_log.level
    build_tooling_log.setLevel(logging.ERROR)
    try:
        from megatron.core import parallel_state
    finally:
        build_tooling_log.setLevel(level)
    return parallel_state


parallel_state = _import_parallel_state()
