"""Group commit (``managerd/store/etcd/groupcommit.py``) against a real 3-node etcd cluster.

Concurrent Txns of one client share one Txn to etcd, yet each keeps the
outcome it would have had alone: its own compares, its own branch; calls
that touch each other's keys never share one; etcd's operation and size
limits are kept.
"""

from __future__ import annotations

import asyncio
import secrets

import pytest

from managerd.store.etcd.client import EtcdClient
from managerd.store.etcd.groupcommit import Footprint, _Spans, footprint
from managerd.store.etcd.kv import (
    Compare,
    Delete,
    Get,
    Put,
    RangeResult,
    RequestTooLarge,
    Target,
    prefix_end,
)
from managerd.store.etcd.locks import EtcdLock
from managerd.store.etcd.queues import EtcdQueue
from managerd.store.etcd.sessions import EtcdSession

from etcd_support import EtcdCluster, cluster

__all__ = ["cluster"]  # the fixture, from etcd_support


@pytest.fixture
def prefix() -> bytes:
    return b"/test/" + secrets.token_hex(4).encode() + b"/"


def recording(etcd: EtcdClient) -> list[int]:
    """The size of every batch ``etcd`` sends from now on."""
    sizes: list[int] = []
    assert etcd.group is not None
    etcd.group.on_batch = sizes.append
    return sizes


def test_spans_overlap() -> None:
    spans = _Spans()
    spans.add([(b"/a/1", b""), (b"/b/", prefix_end(b"/b/"))])
    assert spans.touches([(b"/a/1", b"")])
    assert not spans.touches([(b"/a/2", b"")])
    assert spans.touches([(b"/b/x", b"")])  # inside the range
    assert spans.touches([(b"/a/", prefix_end(b"/a/"))])  # a range over the point
    assert spans.touches([(b"/", b"\0")])  # to the end of the keyspace
    assert not spans.touches([(b"/c/", prefix_end(b"/c/"))])
    assert spans.touches([(b"/a0", b"/b0")])  # overlaps the range's start
    fp = footprint(
        [Compare(b"k", Target.CREATE, "==", 0)], [Put(b"p", b""), Delete(b"d", b"e")], [Get(b"g")]
    )
    assert fp == Footprint(((b"k", b""), (b"g", b"")), ((b"p", b""), (b"d", b"e")))


def test_each_call_keeps_its_own_outcome(cluster: EtcdCluster, prefix: bytes) -> None:
    """Puts if absent, half on keys that exist: one shared Txn, each its own branch."""

    async def body() -> None:
        async with EtcdClient(cluster.endpoints) as etcd:
            for i in range(0, 60, 2):
                await etcd.put(prefix + b"%02d" % i, b"old")
            sizes = recording(etcd)

            async def put_if_absent(i: int) -> tuple[bool, bytes]:
                key = prefix + b"%02d" % i
                done = await etcd.txn(
                    [Compare(key, Target.CREATE, "==", 0)], [Put(key, b"new")], [Get(key)]
                )
                if done.succeeded:
                    return True, b""
                [read] = done.responses
                assert isinstance(read, RangeResult)
                return False, read.kvs[0].value

            outcomes = await asyncio.gather(*(put_if_absent(i) for i in range(60)))
            assert max(sizes) > 1  # they did share
            assert outcomes == [(False, b"old") if i % 2 == 0 else (True, b"") for i in range(60)]
            read = await etcd.range(prefix, prefix_end(prefix))
            assert [kv.value for kv in read.kvs] == [
                b"old" if i % 2 == 0 else b"new" for i in range(60)
            ]
            # Each write's revision is the shared Txn's: a compare on it holds.
            written = [kv for kv in read.kvs if kv.value == b"new"]
            assert len({kv.mod_revision for kv in written}) < len(written)

    asyncio.run(body())


def test_calls_on_each_others_keys_never_share(cluster: EtcdCluster, prefix: bytes) -> None:
    """A reads x and writes y, B reads y and writes x: one after the other, exactly one
    succeeds; evaluated together (both on the state before), both would."""

    async def body() -> None:
        async with EtcdClient(cluster.endpoints) as etcd:
            sizes = recording(etcd)
            for round_ in range(10):
                x, y = prefix + b"x%d" % round_, prefix + b"y%d" % round_
                a = etcd.txn([Compare(x, Target.CREATE, "==", 0)], [Put(y, b"a")])
                b = etcd.txn([Compare(y, Target.CREATE, "==", 0)], [Put(x, b"b")])
                done = await asyncio.gather(a, b)
                assert sorted(d.succeeded for d in done) == [False, True]
            assert sizes and max(sizes) == 1

    asyncio.run(body())


