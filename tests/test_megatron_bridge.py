"""pycomm.megatron.bridge against the real Megatron-Bridge 0.6.2, on real
gloo worlds of 4 ranks.

After ``enable(cfg)``, the collection each of Bridge's two paths builds carries
pooled ``dp_cp_ag`` / ``expt_dp_ag`` whose ranks are Bridge's own
``intra_dp_cp`` / ``intra_expt_dp`` on every rank, whose all-gather and
reduce-scatter results equal those of Bridge's groups, with the trainer's
timeout and the groups' settings from Bridge's ``nccl_communicator_config_path``;
Bridge's own teardown (destroy, and abort) releases them.

* MPU path: Bridge's ``_initialize_distributed`` itself, with
  ``distributed_backend="gloo"`` (what ``setup()`` reaches through
  ``initialize_megatron``; ``setup()`` as a whole needs CUDA).
* HyperCommGrid path (``use_decentralized_pg``): Bridge 0.6.2 hard-codes
  ``backend="nccl"`` for these groups and its ``_initialize_distributed``
  refuses the path without a GPU, so the tests call the function it calls,
  ``_create_pg_collection``, with the one piece a CPU cannot run, the NCCL
  transport, given to gloo (:func:`nccl_groups_on_gloo`). Bridge's layout
  code, HyperCommGrid, torch.distributed and the pool are the real ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import subprocess
import sys
import time
from typing import Any, Callable, Iterator

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

import pycomm  # noqa: E402
from pycomm.launch import run_world  # noqa: E402
from pycomm.megatron.config import AllGatherGroupConfig, MissingAllGatherFlagWarning  # noqa: E402
from world_checks import group_ranks, rank_tensor  # noqa: E402

WORLD = 4
TIMEOUT_MINUTES = 5  # not the world's 7 minutes (WORLD_TIMEOUT)
WORLD_TIMEOUT = 420.0
# The groups' own settings, as a trainer would put them in the file Bridge's
# DistributedInitConfig.nccl_communicator_config_path names.
NCCL_YAML = "dp_cp:\n  max_ctas: 8\nexpt_dp_ag:\n  min_ctas: 2\n"

# (name, Bridge TransformerConfig kwargs, num_distributed_optimizer_instances,
#  DistributedInitConfig kwargs)
DECENTRALIZED_CASES: list[tuple[str, dict[str, Any], int, dict[str, Any]]] = [
    ("decentralized dp=4", {}, 1, {}),
    ("decentralized ep=2", dict(expert_model_parallel_size=2, num_moe_experts=2), 1, {}),
    ("decentralized ep=2, 2 optimizer instances",
     dict(expert_model_parallel_size=2, num_moe_experts=2), 2, {}),
]
MPU_CASES: list[tuple[str, dict[str, Any], int, dict[str, Any]]] = [
    ("MPU ep=2", dict(expert_model_parallel_size=2, num_moe_experts=2), 1, {}),
    ("MPU pp=2, order tp-cp-ep-pp-dp", dict(pipeline_model_parallel_size=2), 1,
     dict(use_tp_pp_dp_mapping=True)),
]

# Rank -> (dp_cp_ag, expt_dp_ag) each case must give, written out so that a
# wrong group in Bridge and pycomm alike still fails.
EXPECTED: dict[str, Callable[[int], tuple[list[int], list[int] | None]]] = {
    "decentralized dp=4": lambda r: ([0, 1, 2, 3], None),
    "decentralized ep=2": lambda r: ([0, 1, 2, 3], [r % 2, r % 2 + 2]),
    # Bridge 0.6.2 splits only the expert grid for optimizer instances:
    # its intra_dp_cp stays the whole dp-cp group.
    "decentralized ep=2, 2 optimizer instances": lambda r: ([0, 1, 2, 3], [r]),
    "MPU ep=2": lambda r: ([0, 1, 2, 3], [r % 2, r % 2 + 2]),
    "MPU pp=2, order tp-cp-ep-pp-dp": lambda r: ([r % 2, r % 2 + 2], None),
}


# ---------------------------------------------------------------- helpers (run on ranks)

@contextlib.contextmanager
def nccl_groups_on_gloo() -> Iterator[None]:
    """Bridge's HyperCommGrid path asks for backend="nccl" (hard-coded); on a
    machine without a GPU those groups are made with gloo instead. Every other
    argument, and the ranks, are Bridge's."""
    real = dist.new_subgroups_by_enumeration

    def on_gloo(ranks_per_subgroup_list: Any, timeout: Any = None, backend: Any = None,
                pg_options: Any = None, group_desc: Any = None) -> Any:
        if backend == "nccl":
            backend = "gloo"
        return real(ranks_per_subgroup_list, timeout=timeout, backend=backend,
                    pg_options=pg_options, group_desc=group_desc)

    dist.new_subgroups_by_enumeration = on_gloo
    try:
        yield
    finally:
        dist.new_subgroups_by_enumeration = real


