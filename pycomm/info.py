"""What this installation of pycomm was built with and can do."""

from __future__ import annotations

import os
from typing import Any

import torch

from pycomm import _C, __version__

# NCCL reads these at communicator creation; each one overrides the value a
# RoleConfig puts into ncclConfig_t for every communicator of the process.
NCCL_CONFIG_ENV = {
    "NCCL_CGA_CLUSTER_SIZE": "cga_cluster_size",
    "NCCL_MIN_CTAS": "min_ctas",
    "NCCL_MAX_CTAS": "max_ctas",
    "NCCL_NET": "net_name",
    "NCCL_IB_TC": "traffic_class",
    "NCCL_CTA_POLICY": "cta_policy",
}


def nccl_env_overrides() -> dict[str, str]:
    """The NCCL_* variables set now that override pooled RoleConfig fields."""
    return {name: os.environ[name] for name in NCCL_CONFIG_ENV if name in os.environ}


def launch_order() -> str:
    """What NCCL_LAUNCH_ORDER_IMPLICIT makes of the device's kernel order."""
    from pycomm.launch_order import LAUNCH_ORDER_ENV, launch_in_program_order, value_at_import

    value = value_at_import()
    if launch_in_program_order():
        return f"{LAUNCH_ORDER_ENV}={value}: kernels start in program order"
    return f"{LAUNCH_ORDER_ENV}={value}: no order across communicators of a device"


def transports() -> list[str]:
    built = ["gloo"]
    if _C.cuda_built:
        built.append("nccl")
    return built


def _version_text(code: int | None) -> str | None:
    if not code:
        return None
    major, rest = divmod(code, 10000)
    minor, patch = divmod(rest, 100)
    return f"{major}.{minor}.{patch}"


def build_info() -> dict[str, Any]:
    """pycomm and torch versions, whether the CUDA transport was built, the NCCL
    version built against and loaded now, the transports built, and NCCL
    environment variables that override pooled configs."""
    cuda = bool(_C.cuda_built)
    return {
        "pycomm": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda": cuda,
        "nccl": _version_text(_C.nccl_built_version()) if cuda else None,
        "nccl_loaded": _version_text(_C.nccl_loaded_version()) if cuda else None,
        "transports": transports(),
        "nccl_env_overrides": nccl_env_overrides(),
        "launch_order": launch_order(),
    }
