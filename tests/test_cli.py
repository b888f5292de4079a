"""The CLI commands, run as a user runs them (python -m pycomm ...)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(*args: str, timeout: float = 300, columns: int | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ) if columns is None else dict(os.environ, COLUMNS=str(columns))
    return subprocess.run(
        [sys.executable, "-m", "pycomm", *args],
        capture_output=True, text=True, timeout=timeout, check=False, env=env,
    )


def run_torchrun(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 -m pycomm ...` (torchrun is
    torch.distributed.run; --standalone picks a free port)."""
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "pycomm", *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    )


def test_help_lists_every_command() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("plan", "demo", "bench", "doctor"):
        assert command in result.stdout


def test_doctor_reports_this_installation() -> None:
    import torch

    import pycomm

    result = run_cli("doctor", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["torch"]["value"] == torch.__version__
    assert checks["pycomm"]["value"] == pycomm.__version__
    assert "gloo" in checks["transports built"]["value"]
    assert checks["megatron-core"]["value"] == "0.19.2"
    assert checks["FSDP2 custom AG/RS hooks"]["value"] == "available"


def test_doctor_names_nccl_overrides() -> None:
    env = dict(os.environ, NCCL_MAX_CTAS="4")
    result = subprocess.run(
        [sys.executable, "-m", "pycomm", "doctor", "--json"],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["NCCL env overrides"]["value"] == "NCCL_MAX_CTAS=4"


@pytest.mark.timeout(300)
def test_bench_writes_json_and_plot(tmp_path: Path) -> None:
    result = run_cli(
        "bench", "--ranks", "2,4", "--sizes", "64K", "--iters", "10",
        "--order-check-iters", "10", "--repeat", "2", "--seed", "5", "--out", str(tmp_path),
        columns=80,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "bench.json").read_text())
    assert {(r["world"], r["variant"]) for r in summary["overlap"]} == {
        (w, v) for w in (2, 4) for v in ("one_group", "two_groups", "pool_lanes")
    }
    for r in summary["overlap"]:
        assert r["shard_bytes"] == 65536
        assert 0 < r["ideal_ratio"] <= 1.0 and r["overlap_ratio"] > 0
    # The pooled AG, RS and AG + RS over plain gloo, for each rank count.
    assert {(r["world"], r["op"]) for r in summary["overhead"]} == {
        (w, op) for w in (2, 4) for op in ("all_gather", "reduce_scatter", "together")
    }
    assert summary["runs"] == 2 and summary["seeds"] == [5, 6]
    for r in summary["overhead"]:
        assert r["runs"] == 2 and r["iterations"] == 10
        assert r["plain_s"] > 0 and r["pooled_s"] > 0 and r["lane_comms_s"] > 0
        # Against separate plain groups and against plain groups over the
        # lanes' own communicators, each with its floor, per run and over runs.
        for field in ("ratio_to_plain", "ratio_to_lane_comms", "lane_vs_lane"):
            low, high = r[f"{field}_ci95"]
            assert len(r[f"{field}_runs"]) == 2 and low <= r[field] <= high
        assert (r["plain_vs_plain"] is None) == (r["op"] == "together")
    assert {r["variant"] for r in summary["order_check"]} == {"plain", "pooled", "pooled_order_check"}
    assert {r["op"] for r in summary["host_cost"]} == {"all_gather", "reduce_scatter"}
    assert (tmp_path / "bench.png").stat().st_size > 1000
    # The tables fit a terminal of 80 columns, nothing cut; a summary line per rank count.
    assert max(len(line) for line in result.stdout.splitlines()) <= 80, result.stdout
    assert "…" not in result.stdout
    assert "T_both ms" in result.stdout and "x plain" in result.stdout and "ideal = max(T_ag, T_rs)" in result.stdout
    assert "x lane comms:" in result.stdout and "confidence interval" in result.stdout
    for world in (2, 4):
        assert f"{world} ranks: pooled/plain " in result.stdout


def test_bench_refuses_too_few_iterations(tmp_path: Path) -> None:
    result = run_cli("bench", "--iters", "3", "--out", str(tmp_path))
    assert result.returncode == 2
    assert "argument --iters: must be >= 10" in result.stderr


@pytest.mark.timeout(300)
@pytest.mark.parametrize("ranks", [2, 3])
def test_demo_trains_on_the_pool_and_writes_its_outputs(tmp_path: Path, ranks: int) -> None:
    result = run_cli("demo", "--nproc-per-node", str(ranks), "--steps", "10", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "demo.json").read_text())
    assert summary["ranks"] == ranks and summary["steps"] == 10 and summary["ep"] == 1
    # The model learns: after 10 steps the loss is well under half the first
    # (measured: 1.697 -> 0.321 at 2 ranks, -> 0.267 at 3).
    losses = summary["losses_rank0"]
    assert len(losses) == 10
    assert losses[-1] <= losses[0] / 2, losses
    assert f"loss (rank 0): {losses[0]:.4f} -> {losses[-1]:.4f} in 10 steps" in result.stdout
    for rank in map(str, range(ranks)):
        groups = summary["groups"][rank]
        assert groups["dp_cp_ag"] == groups["dp_cp"] == list(range(ranks))
        assert groups["expt_dp_ag"] is None
    lanes = summary["lanes"]
    ag = [lane for lane in lanes if lane["role"] == "ag"]
    rs = [lane for lane in lanes if lane["role"] == "rs"]
    assert len(ag) == len(rs) == ranks  # one per rank
    assert all(lane["ops_by_kind"]["all_gather"] > 0 and lane["ops_by_kind"]["reduce_scatter"] == 0 for lane in ag)
    assert all(lane["ops_by_kind"]["reduce_scatter"] > 0 and lane["ops_by_kind"]["all_gather"] == 0 for lane in rs)
    assert (tmp_path / "timeline.png").stat().st_size > 1000
    assert "pycomm lanes after training" in result.stdout
    # The AG lane's overlap with the RS lane, per rank, from the same
    # intervals as each lane's busy time; the Chrome trace holds them too.
    overlap = {row["rank"]: row for row in summary["overlap"]}
    assert sorted(overlap) == list(range(ranks))
    events = [e for e in json.loads((tmp_path / "lanes.trace.json").read_text())["traceEvents"] if e["ph"] == "X"]
    for r in rs:
        row = overlap[r["rank"]]
        ag_lane = next(lane for lane in ag if lane["rank"] == r["rank"])
        assert row["with"] == ag_lane["name"] and row["base_group"] == r["base_group"]
        assert row["rs_busy_seconds"] == pytest.approx(r["busy_seconds"], abs=1e-5)
        assert row["ag_busy_seconds"] == pytest.approx(ag_lane["busy_seconds"], abs=1e-5)
        assert 0.0 <= row["both_busy_seconds"] <= min(row["rs_busy_seconds"], row["ag_busy_seconds"])
        assert row["rs_fraction_overlapped"] == pytest.approx(row["both_busy_seconds"] / row["rs_busy_seconds"])
        for lane in (r, ag_lane):
            mine = [e for e in events if e["args"]["group"] == lane["name"] and e["pid"] % (1 << 30) == lane["rank"]]
            assert len(mine) == lane["ops"]
            assert sum(e["dur"] for e in mine) / 1e6 == pytest.approx(lane["busy_seconds"], abs=1e-5)
    assert "RS overlapped" in result.stdout
    # No rank imports torch's extension build tooling (its CUDA toolkit guess
    # warns on a machine without a GPU).
    assert "No CUDA runtime is found" not in result.stderr


