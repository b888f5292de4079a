"""pycomm.megatron on real megatron-core and real gloo worlds: on every rank the
all-gather groups have the ranks of the matching parallel_state /
HyperCommGrid / ProcessGroupCollection group, all-gathers on them return the
right contents, each rank creates only its own groups, and megatron-core's own
create_all_gather_groups is run in the same layouts to show where it differs.

`python tests/test_megatron.py` prints the comparison table (docs/megatron.md).
"""

from __future__ import annotations

import datetime
import os
import sys
from typing import Any

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

import pycomm  # noqa: E402
import pycomm.megatron as pm  # noqa: E402
from pycomm.config import RoleConfig  # noqa: E402
from pycomm.launch import run_world  # noqa: E402
from pycomm.megatron_config import AllGatherGroupConfig, resolve_role_configs  # noqa: E402
from pycomm.megatron_layout import MegatronLayout  # noqa: E402

AG_TIMEOUT = 60.0
WORLD_TIMEOUT = 420.0

# (name, initialize_model_parallel kwargs). Each world runs its layouts in
# sequence, symmetric ones first (see _offset_layout for why).
LAYOUTS_4: list[tuple[str, dict[str, Any]]] = [
    ("pp=2, order tp-cp-ep-pp-dp", dict(pipeline_model_parallel_size=2, order="tp-cp-ep-pp-dp")),
    ("pp=2, order tp-cp-ep-dp-pp", dict(pipeline_model_parallel_size=2, order="tp-cp-ep-dp-pp")),
    ("cp=2", dict(context_parallel_size=2, distributed_timeout_minutes=7)),
    ("tp=2, ep=2, etp=1", dict(tensor_model_parallel_size=2, expert_model_parallel_size=2,
                               expert_tensor_parallel_size=1)),
    ("ep=2, 2 dist-opt instances", dict(expert_model_parallel_size=2,
                                        num_distributed_optimizer_instances=2)),
    ("cp=2, 2 dist-opt instances", dict(context_parallel_size=2,
                                        num_distributed_optimizer_instances=2)),
    ("gtp_remat=2", dict(gtp_remat_size=2)),
    ("ep=2, expert gtp_remat=2", dict(expert_model_parallel_size=2, expert_gtp_remat_size=2)),
]
OFFSET_LAYOUT_4 = ("ranks 2-3 only (rank_offset=2, local_world_size=2)",
                   dict(rank_offset=2, local_world_size=2))

LAYOUTS_8: list[tuple[str, dict[str, Any]]] = [
    ("tp=2, pp=2, dp=2, ep=2", dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                                    expert_model_parallel_size=2)),
    ("tp=2, pp=2, dp=2, ep=2, etp=1, order tp-cp-ep-pp-dp",
     dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
          expert_model_parallel_size=2, expert_tensor_parallel_size=1, order="tp-cp-ep-pp-dp")),
]

# (name, decoder grid (shape, dims), expert grid (shape, dims) or None)
GRIDS_4: list[tuple[str, tuple[list[int], list[str]], tuple[list[int], list[str]] | None]] = [
    ("grid tp-cp-pp-dp [1,1,2,2], no expert grid", ([1, 1, 2, 2], ["tp", "cp", "pp", "dp"]), None),
    ("grid tp-cp-dp-pp [2,1,2,1] + expert grid tp-ep-dp-pp [1,2,2,1]",
     ([2, 1, 2, 1], ["tp", "cp", "dp", "pp"]), ([1, 2, 2, 1], ["tp", "ep", "dp", "pp"])),
    ("grid tp-cp-dp-pp [1,2,2,1] + expert grid tp-ep-inner_dp-outer_dp-pp [1,1,2,2,1]",
     ([1, 2, 2, 1], ["tp", "cp", "dp", "pp"]),
     ([1, 1, 2, 2, 1], ["tp", "ep", "inner_dp", "outer_dp", "pp"])),
]
OFFSET_GRID_4 = ("grid [1,2] tp-dp at rank_offset=2 + expert grid [2,1] ep-dp",
                 ([1, 2], ["tp", "dp"]), ([2, 1], ["ep", "dp"]))


# ---------------------------------------------------------------- helpers (run on ranks)

