"""Per-role tuning of the Megatron all-gather groups, and the config object
that mirrors Megatron's ``create_all_gather_group`` flag."""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Union

from pycomm.config import RoleConfig, parse_group_configs
from pycomm.errors import ConfigError

# Config keys each all-gather group reads, most specific first. The AG
# group's own key wins field by field over the key of the group it
# duplicates; megatron-core names the expert data-parallel key 'ep_dp' in
# initialize_model_parallel and 'expt_dp' in ProcessGroupCollection.
ROLE_KEYS: dict[str, tuple[str, ...]] = {
    "dp_cp_ag": ("dp_cp_ag", "dp_cp"),
    "expt_dp_ag": ("expt_dp_ag", "expt_dp", "ep_dp"),
}

# Settings Megatron's nccl_comm_cfgs may carry that RoleConfig spells
# differently.
_HIGH_PRIORITY_KEY = "is_high_priority_stream"

GroupConfigs = Mapping[str, Union[RoleConfig, Mapping[str, Any]]]
Timeout = Union[datetime.timedelta, float, int, None]


def timeout_seconds(timeout: Timeout) -> float | None:
    """A timedelta or a number of seconds as seconds (None stays None)."""
    if timeout is None:
        return None
    if isinstance(timeout, datetime.timedelta):
        return timeout.total_seconds()
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise ConfigError(f"timeout must be a timedelta or seconds, got {timeout!r}")
    if not math.isfinite(timeout):
        raise ConfigError(f"timeout must be finite, got {timeout!r}")
    return float(timeout)


def parse_nccl_comm_cfgs(
    nccl_comm_cfgs: GroupConfigs | str | Path | None,
) -> dict[str, RoleConfig]:
    """Group key -> RoleConfig from Megatron's nccl_comm_cfgs dict (values:
    dicts of settings or RoleConfig objects) or from the path of its YAML
    file. Unknown group keys or settings raise ConfigError."""
    where = "nccl_comm_cfgs"
    if isinstance(nccl_comm_cfgs, (str, Path)):
        where = str(nccl_comm_cfgs)
        nccl_comm_cfgs = _read_yaml(Path(nccl_comm_cfgs))
    if nccl_comm_cfgs is None:
        return {}
    if not isinstance(nccl_comm_cfgs, Mapping):
        raise ConfigError(
            f"{where}: expected a mapping of group keys to settings (or a YAML path), "
            f"got {type(nccl_comm_cfgs).__name__}"
        )
    ready = {k: v for k, v in nccl_comm_cfgs.items() if isinstance(v, RoleConfig)}
    raw = {
        k: _translate_megatron_settings(k, v)
        for k, v in nccl_comm_cfgs.items()
        if not isinstance(v, RoleConfig)
    }
    parsed = parse_group_configs(raw, where)
    # parse_group_configs only sees the dict entries; RoleConfig entries need
    # the same group-key check.
    parse_group_configs({k: {} for k in ready}, where)
    parsed.update(ready)
    return parsed


def _read_yaml(path: Path) -> Any:
    # Read here rather than with pycomm.config.load_group_configs so that a
    # Megatron file's is_high_priority_stream goes through the same
    # translation as the dict form.
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read NCCL communicator config {path}: {e}") from e


def _translate_megatron_settings(group_key: str, settings: Any) -> Any:
    if not isinstance(settings, Mapping) or _HIGH_PRIORITY_KEY not in settings:
        return settings
    settings = dict(settings)
    high = settings.pop(_HIGH_PRIORITY_KEY)
    if not isinstance(high, bool):
        raise ConfigError(
            f"nccl_comm_cfgs: {group_key}: {_HIGH_PRIORITY_KEY} must be true or false, got {high!r}"
        )
    # AG lanes already run at the highest priority by default; 'false' asks
    # for the default priority, which is CUDA's 0.
    if not high and "stream_priority" not in settings:
        settings["stream_priority"] = 0
    return settings


def resolve_role_configs(
    timeout: Timeout = None,
    nccl_comm_cfgs: GroupConfigs | str | Path | None = None,
) -> dict[str, RoleConfig]:
    """The RoleConfig of each AG group ('dp_cp_ag', 'expt_dp_ag'): the
    function-wide `timeout`, overridden by the duplicated group's key
    (dp_cp, expt_dp/ep_dp), overridden by the AG group's own key."""
    by_key = parse_nccl_comm_cfgs(nccl_comm_cfgs)
    base = RoleConfig(timeout=timeout_seconds(timeout))
    resolved = {}
    for role_key, keys in ROLE_KEYS.items():
        config = base
        for key in reversed(keys):
            config = config.merged(by_key.get(key))
        resolved[role_key] = config
    return resolved


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
    def from_dist_init_config(cls, source: Any, **overrides: Any) -> "AllGatherGroupConfig":
        """From any object with Megatron's attribute names: Megatron-LM's
        parsed args, Megatron-LM's or Megatron-Bridge's DistributedInitConfig
        (create_all_gather_group, distributed_timeout_minutes,
        nccl_communicator_config_path). Missing attributes keep defaults."""
        minutes = getattr(source, "distributed_timeout_minutes", None)
        values: dict[str, Any] = {
            "create_all_gather_group": bool(getattr(source, "create_all_gather_group", False)),
            "timeout": None if minutes is None else float(minutes) * 60.0,
            "nccl_communicator_config_path": getattr(
                source, "nccl_communicator_config_path", None
            ),
        }
        values.update(overrides)
        return cls(**values)

    def apply(self, pg_collection: Any = None, *, pool: Any = None) -> Any:
        """Off: returns `pg_collection` untouched, creating nothing. On:
        attaches dp_cp_ag / expt_dp_ag to `pg_collection` (default: the
        parallel_state groups) and returns it; see pycomm.megatron.apply_config."""
        if not self.create_all_gather_group:
            return pg_collection
        from pycomm.megatron import apply_config

        return apply_config(self, pg_collection, pool=pool)

    def role_configs(self) -> dict[str, RoleConfig]:
        """RoleConfig per AG group, as resolve_role_configs() computes it from
        the file, then the dict."""
        merged = parse_nccl_comm_cfgs(self.nccl_communicator_config_path)
        for key, config in parse_nccl_comm_cfgs(self.nccl_comm_cfgs).items():
            merged[key] = merged[key].merged(config) if key in merged else config
        return resolve_role_configs(self.timeout, merged)
