"""The EtcdStore through the Store interface, two stores (gateways) on one real 3-node cluster.

In process, as the contract suite drives a store: handles from
``get_or_create``, methods called as the invoker calls them (``spec.fn``),
answers awaited.
"""

from __future__ import annotations

import asyncio
import pickle
import queue
import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest

from managerd.store.api import Call
from managerd.store.etcd.client import EtcdClient
from managerd.store.etcd.store import EtcdStore
from managerd.store.interface import Handle
from managerd.store.sessions import Session, SessionKind
from managerd_client.errors import (
    ArgumentConflict,
    NoSuchObject,
    ObjectTypeConflict,
    ServerShuttingDown,
)

from etcd_support import EtcdCluster, cluster

__all__ = ["cluster"]  # the fixture, from etcd_support


def session(label: str) -> Session:
    return Session(SessionKind.MANAGERD, label, {"host": "test", "pid": 0})


def start(handle: Handle, s: Session, method: str, *args: Any, thread: int = 0) -> Any:
    """The call as the invoker makes it: an answer, or a future of one."""
    return handle.methods[method].fn(handle, Call(s, thread, asyncio.get_running_loop()), *args)


async def call(handle: Handle, s: Session, method: str, *args: Any, thread: int = 0) -> Any:
    answer = start(handle, s, method, *args, thread=thread)
    return await answer if isinstance(answer, asyncio.Future) else answer


async def seen(store: EtcdStore, name: str) -> None:
    """Wait until ``store``'s mirror of names has ``name`` (a watch away)."""
    while name not in dict(store.listing()):
        await asyncio.sleep(0.01)


class Gateways:
    def __init__(self, a: EtcdStore, b: EtcdStore) -> None:
        self.a, self.b = a, b


async def gateways(cluster: EtcdCluster, root: bytes) -> AsyncIterator[Gateways]:
    async with EtcdClient(cluster.endpoints) as ca, EtcdClient(cluster.endpoints) as cb:
        a = await EtcdStore.open(ca, root=root, session_ttl_s=5)
        b = await EtcdStore.open(cb, root=root, session_ttl_s=5)
        try:
            yield Gateways(a, b)
        finally:
            await a.close()
            await b.close()


def run(cluster: EtcdCluster, body: Any) -> None:
    root = b"/t" + secrets.token_hex(4).encode() + b"/"

    async def main() -> None:
        async for g in gateways(cluster, root):
            await body(g)

    asyncio.run(main())


def test_names_types_and_conflicts_across_gateways(cluster: EtcdCluster) -> None:
    async def body(g: Gateways) -> None:
        s = session("s")
        q = g.a.get_or_create("Queue", "jobs", {"visibility_timeout_s": 5.0})
        await call(q, s, "put", pickle.dumps(1))  # exists in etcd once this answers
        await seen(g.b, "jobs")
        assert g.b.listing() == [("jobs", "Queue")]
        with pytest.raises(ObjectTypeConflict):
            g.b.get_or_create("Lock", "jobs", {})
        with pytest.raises(ArgumentConflict):
            g.b.get_or_create("Queue", "jobs", {"visibility_timeout_s": 9.0})
        with pytest.raises(ObjectTypeConflict):
            g.b.get("jobs", "dict")
        with pytest.raises(NoSuchObject):
            g.b.get("nothing")
        qb = g.b.get_or_create("Queue", "jobs", {})
        assert pickle.loads(await call(qb, s, "get_nowait")) == 1
        # Created at the same moment with other types through both: one wins, the
        # other's calls answer the conflict.
        x = g.a.get_or_create("Event", "race", {})
        y = g.b.get_or_create("Lock", "race", {})
        outcomes = await asyncio.gather(
            call(x, s, "is_set"), call(y, s, "locked"), return_exceptions=True
        )
        assert sum(isinstance(o, ObjectTypeConflict) for o in outcomes) == 1, outcomes
        assert g.a.delete("jobs")
        await asyncio.sleep(0)
        while "jobs" in dict(g.b.listing()):
            await asyncio.sleep(0.01)
        with pytest.raises(NoSuchObject):
            g.b.get("jobs")

    run(cluster, body)


def test_a_get_blocked_on_one_gateway_is_woken_by_a_put_through_another(
    cluster: EtcdCluster,
) -> None:
    async def body(g: Gateways) -> None:
        consumer, producer = session("consumer"), session("producer")
        qa = g.a.get_or_create("Queue", "q", {})
        await call(qa, consumer, "qsize")
        await seen(g.b, "q")
        qb = g.b.get("q", "Queue")
        blocked = start(qa, consumer, "get")
        assert isinstance(blocked, asyncio.Future)
        await asyncio.sleep(0.2)
        assert not blocked.done()
        assert g.a.stats_of(qa).waiters == 1  # type: ignore[attr-defined]
        await call(qb, producer, "put", pickle.dumps("hello"))
        assert pickle.loads(await blocked) == "hello"
        with pytest.raises(queue.Empty):
            await call(qa, consumer, "get", True, 0.1)

    run(cluster, body)


