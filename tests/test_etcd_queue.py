"""The etcd queue against a real 3-node etcd cluster: FIFO, blocking, idempotent put, reserve."""

from __future__ import annotations

import asyncio
import queue
import secrets
import time

import pytest

from managerd.store.etcd.client import EtcdClient
from managerd.store.etcd.places import Look
from managerd.store.etcd.queues import Delivery, EtcdQueue
from managerd.store.etcd.sessions import EtcdSession

from etcd_support import EtcdCluster, cluster

__all__ = ["cluster"]  # the fixture, from etcd_support


@pytest.fixture
def name() -> str:
    return "q" + secrets.token_hex(4)


def test_fifo_and_empty(cluster: EtcdCluster, name: str) -> None:
    async def body() -> None:
        async with EtcdClient(cluster.endpoints) as etcd:
            q = EtcdQueue(etcd, name)
            with pytest.raises(queue.Empty):
                await q.get_nowait()
            for i in range(20):
                await q.put(b"%d" % i)
            assert await q.qsize() == 20
            assert [await q.get_nowait() for _ in range(20)] == [b"%d" % i for i in range(20)]
            with pytest.raises(queue.Empty):
                await q.get(timeout_s=0.2)

    asyncio.run(body())


def test_a_blocked_get_wakes_on_a_put_through_another_client(
    cluster: EtcdCluster, name: str
) -> None:
    async def body() -> None:
        async with EtcdClient(cluster.endpoints) as a, EtcdClient(cluster.endpoints) as b:
            getter = asyncio.create_task(EtcdQueue(a, name).get())
            blocked = asyncio.create_task(EtcdQueue(a, name).get(timeout_s=30))
            await asyncio.sleep(0.3)  # parked (a put before they watch wakes them too)
            assert not getter.done() and not blocked.done()
            producer = EtcdQueue(b, name)
            await producer.put(b"one")
            await producer.put(b"two")
            assert sorted(await asyncio.gather(getter, blocked)) == [b"one", b"two"]

    asyncio.run(body())


def test_a_put_before_the_watch_starts_is_not_missed(cluster: EtcdCluster, name: str) -> None:
    """The watch starts from the revision of the empty read + 1, not from 'now'."""

    async def body() -> None:
        async with EtcdClient(cluster.endpoints) as a, EtcdClient(cluster.endpoints) as b:
            q = EtcdQueue(a, name)
            taken, revision = await q._take(None, 0.0)
            assert taken is None
            await EtcdQueue(b, name).put(b"between")  # after the read, before any watch
            seen = await q._change_after(Look(revision, [], [], complete=True))  # the put was seen
            assert seen is not None and len(seen.items) == 1  # kept from the event
            assert await q.get_nowait() == b"between"

    asyncio.run(body())


def test_a_retried_put_is_not_duplicated(cluster: EtcdCluster, name: str) -> None:
    """A put retried with its id (the first attempt applied, unanswered) adds nothing,
    even after a consumer took the item (the tombstone)."""

    async def body() -> None:
        async with EtcdClient(cluster.endpoints) as etcd:
            q = EtcdQueue(etcd, name)
            same = q._ids.next()
            q._ids.next = lambda: same  # type: ignore[method-assign]
            await q.put(b"once")
            await q.put(b"once")  # the retry: item still there
            assert await q.qsize() == 1
            assert await q.get_nowait() == b"once"
            await q.put(b"once")  # the retry, after the item was taken
            assert await q.qsize() == 0

    asyncio.run(body())


def test_reserve_ack_nack(cluster: EtcdCluster, name: str) -> None:
    async def body() -> None:
        async with EtcdClient(cluster.endpoints) as etcd:
            session = await EtcdSession.open(etcd, 5)
            q = EtcdQueue(etcd, name)
            for item in (b"a", b"b"):
                await q.put(item)
            first = await q.reserve(session, 30.0)
            assert (first.payload, first.deliveries) == (b"a", 1)
            assert (await q.qsize(), await q.reserved_count()) == (1, 1)
            assert await q.nack(first)  # back to the head
            again = await q.reserve(session, 30.0)
            assert (again.payload, again.deliveries) == (b"a", 2)
            assert not await q.ack(first)  # an old receipt acks nothing
            assert await q.ack(again)
            assert not await q.ack(again)  # once
            second = await q.reserve(session, 30.0)
            assert second.payload == b"b"
            assert await q.nack(second, requeue=False)  # dropped
            assert (await q.qsize(), await q.reserved_count()) == (0, 0)
            with pytest.raises(queue.Empty):
                await q.reserve(session, 30.0, timeout_s=0.1)
            await session.close()

    asyncio.run(body())


def test_reservations_survive_their_session(cluster: EtcdCluster, name: str) -> None:
    """Reserved items are not on the session's lease: its end must not delete them."""

    async def body() -> None:
        async with EtcdClient(cluster.endpoints) as etcd:
            session = await EtcdSession.open(etcd, 5)
            q = EtcdQueue(etcd, name)
            await q.put(b"x")
            delivery = await q.reserve(session, 30.0)
            await session.close()  # revoked: everything on its lease is deleted now
            assert await q.reserved_count() == 1
            assert await q.ack(delivery)

    asyncio.run(body())


