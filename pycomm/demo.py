"""The demo's per-rank job: Megatron parallel state with dp and ep, all-gather
groups through pycomm.megatron, and a small FSDP2 model trained on the pool's
lanes (plus an expert layer sharded over the expert data-parallel group).

The model learns a target it can represent, y = x . w (w fixed by a seed),
from fresh random batches, so its loss falls the same way at any rank count:
to under half of the first step's within 10 steps and by about 10x within the
default 20. Residual blocks carry the input's signal to the head from the
first step; a plain stack of ReLU layers learns so slowly here that in 20
steps its loss only follows each batch's noise."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import pycomm
import pycomm.fsdp
import pycomm.megatron

logger = logging.getLogger(__name__)

HIDDEN = 256
BATCH = 64  # per rank and step
LEARNING_RATE = 0.02
MOMENTUM = 0.5
MODEL_SEED, TARGET_SEED, DATA_SEED = 0, 7, 1000


class ToyModel(nn.Module):
    """Residual blocks x + tanh(Wx + b) and a linear head: tanh keeps each
    block's contribution bounded (ReLU blocks grow the stream until SGD
    diverges), the skip path carries the input to the head from step one."""

    def __init__(self, hidden: int = HIDDEN, layers: int = 4) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + torch.tanh(layer(x))
        return self.head(x)


def target_weights(hidden: int = HIDDEN) -> torch.Tensor:
    """The weights of the function the demo learns: the same on every rank,
    scaled so the target has about unit variance."""
    generator = torch.Generator().manual_seed(TARGET_SEED)
    return torch.randn(hidden, 1, generator=generator) / hidden**0.5


def _group_ranks(group: dist.ProcessGroup | None) -> list[int] | None:
    return None if group is None else dist.get_process_group_ranks(group)


def _expert_step(
    expert_shard: torch.Tensor,
    x: torch.Tensor,
    ag: dist.ProcessGroup,
    rs: dist.ProcessGroup,
) -> torch.Tensor:
    """An expert weight sharded over the expert data-parallel group: gather it
    on the AG lane, use it, reduce-scatter its gradient on the RS lane."""
    size = dist.get_world_size(ag)
    full = torch.empty(expert_shard.numel() * size)
    dist.all_gather_into_tensor(full, expert_shard, group=ag)
    weight = full.view(HIDDEN, -1).requires_grad_()
    out = x @ weight
    out.square().mean().backward()
    grad_shard = torch.empty_like(expert_shard)
    dist.reduce_scatter_tensor(grad_shard, weight.grad.reshape(-1), op=dist.ReduceOp.AVG, group=rs)
    return grad_shard


def demo_rank(rank: int, world: int, steps: int, ep: int, show_progress: bool) -> dict[str, Any]:
    warnings.filterwarnings("ignore")
    logging.getLogger("megatron").setLevel(logging.ERROR)
    from pycomm.megatron.quiet_import import parallel_state
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard
    from tqdm import tqdm

    parallel_state.initialize_model_parallel(
        expert_model_parallel_size=ep, create_gloo_process_groups=False
    )
    pool = pycomm.CommPool()
    pg_collection = pycomm.megatron.pg_collection_with_ag(pool=pool)
    dp_cp = parallel_state.get_data_parallel_group(with_context_parallel=True, partial_data_parallel=True)

    torch.manual_seed(MODEL_SEED)
    model = ToyModel()
    mesh = DeviceMesh.from_group(dp_cp, "cpu")
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    pycomm.fsdp.use_pool(model, pool, group=dp_cp)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
    target = target_weights()

    expert_ag = pg_collection.expt_dp_ag
    expert_rs = None
    expert_shard = None
    if expert_ag is not None:
        expt_dp = parallel_state.get_expert_data_parallel_group(partial_expert_data_parallel=True)
        expert_rs = pool.duplicate(expt_dp, role="rs")
        generator = torch.Generator().manual_seed(parallel_state.get_expert_model_parallel_rank())
        full = torch.randn(HIDDEN * 16, generator=generator) * 0.05
        expert_shard = full.chunk(dist.get_world_size(expert_ag))[dist.get_rank(expert_ag)].clone()

    # Each data-parallel rank draws batches of its own.
    data_gen = torch.Generator().manual_seed(DATA_SEED + dist.get_rank(dp_cp))
    losses = []
    progress = show_progress and rank == 0
    for _ in tqdm(range(steps), desc=f"training on {world} ranks", disable=not progress, unit="step"):
        x = torch.randn(BATCH, HIDDEN, generator=data_gen)
        y = x @ target
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if expert_shard is not None:
            expert_shard -= 0.05 * _expert_step(expert_shard, x, expert_ag, expert_rs)

    result = {
        "rank": rank,
        "losses": losses,
        "groups": {
            "dp_cp": _group_ranks(dp_cp),
            "dp_cp_ag": _group_ranks(pg_collection.dp_cp_ag),
            "expt_dp_ag": _group_ranks(expert_ag),
        },
        "stats": pool.stats(),
        "trace": pool.trace(),
    }
    pool.destroy()
    parallel_state.destroy_model_parallel()
    return result
