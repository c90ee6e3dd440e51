"""What does deadlock detection cost? Lock pairs/s with it on and off, in one run.

For each mode (``off``, ``report``), starts a daemon with
``MANAGERD_DEADLOCK=<mode>`` and ``--clients`` processes that acquire and
release one shared Lock as fast as they can for ``--seconds`` (contended:
most acquires park a waiter, which is when the detector walks the graph),
plus a round with one lock per client (uncontended: nothing is walked).
Prints acquire+release pairs per second, summed over the clients.

A number to read, not a test::

    uv run python benchmarks/deadlock_cost.py --clients 4 --seconds 5 --rounds 3
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import secrets
import statistics
import subprocess
import sys
import time

from managerd_client import connect

spawn = multiprocessing.get_context("spawn")


def _client(
    address: str, authkey: bytes, name: str, seconds: float, out: multiprocessing.Queue[int]
) -> None:
    with connect(address, authkey=authkey) as m:
        lock = m.Lock(name)
        pairs = 0
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            lock.acquire()
            lock.release()
            pairs += 1
        out.put(pairs)


def _round(address: str, authkey: bytes, clients: int, seconds: float, shared: bool) -> float:
    out: multiprocessing.Queue[int] = spawn.Queue()
    procs = [
        spawn.Process(target=_client, args=(address, authkey, "shared" if shared else f"own-{i}",
                                            seconds, out))
        for i in range(clients)
    ]  # fmt: skip
    for p in procs:
        p.start()
    total = sum(out.get(timeout=seconds + 60) for _ in procs)
    for p in procs:
        p.join(30)
    return total / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results: dict[tuple[str, bool], list[float]] = {}
    for _ in range(args.rounds):
        for mode in ("off", "report"):
            authkey = secrets.token_hex(16)
            env = dict(os.environ, MANAGERD_AUTHKEY=authkey, MANAGERD_DEADLOCK=mode)
            daemon = subprocess.Popen(
                [sys.executable, "-m", "managerd", "serve", "--port", "0"],
                env=env, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            try:
                assert daemon.stderr is not None
                port = None
                for line in daemon.stderr:
                    m = re.search(r"serving on \S+:(\d+)", line)
                    if m:
                        port = int(m.group(1))
                        break
                address = f"127.0.0.1:{port}"
                for shared in (True, False):
                    rate = _round(address, authkey.encode(), args.clients, args.seconds, shared)
                    results.setdefault((mode, shared), []).append(rate)
            finally:
                daemon.terminate()
                daemon.wait(15)
    for shared in (True, False):
        off = statistics.median(results[("off", shared)])
        on = statistics.median(results[("report", shared)])
        what = "one shared lock (contended)" if shared else "a lock per client (uncontended)"
        print(
            f"{args.clients} clients, {what}: off {off:,.0f} pairs/s, "
            f"report {on:,.0f} pairs/s ({(on / off - 1) * 100:+.1f}%)"
        )


if __name__ == "__main__":
    main()
