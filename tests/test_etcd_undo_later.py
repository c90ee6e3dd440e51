"""An undo of an acquire that etcd could not answer is made again: no lock held for nobody.

Two ways a lock could stay held for nobody while its session lives, each
through a relay between gateway A's etcd client and a real 3-node etcd:

- An acquire's write lost on its way back: it is applied by etcd and the
  connection is cut before the answer comes back; the relay then refuses
  A's connections (etcd out of reach from A) until A gives up
  (``EtcdUnavailable``, short deadlines here) and the undo it tries at once
  fails the same way. The acquire is answered as failed, yet its contender
  key is in etcd, on a lease that outlives the outage: it would hold the
  lock for nobody until the session ends, and a live client's session does
  not end. Once etcd is in reach again, the undo is asked again until
  answered, so gateway B's client gets the lock.
- An acquire granted, whose caller left before it read the answer (an
  interrupt): the gateway undoes it, a release by its token, while etcd is
  out of A's reach. The release is made again until etcd answers it.

And so for every undo of an answer whose caller left, each made again
until etcd answers, none twice: a Semaphore's permit (the very one the
acquire was answered with), a get's items (back once each), a reserve
(back, not counted as a delivery), a pipe's message and a Condition
restore's lock; and an interrupted Barrier party's leave of the count. A
try applied by etcd whose answer was lost (the relay cuts it) is made again
harmlessly.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import marshal
import queue
import secrets
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
from test_etcd_resume import Gateways, a_id, call, new_session

from managerd.store.api import Call
from managerd.store.etcd.handles import BarrierHandle, SemaphoreHandle
from managerd.store.etcd.kv import name_key
from managerd.store.etcd.store import EtcdStore
from managerd.store.sessions import Session
from managerd_client.errors import StoreUnavailable

from conftest import wait_until
from etcd_support import EtcdCluster, EtcdRelay, RelayThread, cluster, relayed_and_direct

__all__ = ["cluster"]  # the fixture, from etcd_support

TTL_S = 30  # the outage lasts seconds: the session's lease outlives it


def new_root() -> bytes:
    return b"/undo" + secrets.token_hex(4).encode() + b"/"


def test_an_acquire_failed_with_etcd_out_of_reach_is_undone_once_it_is_back(
    cluster: EtcdCluster,
) -> None:
    root = new_root()
    # The contender key's put: its protobuf field tag and length, then the key (the
    # lock's prefix and the session's lease, 16 hex digits).
    prefix = root + b"l/" + name_key("guard") + b"/"
    marker = bytes([0x0A, len(prefix) + 16]) + prefix

    async def body(relay: EtcdRelay, a: EtcdStore, b: EtcdStore) -> None:
        cut_off, next_one = new_session("cut off"), new_session("next")
        lock_a = a.get_or_create("Lock", "guard", {})
        assert not await call(lock_a, cut_off, "locked")  # its lease, on A

        relay.cut_after(marker)  # applied, its answer lost...
        relay.refusing = True  # ...and etcd out of A's reach
        with pytest.raises(StoreUnavailable):
            await call(lock_a, cut_off, "acquire")
        lock_b = b.get_or_create("Lock", "guard", {})
        assert await call(lock_b, next_one, "locked"), "the acquire never landed"

        relay.refusing = False  # etcd in reach again: the undo goes through
        assert await call(lock_b, next_one, "acquire", True, 15), (
            "a ghost of the failed acquire holds the lock"
        )
        await call(lock_b, next_one, "release")

    relayed_and_direct(cluster, body, root=root, session_ttl_s=TTL_S)


async def undone_while_out_of_reach(
    relay: EtcdRelay, store: EtcdStore, handle: Any, method: str, session: Session, answer: Any,
    *, thread: int = 0,
) -> None:  # fmt: skip
    """With etcd out of ``store``'s reach, the answer of ``method`` to ``session``'s
    ``thread`` is undone (its caller left), and its first try fails."""
    relay.refusing = True
    relay.drop_connections()
    store.undo(handle, method, Call(session, thread, asyncio.get_running_loop()), (), answer)
    await asyncio.sleep(3)  # longer than A's retry budget: the first try failed


def test_a_semaphore_permit_granted_to_a_caller_that_left_goes_back_once_etcd_is_back(
    cluster: EtcdCluster,
) -> None:
    async def body(relay: EtcdRelay, a: EtcdStore, b: EtcdStore) -> None:
        left, next_one = new_session("left"), new_session("next")
        sem_a = a.get_or_create("Semaphore", "slots", {"value": 1})
        token = await call(sem_a, left, "acquire")
        assert token

        await undone_while_out_of_reach(relay, a, sem_a, "acquire", left, token)
        sem_b = b.get_or_create("Semaphore", "slots", {"value": 1})
        assert await call(sem_b, next_one, "get_value") == 0

        relay.refusing = False  # etcd in reach again
        assert await call(sem_b, next_one, "acquire", True, 15), (
            "the permit granted to a caller that left is still held"
        )
        assert await call(sem_a, left, "get_value") == 0  # (after A's undo: one permit)
        await call(sem_b, next_one, "release")

    relayed_and_direct(cluster, body, root=new_root(), session_ttl_s=TTL_S)


def test_a_semaphore_undo_applied_unanswered_gives_back_that_permit_and_no_other(
    cluster: EtcdCluster,
) -> None:
    async def body(relay: EtcdRelay, a: EtcdStore, b: EtcdStore) -> None:
        left = new_session("left")
        reach = a.get_or_create("Event", "reach", {})
        assert not await call(reach, left, "is_set")
        sem_a = a.get_or_create("Semaphore", "slots", {"value": 2})
        first = await call(sem_a, left, "acquire", thread=1)
        second = await call(sem_a, left, "acquire", thread=2)
        sem_b = b.get_or_create("Semaphore", "slots", {"value": 2})
        assert isinstance(sem_b, SemaphoreHandle)
        keys = {kv.create_revision: kv.key for kv in (await sem_b.sem._read()).contenders}

        # The first permit's undo: its delete applied, its answer lost, etcd out of
        # A's reach; A makes it again until etcd answers.
        relay.cut_after(keys[first])
        relay.refusing = True
        a.undo(sem_a, "acquire", Call(left, 1, asyncio.get_running_loop()), (), first)
        await asyncio.sleep(3)
        assert relay.cuts == 1
        relay.refusing = False
        # A reaches etcd again before the undo's next try, so that try's answer is
        # the first to its request: that it finds the key gone says nothing of who
        # deleted it (the earlier try did).
        while True:
            try:
                await call(reach, left, "is_set")
                break
            except StoreUnavailable:
                pass
        assert await call(sem_a, left, "get_value") == 1  # (after A's undo)

        held = [kv.create_revision for kv in (await sem_b.sem._read()).contenders]
        assert held == [second], "the undo gave back another permit than its own"

    relayed_and_direct(cluster, body, root=new_root(), session_ttl_s=TTL_S)


def test_items_of_a_get_whose_caller_left_go_back_once_each_once_etcd_is_back(
    cluster: EtcdCluster,
) -> None:
    async def body(relay: EtcdRelay, a: EtcdStore, b: EtcdStore) -> None:
        left, next_one = new_session("left"), new_session("next")
        x, y = b"x-" + secrets.token_bytes(8), b"y-" + secrets.token_bytes(8)
        jobs_b = b.get_or_create("Queue", "jobs", {})
        await call(jobs_b, next_one, "put_many", [x, y])
        jobs_a = a.get_or_create("Queue", "jobs", {})
        got = await call(jobs_a, left, "get_many", 2, False)
        assert got == [x, y]

        # Each item goes back in a Txn of its own: x's is applied, its answer lost;
        # y's fails (etcd out of A's reach). Both are made again until etcd answers.
        relay.cut_after(x)
        relay.refusing = True
        a.undo(jobs_a, "get_many", Call(left, 0, asyncio.get_running_loop()), (), got)
        await asyncio.sleep(3)
        assert relay.cuts == 1
        assert await call(jobs_b, next_one, "get", True, 5) == x
        with pytest.raises(queue.Empty):
            await call(jobs_b, next_one, "get_nowait")

        relay.refusing = False  # etcd in reach again
        assert await call(jobs_b, next_one, "get", True, 15) == y, "an item was dropped"
        await call(jobs_a, left, "qsize")  # (after A's undo)
        with pytest.raises(queue.Empty):
            await call(jobs_b, next_one, "get_nowait")  # neither came back twice

    relayed_and_direct(cluster, body, root=new_root(), session_ttl_s=TTL_S)


def test_a_reservation_whose_caller_left_goes_back_uncounted_once_etcd_is_back(
    cluster: EtcdCluster,
) -> None:
    async def body(relay: EtcdRelay, a: EtcdStore, b: EtcdStore) -> None:
        left, next_one = new_session("left"), new_session("next")
        args = {"visibility_timeout_s": 120.0}  # no redelivery by timeout in this test
        jobs_b = b.get_or_create("Queue", "jobs", args)
        await call(jobs_b, next_one, "put", b"job")
        jobs_a = a.get_or_create("Queue", "jobs", args)
        reserved = await call(jobs_a, left, "reserve", 5)
        assert reserved[1:] == (b"job", 1)

        await undone_while_out_of_reach(relay, a, jobs_a, "reserve", left, reserved)
        assert await call(jobs_b, next_one, "reserved_count") == 1

        relay.refusing = False  # etcd in reach again
        did, payload, deliveries = await call(jobs_b, next_one, "reserve", 15)
        assert (payload, deliveries) == (b"job", 1), "not back, or counted as delivered"
        await call(jobs_b, next_one, "ack", did)

    relayed_and_direct(cluster, body, root=new_root(), session_ttl_s=TTL_S)


def test_pipe_messages_whose_reader_left_are_there_once_each_once_etcd_is_back(
    cluster: EtcdCluster,
) -> None:
    async def body(relay: EtcdRelay, a: EtcdStore, b: EtcdStore) -> None:
        left, writer = new_session("left"), new_session("writer")
        x, y = b"x-" + secrets.token_bytes(8), b"y-" + secrets.token_bytes(8)
        pipe_b = b.get_or_create("Pipe", "p", {})
        for message in (x, y):
            await call(pipe_b, writer, "send", 1, message)
        pipe_a = a.get_or_create("Pipe", "p", {})
        assert await call(pipe_a, left, "recv", 0, 0, thread=1) == x
        assert await call(pipe_a, left, "recv", 0, 0, thread=2) == y

        # x's put back is applied, its answer lost; y's fails (etcd out of A's reach).
        # Both are made again until etcd answers, each under the id it took first.
        loop = asyncio.get_running_loop()
        relay.cut_after(x)
        relay.refusing = True
        a.undo(pipe_a, "recv", Call(left, 1, loop), (0,), x)
        a.undo(pipe_a, "recv", Call(left, 2, loop), (0,), y)
        await asyncio.sleep(3)
        assert relay.cuts == 1

        relay.refusing = False  # etcd in reach again
        await call(pipe_a, left, "poll", 0, 0)  # (after A's undos)
        got = [await call(pipe_b, writer, "recv", 0, 0) for _ in range(2)]
        assert sorted(got) == sorted([x, y]), "a message was dropped"
        assert not await call(pipe_b, writer, "poll", 0, 0), "a message came back twice"

    relayed_and_direct(cluster, body, root=new_root(), session_ttl_s=TTL_S)


@pytest.mark.parametrize(
    ("typeid", "undone"),
    # A Lock's acquire; a Condition's restore (as an interrupted wait's restore
    # answers it: the lock held with this token).
    [("Lock", "acquire"), ("Condition", "restore")],
)
def test_a_lock_granted_to_a_caller_that_left_is_released_once_etcd_is_back(
    cluster: EtcdCluster, typeid: str, undone: str
) -> None:
    async def body(relay: EtcdRelay, a: EtcdStore, b: EtcdStore) -> None:
        left, next_one = new_session("left"), new_session("next")
        lock_a = a.get_or_create(typeid, "guard", {})
        token = await call(lock_a, left, "acquire")
        assert token

        await undone_while_out_of_reach(relay, a, lock_a, undone, left, token)
        lock_b = b.get_or_create(typeid, "guard", {})
        assert await call(lock_b, next_one, "locked")

        relay.refusing = False  # etcd in reach again
        assert await call(lock_b, next_one, "acquire", True, 15), (
            f"the lock granted to a caller that left ({typeid}.{undone}) is still held"
        )
        await call(lock_b, next_one, "release")

    relayed_and_direct(cluster, body, root=new_root(), session_ttl_s=TTL_S)


async def party_waiting(store: EtcdStore, name: str, session: Session, thread: int) -> Any:
    """A party of the barrier ``name`` (3 parties) waiting through ``store``: its
    handle and its answer's future, once the wait is parked."""
    barrier = store.get_or_create("Barrier", name, {"parties": 3})
    assert isinstance(barrier, BarrierHandle)
    answer = barrier.methods["wait"].fn(barrier, Call(session, thread, asyncio.get_running_loop()))
    while not barrier.waits_now(answer):
        await asyncio.sleep(0.01)  # until it arrived and waits
    return barrier, answer


