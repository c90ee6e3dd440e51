"""A client whose gateway dies resumes its session through another (issue 13).

In process first, as the contract suite drives a store: two ``EtcdStore``
gateways on one real cluster, a session taken over by its resume token
(``Store.resume``), its lock, RLock and reservations used through the
second; a gateway that ends a session taken over from it does not revoke it.

Real ``managerd serve --store etcd://...`` gateways on one real 3-node etcd
cluster, killed with SIGKILL; clients reach them with the multi-address
``connect("A,B")``. Within the session TTL the client's next calls go
through B with the same session: its lock (same fencing token), its
reserved message (acked there, never redelivered) and its semaphore permit
are still its own, and nobody else gets them meanwhile. A thread that was
blocked through A (``acquire``, ``get``) waits again through B and is woken
there. A session whose TTL lapsed before its client came back is not
resumed: its lock went to the waiter, and the client is told ``LockLost``.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import secrets
import socket
import threading
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from managerd.store.api import Call
from managerd.store.etcd.client import EtcdClient
from managerd.store.etcd.handles import LockHandle
from managerd.store.etcd.kv import prefix_end
from managerd.store.etcd.store import EtcdStore
from managerd.store.interface import Handle
from managerd.store.sessions import Session, SessionKind
from managerd_client import LockLost, SessionExpired, connect

from conftest import Daemon, free_port, wait_until
from etcd_support import EtcdCluster, cluster

__all__ = ["cluster"]  # the fixture, from etcd_support

TTL_S = 4


# -- in process: two stores on one cluster -----------------------------------------------


async def call(handle: Handle, s: Session, method: str, *args: Any, thread: int = 0) -> Any:
    """The call as the invoker makes it, its answer awaited."""
    answer = handle.methods[method].fn(handle, Call(s, thread, asyncio.get_running_loop()), *args)
    return await answer if isinstance(answer, asyncio.Future) else answer


async def ended(store: EtcdStore, s: Session) -> None:
    """``store`` ends ``s`` as its daemon would, and finishes what that starts in etcd."""
    before = asyncio.all_tasks()
    store.release(s)
    await asyncio.gather(*(asyncio.all_tasks() - before), return_exceptions=True)


def two_stores(
    cluster: EtcdCluster, body: Callable[[EtcdStore, EtcdStore], Awaitable[None]]
) -> None:
    root = b"/t" + secrets.token_hex(4).encode() + b"/"

    async def main() -> None:
        async with EtcdClient(cluster.endpoints) as ca, EtcdClient(cluster.endpoints) as cb:
            a = await EtcdStore.open(ca, root=root, session_ttl_s=TTL_S)
            b = await EtcdStore.open(cb, root=root, session_ttl_s=TTL_S)
            try:
                await body(a, b)
            finally:
                await a.close()
                await b.close()

    asyncio.run(main())


def new_session(label: str) -> Session:
    return Session(SessionKind.MANAGERD, label, {"host": "test", "pid": 0})


def test_a_session_taken_over_keeps_its_holdings_and_its_old_gateway_does_not_revoke_it(
    cluster: EtcdCluster,
) -> None:
    async def body(a: EtcdStore, b: EtcdStore) -> None:
        s = new_session("moving")
        lock = a.get_or_create("Lock", "l", {})
        token = await call(lock, s, "acquire")
        rlock = a.get_or_create("RLock", "r", {})
        await call(rlock, s, "acquire", thread=7)
        jobs = a.get_or_create("Queue", "jobs", {})
        await call(jobs, s, "put_many", [b"one", b"two"])
        first, _, _ = await call(jobs, s, "reserve", 5)
        second, _, _ = await call(jobs, s, "reserve", 5)

        moved = await b.resume(s.resume_token)
        assert moved is not None
        assert (moved.id, moved.resume_token) == (s.id, s.resume_token)
        await ended(a, s)  # the old gateway ends it (its client left): not revoked

        other = new_session("other")
        lock_b = b.get_or_create("Lock", "l", {})
        assert await call(lock_b, other, "acquire", False) is False
        assert await call(lock_b, moved, "fencing_token") == token
        await call(
            b.get_or_create("RLock", "r", {}), moved, "release", thread=7
        )  # acquired through A
        jobs_b = b.get_or_create("Queue", "jobs", {})
        await call(jobs_b, moved, "ack", first)
        await call(jobs_b, moved, "nack", second)
        with pytest.raises(ValueError):
            await call(jobs_b, moved, "ack", first)  # acked already
        assert await call(jobs_b, other, "reserved_count") == 0
        assert await call(jobs_b, other, "get_nowait") == b"two"
        await ended(b, moved)  # now it ends: its lock goes
        assert await call(lock_b, other, "acquire", False) > token

    two_stores(cluster, body)


def test_a_gateway_lets_go_of_a_session_taken_over_and_the_wait_keeps_its_place(
    cluster: EtcdCluster,
) -> None:
    """The old gateway lives (its client went quiet): it drops the session's parked
    acquire without withdrawing its key, and refuses the session's calls; the acquire
    asked again through the new gateway holds with that key's token."""

    async def body(a: EtcdStore, b: EtcdStore) -> None:
        holder, s, later = new_session("holder"), new_session("moving"), new_session("later")
        lock = a.get_or_create("Lock", "l", {})
        first = await call(lock, holder, "acquire")
        parked = lock.methods["acquire"].fn(lock, Call(s, 0, asyncio.get_running_loop()))
        contenders: list[int] = []
        while len(contenders) < 2:  # until its key is in line
            prefix = cast(LockHandle, lock).lock.prefix
            read = await a.client.range(prefix, prefix_end(prefix))
            contenders = [kv.create_revision for kv in read.kvs]
        waiting_token = max(contenders)
        behind = b.get_or_create("Lock", "l", {})
        late = asyncio.ensure_future(call(behind, later, "acquire"))

        moved = await b.resume(s.resume_token)
        assert moved is not None
        await asyncio.wait([parked], timeout=30)
        assert parked.cancelled()  # dropped on A once it saw the takeover
        with pytest.raises(SessionExpired):
            await call(lock, s, "locked")  # A serves it no more
        moved.reissuing = (0, "l", "acquire", None)
        again = behind.methods["acquire"].fn(behind, Call(moved, 0, asyncio.get_running_loop()))
        moved.reissuing = None
        await call(lock, holder, "release")
        assert await again == waiting_token  # the place in line A had for it: before `later`
        assert not late.done()
        await call(behind, moved, "release")
        assert await late > waiting_token > first

    two_stores(cluster, body)


