"""The overlap and overhead measurements, run inside each rank of a world.

Yardsticks (docs/benchmarks.md): for AG and RS issued together,
overlap_ratio = T_together / (T_ag + T_rs) beside the ideal max/sum, on one
plain group, on two plain duplicate groups and on the pool's AG/RS lanes;
and the time of one pooled op over the same op on a plain group."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

import pycomm
from pycomm.sampling import interleaved_medians

MiB = 1 << 20
KiB = 1 << 10
VARIANTS = ("one_group", "two_groups", "pool_lanes")


@dataclass(frozen=True)
class Pair:
    """Where AG and RS go in one variant."""

    ag: dist.ProcessGroup
    rs: dist.ProcessGroup


def _timed(fn: Callable[[], None], group: dist.ProcessGroup) -> float:
    dist.barrier(group=group)
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure_overlap(
    rank: int, world: int, shard_bytes: list[int], iterations: int
) -> list[dict]:
    """Per shard size and variant: median T_ag, T_rs, T_together (seconds)."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    ranks = list(range(world))
    base = dist.new_group(ranks)
    plain_a, plain_b = dist.new_group(ranks), dist.new_group(ranks)
    pool = pycomm.CommPool()
    pairs = {
        "one_group": Pair(base, base),
        "two_groups": Pair(plain_a, plain_b),
        "pool_lanes": Pair(pool.duplicate(base, "ag"), pool.duplicate(base, "rs")),
    }
    rows = []
    for nbytes in shard_bytes:
        numel = nbytes // 4
        shard = torch.rand(numel)
        gathered = torch.empty(numel * world)
        grads = torch.rand(numel * world)
        reduced = torch.empty(numel)
        def ag(p: Pair) -> None:
            dist.all_gather_into_tensor(gathered, shard, group=p.ag)

        def rs(p: Pair) -> None:
            dist.reduce_scatter_tensor(reduced, grads, group=p.rs)

        def together(p: Pair) -> None:
            w1 = dist.all_gather_into_tensor(gathered, shard, group=p.ag, async_op=True)
            w2 = dist.reduce_scatter_tensor(reduced, grads, group=p.rs, async_op=True)
            w1.wait()
            w2.wait()

        medians = interleaved_medians(
            {
                (variant, kind): (lambda run=run, p=p: _timed(lambda: run(p), base))
                for variant, p in pairs.items()
                for kind, run in (("ag", ag), ("rs", rs), ("together", together))
            },
            iterations,
        )
        for variant in VARIANTS:
            t_ag = medians[(variant, "ag")]
            t_rs = medians[(variant, "rs")]
            t_both = medians[(variant, "together")]
            rows.append(
                {
                    "world": world,
                    "shard_bytes": nbytes,
                    "variant": variant,
                    "t_ag_s": t_ag,
                    "t_rs_s": t_rs,
                    "t_together_s": t_both,
                    "overlap_ratio": t_both / (t_ag + t_rs),
                    "ideal_ratio": max(t_ag, t_rs) / (t_ag + t_rs),
                    "iterations": iterations,
                }
            )
    pool.destroy()
    return rows


def measure_overhead(rank: int, world: int, nbytes: int, iterations: int) -> list[dict]:
    """Median time of one all-gather of `nbytes` per rank: plain gloo group,
    pooled group, pooled group with the order check on."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    ranks = list(range(world))
    plain = dist.new_group(ranks)
    pool = pycomm.CommPool()
    checked_pool = pycomm.CommPool(check_order=True)
    groups = {
        "plain": plain,
        "pooled": pool.duplicate(plain, "ag"),
        "pooled_order_check": checked_pool.duplicate(plain, "ag"),
    }
    numel = nbytes // 4
    shard = torch.rand(numel)
    out = torch.empty(numel * world)
    medians = interleaved_medians(
        {
            name: (
                lambda group=group: _timed(
                    lambda: dist.all_gather_into_tensor(out, shard, group=group), plain
                )
            )
            for name, group in groups.items()
        },
        iterations,
    )
    pool.destroy()
    checked_pool.destroy()
    return [
        {
            "world": world,
            "bytes": nbytes,
            "variant": name,
            "median_s": median,
            "ratio_to_plain": median / medians["plain"],
            "iterations": iterations,
        }
        for name, median in medians.items()
    ]


def bench_rank(
    rank: int, world: int, shard_bytes: list[int], iterations: int, overhead_iterations: int
) -> dict:
    return {
        "overlap": measure_overlap(rank, world, shard_bytes, iterations),
        "overhead": measure_overhead(rank, world, 64 * KiB, overhead_iterations),
    }
