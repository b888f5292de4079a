"""The rest of c10d's ops on pooled CPU lanes: list forms, reduce, gather,
scatter, all-to-all, point-to-point, the object collectives, all-reduce
coalescing and the bitwise reductions, each bit for bit against the same op
on a plain gloo group of the same ranks, sync and async."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist

import pycomm
from pycomm.launch import run_world
from world_checks import expect_error, rank_tensor, thread_names

DTYPES = (torch.float32, torch.bfloat16, torch.int64)
REDUCE_OPS = {
    "SUM": dist.ReduceOp.SUM,
    "PRODUCT": dist.ReduceOp.PRODUCT,
    "MAX": dist.ReduceOp.MAX,
    "MIN": dist.ReduceOp.MIN,
    "AVG": dist.ReduceOp.AVG,
}
BITWISE_OPS = {"BAND": dist.ReduceOp.BAND, "BOR": dist.ReduceOp.BOR, "BXOR": dist.ReduceOp.BXOR}


def _run(call: Callable[[Any, bool], Any], group: Any, async_op: bool) -> None:
    work = call(group, async_op)
    if async_op:
        work.wait()


def _same(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is b
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))


def _compare(
    checks: list[str],
    name: str,
    make: Callable[[], Any],
    call: Callable[[Any, Any, bool], Any],
    pooled: Any,
    plain: Any,
) -> None:
    """Runs `call(tensors, group, async_op)` on fresh `make()` tensors on both
    groups, sync and async; what each leaves in its tensors must be equal."""
    for async_op in (False, True):
        got, want = make(), make()
        _run(lambda g, a: call(got, g, a), pooled, async_op)
        _run(lambda g, a: call(want, g, a), plain, False)
        assert _same(got, want), (name, async_op, got, want)
        checks.append(f"{name} {'async' if async_op else 'sync'}")


def _uneven_splits(world: int, salt: int) -> list[int]:
    return [(r + salt) % 3 for r in range(world)]


def every_collective_world(rank: int, world: int) -> dict:
    warnings.filterwarnings("ignore", category=FutureWarning)
    plain = dist.new_group(list(range(world)))
    checks: list[str] = []
    n = 5
    last = world - 1
    with pycomm.CommPool() as pool:
        pooled = pool.duplicate(plain, role="ag")
        for dtype in DTYPES:
            d = str(dtype).removeprefix("torch.")
            _compare(
                checks, f"all_gather list {d}",
                lambda: ([torch.empty(n, dtype=dtype) for _ in range(world)], rank_tensor(rank, n, dtype)),
                lambda t, g, a: dist.all_gather(t[0], t[1], group=g, async_op=a),
                pooled, plain,
            )
            for op_name, op in REDUCE_OPS.items():
                if op_name == "AVG" and not dtype.is_floating_point:
                    continue
                if op_name != "AVG":  # gloo's reduce has no AVG
                    _compare(
                        checks, f"reduce {op_name} {d}",
                        lambda: [rank_tensor(rank, n, dtype, salt=1)],
                        lambda t, g, a, op=op: dist.reduce(t[0], group_dst=last, op=op, group=g, async_op=a),
                        pooled, plain,
                    )
                _compare(
                    checks, f"reduce_scatter list {op_name} {d}",
                    lambda: (torch.empty(n, dtype=dtype), [rank_tensor(rank, n, dtype, salt=k) for k in range(world)]),
                    lambda t, g, a, op=op: dist.reduce_scatter(t[0], t[1], op=op, group=g, async_op=a),
                    pooled, plain,
                )
            _compare(
                checks, f"gather {d}",
                lambda: ([torch.empty(n, dtype=dtype) for _ in range(world)] if rank == last else None,
                         rank_tensor(rank, n, dtype, salt=2)),
                lambda t, g, a: dist.gather(t[1], t[0], group_dst=last, group=g, async_op=a),
                pooled, plain,
            )
            _compare(
                checks, f"scatter {d}",
                lambda: (torch.empty(n, dtype=dtype),
                         [rank_tensor(rank, n, dtype, salt=k) for k in range(world)] if rank == 0 else None),
                lambda t, g, a: dist.scatter(t[0], t[1], group_src=0, group=g, async_op=a),
                pooled, plain,
            )
            _compare(
                checks, f"all_to_all_single even {d}",
                lambda: (torch.empty(2 * world, 3, dtype=dtype), rank_tensor(rank, 6 * world, dtype).view(2 * world, 3)),
                lambda t, g, a: dist.all_to_all_single(t[0], t[1], group=g, async_op=a),
                pooled, plain,
            )
            # Rank r sends (r + k) % 3 rows to rank k: splits differ by rank.
            send_splits = [(rank + k) % 3 for k in range(world)]
            recv_splits = [(k + rank) % 3 for k in range(world)]
            _compare(
                checks, f"all_to_all_single uneven {d}",
                lambda: (torch.empty(sum(recv_splits), 2, dtype=dtype),
                         rank_tensor(rank, 2 * sum(send_splits), dtype).view(-1, 2)),
                lambda t, g, a: dist.all_to_all_single(
                    t[0], t[1], output_split_sizes=recv_splits, input_split_sizes=send_splits, group=g, async_op=a
                ),
                pooled, plain,
            )
            # The list form against the plain group's all_to_all_single: gloo's
            # own list form refuses sizes differing by peer (torch's NCCL
            # backend takes them), and torch 2.11's gloo has no list form.
            def even_lists(dtype=dtype):
                return ([torch.empty(3, dtype=dtype) for _ in range(world)],
                        [rank_tensor(rank, 3, dtype, salt=k) for k in range(world)])
            def uneven_lists(dtype=dtype):
                return ([torch.empty((k + rank) % 3 + 1, dtype=dtype) for k in range(world)],
                        [rank_tensor(rank, (rank + k) % 3 + 1, dtype, salt=k) for k in range(world)])
            for shape, lists in (("even", even_lists), ("uneven", uneven_lists)):
                for async_op in (False, True):
                    got, sent = lists()
                    _run(lambda g, a: dist.all_to_all(got, sent, group=g, async_op=a), pooled, async_op)
                    flat = torch.empty(sum(t.numel() for t in got), dtype=dtype)
                    dist.all_to_all_single(flat, torch.cat(sent), output_split_sizes=[t.numel() for t in got],
                                           input_split_sizes=[t.numel() for t in sent], group=plain)
                    assert torch.equal(torch.cat(got), flat), (shape, got, flat)
                    checks.append(f"all_to_all {shape} list {d} {async_op}")
            # all_reduce of several tensors of several sizes in one coalesced op.
            def coalesced(t, g, a, dtype=dtype):
                with dist._coalescing_manager(group=g, async_ops=a) as cm:
                    for tensor in t:
                        dist.all_reduce(tensor, group=g)
                return cm
            _compare(
                checks, f"all_reduce coalesced {d}",
                lambda: [rank_tensor(rank, k + 1, dtype, salt=k) for k in range(3)],
                coalesced, pooled, plain,
            )
        for dtype in (torch.int64, torch.uint8, torch.bool):
            for op_name, op in BITWISE_OPS.items():
                _compare(
                    checks, f"all_reduce {op_name} {dtype}",
                    lambda: [(torch.arange(n) * (rank + 3) + rank).to(dtype)],
                    lambda t, g, a, op=op: dist.all_reduce(t[0], op=op, group=g, async_op=a),
                    pooled, plain,
                )
        out = {"checks": checks, "p2p": _point_to_point(rank, world, pooled, plain)}
        out["objects"] = _objects(rank, world, pooled, plain)
        out["dtensor"] = _dtensor(rank, world, pooled)
        out["errors"] = _errors(rank, world, pooled)
        out["stats"] = pool.stats()
    out["p2p_waiters_left"] = _waiter_threads_after_close()
    return out


def _waiter_threads_after_close(seconds: float = 5.0) -> int:
    """The point-to-point waiter threads still alive once the pool closed
    (each joins once its op ended)."""
    deadline = time.monotonic() + seconds
    while (left := thread_names().count("pycomm-p2p")) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def _point_to_point(rank: int, world: int, pooled: Any, plain: Any) -> dict:
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    out: dict = {}
    for name, group in (("pooled", pooled), ("plain", plain)):
        # A ring through batch_isend_irecv, and through bare isend/irecv: each
        # rank sends before it receives, which a lane holding its send until
        # the peer's recv would deadlock.
        sent = rank_tensor(rank, 7, torch.float32, salt=9)
        got = torch.empty(7)
        ops = [dist.P2POp(dist.isend, sent, group_peer=nxt, group=group),
               dist.P2POp(dist.irecv, got, group_peer=prv, group=group)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        if name == "pooled":
            # A batch around a fast-path all_reduce: no send or recv, so its
            # Work is the all_reduce's (torch's manager keeps only the one
            # endCoalescing returns).
            summed = torch.full((2,), float(rank))
            with dist._coalescing_manager(group, device=torch.device("cpu"), async_ops=True) as cm:
                dist.all_reduce(summed, group=group)
            cm.wait()
            out["coalesced_all_reduce"] = {"works": len(cm.works), "sum": summed.tolist()}
            # isend/irecv inside the manager return no Work of their own.
            inside = torch.empty(3)
            with dist._coalescing_manager(group, device=torch.device("cpu"), async_ops=True) as cm:
                held = [dist.isend(torch.full((3,), float(rank)), group_dst=nxt, group=group),
                        dist.irecv(inside, group_src=prv, group=group)]
            cm.wait()
            out["held"] = {"works": [w is None for w in held], "batch_works": len(cm.works), "got": inside.tolist()}
            # Batches do not nest, and an end needs its start: named errors.
            cpu = torch.device("cpu")
            group._start_coalescing(cpu)
            with pytest.raises(pycomm.UnsupportedOpError, match="batches .* do not nest"):
                group._start_coalescing(cpu)
            group._end_coalescing(cpu)
            with pytest.raises(pycomm.UnsupportedOpError, match="endCoalescing without startCoalescing"):
                group._end_coalescing(cpu)
        bare = torch.empty(7, dtype=torch.int64)
        works = [dist.isend(torch.full((7,), rank * 10 + 1), group_dst=nxt, group=group, tag=4),
                 dist.irecv(bare, group_src=prv, group=group, tag=4)]
        for work in works:
            work.wait()
        # Blocking pairs, with tags told apart: rank 0 sends then receives,
        # rank 1 receives then sends.
        pair = torch.empty(3)
        if rank == 0:
            dist.send(torch.tensor([1.0, 2.0, 3.0]), group_dst=1, group=group, tag=7)
            dist.recv(pair, group_src=1, group=group, tag=8)
        elif rank == 1:
            dist.recv(pair, group_src=0, group=group, tag=7)
            dist.send(pair * 2, group_dst=0, group=group, tag=8)
        # Rank 0 waits for its send while its earlier irecv is still open,
        # and rank 1 sends what that irecv wants only after a second message:
        # a send's end must be seen whatever recv is still waiting.
        late = torch.empty(2)
        if rank == 0:
            pending = dist.irecv(late, group_src=1, group=group, tag=11)
            dist.isend(torch.tensor([5.0, 6.0]), group_dst=1, group=group, tag=12).wait()
            dist.isend(torch.tensor([7.0, 8.0]), group_dst=1, group=group, tag=13).wait()
            pending.wait()
        elif rank == 1:
            first, second = torch.empty(2), torch.empty(2)
            dist.recv(first, group_src=0, group=group, tag=12)
            dist.recv(second, group_src=0, group=group, tag=13)
            dist.send(first + second, group_dst=0, group=group, tag=11)
        out[name] = {"ring": got.tolist(), "bare": bare.tolist(), "pair": pair.tolist() if rank < 2 else None,
                     "late": late.tolist() if rank == 0 else None}
    # A collective issued behind pending receives still runs (the lane moved on).
    return out


def _objects(rank: int, world: int, pooled: Any, plain: Any) -> dict:
    out: dict = {}
    for name, group in (("pooled", pooled), ("plain", plain)):
        mine = {"rank": rank, "payload": list(range(rank + 1))}
        everyone: list = [None] * world
        dist.all_gather_object(everyone, mine, group=group)
        listed = [mine] if rank == 0 else [None]
        dist.broadcast_object_list(listed, group_src=0, group=group)
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(mine, gathered, group_dst=0, group=group)
        received: list = [None]
        dist.scatter_object_list(received, [f"to {k}" for k in range(world)] if rank == 0 else None,
                                 group_src=0, group=group)
        out[name] = {"all": everyone, "broadcast": listed, "gathered": gathered, "scattered": received}
    return out


def _dtensor(rank: int, world: int, pooled: Any) -> dict:
    """DTensor on a mesh of the pooled group: distribute_tensor scatters from
    rank 0, full_tensor all-gathers, Partial to Replicate all-reduces."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    mesh = DeviceMesh.from_group(pooled, "cpu")
    full = torch.arange(4 * world * 3, dtype=torch.float32).view(4 * world, 3) * (1 if rank == 0 else -1)
    sharded = distribute_tensor(full, mesh, [Shard(0)])
    partial = DTensor.from_local(torch.full((2,), float(rank)), mesh, [Partial()])
    return {
        "local": sharded.to_local().tolist(),
        "full": sharded.full_tensor().tolist(),
        "summed": partial.redistribute(mesh, [Replicate()]).to_local().tolist(),
    }