class _Records(logging.Handler):
    """pycomm's warnings and errors on this rank."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.levelname}: {record.getMessage()}")


@contextlib.contextmanager
def _pycomm_log() -> Iterator[_Records]:
    records = _Records()
    logger = logging.getLogger("pycomm")
    logger.addHandler(records)
    try:
        yield records
    finally:
        logger.removeHandler(records)


def _model_config(**kwargs: Any) -> Any:
    from megatron.bridge.models.transformer_config import TransformerConfig

    # Bridge defers validation to finalize(); the init paths read sizes only.
    return TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, **kwargs)


def _dist_config(yaml_path: str, config_class: Any = None, **kwargs: Any) -> Any:
    from megatron.bridge.training.config import DistributedInitConfig

    return (config_class or DistributedInitConfig)(
        distributed_backend="gloo",
        distributed_timeout_minutes=TIMEOUT_MINUTES,
        nccl_communicator_config_path=yaml_path,
        use_gloo_process_groups=False,
        **kwargs,
    )


def _same_results(pooled: dist.ProcessGroup, base: dist.ProcessGroup) -> dict[str, bool]:
    """An all-gather and a reduce-scatter on the pooled group and on Bridge's
    group, with the same inputs: equal results, and the all-gather holds
    every member's shard in group-rank order."""
    rank = dist.get_rank()
    members = dist.get_process_group_ranks(base)
    shard = rank_tensor(rank, 3, torch.float32)
    gathered = {}
    for name, group in (("pooled", pooled), ("base", base)):
        out = torch.empty(3 * len(members))
        dist.all_gather_into_tensor(out, shard, group=group)
        gathered[name] = out
    want = torch.cat([rank_tensor(m, 3, torch.float32) for m in members])
    grads = rank_tensor(rank, 4 * len(members), torch.float32, salt=1)
    reduced = {}
    for name, group in (("pooled", pooled), ("base", base)):
        out = torch.empty(4)
        dist.reduce_scatter_tensor(out, grads, group=group)
        reduced[name] = out
    return {
        "all_gather": bool(torch.equal(gathered["pooled"], gathered["base"])),
        "all_gather_contents": bool(torch.equal(gathered["pooled"], want)),
        "reduce_scatter": bool(torch.equal(reduced["pooled"], reduced["base"])),
    }


def _check_collection(collection: Any, groups_before: int) -> dict[str, Any]:
    from pycomm.megatron import bridge

    pool = bridge.current_pool()
    ep = collection.ep.size() if collection.ep is not None else 1
    bases = {"dp_cp_ag": collection.intra_dp_cp,
             "expt_dp_ag": collection.intra_expt_dp if ep > 1 else None}
    pooled = {"dp_cp_ag": getattr(collection, "dp_cp_ag", None),
              "expt_dp_ag": getattr(collection, "expt_dp_ag", None)}
    row: dict[str, Any] = {
        "bridge": {role: group_ranks(group) for role, group in bases.items()},
        "pycomm": {role: group_ranks(group) for role, group in pooled.items()},
        "made": len(pool.groups()) - groups_before if pool is not None else 0,
        "results": {}, "timeout": {}, "settings": {},
    }
    for role, group in pooled.items():
        if group is None:
            continue
        row["results"][role] = _same_results(group, bases[role])
        row["timeout"][role] = group._get_backend(torch.device("cpu")).spec.timeout_seconds
        config = pool.config(bases[role], "ag")
        row["settings"][role] = {"max_ctas": config.max_ctas, "min_ctas": config.min_ctas}
    return row


