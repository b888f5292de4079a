"""RoleConfig validation and the nccl_communicator_config YAML format."""

from __future__ import annotations

from pathlib import Path

import pytest

from pycomm import ConfigError, RoleConfig
from pycomm.config import (
    DEFAULT_TIMEOUT_SECONDS,
    MAX_TIMEOUT_SECONDS,
    MIN_TIMEOUT_SECONDS,
    load_group_configs,
    parse_group_configs,
)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"min_ctas": -1}, "min_ctas must be an integer from 1 to 64, got -1"),
        ({"max_ctas": 0}, "max_ctas must be an integer from 1 to 64, got 0"),
        ({"min_ctas": 8, "max_ctas": 4}, "min_ctas (8) is greater than max_ctas (4)"),
        ({"cga_cluster_size": 9}, "cga_cluster_size must be an integer from 0 to 8"),
        ({"traffic_class": -3}, "traffic_class must be an integer >= 0"),
        ({"stream_priority": 1.5}, "stream_priority must be an integer"),
        ({"net_name": ""}, "net_name must be a non-empty string"),
        ({"cta_policy": "fast"}, "cta_policy must be one of"),
        ({"timeout": 0}, "timeout must be a number of seconds from 0.1"),
        ({"timeout": True}, "timeout must be a number of seconds from 0.1"),
        # A creation is several store round trips: under 100 ms it can never work.
        ({"timeout": 0.0005}, "timeout must be a number of seconds from 0.1 to 31536000 (a year), got 0.0005"),
        ({"timeout": 0.099}, "got 0.099"),
        # Past a year a deadline overflows a nanosecond clock somewhere:
        # every op would time out at once, or creation fail with OverflowError.
        ({"timeout": float("inf")}, "to 31536000 (a year), got inf"),
        ({"timeout": float("nan")}, "to 31536000 (a year), got nan"),
        ({"timeout": 1e300}, "to 31536000 (a year)"),
        ({"timeout": 1e13}, "to 31536000 (a year)"),
        ({"timeout": 1e10}, "to 31536000 (a year)"),
        ({"is_high_priority_stream": 1}, "is_high_priority_stream must be true or false"),
        ({"nvls_ctas": 0}, "nvls_ctas must be an integer >= 1, got 0"),
        ({"max_p2p_peers": -2}, "max_p2p_peers must be an integer >= 1, got -2"),
        ({"collnet_enable": "yes"}, "collnet_enable must be true or false"),
    ],
)
def test_bad_values_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        RoleConfig(**kwargs)
    assert message in str(e.value)


def test_defaults_and_merging() -> None:
    base = RoleConfig(timeout=30.0, max_ctas=16)
    assert RoleConfig().timeout_seconds == DEFAULT_TIMEOUT_SECONDS
    merged = base.merged(RoleConfig(min_ctas=2))
    assert (merged.timeout, merged.min_ctas, merged.max_ctas) == (30.0, 2, 16)
    assert base.merged(None) is base


def test_megatron_yaml_with_pooled_keys(tmp_path: Path) -> None:
    path = tmp_path / "nccl.yaml"
    path.write_text(
        "dp_cp:\n  min_ctas: 4\n  max_ctas: 8\n"
        "dp_cp_ag:\n  max_ctas: 2\n  min_ctas: 1\n  stream_priority: -1\n"
        "expt_dp_rs:\n  net_name: IB\n"
    )
    configs = load_group_configs(path)
    assert configs["dp_cp"] == RoleConfig(min_ctas=4, max_ctas=8)
    assert configs["dp_cp_ag"] == RoleConfig(min_ctas=1, max_ctas=2, stream_priority=-1)
    assert configs["expt_dp_rs"].net_name == "IB"


