"""Lock, RLock, Semaphore, BoundedSemaphore and their fencing tokens.

``threading``'s semantics, with two differences README states: an
acquisition belongs to a client *session* (an RLock to a session and one of
its threads), and every acquire returns a fencing token, strictly
increasing per lock (tokens of the store are one increasing source). And
one deliberate difference: a semaphore's permits are whole (its initial
value and ``release(n)`` take ints; ``threading`` takes a float).
Session ends are in ``test_sessions.py``, restarts in ``test_durability.py``,
hostile arguments in ``test_hostile.py``.
"""

from __future__ import annotations

import threading

import pytest

from contract.harness import StoreHarness
from contract.outcomes import outcome, same_outcome

SHORT_S = 0.02


@pytest.mark.parametrize("typeid", ["Lock", "RLock"])
def test_acquire_returns_a_token_and_holds(store: StoreHarness, typeid: str) -> None:
    lock = store.open(typeid, "l")
    assert store.call(lock, "locked") is False
    assert store.call(lock, "fencing_token") == 0  # never acquired
    token = store.call(lock, "acquire")
    assert isinstance(token, int) and not isinstance(token, bool) and token > 0
    assert store.call(lock, "locked") is True
    assert store.call(lock, "fencing_token") == token
    other = store.new_client()
    assert store.call(lock, "acquire", False, client=other) is False
    assert store.call(lock, "acquire", True, SHORT_S, client=other) is False
    assert store.waiters(lock) == 0
    store.call(lock, "release")
    assert store.call(lock, "locked") is False


def test_a_lock_is_not_reentrant_and_anyone_may_release_it(store: StoreHarness) -> None:
    lock = store.open("Lock", "l")
    model = threading.Lock()
    store.call(lock, "acquire")
    model.acquire()
    same_outcome(
        outcome(lambda: store.call(lock, "acquire", False)), outcome(lambda: model.acquire(False))
    )
    store.call(lock, "release", client=store.new_client())  # as any thread may
    model.release()
    same_outcome(outcome(lambda: store.call(lock, "release")), outcome(model.release))


def test_rlock_is_reentrant_for_its_thread_only(store: StoreHarness) -> None:
    rlock = store.open("RLock", "r")
    token = store.call(rlock, "acquire")
    assert store.call(rlock, "acquire") == token  # re-entry: the same holding
    assert store.call(rlock, "acquire", False, thread=1) is False  # another thread
    assert store.call(rlock, "acquire", False, client=store.new_client()) is False
    with pytest.raises(RuntimeError):
        store.call(rlock, "release", thread=1)  # not the owner
    store.call(rlock, "release")
    assert store.call(rlock, "locked") is True  # one level left
    store.call(rlock, "release")
    assert store.call(rlock, "locked") is False
    model = threading.RLock()
    same_outcome(outcome(lambda: store.call(rlock, "release")), outcome(model.release))


def test_waiters_get_the_lock_in_order_with_larger_tokens(store: StoreHarness) -> None:
    lock = store.open("Lock", "l")
    first = store.call(lock, "acquire")
    clients = [store.new_client() for _ in range(3)]
    waiting = [store.start(lock, "acquire", client=c) for c in clients]
    assert store.waiters(lock) == 3
    tokens = [first]
    for i, pending in enumerate(waiting):
        assert not pending.done()
        store.call(lock, "release", client=clients[i - 1] if i else None)
        tokens.append(pending.result())
        assert all(not p.done() for p in waiting[i + 1 :])
    assert tokens == sorted(set(tokens)), tokens  # strictly increasing
    store.call(lock, "release", client=clients[-1])


def test_a_free_lock_with_waiters_is_not_taken_by_a_newcomer(store: StoreHarness) -> None:
    """FIFO: release hands the lock to the first waiter, not to whoever asks next."""
    lock = store.open("Lock", "l")
    store.call(lock, "acquire")
    waiter = store.new_client()
    pending = store.start(lock, "acquire", client=waiter)
    store.call(lock, "release")
    assert pending.result()
    assert store.call(lock, "acquire", False) is False


