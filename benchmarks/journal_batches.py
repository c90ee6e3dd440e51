"""Daemon cost per message of journaled batches: put_many/get_many with ``--data-dir``.

For each checkout, a daemon from it (``python -m managerd serve --data-dir``
with ``PYTHONPATH`` on the checkout, as ``daemon_instructions.py`` starts
one) serves this checkout's client: a warm-up, then ``--rounds`` rounds of
``put_many`` of ``--batch`` 100-byte items and ``get_many`` of as many. It
prints the daemon's CPU time (user + system, all its threads, from
``/proc``) per message (one item put and got), and with ``--instructions`` the instructions per
message retired inside uvloop's read callback under callgrind (decoding,
running, journaling and answering a call; the journal's writer thread and
the timers are not counted), which the load of a shared machine does not
move. Nothing is asserted.

Usage::

    uv run python benchmarks/journal_batches.py --checkout /tmp/base --checkout . \\
        [--fsync interval] [--rounds 300] [--instructions]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from daemon_instructions import connect_when_up, serve_under

PAYLOAD = b"x" * 100


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _drive(port: int, key: bytes, batch: int, rounds: int, pid: int) -> float:
    """Make the rounds against the daemon on ``port``; the daemon's CPU seconds for them."""
    m = connect_when_up(port, key)
    with m:
        q = m.Queue("bench-batches")
        items = [PAYLOAD] * batch
        for _ in range(20):
            q.put_many(items)
            q.get_many(batch)
        before = _cpu_s(pid)
        for _ in range(rounds):
            q.put_many(items)
            q.get_many(batch)
        return _cpu_s(pid) - before


def run(checkout: Path, fsync: str, batch: int, rounds: int, valgrind: bool) -> tuple[float, int]:
    """(daemon CPU seconds, instructions in the read callback or 0) for ``rounds``."""
    with tempfile.TemporaryDirectory() as data:
        return serve_under(
            checkout,
            lambda port, key, pid: _drive(port, key, batch, rounds, pid),
            extra=["--data-dir", data, "--fsync", fsync],
            valgrind=valgrind,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--checkout", action="append", required=True)
    parser.add_argument("--fsync", default="interval", choices=("always", "interval"))
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--instructions", action="store_true")
    args = parser.parse_args()
    messages = args.batch * args.rounds  # a message: one item put and got
    for checkout in args.checkout:
        path = Path(checkout)
        cpu, _ = run(path, args.fsync, args.batch, args.rounds, valgrind=False)
        line = f"daemon of {path.resolve()}: {cpu / messages * 1e6:.2f} us CPU/message"
        if args.instructions:
            rounds = max(1, args.rounds // 30)
            _, idle = run(path, args.fsync, args.batch, 0, valgrind=True)
            _, busy = run(path, args.fsync, args.batch, rounds, valgrind=True)
            per = (busy - idle) / (args.batch * rounds)
            line += f", {per:,.0f} instructions/message"
        print(f"{line} (--fsync {args.fsync}, {args.rounds} x {args.batch} x 100 B)", flush=True)


if __name__ == "__main__":
    main()
