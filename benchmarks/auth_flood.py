"""Does a flood of failed authentications slow other clients down?

Starts a daemon (with metrics), then for each round:

1. *alone*: a well-behaved managerd client times ``--calls`` ``m.ping()``
   calls, one after the other;
2. *under flood*: the same, while another process fails authentication as
   fast as it can: raw sockets that connect, read the challenge, answer it
   with a wrong HMAC and read the ``#FAILURE#`` (``--flood-sockets`` at a
   time, so the daemon always has handshakes queued).

It prints p50/p99/mean latency of both, the ratio, and the failed
authentications per second during the timed window, as counted by the flood
process and by the daemon (``managerd_auth_failures_total``, scraped before
and after). Each failed authentication also costs the daemon a log line,
which this script reads and throws away, as a log shipper would.

A number to read, not a test. On a machine with fewer cores than the three
processes (daemon, client, flooder) need, part of what is measured is the
scheduler sharing cores; ``--pin`` puts the daemon on CPU 0, the client on
CPU 1 and the flooder on the rest (or beside the client on 2 cores)::

    uv run python benchmarks/auth_flood.py
    uv run python benchmarks/auth_flood.py --calls 5000 --rounds 3 --pin
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import secrets
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from multiprocessing.synchronize import Event as EventType
from typing import Any

from managerd_client import connect
from managerd_client.wire import FAILURE, FrameSocket

spawn = multiprocessing.get_context("spawn")


# -- the daemon -----------------------------------------------------------------------------


class Daemon:
    """``managerd serve`` on an ephemeral port; its log is read and counted, not kept."""

    def __init__(self, authkey: str, cpus: set[int] | None) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.metrics_port = s.getsockname()[1]
        env = dict(os.environ, MANAGERD_AUTHKEY=authkey, PYTHONUNBUFFERED="1")
        cmd = [
            sys.executable, "-m", "managerd", "serve", "--host", "127.0.0.1", "--port", "0",
            "--metrics-port", str(self.metrics_port),
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        if cpus:
            os.sched_setaffinity(self.proc.pid, cpus)
        # Read the log here until the daemon listens, then hand the pipe to `wc -l`:
        # a reader thread in this process would take the GIL from the timed client.
        assert self.proc.stdout is not None
        self.address = ""
        for line in self.proc.stdout:
            match = re.search(r"managerd serving on (\S+:\d+)", line)
            if match:
                self.address = match.group(1)
                break
        if not self.address:
            self.stop()
            raise SystemExit("the daemon did not start")
        self.counter = subprocess.Popen(
            ["wc", "-l"], stdin=self.proc.stdout, stdout=subprocess.PIPE, text=True
        )

    def auth_failures(self) -> float:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        match = re.search(r"^managerd_auth_failures_total (\S+)$", text, re.MULTILINE)
        assert match is not None
        return float(match.group(1))

    def stop(self) -> int:
        """Stop the daemon; the number of log lines it wrote after starting."""
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        out, _ = self.counter.communicate(timeout=60)
        return int(out.strip() or 0)


# -- the flood (a separate process) ---------------------------------------------------------


def flood(
    address: str,
    sockets: int,
    started: EventType,
    stop: EventType,
    counts: Any,
    cpus: set[int] | None,
) -> None:
    """Fail authentication as fast as possible until ``stop``; count in ``counts``."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    host, _, port = address.rpartition(":")
    where = (host, int(port))
    wrong = b"{sha256}" + bytes(32)  # well formed, never the right HMAC
    failed = errors = 0
    while not stop.is_set():
        conns: list[FrameSocket] = []
        try:
            for _ in range(sockets):
                conns.append(FrameSocket(socket.create_connection(where, timeout=30)))
            for fs in conns:
                fs.recv_frame()
                fs.send_frame(wrong)
            for fs in conns:
                if fs.recv_frame() == FAILURE:
                    failed += 1
        except (OSError, EOFError):
            errors += 1
        finally:
            for fs in conns:
                fs.close()
        counts[0], counts[1] = failed, errors
        started.set()


# -- the well-behaved client ----------------------------------------------------------------


def timed_pings(m: Any, calls: int) -> list[float]:
    """Latency of each of ``calls`` sequential pings, in microseconds."""
    out = []
    for _ in range(calls):
        start = time.perf_counter()
        m.ping()
        out.append((time.perf_counter() - start) * 1e6)
    return out