def _ranks(group: Any) -> list[int] | None:
    if group is None or group is dist.GroupMember.NON_GROUP_MEMBER:
        return None
    return sorted(dist.get_process_group_ranks(group))


def _group_count() -> int:
    # The groups this rank is a member of; the difference across a call is
    # how many it created. (torch's own get_pg_count() does not count groups
    # made with use_local_synchronization=True in torch 2.11.)
    return len(dist.distributed_c10d._world.pg_names)


def _timeout_of(group: dist.ProcessGroup) -> float:
    return group._get_backend(torch.device("cpu")).spec.timeout_seconds


def _gather_matches(group: dist.ProcessGroup | None) -> bool | None:
    """All-gather distinct per-rank values on `group`; True when the result is
    the members' values in group-rank order."""
    if group is None:
        return None
    members = dist.get_process_group_ranks(group)
    shard = torch.arange(3, dtype=torch.float32) + 100.0 * dist.get_rank()
    out = torch.empty(3 * len(members))
    dist.all_gather_into_tensor(out, shard, group=group)
    want = torch.cat([torch.arange(3, dtype=torch.float32) + 100.0 * r for r in members])
    return bool(torch.equal(out, want))


def _megatron_core_groups(parallel_state: Any) -> dict[str, Any]:
    """megatron-core's own create_all_gather_groups in this layout, for the
    comparison; its groups are released right away."""
    try:
        dp_cp_ag, expt_dp_ag = parallel_state.create_all_gather_groups(
            for_expert_parallelism=True, timeout=datetime.timedelta(seconds=AG_TIMEOUT)
        )
    except Exception as e:  # noqa: BLE001 - the error is the finding
        message = f"{type(e).__name__}: {e}".splitlines()[0]
        return {"dp_cp_ag": f"error: {message}", "expt_dp_ag": f"error: {message}"}
    found = {"dp_cp_ag": _ranks(dp_cp_ag), "expt_dp_ag": _ranks(expt_dp_ag)}
    for group in (dp_cp_ag, expt_dp_ag):
        if _ranks(group) is not None:
            dist.destroy_process_group(group)
    return found


def _layout_from_kwargs(world: int, kwargs: dict[str, Any]) -> MegatronLayout:
    return MegatronLayout(
        world_size=kwargs.get("local_world_size", world),
        tp=kwargs.get("tensor_model_parallel_size", 1),
        cp=kwargs.get("context_parallel_size", 1),
        ep=kwargs.get("expert_model_parallel_size", 1),
        pp=kwargs.get("pipeline_model_parallel_size", 1),
        etp=kwargs.get("expert_tensor_parallel_size"),
        order=kwargs.get("order", "tp-cp-ep-dp-pp"),
        rank_offset=kwargs.get("rank_offset", 0),
        dist_opt_instances=kwargs.get("num_distributed_optimizer_instances", 1),
        gtp_remat=kwargs.get("gtp_remat_size", 1),
        expert_gtp_remat=kwargs.get("expert_gtp_remat_size", 1),
    )


