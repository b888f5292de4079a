"""Preloaded by a test's fork server: records which process imported it."""

import os

IMPORTED_BY = os.getpid()
