"""Queues and joinable queues across client processes, on a real daemon.

Also: get-or-create by name, proxies passed to child processes and through
a queue, batches, and acknowledged delivery with ``reserve()``.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Any

import pytest

from managerd_client import ArgumentConflict, Manager, Message, ObjectTypeConflict

import workers
from conftest import Daemon, wait_until


def _object(m: Manager, name: str) -> dict[str, Any]:
    """The daemon's own description of ``name`` (depth, waiters, reserved)."""
    described: dict[str, Any] = m.status()["objects"][name]
    return described


# -- across processes -------------------------------------------------------------------------


def test_producers_and_consumers_receive_every_item_once(shared_daemon: Daemon, uniq: str) -> None:
    name, out = uniq, uniq + ".out"
    addr, key = shared_daemon.address, shared_daemon.authkey
    n_producers, n_consumers, per_producer = 3, 2, 150
    batches = [[(p, i) for i in range(per_producer)] for p in range(n_producers)]
    with shared_daemon.connect() as m:
        q = m.Queue(name)
        consumers = workers.start_all(workers.consume, [(addr, key, name, out)] * n_consumers)
        producers = workers.start_all(workers.produce, [(addr, key, name, b) for b in batches])
        workers.join_all(producers)
        for _ in range(n_consumers):
            q.put(None)
        workers.join_all(consumers)
        received = m.list(out).copy()
        assert sorted(received) == sorted(item for b in batches for item in b)
        assert len(received) == len(set(received)) == n_producers * per_producer
        assert q.empty()


def test_joinable_queue_join_waits_for_task_done(shared_daemon: Daemon, uniq: str) -> None:
    name, out = uniq, uniq + ".out"
    with shared_daemon.connect() as m:
        q = m.JoinableQueue(name)
        results = m.dict(out)
        q.put_many(range(40))
        procs = workers.start_all(
            workers.joinable_worker, [(shared_daemon.address, shared_daemon.authkey, name, out)] * 2
        )
        q.join(timeout=workers.WAIT_S)
        # join() returned: every item was task_done, and each worker records
        # its result before task_done.
        assert results.copy() == {i: i * i for i in range(40)}
        q.put(None)
        q.put(None)
        workers.join_all(procs)
        q.join(timeout=5)
        with pytest.raises(ValueError, match="too many times"):
            q.task_done()


def test_joinable_queue_join_timeout(manager: Manager, uniq: str) -> None:
    q = manager.JoinableQueue(uniq)
    q.put("x")
    assert q.get() == "x"
    with pytest.raises(TimeoutError):
        q.join(timeout=0.1)
    q.task_done()
    q.join(timeout=0.1)


def test_blocked_put_completes_when_another_process_makes_room(
    shared_daemon: Daemon, uniq: str
) -> None:
    name, ready = uniq, uniq + ".ready"
    with shared_daemon.connect() as m:
        q = m.Queue(name, maxsize=1)
        q.put("first")
        proc = workers.start(
            workers.put_when_full, shared_daemon.address, shared_daemon.authkey, name, "second",
            ready,
        )  # fmt: skip
        assert m.Event(ready).wait(timeout=workers.WAIT_S)
        assert wait_until(lambda: _object(m, name)["waiters"] == 1)
        assert q.qsize() == 1
        assert q.get(timeout=5) == "first"
        assert q.get(timeout=workers.WAIT_S) == "second"
        workers.join_all([proc])


# -- the stdlib surface -------------------------------------------------------------------------


def test_queue_surface(manager: Manager, uniq: str) -> None:
    q = manager.Queue(uniq, maxsize=2)
    assert q.empty() and not q.full() and q.qsize() == 0
    q.put_nowait({"a": 1})
    q.put([1, 2])
    assert q.qsize() == 2 and q.full() and not q.empty()
    with pytest.raises(queue.Full):
        q.put_nowait(3)
    with pytest.raises(queue.Full):
        q.put(3, block=False)
    assert q.get_nowait() == {"a": 1}  # FIFO
    assert q.get(block=False) == [1, 2]
    with pytest.raises(queue.Empty):
        q.get_nowait()
    with pytest.raises(queue.Empty):
        q.get(block=False)
    q.put(None)
    assert q.get() is None  # None is an item like any other


