"""The benchmark suite of issue 7: the raw socket floor, stock managers and managerd, one run.

Every workload runs, on this machine and in this invocation, against up to
three systems:

- ``floor``: a raw TCP server in another process (``TCP_NODELAY`` on both
  ends, a 5-byte header and the bytes): 100-byte ping-pong, and the same
  put/get pattern as a queue (a payload up and an empty ack back; an empty
  request up and the payload back);
- ``stock``: a ``multiprocessing.managers.BaseManager`` server started as a
  subprocess on 127.0.0.1 with an authkey (named queues, dicts, locks and
  values registered on it), clients using the stock proxies;
- ``managerd``: a ``managerd serve`` subprocess (tests/conftest.py's
  ``Daemon``; default settings, so uvloop when installed), clients using
  ``managerd_client``.

Single-client loops run in a forked child (the suite's own process holds
nothing that could steal its CPU) and record every call's latency;
multi-process workloads fork their workers, which connect first and then
start together at one shared ``time.monotonic()`` instant. Every loop is
bounded in time (``--seconds``) and in count. Figures are printed, never
asserted; a correctness failure (a message lost or delivered twice, a wake
out of FIFO order) is printed and makes the exit status 1.

Usage::

    uv run python benchmarks/suite.py --json benchmarks/results.json   # full (~5 min)
    uv run python benchmarks/suite.py --quick --json /tmp/smoke.json   # seconds (CI)
    uv run python benchmarks/suite.py --only noop,putget --seconds 5  # some workloads

Comparing two revisions of managerd: ``--managerd-from PATH`` (or
``--compare PATH``; repeatable) adds a system ``managerd@<short rev>``
(``+`` when PATH has uncommitted changes): a daemon started from the
checkout at PATH (``PATH/.venv/bin/python -m managerd serve`` if PATH has
a venv, else this interpreter; ``PYTHONPATH=PATH:PATH/clients`` either
way, and ``PYTHONSAFEPATH=1`` so this checkout's directory does not shadow
it), measured in the same invocation and taking turns with this
checkout's ``managerd`` within every round. The clients are always this
checkout's ``managerd_client`` (the comparison is of the daemon's code; a
daemon that refuses protocol 2 is spoken to in protocol 1, so older
checkouts compare too). The report adds its
figures, a table per other checkout with ``managerd/managerd@<rev>``
(this checkout's figure over the other's; see each workload's
``better``); the JSON adds ``compared`` (path, rev, interpreter, where
managerd was imported from)::

    git worktree add --detach /tmp/base main && (cd /tmp/base && uv sync)
    uv run python benchmarks/suite.py --managerd-from /tmp/base --only noop,putget,mpmc,batch
    git worktree remove --force /tmp/base  # --force: its .venv is untracked

The parts live in ``benchmarks/bench/`` (servers, workloads, crowds,
measure, report, runner); this file is the command.

See BENCHMARKS.md for what each figure means and the issue's targets.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench.runner import main

if __name__ == "__main__":
    sys.exit(main(__doc__ or ""))
