"""Megatron-Bridge: pooled ``dp_cp_ag`` / ``expt_dp_ag`` in every
``ProcessGroupCollection`` Bridge builds, turned on with one call before
``pretrain(cfg, forward_step)``::

    import pycomm.megatron.bridge
    pycomm.megatron.bridge.enable(cfg)
    pretrain(cfg, forward_step)

Megatron-Bridge builds its collection inside ``setup()`` and hands it on with
no hook, and keeps neither of its HyperCommGrids. So :func:`enable` wraps the
two functions of ``megatron.bridge.training.initialize`` that return a
collection, the narrowest points it passes through:

* ``_create_pg_collection`` (the HyperCommGrid path, ``use_decentralized_pg``;
  also each module's collection in dist-train): the collection it returns
  gets the groups;
* ``_initialize_distributed`` (both paths; the MPU path builds
  ``ProcessGroupCollection.use_mpu_process_groups()`` inside it): the
  collection it returns gets the groups unless it has them already.

Each AG group duplicates the group Bridge's own collection holds on this rank
(``intra_dp_cp``, ``intra_expt_dp``), so its ranks are Bridge's for any order
and any number of distributed-optimizer instances. :func:`disable` puts
Bridge's functions back.

Teardown needs no wrapping: ``pretrain()`` ends by destroying
(``destroy_process_group()``) or, on a failure, aborting
(``_abort_process_group()``) the world, and torch then shuts down or aborts
every process group it knows, the pooled AG groups among them, which releases
their communicators, lanes and threads. The pool that held them belongs to
the old world; pycomm drops it when next asked and never reuses it.

A Bridge whose ``DistributedInitConfig`` has ``create_all_gather_group``
(Megatron-Bridge's open change that adds it) decides through that flag, and
while pycomm makes the groups Bridge's functions are called with the flag off,
so the groups are never made twice.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import inspect
import logging
import threading
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Mapping

import torch.distributed as dist

from pycomm.megatron.config import FLAG, AllGatherGroupConfig
from pycomm.megatron.groups import is_member
from pycomm.pool import CommPool

__all__ = ["current_pool", "disable", "enable", "is_enabled", "release_groups"]

logger = logging.getLogger(__name__)

INITIALIZE_MODULE = "megatron.bridge.training.initialize"

# The functions of INITIALIZE_MODULE that return the collection (both paths).
WRAPPED: tuple[str, ...] = ("_create_pg_collection", "_initialize_distributed")

# Set on each wrapper: the function it wraps.
_ORIGINAL_ATTR = "__pycomm_bridge_original__"


@dataclass
class _Enabled:
    """What enable() was told, and the pool of the groups made for Bridge."""

    dist_config: Any
    create_all_gather_group: bool | None
    for_expert_parallelism: bool | None
    nccl_comm_cfgs: Mapping[str, Any] | None
    wrapped: list[tuple[ModuleType, str, Callable[..., Any]]] = field(default_factory=list)
    pool: CommPool | None = None
    # The world the pool's groups live in; once it is torn down, so are they.
    pool_world: Any = None

    def settings(self) -> AllGatherGroupConfig:
        flag = self.create_all_gather_group
        if flag is None:
            # A Bridge with the field decides through it; on one without it,
            # calling enable() is the decision.
            flag = bool(getattr(self.dist_config, FLAG)) if hasattr(self.dist_config, FLAG) else True
        return AllGatherGroupConfig.from_dist_init_config(
            self.dist_config,
            create_all_gather_group=flag,
            for_expert_parallelism=self.for_expert_parallelism,
            nccl_comm_cfgs=self.nccl_comm_cfgs,
        )


_state: _Enabled | None = None
_lock = threading.RLock()


def enable(
    cfg: Any,
    create_all_gather_group: bool | None = None,
    *,
    for_expert_parallelism: bool | None = None,
    nccl_comm_cfgs: Mapping[str, Any] | None = None,
) -> None:
    """From now on every ProcessGroupCollection Megatron-Bridge builds carries
    ``dp_cp_ag`` and, when its ep group has more than one rank,
    ``expt_dp_ag``: pooled duplicates of the collection's own ``intra_dp_cp``
    / ``intra_expt_dp``, with ``cfg.dist``'s timeout
    (``distributed_timeout_minutes``) and ``nccl_communicator_config_path``.
    Bridge's teardown releases them.

    `cfg`: the ConfigContainer given to ``pretrain`` (or its
    DistributedInitConfig), read when each collection is built.
    `create_all_gather_group`: None lets ``cfg.dist.create_all_gather_group``
    decide where Bridge has that field, and means on where it has not.
    `for_expert_parallelism`, `nccl_comm_cfgs`: as
    :class:`~pycomm.megatron.config.AllGatherGroupConfig`.

    Call on every rank before ``pretrain`` / ``setup``. Calling again
    replaces the settings and wraps nothing twice. Raises ImportError when
    Megatron-Bridge's training modules cannot be imported.
    """
    global _state
    dist_config = getattr(cfg, "dist", cfg)
    with _lock:
        if _state is None:
            state = _Enabled(dist_config, create_all_gather_group, for_expert_parallelism,
                             nccl_comm_cfgs)
            state.wrapped = _wrap_bridge()
            _state = state
        else:
            _state.dist_config = dist_config
            _state.create_all_gather_group = create_all_gather_group
            _state.for_expert_parallelism = for_expert_parallelism
            _state.nccl_comm_cfgs = nccl_comm_cfgs
        # Fail now, not inside Bridge's setup(), on a bad flag, timeout or YAML.
        settings = _state.settings()
        settings.role_configs()
    logger.info("Megatron-Bridge all-gather groups %s",
                "on" if settings.create_all_gather_group else "off (create_all_gather_group=False)")


def disable() -> None:
    """Puts Bridge's functions back and destroys the groups pycomm made for
    Bridge (local, no collective; an op still issued on them then raises
    PoolClosedError). Idempotent."""
    global _state
    with _lock:
        state, _state = _state, None
    if state is None:
        return
    for module, name, original in state.wrapped:
        current = getattr(module, name)
        if getattr(current, _ORIGINAL_ATTR, None) is original:
            setattr(module, name, original)
        else:
            # Someone wrapped ours since; ours now passes straight through.
            logger.warning("%s.%s was replaced after pycomm wrapped it; left as it is",
                           module.__name__, name)
    if state.pool is not None:
        state.pool.destroy()


def is_enabled() -> bool:
    with _lock:
        return _state is not None


def current_pool() -> CommPool | None:
    """The pool holding the groups made for Bridge in the current world, or
    None (nothing made yet, released, or the world they lived in is gone)."""
    with _lock:
        if _state is None:
            return None
        _drop_pool_of_a_past_world(_state)
        return _state.pool


def release_groups(abort: bool = False) -> None:
    """Destroys (`abort`: aborts, without waiting for peers) the groups made
    for Bridge, e.g. before building a new collection in the same world.
    Local to this rank; idempotent. Bridge's own teardown of the world needs
    no call: torch releases every group of the world then."""
    with _lock:
        pool = _state.pool if _state is not None else None
        if _state is not None:
            _state.pool = None
            _state.pool_world = None
    if pool is None:
        return
    if abort:
        pool.abort()
    else:
        pool.destroy()
    logger.info("released the Megatron-Bridge all-gather groups (%s)", "abort" if abort else "destroy")


# ---------------------------------------------------------------- wrapping


def _wrap_bridge() -> list[tuple[ModuleType, str, Callable[..., Any]]]:
    try:
        module = importlib.import_module(INITIALIZE_MODULE)
    except ImportError as e:
        raise ImportError(
            f"pycomm.megatron.bridge needs Megatron-Bridge's {INITIALIZE_MODULE} "
            f"(pip install megatron-bridge and what it imports): {e}"
        ) from e
    wrapped = []
    for name in WRAPPED:
        original = getattr(module, name)
        # A wrapper of ours that someone wrapped again is unwrapped to its
        # original; ours inside theirs passes straight through.
        original = getattr(original, _ORIGINAL_ATTR, original)
        wrapper = _with_all_gather_groups(original)
        setattr(wrapper, _ORIGINAL_ATTR, original)
        setattr(module, name, wrapper)
        wrapped.append((module, name, original))
    return wrapped


def _with_all_gather_groups(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def build_with_all_gather_groups(*args: Any, **kwargs: Any) -> Any:
        with _lock:
            state = _state
        if state is None:
            return original(*args, **kwargs)
        settings = state.settings()
        if not settings.create_all_gather_group:
            return original(*args, **kwargs)
        collection = _call_with_bridge_flag_off(original, args, kwargs)
        return _attach_groups(state, settings, collection)

    return build_with_all_gather_groups


def _call_with_bridge_flag_off(
    function: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Calls one of Bridge's functions with every ``create_all_gather_group``
    it is handed (an argument of that name, or a config object's field) set
    to False, so a Bridge that makes its own AG groups leaves them to pycomm.
    Bridge 0.6.2 has no such flag: the call is unchanged."""
    bound = inspect.signature(function).bind(*args, **kwargs)
    for name, value in bound.arguments.items():
        if name == FLAG and value:
            bound.arguments[name] = False
        elif (dataclasses.is_dataclass(value) and not isinstance(value, type)
              and getattr(value, FLAG, False) is True):
            # A copy: the caller's config keeps saying what the user asked for.
            switched = copy.copy(value)
            object.__setattr__(switched, FLAG, False)
            bound.arguments[name] = switched
    return function(*bound.args, **bound.kwargs)


