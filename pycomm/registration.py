"""The torch.distributed side of pooled groups: the 'pycomm' backend that
torch.distributed.new_group creates them with, and the rendezvous before it."""

from __future__ import annotations

import datetime
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch.distributed as dist

from pycomm import _C
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


def own_store_connection() -> dist.Store:
    """The default group's store over a connection of its own. A TCPStore
    client serves one request at a time, and a blocking wait (gloo's, while
    it connects) holds it throughout: groups made at once from several
    threads, in different orders on different ranks, would each wait for a
    key the other thread could not send."""
    store = root_store()
    try:
        return store.clone()
    except (RuntimeError, NotImplementedError) as e:  # a store type that cannot
        logger.debug("the default store cannot be cloned (%s); sharing it", e)
        return store


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
) -> None:
    """Waits until every member announced itself under `prefix`; raises
    RendezvousTimeoutError naming the missing ranks instead of hanging, and
    the same error, saying so, on a member that arrives after the others
    gave up.

    Each member adds to one counter and waits on one key, which the last
    arrival sets: store traffic per rank does not grow with the group. The
    per-member keys are read only to name the missing ranks after a timeout."""
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
    if _poll(store, f"{prefix}/all", timeout_seconds):
        return
    # Giving up is one atomic add. If it is the first and every member had
    # arrived before it, the last one set (or is setting) the key: the
    # rendezvous succeeded after all. Otherwise every later arrival is shut
    # out by the same add.
    gave_up, arrived = divmod(store.add(f"{prefix}/count", _GAVE_UP), _GAVE_UP)
    if gave_up == 1 and arrived >= size and _poll(store, f"{prefix}/all", timeout_seconds):
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


def _poll(store: dist.Store, key: str, timeout_seconds: float) -> bool:
    """Whether `key` appears within the timeout. A blocking store.wait() holds
    the process's one store connection for the whole wait, so another
    thread's rendezvous could not even announce itself meanwhile; checks
    hold it for one round trip each."""
    deadline = time.monotonic() + timeout_seconds
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
) -> dist.Backend:
    """The pooled group's own CPU communicator (a collective over its
    members); a failure to connect is a named error."""
    try:
        return factory(store, group_rank, group_size, datetime.timedelta(seconds=timeout_seconds))
    except PycommError:
        raise
    except (RuntimeError, dist.DistError) as e:
        kind = RendezvousTimeoutError if "timeout" in str(e).lower() else CollectiveError
        raise kind(f"{label}: connecting the group's CPU communicator failed: {e}") from e


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
