"""Figures for the etcd store's parts on a real 3-node etcd cluster (loopback, this machine).

Starts a cluster with ``tests/etcd_support.py`` and prints, for 1 and more
operations in flight (asyncio tasks on one client):

- raw etcd puts/s (``EtcdClient.put``): the floor of this store;
- queue puts/s (one guarded Txn each), queue put+get pairs/s, reserve+ack pairs/s;
- lock acquire+release pairs/s (one session, uncontended);
- failover: the longest time without an acknowledged queue put after a
  kill -9 of the leader, with 8 producers, over ``--trials`` kills (the
  member is restarted between trials).

``--group-commit off`` sends every Txn on its own (``groupcommit.py``), for
the figures before/after group commit in one sitting.

A number to read, not a test (2 shared cores: relative figures)::

    uv run python benchmarks/etcd_store.py --seconds 3 --trials 5
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from managerd.store.etcd.client import EtcdClient  # noqa: E402
from managerd.store.etcd.locks import EtcdLock  # noqa: E402
from managerd.store.etcd.queues import EtcdQueue  # noqa: E402
from managerd.store.etcd.sessions import EtcdSession  # noqa: E402

from etcd_support import EtcdCluster, running_cluster  # noqa: E402


async def rate(op: Callable[[int], Awaitable[None]], in_flight: int, seconds: float) -> float:
    """Operations per second with ``in_flight`` tasks, task ``w`` calling ``op(w)`` in a loop."""
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await op(w)
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(in_flight)))
    return done / (time.perf_counter() - start)


def operations(
    etcd: EtcdClient, session: EtcdSession, tag: str
) -> list[tuple[str, Callable[[int], Awaitable[None]]]]:
    """Each figure's operation; ``w`` is the calling task (its own key, lock owner)."""
    item = b"x" * 100
    q = EtcdQueue(etcd, f"bench-put-{tag}")
    pairs = EtcdQueue(etcd, f"bench-pair-{tag}")
    reserving = EtcdQueue(etcd, f"bench-reserve-{tag}")

    async def raw_put(w: int) -> None:
        await etcd.put(b"/bench/raw/%d" % w, item)

    async def queue_put(w: int) -> None:
        await q.put(item)

    async def put_get(w: int) -> None:
        await pairs.put(item)
        await pairs.get()

    async def reserve_ack(w: int) -> None:
        await reserving.put(item)
        await reserving.ack(await reserving.reserve(session, 30.0))

    async def lock_pair(w: int) -> None:
        lock = EtcdLock(etcd, f"bench-{tag}-{w}")  # one lock per task: uncontended
        token = await lock.acquire(session, owner=str(w))
        assert token is not None
        await lock.release(session, token, owner=str(w))

    return [
        ("raw etcd puts/s", raw_put),
        ("queue puts/s", queue_put),
        ("queue put+get pairs/s", put_get),
        ("queue put+reserve+ack/s", reserve_ack),
        ("lock acquire+release pairs/s", lock_pair),
    ]


async def throughput(
    cluster: EtcdCluster, seconds: float, in_flights: list[int], group_commit: bool
) -> None:
    async with EtcdClient(cluster.endpoints, group_commit=group_commit) as etcd:
        session = await EtcdSession.open(etcd, 10)
        for n in in_flights:
            for label, op in operations(etcd, session, str(n)):
                per_s = await rate(op, n, seconds)
                print(f"{label:30} {n:4} in flight: {per_s:9,.0f}", flush=True)
        await session.close()


async def failover_stall(cluster: EtcdCluster) -> float:
    """Seconds without an acknowledged put after kill -9 of the leader (8 producers)."""
    loop = asyncio.get_running_loop()
    acked_at: list[float] = []
    stop = asyncio.Event()
    async with EtcdClient(cluster.endpoints) as etcd:
        q = EtcdQueue(etcd, "bench-failover")

        async def produce() -> None:
            while not stop.is_set():
                await q.put(b"x" * 100)
                acked_at.append(loop.time())

        tasks = [asyncio.create_task(produce()) for _ in range(8)]
        await asyncio.sleep(1.0)
        leader = await asyncio.to_thread(cluster.leader)
        killed_at = loop.time()
        await asyncio.to_thread(cluster.kill, leader)
        while not [t for t in acked_at if t > killed_at + 1.0]:
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*tasks)
    after = [killed_at] + [t for t in acked_at if t > killed_at]
    await asyncio.to_thread(cluster.restart, leader)
    return max(b - a for a, b in itertools.pairwise(after))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per figure")
    parser.add_argument("--in-flight", default="1,16,128", help="comma-separated")
    parser.add_argument("--trials", type=int, default=5, help="leader kills")
    parser.add_argument("--group-commit", choices=("on", "off"), default="on")
    args = parser.parse_args()
    in_flights = [int(n) for n in args.in_flight.split(",")]
    with tempfile.TemporaryDirectory() as tmp, running_cluster(Path(tmp)) as cluster:
        asyncio.run(throughput(cluster, args.seconds, in_flights, args.group_commit == "on"))
        stalls = [asyncio.run(failover_stall(cluster)) for _ in range(args.trials)]
    if stalls:
        print(
            f"failover after kill -9 of the leader (8 producers, {len(stalls)} trials): "
            f"writes stalled p50 {statistics.median(stalls):.2f} s, max {max(stalls):.2f} s "
            f"({', '.join(f'{s:.2f}' for s in stalls)})"
        )


if __name__ == "__main__":
    main()
