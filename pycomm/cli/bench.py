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

from pycomm.cli.common import add_output_arguments, parse_size, print_json, size_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nproc-per-node", "--ranks", dest="ranks", default="2,4",
        help="comma-separated world sizes to run (default: 2,4)",
    )
    parser.add_argument(
        "--sizes", default="64K,256K,1M,4M,16M",
        help="comma-separated shard sizes per rank (default: 64K,256K,1M,4M,16M)",
    )
    parser.add_argument(
        "--iters", type=int, default=200,
        help="interleaved rounds at 64 KiB, halved per 4x larger shard, at least 10 (default: 200)",
    )
    parser.add_argument(
        "--repeat", type=int, default=1,
        help="runs, each a fresh world with its own round orders; each ratio is then their "
        "geometric mean with a 95 %% confidence interval (default: 1)",
    )
    parser.add_argument(
        "--seed", type=int, default=0,
        help="seed of the first run's round orders; run i uses seed + i (default: 0)",
    )
    parser.add_argument(
        "--order-check-iters", type=int, default=60, help="rounds of the 64 KiB order-check test"
    )
    add_output_arguments(parser, default_dir="pycomm-out/bench")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from pycomm.bench import cpu
    from pycomm.bench.plots import plot_overlap
    from pycomm.bench.report import cpu_tables
    from pycomm.launch import reports_here, world_sizes

    if args.iters < 10:
        raise SystemExit("--iters must be >= 10: medians of fewer are noise on this kind of machine")
    if args.repeat < 1:
        raise SystemExit("--repeat must be >= 1")
    worlds = world_sizes([int(x) for x in args.ranks.split(",")])
    sizes = [parse_size(s) for s in args.sizes.split(",")]
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
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(summary, indent=2))
    plot_overlap(summary["overlap"], out_dir / "bench.png")
    if args.json:
        print_json(summary)
        return 0
    for table in cpu_tables(summary):
        console.print(table)
    console.print(f"wrote {out_dir / 'bench.json'} and {out_dir / 'bench.png'}")
    return 0
