"""What the fork server of spawned worlds imports last, after torch and
pycomm (see pycomm.launch.spawn).

It ties the server to the process that started it: the kernel kills the
server when that process's thread ends (PR_SET_PDEATHSIG), and each rank is
tied to the server in the same way, so no rank outlives its parent, not even
one stuck in native code that holds the GIL (a Python thread watching the
parent could not run then). Then it imports the modules `preload_in_ranks`
named, each on its own: one that fails to import is logged and left for the
ranks to import, instead of ending the server, which would fail every world
after it (multiprocessing's server catches ImportError only).

Only the standard library is imported here: spawn.py uses the same helpers.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
import signal
import sys

logger = logging.getLogger(__name__)

# Set by the parent only while it starts the server; the server removes them.
MODULES_VARIABLE = "PYCOMM_FORK_SERVER_MODULES"
PARENT_VARIABLE = "PYCOMM_FORK_SERVER_PARENT"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def end_with_parent_process(parent_pid: int) -> bool:
    """Has the kernel SIGKILL this process when its parent's thread that
    created it ends, however it ends. Exits at once if the parent is already
    gone; False where the kernel offers no such signal (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        no_arg = ctypes.c_ulong(0)
        armed = libc.prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGKILL), no_arg, no_arg, no_arg) == 0
    except (OSError, AttributeError):
        return False
    if armed and os.getppid() != parent_pid:  # it ended before the signal was armed
        os._exit(1)
    return armed


def _serve() -> None:
    parent = os.environ.pop(PARENT_VARIABLE, None)
    modules = os.environ.pop(MODULES_VARIABLE, "")
    if parent is not None:
        end_with_parent_process(int(parent))
    for name in filter(None, modules.split(",")):
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the ranks import it, and fail there if they must
            logger.warning("the fork server could not import %s; ranks import it themselves", name, exc_info=True)


_serve()
