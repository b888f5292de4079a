"""Pooled groups in torch.distributed's group registry: added and removed
without touching the bookkeeping every rank must keep in step.

torch's `new_group` counts every group it makes in `_world.group_count`, and
derives the names of groups made later (`use_local_synchronization=True`
ones among them) from that count. A pooled group is made by its members
only: had it gone through `new_group`, the count would differ between
members and non-members, and the next `dist.new_group` that every rank
calls would wait on different store keys on each until its timeout. So a
pooled group is registered under a name of pycomm's own, agreed by its
members, through the helper `new_group` itself uses after counting.

Thread-safety: torch's registry is not thread-safe; every function here
holds one process-wide lock while it changes it. torch's own new_group or
destroy_process_group called at the same time from another thread is the
caller's to avoid, as with torch alone.
"""

from __future__ import annotations

import datetime
import logging
import threading
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from pycomm import _C

try:
    from torch._C._distributed_c10d import FlightRecorderHook
except ImportError:  # torch before 2.14 has no backend-agnostic hook
    FlightRecorderHook = None

logger = logging.getLogger(__name__)

_lock = threading.Lock()

# The flight-recorder hooks of registered pooled groups, by group name: a
# hook records while its handle lives.
_flight_recorder_hooks: dict[str, Any] = {}


def register_group(
    name: str,
    ranks: list[int],
    group_rank: int,
    backend: str,
    backend_options: Any,
    timeout_seconds: float,
    description: str,
) -> dist.ProcessGroup:
    """Creates the group `name` of `ranks` with `backend` on this member and
    registers it with torch as new_group would, leaving torch's group
    counter as it was. Nothing here waits for a peer."""
    with _lock:
        default = c10d._get_default_group()
        group, _ = c10d._new_process_group_helper(
            len(ranks),
            group_rank,
            ranks,
            backend,
            c10d._get_default_store(),
            c10d.GroupName(name),
            backend_options=backend_options,
            timeout=datetime.timedelta(seconds=timeout_seconds),
            device_id=default.bound_device_id,
            group_desc=description,
        )
        c10d._world.pg_group_ranks[group] = {g: i for i, g in enumerate(ranks)}
        if _C.flight_recorder_on():
            _attach_flight_recorder(name, group)
        return group


def _attach_flight_recorder(name: str, group: dist.ProcessGroup) -> None:
    # torch attaches its backend-agnostic hook only to the groups it makes
    # through torchcomms; ProcessGroupNCCL records natively.
    if FlightRecorderHook is None:
        logger.warning(
            "torch %s has no FlightRecorderHook: the collectives of pooled group %s are not in "
            "its flight recorder (torch 2.14 and later record them)",
            torch.__version__,
            name,
        )
        return
    _flight_recorder_hooks[name] = FlightRecorderHook.attach(group)


def unregister_group(group: dist.ProcessGroup) -> bool:
    """Removes `group` from every registry of torch's (as
    destroy_process_group does), if torch still knows it; whether it did."""
    with _lock:
        # Also when torch destroyed the group first: the hook holds it.
        hook = _flight_recorder_hooks.pop(group.group_name, None)
        if hook is not None:
            hook.remove()
        if not is_registered(group):
            return False
        tag = c10d._world.pg_to_tag.get(group)
        dist.destroy_process_group(group)
        # torch leaves the tag's list behind, empty: one per group ever made.
        if tag is not None and not c10d._world.tags_to_pg.get(tag, True):
            del c10d._world.tags_to_pg[tag]
        return True


def is_registered(group: dist.ProcessGroup | None) -> bool:
    """Whether torch still has `group` registered (destroy_process_group
    removes it; so does destroying the world)."""
    return group is not None and group in c10d._world.pg_map


def group_name(group: dist.ProcessGroup) -> str:
    return c10d._get_process_group_name(group)


def group_timeout_seconds(group: dist.ProcessGroup) -> float | None:
    """The timeout `group` was made with (the world's unless new_group was
    given one), which torch keeps only in the backend's options; None when
    no backend of the group says."""
    for device in ("cuda", "cpu"):
        try:
            timeout = group._get_backend(torch.device(device)).options._timeout
        except (RuntimeError, AttributeError, ValueError):
            continue
        if isinstance(timeout, datetime.timedelta) and timeout.total_seconds() > 0:
            return timeout.total_seconds()
    return None
