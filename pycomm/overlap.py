"""How much a base group's all-gather lane overlapped its reduce-scatter lane,
from the lanes' op intervals: the number pycomm exists to raise.

An op's interval runs from the moment its lane started it on the transport
to the moment it ended (`CommPool.trace()`), so time an op waited behind the
one before it on its lane is not counted as busy.
"""

from __future__ import annotations

from typing import Iterable, Sequence

Interval = tuple[int, int]  # start, end: microseconds of the system clock


def busy_intervals(spans: Iterable[Interval]) -> list[Interval]:
    """The union of `spans`, as disjoint intervals in time order."""
    merged: list[Interval] = []
    for start, end in sorted(spans):
        if end <= start:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _length_us(intervals: Sequence[Interval]) -> int:
    return sum(end - start for start, end in intervals)


def _intersection_us(a: Sequence[Interval], b: Sequence[Interval]) -> int:
    """Time covered by both unions (each disjoint and sorted)."""
    total, i, j = 0, 0, 0
    while i < len(a) and j < len(b):
        start = max(a[i][0], b[j][0])
        end = min(a[i][1], b[j][1])
        if end > start:
            total += end - start
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def since_both_traced(ag_spans: list[Interval], rs_spans: list[Interval], capacity: int) -> tuple[list[Interval], list[Interval]]:
    """Both lanes' spans from the moment both traces cover: a trace that
    holds `capacity` ops has dropped older ones, and time the other lane
    was busy before its first kept op would count as not overlapped."""
    full = [spans for spans in (ag_spans, rs_spans) if len(spans) >= capacity]
    if not full:
        return ag_spans, rs_spans
    since = max(min(start for start, _ in spans) for spans in full)

    def clip(spans: list[Interval]) -> list[Interval]:
        return [(max(start, since), end) for start, end in spans if end > since]

    return clip(ag_spans), clip(rs_spans)


def lane_overlap(ag_spans: Iterable[Interval], rs_spans: Iterable[Interval]) -> dict[str, float | None]:
    """Busy seconds of each lane, the seconds both were busy, and the
    fraction of the reduce-scatter lane's busy time during which the
    all-gather lane was busy too (None when the RS lane was never busy)."""
    ag = busy_intervals(ag_spans)
    rs = busy_intervals(rs_spans)
    both_us = _intersection_us(ag, rs)
    rs_us = _length_us(rs)
    return {
        "ag_busy_seconds": _length_us(ag) / 1e6,
        "rs_busy_seconds": rs_us / 1e6,
        "both_busy_seconds": both_us / 1e6,
        "rs_fraction_overlapped": both_us / rs_us if rs_us else None,
    }

