"""A pooled group's life on real gloo worlds: the error a closed group gives,
release of the duplicates of destroyed base groups, re-creation after torch
destroyed a pooled group, creation from several threads, late members."""

from __future__ import annotations

import threading
import time
import warnings

import pytest
import torch
import torch.distributed as dist

import pycomm
from pycomm.launch import run_world
from world_checks import expect_error, open_fd_count, settled_counts, thread_count


def _quiet() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)


def _all_gather(group: dist.ProcessGroup, rank: int, world: int) -> list[float]:
    out = torch.empty(world)
    dist.all_gather_into_tensor(out, torch.tensor([float(rank)]), group=group)
    return out.tolist()


def _gone_from_torch(group: dist.ProcessGroup, name: str) -> bool:
    """Whether every registry of torch's has forgotten `group`."""
    world = dist.distributed_c10d._world
    return (
        group not in world.pg_map
        and group not in world.pg_group_ranks
        and name not in world.pg_names.values()
        and group not in world.pg_to_tag
    )


def closed_group_world(rank: int, world: int) -> dict:
    """Every way a pooled group closes, then a use of it: as after torch's
    destroy_process_group, torch no longer knows the group."""
    _quiet()
    out: dict = {}
    destroyed_pool = pycomm.CommPool()
    ag = destroyed_pool.duplicate(None, "ag")
    name = ag.group_name
    destroyed_pool.destroy()
    out["after_destroy"] = expect_error(ValueError, lambda: _all_gather(ag, rank, world))
    out["destroy_forgot"] = _gone_from_torch(ag, name)
    # The backend itself is closed: a call that skips torch's checks.
    out["backend_after_destroy"] = expect_error(
        pycomm.PoolClosedError, lambda: ag._allgather_base(torch.empty(world), torch.ones(1)).wait()
    )

    aborted_pool = pycomm.CommPool()
    ag = aborted_pool.duplicate(None, "ag")
    name = ag.group_name
    aborted_pool.abort()
    # Still registered: an op racing the abort gets the pool's error.
    out["after_abort"] = expect_error(pycomm.PoolClosedError, lambda: _all_gather(ag, rank, world))
    aborted_pool.destroy()
    out["abort_then_destroy_forgot"] = _gone_from_torch(ag, name)

    # A synchronous op in flight when abort() runs: rank 1 never issues it.
    in_flight_pool = pycomm.CommPool(pycomm.RoleConfig(timeout=30.0))
    ag = in_flight_pool.duplicate(None, "ag")
    if rank == 0:
        threading.Timer(0.5, in_flight_pool.abort).start()
        started = time.monotonic()
        out["in_flight"] = expect_error(pycomm.PoolClosedError, lambda: _all_gather(ag, rank, world))
        out["in_flight_seconds"] = time.monotonic() - started
    dist.barrier()
    in_flight_pool.abort()

    released_pool = pycomm.CommPool()
    base = dist.new_group(list(range(world)))
    ag = released_pool.duplicate(base, "ag")
    name = ag.group_name
    assert _all_gather(ag, rank, world) == [float(r) for r in range(world)]
    released_pool.release(base)
    out["after_release"] = expect_error(ValueError, lambda: _all_gather(ag, rank, world))
    out["release_forgot"] = _gone_from_torch(ag, name)
    again = released_pool.duplicate(base, "ag")
    out["new_after_release"] = again is not ag and _all_gather(again, rank, world) == [
        float(r) for r in range(world)
    ]
    released_pool.destroy()
    return out


@pytest.mark.timeout(120)
def test_a_closed_pooled_group_raises_pool_closed_error() -> None:
    results = run_world(closed_group_world, 2, timeout_seconds=100)
    unknown = "is not initialized in the world group map"
    for r in results:
        assert unknown in r["after_destroy"] and r["destroy_forgot"], r
        assert "was destroyed" in r["backend_after_destroy"], r
        assert "was aborted" in r["after_abort"] and r["abort_then_destroy_forgot"], r
        assert unknown in r["after_release"] and r["release_forgot"], r
        assert r["new_after_release"] is True
    assert "abort" in results[0]["in_flight"]
    assert results[0]["in_flight_seconds"] < 10.0


def destroyed_pooled_group_world(rank: int, world: int) -> dict:
    _quiet()
    with pycomm.CommPool() as pool:
        first = pool.duplicate(None, "ag")
        dist.destroy_process_group(first)
        second = pool.duplicate(None, "ag")
        return {
            "new_group": second is not first,
            "gathered": _all_gather(second, rank, world),
            "groups": len(pool.groups()),
            "stats_rows": len(pool.stats()),
        }


@pytest.mark.timeout(120)
def test_a_pooled_group_torch_destroyed_is_made_again() -> None:
    for r in run_world(destroyed_pooled_group_world, 2, timeout_seconds=100):
        assert r == {"new_group": True, "gathered": [0.0, 1.0], "groups": 1, "stats_rows": 1}


