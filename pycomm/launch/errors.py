"""How a world fails or is stopped: the exceptions `pycomm.launch` raises,
for a joined world and a spawned one alike."""

from __future__ import annotations

import signal

from pycomm.errors import PycommError

# Each class is known by its public name, pycomm.launch.<class> (what a
# traceback prints and what callers import), wherever it is defined.
_PUBLIC_MODULE = "pycomm.launch"


class WorldFailed(PycommError):
    """A rank of a spawned world raised, died or ran past the time limit."""

    __module__ = _PUBLIC_MODULE


class LaunchEnvironmentError(PycommError, ValueError):
    """The environment describes part of a world, or one that cannot exist."""

    __module__ = _PUBLIC_MODULE


class WorldInterrupted(KeyboardInterrupt):
    """SIGINT reached the spawning process, which stopped its ranks. A
    KeyboardInterrupt, so whatever handles Ctrl-C handles this."""

    __module__ = _PUBLIC_MODULE
    signum = signal.SIGINT


class WorldTerminated(SystemExit):
    """SIGTERM reached the spawning process, which stopped its ranks. A
    SystemExit, so the process exits with 128 + SIGTERM (as if the signal had
    ended it) once every `finally` has run."""

    __module__ = _PUBLIC_MODULE
    signum = signal.SIGTERM

    def __init__(self) -> None:
        super().__init__(128 + self.signum)
