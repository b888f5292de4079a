"""The GPU benchmark's work on each rank: pooled all-gather and reduce-scatter
against torch's own NCCL backend on the same ranks (time, algorithm and bus
bandwidth as nccl-tests defines them), and how much a GEMM slows down while
the all-gather lane runs beside it. Every number is a median of interleaved
iterations timed with CUDA events on the caller's stream."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
import torch.distributed as dist

from pycomm.pool import CommPool
from pycomm.bench.sampling import interleaved_medians

Op = Callable[[], "dist.Work | None"]


def _time_ms(op: Op, stream: torch.cuda.Stream) -> float:
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record(stream)
    work = op()
    if work is not None:
        work.wait()  # the caller's stream waits on the op's end, as a trainer's does
    end.record(stream)
    end.synchronize()
    return start.elapsed_time(end)


def _interleaved_medians(ops: dict[str, Op], iters: int, stream: torch.cuda.Stream) -> dict[str, float]:
    def sampler(op: Op) -> Callable[[], float]:
        def sample() -> float:
            dist.barrier()  # ranks start each sample together
            return _time_ms(op, stream)

        return sample

    return interleaved_medians({name: sampler(op) for name, op in ops.items()}, iters)


def collective_rows(pool: CommPool, world: int, sizes: list[int], iters: int) -> list[dict[str, Any]]:
    device = torch.device("cuda", torch.cuda.current_device())
    stream = torch.cuda.current_stream(device)
    ag, rs = pool.duplicate(role="ag"), pool.duplicate(role="rs")
    rows = []
    for size in sizes:  # size: the full gathered buffer, as nccl-tests counts it
        full = torch.ones(size // 4, device=device)
        shard = torch.ones(size // 4 // world, device=device)
        ops: dict[str, Op] = {
            "ag torch": lambda: dist.all_gather_into_tensor(full, shard, async_op=True),
            "ag pycomm": lambda: dist.all_gather_into_tensor(full, shard, group=ag, async_op=True),
            "rs torch": lambda: dist.reduce_scatter_tensor(shard, full, async_op=True),
            "rs pycomm": lambda: dist.reduce_scatter_tensor(shard, full, group=rs, async_op=True),
        }
        medians = _interleaved_medians(ops, iters, stream)
        for name, ms in medians.items():
            kind, impl = name.split()
            algbw = size / (ms / 1e3) / 1e9
            rows.append({
                "op": kind, "impl": impl, "bytes": size, "ms": ms,
                "algbw_GBps": algbw, "busbw_GBps": algbw * (world - 1) / world,
                "ratio_to_torch": ms / medians[f"{kind} torch"],
            })
        del full, shard
    return rows


def host_us_per_op(pool: CommPool, world: int, iters: int, size: int = 64 << 10) -> dict[str, float]:
    """How long issuing one async all-gather of `size` (gathered) bytes
    blocks the calling thread, pooled against torch's NCCL backend: median
    microseconds of interleaved iterations (the op is waited for, on the
    stream, between samples)."""
    device = torch.device("cuda", torch.cuda.current_device())
    ag = pool.duplicate(role="ag")
    full = torch.ones(size // 4, device=device)
    shard = torch.ones(size // 4 // world, device=device)

    def sampler(group: "dist.ProcessGroup | None") -> Callable[[], float]:
        def sample() -> float:
            torch.cuda.synchronize()
            dist.barrier()
            start = time.perf_counter()
            work = dist.all_gather_into_tensor(full, shard, group=group, async_op=True)
            elapsed = time.perf_counter() - start
            work.wait()
            return elapsed * 1e6

        return sample

    medians = interleaved_medians({"torch": sampler(None), "pycomm": sampler(ag)}, max(iters, 100))
    return {"bytes": size, "torch_us": medians["torch"], "pycomm_us": medians["pycomm"],
            "ratio_to_torch": medians["pycomm"] / medians["torch"]}


def gemm_slowdown(pool: CommPool, world: int, iters: int, gemm_n: int, ag_bytes: int) -> dict[str, Any]:
    device = torch.device("cuda", torch.cuda.current_device())
    stream = torch.cuda.current_stream(device)
    ag = pool.duplicate(role="ag")
    a = torch.randn(gemm_n, gemm_n, device=device, dtype=torch.bfloat16)
    b = torch.randn_like(a)
    full = torch.ones(ag_bytes // 4, device=device)
    shard = torch.ones(ag_bytes // 4 // world, device=device)

    def gemms() -> None:
        for _ in range(8):
            a @ b

    def gemms_beside_all_gather() -> "dist.Work":
        work = dist.all_gather_into_tensor(full, shard, group=ag, async_op=True)
        gemms()
        return work

    def all_gather_alone() -> "dist.Work":
        return dist.all_gather_into_tensor(full, shard, group=ag, async_op=True)

    medians = _interleaved_medians(
        {"gemm": gemms, "ag": all_gather_alone, "both": gemms_beside_all_gather}, iters, stream
    )
    return {
        "gemm_n": gemm_n, "ag_bytes": ag_bytes,
        "gemm_ms": medians["gemm"], "ag_ms": medians["ag"], "both_ms": medians["both"],
        # 1.0: the all-gather hid entirely behind the GEMMs; serial would be
        # (gemm + ag) / gemm.
        "slowdown": medians["both"] / medians["gemm"],
        "serial_slowdown": (medians["gemm"] + medians["ag"]) / medians["gemm"],
    }


def bench_rank(rank: int, world: int, sizes: list[int], iters: int, gemm_n: int, ag_bytes: int) -> dict[str, Any]:
    with CommPool() as pool:
        return {
            "world": world,
            "device": torch.cuda.get_device_name(),
            "collectives": collective_rows(pool, world, sizes, iters),
            "host": host_us_per_op(pool, world, iters),
            "gemm": gemm_slowdown(pool, world, iters, gemm_n, ag_bytes),
        }
