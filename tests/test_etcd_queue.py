"""The etcd queue against a real 3-node etcd cluster: FIFO, blocking, idempotent put, reserve."""

from __future__ import annotations

import asyncio
import queue
import secrets
from collections.abc import Iterator

import pytest

from managerd.store.etcd.client import EtcdClient
from managerd.store.etcd.queues import EtcdQueue
from managerd.store.etcd.sessions import EtcdSession

from etcd_support import EtcdCluster, running_cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    with running_cluster(tmp_path_factory.mktemp("etcd")) as c:
        yield c


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
            late, _ = await q._take_after_put(None, 0.0, revision + 1)
            assert late is not None and late[1] == b"between"

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