def _check_parallel_state_layout(
    rank: int, world: int, name: str, kwargs: dict[str, Any]
) -> dict[str, Any]:
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection

    ps.initialize_model_parallel(create_gloo_process_groups=False, **kwargs)
    row: dict[str, Any] = {"layout": name, "rank": rank}
    try:
        if not ps.is_initialized():
            # A rank outside a rank_offset layout has no parallel state.
            try:
                pm.create_all_gather_groups(for_expert_parallelism=True, timeout=AG_TIMEOUT)
            except pycomm.NotInitializedError as e:
                row["not_initialized"] = str(e)
            return row
        ep = ps.get_expert_model_parallel_world_size()
        # What Megatron-FSDP shards over: the collection's intra groups.
        reference = ProcessGroupCollection.use_mpu_process_groups()
        row["expected"] = {
            "dp_cp_ag": _ranks(reference.intra_dp_cp),
            "expt_dp_ag": _ranks(reference.intra_expt_dp) if ep > 1 else None,
        }
        row["full"] = {"dp_cp": _ranks(reference.dp_cp), "expt_dp": _ranks(reference.expt_dp)}
        layout = _layout_from_kwargs(world, kwargs)
        row["plan"] = {"dp_cp_ag": layout.dp_cp_ag(rank), "expt_dp_ag": layout.expt_dp_ag(rank),
                       "dp_cp": layout.dp_cp(rank), "expt_dp": layout.expt_dp(rank)}
        row["emulated_megatron_core"] = layout.megatron_core_ag(rank, world)

        before = _group_count()
        dp_cp_ag, expt_dp_ag = pm.create_all_gather_groups(
            for_expert_parallelism=True, timeout=AG_TIMEOUT
        )
        row["groups_created"] = _group_count() - before
        row["pycomm"] = {"dp_cp_ag": _ranks(dp_cp_ag), "expt_dp_ag": _ranks(expt_dp_ag)}
        row["gather_ok"] = {"dp_cp_ag": _gather_matches(dp_cp_ag),
                            "expt_dp_ag": _gather_matches(expt_dp_ag)}
        row["timeout"] = _timeout_of(dp_cp_ag)
        if "distributed_timeout_minutes" in kwargs:
            # Named by nobody: the duplicate keeps the trainer's timeout.
            with pycomm.CommPool() as pool:
                inherited, _ = pm.create_all_gather_groups(pool=pool)
                row["inherited_timeout"] = _timeout_of(inherited)

        before = _group_count()
        collection = pm.pg_collection_with_ag()
        row["collection_same_groups"] = (
            collection.dp_cp_ag is dp_cp_ag and collection.expt_dp_ag is expt_dp_ag
        )
        off = AllGatherGroupConfig(create_all_gather_group=False).apply(reference)
        row["config_off_untouched"] = off is reference and reference.dp_cp_ag is None
        on = AllGatherGroupConfig(create_all_gather_group=True, timeout=AG_TIMEOUT).apply(
            ProcessGroupCollection.use_mpu_process_groups()
        )
        row["config_on_same_groups"] = on.dp_cp_ag is dp_cp_ag and on.expt_dp_ag is expt_dp_ag
        row["groups_created_again"] = _group_count() - before

        row["megatron_core"] = _megatron_core_groups(ps)
        return row
    finally:
        pm.destroy_all_gather_groups()
        ps.destroy_model_parallel()


def _world_still_consistent() -> bool:
    # Every rank made the same sequence of group calls, so a fresh
    # world-wide group still gets one name on all ranks and works.
    group = dist.new_group(list(range(dist.get_world_size())))
    value = torch.ones(1)
    dist.all_reduce(value, group=group)
    dist.destroy_process_group(group)
    return value.item() == dist.get_world_size()


