"""The torch.distributed side of pooled groups: the 'pycomm' backend that
torch.distributed.new_group creates them with, and the rendezvous before it."""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch.distributed as dist

from pycomm import _C
from pycomm.errors import RendezvousTimeoutError

if TYPE_CHECKING:
    from pycomm.config import RoleConfig

logger = logging.getLogger(__name__)

BACKEND_NAME = "pycomm"


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
    RendezvousTimeoutError naming the missing ranks instead of hanging."""
    store.set(f"{prefix}/arrived/{group_rank}", "1")
    keys = [f"{prefix}/arrived/{i}" for i in range(len(global_ranks))]
    try:
        store.wait(keys, datetime.timedelta(seconds=timeout_seconds))
    except (RuntimeError, dist.DistError) as e:
        missing = [r for i, r in enumerate(global_ranks) if not store.check([keys[i]])]
        raise RendezvousTimeoutError(
            f"{label}: ranks {missing} did not call duplicate() within "
            f"{timeout_seconds:g} s; every member of the group must duplicate it "
            f"with the same role"
        ) from e


def _create_backend(
    opts: "dist.distributed_c10d._DistributedBackendOptions", request: CreateRequest
) -> "_C.PooledBackend":
    timeout = datetime.timedelta(seconds=request.config.timeout_seconds)
    gloo_store = dist.PrefixStore(f"{request.store_prefix}/gloo/", root_store())
    gloo = dist.ProcessGroupGloo(gloo_store, opts.group_rank, opts.group_size, timeout)
    spec = _C.PooledGroupSpec()
    spec.name = str(opts.group_id)
    spec.base_group_name = request.base_group_name
    spec.role = request.role
    spec.global_ranks = list(opts.global_ranks_in_group)
    spec.rank = opts.group_rank
    spec.timeout_seconds = request.config.timeout_seconds
    spec.check_order = request.check_order
    backend = _C.PooledBackend(spec, gloo)
    request.core.add(backend)
    logger.debug("created pooled group %s as %s", spec.label(), spec.name)
    return backend


def ensure_backend_registered() -> None:
    """Registers the 'pycomm' backend with torch.distributed once per process."""
    if BACKEND_NAME.upper() in dist.Backend._plugins:
        return
    dist.Backend.register_backend(
        BACKEND_NAME, _create_backend, extended_api=True, devices=["cpu", "cuda"]
    )
