"""Former home of the AG groups' tuning and config object, now
:mod:`pycomm.megatron.tuning` and :mod:`pycomm.megatron.config`; every name
that was importable here still is."""

from pycomm.megatron.config import AllGatherGroupConfig, MissingAllGatherFlagWarning
from pycomm.megatron.tuning import (
    ROLE_KEYS,
    GroupConfigs,
    Timeout,
    parse_nccl_comm_cfgs,
    resolve_role_configs,
    timeout_seconds,
)

__all__ = [
    "ROLE_KEYS",
    "AllGatherGroupConfig",
    "GroupConfigs",
    "MissingAllGatherFlagWarning",
    "Timeout",
    "parse_nccl_comm_cfgs",
    "resolve_role_configs",
    "timeout_seconds",
]
