"""Event, Condition and Barrier: ``threading``'s semantics across client sessions.

A Condition works on a named Lock or RLock (its own ``"<name>.lock"``
RLock unless given one): ``wait`` releases it completely and answers only
once it holds it again, at the depth it had. A Barrier whose waiting
party's session ends breaks (``test_sessions.py``).
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from contract.harness import StoreHarness
from contract.outcomes import Outcome, outcome, same_outcome

SHORT_S = 0.02


# -- Event --------------------------------------------------------------------------------


def test_event_set_wakes_every_waiter(store: StoreHarness) -> None:
    ev = store.open("Event", "e")
    assert store.call(ev, "is_set") is False
    assert store.call(ev, "wait", 0) is False
    assert store.call(ev, "wait", SHORT_S) is False
    assert store.waiters(ev) == 0
    waiting = [store.start(ev, "wait", client=store.new_client()) for _ in range(3)]
    assert not any(p.done() for p in waiting)
    store.call(ev, "set")
    assert [p.result() for p in waiting] == [True, True, True]
    assert store.call(ev, "wait") is True  # set: at once
    store.call(ev, "clear")
    assert store.call(ev, "is_set") is False
    assert store.call(ev, "wait", -1) is False  # a negative timeout does not wait


# -- Condition ----------------------------------------------------------------------------


def test_condition_wait_releases_and_retakes_the_lock(store: StoreHarness) -> None:
    cond = store.open("Condition", "c")
    lock = store.open("RLock", "c.lock")  # made with the condition
    waiter, notifier = store.new_client(), store.new_client()
    store.call(cond, "acquire", client=waiter)
    store.call(cond, "acquire", client=waiter)  # depth 2
    pending = store.start(cond, "wait", client=waiter)
    assert store.call(lock, "locked") is False  # released completely
    store.call(cond, "acquire", client=notifier)
    store.call(cond, "notify", client=notifier)
    assert not pending.done()  # notified, but the lock is the notifier's
    store.call(cond, "release", client=notifier)
    assert pending.result() is True
    # The waiter holds it again, at depth 2.
    store.call(cond, "release", client=waiter)
    assert store.call(lock, "locked") is True
    store.call(cond, "release", client=waiter)
    assert store.call(lock, "locked") is False


def test_condition_wait_timeout_returns_false_holding_the_lock(store: StoreHarness) -> None:
    cond = store.open("Condition", "c")
    store.call(cond, "acquire")
    assert store.call(cond, "wait", SHORT_S) is False
    assert store.call(cond, "locked") is True
    assert store.waiters(cond) == 0
    store.call(cond, "release")


def test_notify_n_and_notify_all(store: StoreHarness) -> None:
    cond = store.open("Condition", "c")
    clients = [store.new_client() for _ in range(4)]
    waiting = []
    for c in clients:
        store.call(cond, "acquire", client=c)
        waiting.append(store.start(cond, "wait", client=c))
    store.call(cond, "acquire")
    store.call(cond, "notify", 2)
    assert store.waiters(cond) == 2
    store.call(cond, "notify_all")
    assert store.waiters(cond) == 0
    store.call(cond, "release")
    for c, pending in zip(clients, waiting, strict=True):  # each retakes the lock in turn
        assert pending.result() is True
        store.call(cond, "release", client=c)
    assert store.call(cond, "locked") is False


@pytest.mark.parametrize("method", ["wait", "notify", "notify_all"])
def test_condition_calls_need_the_lock(store: StoreHarness, method: str) -> None:
    cond = store.open("Condition", "c")
    model = threading.Condition()
    same_outcome(outcome(lambda: store.call(cond, method)), outcome(getattr(model, method)), method)
    store.call(cond, "acquire", client=store.new_client())  # held by someone else
    same_outcome(outcome(lambda: store.call(cond, method)), outcome(getattr(model, method)), method)


def _stdlib_notify(waiting: int, n: Any) -> Outcome:
    """What ``threading.Condition.notify(n)`` does with ``waiting`` threads: how many stay."""
    cond = threading.Condition()
    for _ in range(waiting):  # a waiting thread is a held lock in the condition's list
        waiter = threading.Lock()
        waiter.acquire()
        cond._waiters.append(waiter)  # type: ignore[attr-defined]
    with cond:
        got = outcome(lambda: cond.notify(n))
    return got if not got.ok else Outcome(value=len(cond._waiters))  # type: ignore[attr-defined]


@pytest.mark.parametrize("waiting", [0, 3])
@pytest.mark.parametrize("n", [1, 2, 5, 0, -1, 1.5, True, 2**70, "1", None, [1]], ids=repr)
def test_notify_n_as_the_stdlib(store: StoreHarness, waiting: int, n: Any) -> None:
    cond = store.open("Condition", "c")
    for _ in range(waiting):
        client = store.new_client()
        store.call(cond, "acquire", client=client)
        store.start(cond, "wait", client=client)
    store.call(cond, "acquire")
    got = outcome(lambda: store.call(cond, "notify", n))
    if got.ok:
        got = Outcome(value=store.waiters(cond))
    same_outcome(got, _stdlib_notify(waiting, n), f"notify({n!r}) with {waiting} waiting")


def test_condition_on_a_named_lock_shares_it(store: StoreHarness) -> None:
    lock = store.open("Lock", "shared")
    cond = store.open("Condition", "c", lock="shared")
    token = store.call(lock, "acquire")
    assert store.call(cond, "locked") is True
    assert store.call(cond, "acquire", False, client=store.new_client()) is False
    pending = store.start(cond, "wait")  # a Lock's holder may wait on it
    assert store.call(lock, "locked") is False
    store.call(lock, "acquire")
    store.call(cond, "notify")
    store.call(lock, "release")
    assert pending.result() is True
    assert store.call(lock, "fencing_token") > token


def test_condition_wait_for_as_a_client_runs_it(store: StoreHarness) -> None:
    """``wait_for`` is a client loop of wait() and a predicate: the predicate sees the
    state a notifier left, under the lock."""
    cond = store.open("Condition", "c")
    box = store.open("Value", "v", typecode="i", value=0)
    consumer, producer = store.new_client(), store.new_client()
    store.call(cond, "acquire", client=consumer)
    rounds = 0
    while store.call(box, "get", client=consumer) < 3:
        pending = store.start(cond, "wait", client=consumer)
        store.call(cond, "acquire", client=producer)
        store.call(box, "add", 1, client=producer)
        store.call(cond, "notify", client=producer)
        store.call(cond, "release", client=producer)
        assert pending.result() is True
        rounds += 1
    assert rounds == 3
    store.call(cond, "release", client=consumer)


def test_condition_lock_must_be_a_lock(store: StoreHarness) -> None:
    from managerd_client.errors import ObjectTypeConflict

    store.open("Semaphore", "sem")
    with pytest.raises(ObjectTypeConflict):
        store.open("Condition", "c", lock="sem")
    assert "c" not in dict(store.objects())


# -- Barrier ------------------------------------------------------------------------------


def test_barrier_releases_a_generation_with_indices(store: StoreHarness) -> None:
    bar = store.open("Barrier", "b", parties=3)
    assert store.call(bar, "state") == (3, 0, False)
    first = [store.start(bar, "wait", client=store.new_client()) for _ in range(2)]
    assert store.call(bar, "__getattribute__", "n_waiting") == 2
    last = store.call(bar, "wait")
    assert sorted([last] + [p.result() for p in first]) == [0, 1, 2]
    assert store.call(bar, "state") == (3, 0, False)
    # And again: a barrier is reusable.
    again = [store.start(bar, "wait", client=store.new_client()) for _ in range(2)]
    store.call(bar, "wait")
    assert all(p.done() for p in again)


def test_barrier_timeout_breaks_it_for_everyone(store: StoreHarness) -> None:
    bar = store.open("Barrier", "b", parties=3)
    other = store.start(bar, "wait", client=store.new_client())
    with pytest.raises(threading.BrokenBarrierError):
        store.call(bar, "wait", SHORT_S)
    with pytest.raises(threading.BrokenBarrierError):
        other.result()
    assert store.call(bar, "__getattribute__", "broken") is True
    with pytest.raises(threading.BrokenBarrierError):
        store.call(bar, "wait")
    store.call(bar, "reset")
    assert store.call(bar, "state") == (3, 0, False)


def test_barrier_default_timeout(store: StoreHarness) -> None:
    bar = store.open("Barrier", "b", parties=2, timeout=SHORT_S)
    with pytest.raises(threading.BrokenBarrierError):
        store.call(bar, "wait")
    assert store.call(bar, "__getattribute__", "broken") is True


def test_barrier_abort_and_reset_fail_the_waiters(store: StoreHarness) -> None:
    bar = store.open("Barrier", "b", parties=3)
    waiting = store.start(bar, "wait", client=store.new_client())
    store.call(bar, "reset")
    with pytest.raises(threading.BrokenBarrierError):
        waiting.result()
    assert store.call(bar, "__getattribute__", "broken") is False  # reset: usable
    waiting = store.start(bar, "wait", client=store.new_client())
    store.call(bar, "abort")
    with pytest.raises(threading.BrokenBarrierError):
        waiting.result()
    assert store.call(bar, "__getattribute__", "broken") is True


def test_barrier_attributes(store: StoreHarness) -> None:
    bar = store.open("Barrier", "b", parties=2)
    model = threading.Barrier(2)
    for name in ("parties", "n_waiting", "broken"):
        assert store.call(bar, "__getattribute__", name) == getattr(model, name)
    with pytest.raises(AttributeError):
        store.call(bar, "__getattribute__", "nope")


def test_a_one_party_barrier_never_waits(store: StoreHarness) -> None:
    bar = store.open("Barrier", "b", parties=1)
    assert store.call(bar, "wait") == 0
    assert store.call(bar, "wait") == 0


@pytest.mark.parametrize(
    "args",
    [{"parties": 0}, {"parties": -1}, {"parties": 1.5}, {"parties": True},
     {"parties": 2, "timeout": -1}, {"parties": 2, "timeout": float("nan")},
     {"parties": 2, "timeout": float("inf")}, {"parties": 2, "timeout": "1"}],
)  # fmt: skip
def test_barrier_creation_arguments_are_checked(
    store: StoreHarness, args: dict[str, object]
) -> None:
    with pytest.raises((ValueError, TypeError, OverflowError)):
        store.open("Barrier", "b", **args)
    assert "b" not in dict(store.objects())