def test_an_acquire_asked_again_does_not_take_another_threads_holding(
    cluster: EtcdCluster,
) -> None:
    """A Lock is the session's: thread 1 holds it, thread 2 waits for it through A.
    Asked again through B, thread 2's acquire waits for thread 1's release there."""

    async def body(a: EtcdStore, b: EtcdStore) -> None:
        s = new_session("two threads")
        lock = a.get_or_create("Lock", "l", {})
        token = await call(lock, s, "acquire", thread=1)
        # Thread 2's acquire waited on A (for a release: no key of its own) when A died.
        moved = await b.resume(s.resume_token)
        assert moved is not None
        lock_b = b.get_or_create("Lock", "l", {})
        moved.reissuing = (2, "l", "acquire", None)
        again = lock_b.methods["acquire"].fn(lock_b, Call(moved, 2, asyncio.get_running_loop()))
        moved.reissuing = None
        await asyncio.wait([again], timeout=1)
        assert not again.done()  # not thread 1's holding
        await call(lock_b, moved, "release", thread=1)
        assert await again > token

    two_stores(cluster, body)


def test_a_token_resumes_only_a_live_session(cluster: EtcdCluster) -> None:
    async def body(a: EtcdStore, b: EtcdStore) -> None:
        assert await b.resume("never given") is None
        s = new_session("ending")
        await call(a.get_or_create("Lock", "l", {}), s, "acquire")
        await ended(a, s)  # its gateway ended it: revoked
        assert await b.resume(s.resume_token) is None
        t = new_session("another's")
        await call(a.get_or_create("Lock", "m", {}), t, "acquire")
        assert await b.resume(s.resume_token) is None  # not t's: its own token only
        assert await b.resume(t.resume_token) is not None

    two_stores(cluster, body)


# -- real gateways ------------------------------------------------------------------------


