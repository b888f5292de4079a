"""Helpers the spawned ranks of the tests use."""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import torch


def expect_error(kind: type[BaseException], fn: Callable[[], Any]) -> str:
    """Runs fn, which must raise `kind`; returns the message."""
    try:
        fn()
    except kind as e:
        return str(e)
    except BaseException as e:  # noqa: BLE001
        raise AssertionError(f"expected {kind.__name__}, got {type(e).__name__}: {e}") from e
    raise AssertionError(f"expected {kind.__name__}, nothing was raised")


def thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


def thread_names() -> list[str]:
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                names.append(f.read().strip())
        except FileNotFoundError:  # the thread ended meanwhile
            pass
    return names


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def settled_counts(threads_at_most: int, fds_at_most: int, seconds: float = 5.0) -> tuple[int, int]:
    """Threads and fds, once they are down to the bounds or `seconds` passed:
    a short-lived thread (a drain handed off by a destructor, a worker of
    gloo's) may still be ending when a cycle does; a leak stays above."""
    deadline = time.monotonic() + seconds
    while True:
        threads, fds = thread_count(), open_fd_count()
        if (threads <= threads_at_most and fds <= fds_at_most) or time.monotonic() > deadline:
            return threads, fds
        time.sleep(0.05)


def rank_tensor(rank: int, numel: int, dtype: torch.dtype, salt: int = 0) -> torch.Tensor:
    """Distinct, exactly representable values per rank (bf16 has 8 bits of
    mantissa, so values stay small integers or halves)."""
    base = torch.arange(numel, dtype=torch.float64) % 61
    values = base * (rank + 1) + salt + rank * 0.5
    if not dtype.is_floating_point:
        values = values.floor()
    return values.to(dtype)


def group_ranks(group: Any) -> list[int] | None:
    """The sorted global ranks of `group`; None for no group or a group this
    rank is not in."""
    import torch.distributed as dist

    if group is None or group is dist.GroupMember.NON_GROUP_MEMBER:
        return None
    return sorted(dist.get_process_group_ranks(group))


def pooled_all_gather_world(rank: int, world: int) -> list[float]:
    """One all-gather on a pooled duplicate of the world; its result. Fails
    if the rank imported torch's extension build tooling."""
    import sys

    import torch.distributed as dist

    import pycomm

    with pycomm.CommPool() as pool:
        out = torch.empty(world)
        dist.all_gather_into_tensor(out, torch.tensor([float(rank)]), group=pool.duplicate(role="ag"))
    assert "torch.utils.cpp_extension" not in sys.modules, "a rank imported torch's build tooling"
    return out.tolist()
