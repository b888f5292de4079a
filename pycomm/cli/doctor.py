"""What this installation can do: torch, CUDA and NCCL versions (built vs
loaded), GPUs seen, transports built, NCCL environment variables that
override pooled configs, Megatron-Core and FSDP2 availability. Exits non-zero,
with the reason, when pycomm cannot work here."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
from dataclasses import asdict, dataclass

from pycomm.cli.common import print_json


@dataclass
class Check:
    name: str
    value: str
    ok: bool = True
    required: bool = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect() -> list[Check]:
    checks = [Check("python", platform.python_version())]
    try:
        import torch
        import torch.distributed as dist
    except ImportError as e:
        return checks + [Check("torch", f"cannot import: {e}", ok=False, required=True)]
    checks.append(Check("torch", torch.__version__))
    checks.append(Check("torch.distributed", "available" if dist.is_available() else "missing",
                        ok=dist.is_available(), required=True))
    checks.append(Check("gloo", "available" if dist.is_gloo_available() else "missing",
                        ok=dist.is_gloo_available(), required=True))
    try:
        import pycomm
    except ImportError as e:
        return checks + [Check("pycomm._C", f"cannot import: {e} (run scripts/setup.sh)", ok=False, required=True)]
    info = pycomm.build_info()
    checks.append(Check("pycomm", info["pycomm"]))
    checks.append(Check("transports built", ", ".join(info["transports"])))
    checks.append(Check("torch CUDA", str(torch.version.cuda)))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(gpus))
    checks.append(Check("GPUs seen", f"{gpus}" + (f" ({names})" if names else "")))
    checks.append(Check(
        "NCCL built / loaded",
        f"{info['nccl']} / {info['nccl_loaded']}",
        ok=info["nccl"] == info["nccl_loaded"],
    ))
    if not info["cuda"]:
        lanes = "not built: CPU-only variant (no CUDA toolkit or nccl.h at build time, or PYCOMM_CUDA=0)"
    elif gpus:
        lanes = (
            "duplicates of groups with torch's NCCL backend get an NCCL lane on its device "
            "(CommPool(device=...) names one for every group)"
        )
    else:
        lanes = "built; no GPU in this process, so pooled groups serve CPU tensors only"
    checks.append(Check("NCCL lanes", lanes, ok=info["cuda"] and gpus > 0))
    overrides = info["nccl_env_overrides"]
    checks.append(Check(
        "NCCL env overrides",
        ", ".join(f"{k}={v}" for k, v in overrides.items()) or "none",
        ok=not overrides,
    ))
    checks.append(Check("NCCL launch order", info["launch_order"], ok=info["launch_order"].endswith("program order")))
    if info["cuda"]:
        from pycomm.nccl import config_fields_support

        taken, too_new = config_fields_support()
        checks.append(Check(
            "ncclConfig_t fields",
            ", ".join(taken) + "".join(f"; {field} needs NCCL {needs}" for field, needs in too_new),
        ))
    megatron = _package_version("megatron-core")
    checks.append(Check("megatron-core", megatron or "not installed (pycomm.megatron unavailable)", ok=bool(megatron)))
    try:
        from torch.distributed.fsdp import FSDPModule

        fsdp2 = all(hasattr(FSDPModule, m) for m in ("set_custom_all_gather", "set_custom_reduce_scatter"))
    except ImportError:
        fsdp2 = False
    checks.append(Check("FSDP2 custom AG/RS hooks", "available" if fsdp2 else "missing (pycomm.fsdp unavailable)", ok=fsdp2))
    return checks


def run(args: argparse.Namespace) -> int:
    checks = collect()
    broken = [c for c in checks if c.required and not c.ok]
    if args.json:
        print_json({"ok": not broken, "checks": [asdict(c) for c in checks]})
        return 1 if broken else 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="pycomm doctor")
    table.add_column("check")
    table.add_column("value")
    table.add_column("status")
    for c in checks:
        status = "ok" if c.ok else ("FAIL" if c.required else "note")
        table.add_row(c.name, c.value, status)
    console = Console()
    console.print(table)
    if broken:
        console.print("pycomm cannot work here: " + "; ".join(f"{c.name}: {c.value}" for c in broken))
        return 1
    return 0