def _check_grid_layout(
    rank: int,
    name: str,
    decoder: tuple[list[int], list[str]],
    expert: tuple[list[int], list[str]] | None,
    rank_offset: int = 0,
) -> dict[str, Any]:
    from megatron.core.hyper_comm_grid import HyperCommGrid

    grid = HyperCommGrid(decoder[0], decoder[1], rank_offset=rank_offset)
    expert_grid = HyperCommGrid(expert[0], expert[1], rank_offset=rank_offset) if expert else None
    row: dict[str, Any] = {"layout": name, "rank": rank}
    dims = pm.default_grid_dims(grid, expert=False)
    expert_dims = pm.default_grid_dims(expert_grid, expert=True) if expert_grid else None
    try:
        try:
            pm.grid_all_gather_groups(grid, timeout=AG_TIMEOUT)
        except pycomm.NotInitializedError as e:
            row["missing_base_error"] = str(e)
        # The trainer's own groups, then ours.
        grid.create_pg(dims)
        if expert_grid is not None:
            expert_grid.create_pg(expert_dims)

        def enum_group(g: Any, d: list[str]) -> list[int] | None:
            for ranks in g.get_rank_enum(d):
                if rank in ranks:
                    return sorted(ranks)
            return None

        row["expected"] = {
            "dp_cp_ag": enum_group(grid, dims),
            "expt_dp_ag": enum_group(expert_grid, expert_dims) if expert_grid else None,
        }
        row["base"] = {
            "dp_cp_ag": _ranks(grid.get_pg(dims)) if grid.is_current_rank_in_grid() else None,
            "expt_dp_ag": _ranks(expert_grid.get_pg(expert_dims))
            if expert_grid is not None and expert_grid.is_current_rank_in_grid() else None,
        }
        before = _group_count()
        dp_cp_ag, expt_dp_ag = pm.grid_all_gather_groups(grid, expert_grid, timeout=AG_TIMEOUT)
        row["groups_created"] = _group_count() - before
        row["pycomm"] = {"dp_cp_ag": _ranks(dp_cp_ag), "expt_dp_ag": _ranks(expt_dp_ag)}
        row["gather_ok"] = {"dp_cp_ag": _gather_matches(dp_cp_ag),
                            "expt_dp_ag": _gather_matches(expt_dp_ag)}
        if grid.is_current_rank_in_grid():
            # A collection built from the grid, as Megatron-Bridge does, gets
            # the same (pooled) groups through attach_all_gather_groups.
            from megatron.core.process_groups_config import ProcessGroupCollection

            collection = ProcessGroupCollection(dp_cp=grid.get_pg(dims))
            if expert_grid is not None:
                collection.intra_expt_dp = expert_grid.get_pg(expert_dims)
            before = _group_count()
            pm.attach_all_gather_groups(collection, expert_grid is not None, timeout=AG_TIMEOUT)
            row["attach_same_groups"] = (
                collection.dp_cp_ag is dp_cp_ag and collection.expt_dp_ag is expt_dp_ag
                and _group_count() == before
            )
        return row
    finally:
        pm.destroy_all_gather_groups()
        grid.destroy()
        if expert_grid is not None:
            expert_grid.destroy()


def world_layouts(
    rank: int,
    world: int,
    layouts: list[tuple[str, dict[str, Any]]],
    grids: list[Any],
    offset_layout: tuple[str, dict[str, Any]] | None,
    offset_grid: Any,
) -> dict[str, Any]:
    """One spawned world checks many layouts in turn (spawning costs more
    than a layout)."""
    out: dict[str, Any] = {"rows": []}
    try:
        pm.create_all_gather_groups()
    except pycomm.NotInitializedError as e:
        out["before_init_error"] = str(e)
    for name, kwargs in layouts:
        out["rows"].append(_check_parallel_state_layout(rank, world, name, kwargs))
    for name, decoder, expert in grids:
        out["rows"].append(_check_grid_layout(rank, name, decoder, expert))
    out["world_consistent"] = _world_still_consistent()
    # Layouts that cover only some ranks come last: the ranks outside them make
    # fewer new_group calls, after which torch 2.14 names later world-wide
    # groups differently on the two sides.
    if offset_layout is not None:
        out["rows"].append(_check_parallel_state_layout(rank, world, *offset_layout))
    if offset_grid is not None:
        name, decoder, expert = offset_grid
        out["rows"].append(_check_grid_layout(rank, name, decoder, expert, rank_offset=2))
    return out


# ---------------------------------------------------------------- assertions (parent)

def _assert_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = [row for result in results for row in result["rows"]]
    for row in rows:
        where = f"{row['layout']} rank {row['rank']}"
        if "not_initialized" in row:
            assert "not initialized" in row["not_initialized"], where
            continue
        assert row["pycomm"] == row["expected"], (where, row)
        expected_count = sum(v is not None for v in row["expected"].values())
        # Only the groups this rank is in, one new_group call each.
        assert row["groups_created"] == expected_count, (where, row)
        for role, ok in row["gather_ok"].items():
            assert ok is (None if row["expected"][role] is None else True), (where, role, row)
        if "plan" in row:
            assert row["timeout"] == AG_TIMEOUT, (where, row)
            if "inherited_timeout" in row:
                assert row["inherited_timeout"] == 7 * 60.0, (where, row)
            plan = row["plan"]
            assert plan["dp_cp_ag"] == row["expected"]["dp_cp_ag"], (where, row)
            assert plan["expt_dp_ag"] == row["expected"]["expt_dp_ag"], (where, row)
            assert plan["dp_cp"] == row["full"]["dp_cp"], (where, row)
            assert plan["expt_dp"] == row["full"]["expt_dp"], (where, row)
            assert row["collection_same_groups"], (where, row)
            assert row["config_off_untouched"], (where, row)
            assert row["config_on_same_groups"], (where, row)
            assert row["groups_created_again"] == 0, (where, row)
            _assert_emulation_matches(where, row)
        else:
            assert row["base"] == row["expected"], (where, row)
            assert row.get("attach_same_groups", row["expected"]["dp_cp_ag"] is None), (where, row)
            if row["rank"] >= 0 and row["expected"]["dp_cp_ag"] is not None:
                assert "create it with grid.create_pg" in row["missing_base_error"], (where, row)
    return rows