def _pool_size() -> int:
    from pycomm.megatron import bridge

    pool = bridge.current_pool()
    return len(pool.groups()) if pool is not None else 0


def bridge_maybe_destroy_process_group() -> Callable[..., None]:
    """Bridge's own end of pretrain(), ``_maybe_destroy_process_group`` from
    the installed megatron/bridge/training/pretrain.py. That module cannot be
    imported on this machine (it needs nvidia-resiliency-ext >= 0.6, whose
    wheels need glibc 2.39, and megatron-core fails to import beside an older
    one), so the function is compiled from the installed file as it stands."""
    import ast

    import megatron.bridge.training as training

    path = os.path.join(os.path.dirname(training.__file__), "pretrain.py")
    with open(path) as source:
        tree = ast.parse(source.read(), path)
    function = next(node for node in tree.body if isinstance(node, ast.FunctionDef)
                    and node.name == "_maybe_destroy_process_group")
    namespace: dict[str, Any] = {"dist": dist}  # pretrain.py's `import torch.distributed as dist`
    exec(compile(ast.Module(body=[function], type_ignores=[]), path, "exec"), namespace)
    return namespace["_maybe_destroy_process_group"]


def _teardown(abort: bool) -> dict[str, Any]:
    """Bridge's own end of pretrain(): destroy the world (after a barrier), or
    abort it as on a failure."""
    from pycomm.megatron import bridge

    maybe_destroy_process_group = bridge_maybe_destroy_process_group()
    pool = bridge.current_pool()
    open_before = [row["open"] for row in pool.stats()] if pool is not None else []
    started = time.monotonic()
    with _pycomm_log() as records:
        if abort:
            maybe_destroy_process_group(True, synchronize=False, abort=True)
        else:
            maybe_destroy_process_group(True)
        seconds = time.monotonic() - started
        open_after = [row["open"] for row in pool.stats()] if pool is not None else []
        current_after = bridge.current_pool()
    return {
        "seconds": seconds,
        "open_before": open_before,
        "open_after": open_after,
        "pool_open_after": pool.is_open if pool is not None else None,
        "current_pool_after": current_after,
        "world_after": dist.is_initialized(),
        "log": records.messages,
    }


def world_decentralized(rank: int, world: int, yaml_path: str) -> dict[str, Any]:
    from megatron.bridge.training import initialize

    from pycomm.megatron import bridge

    out: dict[str, Any] = {"rows": []}
    try:
        for name, model_kwargs, instances, dist_kwargs in DECENTRALIZED_CASES:
            cfg = _dist_config(yaml_path, use_decentralized_pg=True, **dist_kwargs)
            bridge.enable(cfg)
            before = _pool_size()
            with nccl_groups_on_gloo():
                # What Bridge's _initialize_distributed calls on this path.
                collection = initialize._create_pg_collection(_model_config(**model_kwargs),
                                                              instances)
            row = _check_collection(collection, before)
            row.update(layout=name, rank=rank)
            out["rows"].append(row)
        out["teardown"] = _teardown(abort=False)
        return out
    finally:
        bridge.disable()


def _mpu_collection(cfg: Any, model_kwargs: dict[str, Any], instances: int) -> Any:
    from megatron.bridge.training import initialize

    # What setup() -> initialize_megatron -> torch_dist_init calls.
    return initialize._initialize_distributed(_model_config(**model_kwargs), cfg, instances,
                                              None, None)