def test_batches_keep_etcds_operation_limit(cluster: EtcdCluster, prefix: bytes) -> None:
    """Txns of 60 operations each: at most 68 per shared Txn (etcd counts the nested
    Txns plus the widest one against --max-txn-ops, 128)."""

    async def body() -> None:
        async with EtcdClient(cluster.endpoints) as etcd:
            sizes = recording(etcd)

            async def wide(i: int) -> bool:
                keys = [prefix + b"%03d/%02d" % (i, j) for j in range(60)]
                done = await etcd.txn(
                    [Compare(k, Target.CREATE, "==", 0) for k in keys],
                    [Put(k, b"") for k in keys],
                )
                return done.succeeded

            assert all(await asyncio.gather(*(wide(i) for i in range(150))))
            assert max(sizes) == 68
            assert sum(sizes) == 150
            read = await etcd.range(prefix, prefix_end(prefix), count_only=True)
            assert read.count == 150 * 60

    asyncio.run(body())


def test_a_call_too_large_fails_alone(cluster: EtcdCluster, prefix: bytes) -> None:
    async def body() -> None:
        async with EtcdClient(cluster.endpoints) as etcd:
            big = b"x" * (2 * 1024 * 1024)

            async def put(i: int, value: bytes) -> None:
                key = prefix + b"%d" % i
                await etcd.txn([Compare(key, Target.CREATE, "==", 0)], [Put(key, value)])

            done = await asyncio.gather(
                *(put(i, big if i == 3 else b"v") for i in range(8)), return_exceptions=True
            )
            assert isinstance(done[3], RequestTooLarge)
            assert [d for i, d in enumerate(done) if i != 3] == [None] * 7
            read = await etcd.range(prefix, prefix_end(prefix), keys_only=True)
            assert len(read.kvs) == 7

    asyncio.run(body())


def test_concurrent_queue_calls_share_txns(cluster: EtcdCluster, prefix: bytes) -> None:
    """Many producers and consumers on one client: every item exactly once, in fewer
    requests than calls."""

    async def body() -> None:
        async with EtcdClient(cluster.endpoints) as etcd:
            sizes = recording(etcd)
            q = EtcdQueue(etcd, "gc" + secrets.token_hex(4))

            async def produce(p: int) -> None:
                for i in range(20):
                    await q.put(b"%d.%d" % (p, i))

            async def consume() -> list[bytes]:
                return [await q.get(timeout_s=30) for _ in range(20)]

            consumers = [asyncio.create_task(consume()) for _ in range(16)]
            await asyncio.gather(*(produce(p) for p in range(16)))
            items = [item for got in await asyncio.gather(*consumers) for item in got]
            assert sorted(items) == sorted(b"%d.%d" % (p, i) for p in range(16) for i in range(20))
            assert max(sizes) > 1 and len(sizes) < sum(sizes)
            assert await q.qsize() == 0

    asyncio.run(body())


def test_without_group_commit(cluster: EtcdCluster, prefix: bytes) -> None:
    async def body() -> None:
        async with EtcdClient(cluster.endpoints, group_commit=False) as etcd:
            assert etcd.group is None
            keys = [prefix + b"%d" % i for i in range(10)]
            done = await asyncio.gather(
                *(etcd.txn([Compare(k, Target.CREATE, "==", 0)], [Put(k, b"")]) for k in keys)
            )
            assert all(d.succeeded for d in done)
            assert len({d.revision for d in done}) == 10  # one revision each

    asyncio.run(body())


def test_calls_on_the_same_keys_keep_their_order(cluster: EtcdCluster, prefix: bytes) -> None:
    """A read of a range, then a put into it, made together: the read never sees the put
    (the put waits for the read's answer instead of leaving beside it)."""

    async def body() -> None:
        async with EtcdClient(cluster.endpoints) as etcd:
            for i in range(30):
                under = prefix + b"%d/" % i
                read = asyncio.ensure_future(etcd.range(under, prefix_end(under)))
                put = asyncio.ensure_future(
                    etcd.txn(
                        [Compare(under + b"k", Target.CREATE, "==", 0)], [Put(under + b"k", b"")]
                    )
                )
                got, done = await asyncio.gather(read, put)
                assert done.succeeded
                assert got.kvs == [] and got.revision < done.revision

    asyncio.run(body())


def test_lock_contenders_on_one_client_never_share_a_token(cluster: EtcdCluster) -> None:
    """Two sessions of one client try one lock at once: their contender keys are
    different keys, yet each needs a revision of its own (the fencing token; the
    lowest holds), so they never share a Txn: exactly one holds."""

    async def body() -> None:
        async with EtcdClient(cluster.endpoints) as etcd:
            sessions = [await EtcdSession.open(etcd, 10) for _ in range(2)]
            lock = EtcdLock(etcd, "gc-lock-" + secrets.token_hex(4))
            for _ in range(10):
                tokens = await asyncio.gather(*(lock.acquire(s, blocking=False) for s in sessions))
                held = [(s, t) for s, t in zip(sessions, tokens, strict=True) if t is not None]
                assert len(held) == 1, tokens
                await lock.release(*held[0])
            for s in sessions:
                await s.close()

    asyncio.run(body())
