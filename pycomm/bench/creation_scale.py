"""Creation cost of the all-gather groups, per rank, in simulated worlds of 8
to 16,384 ranks: pycomm.megatron.create_all_gather_groups against
megatron-core's parallel_state.create_all_gather_groups.

One process plays one rank of each world: torch.distributed's fake backend
(no communication) over a counting store, megatron-core's real
initialize_model_parallel, then each function in turn. Per call it counts the
new_group calls this rank makes (torch's group counter), the process groups
it joins, its store operations and the store keys it waits on, and the wall
time; once with torch's default and once with TORCH_DIST_INIT_BARRIER=1
(where every new_group ends in a store barrier over the group's ranks, or the
whole world for a group created by every rank).

    python benchmarks/creation_scale.py [--worlds 8,64,512,4096,16384] [--out FILE]
    python -m pycomm.bench.creation_scale ...  (the same)
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

DEFAULT_WORLDS = (8, 64, 512, 1024, 4096, 16384)
DEFAULT_OUT = "pycomm-out/creation_scale.json"


@dataclass(frozen=True)
class Family:
    """A way to grow a layout with the world size."""

    name: str
    description: str
    sizes: Callable[[int], dict[str, int]]


def _fixed_model_parallel(world: int) -> dict[str, int]:
    return dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                expert_model_parallel_size=2)


def _fixed_fsdp_domain(world: int) -> dict[str, int]:
    tp = min(8, max(1, world // 8))
    return dict(tensor_model_parallel_size=tp, pipeline_model_parallel_size=world // (8 * tp),
                expert_model_parallel_size=2, expert_tensor_parallel_size=1)


FAMILIES = (
    Family("tp2-pp2-ep2", "tp=2, pp=2, ep=2 fixed; dp = N/4 grows", _fixed_model_parallel),
    Family("dp8-ep2", "dp=8 fixed (ep=2, etp=1); tp = min(8, N/8), pp = N/(8*tp) grow",
           _fixed_fsdp_domain),
)


@dataclass
class Measure:
    new_group_calls: int = 0
    groups_joined: int = 0
    store_ops: int = 0
    store_ops_by_kind: dict[str, int] = field(default_factory=dict)
    keys_waited: int = 0
    milliseconds: float = 0.0
    dp_cp_ag_ranks: int = 0
    correct: bool = False


def _counting_store_class() -> type:
    import torch.distributed as dist

    class CountingStore(dist.Store):
        """An in-memory store for one simulated rank that counts what is asked
        of it. The other ranks of the simulated world never run, so a wait
        returns at once, as if they had all arrived (torch's FakeStore gives
        these semantics only on some versions)."""

        def __init__(self) -> None:
            super().__init__()
            self.values: dict[str, bytes] = {}
            self.ops: collections.Counter[str] = collections.Counter()
            self.keys_waited = 0

        def set(self, key: str, value: Any) -> None:
            self.ops["set"] += 1
            self.values[key] = value.encode() if isinstance(value, str) else bytes(value)

        def get(self, key: str) -> bytes:
            self.ops["get"] += 1
            return self.values.get(key, b"")

        def add(self, key: str, value: int) -> int:
            self.ops["add"] += 1
            total = int(self.values.get(key, b"0")) + value
            self.values[key] = str(total).encode()
            return total

        def compare_set(self, key: str, expected: Any, desired: Any) -> bytes:
            self.ops["compare_set"] += 1
            current = self.values.get(key)
            expected = expected.encode() if isinstance(expected, str) else bytes(expected)
            if current is None and not expected or current == expected:
                self.values[key] = desired.encode() if isinstance(desired, str) else bytes(desired)
            return self.values.get(key, b"")

        def delete_key(self, key: str) -> bool:
            self.ops["delete_key"] += 1
            return self.values.pop(key, None) is not None

        def num_keys(self) -> int:
            self.ops["num_keys"] += 1
            return len(self.values)

        def check(self, keys: list[str]) -> bool:
            self.ops["check"] += 1
            return True

        def wait(self, keys: list[str], timeout: datetime.timedelta | None = None) -> None:
            self.ops["wait"] += 1
            self.keys_waited += len(keys)

    return CountingStore


def _fake_comm(store: Any, rank: int, size: int, timeout: datetime.timedelta) -> Any:
    from torch.testing._internal.distributed.fake_pg import FakeProcessGroup

    return FakeProcessGroup._create_internal(rank, size)


def _measure(store: Any, call: Callable[[], Any], expected: list[int] | None) -> Measure:
    import torch.distributed as dist

    world = dist.distributed_c10d._world
    store.ops.clear()
    store.keys_waited = 0
    joined = len(world.pg_map)
    # Every group creation, counted at the helper every one goes through
    # (dist.new_group's, and pycomm's registration, which skips new_group to
    # leave torch's group counter alone): get_pg_count() skips
    # use_local_synchronization groups on some torch versions.
    calls = 0
    c10d = dist.distributed_c10d
    original = c10d._new_process_group_helper

    def counting_helper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return original(*args, **kwargs)

    c10d._new_process_group_helper = counting_helper
    try:
        started = time.perf_counter()
        dp_cp_ag, _ = call()
        elapsed = time.perf_counter() - started
    finally:
        c10d._new_process_group_helper = original
    ranks = None
    if dp_cp_ag is not None and dp_cp_ag is not dist.GroupMember.NON_GROUP_MEMBER:
        ranks = sorted(dist.get_process_group_ranks(dp_cp_ag))
    return Measure(
        new_group_calls=calls,
        groups_joined=len(world.pg_map) - joined,
        store_ops=sum(store.ops.values()),
        store_ops_by_kind=dict(sorted(store.ops.items())),
        keys_waited=store.keys_waited,
        milliseconds=elapsed * 1e3,
        dp_cp_ag_ranks=len(ranks or []),
        correct=ranks == expected,
    )


def measure_world(family: Family, world_size: int, rank: int | None = None) -> dict[str, Any]:
    """One simulated world: both functions, with and without the init
    barrier. Returns a row of the results table."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    import pycomm
    import pycomm.megatron as pm
    from pycomm.megatron_layout import MegatronLayout

    rank = world_size - 1 if rank is None else rank
    sizes = family.sizes(world_size)
    layout = MegatronLayout(
        world_size, tp=sizes["tensor_model_parallel_size"],
        pp=sizes["pipeline_model_parallel_size"], ep=sizes["expert_model_parallel_size"],
        etp=sizes.get("expert_tensor_parallel_size"),
    )
    expected = layout.dp_cp_ag(rank)
    store = _counting_store_class()()
    dist.init_process_group("fake", store=store, rank=rank, world_size=world_size)
    row: dict[str, Any] = {"family": family.name, "world": world_size, "rank": rank,
                           "layout": sizes, "dp_cp_size": len(expected)}
    saved_barrier = os.environ.get("TORCH_DIST_INIT_BARRIER")
    try:
        started = time.perf_counter()
        parallel_state.initialize_model_parallel(create_gloo_process_groups=False, **sizes)
        row["initialize_model_parallel_ms"] = (time.perf_counter() - started) * 1e3
        for barrier in ("0", "1"):
            os.environ["TORCH_DIST_INIT_BARRIER"] = barrier
            megatron_core = _measure(
                store,
                lambda: parallel_state.create_all_gather_groups(for_expert_parallelism=True),
                expected,
            )
            pool = pycomm.CommPool(cpu_comm_factory=_fake_comm)
            try:
                ours = _measure(
                    store,
                    lambda: pm.create_all_gather_groups(for_expert_parallelism=True, pool=pool),
                    expected,
                )
            finally:
                pool.destroy()
            suffix = "" if barrier == "0" else "_init_barrier"
            row[f"megatron_core{suffix}"] = asdict(megatron_core)
            row[f"pycomm{suffix}"] = asdict(ours)
    finally:
        if saved_barrier is None:
            os.environ.pop("TORCH_DIST_INIT_BARRIER", None)
        else:
            os.environ["TORCH_DIST_INIT_BARRIER"] = saved_barrier
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
    return row


