"""The CPU benchmark, run inside each rank of a local gloo world.

Per shard size, nine samplers interleaved round by round (medians):
AG alone, RS alone and AG + RS issued together (async, then both waited), each
on one plain group (`one_group`), on two plain duplicate groups (`two_groups`:
AG on one, RS on the other) and on the pool's AG/RS lanes (`pool_lanes`).

What it reports:
- overlap: T_together / (T_ag + T_rs) per variant, beside the ideal max/sum;
- overhead: a pooled op over the same op on a plain gloo group, for AG, RS
  and the two together (pool lanes over two plain groups): the median of the
  per-round ratios of the same rounds; beside it, for AG and RS, the same
  ratio between two plain groups (the noise floor of that point);
- order check: one 64 KiB all-gather on a plain group, a pooled group and a
  pooled group with the order check on;
- host cost: CPU time per 64 KiB AG and RS on a world of one rank, plain
  against pooled (the path's own cost, without a peer to wait for).
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

import pycomm
from pycomm.bench.sampling import interleaved_samples, paired_ratio

KiB = 1 << 10
MiB = 1 << 20
VARIANTS = ("one_group", "two_groups", "pool_lanes")
KINDS = ("ag", "rs", "together")
# Overhead rows: which op, compared as (pooled variant) over (plain variant).
OVERHEAD_OPS = {"all_gather": "ag", "reduce_scatter": "rs", "together": "together"}
PLAIN, POOLED = "two_groups", "pool_lanes"
ORDER_CHECK_BYTES = 64 * KiB


@dataclass(frozen=True)
class Pair:
    """Where AG and RS go in one variant."""

    ag: dist.ProcessGroup
    rs: dist.ProcessGroup


def iterations_for(nbytes: int, iterations_at_64k: int) -> int:
    """Fewer rounds for larger shards (their samples vary less and take
    longer): `iterations_at_64k` at 64 KiB, halved per 4x, at least 10."""
    scale = math.sqrt(max(nbytes, ORDER_CHECK_BYTES) / ORDER_CHECK_BYTES)
    return max(10, round(iterations_at_64k / scale))


def _timed(fn: Callable[[], None], group: dist.ProcessGroup) -> float:
    dist.barrier(group=group)  # the ranks start each sample together
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _measure_size(
    base: dist.ProcessGroup, pairs: dict[str, Pair], world: int, nbytes: int, iterations: int
) -> dict[tuple[str, str], list[float]]:
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

    runs = {"ag": ag, "rs": rs, "together": together}
    # Variants of one kind side by side in a round: the pairs a ratio compares
    # are taken moments apart.
    return interleaved_samples(
        {
            (variant, kind): (lambda run=runs[kind], p=p: _timed(lambda: run(p), base))
            for kind in KINDS
            for variant, p in pairs.items()
        },
        iterations,
    )


def _rows_for_size(
    world: int, nbytes: int, iterations: int, samples: dict[tuple[str, str], list[float]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    medians = {key: statistics.median(values) for key, values in samples.items()}
    overlap = []
    for variant in VARIANTS:
        t_ag, t_rs, t_both = (medians[(variant, kind)] for kind in KINDS)
        overlap.append({
            "world": world, "shard_bytes": nbytes, "variant": variant,
            "t_ag_s": t_ag, "t_rs_s": t_rs, "t_together_s": t_both,
            "overlap_ratio": t_both / (t_ag + t_rs),
            "ideal_ratio": max(t_ag, t_rs) / (t_ag + t_rs),
            "iterations": iterations,
        })
    overhead = [
        {
            "world": world, "shard_bytes": nbytes, "op": op,
            "plain_s": medians[(PLAIN, kind)], "pooled_s": medians[(POOLED, kind)],
            "ratio_to_plain": paired_ratio(samples[(POOLED, kind)], samples[(PLAIN, kind)]),
            # The same op on two plain groups: how far apart two equal
            # variants measure on this machine now (AG and RS alone only).
            "plain_vs_plain": (
                paired_ratio(samples[("one_group", kind)], samples[(PLAIN, kind)])
                if kind != "together" else None
            ),
            "iterations": iterations,
        }
        for op, kind in OVERHEAD_OPS.items()
    ]
    return overlap, overhead


def _measure_order_check(
    plain: dist.ProcessGroup, pooled: dist.ProcessGroup, checked: dist.ProcessGroup,
    world: int, iterations: int,
) -> list[dict[str, Any]]:
    numel = ORDER_CHECK_BYTES // 4
    shard = torch.rand(numel)
    out = torch.empty(numel * world)
    groups = {"plain": plain, "pooled": pooled, "pooled_order_check": checked}
    samples = interleaved_samples(
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
    return [
        {
            "world": world, "bytes": ORDER_CHECK_BYTES, "variant": name,
            "median_s": statistics.median(values),
            "ratio_to_plain": paired_ratio(values, samples["plain"]), "iterations": iterations,
        }
        for name, values in samples.items()
    ]


def host_cost_rank(rank: int, world: int, nbytes: int, ops: int, blocks: int) -> list[dict[str, Any]]:
    """CPU time per op (this process, all its threads) of AG and RS of
    `nbytes` on a world of one rank, plain gloo group against pooled: with no
    peer to wait for, what remains is each path's own cost, and CPU time
    counts it whatever else the machine runs. Medians of `blocks` blocks of
    `ops` ops, the variants interleaved block by block."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    base, plain = dist.new_group([rank]), dist.new_group([rank])
    numel = nbytes // 4
    shard, out = torch.rand(numel), torch.empty(numel)

    def block(op: Callable[..., Any], group: dist.ProcessGroup) -> float:
        start = time.process_time()
        for _ in range(ops):
            op(out, shard, group=group)
        return (time.process_time() - start) / ops

    with pycomm.CommPool() as pool:
        rows = []
        for op_name, op, role in (
            ("all_gather", dist.all_gather_into_tensor, "ag"),
            ("reduce_scatter", dist.reduce_scatter_tensor, "rs"),
        ):
            groups = {"plain": plain, "pooled": pool.duplicate(base, role)}
            samples = interleaved_samples(
                {name: (lambda group=group, op=op: block(op, group)) for name, group in groups.items()},
                blocks,
            )
            rows.append({
                "bytes": nbytes, "op": op_name,
                "plain_cpu_s": statistics.median(samples["plain"]),
                "pooled_cpu_s": statistics.median(samples["pooled"]),
                "ops_per_block": ops, "blocks": blocks,
            })
    return rows


