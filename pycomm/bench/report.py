"""The benchmarks' tables, as the CLI prints them."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from pycomm.cli.common import size_text

OP_NAMES = {"all_gather": "AG", "reduce_scatter": "RS", "together": "AG + RS"}


def cpu_tables(summary: dict[str, Any]) -> list[Table]:
    overlap = Table(title="AG + RS issued together: T_together / (T_ag + T_rs), medians (rank 0)")
    for column in ("ranks", "shard", "variant", "T_ag ms", "T_rs ms", "T_both ms", "ratio", "ideal", "rounds"):
        overlap.add_column(column, justify="right")
    for r in summary["overlap"]:
        overlap.add_row(
            str(r["world"]), size_text(r["shard_bytes"]), r["variant"],
            f"{r['t_ag_s'] * 1e3:.2f}", f"{r['t_rs_s'] * 1e3:.2f}", f"{r['t_together_s'] * 1e3:.2f}",
            f"{r['overlap_ratio']:.3f}", f"{r['ideal_ratio']:.3f}", str(r["iterations"]),
        )

    overhead = Table(
        title="Pooled over plain gloo, same rounds: AG and RS each on its own group, "
        "AG + RS together on the pool's lanes vs two plain groups (rank 0)"
    )
    for column in ("ranks", "shard", "op", "plain ms", "pooled ms", "x plain", "plain vs plain"):
        overhead.add_column(column, justify="right")
    for r in summary["overhead"]:
        floor = r["plain_vs_plain"]
        overhead.add_row(
            str(r["world"]), size_text(r["shard_bytes"]), OP_NAMES[r["op"]],
            f"{r['plain_s'] * 1e3:.3f}", f"{r['pooled_s'] * 1e3:.3f}", f"{r['ratio_to_plain']:.3f}",
            "-" if floor is None else f"{floor:.3f}",
        )

    order = Table(title="One 64 KiB all-gather with the order check (PYCOMM_DEBUG=order), medians")
    for column in ("ranks", "variant", "median us", "x plain"):
        order.add_column(column, justify="right")
    for r in summary["order_check"]:
        order.add_row(str(r["world"]), r["variant"], f"{r['median_s'] * 1e6:.1f}", f"{r['ratio_to_plain']:.3f}")
    host = Table(title="CPU time per op on a world of one rank (no peer to wait for), medians")
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
