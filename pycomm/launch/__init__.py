"""Runs a function on every rank of a torch.distributed world and collects
what each rank returns. Used by the demo, the benchmarks and the tests.

The world is spawned here (processes on 127.0.0.1) unless a launcher such as
torchrun or a SLURM job script describes one in the environment (`RANK`,
`WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`): then this process
joins it as one of its ranks, which is how the demo and the benchmarks run on
several machines. `launch` makes that decision; nothing else does.

Modules:

* `pycomm.launch.joined`: the world the environment describes (`JoinedWorld`,
  `joined_world`, `world_sizes`, `describe_world`, `reports_here`) and running
  as one of its ranks;
* `pycomm.launch.spawn`: a world spawned here (`run_world`, `free_port`,
  `preload_in_ranks`),
  which ends with the process that spawned it (signals, a dead parent, a dead
  rank, a time limit);
* `pycomm.launch.errors`: how a world fails or is stopped (`WorldFailed`,
  `LaunchEnvironmentError`, `WorldInterrupted`, `WorldTerminated`);
* `pycomm.launch.device`: the GPU each rank binds, in either world."""

from __future__ import annotations

from typing import Any, Callable

from pycomm.launch.errors import LaunchEnvironmentError, WorldFailed, WorldInterrupted, WorldTerminated
from pycomm.launch.joined import (
    JoinedWorld,
    describe_world,
    joined_world,
    reports_here,
    run_as_joined_rank,
    world_sizes,
)
from pycomm.launch.spawn import free_port, preload_in_ranks, run_world

__all__ = [
    "JoinedWorld",
    "LaunchEnvironmentError",
    "WorldFailed",
    "WorldInterrupted",
    "WorldTerminated",
    "describe_world",
    "free_port",
    "preload_in_ranks",
    "joined_world",
    "launch",
    "reports_here",
    "run_world",
    "world_sizes",
]


def launch(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    timeout_seconds: float = 120.0,
) -> list[Any] | None:
    """Runs fn(rank, world_size, *args) on every rank of an initialized world:
    the one the environment describes (this process is one of its ranks, and
    `world_size` must be its size: see `world_sizes`), else `world_size`
    spawned ranks. Returns the values by rank where `reports_here()`, None on
    the other ranks of a joined world."""
    world = joined_world()
    if world is None:
        return run_world(fn, world_size, *args, backend=backend, timeout_seconds=timeout_seconds)
    if world_size != world.world_size:
        raise LaunchEnvironmentError(
            f"asked for {world_size} ranks, but this process is {world}; take sizes from world_sizes()"
        )
    return run_as_joined_rank(world, fn, args, backend, timeout_seconds)
