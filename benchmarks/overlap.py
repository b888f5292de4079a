"""CPU overlap/overhead benchmark; the same as `python -m pycomm bench`
(code: pycomm.bench.cpu)."""

import sys

from pycomm.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
