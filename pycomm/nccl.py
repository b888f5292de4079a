"""The NCCL lane of a pooled group (CUDA build): which device it serves, how its
communicator is made, and the ncclConfig_t a RoleConfig turns into.

A communicator is split (ncclCommSplit) from the communicator of the base
group's other pooled lane on the same device when every member has one (the
second role of a group): pycomm's own communicators are nonblocking, so the
split is polled and bounded by the timeout. torch's communicator is never
split: the split call blocks as its parent does, and a split of torch's
blocking one would wait inside NCCL forever for a member that failed. Otherwise every
member creates it with ncclCommInitRankConfig from one unique id published in
the store by the last member to arrive.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from pycomm import _C
from pycomm.config import CTA_POLICIES, RoleConfig
from pycomm.errors import ConfigError, RendezvousTimeoutError
from pycomm.launch_order import (
    LAUNCH_ORDER_ENV,
    ordered_by_variable,
    launch_in_program_order,
    value_at_import,
)

logger = logging.getLogger(__name__)

# "0" makes every pooled communicator a fresh one, never a split.
SPLIT_ENV = "PYCOMM_NCCL_SPLIT"
# What a lane does after an NCCL error or timeout, as torch's NCCL backend
# reads TORCH_NCCL_ASYNC_ERROR_HANDLING: 1 (tear down) and 3 (tear down
# without cleaning up; torch's default) end the process, since a stream may
# already consume the failed op's output; 0 (no handling) and 2 (clean up
# only) report the error at wait(), the future and later ops. The lane always
# aborts its own communicator first (bounded by the stall timeout), so 1 and
# 3 act alike, as do 0 and 2. pycomm's variable, when set, overrides torch's
# for pooled lanes only.
ASYNC_ERROR_HANDLING_ENV = "PYCOMM_NCCL_ASYNC_ERROR_HANDLING"
TORCH_ASYNC_ERROR_HANDLING_ENV = "TORCH_NCCL_ASYNC_ERROR_HANDLING"
_LEGACY_ASYNC_ERROR_HANDLING_ENV = "NCCL_ASYNC_ERROR_HANDLING"  # torch still reads it
_TEARS_DOWN = {"0": False, "1": True, "2": False, "3": True}
# How long one CUDA or NCCL call of a lane's watchdog (or an abort or destroy
# of its communicator) may block before the lane is given up: torch's
# variable for its NCCL watchdog's heartbeat, with torch's default.
STALL_TIMEOUT_ENV = "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"
_DEFAULT_STALL_TIMEOUT_SECONDS = 480.0

DeviceChoice = int | str | torch.device | None

_SPLIT = b"split"
_INIT = b"init:"


def _torch_nccl_backend(group: dist.ProcessGroup | None, device: torch.device) -> Any:
    """`group`'s torch NCCL backend for `device`, or None when it has none."""
    if group is None:
        return None
    try:
        backend = group._get_backend(device)
    except RuntimeError:
        return None
    nccl_class = getattr(dist, "ProcessGroupNCCL", None)
    return backend if nccl_class is not None and isinstance(backend, nccl_class) else None


def _bound_nccl_device(group: dist.ProcessGroup | None) -> int | None:
    """The device of `group`'s torch NCCL backend: its bound device, else the
    current one; None when the group has no NCCL backend."""
    if not torch.cuda.is_available():
        return None
    backend = _torch_nccl_backend(group, torch.device("cuda"))
    if backend is None:
        return None
    bound = getattr(backend, "bound_device_id", None)
    return bound.index if bound is not None and bound.index is not None else torch.cuda.current_device()


def check_device_choice(choice: DeviceChoice) -> None:
    """Raises ConfigError now for a choice resolve_device() would refuse."""
    if not (isinstance(choice, str) and choice == "auto"):
        resolve_device(choice, None)