def print_table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    for family in FAMILIES:
        mine = [r for r in rows if r["family"] == family.name]
        if not mine:
            continue
        table = Table(title=f"{family.name}: {family.description} "
                            f"(one rank's cost to get dp_cp_ag + expt_dp_ag)")
        for column in ("world", "dp_cp size",
                       "new_group calls mc / pycomm", "groups joined mc / pycomm",
                       "store ops mc / pycomm", "keys waited mc / pycomm",
                       "store ops, init barrier mc / pycomm", "ms mc / pycomm",
                       "right ranks mc / pycomm"):
            table.add_column(column, justify="right")
        for r in mine:
            mc, pc = r["megatron_core"], r["pycomm"]
            mcb, pcb = r["megatron_core_init_barrier"], r["pycomm_init_barrier"]
            table.add_row(
                str(r["world"]), str(r["dp_cp_size"]),
                f"{mc['new_group_calls']} / {pc['new_group_calls']}",
                f"{mc['groups_joined']} / {pc['groups_joined']}",
                f"{mc['store_ops']} / {pc['store_ops']}",
                f"{mc['keys_waited']} / {pc['keys_waited']}",
                f"{mcb['store_ops']} / {pcb['store_ops']}",
                f"{mc['milliseconds']:.2f} / {pc['milliseconds']:.2f}",
                f"{'yes' if mc['correct'] else 'NO'} / {'yes' if pc['correct'] else 'NO'}",
            )
        console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", default=",".join(map(str, DEFAULT_WORLDS)),
                        help="comma-separated world sizes (multiples of 8)")
    parser.add_argument("--families", default=",".join(f.name for f in FAMILIES),
                        help="comma-separated layout families")
    parser.add_argument("--rank", type=int, default=None,
                        help="the rank to play (default: the last rank of each world)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)

    warnings.filterwarnings("ignore")
    worlds = [int(w) for w in args.worlds.split(",") if w]
    chosen = set(args.families.split(","))
    unknown = chosen - {f.name for f in FAMILIES}
    if unknown:
        parser.error(f"unknown families {sorted(unknown)}")
    rows = []
    for family in (f for f in FAMILIES if f.name in chosen):
        for world in worlds:
            rows.append(measure_world(family, world, args.rank))
            print(f"{family.name} N={world}: done", file=sys.stderr)
    print_table(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
