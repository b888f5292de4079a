"""FSDP trainers on pooled groups: parameter all-gathers on the pool's 'ag'
duplicate of the shard group, gradient reduce-scatters on its 'rs' duplicate,
so the two run on communicators and lanes of their own.

* PyTorch FSDP2: :func:`use_pool` installs custom comms through
  ``FSDPModule.set_custom_all_gather`` / ``set_custom_reduce_scatter``.
* Megatron-FSDP: :func:`megatron_fsdp_kwargs` turns a ProcessGroupCollection
  from :mod:`pycomm.megatron` into ``fully_shard``'s ``fsdp_group_ag`` /
  ``expt_fsdp_group_ag`` arguments.

See docs/fsdp.md.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from pycomm.errors import (
    LayoutError,
    NotAMemberError,
    NotInitializedError,
    UnsupportedOpError,
)
from pycomm.pool import CommPool

if TYPE_CHECKING:
    from megatron.core.process_groups_config import ProcessGroupCollection

try:  # the comm interfaces FSDP2 documents; private module, so optional
    from torch.distributed.fsdp._fully_shard._fsdp_api import (
        AllGather as _AllGatherBase,
        ReduceScatter as _ReduceScatterBase,
    )
except ImportError:  # pragma: no cover - torch without custom FSDP2 comms
    _AllGatherBase = object  # type: ignore[assignment,misc]
    _ReduceScatterBase = object  # type: ignore[assignment,misc]

__all__ = ["megatron_fsdp_kwargs", "use_pool"]

logger = logging.getLogger(__name__)

AG_ROLE = "ag"
RS_ROLE = "rs"

# Megatron-FSDP ships inside megatron-core and as the standalone
# `megatron-fsdp` package; the copy inside megatron-core is the one its
# adapter (and so a ProcessGroupCollection) goes with.
_MEGATRON_FSDP_MODULES = (
    "megatron.core.distributed.fsdp.src.megatron_fsdp",
    "megatron_fsdp",
)


# ---------------------------------------------------------------- FSDP2

def _ranks(group: dist.ProcessGroup) -> tuple[int, ...]:
    """Global ranks in group-rank order (the order all-gather output uses)."""
    return tuple(dist.get_process_group_ranks(group))


def _name(group: dist.ProcessGroup) -> str:
    return dist.distributed_c10d._get_process_group_name(group)


class _GroupRoute:
    """FSDP group -> pooled duplicate, for one role.

    Groups are matched by their ordered ranks: every fully_shard call with
    its own mesh, every reshard_after_forward=<int> post-forward mesh and
    set_separate_reduce_scatter_group make new groups over the same ranks,
    and a collective gives the same result on any of them, so one duplicate
    per rank set and role serves them all (as FSDP2 shares its separate
    reduce-scatter group)."""

    def __init__(self, pool: CommPool, role: str) -> None:
        self._pool = pool
        self.role = role
        self._by_name: dict[str, dist.ProcessGroup] = {}
        self._by_ranks: dict[tuple[int, ...], dist.ProcessGroup] = {}

    def add(self, fsdp_group: dist.ProcessGroup, base: dist.ProcessGroup) -> None:
        """Routes `fsdp_group` to the duplicate of its rank set, duplicating
        `base` (a group with those ranks) for the first one seen."""
        ranks = _ranks(fsdp_group)
        pooled = self._by_ranks.get(ranks)
        if pooled is None:
            pooled = _duplicate(self._pool, base, self.role)
            self._by_ranks[ranks] = pooled
        self._by_name[_name(fsdp_group)] = pooled

    def __call__(self, group: dist.ProcessGroup) -> dist.ProcessGroup:
        # By name first: reading a group's ranks costs more than a dict hit.
        pooled = self._by_name.get(_name(group))
        if pooled is None:
            ranks = _ranks(group)
            pooled = self._by_ranks.get(ranks)
            if pooled is None:
                raise NotInitializedError(
                    f"FSDP issued a {self.role!r} collective on group {_name(group)!r} "
                    f"(ranks {list(ranks)}), which use_pool() made no pooled duplicate "
                    "for; call use_pool() again after changing meshes or "
                    "reshard_after_forward"
                )
            self._by_name[_name(group)] = pooled
        return pooled

    def pooled_groups(self) -> list[dist.ProcessGroup]:
        """The duplicates this route leads to, one per rank set."""
        return list(self._by_ranks.values())


def _tensor_allocator(group: dist.ProcessGroup, device: torch.device) -> Any:
    """The backend of `group` that allocates tensors on `device` (its NCCL
    lane's ncclMemAlloc memory), or None."""
    try:
        backend = group._get_backend(device)
    except RuntimeError:
        return None
    return backend if backend.supports_tensor_alloc(device) else None


class _RoutedComm:
    """What both custom comms share: the route to the pooled duplicate, and
    FSDP's buffers, allocated as plain tensors or, once FSDP2 is told to
    allocate them from the process group, from the pooled group's NCCL
    memory (ProcessGroupNCCL's allocate_tensor)."""

    def __init__(self, route: _GroupRoute) -> None:
        self._route = route
        # The backend FSDP's buffers come from, once FSDP2 is told to
        # allocate them from the process group; None: plain tensors.
        self._group_allocator: Any = None

    def allocate(
        self,
        size: Sequence[int | torch.SymInt],
        *,
        dtype: torch.dtype,
        device: torch.device,
    ) -> torch.Tensor:
        if self._group_allocator is None:
            return torch.empty(size, dtype=dtype, device=device)
        shape = [int(s) for s in size]
        return self._group_allocator.allocate_tensor(math.prod(shape), dtype=dtype, device=device).view(shape)

    def group_allocator(self, device: torch.device) -> Any:
        """The backend whose NCCL memory on `device` FSDP's buffers can come
        from; UnsupportedOpError unless every duplicate of the route has it.
        ncclMemAlloc memory belongs to the device, not to a communicator, so
        the first duplicate's backend serves them all."""
        allocators = [_tensor_allocator(pooled, device) for pooled in self._route.pooled_groups()]
        if not allocators or any(a is None for a in allocators):
            raise UnsupportedOpError(_no_group_memory(self._route, device))
        return allocators[0]

    def allocate_from(self, allocator: Any) -> None:
        """Buffers from `allocator`'s allocate_tensor (None: plain tensors)."""
        self._group_allocator = allocator


def _no_group_memory(route: _GroupRoute, device: torch.device) -> str:
    return (
        "FSDP2's set_allocate_memory_from_process_group_for_comm(True) allocates its "
        f"buffers in the process group's NCCL memory (ncclMemAlloc), and the pooled "
        f"{route.role!r} duplicates have none on {device}: pooled groups have it only "
        "with an NCCL lane on that device (CPU tensors run on gloo), from NCCL 2.19"
    )


# torch 2.14 names the single-tensor collectives *_single; 2.11 has only the
# older names, which take the same arguments.
_all_gather_single = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


class _PooledAllGather(_RoutedComm, _AllGatherBase):  # type: ignore[misc]
    """FSDP2 custom all-gather: the same collective on the 'ag' duplicate."""

    def __call__(
        self,
        output_tensor: torch.Tensor,
        input_tensor: torch.Tensor,
        group: dist.ProcessGroup,
        async_op: bool = False,
    ) -> dist.Work | None:
        return _all_gather_single(
            output_tensor, input_tensor, group=self._route(group), async_op=async_op
        )


class _PooledReduceScatter(_RoutedComm, _ReduceScatterBase):  # type: ignore[misc]
    """FSDP2 custom reduce-scatter: the same collective on the 'rs' duplicate."""

    def __call__(
        self,
        output_tensor: torch.Tensor,
        input_tensor: torch.Tensor,
        group: dist.ProcessGroup,
        op: Any,
        async_op: bool = False,
    ) -> dist.Work | None:
        pooled = self._route(group)
        return _reduce_scatter_single(
            output_tensor, input_tensor, op=op, group=pooled, async_op=async_op
        )


def _fsdp_modules(module: nn.Module) -> list[tuple[str, Any]]:
    from torch.distributed.fsdp import FSDPModule

    if not hasattr(FSDPModule, "set_custom_all_gather") or not hasattr(
        FSDPModule, "set_custom_reduce_scatter"
    ):
        raise UnsupportedOpError(
            f"torch {torch.__version__}'s FSDP2 has no set_custom_all_gather / "
            "set_custom_reduce_scatter (torch >= 2.13 has them)"
        )
    return [(name, m) for name, m in module.named_modules() if isinstance(m, FSDPModule)]


def _param_groups(name: str, fsdp_module: Any) -> list[Any]:
    # FSDP2 exposes a module's shard group only through its state; custom
    # comms are also set per state, so this is the unit use_pool works in.
    try:
        state = fsdp_module._get_fsdp_state()
        if hasattr(state, "_fsdp_param_groups"):  # torch >= 2.12: a list per state
            return list(state._fsdp_param_groups)
        group = state._fsdp_param_group  # torch 2.11: one group or None
        return [] if group is None else [group]
    except AttributeError as e:  # pragma: no cover - torch internals moved
        raise UnsupportedOpError(
            f"cannot read the FSDP2 parameter groups of module {name or '<root>'!r} "
            f"in torch {torch.__version__}: {e}"
        ) from e


def _sharded_group(mesh_info: Any) -> dist.ProcessGroup | None:
    """The shard group FSDP all-gathers / reduce-scatters over, or None where
    it issues neither (replicate-only mesh, or a one-rank shard group)."""
    group = getattr(mesh_info, "shard_process_group", None)
    if group is None or group.size() < 2:
        return None
    return group


def _allocates_from_group(param_group: Any) -> bool:
    """Whether FSDP2 was told to allocate this group's buffers from its
    process group (its all-gather comm is then torch's ProcessGroupAlloc one)."""
    comm = getattr(param_group, "_all_gather_comm", None)
    return type(comm).__name__ == "ProcessGroupAllocAllGather"


def _group_allocation_setter(
    comms: tuple[_RoutedComm, ...], device: torch.device
) -> Callable[[bool], None]:
    """Stands for FSDPModule.set_allocate_memory_from_process_group_for_comm
    on a module routed through the pool (FSDP2's own would fail with an
    AssertionError on custom comms): the pooled comms allocate from the
    pooled groups' NCCL memory, or the call fails by name."""

    def set_allocate_memory_from_process_group_for_comm(enable: bool) -> None:
        # Every comm's allocator first: a refusal leaves the module as it was.
        allocators = [comm.group_allocator(device) if enable else None for comm in comms]
        for comm, allocator in zip(comms, allocators):
            comm.allocate_from(allocator)

    return set_allocate_memory_from_process_group_for_comm


def _label(name: str) -> str:
    return repr(name) if name else "<root>"


def use_pool(
    module: nn.Module,
    pool: CommPool,
    group: dist.ProcessGroup | None = None,
) -> list[str]:
    """Routes every FSDP2 module in `module` (itself included) through
    `pool`: parameter all-gathers go to ``pool.duplicate(shard_group, "ag")``
    and gradient reduce-scatters to ``pool.duplicate(shard_group, "rs")``,
    installed with ``set_custom_all_gather`` / ``set_custom_reduce_scatter``.
    Results are those of FSDP's own collectives (same transport, same ops).

    Call it after ``fully_shard`` and before training, on every rank, in the
    same order (the duplicates are created collectively by each group's
    members). All groups over the same ranks share one duplicate per role;
    the post-forward group of ``reshard_after_forward=<int>`` (fewer ranks)
    gets an 'ag' duplicate of its own.

    `group`: a base group to duplicate instead of each module's shard group,
    so the trainer's other users of that group (e.g. Megatron's dp-cp group)
    share the same two communicators. It must have exactly the ranks, in the
    same order, of every routed shard group (else LayoutError).

    Returns the qualified names of the modules routed ('' is `module`).

    Raises NotInitializedError when `module` holds no FSDP2 module,
    NotAMemberError when this rank is not in `group`,
    UnsupportedOpError for a module with several parameter groups (per-
    parameter meshes via shard_placement_fn), which FSDP2 refuses custom
    comms for; nothing is created or changed then.
    """
    modules = _fsdp_modules(module)
    if not modules:
        raise NotInitializedError(
            f"{type(module).__name__} contains no FSDP2 module; call "
            "torch.distributed.fsdp.fully_shard() on it (and its blocks) first"
        )
    # Check everything before creating anything, so a refusal leaves no
    # half-routed model and no stray groups behind.
    plan: list[tuple[str, Any, Any]] = []
    refused: list[str] = []
    for name, fsdp_module in modules:
        param_groups = _param_groups(name, fsdp_module)
        if len(param_groups) > 1:
            refused.append(f"{_label(name)} ({len(param_groups)} parameter groups)")
        elif param_groups:
            plan.append((name, fsdp_module, param_groups[0]))
    if refused:
        raise UnsupportedOpError(
            "FSDP2 takes no custom all-gather / reduce-scatter for a module whose "
            "parameters live on several meshes (shard_placement_fn returning "
            f"ShardPlacementResult with another mesh): {', '.join(refused)}. "
            "Give those parameters a fully_shard() call of their own, one mesh each."
        )
    allocating = [_label(name) for name, _, param_group in plan if _allocates_from_group(param_group)]
    if allocating:
        raise UnsupportedOpError(
            "FSDP2's set_allocate_memory_from_process_group_for_comm(True) gives a module "
            "torch's own comms, which use_pool() would replace. It is on for "
            f"{', '.join(allocating)}: call set_allocate_memory_from_process_group_for_comm(False) "
            "on them before use_pool(), and (True) after it: the pooled comms then allocate "
            "from the pooled groups' NCCL memory."
        )
    if group is not None and not _is_member(group):
        raise NotAMemberError(
            f"rank {dist.get_rank()} is not a member of the group passed to use_pool()"
        )
    base_ranks = _ranks(group) if group is not None else None
    for name, _, param_group in plan:
        shard_group = _sharded_group(param_group.mesh_info)
        if base_ranks is not None and shard_group is not None:
            if _ranks(shard_group) != base_ranks:
                raise LayoutError(
                    f"group has ranks {list(base_ranks)} but module {_label(name)} "
                    f"shards over ranks {list(_ranks(shard_group))}; the group passed to "
                    "use_pool() must have the shard group's ranks, in the same order"
                )

    ag_route, rs_route = _GroupRoute(pool, AG_ROLE), _GroupRoute(pool, RS_ROLE)
    routed: list[str] = []
    for name, fsdp_module, param_group in plan:
        mesh_info = param_group.mesh_info
        shard_group = _sharded_group(mesh_info)
        if shard_group is None:
            logger.debug("module %s issues no all-gather / reduce-scatter", _label(name))
            continue
        base = group if group is not None else shard_group
        ag_route.add(shard_group, base)
        rs_route.add(shard_group, base)
        separate_rs = getattr(mesh_info, "reduce_scatter_process_group", None)
        if separate_rs is not None:
            rs_route.add(separate_rs, base)
        post_forward = getattr(param_group, "post_forward_mesh_info", None)
        post_group = _sharded_group(post_forward) if post_forward is not None else None
        if post_group is not None:
            ag_route.add(post_group, post_group)
        # Comms of its own per module: FSDP2 allocates per module.
        all_gather, reduce_scatter = _PooledAllGather(ag_route), _PooledReduceScatter(rs_route)
        fsdp_module.set_custom_all_gather(all_gather)
        fsdp_module.set_custom_reduce_scatter(reduce_scatter)
        fsdp_module.set_allocate_memory_from_process_group_for_comm = _group_allocation_setter(
            (all_gather, reduce_scatter), param_group.device
        )
        routed.append(name)
        logger.info(
            "FSDP module %s: all-gather and reduce-scatter on pooled duplicates of "
            "ranks %s", _label(name), list(_ranks(shard_group)),
        )
    return routed


def _duplicate(pool: CommPool, base: dist.ProcessGroup, role: str) -> dist.ProcessGroup:
    pooled = pool.duplicate(base, role)
    # All-gather output is in group-rank order: a duplicate that numbered
    # the ranks differently would put the shards in the wrong places.
    if _ranks(pooled) != _ranks(base):
        raise LayoutError(
            f"the {role!r} duplicate of group {_name(base)!r} orders its ranks "
            f"{list(_ranks(pooled))}, the group {list(_ranks(base))}; FSDP needs the "
            "same order"
        )
    return pooled


# ---------------------------------------------------------------- Megatron-FSDP

def _megatron_fully_shard() -> Callable[..., Any]:
    failures = []
    for module_name in _MEGATRON_FSDP_MODULES:
        try:
            return importlib.import_module(module_name).fully_shard
        except (ImportError, AttributeError) as e:
            failures.append(f"{module_name}: {e}")
    raise ImportError(
        "Megatron-FSDP's fully_shard was not found (" + "; ".join(failures) + "); "
        "install megatron-core >= 0.15 or megatron-fsdp"
    )


def _is_member(group: Any) -> bool:
    return group is not None and group is not dist.GroupMember.NON_GROUP_MEMBER


def _check_base_ranks(
    pg_collection: Any, ag_group: dist.ProcessGroup, ag_name: str, base_names: Sequence[str]
) -> None:
    """The AG group must have the ranks of a group Megatron-FSDP shards over
    (intra_dp_cp with HSDP, dp_cp without), else parameters would be gathered
    from the wrong peers."""
    bases = {n: getattr(pg_collection, n, None) for n in base_names}
    bases = {n: g for n, g in bases.items() if _is_member(g)}
    if not bases:
        return
    ag_ranks = sorted(_ranks(ag_group))
    if any(sorted(_ranks(g)) == ag_ranks for g in bases.values()):
        return
    found = ", ".join(f"{n} {sorted(_ranks(g))}" for n, g in bases.items())
    raise LayoutError(
        f"pg_collection.{ag_name} has ranks {ag_ranks}, none of the groups Megatron-FSDP "
        f"shards over ({found}); make it with pycomm.megatron.attach_all_gather_groups()"
    )


def megatron_fsdp_kwargs(
    pg_collection: "ProcessGroupCollection",
    target: Callable[..., Any] | None = None,
) -> dict[str, dist.ProcessGroup]:
    """The all-gather group arguments of Megatron-FSDP's ``fully_shard``
    from a collection built by :mod:`pycomm.megatron` (``dp_cp_ag`` ->
    ``fsdp_group_ag``, ``expt_dp_ag`` -> ``expt_fsdp_group_ag``)::

        model, optimizer = fully_shard(module, optimizer, device_mesh=...,
                                       **megatron_fsdp_kwargs(pg_collection))

    `target` is the function the arguments are for (default: Megatron-FSDP's
    ``fully_shard``; ``fully_shard_model`` takes the same). Only names in its
    signature are returned, and a group that is None is left out (it is the
    default). Megatron-Core's own adapter reads ``dp_cp_ag`` / ``expt_dp_ag``
    from the collection itself: this is for calling ``fully_shard`` directly.

    Raises NotInitializedError when the collection has no ``dp_cp_ag``,
    LayoutError when an AG group's ranks are not those of the collection's
    (intra_)dp_cp / (intra_)expt_dp group, UnsupportedOpError when `target`
    takes no ``fsdp_group_ag``, ImportError without Megatron-FSDP.
    """
    dp_cp_ag = getattr(pg_collection, "dp_cp_ag", None)
    if not _is_member(dp_cp_ag):
        raise NotInitializedError(
            "the ProcessGroupCollection has no dp_cp_ag: attach the all-gather groups "
            "first, e.g. pycomm.megatron.attach_all_gather_groups(pg_collection, pool=pool) "
            "or pycomm.megatron.pg_collection_with_ag(pool=pool)"
        )
    expt_dp_ag = getattr(pg_collection, "expt_dp_ag", None)
    _check_base_ranks(pg_collection, dp_cp_ag, "dp_cp_ag", ("intra_dp_cp", "dp_cp"))
    if _is_member(expt_dp_ag):
        _check_base_ranks(pg_collection, expt_dp_ag, "expt_dp_ag", ("intra_expt_dp", "expt_dp"))
    target = target if target is not None else _megatron_fully_shard()
    accepted = inspect.signature(target).parameters
    target_name = getattr(target, "__qualname__", repr(target))
    if "fsdp_group_ag" not in accepted:
        raise UnsupportedOpError(
            f"{target_name} takes no fsdp_group_ag argument (parameters: "
            f"{', '.join(accepted)}); Megatron-FSDP with independent all-gather groups "
            "is in megatron-core >= 0.15"
        )
    kwargs: dict[str, dist.ProcessGroup] = {"fsdp_group_ag": dp_cp_ag}
    if _is_member(expt_dp_ag):
        if "expt_fsdp_group_ag" in accepted:
            kwargs["expt_fsdp_group_ag"] = expt_dp_ag
        else:
            logger.warning(
                "%s takes no expt_fsdp_group_ag; expert parameters all-gather on "
                "the expert data-parallel group", target_name,
            )
    return kwargs
