"""`python -m pycomm plan` and pycomm.megatron_layout against megatron-core's
own RankGenerator (no processes), and against pycomm._C.RankLayout."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from typing import Any

import pytest

from pycomm.errors import LayoutError
from pycomm.megatron_layout import MegatronLayout, inject_gtp_remat

ORDERS = ("tp-cp-ep-dp-pp", "tp-cp-ep-pp-dp", "tp-pp-dp-cp-ep", "cp-tp-ep-dp-pp")


def _layouts() -> list[MegatronLayout]:
    found = []
    for world, tp, cp, ep, etp, pp, order, instances, offset in itertools.product(
        (8, 16, 32), (1, 2), (1, 2), (1, 2, 4), (None, 1), (1, 2), ORDERS, (1, 2), (0, 5)
    ):
        try:
            found.append(MegatronLayout(world, tp=tp, cp=cp, ep=ep, etp=etp, pp=pp, order=order,
                                        dist_opt_instances=instances, rank_offset=offset))
        except LayoutError:
            continue
    for world, gtp, egtp, order in itertools.product((8, 16), (1, 2), (1, 2), ORDERS[:2]):
        try:
            found.append(MegatronLayout(world, pp=2, ep=2, gtp_remat=gtp,
                                        expert_gtp_remat=egtp, order=order))
        except LayoutError:
            continue
    return found


def _megatron_groups(layout: MegatronLayout) -> dict[str, dict[int, list[int]]]:
    """Rank -> group, straight from megatron-core's RankGenerator and the
    slicing initialize_model_parallel does for distributed-optimizer
    instances (on its enumeration order, not a sorted copy)."""
    from megatron.core.parallel_state import RankGenerator, _inject_gtp_remat_axis

    decoder = RankGenerator(tp=layout.tp, ep=1, dp=layout.dp, pp=layout.pp, cp=layout.cp,
                            order=_inject_gtp_remat_axis(layout.order, after="tp"),
                            rank_offset=layout.rank_offset, gtp_remat=layout.gtp_remat)
    expert = RankGenerator(tp=layout.expert_tp, ep=layout.ep, dp=layout.expert_dp, pp=layout.pp,
                           cp=1, order=_inject_gtp_remat_axis(layout.order, after="ep"),
                           rank_offset=layout.rank_offset, gtp_remat=layout.expert_gtp_remat)
    found: dict[str, dict[int, list[int]]] = {k: {} for k in
                                              ("dp_cp", "intra_dp_cp", "expt_dp", "intra_expt_dp")}
    n = layout.dist_opt_instances
    for kind, generator, token in (("dp_cp", decoder, "dp-cp"), ("expt_dp", expert, "dp")):
        for ranks in generator.get_ranks(token):
            size = len(ranks) // n
            slices = [ranks[i * size:(i + 1) * size] for i in range(n)]
            for r in ranks:
                found[kind][r] = sorted(ranks)
            for part in slices:
                for r in part:
                    found[f"intra_{kind}"][r] = sorted(part)
    return found


@pytest.mark.timeout(120)
def test_layout_groups_equal_megatron_rank_generator() -> None:
    layouts = _layouts()
    assert len(layouts) > 300
    for layout in layouts:
        want = _megatron_groups(layout)
        ranks = range(layout.rank_offset, layout.rank_offset + layout.world_size)
        for rank in ranks:
            got = {
                "dp_cp": layout.dp_cp(rank),
                "intra_dp_cp": layout.intra_dp_cp(rank),
                "expt_dp": layout.expt_dp(rank),
                "intra_expt_dp": layout.intra_expt_dp(rank),
            }
            assert got == {k: v[rank] for k, v in want.items()}, (layout, rank)
            assert layout.dp_cp_ag(rank) == got["intra_dp_cp"]
            assert layout.expt_dp_ag(rank) == (got["intra_expt_dp"] if layout.ep > 1 else None)
        counts = layout.group_counts()
        assert counts["dp_cp"] == len({tuple(g) for g in want["dp_cp"].values()})
        assert counts["intra_expt_dp"] == len({tuple(g) for g in want["intra_expt_dp"].values()})


@pytest.mark.timeout(60)
def test_layout_grid_equals_compiled_rank_layout() -> None:
    from pycomm._C import RankLayout

    for layout in _layouts()[::7]:
        for grid in (layout.decoder_grid(), layout.expert_grid()):
            compiled = RankLayout([grid.sizes[n] for n in grid.names], grid.names,
                                  grid.rank_offset)
            for dims in (["dp", "cp"], ["dp"], ["pp"], ["tp", "ep", "pp"]):
                assert compiled.group_count(dims) == grid.group_count(dims)
                for rank in range(grid.rank_offset, grid.rank_offset + grid.world_size, 3):
                    assert list(compiled.group_of(rank, dims)) == grid.group_of(rank, dims)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(world_size=6, tp=4), "not divisible"),
        (dict(world_size=8, ep=16), "not divisible"),
        (dict(world_size=8, order="tp-xp-dp-pp"), "unknown dimension"),
        (dict(world_size=8, pp=2, order="tp-cp-ep-dp"), "does not name it"),
        (dict(world_size=8, dist_opt_instances=3), "not divisible"),
        (dict(world_size=8, gtp_remat=2, dist_opt_instances=2), "gtp_remat"),
        (dict(world_size=16, tp=2, pp=2, ep=4, etp=1, order="tp-cp-ep-pp-dp"), "expert dp"),
        (dict(world_size=8, tp=2, pp=2, ep=2, etp=1, order="tp-pp-dp-cp-ep"), "pipeline"),
        (dict(world_size=0), ">= 1"),
    ],
)
def test_impossible_layouts_raise_layout_error(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(LayoutError, match=match):
        MegatronLayout(**kwargs)


@pytest.mark.timeout(30)
def test_megatron_core_ag_emulation_names_the_documented_faults() -> None:
    pp = MegatronLayout(4, pp=2, order="tp-cp-ep-pp-dp")
    assert pp.dp_cp_ag(0) == [0, 2]
    assert pp.megatron_core_ag(0)["dp_cp_ag"] == [0, 1]
    instances = MegatronLayout(4, dist_opt_instances=2)
    assert instances.dp_cp_ag(0) == [0, 1]
    assert instances.megatron_core_ag(0)["dp_cp_ag"] == [0, 1, 2, 3]
    gtp = MegatronLayout(4, gtp_remat=2)
    assert gtp.dp_cp_ag(0) == [0, 2]
    assert "out of range" in str(gtp.megatron_core_ag(0)["dp_cp_ag"])
    offset = MegatronLayout(2, rank_offset=2)
    assert offset.dp_cp_ag(3) == [2, 3]
    assert offset.megatron_core_ag(3, torch_world_size=4)["dp_cp_ag"] is None
    default = MegatronLayout(8, tp=2, pp=2, ep=2)
    assert default.megatron_core_ag(5) == {"dp_cp_ag": default.dp_cp_ag(5),
                                           "expt_dp_ag": default.expt_dp_ag(5)}
    assert inject_gtp_remat("tp-cp-ep-dp-pp", "ep") == "tp-cp-ep-gtp_remat-dp-pp"


def _run_plan(argv: list[str]) -> tuple[int, dict[str, Any]]:
    import contextlib
    import io

    from pycomm.__main__ import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["plan", *argv, "--json"])
    return code, json.loads(out.getvalue()) if code == 0 else {}


@pytest.mark.timeout(60)
def test_plan_json_matches_layout_and_16k_ranks_plan_under_a_second() -> None:
    argv = ["--world", "16384", "--tp", "8", "--pp", "4", "--ep", "8", "--etp", "1",
            "--order", "tp-cp-ep-pp-dp", "--rank", "12345", "--dist-opt-instances", "2"]
    started = time.perf_counter()
    code, result = _run_plan(argv)
    elapsed = time.perf_counter() - started
    assert code == 0
    assert elapsed < 1.0, elapsed
    layout = MegatronLayout(16384, tp=8, pp=4, ep=8, etp=1, order="tp-cp-ep-pp-dp",
                            dist_opt_instances=2)
    assert result["groups"]["dp_cp"] == layout.dp_cp(12345)
    assert result["all_gather"]["pycomm"]["dp_cp_ag"] == layout.intra_dp_cp(12345)
    assert len(result["all_gather"]["pycomm"]["dp_cp_ag"]) == 256
    assert result["group_counts"] == {"dp_cp": 32, "intra_dp_cp": 64, "expt_dp": 32,
                                      "intra_expt_dp": 64}
    assert result["all_gather"]["megatron_core_correct"] == {"dp_cp_ag": False,
                                                             "expt_dp_ag": False}
    assert result["creations_per_rank"] == {"pycomm": 2, "megatron_core": 64}


@pytest.mark.timeout(60)
def test_plan_rejects_bad_layouts_with_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = _run_plan(["--world", "12", "--tp", "8"])
    assert code == 2
    assert "not divisible" in capsys.readouterr().err
    code, _ = _run_plan(["--world", "8", "--rank", "9"])
    assert code == 2


@pytest.mark.timeout(120)
def test_plan_command_prints_tables() -> None:
    env = dict(os.environ, COLUMNS="200")
    done = subprocess.run(
        [sys.executable, "-m", "pycomm", "plan", "--world", "4", "--pp", "2",
         "--order", "tp-cp-ep-pp-dp", "--rank", "0"],
        capture_output=True, text=True, timeout=100, env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "dp_cp_ag" in done.stdout and "WRONG" in done.stdout
    assert "[0, 2]" in done.stdout and "[0, 1]" in done.stdout