def _errors(rank: int, world: int, pooled: Any) -> dict:
    errors = {
        "bitwise_float": expect_error(
            pycomm.UnsupportedOpError, lambda: dist.all_reduce(torch.ones(2), op=dist.ReduceOp.BAND, group=pooled)
        ),
        "list_size": expect_error(
            pycomm.TensorMismatchError,
            lambda: dist.reduce_scatter(torch.empty(2), [torch.ones(3) for _ in range(world)], group=pooled),
        ),
        "splits": expect_error(
            pycomm.TensorMismatchError,
            lambda: dist.all_to_all_single(torch.empty(4), torch.ones(4), input_split_sizes=[4] + [0] * world,
                                           group=pooled),
        ),
        "any_source": expect_error(pycomm.UnsupportedOpError, lambda: dist.recv(torch.empty(2), group=pooled)),
        "coalesced_gather": expect_error(
            pycomm.UnsupportedOpError,
            lambda: dist.all_gather_coalesced([[torch.empty(1) for _ in range(world)]], [torch.ones(1)], group=pooled),
        ),
    }
    t = torch.ones(2)
    dist.all_reduce(t, group=pooled)  # still usable
    errors["usable"] = t.tolist()
    return errors


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [2, 4])
def test_every_collective_equals_a_plain_group(world: int) -> None:
    results = run_world(every_collective_world, world, timeout_seconds=260)
    for rank, r in enumerate(results):
        # Per dtype: all_gather list, 4 reduces (3 + AVG-less), 5 or 4 list
        # reduce-scatters, gather, scatter, 2 all_to_all_single, 2 all_to_all,
        # all_reduce coalesced; 9 bitwise; each sync and async.
        per_float = 1 + 4 + 5 + 1 + 1 + 2 + 2 + 1
        per_int = per_float - 1
        assert len(r["checks"]) == 2 * (2 * per_float + per_int + 9), r["checks"]
        p2p = r["p2p"]
        assert p2p["pooled"] == p2p["plain"], p2p
        prv = (rank - 1) % world
        assert p2p["pooled"]["ring"] == rank_tensor(prv, 7, torch.float32, salt=9).tolist()
        assert p2p["pooled"]["bare"] == [prv * 10 + 1] * 7
        assert p2p["coalesced_all_reduce"] == {"works": 1, "sum": [float(sum(range(world)))] * 2}, p2p
        assert p2p["held"] == {"works": [True, True], "batch_works": 1, "got": [float(prv)] * 3}, p2p
        if rank == 0:
            assert p2p["pooled"]["pair"] == [2.0, 4.0, 6.0]
            assert p2p["pooled"]["late"] == [12.0, 14.0]
        assert r["p2p_waiters_left"] == 0
        objects = r["objects"]
        assert objects["pooled"] == objects["plain"], objects
        assert objects["pooled"]["all"][world - 1] == {"rank": world - 1, "payload": list(range(world))}
        assert objects["pooled"]["scattered"] == [f"to {rank}"]
        rows = torch.arange(4 * world * 3, dtype=torch.float32).view(4 * world, 3)
        assert r["dtensor"]["local"] == rows[4 * rank : 4 * rank + 4].tolist(), r["dtensor"]  # rank 0's data
        assert r["dtensor"]["full"] == rows.tolist()
        assert r["dtensor"]["summed"] == [float(sum(range(world)))] * 2
        e = r["errors"]
        assert "BAND needs an integer or bool tensor" in e["bitwise_float"], e
        assert "reduce_scatter_list: input 0 has 3 elements, expected 2" in e["list_size"], e
        assert "split sizes" in e["splits"], e
        assert "recv from any source is not supported on pooled groups" in e["any_source"], e
        assert "give recv its source" in e["any_source"]
        assert "all_gather_coalesced" in e["coalesced_gather"], e
        assert e["usable"] == [float(world)] * 2
        row = next(row for row in r["stats"] if row["role"] == "ag")
        assert row["errors"] == 0, row
        assert row["ops_by_kind"]["all_to_all"] >= 2 * len(DTYPES), row
        # Each batch ran as one op (startCoalescing .. endCoalescing), the bare
        # isend/irecv as one each.
        assert row["ops_by_kind"]["batch_isend_irecv"] == 2, row
        assert row["ops_by_kind"]["send"] >= 1 and row["ops_by_kind"]["recv"] >= 1, row