def _assert_emulation_matches(where: str, row: dict[str, Any]) -> None:
    """The plan command's account of megatron-core's groups is what
    megatron-core's function actually built."""
    real, emulated = row["megatron_core"], row["emulated_megatron_core"]
    for role in ("dp_cp_ag", "expt_dp_ag"):
        if isinstance(real[role], str):
            # torch >= 2.14 / 2.11 word megatron-core's bad new_group call so.
            refused = ("out of range", "should be within the world_size")
            assert isinstance(emulated[role], str) and any(r in real[role] for r in refused), (
                where, row,
            )
        else:
            assert emulated[role] == real[role], (where, role, row)


def _megatron_core_differs(rows: list[dict[str, Any]], layout: str) -> bool:
    return any(
        row["layout"] == layout and "megatron_core" in row
        and row["megatron_core"] != row["expected"]
        for row in rows
    )


@pytest.fixture(scope="module")
def rows_4() -> list[dict[str, Any]]:
    results = run_world(world_layouts, 4, LAYOUTS_4, GRIDS_4, OFFSET_LAYOUT_4, OFFSET_GRID_4,
                        timeout_seconds=WORLD_TIMEOUT)
    for result in results:
        assert "not initialized" in result["before_init_error"]
        assert result["world_consistent"]
    return _assert_rows(results)


@pytest.fixture(scope="module")
def rows_8() -> list[dict[str, Any]]:
    results = run_world(world_layouts, 8, LAYOUTS_8, [], None, None,
                        timeout_seconds=WORLD_TIMEOUT)
    for result in results:
        assert result["world_consistent"]
    return _assert_rows(results)


@pytest.mark.timeout(WORLD_TIMEOUT + 60)
def test_four_ranks_every_layout_matches_parallel_state_and_grid(rows_4: list[dict[str, Any]]) -> None:
    layouts = {row["layout"] for row in rows_4}
    want = {name for name, _ in LAYOUTS_4} | {g[0] for g in GRIDS_4}
    want |= {OFFSET_LAYOUT_4[0], OFFSET_GRID_4[0]}
    assert layouts == want
    assert len(rows_4) == 4 * len(want)
    assert sum("inherited_timeout" in r for r in rows_4) == 4
    offset_rows = [r for r in rows_4 if r["layout"] == OFFSET_LAYOUT_4[0]]
    assert [("not_initialized" in r) for r in offset_rows] == [True, True, False, False]
    grid_offset = [r for r in rows_4 if r["layout"] == OFFSET_GRID_4[0]]
    assert [r["pycomm"]["dp_cp_ag"] for r in grid_offset] == [None, None, [2, 3], [2, 3]]
    assert [r["groups_created"] for r in grid_offset] == [0, 0, 2, 2]


@pytest.mark.timeout(WORLD_TIMEOUT + 60)
def test_four_ranks_megatron_core_function_differs_where_documented(
    rows_4: list[dict[str, Any]],
) -> None:
    wrong = {
        "pp=2, order tp-cp-ep-pp-dp",
        "ep=2, 2 dist-opt instances",
        "cp=2, 2 dist-opt instances",
        "gtp_remat=2",
        "ep=2, expert gtp_remat=2",
        OFFSET_LAYOUT_4[0],
    }
    for name, _ in LAYOUTS_4 + [OFFSET_LAYOUT_4]:
        assert _megatron_core_differs(rows_4, name) == (name in wrong), name
    pp_rank0 = next(r for r in rows_4 if r["layout"] == "pp=2, order tp-cp-ep-pp-dp"
                    and r["rank"] == 0)
    assert pp_rank0["expected"]["dp_cp_ag"] == [0, 2]
    assert pp_rank0["megatron_core"]["dp_cp_ag"] == [0, 1]
    instances_rank0 = next(r for r in rows_4 if r["layout"] == "ep=2, 2 dist-opt instances"
                           and r["rank"] == 0)
    assert instances_rank0["expected"]["dp_cp_ag"] == [0, 1]
    assert instances_rank0["megatron_core"]["dp_cp_ag"] == [0, 1, 2, 3]


