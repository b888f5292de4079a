"""pycomm.fsdp on real FSDP2 and real megatron-core, in spawned gloo worlds.

FSDP2: a small model is trained a few steps without the pool and then with
it, in the same world, from the same seed and data; losses at every step and
the final full parameters must be bitwise equal, and the pool's stats must
show the all-gathers on the 'ag' lane and the reduce-scatters on the 'rs'
lane. Megatron-FSDP: the kwargs bind to fully_shard's real signature and are
the pooled groups; the full path (which needs CUDA) runs on a GPU machine.

`python tests/test_fsdp.py` prints the 2-rank stats table (docs/fsdp.md).
"""

from __future__ import annotations

import inspect
import os
import sys
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))

import pycomm  # noqa: E402
import pycomm.fsdp as pf  # noqa: E402
from pycomm.launch import run_world  # noqa: E402
from world_checks import expect_error  # noqa: E402

STEPS = 3
WORLD_TIMEOUT = 300.0

# Configurations trained twice (plain, pooled) per world.
def _has_separate_rs() -> bool:
    from torch.distributed.fsdp import FSDPModule

    return hasattr(FSDPModule, "set_separate_reduce_scatter_group")  # torch >= 2.14


CONFIGS_2 = ("basic", "other_group", "divide_factor") + (
    ("separate_rs", "separate_rs_after") if _has_separate_rs() else ()
)
CONFIGS_4 = ("basic", "reshard_to_2")


# ---------------------------------------------------------------- helpers (run on ranks)

def _model(mesh: Any, reshard_after_forward: bool | int) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    # Odd sizes so that some shards are padded on 2 and 4 ranks; the last
    # layer stays with the root so that the root has parameters of its own.
    model = nn.Sequential(
        nn.Linear(12, 30), nn.ReLU(), nn.Linear(30, 18), nn.Tanh(), nn.Linear(18, 5)
    )
    for index in (0, 2):
        fully_shard(model[index], mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


def _fsdp_modules(model: nn.Module) -> list[Any]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _train(
    rank: int, mesh: Any, config: str, pool: pycomm.CommPool | None
) -> dict[str, Any]:
    model = _model(mesh, 2 if config == "reshard_to_2" else True)
    for m in _fsdp_modules(model):
        if config == "divide_factor":
            # A factor other than the shard size makes FSDP pass PREMUL_SUM(1/4)
            # on fp32, which gloo refuses; the plain run gets the same result
            # as SUM followed by a division by 4 (exact: a power of two).
            m.set_gradient_divide_factor(4.0)
            if pool is None:
                m.set_force_sum_reduction_for_comms(True)
        if config == "separate_rs":
            m.set_separate_reduce_scatter_group()
        if config == "separate_rs_after" and pool is None:
            m.set_separate_reduce_scatter_group()
    routed: list[str] | None = None
    base_group_name = None
    if pool is not None:
        group = None
        if config == "other_group":
            # Another group with the shard group's ranks: the duplicates are
            # made of it, as when sharing Megatron's dp-cp duplicates.
            group = dist.new_group(list(range(dist.get_world_size())))
            base_group_name = dist.distributed_c10d._get_process_group_name(group)
        routed = pf.use_pool(model, pool, group)
        if config == "separate_rs_after":
            # FSDP then passes a group use_pool never saw; its ranks find the
            # 'rs' duplicate.
            model.set_separate_reduce_scatter_group()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    data = torch.Generator().manual_seed(1000 + rank)
    losses = []
    for _ in range(STEPS):
        x = torch.randn(8, 12, generator=data)
        y = torch.randn(8, 5, generator=data)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    # Plain Python values: tensors sent back through the result queue would
    # travel as shared-memory handles that die with the rank's process.
    params = {name: p.full_tensor().tolist() for name, p in model.named_parameters()}
    return {"losses": losses, "params": params, "routed": routed,
            "base_group": base_group_name}


def equivalence_worker(rank: int, world_size: int, configs: tuple[str, ...]) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,))
    mesh_group = dist.distributed_c10d._get_process_group_name(mesh.get_group(0))
    out: dict[str, Any] = {"mesh_group": mesh_group}
    for config in configs:
        plain = _train(rank, mesh, config, None)
        with pycomm.CommPool() as pool:
            pooled = _train(rank, mesh, config, pool)
            stats = pool.stats()
            trace = pool.trace()
        out[config] = {"plain": plain, "pooled": pooled, "stats": stats,
                       "trace_kinds": sorted({(e["role"], e["kind"], e["ok"]) for e in trace})}
    return out


