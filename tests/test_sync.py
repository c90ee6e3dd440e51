"""Events, conditions and barriers across client processes."""

from __future__ import annotations

import threading

import pytest

from managerd_client import ArgumentConflict, Manager, ObjectTypeConflict

import workers
from conftest import Daemon, wait_until


def _waiters(m: Manager, name: str) -> int:
    """How many calls the daemon has parked on ``name``."""
    count: int = m.status()["objects"][name]["waiters"]
    return count


# -- Event -------------------------------------------------------------------------------------


def test_event_releases_waiters_in_other_processes(shared_daemon: Daemon, uniq: str) -> None:
    out = uniq + ".out"
    tags = ["a", "b", "c"]
    with shared_daemon.connect() as m:
        event = m.Event(uniq)
        procs = workers.start_all(
            workers.wait_event,
            [(shared_daemon.address, shared_daemon.authkey, uniq, out, t) for t in tags],
        )
        assert wait_until(lambda: _waiters(m, uniq) == 3)
        assert m.list(out).copy() == []  # all three are still waiting
        event.set()
        workers.join_all(procs)
        assert sorted(m.list(out).copy()) == tags


def test_event_surface(manager: Manager, uniq: str) -> None:
    event = manager.Event(uniq)
    assert event.is_set() is False
    assert event.wait(timeout=0.1) is False
    assert event.wait(0) is False
    event.set()
    assert event.is_set() is True
    assert event.wait() is True and event.wait(timeout=0) is True
    event.clear()
    assert event.is_set() is False
    assert event.wait(timeout=0.05) is False


# -- Condition ----------------------------------------------------------------------------------


def test_condition_notify_wakes_one_then_notify_all_the_rest(
    shared_daemon: Daemon, uniq: str
) -> None:
    out = uniq + ".out"
    tags = ["a", "b", "c"]
    with shared_daemon.connect() as m:
        cond = m.Condition(uniq)
        procs = workers.start_all(
            workers.wait_condition,
            [(shared_daemon.address, shared_daemon.authkey, uniq, out, t) for t in tags],
        )
        assert wait_until(lambda: _waiters(m, uniq) == 3)
        with cond:
            cond.notify()
            assert _waiters(m, uniq) == 2  # exactly one left the condition
        # Each woken worker returns from wait() holding the lock again (it
        # calls notify(0), which needs it) and logs True, not a timeout.
        assert wait_until(lambda: len(m.list(out)) == 1)
        with cond:
            cond.notify(1)
            assert _waiters(m, uniq) == 1
            cond.notify_all()
            assert _waiters(m, uniq) == 0
        workers.join_all(procs)
        woken = m.list(out).copy()
        assert sorted(woken) == [(t, True) for t in tags]


def test_condition_wait_for_a_predicate_set_by_another_process(
    shared_daemon: Daemon, uniq: str
) -> None:
    flag, out = uniq + ".flag", uniq + ".out"
    with shared_daemon.connect() as m:
        cond = m.Condition(uniq)
        ns = m.Namespace(flag)
        ns.go = 0
        procs = workers.start_all(
            workers.wait_for_flag,
            [(shared_daemon.address, shared_daemon.authkey, uniq, flag, out, t) for t in "xy"],
        )
        assert wait_until(lambda: _waiters(m, uniq) == 2)
        with cond:
            cond.notify_all()  # a wake-up with the predicate still false...
        assert wait_until(lambda: _waiters(m, uniq) == 2)  # ...and both wait again
        assert m.list(out).copy() == []
        with cond:
            ns.go = 1
            cond.notify_all()
        workers.join_all(procs)
        assert sorted(m.list(out).copy()) == [("x", True), ("y", True)]


def test_condition_timeouts(manager: Manager, uniq: str) -> None:
    cond = manager.Condition(uniq)
    with cond:
        assert cond.wait(timeout=0.1) is False
        assert cond.locked()  # wait() returned holding the lock again
        assert cond.wait_for(lambda: False, timeout=0.1) is False
        assert cond.wait_for(lambda: "truthy", timeout=0.1) == "truthy"
        assert cond.wait(0) is False


def test_condition_requires_its_lock(manager: Manager, uniq: str) -> None:
    cond = manager.Condition(uniq)
    with pytest.raises(RuntimeError):
        cond.wait(timeout=0.1)
    with pytest.raises(RuntimeError):
        cond.notify()
    with pytest.raises(RuntimeError):
        cond.notify_all()
    with pytest.raises(RuntimeError):
        cond.release()


def test_condition_wait_restores_the_rlock_depth(
    shared_daemon: Daemon, manager: Manager, uniq: str
) -> None:
    cond = manager.Condition(uniq)
    with shared_daemon.connect() as other:
        theirs = other.Condition(uniq)
        cond.acquire()
        cond.acquire()
        assert cond.wait(timeout=0.1) is False  # released both levels, took both back
        cond.release()
        assert theirs.acquire(timeout=0.1) is False  # still held once
        cond.release()
        assert theirs.acquire(timeout=1) is True
        theirs.release()