def summary(us: list[float]) -> dict[str, float]:
    ordered = sorted(us)
    return {
        "p50": ordered[len(ordered) // 2],
        "p99": ordered[int(len(ordered) * 0.99) - 1],
        "mean": statistics.fmean(ordered),
    }


def show(label: str, s: dict[str, float]) -> str:
    return f"{label:<12} p50 {s['p50']:7.1f} us  p99 {s['p99']:7.1f} us  mean {s['mean']:7.1f} us"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000, help="pings timed per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alone/flood pairs")
    parser.add_argument("--flood-sockets", type=int, default=50, help="handshakes in flight")
    parser.add_argument("--pin", action="store_true", help="pin daemon, client, flooder to CPUs")
    args = parser.parse_args()

    cores = sorted(os.sched_getaffinity(0))
    daemon_cpus = client_cpus = flood_cpus = None
    if args.pin and len(cores) >= 2:
        daemon_cpus, client_cpus = {cores[0]}, {cores[1]}
        flood_cpus = set(cores[2:]) or {cores[1]}
    pinned = f"daemon {daemon_cpus}, client {client_cpus}, flooder {flood_cpus}"
    print(
        f"{len(cores)} CPUs; python {sys.version.split()[0]}; {args.calls} pings per measurement; "
        f"pinned: {pinned if args.pin else 'no'}",
        flush=True,
    )
    authkey = secrets.token_hex(16)
    daemon = Daemon(authkey, daemon_cpus)
    if client_cpus:
        os.sched_setaffinity(0, client_cpus)
    alone_runs: list[dict[str, float]] = []
    flood_runs: list[dict[str, float]] = []
    rates: list[float] = []
    try:
        with connect(daemon.address, authkey=authkey) as m:
            timed_pings(m, 1000)  # warm up
            for round_no in range(1, args.rounds + 1):
                alone = summary(timed_pings(m, args.calls))

                started, stop = spawn.Event(), spawn.Event()
                counts = spawn.Array("q", 2)
                flooder = spawn.Process(
                    target=flood,
                    args=(daemon.address, args.flood_sockets, started, stop, counts, flood_cpus),
                )
                flooder.start()
                if not started.wait(60):
                    raise SystemExit("the flood process did not get going")
                failed_before, daemon_before = counts[0], daemon.auth_failures()
                t0 = time.perf_counter()
                flooded = summary(timed_pings(m, args.calls))
                window_s = time.perf_counter() - t0
                failed_after, daemon_after = counts[0], daemon.auth_failures()
                stop.set()
                flooder.join(60)
                rate = (failed_after - failed_before) / window_s
                daemon_rate = (daemon_after - daemon_before) / window_s

                alone_runs.append(alone)
                flood_runs.append(flooded)
                rates.append(daemon_rate)
                print(f"round {round_no}:", flush=True)
                print("  " + show("alone", alone))
                print("  " + show("under flood", flooded))
                print(
                    f"  failed auths/s during the window: {rate:,.0f} (flooder), "
                    f"{daemon_rate:,.0f} (daemon's managerd_auth_failures_total); "
                    f"flooder connection errors: {counts[1]}"
                )
                print(
                    f"  ratio flood/alone: p50 x{flooded['p50'] / alone['p50']:.2f}, "
                    f"p99 x{flooded['p99'] / alone['p99']:.2f}, "
                    f"mean x{flooded['mean'] / alone['mean']:.2f}",
                    flush=True,
                )
            m.ping()
    finally:
        log_lines = daemon.stop()

    def med(runs: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    print(f"median of {args.rounds} rounds:")
    print("  " + show("alone", {k: med(alone_runs, k) for k in ("p50", "p99", "mean")}))
    print("  " + show("under flood", {k: med(flood_runs, k) for k in ("p50", "p99", "mean")}))
    print(
        f"  failed auths/s (daemon-counted): {statistics.median(rates):,.0f}; "
        f"ratio p50 x{med(flood_runs, 'p50') / med(alone_runs, 'p50'):.2f}, "
        f"p99 x{med(flood_runs, 'p99') / med(alone_runs, 'p99'):.2f}"
    )
    print(f"  daemon log lines (one per failed authentication): {log_lines:,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
