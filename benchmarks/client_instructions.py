"""Client instructions per call, counted by valgrind: a figure the machine's load does not move.

On the shared 2-core machines wall-clock rates swing by 2x between runs, and
even CPU time per call moves with cache pressure from other processes.
Instructions retired do not (``perf stat`` has no counters in these VMs, so
valgrind's callgrind counts them). For each checkout (its ``managerd_client``
on ``sys.path``), a client process connects to one running daemon, warms up,
then makes N calls of the workload under callgrind; the same with 0 calls is
subtracted (interpreter start, imports, connect). Only user-space
instructions are counted: the kernel's share of each send/recv is not.

Usage (a daemon must listen; ``MANAGERD_AUTHKEY`` is its key)::

    uv run python benchmarks/client_instructions.py --address 127.0.0.1:47999 \\
        --checkout /tmp/base --checkout . --calls 3000
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

_CLIENT = """
import sys
sys.path[:0] = [{root!r}, {root!r} + "/clients"]
from managerd_client import connect
m = connect(({host!r}, {port}), {key!r}.encode())
v = m.Value("bench-v", "i", 1)
q = m.Queue("bench-q")
lock = m.Lock("bench-l")
payload = b"x" * 100
def putget():
    q.put(payload)
    q.get()
def lock_pair():
    lock.acquire()
    lock.release()
fn = dict(noop=m.ping, value_get=lambda: v.value, putget=putget, lock=lock_pair)[{workload!r}]
for _ in range(300):
    fn()
for _ in range({calls}):
    fn()
m.close()
"""

WORKLOADS = ("noop", "value_get", "putget", "lock")


def instructions(code: str) -> int:
    """User-space instructions of ``python -c code``, counted by callgrind."""
    command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
    result = subprocess.run(
        [*command, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONSAFEPATH="1"),
        check=True,
    )
    found = re.search(r"Collected : (\d+)", result.stderr)
    if found is None:
        raise RuntimeError(f"no count from callgrind: {result.stderr[-500:]}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--address", required=True, help="HOST:PORT of a running daemon")
    parser.add_argument("--checkout", action="append", required=True)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--only", default=",".join(WORKLOADS))
    args = parser.parse_args()
    host, _, port = args.address.rpartition(":")
    key = os.environ["MANAGERD_AUTHKEY"]
    for workload in args.only.split(","):
        for checkout in args.checkout:
            root = str(Path(checkout).resolve())
            fields = dict(root=root, host=host, port=int(port), key=key, workload=workload)
            idle = instructions(_CLIENT.format(calls=0, **fields))
            busy = instructions(_CLIENT.format(calls=args.calls, **fields))
            per_call = (busy - idle) / args.calls
            print(f"{workload:10} client of {root}: {per_call:,.0f} instructions/call", flush=True)


if __name__ == "__main__":
    main()
