"""Figures for ``managerd serve --store etcd://...``: gateways on a real 3-node etcd cluster.

Starts a cluster with ``tests/etcd_support.py``, then real ``managerd``
processes (``tests/conftest.py``'s ``Daemon``): an embedded daemon (the
memory store) for comparison, and 1 or 2 gateways on the cluster. Clients
are threads of this process, one connection each (spread over the
gateways), each doing put+get pairs on its own queue, or acquire+release
pairs on its own lock, for ``--seconds``. Prints operations/s.

A number to read, not a test (2 shared cores: relative figures)::

    uv run python benchmarks/etcd_gateways.py --seconds 3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from managerd_client import Manager  # noqa: E402

from conftest import Daemon  # noqa: E402
from etcd_support import running_cluster  # noqa: E402


def pairs_per_s(
    daemons: list[Daemon], clients: int, seconds: float, pair: Callable[[Manager, int], None]
) -> float:
    """All ``clients`` threads doing ``pair`` for ``seconds``: pairs per second."""
    counts = [0] * clients
    start = threading.Barrier(clients + 1)
    stop = threading.Event()

    def client(i: int) -> None:
        with daemons[i % len(daemons)].connect() as m:
            pair(m, i)  # warm: the objects exist
            start.wait()
            while not stop.is_set():
                pair(m, i)
                counts[i] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    began = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - began)


def queue_pair(m: Manager, i: int) -> None:
    q = m.Queue(f"bench-q{i}")
    q.put(i)
    q.get()


def lock_pair(m: Manager, i: int) -> None:
    lock = m.Lock(f"bench-l{i}")
    lock.acquire()
    lock.release()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per figure")
    parser.add_argument("--clients", default="1,16", help="comma-separated")
    args = parser.parse_args()
    counts = [int(n) for n in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp, running_cluster(Path(tmp)) as cluster:
        store = ["--store", "etcd://" + ",".join(cluster.endpoints)]
        memory = Daemon(Path(tmp))
        gateways = [Daemon(Path(tmp), args=store) for i in range(2)]
        gateways[1].authkey = gateways[0].authkey
        setups = {
            "embedded daemon (memory)": [memory],
            "1 etcd gateway": gateways[:1],
            "2 etcd gateways": gateways,
        }
        started: list[Daemon] = []
        try:
            for d in (memory, *gateways):
                started.append(d.start())
            print(f"| pairs/s | {' | '.join(f'{n} client(s)' for n in counts)} |")
            print(f"| --- |{' ---: |' * len(counts)}")
            for what, pair in (("queue put+get", queue_pair), ("lock acquire+release", lock_pair)):
                for label, daemons in setups.items():
                    rates = [pairs_per_s(daemons, n, args.seconds, pair) for n in counts]
                    print(f"| {what}, {label} | {' | '.join(f'{r:,.0f}' for r in rates)} |")
        finally:
            for d in started:
                d.stop()


if __name__ == "__main__":
    main()
