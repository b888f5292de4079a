"""Creation cost of the all-gather groups in simulated worlds of 8 to 16,384
ranks, pycomm against megatron-core (code: pycomm.bench.creation_scale).

    python benchmarks/creation_scale.py [--worlds 8,64,512,4096,16384] [--out FILE]
"""

import sys

from pycomm.bench.creation_scale import main

if __name__ == "__main__":
    sys.exit(main())
