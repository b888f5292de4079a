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
from pycomm.info import build_info, __version__
from pycomm.config import RoleConfig
from pycomm.pool import CommPool

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