def errors_worker(rank: int, world_size: int) -> dict[str, str]:
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.fsdp._fully_shard import _fsdp_common
    from torch.distributed.tensor import Shard

    messages: dict[str, str] = {}
    mesh = init_device_mesh("cpu", (world_size,))
    pool = pycomm.CommPool()

    messages["no_fsdp"] = expect_error(
        pycomm.NotInitializedError, lambda: pf.use_pool(nn.Linear(4, 4), pool)
    )

    # Biases on a second mesh (same ranks, another group): two parameter
    # groups in one module, which FSDP2 takes no custom comms for. Only torch
    # >= 2.14 can place parameters on another mesh (ShardPlacementResult).
    if hasattr(_fsdp_common, "ShardPlacementResult"):
        other_mesh = DeviceMesh.from_group(dist.new_group(list(range(world_size))), "cpu")
        other_info = _fsdp_common.FSDPMeshInfo(other_mesh, shard_mesh_dim=0)

        def placement(param: nn.Parameter) -> Any:
            if param.ndim == 1:
                return _fsdp_common.ShardPlacementResult(placement=Shard(0), mesh_info=other_info)
            return None

        mixed = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        fully_shard(mixed[0], mesh=mesh)
        fully_shard(mixed[1], mesh=mesh, shard_placement_fn=placement)
        fully_shard(mixed, mesh=mesh)
        messages["several_param_groups"] = expect_error(
            pycomm.UnsupportedOpError, lambda: pf.use_pool(mixed, pool)
        )
        # FSDP2's own refusal, which use_pool pre-empts before creating anything.
        messages["fsdp_refuses"] = expect_error(
            ValueError, lambda: mixed[1].set_custom_all_gather(None)
        )
    assert pool.stats() == [], pool.stats()

    # A group with ranks other than the shard group's.
    singles = [dist.new_group([r]) for r in range(world_size)]
    model = _model(mesh, True)
    messages["wrong_group"] = expect_error(
        pycomm.LayoutError, lambda: pf.use_pool(model, pool, singles[rank])
    )
    # A group this rank is not in.
    messages["not_member"] = expect_error(
        pycomm.NotAMemberError, lambda: pf.use_pool(model, pool, singles[1 - rank])
    )
    assert pool.stats() == [], pool.stats()

    # FSDP2 told to allocate its buffers from the process group: refused by
    # name before anything is routed (torch's own comms would be replaced),
    # and after routing, on CPU lanes, which have no NCCL memory (never
    # FSDP2's AssertionError on custom comms, never plain tensors instead).
    allocating = _model(mesh, True)
    for fsdp_module in _fsdp_modules(allocating):
        fsdp_module.set_allocate_memory_from_process_group_for_comm(True)
    messages["allocating_before"] = expect_error(
        pycomm.UnsupportedOpError, lambda: pf.use_pool(allocating, pool)
    )
    assert pool.stats() == [], pool.stats()
    routed = _model(mesh, True)
    pf.use_pool(routed, pool)
    messages["allocating_after"] = expect_error(
        pycomm.UnsupportedOpError,
        lambda: routed.set_allocate_memory_from_process_group_for_comm(True),
    )
    routed.set_allocate_memory_from_process_group_for_comm(False)  # what it has: fine

    pool.destroy()
    messages["closed_pool"] = expect_error(
        pycomm.PoolClosedError, lambda: pf.use_pool(model, pool)
    )
    return messages


