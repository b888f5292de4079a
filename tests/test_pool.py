"""CommPool on real gloo worlds: results equal a plain group, lanes overlap,
FIFO per lane, lifecycle, registration, bad input."""

from __future__ import annotations

import time
import warnings

import pytest
import torch
import torch.distributed as dist

import pycomm
from pycomm.launch import run_world
from world_checks import (
    expect_error,
    open_fd_count,
    rank_tensor,
    settled_counts,
    thread_count,
    thread_names,
)

DTYPES = (torch.float32, torch.bfloat16, torch.int64)
REDUCE_OPS = {
    "SUM": dist.ReduceOp.SUM,
    "AVG": dist.ReduceOp.AVG,
    "MAX": dist.ReduceOp.MAX,
    "MIN": dist.ReduceOp.MIN,
}


def _quiet() -> None:
    # torch 2.14 renamed the *_into_tensor / *_tensor functions; FSDP trainers
    # still call the old names, which is what these tests exercise.
    warnings.filterwarnings("ignore", category=FutureWarning)


def _coalesced_all_gather(outs, ins, group):
    with dist._coalescing_manager(group=group, async_ops=True) as cm:
        for out, inp in zip(outs, ins):
            dist.all_gather_into_tensor(out, inp, group=group)
    return cm


def _coalesced_reduce_scatter(outs, ins, op, group):
    with dist._coalescing_manager(group=group, async_ops=True) as cm:
        for out, inp in zip(outs, ins):
            dist.reduce_scatter_tensor(out, inp, op=op, group=group)
    return cm


def _compare_every_op(rank: int, world: int, pooled, plain) -> list[str]:
    """Runs every supported op on the pooled group and the plain one, sync and
    async, and returns the names of the checks done (all must be equal)."""
    done = []
    n = 6
    for dtype in DTYPES:
        for async_op in (False, True):
            tag = f"{dtype}-{'async' if async_op else 'sync'}"
            shard = rank_tensor(rank, n, dtype)
            got, want = torch.empty(n * world, dtype=dtype), torch.empty(n * world, dtype=dtype)
            w = dist.all_gather_into_tensor(got, shard, group=pooled, async_op=async_op)
            if async_op:
                w.wait()
            dist.all_gather_into_tensor(want, shard, group=plain)
            assert torch.equal(got, want), (tag, got, want)
            done.append(f"all_gather {tag}")

            full = rank_tensor(rank, n * world, dtype, salt=3)
            for name, op in REDUCE_OPS.items():
                got, want = torch.empty(n, dtype=dtype), torch.empty(n, dtype=dtype)
                if name == "AVG" and not dtype.is_floating_point:
                    msg = expect_error(
                        pycomm.UnsupportedOpError,
                        lambda: dist.reduce_scatter_tensor(got, full, op=op, group=pooled),
                    )
                    assert "AVG" in msg and "floating" in msg, msg
                    continue
                w = dist.reduce_scatter_tensor(got, full, op=op, group=pooled, async_op=async_op)
                if async_op:
                    w.wait()
                dist.reduce_scatter_tensor(want, full, op=op, group=plain)
                assert torch.equal(got, want), (tag, name, got, want)
                done.append(f"reduce_scatter {name} {tag}")

            got, want = rank_tensor(rank, n, dtype, 1), rank_tensor(rank, n, dtype, 1)
            w = dist.all_reduce(got, group=pooled, async_op=async_op)
            if async_op:
                w.wait()
            dist.all_reduce(want, group=plain)
            assert torch.equal(got, want), (tag, got, want)
            done.append(f"all_reduce {tag}")

            root = dist.get_global_rank(plain, world - 1)
            got, want = rank_tensor(rank, n, dtype, 2), rank_tensor(rank, n, dtype, 2)
            w = dist.broadcast(got, src=root, group=pooled, async_op=async_op)
            if async_op:
                w.wait()
            dist.broadcast(want, src=root, group=plain)
            assert torch.equal(got, want), (tag, got, want)
            done.append(f"broadcast {tag}")

            w = dist.barrier(group=pooled, async_op=async_op)
            if async_op:
                w.wait()
            done.append(f"barrier {tag}")

        # Coalesced forms, as trainers issue them through _coalescing_manager.
        shards = [rank_tensor(rank, k + 2, dtype, k) for k in range(3)]
        outs = [torch.empty((k + 2) * world, dtype=dtype) for k in range(3)]
        _coalesced_all_gather(outs, shards, pooled).wait()
        for out, shard in zip(outs, shards):
            want = torch.empty_like(out)
            dist.all_gather_into_tensor(want, shard, group=plain)
            assert torch.equal(out, want), (dtype, out, want)
        done.append(f"all_gather coalesced {dtype}")
        fulls = [rank_tensor(rank, (k + 2) * world, dtype, k) for k in range(3)]
        outs = [torch.empty(k + 2, dtype=dtype) for k in range(3)]
        _coalesced_reduce_scatter(outs, fulls, dist.ReduceOp.SUM, pooled).wait()
        for out, full in zip(outs, fulls):
            want = torch.empty_like(out)
            dist.reduce_scatter_tensor(want, full, group=plain)
            assert torch.equal(out, want), (dtype, out, want)
        done.append(f"reduce_scatter coalesced {dtype}")
    return done