class Gateways:
    """Gateways of one store (one cluster, one prefix), started and killed by a test."""

    def __init__(self, cluster: EtcdCluster, tmp: Path) -> None:
        store = "etcd://" + ",".join(cluster.endpoints)
        prefix = "/r" + secrets.token_hex(4) + "/"
        self.args = ["--store", store, "--store-prefix", prefix, "--session-ttl-s", str(TTL_S)]
        self.tmp = tmp
        self.authkey = secrets.token_hex(16).encode()
        self.started: list[Daemon] = []

    def start(self, name: str, port: int | None = None, metrics_port: int | None = None) -> Daemon:
        metrics = [] if metrics_port is None else ["--metrics-port", str(metrics_port)]
        d = Daemon(self.tmp / name, args=self.args + metrics)
        d.authkey = self.authkey
        self.started.append(d.start(port=port))
        return d

    def client(self, *gateways: Daemon | str) -> Any:
        addresses = ",".join(g if isinstance(g, str) else g.address for g in gateways)
        return connect(addresses, authkey=self.authkey)

    def stop(self) -> None:
        for d in self.started:
            d.stop()


@pytest.fixture
def gateways(cluster: EtcdCluster, tmp_path: Path) -> Iterator[Gateways]:
    g = Gateways(cluster, tmp_path)
    try:
        yield g
    finally:
        g.stop()


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run ``fn`` in a thread; its result (or exception) lands in the list."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except Exception as exc:
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def waiters_on(gateway: Daemon, name: str) -> int:
    with gateway.connect() as m:
        return int(m.status()["objects"].get(name, {}).get("waiters", 0))


def test_a_client_keeps_its_lock_reservation_and_permit_through_another_gateway(
    gateways: Gateways,
) -> None:
    metrics_port = free_port()
    a, b = gateways.start("a"), gateways.start("b", metrics_port=metrics_port)
    assert wait_until(lambda: "metrics on http://" in b.log, timeout_s=30)
    with gateways.client(a, b) as m, gateways.client(b) as other:
        lock = m.Lock("db")
        assert lock.acquire()
        token = lock.fencing_token
        jobs = m.Queue("jobs")
        jobs.put("job-1")
        message = jobs.reserve(timeout=5)
        permits = m.Semaphore("slots", 1)
        assert permits.acquire()
        session = m.session_id
        assert m.server_id == a_id(a)

        other_lock = other.Lock("db")
        waiter, got = in_thread(lambda: other_lock.acquire(timeout=60))
        assert wait_until(lambda: waiters_on(b, "db") == 1, timeout_s=30)

        a.kill()

        assert lock.locked()  # reconnected through B
        assert m.server_id != a_id(a) and m.session_id == session
        with b.connect() as look:
            assert session in [s["id"] for s in look.status()["sessions"]]
        assert "managerd_sessions_taken_over_total 1.0" in scrape(metrics_port)
        assert lock._call("fencing_token") == token  # the same holding, not a new one
        assert not got  # the waiter through B still waits
        with gateways.client(b) as third:
            assert not third.Lock("db").acquire(blocking=False)
            assert not third.Semaphore("slots", 1).acquire(blocking=False)
            message.ack()  # the delivery id of A, acked through B
            assert third.Queue("jobs").qsize() == 0
            assert third.Queue("jobs")._call("reserved_count") == 0
            with pytest.raises(queue.Empty):
                third.Queue("jobs").get(timeout=0.5)
            permits.release()
            assert third.Semaphore("slots", 1).acquire(blocking=False)
        lock.release()
        waiter.join(30)
        assert got == [True]
        assert other_lock.fencing_token is not None and other_lock.fencing_token > token


_ids: dict[int, str] = {}


def a_id(gateway: Daemon) -> str:
    """The server id of ``gateway`` (asked once, while it lives)."""
    assert gateway.proc is not None
    if gateway.proc.pid not in _ids:
        with gateway.connect() as m:
            _ids[gateway.proc.pid] = m.server_id
    return _ids[gateway.proc.pid]


