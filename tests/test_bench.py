"""The CPU benchmark's parts: the order of its rounds, how runs combine, and
its baseline of plain groups over a pooled group's own gloo communicator."""

from __future__ import annotations

import math
import random
import statistics
import warnings

import pytest
import torch
import torch.distributed as dist

import pycomm
from pycomm.bench.cpu import RecordingGlooFactory, combine_runs, pooled_and_plain_over_its_comm
from pycomm.bench.sampling import interleaved_samples, ratio_over_runs, round_order
from pycomm.launch import run_world
from world_checks import rank_tensor

KEYS = [f"v{i}" for i in range(15)]


def test_round_order_is_a_shuffle_every_rank_can_repeat() -> None:
    orders = [round_order(KEYS, r, seed=3) for r in range(200)]
    assert all(sorted(order) == sorted(KEYS) for order in orders)
    # Every rank computes the same order from the same round and seed.
    assert orders == [round_order(KEYS, r, seed=3) for r in range(200)]
    # Neighbours change from round to round: no fixed or mirrored order.
    assert len({tuple(order) for order in orders}) == 200
    first_places = {order[0] for order in orders}
    assert first_places == set(KEYS)
    # Another seed is another design.
    assert [round_order(KEYS, r, seed=4) for r in range(200)] != orders


def test_interleaved_samples_warm_up_once_then_follow_the_round_orders() -> None:
    calls: list[str] = []

    def sampler(key: str):
        def sample() -> float:
            calls.append(key)
            return float(len(calls))
        return sample

    keys = KEYS[:5]
    samples = interleaved_samples({key: sampler(key) for key in keys}, iterations=7, seed=11)
    assert calls[:5] == keys  # the warm-up, not sampled
    expected = [key for r in range(7) for key in round_order(keys, r, seed=11)]
    assert calls[5:] == expected
    assert {key: len(values) for key, values in samples.items()} == {key: 7 for key in keys}
    # Each sample is what its sampler returned for that call.
    for key, values in samples.items():
        assert values == [float(5 + i + 1) for i, called in enumerate(expected) if called == key]


def test_combine_runs_takes_medians_and_keeps_each_runs_ratio() -> None:
    def row(world: int, op: str, ratio: float, floor: float | None, ms: float) -> dict:
        return {
            "world": world, "shard_bytes": 65536, "op": op, "plain_s": ms, "pooled_s": ms * ratio,
            "ratio_to_plain": ratio, "plain_vs_plain": floor, "iterations": 200,
        }

    rows = [
        row(2, "all_gather", 1.10, 0.9, 1.0), row(2, "together", 1.00, None, 2.0),
        row(2, "all_gather", 0.95, 1.1, 3.0), row(2, "together", 1.20, None, 4.0),
        row(2, "all_gather", 1.02, 1.0, 2.0), row(2, "together", 0.90, None, 3.0),
    ]
    combined = combine_runs(rows, ("world", "shard_bytes", "op"))
    assert [r["op"] for r in combined] == ["all_gather", "together"]
    ag, together = combined
    assert ag["runs"] == 3
    assert ag["ratio_to_plain_runs"] == [1.10, 0.95, 1.02]
    assert ag["ratio_to_plain"] == pytest.approx((1.10 * 0.95 * 1.02) ** (1 / 3))
    assert ag["ratio_to_plain_ci95"] == ratio_over_runs([1.10, 0.95, 1.02])[1]
    assert ag["plain_vs_plain_runs"] == [0.9, 1.1, 1.0]
    assert ag["plain_s"] == 2.0 and "plain_s_runs" not in ag and "plain_s_ci95" not in ag
    assert ag["iterations"] == 200 and isinstance(ag["iterations"], int)
    assert together["ratio_to_plain"] == pytest.approx((1.00 * 1.20 * 0.90) ** (1 / 3))
    assert together["plain_vs_plain"] is None


