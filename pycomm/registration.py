"""The torch.distributed side of pooled groups: the 'pycomm' backend that
torch.distributed.new_group creates them with, and the rendezvous before it."""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch.distributed as dist

from pycomm import _C
from pycomm.errors import RendezvousTimeoutError

if TYPE_CHECKING:
    from pycomm.config import RoleConfig

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
    pg_options: everything the creator cannot learn from torch."""

    core: "_C.CommPool"
    base_group_name: str
    role: str
    config: "RoleConfig"
    store_prefix: str
    check_order: bool
    cpu_comm_factory: CpuCommFactory = gloo_comm
    # The CUDA device of the NCCL lane; None: CPU tensors only.
    device: int | None = None


def root_store() -> dist.Store:
    """The default group's store; pooled groups rendezvous under their own
    prefixes in it."""
    return dist.distributed_c10d._get_default_store()


def rendezvous(
    store: dist.Store,
    prefix: str,
    group_rank: int,
    global_ranks: list[int],
    timeout_seconds: float,
    label: str,
) -> None:
    """Waits until every member announced itself under `prefix`; raises
    RendezvousTimeoutError naming the missing ranks instead of hanging.

    Each member adds to one counter and waits on one key, which the last
    arrival sets: store traffic per rank does not grow with the group. The
    per-member keys are read only to name the missing ranks after a timeout."""
    store.set(f"{prefix}/arrived/{group_rank}", "1")
    if store.add(f"{prefix}/count", 1) == len(global_ranks):
        store.set(f"{prefix}/all", "1")
    try:
        store.wait([f"{prefix}/all"], datetime.timedelta(seconds=timeout_seconds))
    except (RuntimeError, dist.DistError) as e:
        missing = [
            r for i, r in enumerate(global_ranks) if not store.check([f"{prefix}/arrived/{i}"])
        ]
        raise RendezvousTimeoutError(
            f"{label}: ranks {missing} did not call duplicate() within "
            f"{timeout_seconds:g} s; every member of the group must duplicate it "
            f"with the same role"
        ) from e


def _create_backend(
    opts: "dist.distributed_c10d._DistributedBackendOptions", request: CreateRequest
) -> "_C.PooledBackend":
    timeout = datetime.timedelta(seconds=request.config.timeout_seconds)
    comm_store = dist.PrefixStore(f"{request.store_prefix}/cpu/", root_store())
    cpu_comm = request.cpu_comm_factory(comm_store, opts.group_rank, opts.group_size, timeout)
    spec = _C.PooledGroupSpec()
    spec.name = str(opts.group_id)
    spec.base_group_name = request.base_group_name
    spec.role = request.role
    spec.global_ranks = list(opts.global_ranks_in_group)
    spec.rank = opts.group_rank
    spec.timeout_seconds = request.config.timeout_seconds
    spec.check_order = request.check_order
    backend = _C.PooledBackend(spec, cpu_comm)
    if request.device is not None:
        from pycomm import nccl  # the CUDA build only

        try:
            lane = nccl.create_lane(
                device=request.device,
                parent=nccl.split_parent(
                    request.core, request.base_group_name, request.role, request.device
                ),
                role=request.role,
                config=request.config,
                group_rank=opts.group_rank,
                group_size=opts.group_size,
                store=dist.PrefixStore(f"{request.store_prefix}/nccl/", root_store()),
                label=spec.label(),
                comm_name=f"pycomm_{request.role}_of_{request.base_group_name}",
            )
            try:
                backend.attach_device_lane(lane)
            except BaseException:
                lane.abort()
                raise
        except BaseException:
            backend.abort()  # frees the gloo communicator made above
            raise
    try:
        request.core.add(backend)
    except BaseException:
        backend.abort()  # the pool closed meanwhile: free what was made
        raise
    logger.debug("created pooled group %s as %s", spec.label(), spec.name)
    return backend


def ensure_backend_registered() -> None:
    """Registers the 'pycomm' backend with torch.distributed once per process."""
    if BACKEND_NAME.upper() in dist.Backend._plugins:
        return
    dist.Backend.register_backend(
        BACKEND_NAME, _create_backend, extended_api=True, devices=["cpu", "cuda"]
    )
