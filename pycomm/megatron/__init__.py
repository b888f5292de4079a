"""Megatron-Core and Megatron-Bridge integration: pooled all-gather groups
(``dp_cp_ag``, ``expt_dp_ag``) with exactly the ranks of the groups
Megatron-FSDP shards over.

Modules:

* :mod:`pycomm.megatron.groups`: the groups, for both of Megatron's
  distributed-init paths and any ``ProcessGroupCollection``;
* :mod:`pycomm.megatron.tuning`: the RoleConfig each group gets (timeout,
  Megatron's ``nccl_comm_cfgs``);
* :mod:`pycomm.megatron.config`: :class:`AllGatherGroupConfig`, Megatron's
  ``create_all_gather_group`` flag;
* :mod:`pycomm.megatron.layout`: the layout in pure Python (``plan``);
* :mod:`pycomm.megatron.bridge`: Megatron-Bridge, turned on with one call.

Names are loaded on first use, so ``pycomm.megatron.layout`` (and ``python -m
pycomm plan``) stays free of torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pycomm.megatron.config import (
        AllGatherGroupConfig,
        MissingAllGatherFlagWarning,
        apply_config,
    )
    from pycomm.megatron.groups import (
        AG_ROLE,
        attach_all_gather_groups,
        create_all_gather_groups,
        default_grid_dims,
        default_pool,
        destroy_all_gather_groups,
        grid_all_gather_groups,
        pg_collection_with_ag,
    )
    from pycomm.megatron.tuning import GroupConfigs, Timeout, resolve_role_configs

# Public name -> the module that defines it.
_HOMES: dict[str, str] = {
    "AG_ROLE": "groups",
    "attach_all_gather_groups": "groups",
    "create_all_gather_groups": "groups",
    "default_grid_dims": "groups",
    "default_pool": "groups",
    "destroy_all_gather_groups": "groups",
    "grid_all_gather_groups": "groups",
    "pg_collection_with_ag": "groups",
    "GroupConfigs": "tuning",
    "Timeout": "tuning",
    "resolve_role_configs": "tuning",
    "AllGatherGroupConfig": "config",
    "MissingAllGatherFlagWarning": "config",
    "apply_config": "config",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'pycomm.megatron' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"pycomm.megatron.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