def test_queue_maxsize_zero_or_negative_is_unbounded(manager: Manager, uniq: str) -> None:
    for maxsize in (0, -1):
        q = manager.Queue(f"{uniq}{maxsize}", maxsize=maxsize)  # as queue.Queue
        q.put_many(range(20), timeout=1)
        q.put_nowait(20)
        q.put(21, timeout=1)
        assert q.qsize() == 22 and not q.full()
        assert q.get_many(100) == list(range(22))


def test_queue_timeouts(manager: Manager, uniq: str) -> None:
    q = manager.Queue(uniq, maxsize=1)
    with pytest.raises(queue.Empty):
        q.get(timeout=0.1)
    q.put("x")
    with pytest.raises(queue.Full):
        q.put("y", timeout=0.1)
    with pytest.raises(ValueError):
        q.get(timeout=-1)
    assert q.qsize() == 1
    assert q.get(timeout=1) == "x"


def test_queue_items_of_any_picklable_class(manager: Manager, uniq: str) -> None:
    q = manager.Queue(uniq)
    item = threading.BrokenBarrierError("not builtin data")  # the daemon never decodes it
    q.put(item)
    got = q.get(timeout=1)
    assert type(got) is threading.BrokenBarrierError and got.args == item.args


# -- get-or-create by name ---------------------------------------------------------------------


def test_get_or_create_by_name(shared_daemon: Daemon, uniq: str) -> None:
    with shared_daemon.connect() as m1, shared_daemon.connect() as m2:
        q1 = m1.Queue(uniq, maxsize=5)
        q1.put("from m1")
        assert m2.Queue(uniq).get(timeout=1) == "from m1"
        with pytest.raises(ArgumentConflict):
            m2.Queue(uniq, maxsize=10)
        q2 = m2.Queue(uniq, maxsize=5)  # the same arguments are no conflict
        q2.put_many(range(5))
        assert m2.Queue(uniq).full()  # attached without arguments: still maxsize 5
        with pytest.raises(ObjectTypeConflict):
            m2.dict(uniq)
        with pytest.raises(ObjectTypeConflict):
            m2.JoinableQueue(uniq)


# -- proxies travel -------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_proxies_passed_to_a_child_process(shared_daemon: Daemon, uniq: str, method: str) -> None:
    with shared_daemon.connect() as m:
        q, d, lock, value = m.Queue(uniq), m.dict(uniq + ".d"), m.Lock(uniq + ".lock"), 42
        q.put("hello")
        proc = workers.start(workers.use_passed_proxies, q, d, lock, value, method=method)
        workers.join_all([proc])
        assert d["child"] == "hello"
        assert q.get(timeout=5) == ("reply", 42)
        assert not lock.locked()
        q.put("parent still works")
        assert q.get(timeout=1) == "parent still works"


def test_proxy_sent_through_a_queue(shared_daemon: Daemon, uniq: str) -> None:
    with shared_daemon.connect() as m:
        d = m.dict(uniq + ".d")
        m.Queue(uniq).put((d, "key", {"nested": [1, 2]}))
        proc = workers.start(
            workers.relay_proxy, shared_daemon.address, shared_daemon.authkey, uniq
        )
        workers.join_all([proc])
        assert d.copy() == {"key": {"nested": [1, 2]}}


# -- batches -------------------------------------------------------------------------------------


def test_put_many_get_many(manager: Manager, uniq: str) -> None:
    q = manager.Queue(uniq)
    q.put_many([1, "two", (3,)])
    q.put_many(x for x in [4, 5])
    assert q.qsize() == 5
    assert q.get_many(3) == [1, "two", (3,)]
    assert q.get_many(10) == [4, 5]
    with pytest.raises(queue.Empty):
        q.get_many(2, timeout=0.1)
    with pytest.raises(queue.Empty):
        q.get_many(2, block=False)
    with pytest.raises(ValueError):
        q.get_many(0)


def test_put_many_is_all_or_nothing_on_a_bounded_queue(manager: Manager, uniq: str) -> None:
    q = manager.Queue(uniq, maxsize=3)
    with pytest.raises(ValueError):
        q.put_many(range(4))  # can never fit
    q.put("a")
    q.put("b")
    with pytest.raises(queue.Full):
        q.put_many(["x", "y"], timeout=0.1)
    assert q.get_many(5) == ["a", "b"]


