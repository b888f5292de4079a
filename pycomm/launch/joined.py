"""A world the environment describes: a launcher (torchrun, a SLURM job
script) started this process as one of its ranks and set `RANK`,
`WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT`. This module reads
that description, says what a command does inside such a world (which sizes
it runs, who reports), and runs a function as this process's rank of it."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable

import torch.distributed as dist

from pycomm.launch.device import bind_device
from pycomm.launch.errors import LaunchEnvironmentError

logger = logging.getLogger(__name__)

# The variables that make a process a rank of an existing world. RANK or
# WORLD_SIZE alone decides: MASTER_ADDR is often exported for other reasons.
_IDENTITY_VARIABLES = ("RANK", "WORLD_SIZE")
_WORLD_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class JoinedWorld:
    """This process's place in a world its launcher (torchrun, SLURM) made."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    def __str__(self) -> str:
        return (
            f"rank {self.rank} of a {self.world_size}-rank world "
            f"(local rank {self.local_rank}, rendezvous {self.master_addr}:{self.master_port})"
        )


def joined_world(environ: Mapping[str, str] = os.environ) -> JoinedWorld | None:
    """The world the environment describes, or None when it describes none
    (then `launch` spawns one). Raises LaunchEnvironmentError for a partial or
    impossible description rather than starting a world of its own beside the
    launcher's."""
    if not any(environ.get(name) for name in _IDENTITY_VARIABLES):
        return None
    missing = [name for name in _WORLD_VARIABLES if not environ.get(name)]
    if missing:
        raise LaunchEnvironmentError(
            f"{', '.join(missing)} not set, but {', '.join(n for n in _WORLD_VARIABLES if environ.get(n))} "
            "are: set all of RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT to join a "
            "world (torchrun sets them), or unset RANK and WORLD_SIZE to spawn a local one"
        )
    try:
        world = JoinedWorld(
            rank=int(environ["RANK"]),
            world_size=int(environ["WORLD_SIZE"]),
            local_rank=int(environ["LOCAL_RANK"]),
            master_addr=environ["MASTER_ADDR"],
            master_port=int(environ["MASTER_PORT"]),
        )
    except ValueError as e:
        raise LaunchEnvironmentError(f"RANK, WORLD_SIZE, LOCAL_RANK and MASTER_PORT must be integers: {e}") from e
    if not (0 <= world.rank < world.world_size and world.local_rank >= 0):
        raise LaunchEnvironmentError(
            f"RANK={world.rank} WORLD_SIZE={world.world_size} LOCAL_RANK={world.local_rank}: "
            "need 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0"
        )
    return world


def world_sizes(requested: Sequence[int]) -> list[int]:
    """The world sizes a command runs: the requested ones when it spawns its
    worlds, or only the size of the world the environment describes."""
    world = joined_world()
    if world is None:
        return list(requested)
    if list(requested) != [world.world_size]:
        logger.info("joining %s; requested world sizes %s do not apply", world, list(requested))
    return [world.world_size]


def describe_world(world_size: int, backend: str = "gloo") -> str:
    """How a command's header names the world it is about to run on."""
    world = joined_world()
    if world is None:
        return f"{world_size} spawned ranks ({backend} on 127.0.0.1)"
    return f"{world_size} ranks of the launcher's world ({world.master_addr}:{world.master_port})"


def reports_here() -> bool:
    """Whether this process prints and writes a run's results: the spawning
    process, or rank 0 of a joined world (its other ranks stay quiet, so N
    processes do not write the same files)."""
    world = joined_world()
    return world is None or world.rank == 0


def _is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def run_as_joined_rank(
    world: JoinedWorld, fn: Callable[..., Any], args: tuple[Any, ...], backend: str, timeout_seconds: float
) -> list[Any] | None:
    """Runs fn(rank, world_size, *args) as this process's rank of `world`
    and returns the values by rank on rank 0, None on the others."""
    if _is_loopback(world.master_addr):
        # Every rank is on this machine; gloo would otherwise pick the
        # interface the host name resolves to, which may not route here.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        backend,
        init_method="env://",
        rank=world.rank,
        world_size=world.world_size,
        timeout=datetime.timedelta(seconds=timeout_seconds),
        device_id=bind_device(backend, world.local_rank),
    )
    try:
        value = fn(world.rank, world.world_size, *args)
        # A rank that raised never gets here; its launcher (torchrun, srun
        # --kill-on-bad-exit) ends the others, the group's timeout bounds them.
        values: list[Any] | None = [None] * world.world_size if world.rank == 0 else None
        dist.gather_object(value, values, dst=0)
        return values
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
