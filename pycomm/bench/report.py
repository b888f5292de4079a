"""The benchmarks' tables, as the CLI prints them.

Every table fits 80 columns whole (a terminal's default, and what rich uses
when output is not a terminal): no column is cut or wrapped mid-value.
That is a budget, kept by three choices: a ratio's 95 % interval goes on a
second line of its cell rather than beside the value; times keep four
significant digits; the overhead table names only ratios (its times are the
overlap table's `two_groups` and `pool_lanes` rows). Each table's legend says
what its columns mean."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from pycomm.cli.common import size_text

OP_NAMES = {"all_gather": "AG", "reduce_scatter": "RS", "together": "AG + RS"}
# What the summary and the overhead legend compare: a pooled op over the same
# op on separate plain groups, and the same statistic between two plain
# variants that differ in nothing the pool does (pycomm.bench.cpu).
POOLED_OVER_PLAIN, PLAIN_VS_PLAIN = "ratio_to_plain", "plain_vs_plain"


def _table(title: str) -> Table:
    # No vertical rules and no outer padding: three characters between
    # columns, none wasted at the edges.
    return Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, collapse_padding=True)


def _add_columns(table: Table, names: Iterable[str]) -> None:
    for name in names:
        table.add_column(name, justify="right", no_wrap=True)


def ms_text(seconds: float) -> str:
    """Milliseconds to four significant digits, fixed point: 0.3812, 36.56,
    256.4, 1234."""
    ms = seconds * 1e3
    decimals = max(0, 3 - math.floor(math.log10(ms))) if ms > 0 else 3
    return f"{ms:.{min(decimals, 4)}f}"


def _bound_text(value: float) -> str:
    """An end of a confidence interval in at most five characters: from two
    runs (Student's t of 12.7) an interval can reach hundreds or more."""
    if value < 9.995:
        return f"{value:.2f}"
    if value < 999.5:
        return f"{value:.0f}"
    return f"{value:.0e}"


def ratio_text(row: dict[str, Any], field: str) -> str:
    """A ratio, with its 95 % confidence interval over runs on a second line
    where there were several."""
    value = row[field]
    if value is None:
        return "-"
    interval = row.get(f"{field}_ci95")
    if interval is None:
        return f"{value:.3f}"
    return f"{value:.3f}\n({_bound_text(interval[0])}-{_bound_text(interval[1])})"


def _runs_note(summary: dict[str, Any]) -> str:
    runs = summary.get("runs", 1)
    if runs <= 1:
        return ""
    return f"Ratios: geometric mean over {runs} runs, its 95 % confidence interval below it."


def _with_legend(table: Table, legend: list[str]) -> Group:
    return Group(table, *(Text(sentence, style="dim") for sentence in legend if sentence), Text(""))


def overlap_table(summary: dict[str, Any]) -> Group:
    table = _table("AG and RS alone and issued together (T_both), medians (rank 0)")
    _add_columns(table, ("ranks", "shard", "variant", "T_ag ms", "T_rs ms", "T_both ms", "ratio", "ideal"))
    rounds: dict[str, int] = {}
    for r in summary["overlap"]:
        shard = size_text(r["shard_bytes"])
        rounds[shard] = r["iterations"]
        table.add_row(
            str(r["world"]), shard, r["variant"],
            ms_text(r["t_ag_s"]), ms_text(r["t_rs_s"]), ms_text(r["t_together_s"]),
            ratio_text(r, "overlap_ratio"), f"{r['ideal_ratio']:.3f}",
        )
    legend = [
        "ratio = T_both / (T_ag + T_rs): 1 when AG and RS ran one after the other.",
        "ideal = max(T_ag, T_rs) / (T_ag + T_rs): the ratio of a perfect overlap, the "
        "shorter op hidden entirely behind the longer.",
        "Rounds per shard: " + ", ".join(f"{shard} {n}" for shard, n in rounds.items()) + ".",
        _runs_note(summary),
    ]
    return _with_legend(table, legend)


def overhead_table(summary: dict[str, Any]) -> Group:
    table = _table("Pooled over plain gloo, paired rounds (rank 0)")
    _add_columns(table, ("ranks", "shard", "op", "x plain", "plain vs\nplain", "x lane\ncomms", "lane vs\nlane"))
    for r in summary["overhead"]:
        table.add_row(
            str(r["world"]), size_text(r["shard_bytes"]), OP_NAMES[r["op"]],
            *(ratio_text(r, field) for field in (POOLED_OVER_PLAIN, PLAIN_VS_PLAIN, "ratio_to_lane_comms", "lane_vs_lane")),
        )
    legend = [
        "Each ratio: the median of per-round ratios of a pooled op over the same op on",
        "- x plain: two separate plain gloo groups;",
        "- x lane comms: plain groups over the lanes' own gloo communicators (what "
        "pycomm itself adds).",
        "plain vs plain, lane vs lane: the same statistic between two plain variants "
        "that differ in nothing, the noise floor of that point.",
        "Times: the two_groups and pool_lanes rows above.",
        _runs_note(summary),
    ]
    return _with_legend(table, legend)


def _geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def overhead_summary_lines(summary: dict[str, Any]) -> list[str]:
    """One line per rank count: the geometric mean of `x plain` over every
    shard and op of that count, beside the range of `plain vs plain` there,
    the noise floor it has to clear to mean anything."""
    lines = []
    worlds = dict.fromkeys(r["world"] for r in summary["overhead"])
    for world in worlds:
        rows = [r for r in summary["overhead"] if r["world"] == world]
        ratios = [r[POOLED_OVER_PLAIN] for r in rows]
        floors = [r[PLAIN_VS_PLAIN] for r in rows if r[PLAIN_VS_PLAIN] is not None]
        floor = f"{min(floors):.3f}-{max(floors):.3f}" if floors else "-"
        lines.append(
            f"{world} ranks: pooled/plain {_geometric_mean(ratios):.3f} "
            f"(geometric mean of {len(ratios)}), noise floor {floor}"
        )
    return lines


def order_check_table(summary: dict[str, Any]) -> Table:
    table = _table("One 64 KiB all-gather with the order check (PYCOMM_DEBUG=order), medians")
    _add_columns(table, ("ranks", "variant", "median us", "x plain"))
    for r in summary["order_check"]:
        table.add_row(str(r["world"]), r["variant"], f"{r['median_s'] * 1e6:.1f}", f"{r['ratio_to_plain']:.3f}")
    return table


def host_cost_table(summary: dict[str, Any]) -> Table:
    table = _table(
        "CPU time per op on a world of one rank (no peer to wait for), medians: plain group "
        "over the pooled group's own communicator, and the pooled group"
    )
    _add_columns(table, ("shard", "op", "plain us", "pooled us", "pooled - plain us"))
    for r in summary["host_cost"]:
        plain, pooled = r["plain_cpu_s"] * 1e6, r["pooled_cpu_s"] * 1e6
        table.add_row(size_text(r["bytes"]), OP_NAMES[r["op"]], f"{plain:.1f}", f"{pooled:.1f}", f"{pooled - plain:+.1f}")
    return table


def cpu_report(summary: dict[str, Any]) -> list[RenderableType]:
    """What `python -m pycomm bench` prints, in order: the overlap table, the
    overhead table, a summary line per rank count, the order-check and
    host-cost tables."""
    summary_lines = [Text(line, style="bold") for line in overhead_summary_lines(summary)]
    return [
        overlap_table(summary), overhead_table(summary), *summary_lines, Text(""),
        order_check_table(summary), host_cost_table(summary),
    ]


def nccl_table(result: dict[str, Any], iterations: int) -> Table:
    table = _table(f"{result['world']} x {result['device']}: medians of {iterations} interleaved iterations")
    _add_columns(table, ("op", "size", "impl", "ms", "algbw GB/s", "busbw GB/s", "x torch"))
    for r in result["collectives"]:
        table.add_row(
            r["op"], size_text(r["bytes"]), r["impl"], f"{r['ms']:.3f}",
            f"{r['algbw_GBps']:.1f}", f"{r['busbw_GBps']:.1f}", f"{r['ratio_to_torch']:.3f}",
        )
    return table


def nccl_lines(result: dict[str, Any]) -> list[str]:
    h, g = result["host"], result["gemm"]
    return [
        f"host time to issue a {size_text(h['bytes'])} all-gather: pycomm {h['pycomm_us']:.1f} us, "
        f"torch {h['torch_us']:.1f} us (x{h['ratio_to_torch']:.2f})",
        f"8 GEMMs n={g['gemm_n']}: {g['gemm_ms']:.2f} ms alone, {g['both_ms']:.2f} ms beside a "
        f"{size_text(g['ag_bytes'])} all-gather ({g['ag_ms']:.2f} ms alone): slowdown "
        f"{g['slowdown']:.3f} (serial would be {g['serial_slowdown']:.3f})",
    ]