def test_a_session_whose_ttl_lapsed_is_not_resumed(gateways: Gateways) -> None:
    a, b = gateways.start("a"), gateways.start("b")
    with socket.socket() as s:  # the port C will take, after the TTL
        s.bind(("127.0.0.1", 0))
        c_port = s.getsockname()[1]
    with gateways.client(a, f"127.0.0.1:{c_port}") as m, gateways.client(b) as other:
        lock = m.Lock("db")
        assert lock.acquire()
        token = lock.fencing_token
        assert token is not None
        waiter, got = in_thread(lambda: other.Lock("db").acquire(timeout=60))
        assert wait_until(lambda: waiters_on(b, "db") == 1, timeout_s=30)
        a.kill()  # nobody renews the lease, and the client has nowhere to go
        waiter.join(30)
        assert got == [True]
        assert other.Lock("db")._call("fencing_token") > token
        gateways.start("c", port=c_port)
        with pytest.raises(LockLost):
            lock.release()
        assert other.Lock("db").locked()  # still the waiter's


def test_waiters_parked_on_a_dead_gateway_wait_again_through_another(
    gateways: Gateways, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="managerd_client")  # why a resume did not happen
    a, b = gateways.start("a"), gateways.start("b")
    with (
        gateways.client(b) as holder,
        gateways.client(a, b) as moving,
        gateways.client(b) as later,
    ):
        assert holder.Lock("db").acquire()
        token = holder.Lock("db")._call("fencing_token")
        moving_lock, later_lock = moving.Lock("db"), later.Lock("db")
        locker, locked = in_thread(lambda: moving_lock.acquire(timeout=60))
        getter, gotten = in_thread(lambda: moving.Queue("jobs").get(timeout=60))
        assert wait_until(
            lambda: waiters_on(a, "db") == 1 and waiters_on(a, "jobs") == 1, timeout_s=30
        )
        # Parked in etcd (a waiter counts as it comes, before its key is there).
        assert wait_until(lambda: keys_in_etcd(gateways, b"l/db/") == 2, timeout_s=30)
        # In line behind the moving client's acquire (parked through A first).
        late, late_got = in_thread(lambda: later_lock.acquire(timeout=60))
        assert wait_until(lambda: keys_in_etcd(gateways, b"l/db/") == 3, timeout_s=30)
        session = moving.session_id

        a.kill()

        # Both calls are asked again through B, in the same session.
        assert wait_until(
            lambda: waiters_on(b, "db") == 2 and waiters_on(b, "jobs") == 1, timeout_s=30
        ), (
            f"waiters on B: db {waiters_on(b, 'db')}, jobs {waiters_on(b, 'jobs')}; "
            f"locked {locked}, gotten {gotten}; B's log:\n{b.log[-4000:]}"
        )
        assert moving.session_id == session
        assert not locked and not gotten and not late_got
        holder.Lock("db").release()
        locker.join(30)
        assert locked == [True]  # its place in line was kept: before the later one
        assert moving_lock.fencing_token is not None and moving_lock.fencing_token > token
        assert not late_got
        holder.Queue("jobs").put("job-1")
        getter.join(30)
        assert gotten == ["job-1"]
        moved_token = moving_lock.fencing_token
        moving_lock.release()
        late.join(30)
        assert late_got == [True]
        assert later_lock.fencing_token is not None and later_lock.fencing_token > moved_token


# -- semaphore acquires and condition waits asked again ----------------------------------


def keys_in_etcd(gateways: Gateways, under: bytes) -> int:
    """How many keys of the gateways' store start with ``under`` (after its prefix):
    a call parked is in etcd only once its key is (``waiters_on`` counts it sooner)."""
    endpoints = gateways.args[1].removeprefix("etcd://").split(",")
    prefix = gateways.args[3].encode() + under

    async def count() -> int:
        async with EtcdClient(endpoints) as client:
            return (await client.range(prefix, prefix_end(prefix), count_only=True)).count

    return asyncio.run(count())