def resolve_device(choice: DeviceChoice, base_group: dist.ProcessGroup | None) -> int | None:
    """The CUDA device index a pooled duplicate of `base_group` gets an NCCL
    lane on, or None for none (CPU tensors only).

    'auto': the device of the base group's own NCCL backend when it has one
    (so a gloo-only world on a GPU machine makes no NCCL communicators);
    an index or CUDA device: that device, always; None: no NCCL lane."""
    if choice is None:
        return None
    if isinstance(choice, str) and choice == "auto":
        return _bound_nccl_device(base_group) if _C.cuda_built else None
    try:
        device = torch.device("cuda", choice) if isinstance(choice, int) else torch.device(choice)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device must be 'auto', None, an index or a CUDA device, got {choice!r}") from e
    if device.type != "cuda":
        raise ConfigError(f"device must be a CUDA device (CPU tensors always use gloo), got {device}")
    if not _C.cuda_built:
        raise ConfigError(
            f"device {device} asked for, but this pycomm was built without the NCCL "
            "transport (pycomm.build_info()['cuda'] is False)"
        )
    if not torch.cuda.is_available():
        raise ConfigError(f"device {device} asked for, but CUDA is not available in this process")
    index = device.index if device.index is not None else torch.cuda.current_device()
    if not 0 <= index < torch.cuda.device_count():
        raise ConfigError(
            f"device {device} does not exist; this process sees {torch.cuda.device_count()} GPU(s)"
        )
    return index


def nccl_settings(config: RoleConfig, comm_name: str) -> dict[str, Any]:
    """The ncclConfig_t fields `config` sets, as _C.NcclLane takes them;
    `comm_name` names the communicator unless `config.comm_name` does."""
    return {
        "cga_cluster_size": config.cga_cluster_size,
        "min_ctas": config.min_ctas,
        "max_ctas": config.max_ctas,
        "net_name": config.net_name,
        "traffic_class": config.traffic_class,
        "cta_policy": CTA_POLICIES[config.cta_policy] if config.cta_policy else None,
        "launch_order_implicit": config.launch_order_implicit,
        "nvls_ctas": config.nvls_ctas,
        "collnet_enable": config.collnet_enable,
        "max_p2p_peers": config.max_p2p_peers,
        "split_share": config.split_share,
        "n_channels_per_net_peer": config.n_channels_per_net_peer,
        "nvlink_centric_sched": config.nvlink_centric_sched,
        "graph_usage_mode": config.graph_usage_mode,
        "num_rma_ctx": config.num_rma_ctx,
        "graph_stream_ordering": config.graph_stream_ordering,
        "comm_name": config.comm_name or comm_name,
    }


# NCCL_LAUNCH_ORDER_IMPLICIT orders every communicator's launches from 2.26;
# ncclConfig_t.commName exists from 2.27.
_LAUNCH_ORDER_VARIABLE_VERSION = 22600
_COMM_NAME_VERSION = 22700


def lane_settings(config: RoleConfig, comm_name: str, version: int, label: str) -> dict[str, Any]:
    """nccl_settings for a lane on NCCL `version`: NcclVersionError naming each
    field `config` sets that this NCCL cannot take (NCCL would silently use
    its default), ConfigError when NCCL_LAUNCH_ORDER_IMPLICIT overrides what
    `config` asks for. pycomm's own name for the communicator is dropped on
    an NCCL without commName."""
    settings = nccl_settings(config, comm_name)
    if config.comm_name is None and version < _COMM_NAME_VERSION:
        settings["comm_name"] = None
    if config.launch_order_implicit is not None and ordered_by_variable():
        # NCCL's docs (launchOrderImplicit): the variable, when set, overrides
        # the field before initialization.
        if not config.launch_order_implicit:
            raise ConfigError(
                f"{label}: launch_order_implicit: false has no effect while "
                f"{LAUNCH_ORDER_ENV}={value_at_import()} (NCCL's variable overrides the field); "
                f"set {LAUNCH_ORDER_ENV}=0 before importing pycomm"
            )
        if version >= _LAUNCH_ORDER_VARIABLE_VERSION:
            settings["launch_order_implicit"] = None  # the variable does it
    _C.nccl_require_config(settings, version, label)
    return settings


