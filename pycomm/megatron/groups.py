"""All-gather groups for Megatron-Core trainers: ``dp_cp_ag`` and
``expt_dp_ag``, pooled duplicates with exactly the ranks of the groups
Megatron-FSDP shards over, on communicators and lanes of their own, so
parameter all-gathers overlap gradient reduce-scatters.

Both distributed-init paths are covered:

* ``parallel_state`` (``initialize_model_parallel``):
  :func:`create_all_gather_groups` (drop-in for megatron-core's),
  :func:`pg_collection_with_ag`.
* ``HyperCommGrid``: :func:`grid_all_gather_groups`.
* Any ``ProcessGroupCollection``: :func:`attach_all_gather_groups` (the
  config-driven form is :mod:`pycomm.megatron.config`, Megatron-Bridge's
  :mod:`pycomm.megatron.bridge`).

Every function duplicates the process group the trainer already has on this
rank, so the ranks are right by construction for any order, rank offset,
context / expert / pipeline parallelism, partial data parallelism and gtp
remat, and each rank creates only the (one or two) groups it belongs to.

Every rank of a group must make the same calls in the same sequence: the
duplicates are created collectively by their members.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.distributed as dist

from pycomm.config import RoleConfig
from pycomm.errors import NotInitializedError
from pycomm.megatron.tuning import GroupConfigs, Timeout, resolve_role_configs
from pycomm.pool import CommPool

if TYPE_CHECKING:
    from megatron.core.hyper_comm_grid import HyperCommGrid
    from megatron.core.process_groups_config import ProcessGroupCollection

__all__ = [
    "attach_all_gather_groups",
    "create_all_gather_groups",
    "default_grid_dims",
    "default_pool",
    "destroy_all_gather_groups",
    "grid_all_gather_groups",
    "pg_collection_with_ag",
]

logger = logging.getLogger(__name__)

AG_ROLE = "ag"

_default_pool: CommPool | None = None
_default_pool_lock = threading.Lock()


def default_pool() -> CommPool:
    """The process-wide pool the functions of this module use when given no
    pool; made on first use, and again after destroy_all_gather_groups()."""
    global _default_pool
    with _default_pool_lock:
        if _default_pool is None or not _default_pool.is_open:
            if _default_pool is not None:
                _default_pool.destroy()  # gives its name back
            # Named: ranks may reach their first use at different points
            # relative to the pools they make themselves.
            _default_pool = CommPool(name="megatron")
        return _default_pool


def destroy_all_gather_groups() -> None:
    """Releases every group the default pool made (communicators, lanes,
    connections). Call on every rank before destroy_process_group().
    Idempotent; a pool passed explicitly is the caller's to destroy."""
    global _default_pool
    with _default_pool_lock:
        pool, _default_pool = _default_pool, None
    if pool is not None:
        pool.destroy()


def is_member(group: dist.ProcessGroup | None) -> bool:
    """Whether this rank belongs to `group` (None and torch's non-member
    placeholder do not count)."""
    return group is not None and group is not dist.GroupMember.NON_GROUP_MEMBER


def _duplicate(
    pool: CommPool, base: dist.ProcessGroup | None, config: RoleConfig, what: str
) -> dist.ProcessGroup | None:
    if not is_member(base):
        logger.debug("rank %d is in no %s group; no all-gather group made", dist.get_rank(), what)
        return None
    # The duplicate inherits the base group's timeout (Megatron's
    # distributed_timeout_minutes) unless the config names one: pool.duplicate.
    group = pool.duplicate(base, AG_ROLE, config)
    logger.info(
        "%s all-gather group on ranks %s", what, dist.get_process_group_ranks(group)
    )
    return group


def _parallel_state() -> Any:
    if not dist.is_initialized():
        raise NotInitializedError(
            "torch.distributed is not initialized; call init_process_group() and "
            "megatron.core.parallel_state.initialize_model_parallel() first"
        )
    from megatron.core import parallel_state

    if not parallel_state.is_initialized():
        raise NotInitializedError(
            f"megatron-core parallel state is not initialized on rank {dist.get_rank()}: "
            "call parallel_state.initialize_model_parallel() first (with a rank_offset / "
            "local_world_size layout, only the ranks it covers have parallel state)"
        )
    return parallel_state