def test_reservations_ack_nack_and_session_end(cluster: EtcdCluster) -> None:
    async def body(g: Gateways) -> None:
        s1, s2 = session("s1"), session("s2")
        q = g.a.get_or_create("Queue", "r", {})
        for i in range(3):
            await call(q, s1, "put", pickle.dumps(i))
        did, payload, deliveries = await call(q, s1, "reserve")
        assert (pickle.loads(payload), deliveries) == (0, 1)
        with pytest.raises(ValueError):
            await call(q, s2, "ack", did)  # not s2's
        await call(q, s1, "ack", did)
        with pytest.raises(ValueError):
            await call(q, s1, "ack", did)  # already acked
        did, payload, _ = await call(q, s1, "reserve")
        await call(q, s1, "nack", did)
        did, payload, deliveries = await call(q, s1, "reserve")
        assert (pickle.loads(payload), deliveries) == (1, 2)
        assert await call(q, s1, "reserved_count") == 1
        g.a.release(s1)  # its reservation goes back to the queue
        while await call(q, s2, "reserved_count"):
            await asyncio.sleep(0.05)
        got = [pickle.loads(await call(q, s2, "get_nowait")) for _ in range(2)]
        assert sorted(got) == [1, 2]

    run(cluster, body)


def test_locks_semaphores_across_gateways_and_sessions(cluster: EtcdCluster) -> None:
    async def body(g: Gateways) -> None:
        s1, s2 = session("s1"), session("s2")
        la = g.a.get_or_create("Lock", "L", {})
        t1 = await call(la, s1, "acquire")
        assert t1 > 0
        await seen(g.b, "L")
        lb = g.b.get("L")
        assert await call(lb, s2, "acquire", False) is False
        waiting = start(lb, s2, "acquire")
        await asyncio.sleep(0.2)
        assert not waiting.done()
        g.a.release(s1)  # the holder's session ends: the lock goes to the waiter
        t2 = await waiting
        assert t2 > t1
        assert await call(la, s1, "fencing_token") == t2
        await call(la, s1, "release")  # any client may release a Lock
        assert await call(lb, s2, "locked") is False

        r = g.a.get_or_create("RLock", "R", {})
        t = await call(r, s2, "acquire", thread=1)
        assert await call(r, s2, "acquire", thread=1) == t
        assert await call(r, s2, "acquire", False, thread=2) is False
        await call(r, s2, "release", thread=1)
        await call(r, s2, "release", thread=1)
        with pytest.raises(RuntimeError):
            await call(r, s2, "release", thread=1)

        sem = g.a.get_or_create("BoundedSemaphore", "S", {"value": 2})
        assert await call(sem, s1, "acquire") and await call(sem, s2, "acquire")
        assert await call(sem, s2, "acquire", False) is False
        assert await call(sem, s1, "get_value") == 0
        g.a.release(s1)
        while await call(sem, s2, "get_value") != 1:
            await asyncio.sleep(0.05)
        await call(sem, s2, "release")
        with pytest.raises(ValueError):
            await call(sem, s2, "release")

    run(cluster, body)


def test_event_value_dict_and_shutdown(cluster: EtcdCluster) -> None:
    async def body(g: Gateways) -> None:
        s = session("s")
        ev = g.a.get_or_create("Event", "E", {})
        waiting = start(ev, s, "wait")
        await call(ev, s, "is_set")
        await seen(g.b, "E")
        await call(g.b.get("E"), s, "set")
        assert await waiting is True

        v = g.a.get_or_create("Value", "V", {"typecode": "i", "value": 5})
        assert await call(v, s, "get") == 5
        await asyncio.gather(*(call(v, s, "add", 1) for _ in range(10)))
        assert await call(v, s, "get") == 15
        with pytest.raises(OverflowError):
            await call(v, s, "set", 2**40)

        d = g.a.get_or_create("dict", "D", {"contents": [("a", pickle.dumps(1))]})
        assert pickle.loads(await call(d, s, "__getitem__", "a")) == 1
        await call(d, s, "__setitem__", "b", pickle.dumps(2))
        assert sorted(await call(d, s, "keys")) == ["a", "b"]
        with pytest.raises(KeyError):
            await call(d, s, "__getitem__", "zz")
        await g.a.refresh_stats()
        assert g.a.stats_of(d).len == 2  # type: ignore[attr-defined]

        never = g.b.get_or_create("Event", "never", {})
        parked = start(never, s, "wait")
        stock = start(never, Session(SessionKind.STOCK, "stock"), "wait")
        await asyncio.sleep(0.1)
        g.b.shutdown()
        # A managerd session's call is dropped unanswered (its client asks it again
        # through another gateway, where the session resumes); a stock one's refused.
        await asyncio.wait([parked])
        assert parked.cancelled()
        with pytest.raises(ServerShuttingDown):
            await stock

    run(cluster, body)


def test_condition_barrier_and_pipe_across_gateways(cluster: EtcdCluster) -> None:
    async def body(g: Gateways) -> None:
        s1, s2 = session("s1"), session("s2")
        cond = g.a.get_or_create("Condition", "C", {})
        await call(cond, s1, "acquire")
        waiting = start(cond, s1, "wait")
        await seen(g.b, "C")
        cb = g.b.get("C")
        await call(cb, s2, "acquire")  # free once the wait let it go
        await call(cb, s2, "notify")
        await asyncio.sleep(0.1)
        assert not waiting.done()  # notified, but the lock is s2's until released
        await call(cb, s2, "release")
        assert await waiting is True
        await call(cond, s1, "release")

        barrier = g.a.get_or_create("Barrier", "B", {"parties": 2})
        first = start(barrier, s1, "wait")
        await seen(g.b, "B")
        assert sorted([await call(g.b.get("B"), s2, "wait"), await first]) == [0, 1]

        pipe = g.a.get_or_create("Pipe", "P", {})
        await seen(g.b, "P")
        reading = start(g.b.get("P"), s2, "recv", 1)
        await call(pipe, s1, "send", 0, pickle.dumps("hi"))
        assert pickle.loads(await reading) == "hi"
        await call(pipe, s1, "close", 0)
        with pytest.raises(EOFError):
            await call(g.b.get("P"), s2, "recv", 1)

    run(cluster, body)
