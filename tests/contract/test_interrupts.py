"""Interrupted calls (README "Interrupts"): given up while parked, or undone once answered.

A client interrupted in a blocked call cancels it: a call still waiting
is dropped (the next item, lock or permit goes to a live caller); a call
already answered is undone if what it handed over never reached the
caller's code: a ``get``/``get_many`` item or a pipe message goes back to
the front (in order), a ``reserve`` goes back without counting as a
delivery, a Lock/RLock/Semaphore acquire is released. An interrupted
barrier party leaves the count without breaking the barrier; an
interrupted ``Condition.wait`` takes the lock back (``restore``), except
for a stock client, which cannot ask for it.
"""

from __future__ import annotations

import pytest

from contract.harness import StoreHarness


def test_an_abandoned_get_takes_nothing(store: StoreHarness) -> None:
    q = store.open("Queue", "q")
    gave_up = store.start(q, "get")
    waiting = store.start(q, "get", client=store.new_client())
    store.abandon(gave_up)
    assert gave_up.cancelled()
    store.call(q, "put", "x")
    assert waiting.result() == "x"
    assert store.waiters(q) == 0


def test_a_cancelled_put_puts_nothing(store: StoreHarness) -> None:
    q = store.open("Queue", "q", maxsize=1)
    store.call(q, "put", 1)
    pending = store.start(q, "put", 2)
    store.cancel(pending)
    assert store.call(q, "get") == 1
    assert store.call(q, "qsize") == 0


def test_an_undone_get_is_first_again(store: StoreHarness) -> None:
    q = store.open("Queue", "q")
    store.call(q, "put_many", ["a", "b", "c"])
    answered = store.start(q, "get")
    assert answered.result() == "a"
    many = store.start(q, "get_many", 2)
    assert many.result() == ["b", "c"]
    store.undo(many)
    store.undo(answered)
    assert store.call(q, "get_many", 5) == ["a", "b", "c"]


def test_an_undone_get_leaves_the_unfinished_count_as_it_was(store: StoreHarness) -> None:
    """The item is back, not put again: ``join`` waits for one ``task_done`` per put,
    whether the get is undone before its thread's next call or after it."""
    q = store.open("JoinableQueue", "q")
    store.call(q, "put_many", ["a", "b"])
    first = store.start(q, "get")
    assert first.result() == "a"
    second = store.start(q, "get")  # (the thread's next call: it read the first answer)
    assert second.result() == "b"
    store.undo(second)
    store.undo(first)
    assert store.call(q, "get_many", 5) == ["a", "b"]
    for _ in range(2):
        with pytest.raises(TimeoutError):
            store.call(q, "join", 0)
        store.call(q, "task_done")
    store.call(q, "join", 0)
    with pytest.raises(ValueError):
        store.call(q, "task_done")


def test_an_undone_get_after_its_task_done_is_not_unfinished_again(store: StoreHarness) -> None:
    q = store.open("JoinableQueue", "q")
    store.call(q, "put", "a")
    answered = store.start(q, "get")
    assert answered.result() == "a"
    store.call(q, "task_done")
    store.undo(answered)
    assert store.call(q, "get") == "a"
    store.call(q, "join", 0)
    with pytest.raises(ValueError):
        store.call(q, "task_done")


def test_an_undone_get_goes_to_a_parked_getter(store: StoreHarness) -> None:
    q = store.open("Queue", "q")
    store.call(q, "put", "a")
    answered = store.start(q, "get")
    answered.result()
    waiting = store.start(q, "get", client=store.new_client())
    store.undo(answered)
    assert waiting.result() == "a"


def test_an_undone_reserve_does_not_count_as_a_delivery(store: StoreHarness) -> None:
    q = store.open("Queue", "q", max_deliveries=1)
    store.call(q, "put_many", ["a", "b"])
    reserved = store.start(q, "reserve")
    did, value, deliveries = reserved.result()
    assert (value, deliveries) == ("a", 1)
    store.undo(reserved)
    assert store.call(q, "reserved_count") == 0
    with pytest.raises(ValueError):
        store.call(q, "ack", did)
    _, value, deliveries = store.call(q, "reserve")
    assert (value, deliveries) == ("a", 1)  # not dead-lettered: it was never seen


def test_undoing_a_settled_reserve_does_nothing(store: StoreHarness) -> None:
    q = store.open("Queue", "q")
    store.call(q, "put", "a")
    reserved = store.start(q, "reserve")
    store.call(q, "ack", reserved.result()[0])
    store.undo(reserved)
    assert store.call(q, "qsize") == 0


