"""python benchmarks/vs_peers.py [options]: the same as `python -m benchmarks.peers` (the benchmark
against kronfluence, dattri and traker lives in benchmarks/peers/)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.peers.runner import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
