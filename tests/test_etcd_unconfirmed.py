"""A get whose answer never reached its client survives its gateway's death (issue 13).

The etcd store takes a get's items, in the take's own Txn, into records of
the calling client thread (``/m/ug/<session>/<thread>/...``, ``queues.py``),
until the thread's next call confirms it read the answer.

In process (two ``EtcdStore`` gateways on one real cluster): a get asked
again through the gateway that took the session over is handed the item
the first gateway took for it; a fresh call drops the records instead (the
answer was read); records of a session whose lease ended with nobody to
end it go back to their queue.

With real processes (``managerd serve --store etcd://...`` gateways A and
B, a real 3-node etcd): a client reaches A through a relay process that
loses A's answers on demand (as a network does when A dies with the answer
on its way). A consumer's get (blocked, then woken by a put) or get_many
is taken by A, its answer lost, A killed with SIGKILL and the relay too:
the client asks the call again through B and gets those items, each once,
and the queue does not have them any more. A gateway stopped with SIGTERM
leaves its clients' sessions to another gateway: a lock stays held with
the same fencing token.
"""

from __future__ import annotations

import asyncio
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
from test_etcd_resume import Gateways, a_id, call, gateways, in_thread, new_session, two_stores

from managerd.store.api import Call
from managerd.store.etcd.kv import prefix_end
from managerd.store.etcd.store import EtcdStore
from managerd.store.sessions import Session

from conftest import wait_until
from etcd_support import EtcdCluster, cluster

__all__ = ["cluster", "gateways"]  # the fixtures


async def records(store: EtcdStore) -> list[bytes]:
    prefix = store.root + b"ug/"
    return [kv.key for kv in (await store.client.range(prefix, prefix_end(prefix))).kvs]


async def reissued(store: EtcdStore, s: Session, handle: Any, method: str, *args: Any) -> Any:
    """The call as the managerd dialect runs a ``REISSUE`` of it."""
    s.reissuing = (0, handle.name, method, None)
    try:
        answer = handle.methods[method].fn(handle, Call(s, 0, asyncio.get_running_loop()), *args)
    finally:
        s.reissuing = None
    return await answer


def test_a_get_asked_again_through_the_new_gateway_gets_what_the_old_one_took(
    cluster: EtcdCluster,
) -> None:
    async def body(a: EtcdStore, b: EtcdStore) -> None:
        s, other = new_session("moving"), new_session("other")
        jobs = a.get_or_create("Queue", "jobs", {})
        await call(jobs, other, "put_many", [b"one", b"two", b"three", b"four"])
        assert await call(jobs, s, "get") == b"one"  # read: the next call confirms it
        assert await call(jobs, s, "get") == b"two"  # its answer lost with gateway A
        assert len(await records(a)) == 1  # the first confirmed by the second's take

        moved = await b.resume(s.resume_token)
        assert moved is not None
        jobs_b = b.get_or_create("Queue", "jobs", {})
        assert await reissued(b, moved, jobs_b, "get") == b"two"  # the same item, once
        assert await call(jobs_b, other, "qsize") == 2
        assert await call(jobs_b, moved, "get_many", 10) == [b"three", b"four"]
        assert await call(jobs_b, moved, "qsize") == 0  # confirms the get_many
        assert await records(b) == []

    two_stores(cluster, body)


def test_a_fresh_call_after_a_takeover_confirms_and_a_reissued_get_of_another_queue_takes(
    cluster: EtcdCluster,
) -> None:
    async def body(a: EtcdStore, b: EtcdStore) -> None:
        s, other = new_session("moving"), new_session("other")
        jobs, more = a.get_or_create("Queue", "jobs", {}), a.get_or_create("Queue", "more", {})
        await call(jobs, other, "put_many", [b"one", b"two"])
        await call(more, other, "put", b"else")
        assert await call(jobs, s, "get") == b"one"  # read; then the gateway died

        moved = await b.resume(s.resume_token)
        assert moved is not None
        # Asked again, a get of another queue: the records were of a call read.
        assert await reissued(b, moved, b.get_or_create("Queue", "more", {}), "get") == b"else"
        # Only the record of the reissued get stands (its answer not yet confirmed).
        [left] = await records(b)
        assert b"/more/" in left
        assert await call(b.get_or_create("Queue", "jobs", {}), other, "get") == b"two"

    two_stores(cluster, body)