def test_a_barrier_party_whose_caller_left_leaves_the_count_once_etcd_is_back(
    cluster: EtcdCluster,
) -> None:
    async def body(relay: EtcdRelay, a: EtcdStore, b: EtcdStore) -> None:
        left, second, third, fourth = (new_session(n) for n in ("left", "2", "3", "4"))
        bar_a, gone = await party_waiting(a, "round", left, 1)
        bar_b, waiting = await party_waiting(b, "round", second, 0)
        assert await call(bar_b, second, "state") == (3, 2, False)

        # The interrupted party leaves while etcd is out of A's reach: the first try fails.
        relay.refusing = True
        relay.drop_connections()
        a.abandon(bar_a, "wait", left, gone)
        await asyncio.sleep(3)  # longer than A's retry budget: the first try failed
        assert await call(bar_b, second, "state") == (3, 2, False)

        relay.refusing = False  # etcd in reach again
        await call(bar_a, left, "state")  # (after the party's leave on A)
        assert await call(bar_b, second, "state") == (3, 1, False), (
            "a party whose caller left is still counted"
        )
        # The round waits for two more parties, not one: neither trips it alone.
        third_arrives = asyncio.ensure_future(call(bar_b, third, "wait", 30))
        while await call(bar_b, second, "state") != (3, 2, False):
            await asyncio.sleep(0.01)
        assert not waiting.done() and not third_arrives.done()
        last = await call(bar_b, fourth, "wait", 30)
        assert sorted([await waiting, await third_arrives, last]) == [1, 1, 2]
        assert gone.cancelled()

    relayed_and_direct(cluster, body, root=new_root(), session_ttl_s=TTL_S)


