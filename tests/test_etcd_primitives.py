"""The etcd Event, Semaphore, RLock, Value and dict against a real 3-node etcd cluster."""

from __future__ import annotations

import asyncio
import secrets

import pytest

from managerd.store.etcd.client import EtcdClient
from managerd.store.etcd.locks import EtcdLock, EtcdRLock
from managerd.store.etcd.sessions import EtcdSession
from managerd.store.etcd.sync import EtcdEvent, EtcdSemaphore
from managerd.store.etcd.values import EtcdDict, EtcdValue
from managerd_client.errors import LockLost

from etcd_support import EtcdCluster, cluster

__all__ = ["cluster"]  # the fixture, from etcd_support


@pytest.fixture
def name() -> str:
    return "p" + secrets.token_hex(4)


def test_event_wakes_waiters_on_another_client(cluster: EtcdCluster, name: str) -> None:
    async def body() -> None:
        async with EtcdClient(cluster.endpoints) as a, EtcdClient(cluster.endpoints) as b:
            ea, eb = EtcdEvent(a, name), EtcdEvent(b, name)
            assert not await ea.is_set()
            assert not await ea.wait(0)
            assert not await ea.wait(0.2)
            waiters = [asyncio.create_task(ea.wait()) for _ in range(3)]
            await asyncio.sleep(0.2)
            assert not any(w.done() for w in waiters)
            await eb.set()
            await eb.clear()  # cleared at once: the waiters were still woken by the set
            assert await asyncio.gather(*waiters) == [True, True, True]
            assert not await ea.is_set()
            await eb.set()
            assert await ea.wait(0)

    asyncio.run(body())


def test_semaphore_permits_fifo_and_session_end(cluster: EtcdCluster, name: str) -> None:
    async def body() -> None:
        async with EtcdClient(cluster.endpoints) as etcd:
            s1, s2, s3 = [await EtcdSession.open(etcd, 10) for _ in range(3)]
            sem = EtcdSemaphore(etcd, name)
            await sem.create(2)
            await sem.create(5)  # exists: unchanged
            t1 = await sem.acquire(s1)
            t2 = await sem.acquire(s1)
            assert t1 is not None and t2 is not None and t2 > t1
            assert await sem.value() == 0
            assert await sem.acquire(s2, blocking=False) is None
            assert await sem.acquire(s2, timeout_s=0.2) is None
            w2 = asyncio.create_task(sem.acquire(s2))
            await asyncio.sleep(0.1)
            w3 = asyncio.create_task(sem.acquire(s3))
            await asyncio.sleep(0.2)
            assert await sem.waiting() == 2
            await sem.release(s1)
            t3 = await w2  # the first waiter first
            assert t3 is not None and t3 > t2 and not w3.done()
            await s1.close()  # its other permit goes back with its lease
            assert await w3 is not None
            value, held = await sem.holdings()
            assert value == 0 and sorted(held) == sorted([(s2.sid, 1), (s3.sid, 1)])
            await sem.release(None, 3)  # anyone may release: two holdings, then one more
            assert await sem.value() == 3

    asyncio.run(body())


def test_bounded_semaphore_refuses_a_release_past_its_value(
    cluster: EtcdCluster, name: str
) -> None:
    async def body() -> None:
        async with EtcdClient(cluster.endpoints) as etcd:
            s = await EtcdSession.open(etcd, 10)
            sem = EtcdSemaphore(etcd, name, bounded=True)
            await sem.create(1)
            with pytest.raises(ValueError):
                await sem.release(s)
            assert await sem.acquire(s) is not None
            await sem.release(s)
            with pytest.raises(ValueError):
                await sem.release(s)
            assert await sem.value() == 1

    asyncio.run(body())


