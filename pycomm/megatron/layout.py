"""Megatron-Core's rank layout, computed from the sizes alone: which ranks form
a rank's dp-cp, expert-dp and all-gather groups, and which groups megatron-core
0.19.2's own ``create_all_gather_groups`` would build instead.

Pure Python on purpose (no torch, no megatron-core import): ``python -m pycomm
plan`` uses it to answer in milliseconds for 16,384 ranks. Every group is found
in O(group size), never by enumerating the world. The tests check it against
megatron-core's ``RankGenerator`` and against ``pycomm._C.RankLayout``.

Conventions are megatron-core's: an order string such as ``tp-cp-ep-dp-pp``
names the dimensions innermost first (tp has stride 1), ``gtp_remat`` is
injected right after ``tp`` on the dense grid and right after ``ep`` on the
expert grid, and ranks start at ``rank_offset``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Mapping, Sequence

from pycomm.errors import LayoutError

DEFAULT_ORDER = "tp-cp-ep-dp-pp"
# The order megatron-core's create_all_gather_groups assumes, whatever the
# trainer used (one of the faults pycomm avoids).
MEGATRON_CORE_AG_ORDER = "tp-cp-ep-dp-pp"
DIM_NAMES = ("tp", "cp", "ep", "dp", "pp", "gtp_remat")


class Grid:
    """Named dimensions, innermost first, over ranks
    [rank_offset, rank_offset + world_size)."""

    def __init__(self, sizes: Sequence[tuple[str, int]], rank_offset: int = 0) -> None:
        names = [name for name, _ in sizes]
        if len(set(names)) != len(names):
            raise LayoutError(f"repeated dimension names in {names}")
        if rank_offset < 0:
            raise LayoutError(f"rank offset must be >= 0, got {rank_offset}")
        self.names = names
        self.sizes = {name: int(size) for name, size in sizes}
        self.strides: dict[str, int] = {}
        stride = 1
        for name, size in sizes:
            if size < 1:
                raise LayoutError(f"dimension {name!r} has size {size}; sizes must be >= 1")
            self.strides[name] = stride
            stride *= size
        self.world_size = stride
        self.rank_offset = rank_offset

    def contains(self, rank: int) -> bool:
        return self.rank_offset <= rank < self.rank_offset + self.world_size

    def coordinate(self, rank: int, dim: str) -> int:
        return ((rank - self.rank_offset) // self.strides[dim]) % self.sizes[dim]

    def group_of(self, rank: int, dims: Sequence[str]) -> list[int]:
        """Sorted ranks sharing every coordinate with `rank` except along
        `dims`; O(group size)."""
        self._check_dims(dims)
        if not self.contains(rank):
            raise LayoutError(
                f"rank {rank} is outside this layout (ranks {self.rank_offset} to "
                f"{self.rank_offset + self.world_size - 1})"
            )
        base = rank - sum(self.coordinate(rank, d) * self.strides[d] for d in dims)
        steps = [[i * self.strides[d] for i in range(self.sizes[d])] for d in dims]
        return sorted(base + sum(parts) for parts in itertools.product(*steps))

    def group_size(self, dims: Sequence[str]) -> int:
        self._check_dims(dims)
        size = 1
        for d in dims:
            size *= self.sizes[d]
        return size

    def group_count(self, dims: Sequence[str]) -> int:
        return self.world_size // self.group_size(dims)

    def _check_dims(self, dims: Sequence[str]) -> None:
        unknown = [d for d in dims if d not in self.sizes]
        if unknown:
            raise LayoutError(f"unknown dimension(s) {unknown}; this grid has {self.names}")


def inject_gtp_remat(order: str, after: str) -> str:
    """megatron-core's _inject_gtp_remat_axis: 'gtp_remat' goes right after
    `after` (or after 'tp' if `after` is absent, or first if both are)."""
    tokens = order.split("-")
    if "gtp_remat" in tokens:
        return order
    anchor = after if after in tokens else "tp"
    tokens.insert(tokens.index(anchor) + 1 if anchor in tokens else 0, "gtp_remat")
    return "-".join(tokens)


def rank_generator_grid(
    sizes: Mapping[str, int], order: str, rank_offset: int = 0
) -> Grid:
    """The grid megatron-core's RankGenerator(order=...) lays out: dimensions
    missing from `order` must have size 1 and are appended last."""
    tokens = order.lower().split("-")
    unknown = [t for t in tokens if t not in sizes]
    if unknown:
        raise LayoutError(
            f"order {order!r} names unknown dimension(s) {unknown}; known: {sorted(sizes)}"
        )
    if len(set(tokens)) != len(tokens):
        raise LayoutError(f"order {order!r} repeats a dimension")
    for name, size in sizes.items():
        if name not in tokens:
            if size != 1:
                raise LayoutError(
                    f"dimension {name!r} has size {size} but order {order!r} does not name it"
                )
            tokens.append(name)
    return Grid([(t, sizes[t]) for t in tokens], rank_offset)


@dataclass(frozen=True)
class MegatronLayout:
    """The arguments of megatron-core's initialize_model_parallel that decide
    rank groups. `world_size` is the number of ranks the layout covers
    (Megatron's local_world_size), starting at `rank_offset`."""

    world_size: int
    tp: int = 1
    cp: int = 1
    ep: int = 1
    pp: int = 1
    etp: int | None = None
    order: str = DEFAULT_ORDER
    rank_offset: int = 0
    dist_opt_instances: int = 1
    gtp_remat: int = 1
    expert_gtp_remat: int = 1

    def __post_init__(self) -> None:
        for name in ("world_size", "tp", "cp", "ep", "pp", "dist_opt_instances",
                     "gtp_remat", "expert_gtp_remat"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LayoutError(f"{name} must be an integer >= 1, got {value!r}")
        if self.etp is not None and (not isinstance(self.etp, int) or self.etp < 1):
            raise LayoutError(f"etp must be an integer >= 1, got {self.etp!r}")
        if self.rank_offset < 0:
            raise LayoutError(f"rank_offset must be >= 0, got {self.rank_offset}")
        model = self.tp * self.pp * self.cp * self.gtp_remat
        if self.world_size % model:
            raise LayoutError(
                f"world size {self.world_size} is not divisible by tp*pp*cp*gtp_remat = {model}"
            )
        expert_model = self.expert_tp * self.ep * self.pp * self.expert_gtp_remat
        if self.world_size % expert_model:
            raise LayoutError(
                f"world size {self.world_size} is not divisible by "
                f"etp*ep*pp*expert_gtp_remat = {expert_model}"
            )
        if (self.gtp_remat > 1 or self.expert_gtp_remat > 1) and self.dist_opt_instances > 1:
            raise LayoutError(
                "megatron-core does not support gtp_remat with "
                "num_distributed_optimizer_instances > 1"
            )
        if (self.dp * self.cp) % self.dist_opt_instances:
            raise LayoutError(
                f"dp*cp = {self.dp * self.cp} is not divisible by "
                f"{self.dist_opt_instances} distributed-optimizer instances"
            )
        if self.expert_dp % self.dist_opt_instances:
            raise LayoutError(
                f"expert dp = {self.expert_dp} is not divisible by "
                f"{self.dist_opt_instances} distributed-optimizer instances"
            )
        if not (self.order.endswith("pp") or self.pp == 1 or self.expert_dp == self.dp):
            raise LayoutError(
                f"with order {self.order!r} (pp not last) and pp > 1, dp ({self.dp}) and "
                f"expert dp ({self.expert_dp}) must be equal"
            )
        decoder, expert = self.decoder_grid(), self.expert_grid()
        if self.pp > 1 and decoder.strides["pp"] != expert.strides["pp"]:
            raise LayoutError(
                f"pipeline groups differ between the dense and the expert layout with order "
                f"{self.order!r} (pp stride {decoder.strides['pp']} vs "
                f"{expert.strides['pp']}); megatron-core rejects this layout"
            )

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    @property
    def dp(self) -> int:
        """Replicate data-parallel size (gtp_remat peers excluded)."""
        return self.world_size // (self.tp * self.pp * self.cp * self.gtp_remat)

    @property
    def expert_dp(self) -> int:
        return self.world_size // (self.expert_tp * self.ep * self.pp * self.expert_gtp_remat)

    def decoder_grid(self) -> Grid:
        sizes = {"tp": self.tp, "cp": self.cp, "ep": 1, "dp": self.dp, "pp": self.pp,
                 "gtp_remat": self.gtp_remat}
        return rank_generator_grid(sizes, inject_gtp_remat(self.order, "tp"), self.rank_offset)

    def expert_grid(self) -> Grid:
        sizes = {"tp": self.expert_tp, "cp": 1, "ep": self.ep, "dp": self.expert_dp,
                 "pp": self.pp, "gtp_remat": self.expert_gtp_remat}
        return rank_generator_grid(sizes, inject_gtp_remat(self.order, "ep"), self.rank_offset)

    # The groups parallel_state builds (ProcessGroupCollection field names).

    def dp_cp(self, rank: int) -> list[int]:
        return self.decoder_grid().group_of(rank, ["dp", "cp"])

    def intra_dp_cp(self, rank: int) -> list[int]:
        return _instance_slice(self.dp_cp(rank), rank, self.dist_opt_instances)

    def expt_dp(self, rank: int) -> list[int]:
        return self.expert_grid().group_of(rank, ["dp"])

    def intra_expt_dp(self, rank: int) -> list[int]:
        return _instance_slice(self.expt_dp(rank), rank, self.dist_opt_instances)

    # What pycomm.megatron creates: the groups Megatron-FSDP shards over.

    def dp_cp_ag(self, rank: int) -> list[int]:
        return self.intra_dp_cp(rank)

    def expt_dp_ag(self, rank: int) -> list[int] | None:
        return self.intra_expt_dp(rank) if self.ep > 1 else None

    def group_counts(self) -> dict[str, int]:
        decoder, expert = self.decoder_grid(), self.expert_grid()
        return {
            "dp_cp": decoder.group_count(["dp", "cp"]),
            "intra_dp_cp": decoder.group_count(["dp", "cp"]) * self.dist_opt_instances,
            "expt_dp": expert.group_count(["dp"]),
            "intra_expt_dp": expert.group_count(["dp"]) * self.dist_opt_instances,
        }

    def megatron_core_ag(self, rank: int, torch_world_size: int | None = None) -> dict[str, object]:
        """The groups megatron-core 0.19.2's create_all_gather_groups(
        for_expert_parallelism=True) hands `rank`: a rank list, None (the rank
        is in none of the groups it builds) or an error message. It rebuilds a
        RankGenerator with order tp-cp-ep-dp-pp and offset 0 from the
        data-parallel size that includes gtp_remat peers."""
        world = self.rank_offset + self.world_size if torch_world_size is None else torch_world_size
        result: dict[str, object] = {}
        sizes = {"tp": self.tp, "cp": self.cp, "ep": 1, "dp": self.dp * self.gtp_remat,
                 "pp": self.pp, "gtp_remat": self.gtp_remat}
        grid = rank_generator_grid(sizes, inject_gtp_remat(MEGATRON_CORE_AG_ORDER, "tp"))
        result["dp_cp_ag"] = _megatron_core_group(grid, ["dp", "cp"], rank, world)
        if isinstance(result["dp_cp_ag"], str):
            # The function raises before it reaches the expert groups.
            result["expt_dp_ag"] = result["dp_cp_ag"]
        elif self.ep > 1:
            sizes = {"tp": self.expert_tp, "cp": 1, "ep": self.ep,
                     "dp": self.expert_dp * self.expert_gtp_remat, "pp": self.pp,
                     "gtp_remat": self.expert_gtp_remat}
            grid = rank_generator_grid(sizes, inject_gtp_remat(MEGATRON_CORE_AG_ORDER, "ep"))
            result["expt_dp_ag"] = _megatron_core_group(grid, ["dp"], rank, world)
            if isinstance(result["expt_dp_ag"], str):
                result["dp_cp_ag"] = result["expt_dp_ag"]  # raised: nothing returned
        else:
            result["expt_dp_ag"] = None
        return result

    def megatron_core_new_group_calls(self) -> int:
        """new_group calls megatron-core's create_all_gather_groups(
        for_expert_parallelism=True) makes on EVERY rank: one per group of
        each kind, whether the rank is a member or not."""
        calls = self.tp * self.pp * self.gtp_remat
        if self.ep > 1:
            calls += self.expert_tp * self.ep * self.pp * self.expert_gtp_remat
        return calls


def _instance_slice(group: list[int], rank: int, instances: int) -> list[int]:
    # Megatron cuts each (sorted) data-parallel group into `instances`
    # contiguous slices, one per distributed-optimizer instance.
    size = len(group) // instances
    index = group.index(rank) // size
    return group[index * size:(index + 1) * size]


def _megatron_core_group(grid: Grid, dims: list[str], rank: int, world: int) -> object:
    if grid.world_size > world:
        return (
            f"error: its RankGenerator spans {grid.world_size} ranks but the world has "
            f"{world} (torch raises 'Rank {world} is out of range')"
        )
    if not grid.contains(rank):
        return None
    return grid.group_of(rank, dims)
