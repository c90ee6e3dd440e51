"""Does a flood of failed authentications slow other clients down?

Starts a daemon (with metrics), then for each round:

1. *alone*: a well-behaved managerd client (connected from 127.0.0.1 before
   the flood) times ``--calls`` ``m.ping()`` calls, one after the other;
2. *under flood*: the same, while another process, connecting from
   127.0.0.2, fails authentication as fast as it can: raw sockets that
   connect, read the challenge, answer it with a wrong HMAC and read the
   ``#FAILURE#`` (``--flood-sockets`` at a time). Once the daemon penalizes
   that address (``auth_failure_limit``), its connections are held and then
   refused, which the flooder reads too.

``--spin``: the flooder never reads — connect, send a wrong answer, close —
so a penalty cannot slow it: a connection flood. ``--flood-sockets 0``: the
control, a process as busy as the flooder that never touches the daemon (on
a machine with fewer cores than the three processes need, part of any
figure is the scheduler sharing cores). ``--auth-failure-limit 0``: the
daemon without the penalty.

It prints p50/p99/mean latency of both, the ratios, and per second of the
timed window the connections the flooder opened, and the failed
authentications and penalty refusals the daemon counted
(``managerd_auth_failures_total``, ``managerd_limits_hit_total{limit=
"auth_penalty"}``, scraped before and after); then the totals over all
windows. ``--pin`` puts the daemon on CPU 0, the client on CPU 1 and the
flooder on the rest (or beside the client on 2 cores).

A number to read, not a test::

    uv run python benchmarks/auth_flood.py --rounds 5 --calls 20000
    uv run python benchmarks/auth_flood.py --rounds 5 --calls 20000 --auth-failure-limit 0
    uv run python benchmarks/auth_flood.py --rounds 5 --calls 20000 --spin
    uv run python benchmarks/auth_flood.py --rounds 5 --calls 20000 --flood-sockets 0
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
from managerd_client.wire import FAILURE, REFUSED, FrameSocket

spawn = multiprocessing.get_context("spawn")
#: The flooder's source address: another host, as far as the daemon can tell
#: (the well-behaved client connects from 127.0.0.1).
FLOOD_FROM = "127.0.0.2"
IP_BIND_ADDRESS_NO_PORT = 24  # Linux; bind(port 0) would search for a port per connection


# -- the daemon -----------------------------------------------------------------------------


class Daemon:
    """``managerd serve`` on an ephemeral port; its log is read and counted, not kept."""

    def __init__(self, authkey: str, cpus: set[int] | None, env_extra: dict[str, str]) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.metrics_port = s.getsockname()[1]
        env = dict(os.environ, MANAGERD_AUTHKEY=authkey, PYTHONUNBUFFERED="1", **env_extra)
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

    def counters(self) -> tuple[float, float]:
        """The daemon's failed authentications and connections refused by a penalty."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        failed = re.search(r"^managerd_auth_failures_total (\S+)$", text, re.MULTILINE)
        refused = re.search(
            r'^managerd_limits_hit_total\{limit="auth_penalty"\} (\S+)$', text, re.MULTILINE
        )
        assert failed is not None and refused is not None
        return float(failed.group(1)), float(refused.group(1))

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


def _connect_from(source: str, where: tuple[str, int]) -> socket.socket:
    """A connection from ``source`` (the port picked at connect, as for any client)."""
    sock = socket.socket()
    sock.settimeout(30)
    sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    sock.bind((source, 0))
    sock.connect(where)
    return sock


