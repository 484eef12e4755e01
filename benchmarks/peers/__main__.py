"""python -m benchmarks.peers [options]: see the package docstring (`--help`)."""

import sys

from benchmarks.peers.runner import main

sys.exit(main())
