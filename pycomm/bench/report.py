"""The benchmarks' tables, as the CLI prints them."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from pycomm.cli.common import size_text

OP_NAMES = {"all_gather": "AG", "reduce_scatter": "RS", "together": "AG + RS"}


def ratio_text(row: dict[str, Any], field: str) -> str:
    """A ratio, with its 95 % confidence interval over runs where there were
    several."""
    value = row[field]
    if value is None:
        return "-"
    interval = row.get(f"{field}_ci95")
    if interval is None:
        return f"{value:.3f}"
    return f"{value:.3f} ({interval[0]:.2f}-{interval[1]:.2f})"


def cpu_tables(summary: dict[str, Any]) -> list[Table]:
    runs = summary.get("runs", 1)
    over_runs = f"; ratios: geometric mean over {runs} runs (95 % confidence interval)" if runs > 1 else ""
    overlap = Table(title=f"AG + RS issued together: T_together / (T_ag + T_rs), medians (rank 0){over_runs}")
    for column in ("ranks", "shard", "variant", "T_ag ms", "T_rs ms", "T_both ms", "ratio", "ideal", "rounds"):
        overlap.add_column(column, justify="right")
    for r in summary["overlap"]:
        overlap.add_row(
            str(r["world"]), size_text(r["shard_bytes"]), r["variant"],
            f"{r['t_ag_s'] * 1e3:.2f}", f"{r['t_rs_s'] * 1e3:.2f}", f"{r['t_together_s'] * 1e3:.2f}",
            ratio_text(r, "overlap_ratio"), f"{r['ideal_ratio']:.3f}", str(r["iterations"]),
        )

    overhead = Table(
        title="Pooled over plain gloo, paired rounds (rank 0): x plain against separate plain "
        "groups, x lane comms against plain groups over the lanes' own gloo communicators; "
        f"plain vs plain and lane vs lane: the same statistic between two plain variants (noise floor){over_runs}"
    )
    columns = ("ranks", "shard", "op", "plain ms", "pooled ms", "x plain", "plain vs plain", "x lane comms", "lane vs lane")
    for column in columns:
        overhead.add_column(column, justify="right")
    for r in summary["overhead"]:
        overhead.add_row(
            str(r["world"]), size_text(r["shard_bytes"]), OP_NAMES[r["op"]],
            f"{r['plain_s'] * 1e3:.3f}", f"{r['pooled_s'] * 1e3:.3f}",
            *(ratio_text(r, field) for field in ("ratio_to_plain", "plain_vs_plain", "ratio_to_lane_comms", "lane_vs_lane")),
        )

    order = Table(title="One 64 KiB all-gather with the order check (PYCOMM_DEBUG=order), medians")
    for column in ("ranks", "variant", "median us", "x plain"):
        order.add_column(column, justify="right")
    for r in summary["order_check"]:
        order.add_row(str(r["world"]), r["variant"], f"{r['median_s'] * 1e6:.1f}", f"{r['ratio_to_plain']:.3f}")
    host = Table(
        title="CPU time per op on a world of one rank (no peer to wait for), medians: "
        "plain group over the pooled group's own communicator, and the pooled group"
    )
    for column in ("shard", "op", "plain us", "pooled us", "pooled - plain us"):
        host.add_column(column, justify="right")
    for r in summary["host_cost"]:
        plain, pooled = r["plain_cpu_s"] * 1e6, r["pooled_cpu_s"] * 1e6
        host.add_row(size_text(r["bytes"]), OP_NAMES[r["op"]], f"{plain:.1f}", f"{pooled:.1f}", f"{pooled - plain:+.1f}")
    return [overlap, overhead, order, host]


def nccl_table(result: dict[str, Any], iterations: int) -> Table:
    table = Table(title=f"{result['world']} x {result['device']}: medians of {iterations} interleaved iterations")
    for column in ("op", "size", "impl", "ms", "algbw GB/s", "busbw GB/s", "x torch"):
        table.add_column(column, justify="right")
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
