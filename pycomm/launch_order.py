"""The order in which a device starts the process's NCCL kernels.

Several NCCL communicators on one device (the AG lane, the RS lane, torch's
own) deadlock when their kernels start in different orders on different
ranks and do not all fit on the device at once: each waits for a peer kernel
that cannot start (NCCL user guide, "Using multiple NCCL communicators
concurrently"; NVIDIA/nccl#195). NCCL >= 2.26 rules that out with
`NCCL_LAUNCH_ORDER_IMPLICIT=1`: each NCCL kernel of a device starts only
after the one launched before it, so the device keeps the host's launch order
("This ensures the operations will not deadlock", NCCL's environment-variable
docs). The host's order is the program's, the same on every rank, as long as
every launch is made by the thread that asked for it: pycomm's lanes then
wait in `issue()` until NCCL's thread has taken their launch
(`launch_in_program_order`).

NCCL reads the variable once per process, at its first launch, so pycomm sets
it when it is imported, unless it is set already. Set it to 0 to opt out:
lanes then leave their launches to NCCL's threads (less host time per op, no
order across communicators), since launches racing on one device are what
NCCL refuses under the variable.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

LAUNCH_ORDER_ENV = "NCCL_LAUNCH_ORDER_IMPLICIT"

# The value at `import pycomm`: NCCL latches the variable at the process's
# first launch, so a later change of the environment changes nothing in
# NCCL and must not change the lanes either.
_value_at_import: str | None = None


def adopt_implicit_launch_order() -> None:
    """Sets NCCL_LAUNCH_ORDER_IMPLICIT=1 unless the environment has it, and
    keeps the value the lanes follow from now on; an opt-out is logged once,
    here."""
    global _value_at_import
    if LAUNCH_ORDER_ENV not in os.environ:
        os.environ[LAUNCH_ORDER_ENV] = "1"
    _value_at_import = os.environ[LAUNCH_ORDER_ENV]
    if not ordered_by_variable():
        logger.info(
            "%s=%s: pooled NCCL lanes leave their launches to NCCL's threads, and "
            "kernels of communicators sharing a device may start in different "
            "orders on different ranks",
            LAUNCH_ORDER_ENV,
            _value_at_import,
        )


def value_at_import() -> str:
    """The variable's value the lanes follow: as it was at `import pycomm`."""
    return _value_at_import if _value_at_import is not None else os.environ.get(LAUNCH_ORDER_ENV, "1")


def ordered_by_variable() -> bool:
    return value_at_import().strip() != "0"


def launch_in_program_order(config_orders: bool | None = None) -> bool:
    """Whether an NCCL lane launches in program order: unless the variable
    was 0 at import, or when its RoleConfig asks NCCL (>= 2.31) to order its
    communicator's launches (`launch_order_implicit`), since NCCL refuses
    racing launches then too."""
    return bool(config_orders) or ordered_by_variable()