def test_rlock_reenters_and_others_wait(cluster: EtcdCluster, name: str) -> None:
    async def body() -> None:
        async with EtcdClient(cluster.endpoints) as etcd:
            s1, s2 = await EtcdSession.open(etcd, 10), await EtcdSession.open(etcd, 10)
            lock = EtcdRLock(etcd, name)
            t = await lock.acquire(s1, "t1")
            assert t is not None
            assert await lock.acquire(s1, "t1") == t
            assert await lock.depth(s1, "t1") == 2
            assert await lock.acquire(s1, "t2", blocking=False) is None  # another thread
            other = asyncio.create_task(lock.acquire(s2, "t1"))
            await lock.release(s1, t, "t1")
            await asyncio.sleep(0.2)
            assert not other.done()  # still held once
            await lock.release(s1, t, "t1")
            t2 = await other
            assert t2 is not None and t2 > t
            with pytest.raises(LockLost):
                await lock.release(s1, t, "t1")

    asyncio.run(body())


def test_lock_released_by_anyone(cluster: EtcdCluster, name: str) -> None:
    async def body() -> None:
        async with EtcdClient(cluster.endpoints) as etcd:
            s = await EtcdSession.open(etcd, 10)
            lock = EtcdLock(etcd, name)
            assert not await lock.release_holder()
            assert await lock.acquire(s) is not None
            assert await lock.release_holder()
            assert await lock.holder() is None

    asyncio.run(body())


def test_value_adds_from_many_clients_all_count(cluster: EtcdCluster, name: str) -> None:
    async def body() -> None:
        async with EtcdClient(cluster.endpoints) as a, EtcdClient(cluster.endpoints) as b:
            va, vb = EtcdValue(a, name), EtcdValue(b, name)
            await va.create(0)
            await vb.create(7)  # exists: unchanged
            assert await vb.get() == 0

            async def adds(v: EtcdValue) -> None:
                for _ in range(10):
                    await v.update(lambda old: old + 1)

            await asyncio.gather(adds(va), adds(vb), adds(va), adds(vb))
            assert await vb.get() == 40
            await va.set(2.5)
            assert await vb.get() == 2.5

    asyncio.run(body())


def test_dict_entries(cluster: EtcdCluster, name: str) -> None:
    async def body() -> None:
        async with EtcdClient(cluster.endpoints) as etcd:
            d = EtcdDict(etcd, name)
            assert await d.len() == 0
            await d.setitem("a", b"A")
            await d.setitem(1, b"one")
            await d.setitem(1.0, b"ONE")  # the same key as 1; the entry keeps 1
            await d.setitem((1, "x"), b"T")
            assert await d.len() == 3
            assert await d.getitem(True) == b"ONE"
            items = await d.items()
            assert dict(items) == {(1, "x"): b"T", 1: b"ONE", "a": b"A"}
            assert 1.0 not in [k for k, _ in items if isinstance(k, float)]
            with pytest.raises(KeyError):
                await d.getitem("missing")
            assert await d.get("missing", b"d") == b"d"
            assert await d.setdefault("a", b"other") == b"A"
            assert await d.setdefault("b", b"B") == b"B"
            assert await d.pop("b") == b"B"
            assert await d.pop("b", None) is None
            await d.setitem("a", b"A2")  # a change, not a new entry: popitem takes the newest
            await d.setitem("n", b"N")
            assert await d.popitem() == ("n", b"N")
            await d.update([("x", b"X"), ("y", b"Y")])
            assert await d.contains("x")
            await d.delitem("x")
            with pytest.raises(KeyError):
                await d.delitem("x")
            # Any hashable key, as a dict: a frozenset is one entry; each NaN is its own.
            await d.setitem(frozenset({1}), b"F")
            await d.setitem(frozenset({1}), b"F2")
            assert await d.getitem(frozenset({1})) == b"F2"
            before = await d.len()
            await d.setitem(float("nan"), b"N1")
            await d.setitem(float("nan"), b"N2")
            assert await d.len() == before + 2
            with pytest.raises(KeyError):
                await d.getitem(float("nan"))
            await d.clear()
            assert await d.len() == 0

    asyncio.run(body())