def bench_rank(
    rank: int, world: int, shard_bytes: list[int], iterations_at_64k: int, order_check_iterations: int
) -> dict[str, list[dict[str, Any]]]:
    """Everything the CPU benchmark measures on one rank of a `world`."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    ranks = list(range(world))
    base = dist.new_group(ranks)
    plain_a, plain_b = dist.new_group(ranks), dist.new_group(ranks)
    with pycomm.CommPool() as pool, pycomm.CommPool(check_order=True) as checked_pool:
        pairs = {
            "one_group": Pair(base, base),
            "two_groups": Pair(plain_a, plain_b),
            "pool_lanes": Pair(pool.duplicate(base, "ag"), pool.duplicate(base, "rs")),
        }
        overlap: list[dict[str, Any]] = []
        overhead: list[dict[str, Any]] = []
        for nbytes in shard_bytes:
            iterations = iterations_for(nbytes, iterations_at_64k)
            samples = _measure_size(base, pairs, world, nbytes, iterations)
            size_overlap, size_overhead = _rows_for_size(world, nbytes, iterations, samples)
            overlap += size_overlap
            overhead += size_overhead
        order_check = _measure_order_check(
            plain_a, pairs["pool_lanes"].ag, checked_pool.duplicate(base, "ag"),
            world, order_check_iterations,
        )
    return {"overlap": overlap, "overhead": overhead, "order_check": order_check}


def run(
    worlds: list[int],
    shard_bytes: list[int],
    iterations_at_64k: int,
    order_check_iterations: int,
    on_world: Callable[[int], None] = lambda world: None,
) -> dict[str, Any] | None:
    """Runs a gloo world per size in `worlds` (spawned here, or the one the
    environment describes: see pycomm.launch) and gathers rank 0's rows of
    every world into one summary; None on the other ranks of a joined
    world."""
    from pycomm.launch import launch, run_world

    per_world = ("overlap", "overhead", "order_check")
    summary: dict[str, Any] = {key: [] for key in per_world}
    for world in worlds:
        on_world(world)
        values = launch(
            bench_rank, world, shard_bytes, iterations_at_64k, order_check_iterations,
            timeout_seconds=1800,
        )
        if values is None:
            return None
        result = values[0]
        for key in per_world:
            summary[key] += result[key]
    summary["host_cost"] = run_world(host_cost_rank, 1, ORDER_CHECK_BYTES, 500, 15)[0]
    summary["iterations_at_64k"] = iterations_at_64k
    summary["build"] = {"pycomm": pycomm.__version__, "torch": torch.__version__}
    return summary