def megatron_worker(rank: int, world_size: int) -> dict[str, Any]:
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    parallel_state.initialize_model_parallel(create_gloo_process_groups=False)
    out: dict[str, Any] = {}
    try:
        with pycomm.CommPool() as pool:
            dp_cp = parallel_state.get_data_parallel_group(with_context_parallel=True)
            expt_dp = parallel_state.get_expert_data_parallel_group()
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
            out["missing"] = expect_error(
                pycomm.NotInitializedError, lambda: pf.megatron_fsdp_kwargs(pg_collection)
            )
            pg_collection.dp_cp_ag = pool.duplicate(dp_cp, "ag")

            fully_shard = pf._megatron_fully_shard()
            out["fully_shard"] = f"{fully_shard.__module__}.{fully_shard.__qualname__}"
            kwargs = pf.megatron_fsdp_kwargs(pg_collection)
            bound = inspect.signature(fully_shard).bind_partial(**kwargs)
            out["dense_keys"] = sorted(bound.arguments)
            assert kwargs["fsdp_group_ag"] is pool.get(dp_cp, "ag")
            assert dist.get_backend(kwargs["fsdp_group_ag"]) == "pycomm"

            pg_collection.expt_dp_ag = pool.duplicate(expt_dp, "ag")
            kwargs = pf.megatron_fsdp_kwargs(pg_collection)
            bound = inspect.signature(fully_shard).bind_partial(**kwargs)
            out["expert_keys"] = sorted(bound.arguments)
            assert kwargs["expt_fsdp_group_ag"] is pool.get(expt_dp, "ag")
            out["ranks"] = {k: dist.get_process_group_ranks(g) for k, g in kwargs.items()}

            # The group carries the all-gather: a parameter shard round trip.
            shard = torch.full((3,), float(rank))
            gathered = torch.empty(3 * world_size)
            dist.all_gather_into_tensor(gathered, shard, group=kwargs["fsdp_group_ag"])
            out["gathered"] = gathered.tolist()

            # A target without the argument is refused; one with only the
            # dense argument gets only it.
            def old_fully_shard(module: Any, optimizer: Any, device_mesh: Any = None) -> None: ...

            def dense_only(module: Any, fsdp_group_ag: Any = None) -> None: ...

            out["old_target"] = expect_error(
                pycomm.UnsupportedOpError,
                lambda: pf.megatron_fsdp_kwargs(pg_collection, old_fully_shard),
            )
            out["dense_only_keys"] = sorted(pf.megatron_fsdp_kwargs(pg_collection, dense_only))

            # An AG group over other ranks than the dp-cp group.
            singles = [dist.new_group([r]) for r in range(world_size)]
            pg_collection.dp_cp_ag = pool.duplicate(singles[rank], "ag")
            out["wrong_ranks"] = expect_error(
                pycomm.LayoutError, lambda: pf.megatron_fsdp_kwargs(pg_collection)
            )
            out["stats"] = [(r["role"], r["ranks"], r["ops_by_kind"]["all_gather"])
                            for r in pool.stats()]
    finally:
        parallel_state.destroy_model_parallel()
    return out


def megatron_cuda_worker(rank: int, world_size: int) -> dict[str, Any]:
    """The full Megatron-FSDP path: a model wrapped by fully_shard with the
    kwargs, trained a step; its all-gathers go to the pooled group."""
    from megatron.core import parallel_state
    from torch.distributed.device_mesh import init_device_mesh

    import pycomm.megatron as pm

    torch.cuda.set_device(rank)
    parallel_state.initialize_model_parallel(create_gloo_process_groups=False)
    try:
        with pycomm.CommPool() as pool:
            pg_collection = pm.pg_collection_with_ag(pool=pool)
            kwargs = pf.megatron_fsdp_kwargs(pg_collection)
            fully_shard = pf._megatron_fully_shard()
            mesh = init_device_mesh("cuda", (world_size, 1), mesh_dim_names=("dp_cp", "tp"))
            torch.manual_seed(0)
            module = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)).cuda()
            optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
            model, optimizer = fully_shard(
                module, optimizer, device_mesh=mesh, dp_shard_dim="dp_cp", tp_dim="tp",
                fsdp_unit_modules=[nn.Linear], **kwargs,
            )
            assert model.dist_index.get_fsdp_group(independent_all_gather=True) is (
                kwargs["fsdp_group_ag"]
            )
            losses = []
            for _ in range(2):
                x = torch.randn(16, 64, device="cuda")
                loss = model(x).square().mean()
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                losses.append(loss.item())
            torch.cuda.synchronize()
            return {"losses": losses, "stats": pool.stats()}
    finally:
        parallel_state.destroy_model_parallel()