def equivalence_world(rank: int, world: int) -> dict:
    _quiet()
    plain = dist.new_group(list(range(world)))
    with pycomm.CommPool() as pool:
        ag = pool.duplicate(plain, role="ag")
        rs = pool.duplicate(plain, role="rs")
        checks = _compare_every_op(rank, world, ag, plain)
        checks += _compare_every_op(rank, world, rs, plain)
        stats = {row["role"]: row for row in pool.stats()}
    return {"checks": checks, "stats": stats}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", [2, 4])
def test_every_op_equals_a_plain_group(world: int) -> None:
    results = run_world(equivalence_world, world, timeout_seconds=200)
    for r in results:
        # 3 dtypes x 2 modes x (AG + 4 RS ops (3 for int64) + AR + BC + barrier) + 2 coalesced per dtype,
        # on both roles.
        per_role = 2 * (2 * (1 + 4 + 3)) + 2 * (1 + 3 + 3) + 3 * 2
        assert len(r["checks"]) == 2 * per_role
        assert r["stats"]["ag"]["ranks"] == list(range(world))
        assert r["stats"]["ag"]["ops"] > 0 and r["stats"]["rs"]["ops"] > 0
        assert r["stats"]["ag"]["errors"] == 0


def _strided(t: torch.Tensor) -> torch.Tensor:
    """A non-contiguous view with `t`'s values: every other element of a
    buffer twice as long."""
    buffer = torch.zeros(t.numel() * 2, dtype=t.dtype)
    view = buffer[::2]
    view.copy_(t)
    assert not view.is_contiguous()
    return view


def parity_world(rank: int, world: int) -> dict:
    """What gloo groups accept beyond the common case: non-contiguous inputs
    and outputs, complex tensors with AVG."""
    _quiet()
    plain = dist.new_group(list(range(world)))
    n = 5
    checks = []
    with pycomm.CommPool() as pool:
        pooled = pool.duplicate(plain, role="rs")
        shard = _strided(rank_tensor(rank, n, torch.float32))
        got, want = _strided(torch.zeros(n * world)), torch.empty(n * world)
        dist.all_gather_into_tensor(got, shard, group=pooled)
        dist.all_gather_into_tensor(want, shard.contiguous(), group=plain)
        assert torch.equal(got, want), (got, want)
        checks.append("all_gather non-contiguous")

        full = _strided(rank_tensor(rank, n * world, torch.float32, salt=3))
        got, want = _strided(torch.zeros(n)), torch.empty(n)
        dist.reduce_scatter_tensor(got, full, group=pooled)
        dist.reduce_scatter_tensor(want, full.contiguous(), group=plain)
        assert torch.equal(got, want), (got, want)
        checks.append("reduce_scatter non-contiguous")

        got = _strided(rank_tensor(rank, n, torch.float32, 1))
        want = got.clone()
        work = dist.all_reduce(got, group=pooled, async_op=True)
        work.wait()
        dist.all_reduce(want, group=plain)
        assert torch.equal(got, want) and work.result()[0] is not None, (got, want)
        checks.append("all_reduce non-contiguous in place")

        got = _strided(rank_tensor(rank, n, torch.float32, 2))
        want = got.clone()
        dist.broadcast(got, src=0, group=pooled)
        dist.broadcast(want, src=0, group=plain)
        assert torch.equal(got, want), (got, want)
        checks.append("broadcast non-contiguous in place")

        for op_name in ("AVG", "SUM"):
            op = getattr(dist.ReduceOp, op_name)
            full = torch.complex(
                rank_tensor(rank, n * world, torch.float32), rank_tensor(rank, n * world, torch.float32, 1)
            )
            got, want = torch.empty(n, dtype=torch.complex64), torch.empty(n, dtype=torch.complex64)
            dist.reduce_scatter_tensor(got, full, op=op, group=pooled)
            dist.reduce_scatter_tensor(want, full, op=op, group=plain)
            assert torch.equal(got, want), (op_name, got, want)
            checks.append(f"reduce_scatter complex {op_name}")
        # Contiguous views that start inside their storage: the
        # transport copies a reduce-scatter's tensors by address.
        backing_in = rank_tensor(rank, n * world + 3, torch.float32, 3)
        got, want = torch.full((n + 5,), -1.0), torch.full((n + 5,), -1.0)
        dist.reduce_scatter_tensor(got[2:2 + n], backing_in[3:], group=pooled)
        dist.reduce_scatter_tensor(want[2:2 + n], backing_in[3:], group=plain)
        assert torch.equal(got, want) and got[0] == -1.0 and got[-1] == -1.0, (got, want)
        checks.append("reduce_scatter views inside their storage")
        got, want = torch.empty(n * world, dtype=torch.complex64), torch.empty(n * world, dtype=torch.complex64)
        dist.all_gather_into_tensor(got, full[:n].contiguous(), group=pooled)
        dist.all_gather_into_tensor(want, full[:n].contiguous(), group=plain)
        assert torch.equal(got, want)
        checks.append("all_gather complex")
    return {"checks": checks}