def test_ratio_over_runs_is_a_t_interval_on_logarithms() -> None:
    assert ratio_over_runs([1.07]) == (pytest.approx(1.07), None)
    centre, (low, high) = ratio_over_runs([1.0, 1.0, 1.0, 1.0])
    assert centre == pytest.approx(1.0) and low == pytest.approx(1.0) and high == pytest.approx(1.0)
    ratios = [0.95, 1.05, 1.00, 1.10, 0.98]
    centre, (low, high) = ratio_over_runs(ratios)
    logs = [math.log(r) for r in ratios]
    half = 2.776 * statistics.stdev(logs) / math.sqrt(5)  # t(0.975, 4 degrees of freedom)
    assert centre == pytest.approx(math.exp(statistics.fmean(logs)))
    assert (low, high) == (pytest.approx(centre * math.exp(-half)), pytest.approx(centre * math.exp(half)))
    # More runs of the same spread: a narrower interval.
    _, (low_more, high_more) = ratio_over_runs(ratios * 4)
    assert low < low_more < high_more < high


def _plain_group_over_pooled_comm(rank: int, world: int) -> dict:
    warnings.filterwarnings("ignore", category=FutureWarning)
    made = RecordingGlooFactory()
    base = dist.new_group(list(range(world)))
    with pycomm.CommPool(cpu_comm_factory=made) as pool:
        pooled, plains = pooled_and_plain_over_its_comm(pool, made, base, "ag", count=2)
        pooled_rs, (plain_rs,) = pooled_and_plain_over_its_comm(pool, made, base, "rs")
        shard = rank_tensor(rank, 5, torch.float32)
        results = []
        # Ops of the pooled group and of the plain groups over its
        # communicator interleave on that one communicator.
        for group in (pooled, plains[0], pooled, plains[1]):
            out = torch.empty(5 * world)
            dist.all_gather_into_tensor(out, shard, group=group)
            results.append(out)
        grads = rank_tensor(rank, 5 * world, torch.float32, salt=1)
        reduced = [torch.empty(5), torch.empty(5)]
        dist.reduce_scatter_tensor(reduced[0], grads, group=pooled_rs)
        dist.reduce_scatter_tensor(reduced[1], grads, group=plain_rs)
        return {
            "made": len(made.made),
            "same_gathers": all(torch.equal(r, results[0]) for r in results),
            "gathered": results[0].tolist(),
            "same_reductions": torch.equal(reduced[0], reduced[1]),
            "plain_sizes": [g.size() for g in plains + [plain_rs]],
            "plain_ranks": [g.rank() for g in plains + [plain_rs]],
        }


def test_plain_groups_over_a_pooled_groups_comm_give_its_results() -> None:
    results = run_world(_plain_group_over_pooled_comm, 2, timeout_seconds=120)
    expected = torch.cat([rank_tensor(r, 5, torch.float32) for r in range(2)]).tolist()
    for rank, r in enumerate(results):
        assert r["made"] == 2  # one gloo communicator per pooled group, recorded
        assert r["same_gathers"] and r["gathered"] == expected
        assert r["same_reductions"]
        assert r["plain_sizes"] == [2, 2, 2] and r["plain_ranks"] == [rank, rank, rank]


# --- The tables as `python -m pycomm bench` prints them --------------------

TERMINAL_COLUMNS = 80


def _samples(world: int, nbytes: int, run: int) -> dict[tuple[str, str], list[float]]:
    """Samples of every variant and kind, as _measure_size returns them:
    deterministic, spread like a loaded machine's (up to 2x between rounds),
    at 64 KiB about 0.4 ms and at 1 GiB about 19 s, the widest a time gets.
    In run 1, the pooled ops of 2 ranks at 64 KiB take 30x longer (other
    work on the machine): over two runs, an interval of billions."""
    scale = 0.0003 if nbytes < 1 << 20 else 12.345
    keys = [(variant, kind) for variant in ("one_group", "two_groups", "pool_lanes", "lane_comms", "lane_comms_2")
            for kind in ("ag", "rs", "together")]
    disturbed = run == 1 and world == 2 and nbytes < 1 << 20
    return {
        key: [
            scale * (30 if disturbed and key[0] == "pool_lanes" else 1)
            * (1 + random.Random(f"{world}:{nbytes}:{run}:{key}:{i}").random())
            for i in range(10)
        ]
        for key in keys
    }


