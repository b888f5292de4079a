"""The torch.distributed side of pooled groups: the 'pycomm' backend that
torch.distributed.new_group creates them with, and the rendezvous before it."""

from __future__ import annotations

import contextlib
import os
import datetime
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import torch.distributed as dist

from pycomm import _C, linux
from pycomm.errors import CollectiveError, PycommError, RendezvousTimeoutError

logger = logging.getLogger(__name__)

BACKEND_NAME = "pycomm"

# Makes a pooled group's CPU communicator: (store, group rank, group size,
# timeout) -> a c10d Backend. The default is a gloo communicator of its own.
CpuCommFactory = Callable[[dist.Store, int, int, datetime.timedelta], dist.Backend]


def gloo_comm(
    store: dist.Store, rank: int, size: int, timeout: datetime.timedelta
) -> dist.Backend:
    return dist.ProcessGroupGloo(store, rank, size, timeout)


def _gloo_devices() -> list[Any]:
    """The devices torch's own gloo groups get (ProcessGroupGloo's
    Options::create_default): one per interface GLOO_SOCKET_IFNAME names,
    else the default one; TORCH_GLOO_LAZY_INIT is read by torch either way."""
    interfaces = [i for i in os.environ.get("GLOO_SOCKET_IFNAME", "").split(",") if i]
    if interfaces:
        return [dist.ProcessGroupGloo.create_device(interface=i) for i in interfaces]
    return [dist.ProcessGroupGloo.create_default_device()]


def _named_gloo_comm(
    store: dist.Store,
    rank: int,
    size: int,
    timeout: datetime.timedelta,
    name: str,
    global_ranks: list[int],
) -> dist.Backend:
    """gloo_comm, made under `name` with the group's global ranks, which is
    how torch's flight recorder lists it (its pg_config) from the start."""
    options = dist.ProcessGroupGloo._Options()
    options._timeout = timeout
    options._devices = _gloo_devices()
    options.group_name = name
    options.global_ranks_in_group = global_ranks
    return dist.ProcessGroupGloo(store, rank, size, options)


@dataclass
class CreateRequest:
    """What pool.duplicate() hands the backend creator through new_group's
    pg_options: the communicators it connected beforehand (the creator runs
    while torch's group registry is locked, so it must not wait for peers)."""

    core: "_C.CommPool"
    spec: "_C.PooledGroupSpec"
    cpu_comm: dist.Backend
    # The NCCL lane, or None for CPU tensors only.
    device_lane: Any = None


def root_store() -> dist.Store:
    """The default group's store; pooled groups rendezvous under their own
    prefixes in it."""
    return dist.distributed_c10d._get_default_store()


