"""CommPool: the Python face of the pool of duplicated communicators."""

from __future__ import annotations

import datetime
import logging
import os
import threading
from collections import Counter
from typing import Any

import torch.distributed as dist

from pycomm import _C
from pycomm.config import RoleConfig
from pycomm.errors import NotAMemberError, NotInitializedError
from pycomm.nccl import DeviceChoice, check_device_choice, resolve_device
from pycomm.registration import (
    BACKEND_NAME,
    CpuCommFactory,
    CreateRequest,
    ensure_backend_registered,
    gloo_comm,
    rendezvous,
    root_store,
)

logger = logging.getLogger(__name__)

ROLES: tuple[str, ...] = tuple(_C.CommPool.roles())

# How many times this process created each (base group, role); members create
# in the same sequence, so the count names the same store prefix on each.
_generations: Counter[tuple[str, str]] = Counter()
_generations_lock = threading.Lock()


def debug_checks_order() -> bool:
    """PYCOMM_DEBUG=order (comma-separated flags) turns the order check on."""
    flags = os.environ.get("PYCOMM_DEBUG", "")
    return "order" in {f.strip() for f in flags.split(",")}


def _group_name(group: dist.ProcessGroup) -> str:
    return dist.distributed_c10d._get_process_group_name(group)


class CommPool:
    """A pool of duplicated communicators, one per (base group, role), each with
    its own lane: all-gathers on the 'ag' duplicate and reduce-scatters on the
    'rs' duplicate of a group run concurrently.

    Thread-safety: every method may be called from any thread.
    """

    def __init__(
        self,
        default_config: RoleConfig | None = None,
        *,
        check_order: bool | None = None,
        cpu_comm_factory: CpuCommFactory = gloo_comm,
        device: DeviceChoice = "auto",
    ) -> None:
        """`default_config` applies to every role unless duplicate() gets its
        own; `check_order` turns on the cross-rank op-order check (default:
        PYCOMM_DEBUG=order); `cpu_comm_factory` makes each pooled group's CPU
        communicator (default: a gloo communicator of its own; simulated
        worlds pass torch's fake backend); `device` is the CUDA device whose
        tensors get an NCCL lane per pooled group ('auto': the device of the
        base group's own NCCL backend, if it has one; an index or device:
        always that one; None: CPU tensors only)."""
        self._core = _C.CommPool()
        self._default_config = default_config or RoleConfig()
        self._check_order = debug_checks_order() if check_order is None else check_order
        self._cpu_comm_factory = cpu_comm_factory
        self._device = device
        check_device_choice(device)  # a bad choice fails here, not at first use
        self._groups: dict[tuple[str, str], dist.ProcessGroup] = {}
        self._configs: dict[tuple[str, str], RoleConfig] = {}
        self._lock = threading.RLock()

    def __enter__(self) -> "CommPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def duplicate(
        self,
        group: dist.ProcessGroup | None = None,
        role: str = "ag",
        config: RoleConfig | None = None,
    ) -> dist.ProcessGroup:
        """A torch.distributed ProcessGroup with exactly the ranks of `group`
        (default: the world), on a communicator and lane of its own for `role`.

        Only the members of `group` take part. The same (group, role) returns
        the same group object.
        """
        _C.CommPool.check_role(role)
        self._core.throw_if_closed()
        if not dist.is_initialized():
            raise NotInitializedError(
                "torch.distributed is not initialized; call "
                "torch.distributed.init_process_group() before duplicating groups"
            )
        group = group if group is not None else dist.group.WORLD
        if group is dist.GroupMember.NON_GROUP_MEMBER or group is None:
            raise NotAMemberError(
                f"rank {dist.get_rank()} is not a member of the group passed to "
                f"duplicate(role={role!r}); only members may duplicate a group"
            )
        base_name = _group_name(group)
        ranks = sorted(dist.get_process_group_ranks(group))
        group_rank = dist.get_rank(group)
        if group_rank < 0:
            raise NotAMemberError(
                f"rank {dist.get_rank()} is not a member of group {base_name!r} "
                f"(ranks {ranks}); only members may duplicate it"
            )
        key = (base_name, role)
        resolved = self._default_config.merged(config)
        with self._lock:
            self._core.throw_if_closed()
            existing = self._groups.get(key)
            if existing is not None:
                return existing
            with _generations_lock:
                _generations[key] += 1
                generation = _generations[key]
            prefix = f"pycomm/{base_name}/{role}/{generation}"
            label = f"role {role!r} of group {base_name!r} (ranks {ranks})"
            store = root_store()
            rendezvous(store, prefix, group_rank, ranks, resolved.timeout_seconds, label)
            ensure_backend_registered()
            request = CreateRequest(
                core=self._core,
                base_group_name=base_name,
                role=role,
                config=resolved,
                store_prefix=prefix,
                check_order=self._check_order,
                cpu_comm_factory=self._cpu_comm_factory,
                device=resolve_device(self._device, group),
            )
            pooled = dist.new_group(
                ranks,
                timeout=datetime.timedelta(seconds=resolved.timeout_seconds),
                backend=BACKEND_NAME,
                pg_options=request,
                use_local_synchronization=True,
                group_desc=f"pycomm_{role}_of_{base_name}",
            )
            self._groups[key] = pooled
            self._configs[key] = resolved
            logger.info("duplicated %s as group %s", label, _group_name(pooled))
            return pooled

    def get(self, group: dist.ProcessGroup, role: str = "ag") -> dist.ProcessGroup | None:
        """The pooled duplicate of `group` for `role`, or None."""
        _C.CommPool.check_role(role)
        with self._lock:
            return self._groups.get((_group_name(group), role))

    def config(self, group: dist.ProcessGroup, role: str = "ag") -> RoleConfig | None:
        """The RoleConfig the pooled duplicate of `group` for `role` was made
        with, or None when there is none."""
        _C.CommPool.check_role(role)
        with self._lock:
            return self._configs.get((_group_name(group), role))

    def groups(self) -> list[dist.ProcessGroup]:
        with self._lock:
            return list(self._groups.values())

    @property
    def is_open(self) -> bool:
        return self._core.is_open()

    def stats(self) -> list[dict[str, Any]]:
        """Per pooled group: name, base group, role, ranks, whether it is open
        (torch's shutdown or abort of its group closes it), ops, bytes, busy
        seconds, errors, ops by kind, ops pending, and for
        groups with an NCCL lane its device, stream priority and whether its
        communicator was split from the base group's."""
        rows = []
        for backend in self._core.entries():
            spec = backend.spec
            row: dict[str, Any] = {
                "name": spec.name,
                "base_group": spec.base_group_name,
                "role": spec.role,
                "ranks": list(spec.global_ranks),
                "open": backend.is_open(),
                "pending": backend.pending(),
            }
            row.update(backend.stats())
            lane = backend.device_lane
            if lane is not None:
                row["nccl"] = {
                    "device": lane.device_index,
                    "stream_priority": lane.stream_priority,
                    "created_by_split": lane.created_by_split,
                    "pending": lane.pending(),
                }
            rows.append(row)
        return sorted(rows, key=lambda r: (r["base_group"], r["role"]))

    def trace(self) -> list[dict[str, Any]]:
        """Recent ops of every pooled group: role, base group, kind, bytes,
        start/end (microseconds of the system clock), ok."""
        events = []
        for backend in self._core.entries():
            spec = backend.spec
            for kind, nbytes, start_us, end_us, ok in backend.trace():
                events.append(
                    {
                        "role": spec.role,
                        "base_group": spec.base_group_name,
                        "kind": kind,
                        "bytes": nbytes,
                        "start_us": start_us,
                        "end_us": end_us,
                        "ok": ok,
                    }
                )
        return sorted(events, key=lambda e: e["start_us"])

    def _release_groups(self) -> None:
        with self._lock:
            pooled = list(self._groups.values())
            self._groups.clear()
            self._configs.clear()
        if not dist.is_initialized():
            return
        for group in pooled:
            try:
                dist.destroy_process_group(group)
            except (ValueError, RuntimeError) as e:  # already destroyed by the caller
                logger.debug("group %s was already destroyed: %s", group, e)

    def destroy(self) -> None:
        """Releases every pooled communicator, lane thread and connection.
        Ops already queued finish first (each bounded by its timeout); new ops
        raise PoolClosedError. Idempotent."""
        try:
            self._core.destroy()
        finally:
            self._release_groups()  # also when a communicator could not be flushed

    def abort(self) -> None:
        """Fails every unfinished op with PoolClosedError and releases the pool
        without waiting for peers (for a hung or dead peer). Idempotent."""
        self._core.abort()
        self._release_groups()

    def __repr__(self) -> str:
        state = "open" if self.is_open else self._core.closed_reason()
        return f"CommPool({len(self._groups)} groups, {state})"
