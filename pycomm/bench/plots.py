"""The benchmark's picture: AG + RS overlap ratios by shard size."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display is needed
import matplotlib.pyplot as plt  # noqa: E402


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