def create_all_gather_groups(
    for_expert_parallelism: bool = False,
    timeout: Timeout = None,
    nccl_comm_cfgs: GroupConfigs | str | None = None,
    *,
    pool: CommPool | None = None,
) -> tuple[dist.ProcessGroup | None, dist.ProcessGroup | None]:
    """Drop-in for megatron-core's ``parallel_state.create_all_gather_groups``
    after ``initialize_model_parallel``: returns ``(dp_cp_ag, expt_dp_ag)``.

    ``dp_cp_ag`` has the ranks of ``ProcessGroupCollection.intra_dp_cp``:
    the dp-cp group (gtp_remat peers excluded), or the slice of it owned by
    this rank's distributed-optimizer instance when
    ``num_distributed_optimizer_instances > 1`` (the group Megatron-FSDP
    shards over). ``expt_dp_ag`` has the ranks of ``intra_expt_dp`` and is
    None unless `for_expert_parallelism` and ep > 1, as in megatron-core.

    `timeout` (timedelta or seconds) and `nccl_comm_cfgs` (Megatron's dict of
    group key -> settings, or RoleConfig values, or its YAML path) set each
    group's RoleConfig; see :func:`resolve_role_configs`. Calling again
    returns the same groups.

    Raises NotInitializedError before ``initialize_model_parallel``,
    ConfigError for unknown config keys or bad settings.
    """
    parallel_state = _parallel_state()
    configs = resolve_role_configs(timeout, nccl_comm_cfgs)
    pool = pool if pool is not None else default_pool()
    dp_cp_base = parallel_state.get_data_parallel_group(
        with_context_parallel=True, with_gtp_remat=False, partial_data_parallel=True
    )
    dp_cp_ag = _duplicate(pool, dp_cp_base, configs["dp_cp_ag"], "dp-cp")
    expt_dp_ag = None
    if for_expert_parallelism and parallel_state.get_expert_model_parallel_world_size() > 1:
        expt_base = parallel_state.get_expert_data_parallel_group(
            with_gtp_remat=False, partial_expert_data_parallel=True
        )
        expt_dp_ag = _duplicate(pool, expt_base, configs["expt_dp_ag"], "expert-dp")
    return dp_cp_ag, expt_dp_ag


def attach_all_gather_groups(
    pg_collection: "ProcessGroupCollection",
    for_expert_parallelism: bool | None = None,
    timeout: Timeout = None,
    nccl_comm_cfgs: GroupConfigs | str | None = None,
    *,
    pool: CommPool | None = None,
) -> "ProcessGroupCollection":
    """Sets ``pg_collection.dp_cp_ag`` (and ``expt_dp_ag``) to duplicates of
    the groups the collection itself holds, whichever path built it:
    ``intra_dp_cp`` (else ``dp_cp``) and ``intra_expt_dp`` (else
    ``expt_dp``), the groups Megatron-FSDP's adapter shards over.
    ``expt_dp_ag`` is made when `for_expert_parallelism` is True, or when it
    is None and the collection's ``ep`` group has more than one rank.
    Returns the same collection."""
    if not dist.is_initialized():
        raise NotInitializedError("torch.distributed is not initialized")
    configs = resolve_role_configs(timeout, nccl_comm_cfgs)
    pool = pool if pool is not None else default_pool()
    dp_cp_base = _first_set(pg_collection, ("intra_dp_cp", "dp_cp"))
    if dp_cp_base is None:
        raise NotInitializedError(
            "the ProcessGroupCollection has neither intra_dp_cp nor dp_cp; build its "
            "data-parallel groups first"
        )
    pg_collection.dp_cp_ag = _duplicate(pool, dp_cp_base, configs["dp_cp_ag"], "dp-cp")
    if for_expert_parallelism is None:
        ep = getattr(pg_collection, "ep", None)
        for_expert_parallelism = is_member(ep) and ep.size() > 1
    if for_expert_parallelism:
        expt_base = _first_set(pg_collection, ("intra_expt_dp", "expt_dp"))
        if expt_base is None:
            raise NotInitializedError(
                "expert all-gather group requested but the ProcessGroupCollection has "
                "neither intra_expt_dp nor expt_dp"
            )
        pg_collection.expt_dp_ag = _duplicate(
            pool, expt_base, configs["expt_dp_ag"], "expert-dp"
        )
    return pg_collection


def _first_set(pg_collection: Any, names: Sequence[str]) -> dist.ProcessGroup | None:
    for name in names:
        group = getattr(pg_collection, name, None)
        if group is not None:
            return group
    return None


