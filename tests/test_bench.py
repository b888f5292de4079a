"""The CPU benchmark's parts: the order of its rounds, how runs combine, and
its baseline of plain groups over a pooled group's own gloo communicator."""

from __future__ import annotations

import math
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