def test_condition_over_a_named_lock(shared_daemon: Daemon, uniq: str) -> None:
    with shared_daemon.connect() as m1, shared_daemon.connect() as m2:
        lock = m1.Lock(uniq + ".lock")
        cond = m1.Condition(uniq, lock)
        with cond:
            assert m2.Lock(uniq + ".lock").locked()
        assert not lock.locked()
        with lock:  # holding the lock is holding the condition's lock
            cond.notify_all()
        with pytest.raises(ArgumentConflict):
            m2.Condition(uniq, m2.Lock(uniq + ".other"))
        assert m2.Condition(uniq).acquire(timeout=1)  # attaches, over the same lock
        assert lock.locked()
        m2.Condition(uniq).release()
        with pytest.raises(ObjectTypeConflict):
            m2.Condition(uniq + ".q", m2.Queue(uniq + ".notalock"))  # type: ignore[arg-type]


# -- Barrier -------------------------------------------------------------------------------------


def test_barrier_with_three_processes(shared_daemon: Daemon, uniq: str) -> None:
    out = uniq + ".out"
    with shared_daemon.connect() as m:
        barrier = m.Barrier(uniq, 3)
        assert (barrier.parties, barrier.n_waiting, barrier.broken) == (3, 0, False)
        procs = workers.start_all(
            workers.barrier_wait, [(shared_daemon.address, shared_daemon.authkey, uniq, out)] * 2
        )
        assert wait_until(lambda: barrier.n_waiting == 2)
        assert m.list(out).copy() == []  # two of three: nobody passes
        mine = barrier.wait(timeout=workers.WAIT_S)
        workers.join_all(procs)
        assert sorted([mine, *m.list(out).copy()]) == [0, 1, 2]
        assert barrier.n_waiting == 0 and barrier.broken is False
        # The barrier is reusable: a second generation.
        procs = workers.start_all(
            workers.barrier_wait, [(shared_daemon.address, shared_daemon.authkey, uniq, out)] * 3
        )
        workers.join_all(procs)
        assert sorted(m.list(out).copy()[2:]) == [0, 1, 2]


def test_barrier_abort_breaks_waiters_in_other_processes(shared_daemon: Daemon, uniq: str) -> None:
    out = uniq + ".out"
    with shared_daemon.connect() as m:
        barrier = m.Barrier(uniq, 3)
        procs = workers.start_all(
            workers.barrier_expect_broken,
            [(shared_daemon.address, shared_daemon.authkey, uniq, out, t) for t in "ab"],
        )
        assert wait_until(lambda: barrier.n_waiting == 2)
        barrier.abort()
        workers.join_all(procs)
        assert sorted(m.list(out).copy()) == ["a", "b"]
        assert barrier.broken is True and barrier.n_waiting == 0
        with pytest.raises(threading.BrokenBarrierError):
            barrier.wait(timeout=1)
        barrier.reset()
        assert barrier.broken is False
        procs = workers.start_all(
            workers.barrier_wait, [(shared_daemon.address, shared_daemon.authkey, uniq, out)] * 2
        )
        assert barrier.wait(timeout=workers.WAIT_S) in (0, 1, 2)  # usable again
        workers.join_all(procs)


def test_barrier_reset_breaks_current_waiters(shared_daemon: Daemon, uniq: str) -> None:
    out = uniq + ".out"
    with shared_daemon.connect() as m:
        barrier = m.Barrier(uniq, 2)
        proc = workers.start(
            workers.barrier_expect_broken,
            shared_daemon.address, shared_daemon.authkey, uniq, out, "reset",
        )  # fmt: skip
        assert wait_until(lambda: barrier.n_waiting == 1)
        barrier.reset()
        workers.join_all([proc])
        assert m.list(out).copy() == ["reset"]
        assert barrier.broken is False and barrier.n_waiting == 0


def test_barrier_timeout_breaks_it(manager: Manager, uniq: str) -> None:
    barrier = manager.Barrier(uniq, 2)
    with pytest.raises(threading.BrokenBarrierError):
        barrier.wait(timeout=0.1)
    assert barrier.broken is True
    with pytest.raises(threading.BrokenBarrierError):
        barrier.wait(timeout=1)
    barrier.reset()
    with pytest.raises(threading.BrokenBarrierError):
        barrier.wait(timeout=-1)  # as threading: no wait at all, and broken
    assert barrier.broken is True
    default = manager.Barrier(uniq + ".default", 2, timeout=0.1)
    with pytest.raises(threading.BrokenBarrierError):
        default.wait()  # the barrier's own timeout applies
    assert default.broken is True


def test_barrier_of_one_party(manager: Manager, uniq: str) -> None:
    barrier = manager.Barrier(uniq, 1)
    assert barrier.wait() == 0 and barrier.wait() == 0


def test_barrier_get_or_create_by_name(shared_daemon: Daemon, uniq: str) -> None:
    with shared_daemon.connect() as m1, shared_daemon.connect() as m2:
        m1.Barrier(uniq, 3)
        with pytest.raises(ArgumentConflict):
            m2.Barrier(uniq, 2)
        assert m2.Barrier(uniq).parties == 3  # no parties: attaches
        assert m2.Barrier(uniq, 3).parties == 3
        with pytest.raises(ObjectTypeConflict):
            m2.Event(uniq)
        with pytest.raises(ValueError):
            m2.Barrier(uniq + ".zero", 0)