def _next_mpu_layout() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()


def _with_flag_config_class() -> Any:
    """Bridge's DistributedInitConfig with the create_all_gather_group field
    that Bridge's open change adds."""
    from megatron.bridge.training.config import DistributedInitConfig

    return dataclasses.make_dataclass(
        "DistributedInitConfigWithFlag",
        [("create_all_gather_group", bool, dataclasses.field(default=False))],
        bases=(DistributedInitConfig,), kw_only=True,
    )


@contextlib.contextmanager
def _bridge_initialize_seen(seen: list[Any], attach_own: bool = False) -> Iterator[None]:
    """Records the create_all_gather_group each call of Bridge's real
    _initialize_distributed receives; `attach_own` then also sets a dp_cp_ag
    of its own on the result, as a Bridge that makes the groups itself
    would."""
    from megatron.bridge.training import initialize

    real = initialize._initialize_distributed

    def seeing(model_config: Any, dist_config: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(getattr(dist_config, "create_all_gather_group", "no field"))
        collection = real(model_config, dist_config, *args, **kwargs)
        if attach_own:
            collection.dp_cp_ag = collection.dp_cp
        return collection

    initialize._initialize_distributed = seeing
    try:
        yield
    finally:
        initialize._initialize_distributed = real


def _flag_cases(rank: int, yaml_path: str) -> dict[str, Any]:
    """A Bridge with create_all_gather_group: the flag decides, Bridge's own
    creation is switched off while pycomm makes the groups, and a group
    Bridge attached anyway is left alone."""
    from pycomm.megatron import bridge

    with_flag = _with_flag_config_class()
    _, model_kwargs, instances, _ = MPU_CASES[0]
    found: dict[str, Any] = {}
    bridge.disable()
    for case, flag, attach_own in (("flag True", True, False), ("flag False", False, False),
                                   ("bridge made its own", True, True)):
        seen: list[Any] = []
        cfg = _dist_config(yaml_path, config_class=with_flag, create_all_gather_group=flag)
        with _bridge_initialize_seen(seen, attach_own), _pycomm_log() as records:
            bridge.enable(cfg)
            try:
                collection = _mpu_collection(cfg, model_kwargs, instances)
                found[case] = {
                    "bridge_saw": seen,
                    "cfg_flag_after": cfg.create_all_gather_group,
                    "kept_bridges": getattr(collection, "dp_cp_ag", None) is collection.dp_cp,
                    "row": None if attach_own else _check_collection(collection, 0),
                    "pycomm_made": _pool_size(),
                    "log": records.messages,
                }
            finally:
                bridge.disable()
                _next_mpu_layout()
    return found


def world_mpu(rank: int, world: int, yaml_path: str) -> dict[str, Any]:
    from pycomm.megatron import bridge

    out: dict[str, Any] = {"rows": []}
    try:
        for name, model_kwargs, instances, dist_kwargs in MPU_CASES:
            cfg = _dist_config(yaml_path, **dist_kwargs)
            bridge.enable(cfg)
            before = _pool_size()
            row = _check_collection(_mpu_collection(cfg, model_kwargs, instances), before)
            row.update(layout=name, rank=rank)
            out["rows"].append(row)
            _next_mpu_layout()
        out["flag"] = _flag_cases(rank, yaml_path)
        # Groups live in the world Bridge is about to abort.
        bridge.enable(_dist_config(yaml_path))
        _mpu_collection(_dist_config(yaml_path), MPU_CASES[0][1], 1)
        out["teardown"] = _teardown(abort=True)
        return out
    finally:
        bridge.disable()


# ---------------------------------------------------------------- assertions (parent)

def _assert_rows(results: list[dict[str, Any]], names: list[str]) -> None:
    rows = [row for result in results for row in result["rows"]]
    assert sorted({row["layout"] for row in rows}) == sorted(names)
    assert len(rows) == WORLD * len(names)
    for row in rows:
        where = f"{row['layout']} rank {row['rank']}"
        dp_cp, expt_dp = EXPECTED[row["layout"]](row["rank"])
        want = {"dp_cp_ag": dp_cp, "expt_dp_ag": expt_dp}
        assert row["bridge"] == want, (where, row)
        assert row["pycomm"] == want, (where, row)
        assert row["made"] == (2 if expt_dp is not None else 1), (where, row)
        for role in ("dp_cp_ag", "expt_dp_ag"):
            if want[role] is None:
                continue
            assert row["results"][role] == {"all_gather": True, "all_gather_contents": True,
                                             "reduce_scatter": True}, (where, role, row)
            assert row["timeout"][role] == TIMEOUT_MINUTES * 60.0, (where, role, row)
        assert row["settings"]["dp_cp_ag"] == {"max_ctas": 8, "min_ctas": None}, (where, row)
        if expt_dp is not None:
            assert row["settings"]["expt_dp_ag"] == {"max_ctas": None, "min_ctas": 2}, (where, row)


def _assert_clean_teardown(results: list[dict[str, Any]], groups: int) -> None:
    for rank, result in enumerate(results):
        teardown = result["teardown"]
        assert teardown["open_before"] == [True] * groups, (rank, teardown)
        # torch destroyed every pooled group with the world, and the pool
        # forgets the groups torch destroyed: none is listed any more.
        assert teardown["open_after"] == [], (rank, teardown)
        assert teardown["current_pool_after"] is None, (rank, teardown)
        assert teardown["pool_open_after"] is False, (rank, teardown)
        assert teardown["world_after"] is False, (rank, teardown)
        assert teardown["log"] == [], (rank, teardown)
        assert teardown["seconds"] < 30, (rank, teardown)


@pytest.fixture(scope="module")
def yaml_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("bridge") / "nccl_comm.yaml"
    path.write_text(NCCL_YAML)
    return str(path)


@pytest.mark.timeout(WORLD_TIMEOUT + 60)
def test_bridge_decentralized_path_groups_match_bridge_and_destroy_releases(yaml_path: str) -> None:
    results = run_world(world_decentralized, WORLD, yaml_path, timeout_seconds=WORLD_TIMEOUT)
    _assert_rows(results, [name for name, *_ in DECENTRALIZED_CASES])
    # Every case's groups are still in the pool: 1 + 2 + 2.
    _assert_clean_teardown(results, groups=5)


@pytest.fixture(scope="module")
def mpu_results(yaml_path: str) -> list[dict[str, Any]]:
    return run_world(world_mpu, WORLD, yaml_path, timeout_seconds=WORLD_TIMEOUT)


@pytest.mark.timeout(WORLD_TIMEOUT + 60)
def test_bridge_mpu_path_groups_match_bridge_and_abort_releases(
    mpu_results: list[dict[str, Any]],
) -> None:
    _assert_rows(mpu_results, [name for name, *_ in MPU_CASES])
    _assert_clean_teardown(mpu_results, groups=2)


@pytest.mark.timeout(WORLD_TIMEOUT + 60)
def test_bridge_with_the_flag_decides_by_it_and_never_makes_groups_twice(
    mpu_results: list[dict[str, Any]],
) -> None:
    for rank, result in enumerate(mpu_results):
        on, off = result["flag"]["flag True"], result["flag"]["flag False"]
        dp_cp, expt_dp = EXPECTED["MPU ep=2"](rank)
        # On: Bridge's function ran with its own flag off, the user's config
        # still says on, and the groups are pycomm's.
        assert on["bridge_saw"] == [False], (rank, on)
        assert on["cfg_flag_after"] is True, (rank, on)
        assert on["row"]["pycomm"] == {"dp_cp_ag": dp_cp, "expt_dp_ag": expt_dp}, (rank, on)
        assert on["row"]["made"] == 2, (rank, on)
        # Off: nothing made, Bridge called as it was.
        assert off["bridge_saw"] == [False], (rank, off)
        assert off["row"]["pycomm"] == {"dp_cp_ag": None, "expt_dp_ag": None}, (rank, off)
        assert off["row"]["made"] == 0, (rank, off)
        own = result["flag"]["bridge made its own"]
        assert own["bridge_saw"] == [False], (rank, own)
        assert own["kept_bridges"] and own["pycomm_made"] == 0, (rank, own)
        assert any("pycomm did not make" in m for m in own["log"]), (rank, own)


# ---------------------------------------------------------------- one process

def _bridge_functions() -> dict[str, Any]:
    from megatron.bridge.training import initialize

    return {
        "_create_pg_collection": initialize._create_pg_collection,
        "_initialize_distributed": initialize._initialize_distributed,
    }


@pytest.mark.timeout(120)
def test_enable_is_idempotent_and_disable_restores_bridge(yaml_path: str) -> None:
    from megatron.bridge.training.config import DistributedInitConfig

    from pycomm.megatron import bridge

    originals = _bridge_functions()
    try:
        bridge.enable(DistributedInitConfig(nccl_communicator_config_path=yaml_path))
        first = _bridge_functions()
        bridge.enable(DistributedInitConfig())
        second = _bridge_functions()
        assert bridge.is_enabled()
        for name, original in originals.items():
            assert first[name] is not original, name
            assert second[name] is first[name], name  # wrapped once
            assert first[name].__pycomm_bridge_original__ is original, name
    finally:
        bridge.disable()
    assert not bridge.is_enabled()
    assert _bridge_functions() == originals
    bridge.disable()  # idempotent


@pytest.mark.timeout(120)
def test_enable_rejects_a_bad_config_before_bridge_runs(tmp_path: Any) -> None:
    from megatron.bridge.training.config import DistributedInitConfig

    from pycomm.megatron import bridge

    bad = tmp_path / "bad.yaml"
    bad.write_text("dp_cp_ag:\n  max_ctaz: 4\n")
    try:
        with pytest.raises(pycomm.ConfigError, match="max_ctaz"):
            bridge.enable(DistributedInitConfig(nccl_communicator_config_path=str(bad)))
    finally:
        bridge.disable()


@pytest.mark.timeout(120)
def test_from_dist_init_config_without_the_field_is_never_silently_off() -> None:
    from megatron.bridge.training.config import DistributedInitConfig

    bridge_cfg = DistributedInitConfig(distributed_timeout_minutes=3)
    assert not hasattr(bridge_cfg, "create_all_gather_group")  # Bridge 0.6.2
    with pytest.warns(MissingAllGatherFlagWarning, match="create_all_gather_group"):
        off = AllGatherGroupConfig.from_dist_init_config(bridge_cfg)
    assert off.create_all_gather_group is False
    on = AllGatherGroupConfig.from_dist_init_config(bridge_cfg, create_all_gather_group=True)
    assert on.create_all_gather_group is True and on.timeout == 180.0


@pytest.mark.timeout(60)
def test_old_module_paths_still_import_and_layout_stays_free_of_torch() -> None:
    code = (
        "import sys\n"
        "import pycomm.megatron_layout as old, pycomm.megatron.layout as new\n"
        "assert old is new and old.MegatronLayout is new.MegatronLayout\n"
        "assert 'torch' not in sys.modules, 'layout imported torch'\n"
        "from pycomm.megatron import (AllGatherGroupConfig, apply_config, attach_all_gather_groups,\n"
        "    create_all_gather_groups, default_grid_dims, default_pool, destroy_all_gather_groups,\n"
        "    grid_all_gather_groups, pg_collection_with_ag, resolve_role_configs)\n"
        "from pycomm.megatron_config import (AllGatherGroupConfig as A, ROLE_KEYS, GroupConfigs,\n"
        "    Timeout, parse_nccl_comm_cfgs, resolve_role_configs as r, timeout_seconds)\n"
        "assert A is AllGatherGroupConfig and r is resolve_role_configs\n"
        "print('ok')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=50, env=env)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
