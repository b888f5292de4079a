"""Faults: a dead peer, ranks issuing different ops, abort/destroy from another
thread and with ops in flight, many create/destroy cycles. Every world is
bounded in time, so a regression fails instead of hanging CI."""

from __future__ import annotations

import os
import signal
import threading
import time
import warnings

import pytest
import torch
import torch.distributed as dist

import pycomm
from pycomm.launch import run_world
from world_checks import expect_error


def _quiet() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)


def dead_peer_world(rank: int, world: int) -> dict:
    _quiet()
    survivors = list(range(world - 1))
    everyone = dist.new_group(list(range(world)))
    survivors_group = dist.new_group(survivors)
    pool = pycomm.CommPool(pycomm.RoleConfig(timeout=20.0))
    ag = pool.duplicate(everyone, role="ag")
    shard = torch.ones(1 << 16)
    out = torch.empty((1 << 16) * world)
    dist.all_gather_into_tensor(out, shard, group=ag)  # everyone is alive here
    if rank == world - 1:
        os.kill(os.getpid(), signal.SIGKILL)  # dies before the next collective
    started = time.monotonic()
    work = dist.all_gather_into_tensor(out, shard, group=ag, async_op=True)
    error = expect_error(pycomm.PycommError, work.wait)
    waited = time.monotonic() - started
    pool.abort()
    pool.abort()  # idempotent
    # The process goes on: a new pool over the surviving ranks works.
    with pycomm.CommPool() as again:
        t = torch.ones(2)
        dist.all_reduce(t, group=again.duplicate(survivors_group, role="ag"))
    return {"error": error, "waited": waited, "after": t.tolist()}


@pytest.mark.timeout(120)
def test_a_dead_peer_fails_wait_and_abort_releases() -> None:
    world = 3
    results = run_world(dead_peer_world, world, timeout_seconds=90, allow_dead=frozenset({world - 1}))
    for r in results[: world - 1]:
        assert r["waited"] < 20.0, r
        assert "role 'ag'" in r["error"] and "all_gather" in r["error"], r["error"]
        assert r["after"] == [2.0, 2.0]


def order_world(rank: int, world: int) -> dict:
    _quiet()
    dp = dist.new_group(list(range(world)))
    pool = pycomm.CommPool(pycomm.RoleConfig(timeout=20.0), check_order=True)
    lane = pool.duplicate(dp, role="ag")
    gathered, shard = torch.empty(8 * world), torch.ones(8)
    reduced, grads = torch.empty(4), torch.ones(4 * world)

    def all_gather():
        return dist.all_gather_into_tensor(gathered, shard, group=lane, async_op=True)

    def reduce_scatter():
        return dist.reduce_scatter_tensor(reduced, grads, group=lane, async_op=True)

    # Rank 0 issues AG then RS, the others RS then AG, on one lane: without the
    # check this is the classic mismatch that hangs or corrupts.
    first, second = (all_gather, reduce_scatter) if rank == 0 else (reduce_scatter, all_gather)
    w1, w2 = first(), second()
    errors = [expect_error(pycomm.OrderMismatchError, w.wait) for w in (w1, w2)]
    # Matching order afterwards works again.
    dist.all_gather_into_tensor(gathered, shard, group=lane)
    pool.destroy()
    return {"errors": errors, "ok_after": gathered.tolist() == [1.0] * 8 * world}


@pytest.mark.timeout(120)
def test_order_check_names_both_ops_instead_of_hanging() -> None:
    results = run_world(order_world, 2, timeout_seconds=90)
    first = results[0]["errors"][0]
    assert "op #0" in first
    assert "all_gather(1 x Float, 8 elements)" in first
    assert "reduce_scatter(1 x Float, 8 elements, SUM)" in first
    assert all(r["ok_after"] for r in results)


def order_check_timeout_world(rank: int, world: int) -> dict:
    _quiet()
    pool = pycomm.CommPool(pycomm.RoleConfig(timeout=2.0), check_order=True)
    lane = pool.duplicate(None, role="ag")
    out: dict = {}
    if rank == 0:  # the others never issue it
        gathered, shard = torch.empty(8 * world), torch.ones(8)
        out["error"] = expect_error(
            pycomm.CollectiveTimeoutError,
            lambda: dist.all_gather_into_tensor(gathered, shard, group=lane),
        )
    dist.barrier()
    pool.abort()
    return out


@pytest.mark.timeout(120)
def test_an_order_check_timeout_names_the_users_op() -> None:
    error = run_world(order_check_timeout_world, 2, timeout_seconds=90)[0]["error"]
    assert "all_gather(Float[8]->[16])" in error, error
    assert "Long" not in error, error


def abort_from_thread_world(rank: int, world: int) -> dict:
    _quiet()
    dp = dist.new_group(list(range(world)))
    pool = pycomm.CommPool(pycomm.RoleConfig(timeout=30.0))
    rs = pool.duplicate(dp, role="rs")
    out: dict = {}
    if rank == 0:
        # The peer issues nothing for a while: the op cannot finish.
        work = dist.reduce_scatter_tensor(torch.empty(4), torch.ones(4 * world), group=rs, async_op=True)
        aborter = threading.Thread(target=lambda: (time.sleep(0.3), pool.abort(), pool.abort()))
        started = time.monotonic()
        aborter.start()
        out["error"] = expect_error(pycomm.PoolClosedError, work.wait)
        out["waited"] = time.monotonic() - started
        aborter.join()
        out["after_abort"] = expect_error(
            pycomm.PoolClosedError, lambda: pool.duplicate(dp, role="ag")
        )
    dist.barrier()
    if rank != 0:
        pool.abort()
    return out


@pytest.mark.timeout(120)
def test_abort_from_another_thread_fails_ops_in_flight_at_once() -> None:
    r = run_world(abort_from_thread_world, 2, timeout_seconds=90)[0]
    assert r["waited"] < 5.0, r
    assert "failed by abort()" in r["error"]
    assert "aborted" in r["after_abort"]


def destroy_waits_world(rank: int, world: int) -> dict:
    _quiet()
    dp = dist.new_group(list(range(world)))
    pool = pycomm.CommPool(pycomm.RoleConfig(timeout=30.0))
    ag = pool.duplicate(dp, role="ag")
    out = torch.empty(2 * world)
    if rank != 0:
        time.sleep(1.0)  # rank 0 destroys while its op waits for this one
    work = dist.all_gather_into_tensor(out, torch.full((2,), float(rank)), group=ag, async_op=True)
    started = time.monotonic()
    pool.destroy()
    waited = time.monotonic() - started
    work.wait()
    return {"waited": waited, "out": out.tolist()}


@pytest.mark.timeout(120)
def test_destroy_with_ops_in_flight_lets_them_finish() -> None:
    results = run_world(destroy_waits_world, 2, timeout_seconds=90)
    assert results[0]["waited"] > 0.5  # it waited for the late peer
    for r in results:
        assert r["out"] == [0.0, 0.0, 1.0, 1.0]