def flood(
    address: str,
    sockets: int,
    spin: bool,
    started: EventType,
    stop: EventType,
    counts: Any,
    cpus: set[int] | None,
) -> None:
    """Fail authentication as fast as possible until ``stop``.

    ``counts`` gets connections opened, failures seen, refusals seen and
    connection errors. ``spin``: send the wrong answer without reading the
    challenge and close at once, never waiting for the daemon.
    """
    if cpus:
        os.sched_setaffinity(0, cpus)
    if sockets == 0:  # the control: as busy, never touching the daemon
        while not stop.is_set():
            sum(range(10000))
            started.set()
        return
    host, _, port = address.rpartition(":")
    where = (host, int(port))
    wrong = b"{sha256}" + bytes(32)  # well formed, never the right HMAC
    opened = failed = refused = errors = 0
    while not stop.is_set():
        conns: list[FrameSocket] = []
        try:
            for _ in range(sockets):
                conns.append(FrameSocket(_connect_from(FLOOD_FROM, where)))
                opened += 1
                counts[0] = opened
            if spin:
                for fs in conns:
                    fs.send_frame(wrong)
                continue
            answered = []
            for fs in conns:
                if fs.recv_frame().startswith(REFUSED):
                    refused += 1
                    counts[2] = refused
                else:
                    fs.send_frame(wrong)
                    answered.append(fs)
            for fs in answered:
                if fs.recv_frame() == FAILURE:
                    failed += 1
        except (OSError, EOFError):
            errors += 1
        finally:
            for fs in conns:
                fs.close()
            counts[0], counts[1], counts[2], counts[3] = opened, failed, refused, errors
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
    parser.add_argument(
        "--spin", action="store_true",
        help="the flooder never reads: connect, send a wrong answer, close",
    )  # fmt: skip
    parser.add_argument(
        "--auth-failure-limit", type=int, default=None,
        help="the daemon's MANAGERD_AUTH_FAILURE_LIMIT (0: no penalty; default: the daemon's)",
    )  # fmt: skip
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
    # Loopback is exempt from the penalty by default; here 127.0.0.2 plays
    # another host, so only the well-behaved client's 127.0.0.1 is exempt.
    env_extra = {"MANAGERD_AUTH_PENALTY_EXEMPT": "127.0.0.1/32"}
    if args.auth_failure_limit is not None:
        env_extra["MANAGERD_AUTH_FAILURE_LIMIT"] = str(args.auth_failure_limit)
    print(
        f"flooder: {args.flood_sockets} connections at a time, "
        f"{'never reading' if args.spin else 'reading every answer'}; "
        f"daemon auth_failure_limit: {env_extra.get('MANAGERD_AUTH_FAILURE_LIMIT', 'default')}",
        flush=True,
    )
    daemon = Daemon(authkey, daemon_cpus, env_extra)
    if client_cpus:
        os.sched_setaffinity(0, client_cpus)
    alone_runs: list[dict[str, float]] = []
    flood_runs: list[dict[str, float]] = []
    rates: list[tuple[float, float, float]] = []
    totals = [0.0, 0.0, 0.0, 0.0]  # opened, failed, refused, seconds
    try:
        with connect(daemon.address, authkey=authkey) as m:
            timed_pings(m, 1000)  # warm up
            for round_no in range(1, args.rounds + 1):
                alone = summary(timed_pings(m, args.calls))

                started, stop = spawn.Event(), spawn.Event()
                counts = spawn.Array("q", 4)
                flooder = spawn.Process(
                    target=flood,
                    args=(
                        daemon.address, args.flood_sockets, args.spin, started, stop, counts,
                        flood_cpus,
                    ),
                    daemon=True,
                )  # fmt: skip
                flooder.start()
                if not started.wait(60):
                    raise SystemExit("the flood process did not get going")
                before, (failed_before, refused_before) = counts[:], daemon.counters()
                t0 = time.perf_counter()
                flooded = summary(timed_pings(m, args.calls))
                window_s = time.perf_counter() - t0
                after, (failed_after, refused_after) = counts[:], daemon.counters()
                stop.set()
                flooder.join(60)
                opened = (after[0] - before[0]) / window_s
                failed = (failed_after - failed_before) / window_s
                refused = (refused_after - refused_before) / window_s

                alone_runs.append(alone)
                flood_runs.append(flooded)
                rates.append((opened, failed, refused))
                totals[0] += after[0] - before[0]
                totals[1] += failed_after - failed_before
                totals[2] += refused_after - refused_before
                totals[3] += window_s
                print(f"round {round_no}:", flush=True)
                print("  " + show("alone", alone))
                print("  " + show("under flood", flooded))
                print(
                    f"  during the window, per second: {opened:,.0f} connections opened by the "
                    f"flooder, {failed:,.0f} failed authentications and {refused:,.0f} "
                    f"connections refused by the penalty (daemon's counters); "
                    f"flooder connection errors: {after[3]}"
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
        f"  per second: {statistics.median(r[0] for r in rates):,.0f} connections opened, "
        f"{statistics.median(r[1] for r in rates):,.0f} failed authentications, "
        f"{statistics.median(r[2] for r in rates):,.0f} refused by the penalty; "
        f"ratio p50 x{med(flood_runs, 'p50') / med(alone_runs, 'p50'):.2f}, "
        f"p99 x{med(flood_runs, 'p99') / med(alone_runs, 'p99'):.2f}"
    )
    print(
        f"  over all {totals[3]:.1f} s of flood: {totals[0]:,.0f} connections opened, "
        f"{totals[1]:,.0f} failed authentications, {totals[2]:,.0f} refused by the penalty"
    )
    print(f"  daemon log lines: {log_lines:,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
