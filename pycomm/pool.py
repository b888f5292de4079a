"""CommPool: the Python face of the pool of duplicated communicators."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
import weakref
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist

from pycomm import _C
from pycomm.chrome_trace import write_chrome_trace
from pycomm.config import MAX_TIMEOUT_SECONDS, RoleConfig
from pycomm.errors import (
    CollectiveError,
    ConfigError,
    NotAMemberError,
    NotInitializedError,
    PoolMismatchError,
    RendezvousTimeoutError,
)
from pycomm.nccl import DeviceChoice, check_device_choice, resolve_device
from pycomm.overlap import lane_overlap, since_both_traced
from pycomm.registration import (
    BACKEND_NAME,
    CpuCommFactory,
    CreateRequest,
    connect_cpu_comm,
    delete_keys,
    ensure_backend_registered,
    gloo_comm,
    own_store_connection,
    rendezvous,
)
from pycomm.torch_registry import group_name as _group_name
from pycomm.torch_registry import group_timeout_seconds
from pycomm.torch_registry import is_registered as _known_to_torch
from pycomm.torch_registry import register_group, unregister_group

logger = logging.getLogger(__name__)

ROLES: tuple[str, ...] = tuple(_C.CommPool.roles())

# How many pools of each name this process made. A pool's identity is its
# name and this count: the same on every rank that makes its pools of one
# name in the same order, and never used twice in a process, so no store key
# of a pool is ever read by another.
_incarnations: Counter[str] = Counter()
# The names of this process's open pools: two open pools of one name would
# be told apart only by the order they were made in.
_open_names: set[str] = set()
_names_lock = threading.Lock()
# The name of pools made without one.
UNNAMED_POOL = "pool"


def debug_checks_order() -> bool:
    """PYCOMM_DEBUG=order (comma-separated flags) turns the order check on."""
    flags = os.environ.get("PYCOMM_DEBUG", "")
    return "order" in {f.strip() for f in flags.split(",")}


class CommPool:
    """A pool of duplicated communicators, one per (base group, role), each with
    its own lane: all-gathers on the 'ag' duplicate and reduce-scatters on the
    'rs' duplicate of a group run concurrently.

    A pool's groups meet only the same pool's groups on the peers, whatever
    the order of calls, threads or other pools: a pool is known across ranks
    by its `name` and how many pools of that name the process made before
    it. Pools made in the same order on every rank (at start-up, say) need
    no name; pools made in different orders, or from several threads, need
    one each. A member that duplicates a group in another pool than its
    peers gets PoolMismatchError within the timeout.

    Thread-safety: every method may be called from any thread.
    """

    def __init__(
        self,
        default_config: RoleConfig | None = None,
        *,
        name: str | None = None,
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
        always that one; None: CPU tensors only); `name` tells this pool
        from the process's other open pools across ranks (see the class)."""
        check_device_choice(device)  # a bad choice fails here, not at first use
        self._name, self._identity = _claim_name(name)
        # An open name is given back when the pool closes, or is collected.
        self._name_release = weakref.finalize(self, _give_back_name, self._name)
        self._core = _C.CommPool()
        self._default_config = default_config or RoleConfig()
        self._check_order = debug_checks_order() if check_order is None else check_order
        self._cpu_comm_factory = cpu_comm_factory
        self._device = device
        # Creations of each (base group, role) in this pool: members release
        # and duplicate again in the same sequence, so the count names the
        # same store prefix on each.
        self._generations: Counter[tuple[str, str]] = Counter()
        self._entries: dict[tuple[str, str], _Entry] = {}
        # Groups abort() closed but left registered with torch.
        self._left_registered: list[dist.ProcessGroup] = []
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
        resolved = _inherit_timeout(self._default_config.merged(config), group)
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
        deadline = time.monotonic() + config.timeout_seconds
        with self._lock:
            self._generations[key] += 1
            generation = self._generations[key]
        prefix = f"pycomm/{self._identity}/{base_name}/{role}/{generation}"
        spec = _C.PooledGroupSpec()
        spec.base_group_name = base_name
        spec.role = role
        spec.description = f"pycomm_{role}_of_{base_name}"
        spec.global_ranks = ranks
        spec.rank = group_rank
        spec.timeout_seconds = config.timeout_seconds
        spec.check_order = self._check_order
        label = spec.label()
        name = f"pycomm:{self._identity}:{base_name}:{role}:{generation}"
        with own_store_connection(config.timeout_seconds, label) as store:
            self._meet_members(store, prefix, base_name, role, group_rank, ranks, config, deadline, label)
            cpu_comm = connect_cpu_comm(
                self._cpu_comm_factory,
                dist.PrefixStore(f"{prefix}/cpu/", store),
                group_rank,
                len(ranks),
                _remaining(deadline, label, "connecting the group's CPU communicator"),
                label,
                f"{name}/transport",
                ranks,
            )
            device_lane = self._connect_device_lane(base, base_name, role, config, spec, store, prefix, deadline)
            request = CreateRequest(
                core=self._core, spec=spec, cpu_comm=cpu_comm, device_lane=device_lane
            )
            try:
                self._core.throw_if_closed()
                ensure_backend_registered()
                # Nothing in here waits for a peer: the creator only wraps what
                # is connected.
                pooled = register_group(
                    name,
                    ranks,
                    group_rank,
                    BACKEND_NAME,
                    request,
                    config.timeout_seconds,
                    spec.description,
                )
            except BaseException:
                if device_lane is not None:
                    device_lane.abort()
                raise
        logger.info("duplicated %s as group %s", label, _group_name(pooled))
        return pooled

    def _meet_members(
        self,
        store: dist.Store,
        prefix: str,
        base_name: str,
        role: str,
        group_rank: int,
        ranks: list[int],
        config: RoleConfig,
        deadline: float,
        label: str,
    ) -> None:
        """The members' rendezvous under this pool's prefix. Each member
        also says, under a key of the (group, role) alone, which pool it is
        duplicating in, so that a rendezvous that times out can tell a
        member that never came from one that came in another pool."""
        whereabouts = f"pycomm/duplicating/{base_name}/{role}"
        try:
            store.set(f"{whereabouts}/{group_rank}", self._identity)
            rendezvous(store, prefix, group_rank, ranks, config.timeout_seconds, label, deadline)
            # A member's key stays only while it tries, or after it failed
            # (its peers, timing out at about the same time, read it then).
            delete_keys(store, [f"{whereabouts}/{group_rank}"])
        except RendezvousTimeoutError as e:
            elsewhere = {
                ranks[i]: pool
                for i in range(len(ranks))
                if i != group_rank
                and store.check([f"{whereabouts}/{i}"])
                and (pool := store.get(f"{whereabouts}/{i}").decode()) != self._identity
            }
            if elsewhere:
                raise PoolMismatchError(
                    f"{label}: this rank duplicates it in pool {self._identity!r}, "
                    f"but ranks {sorted(elsewhere)} were last seen doing so in pools "
                    f"{sorted(set(elsewhere.values()))}; a pool's groups meet only the "
                    f"same pool's on the peers: make pools in the same order on every "
                    f"rank, or give each a name (CommPool(name=...))"
                ) from e
            raise
        except dist.DistError as e:
            raise CollectiveError(f"{label}: the store failed: {e}") from e

    def _connect_device_lane(
        self,
        base: dist.ProcessGroup,
        base_name: str,
        role: str,
        config: RoleConfig,
        spec: "_C.PooledGroupSpec",
        store: dist.Store,
        prefix: str,
        deadline: float,
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
            comm_name=spec.description,
            time_left=lambda step: _remaining(deadline, spec.label(), step),
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
                pooled = entry.result()  # a creation in flight ends first
            except BaseException:  # noqa: BLE001 - its caller has the error
                continue
            self._core.remove(*key)
            unregister_group(pooled)

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
            gone_groups = [self._entries.pop(key).group for key in gone]
        for key, pooled in zip(gone, gone_groups):
            # Outside the lock: closing waits for queued ops (each bounded
            # by its timeout). torch shut a destroyed pooled group down
            # already, which drained it.
            self._core.remove(*key)
            unregister_group(pooled)  # its base's duplicate, which torch still knows
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
        allocations at the same time count too).

        The AG and RS groups of one base group also get "overlap"
        (pycomm.overlap.lane_overlap over the ops in their traces, the last
        16,384 of each, from the moment both traces cover): each lane's busy
        seconds, the seconds both were busy, and the fraction of the RS
        lane's busy time overlapped by the AG lane, with "with" naming the
        other group."""
        self._release_gone()
        rows = []
        backends = self._core.entries()
        for backend in backends:
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
        _add_overlap(rows, {b.spec.name: b for b in backends})
        return sorted(rows, key=lambda r: (r["base_group"], r["role"]))

    def trace(self) -> list[dict[str, Any]]:
        """Recent ops of every pooled group: group name, role, base group,
        kind, bytes, start/end (microseconds of the system clock), ok."""
        events = [e for backend in self._core.entries() for e in _trace_rows(backend)]
        return sorted(events, key=lambda e: e["start_us"])

    def write_chrome_trace(self, path: str | os.PathLike[str], profiler_trace: str | os.PathLike[str] | None = None) -> Path:
        """Writes this rank's lanes as a Chrome/Perfetto trace at `path`: one
        track per pooled group, an interval per op (op kind, bytes, ok). With
        `profiler_trace` (a torch.profiler Chrome trace of the same process),
        the lanes' tracks are added to a copy of it, on its time base, so
        they open beside the profiler's own rows."""
        rank = dist.get_rank() if dist.is_initialized() else 0
        return write_chrome_trace(
            Path(path), {rank: self.trace()}, Path(profiler_trace) if profiler_trace is not None else None
        )

    def _forget_groups(self, unregister: bool) -> None:
        """Empties the pool and gives its name back; `unregister`: takes its
        groups, and those an earlier abort() left, out of torch's
        registries, as destroy_process_group does."""
        with self._lock:
            self._left_registered.extend(e.group for e in self._entries.values() if e.group is not None)
            self._entries.clear()
            groups: list[dist.ProcessGroup] = []
            if unregister:
                groups, self._left_registered = self._left_registered, []
        for group in groups:
            unregister_group(group)
        self._name_release()

    def destroy(self) -> None:
        """Releases every pooled communicator, lane thread and connection,
        and takes the pooled groups out of torch's registries (a later use
        gets torch's ValueError about an unknown group, as after
        destroy_process_group). Ops already queued finish first (each
        bounded by its timeout). Idempotent."""
        try:
            self._core.destroy()
        finally:
            self._forget_groups(unregister=True)  # also when a communicator could not be flushed

    def abort(self) -> None:
        """Fails every unfinished op with PoolClosedError and releases the pool
        without waiting for peers (for a hung or dead peer). Idempotent.

        The groups stay registered with torch, closed: an op racing the
        abort on another thread gets PoolClosedError, which torch's error
        logging (it looks the group up) would otherwise turn into a
        ValueError about an unknown group. A later destroy(), or torch's
        destroy_process_group, takes them out."""
        self._core.abort()
        self._forget_groups(unregister=False)

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


