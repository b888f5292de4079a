"""The lanes' timeline picture (the demo's): a bar per op, one row per rank
and role, from the lanes' traces."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import matplotlib

matplotlib.use("Agg")  # files only; no display is needed
import matplotlib.pyplot as plt  # noqa: E402

ROLE_COLORS = {"ag": "tab:blue", "rs": "tab:orange"}


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