@pytest.mark.timeout(120)
def test_non_contiguous_and_complex_tensors_equal_a_plain_group() -> None:
    for r in run_world(parity_world, 2, timeout_seconds=100):
        assert len(r["checks"]) == 8, r


def lanes_world(rank: int, world: int, numel: int) -> dict:
    _quiet()
    dp = dist.new_group(list(range(world)))
    pool = pycomm.CommPool()
    ag = pool.duplicate(dp, role="ag")
    rs = pool.duplicate(dp, role="rs")
    assert pool.duplicate(dp, role="ag") is ag
    assert ag.group_name != rs.group_name

    # AG and RS in flight together, waited out of order.
    overlaps = 0
    rounds = 6
    for i in range(rounds):
        shard = rank_tensor(rank, numel, torch.float32, i)
        gathered = torch.empty(numel * world)
        grads = rank_tensor(rank, numel * world, torch.float32, i + 1)
        reduced = torch.empty(numel)
        w_ag = dist.all_gather_into_tensor(gathered, shard, group=ag, async_op=True)
        w_rs = dist.reduce_scatter_tensor(reduced, grads, group=rs, async_op=True)
        w_rs.wait()
        w_ag.wait()
        want_g, want_r = torch.empty_like(gathered), torch.empty_like(reduced)
        dist.all_gather_into_tensor(want_g, shard, group=dp)
        dist.reduce_scatter_tensor(want_r, grads, group=dp)
        assert torch.equal(gathered, want_g) and torch.equal(reduced, want_r)
    trace = pool.trace()
    ag_ops = [e for e in trace if e["role"] == "ag"]
    rs_ops = [e for e in trace if e["role"] == "rs"]
    for a, r in zip(ag_ops, rs_ops):
        if a["start_us"] < r["end_us"] and r["start_us"] < a["end_us"]:
            overlaps += 1

    # FIFO on one lane: 12 async ops, waited last-first, ran in issue order.
    pool_fifo = pycomm.CommPool()
    lane = pool_fifo.duplicate(dp, role="ag")
    works, outs, shards = [], [], []
    for i in range(12):
        shards.append(rank_tensor(rank, 1000 * (i + 1), torch.float32, i))
        outs.append(torch.empty(1000 * (i + 1) * world))
        works.append(dist.all_gather_into_tensor(outs[-1], shards[-1], group=lane, async_op=True))
    for w in reversed(works):
        w.wait()
    for shard, out in zip(shards, outs):
        want = torch.empty_like(out)
        dist.all_gather_into_tensor(want, shard, group=dp)
        assert torch.equal(out, want)
    fifo = pool_fifo.trace()
    sizes_in_run_order = [e["bytes"] for e in fifo]
    serial = all(b["start_us"] >= a["end_us"] for a, b in zip(fifo, fifo[1:]))
    pool_fifo.destroy()
    pool.destroy()
    return {
        "overlaps": overlaps,
        "rounds": rounds,
        "sizes": sizes_in_run_order,
        "serial": serial,
    }


