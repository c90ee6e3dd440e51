"""The etcd lock against a real 3-node etcd cluster: exclusion, fencing tokens, FIFO, expiry."""

from __future__ import annotations

import asyncio
import secrets

import pytest

from managerd.store.etcd.client import EtcdClient
from managerd.store.etcd.kv import prefix_end
from managerd.store.etcd.locks import EtcdLock
from managerd.store.etcd.sessions import EtcdSession
from managerd_client.errors import LockLost, SessionExpired

from etcd_support import EtcdCluster, EtcdRelay, cluster

__all__ = ["cluster"]  # the fixture, from etcd_support


@pytest.fixture
def name() -> str:
    return "l" + secrets.token_hex(4)


def test_exclusion_and_increasing_tokens(cluster: EtcdCluster, name: str) -> None:
    async def body() -> None:
        async with EtcdClient(cluster.endpoints) as a, EtcdClient(cluster.endpoints) as b:
            s1, s2 = await EtcdSession.open(a, 10), await EtcdSession.open(b, 10)
            l1, l2 = EtcdLock(a, name), EtcdLock(b, name)
            t1 = await l1.acquire(s1)
            assert t1 is not None
            assert await l2.acquire(s2, blocking=False) is None
            assert await l2.acquire(s2, timeout_s=0.2) is None
            waiter = asyncio.create_task(l2.acquire(s2))
            await asyncio.sleep(0.2)
            assert not waiter.done()
            holder = await l1.holder()
            assert holder is not None and holder[1] == t1
            await l1.release(s1, t1)
            t2 = await waiter
            assert t2 is not None and t2 > t1
            with pytest.raises(LockLost):
                await l1.release(s1, t1)  # not held any more
            await l2.release(s2, t2)
            t3 = await l1.acquire(s1)
            assert t3 is not None and t3 > t2
            await l1.release(s1, t3)
            assert await l1.holder() is None
            await s1.close()
            await s2.close()

    asyncio.run(body())


def test_waiters_are_served_in_arrival_order(cluster: EtcdCluster, name: str) -> None:
    async def body() -> None:
        async with EtcdClient(cluster.endpoints) as etcd:
            sessions = [await EtcdSession.open(etcd, 10) for _ in range(4)]
            lock = EtcdLock(etcd, name)
            order: list[int] = []
            first = await lock.acquire(sessions[0])
            assert first is not None

            async def take(i: int) -> None:
                token = await lock.acquire(sessions[i])
                assert token is not None
                order.append(i)
                await lock.release(sessions[i], token)

            waiters = []
            end = prefix_end(lock.prefix)
            for i in (1, 2, 3):
                waiters.append(asyncio.create_task(take(i)))
                # Until its key exists: then its place in line is known.
                while (await etcd.range(lock.prefix, end, count_only=True)).count <= i:
                    await asyncio.sleep(0.01)
            await lock.release(sessions[0], first)
            await asyncio.gather(*waiters)
            assert order == [1, 2, 3]
            for s in sessions:
                await s.close()

    asyncio.run(body())


def test_a_dead_sessions_lock_goes_to_the_waiter_after_its_ttl(
    cluster: EtcdCluster, name: str
) -> None:
    async def body() -> None:
        async with EtcdClient(cluster.endpoints) as a, EtcdClient(cluster.endpoints) as b:
            dead, live = await EtcdSession.open(a, 1), await EtcdSession.open(b, 10)
            t1 = await EtcdLock(a, name).acquire(dead)
            assert t1 is not None
            await dead.abandon()  # as if its gateway died: no more keep-alives
            t2 = await EtcdLock(b, name).acquire(live, timeout_s=30)
            assert t2 is not None and t2 > t1
            with pytest.raises(LockLost):
                await EtcdLock(a, name).release(dead, t1)
            await live.close()

    asyncio.run(body())