def test_an_undone_pipe_recv_is_first_again(store: StoreHarness) -> None:
    p = store.open("Pipe", "p")
    store.call(p, "send", 0, "m1")
    store.call(p, "send", 0, "m2")
    answered = store.start(p, "recv", 1)
    assert answered.result() == "m1"
    store.undo(answered)
    assert [store.call(p, "recv", 1) for _ in range(2)] == ["m1", "m2"]


@pytest.mark.parametrize("typeid", ["Lock", "RLock", "Semaphore", "BoundedSemaphore"])
def test_an_undone_acquire_is_released(store: StoreHarness, typeid: str) -> None:
    obj = store.open(typeid, "l")
    acquired = store.start(obj, "acquire")
    assert acquired.result()
    store.undo(acquired)
    if typeid in ("Lock", "RLock"):
        assert store.call(obj, "locked") is False
    else:
        assert store.call(obj, "get_value") == 1


def test_an_undone_reentry_of_an_rlock_goes_one_level_down(store: StoreHarness) -> None:
    rlock = store.open("RLock", "r")
    store.call(rlock, "acquire")
    again = store.start(rlock, "acquire")
    again.result()
    store.undo(again)
    assert store.call(rlock, "locked") is True
    store.call(rlock, "release")
    assert store.call(rlock, "locked") is False


def test_undoing_an_acquire_after_the_lock_moved_on_does_nothing(store: StoreHarness) -> None:
    lock = store.open("Lock", "l")
    acquired = store.start(lock, "acquire")
    acquired.result()
    store.call(lock, "release")
    other = store.new_client()
    store.call(lock, "acquire", client=other)
    store.undo(acquired)  # another holding, another token: left alone
    assert store.call(lock, "locked") is True


def test_an_abandoned_acquire_leaves_the_lock_to_the_next(store: StoreHarness) -> None:
    lock = store.open("Lock", "l")
    store.call(lock, "acquire")
    gave_up = store.start(lock, "acquire", client=store.new_client())
    waiting = store.start(lock, "acquire", client=store.new_client())
    store.abandon(gave_up)
    store.call(lock, "release")
    assert waiting.result()


def test_an_interrupted_party_leaves_the_barrier_unbroken(store: StoreHarness) -> None:
    bar = store.open("Barrier", "b", parties=2)
    interrupted = store.start(bar, "wait", client=store.new_client())
    store.abandon(interrupted)
    assert store.call(bar, "state") == (2, 0, False)
    first = store.start(bar, "wait", client=store.new_client())
    assert store.call(bar, "wait") in (0, 1)
    assert first.result() in (0, 1)


def test_the_call_after_an_interrupted_party_sees_it_gone(store: StoreHarness) -> None:
    """The next call on the barrier is made after the party left (several times over:
    the leaving and the call must not race)."""
    for i in range(10):
        bar = store.open("Barrier", f"b{i}", parties=2)
        store.abandon(store.start(bar, "wait", client=store.new_client()))
        assert store.call(bar, "state") == (2, 0, False)


def test_an_interrupted_condition_wait_takes_the_lock_back(store: StoreHarness) -> None:
    cond = store.open("Condition", "c")
    waiter = store.new_client()
    store.call(cond, "acquire", client=waiter)
    waiting = store.start(cond, "wait", client=waiter)
    store.call(cond, "acquire")  # someone else holds the lock meanwhile
    store.abandon(waiting)
    assert store.waiters(cond) == 0  # no longer waiting for a notify...
    restored = store.start(cond, "restore", client=waiter)
    assert not restored.done()  # ...but for the lock
    store.call(cond, "release")
    token = restored.result()
    assert token == store.call(store.open("RLock", "c.lock"), "fencing_token")
    store.call(cond, "release", client=waiter)
    assert store.call(cond, "locked") is False


def test_an_interrupted_condition_wait_waits_for_the_lock_until_its_session_ends(
    store: StoreHarness,
) -> None:
    cond, lock = store.open("Condition", "c"), store.open("RLock", "c.lock")
    waiter = store.new_client()
    store.call(cond, "acquire", client=waiter)
    waiting = store.start(cond, "wait", client=waiter)
    store.call(cond, "acquire")  # someone else holds the lock meanwhile
    store.abandon(waiting)
    assert store.waiters(lock) == 1  # it waits to take the lock back
    store.end_session(waiter)
    assert store.waiters(lock) == 0
    store.call(cond, "release")
    assert store.call(cond, "locked") is False  # nobody took it back


def test_a_stock_clients_interrupted_condition_wait_is_dropped(store: StoreHarness) -> None:
    cond = store.open("Condition", "c")
    store.call(cond, "acquire")
    waiting = store.start(cond, "wait")
    store.abandon(waiting, stock=True)
    assert waiting.cancelled()
    assert store.call(cond, "locked") is False  # the stock client does not get it back
    assert store.call(cond, "restore") is False