def test_a_barrier_leave_applied_unanswered_leaves_the_count_once(
    cluster: EtcdCluster,
) -> None:
    async def body(relay: EtcdRelay, a: EtcdStore, b: EtcdStore) -> None:
        left, second = new_session("left"), new_session("second")
        bar_a, gone = await party_waiting(a, "round", left, 1)
        bar_b, waiting = await party_waiting(b, "round", second, 0)

        # The leave's Txn (the only write of this state now: the count back at 1) is
        # applied, its answer lost, and etcd out of A's reach; A makes it again.
        relay.cut_after(marshal.dumps({"gen": 0, "count": 1, "broken": False, "resets": 0}))
        relay.refusing = True
        a.abandon(bar_a, "wait", left, gone)
        await asyncio.sleep(3)
        assert relay.cuts == 1
        relay.refusing = False
        await call(bar_a, left, "state")  # (after the party's leave on A)
        assert await call(bar_b, second, "state") == (3, 1, False), (
            "the leave was counted twice, or not at all"
        )
        await call(bar_b, second, "abort")
        with pytest.raises(threading.BrokenBarrierError):
            await waiting

    relayed_and_direct(cluster, body, root=new_root(), session_ttl_s=TTL_S)


def out_of_reach(relay: RelayThread, refusing: bool) -> None:
    """etcd out of reach (or back) for the gateway behind ``relay``: its connections cut
    and new ones refused."""
    done: concurrent.futures.Future[None] = concurrent.futures.Future()

    def switch() -> None:
        relay.relay.refusing = refusing
        if refusing:
            relay.relay.drop_connections()
        done.set_result(None)

    relay.loop.call_soon_threadsafe(switch)
    done.result(30)


