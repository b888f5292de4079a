"""Preloaded by a test's fork server: records which process imported it, and
sets a variable as Transformer Engine sets NVTE_CUDA_INCLUDE_DIR on import."""

import os

IMPORTED_BY = os.getpid()
os.environ["PYCOMM_TEST_SET_ON_IMPORT"] = "by the server's import"
