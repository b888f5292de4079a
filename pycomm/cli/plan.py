"""Print the dp-cp, expert-dp and all-gather groups one rank gets in a
Megatron-Core layout, with the group counts and what megatron-core's own
create_all_gather_groups would build instead. Computed from the layout alone:
no processes, no torch.distributed, O(group size) work."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from pycomm.errors import LayoutError
from pycomm.megatron_layout import DEFAULT_ORDER, MegatronLayout


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--world", "--nproc", "-n", dest="world", type=int, required=True,
                        metavar="N", help="ranks in the layout (Megatron's world / local world size)")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    parser.add_argument("--cp", type=int, default=1, help="context parallel size")
    parser.add_argument("--ep", type=int, default=1, help="expert parallel size")
    parser.add_argument("--etp", type=int, default=None,
                        help="expert tensor parallel size (default: --tp)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    parser.add_argument("--order", default=DEFAULT_ORDER,
                        help=f"Megatron rank order, innermost first (default {DEFAULT_ORDER})")
    parser.add_argument("--rank", type=int, default=None,
                        help="the rank to show (default: the first rank of the layout)")
    parser.add_argument("--rank-offset", type=int, default=0,
                        help="first global rank of the layout (Megatron's rank_offset)")
    parser.add_argument("--dist-opt-instances", type=int, default=1,
                        help="num_distributed_optimizer_instances (partial data parallelism)")
    parser.add_argument("--gtp-remat", type=int, default=1, help="gtp_remat_size")
    parser.add_argument("--expert-gtp-remat", type=int, default=1, help="expert_gtp_remat_size")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def plan(layout: MegatronLayout, rank: int) -> dict[str, Any]:
    """Everything `plan` prints, as data (group rank lists in full)."""
    counts = layout.group_counts()
    sizes = {
        "dp_cp": layout.dp * layout.cp,
        "intra_dp_cp": layout.dp * layout.cp // layout.dist_opt_instances,
        "expt_dp": layout.expert_dp,
        "intra_expt_dp": layout.expert_dp // layout.dist_opt_instances,
    }
    groups = {
        "dp_cp": layout.dp_cp(rank),
        "intra_dp_cp": layout.intra_dp_cp(rank),
        "expt_dp": layout.expt_dp(rank),
        "intra_expt_dp": layout.intra_expt_dp(rank),
    }
    ag = {"dp_cp_ag": layout.dp_cp_ag(rank), "expt_dp_ag": layout.expt_dp_ag(rank)}
    megatron_core = layout.megatron_core_ag(rank)
    return {
        "layout": {
            "world": layout.world_size, "tp": layout.tp, "cp": layout.cp, "ep": layout.ep,
            "etp": layout.expert_tp, "pp": layout.pp, "dp": layout.dp,
            "expert_dp": layout.expert_dp, "order": layout.order,
            "rank_offset": layout.rank_offset, "dist_opt_instances": layout.dist_opt_instances,
            "gtp_remat": layout.gtp_remat, "expert_gtp_remat": layout.expert_gtp_remat,
        },
        "rank": rank,
        "groups": groups,
        "group_sizes": sizes,
        "group_counts": counts,
        "all_gather": {
            "pycomm": ag,
            "base": {"dp_cp_ag": "intra_dp_cp", "expt_dp_ag": "intra_expt_dp"},
            "megatron_core": megatron_core,
            "megatron_core_correct": {k: megatron_core[k] == ag[k] for k in ag},
        },
        "creations_per_rank": {
            "pycomm": sum(g is not None for g in ag.values()),
            "megatron_core": layout.megatron_core_new_group_calls(),
        },
    }


def ranks_text(ranks: object, limit: int = 12) -> str:
    """A rank list for a table: arithmetic runs as 'first..last step s'."""
    if not isinstance(ranks, list):
        return "—" if ranks is None else str(ranks)
    if len(ranks) <= limit:
        return "[" + ", ".join(map(str, ranks)) + "]"
    step = ranks[1] - ranks[0]
    if all(b - a == step for a, b in zip(ranks, ranks[1:])):
        return f"[{ranks[0]}..{ranks[-1]} step {step}] ({len(ranks)} ranks)"
    head = ", ".join(map(str, ranks[: limit - 2]))
    return f"[{head}, …, {ranks[-2]}, {ranks[-1]}] ({len(ranks)} ranks)"


def _print_tables(result: dict[str, Any], seconds: float) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    lay = result["layout"]
    console.print(
        f"world {lay['world']} (ranks {lay['rank_offset']}..{lay['rank_offset'] + lay['world'] - 1})"
        f", order {lay['order']}: tp {lay['tp']} × cp {lay['cp']} × dp {lay['dp']} × pp {lay['pp']}"
        + (f" × gtp_remat {lay['gtp_remat']}" if lay["gtp_remat"] > 1 else "")
        + f"; experts: etp {lay['etp']} × ep {lay['ep']} × expert dp {lay['expert_dp']}"
        f" × pp {lay['pp']}"
        + (f" × expert gtp_remat {lay['expert_gtp_remat']}" if lay["expert_gtp_remat"] > 1 else "")
        + f"; {lay['dist_opt_instances']} distributed-optimizer instance(s)"
    )
    table = Table(title=f"groups of rank {result['rank']}")
    for column in ("group", "size", "groups in layout", f"ranks of rank {result['rank']}"):
        table.add_column(column)
    for name, ranks in result["groups"].items():
        table.add_row(name, str(result["group_sizes"][name]),
                      str(result["group_counts"][name]), ranks_text(ranks))
    console.print(table)

    ag = result["all_gather"]
    table = Table(title="all-gather groups")
    for column in ("group", "duplicates", "pycomm", "megatron-core create_all_gather_groups"):
        table.add_column(column)
    for name, ranks in ag["pycomm"].items():
        theirs = ag["megatron_core"][name]
        verdict = "same" if ag["megatron_core_correct"][name] else "[red]WRONG[/red]"
        table.add_row(name, ag["base"][name] if ranks is not None else "— (ep = 1)",
                      ranks_text(ranks), f"{ranks_text(theirs)}  {verdict}")
    console.print(table)
    creations = result["creations_per_rank"]
    console.print(
        f"groups this rank creates: pycomm {creations['pycomm']} (only its own); "
        f"megatron-core {creations['megatron_core']} new_group calls on every rank. "
        f"Planned in {seconds * 1e3:.1f} ms."
    )


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    try:
        layout = MegatronLayout(
            world_size=args.world, tp=args.tp, cp=args.cp, ep=args.ep, pp=args.pp,
            etp=args.etp, order=args.order, rank_offset=args.rank_offset,
            dist_opt_instances=args.dist_opt_instances, gtp_remat=args.gtp_remat,
            expert_gtp_remat=args.expert_gtp_remat,
        )
        rank = args.rank if args.rank is not None else args.rank_offset
        result = plan(layout, rank)
    except LayoutError as e:
        print(f"plan: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - started
    if args.json:
        result["seconds"] = seconds
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _print_tables(result, seconds)
    return 0