def test_a_waiter_that_gives_up_does_not_block_the_next(cluster: EtcdCluster, name: str) -> None:
    async def body() -> None:
        async with EtcdClient(cluster.endpoints) as etcd:
            s1, s2, s3 = [await EtcdSession.open(etcd, 10) for _ in range(3)]
            lock = EtcdLock(etcd, name)
            t1 = await lock.acquire(s1)
            assert t1 is not None
            quitter = asyncio.create_task(lock.acquire(s2, timeout_s=0.3))
            await asyncio.sleep(0.1)
            patient = asyncio.create_task(lock.acquire(s3))  # watches the quitter's key
            assert await quitter is None
            await asyncio.sleep(0.1)
            assert not patient.done()  # the quitter was not the holder
            await lock.release(s1, t1)
            t3 = await patient
            assert t3 is not None and t3 > t1
            for s in (s1, s2, s3):
                await s.close()

    asyncio.run(body())


def test_a_session_learns_its_lease_is_gone_and_its_locks_with_it(
    cluster: EtcdCluster, name: str
) -> None:
    async def body() -> None:
        async with EtcdClient(cluster.endpoints) as etcd:
            session = await EtcdSession.open(etcd, 3)  # renewed every second
            assert await etcd.get(session.key) is not None
            token = await EtcdLock(etcd, name).acquire(session)
            assert token is not None
            await etcd.lease_revoke(session.lease_id)  # as an operator or a partition would
            await asyncio.wait_for(session.lost.wait(), 30)
            assert await etcd.get(session.key) is None
            assert await EtcdLock(etcd, name).holder() is None
            with pytest.raises(LockLost):
                await EtcdLock(etcd, name).release(session, token)

    asyncio.run(body())


def test_a_session_resumed_through_another_client_keeps_its_lock(
    cluster: EtcdCluster, name: str
) -> None:
    """A gateway dies; its client's session is resumed through another within the TTL."""

    async def body() -> None:
        async with EtcdClient(cluster.endpoints) as b:
            async with EtcdClient(cluster.endpoints) as a:
                first = await EtcdSession.open(a, 2)
                token = await EtcdLock(a, name).acquire(first)
                assert token is not None
                await first.abandon()  # gateway A dies: nobody renews the lease
            resumed = await EtcdSession.resume(b, first.sid)
            assert resumed.lease_id == first.lease_id and resumed.ttl_s == 2
            other = await EtcdSession.open(b, 10)
            waiter = asyncio.create_task(EtcdLock(b, name).acquire(other))
            await asyncio.sleep(2 * resumed.ttl_s)  # past the TTL: renewed from B
            assert not waiter.done() and not resumed.lost.is_set()
            await EtcdLock(b, name).release(resumed, token)
            later = await waiter
            assert later is not None and later > token
            await resumed.close()
            with pytest.raises(SessionExpired):
                await EtcdSession.resume(b, first.sid)  # ended: not resumable
            await other.close()

    asyncio.run(body())


def test_a_release_whose_answer_was_lost_is_not_reported_as_lost(
    cluster: EtcdCluster, name: str
) -> None:
    """The delete of a release applied, its answer lost, the Txn sent again: the
    repeat's failed compare is that delete's own success. Read as ``LockLost``, the
    gateway went on to release the next holder."""

    async def body() -> None:
        cutter = EtcdRelay(cluster.endpoints[0])
        via = await cutter.start()
        async with (
            EtcdClient([via], rpc_timeout_s=2.0) as etcd,
            EtcdClient(cluster.endpoints) as other,
        ):
            mine, theirs = await EtcdSession.open(etcd, 10), await EtcdSession.open(other, 10)
            lock, next_lock = EtcdLock(etcd, name), EtcdLock(other, name)
            token = await lock.acquire(mine)
            assert token is not None
            waiter = asyncio.create_task(next_lock.acquire(theirs))
            end = prefix_end(lock.prefix)
            while (await other.range(lock.prefix, end, count_only=True)).count < 2:
                await asyncio.sleep(0.01)
            cutter.cut_after(lock._key(mine, ""))
            await lock.release(mine, token)  # LockLost before TxnResult.repeated
            assert cutter.cuts == 1
            next_token = await waiter
            assert next_token is not None and next_token > token
            held = await lock.holder()
            assert held is not None and held[1] == next_token
            await next_lock.release(theirs, next_token)
            await mine.close()
            await theirs.close()
        await cutter.close()

    asyncio.run(body())
