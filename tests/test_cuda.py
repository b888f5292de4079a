"""The NCCL lanes on a GPU (marked cuda; skipped without one). One process,
one GPU: an NCCL world of size 1, the only GPU setting a single lent GPU
allows. Results are compared with torch's own NCCL backend on the same
tensors."""

from __future__ import annotations

import json
import time
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import pycomm
from pycomm import ConfigError, PoolClosedError, RoleConfig, UnsupportedOpError, _C
from pycomm import nccl as pycomm_nccl
from pycomm.launch import free_port

pytestmark = pytest.mark.cuda

DTYPES = [torch.float32, torch.bfloat16, torch.int64]


@pytest.fixture(scope="module")
def world() -> Iterator[torch.device]:
    if not _C.cuda_built:
        pytest.skip("this pycomm was built without the NCCL transport")
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group(
        backend="cpu:gloo,cuda:nccl",
        init_method=f"tcp://127.0.0.1:{free_port()}",
        rank=0,
        world_size=1,
        device_id=device,
    )
    yield device
    dist.destroy_process_group()


@pytest.fixture
def pool(world: torch.device) -> Iterator[pycomm.CommPool]:
    with pycomm.CommPool() as p:
        yield p


def _nccl_row(pool: pycomm.CommPool, role: str) -> dict:
    return next(r for r in pool.stats() if r["role"] == role)["nccl"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_results_equal_torch_nccl(pool: pycomm.CommPool, world: torch.device, dtype: torch.dtype) -> None:
    ag = pool.duplicate(role="ag")
    rs = pool.duplicate(role="rs")
    x = (torch.arange(4096, device=world) % 97).to(dtype)

    gathered, expected = torch.empty_like(x), torch.empty_like(x)
    pool_work = dist.all_gather_into_tensor(gathered, x, group=ag, async_op=True)
    dist.all_gather_into_tensor(expected, x)
    pool_work.wait()
    assert torch.equal(gathered, expected)

    ops = [dist.ReduceOp.SUM, dist.ReduceOp.MAX, dist.ReduceOp.MIN]
    if dtype.is_floating_point:
        ops.append(dist.ReduceOp.AVG)
    for op in ops:
        out, ref = torch.empty_like(x), torch.empty_like(x)
        dist.reduce_scatter_tensor(out, x, op=op, group=rs)
        dist.reduce_scatter_tensor(ref, x, op=op)
        assert torch.equal(out, ref), op

    y, y_ref = x.clone(), x.clone()
    dist.all_reduce(y, group=rs)
    dist.all_reduce(y_ref)
    assert torch.equal(y, y_ref)
    torch.cuda.synchronize()
    row = next(r for r in pool.stats() if r["role"] == "rs")
    assert row["errors"] == 0


def test_coalesced_all_gather(pool: pycomm.CommPool, world: torch.device) -> None:
    ag = pool.duplicate(role="ag")
    inputs = [torch.full((n,), float(n), device=world) for n in (3, 1024, 77)]
    outputs = [torch.empty_like(t) for t in inputs]
    with dist._coalescing_manager(group=ag, async_ops=True) as manager:
        for out, inp in zip(outputs, inputs):
            dist.all_gather_into_tensor(out, inp, group=ag)
    manager.wait()
    for out, inp in zip(outputs, inputs):
        assert torch.equal(out, inp)


def test_lane_waits_for_work_queued_on_the_caller_stream(pool: pycomm.CommPool, world: torch.device) -> None:
    """The lane orders itself after the caller's stream on the device: a
    tensor written by a kernel queued behind a long one is sent complete."""
    ag = pool.duplicate(role="ag")
    x = torch.zeros(1 << 20, device=world)
    out = torch.empty_like(x)
    for value in (1.0, 2.0, 3.0):
        torch.cuda._sleep(20_000_000)  # keeps the caller's stream busy for milliseconds
        x.fill_(value)
        dist.all_gather_into_tensor(out, x, group=ag, async_op=True).wait()
        assert out.min().item() == out.max().item() == value


def test_second_role_is_split_from_the_first(pool: pycomm.CommPool, world: torch.device) -> None:
    # The first lane of a base group comes from a unique id; the second is
    # split from the first's (nonblocking, pycomm-owned) communicator.
    ag = pool.duplicate(role="ag")
    rs = pool.duplicate(role="rs")
    assert _nccl_row(pool, "ag")["created_by_split"] is False
    assert _nccl_row(pool, "rs")["created_by_split"] is True
    x = torch.arange(1000, device=world, dtype=torch.float32)
    for group in (ag, rs):
        out = torch.empty_like(x)
        dist.all_gather_into_tensor(out, x, group=group)
        assert torch.equal(out, x)


def test_fresh_communicator_when_splitting_is_off(world: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(pycomm_nccl.SPLIT_ENV, "0")
    with pycomm.CommPool() as pool:
        ag = pool.duplicate(role="ag")
        assert _nccl_row(pool, "ag")["created_by_split"] is False
        x = torch.ones(1000, device=world)
        out = torch.empty_like(x)
        dist.all_gather_into_tensor(out, x, group=ag)
        assert torch.equal(out, x)


def test_lane_streams_have_the_configured_priorities(pool: pycomm.CommPool, world: torch.device) -> None:
    least, greatest = _C.stream_priority_range(world.index)
    torch_least, torch_greatest = torch.cuda.Stream.priority_range()  # torch clamps its own
    assert greatest <= torch_greatest <= torch_least <= least
    pool.duplicate(role="ag")
    pool.duplicate(role="rs")
    assert _nccl_row(pool, "ag")["stream_priority"] == greatest
    assert _nccl_row(pool, "rs")["stream_priority"] == least

    other = dist.new_group([0], backend="gloo")
    with pycomm.CommPool() as automatic:  # a gloo-only base group: no NCCL lane
        automatic.duplicate(other, "ag")
        assert "nccl" not in automatic.stats()[0]
    with pycomm.CommPool(device=world) as tuned:  # named device: a fresh communicator
        tuned.duplicate(other, "ag", RoleConfig(stream_priority=least))
        tuned.duplicate(other, "rs", RoleConfig(stream_priority=greatest))
        row = _nccl_row(tuned, "ag")
        assert {k: row[k] for k in ("device", "stream_priority", "created_by_split", "pending")} == {
            "device": world.index, "stream_priority": least, "created_by_split": False, "pending": 0,
        }
        assert _nccl_row(tuned, "rs")["stream_priority"] == greatest
    with pycomm.CommPool(device=world) as megatron_style:  # Megatron's switch, both ways
        megatron_style.duplicate(other, "ag", RoleConfig(is_high_priority_stream=False))
        megatron_style.duplicate(other, "rs", RoleConfig(is_high_priority_stream=True))
        assert _nccl_row(megatron_style, "ag")["stream_priority"] == 0
        assert _nccl_row(megatron_style, "rs")["stream_priority"] == greatest
    with pycomm.CommPool(device=world) as wrong:
        with pytest.raises(ConfigError, match="outside this device's range"):
            wrong.duplicate(other, "ag", RoleConfig(stream_priority=least + 5))
    dist.destroy_process_group(other)


def test_stats_report_the_memory_each_communicator_took(pool: pycomm.CommPool, world: torch.device) -> None:
    ag = pool.duplicate(role="ag")
    memory = _nccl_row(pool, "ag")["memory"]
    assert memory["creation_bytes"] >= 0 and memory["first_use_bytes"] is None
    x = torch.ones(1 << 16, device=world)
    out = torch.empty(x.numel() * dist.get_world_size(), device=world)
    dist.all_gather_into_tensor(out, x, group=ag)
    torch.cuda.synchronize(world)
    deadline = time.monotonic() + 5
    while _nccl_row(pool, "ag")["memory"]["first_use_bytes"] is None and time.monotonic() < deadline:
        time.sleep(0.01)  # the lane's watchdog measures when it sees the op end
    memory = _nccl_row(pool, "ag")["memory"]
    assert isinstance(memory["first_use_bytes"], int) and memory["first_use_bytes"] >= 0


def _intervals(trace: dict, names: tuple[str, ...]) -> dict[int, list[tuple[float, float]]]:
    """Kernel and memcpy intervals by stream id."""
    streams: dict[int, list[tuple[float, float]]] = {}
    for event in trace.get("traceEvents", []):
        if event.get("cat") not in names or "dur" not in event:
            continue
        stream = int(event.get("args", {}).get("stream", -1))
        streams.setdefault(stream, []).append((event["ts"], event["ts"] + event["dur"]))
    return streams


def test_all_gather_overlaps_a_gemm(pool: pycomm.CommPool, world: torch.device, tmp_path: Path) -> None:
    ag = pool.duplicate(role="ag")
    shard = torch.randn(128 << 20, device=world)  # 512 MiB
    gathered = torch.empty_like(shard)
    a = torch.randn(8192, 8192, device=world, dtype=torch.bfloat16)
    b = torch.randn_like(a)
    for _ in range(2):  # warm up cuBLAS and NCCL outside the trace
        dist.all_gather_into_tensor(gathered, shard, group=ag, async_op=True).wait()
        a @ b
    torch.cuda.synchronize()

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            work = dist.all_gather_into_tensor(gathered, shard, group=ag, async_op=True)
            for _ in range(8):
                a @ b  # on the compute stream, issued after the all-gather
            work.wait()
        torch.cuda.synchronize()
    path = tmp_path / "trace.json"
    prof.export_chrome_trace(str(path))
    streams = _intervals(json.loads(path.read_text()), ("kernel", "gpu_memcpy"))
    compute = torch.cuda.current_stream(world)
    gemm_streams = {
        s for s, spans in streams.items() if len(spans) >= 24  # the 24 GEMMs
    }
    assert gemm_streams, f"no stream ran the GEMMs: {sorted((s, len(v)) for s, v in streams.items())}"
    lane = [span for s, spans in streams.items() if s not in gemm_streams for span in spans]
    gemm = [span for s in gemm_streams for span in streams[s]]
    overlapping = [
        (l0, l1) for l0, l1 in lane if any(g0 < l1 and l0 < g1 for g0, g1 in gemm)
    ]
    assert overlapping, (
        f"no all-gather interval overlaps a GEMM on stream {compute.stream_id}: "
        f"lane {lane[:5]}, gemm {gemm[:5]}"
    )


def test_create_destroy_cycles_leak_nothing(world: torch.device) -> None:
    x = torch.ones(1 << 20, device=world)
    out = torch.empty_like(x)

    def cycle() -> None:
        with pycomm.CommPool() as pool:
            ag = pool.duplicate(role="ag")
            rs = pool.duplicate(role="rs")
            dist.all_gather_into_tensor(out, x, group=ag)
            dist.reduce_scatter_tensor(out, x, group=rs)
            torch.cuda.synchronize()
            assert _C.live_nccl_comms() == 2

    for _ in range(5):  # NCCL and the allocator settle their first allocations
        cycle()
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated(world)
    free_before, _ = torch.cuda.mem_get_info(world)
    for _ in range(50):
        cycle()
    torch.cuda.synchronize()
    free_after, _ = torch.cuda.mem_get_info(world)
    assert _C.live_nccl_comms() == 0
    assert torch.cuda.memory_allocated(world) == allocated
    assert free_before - free_after < 64 << 20, (
        f"{(free_before - free_after) >> 20} MiB of device memory gone after 50 cycles"
    )


def test_abort_fails_later_ops_by_name(world: torch.device) -> None:
    pool = pycomm.CommPool()
    ag = pool.duplicate(role="ag")
    x = torch.ones(16, device=world)
    dist.all_gather_into_tensor(torch.empty_like(x), x, group=ag)
    backend = ag._get_backend(world)  # outlives the group pool.abort() destroys
    pool.abort()
    assert _C.live_nccl_comms() == 0
    assert not backend.is_open()
    with pytest.raises(PoolClosedError, match="was aborted"):
        backend._allgather_base(torch.empty_like(x), x)


def test_capturing_a_lanes_first_op_is_a_clear_error(pool: pycomm.CommPool, world: torch.device) -> None:
    ag = pool.duplicate(role="ag")
    x = torch.ones(16, device=world)
    out = torch.empty_like(x)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        graph.capture_begin()
        try:
            with pytest.raises(UnsupportedOpError, match="run one op on the group before capturing"):
                dist.all_gather_into_tensor(out, x, group=ag)
        finally:
            graph.capture_end()


def test_a_registered_pools_later_segments_are_registered(pool: pycomm.CommPool, world: torch.device) -> None:
    """register_mem_pool hooks torch's caching allocator: a segment the pool
    gains afterwards is registered with the lane too."""
    ag = pool.duplicate(role="ag")
    backend = ag._get_backend(world)
    lane = backend.device_lane
    mem = torch.cuda.MemPool()
    with torch.cuda.use_mem_pool(mem):
        first = torch.empty(1 << 20, device=world)
    backend.register_mem_pool(mem)
    registered = lane.registered_memory
    assert registered >= 1
    with torch.cuda.use_mem_pool(mem):
        second = torch.empty(64 << 20, device=world)  # more than the pool holds: a new segment
    assert lane.registered_memory == registered + 1
    backend.deregister_mem_pool(mem)
    assert lane.registered_memory == 0
    del first, second


def test_cpu_tensors_still_use_gloo(pool: pycomm.CommPool) -> None:
    ag = pool.duplicate(role="ag")
    x = torch.arange(10.0)
    out = torch.empty_like(x)
    dist.all_gather_into_tensor(out, x, group=ag)
    assert torch.equal(out, x)


if __name__ == "__main__":  # for a quick run on a GPU machine without pytest's collection
    raise SystemExit(pytest.main([__file__, "-v", *os.sys.argv[1:]]))
