"""Rank functions of the launcher tests. `python tests/launch_ranks.py PID_DIR
[--ignore-sigterm] [--hold-gil]` spawns two ranks through pycomm.launch that
record their pids in PID_DIR and keep all-reducing (holding their gloo
connections) until they are stopped; with --ignore-sigterm only SIGKILL stops
them, like ranks stuck where a signal cannot reach them; with --hold-gil they
sleep in native code that holds the GIL, so no Python thread of theirs runs."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

RANKS = 2


def busy_rank(rank: int, world: int, pid_dir: str, ignore_sigterm: bool, hold_gil: bool = False) -> None:
    import ctypes
    import signal

    import torch
    import torch.distributed as dist

    if ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    Path(pid_dir, f"rank{rank}.pid").write_text(str(os.getpid()))
    if hold_gil:
        ctypes.PyDLL(None).sleep(600)  # PyDLL keeps the GIL through the call
    t = torch.ones(4)
    while True:
        dist.all_reduce(t.fill_(1.0))
        time.sleep(0.05)


def dying_rank(rank: int, world: int) -> None:
    """Rank 1 is killed inside the world; rank 0 waits for it in a barrier."""
    import signal

    import torch.distributed as dist

    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()


def environment_rank(rank: int, world: int, names: list[str]) -> dict[str, object]:
    """What a rank sees of its parent's environment, and when it started."""
    import torch.distributed as dist

    return {
        "environ": {name: os.environ.get(name) for name in names},
        "debug_level": str(dist.get_debug_level()),
        "cwd": os.getcwd(),
        "pid": os.getpid(),
    }


def late_rank(rank: int, world: int) -> list[int]:
    """Rank 0 returns at once; the others make a group through the world's
    store after it has gone, and use it."""
    import torch
    import torch.distributed as dist

    if rank == 0:
        return []
    time.sleep(2.0)
    alone = dist.new_group([rank], use_local_synchronization=True)
    t = torch.tensor([rank])
    dist.all_reduce(t, group=alone)
    return [int(t.item()), dist.get_world_size(alone)]


def preload_report(rank: int, world: int) -> dict[str, object]:
    """Which process imported the preloaded probe, this rank's pid, and what
    the probe set in the environment."""
    import preload_probe

    return {
        "probe_imported_by": preload_probe.IMPORTED_BY,
        "pid": os.getpid(),
        "set_on_import": os.environ.get("PYCOMM_TEST_SET_ON_IMPORT"),
    }


def main() -> None:
    from pycomm.launch import run_world

    # Run as a script this module is __main__; spawned ranks import the
    # function by its module's name, which this script's folder makes findable.
    from launch_ranks import busy_rank as importable_busy_rank

    run_world(
        importable_busy_rank, RANKS, sys.argv[1], "--ignore-sigterm" in sys.argv, "--hold-gil" in sys.argv,
        timeout_seconds=600,
    )


if __name__ == "__main__":
    main()
