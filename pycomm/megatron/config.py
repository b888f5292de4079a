"""The config object that mirrors Megatron's ``create_all_gather_group``
flag, and what a trainer does with it once its groups exist."""

from __future__ import annotations

import datetime
import logging
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from pycomm.config import RoleConfig
from pycomm.errors import ConfigError
from pycomm.megatron.groups import attach_all_gather_groups, pg_collection_with_ag
from pycomm.megatron.tuning import parse_nccl_comm_cfgs, resolve_role_configs, timeout_seconds

if TYPE_CHECKING:
    from megatron.core.process_groups_config import ProcessGroupCollection

    from pycomm.pool import CommPool

__all__ = ["AllGatherGroupConfig", "MissingAllGatherFlagWarning", "apply_config"]

logger = logging.getLogger(__name__)

FLAG = "create_all_gather_group"


class MissingAllGatherFlagWarning(UserWarning):
    """A trainer config without Megatron's ``create_all_gather_group`` field
    (Megatron-Bridge up to 0.6.2, older Megatron-LM) was read without the
    flag being passed: the groups stay off."""


@dataclass(frozen=True)
class AllGatherGroupConfig:
    """For trainers that build their process groups from config: mirrors
    Megatron's ``create_all_gather_group`` flag (Megatron-LM and
    Megatron-Bridge ``DistributedInitConfig``) plus the per-role tuning.

    create_all_gather_group: off (the default) creates nothing and changes
        nothing.
    for_expert_parallelism: also make ``expt_dp_ag``; None: when ep > 1.
    timeout: seconds (or a timedelta) for creation and each collective;
        None: the config file's or pycomm's default.
    nccl_communicator_config_path: Megatron's YAML of per-group NCCL settings,
        which may also hold ``dp_cp_ag`` / ``expt_dp_ag`` keys.
    nccl_comm_cfgs: the same as a dict (group key -> settings or RoleConfig);
        its keys win over the file's.
    """

    create_all_gather_group: bool = False
    for_expert_parallelism: bool | None = None
    timeout: float | datetime.timedelta | None = None
    nccl_communicator_config_path: str | None = None
    nccl_comm_cfgs: Mapping[str, Any] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.create_all_gather_group, bool):
            raise ConfigError(
                f"create_all_gather_group must be a bool, got {self.create_all_gather_group!r}"
            )
        if self.for_expert_parallelism is not None and not isinstance(
            self.for_expert_parallelism, bool
        ):
            raise ConfigError(
                f"for_expert_parallelism must be a bool or None, got "
                f"{self.for_expert_parallelism!r}"
            )
        seconds = timeout_seconds(self.timeout)
        if seconds is not None and seconds <= 0:
            raise ConfigError(f"timeout must be > 0 seconds, got {self.timeout!r}")

    @classmethod
    def from_dist_init_config(
        cls,
        source: Any,
        create_all_gather_group: bool | None = None,
        **overrides: Any,
    ) -> "AllGatherGroupConfig":
        """From any object with Megatron's attribute names: Megatron-LM's
        parsed args, Megatron-LM's or Megatron-Bridge's DistributedInitConfig
        (create_all_gather_group, distributed_timeout_minutes,
        nccl_communicator_config_path).

        `create_all_gather_group` given: it decides, whatever `source` says.
        Not given: `source`'s field decides; a `source` without the field
        (Megatron-Bridge 0.6.2 has none) gives "off" with a
        MissingAllGatherFlagWarning, since the caller cannot have meant to
        turn the groups on through a field that does not exist."""
        if create_all_gather_group is None:
            if hasattr(source, FLAG):
                create_all_gather_group = bool(getattr(source, FLAG))
            else:
                message = (
                    f"{type(source).__name__} has no {FLAG!r} field, so it cannot turn the "
                    f"all-gather groups on; they stay off. Pass {FLAG}=True (or False) to "
                    "from_dist_init_config to decide explicitly."
                )
                warnings.warn(message, MissingAllGatherFlagWarning, stacklevel=2)
                logger.warning(message)
                create_all_gather_group = False
        minutes = getattr(source, "distributed_timeout_minutes", None)
        values: dict[str, Any] = {
            FLAG: create_all_gather_group,
            "timeout": None if minutes is None else float(minutes) * 60.0,
            "nccl_communicator_config_path": getattr(
                source, "nccl_communicator_config_path", None
            ),
        }
        values.update(overrides)
        return cls(**values)

    def apply(
        self, pg_collection: "ProcessGroupCollection | None" = None, *, pool: "CommPool | None" = None
    ) -> "ProcessGroupCollection | None":
        """Off: returns `pg_collection` untouched, creating nothing. On:
        attaches dp_cp_ag / expt_dp_ag to `pg_collection` (default: the
        parallel_state groups) and returns it; see :func:`apply_config`."""
        return apply_config(self, pg_collection, pool=pool)

    def role_configs(self) -> dict[str, RoleConfig]:
        """RoleConfig per AG group, as resolve_role_configs() computes it from
        the file, then the dict."""
        merged = parse_nccl_comm_cfgs(self.nccl_communicator_config_path)
        for key, config in parse_nccl_comm_cfgs(self.nccl_comm_cfgs).items():
            merged[key] = merged[key].merged(config) if key in merged else config
        return resolve_role_configs(self.timeout, merged)


def apply_config(
    config: AllGatherGroupConfig,
    pg_collection: "ProcessGroupCollection | None" = None,
    *,
    pool: "CommPool | None" = None,
) -> "ProcessGroupCollection | None":
    """What a trainer does with an :class:`AllGatherGroupConfig` once its
    groups exist: with the flag off, returns `pg_collection` untouched and
    creates nothing; on, attaches the AG groups to `pg_collection` (default:
    ``use_mpu_process_groups()``) and returns it."""
    if not config.create_all_gather_group:
        return pg_collection
    configs = config.role_configs()
    if pg_collection is None:
        return pg_collection_with_ag(
            config.for_expert_parallelism, nccl_comm_cfgs=configs, pool=pool
        )
    return attach_all_gather_groups(
        pg_collection, config.for_expert_parallelism, nccl_comm_cfgs=configs, pool=pool
    )
