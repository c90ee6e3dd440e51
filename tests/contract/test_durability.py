"""Durability across a store restart (close, then reopen on the same data directory).

README "Durable state": the items of every queue (reserved-but-unacked
ones come back, at the front, as ready) and its count of unfinished tasks,
every dict, list, Namespace, Value and Array, the flag of every Event, and
each object's name, type and creation arguments. Locks, waiters and
sessions are not durable: after a restart clients acquire again, and
fencing tokens never go back.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from managerd_client.errors import ArgumentConflict, ServerShuttingDown

from contract.harness import StoreHarness
from contract.test_containers import DICT_STEPS, LIST_STEPS, run_steps


def test_queued_items_survive_in_order(store: StoreHarness) -> None:
    q = store.open("Queue", "q")
    store.call(q, "put_many", list(range(5)))
    assert store.call(q, "get") == 0
    store.restart()
    assert store.call(q, "get_many", 10) == [1, 2, 3, 4]


def test_reservations_come_back_first_in_delivery_order(store: StoreHarness) -> None:
    q = store.open("Queue", "q")
    store.call(q, "put_many", ["a", "b", "c", "d"])
    first, _, _ = store.call(q, "reserve")
    acked, _, _ = store.call(q, "reserve")
    store.call(q, "reserve")
    store.call(q, "ack", acked)
    store.restart()
    assert store.call(q, "reserved_count") == 0
    with pytest.raises(ValueError):
        store.call(q, "ack", first)  # the old session's reservation is no more
    # "b" was acked: gone for good; "a" and "c" are ready, first, as delivered.
    _, value, deliveries = store.call(q, "reserve")
    assert (value, deliveries) == ("a", 2)  # its delivery before the restart counts
    assert store.call(q, "get_many", 10) == ["c", "d"]


@pytest.mark.parametrize("settle", ["ack", "nack", "none"])
def test_a_reservation_settled_after_a_compaction(store: StoreHarness, settle: str) -> None:
    """The store rewrites its state (a compaction) while an item is reserved; the
    ack or nack that comes after still counts after a restart: an acked item never
    comes back, a nacked one comes back once, an unsettled one comes back first."""
    q = store.open("Queue", "q")
    store.call(q, "put_many", ["a", "b"])
    did, _, _ = store.call(q, "reserve")
    store.compact()
    store.sleep(0.01)  # (the snapshot is written meanwhile)
    if settle != "none":
        store.call(q, settle, did)
    store.restart()
    want = {"ack": ["b"], "nack": ["a", "b"], "none": ["a", "b"]}[settle]
    assert store.call(q, "get_many", 10) == want
    store.restart()
    assert store.call(q, "qsize") == 0


def test_max_deliveries_counts_deliveries_before_a_restart(store: StoreHarness) -> None:
    q = store.open("Queue", "q", max_deliveries=2)
    store.call(q, "put", "poison")
    store.call(q, "reserve")
    store.restart()
    did, _, deliveries = store.call(q, "reserve")
    assert deliveries == 2
    store.call(q, "nack", did)
    assert store.call(q, "qsize") == 0
    assert store.call(store.open("Queue", "q.dead"), "get", False) == "poison"
    store.restart()
    assert store.call(store.open("Queue", "q.dead"), "qsize") == 0  # taken: durable too


@pytest.mark.parametrize("typeid", ["Queue", "JoinableQueue"])
def test_unfinished_tasks_survive(store: StoreHarness, typeid: str) -> None:
    q = store.open(typeid, "q")
    store.call(q, "put_many", [1, 2, 3])
    store.call(q, "get")
    store.call(q, "task_done")
    store.restart()
    with pytest.raises(TimeoutError):
        store.call(q, "join", 0.01)
    store.call(q, "task_done")
    store.restart()
    store.call(q, "task_done")
    assert store.call(q, "join", 0.01) is None
    with pytest.raises(ValueError):
        store.call(q, "task_done")
    assert store.call(q, "qsize") == 2


def test_creation_arguments_survive(store: StoreHarness) -> None:
    store.open("Queue", "q", maxsize=2, visibility_timeout_s=7.0, max_deliveries=3)
    store.open("Barrier", "b", parties=4)
    store.open("Condition", "c", lock="l")
    store.open("Array", "a", typecode="d", sequence=3)
    store.restart()
    assert store.objects() == [
        ("a", "Array"), ("b", "Barrier"), ("c", "Condition"), ("l", "RLock"), ("q", "Queue")
    ]  # fmt: skip
    conflicts: list[tuple[str, str, dict[str, Any]]] = [
        ("Queue", "q", {"maxsize": 3}),
        ("Queue", "q", {"max_deliveries": 0}),
        ("Barrier", "b", {"parties": 2}),
        ("Condition", "c", {"lock": "m"}),
        ("Array", "a", {"typecode": "i"}),
    ]
    for typeid, name, args in conflicts:
        with pytest.raises(ArgumentConflict):
            store.open(typeid, name, **args)
    q = store.open("Queue", "q")
    store.call(q, "put_many", [1, 2])
    assert store.call(q, "full") is True
    assert store.call(store.open("Barrier", "b"), "state") == (4, 0, False)


def test_deletions_survive(store: StoreHarness) -> None:
    q = store.open("Queue", "q")
    store.call(q, "put", 1)
    store.delete("q")
    store.open("dict", "q")
    store.restart()
    assert store.objects() == [("q", "dict")]


def test_dict_and_list_after_every_kind_of_change(store: StoreHarness) -> None:
    d, lst = store.open("dict", "d"), store.open("list", "l")
    model_d: dict[object, object] = {}
    model_l: list[object] = []
    run_steps(store, d, model_d, DICT_STEPS[:-3])  # (the end clears it)
    run_steps(store, lst, model_l, LIST_STEPS)
    store.restart()
    assert dict(store.call(d, "items")) == model_d
    assert store.call(lst, "copy") == model_l
    store.restart()  # a second start, from the compacted snapshot
    assert dict(store.call(d, "items")) == model_d
    assert store.call(lst, "copy") == model_l


def test_a_nan_key_removed_stays_removed(store: StoreHarness) -> None:
    d = store.open("dict", "d")
    nan = float("nan")
    store.call(d, "__setitem__", nan, "x")
    store.call(d, "__setitem__", "k", "y")
    store.call(d, "popitem")  # "k"
    store.call(d, "popitem")  # the NaN key: it must not come back
    store.restart()
    assert store.call(d, "__len__") == 0
    store.call(d, "__setitem__", (1, nan), "z")
    store.call(d, "__setitem__", 2, "w")
    store.restart()
    keys = store.call(d, "keys")
    assert len(keys) == 2 and any(isinstance(k, tuple) and math.isnan(k[1]) for k in keys)


def test_namespace_value_array_and_event_survive(store: StoreHarness) -> None:
    ns = store.open("Namespace", "n", contents={"x": 1})
    v = store.open("Value", "v", typecode="d", value=1.5)
    a = store.open("Array", "a", typecode="c", sequence=b"abc")
    ev, unset = store.open("Event", "e"), store.open("Event", "u")
    store.call(ns, "__setattr__", "y", [2])
    store.call(ns, "__delattr__", "x")
    store.call(v, "add", 1)
    store.call(a, "__setitem__", 1, b"X")
    store.call(ev, "set")
    store.call(unset, "set")
    store.call(unset, "clear")
    store.restart()
    assert store.call(ns, "items") == [("y", [2])]
    assert store.call(v, "get") == 2.5
    assert store.call(a, "tolist") == b"aXc"
    assert store.call(ev, "is_set") is True
    assert store.call(unset, "is_set") is False


def test_locks_are_free_after_a_restart_and_tokens_never_go_back(store: StoreHarness) -> None:
    lock, rlock = store.open("Lock", "l"), store.open("RLock", "r")
    sem = store.open("BoundedSemaphore", "s", value=2)
    before = [store.call(lock, "acquire"), store.call(rlock, "acquire"), store.call(sem, "acquire")]
    store.restart()
    assert store.call(lock, "locked") is False
    assert store.call(rlock, "locked") is False
    assert store.call(sem, "get_value") == 2
    after = [store.call(lock, "acquire"), store.call(rlock, "acquire"), store.call(sem, "acquire")]
    assert min(after) > max(before), (before, after)
    with pytest.raises(ValueError):
        store.call(sem, "release", 2)  # bounded: one is free, one held


def test_waiters_at_a_stop_are_answered_shutting_down(store: StoreHarness) -> None:
    q, ev = store.open("Queue", "q"), store.open("Event", "e")
    bar = store.open("Barrier", "b", parties=2)
    pending = [store.start(q, "get"), store.start(ev, "wait"), store.start(bar, "wait")]
    store.restart()
    for p in pending:
        with pytest.raises(ServerShuttingDown):
            p.result()
    assert store.waiters(q) == 0
    store.call(q, "put", 1)
    assert store.call(q, "qsize") == 1  # nobody from before took it


def test_a_condition_and_its_lock_work_after_a_restart(store: StoreHarness) -> None:
    cond = store.open("Condition", "c")
    store.call(cond, "acquire")
    store.restart()
    other = store.new_client()
    assert store.call(cond, "acquire", False, client=other)  # free again
    pending = store.start(cond, "wait", client=other)
    store.call(cond, "acquire")
    store.call(cond, "notify")
    store.call(cond, "release")
    assert pending.result() is True
    store.call(cond, "release", client=other)
    assert store.call(cond, "locked") is False
