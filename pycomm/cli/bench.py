"""Overlap and overhead benchmark of the pool's lanes on a local CPU world:
AG and RS issued together on one plain group, on two plain duplicate groups
and on the pool's AG/RS lanes (medians of interleaved iterations), and the
overhead of a pooled op over the same op on a plain gloo group at 64 KiB.
Prints tables, writes bench.json and bench.png."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pycomm.cli.common import add_output_arguments, parse_size, print_json, size_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nproc-per-node", "--ranks", dest="ranks", default="2,4",
        help="comma-separated world sizes to run (default: 2,4); under torchrun or SLURM "
        "the launcher's world is the only one",
    )
    parser.add_argument(
        "--sizes", default="64K,256K,1M,4M,16M",
        help="comma-separated shard sizes per rank (default: 64K,256K,1M,4M,16M)",
    )
    parser.add_argument("--iters", type=int, default=10, help="interleaved iterations per size (>= 10)")
    parser.add_argument("--overhead-iters", type=int, default=60, help="iterations of the 64 KiB overhead test")
    add_output_arguments(parser, default_dir="pycomm-out/bench")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from pycomm.launch import launch, reports_here, world_sizes
    from pycomm.overlap_bench import bench_rank
    from pycomm.plots import plot_overlap

    if args.iters < 10:
        raise SystemExit("--iters must be >= 10: medians of fewer are noise on this kind of machine")
    worlds = world_sizes([int(x) for x in args.ranks.split(",")])
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    overlap, overhead = [], []
    console = Console(stderr=args.json, quiet=not reports_here())
    for world in worlds:
        console.print(f"[bold]bench:[/] {world} ranks, shards {', '.join(size_text(s) for s in sizes)}")
        values = launch(bench_rank, world, sizes, args.iters, args.overhead_iters, timeout_seconds=1800)
        if values is None:  # another rank of a joined world; rank 0 reports
            return 0
        result = values[0]
        overlap += result["overlap"]
        overhead += result["overhead"]

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"overlap": overlap, "overhead": overhead, "iterations": args.iters}
    (out_dir / "bench.json").write_text(json.dumps(summary, indent=2))
    plot_overlap(overlap, out_dir / "bench.png")
    if args.json:
        print_json(summary)
        return 0

    table = Table(title="AG + RS issued together: T_together / (T_ag + T_rs), medians (rank 0)")
    for column in ("ranks", "shard", "variant", "T_ag ms", "T_rs ms", "T_both ms", "ratio", "ideal"):
        table.add_column(column, justify="right")
    for r in overlap:
        table.add_row(
            str(r["world"]), size_text(r["shard_bytes"]), r["variant"],
            f"{r['t_ag_s'] * 1e3:.2f}", f"{r['t_rs_s'] * 1e3:.2f}", f"{r['t_together_s'] * 1e3:.2f}",
            f"{r['overlap_ratio']:.3f}", f"{r['ideal_ratio']:.3f}",
        )
    console.print(table)
    table = Table(title="One all-gather of 64 KiB per rank: pooled vs plain gloo group, medians")
    for column in ("ranks", "variant", "median us", "x plain"):
        table.add_column(column, justify="right")
    for r in overhead:
        table.add_row(str(r["world"]), r["variant"], f"{r['median_s'] * 1e6:.1f}", f"{r['ratio_to_plain']:.3f}")
    console.print(table)
    console.print(f"wrote {out_dir / 'bench.json'} and {out_dir / 'bench.png'}")
    return 0
