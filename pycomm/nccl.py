"""The NCCL lane of a pooled group (CUDA build): which device it serves, how its
communicator is made, and the ncclConfig_t a RoleConfig turns into.

A communicator is split (ncclCommSplit, splitShare=0) from the base group's own
NCCL communicator when torch already has one bound to this device and both
use the same libnccl; otherwise it is created with ncclCommInitRankConfig from
a unique id that the group's first rank publishes in the store. The group's
first rank decides which, so every member does the same.
"""

from __future__ import annotations

import datetime
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pycomm import _C
from pycomm.config import CTA_POLICIES, RoleConfig
from pycomm.errors import ConfigError, RendezvousTimeoutError

logger = logging.getLogger(__name__)

# "0" makes every pooled communicator a fresh one, never a split.
SPLIT_ENV = "PYCOMM_NCCL_SPLIT"

DeviceChoice = int | str | torch.device | None

_SPLIT = b"split"
_INIT = b"init:"


def resolve_device(choice: DeviceChoice) -> int | None:
    """The CUDA device index pooled groups get an NCCL lane on, or None for
    no NCCL lane. 'auto': the current device when this build has the NCCL
    transport and CUDA is available, else None."""
    if choice is None:
        return None
    if isinstance(choice, str) and choice == "auto":
        if _C.cuda_built and torch.cuda.is_available():
            return torch.cuda.current_device()
        return None
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
    """The ncclConfig_t fields `config` sets, as _C.NcclLane takes them."""
    return {
        "cga_cluster_size": config.cga_cluster_size,
        "min_ctas": config.min_ctas,
        "max_ctas": config.max_ctas,
        "net_name": config.net_name,
        "traffic_class": config.traffic_class,
        "cta_policy": CTA_POLICIES[config.cta_policy] if config.cta_policy else None,
        "comm_name": comm_name,
    }


def _libnccl_paths() -> set[str]:
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return set()
    return {
        line.split()[-1]
        for line in maps.read_text().splitlines()
        if "libnccl" in line and line.split()[-1].startswith("/")
    }


def _version_code(version: tuple[int, ...]) -> int:
    major, minor, patch = (list(version) + [0, 0, 0])[:3]
    return major * 10000 + minor * 100 + patch


def parent_comm(base_group: dist.ProcessGroup | None, device: int) -> int:
    """The address of the base group's ncclComm_t on `device`, or 0 when there
    is none this process can safely split: the split needs torch's NCCL
    backend bound to this device (so its communicator exists on every member)
    and one libnccl shared by torch and pycomm."""
    if base_group is None or os.environ.get(SPLIT_ENV, "1") == "0":
        return 0
    try:
        backend = base_group._get_backend(torch.device("cuda", device))
    except RuntimeError:
        return 0
    nccl_class = getattr(dist, "ProcessGroupNCCL", None)
    if nccl_class is None or not isinstance(backend, nccl_class):
        return 0
    if not hasattr(backend, "_comm_ptr") or not backend._is_initialized():
        return 0
    bound = getattr(backend, "bound_device_id", None)
    if bound is None or bound.index != device:
        return 0
    if _version_code(torch.cuda.nccl.version()) != _C.nccl_loaded_version():
        return 0
    if len(_libnccl_paths()) != 1:
        return 0
    with torch.cuda.device(device):
        return int(backend._comm_ptr())


def _agree_on_plan(
    store: dist.Store, group_rank: int, parent: int, timeout_seconds: float, label: str
) -> bytes:
    """The first rank's choice, split or a fresh unique id, for every member."""
    key = "plan"
    if group_rank == 0:
        plan = _SPLIT if parent else _INIT + _C.nccl_unique_id()
        store.set(key, plan)
        return plan
    try:
        store.wait([key], datetime.timedelta(seconds=timeout_seconds))
    except (RuntimeError, dist.DistError) as e:
        raise RendezvousTimeoutError(
            f"{label}: the group's first rank published no NCCL communicator plan "
            f"within {timeout_seconds:g} s"
        ) from e
    return store.get(key)


def create_lane(
    *,
    device: int,
    base_group: dist.ProcessGroup | None,
    role: str,
    config: RoleConfig,
    group_rank: int,
    group_size: int,
    store: dist.Store,
    label: str,
    comm_name: str,
) -> "_C.NcclLane":
    """Creates the NCCL lane of one pooled group; collective over its members."""
    settings = nccl_settings(config, comm_name)
    plan = _C.nccl_config_plan(settings, _C.nccl_usable_version())
    for field, needs in plan["skipped"]:
        logger.warning(
            "%s: ncclConfig_t.%s needs NCCL %s; the NCCL in use ignores it", label, field, needs
        )
    parent = parent_comm(base_group, device)
    decision = _agree_on_plan(store, group_rank, parent, config.timeout_seconds, label)
    unique_id = b""
    if decision == _SPLIT:
        if not parent:
            raise ConfigError(
                f"{label}: the group's first rank splits the base group's NCCL "
                f"communicator, but rank {group_rank} has none it can split; bind "
                f"every rank's default group to its device (init_process_group("
                f"device_id=...)) or set {SPLIT_ENV}=0 on every rank"
            )
    else:
        unique_id = decision[len(_INIT):]
        parent = 0
    lane = _C.NcclLane(
        device=device,
        rank=group_rank,
        size=group_size,
        role=role,
        settings=settings,
        stream_priority=config.stream_priority,
        timeout_seconds=config.timeout_seconds,
        label=label,
        unique_id=unique_id,
        parent=parent,
    )
    logger.debug(
        "%s: NCCL lane on cuda:%d (%s), stream priority %d",
        label, device, "split" if lane.created_by_split else "new communicator",
        lane.stream_priority,
    )
    return lane
