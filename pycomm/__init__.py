"""pycomm: pooled duplicate communicators with dedicated all-gather and
reduce-scatter lanes, as torch.distributed process groups."""

from __future__ import annotations

from pycomm.errors import (
    CollectiveError,
    CollectiveTimeoutError,
    ConfigError,
    LayoutError,
    NotAMemberError,
    NotInitializedError,
    OrderMismatchError,
    PoolClosedError,
    PycommError,
    RendezvousTimeoutError,
    TensorMismatchError,
    UnknownRoleError,
    UnsupportedOpError,
)
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

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
    "LayoutError",
    "NotAMemberError",
    "NotInitializedError",
    "OrderMismatchError",
    "PoolClosedError",
    "PycommError",
    "RendezvousTimeoutError",
    "TensorMismatchError",
    "UnknownRoleError",
    "UnsupportedOpError",
]