def _claim_name(name: str | None) -> tuple[str, str]:
    """(name, identity) of a new pool: `name` must not be another open
    pool's; the identity adds how many pools of that name came before."""
    if name is not None and (not isinstance(name, str) or not name or "/" in name or ":" in name):
        raise ConfigError(f"a pool's name must be a non-empty string without '/' or ':', got {name!r}")
    chosen = UNNAMED_POOL if name is None else name
    with _names_lock:
        if name is not None and name in _open_names:
            raise ConfigError(
                f"a pool named {name!r} is open in this process already; destroy it "
                f"first or choose another name"
            )
        if name is not None:
            _open_names.add(name)
        _incarnations[chosen] += 1
        return chosen, f"{chosen}.{_incarnations[chosen]}"


def _give_back_name(name: str) -> None:
    with _names_lock:
        _open_names.discard(name)


def _remaining(deadline: float, label: str, step: str) -> float:
    """Seconds left before `deadline` for the next step of a creation."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise RendezvousTimeoutError(f"{label}: the timeout passed before {step}")
    return left


def _weak(group: dist.ProcessGroup) -> Callable[[], dist.ProcessGroup | None]:
    """A reference to a base group that does not keep it alive."""
    try:
        return weakref.ref(group)
    except TypeError:  # a ProcessGroup type without weak references
        return lambda: group


def _inherit_timeout(config: RoleConfig, base: dist.ProcessGroup) -> RoleConfig:
    """`config`, with the base group's timeout (which torch gave it from the
    world's unless new_group named one) when it names none, as a group made
    by new_group inherits the world's."""
    if config.timeout is not None:
        return config
    inherited = group_timeout_seconds(base)
    if inherited is None:
        return config
    return dataclasses.replace(config, timeout=min(inherited, MAX_TIMEOUT_SECONDS))


def _trace_rows(backend: Any) -> list[dict[str, Any]]:
    spec = backend.spec
    return [
        {
            "group": spec.name,
            "role": spec.role,
            "base_group": spec.base_group_name,
            "kind": kind,
            "bytes": nbytes,
            "start_us": start_us,
            "end_us": end_us,
            "ok": ok,
        }
        for kind, nbytes, start_us, end_us, ok in backend.trace()
    ]


def _add_overlap(rows: list[dict[str, Any]], backends: dict[str, Any]) -> None:
    """Gives the AG and RS rows of each base group that has both their
    lanes' overlap."""
    by_base: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_base.setdefault(row["base_group"], {})[row["role"]] = row
    for roles in by_base.values():
        ag, rs = roles.get("ag"), roles.get("rs")
        if ag is None or rs is None:
            continue
        spans = {
            role: [(start_us, end_us) for _, _, start_us, end_us, _ in backends[row["name"]].trace()]
            for role, row in (("ag", ag), ("rs", rs))
        }
        overlap = lane_overlap(*since_both_traced(spans["ag"], spans["rs"], _C.LANE_TRACE_CAPACITY))
        ag["overlap"] = {"with": rs["name"], **overlap}
        rs["overlap"] = {"with": ag["name"], **overlap}
