"""Failover times of gateways on a real 3-node etcd cluster, as a client sees them.

Starts a cluster with ``tests/etcd_support.py`` and two real gateways
(``managerd serve --store etcd://...``), then, ``--trials`` times each:

- **etcd leader kill**: a client puts 100-byte items in a loop through
  gateway 1; the leader member is killed (SIGKILL); the figure is the
  longest time without an acknowledged put from the kill on (the member is
  restarted between trials).
- **gateway kill**: a client connected with ``"g1,g2"`` (on g1) puts in a
  loop; g1 is killed (SIGKILL); the figure is the time from the kill until
  the client completes a call through g2 (the call in flight fails with
  ``ConnectionLost``, the next one reconnects). g1 is restarted on its
  port between trials.

Prints p50 and max of each; ``--json PATH`` also writes every trial (the
CI smoke test reads it). A number to read, not a test::

    uv run python benchmarks/etcd_failover.py --trials 10
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from managerd_client import Manager, connect  # noqa: E402

from conftest import Daemon  # noqa: E402
from etcd_support import EtcdCluster, running_cluster  # noqa: E402

ITEM = b"x" * 100
WARM_S = 0.5
#: After a leader kill, how long writes must flow again before the trial ends.
SETTLE_S = 1.0
TRIAL_TIMEOUT_S = 60.0


class Producer:
    """A thread putting items in a loop through ``m``; when each put was acknowledged,
    and through which address."""

    def __init__(self, m: Manager, queue: str) -> None:
        self.m = m
        self.queue = m.Queue(queue)
        self.acks: list[tuple[float, tuple[str, int]]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.queue.put(ITEM)
            except Exception as exc:  # the call in flight on a dead gateway; counted
                self.errors.append(type(exc).__name__)
                continue
            self.acks.append((time.monotonic(), self.m.address))

    def __enter__(self) -> Producer:
        self._thread.start()
        if not wait_for(lambda: len(self.acks) > 0):
            raise RuntimeError(f"no put acknowledged: {self.errors}")
        time.sleep(WARM_S)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(TRIAL_TIMEOUT_S)

    def after(self, t: float) -> list[tuple[float, tuple[str, int]]]:
        return [a for a in list(self.acks) if a[0] > t]


def wait_for(predicate: Callable[[], bool], timeout_s: float = TRIAL_TIMEOUT_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


def leader_kill(cluster: EtcdCluster, gateway: Daemon, trial: int) -> float:
    """Seconds without an acknowledged put through ``gateway`` after the leader's kill."""
    with gateway.connect() as m, Producer(m, f"failover-leader-{trial}") as producer:
        leader = cluster.leader()
        killed = time.monotonic()
        cluster.kill(leader)
        if not wait_for(lambda: any(t > killed + SETTLE_S for t, _ in producer.after(killed))):
            raise RuntimeError(f"writes did not resume: {producer.errors[-3:]}")
        time.sleep(SETTLE_S)
        times = [killed] + [t for t, _ in producer.after(killed)]
    cluster.restart(leader)
    return max(b - a for a, b in itertools.pairwise(times))


def gateway_kill(victim: Daemon, other: Daemon, trial: int) -> float:
    """Seconds from ``victim``'s kill until a client of both completes a call through ``other``."""
    m = connect(f"{victim.address},{other.address}", authkey=victim.authkey)
    try:
        with Producer(m, f"failover-gateway-{trial}") as producer:
            assert m.address == (victim.host, victim.port), m.address
            killed = time.monotonic()
            victim.kill()
            there = (other.host, other.port)
            if not wait_for(lambda: any(a == there for _, a in producer.after(killed))):
                raise RuntimeError(f"no call went through the other gateway: {producer.errors}")
            elapsed = min(t for t, a in producer.after(killed) if a == there) - killed
    finally:
        m.close()
    victim.start(port=victim.port)
    return elapsed


def summary(what: str, seconds: list[float]) -> str:
    return (
        f"{what} ({len(seconds)} trials): p50 {statistics.median(seconds):.3f} s, "
        f"max {max(seconds):.3f} s ({', '.join(f'{s:.3f}' for s in seconds)})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=10, help="kills of each kind")
    parser.add_argument("--json", type=Path, help="also write every trial here")
    args = parser.parse_args()
    results: dict[str, list[float]] = {"etcd_leader_kill_s": [], "gateway_kill_s": []}
    with tempfile.TemporaryDirectory() as tmp, running_cluster(Path(tmp)) as cluster:
        store = ["--store", "etcd://" + ",".join(cluster.endpoints)]
        g1 = Daemon(Path(tmp), args=store)
        g2 = Daemon(Path(tmp), args=store)
        g2.authkey = g1.authkey
        started: list[Daemon] = []
        try:
            started += [g1.start(), g2.start()]
            for trial in range(args.trials):
                results["etcd_leader_kill_s"].append(leader_kill(cluster, g1, trial))
            print(
                summary(
                    "etcd leader kill: longest time without an acked put",
                    results["etcd_leader_kill_s"],
                ),
                flush=True,
            )
            for trial in range(args.trials):
                results["gateway_kill_s"].append(gateway_kill(g1, g2, trial))
            print(
                summary(
                    "gateway kill: until the next call completes through the other",
                    results["gateway_kill_s"],
                ),
                flush=True,
            )
        finally:
            for d in started:
                d.stop()
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
