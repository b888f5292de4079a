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

Only the standard library and pycomm.linux are imported here: spawn.py
uses the same helper for its ranks.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal

from pycomm import linux

logger = logging.getLogger(__name__)

# Set by the parent only while it starts the server; the server removes them.
MODULES_VARIABLE = "PYCOMM_FORK_SERVER_MODULES"
PARENT_VARIABLE = "PYCOMM_FORK_SERVER_PARENT"


def end_with_parent_process(parent_pid: int) -> bool:
    """Has the kernel SIGKILL this process when its parent's thread that
    created it ends, however it ends. Exits at once if the parent is already
    gone; False where the kernel offers no such signal (not Linux)."""
    armed = linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
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