def test_a_semaphore_acquire_parked_on_a_dead_gateway_keeps_its_place_through_another(
    gateways: Gateways,
) -> None:
    a, b = gateways.start("a"), gateways.start("b")
    with (
        gateways.client(b) as holder,
        gateways.client(a, b) as moving,
        gateways.client(b) as later,
    ):
        held = holder.Semaphore("slots", 1)
        assert held.acquire()
        moving_sem, later_sem = moving.Semaphore("slots", 1), later.Semaphore("slots", 1)
        acquirer, acquired = in_thread(lambda: moving_sem.acquire(timeout=60))
        contenders = b"sem/slots/c/"
        assert wait_until(lambda: keys_in_etcd(gateways, contenders) == 2, timeout_s=30)
        # In line behind the moving client's acquire (parked through A first).
        late, late_got = in_thread(lambda: later_sem.acquire(timeout=60))
        assert wait_until(lambda: keys_in_etcd(gateways, contenders) == 3, timeout_s=30)
        session = moving.session_id

        a.kill()

        assert wait_until(lambda: waiters_on(b, "slots") == 2, timeout_s=30), (
            f"waiters on B: {waiters_on(b, 'slots')}; acquired {acquired}; "
            f"B's log:\n{b.log[-4000:]}"
        )
        assert moving.session_id == session
        assert not acquired and not late_got
        held.release()
        acquirer.join(30)
        assert acquired == [True]  # its place in line was kept: before the later one
        assert not late_got
        assert held.get_value() == 0
        moving_sem.release()
        late.join(30)
        assert late_got == [True]
        assert held.get_value() == 0
        later_sem.release()
        assert held.get_value() == 1  # no permit counted twice, none lost


@pytest.mark.parametrize("typeid", ["Semaphore", "BoundedSemaphore"])
def test_a_permit_granted_through_a_gateway_that_died_is_the_acquire_asked_again(
    cluster: EtcdCluster, typeid: str
) -> None:
    """A's acquire was granted, its answer lost with A: asked again through B (naming
    the request it first was), it is answered with that very permit, not a second."""

    async def body(a: EtcdStore, b: EtcdStore) -> None:
        holder, s, other = new_session("holder"), new_session("moving"), new_session("other")
        loop = asyncio.get_running_loop()
        sem = a.get_or_create(typeid, "slots", {"value": 1})
        assert await call(sem, holder, "acquire")
        first = sem.methods["acquire"].fn(sem, Call(s, 5, loop, 41), True, 30)
        await call(sem, holder, "release")
        token = await first  # granted through A; its answer never reached the client

        moved = await b.resume(s.resume_token)
        assert moved is not None
        sem_b = b.get_or_create(typeid, "slots", {"value": 1})
        moved.reissuing = (5, "slots", "acquire", 41)
        again = sem_b.methods["acquire"].fn(sem_b, Call(moved, 5, loop, 97), True, 5)
        moved.reissuing = None
        assert await again == token
        assert await call(sem_b, other, "get_value") == 0
        assert await call(sem_b, other, "acquire", False) is False
        await call(sem_b, moved, "release")
        assert await call(sem_b, other, "get_value") == 1

    two_stores(cluster, body)


def test_a_condition_wait_parked_on_a_dead_gateway_keeps_its_place_through_another(
    gateways: Gateways,
) -> None:
    """Over its RLock held twice: notified through B in its place (before a later
    waiter), it holds the lock again as deep as before."""
    a, b = gateways.start("a"), gateways.start("b")
    with (
        gateways.client(b) as notifier,
        gateways.client(a, b) as moving,
        gateways.client(b) as later,
    ):
        moving_cv, later_cv, cv = (
            moving.Condition("cv"),
            later.Condition("cv"),
            notifier.Condition("cv"),
        )

        def wait_twice_held(c: Any) -> bool:
            with c, c:  # the exits release twice: it must hold as deep as before
                return bool(c.wait(timeout=60))

        waiter, waited = in_thread(lambda: wait_twice_held(moving_cv))
        waiter_keys = b"cv/cv/w/"
        assert wait_until(lambda: keys_in_etcd(gateways, waiter_keys) == 1, timeout_s=30)
        # Behind it in notify order.
        late, late_waited = in_thread(lambda: wait_twice_held(later_cv))
        assert wait_until(lambda: keys_in_etcd(gateways, waiter_keys) == 2, timeout_s=30)
        session = moving.session_id

        a.kill()

        assert wait_until(lambda: waiters_on(b, "cv") == 2, timeout_s=30), (
            f"waiters on B: {waiters_on(b, 'cv')}; waited {waited}; B's log:\n{b.log[-4000:]}"
        )
        assert moving.session_id == session
        assert not waited and not late_waited
        with cv:
            cv.notify()  # the oldest waiter: the moving client's
        waiter.join(30)
        assert waited == [True]
        assert not late_waited
        with cv:
            cv.notify()
        late.join(30)
        assert late_waited == [True]
        assert cv.acquire(blocking=False)  # let go by both, whole
        cv.release()


