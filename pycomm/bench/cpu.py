"""The CPU benchmark, run inside each rank of a local gloo world.

Per shard size, fifteen samplers interleaved round by round (medians): AG
alone, RS alone and AG + RS issued together (async, then both waited), each
on
- `one_group`: one plain group;
- `two_groups`: two plain duplicate groups (AG on one, RS on the other);
- `pool_lanes`: the pool's AG/RS lanes;
- `lane_comms` and `lane_comms_2`: two plain torch groups over the very gloo
  communicators the pool's lanes use (what torch's new_group builds: a
  ProcessGroup with a gloo backend), the pooled path's exact baseline.

What it reports:
- overlap: T_together / (T_ag + T_rs) per variant, beside the ideal max/sum;
- overhead: a pooled op over the same op on a plain gloo group, for AG, RS
  and the two together: the median of the per-round ratios of the same
  rounds, against separate plain groups (`x plain`) and against plain groups
  over the lanes' own communicators (`x lane comms`); beside each, the same
  statistic between two plain variants that differ in nothing the pool does
  (`plain vs plain`: two separate groups; `lane vs lane`: two groups over the
  same communicators), the noise floor of that point. Two separate gloo
  communicators run the same op at speeds up to 20 % apart for a whole run on
  a 2-core machine (where their worker threads land), so `x lane comms` is
  the pooled path's own cost and `x plain` includes that spread;
- order check: one 64 KiB all-gather on a plain group, a pooled group and a
  pooled group with the order check on;
- host cost: CPU time per 64 KiB AG and RS on a world of one rank, a plain
  group over the pooled group's own communicator against the pooled group
  (the path's own cost, without a peer to wait for).
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
from pycomm.bench.sampling import interleaved_samples, paired_ratio, ratio_over_runs
from pycomm.registration import gloo_comm

KiB = 1 << 10
MiB = 1 << 20
OVERLAP_VARIANTS = ("one_group", "two_groups", "pool_lanes")
KINDS = ("ag", "rs", "together")
# Overhead rows: which op, compared as (pooled variant) over (plain variant).
OVERHEAD_OPS = {"all_gather": "ag", "reduce_scatter": "rs", "together": "together"}
PLAIN, POOLED, LANE_COMMS = "two_groups", "pool_lanes", "lane_comms"
ORDER_CHECK_BYTES = 64 * KiB


@dataclass(frozen=True)
class Pair:
    """Where AG and RS go in one variant."""

    ag: dist.ProcessGroup
    rs: dist.ProcessGroup


class RecordingGlooFactory:
    """The pool's default CPU communicator factory, keeping what it made: the
    benchmark builds plain groups over the communicators of pooled groups."""

    def __init__(self) -> None:
        self.made: list[dist.Backend] = []

    def __call__(self, store: dist.Store, rank: int, size: int, timeout: Any) -> dist.Backend:
        comm = gloo_comm(store, rank, size, timeout)
        self.made.append(comm)
        return comm


def plain_group_over(comm: dist.Backend, rank: int, size: int) -> dist.ProcessGroup:
    """A plain torch ProcessGroup whose CPU backend is `comm`: what
    dist.new_group builds around the gloo communicator it connects. It is not
    in torch's group registry; torch.distributed's collectives take it all
    the same."""
    group = dist.ProcessGroup(dist.distributed_c10d._get_default_store(), rank, size)
    group._set_default_backend(dist.ProcessGroup.BackendType.GLOO)
    group._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.GLOO, comm)
    return group


def pooled_and_plain_over_its_comm(
    pool: "pycomm.CommPool", made: RecordingGlooFactory, base: dist.ProcessGroup, role: str, count: int = 1
) -> tuple[dist.ProcessGroup, list[dist.ProcessGroup]]:
    """pool.duplicate(base, role), and `count` plain groups over the gloo
    communicator that pooled group runs on."""
    pooled = pool.duplicate(base, role)
    comm = made.made[-1]
    rank, size = dist.get_rank(base), dist.get_world_size(base)
    return pooled, [plain_group_over(comm, rank, size) for _ in range(count)]


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
    base: dist.ProcessGroup, pairs: dict[str, Pair], world: int, nbytes: int, iterations: int, seed: int
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
        seed,
    )


def _rows_for_size(
    world: int, nbytes: int, iterations: int, samples: dict[tuple[str, str], list[float]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    medians = {key: statistics.median(values) for key, values in samples.items()}
    overlap = []
    for variant in OVERLAP_VARIANTS:
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
            # variants measure on this machine now (AG and RS alone only:
            # together, one group is not two).
            "plain_vs_plain": (
                paired_ratio(samples[("one_group", kind)], samples[(PLAIN, kind)])
                if kind != "together" else None
            ),
            "lane_comms_s": medians[(LANE_COMMS, kind)],
            "ratio_to_lane_comms": paired_ratio(samples[(POOLED, kind)], samples[(LANE_COMMS, kind)]),
            "lane_vs_lane": paired_ratio(samples[("lane_comms_2", kind)], samples[(LANE_COMMS, kind)]),
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
    `nbytes` on a world of one rank, a plain group over the pooled group's
    own gloo communicator against the pooled group: with no peer to wait
    for, what remains is each path's own cost, and CPU time counts it
    whatever else the machine runs. Medians of `blocks` blocks of `ops` ops,
    the variants interleaved block by block."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    base = dist.new_group([rank])
    numel = nbytes // 4
    shard, out = torch.rand(numel), torch.empty(numel)

    def block(op: Callable[..., Any], group: dist.ProcessGroup) -> float:
        start = time.process_time()
        for _ in range(ops):
            op(out, shard, group=group)
        return (time.process_time() - start) / ops

    made = RecordingGlooFactory()
    with pycomm.CommPool(cpu_comm_factory=made) as pool:
        rows = []
        for op_name, op, role in (
            ("all_gather", dist.all_gather_into_tensor, "ag"),
            ("reduce_scatter", dist.reduce_scatter_tensor, "rs"),
        ):
            pooled, (plain,) = pooled_and_plain_over_its_comm(pool, made, base, role)
            groups = {"plain": plain, "pooled": pooled}
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
    rank: int, world: int, shard_bytes: list[int], iterations_at_64k: int, order_check_iterations: int,
    seed: int = 0,
) -> dict[str, list[dict[str, Any]]]:
    """Everything the CPU benchmark measures on one rank of a `world`;
    `seed` picks the rounds' orders."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    ranks = list(range(world))
    base = dist.new_group(ranks)
    plain_a, plain_b = dist.new_group(ranks), dist.new_group(ranks)
    made = RecordingGlooFactory()
    with pycomm.CommPool(cpu_comm_factory=made) as pool, pycomm.CommPool(check_order=True) as checked_pool:
        pooled_ag, (lane_ag, lane_ag_2) = pooled_and_plain_over_its_comm(pool, made, base, "ag", count=2)
        pooled_rs, (lane_rs, lane_rs_2) = pooled_and_plain_over_its_comm(pool, made, base, "rs", count=2)
        pairs = {
            "one_group": Pair(base, base),
            "two_groups": Pair(plain_a, plain_b),
            "pool_lanes": Pair(pooled_ag, pooled_rs),
            "lane_comms": Pair(lane_ag, lane_rs),
            "lane_comms_2": Pair(lane_ag_2, lane_rs_2),
        }
        overlap: list[dict[str, Any]] = []
        overhead: list[dict[str, Any]] = []
        for nbytes in shard_bytes:
            iterations = iterations_for(nbytes, iterations_at_64k)
            samples = _measure_size(base, pairs, world, nbytes, iterations, seed)
            size_overlap, size_overhead = _rows_for_size(world, nbytes, iterations, samples)
            overlap += size_overlap
            overhead += size_overhead
        order_check = _measure_order_check(
            plain_a, pairs["pool_lanes"].ag, checked_pool.duplicate(base, "ag"),
            world, order_check_iterations,
        )
    return {"overlap": overlap, "overhead": overhead, "order_check": order_check}