def test_records_of_a_session_that_died_with_its_gateway_go_back(cluster: EtcdCluster) -> None:
    async def body(a: EtcdStore, b: EtcdStore) -> None:
        s, other = new_session("lost"), new_session("other")
        jobs = a.get_or_create("Queue", "jobs", {})
        await call(jobs, other, "put_many", [b"one", b"two"])
        assert await call(jobs, s, "get_many", 1) == [b"one"]
        etcd_session = await a._leases.pop(s)
        await etcd_session.abandon()
        await a.client.lease_revoke(etcd_session.lease_id)  # as its TTL would end it
        jobs_b = b.get_or_create("Queue", "jobs", {})
        for _ in range(200):  # the requeue loop of either gateway (every second)
            if await call(jobs_b, other, "qsize") == 2:
                break
            await asyncio.sleep(0.05)
        assert await call(jobs_b, other, "get_many", 10) == [b"one", b"two"]  # its place
        assert [k for k in await records(b) if etcd_session.sid.encode() in k] == []

    two_stores(cluster, body)


def test_records_of_a_session_ended_by_its_gateway_are_dropped(cluster: EtcdCluster) -> None:
    """Its client read them (an answer it gave up was undone by its cancel)."""

    async def body(a: EtcdStore, b: EtcdStore) -> None:
        s, other = new_session("done"), new_session("other")
        jobs = a.get_or_create("Queue", "jobs", {})
        await call(jobs, other, "put_many", [b"one", b"two"])
        assert await call(jobs, s, "get") == b"one"
        before = asyncio.all_tasks()
        a.release(s)
        await asyncio.gather(*(asyncio.all_tasks() - before), return_exceptions=True)
        assert await records(a) == []
        assert await call(jobs, other, "get_many", 10) == [b"two"]

    two_stores(cluster, body)


# -- real processes -------------------------------------------------------------------

RELAY = r"""
import signal, socket, sys, threading
target = (sys.argv[1], int(sys.argv[2]))
held = threading.Event()
held_up = threading.Event()
def told(event):
    def handler(*_):
        event.set()
        print("set", flush=True)  # the test goes on only once the relay loses bytes
    return handler
signal.signal(signal.SIGUSR1, told(held))
signal.signal(signal.SIGUSR2, told(held_up))
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)

def pump(src, dst, lossy):
    try:
        while data := src.recv(65536):
            if lossy.is_set():
                continue  # lost on its way
            dst.sendall(data)
    except OSError:
        pass

while True:
    client, _ = listener.accept()
    upstream = socket.create_connection(target)
    for s in (client, upstream):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    threading.Thread(target=pump, args=(client, upstream, held_up), daemon=True).start()
    threading.Thread(target=pump, args=(upstream, client, held), daemon=True).start()
"""


class Relay:
    """A TCP relay to ``address`` that loses every reply once told to (SIGUSR1), or
    every request (SIGUSR2)."""

    def __init__(self, address: str) -> None:
        host, port = address.rsplit(":", 1)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", RELAY, host, port], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        self.address = f"127.0.0.1:{int(self.proc.stdout.readline())}"

    def lose_replies(self) -> None:
        self._tell(signal.SIGUSR1)

    def lose_requests(self) -> None:
        self._tell(signal.SIGUSR2)

    def _tell(self, sig: int) -> None:
        """A signal is handled some time after it is sent: wait until the relay says so."""
        assert self.proc.stdout is not None
        self.proc.send_signal(sig)
        assert self.proc.stdout.readline() == "set\n"

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def depth(m: Any, name: str) -> int:
    return int(m.Queue(name).qsize())


@pytest.mark.parametrize("method", ["get", "get_many"])
def test_a_get_whose_answer_died_with_its_gateway_is_delivered_once(
    gateways: Gateways, method: str
) -> None:
    a, b = gateways.start("a"), gateways.start("b")
    relay = Relay(a.address)
    try:
        with gateways.client(relay.address, b) as m, gateways.client(b) as producer:
            jobs = m.Queue("jobs")
            assert m.server_id == a_id(a)
            session = m.session_id
            if method == "get":
                # Blocked through A; the put through B wakes it; A's answer is lost.
                getter, got = in_thread(lambda: jobs.get(timeout=120))
                assert wait_until(lambda: _waiters(a, "jobs") == 1, timeout_s=30)
                relay.lose_replies()
                producer.Queue("jobs").put_many(["job-1", "job-2"])
                expected: Any = "job-1"
                left = 1
            else:
                producer.Queue("jobs").put_many(["job-1", "job-2", "job-3"])
                assert jobs.qsize() == 3  # the proxy's handle resolved (protocol 2) through A
                relay.lose_replies()
                getter, got = in_thread(lambda: jobs.get_many(2, timeout=120))
                expected = ["job-1", "job-2"]
                left = 1
            # A took the item(s): the queue holds only what is left, nobody waits.
            assert wait_until(
                lambda: depth(producer, "jobs") == left and _waiters(a, "jobs") == 0,
                timeout_s=30,
            )
            a.kill()
            relay.kill()  # the answer is gone; the client asks again through B
            getter.join(60)
            assert got == [expected]
            assert m.session_id == session
            assert jobs.qsize() == left  # never delivered twice: not back in the queue
            rest = producer.Queue("jobs").get_many(10, timeout=5)
            assert rest == (["job-2"] if method == "get" else ["job-3"])
    finally:
        relay.kill()


