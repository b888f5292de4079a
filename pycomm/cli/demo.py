"""Spawns a local world on the CPU (gloo), or joins the one torchrun or SLURM
describes in the environment, initializes Megatron parallel state
with data and expert parallelism, builds the all-gather and reduce-scatter
groups through pycomm.megatron and the pool, trains a small FSDP2 model on
them with a progress bar, then prints a table per lane and the overlap of
each all-gather lane with its reduce-scatter lane, and writes a JSON
summary, a PNG timeline of the lanes' activity and the same intervals as a
Chrome/Perfetto trace."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pycomm.cli.common import (
    RANKS_REASON,
    add_output_arguments,
    int_at_least,
    print_json,
    rank_count,
    usage_error,
)

DEMO_FILES = ("demo.json", "timeline.png", "lanes.trace.json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nproc-per-node", "--ranks", dest="ranks", type=rank_count, default=4,
        help="ranks to spawn on this machine, >= 2 (default: 4); under torchrun or SLURM "
        "(RANK, WORLD_SIZE, ... set) the demo joins that world and its size applies",
    )
    parser.add_argument("--steps", type=int_at_least(1), default=20, help="training steps (default: 20)")
    parser.add_argument(
        "--ep", type=int_at_least(1), default=None,
        help="expert-parallel size, dividing the world's ranks (default: 2 when the world has 4+ ranks, else 1)",
    )
    add_output_arguments(parser, "pycomm-out/demo", DEMO_FILES)


def expert_parallel_size(ranks: int, requested: int | None) -> int:
    return requested if requested is not None else (2 if ranks >= 4 else 1)


def layout_problem(ranks: int, ep: int) -> str | None:
    """Why a world of `ranks` cannot run the demo with expert parallelism
    `ep`, or None when it can."""
    if ranks < 2:
        return f"this world has {ranks} rank: {RANKS_REASON}"
    if ranks % ep:
        return f"--ep {ep} does not divide the world's {ranks} ranks"
    return None


def run(args: argparse.Namespace) -> int:
    # Only the launcher's module first (a launcher's world replaces
    # --nproc-per-node): a layout that cannot run is refused before the
    # demo's own heavy imports, and before any rank starts.
    from pycomm.launch import describe_world, launch, reports_here, world_sizes

    ranks = world_sizes([args.ranks])[0]
    ep = expert_parallel_size(ranks, args.ep)
    problem = layout_problem(ranks, ep)
    if problem:
        usage_error(args, problem)

    from rich.console import Console
    from rich.table import Table

    from pycomm.demo import demo_rank
    from pycomm.launch import preload_in_ranks
    from pycomm.chrome_trace import write_chrome_trace
    from pycomm.timeline import plot_timeline

    preload_in_ranks("pycomm.megatron.quiet_import")

    console = Console(stderr=args.json, quiet=not reports_here())
    console.print(f"[bold]pycomm demo:[/] {describe_world(ranks)}, ep={ep}, {args.steps} steps")
    started = time.perf_counter()
    results = launch(demo_rank, ranks, args.steps, ep, not args.json, timeout_seconds=600)
    elapsed = time.perf_counter() - started
    if results is None:  # another rank of a joined world; rank 0 reports
        return 0

    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    lanes = [
        {"rank": r["rank"], **{k: v for k, v in row.items() if k != "ops_by_kind"}, "ops_by_kind": row["ops_by_kind"]}
        for r in results
        for row in r["stats"]
    ]
    overlap = [
        {"rank": lane["rank"], "base_group": lane["base_group"], **lane["overlap"]}
        for lane in lanes
        if lane["role"] == "rs" and "overlap" in lane
    ]
    summary = {
        "ranks": ranks,
        "ep": ep,
        "steps": args.steps,
        "seconds": elapsed,
        "losses_rank0": results[0]["losses"],
        "groups": {r["rank"]: r["groups"] for r in results},
        "lanes": lanes,
        "overlap": overlap,
    }
    json_path = out_dir / "demo.json"
    json_path.write_text(json.dumps(summary, indent=2))
    png_path = plot_timeline(((r["rank"], r["trace"]) for r in results), out_dir / "timeline.png")
    trace_path = write_chrome_trace(out_dir / "lanes.trace.json", {r["rank"]: r["trace"] for r in results})
    if args.json:
        print_json(summary)
        return 0

    table = Table(title="pycomm lanes after training (per rank)")
    for column in ("rank", "role", "base group", "ranks", "ops", "AG", "RS", "MiB", "busy ms"):
        table.add_column(column, justify="right")
    for lane in lanes:
        table.add_row(
            str(lane["rank"]), lane["role"], lane["base_group"], str(lane["ranks"]), str(lane["ops"]),
            str(lane["ops_by_kind"]["all_gather"]), str(lane["ops_by_kind"]["reduce_scatter"]),
            f"{lane['bytes'] / 2**20:.2f}", f"{lane['busy_seconds'] * 1e3:.1f}",
        )
    console.print(table)
    console.print(_overlap_table(overlap))
    losses = results[0]["losses"]
    console.print(f"loss (rank 0): {losses[0]:.4f} -> {losses[-1]:.4f} in {len(losses)} steps; {elapsed:.1f} s")
    console.print(f"wrote {json_path}, {png_path} and {trace_path} (open it in ui.perfetto.dev)")
    return 0


def _overlap_table(overlap: list[dict]) -> "Table":
    from rich.table import Table

    table = Table(title="all-gather lane busy while the reduce-scatter lane was (per rank)")
    for column in ("rank", "base group", "RS busy ms", "AG busy ms", "both ms", "RS overlapped"):
        table.add_column(column, justify="right")
    for row in overlap:
        fraction = row["rs_fraction_overlapped"]
        table.add_row(
            str(row["rank"]), row["base_group"], f"{row['rs_busy_seconds'] * 1e3:.1f}",
            f"{row['ag_busy_seconds'] * 1e3:.1f}", f"{row['both_busy_seconds'] * 1e3:.1f}",
            "-" if fraction is None else f"{fraction:.0%}",
        )
    return table