# ---------------------------------------------------------------- tests

def _row(stats: list[dict[str, Any]], base_group: str, role: str) -> dict[str, Any]:
    rows = [r for r in stats if r["base_group"] == base_group and r["role"] == role]
    assert len(rows) == 1, (base_group, role, stats)
    return rows[0]


def _check_lanes(row_ag: dict[str, Any], row_rs: dict[str, Any], routed: int) -> None:
    assert row_ag["ops_by_kind"]["all_gather"] >= STEPS * routed, row_ag
    assert row_ag["ops_by_kind"]["reduce_scatter"] == 0, row_ag
    assert row_rs["ops_by_kind"]["reduce_scatter"] == STEPS * routed, row_rs
    assert row_rs["ops_by_kind"]["all_gather"] == 0, row_rs
    for row in (row_ag, row_rs):
        assert row["bytes"] > 0 and row["errors"] == 0 and row["pending"] == 0, row
        other = {k: v for k, v in row["ops_by_kind"].items()
                 if k not in ("all_gather", "reduce_scatter")}
        assert not any(other.values()), row


def _check_world(results: list[dict[str, Any]], configs: tuple[str, ...], world: int) -> None:
    for config in configs:
        for rank, result in enumerate(results):
            run = result[config]
            plain, pooled = run["plain"], run["pooled"]
            where = f"{config}, rank {rank}"
            assert pooled["routed"] == ["", "0", "2"], where
            assert len(plain["losses"]) == STEPS
            # Exact equality: float32 values as Python floats, compared with ==.
            assert plain["losses"] == pooled["losses"], (where, plain["losses"], pooled["losses"])
            assert plain["params"].keys() == pooled["params"].keys()
            for name in plain["params"]:
                assert plain["params"][name] == pooled["params"][name], (where, name)
                # Every rank ends with the same full parameters.
                assert pooled["params"][name] == results[0][config]["pooled"]["params"][name]
            # Training moved the parameters (the equality is not vacuous).
            assert plain["losses"][0] != plain["losses"][-1], where

            base = pooled["base_group"] or result["mesh_group"]
            stats = run["stats"]
            _check_lanes(_row(stats, base, "ag"), _row(stats, base, "rs"), routed=3)
            assert {(role, kind) for role, kind, _ in run["trace_kinds"]} <= {
                ("ag", "all_gather"), ("rs", "reduce_scatter")}, run["trace_kinds"]
            assert all(ok for _, _, ok in run["trace_kinds"]), run["trace_kinds"]
            if config == "reshard_to_2":
                # The post-forward groups (2 of the 4 ranks; FSDP makes one per
                # module) share one 'ag' duplicate, and the backward
                # all-gathers went to it.
                post = [r for r in stats if len(r["ranks"]) == world // 2]
                assert [r["role"] for r in post] == ["ag"], stats
                assert rank in post[0]["ranks"]
                assert post[0]["ops_by_kind"]["all_gather"] > 0, post
            else:
                assert len(stats) == 2, stats


@pytest.mark.timeout(WORLD_TIMEOUT + 30)
def test_fsdp2_pool_equals_plain_2_ranks() -> None:
    results = run_world(equivalence_worker, 2, CONFIGS_2, timeout_seconds=WORLD_TIMEOUT)
    _check_world(results, CONFIGS_2, 2)


@pytest.mark.timeout(WORLD_TIMEOUT + 30)
def test_fsdp2_pool_equals_plain_4_ranks() -> None:
    results = run_world(equivalence_worker, 4, CONFIGS_4, timeout_seconds=WORLD_TIMEOUT)
    _check_world(results, CONFIGS_4, 4)


@pytest.mark.timeout(150)
def test_use_pool_refusals() -> None:
    results = run_world(errors_worker, 2, timeout_seconds=120)
    for messages in results:
        assert "fully_shard" in messages["no_fsdp"]
        if "several_param_groups" in messages:  # torch >= 2.14
            assert "'1' (2 parameter groups)" in messages["several_param_groups"]
            assert "multiple param groups" in messages["fsdp_refuses"]
        assert "ranks [0, 1]" in messages["wrong_group"]
        assert "not a member" in messages["not_member"]
        assert "set_allocate_memory_from_process_group_for_comm(True)" in messages["allocating_before"]
        assert "It is on for <root>, '" in messages["allocating_before"], messages["allocating_before"]
        assert "duplicates have none on cpu" in messages["allocating_after"], messages["allocating_after"]
        assert "NCCL memory (ncclMemAlloc)" in messages["allocating_after"]
        assert "destroyed" in messages["closed_pool"] or "closed" in messages["closed_pool"]


@pytest.mark.timeout(240)
def test_megatron_fsdp_kwargs_bind_real_signature() -> None:
    results = run_world(megatron_worker, 2, timeout_seconds=210)
    for rank, out in enumerate(results):
        assert out["fully_shard"] == (
            "megatron.core.distributed.fsdp.src.megatron_fsdp.fully_shard.fully_shard")
        assert "attach_all_gather_groups" in out["missing"]
        assert out["dense_keys"] == ["fsdp_group_ag"]
        assert out["expert_keys"] == ["expt_fsdp_group_ag", "fsdp_group_ag"]
        assert out["ranks"] == {"fsdp_group_ag": [0, 1], "expt_fsdp_group_ag": [0, 1]}
        assert out["gathered"] == [0.0] * 3 + [1.0] * 3
        assert "takes no fsdp_group_ag" in out["old_target"]
        assert out["dense_only_keys"] == ["fsdp_group_ag"]
        assert "none of the groups Megatron-FSDP shards over" in out["wrong_ranks"]
        ag_rows = [r for r in out["stats"] if r[1] == [0, 1]]
        assert ag_rows and ag_rows[0][2] >= 1, out["stats"]


@pytest.mark.timeout(30)
def test_megatron_fsdp_kwargs_needs_dp_cp_ag() -> None:
    from megatron.core.process_groups_config import ProcessGroupCollection

    message = expect_error(
        pycomm.NotInitializedError, lambda: pf.megatron_fsdp_kwargs(ProcessGroupCollection())
    )
    assert "dp_cp_ag" in message


@pytest.mark.cuda
@pytest.mark.timeout(300)
def test_megatron_fsdp_full_path_on_gpu() -> None:
    results = run_world(megatron_cuda_worker, 1, backend="nccl", timeout_seconds=270)
    out = results[0]
    assert len(out["losses"]) == 2 and all(map(lambda v: v == v, out["losses"]))
    rows = [r for r in out["stats"] if r["role"] == "ag"]
    assert rows and rows[0]["errors"] == 0


if __name__ == "__main__":
    results = run_world(equivalence_worker, 2, ("basic",), timeout_seconds=WORLD_TIMEOUT)
    print("| rank | role | ops | all_gather | reduce_scatter | bytes |")
    print("|---|---|---|---|---|---|")
    for rank, result in enumerate(results):
        run = result["basic"]
        print("losses", run["plain"]["losses"], run["pooled"]["losses"], file=sys.stderr)
        for row in run["stats"]:
            kinds = row["ops_by_kind"]
            print(f"| {rank} | {row['role']} | {row['ops']} | {kinds['all_gather']} | "
                  f"{kinds['reduce_scatter']} | {row['bytes']} |")