@pytest.mark.timeout(180)
def test_lanes_overlap_across_roles_and_stay_fifo_within_one() -> None:
    results = run_world(lanes_world, 2, 1 << 20, timeout_seconds=150)
    for r in results:
        assert r["sizes"] == [4 * 1000 * (i + 1) * 2 for i in range(12)]
        assert r["serial"], "ops of one lane overlapped"
        # AG and RS of the same round were in flight at the same time.
        assert r["overlaps"] >= r["rounds"] // 2, r


def reduce_scatter_threads_world(rank: int, world: int) -> list[str]:
    """Reduce-scatters (plain, async, coalesced) on an RS lane; the names of
    this rank's threads afterwards."""
    _quiet()
    dp = dist.new_group(list(range(world)))
    with pycomm.CommPool() as pool:
        rs = pool.duplicate(dp, role="rs")
        out = torch.empty(2)
        dist.reduce_scatter_tensor(out, torch.arange(2.0 * world), group=rs)
        assert out.tolist() == [world * (2.0 * rank + i) for i in range(2)]
        w = dist.reduce_scatter_tensor(out, torch.ones(2 * world), op=dist.ReduceOp.MAX, group=rs, async_op=True)
        w.wait()
        assert out.tolist() == [1.0, 1.0]
        _coalesced_reduce_scatter([out], [torch.ones(2 * world)], dist.ReduceOp.SUM, rs).wait()
        assert out.tolist() == [float(world)] * 2
        return thread_names()


@pytest.mark.timeout(120)
def test_reduce_scatter_completes_on_gloo_threads_without_a_waiter() -> None:
    # gloo's reduce-scatter Work has no future; the pool issues it through
    # gloo's all-reduce, whose future completes it on gloo's own worker.
    for names in run_world(reduce_scatter_threads_world, 2, timeout_seconds=100):
        assert "pycomm-wait" not in names, names


def cycles_world(rank: int, world: int, cycles: int) -> dict:
    """create / use / destroy (or abort, every other cycle) `cycles` times;
    threads and open fds before and after."""
    _quiet()
    dp = dist.new_group(list(range(world)))
    # Warm up once so torch's own lazily created threads are in the baseline.
    with pycomm.CommPool() as warm:
        dist.barrier(group=warm.duplicate(dp, role="rs"))
    # The warm-up connected to the store on a helper thread; join() returns
    # as it ends, but the kernel may list it a moment longer, and later
    # creations reuse that connection: count without it.
    deadline = time.monotonic() + 5.0
    while "pycomm-connect" in thread_names() and time.monotonic() < deadline:
        time.sleep(0.01)
    threads0, fds0 = thread_count(), open_fd_count()
    for i in range(cycles):
        pool = pycomm.CommPool()
        ag = pool.duplicate(dp, role="ag")
        rs = pool.duplicate(dp, role="rs")
        gathered = torch.empty(world)
        w1 = dist.all_gather_into_tensor(gathered, torch.tensor([float(rank + i)]), group=ag, async_op=True)
        reduced = torch.empty(2)
        w2 = dist.reduce_scatter_tensor(reduced, torch.ones(2 * world), group=rs, async_op=True)
        w1.wait()
        w2.wait()
        assert gathered.tolist() == [float(r + i) for r in range(world)]
        assert reduced.tolist() == [float(world)] * 2
        if i % 2:
            pool.abort()
            pool.abort()  # idempotent
        else:
            pool.destroy()
            pool.destroy()
    # abort() drops the last communicator on a short-lived thread (it must not
    # wait for peers): give it a moment, bounded, to finish.
    threads, fds = settled_counts(threads0, fds0)
    return {"threads": (threads0, threads), "fds": (fds0, fds)}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world,cycles", [(2, 20), (4, 50)])
def test_create_use_destroy_cycles_leak_no_thread_or_fd(world: int, cycles: int) -> None:
    results = run_world(cycles_world, world, cycles, timeout_seconds=280)
    for r in results:
        before, after = r["threads"]
        assert after == before, r
        before, after = r["fds"]
        assert after <= before, r