@pytest.mark.timeout(300)
def test_demo_under_torchrun_joins_its_world(tmp_path: Path) -> None:
    result = run_torchrun("demo", "--steps", "2", "--json", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)  # one document: only rank 0 prints
    assert summary["ranks"] == 2 and summary["ep"] == 1  # torchrun's size, not the demo's default 4
    assert summary["groups"] == {
        str(rank): {"dp_cp": [0, 1], "dp_cp_ag": [0, 1], "expt_dp_ag": None} for rank in (0, 1)
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.json", "lanes.trace.json", "timeline.png"]
    assert json.loads((tmp_path / "demo.json").read_text())["ranks"] == 2


@pytest.mark.timeout(300)
def test_bench_under_torchrun_runs_only_its_world(tmp_path: Path) -> None:
    result = run_torchrun(
        "bench", "--sizes", "64K", "--iters", "10", "--order-check-iters", "10", "--json", "--out", str(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert {r["world"] for r in summary["overlap"] + summary["overhead"]} == {2}  # not the default 2,4
    assert {r["variant"] for r in summary["overlap"]} == {"one_group", "two_groups", "pool_lanes"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json", "bench.png"]


def test_a_partial_launcher_environment_is_an_error(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    result = subprocess.run(
        [sys.executable, "-m", "pycomm", "demo", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, env=dict(env, RANK="0"), check=False,
    )
    assert result.returncode == 1
    assert "LaunchEnvironmentError: WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set" in result.stderr
    assert not any(tmp_path.iterdir())
