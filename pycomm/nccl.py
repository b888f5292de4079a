"""The NCCL lane of a pooled group (CUDA build): which device it serves, how its
communicator is made, and the ncclConfig_t a RoleConfig turns into.

A communicator is split (ncclCommSplit) from the base group's own NCCL
communicator when every member can: torch has one bound to the device, both
use the same libnccl, and its children would not share its resources.
Otherwise every member creates it with ncclCommInitRankConfig from one unique
id published in the store by the last member to arrive.
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
    paths = {line.split()[-1] for line in maps.read_text().splitlines() if "/" in line}
    # Only NCCL itself: its network plugins (libnccl-net*.so) may be loaded too.
    return {p for p in paths if os.path.basename(p).startswith("libnccl.so")}


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


def _shares_resources(backend: Any) -> bool:
    """Whether children split from torch's communicator would share its
    resources: NCCL takes splitShare from the parent, and shared children
    share its stream (the lanes would serialize) and its abort."""
    undefined = -(2**31)
    try:
        split_share = backend.options.config.split_share
    except AttributeError:
        split_share = undefined
    if split_share != undefined:
        return split_share == 1
    return os.environ.get("NCCL_COMM_SPLIT_SHARE_RESOURCES", "0") == "1"


def parent_comm(base_group: dist.ProcessGroup | None, device: int) -> int:
    """The address of the base group's ncclComm_t on `device`, or 0 when there
    is none this process can safely split: the split needs torch's NCCL
    backend bound to this device (so its communicator exists on every
    member), one libnccl shared by torch and pycomm, and a parent whose
    children do not share its resources."""
    if os.environ.get(SPLIT_ENV, "1") == "0":
        return 0
    backend = _torch_nccl_backend(base_group, torch.device("cuda", device))
    if backend is None:
        return 0
    if not hasattr(backend, "_comm_ptr") or not backend._is_initialized():
        return 0
    bound = getattr(backend, "bound_device_id", None)
    if bound is None or bound.index != device:
        return 0
    if torch_nccl_runtime_version() != _C.nccl_loaded_version():
        return 0
    if len(_libnccl_paths()) != 1 or _shares_resources(backend):
        return 0
    with torch.cuda.device(device):
        return int(backend._comm_ptr())


def _agree_on_plan(
    store: dist.Store, group_size: int, parent: int, timeout_seconds: float, label: str
) -> bytes:
    """Split only if every member can; else one fresh unique id for all. Each
    member adds whether it can split, then counts itself in; the last to
    arrive decides for everyone (so a member that cannot split never leaves
    the others waiting inside ncclCommSplit)."""
    store.add("can_split", 1 if parent else 0)
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
    return store.get("plan")


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
    # Everything that can fail on one rank alone fails before the collective
    # part: a blocking parent's split would wait for that rank forever.
    priority = _C.NcclLane.resolve_priority(device, role, config.stream_priority, label)
    parent = parent_comm(base_group, device)
    decision = _agree_on_plan(store, group_size, parent, config.timeout_seconds, label)
    unique_id = b""
    if decision != _SPLIT:
        unique_id = decision[len(_INIT):]
        parent = 0
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
    )
    logger.debug(
        "%s: NCCL lane on cuda:%d (%s), stream priority %d",
        label, device, "split" if lane.created_by_split else "new communicator",
        lane.stream_priority,
    )
    return lane