@pytest.mark.timeout(WORLD_TIMEOUT + 60)
def test_eight_ranks_tp2_pp2_dp2_ep2(rows_8: list[dict[str, Any]]) -> None:
    assert {row["layout"] for row in rows_8} == {name for name, _ in LAYOUTS_8}
    assert len(rows_8) == 8 * len(LAYOUTS_8)
    assert not _megatron_core_differs(rows_8, LAYOUTS_8[0][0])
    assert _megatron_core_differs(rows_8, LAYOUTS_8[1][0])


# ---------------------------------------------------------------- no processes

@pytest.mark.timeout(30)
def test_not_initialized_without_torch_distributed() -> None:
    assert not dist.is_initialized()
    with pytest.raises(pycomm.NotInitializedError, match="init_process_group"):
        pm.create_all_gather_groups()
    with pytest.raises(pycomm.NotInitializedError):
        pm.pg_collection_with_ag()


@pytest.mark.timeout(30)
def test_role_configs_fall_back_field_by_field() -> None:
    configs = resolve_role_configs(
        datetime.timedelta(minutes=2),
        {
            "dp_cp": {"max_ctas": 16, "min_ctas": 2},
            "dp_cp_ag": {"max_ctas": 4, "min_ctas": 1},
            "ep_dp": {"cga_cluster_size": 2, "is_high_priority_stream": False},
            "expt_dp_ag": RoleConfig(net_name="IB"),
        },
    )
    assert configs["dp_cp_ag"] == RoleConfig(max_ctas=4, min_ctas=1, timeout=120.0)
    assert configs["expt_dp_ag"] == RoleConfig(
        cga_cluster_size=2, is_high_priority_stream=False, net_name="IB", timeout=120.0
    )
    assert resolve_role_configs() == {"dp_cp_ag": RoleConfig(), "expt_dp_ag": RoleConfig()}
    assert resolve_role_configs(30)["expt_dp_ag"].timeout == 30.0


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "cfgs, match",
    [
        ({"dp_cp_allgather": {"max_ctas": 4}}, "unknown group key"),
        ({"dp_cp_ag": {"max_ctaz": 4}}, "unknown key"),
        ({"dp_cp_ag": {"max_ctas": 400}}, "max_ctas"),
        ({"dp_cp_ag": {"is_high_priority_stream": "yes"}}, "is_high_priority_stream"),
        ({"bogus": RoleConfig()}, "unknown group key"),
        ([("dp_cp_ag", {})], "mapping"),
    ],
)
def test_bad_nccl_comm_cfgs_raise_config_error(cfgs: Any, match: str) -> None:
    with pytest.raises(pycomm.ConfigError, match=match):
        resolve_role_configs(None, cfgs)


@pytest.mark.timeout(30)
def test_config_object_mirrors_megatron_flag(tmp_path: Any) -> None:
    yaml_path = tmp_path / "nccl.yaml"
    yaml_path.write_text(
        "dp_cp:\n  max_ctas: 8\n"
        "ep_dp:\n  is_high_priority_stream: false\n"
        "expt_dp_ag:\n  min_ctas: 2\n"
    )

    class Args:  # Megatron-LM's parsed args carry these names
        create_all_gather_group = True
        distributed_timeout_minutes = 3
        nccl_communicator_config_path = str(yaml_path)

    config = AllGatherGroupConfig.from_dist_init_config(
        Args, nccl_comm_cfgs={"dp_cp_ag": {"max_ctas": 4}}
    )
    assert config.create_all_gather_group
    roles = config.role_configs()
    assert roles["dp_cp_ag"] == RoleConfig(max_ctas=4, timeout=180.0)
    assert roles["expt_dp_ag"] == RoleConfig(min_ctas=2, is_high_priority_stream=False, timeout=180.0)
    with pytest.raises(pycomm.ConfigError, match="cannot read"):
        AllGatherGroupConfig(nccl_communicator_config_path=str(tmp_path / "absent.yaml")).role_configs()
    off = AllGatherGroupConfig()
    assert off.create_all_gather_group is False
    marker = object()
    assert off.apply(marker) is marker  # off: nothing created, nothing changed
    with pytest.raises(pycomm.ConfigError):
        AllGatherGroupConfig(create_all_gather_group="yes")  # type: ignore[arg-type]
    with pytest.raises(pycomm.ConfigError):
        AllGatherGroupConfig(timeout=-1)


