"""Figures for ``managerd serve --store etcd://...``: gateways on a real 3-node etcd cluster.

Starts a cluster with ``tests/etcd_support.py``, then real ``managerd``
processes (``tests/conftest.py``'s ``Daemon``): an embedded daemon (the
memory store) for comparison, and up to ``max(--gateways)`` gateways on the
cluster. Clients are threads of this process, one connection each (spread
over the gateways in use), each on objects of its own, for ``--seconds``:

- queue put+get pairs/s;
- put_many/get_many messages/s (``--batch`` items each way per round);
- lock acquire+release pairs/s.

First, the floor of this store: raw etcd writes from this machine
(``EtcdClient.put`` of 100 bytes, and Txns of ``--batch`` such puts), as
many in flight as there are clients. ``--json PATH`` also writes
every figure (the CI smoke test reads it).

A number to read, not a test (2 shared cores: relative figures)::

    uv run python benchmarks/etcd_gateways.py --seconds 3 --gateways 1,2,4
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from managerd.store.etcd.client import EtcdClient  # noqa: E402
from managerd.store.etcd.kv import Put  # noqa: E402
from managerd_client import Manager  # noqa: E402

from conftest import Daemon  # noqa: E402
from etcd_support import EtcdCluster, running_cluster  # noqa: E402

ITEM = b"x" * 100

#: A round of work of client ``i`` on a manager: how many messages or pairs it did.
Round = Callable[[Manager, int], int]


def per_s(daemons: list[Daemon], clients: int, seconds: float, work: Round) -> float:
    """All ``clients`` threads doing ``work`` for ``seconds``: its units per second."""
    counts = [0] * clients
    errors: list[BaseException] = []
    start = threading.Barrier(clients + 1)
    stop = threading.Event()

    def client(i: int) -> None:
        try:
            with daemons[i % len(daemons)].connect() as m:
                work(m, i)  # warm: the objects exist, the session has its lease
                start.wait()
                while not stop.is_set():
                    counts[i] += work(m, i)
        except BaseException as exc:
            errors.append(exc)
            start.abort()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    try:
        start.wait()
    except threading.BrokenBarrierError:
        pass
    began = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"a client failed: {errors[0]!r}") from errors[0]
    return sum(counts) / (time.perf_counter() - began)


def queue_pair(m: Manager, i: int) -> int:
    q = m.Queue(f"bench-q{i}")
    q.put(ITEM)
    q.get()
    return 1


def batch_round(batch: int) -> Round:
    items = [ITEM] * batch

    def round_(m: Manager, i: int) -> int:
        q = m.Queue(f"bench-b{i}")
        q.put_many(items)
        got = q.get_many(batch)
        assert len(got) == batch, len(got)
        return batch

    return round_


def lock_pair(m: Manager, i: int) -> int:
    lock = m.Lock(f"bench-l{i}")
    lock.acquire()
    lock.release()
    return 1


async def _rate(
    etcd: EtcdClient, in_flight: int, seconds: float, op: Callable[[int], Awaitable[int]]
) -> float:
    """Units/s of ``op(w)`` looped by ``in_flight`` tasks for ``seconds``."""
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            n = await op(w)  # not `done += await ...`: that reads done before awaiting
            done += n

    began = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(in_flight)))
    return done / (time.perf_counter() - began)


async def _floors(
    cluster: EtcdCluster, counts: list[int], seconds: float, batch: int
) -> tuple[list[float], list[float]]:
    async with EtcdClient(cluster.endpoints) as etcd:

        async def put(w: int) -> int:
            await etcd.put(b"/bench/raw/%d" % w, ITEM)
            return 1

        async def txn(w: int) -> int:
            await etcd.txn([], [Put(b"/bench/rawtxn/%d/%d" % (w, k), ITEM) for k in range(batch)])
            return batch

        await put(0)  # warm: the channel is connected
        puts = [await _rate(etcd, n, seconds, put) for n in counts]
        txns = [await _rate(etcd, n, seconds, txn) for n in counts]
        return puts, txns


def raw_floors(
    cluster: EtcdCluster, counts: list[int], seconds: float, batch: int
) -> tuple[list[float], list[float]]:
    """Raw etcd puts/s, and keys/s in Txns of ``batch`` puts, from this machine, for each
    count in flight: the floor."""
    return asyncio.run(_floors(cluster, counts, seconds, batch))


@contextlib.contextmanager
def embedded_and_gateways(
    tmp: Path, cluster: EtcdCluster, count: int
) -> Iterator[tuple[Daemon, list[Daemon]]]:
    """An embedded daemon and ``count`` gateways on ``cluster``, one authkey for all,
    started; stopped afterwards."""
    store = ["--store", "etcd://" + ",".join(cluster.endpoints)]
    memory = Daemon(tmp)
    gateways = [Daemon(tmp, args=store) for _ in range(count)]
    for g in gateways:
        g.authkey = memory.authkey
    started: list[Daemon] = []
    try:
        for d in (memory, *gateways):
            started.append(d.start())
        yield memory, gateways
    finally:
        for d in started:
            d.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per figure")
    parser.add_argument("--clients", default="1,16", help="comma-separated")
    parser.add_argument("--gateways", default="1,2,4", help="comma-separated gateway counts")
    parser.add_argument("--batch", type=int, default=64, help="items per put_many/get_many")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    counts = [int(n) for n in args.clients.split(",")]
    gateway_counts = [int(n) for n in args.gateways.split(",")]
    workloads: list[tuple[str, Round]] = [
        ("queue put+get pairs/s", queue_pair),
        (f"put_many/get_many msgs/s ({args.batch} per call)", batch_round(args.batch)),
        ("lock acquire+release pairs/s", lock_pair),
    ]
    figures: dict[str, dict[str, float]] = {}

    def row(workload: str, setup: str, rates: list[float]) -> None:
        figures.setdefault(workload, {}).update(
            {f"{setup}, {n} client(s)": r for n, r in zip(counts, rates, strict=True)}
        )
        print(f"| {workload}: {setup} | {' | '.join(f'{r:,.0f}' for r in rates)} |", flush=True)

    with (
        tempfile.TemporaryDirectory() as tmp,
        running_cluster(Path(tmp)) as cluster,
        embedded_and_gateways(Path(tmp), cluster, max(gateway_counts)) as (memory, gateways),
    ):
        print(f"| per second | {' | '.join(f'{n} client(s)' for n in counts)} |")
        print(f"| --- |{' ---: |' * len(counts)}")
        floor = "raw etcd from this machine (the floor)"
        puts, txns = raw_floors(cluster, counts, args.seconds, args.batch)
        row("puts/s", floor, puts)
        row(f"keys/s in Txns of {args.batch} puts", floor, txns)
        for workload, work in workloads:
            rates = [per_s([memory], n, args.seconds, work) for n in counts]
            row(workload, "embedded daemon", rates)
            for used in gateway_counts:
                rates = [per_s(gateways[:used], n, args.seconds, work) for n in counts]
                row(workload, f"{used} gateway(s)", rates)
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
