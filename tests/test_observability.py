"""What torch's own tools see of pooled groups, as of a ProcessGroupNCCL
group: torch.profiler's collective records, TORCH_DISTRIBUTED_DEBUG=DETAIL's
cross-rank checks, sequence numbers, and timeouts inherited from the base
group and changed by set_timeout. Real torch, real gloo worlds."""

from __future__ import annotations

import datetime
import json
import os
import re
import tempfile
import time
import warnings

import pytest
import torch
import torch.distributed as dist

import pycomm
from pycomm.launch import run_world
from pycomm.torch_registry import FlightRecorderHook
from world_checks import expect_error

# torch 2.14's profiler export carries record_param_comms' sequence number
# as "Seq", and its ProcessGroup answers any backend's sequence number; 2.11
# does neither.
TORCH_2_14_OR_LATER = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 14)

# The world's timeout in these tests: distinct from torch's defaults and
# pycomm's, so an inherited value cannot pass by chance.
WORLD_TIMEOUT_SECONDS = 97.0


def _quiet() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)


def _profiled_ag_and_rs(rank: int, world: int) -> dict:
    _quiet()
    pool = pycomm.CommPool()
    ag = pool.duplicate(dist.group.WORLD, "ag")
    rs = pool.duplicate(dist.group.WORLD, "rs")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(2):
            gathered = torch.empty(4 * world)
            dist.all_gather_into_tensor(gathered, torch.full((4,), float(rank)), group=ag)
        scattered = torch.empty(3, dtype=torch.bfloat16)
        dist.reduce_scatter_tensor(scattered, torch.ones(3 * world, dtype=torch.bfloat16), group=rs)
    path = os.path.join(tempfile.mkdtemp(), f"trace_{rank}.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    records = [e["args"] for e in events if e.get("name") == "record_param_comms"]
    spans = [
        {"name": e["name"], "ts": e["ts"], "dur": e["dur"], "input_dims": e.get("args", {}).get("Input Dims")}
        for e in events
        if e.get("name", "").startswith("pycomm:") and e.get("ph") == "X"
    ]
    names = {
        "ag": dist.distributed_c10d._get_process_group_name(ag),
        "rs": dist.distributed_c10d._get_process_group_name(rs),
    }
    pool.destroy()
    return {"records": records, "spans": spans, "names": names}


def test_profiler_records_pooled_all_gathers_and_reduce_scatters_under_their_own_groups() -> None:
    """Each pooled op has torch's collective record, named by the op called
    (not the transport's all-reduce), with its group's own name and
    description, sizes, dtype, ranks and sequence number, which is what HTA
    and Chakra read to tell the AG group's ops from the RS group's."""
    world = 2
    for rank, result in enumerate(run_world(_profiled_ag_and_rs, world)):
        records = sorted(result["records"], key=lambda r: r["Ev Idx"])
        assert [r["Collective name"] for r in records] == [
            "_allgather_base", "_allgather_base", "_reduce_scatter_base"
        ]
        gathers, scatter = records[:2], records[2]
        for seq, record in enumerate(gathers):
            assert record["Process Group Name"] == result["names"]["ag"]
            assert record["Process Group Description"] == "pycomm_ag_of_0"
            assert (record["In msg nelems"], record["Out msg nelems"]) == (4, 4 * world)
            assert record["dtype"] == "Float"
            if TORCH_2_14_OR_LATER:
                assert record["Seq"] == seq
        assert scatter["Process Group Name"] == result["names"]["rs"]
        assert scatter["Process Group Description"] == "pycomm_rs_of_0"
        assert (scatter["In msg nelems"], scatter["Out msg nelems"]) == (3 * world, 3)
        assert scatter["dtype"] == "BFloat16"
        if TORCH_2_14_OR_LATER:
            assert scatter["Seq"] == 0  # the RS group counts its own ops
        for record in records:
            assert record["Rank"] == rank
            assert record["Group size"] == world
            assert record["Process Group Ranks"] == "[0, 1]"
            assert (record["Global rank start"], record["Global rank stride"]) == (0, 1)
        # Each op's span from issue to completion, named as torch's NCCL
        # backend names its own ("nccl:_all_gather_base"); gloo's spans of
        # the ops it ran for them keep gloo's names.
        spans = result["spans"]
        assert [s["name"] for s in sorted(spans, key=lambda s: s["ts"])] == [
            "pycomm:_all_gather_base", "pycomm:_all_gather_base", "pycomm:_reduce_scatter_base"
        ]
        assert all(s["dur"] > 0 for s in spans)
        assert sorted(s["input_dims"] for s in spans) == [[[4]], [[4]], [[6]]]


def _ops_under_detail(rank: int, world: int) -> dict:
    _quiet()
    pool = pycomm.CommPool()
    ag = pool.duplicate(dist.group.WORLD, "ag")
    out: dict = {"backend": type(ag._get_backend(torch.device("cpu"))).__name__}
    gathered = torch.empty(2 * world)
    work = dist.all_gather_into_tensor(gathered, torch.full((2,), float(rank)), group=ag, async_op=True)
    work.wait()
    out["gathered"] = gathered.tolist()
    # torch 2.11 binds no Work._get_sequence_number
    out["work_seq"] = work._get_sequence_number() if hasattr(work, "_get_sequence_number") else None
    out["work_result"] = work.get_future_result().wait()
    try:
        out["group_seq"] = ag._get_sequence_number_for_group()
    except RuntimeError as e:  # torch 2.11's ProcessGroup asks only its own backends
        if "does not yet support sequence numbers" not in str(e):
            raise
        out["group_seq"] = None
    # pycomm's own methods, through the wrapper as for a ProcessGroupNCCL group
    unwrapped = ag._get_backend(torch.device("cpu")).wrapped_pg
    out["unwrapped"] = type(unwrapped).__name__
    out["unwrapped_ops"] = unwrapped.stats()["ops"]
    count = 3 if rank == 0 else 2  # different shapes: the wrapper's check names them
    out["mismatch"] = expect_error(
        RuntimeError,
        lambda: dist.all_gather_into_tensor(torch.empty(count * world), torch.ones(count), group=ag),
    )
    pool.abort()
    return out


def test_detail_debug_mode_runs_pooled_ops_and_names_ranks_that_disagree(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under TORCH_DISTRIBUTED_DEBUG=DETAIL torch wraps every group's backend
    in its checking wrapper, which compares each op and its sequence number
    across ranks before running it."""
    monkeypatch.setenv("TORCH_DISTRIBUTED_DEBUG", "DETAIL")
    results = run_world(_ops_under_detail, 2)
    for result in results:
        assert result["backend"] == "_ProcessGroupWrapper"
        assert result["gathered"] == [0.0, 0.0, 1.0, 1.0]
        assert result["work_seq"] == (0 if hasattr(dist.Work, "_get_sequence_number") else None)
        assert result["work_result"] == 0  # c10d WorkResult::SUCCESS
        assert result["group_seq"] == (1 if TORCH_2_14_OR_LATER else None)
        assert result["unwrapped"] == "PooledBackend"
        assert result["unwrapped_ops"] == 1
        assert "Detected mismatch between collectives on ranks" in result["mismatch"]
        assert "SequenceNumber=1" in result["mismatch"]


def _timeouts(rank: int, world: int) -> dict:
    _quiet()
    pool = pycomm.CommPool()
    inherited = pool.duplicate(dist.group.WORLD, "ag")
    named = pool.duplicate(dist.group.WORLD, "rs", pycomm.RoleConfig(timeout=42.0))
    out: dict = {
        "inherited": inherited._get_backend(torch.device("cpu")).options._timeout.total_seconds(),
        "named": named._get_backend(torch.device("cpu")).options._timeout.total_seconds(),
    }
    options = inherited._get_backend(torch.device("cpu")).options
    out["options"] = [options.group_name, list(options.global_ranks_in_group)]
    out["name"] = dist.distributed_c10d._get_process_group_name(inherited)
    backend = inherited._get_backend(torch.device("cpu"))
    out["too_short"] = expect_error(
        pycomm.ConfigError, lambda: backend.set_timeout(datetime.timedelta(milliseconds=50))
    )
    backend.set_timeout(datetime.timedelta(seconds=1.5))
    out["after"] = backend.options._timeout.total_seconds()
    if rank == 0:
        # Rank 1 never joins: the op ends at the timeout just set, not the world's.
        start = time.monotonic()
        work = dist.all_gather_into_tensor(
            torch.empty(2 * world), torch.ones(2), group=inherited, async_op=True
        )
        out["alone_result"] = work.get_future_result().wait()
        out["alone"] = expect_error(pycomm.CollectiveTimeoutError, work.wait)
        out["alone_seconds"] = time.monotonic() - start
        dist.barrier()
    else:
        dist.barrier()
    pool.abort()
    return out


def test_pooled_groups_inherit_the_base_groups_timeout_and_set_timeout_changes_it() -> None:
    results = run_world(_timeouts, 2, timeout_seconds=WORLD_TIMEOUT_SECONDS)
    for result in results:
        assert result["inherited"] == WORLD_TIMEOUT_SECONDS
        assert result["named"] == 42.0
        assert result["options"] == [result["name"], [0, 1]]
        assert "at least 100 ms" in result["too_short"]
        assert result["after"] == 1.5
    # gloo says what was left of the 1.5 s when it gave up
    assert re.search(r"Timed out waiting 1[45]\d\dms", results[0]["alone"]), results[0]["alone"]
    assert results[0]["alone_result"] == 1  # c10d WorkResult::TIMEOUT
    assert results[0]["alone_seconds"] < 1.5 + 3.0, results[0]


def _rs_that_rank_1_never_joins(rank: int, world: int) -> dict:
    _quiet()
    pool = pycomm.CommPool()
    ag = pool.duplicate(dist.group.WORLD, "ag")
    rs = pool.duplicate(dist.group.WORLD, "rs", pycomm.RoleConfig(timeout=1.5))
    dist.all_gather_into_tensor(torch.empty(2 * world), torch.ones(2), group=ag)
    dist.reduce_scatter_tensor(torch.empty(2), torch.ones(2 * world), group=rs)
    out: dict = {"rs_name": dist.distributed_c10d._get_process_group_name(rs)}
    if rank == 0:
        out["error"] = expect_error(
            pycomm.CollectiveTimeoutError,
            lambda: dist.reduce_scatter_tensor(torch.empty(3), torch.ones(3 * world), group=rs),
        )
    dist.barrier()
    pool.abort()
    return out


@pytest.mark.skipif(FlightRecorderHook is None, reason="torch before 2.14 has no backend-agnostic flight-recorder hook")
def test_a_timed_out_pooled_op_writes_torchs_flight_recorder_dump_naming_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    """With the flight recorder on, pooled groups record their ops under
    their own names, and the first timeout writes torch's dump (its format,
    its location) in which the stuck op is the pooled RS group's last entry.
    torch's analyzer (`python -m torch.distributed.flight_recorder.fr_trace`)
    fails on torch 2.14's own dumps of a plain gloo group too (a KeyError on
    the group), so the dump's fields are asserted here instead."""
    import pickle

    monkeypatch.setenv("TORCH_FR_BUFFER_SIZE", "100")
    monkeypatch.setenv("TORCH_FR_DUMP_TEMP_FILE", str(tmp_path / "fr_"))
    results = run_world(_rs_that_rank_1_never_joins, 2)
    assert "Timed out" in results[0]["error"]
    assert not (tmp_path / "fr_1").exists()  # rank 1 had no timeout
    with open(tmp_path / "fr_0", "rb") as f:
        dump = pickle.load(f)
    rs_name = results[0]["rs_name"]
    assert dump["pg_config"][rs_name] == {"name": rs_name, "desc": "pycomm_rs_of_0", "ranks": "[0, 1]"}
    pooled = [e for e in dump["entries"] if e["process_group"][1].startswith("pycomm_")]
    assert [(e["process_group"][1], e["profiling_name"], e["collective_seq_id"]) for e in pooled] == [
        ("pycomm_ag_of_0", "c10d:allgather", 1),
        ("pycomm_rs_of_0", "c10d:reduce_scatter", 1),
        ("pycomm_rs_of_0", "c10d:reduce_scatter", 2),
    ]
    stuck = pooled[-1]
    assert (stuck["input_sizes"], stuck["output_sizes"]) == ([[6]], [[3]])
    # Each group's own transport is listed under its name, not as "".
    assert f"{rs_name}/transport" in dump["pg_config"]