def test_blocked_put_many_waits_for_room_for_all_items(
    shared_daemon: Daemon, manager: Manager, uniq: str
) -> None:
    q = manager.Queue(uniq, maxsize=3)
    q.put_many(["a", "b", "c"])
    errors: list[BaseException] = []
    other = shared_daemon.connect()  # another client: its own connection

    def put_two() -> None:
        try:
            other.Queue(uniq).put_many(["x", "y"], timeout=workers.WAIT_S)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=put_two)
    t.start()
    assert wait_until(lambda: _object(manager, uniq)["waiters"] == 1)
    assert q.get() == "a"
    # Room for one of the two: the batch must keep waiting, the bound holds.
    assert q.qsize() == 2
    assert _object(manager, uniq)["waiters"] == 1
    assert q.get() == "b"
    t.join(10)
    other.close()
    assert not t.is_alive() and errors == []
    assert q.qsize() == 3
    assert q.get_many(3) == ["c", "x", "y"]


@pytest.mark.parametrize("how", ["timeout", "client killed"])
def test_put_behind_a_put_many_that_gave_up_is_admitted(
    shared_daemon: Daemon, manager: Manager, uniq: str, how: str
) -> None:
    q = manager.Queue(uniq, maxsize=3)
    q.put_many(["a", "b"])
    # Room for one: a batch of two (in another process) waits at the head
    # of the line...
    big_timeout_s = 2.0 if how == "timeout" else workers.WAIT_S
    big = workers.start(
        workers.put_many_until,
        shared_daemon.address, shared_daemon.authkey, uniq, ["x", "y"], big_timeout_s,
    )  # fmt: skip
    assert wait_until(lambda: _object(manager, uniq)["waiters"] == 1)
    # ...and a put of one waits behind it, though it would fit.
    outcome: list[BaseException | None] = []
    with shared_daemon.connect() as small_client:
        small_q = small_client.Queue(uniq)

        def put_small() -> None:
            try:
                small_q.put("z", timeout=workers.WAIT_S)
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        small = threading.Thread(target=put_small)
        small.start()
        assert wait_until(lambda: _object(manager, uniq)["waiters"] == 2)
        if how == "timeout":
            workers.join_all([big])  # exit code 0: its put_many raised queue.Full
        else:
            big.kill()  # its session ends and its waiter is cancelled
            big.join(workers.JOIN_TIMEOUT_S)
        # The batch that held the line is gone: the single put goes in.
        small.join(workers.JOIN_TIMEOUT_S)
        assert not small.is_alive() and outcome == [None]
    assert q.get_many(3) == ["a", "b", "z"]


# -- acknowledged delivery ---------------------------------------------------------------------


def test_reserve_ack(manager: Manager, uniq: str) -> None:
    q = manager.Queue(uniq, visibility_timeout_s=0.5)
    q.put({"job": 1})
    msg = q.reserve(timeout=1)
    assert isinstance(msg, Message)
    assert msg.value == {"job": 1} and msg.deliveries == 1
    assert q.qsize() == 0 and _object(manager, uniq)["reserved"] == 1
    msg.ack()
    assert _object(manager, uniq)["reserved"] == 0
    with pytest.raises(queue.Empty):
        q.reserve(timeout=0.8)  # past the visibility timeout: acked means gone
    with pytest.raises(ValueError):
        msg.ack()


def test_reserve_nack_puts_back_at_the_front(manager: Manager, uniq: str) -> None:
    q = manager.Queue(uniq)
    q.put_many(["first", "second"])
    msg = q.reserve(timeout=1)
    assert msg.value == "first"
    msg.nack()
    again = q.reserve(timeout=1)
    assert again.value == "first" and again.deliveries == 2
    again.ack()
    assert q.get(timeout=1) == "second"


def test_unacked_message_is_redelivered_after_visibility_timeout(
    manager: Manager, uniq: str
) -> None:
    q = manager.Queue(uniq, visibility_timeout_s=0.5)
    q.put("job")
    first = q.reserve(timeout=1)
    second = q.reserve(timeout=10)  # waits until the first delivery times out
    assert second.value == "job" and second.deliveries == 2
    with pytest.raises(ValueError):
        first.ack()  # that delivery is over
    second.ack()
    assert q.empty()


def test_message_context_manager(manager: Manager, uniq: str) -> None:
    q = manager.Queue(uniq)
    q.put_many(["ok", "boom"])
    with q.reserve(timeout=1) as msg:
        assert msg.value == "ok"
    with pytest.raises(RuntimeError), q.reserve(timeout=1) as msg:
        assert msg.value == "boom"
        raise RuntimeError("handler failed")
    back = q.reserve(timeout=1)  # nacked by the failure, acked by the success
    assert back.value == "boom" and back.deliveries == 2
    back.ack()
    assert q.empty() and _object(manager, uniq)["reserved"] == 0


