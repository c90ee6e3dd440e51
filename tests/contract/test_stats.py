"""What a store tells: ``stats()`` snapshots, whole values, and the deadlocks that stand.

Metrics, ``managerd status`` and the web page read only these
(``store/stats.py``), so every store must keep them true to the objects:
a queue's depth, reservations, unfinished tasks and counters; a lock's
holder and token; a semaphore's value and holders; waiters everywhere.
"""

from __future__ import annotations

from typing import Any

import pytest

from managerd.store.stats import (
    BarrierStats,
    EventStats,
    LockStats,
    PipeStats,
    QueueStats,
    SemaphoreStats,
    SizeStats,
    ValueStats,
)

from contract.harness import StoreHarness


def test_queue_stats(store: StoreHarness) -> None:
    q = store.open("Queue", "q", maxsize=5)
    store.call(q, "put_many", [1, 2, 3])
    store.call(q, "get")
    store.call(q, "reserve")
    stats = store.stats(q)
    assert isinstance(stats, QueueStats)
    assert (stats.name, stats.typeid) == ("q", "Queue")
    assert stats.args["maxsize"] == 5
    assert (stats.depth, stats.reserved, stats.waiters) == (1, 1, 0)
    assert (stats.puts_total, stats.gets_total, stats.unfinished) == (3, 2, 3)
    empty = store.open("Queue", "empty")
    store.start(empty, "get")
    stats = store.stats(empty)
    assert isinstance(stats, QueueStats) and stats.waiters == 1


def test_lock_and_semaphore_stats(store: StoreHarness) -> None:
    lock, sem = store.open("Lock", "l"), store.open("Semaphore", "s", value=2)
    holder = store.new_client()
    token = store.call(lock, "acquire", client=holder)
    waiter = store.start(lock, "acquire")
    store.call(sem, "acquire", client=holder)
    lstats, sstats = store.stats(lock), store.stats(sem)
    assert isinstance(lstats, LockStats) and isinstance(sstats, SemaphoreStats)
    assert lstats.holder is not None and lstats.token == token
    assert (lstats.waiters, lstats.acquires_total) == (1, 1)
    assert (sstats.value, sstats.held, len(sstats.holders)) == (1, 1, 1)
    store.end_session(holder)
    assert waiter.result() > token  # the waiter holds it now
    lstats, sstats = store.stats(lock), store.stats(sem)
    assert isinstance(lstats, LockStats) and isinstance(sstats, SemaphoreStats)
    assert lstats.token > token and lstats.waiters == 0  # the waiter holds it now
    assert (sstats.value, sstats.held, sstats.holders) == (2, 0, ())


def test_other_stats(store: StoreHarness) -> None:
    ev, bar = store.open("Event", "e"), store.open("Barrier", "b", parties=3)
    pipe, d = store.open("Pipe", "p"), store.open("dict", "d", contents={"a": 1})
    v = store.open("Value", "v", typecode="d", value=2.5)
    store.call(ev, "set")
    store.start(bar, "wait")
    store.call(pipe, "send", 0, "m")
    store.call(pipe, "close", 0)
    expected: list[tuple[Any, type, dict[str, Any]]] = [
        (ev, EventStats, {"set": True, "waiters": 0}),
        (bar, BarrierStats, {"waiters": 1, "broken": False}),
        (pipe, PipeStats, {"buffered": (0, 1), "closed": (True, False)}),
        (d, SizeStats, {"len": 1}),
        (v, ValueStats, {"value": 2.5}),
    ]
    for obj, kind, fields in expected:
        stats = store.stats(obj)
        assert isinstance(stats, kind), stats
        assert {k: getattr(stats, k) for k in fields} == fields, stats


def test_store_stats_list_every_object(store: StoreHarness) -> None:
    for name in ("a", "b", "c"):
        store.open("Queue", name)
    store.delete("b")
    assert [s.name for s in store.all_stats().objects] == ["a", "c"]


def test_snapshots_are_whole_values(store: StoreHarness) -> None:
    q = store.open("Queue", "q")
    store.call(q, "put_many", [1, "two"])
    assert store.snapshot(q) == [1, "two"]
    assert store.snapshot(store.open("dict", "d", contents={"k": [1]})) == {"k": [1]}
    assert store.snapshot(store.open("list", "l", contents=[3, 4])) == [3, 4]
    assert store.snapshot(store.open("Namespace", "n", contents={"x": 1})) == {"x": 1}
    assert store.snapshot(store.open("Array", "a", typecode="i", sequence=[1, 2])) == [1, 2]
    assert store.snapshot(store.open("Value", "v", typecode="i", value=7)) == 7
    assert store.call(q, "qsize") == 2  # nothing taken
    did, _, _ = store.call(q, "reserve", 5.0)
    assert store.snapshot(q) == ["two"]  # what waits: not the reserved item
    store.call(q, "nack", did)
    assert store.snapshot(q) == [1, "two"]
    with pytest.raises(TypeError, match="no value to copy"):
        store.snapshot(store.open("Lock", "lock"))


def test_would_hand_out_takes_nothing(store: StoreHarness) -> None:
    d = store.open("dict", "d", contents={"a": 1, "b": 2})
    lst = store.open("list", "l", contents=["x", "y"])
    if store.kind == "etcd":
        # Not read at once (a round trip): nothing is named, nothing taken (the stock
        # dialect's decode-first check is not made; store/etcd/store.py).
        assert store.would_hand_out(d, "pop", "a") is None
        assert store.call(d, "__len__") == 2 and store.call(lst, "__len__") == 2
        return
    assert store.would_hand_out(d, "pop", "a") == 1
    assert store.would_hand_out(d, "pop", "zz") is None
    assert store.would_hand_out(d, "popitem") == 2  # the last, as popitem takes
    assert store.would_hand_out(lst, "pop") == "y"
    assert store.would_hand_out(lst, "pop", 0) == "x"
    assert store.would_hand_out(lst, "pop", 9) is None
    assert store.call(d, "__len__") == 2 and store.call(lst, "__len__") == 2


def test_a_deadlock_stands_until_a_wait_ends(store: StoreHarness) -> None:
    a, b = store.open("Lock", "a"), store.open("Lock", "b")
    one, two = store.new_client(), store.new_client()
    store.call(a, "acquire", client=one)
    store.call(b, "acquire", client=two)
    store.start(b, "acquire", client=one)
    assert store.deadlocks() == []
    store.start(a, "acquire", client=two)  # closes the cycle
    cycles = store.deadlocks()
    assert len(cycles) == 1
    assert sorted(step["waits_for"] for step in cycles[0]["steps"]) == ["a", "b"]
    store.end_session(two)
    assert store.deadlocks() == []