def test_a_timed_out_acquire_leaves_no_waiter_behind(store: StoreHarness) -> None:
    lock = store.open("Lock", "l")
    store.call(lock, "acquire")
    other = store.new_client()
    assert store.call(lock, "acquire", True, SHORT_S, client=other) is False
    store.call(lock, "release")
    assert store.call(lock, "locked") is False  # nobody was handed it


def test_tokens_increase_across_locks_and_acquisitions(store: StoreHarness) -> None:
    """One increasing source: a later acquisition of any lock has a larger token."""
    objs = [store.open(t, f"l{i}") for i, t in enumerate(["Lock", "RLock", "Semaphore"])]
    seen = []
    for _ in range(3):
        for obj in objs:
            seen.append(store.call(obj, "acquire"))
            store.call(obj, "release")
    assert seen == sorted(seen) and len(set(seen)) == len(seen), seen


# -- semaphores ---------------------------------------------------------------------------


@pytest.mark.parametrize("typeid", ["Semaphore", "BoundedSemaphore"])
def test_semaphore_counts_permits(store: StoreHarness, typeid: str) -> None:
    sem = store.open(typeid, "s", value=2)
    model = getattr(threading, typeid)(2)
    for i in range(3):
        got = store.call(sem, "acquire", False)
        want = model.acquire(False)
        assert bool(got) == want, f"acquire #{i}"
        assert store.call(sem, "get_value") == model._value
    assert store.call(sem, "acquire", True, SHORT_S) is False
    assert store.waiters(sem) == 0
    for _ in range(2):
        store.call(sem, "release")
        model.release()
    same_outcome(outcome(lambda: store.call(sem, "release")), outcome(model.release))
    assert store.call(sem, "get_value") == model._value


def test_semaphore_release_n_wakes_n_waiters(store: StoreHarness) -> None:
    sem = store.open("Semaphore", "s", value=0)
    waiting = [store.start(sem, "acquire", client=store.new_client()) for _ in range(3)]
    store.call(sem, "release", 2)
    assert [p.done() for p in waiting] == [True, True, False]
    assert store.call(sem, "get_value") == 0
    store.call(sem, "release")
    assert all(p.result() for p in waiting)


@pytest.mark.parametrize("n", [0, -1])
def test_semaphore_release_of_fewer_than_one_is_refused(store: StoreHarness, n: int) -> None:
    sem = store.open("Semaphore", "s", value=0)
    model = threading.Semaphore(0)
    same_outcome(outcome(lambda: store.call(sem, "release", n)), outcome(lambda: model.release(n)))
    assert store.call(sem, "get_value") == 0


def test_semaphore_permits_may_be_released_by_another_client(store: StoreHarness) -> None:
    sem = store.open("BoundedSemaphore", "s", value=1)
    holder = store.new_client()
    assert store.call(sem, "acquire", client=holder)
    store.call(sem, "release")  # by someone else, as any thread may
    assert store.call(sem, "get_value") == 1
    store.end_session(holder)  # its permit was given back already: not twice
    assert store.call(sem, "get_value") == 1


def test_a_release_by_another_takes_permits_of_the_session_that_held_first(
    store: StoreHarness,
) -> None:
    """Others' permits are taken session by session, in the order the sessions came to
    hold (one that held all along keeps its place however many of its own it gave back)."""
    sem = store.open("Semaphore", "s", value=3)
    first, second = store.new_client(), store.new_client()
    for client in (first, second, first):
        assert store.call(sem, "acquire", client=client)
    store.call(sem, "release", client=first)  # one of its own: it holds one still
    store.call(sem, "release")  # by someone holding none: first's
    assert store.call(sem, "get_value") == 2
    store.end_session(first)  # it holds none now
    assert store.call(sem, "get_value") == 2
    store.end_session(second)
    assert store.call(sem, "get_value") == 3


@pytest.mark.parametrize("value", [-1, 1.5, "2", None, True])
def test_semaphore_initial_value_is_checked(store: StoreHarness, value: object) -> None:
    with pytest.raises((ValueError, TypeError)) as info:
        store.open("Semaphore", "s", value=value)
    want = outcome(lambda: threading.Semaphore(value))  # type: ignore[arg-type]
    if not want.ok:  # the stdlib refuses it too: the same type
        assert isinstance(info.value, type(want.error))
    assert "s" not in dict(store.objects())