@pytest.mark.timeout(300)
def test_creation_scale_benchmark_runs_and_pycomm_stays_flat(tmp_path: Any) -> None:
    """Smoke run of benchmarks/creation_scale.py for small simulated worlds."""
    import json
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "benchmarks", "creation_scale.py")
    out = tmp_path / "creation_scale.json"
    # The checkout under test, also where pycomm is not installed.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    done = subprocess.run(
        [sys.executable, script, "--worlds", "8,64,512", "--out", str(out)],
        capture_output=True, text=True, timeout=240, env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "right ranks" in done.stdout
    rows = json.loads(out.read_text())["rows"]
    assert {(r["family"], r["world"]) for r in rows} == {
        (f, n) for f in ("tp2-pp2-ep2", "dp8-ep2") for n in (8, 64, 512)
    }
    for row in rows:
        for key in ("pycomm", "pycomm_init_barrier"):
            assert row[key]["new_group_calls"] == 2, row
            assert row[key]["groups_joined"] == 2, row
            assert row[key]["correct"], row
        # Per duplicate: say which pool, announce, count, poll one key (+ one
        # set by the last arrival), then leave and delete what it wrote: a
        # constant, whatever the world or group size.
        assert 10 <= row["pycomm"]["store_ops"] <= 16, row
    for family in ("tp2-pp2-ep2", "dp8-ep2"):
        ops = {r["pycomm"]["store_ops"] for r in rows if r["family"] == family}
        assert max(ops) - min(ops) <= 1, (family, ops)  # flat: only the last arrival sets one more key
    small = {r["world"]: r for r in rows if r["family"] == "dp8-ep2"}
    # megatron-core visits every group of both kinds on every rank.
    assert [small[n]["megatron_core"]["new_group_calls"] for n in (8, 64, 512)] == [3, 10, 80]


# ---------------------------------------------------------------- comparison table

def comparison_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: per layout and rank 0 (or the first rank with groups), the
    parallel_state group, pycomm's AG group and megatron-core's."""
    lines = [
        "| layout | rank | group | parallel_state / grid | pycomm | megatron-core create_all_gather_groups |",
        "|---|---|---|---|---|---|",
    ]
    seen: set[str] = set()
    for row in rows:
        if row["layout"] in seen or "expected" not in row or row["expected"]["dp_cp_ag"] is None:
            continue
        seen.add(row["layout"])
        for role in ("dp_cp_ag", "expt_dp_ag"):
            if role == "expt_dp_ag" and row["expected"][role] is None and (
                "megatron_core" not in row or row["megatron_core"][role] is None
            ):
                continue
            theirs = row.get("megatron_core", {}).get(role, "— (none for grids)")
            verdict = "" if theirs == row["expected"][role] or "megatron_core" not in row else " ✗"
            lines.append(
                f"| {row['layout']} | {row['rank']} | {role} | {row['expected'][role]} "
                f"| {row['pycomm'][role]} | {theirs}{verdict} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    four = run_world(world_layouts, 4, LAYOUTS_4, GRIDS_4, OFFSET_LAYOUT_4, OFFSET_GRID_4,
                     timeout_seconds=WORLD_TIMEOUT)
    eight = run_world(world_layouts, 8, LAYOUTS_8, [], None, None, timeout_seconds=WORLD_TIMEOUT)
    all_rows = _assert_rows(four) + _assert_rows(eight)
    print(comparison_table(all_rows))