def _ag_and_rs_issued_together(rank: int, world: int) -> dict:
    """Large AG and RS issued together, so their lanes run at once, inside
    a torch.profiler run; the lanes' Chrome trace is added to its trace."""
    _quiet()
    pool = pycomm.CommPool()
    ag = pool.duplicate(dist.group.WORLD, "ag")
    rs = pool.duplicate(dist.group.WORLD, "rs")
    elements = 1 << 21  # 8 MiB per rank: gloo takes milliseconds
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            works = [
                dist.all_gather_into_tensor(torch.empty(elements * world), torch.ones(elements), group=ag, async_op=True),
                dist.reduce_scatter_tensor(torch.empty(elements), torch.ones(elements * world), group=rs, async_op=True),
            ]
            for work in works:
                work.wait()
    folder = tempfile.mkdtemp()
    profiler_path = os.path.join(folder, "profiler.json")
    prof.export_chrome_trace(profiler_path)
    combined = pool.write_chrome_trace(os.path.join(folder, "combined.json"), profiler_trace=profiler_path)
    alone = pool.write_chrome_trace(os.path.join(folder, "lanes.json"))
    out = {
        "stats": pool.stats(),
        "combined": json.loads(combined.read_text()),
        "alone": json.loads(alone.read_text()),
    }
    pool.destroy()
    return out