def _waiters(gateway: Any, name: str) -> int:
    with gateway.connect() as m:
        return int(m.status()["objects"].get(name, {}).get("waiters", 0))


def test_a_get_read_before_its_gateway_died_is_not_delivered_again(gateways: Gateways) -> None:
    a, b = gateways.start("a"), gateways.start("b")
    with gateways.client(a, b) as m, gateways.client(b) as producer:
        producer.Queue("jobs").put_many(["job-1", "job-2"])
        jobs = m.Queue("jobs")
        assert jobs.get(timeout=10) == "job-1"  # read; no next call through A
        a.kill()
        # The client sees A hung up before it calls again (it spent a moment with
        # its item), so the get goes to B as a new call: it confirms job-1.
        assert wait_until(lambda: m._channel is not None and m._channel.peer_closed())
        assert jobs.get(timeout=10) == "job-2"
        with pytest.raises(queue.Empty):
            producer.Queue("jobs").get(timeout=0.5)


def test_a_gateway_stopped_with_sigterm_leaves_its_sessions_to_another(
    gateways: Gateways,
) -> None:
    a, b = gateways.start("a"), gateways.start("b")
    with gateways.client(a, b) as m, gateways.client(b) as other:
        lock = m.Lock("db")
        assert lock.acquire()
        token = lock.fencing_token
        session = m.session_id
        assert m.server_id == a_id(a)
        getter, got = in_thread(lambda: m.Queue("jobs").get(timeout=120))
        assert wait_until(lambda: _waiters(a, "jobs") == 1, timeout_s=30)
        a.stop()  # SIGTERM: it stops serving and renewing, and revokes nothing
        assert lock._call("fencing_token") == token  # through B, the same holding
        assert m.session_id == session and m.server_id != a_id(a)
        assert not other.Lock("db").acquire(blocking=False)
        # The blocked get was dropped unanswered (not ServerShuttingDown): asked again.
        assert wait_until(lambda: _waiters(b, "jobs") == 1, timeout_s=30)
        other.Queue("jobs").put("job-1")
        getter.join(60)
        assert got == ["job-1"]
        lock.release()
        assert other.Lock("db").acquire(blocking=False)


def test_the_next_call_of_the_thread_confirms_in_its_own_txn(cluster: EtcdCluster) -> None:
    """A get's take and a put carry the deletes of the thread's last get's records."""

    async def body(a: EtcdStore, b: EtcdStore) -> None:
        s = new_session("consumer")
        jobs = a.get_or_create("Queue", "jobs", {})
        await call(jobs, s, "put_many", [b"one", b"two"])
        assert await call(jobs, s, "get") == b"one"
        assert await call(jobs, s, "get", thread=1) == b"two"  # another thread's own
        assert len(await records(a)) == 2
        await call(jobs, s, "put", b"three")  # thread 0 read "one"
        [left] = await records(a)
        assert b"/1/jobs/" in left
        assert await call(jobs, s, "get_many", 5, thread=1) == [b"three"]
        [now] = await records(a)  # the record of "three" only
        assert b"/1/jobs/" in now and now != left

    two_stores(cluster, body)


def test_a_get_read_then_a_get_lost_on_its_way_delivers_each_item_once(
    gateways: Gateways,
) -> None:
    """The thread read job-1 through A; its next get never reached A (lost on its way),
    so job-1's record was never confirmed; A dies; the get is asked again through B.
    It names the request it was, and job-1 was taken for an earlier one: B takes
    job-2 (handing job-1 again, by queue and method alone, delivered it twice)."""
    a, b = gateways.start("a"), gateways.start("b")
    relay = Relay(a.address)
    try:
        with gateways.client(relay.address, b) as m, gateways.client(b) as producer:
            producer.Queue("jobs").put_many(["job-1", "job-2", "job-3"])
            jobs = m.Queue("jobs")
            assert m.server_id == a_id(a)
            session = m.session_id
            read, lost = threading.Event(), threading.Event()

            def consumer() -> list[Any]:
                first = jobs.get(timeout=10)
                read.set()
                lost.wait(30)
                return [first, jobs.get(timeout=120)]  # the same client thread

            getter, got = in_thread(consumer)
            assert read.wait(30)
            relay.lose_requests()
            lost.set()
            # Sent (into the relay, which drops it); A never saw it.
            assert wait_until(lambda: m._channel is not None and bool(m._channel._calling))
            time.sleep(0.2)
            assert depth(producer, "jobs") == 2
            a.kill()
            relay.kill()
            getter.join(60)
            assert got == [["job-1", "job-2"]]
            assert m.session_id == session
            assert producer.Queue("jobs").get_many(10, timeout=5) == ["job-3"]
    finally:
        relay.kill()
