"""Overlap and overhead benchmark of the pool's lanes on local CPU worlds:
AG and RS alone and issued together, on one plain group, on two plain
duplicate groups, on the pool's AG/RS lanes and on plain groups over the
lanes' own gloo communicators (medians of interleaved rounds), from which
the pooled AG, RS and AG + RS over plain gloo, beside the noise floor. Prints
tables, writes bench.json and bench.png (code: pycomm.bench.cpu)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pycomm.cli.common import (
    RANKS_REASON,
    add_output_arguments,
    buffer_sizes,
    int_at_least,
    print_json,
    rank_counts,
    size_text,
    usage_error,
)


BENCH_FILES = ("bench.json", "bench.png")
MIN_ROUNDS = 10
ROUNDS_REASON = "medians of fewer rounds are noise on a shared machine"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nproc-per-node", "--ranks", dest="ranks", type=rank_counts, default="2,4",
        help="comma-separated world sizes to run, each >= 2 (default: 2,4)",
    )
    parser.add_argument(
        "--sizes", type=buffer_sizes, default="64K,256K,1M,4M,16M",
        help="comma-separated shard sizes per rank, units K, M, G (default: 64K,256K,1M,4M,16M)",
    )
    parser.add_argument(
        "--iters", type=int_at_least(MIN_ROUNDS, ROUNDS_REASON), default=200,
        help=f"interleaved rounds at 64 KiB, halved per 4x larger shard, at least {MIN_ROUNDS} (default: 200)",
    )
    parser.add_argument(
        "--repeat", type=int_at_least(1), default=1,
        help="runs, each a fresh world with its own round orders; each ratio is then their "
        "geometric mean with a 95 %% confidence interval (default: 1)",
    )
    parser.add_argument(
        "--seed", type=int_at_least(0), default=0,
        help="seed of the first run's round orders; run i uses seed + i (default: 0)",
    )
    parser.add_argument(
        "--order-check-iters", type=int_at_least(MIN_ROUNDS, ROUNDS_REASON), default=60,
        help=f"rounds of the 64 KiB order-check test, at least {MIN_ROUNDS} (default: 60)",
    )
    add_output_arguments(parser, "pycomm-out/bench", BENCH_FILES)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from pycomm.launch import reports_here, world_sizes

    worlds = world_sizes(args.ranks)
    if min(worlds) < 2:  # a launcher's world replaces --ranks
        usage_error(args, f"this world has {min(worlds)} rank: {RANKS_REASON}")

    from pycomm.bench import cpu
    from pycomm.bench.plots import plot_overlap
    from pycomm.bench.report import cpu_report

    sizes: list[int] = args.sizes
    console = Console(stderr=args.json, quiet=not reports_here())
    summary = cpu.run(
        worlds, sizes, args.iters, args.order_check_iters, args.repeat,
        on_world=lambda world, run: console.print(
            f"[bold]bench:[/] run {run + 1}/{args.repeat}, {world} ranks, "
            f"shards {', '.join(size_text(s) for s in sizes)}"
        ),
        first_seed=args.seed,
    )
    if summary is None:  # another rank of a joined world; rank 0 reports
        return 0
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(summary, indent=2))
    plot_overlap(summary["overlap"], out_dir / "bench.png")
    if args.json:
        print_json(summary)
        return 0
    for part in cpu_report(summary):
        console.print(part)
    console.print(f"wrote {out_dir / 'bench.json'} and {out_dir / 'bench.png'}")
    return 0