def test_stats_report_how_much_the_ag_lane_overlapped_the_rs_lane_and_the_chrome_trace_shows_the_same_intervals() -> None:
    results = run_world(_ag_and_rs_issued_together, 2, timeout_seconds=120)
    for rank, result in enumerate(results):
        rows = {row["role"]: row for row in result["stats"]}
        ag, rs = rows["ag"], rows["rs"]
        assert ag["overlap"] == {**rs["overlap"], "with": rs["name"]}
        assert rs["overlap"]["with"] == ag["name"]
        overlap = rs["overlap"]
        # One op at a time per lane: the busy union is the lane's busy time.
        assert overlap["rs_busy_seconds"] == pytest.approx(rs["busy_seconds"], abs=1e-5)
        assert overlap["ag_busy_seconds"] == pytest.approx(ag["busy_seconds"], abs=1e-5)
        # Issued together, the lanes ran at the same time.
        assert 0.0 < overlap["both_busy_seconds"] <= min(overlap["rs_busy_seconds"], overlap["ag_busy_seconds"])
        assert overlap["rs_fraction_overlapped"] == pytest.approx(overlap["both_busy_seconds"] / overlap["rs_busy_seconds"])

        lanes = [e for e in result["alone"]["traceEvents"] if e["ph"] == "X"]
        tracks = {(e["pid"], e["tid"]): e["args"]["group"] for e in lanes}
        assert sorted(tracks.values()) == sorted([ag["name"], rs["name"]])  # one track per lane
        assert {pid for pid, _ in tracks} == {(1 << 30) + rank}
        base_us = result["alone"]["baseTimeNanoseconds"] // 1000
        spans = {
            role: [(base_us + e["ts"], base_us + e["ts"] + e["dur"]) for e in lanes if e["args"]["role"] == role]
            for role in ("ag", "rs")
        }
        assert len(spans["ag"]) == 3 and len(spans["rs"]) == 3
        from pycomm.overlap import lane_overlap

        assert lane_overlap(spans["ag"], spans["rs"]) == {k: v for k, v in overlap.items() if k != "with"}

        # Beside torch.profiler's rows: each lane interval starts after its
        # op's collective record (the call that issued it) and within a
        # second of it, on the profiler's time base.
        events = result["combined"]["traceEvents"]
        issued = sorted(
            e["ts"] for e in events if e.get("name") == "record_param_comms" and e["pid"] < (1 << 30)
        )
        started = sorted(e["ts"] for e in events if e.get("cat") == "pycomm_lane")
        assert len(issued) == len(started) == 6
        for call, start in zip(issued, started):
            assert call <= start < call + 1e6, (call, start)