def config_fields_support() -> tuple[list[str], list[tuple[str, str]]]:
    """The ncclConfig_t fields a RoleConfig can set that the loaded NCCL
    takes, and those it is too old for with the version each needs."""
    every = {
        "cga_cluster_size": 1, "min_ctas": 1, "max_ctas": 1, "net_name": "x", "traffic_class": 0,
        "cta_policy": 0, "launch_order_implicit": True, "nvls_ctas": 1, "collnet_enable": True,
        "max_p2p_peers": 1, "split_share": False, "n_channels_per_net_peer": 1,
        "nvlink_centric_sched": False, "graph_usage_mode": 2, "num_rma_ctx": 1,
        "graph_stream_ordering": True, "comm_name": "x",
    }
    plan = _C.nccl_config_plan(every, _C.nccl_usable_version())
    return list(plan["applied"]), [tuple(entry) for entry in plan["too_new"]]


def _version_code(version: tuple[int, ...]) -> int:
    major, minor, patch = (list(version) + [0, 0, 0])[:3]
    return major * 10000 + minor * 100 + patch


def torch_nccl_runtime_version() -> int:
    """The version of the libnccl torch runs with, as a version code.
    (torch.cuda.nccl.version() is the one torch was built with on some
    versions, e.g. 2.11.)"""
    nccl_class = getattr(dist, "ProcessGroupNCCL", None)
    runtime = getattr(nccl_class, "get_runtime_nccl_version", None)
    return _version_code(tuple(runtime()) if runtime else torch.cuda.nccl.version())


def split_parent(core: "_C.CommPool", base_group_name: str, role: str, device: int) -> Any:
    """The NCCL lane of another pooled role of the same base group on `device`
    that a new lane can be split from, or None (then the new communicator is
    made from a unique id)."""
    if os.environ.get(SPLIT_ENV, "1") == "0":
        return None
    for other in _C.CommPool.roles():
        if other == role:
            continue
        backend = core.find(base_group_name, other)
        lane = backend.device_lane if backend is not None and backend.is_open() else None
        if lane is not None and lane.device_index == device and lane.splittable:
            return lane
    return None


def tear_down_on_error() -> bool:
    for name in (ASYNC_ERROR_HANDLING_ENV, TORCH_ASYNC_ERROR_HANDLING_ENV, _LEGACY_ASYNC_ERROR_HANDLING_ENV):
        raw = os.environ.get(name, "").strip()
        if raw:
            if raw not in _TEARS_DOWN:
                raise ConfigError(f"{name} must be 0, 1, 2 or 3 (as torch reads it), got {raw!r}")
            return _TEARS_DOWN[raw]
    return True  # torch's default, 3


def stall_timeout_seconds() -> float:
    """The stall bound TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC sets (480 s unset)."""
    raw = os.environ.get(STALL_TIMEOUT_ENV)
    if raw is None or raw.strip() == "":
        return _DEFAULT_STALL_TIMEOUT_SECONDS
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise ConfigError(
            f"{STALL_TIMEOUT_ENV} must be a positive number of seconds, got {raw!r}"
        )
    return seconds


@dataclass(frozen=True)
class LanePlan:
    """What the members of a new NCCL lane agreed on."""

    decision: bytes  # _SPLIT, or _INIT followed by the unique id
    # False when a member's GPU predates Hopper: NCCL checks FP8 reductions
    # against the lowest compute capability of a communicator's ranks.
    reduces_fp8: bool