def test_a_condition_notified_while_its_client_moved_takes_the_lock_back(
    cluster: EtcdCluster,
) -> None:
    """Over a Lock: the wait parked through A; B takes the session over (A lets go
    of the wait, leaving its waiter key); a notify comes before the client asks
    again. Asked again through B, the wait says notified and holds the lock."""

    async def body(a: EtcdStore, b: EtcdStore) -> None:
        s, other = new_session("moving"), new_session("other")
        loop = asyncio.get_running_loop()
        a.get_or_create("Lock", "cv.l", {})
        b.get_or_create("Lock", "cv.l", {})
        cv = a.get_or_create("Condition", "cv", {"lock": "cv.l"})
        assert await call(cv, s, "acquire", thread=5)
        first = cv.methods["wait"].fn(cv, Call(s, 5, loop, 41), 60)
        waiters = cast(Any, cv).condition.waiters
        while not (await a.client.range(waiters, prefix_end(waiters))).kvs:
            await asyncio.sleep(0.01)  # until it waits

        moved = await b.resume(s.resume_token)
        assert moved is not None
        await asyncio.wait([first], timeout=30)
        assert first.cancelled()  # dropped on A once it saw the takeover
        cv_b = b.get_or_create("Condition", "cv", {"lock": "cv.l"})
        assert await call(cv_b, other, "acquire")
        await call(cv_b, other, "notify")
        await call(cv_b, other, "release")

        moved.reissuing = (5, "cv", "wait", 41)
        again = cv_b.methods["wait"].fn(cv_b, Call(moved, 5, loop, 97), 5)
        moved.reissuing = None
        assert await again is True  # the notify was not lost
        assert await call(cv_b, other, "acquire", False) is False  # held by the waiter
        await call(cv_b, moved, "release", thread=5)
        assert await call(cv_b, other, "acquire", False)
        await call(cv_b, other, "release")

    two_stores(cluster, body)


def test_a_condition_wait_that_timed_out_through_a_dead_gateway_says_so_through_another(
    cluster: EtcdCluster,
) -> None:
    """Over its RLock held twice: the wait timed out through A, its retake queued behind
    another's holding; B takes the session over. Asked again through B, the wait goes
    on with that retake: False, and the lock held twice again."""

    async def body(a: EtcdStore, b: EtcdStore) -> None:
        s, other = new_session("moving"), new_session("other")
        loop = asyncio.get_running_loop()
        cv = a.get_or_create("Condition", "cv", {})
        cv_b = b.get_or_create("Condition", "cv", {})
        assert await call(cv, s, "acquire", thread=5)
        assert await call(cv, s, "acquire", thread=5)
        first = cv.methods["wait"].fn(cv, Call(s, 5, loop, 41), 0.2)
        assert await call(cv_b, other, "acquire")  # once the wait let it go
        prefix = cast(Any, cv).lock.lock.prefix
        while len((await a.client.range(prefix, prefix_end(prefix))).kvs) < 2:
            await asyncio.sleep(0.01)  # until the timed-out wait's retake is in line

        moved = await b.resume(s.resume_token)
        assert moved is not None
        await asyncio.wait([first], timeout=30)
        assert first.cancelled()  # dropped on A once it saw the takeover
        moved.reissuing = (5, "cv", "wait", 41)
        again = cv_b.methods["wait"].fn(cv_b, Call(moved, 5, loop, 97), 60)
        moved.reissuing = None
        await call(cv_b, other, "release")
        assert await again is False  # timed out, as A would have answered
        await call(cv_b, moved, "release", thread=5)
        assert await call(cv_b, other, "acquire", False) is False  # still held once
        await call(cv_b, moved, "release", thread=5)
        assert await call(cv_b, other, "acquire", False)
        await call(cv_b, other, "release")

    two_stores(cluster, body)
