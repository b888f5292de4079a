"""pycomm: pooled duplicate communicators with dedicated all-gather and
reduce-scatter lanes, as torch.distributed process groups."""

from __future__ import annotations

from pycomm.errors import (
    CollectiveError,
    CollectiveTimeoutError,
    ConfigError,
    LayoutError,
    NcclVersionError,
    NotAMemberError,
    NotInitializedError,
    OrderMismatchError,
    PoolClosedError,
    PoolMismatchError,
    PycommError,
    RendezvousTimeoutError,
    TensorMismatchError,
    UnknownRoleError,
    UnsupportedOpError,
)
import importlib.abc
import sys
from typing import TYPE_CHECKING, Any, Sequence

from pycomm.launch_order import adopt_implicit_launch_order

# Before the process's first NCCL launch, which is when NCCL reads it.
adopt_implicit_launch_order()

__version__ = "0.1.0"


class _TorchBeforeExtension(importlib.abc.MetaPathFinder):
    """Imports torch before pycomm._C is loaded: the extension links torch's
    libraries (libc10.so, ...), which the dynamic loader finds only once
    torch has loaded them, and its classes derive from torch's. So
    `import pycomm._C` works as the first import of a process, while
    `import pycomm` alone still does not load torch."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: Any = None) -> None:
        if fullname == f"{__name__}._C":
            import torch  # noqa: F401

        return None  # the regular finders locate the extension


if not any(isinstance(finder, _TorchBeforeExtension) for finder in sys.meta_path):
    sys.meta_path.insert(0, _TorchBeforeExtension())

if TYPE_CHECKING:
    from pycomm.config import RoleConfig
    from pycomm.info import build_info
    from pycomm.pool import CommPool

# Imported on first use, so `python -m pycomm plan` (pure layout arithmetic)
# starts without loading torch.
_LAZY = {"CommPool": "pycomm.pool", "RoleConfig": "pycomm.config", "build_info": "pycomm.info"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pycomm' has no attribute {name!r}")

__all__ = [
    "CommPool",
    "RoleConfig",
    "build_info",
    "__version__",
    "CollectiveError",
    "CollectiveTimeoutError",
    "ConfigError",
    "NcclVersionError",
    "LayoutError",
    "NotAMemberError",
    "NotInitializedError",
    "OrderMismatchError",
    "PoolClosedError",
    "PycommError",
    "PoolMismatchError",
    "RendezvousTimeoutError",
    "TensorMismatchError",
    "UnknownRoleError",
    "UnsupportedOpError",
]