def registration_world(rank: int, world: int) -> dict:
    _quiet()
    # Two disjoint base groups; only their members duplicate them, at the
    # same time, and nobody else takes part.
    pair = [0, 1] if rank < 2 else [2, 3]
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    mine = groups[0] if rank < 2 else groups[1]
    other = groups[1] if rank < 2 else groups[0]
    pool = pycomm.CommPool()
    out: dict = {}
    if rank in (0, 1):
        # Ranks 2 and 3 are busy elsewhere: creation must not need them.
        ag = pool.duplicate(mine, role="ag")
        out["ranks"] = dist.get_process_group_ranks(ag)
        out["group_rank"] = dist.get_rank(ag)
        out["backend"] = str(dist.get_backend(ag))
        t = torch.tensor([float(rank)])
        g = torch.empty(2)
        dist.all_gather_into_tensor(g, t, group=ag)
        out["gathered"] = g.tolist()
    dist.barrier()  # everybody, on the world group
    if rank in (2, 3):
        ag = pool.duplicate(mine, role="ag")
        out["ranks"] = dist.get_process_group_ranks(ag)
        out["group_rank"] = dist.get_rank(ag)

    # Bad input: named errors, and the pool stays usable after each.
    errors: dict[str, str] = {}
    errors["role"] = expect_error(pycomm.UnknownRoleError, lambda: pool.duplicate(mine, role="xx"))
    errors["member"] = expect_error(pycomm.NotAMemberError, lambda: pool.duplicate(other, role="ag"))
    ag = pool.duplicate(mine, role="ag")
    errors["size"] = expect_error(
        pycomm.TensorMismatchError,
        lambda: dist.all_gather_into_tensor(torch.empty(5), torch.empty(2), group=ag),
    )
    errors["dtype"] = expect_error(
        pycomm.TensorMismatchError,
        lambda: dist.all_gather_into_tensor(torch.empty(4, dtype=torch.int64), torch.empty(2), group=ag),
    )
    errors["rs_size"] = expect_error(
        pycomm.TensorMismatchError,
        lambda: dist.reduce_scatter_tensor(torch.empty(3), torch.empty(4), group=ag),
    )
    errors["op"] = expect_error(
        pycomm.UnsupportedOpError,
        lambda: dist.all_reduce(torch.ones(2), op=dist.ReduceOp.BXOR, group=ag),
    )
    errors["premul"] = expect_error(
        pycomm.UnsupportedOpError,
        lambda: dist.all_reduce(
            torch.ones(2, dtype=torch.int64), op=dist._make_nccl_premul_sum(2.0), group=ag
        ),
    )
    errors["sparse"] = expect_error(
        pycomm.TensorMismatchError,
        lambda: dist.all_reduce(torch.ones(4, 2).to_sparse(), group=ag),
    )
    # torch's front end lets a complex reduce-scatter through to the backend.
    errors["complex_max"] = expect_error(
        pycomm.UnsupportedOpError,
        lambda: dist.reduce_scatter_tensor(
            torch.empty(1, dtype=torch.complex64), torch.ones(2, dtype=torch.complex64),
            op=dist.ReduceOp.MAX, group=ag,
        ),
    )
    # As torch's NCCL backend: only element counts must agree, and the
    # output holds the inputs one after another.
    zero_dim = torch.empty(2)
    dist.all_gather_into_tensor(zero_dim, torch.tensor(dist.get_rank(ag) + 0.5), group=ag)
    out["zero_dim_gather"] = zero_dim.tolist()
    reshaped = torch.empty(3, 4)
    dist.all_gather_into_tensor(reshaped, torch.full((2, 3), float(rank)), group=ag)
    out["reshaped_gather"] = reshaped.flatten().tolist()
    t = torch.ones(3)
    dist.all_reduce(t, group=ag)  # still usable
    out["usable_after_errors"] = t.tolist()
    out["errors"] = errors

    # The conventional teardown works on pooled groups.
    dist.destroy_process_group(ag)
    pool.destroy()
    errors["destroyed"] = expect_error(pycomm.PoolClosedError, lambda: pool.duplicate(mine, role="ag"))
    with pycomm.CommPool() as again:
        ag2 = again.duplicate(mine, role="ag")
        t = torch.ones(1)
        dist.all_reduce(t, group=ag2)
        out["after_recreate"] = t.item()
    return out


