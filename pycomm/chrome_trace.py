"""The lanes' op intervals as a Chrome/Perfetto trace (the JSON "Trace Event
Format" that chrome://tracing, ui.perfetto.dev and torch.profiler's
export_chrome_trace use): one process per rank, one track per pooled group,
a complete ("X") event per op.

torch.profiler's traces give times in microseconds after
`baseTimeNanoseconds` (the system clock), and lane times are microseconds of
the system clock: adding `baseTimeNanoseconds / 1000` to a profiler event's
`ts` gives the lanes' clock, so lanes added to a profiler trace sit where
they ran beside its rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

# Chrome traces key tracks by (pid, tid); the profiler's are the OS's. The
# lanes' process ids are far above Linux's largest pid (2**22), so their
# tracks never merge with a profiled process's threads.
LANES_PID_BASE = 1 << 30
EVENT_CATEGORY = "pycomm_lane"


def lane_events(rank: int, trace: Iterable[dict[str, Any]], base_us: int) -> list[dict[str, Any]]:
    """Trace events for one rank's lanes (CommPool.trace() rows), with times
    relative to `base_us` (system-clock microseconds)."""
    pid = LANES_PID_BASE + rank
    events: list[dict[str, Any]] = [
        {"ph": "M", "name": "process_name", "pid": pid, "args": {"name": f"pycomm lanes, rank {rank}"}},
        {"ph": "M", "name": "process_sort_index", "pid": pid, "args": {"sort_index": pid}},
    ]
    tracks: dict[str, int] = {}
    for op in sorted(trace, key=lambda e: (e["group"], e["start_us"])):
        tid = tracks.get(op["group"])
        if tid is None:
            tid = tracks[op["group"]] = len(tracks) + 1
            events.append({
                "ph": "M", "name": "thread_name", "pid": pid, "tid": tid,
                "args": {"name": f"{op['role']} lane: {op['group']}"},
            })
        events.append({
            "ph": "X",
            "cat": EVENT_CATEGORY,
            "name": op["kind"],
            "pid": pid,
            "tid": tid,
            "ts": op["start_us"] - base_us,
            "dur": op["end_us"] - op["start_us"],
            "args": {
                "group": op["group"],
                "base_group": op["base_group"],
                "role": op["role"],
                "bytes": op["bytes"],
                "ok": op["ok"],
            },
        })
    return events


def write_chrome_trace(
    path: Path,
    traces_by_rank: dict[int, list[dict[str, Any]]],
    profiler_trace: Path | None = None,
) -> Path:
    """Writes the lanes of each rank of `traces_by_rank` at `path`: alone,
    or added to a copy of the torch.profiler Chrome trace `profiler_trace`,
    on that trace's time base."""
    if profiler_trace is not None:
        document = json.loads(profiler_trace.read_text())
        # Without a base time the profiler's `ts` are system-clock
        # microseconds already (older kineto).
        base_us = int(document.get("baseTimeNanoseconds", 0)) // 1000
    else:
        base_us = min((op["start_us"] for trace in traces_by_rank.values() for op in trace), default=0)
        document = {"displayTimeUnit": "ms", "baseTimeNanoseconds": base_us * 1000, "traceEvents": []}
    events = document.setdefault("traceEvents", [])
    for rank, trace in sorted(traces_by_rank.items()):
        events.extend(lane_events(rank, trace, base_us))
    path.write_text(json.dumps(document))
    return path
