"""What the etcd store's cluster-wide stats cost: one refresh with N objects.

Starts a real 3-node etcd cluster (``tests/etcd_support.py``), makes N
objects through one ``EtcdStore`` (a mix: queues with an item, locks held,
dicts with an entry, events, Values), then times ``refresh_stats`` (every
object's figures read at one revision, ``store/etcd/stats.py``) and the
``stats()`` a status request or a scrape then makes. The refresh interval
follows (``max(1 s, 4 x refresh)``), and so the staleness bound.

``--contended-s S``: the deadlock detector's cost across gateways: 4 sessions
(one client thread each) contend for one Lock for S seconds, acquire and
release pairs/s with ``deadlock`` report, then off (every wait on the lock
puts a waiter key and reads the graph; an acquire that does not wait costs
nothing more).

A number to read, not a test (2 shared cores: relative figures)::

    uv run python benchmarks/etcd_stats.py --objects 10000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from managerd.store.api import Call  # noqa: E402
from managerd.store.etcd.client import EtcdClient  # noqa: E402
from managerd.store.etcd.handles import EtcdHandle  # noqa: E402
from managerd.store.etcd.stats import STATS_INTERVAL_S  # noqa: E402
from managerd.store.etcd.store import EtcdStore  # noqa: E402
from managerd.store.memory.deadlock import DeadlockMode  # noqa: E402
from managerd.store.sessions import Session, SessionKind  # noqa: E402

from etcd_support import running_cluster  # noqa: E402

MIX = (("Queue", "put_nowait", (b"x",)), ("Lock", "acquire", ()), ("dict", "__setitem__",
       ("k", b"v")), ("Event", "set", ()), ("Value", "get", ()))  # fmt: skip


async def measure(endpoints: list[str], n: int, rounds: int) -> dict[str, Any]:
    store = await EtcdStore.open(EtcdClient(endpoints), root=b"/bench-stats/")
    loop = asyncio.get_running_loop()
    session = Session(SessionKind.MANAGERD, "bench", {"host": "bench", "pid": 0})
    limit = asyncio.Semaphore(128)

    async def make(i: int) -> None:
        typeid, method, args = MIX[i % len(MIX)]
        async with limit:
            handle = store.get_or_create(typeid, f"{typeid.lower()}-{i}", {})
            await asyncio.shield(handle.methods[method].fn(handle, Call(session, i, loop), *args))

    made_s = time.perf_counter()
    await asyncio.gather(*(make(i) for i in range(n)))
    made_s = time.perf_counter() - made_s
    refresh_s = []
    for _ in range(rounds):
        start = time.perf_counter()
        await store.refresh_stats()
        refresh_s.append(time.perf_counter() - start)
    start = time.perf_counter()
    stats = store.stats()
    stats_s = time.perf_counter() - start
    assert len(stats.objects) == n, len(stats.objects)
    assert all(isinstance(h, EtcdHandle) for h in store._handles.values())
    store.release(session)
    await store.close()
    await store.client.close()
    median = statistics.median(refresh_s)
    return {
        "objects": n,
        "made_s": round(made_s, 1),
        "refresh_s_median": round(median, 3),
        "refresh_s_max": round(max(refresh_s), 3),
        "stats_call_ms": round(stats_s * 1000, 1),
        "interval_s": round(max(STATS_INTERVAL_S, 4 * median), 2),
        "staleness_bound_s": round(max(STATS_INTERVAL_S, 4 * median) + max(refresh_s), 2),
    }


async def contended(endpoints: list[str], seconds: float, mode: DeadlockMode) -> float:
    root = b"/bench-dl-" + mode.value.encode() + b"/"
    store = await EtcdStore.open(EtcdClient(endpoints), root=root, deadlock=mode)
    loop = asyncio.get_running_loop()
    sessions = [Session(SessionKind.MANAGERD, f"c{i}", {"host": "b", "pid": i}) for i in range(4)]
    lock = store.get_or_create("Lock", "l", {})
    acquire, release = lock.methods["acquire"].fn, lock.methods["release"].fn
    pairs = 0
    deadline = loop.time() + seconds

    async def worker(session: Session) -> None:
        nonlocal pairs
        call = Call(session, 1, loop)
        while loop.time() < deadline:
            await acquire(lock, call)
            await release(lock, call)
            pairs += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker(s) for s in sessions))
    rate = pairs / (time.perf_counter() - start)
    for session in sessions:
        store.release(session)
    await store.close()
    await store.client.close()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--contended-s", type=float, default=0.0)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, running_cluster(Path(tmp)) as cluster:
        if options.contended_s:
            for mode in (DeadlockMode.REPORT, DeadlockMode.OFF, DeadlockMode.REPORT):
                rate = asyncio.run(contended(cluster.endpoints, options.contended_s, mode))
                print({"deadlock": mode.value, "contended_lock_pairs_per_s": round(rate, 1)})
            return
        print(asyncio.run(measure(cluster.endpoints, options.objects, options.rounds)))


if __name__ == "__main__":
    main()