def test_overlap_counts_only_the_time_both_traces_cover() -> None:
    """A full trace (capacity 3 here) has dropped its oldest ops: the other
    lane's earlier busy time is left out, not counted as not overlapped."""
    from pycomm.overlap import lane_overlap, since_both_traced

    ag = [(100, 110), (120, 130), (140, 150)]  # full: ops before 100 are gone
    rs = [(0, 50), (105, 125)]
    clipped = since_both_traced(ag, rs, capacity=3)
    assert clipped == (ag, [(105, 125)])
    assert lane_overlap(*clipped)["rs_fraction_overlapped"] == 0.5  # 10 of 20 us
    assert lane_overlap(ag, rs)["rs_fraction_overlapped"] == 10 / 70  # what the dropped ops would skew
    assert since_both_traced(ag, rs, capacity=4) == (ag, rs)  # nothing dropped


@pytest.mark.parametrize(
    ("ag", "rs", "both", "fraction"),
    [
        ([(0, 10)], [(5, 15)], 5, 0.5),
        ([(0, 10), (20, 30)], [(5, 25)], 10, 0.5),
        ([(0, 4), (2, 8)], [(0, 8)], 8, 1.0),  # overlapping spans of one lane count once
        ([(10, 20)], [(0, 5), (25, 30)], 0, 0.0),
        ([(0, 5)], [], 0, None),
    ],
)
def test_lane_overlap_measures_the_time_both_lanes_were_busy(ag: list, rs: list, both: int, fraction: float | None) -> None:
    from pycomm.overlap import lane_overlap

    result = lane_overlap(ag, rs)
    assert result["both_busy_seconds"] == both / 1e6
    assert result["rs_fraction_overlapped"] == fraction


