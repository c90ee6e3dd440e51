"""Daemon instructions per call, counted by valgrind: the daemon's side of ``client_instructions``.

Wall-clock rates and CPU times on the shared machines move with the load;
instructions retired do not. For each checkout, a daemon from it (``python -m
managerd serve`` with ``PYTHONPATH`` on the checkout, as ``suite.py
--managerd-from`` starts one) runs under callgrind while this checkout's
client makes a warm-up, then N calls of the workload; the same with 0 calls
is subtracted (the handshake, the warm-up). Only instructions inside
uvloop's read callback are counted (``--toggle-collect``: decoding,
running and answering what arrived, down to the write): the daemon's
timers (session sweeps, fsync intervals) run by the clock, and a loaded
machine stretches a run under valgrind, so counting them would make the
figure depend on the load. Needs uvloop (the default loop when installed).
Only user-space instructions are counted.

Usage::

    uv run python benchmarks/daemon_instructions.py --checkout /tmp/base --checkout . --calls 1000
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from managerd_client import Manager, connect

T = TypeVar("T")

WORKLOADS = ("noop", "value_get", "putget", "lock")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def connect_when_up(port: int, key: bytes) -> Manager:
    """A client of the daemon on ``port`` once it answers (under valgrind it starts slowly)."""
    deadline = time.monotonic() + 600
    while True:
        try:
            return connect(("127.0.0.1", port), key, connect_timeout_s=60)
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def serve_under(
    checkout: Path,
    drive: Callable[[int, bytes, int], T],
    *,
    extra: Sequence[str] = (),
    valgrind: bool = True,
) -> tuple[T, int]:
    """A daemon from ``checkout`` (``serve`` with ``extra`` arguments) driven by
    ``drive(port, key, pid)``, then stopped: what ``drive`` returned, and the
    user-space instructions retired in uvloop's read callback (0 without
    ``valgrind``)."""
    key = os.urandom(16).hex().encode()
    port = _free_port()
    with tempfile.NamedTemporaryFile() as keyfile:
        keyfile.write(key)
        keyfile.flush()
        root = str(checkout.resolve())
        env = dict(os.environ, PYTHONPATH=f"{root}:{root}/clients", PYTHONSAFEPATH="1")
        command = (
            [
                "valgrind",
                "--tool=callgrind",
                "--callgrind-out-file=/dev/null",
                "--toggle-collect=*uv_stream*on_read*",
            ]
            if valgrind
            else []
        )
        serve = ["-m", "managerd", "serve", "--port", str(port), "--authkey-file", keyfile.name]
        daemon = subprocess.Popen(
            [*command, sys.executable, *serve, *extra],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            result = drive(port, key, daemon.pid)
        finally:
            daemon.send_signal(signal.SIGTERM)
            _, stderr = daemon.communicate(timeout=600)
    if not valgrind:
        return result, 0
    found = re.search(r"Collected : (\d+)", stderr)
    if found is None:
        raise RuntimeError(f"no count from callgrind: {stderr[-500:]}")
    return result, int(found.group(1))


def _drive(port: int, key: bytes, workload: str, calls: int) -> None:
    """Make the workload's calls against the daemon on ``port`` (after a warm-up)."""
    m = connect_when_up(port, key)
    with m:
        v = m.Value("bench-v", "i", 1)
        q = m.Queue("bench-q")
        lock = m.Lock("bench-l")
        payload = b"x" * 100

        def putget() -> None:
            q.put(payload)
            q.get()

        def lock_pair() -> None:
            lock.acquire()
            lock.release()

        fn = dict(noop=m.ping, value_get=lambda: v.value, putget=putget, lock=lock_pair)[workload]
        for _ in range(300):
            fn()
        for _ in range(calls):
            fn()


def instructions(checkout: Path, workload: str, calls: int) -> int:
    """User-space instructions of a daemon from ``checkout`` serving ``calls`` calls."""
    _, count = serve_under(checkout, lambda port, key, _pid: _drive(port, key, workload, calls))
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--checkout", action="append", required=True)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--only", default=",".join(WORKLOADS))
    args = parser.parse_args()
    for workload in args.only.split(","):
        for checkout in args.checkout:
            path = Path(checkout)
            idle = instructions(path, workload, 0)
            busy = instructions(path, workload, args.calls)
            per_call = (busy - idle) / args.calls
            print(f"{workload:10} daemon of {path.resolve()}: {per_call:,.0f} instructions/call")


if __name__ == "__main__":
    main()
