"""Per-role tuning of the Megatron all-gather groups: the RoleConfig each
AG group gets from a timeout and Megatron's ``nccl_comm_cfgs`` (dict or YAML)."""

from __future__ import annotations

import datetime
import math
from pathlib import Path
from typing import Any, Mapping, Union

from pycomm.config import RoleConfig, parse_group_configs, read_config_file
from pycomm.errors import ConfigError

# Config keys each all-gather group reads, most specific first. The AG
# group's own key wins field by field over the key of the group it
# duplicates; megatron-core names the expert data-parallel key 'ep_dp' in
# initialize_model_parallel and 'expt_dp' in ProcessGroupCollection.
ROLE_KEYS: dict[str, tuple[str, ...]] = {
    "dp_cp_ag": ("dp_cp_ag", "dp_cp"),
    "expt_dp_ag": ("expt_dp_ag", "expt_dp", "ep_dp"),
}

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
        nccl_comm_cfgs = read_config_file(Path(nccl_comm_cfgs))
    if nccl_comm_cfgs is None:
        return {}
    if not isinstance(nccl_comm_cfgs, Mapping):
        raise ConfigError(
            f"{where}: expected a mapping of group keys to settings (or a YAML path), "
            f"got {type(nccl_comm_cfgs).__name__}"
        )
    ready = {k: v for k, v in nccl_comm_cfgs.items() if isinstance(v, RoleConfig)}
    raw = {k: v for k, v in nccl_comm_cfgs.items() if not isinstance(v, RoleConfig)}
    parsed = parse_group_configs(raw, where)
    # parse_group_configs only sees the dict entries; RoleConfig entries need
    # the same group-key check.
    parse_group_configs({k: {} for k in ready}, where)
    parsed.update(ready)
    return parsed


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