def _durations(rank: int, world: int) -> dict:
    _quiet()
    pool = pycomm.CommPool()
    untimed = pool.duplicate(dist.group.WORLD, "rs")
    os.environ["TORCH_NCCL_ENABLE_TIMING"] = "1"  # read when a group is made, as torch reads it
    timed = pool.duplicate(dist.group.WORLD, "ag")
    out: dict = {}
    if rank == 1:
        time.sleep(0.3)  # rank 0's op waits for this rank's
    began = time.perf_counter()
    work = dist.all_gather_into_tensor(torch.empty(4 * world), torch.ones(4), group=timed, async_op=True)
    if rank == 0:
        out["before_end"] = expect_error(pycomm.PycommError, work._get_duration)
    work.wait()
    out["wall_ms"] = (time.perf_counter() - began) * 1e3
    out["duration_ms"] = work._get_duration()
    plain = dist.reduce_scatter_tensor(torch.empty(4), torch.ones(4 * world), group=untimed, async_op=True)
    plain.wait()
    out["untimed"] = expect_error(pycomm.ConfigError, plain._get_duration)
    pool.destroy()
    return out


def test_work_get_duration_times_pooled_ops_when_torch_nccl_enable_timing_is_on() -> None:
    results = run_world(_durations, 2, timeout_seconds=120)
    for result in results:
        assert 0.0 < result["duration_ms"] <= result["wall_ms"] + 1.0, result
        assert "TORCH_NCCL_ENABLE_TIMING=1" in result["untimed"]
    # Rank 0's op started at once and waited for rank 1's, issued 300 ms later.
    assert results[0]["duration_ms"] >= 200.0, results[0]
    assert "known once the op ran and ended" in results[0]["before_end"]
