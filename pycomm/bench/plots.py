"""The pictures pycomm writes: benchmark ratios and lane timelines."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import matplotlib

matplotlib.use("Agg")  # files only; no display is needed
import matplotlib.pyplot as plt  # noqa: E402

ROLE_COLORS = {"ag": "tab:blue", "rs": "tab:orange"}


def plot_overlap(rows: list[dict], path: Path) -> Path:
    """overlap_ratio against shard size, one line per (world, variant)."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    keys = sorted({(r["world"], r["variant"]) for r in rows})
    for world, variant in keys:
        mine = sorted(
            (r for r in rows if r["world"] == world and r["variant"] == variant),
            key=lambda r: r["shard_bytes"],
        )
        ax.plot(
            [r["shard_bytes"] for r in mine],
            [r["overlap_ratio"] for r in mine],
            marker="o",
            label=f"{variant}, {world} ranks",
        )
    ideal = sorted((r for r in rows if r["variant"] == "pool_lanes"), key=lambda r: r["shard_bytes"])
    if ideal:
        ax.plot(
            [r["shard_bytes"] for r in ideal],
            [r["ideal_ratio"] for r in ideal],
            linestyle=":",
            color="gray",
            label="ideal max/sum (pool)",
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("shard size per rank (bytes)")
    ax.set_ylabel("T_together / (T_ag + T_rs)")
    ax.set_title("AG + RS issued together (lower is more overlap)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_timeline(events_by_rank: Iterable[tuple[int, list[dict]]], path: Path) -> Path:
    """One row per (rank, role); a bar per op, from the lanes' traces."""
    events_by_rank = list(events_by_rank)
    all_events = [e for _, events in events_by_rank for e in events]
    if not all_events:
        raise ValueError("no lane activity to plot")
    t0 = min(e["start_us"] for e in all_events)
    rows = [(rank, role) for rank, _ in events_by_rank for role in ("ag", "rs")]
    fig, ax = plt.subplots(figsize=(10, 0.5 + 0.45 * len(rows)))
    for y, (rank, role) in enumerate(rows):
        events = next(ev for r, ev in events_by_rank if r == rank)
        spans = [
            ((e["start_us"] - t0) / 1e3, max((e["end_us"] - e["start_us"]) / 1e3, 0.05))
            for e in events
            if e["role"] == role
        ]
        ax.broken_barh(spans, (y - 0.35, 0.7), color=ROLE_COLORS[role])
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"rank {rank} {role}" for rank, role in rows])
    ax.set_xlabel("time (ms)")
    ax.set_title("pycomm lanes: all-gather (ag) and reduce-scatter (rs) intervals")
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
