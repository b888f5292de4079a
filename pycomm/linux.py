"""prctl(2), the one Linux system call pycomm makes from Python: a thread's
name for the kernel, a process's parent-death signal. Standard library only
(the fork server imports it before anything else of pycomm runs there)."""

from __future__ import annotations

import ctypes
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PR_SET_NAME = 15


def prctl(option: int, argument: int | bytes) -> bool:
    """prctl(option, argument); False where it failed or the system is not
    Linux."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        value = ctypes.c_char_p(argument) if isinstance(argument, bytes) else ctypes.c_ulong(argument)
        no_arg = ctypes.c_ulong(0)
        return libc.prctl(option, value, no_arg, no_arg, no_arg) == 0
    except (OSError, AttributeError):
        return False
