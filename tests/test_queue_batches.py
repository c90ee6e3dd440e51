"""The embedded store's batch paths of a queue, on a real daemon.

``put_many`` queues a batch in one step once no getter is parked, and
``get_many`` takes a run of items at once: these tests pin down what each
must still do as the one-item-at-a-time path did — hand the first items to
parked getters in the order they came, give back returned (nacked) items as
their payloads, count every item, and journal a batch so that a restart
brings back exactly the items not taken, in order.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Any

import pytest

from managerd_client import Manager

import workers
from conftest import Daemon, wait_until


def _object(m: Manager, name: str) -> dict[str, Any]:
    described: dict[str, Any] = m.status()["objects"][name]
    return described


def test_put_many_serves_parked_getters_in_order_then_queues_the_rest(
    shared_daemon: Daemon, manager: Manager, uniq: str
) -> None:
    q = manager.JoinableQueue(uniq)
    got: dict[str, Any] = {}
    others = [shared_daemon.connect() for _ in range(2)]

    def get_one(m: Manager, tag: str, many: bool) -> None:
        theirs = m.JoinableQueue(uniq)
        got[tag] = (
            theirs.get_many(10, timeout=workers.WAIT_S)
            if many
            else theirs.get(timeout=workers.WAIT_S)
        )

    threads = []
    for i, (m, many) in enumerate(zip(others, (False, True), strict=True)):
        t = threading.Thread(target=get_one, args=(m, f"g{i}", many))
        t.start()
        threads.append(t)
        # Parked one after the other: the first parked is the first served.
        assert wait_until(lambda n=i + 1: _object(manager, uniq)["waiters"] == n)
    q.put_many(list(range(20)))
    for t in threads:
        t.join(10)
    for m in others:
        m.close()
    assert got == {"g0": 0, "g1": [1]}  # a parked get_many takes what arrives first
    assert q.qsize() == 18
    assert q.get_many(5) == [2, 3, 4, 5, 6]  # fewer than are queued
    assert q.get_many(100) == list(range(7, 20))  # all that are queued
    described = _object(manager, uniq)
    assert (described["puts_total"], described["gets_total"]) == (20, 20)
    for _ in range(19):
        q.task_done()
    with pytest.raises(TimeoutError):
        q.join(timeout=0.05)  # one of the 20 is unfinished
    q.task_done()
    q.join(timeout=workers.WAIT_S)


def test_get_many_hands_out_returned_items_as_their_values(manager: Manager, uniq: str) -> None:
    q = manager.Queue(uniq)
    q.put_many([f"item{i}" for i in range(12)])
    first, second = q.reserve(timeout=1), q.reserve(timeout=1)
    second.nack()
    first.nack()  # back at the front, before the second: first, second, item2...
    assert q.get_many(3) == ["item0", "item1", "item2"]  # a run with returned ones in it
    q.reserve(timeout=1).nack()
    assert q.get_many(100) == [f"item{i}" for i in range(3, 12)]
    with_returned = [f"late{i}" for i in range(10)]
    q.put_many(with_returned)
    q.reserve(timeout=1).nack()
    assert q.get_many(100) == with_returned  # the whole queue, a returned item first


def test_a_put_many_waiting_for_room_is_queued_whole_when_a_get_many_makes_room(
    shared_daemon: Daemon, manager: Manager, uniq: str
) -> None:
    q = manager.Queue(uniq, maxsize=10)
    q.put_many(list(range(10)))
    errors: list[BaseException] = []
    other = shared_daemon.connect()

    def put_batch() -> None:
        try:
            other.Queue(uniq).put_many(list(range(10, 16)), timeout=workers.WAIT_S)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=put_batch)
    t.start()
    assert wait_until(lambda: _object(manager, uniq)["waiters"] == 1)
    assert q.get_many(5) == [0, 1, 2, 3, 4]
    assert q.qsize() == 5  # room for five of six: the batch waits whole
    assert q.get_many(1) == [5]
    t.join(10)
    other.close()
    assert not t.is_alive() and errors == []
    assert q.full()
    assert q.get_many(100) == list(range(6, 16))
    assert _object(manager, uniq)["puts_total"] == 16


def test_batches_come_back_after_a_restart_exactly_as_left(tmp_path: Path) -> None:
    d = Daemon(tmp_path, args=["--data-dir", str(tmp_path / "data"), "--fsync", "always"]).start()
    try:
        with d.connect() as m:
            q = m.JoinableQueue("batches")
            q.put_many([("a", i) for i in range(1000)])
            q.put_many([("b", i) for i in range(500)])
            assert q.get_many(300) == [("a", i) for i in range(300)]
            q.reserve(timeout=1).nack()  # ("a", 300) is a returned item now
            for _ in range(300):
                q.task_done()
        d.kill()  # no snapshot at exit: the journal alone brings them back
        d.start(port=d.port)
        with d.connect() as m:
            q = m.JoinableQueue("batches")
            assert q.qsize() == 1200
            expected = [("a", i) for i in range(300, 1000)] + [("b", i) for i in range(500)]
            assert q.get_many(2000) == expected
            # 1,200 unfinished were counted back from the journal, no more.
            for _ in range(1200):
                q.task_done()
            q.join(timeout=workers.WAIT_S)
            with pytest.raises(ValueError):
                q.task_done()
            with pytest.raises(queue.Empty):
                q.get(block=False)
    finally:
        d.stop()
