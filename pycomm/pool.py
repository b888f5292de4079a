"""CommPool: the Python face of the pool of duplicated communicators."""

from __future__ import annotations

import datetime
import logging
import os
import threading
import weakref
from collections import Counter
from typing import Any, Callable

import torch.distributed as dist

from pycomm import _C
from pycomm.config import RoleConfig
from pycomm.errors import NotAMemberError, NotInitializedError
from pycomm.nccl import DeviceChoice, check_device_choice, resolve_device
from pycomm.registration import (
    BACKEND_NAME,
    CpuCommFactory,
    CreateRequest,
    connect_cpu_comm,
    ensure_backend_registered,
    gloo_comm,
    own_store_connection,
    rendezvous,
)

logger = logging.getLogger(__name__)

ROLES: tuple[str, ...] = tuple(_C.CommPool.roles())

# How many times this process created each (base group, role); members create
# in the same sequence, so the count names the same store prefix on each.
_generations: Counter[tuple[str, str]] = Counter()
_generations_lock = threading.Lock()
# torch.distributed's group registry (new_group, destroy_process_group) is
# not thread-safe; pooled groups are made from any thread.
_torch_registry_lock = threading.Lock()


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
        self._entries: dict[tuple[str, str], _Entry] = {}
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
        self._release_gone()
        with self._lock:
            self._core.throw_if_closed()
            entry = self._entries.get(key)
            creating = entry is None
            if creating:
                entry = _Entry(base=_weak(group), config=resolved)
                self._entries[key] = entry
        if not creating:
            return entry.result()
        try:
            pooled = self._create(group, base_name, role, ranks, group_rank, resolved)
        except BaseException as e:
            with self._lock:
                if self._entries.get(key) is entry:
                    del self._entries[key]
            entry.fail(e)
            raise
        entry.succeed(pooled)
        return pooled

    def _create(
        self,
        base: dist.ProcessGroup,
        base_name: str,
        role: str,
        ranks: list[int],
        group_rank: int,
        config: RoleConfig,
    ) -> dist.ProcessGroup:
        """Makes the pooled group of (base, role): a collective over the
        members, run without the pool's lock so that other pooled groups can
        be made meanwhile, in any order."""
        key = (base_name, role)
        with _generations_lock:
            _generations[key] += 1
            generation = _generations[key]
        prefix = f"pycomm/{base_name}/{role}/{generation}"
        spec = _C.PooledGroupSpec()
        spec.base_group_name = base_name
        spec.role = role
        spec.global_ranks = ranks
        spec.rank = group_rank
        spec.timeout_seconds = config.timeout_seconds
        spec.check_order = self._check_order
        label = spec.label()
        store = own_store_connection()
        rendezvous(store, prefix, group_rank, ranks, config.timeout_seconds, label)
        cpu_comm = connect_cpu_comm(
            self._cpu_comm_factory,
            dist.PrefixStore(f"{prefix}/cpu/", store),
            group_rank,
            len(ranks),
            config.timeout_seconds,
            label,
        )
        device_lane = self._connect_device_lane(base, base_name, role, config, spec, store, prefix)
        request = CreateRequest(
            core=self._core, spec=spec, cpu_comm=cpu_comm, device_lane=device_lane
        )
        try:
            self._core.throw_if_closed()
            ensure_backend_registered()
            # torch's group registry is not thread-safe; nothing in here
            # waits for a peer (the creator only wraps what is connected).
            with _torch_registry_lock:
                pooled = dist.new_group(
                    ranks,
                    timeout=datetime.timedelta(seconds=config.timeout_seconds),
                    backend=BACKEND_NAME,
                    pg_options=request,
                    use_local_synchronization=True,
                    group_desc=f"pycomm_{role}_of_{base_name}",
                )
        except BaseException:
            if device_lane is not None:
                device_lane.abort()
            raise
        logger.info("duplicated %s as group %s", label, _group_name(pooled))
        return pooled

    def _connect_device_lane(
        self,
        base: dist.ProcessGroup,
        base_name: str,
        role: str,
        config: RoleConfig,
        spec: "_C.PooledGroupSpec",
        store: dist.Store,
        prefix: str,
    ) -> Any:
        device = resolve_device(self._device, base)
        if device is None:
            return None
        from pycomm import nccl  # the CUDA build only

        return nccl.create_lane(
            device=device,
            parent=nccl.split_parent(self._core, base_name, role, device),
            role=role,
            config=config,
            group_rank=spec.rank,
            group_size=len(spec.global_ranks),
            store=dist.PrefixStore(f"{prefix}/nccl/", store),
            label=spec.label(),
            comm_name=f"pycomm_{role}_of_{base_name}",
        )

    def release(self, group: dist.ProcessGroup, role: str | None = None) -> None:
        """Releases the pooled duplicates of `group` (every role, or `role`):
        queued ops finish first (each bounded by its timeout), then their
        communicators, threads and connections are freed; later ops on them
        raise PoolClosedError, and duplicate() makes new ones. Like
        destroy_process_group, every member calls it. The duplicates of a
        base group that torch destroyed are released by the next call into
        the pool without this."""
        roles = ROLES if role is None else (role,)
        for r in roles:
            _C.CommPool.check_role(r)
        base_name = _group_name(group)
        with self._lock:
            taken = [(k, self._entries.pop(k)) for k in [(base_name, r) for r in roles] if k in self._entries]
        for key, entry in taken:
            try:
                entry.result()  # a creation in flight ends first
            except BaseException:  # noqa: BLE001 - its caller has the error
                continue
            self._core.remove(*key)

    def get(self, group: dist.ProcessGroup, role: str = "ag") -> dist.ProcessGroup | None:
        """The pooled duplicate of `group` for `role`, or None."""
        entry = self._ready_entry(group, role)
        return entry.group if entry is not None else None

    def config(self, group: dist.ProcessGroup, role: str = "ag") -> RoleConfig | None:
        """The RoleConfig the pooled duplicate of `group` for `role` was made
        with, or None when there is none."""
        entry = self._ready_entry(group, role)
        return entry.config if entry is not None else None

    def groups(self) -> list[dist.ProcessGroup]:
        self._release_gone()
        with self._lock:
            return [e.group for e in self._entries.values() if e.group is not None]

    def _ready_entry(self, group: dist.ProcessGroup, role: str) -> "_Entry | None":
        _C.CommPool.check_role(role)
        self._release_gone()
        with self._lock:
            entry = self._entries.get((_group_name(group), role))
            return entry if entry is not None and entry.group is not None else None

    def _release_gone(self) -> None:
        """Forgets the pooled groups torch destroyed and releases those whose
        base group it destroyed. torch tells no one when it destroys a group,
        so each call into the pool looks; the checks are dict lookups."""
        with self._lock:
            gone = [
                key
                for key, entry in self._entries.items()
                if entry.group is not None
                and not (_known_to_torch(entry.group) and _known_to_torch(entry.base()))
            ]
            for key in gone:
                del self._entries[key]
        for key in gone:
            # Outside the lock: closing waits for queued ops (each bounded
            # by its timeout). torch shut a destroyed pooled group down
            # already, which drained it.
            self._core.remove(*key)
            logger.info("released role %r of group %r: torch destroyed it or its base", key[1], key[0])

    @property
    def is_open(self) -> bool:
        return self._core.is_open()

    def stats(self) -> list[dict[str, Any]]:
        """Per pooled group (not those torch destroyed, nor the duplicates of
        base groups it destroyed: the pool released them): name, base group,
        role, ranks, whether it is open
        (torch's shutdown or abort of its group closes it), ops, bytes, busy
        seconds, errors, ops by kind, ops pending, and for
        groups with an NCCL lane its device, stream priority, whether its
        communicator was split from the base group's, and the device memory
        its communicator took (bytes at creation, and at its first op: None
        until that ended; measured as the device's free memory fell, so other
        allocations at the same time count too)."""
        self._release_gone()
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
                    "memory": lane.memory,
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

    def _forget_groups(self) -> None:
        # The pooled groups stay registered with torch, closed: any later use
        # raises PoolClosedError, where a group torch no longer knows would
        # make torch raise its own ValueError over it. What is kept is
        # torch's bookkeeping of the group, no thread or connection;
        # dist.destroy_process_group(group), or of the world, drops it.
        with self._lock:
            self._entries.clear()

    def destroy(self) -> None:
        """Releases every pooled communicator, lane thread and connection.
        Ops already queued finish first (each bounded by its timeout); new ops
        raise PoolClosedError. Idempotent."""
        try:
            self._core.destroy()
        finally:
            self._forget_groups()  # also when a communicator could not be flushed

    def abort(self) -> None:
        """Fails every unfinished op with PoolClosedError and releases the pool
        without waiting for peers (for a hung or dead peer). Idempotent."""
        self._core.abort()
        self._forget_groups()

    def __repr__(self) -> str:
        state = "open" if self.is_open else self._core.closed_reason()
        with self._lock:
            count = sum(1 for e in self._entries.values() if e.group is not None)
        return f"CommPool({count} groups, {state})"


class _Entry:
    """One (base group, role) of the pool: its pooled group once made. A
    thread that asks while another makes it waits for that one's result.

    Thread-safety: any thread."""

    def __init__(self, base: Callable[[], dist.ProcessGroup | None], config: RoleConfig) -> None:
        self.base = base
        self.config = config
        self.group: dist.ProcessGroup | None = None
        self._error: BaseException | None = None
        self._done = threading.Event()

    def succeed(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self._done.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._done.set()

    def result(self) -> dist.ProcessGroup:
        # The maker's own wait is bounded by the timeout; so is this one.
        self._done.wait()
        if self._error is not None:
            raise self._error
        assert self.group is not None
        return self.group


def _weak(group: dist.ProcessGroup) -> Callable[[], dist.ProcessGroup | None]:
    """A reference to a base group that does not keep it alive."""
    try:
        return weakref.ref(group)
    except TypeError:  # a ProcessGroup type without weak references
        return lambda: group


def _known_to_torch(group: dist.ProcessGroup | None) -> bool:
    """Whether torch still has `group` registered (destroy_process_group
    removes it; so does destroying the world)."""
    return group is not None and group in dist.distributed_c10d._world.pg_map
