"""Pools known across ranks, torch's group bookkeeping kept in step, and
creation bounded by its timeout, on real gloo worlds."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import threading
import time
import warnings

import pytest
import torch
import torch.distributed as dist

import pycomm
from pycomm.launch import run_world
from world_checks import expect_error, open_fd_count, settled_counts, thread_count, thread_names


def _quiet() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)


def _payload(rank: int, salt: float) -> torch.Tensor:
    """Values no other (rank, salt) pair gives, exact in float64."""
    return torch.arange(4, dtype=torch.float64) + 1000.0 * salt + 10.0 * rank


def two_pools_opposite_orders_world(rank: int, world: int) -> dict:
    """Pools A and B each duplicate the world for 'ag', from two threads,
    rank 0 starting with A and rank 1 with B; each pool's group then
    gathers data that names the pool."""
    _quiet()
    pools = {"A": pycomm.CommPool(pycomm.RoleConfig(timeout=20.0)), "B": pycomm.CommPool(pycomm.RoleConfig(timeout=20.0))}
    order = ["A", "B"] if rank == 0 else ["B", "A"]
    made: dict[str, dist.ProcessGroup] = {}
    errors: list[str] = []

    def make(which: str) -> None:
        try:
            made[which] = pools[which].duplicate(None, "ag")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(f"{type(e).__name__}: {e}")

    threads = []
    for which in order:
        threads.append(threading.Thread(target=make, args=(which,)))
        threads[-1].start()
        time.sleep(0.3)  # the first is inside its rendezvous before the second starts
    for t in threads:
        t.join()
    gathered: dict[str, list[float]] = {}
    if not errors:
        for which, salt in (("A", 1.0), ("B", 2.0)):
            out = torch.empty(4 * world, dtype=torch.float64)
            dist.all_gather_into_tensor(out, _payload(rank, salt), group=made[which])
            gathered[which] = out.tolist()
    for pool in pools.values():
        pool.destroy()
    return {"errors": errors, "gathered": gathered}


@pytest.mark.timeout(120)
def test_two_pools_duplicating_in_opposite_orders_meet_their_own_groups() -> None:
    expected = {
        which: torch.cat([_payload(r, salt) for r in range(2)]).tolist()
        for which, salt in (("A", 1.0), ("B", 2.0))
    }
    for r in run_world(two_pools_opposite_orders_world, 2, timeout_seconds=100):
        assert r["errors"] == [], r
        assert r["gathered"] == expected  # bitwise: float64 values compared exactly


def mismatched_pools_world(rank: int, world: int) -> dict:
    _quiet()
    pool = pycomm.CommPool(pycomm.RoleConfig(timeout=2.0), name="left" if rank == 0 else "right")
    started = time.monotonic()
    error = expect_error(pycomm.PoolMismatchError, lambda: pool.duplicate(None, "ag"))
    seconds = time.monotonic() - started
    pool.destroy()
    dist.barrier()  # rank 0 holds the store: it stays until rank 1 is done
    return {"error": error, "seconds": seconds}


@pytest.mark.timeout(120)
def test_members_duplicating_in_different_pools_get_a_named_error_within_the_timeout() -> None:
    left, right = run_world(mismatched_pools_world, 2, timeout_seconds=100)
    assert "this rank duplicates it in pool 'left.1', but ranks [1] were last seen doing so in pools ['right.1']" in left["error"]
    assert "this rank duplicates it in pool 'right.1', but ranks [0] were last seen doing so in pools ['left.1']" in right["error"]
    for r in (left, right):
        assert isinstance(r["seconds"], float) and r["seconds"] < 2.0 + 1.5, r


def pool_names_world(rank: int, world: int) -> dict:
    _quiet()
    named = pycomm.CommPool(name="weights")
    again = expect_error(pycomm.ConfigError, lambda: pycomm.CommPool(name="weights"))
    bad = expect_error(pycomm.ConfigError, lambda: pycomm.CommPool(name="a/b"))
    named.destroy()
    reopened = pycomm.CommPool(name="weights")  # the name came back with destroy()
    gathered = torch.empty(world)
    dist.all_gather_into_tensor(gathered, torch.tensor([float(rank)]), group=reopened.duplicate(None, "ag"))
    reopened.destroy()
    return {"again": again, "bad": bad, "gathered": gathered.tolist()}


@pytest.mark.timeout(120)
def test_an_open_pools_name_is_its_own_until_it_is_destroyed() -> None:
    for r in run_world(pool_names_world, 2, timeout_seconds=100):
        assert "a pool named 'weights' is open in this process already" in r["again"]
        assert "without '/' or ':', got 'a/b'" in r["bad"]
        assert r["gathered"] == [0.0, 1.0]


def members_only_world(rank: int, world: int) -> dict:
    """Ranks 0 and 1 duplicate their subgroup; rank 2 is no member. Then every
    rank makes an ordinary group, which waits on keys named after torch's
    group counter."""
    _quiet()
    pair = dist.new_group([0, 1])
    pool = pycomm.CommPool()
    if rank < 2:
        ag = pool.duplicate(pair, "ag")
        gathered = torch.empty(2)
        dist.all_gather_into_tensor(gathered, torch.tensor([float(rank)]), group=ag)
        assert gathered.tolist() == [0.0, 1.0]
    counter = dist.distributed_c10d._world.group_count
    # A diverged counter names different store keys on each rank, and this
    # new_group then waits for its whole timeout.
    started = time.monotonic()
    everyone = dist.new_group([0, 1, 2], timeout=datetime.timedelta(seconds=15))
    summed = torch.tensor([float(rank + 1)])
    dist.all_reduce(summed, group=everyone)
    seconds = time.monotonic() - started
    pool.destroy()
    return {"counter": counter, "sum": summed.item(), "seconds": seconds}


@pytest.mark.timeout(120)
def test_members_only_duplication_leaves_torchs_group_counter_in_step() -> None:
    results = run_world(members_only_world, 3, timeout_seconds=100)
    assert len({r["counter"] for r in results}) == 1, results
    for r in results:
        assert r["sum"] == 6.0
        assert r["seconds"] < 10.0, r


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_cycles_world(rank: int, world: int, warmup: int, cycles: int) -> dict:
    """duplicate/use/release cycles on one pool: what `cycles` cycles leave
    behind once `warmup` cycles settled the allocator. The CPU communicator
    is torch's fake one: ProcessGroupGloo itself keeps about a kilobyte per
    communicator it made (docs/benchmarks.md), which is torch's, not the
    pool's; everything else a creation makes is real (store connection,
    rendezvous, torch's registration, the backend and its lane thread)."""
    _quiet()
    from pycomm.bench.creation_scale import _fake_comm

    pool = pycomm.CommPool(cpu_comm_factory=_fake_comm)
    group = dist.new_group(list(range(world)))
    store = dist.distributed_c10d._get_default_store()
    registered = len(dist.distributed_c10d._world.pg_map)
    tags = len(dist.distributed_c10d._world.tags_to_pg)
    out = torch.empty(world)

    def cycle() -> None:
        ag = pool.duplicate(group, "ag")
        dist.all_gather_into_tensor(out, torch.tensor([float(rank)]), group=ag)
        pool.release(group, "ag")

    for _ in range(warmup):
        cycle()
    dist.barrier()
    threads, fds = thread_count(), open_fd_count()
    keys = store.num_keys()
    rss = _rss_bytes()
    for _ in range(cycles):
        cycle()
    dist.barrier()
    threads_after, fds_after = settled_counts(threads, fds)
    return {
        "rss_growth": _rss_bytes() - rss,
        "threads": (threads, threads_after),
        "fds": (fds, fds_after),
        "store_keys": (keys, store.num_keys()),
        "registered": (registered, len(dist.distributed_c10d._world.pg_map)),
        "tags": (tags, len(dist.distributed_c10d._world.tags_to_pg)),
    }


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_thousand_duplicate_release_cycles_leave_rss_threads_fds_and_registries_flat(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # torch's flight recorder (on by default) keeps each group's name and
    # ranks for the life of the process, about 1 KiB per pooled group made
    # (docs/observability.md): what is measured here is pycomm's own.
    monkeypatch.setenv("TORCH_FR_BUFFER_SIZE", "0")
    for r in run_world(release_cycles_world, 2, 100, 1000, timeout_seconds=280):
        for count in ("threads", "fds", "store_keys"):
            assert r[count][1] <= r[count][0], r
        assert r["registered"][1] == r["registered"][0], r  # torch's group registry
        assert r["tags"][1] == r["tags"][0], r
        assert r["rss_growth"] <= 1 << 20, r


def gloo_address_keys_world(rank: int, world: int, cycles: int) -> dict:
    """With gloo communicators: the store holds no more keys after `cycles`
    creations and releases than before (gloo's address keys deleted)."""
    _quiet()
    pool = pycomm.CommPool()
    group = dist.new_group(list(range(world)))
    store = dist.distributed_c10d._get_default_store()
    pool.release(group) if pool.duplicate(group, "rs") else None
    dist.barrier()
    keys = store.num_keys()
    for _ in range(cycles):
        pool.duplicate(group, "ag")
        pool.release(group, "ag")
    dist.barrier()
    return {"keys": (keys, store.num_keys())}


@pytest.mark.timeout(120)
def test_creations_with_gloo_communicators_leave_no_store_keys_behind() -> None:
    for r in run_world(gloo_address_keys_world, 3, 20, timeout_seconds=100):
        assert r["keys"][1] <= r["keys"][0], r


_STORE_HOST = """
import datetime, sys, time
import torch.distributed as dist
store = dist.TCPStore("127.0.0.1", int(sys.argv[1]), 1, True, timeout=datetime.timedelta(seconds=20), wait_for_workers=False)
print("serving", flush=True)
time.sleep(600)
"""


def test_duplicate_is_bounded_by_its_timeout_when_the_stores_host_is_gone() -> None:
    """A one-rank world whose store another process serves; that process is
    killed, and duplicate() must give up within its own timeout, not the
    store's (20 s here; torch's default is 30 minutes)."""
    from pycomm.launch.spawn import free_port

    port = free_port()
    host = subprocess.Popen([sys.executable, "-c", _STORE_HOST, str(port)], stdout=subprocess.PIPE)
    try:
        assert host.stdout is not None and host.stdout.readline().strip() == b"serving"
        store = dist.TCPStore("127.0.0.1", port, 1, False, timeout=datetime.timedelta(seconds=20))
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        pool = pycomm.CommPool(pycomm.RoleConfig(timeout=1.0))
        assert pool.duplicate(None, "ag") is not None  # the store's connection for pycomm is made
        host.kill()
        host.wait()
        for role in ("rs", "ag"):  # first a new group, then one released before
            if role == "ag":
                pool.release(dist.group.WORLD, "ag")
            started = time.monotonic()
            with pytest.raises((pycomm.RendezvousTimeoutError, pycomm.CollectiveError)) as e:
                pool.duplicate(None, role)
            seconds = time.monotonic() - started
            assert seconds < 1.0 + 0.5, (role, seconds, str(e.value))
            assert "store" in str(e.value), str(e.value)
        pool.abort()
        # The connects given up on end by themselves, within their own
        # timeout plus torch's back-off between tries.
        deadline = time.monotonic() + 30.0
        while "pycomm-connect" in thread_names() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "pycomm-connect" not in thread_names()
    finally:
        host.kill()
        if dist.is_initialized():
            dist.destroy_process_group()


_EXIT_AFTER_A_DEAD_HOST = """
import datetime, subprocess, sys
import torch.distributed as dist
import pycomm
host = subprocess.Popen([sys.executable, "-c", sys.argv[2], sys.argv[1]], stdout=subprocess.PIPE)
assert host.stdout.readline().strip() == b"serving"
store = dist.TCPStore("127.0.0.1", int(sys.argv[1]), 1, False, timeout=datetime.timedelta(seconds=20))
dist.init_process_group("gloo", store=store, rank=0, world_size=1)
pool = pycomm.CommPool(pycomm.RoleConfig(timeout=1.0))
pool.duplicate(None, "ag")
host.kill()
host.wait()
pool.release(dist.group.WORLD, "ag")
for role in ("rs", "ag"):
    try:
        pool.duplicate(None, role)
    except pycomm.PycommError as e:
        print(type(e).__name__, flush=True)
print("leaving", flush=True)
"""


def test_the_interpreter_exits_cleanly_right_after_a_connect_was_given_up() -> None:
    """A connect given up at its deadline may still be inside torch's C++
    (retrying with a back-off) when the program ends: the interpreter must
    wait for it, not abort (exit 134) under it."""
    from pycomm.launch.spawn import free_port

    done = subprocess.run(
        [sys.executable, "-c", _EXIT_AFTER_A_DEAD_HOST, str(free_port()), _STORE_HOST],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1] == "leaving", done.stdout
    assert "terminate called" not in done.stderr


def test_a_store_that_cannot_be_cloned_keeps_its_own_timeout() -> None:
    """Creations share a default store that cannot be cloned (one written in
    Python): its timeout is the user's and stays as it was."""
    import torch.testing._internal.distributed.fake_pg  # noqa: F401 - registers "fake"

    from pycomm.bench.creation_scale import _counting_store_class, _fake_comm

    store = _counting_store_class()()
    store.set_timeout(datetime.timedelta(seconds=123))
    dist.init_process_group("fake", store=store, rank=0, world_size=1)
    try:
        root = dist.distributed_c10d._get_default_store()
        before = root.timeout
        with pycomm.CommPool(pycomm.RoleConfig(timeout=5.0), cpu_comm_factory=_fake_comm) as pool:
            pool.duplicate(None, "ag")
        assert root.timeout == before
    finally:
        dist.destroy_process_group()