# The fields of a row that name its point, per table.
POINT_FIELDS = {
    "overlap": ("world", "shard_bytes", "variant"),
    "overhead": ("world", "shard_bytes", "op"),
    "order_check": ("world", "bytes", "variant"),
}
# Ratios whose value in every run is kept beside their median over runs.
RATIO_FIELDS = (
    "overlap_ratio", "ratio_to_plain", "plain_vs_plain", "ratio_to_lane_comms", "lane_vs_lane",
)


def combine_runs(rows: list[dict[str, Any]], point_fields: tuple[str, ...]) -> list[dict[str, Any]]:
    """One row per point from the rows of independent runs: each time the
    median over the runs; each ratio their geometric mean, with its value in
    every run (`<ratio>_runs`) and its 95 % confidence interval
    (`<ratio>_ci95`, from two runs on): one run's ratio moves by several
    percent from run to run on a 2-core machine, so a claim about a few
    percent needs the interval. Points keep the order of their first run."""
    points: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        points.setdefault(tuple(row[f] for f in point_fields), []).append(row)
    combined = []
    for runs in points.values():
        row: dict[str, Any] = {"runs": len(runs)}
        for field, first in runs[0].items():
            values = [r[field] for r in runs]
            if field in point_fields or not isinstance(first, (int, float)):
                row[field] = first
            elif field in RATIO_FIELDS:
                row[field], row[f"{field}_ci95"] = ratio_over_runs(values)
                row[f"{field}_runs"] = values
            elif all(isinstance(v, int) for v in values):
                row[field] = statistics.median_low(values)
            else:
                row[field] = statistics.median(values)
        combined.append(row)
    return combined


def run(
    worlds: list[int],
    shard_bytes: list[int],
    iterations_at_64k: int,
    order_check_iterations: int,
    repeats: int = 1,
    on_world: Callable[[int, int], None] = lambda world, run: None,
    first_seed: int = 0,
) -> dict[str, Any] | None:
    """Runs a gloo world per size in `worlds` (spawned here, or the one the
    environment describes: see pycomm.launch), `repeats` times, each run a
    fresh world with rounds in an order of its own (run i: seed
    `first_seed` + i, so runs of two calls with seeds apart are independent
    and may be pooled); gathers rank 0's rows of
    every world into one summary (combine_runs: each ratio over the runs,
    with its confidence interval). None on the other ranks of a joined
    world."""
    from pycomm.launch import launch, run_world

    rows: dict[str, list[dict[str, Any]]] = {key: [] for key in POINT_FIELDS}
    for repeat in range(repeats):
        for world in worlds:
            on_world(world, repeat)
            values = launch(
                bench_rank, world, shard_bytes, iterations_at_64k, order_check_iterations, first_seed + repeat,
                timeout_seconds=1800,
            )
            if values is None:
                return None
            for key in POINT_FIELDS:
                rows[key] += values[0][key]
    summary: dict[str, Any] = {key: combine_runs(rows[key], fields) for key, fields in POINT_FIELDS.items()}
    summary["host_cost"] = run_world(host_cost_rank, 1, ORDER_CHECK_BYTES, 500, 15)[0]
    summary["iterations_at_64k"] = iterations_at_64k
    summary["runs"] = repeats
    summary["seeds"] = [first_seed + repeat for repeat in range(repeats)]
    summary["build"] = {"pycomm": pycomm.__version__, "torch": torch.__version__}
    return summary
