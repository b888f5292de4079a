"""Per-role tuning of pooled communicators (RoleConfig) and the YAML format
that carries it, a superset of Megatron's nccl_communicator_config file."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from pycomm.errors import ConfigError

# The timeout pooled groups get when neither the RoleConfig nor the caller
# names one: Megatron's default `distributed_timeout_minutes`.
DEFAULT_TIMEOUT_SECONDS = 600.0

# The longest timeout a RoleConfig takes: every wait adds it to a
# nanosecond clock reading (gloo, the NCCL lane, PooledWork), so past a few
# centuries it overflows and ops time out at once. A year is far beyond any
# collective and far below that.
MAX_TIMEOUT_SECONDS = 365 * 24 * 3600.0

# The shortest timeout a RoleConfig takes. Creating a pooled group is a store
# rendezvous plus a gloo connection, each a few store round trips, and one
# collective on a busy host takes milliseconds: a timeout below this can only
# ever fail, so it is refused rather than turned into flaky timeouts.
MIN_TIMEOUT_SECONDS = 0.1

# Keys of Megatron's nccl_communicator_config YAML, by the RoleConfig field
# each one sets.
MEGATRON_KEYS = {
    "cga_cluster_size": "cga_cluster_size",
    "min_ctas": "min_ctas",
    "max_ctas": "max_ctas",
    "net_name": "net_name",
    "is_high_priority_stream": "is_high_priority_stream",
}

# Group keys the YAML may hold for pooled groups, beside Megatron's own
# (dp, dp_cp, tp, ...), and the role each one is for.
POOLED_GROUP_KEYS = {
    "dp_cp_ag": "ag",
    "expt_dp_ag": "ag",
    "dp_cp_rs": "rs",
    "expt_dp_rs": "rs",
}

# Megatron's own group keys (parallel_state's NCCL config names).
MEGATRON_GROUP_KEYS = {
    "dp", "dp_cp", "cp", "tp", "pp", "mp", "tp_pp", "tp_cp", "tp_dp_cp", "tp_dp",
    "ep", "tp_ep", "tp_ep_pp", "expt_tp", "expt_dp", "intra_dp_cp", "inter_dp_cp",
    "embd", "pos_embd", "amax", "ep_dp", "intra_expt_dp", "inter_expt_dp",
    "hcp", "intra_dist_opt", "ep_tp", "tp_ep_mp", "intra_ep_dp", "inter_ep_dp",
    "intra_dist_opt_instance", "gtp_remat", "gtp_remat_dp", "gtp_remat_dp_cp",
    "expt_gtp_remat", "tp_ep_gtp_remat_pp", "ep_gtp_remat_dp",
}

CTA_POLICIES = {"default": 0, "efficiency": 1, "zero": 2}

# ncclConfig_t.graphUsageMode: no graphs, one graph, several or mixed.
GRAPH_USAGE_MODES = (0, 1, 2)


@dataclass(frozen=True)
class RoleConfig:
    """Tuning of one pooled role.

    stream_priority: CUDA stream priority of the lane (lower is higher
        priority; None: as is_high_priority_stream says).
    is_high_priority_stream: Megatron's switch: true, the device's highest
        priority; false, CUDA's default (0); None: the highest for 'ag',
        the lowest for 'rs'. stream_priority wins when both are set.
    min_ctas / max_ctas / cga_cluster_size / net_name: ncclConfig_t fields
        (NCCL >= 2.17); traffic_class (>= 2.25); cta_policy (>= 2.27, one of
        'default', 'efficiency', 'zero'); launch_order_implicit (>= 2.31:
        this communicator's kernels may launch in any order relative to
        other communicators', so ranks that issue AG and RS in different
        orders cannot deadlock; for NCCL 2.26 to 2.30 set
        NCCL_LAUNCH_ORDER_IMPLICIT=1 in the environment instead);
        nvls_ctas (>= 2.27, CTAs of NVLink SHARP algorithms, >= 1),
        collnet_enable (>= 2.27, in-network reduction), max_p2p_peers
        (>= 2.30, >= 1); split_share (>= 2.18: communicators split from this
        role's share its resources, device stream included, so lanes split
        from it no longer overlap with it); n_channels_per_net_peer (>= 2.28,
        network channels per point-to-point peer, >= 1),
        nvlink_centric_sched (>= 2.28); graph_usage_mode (>= 2.29: 0 no CUDA
        graphs, 1 one graph, 2 several graphs or graphs mixed with eager
        launches, NCCL's default); num_rma_ctx (>= 2.29, one-sided RMA
        contexts, >= 0); graph_stream_ordering (>= 2.30.5; false puts
        captured kernels straight on the capturing stream, which NCCL takes
        only with graph_usage_mode 0 or 1); comm_name (>= 2.27, the name NCCL
        logs and profiles the communicator by; pycomm names it after the
        pooled group otherwise). A field newer than the loaded NCCL raises
        NcclVersionError when the lane is created (`python -m pycomm doctor`
        lists what the loaded NCCL takes). None leaves NCCL's default.
    timeout: seconds a collective or the creation rendezvous may take before
        it fails with a named error (None: DEFAULT_TIMEOUT_SECONDS).
    """

    stream_priority: int | None = None
    is_high_priority_stream: bool | None = None
    min_ctas: int | None = None
    max_ctas: int | None = None
    cga_cluster_size: int | None = None
    net_name: str | None = None
    traffic_class: int | None = None
    cta_policy: str | None = None
    launch_order_implicit: bool | None = None
    nvls_ctas: int | None = None
    collnet_enable: bool | None = None
    max_p2p_peers: int | None = None
    split_share: bool | None = None
    n_channels_per_net_peer: int | None = None
    nvlink_centric_sched: bool | None = None
    graph_usage_mode: int | None = None
    num_rma_ctx: int | None = None
    graph_stream_ordering: bool | None = None
    comm_name: str | None = None
    timeout: float | None = None

    def __post_init__(self) -> None:
        for name in ("min_ctas", "max_ctas"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 1 <= value <= 64):
                raise ConfigError(f"{name} must be an integer from 1 to 64, got {value!r}")
        if (
            self.min_ctas is not None
            and self.max_ctas is not None
            and self.min_ctas > self.max_ctas
        ):
            raise ConfigError(
                f"min_ctas ({self.min_ctas}) is greater than max_ctas ({self.max_ctas})"
            )
        if self.cga_cluster_size is not None and (
            not _is_int(self.cga_cluster_size) or not 0 <= self.cga_cluster_size <= 8
        ):
            raise ConfigError(
                f"cga_cluster_size must be an integer from 0 to 8, got {self.cga_cluster_size!r}"
            )
        if self.traffic_class is not None and (
            not _is_int(self.traffic_class) or self.traffic_class < 0
        ):
            raise ConfigError(f"traffic_class must be an integer >= 0, got {self.traffic_class!r}")
        for name in ("nvls_ctas", "max_p2p_peers", "n_channels_per_net_peer"):
            # NCCL refuses 0 and negatives (parseCommConfig: ncclInvalidArgument).
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if self.stream_priority is not None and not _is_int(self.stream_priority):
            raise ConfigError(f"stream_priority must be an integer, got {self.stream_priority!r}")
        for name in ("net_name", "comm_name"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"{name} must be a non-empty string, got {value!r}")
        if self.graph_usage_mode is not None and (
            not _is_int(self.graph_usage_mode) or self.graph_usage_mode not in GRAPH_USAGE_MODES
        ):
            raise ConfigError(
                f"graph_usage_mode must be 0 (no CUDA graphs), 1 (one graph) or 2 (several, "
                f"or mixed with eager launches), got {self.graph_usage_mode!r}"
            )
        if self.num_rma_ctx is not None and (not _is_int(self.num_rma_ctx) or self.num_rma_ctx < 0):
            raise ConfigError(f"num_rma_ctx must be an integer >= 0, got {self.num_rma_ctx!r}")
        for name in (
            "launch_order_implicit", "is_high_priority_stream", "collnet_enable", "split_share",
            "nvlink_centric_sched", "graph_stream_ordering",
        ):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ConfigError(f"{name} must be true or false, got {value!r}")
        if self.graph_stream_ordering is False and self.graph_usage_mode not in (0, 1):
            # NCCL 2.30.7 src/init.cc, parseCommConfig: ordering 0 with graph
            # mixing (graphUsageMode 2, the default) is not supported, and NCCL
            # falls back to ordering 1 with only a log line.
            raise ConfigError(
                "graph_stream_ordering: false needs graph_usage_mode 0 or 1 (NCCL ignores it "
                f"with graph mixing, mode 2, its default), got graph_usage_mode {self.graph_usage_mode!r}"
            )
        if self.cta_policy is not None and self.cta_policy not in CTA_POLICIES:
            raise ConfigError(
                f"cta_policy must be one of {sorted(CTA_POLICIES)}, got {self.cta_policy!r}"
            )
        if self.timeout is not None and (
            isinstance(self.timeout, bool)
            or not isinstance(self.timeout, (int, float))
            or not MIN_TIMEOUT_SECONDS <= self.timeout <= MAX_TIMEOUT_SECONDS
        ):
            raise ConfigError(
                f"timeout must be a number of seconds from {MIN_TIMEOUT_SECONDS:g} "
                f"to {MAX_TIMEOUT_SECONDS:.0f} (a year), got {self.timeout!r}"
            )

    @property
    def timeout_seconds(self) -> float:
        return float(self.timeout) if self.timeout is not None else DEFAULT_TIMEOUT_SECONDS

    def merged(self, other: "RoleConfig | None") -> "RoleConfig":
        """This config with every field `other` sets taken from `other`."""
        if other is None:
            return self
        changes = {
            f.name: getattr(other, f.name)
            for f in fields(other)
            if getattr(other, f.name) is not None
        }
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str = "config") -> "RoleConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"{where}: unknown key(s) {unknown}; allowed: {sorted(known)}"
            )
        try:
            return cls(**dict(values))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_group_configs(document: Mapping[str, Any], where: str = "config") -> dict[str, RoleConfig]:
    """Group key -> RoleConfig from a parsed nccl_communicator_config document.

    Megatron's keys (dp, dp_cp, ...) and the pooled keys (dp_cp_ag,
    expt_dp_ag, dp_cp_rs, expt_dp_rs) are accepted; anything else is a
    ConfigError naming it.
    """
    if document is None:
        return {}
    if not isinstance(document, Mapping):
        raise ConfigError(f"{where}: expected a mapping of group names to settings")
    allowed = MEGATRON_GROUP_KEYS | set(POOLED_GROUP_KEYS)
    configs: dict[str, RoleConfig] = {}
    for group_key, settings in document.items():
        if group_key not in allowed:
            raise ConfigError(
                f"{where}: unknown group key {group_key!r}; allowed: {sorted(allowed)}"
            )
        if not isinstance(settings, Mapping):
            raise ConfigError(f"{where}: settings of {group_key!r} must be a mapping")
        configs[group_key] = RoleConfig.from_mapping(settings, f"{where}: {group_key}")
    return configs


def load_group_configs(path: str | Path) -> dict[str, RoleConfig]:
    """Reads a Megatron nccl_communicator_config YAML file (extended with the
    pooled keys) into group key -> RoleConfig."""
    path = Path(path)
    return parse_group_configs(read_config_file(path), str(path))


def read_config_file(path: Path) -> Any:
    """The parsed YAML document of a config file; ConfigError when it cannot
    be read, is not UTF-8 or is not YAML."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read NCCL communicator config {path}: {e}") from e