def _agree_on_plan(
    store: dist.Store,
    group_size: int,
    can_split: bool,
    timeout_seconds: float,
    label: str,
    reduces_fp8: bool = True,
) -> LanePlan:
    """Split only if every member can; else one fresh unique id for all. Each
    member adds whether it can split (and whether its GPU can reduce FP8),
    then counts itself in; the last to arrive decides for everyone (so a
    member that cannot split never leaves the others waiting inside
    ncclCommSplit)."""
    store.add("can_split", 1 if can_split else 0)
    store.add("below_sm90", 0 if reduces_fp8 else 1)
    if store.add("arrived", 1) == group_size:
        all_can = store.add("can_split", 0) == group_size
        store.set("plan", _SPLIT if all_can else _INIT + _C.nccl_unique_id())
    try:
        store.wait(["plan"], datetime.timedelta(seconds=timeout_seconds))
    except (RuntimeError, dist.DistError) as e:
        raise RendezvousTimeoutError(
            f"{label}: not every member reached the NCCL communicator plan "
            f"within {timeout_seconds:g} s"
        ) from e
    # Every member added its answer before counting itself in.
    return LanePlan(store.get("plan"), store.add("below_sm90", 0) == 0)


# CUDA's default stream priority: what Megatron's is_high_priority_stream:
# false asks for.
_DEFAULT_STREAM_PRIORITY = 0


def _asked_priority(device: int, config: RoleConfig) -> int | None:
    """The stream priority `config` asks for; None leaves the role's default."""
    if config.stream_priority is not None:
        return config.stream_priority
    if config.is_high_priority_stream is None:
        return None
    if config.is_high_priority_stream:
        _least, greatest = _C.stream_priority_range(device)
        return greatest
    return _DEFAULT_STREAM_PRIORITY


def create_lane(
    *,
    device: int,
    parent: Any,
    role: str,
    config: RoleConfig,
    group_rank: int,
    group_size: int,
    store: dist.Store,
    label: str,
    comm_name: str,
    time_left: Callable[[str], float],
) -> "_C.NcclLane":
    """Creates the NCCL lane of one pooled group, split from `parent` (an
    NcclLane of the same members) when every member has one; collective over
    its members. `time_left(step)` is what the creation's deadline leaves for
    the next step (it raises once nothing is left): the plan and the
    communicator get that, not the role's timeout again."""
    settings = lane_settings(config, comm_name, _C.nccl_usable_version(), label)
    if config.split_share:
        logger.warning(
            "%s: split_share: lanes split from this one share its NCCL resources and stream, "
            "and no longer overlap with it", label,
        )
    # Everything that can fail on one rank alone fails before the collective
    # part, so the peers do not wait for this rank until their timeout.
    priority = _C.NcclLane.resolve_priority(device, role, _asked_priority(device, config), label)
    major, _minor = torch.cuda.get_device_capability(device)
    plan_agreed = _agree_on_plan(
        store, group_size, parent is not None, time_left("agreeing on the NCCL communicator plan"), label,
        reduces_fp8=major >= _C.FP8_REDUCE_MIN_COMPUTE_MAJOR,
    )
    unique_id = b""
    if plan_agreed.decision != _SPLIT:
        unique_id = plan_agreed.decision[len(_INIT):]
        parent = None
    lane = _C.NcclLane(
        device=device,
        rank=group_rank,
        size=group_size,
        role=role,
        settings=settings,
        stream_priority=priority,
        timeout_seconds=config.timeout_seconds,
        label=label,
        unique_id=unique_id,
        parent=parent,
        tear_down_on_error=tear_down_on_error(),
        group_reduces_fp8=plan_agreed.reduces_fp8,
        stall_timeout_seconds=stall_timeout_seconds(),
        creation_timeout_seconds=time_left("creating the NCCL communicator"),
        launch_in_program_order=launch_in_program_order(config.launch_order_implicit),
        global_rank=dist.get_rank() if dist.is_initialized() else group_rank,
    )
    logger.debug(
        "%s: NCCL lane on cuda:%d (%s), stream priority %d",
        label, device, "split" if lane.created_by_split else "new communicator",
        lane.stream_priority,
    )
    return lane