def base_group_cycles_world(rank: int, world: int, cycles: int) -> dict:
    """A long-lived pool; `cycles` base groups made, duplicated for AG and
    RS, used and destroyed. Threads and fds after the first cycles and at the
    end."""
    _quiet()
    counts = []
    with pycomm.CommPool() as pool:
        for i in range(cycles):
            base = dist.new_group(list(range(world)))
            ag = pool.duplicate(base, "ag")
            rs = pool.duplicate(base, "rs")
            assert _all_gather(ag, rank, world) == [float(r) for r in range(world)]
            reduced = torch.empty(1)
            dist.reduce_scatter_tensor(reduced, torch.ones(world), group=rs)
            assert reduced.item() == float(world)
            dist.destroy_process_group(base)
            del base, ag, rs
            counts.append((thread_count(), open_fd_count(), len(pool.stats())))
        # After the last cycle, counted once what it started has ended.
        late = (*settled_counts(counts[2][0], counts[2][1]), counts[-1][2])
        alive = len(pool.groups())
        # release() frees at once what the next call would.
        base = dist.new_group(list(range(world)))
        pool.duplicate(base, "ag")
        pool.duplicate(base, "rs")
        pool.release(base)
        released = (thread_count(), open_fd_count(), len(pool.stats()))
    return {"counts": counts, "late": late, "alive": alive, "released": released}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world,cycles", [(2, 30)])
def test_duplicates_of_destroyed_base_groups_are_released(world: int, cycles: int) -> None:
    for r in run_world(base_group_cycles_world, world, cycles, timeout_seconds=280):
        counts = r["counts"]
        threads_early, fds_early, _ = counts[2]
        threads_late, fds_late, rows_late = r["late"]
        assert threads_late <= threads_early, r
        assert fds_late <= fds_early, r
        # Only the last base group's duplicates were still in the pool.
        assert rows_late <= 2, counts
        assert r["alive"] == 0
        threads_released, fds_released, rows_released = r["released"]
        assert rows_released == 0
        # Against the last cycle as it was counted (its threads still ending).
        threads_last, fds_last, _ = counts[-1]
        assert threads_released <= threads_last and fds_released <= fds_last, r


def opposite_order_world(rank: int, world: int) -> dict:
    """Two threads per rank duplicate two groups, the ranks in opposite
    orders."""
    _quiet()
    first = dist.new_group(list(range(world)))
    second = dist.new_group(list(range(world)))
    order = [first, second] if rank == 0 else [second, first]
    pool = pycomm.CommPool(pycomm.RoleConfig(timeout=20.0))
    made: dict[int, object] = {}
    errors: list[str] = []

    def make(i: int, group: dist.ProcessGroup) -> None:
        try:
            made[i] = pool.duplicate(group, "ag")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(f"{type(e).__name__}: {e}")

    started = time.monotonic()
    threads = []
    for i, group in enumerate(order):
        threads.append(threading.Thread(target=make, args=(i, group)))
        threads[-1].start()
        time.sleep(0.3)  # the first is inside its rendezvous before the second starts
    for t in threads:
        t.join()
    seconds = time.monotonic() - started
    gathered = [] if errors else [_all_gather(pool.get(g, "ag"), rank, world) for g in (first, second)]
    pool.destroy()
    return {"errors": errors, "seconds": seconds, "gathered": gathered}


@pytest.mark.timeout(120)
def test_duplicating_in_opposite_orders_from_two_threads_does_not_deadlock() -> None:
    for r in run_world(opposite_order_world, 2, timeout_seconds=100):
        assert r["errors"] == [], r
        assert r["seconds"] < 10.0, r
        assert r["gathered"] == [[0.0, 1.0], [0.0, 1.0]]


def concurrent_same_group_world(rank: int, world: int) -> dict:
    """Four threads ask for the same (group, role) at once: one group."""
    _quiet()
    pool = pycomm.CommPool()
    made: list[object] = []
    threads = [threading.Thread(target=lambda: made.append(pool.duplicate(None, "rs"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    distinct = len({id(g) for g in made})
    pool.destroy()
    return {"made": len(made), "distinct": distinct}


@pytest.mark.timeout(120)
def test_threads_asking_for_the_same_group_get_one() -> None:
    for r in run_world(concurrent_same_group_world, 2, timeout_seconds=100):
        assert r == {"made": 4, "distinct": 1}


def late_member_world(rank: int, world: int) -> dict:
    _quiet()
    pool = pycomm.CommPool(pycomm.RoleConfig(timeout=2.0))
    if rank == 1:
        time.sleep(4.0)  # arrives after rank 0 gave up
    error = expect_error(pycomm.RendezvousTimeoutError, lambda: pool.duplicate(None, "ag"))
    pool.destroy()
    dist.barrier()  # rank 0 holds the store: it stays until rank 1 is done
    return {"error": error}


@pytest.mark.timeout(120)
def test_a_member_arriving_after_the_others_gave_up_gets_the_named_error() -> None:
    on_time, late = run_world(late_member_world, 2, timeout_seconds=100)
    assert "ranks [1] did not call duplicate() within 2 s" in on_time["error"]
    assert "after the other members had waited 2 s and given up" in late["error"]