def test_max_deliveries_moves_to_dead_letter_queue(manager: Manager, uniq: str) -> None:
    q = manager.Queue(uniq, visibility_timeout_s=0.5, max_deliveries=2)
    q.put_many(["poison", "fine"])
    q.reserve(timeout=1).nack()
    msg = q.reserve(timeout=1)
    assert msg.value == "poison" and msg.deliveries == 2
    msg.nack()
    dead = manager.Queue(uniq + ".dead")
    assert dead.get(timeout=1) == "poison"
    nxt = q.reserve(timeout=1)
    assert nxt.value == "fine" and nxt.deliveries == 1
    # A delivery that times out counts too.
    nxt2 = q.reserve(timeout=10)
    assert nxt2.value == "fine" and nxt2.deliveries == 2
    assert dead.get(timeout=10) == "fine"
    assert q.empty()


def test_dead_lettered_item_of_a_joinable_queue_counts_as_done(manager: Manager, uniq: str) -> None:
    # The consumer calls task_done() after ack() only: an item that went to
    # the dead-letter queue will never be acked, so it must not hold join().
    q = manager.JoinableQueue(uniq, max_deliveries=1)
    q.put_many(["poison", "dropped", "fine"])
    q.reserve(timeout=1).nack()  # delivered max_deliveries times: dead
    q.reserve(timeout=1).nack(requeue=False)  # dead-lettered on purpose
    with q.reserve(timeout=1) as msg:
        assert msg.value == "fine"
    q.task_done()
    q.join(timeout=5)
    assert manager.Queue(uniq + ".dead").get_many(5) == ["poison", "dropped"]
    with pytest.raises(ValueError):
        q.task_done()


def test_reservation_of_a_finished_process_comes_back(shared_daemon: Daemon, uniq: str) -> None:
    name, out = uniq, uniq + ".out"
    with shared_daemon.connect() as m:
        q = m.Queue(name)  # default visibility timeout: 30 s, far beyond this test
        q.put("job")
        proc = workers.start(
            workers.reserve_and_exit, shared_daemon.address, shared_daemon.authkey, name, out
        )
        workers.join_all([proc])
        assert m.Queue(out).get(timeout=1) == "job"
        msg = q.reserve(timeout=10)  # back when the worker's session ended
        assert msg.value == "job" and msg.deliveries == 2
        msg.ack()


# -- large payloads (spliced into requests, sent raw in replies) ----------------------------------


def test_large_payloads_round_trip_every_way(manager: Manager, uniq: str) -> None:
    blob = os.urandom(1 << 20)
    obj = {"blob": blob, "list": list(range(50_000)), "text": "é" * 100_000}
    q = manager.Queue(uniq)
    q.put(blob)
    q.put(obj)
    q.put(bytearray(blob))  # not bytes: pickled in the envelope as before
    assert q.get(timeout=5) == blob
    assert q.get(timeout=5) == obj
    assert q.get(timeout=5) == bytearray(blob)
    d = manager.dict(uniq + ".d")
    d[b"\x00managerd:splice"] = blob  # a key that looks like the splice marker
    assert d[b"\x00managerd:splice"] == blob
    assert d.pop(b"\x00managerd:splice") == blob
    assert d.setdefault("k", blob) == blob
    lst = manager.list(uniq + ".l")
    lst.append(blob)
    assert lst[0] == blob and lst.pop(0) == blob


def test_large_payload_holding_a_proxy_is_rebuilt_on_the_same_connection(
    manager: Manager, uniq: str
) -> None:
    # Unpickling the payload rebuilds the proxy, which calls the daemon on this
    # very connection: that must not wait for the read that delivered it.
    d = manager.dict(uniq + ".d")
    q = manager.Queue(uniq)
    q.put((d, os.urandom(300_000)))
    proxy, blob = q.get(timeout=5)
    proxy["seen"] = len(blob)
    assert d["seen"] == 300_000


def test_large_payloads_from_threads_sharing_one_connection(manager: Manager, uniq: str) -> None:
    blobs = [bytes([i]) * (200_000 + i) for i in range(8)]
    q = manager.Queue(uniq)
    got: list[bytes] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        for _ in range(10):
            q.put(blobs[i])
            item = q.get(timeout=10)
            with lock:
                got.append(item)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(got) == sorted(b for b in blobs for _ in range(10))
