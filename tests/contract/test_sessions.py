"""A session that ends gives everything back (README "Nothing lost, nothing stuck").

In this order: every call it had waiting is dropped (so what its holdings
release goes to a live waiter, never to it); every Lock and RLock it held
is released and every Semaphore permit given back, to the next live waiter
(with a larger fencing token); a Barrier it waited on breaks; messages it
had reserved go back to the front of their queue.
"""

from __future__ import annotations

import threading

import pytest

from contract.harness import StoreHarness


def test_a_dead_getter_takes_nothing(store: StoreHarness) -> None:
    q = store.open("Queue", "q")
    dead, live = store.new_client(), store.new_client()
    dropped = store.start(q, "get", client=dead)
    kept = store.start(q, "get", client=live)
    store.end_session(dead)
    assert dropped.cancelled()
    store.call(q, "put", "item")
    assert kept.result() == "item"


def test_a_dead_putter_puts_nothing(store: StoreHarness) -> None:
    q = store.open("Queue", "q", maxsize=1)
    store.call(q, "put", "first")
    dead = store.new_client()
    dropped = store.start(q, "put", "never", client=dead)
    store.end_session(dead)
    assert dropped.cancelled()
    assert store.call(q, "get") == "first"
    assert store.call(q, "qsize") == 0


@pytest.mark.parametrize("typeid", ["Lock", "RLock"])
def test_a_held_lock_goes_to_the_next_live_waiter(store: StoreHarness, typeid: str) -> None:
    lock = store.open(typeid, "l")
    holder, dead_waiter, live_waiter = (store.new_client() for _ in range(3))
    token = store.call(lock, "acquire", client=holder)
    if typeid == "RLock":
        store.call(lock, "acquire", client=holder)  # depth 2: released whole
    dropped = store.start(lock, "acquire", client=dead_waiter)
    granted = store.start(lock, "acquire", client=live_waiter)
    store.end_session(dead_waiter)
    store.end_session(holder)
    assert dropped.cancelled()
    assert granted.result() > token
    assert store.call(lock, "locked") is True
    store.call(lock, "release", client=live_waiter)
    assert store.call(lock, "locked") is False


def test_an_ended_session_holds_no_lock_even_by_another_thread(store: StoreHarness) -> None:
    rlock = store.open("RLock", "r")
    holder = store.new_client()
    store.call(rlock, "acquire", client=holder, thread=7)
    store.end_session(holder)
    assert store.call(rlock, "locked") is False
    # The client's next call is a new session: it holds nothing.
    with pytest.raises(RuntimeError):
        store.call(rlock, "release", client=holder, thread=7)


def test_semaphore_permits_come_back(store: StoreHarness) -> None:
    sem = store.open("BoundedSemaphore", "s", value=2)
    holder = store.new_client()
    store.call(sem, "acquire", client=holder)
    store.call(sem, "acquire", client=holder)
    waiting = store.start(sem, "acquire")
    store.end_session(holder)
    assert waiting.result()
    assert store.call(sem, "get_value") == 1  # two back, one taken by the waiter


def test_a_waiting_party_that_ends_breaks_the_barrier(store: StoreHarness) -> None:
    bar = store.open("Barrier", "b", parties=3)
    dead = store.new_client()
    store.start(bar, "wait", client=dead)
    other = store.start(bar, "wait", client=store.new_client())
    store.end_session(dead)
    with pytest.raises(threading.BrokenBarrierError):
        other.result()
    assert store.call(bar, "__getattribute__", "broken") is True


def test_the_call_after_a_parties_end_sees_the_barrier_broken(store: StoreHarness) -> None:
    """The next call on the barrier is made after the end (several times over: the end's
    work and the call must not race)."""
    for i in range(10):
        bar = store.open("Barrier", f"b{i}", parties=2)
        dead = store.new_client()
        store.start(bar, "wait", client=dead)
        store.end_session(dead)
        assert store.call(bar, "state") == (2, 0, True)


def test_a_dead_condition_waiter_is_not_notified(store: StoreHarness) -> None:
    cond = store.open("Condition", "c")
    dead, live = store.new_client(), store.new_client()
    for client in (dead, live):
        store.call(cond, "acquire", client=client)
        store.start(cond, "wait", client=client)
    store.end_session(dead)
    assert store.waiters(cond) == 1
    store.call(cond, "acquire")
    store.call(cond, "notify")  # one notify: it reaches the live waiter
    store.call(cond, "release")
    assert store.call(cond, "locked") is True  # the live waiter holds it again
    store.call(cond, "release", client=live)


def test_a_condition_lock_held_by_an_ended_session_is_released(store: StoreHarness) -> None:
    cond = store.open("Condition", "c")
    holder = store.new_client()
    store.call(cond, "acquire", client=holder)
    store.end_session(holder)
    assert store.call(cond, "locked") is False


@pytest.mark.parametrize(
    ("typeid", "method", "args"),
    [("Event", "wait", ()), ("Pipe", "recv", (0,)), ("Pipe", "poll", (0, None)),
     ("Queue", "reserve", ()), ("Queue", "get_many", (5,))],
)  # fmt: skip
def test_every_parked_call_of_an_ended_session_is_dropped(
    store: StoreHarness, typeid: str, method: str, args: tuple[object, ...]
) -> None:
    obj = store.open(typeid, "x")
    dead = store.new_client()
    pending = store.start(obj, method, *args, client=dead)
    assert store.waiters(obj) == 1
    store.end_session(dead)
    assert pending.cancelled()
    assert store.waiters(obj) == 0


def test_nothing_is_held_by_an_ended_session(store: StoreHarness) -> None:
    """After a session ends with everything at once, no object names it a holder."""
    client = store.new_client()
    lock, sem, q = store.open("Lock", "l"), store.open("Semaphore", "s"), store.open("Queue", "q")
    store.call(q, "put_many", [1, 2])
    store.call(lock, "acquire", client=client)
    store.call(sem, "acquire", client=client)
    store.call(q, "reserve", client=client)
    store.start(q, "join", client=client)
    store.end_session(client)
    assert store.call(lock, "locked") is False
    assert store.call(sem, "get_value") == 1
    assert store.call(q, "reserved_count") == 0
    assert store.waiters(q) == 0
    assert store.call(q, "get_many", 5) == [1, 2]


def test_what_an_ended_session_gives_back_never_goes_to_its_own_waits(
    store: StoreHarness,
) -> None:
    q = store.open("Queue", "q")
    store.call(q, "put", "a")
    client = store.new_client()
    store.call(q, "reserve", client=client)
    own = store.start(q, "get", client=client)
    other = store.start(q, "get", client=store.new_client(), thread=1)
    store.end_session(client)
    assert own.cancelled()
    assert other.result() == "a"


def test_a_token_resumes_no_session_that_ended_or_never_was(store: StoreHarness) -> None:
    """``Store.resume`` finds only a live session of another daemon of the store: never
    one for a token nobody was given, nor one that ended (whatever it held is gone)."""
    assert store.resume("never given") is None
    client = store.new_client()
    lock = store.open("Lock", "l")
    store.call(lock, "acquire", client=client)
    token = client.session.resume_token
    store.end_session(client)
    assert store.call(lock, "locked") is False
    assert store.resume(token) is None
