"""The GPU a rank binds, in a joined world and a spawned one alike."""

from __future__ import annotations

from typing import Any


def bind_device(backend: str, device_index: int) -> Any:
    """One GPU per rank, bound at init: torch creates its NCCL communicator
    eagerly, so pooled groups can split it. None for CPU-only backends."""
    if "nccl" not in backend:
        return None
    import torch

    device = torch.device("cuda", device_index % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device
