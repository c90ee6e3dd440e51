"""The benchmark suite's parts; ``benchmarks/suite.py`` is the command.

- ``plan``: shared constants, the fork context, ``Plan`` (how long, how many);
- ``servers``: the floor, stock and managerd servers, ``Target``, ``Client``;
- ``measure``: the timed loop, /proc CPU and memory, ``in_child``, ``Gang``;
- ``workloads``: single-client and multi-process workloads, the import probe;
- ``crowds``: idle clients beside a probe, blocked consumers;
- ``report``: ratios, targets, the tables, the JSON;
- ``runner``: ``Suite`` (the order of the run) and ``main`` (the command line).
"""

from __future__ import annotations

import sys
from pathlib import Path

#: The checkout these benchmarks belong to.
ROOT = Path(__file__).resolve().parent.parent.parent

# The managerd daemon is started as the tests start it (tests/conftest.py's Daemon).
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))