def test_waiting_calls_of_one_process_are_served_in_arrival_order(
    cluster: EtcdCluster, name: str
) -> None:
    async def body() -> None:
        async with EtcdClient(cluster.endpoints) as etcd:
            q = EtcdQueue(etcd, name)
            session = await EtcdSession.open(etcd, 10)
            waiters: list[asyncio.Task[bytes | Delivery]] = []
            for i in range(6):
                if i % 2:
                    waiters.append(asyncio.create_task(q.get()))
                else:
                    waiters.append(asyncio.create_task(q.reserve(session, 30.0)))
                await asyncio.sleep(0)  # it runs until it waits: arrival order is set
            for i in range(6):
                await q.put(b"%d" % i)
            got = await asyncio.gather(*waiters)
            payloads = [g if isinstance(g, bytes) else g.payload for g in got]
            assert payloads == [b"%d" % i for i in range(6)]
            await session.close()

    asyncio.run(body())


def test_many_waiters_on_two_clients_each_get_one_item(cluster: EtcdCluster, name: str) -> None:
    """Takes of several items per Txn, racing another client's: each item once."""

    async def body() -> None:
        async with EtcdClient(cluster.endpoints) as a, EtcdClient(cluster.endpoints) as b:
            qa, qb = EtcdQueue(a, name), EtcdQueue(b, name)
            getters = [asyncio.create_task(q.get(timeout_s=30)) for q in (qa, qb) * 25]
            await asyncio.sleep(0)
            await asyncio.gather(*(qa.put(b"%d" % i) for i in range(50)))
            assert sorted(await asyncio.gather(*getters)) == sorted(b"%d" % i for i in range(50))
            assert await qa.qsize() == 0

    asyncio.run(body())


def test_a_get_that_gives_up_takes_nothing(cluster: EtcdCluster, name: str) -> None:
    async def body() -> None:
        async with EtcdClient(cluster.endpoints) as etcd:
            q = EtcdQueue(etcd, name)
            with pytest.raises(queue.Empty):
                await q.get(timeout_s=0.2)
            cancelled = asyncio.create_task(q.get())
            await asyncio.sleep(0.2)
            cancelled.cancel()
            with pytest.raises(asyncio.CancelledError):
                await cancelled
            await q.put(b"kept")
            assert await q.get_nowait() == b"kept"

    asyncio.run(body())


def test_an_item_taken_for_a_caller_that_left_goes_back_uncounted(
    cluster: EtcdCluster, name: str
) -> None:
    """What a take whose caller gave up while its Txn was in flight does with the item."""

    async def body() -> None:
        async with EtcdClient(cluster.endpoints) as etcd:
            q = EtcdQueue(etcd, name)
            session = await EtcdSession.open(etcd, 10)
            await q.put(b"a")
            await q.put(b"b")
            removed, _ = await q._take(None, 0.0)
            assert removed is not None and removed[1] == b"a"
            await q._give_back(removed)
            reserved, _ = await q._take(session, 30.0)
            assert reserved is not None and reserved[1] == b"a"
            await q._give_back(reserved)
            assert await q.reserved_count() == 0
            delivery = await q.reserve(session, 30.0)
            assert (delivery.payload, delivery.deliveries) == (b"a", 1)
            assert await q.get_nowait() == b"b"
            await session.close()

    asyncio.run(body())


def test_expired_and_orphaned_reservations_go_back(cluster: EtcdCluster, name: str) -> None:
    async def body() -> None:
        async with EtcdClient(cluster.endpoints) as etcd:
            q = EtcdQueue(etcd, name)
            live, gone = await EtcdSession.open(etcd, 10), await EtcdSession.open(etcd, 10)
            for item in (b"expires", b"orphan", b"kept"):
                await q.put(item)
            expires = await q.reserve(live, 5.0)
            orphan = await q.reserve(gone, 60.0)
            kept = await q.reserve(live, 60.0)
            await gone.close()  # its lease is revoked: its session key is gone
            assert await q.requeue_expired(now_s=time.time()) == 1  # the orphan
            assert await q.requeue_expired(now_s=time.time() + 10) == 1  # past the deadline
            assert await q.requeue_expired(now_s=time.time() + 10) == 0
            assert (await q.qsize(), await q.reserved_count()) == (2, 1)
            assert not await q.ack(expires)  # returned: the old receipt acks nothing
            assert not await q.ack(orphan)
            again = await q.reserve(live, 60.0)
            assert (again.payload, again.deliveries) == (b"expires", 2)  # at its old place
            assert await q.ack(again) and await q.ack(kept)
            assert await q.get_nowait() == b"orphan"
            await live.close()

    asyncio.run(body())