@pytest.mark.timeout(180)
def test_registration_membership_and_bad_input() -> None:
    results = run_world(registration_world, 4, timeout_seconds=150)
    for rank, r in enumerate(results):
        pair = [0, 1] if rank < 2 else [2, 3]
        assert r["ranks"] == pair
        assert r["group_rank"] == rank % 2
        assert r["usable_after_errors"] == [2.0, 2.0, 2.0]
        assert r["after_recreate"] == 2.0
        e = r["errors"]
        assert "unknown role 'xx'" in e["role"] and "'ag', 'rs'" in e["role"]
        assert f"rank {rank} is not a member" in e["member"]
        assert "expected input size 2 x group size 2 = 4" in e["size"]
        assert "dtype" in e["dtype"]
        assert "reduce_scatter" in e["rs_size"]
        assert "all_reduce with BXOR needs an integer or bool tensor, got Float[2]" in e["op"], e["op"]
        assert "PREMUL_SUM needs a half, float, bfloat16 or double tensor" in e["premul"], e["premul"]
        assert "sparse" in e["sparse"], e["sparse"]
        assert "reduce_scatter with MAX does not support complex tensors" in e["complex_max"], e
        assert r["zero_dim_gather"] == [0.5, 1.5]
        assert r["reshaped_gather"] == [float(p) for p in pair for _ in range(6)]
        assert "destroyed" in e["destroyed"]
    assert results[0]["backend"] == "pycomm"
    assert results[0]["gathered"] == [0.0, 1.0]


def missing_member_world(rank: int, world: int) -> dict:
    dp = dist.new_group(list(range(world)))
    pool = pycomm.CommPool(pycomm.RoleConfig(timeout=3.0))
    out: dict = {}
    if rank != world - 1:
        out["error"] = expect_error(
            pycomm.RendezvousTimeoutError, lambda: pool.duplicate(dp, role="rs")
        )
    pool.destroy()
    return out


@pytest.mark.timeout(120)
def test_a_member_that_never_comes_is_named_not_waited_for() -> None:
    results = run_world(missing_member_world, 2, timeout_seconds=60)
    message = results[0]["error"]
    assert "ranks [1] did not call duplicate() within 3 s" in message
    assert "role 'rs'" in message


def test_build_info_reports_the_build() -> None:
    info = pycomm.build_info()
    assert info["pycomm"] == pycomm.__version__
    assert info["torch"] == torch.__version__
    assert "gloo" in info["transports"]
    assert isinstance(info["cuda"], bool)
    assert (info["nccl"] is None) == (not info["cuda"])


def test_unknown_role_needs_no_world() -> None:
    with pytest.raises(pycomm.UnknownRoleError):
        pycomm.CommPool().duplicate(None, role="allgather")


def test_duplicate_before_init_is_a_named_error() -> None:
    with pytest.raises(pycomm.NotInitializedError):
        pycomm.CommPool().duplicate(None, role="ag")


def premul_world(rank: int, world: int) -> dict:
    """PREMUL_SUM (what Megatron-FSDP's gradient_reduce_div_fusion and
    FSDP2's gradient divide factor pass) against what it means on a plain
    gloo group, which refuses it: each rank's input times the factor, then
    SUM."""
    _quiet()
    plain = dist.new_group(list(range(world)))
    out: dict = {"equal": [], "inputs_kept": []}
    with pycomm.CommPool() as pool:
        rs = pool.duplicate(plain, role="rs")
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            grads = (torch.arange(8 * world, dtype=torch.float32) / 7 + rank).to(dtype)
            for factor in (0.125, torch.tensor([1 / 3], dtype=dtype)):
                op = dist._make_nccl_premul_sum(factor)
                pooled_out = torch.empty(8, dtype=dtype)
                sent = grads.clone()
                dist.reduce_scatter_tensor(pooled_out, sent, op=op, group=rs)
                plain_out = torch.empty(8, dtype=dtype)
                dist.reduce_scatter_tensor(plain_out, grads * factor, op=dist.ReduceOp.SUM, group=plain)
                out["equal"].append(torch.equal(pooled_out, plain_out))
                out["inputs_kept"].append(torch.equal(sent, grads))
                reduced = grads.clone()
                dist.all_reduce(reduced, op=op, group=rs)
                expected = grads * factor
                dist.all_reduce(expected, op=dist.ReduceOp.SUM, group=plain)
                out["equal"].append(torch.equal(reduced, expected))
        out["untyped_factor"] = expect_error(
            pycomm.UnsupportedOpError,
            lambda: dist.all_reduce(
                torch.ones(2), op=dist._make_nccl_premul_sum(torch.tensor([2.0], dtype=torch.float64)), group=rs
            ),
        )
    return out


def test_premul_sum_scales_each_ranks_input_then_sums_bitwise_as_defined() -> None:
    for r in run_world(premul_world, 2):
        assert r["equal"] == [True] * 16  # 4 dtypes x 2 factors x (RS, AR)
        assert r["inputs_kept"] == [True] * 8  # the reduce-scatter's input is left as it was
        assert "factor tensor must have one element of the input's type" in r["untyped_factor"]