def test_a_give_back_under_way_when_its_gateway_stops_is_made_before_it_stops(
    cluster: EtcdCluster, tmp_path: Path
) -> None:
    """Real gateways: A reaches etcd through a relay, B directly. A client's get through
    A is answered, then the client cancels it (as an interrupt just after the answer
    would): A gives the item back, while etcd is out of A's reach. A gets SIGTERM,
    then etcd is in reach again: A gives the item back before it stops. Cut short,
    the give-back would be lost: the session resumes through B, where the item is
    still in the thread's records, and the thread's next call confirms them."""
    relay = RelayThread(cluster.endpoints[0])
    gateways = Gateways(cluster, tmp_path)
    direct = gateways.args
    try:
        gateways.args = ["--store", "etcd://" + relay.address, *direct[2:]]
        a = gateways.start("a")
        gateways.args = direct
        b = gateways.start("b")
        with gateways.client(a, b) as m, gateways.client(b) as other:
            jobs = m.Queue("jobs")
            assert m.server_id == a_id(a)
            other.Queue("jobs").put("job-1")
            assert jobs.get(timeout=10) == "job-1"

            out_of_reach(relay, True)
            channel = m._channel
            assert channel is not None
            rid = next(channel._rids) - 1  # the get's (one id is skipped: harmless)
            channel._abandon(rid, RuntimeError("as if interrupted"))
            m.ping()  # the cancel was handled before this (one connection, in order)
            assert other.Queue("jobs").qsize() == 0  # not back: etcd is out of A's reach

            a.signal(signal.SIGTERM)
            assert wait_until(lambda: "shutting down" in a.log, timeout_s=30)
            out_of_reach(relay, False)
            assert a.wait(30) == 0
            assert "left undone" not in a.log

            # The session resumes through B; this thread's next call confirms what it
            # read there: nothing of job-1, which is back in the queue.
            assert jobs.get(timeout=10) == "job-1", "the give-back was cut short"
            assert m.server_id != a_id(a)
            assert other.Queue("jobs").qsize() == 0
    finally:
        gateways.stop()
        relay.close()