def pg_collection_with_ag(
    for_expert_parallelism: bool | None = None,
    timeout: Timeout = None,
    nccl_comm_cfgs: GroupConfigs | str | None = None,
    *,
    pool: CommPool | None = None,
) -> "ProcessGroupCollection":
    """``ProcessGroupCollection.use_mpu_process_groups()`` with ``dp_cp_ag``
    set, and ``expt_dp_ag`` set when ep > 1 (or as `for_expert_parallelism`
    says). Arguments as :func:`create_all_gather_groups`."""
    parallel_state = _parallel_state()
    from megatron.core.process_groups_config import ProcessGroupCollection

    if for_expert_parallelism is None:
        for_expert_parallelism = parallel_state.get_expert_model_parallel_world_size() > 1
    dp_cp_ag, expt_dp_ag = create_all_gather_groups(
        for_expert_parallelism, timeout, nccl_comm_cfgs, pool=pool
    )
    pg_collection = ProcessGroupCollection.use_mpu_process_groups()
    pg_collection.dp_cp_ag = dp_cp_ag
    pg_collection.expt_dp_ag = expt_dp_ag
    return pg_collection


def default_grid_dims(grid: "HyperCommGrid", expert: bool) -> list[str]:
    """The dims whose groups Megatron-FSDP shards over: 'cp' and 'dp' on a
    dense grid, 'dp' on an expert grid; a grid split for distributed-optimizer
    instances (Megatron-Bridge's 'inner_dp' / 'outer_dp') shards over
    'inner_dp' instead of 'dp'."""
    names = list(grid.dim_names)
    dp = "inner_dp" if "inner_dp" in names else "dp"
    wanted = [dp] if expert else ["cp", dp]
    dims = [d for d in wanted if d in names]
    if dp not in dims:
        raise NotInitializedError(
            f"grid with dims {names} has no 'dp' or 'inner_dp' dimension; pass the "
            "data-parallel dims explicitly"
        )
    return dims


def _grid_base_group(grid: "HyperCommGrid", dims: list[str]) -> dist.ProcessGroup | None:
    if not grid.is_current_rank_in_grid():
        return None
    try:
        return grid.get_pg(dims)
    except KeyError:
        # Creating it here would take the trainer's create_pg() call (and its
        # pg_options) away: HyperCommGrid refuses a second group per dims.
        raise NotInitializedError(
            f"the grid has no process group over {dims} yet: create it with "
            f"grid.create_pg({dims!r}, ...) first; its all-gather group duplicates it"
        ) from None


def grid_all_gather_groups(
    grid: "HyperCommGrid",
    expert_grid: "HyperCommGrid | None" = None,
    *,
    pool: CommPool | None = None,
    dp_cp_dims: Sequence[str] | None = None,
    expert_dp_dims: Sequence[str] | None = None,
    timeout: Timeout = None,
    nccl_comm_cfgs: GroupConfigs | str | None = None,
) -> tuple[dist.ProcessGroup | None, dist.ProcessGroup | None]:
    """``(dp_cp_ag, expt_dp_ag)`` for trainers that build their groups with
    ``HyperCommGrid``: duplicates of ``grid.get_pg(dp_cp_dims)`` and
    ``expert_grid.get_pg(expert_dp_dims)`` (default dims: see
    :func:`default_grid_dims`), through Megatron's public grid API only.

    The trainer creates those base groups (``create_pg``) first, with its own
    options; a missing one raises NotInitializedError. A rank outside a grid
    gets None for it; `expt_dp_ag` is None without `expert_grid`.
    """
    if not dist.is_initialized():
        raise NotInitializedError("torch.distributed is not initialized")
    configs = resolve_role_configs(timeout, nccl_comm_cfgs)
    pool = pool if pool is not None else default_pool()
    dims = list(dp_cp_dims) if dp_cp_dims is not None else default_grid_dims(grid, expert=False)
    dp_cp_ag = _duplicate(pool, _grid_base_group(grid, dims), configs["dp_cp_ag"], "dp-cp")
    expt_dp_ag = None
    if expert_grid is not None:
        expert_dims = (
            list(expert_dp_dims)
            if expert_dp_dims is not None
            else default_grid_dims(expert_grid, expert=True)
        )
        expt_dp_ag = _duplicate(
            pool, _grid_base_group(expert_grid, expert_dims), configs["expt_dp_ag"], "expert-dp"
        )
    return dp_cp_ag, expt_dp_ag
