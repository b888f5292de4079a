"""Spawns a local torch.distributed world of processes on 127.0.0.1 and
collects what each rank's function returns. Used by the demo, the benchmarks
and the tests; every wait is bounded, so a stuck rank is an error, not a hang."""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import socket
import traceback
from typing import Any, Callable

import torch.distributed as dist

from pycomm.errors import PycommError


class WorldFailed(PycommError):
    """A rank of a spawned world raised, died or ran past the time limit."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    args: tuple[Any, ...],
    results: "mp.Queue[tuple[int, bool, Any]]",
    timeout_seconds: float,
) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        device_id = None
        if "nccl" in backend:
            import torch

            # One GPU per rank, bound at init: torch creates its NCCL
            # communicator eagerly, so pooled groups can split it.
            device_id = torch.device("cuda", rank % torch.cuda.device_count())
            torch.cuda.set_device(device_id)
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_seconds),
            device_id=device_id,
        )
        try:
            value = fn(rank, world_size, *args)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        results.put((rank, True, value))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        results.put((rank, False, traceback.format_exc()))


def run_world(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    timeout_seconds: float = 120.0,
    allow_dead: frozenset[int] = frozenset(),
) -> list[Any]:
    """Runs fn(rank, world_size, *args) on `world_size` spawned ranks inside an
    initialized torch.distributed world and returns the values by rank.

    `fn` must be importable (a module-level function). Ranks in `allow_dead`
    may exit without a result (they get None). Raises WorldFailed with every
    failing rank's traceback.
    """
    ctx = mp.get_context("spawn")
    results: "mp.Queue[tuple[int, bool, Any]]" = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(fn, rank, world_size, port, backend, args, results, timeout_seconds),
            daemon=False,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    values: dict[int, Any] = {}
    failures: dict[int, str] = {}
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_seconds)
    try:
        while len(values) + len(failures) < world_size:
            remaining = (deadline - datetime.datetime.now()).total_seconds()
            if remaining <= 0:
                break
            try:
                rank, ok, value = results.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                dead = {
                    r for r, p in enumerate(procs)
                    if p.exitcode is not None and r not in values and r not in failures
                }
                if dead and dead <= allow_dead and len(values) + len(failures) + len(dead) == world_size:
                    break
                continue
            (values if ok else failures)[rank] = value
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    missing = [r for r in range(world_size) if r not in values and r not in failures and r not in allow_dead]
    if failures or missing:
        parts = [f"rank {r} raised:\n{tb}" for r, tb in sorted(failures.items())]
        if missing:
            parts.append(
                f"ranks {missing} returned nothing within {timeout_seconds:g} s "
                f"(exit codes {[procs[r].exitcode for r in missing]})"
            )
        raise WorldFailed("\n".join(parts))
    return [values.get(r) for r in range(world_size)]