class _StoreConnections:
    """Connections of pycomm's own to the default group's store, kept for
    reuse between creations.

    A TCPStore client serves one request at a time, and a blocking wait
    (gloo's, while it connects) holds it throughout: groups made at once
    from several threads, in different orders on different ranks, would
    each wait for a key the other thread could not send. So each creation
    has a connection to itself while it runs; afterwards no one waits on it
    (a communicator keeps it, but only reads the store while it connects),
    and the next creation takes it again. Reuse matters: connecting to a
    TCPStore now and then takes seconds (5 s stalls in about one connect of
    thirty, measured with torch 2.14 on one host, with torch's own clone()
    too), which a job creating and releasing groups would pay over and over.

    A clone connects with the timeout of the store it was cloned from
    (TCPStore::clone copies its options), the default store's timeout is the
    user's (often 30 minutes), and with the store's host gone a connect
    retries for all of it. So new connections are cloned from one of
    pycomm's own whose timeout is set first, on a helper thread that the
    caller stops waiting for at its deadline.

    Thread-safety: any thread.
    """

    # Idle connections kept; more are closed (a burst of creations from
    # many threads should not keep as many sockets open for good).
    _KEPT = 4

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards _root and _idle
        self._root: dist.Store | None = None
        self._idle: list[dist.Store] = []
        self._clone_lock = threading.Lock()  # guards the template
        self._template_root: dist.Store | None = None
        self._template: dist.Store | None = None

    def take(self, timeout_seconds: float, label: str) -> dist.Store:
        """A connection no other creation uses, made within the timeout, its
        waits bounded by it."""
        root = root_store()
        with self._lock:
            if self._root is not root:  # a new world: its store is another
                self._root, self._idle = root, []
            connection = self._idle.pop() if self._idle else None
        if connection is None:
            connection = self._connect(root, timeout_seconds, label)
        if connection is not root:  # the shared store's timeout is the user's
            connection.set_timeout(datetime.timedelta(seconds=timeout_seconds))
        return connection

    def give_back(self, connection: dist.Store) -> None:
        """Returns a connection whose creation succeeded (one that saw a
        failure is dropped: it may be the failure)."""
        with self._lock:
            if connection is not self._root and len(self._idle) < self._KEPT:
                self._idle.append(connection)

    def _connect(self, root: dist.Store, timeout_seconds: float, label: str) -> dist.Store:
        deadline = time.monotonic() + timeout_seconds

        def connect() -> dist.Store:
            # One clone at a time: each sets the shared template's timeout
            # first. Bounded, since a clone with the host gone waits long.
            if not self._clone_lock.acquire(timeout=max(deadline - time.monotonic(), 0.0)):
                raise TimeoutError("another creation is still connecting to the store")
            try:
                if self._template_root is not root:
                    self._template, self._template_root = root.clone(), root
                assert self._template is not None
                self._template.set_timeout(
                    datetime.timedelta(seconds=max(deadline - time.monotonic(), 0.001))
                )
                return self._template.clone()
            finally:
                self._clone_lock.release()

        unreachable = (
            f"{label}: could not connect to the default group's store within "
            f"{timeout_seconds:g} s (has its host, the rank that serves it, gone?)"
        )
        try:
            return call_within(connect, deadline)
        except TimeoutError as e:
            raise RendezvousTimeoutError(unreachable) from e
        except dist.DistError as e:
            raise RendezvousTimeoutError(f"{unreachable}: {e}") from e
        except (RuntimeError, NotImplementedError) as e:  # a store type that cannot clone
            logger.debug("the default store cannot be cloned (%s); sharing it", e)
            return root


_connections = _StoreConnections()


@contextlib.contextmanager
def own_store_connection(timeout_seconds: float, label: str) -> Iterator[dist.Store]:
    """A connection to the default group's store for one creation (see
    _StoreConnections), made within `timeout_seconds`; kept for the next
    creation if this one succeeds."""
    connection = _connections.take(timeout_seconds, label)
    yield connection
    _connections.give_back(connection)


_T = TypeVar("_T")
# The name of the threads that run connects: the kernel lists it too (ps,
# /proc/<pid>/task/*/comm), so a thread still ending is told from others.
_CONNECT_THREAD = "pycomm-connect"


def _name_os_thread(name: str) -> None:
    """Names the calling thread for the kernel (Python 3.12 names only its
    own Thread object, and the kernel keeps 15 bytes); best effort."""
    linux.prctl(linux.PR_SET_NAME, name.encode()[:15])


def call_within(fn: Callable[[], _T], deadline: float) -> _T:
    """fn's result, or TimeoutError at `deadline` (time.monotonic()) with fn
    left to end on its helper thread, for calls that take no timeout of
    their own."""
    result: list[_T] = []
    error: list[BaseException] = []

    def run() -> None:
        _name_os_thread(_CONNECT_THREAD)
        try:
            result.append(fn())
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            error.append(e)

    # Not a daemon: a daemon thread still inside torch's C++ (a connect
    # retrying with its back-off) when the interpreter finalizes is ended by
    # an abort ("terminate called without an active exception"); the
    # interpreter waits for this one instead, which the connect's own
    # timeout bounds.
    helper = threading.Thread(target=run, name=_CONNECT_THREAD, daemon=False)
    helper.start()
    helper.join(max(deadline - time.monotonic(), 0.0))
    if helper.is_alive():
        raise TimeoutError("the call did not return in time")
    if error:
        raise error[0]
    return result[0]