def _attach_groups(state: _Enabled, settings: AllGatherGroupConfig, collection: Any) -> Any:
    from megatron.core.process_groups_config import ProcessGroupCollection

    if not isinstance(collection, ProcessGroupCollection):
        return collection  # the callable of Bridge's lazy MPU init, or None
    base = getattr(collection, "intra_dp_cp", None) or getattr(collection, "dp_cp", None)
    if not is_member(base):
        # dist-train builds one collection per module; this rank is in the other.
        return collection
    existing = getattr(collection, "dp_cp_ag", None)
    if existing is not None:
        pool = current_pool()
        if pool is None or not any(group is existing for group in pool.groups()):
            logger.warning(
                "the ProcessGroupCollection Bridge built already has a dp_cp_ag group that "
                "pycomm did not make; pycomm leaves it and makes none"
            )
        return collection
    return settings.apply(collection, pool=_pool_for_current_world(state))


def _drop_pool_of_a_past_world(state: _Enabled) -> None:
    if state.pool is None or (dist.is_initialized() and state.pool_world is dist.group.WORLD):
        return
    # torch shut its groups down with their world; this frees what is left
    # of the pool and needs no peer.
    logger.debug("dropping the all-gather groups of a world that is gone")
    stale, state.pool, state.pool_world = state.pool, None, None
    stale.destroy()


def _pool_for_current_world(state: _Enabled) -> CommPool:
    with _lock:
        _drop_pool_of_a_past_world(state)
        if state.pool is None or not state.pool.is_open:
            if state.pool is not None:
                state.pool.destroy()  # gives its name back
            state.pool = CommPool(name="megatron_bridge")
            state.pool_world = dist.group.WORLD
        return state.pool