def _summary(runs: int) -> dict:
    """A summary built by the benchmark's own code (the rows of each shard,
    then combine_runs) from known samples, with order-check and host-cost
    rows shaped as the benchmark writes them."""
    from pycomm.bench.cpu import POINT_FIELDS, _rows_for_size

    rows: dict[str, list[dict]] = {"overlap": [], "overhead": []}
    for run in range(runs):
        for world in (2, 16):
            for nbytes in (64 << 10, 1 << 30):
                overlap, overhead = _rows_for_size(world, nbytes, 10, _samples(world, nbytes, run))
                rows["overlap"] += overlap
                rows["overhead"] += overhead
    summary = {key: combine_runs(rows[key], POINT_FIELDS[key]) for key in rows}
    summary["order_check"] = [
        {"world": w, "bytes": 65536, "variant": v, "median_s": 0.0104, "ratio_to_plain": 2.152, "iterations": 60}
        for w in (2, 16) for v in ("plain", "pooled", "pooled_order_check")
    ]
    summary["host_cost"] = [
        {"bytes": 65536, "op": op, "plain_cpu_s": 44.5e-6, "pooled_cpu_s": 57.5e-6, "ops_per_block": 500, "blocks": 15}
        for op in ("all_gather", "reduce_scatter")
    ]
    summary["runs"] = runs
    return summary


def _rendered(summary: dict) -> str:
    import io

    from rich.console import Console

    from pycomm.bench.report import cpu_report

    console = Console(width=TERMINAL_COLUMNS, file=io.StringIO())
    for part in cpu_report(summary):
        console.print(part)
    return console.file.getvalue()


@pytest.mark.parametrize("runs", [1, 2, 3])  # from two runs on, intervals; widest at two
def test_bench_tables_fit_80_columns_with_nothing_cut(runs: int) -> None:
    from pycomm.bench.report import ms_text, ratio_text

    summary = _summary(runs)
    text = _rendered(summary)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= TERMINAL_COLUMNS, "\n".join(l for l in lines if len(l) > 80)
    assert "…" not in text  # rich's mark of a cut cell
    cells = {cell for line in lines for cell in line.split()}
    for variant in ("one_group", "two_groups", "pool_lanes", "pooled_order_check"):
        assert variant in cells
    for row in summary["overlap"]:  # every time and ratio whole, down to 19 s at 1 GiB
        for field in ("t_ag_s", "t_rs_s", "t_together_s"):
            assert ms_text(row[field]) in cells
        for part in ratio_text(row, "overlap_ratio").split("\n"):
            assert part in cells
    for row in summary["overhead"]:
        for field in ("ratio_to_plain", "plain_vs_plain", "ratio_to_lane_comms", "lane_vs_lane"):
            for part in ratio_text(row, field).split("\n"):
                assert part in cells
    # The ideal column is explained under its table.
    assert "ideal = max(T_ag, T_rs) / (T_ag + T_rs): the ratio of a perfect overlap" in text
    assert ("95 % confidence interval below it" in text) == (runs > 1)


def test_bench_summary_line_per_rank_count_has_the_ratio_and_the_noise_floor() -> None:
    summary = _summary(runs=3)
    lines = _rendered(summary).splitlines()
    for world in (2, 16):
        rows = [r for r in summary["overhead"] if r["world"] == world]
        pooled_over_plain = math.exp(statistics.fmean(math.log(r["ratio_to_plain"]) for r in rows))
        floors = [r["plain_vs_plain"] for r in rows if r["op"] != "together"]
        expected = (
            f"{world} ranks: pooled/plain {pooled_over_plain:.3f} (geometric mean of {len(rows)}), "
            f"noise floor {min(floors):.3f}-{max(floors):.3f}"
        )
        assert expected in lines
    # One summary line per rank count, after the overhead table's legend.
    assert [line.split(":")[0] for line in lines if "pooled/plain" in line] == ["2 ranks", "16 ranks"]


def test_nccl_table_fits_80_columns() -> None:
    import io

    from rich.console import Console

    from pycomm.bench.report import nccl_table

    collectives = [
        {"op": op, "impl": impl, "bytes": size, "ms": 5432.109, "algbw_GBps": 1234.5, "busbw_GBps": 1234.5,
         "ratio_to_torch": 1.002}
        for size in (1 << 20, 1 << 30) for op in ("ag", "rs") for impl in ("torch", "pycomm")
    ]
    console = Console(width=TERMINAL_COLUMNS, file=io.StringIO())
    console.print(nccl_table({"world": 8, "device": "NVIDIA H200", "collectives": collectives}, 20))
    text = console.file.getvalue()
    assert max(len(line) for line in text.splitlines()) <= TERMINAL_COLUMNS
    assert "…" not in text and "5432.109" in text and "pycomm" in text