# Added to a rendezvous counter by a member that gave up waiting, so that a
# member arriving later sees, in the one atomic add it makes, that the
# rendezvous is over.
_GAVE_UP = 1 << 40
# A rendezvous polls its key: first soon (members usually arrive together),
# then backing off to a pace that costs the store nothing.
_FIRST_POLL_SECONDS = 0.001
_LONGEST_POLL_SECONDS = 0.05


def rendezvous(
    store: dist.Store,
    prefix: str,
    group_rank: int,
    global_ranks: list[int],
    timeout_seconds: float,
    label: str,
    deadline: float | None = None,
) -> None:
    """Waits until every member announced itself under `prefix`, until
    `deadline` (time.monotonic(); default: `timeout_seconds` from now); raises
    RendezvousTimeoutError naming the missing ranks instead of hanging, and
    the same error, saying so, on a member that arrives after the others
    gave up.

    Each member adds to one counter and waits on one key, which the last
    arrival sets: store traffic per rank does not grow with the group. The
    per-member keys are read only to name the missing ranks after a timeout.
    A rendezvous that succeeded leaves no key behind: the last member to
    leave deletes the shared ones, each its own.

    A store that fails meanwhile (its host gone) is a CollectiveError."""
    if deadline is None:
        deadline = time.monotonic() + timeout_seconds
    try:
        size = len(global_ranks)
        store.set(f"{prefix}/arrived/{group_rank}", "1")
        count = store.add(f"{prefix}/count", 1)
        if count >= _GAVE_UP:
            raise RendezvousTimeoutError(
                f"{label}: this rank (global rank {global_ranks[group_rank]}) called "
                f"duplicate() after the other members had waited {timeout_seconds:g} s "
                f"and given up; every member must duplicate the group within the timeout"
            )
        if count == size:
            store.set(f"{prefix}/all", "1")
        if _poll(store, f"{prefix}/all", deadline):
            _leave(store, prefix, group_rank, size)
            return
        # Giving up is one atomic add. If it is the first and every member had
        # arrived before it, the last one set (or is setting) the key: the
        # rendezvous succeeded after all. Otherwise every later arrival is shut
        # out by the same add.
        gave_up, arrived = divmod(store.add(f"{prefix}/count", _GAVE_UP), _GAVE_UP)
        # Every member came: the last one sets the key within a round trip.
        settling = time.monotonic() + timeout_seconds
        if gave_up == 1 and arrived >= size and _poll(store, f"{prefix}/all", settling):
            _leave(store, prefix, group_rank, size)
            return
        missing = [r for i, r in enumerate(global_ranks) if not store.check([f"{prefix}/arrived/{i}"])]
        who = (
            f"ranks {missing} did not call duplicate()"
            if missing
            else "the last member called duplicate() after the others had given up, not"
        )
        raise RendezvousTimeoutError(
            f"{label}: {who} within {timeout_seconds:g} s; every member of the group "
            f"must duplicate it with the same role"
        )
    except dist.DistError as e:
        raise CollectiveError(f"{label}: the store failed during the rendezvous: {e}") from e


def _leave(store: dist.Store, prefix: str, group_rank: int, size: int) -> None:
    """Deletes what a successful rendezvous wrote, so that a long job's
    creations and releases do not grow the store: each member its own key,
    the last to leave the shared ones (no member reads them any more)."""
    delete_keys(store, [f"{prefix}/arrived/{group_rank}"])
    if store.add(f"{prefix}/left", 1) == size:
        delete_keys(store, [f"{prefix}/{key}" for key in ("count", "all", "left")])