def test_unknown_keys_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown group key 'dp_cp_allgather'"):
        parse_group_configs({"dp_cp_allgather": {"max_ctas": 2}})
    with pytest.raises(ConfigError, match=r"dp_cp_ag: unknown key\(s\) \['max_cta'\]"):
        parse_group_configs({"dp_cp_ag": {"max_cta": 2}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("dp_cp: [1, 2\n")
    with pytest.raises(ConfigError, match="cannot read NCCL communicator config"):
        load_group_configs(bad)
    with pytest.raises(ConfigError, match="dp_cp_ag: min_ctas"):
        parse_group_configs({"dp_cp_ag": {"min_ctas": 100}})


def test_launch_order_implicit_is_a_boolean() -> None:
    assert RoleConfig(launch_order_implicit=True).launch_order_implicit is True
    with pytest.raises(ConfigError, match="launch_order_implicit must be true or false"):
        RoleConfig(launch_order_implicit=1)
    assert RoleConfig.from_mapping({"launch_order_implicit": False}).launch_order_implicit is False


def test_the_longest_and_shortest_timeouts_are_accepted() -> None:
    assert RoleConfig(timeout=MAX_TIMEOUT_SECONDS).timeout_seconds == 365 * 24 * 3600
    assert RoleConfig(timeout=MIN_TIMEOUT_SECONDS).timeout_seconds == 0.1


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("dp_cp_ag:\n  net_name: r\xe9seau\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="cannot read NCCL communicator config .*utf-8"):
        load_group_configs(path)


def test_megatrons_high_priority_key_is_read(tmp_path: Path) -> None:
    path = tmp_path / "megatron.yaml"
    path.write_text(
        "dp_cp:\n  is_high_priority_stream: true\n  max_ctas: 8\n"
        "expt_dp_rs:\n  is_high_priority_stream: false\n"
    )
    configs = load_group_configs(path)
    assert configs["dp_cp"] == RoleConfig(is_high_priority_stream=True, max_ctas=8)
    assert configs["expt_dp_rs"] == RoleConfig(is_high_priority_stream=False)


def test_the_rest_of_ncclconfig_t_as_role_settings_and_yaml_keys() -> None:
    document = {
        "dp_cp_ag": {
            "split_share": False, "n_channels_per_net_peer": 8, "nvlink_centric_sched": True,
            "graph_usage_mode": 1, "num_rma_ctx": 0, "graph_stream_ordering": False,
            "comm_name": "dp_cp_ag",
        },
    }
    ag = parse_group_configs(document)["dp_cp_ag"]
    assert (ag.n_channels_per_net_peer, ag.graph_usage_mode, ag.num_rma_ctx, ag.comm_name) == (8, 1, 0, "dp_cp_ag")
    assert (ag.split_share, ag.nvlink_centric_sched, ag.graph_stream_ordering) == (False, True, False)
    bad = {
        "n_channels_per_net_peer": (0, "n_channels_per_net_peer must be an integer >= 1"),
        "graph_usage_mode": (3, "graph_usage_mode must be 0 .no CUDA graphs., 1 .one graph. or 2"),
        "num_rma_ctx": (-1, "num_rma_ctx must be an integer >= 0"),
        "split_share": (1, "split_share must be true or false"),
        "nvlink_centric_sched": ("yes", "nvlink_centric_sched must be true or false"),
        "comm_name": ("", "comm_name must be a non-empty string"),
    }
    for key, (value, message) in bad.items():
        with pytest.raises(ConfigError, match=f"dp_cp_rs: {message}"):
            parse_group_configs({"dp_cp_rs": {key: value}})
    with pytest.raises(ConfigError, match="graph_usage_mode must be"):
        RoleConfig(graph_usage_mode=True)


def test_graph_stream_ordering_off_needs_graphs_unmixed() -> None:
    """NCCL ignores graphStreamOrdering 0 with graph mixing (graphUsageMode
    2, its default), logging only: refused here by name."""
    for mode in (None, 2):
        with pytest.raises(ConfigError, match="graph_stream_ordering: false needs graph_usage_mode 0 or 1"):
            RoleConfig(graph_stream_ordering=False, graph_usage_mode=mode)
    assert RoleConfig(graph_stream_ordering=False, graph_usage_mode=0).graph_stream_ordering is False
    assert RoleConfig(graph_stream_ordering=True).graph_usage_mode is None
