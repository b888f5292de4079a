"""The NCCL lanes with several ranks on the GPUs there are (marked cuda;
skipped without one). NCCL (2.30) runs several ranks on one GPU with
NCCL_MULTI_RANK_GPU_ENABLE=1, so one GPU runs the paths a world of size 1
never takes: peers, NCCL's group thread, ncclInProgress, real kernels on two
lane streams. Results are compared with torch's NCCL backend on the same
rank-dependent tensors."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
import torch
import torch.distributed as dist

import pycomm
from pycomm import CollectiveTimeoutError, PoolClosedError, RoleConfig, _C
from pycomm.launch import run_world as _run_world
from pycomm.nccl import torch_nccl_runtime_version

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not (_C.cuda_built and torch.cuda.is_available()),
        reason="needs the CUDA build and a GPU",
    ),
]

WORLD_SIZES = [1, 2, 4]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8]
BACKEND = "cpu:gloo,cuda:nccl"


def run_world(fn: Any, world: int, **kwargs: Any) -> list[Any]:
    """run_world, skipped where the ranks cannot share the GPUs there are:
    NCCL before 2.30 refuses two ranks on one GPU ("Duplicate GPU
    detected"), and NCCL_MULTI_RANK_GPU_ENABLE is 2.30's."""
    gpus = torch.cuda.device_count()
    nccl = torch_nccl_runtime_version()
    if world > gpus and nccl < 23000:
        pytest.skip(f"{world} ranks on {gpus} GPU(s) need NCCL 2.30 or later; torch runs NCCL {nccl}")
    return _run_world(fn, world, **kwargs)


@pytest.fixture(autouse=True)
def _several_ranks_per_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NCCL_MULTI_RANK_GPU_ENABLE", "1")
    # Errors are asserted here, so they must not end the ranks.
    monkeypatch.setenv("PYCOMM_NCCL_ASYNC_ERROR_HANDLING", "0")


def _rank_data(rank: int, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Small integers: sums, products (at most 3^4) and averages are exact.
    return ((torch.arange(n, device=device) + rank) % 3 + 1).to(dtype)


def _results_rank(rank: int, world: int) -> dict[str, Any]:
    device = torch.device("cuda", torch.cuda.current_device())
    checked = 0
    with pycomm.CommPool() as pool:
        ag = pool.duplicate(dist.group.WORLD, "ag")
        rs = pool.duplicate(dist.group.WORLD, "rs")
        rows = {r["role"]: r["nccl"] for r in pool.stats()}
        for dtype in DTYPES:
            shard = _rank_data(rank, 1024, dtype, device)
            full = _rank_data(rank, 1024 * world, dtype, device)
            out, ref = torch.empty(1024 * world, dtype=dtype, device=device), torch.empty(
                1024 * world, dtype=dtype, device=device
            )
            for group in (ag, rs):
                dist.all_gather_into_tensor(out, shard, group=group)
                dist.all_gather_into_tensor(ref, shard)
                assert torch.equal(out, ref), (dtype, "all_gather")
                ops = [dist.ReduceOp.SUM, dist.ReduceOp.MAX, dist.ReduceOp.MIN, dist.ReduceOp.PRODUCT]
                if dtype.is_floating_point:
                    ops.append(dist.ReduceOp.AVG)
                for op in ops:
                    got = torch.empty(1024, dtype=dtype, device=device)
                    want = torch.empty_like(got)
                    dist.reduce_scatter_tensor(got, full, op=op, group=group)
                    dist.reduce_scatter_tensor(want, full, op=op)
                    assert torch.equal(got, want), (dtype, op)
                    y, y_ref = shard.clone(), shard.clone()
                    dist.all_reduce(y, op=op, group=group)
                    dist.all_reduce(y_ref, op=op)
                    assert torch.equal(y, y_ref), (dtype, op, "all_reduce")
                    checked += 2
                b, b_ref = shard.clone(), shard.clone()
                dist.broadcast(b, src=world - 1, group=group)
                dist.broadcast(b_ref, src=world - 1)
                assert torch.equal(b, b_ref), (dtype, "broadcast")
                checked += 2
        # Coalesced forms, several dtypes in one unit.
        parts = [(3, torch.float32), (1000, torch.bfloat16), (77, torch.int64)]
        ins = [_rank_data(rank, n, t, device) for n, t in parts]
        outs = [torch.empty(n * world, dtype=t, device=device) for n, t in parts]
        with dist._coalescing_manager(group=ag, device=device, async_ops=True) as cm:
            for o, i in zip(outs, ins):
                dist.all_gather_into_tensor(o, i, group=ag)
        cm.wait()
        for (n, t), o in zip(parts, outs):
            ref = torch.empty_like(o)
            dist.all_gather_into_tensor(ref, _rank_data(rank, n, t, device))
            assert torch.equal(o, ref)
        torch.cuda.synchronize()
        errors = sum(r["errors"] for r in pool.stats())
    return {"checked": checked, "ag_split": rows["ag"]["created_by_split"],
            "rs_split": rows["rs"]["created_by_split"], "errors": errors}


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_results_equal_torch_nccl(world: int) -> None:
    results = run_world(_results_rank, world, backend=BACKEND, timeout_seconds=300)
    for r in results:
        assert r["errors"] == 0
        assert r["ag_split"] is False and r["rs_split"] is True  # init path, then split path
        assert r["checked"] > 100


def _premul_and_timing_rank(rank: int, world: int) -> dict[str, Any]:
    """PREMUL_SUM (scalar and device-tensor factor) against torch's own NCCL
    group, and Work._get_duration() of a lane made under
    TORCH_NCCL_ENABLE_TIMING, next to torch's."""
    device = torch.device("cuda", torch.cuda.current_device())
    os.environ["TORCH_NCCL_ENABLE_TIMING"] = "1"
    equal = []
    with pycomm.CommPool() as pool:
        rs = pool.duplicate(dist.group.WORLD, "rs")
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            full = _rank_data(rank, 1024 * world, dtype, device)
            for factor in (0.5, torch.tensor([0.25], dtype=dtype, device=device)):
                got, want = torch.empty(1024, dtype=dtype, device=device), torch.empty(1024, dtype=dtype, device=device)
                dist.reduce_scatter_tensor(got, full, op=dist._make_nccl_premul_sum(factor), group=rs)
                dist.reduce_scatter_tensor(want, full, op=dist._make_nccl_premul_sum(factor))
                equal.append(torch.equal(got, want))
        work = dist.all_reduce(torch.ones(1 << 20, device=device), group=rs, async_op=True)
        work.wait()
        torch.cuda.synchronize()
        duration = work._get_duration()
    return {"equal": equal, "duration_ms": duration}


@pytest.mark.parametrize("world", [2, 4])
def test_premul_sum_equals_torch_nccl_and_ops_are_timed(world: int) -> None:
    for r in run_world(_premul_and_timing_rank, world, backend=BACKEND, timeout_seconds=300):
        assert r["equal"] == [True] * 8
        assert 0.0 < r["duration_ms"] < 10_000.0


def _list_forms_on(group: Any, rank: int, world: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """The results of list all_gather, list reduce_scatter, reduce, gather,
    scatter and the all-to-alls (uneven splits) on `group`, in that order."""
    shard = _rank_data(rank, 1024, dtype, device)
    results = []
    outs = [torch.empty(1024, dtype=dtype, device=device) for _ in range(world)]
    dist.all_gather(outs, shard, group=group)
    results.append(torch.cat(outs))
    parts = [_rank_data(rank + k, 1024, dtype, device) for k in range(world)]
    out = torch.empty(1024, dtype=dtype, device=device)
    dist.reduce_scatter(out, parts, group=group)
    results.append(out)
    reduced = shard.clone()
    dist.reduce(reduced, dst=world - 1, group=group)
    results.append(reduced)
    gathered = [torch.zeros_like(shard) for _ in range(world)] if rank == world - 1 else None
    dist.gather(shard, gathered, dst=world - 1, group=group)
    results.append(torch.cat(gathered) if gathered is not None else shard)
    scattered = torch.zeros_like(shard)
    dist.scatter(scattered, parts if rank == 1 % world else None, src=1 % world, group=group)
    results.append(scattered)
    rows = [(rank + q) % 3 + 1 for q in range(world)]
    received = [(q + rank) % 3 + 1 for q in range(world)]
    sent = _rank_data(rank, 2 * sum(rows), dtype, device).view(-1, 2)
    out = torch.zeros(sum(received), 2, dtype=dtype, device=device)
    dist.all_to_all_single(out, sent, received, rows, group=group)
    results.append(out)
    outs = [torch.zeros(r, 2, dtype=dtype, device=device) for r in received]
    dist.all_to_all(outs, list(sent.split(rows)), group=group)
    results.append(torch.cat(outs))
    return results


def _list_forms_rank(rank: int, world: int) -> dict[str, Any]:
    """List all_gather, list reduce_scatter, reduce, gather, scatter and the
    all-to-alls on the NCCL lane against torch's own NCCL group, then
    batch_isend_irecv's ring and a lone send and recv."""
    device = torch.device("cuda", torch.cuda.current_device())
    same = []
    with pycomm.CommPool() as pool:
        rs = pool.duplicate(dist.group.WORLD, "rs")
        for dtype in DTYPES:
            pooled = _list_forms_on(rs, rank, world, dtype, device)
            plain = _list_forms_on(None, rank, world, dtype, device)
            same.extend(torch.equal(a, b) for a, b in zip(pooled, plain))
        # batch_isend_irecv's ring (one NCCL group on the lane), then a lone
        # send and its recv (rank 0 to rank 1), on the lane and on torch's.
        p2p = []
        for group in (rs, None):
            sent = _rank_data(rank, 1024, torch.float32, device)
            got = torch.zeros_like(sent)
            ops = [dist.P2POp(dist.isend, sent, (rank + 1) % world, group=group),
                   dist.P2POp(dist.irecv, got, (rank - 1) % world, group=group)]
            for work in dist.batch_isend_irecv(ops):
                work.wait()
            lone = torch.zeros(4, device=device)
            if rank == 0:
                dist.send(torch.arange(4.0, device=device) + 1, dst=1, group=group)
            elif rank == 1:
                dist.recv(lone, src=0, group=group)
            p2p.append((got, lone))
        torch.cuda.synchronize()
        ring_ok = torch.equal(p2p[0][0], _rank_data((rank - 1) % world, 1024, torch.float32, device))
        p2p_same = [torch.equal(a, b) for a, b in zip(p2p[0], p2p[1])]
    return {"same": same, "ring_ok": ring_ok, "p2p_same": p2p_same}


@pytest.mark.parametrize("world", [2, 4])
def test_list_forms_and_reduce_equal_torch_nccl(world: int) -> None:
    for r in run_world(_list_forms_rank, world, backend=BACKEND, timeout_seconds=300):
        assert r["same"] == [True] * (7 * len(DTYPES)), r["same"]
        assert r["ring_ok"] and r["p2p_same"] == [True, True], r


def _graph_steps(group_ag: Any, group_rs: Any, rank: int, world: int, device: torch.device) -> list[bool]:
    """An all-gather and a reduce-scatter captured in one CUDA graph (after a
    warm-up on a side stream, as torch.cuda.graph asks), replayed twice with
    new inputs; whether each replay's results are exact."""
    shard = torch.zeros(1024, device=device)
    gathered = torch.zeros(1024 * world, device=device)
    grads = torch.zeros(1024 * world, device=device)
    reduced = torch.zeros(1024, device=device)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        dist.all_gather_into_tensor(gathered, shard, group=group_ag)
        dist.reduce_scatter_tensor(reduced, grads, group=group_rs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        works = [
            dist.all_gather_into_tensor(gathered, shard, group=group_ag, async_op=True),
            dist.reduce_scatter_tensor(reduced, grads, group=group_rs, async_op=True),
        ]
        for work in works:
            work.wait()
    exact = []
    base = torch.arange(1024 * world, device=device, dtype=torch.float32)
    for step in (1.0, 2.0):
        shard.fill_(step * 10 + rank)
        grads.copy_(base * (rank + 1) * step)
        graph.replay()
        torch.cuda.synchronize()
        expected_gathered = torch.cat([torch.full((1024,), step * 10 + q, device=device) for q in range(world)])
        expected_reduced = sum(base[rank * 1024:(rank + 1) * 1024] * (q + 1) * step for q in range(world))
        exact.append(torch.equal(gathered, expected_gathered) and torch.equal(reduced, expected_reduced))
    return exact


def _graph_rank(rank: int, world: int) -> dict[str, Any]:
    device = torch.device("cuda", torch.cuda.current_device())
    with pycomm.CommPool() as pool:
        ag = pool.duplicate(dist.group.WORLD, "ag")
        rs = pool.duplicate(dist.group.WORLD, "rs")
        pooled = _graph_steps(ag, rs, rank, world, device)
        plain = _graph_steps(None, None, rank, world, device)
        torch.cuda.synchronize()
    return {"pooled": pooled, "plain": plain}


@pytest.mark.parametrize("world", [2, 4])
def test_graph_capture_and_replay_equal_torch_nccl(world: int) -> None:
    """Both lanes' ops captured in one torch.cuda.graph and replayed twice:
    exact results, as torch's own NCCL group gives in the same graph."""
    for r in run_world(_graph_rank, world, backend=BACKEND, timeout_seconds=300):
        assert r == {"pooled": [True, True], "plain": [True, True]}, r


def _fsdp2_allocating_rank(rank: int, world: int) -> dict[str, Any]:
    """FSDP2 with set_allocate_memory_from_process_group_for_comm(True), on
    pooled groups and on torch's own: the same losses, and the pooled
    buffers in ncclMemAlloc memory through the pooled group's allocate_tensor."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import pycomm.fsdp as pf

    device = torch.device("cuda", torch.cuda.current_device())
    mesh = init_device_mesh("cuda", (world,))
    losses: dict[str, list[float]] = {}
    with pycomm.CommPool() as pool:
        for name in ("plain", "pooled"):
            torch.manual_seed(0)
            model = torch.nn.Sequential(*[torch.nn.Linear(64, 64, device=device) for _ in range(3)])
            for layer in model:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            if name == "pooled":
                pf.use_pool(model, pool)
            model.set_allocate_memory_from_process_group_for_comm(True)
            optim = torch.optim.SGD(model.parameters(), lr=0.1)
            losses[name] = []
            for step in range(3):
                torch.manual_seed(100 + step)
                x = torch.randn(8, 64, device=device)
                loss = model(x).square().mean()
                loss.backward()
                optim.step()
                optim.zero_grad()
                losses[name].append(loss.item())
        ag = pool.duplicate(dist.group.WORLD, "ag")
        backend = ag._get_backend(device)
        buffer = backend.allocate_tensor(1024, dtype=torch.bfloat16, device=device)
        supported = backend.supports_tensor_alloc(device)
        torch.cuda.synchronize()
    return {"losses": losses, "supported": supported, "buffer": (buffer.device.type, buffer.numel())}


def test_fsdp2_allocating_from_pooled_groups_equals_torch_nccl() -> None:
    for r in run_world(_fsdp2_allocating_rank, 2, backend=BACKEND, timeout_seconds=300):
        assert r["losses"]["pooled"] == r["losses"]["plain"], r["losses"]
        assert r["supported"] is True and r["buffer"] == ("cuda", 1024), r


def _overlap_rank(rank: int, world: int) -> dict[str, Any]:
    device = torch.device("cuda", torch.cuda.current_device())
    with pycomm.CommPool() as pool:
        ag = pool.duplicate(dist.group.WORLD, "ag")
        rs = pool.duplicate(dist.group.WORLD, "rs")
        shard = torch.randn(32 << 20, device=device)
        gathered = torch.empty(shard.numel() * world, device=device)
        grads = torch.randn(shard.numel() * world, device=device)
        a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)

        def step() -> None:
            w1 = dist.all_gather_into_tensor(gathered, shard, group=ag, async_op=True)
            w2 = dist.reduce_scatter_tensor(shard.clone(), grads, group=rs, async_op=True)
            for _ in range(8):
                a @ a
            w1.wait()
            w2.wait()

        for _ in range(2):
            step()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
    spans: dict[str, list[tuple[float, float, int]]] = {"ag": [], "rs": [], "gemm": []}
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = e.name.lower()
        kind = "ag" if "allgather" in name else "rs" if "reducescatter" in name else (
            "gemm" if "gemm" in name or "nvjet" in name or "cutlass" in name else None
        )
        if kind:
            spans[kind].append((e.time_range.start, e.time_range.end, 0))

    def overlaps(x: list, y: list) -> bool:
        return any(a0 < b1 and b0 < a1 for a0, a1, _ in x for b0, b1, _ in y)

    return {
        "counts": {k: len(v) for k, v in spans.items()},
        "ag_rs": overlaps(spans["ag"], spans["rs"]),
        "ag_gemm": overlaps(spans["ag"], spans["gemm"]),
        "rs_gemm": overlaps(spans["rs"], spans["gemm"]),
    }


def test_ag_and_rs_lanes_overlap_each_other_and_gemms() -> None:
    results = run_world(_overlap_rank, 2, backend=BACKEND, timeout_seconds=300)
    for r in results:
        assert min(r["counts"].values()) > 0, r
        assert r["ag_rs"] and r["ag_gemm"] and r["rs_gemm"], r


def _timeout_rank(rank: int, world: int) -> float:
    device = torch.device("cuda", torch.cuda.current_device())
    pool = pycomm.CommPool()
    ag = pool.duplicate(dist.group.WORLD, "ag", RoleConfig(timeout=3))
    x = torch.ones(1024, device=device)
    out = torch.empty(1024 * world, device=device)
    elapsed = 0.0
    if rank == 0:  # rank 1 skips the op
        start = time.monotonic()
        work = dist.all_gather_into_tensor(out, x, group=ag, async_op=True)
        with pytest.raises(CollectiveTimeoutError, match="all_gather"):
            work.wait(timeout=__import__("datetime").timedelta(seconds=30))
        elapsed = time.monotonic() - start
    dist.barrier(group=dist.new_group(backend="gloo"))
    pool.abort()
    return elapsed


def test_peer_that_skips_an_op_times_out_by_name() -> None:
    elapsed = run_world(_timeout_rank, 2, backend=BACKEND, timeout_seconds=120)[0]
    assert 3.0 <= elapsed <= 5.0, elapsed


def _abort_rank(rank: int, world: int) -> float:
    device = torch.device("cuda", torch.cuda.current_device())
    pool = pycomm.CommPool()
    ag = pool.duplicate(dist.group.WORLD, "ag", RoleConfig(timeout=600))
    rs = pool.duplicate(dist.group.WORLD, "rs", RoleConfig(timeout=600))
    x = torch.ones(1024, device=device)
    works = []
    if rank == 0:  # hangs on both lanes: rank 1 issues neither
        works.append(dist.reduce_scatter_tensor(x[:512], x, group=rs, async_op=True))
        works[-1].wait()  # the caller's stream now waits on the hung op
        works.append(dist.all_gather_into_tensor(torch.empty(2048, device=device), x, group=ag, async_op=True))
    time.sleep(1.0)
    start = time.monotonic()
    pool.abort()
    elapsed = time.monotonic() - start
    for w in works:
        with pytest.raises(PoolClosedError):
            w.wait(timeout=__import__("datetime").timedelta(seconds=5))
    assert _C.live_nccl_comms() == 0
    return elapsed


def test_abort_returns_promptly_with_ops_hung_on_both_lanes() -> None:
    for elapsed in run_world(_abort_rank, 2, backend=BACKEND, timeout_seconds=120):
        assert elapsed < 2.0, elapsed


def _cycles_rank(rank: int, world: int) -> dict[str, int]:
    device = torch.device("cuda", torch.cuda.current_device())
    x = torch.ones(1 << 20, device=device)
    out = torch.empty(x.numel() * world, device=device)

    def cycle() -> None:
        with pycomm.CommPool() as pool:
            ag = pool.duplicate(dist.group.WORLD, "ag")
            rs = pool.duplicate(dist.group.WORLD, "rs")
            dist.all_gather_into_tensor(out, x, group=ag)
            dist.reduce_scatter_tensor(x, out, group=rs)
            torch.cuda.synchronize()

    for _ in range(5):
        cycle()
    free_before, _ = torch.cuda.mem_get_info(device)
    for _ in range(50):
        cycle()
    free_after, _ = torch.cuda.mem_get_info(device)
    return {"live": _C.live_nccl_comms(), "lost_mib": (free_before - free_after) >> 20,
            "devices": torch.cuda.device_count()}


def test_fifty_cycles_leave_no_communicator_and_no_memory() -> None:
    for r in run_world(_cycles_rank, 2, backend=BACKEND, timeout_seconds=600):
        assert r["live"] == 0
        assert r["lost_mib"] < 64 * 2, r  # the GPU is shared by the ranks


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-v", *os.sys.argv[1:]]))