def delete_keys(store: dist.Store, keys: list[str]) -> None:
    """Deletes `keys` where the store can: a store written in Python (a test
    world's) may lack deleteKey, which torch's bindings then report as a
    call of a pure virtual function; its keys are left."""
    try:
        for key in keys:
            store.delete_key(key)
    except (RuntimeError, NotImplementedError) as e:
        if isinstance(e, dist.DistError):
            raise
        logger.debug("the store keeps %s: it cannot delete keys (%s)", keys, e)


def _poll(store: dist.Store, key: str, deadline: float) -> bool:
    """Whether `key` appears before `deadline`. A blocking store.wait() holds
    the process's one store connection for the whole wait, so another
    thread's rendezvous could not even announce itself meanwhile; checks
    hold it for one round trip each."""
    pause = _FIRST_POLL_SECONDS
    while not store.check([key]):
        if time.monotonic() >= deadline:
            return False
        time.sleep(pause)
        pause = min(pause * 2, _LONGEST_POLL_SECONDS)
    return True


def connect_cpu_comm(
    factory: CpuCommFactory,
    store: dist.Store,
    group_rank: int,
    group_size: int,
    timeout_seconds: float,
    label: str,
    name: str,
    global_ranks: list[int],
) -> dist.Backend:
    """The pooled group's own CPU communicator (a collective over its
    members), named `name` where torch's records (the flight recorder's)
    show it; a failure to connect is a named error. The addresses it
    published in the store are deleted once every member connected."""
    try:
        timeout = datetime.timedelta(seconds=timeout_seconds)
        if factory is gloo_comm:
            comm = _named_gloo_comm(store, group_rank, group_size, timeout, name, global_ranks)
        else:
            comm = factory(store, group_rank, group_size, timeout)
        _forget_published_address(comm, store, group_rank)
        return comm
    except PycommError:
        raise
    except (RuntimeError, dist.DistError) as e:
        kind = RendezvousTimeoutError if "timeout" in str(e).lower() else CollectiveError
        raise kind(f"{label}: connecting the group's CPU communicator failed: {e}") from e


# The key under which a gloo communicator's rank publishes its address: gloo
# names it "<context>/<rank>" (one context per device; ProcessGroupGloo makes
# one device unless told otherwise). tests/test_pool_identity.py counts the
# store's keys across creations, so a gloo that names it otherwise is seen.
def _gloo_address_key(group_rank: int) -> str:
    return f"0/{group_rank}"


def _forget_published_address(comm: dist.Backend, store: dist.Store, group_rank: int) -> None:
    """Deletes this member's address key once no peer can still need it, so
    that a long job's creations do not grow the store. A peer reads it
    while it connects; after a barrier on the new communicator every peer
    has connected. Communicators that published nothing (a fake one) cost
    one store check."""
    key = _gloo_address_key(group_rank)
    if not store.check([key]):
        return
    comm.barrier().wait()
    delete_keys(store, [key])


def _create_backend(
    opts: "dist.distributed_c10d._DistributedBackendOptions", request: CreateRequest
) -> "_C.PooledBackend":
    request.spec.name = str(opts.group_id)
    backend = _C.PooledBackend(request.spec, request.cpu_comm)
    try:
        if request.device_lane is not None:
            backend.attach_device_lane(request.device_lane)
        request.core.add(backend)
    except BaseException:
        backend.abort()  # the pool closed meanwhile: free what was made
        raise
    logger.debug("created pooled group %s as %s", request.spec.label(), request.spec.name)
    return backend


def ensure_backend_registered() -> None:
    """Registers the 'pycomm' backend with torch.distributed once per process."""
    if BACKEND_NAME.upper() in dist.Backend._plugins:
        return
    dist.Backend.register_backend(
        BACKEND_NAME, _create_backend, extended_api=True, devices=["cpu", "cuda"]
    )
