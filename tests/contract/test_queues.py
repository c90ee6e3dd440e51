"""Queue and JoinableQueue: ``queue.Queue``'s semantics, plus batches.

Compared with a ``queue.Queue`` in the same state wherever the stdlib has
the call. Acknowledged delivery (reserve/ack/nack) is in ``test_reserve.py``.
Deliberate differences (README "Checked against models"): a timeout's type
is checked even when no wait is needed; a NaN wait is a ValueError.
"""

from __future__ import annotations

import queue
from functools import partial
from typing import Any

import pytest

from contract.harness import StoreHarness
from contract.outcomes import outcome, same_outcome

QUEUE_TYPES = ["Queue", "JoinableQueue"]


@pytest.fixture(params=QUEUE_TYPES)
def typeid(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_fifo_and_sizes(store: StoreHarness, typeid: str) -> None:
    q = store.open(typeid, "q")
    model: queue.Queue[Any] = queue.Queue()
    assert store.call(q, "empty") is True
    for item in [1, "two", (3, 3.0), {"four": [4]}, None, b"six"]:
        store.call(q, "put", item)
        model.put(item)
        assert store.call(q, "qsize") == model.qsize()
    assert store.call(q, "empty") is False
    assert store.call(q, "full") is False
    while not model.empty():
        assert store.call(q, "get") == model.get()
    assert store.call(q, "qsize") == 0


@pytest.mark.parametrize("maxsize", [0, -1, 1, 3])
def test_maxsize_full_and_nowait(store: StoreHarness, typeid: str, maxsize: int) -> None:
    q = store.open(typeid, "q", maxsize=maxsize)
    model: queue.Queue[int] = queue.Queue(maxsize)
    for i in range(5):
        same_outcome(
            outcome(partial(store.call, q, "put_nowait", i)),
            outcome(partial(model.put_nowait, i)),
            f"put_nowait #{i}",
        )
        assert store.call(q, "full") == model.full()
        assert store.call(q, "qsize") == model.qsize()
    for i in range(6):
        same_outcome(
            outcome(lambda: store.call(q, "get_nowait")),
            outcome(model.get_nowait),
            f"get_nowait #{i}",
        )


def test_nonblocking_put_on_full_and_get_on_empty(store: StoreHarness, typeid: str) -> None:
    q = store.open(typeid, "q", maxsize=1)
    with pytest.raises(queue.Empty):
        store.call(q, "get", False)
    with pytest.raises(queue.Empty):
        store.call(q, "get", True, 0.01)
    store.call(q, "put", "a")
    with pytest.raises(queue.Full):
        store.call(q, "put", "b", False)
    with pytest.raises(queue.Full):
        store.call(q, "put", "b", True, 0.01)
    assert store.call(q, "get", block=False) == "a"


def test_blocked_get_gets_the_next_put(store: StoreHarness, typeid: str) -> None:
    q = store.open(typeid, "q")
    other = store.new_client()
    first = store.start(q, "get", client=other)
    second = store.start(q, "get", client=other, thread=1)
    assert not first.done() and not second.done()
    assert store.waiters(q) == 2
    store.call(q, "put", "x")
    store.call(q, "put", "y")
    assert first.result() == "x"  # getters are served in the order they came
    assert second.result() == "y"
    assert store.call(q, "qsize") == 0
    assert store.waiters(q) == 0


def test_blocked_put_waits_for_room_in_order(store: StoreHarness, typeid: str) -> None:
    q = store.open(typeid, "q", maxsize=1)
    store.call(q, "put", 0)
    p1 = store.start(q, "put", 1)
    p2 = store.start(q, "put", 2, thread=1)
    assert not p1.done() and not p2.done()
    assert store.call(q, "get") == 0
    assert p1.done() and not p2.done()
    assert store.call(q, "get") == 1
    assert p2.result() is None
    assert store.call(q, "get") == 2


def test_a_put_behind_a_waiting_put_waits_too(store: StoreHarness, typeid: str) -> None:
    """FIFO for putters: a put_many waiting for room is not overtaken by a smaller put."""
    q = store.open(typeid, "q", maxsize=2)
    store.call(q, "put", "a")
    big = store.start(q, "put_many", ["b", "c"])
    with pytest.raises(queue.Full):
        store.call(q, "put", "d", block=False)
    assert store.call(q, "get") == "a"
    assert big.result() is None
    assert [store.call(q, "get") for _ in range(2)] == ["b", "c"]


def test_get_timeout_raises_empty_and_leaves_no_waiter(store: StoreHarness, typeid: str) -> None:
    q = store.open(typeid, "q")
    with pytest.raises(queue.Empty):
        store.call(q, "get", True, 0.02)
    assert store.waiters(q) == 0
    store.call(q, "put", 1)
    assert store.call(q, "qsize") == 1  # nobody took it


@pytest.mark.parametrize("restarted", [False, True], ids=["", "after-restart"])
@pytest.mark.parametrize(
    "method, args",
    [("get", (True, 0.002)), ("get_many", (1, True, 0.002)), ("reserve", (0.002,))],
    ids=["get", "get_many", "reserve"],
)
def test_a_timed_wait_behind_a_blocked_get_times_out(
    store: StoreHarness, typeid: str, method: str, args: tuple[Any, ...], restarted: bool
) -> None:
    """A get, get_many or reserve with a short timeout that comes while a get without
    one waits on the empty queue looks, then ends with Empty in its time, and leaves
    the blocked get first in line for the next put (also on a store restarted with a
    get waiting; the etcd store's line of waiting calls was parked on its watch and
    never gave the newcomer its look, so its timeout never started)."""
    q = store.open(typeid, "q")
    other = store.new_client()
    if restarted:
        store.start(q, "get")  # ended by the restart
        store.restart()
    blocked = store.start(q, "get")
    assert not blocked.done()
    for thread in range(2):  # one more while the line waits again
        with pytest.raises(queue.Empty):
            store.call(q, method, *args, client=other, thread=thread)
    assert store.waiters(q) == 1
    store.call(q, "put", "x")
    assert blocked.result() == "x"
    assert store.call(q, "qsize") == 0
    assert store.waiters(q) == 0


def test_put_timeout_raises_full_and_the_item_is_not_queued(
    store: StoreHarness, typeid: str
) -> None:
    q = store.open(typeid, "q", maxsize=1)
    store.call(q, "put", 1)
    with pytest.raises(queue.Full):
        store.call(q, "put", 2, True, 0.02)
    assert store.waiters(q) == 0
    assert store.call(q, "get") == 1
    assert store.call(q, "qsize") == 0


def test_get_many_and_put_many(store: StoreHarness, typeid: str) -> None:
    q = store.open(typeid, "q")
    store.call(q, "put_many", [1, 2, 3, 4, 5])
    assert store.call(q, "get_many", 2) == [1, 2]
    assert store.call(q, "get_many", 10) == [3, 4, 5]
    with pytest.raises(queue.Empty):
        store.call(q, "get_many", 3, False)
    waiting = store.start(q, "get_many", 3)
    assert not waiting.done()
    store.call(q, "put_many", [6, 7])
    assert waiting.result() == [6]  # a parked get_many takes what arrives first
    assert store.call(q, "get_many", 3) == [7]


@pytest.mark.parametrize("max_items", [0, -1, 1.5, "2", None])
def test_get_many_refuses_a_bad_count(store: StoreHarness, typeid: str, max_items: Any) -> None:
    q = store.open(typeid, "q")
    store.call(q, "put", 1)
    with pytest.raises(ValueError):
        store.call(q, "get_many", max_items)
    assert store.call(q, "qsize") == 1


def test_put_many_that_can_never_fit_is_refused(store: StoreHarness, typeid: str) -> None:
    q = store.open(typeid, "q", maxsize=2)
    with pytest.raises(ValueError):
        store.call(q, "put_many", [1, 2, 3])
    with pytest.raises(TypeError):
        store.call(q, "put_many", 5)
    assert store.call(q, "qsize") == 0


def test_put_many_with_room_for_some_waits_for_room_for_all(
    store: StoreHarness, typeid: str
) -> None:
    q = store.open(typeid, "q", maxsize=3)
    store.call(q, "put_many", [1, 2])
    with pytest.raises(queue.Full):
        store.call(q, "put_many", [3, 4], False)
    assert store.call(q, "qsize") == 2  # all or nothing
    pending = store.start(q, "put_many", [3, 4])
    assert not pending.done()
    assert store.call(q, "get") == 1
    assert pending.result() is None
    assert store.call(q, "get_many", 5) == [2, 3, 4]


# -- task_done and join -------------------------------------------------------------------


def test_task_done_and_join_as_the_stdlib(store: StoreHarness, typeid: str) -> None:
    q = store.open(typeid, "q")
    model: queue.Queue[int] = queue.Queue()
    same_outcome(outcome(lambda: store.call(q, "task_done")), outcome(model.task_done))
    assert store.call(q, "join") is None  # nothing unfinished: at once
    for i in range(2):
        store.call(q, "put", i)
        model.put(i)
    joined = store.start(q, "join", client=store.new_client())
    assert not joined.done()
    store.call(q, "get")
    store.call(q, "task_done")
    assert not joined.done()  # one is still unfinished
    store.call(q, "get")
    store.call(q, "task_done")
    assert joined.result() is None
    for _ in range(2):
        model.get()
        model.task_done()
    same_outcome(outcome(lambda: store.call(q, "task_done")), outcome(model.task_done))


def test_join_timeout(store: StoreHarness, typeid: str) -> None:
    q = store.open(typeid, "q")
    store.call(q, "put", 1)
    with pytest.raises(TimeoutError):
        store.call(q, "join", 0.02)
    assert store.waiters(q) == 0


def test_unfinished_counts_puts_not_gets(store: StoreHarness, typeid: str) -> None:
    """As queue.Queue: a get does not finish a task; task_done may come before the get."""
    q = store.open(typeid, "q")
    store.call(q, "put_many", [1, 2])
    store.call(q, "task_done")
    store.call(q, "task_done")
    assert store.call(q, "join") is None
    assert store.call(q, "qsize") == 2


def test_put_then_get_wakes_no_joiner_until_done(store: StoreHarness, typeid: str) -> None:
    q = store.open(typeid, "q")
    store.call(q, "put", 1)
    joiners = [store.start(q, "join", thread=t) for t in range(3)]
    assert store.call(q, "get") == 1
    assert not any(j.done() for j in joiners)
    store.call(q, "task_done")
    assert all(j.result() is None for j in joiners)


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), 1e300, 10**30], ids=repr)
def test_unwaitable_timeouts_of_reserve_get_many_and_join(
    store: StoreHarness, typeid: str, timeout: Any
) -> None:
    """``reserve``, ``get_many`` and ``join`` as ``get``: a timeout no wait can take is
    the wait's error when the call has to wait (never a wait for ever): NaN a ValueError
    (README "Errors"), more than ``threading.TIMEOUT_MAX`` an OverflowError; and no
    error when it does not wait."""
    error = ValueError if timeout != timeout else OverflowError
    q = store.open(typeid, "q")
    with pytest.raises(error):
        store.call(q, "reserve", timeout)
    with pytest.raises(error):
        store.call(q, "get_many", 2, True, timeout)
    store.call(q, "put_many", ["a", "b"])
    with pytest.raises(error):
        store.call(q, "join", timeout)  # two unfinished
    did, value, _ = store.call(q, "reserve", timeout)
    assert value == "a"
    store.call(q, "ack", did)
    assert store.call(q, "get_many", 2, True, timeout) == ["b"]
    for _ in range(2):
        store.call(q, "task_done")
    assert store.call(q, "join", timeout) is None
    for name, kind in store.objects():
        assert store.waiters(store.open(kind, name)) == 0, f"{kind} {name} has a waiter"


def test_get_many_of_items_that_fit_only_one_by_one(store: StoreHarness, typeid: str) -> None:
    """Items put one by one, each well under etcd's request limit (1.5 MiB by default)
    but not three together, come out of one ``get_many`` whole and in order."""
    q = store.open(typeid, "q")
    items = [str(i) * 600_000 for i in range(3)]
    for item in items:
        store.call(q, "put", item)
    assert store.call(q, "get_many", 3) == items
    for item in items:
        store.call(q, "put", item)
    assert [store.call(q, "reserve")[1] for _ in items] == items
