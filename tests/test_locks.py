"""Locks, re-entrant locks and semaphores across client processes."""

from __future__ import annotations

import itertools
import subprocess
import sys
import threading
from typing import Any

import pytest

from managerd_client import ArgumentConflict, LockLost, Manager, ObjectTypeConflict

import workers
from conftest import Daemon, wait_until


def _assert_never_overlapped(events: list[tuple[str, str]], expected_sections: int) -> None:
    """Enter/exit events logged inside the lock must strictly alternate, per holder."""
    assert len(events) == 2 * expected_sections
    for i in range(0, len(events), 2):
        enter, leave = events[i], events[i + 1]
        assert enter[0] == "enter" and leave == ("exit", enter[1]), events[i : i + 4]


def _session_gone(m: Manager, session_id: str | None) -> bool:
    return all(s["id"] != session_id for s in m.status()["sessions"])


# -- mutual exclusion across processes ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["Lock", "RLock"])
def test_lock_excludes_other_processes(shared_daemon: Daemon, uniq: str, kind: str) -> None:
    events, n = uniq + ".events", 15
    tags = ["p0", "p1", "p2"]
    procs = workers.start_all(
        workers.lock_worker,
        [(shared_daemon.address, shared_daemon.authkey, uniq, kind, events, t, n) for t in tags],
    )
    workers.join_all(procs)
    with shared_daemon.connect() as m:
        log = m.list(events).copy()
        _assert_never_overlapped(log, len(tags) * n)
        assert sorted({tag for _, tag in log}) == tags


def test_lock_held_by_another_process(shared_daemon: Daemon, manager: Manager, uniq: str) -> None:
    held, done = uniq + ".held", uniq + ".done"
    lock = manager.Lock(uniq)
    proc = workers.start(
        workers.hold_lock_until, shared_daemon.address, shared_daemon.authkey, uniq, held, done
    )
    assert manager.Event(held).wait(timeout=workers.WAIT_S)
    assert lock.locked()
    assert lock.acquire(timeout=0.1) is False
    assert lock.acquire(blocking=False) is False
    with pytest.raises(ValueError):
        lock.acquire(blocking=False, timeout=1)  # as threading.Lock
    manager.Event(done).set()
    assert lock.acquire(timeout=workers.WAIT_S) is True  # once the other releases it
    workers.join_all([proc])
    lock.release()
    assert not lock.locked()


def test_plain_lock_may_be_released_by_another_client(
    shared_daemon: Daemon, manager: Manager, uniq: str
) -> None:
    lock = manager.Lock(uniq)
    assert lock.acquire()
    proc = workers.start(workers.release_lock, shared_daemon.address, shared_daemon.authkey, uniq)
    workers.join_all([proc])
    assert not lock.locked()
    with pytest.raises(RuntimeError):
        lock.release()


def test_fencing_tokens_increase(manager: Manager, uniq: str) -> None:
    lock = manager.Lock(uniq)
    assert lock.fencing_token is None
    tokens: list[int | None] = []
    for _ in range(3):
        with lock:
            tokens.append(lock.fencing_token)
    assert lock.fencing_token is None
    ints = [t for t in tokens if isinstance(t, int)]
    assert len(ints) == 3 and ints == sorted(set(ints))


# -- RLock ---------------------------------------------------------------------------------------


def test_rlock_is_reentrant_and_held_until_fully_released(
    shared_daemon: Daemon, manager: Manager, uniq: str
) -> None:
    rlock = manager.RLock(uniq)
    with shared_daemon.connect() as other:
        theirs = other.RLock(uniq)
        assert rlock.acquire() and rlock.acquire(timeout=1) and rlock.acquire(blocking=False)
        rlock.release()
        rlock.release()
        assert rlock.locked()
        assert theirs.acquire(timeout=0.1) is False  # one level still held
        rlock.release()
        assert not rlock.locked()
        assert theirs.acquire(timeout=1) is True
        theirs.release()
    with pytest.raises(RuntimeError):
        rlock.release()


def test_rlock_is_owned_by_a_thread(manager: Manager, uniq: str) -> None:
    rlock = manager.RLock(uniq)
    acquired, done = threading.Event(), threading.Event()
    outcome: dict[str, Any] = {}

    def owner() -> None:
        try:
            outcome["acquired"] = rlock.acquire(timeout=5)
            acquired.set()
            done.wait(10)
            rlock.release()
            outcome["released"] = True
        except BaseException as exc:
            outcome["error"] = exc
            acquired.set()

    t = threading.Thread(target=owner)
    t.start()
    assert acquired.wait(10) and outcome.get("acquired") is True
    with pytest.raises(RuntimeError):
        rlock.release()  # held by the other thread of this same client
    assert rlock.acquire(timeout=0.1) is False  # and not re-entrant for this one
    done.set()
    t.join(10)
    assert outcome.get("released") is True and "error" not in outcome
    with rlock:
        assert rlock.locked()


# -- semaphores ---------------------------------------------------------------------------------


def test_semaphore_bounds_concurrent_holders(shared_daemon: Daemon, uniq: str) -> None:
    counter, peaks = uniq + ".current", uniq + ".peaks"
    with shared_daemon.connect() as m:
        m.Semaphore(uniq, 2)
        procs = workers.start_all(
            workers.semaphore_worker,
            [(shared_daemon.address, shared_daemon.authkey, uniq, counter, peaks, 15)] * 4,
        )
        workers.join_all(procs)
        seen = m.list(peaks).copy()
        assert len(seen) == 4 * 15
        assert max(seen) <= 2
        assert m.Value(counter, "i").value == 0
        assert m.Semaphore(uniq).get_value() == 2


def test_semaphore_admits_exactly_value_holders(
    shared_daemon: Daemon, manager: Manager, uniq: str
) -> None:
    barrier, done = uniq + ".barrier", uniq + ".done"
    sem = manager.Semaphore(uniq, 2)
    meeting = manager.Barrier(barrier, 3)
    procs = workers.start_all(
        workers.hold_semaphore,
        [(shared_daemon.address, shared_daemon.authkey, uniq, barrier, done)] * 2,
    )
    # Both holders reach the barrier while holding a permit each: the
    # semaphore let two in at once.
    meeting.wait(timeout=workers.WAIT_S)
    assert sem.get_value() == 0
    assert sem.acquire(timeout=0.1) is False  # a third is kept out
    assert sem.acquire(blocking=False) is False
    manager.Event(done).set()
    workers.join_all(procs)
    assert sem.get_value() == 2
    assert sem.acquire(timeout=1) and sem.acquire(timeout=1)
    assert sem.get_value() == 0
    sem.release(2)
    assert sem.get_value() == 2


def test_bounded_semaphore_over_release(manager: Manager, uniq: str) -> None:
    sem = manager.BoundedSemaphore(uniq, 2)
    with pytest.raises(ValueError):
        sem.release()
    assert sem.acquire()
    sem.release()
    with pytest.raises(ValueError):
        sem.release()
    assert sem.get_value() == 2
    plain = manager.Semaphore(uniq + ".plain", 1)
    plain.release()  # an unbounded semaphore just grows, as threading's
    assert plain.get_value() == 2


def test_permit_released_by_another_client_is_not_returned_twice(
    shared_daemon: Daemon, manager: Manager, uniq: str
) -> None:
    sem = manager.BoundedSemaphore(uniq, 1)
    holder = shared_daemon.connect()
    assert holder.BoundedSemaphore(uniq).acquire(timeout=1)
    assert sem.get_value() == 0
    sem.release()  # handed back by a client that did not take it: allowed
    assert sem.get_value() == 1
    session = holder.session_id
    holder.close()  # the taker's session ends: it holds nothing any more
    assert wait_until(lambda: _session_gone(manager, session))
    assert sem.get_value() == 1
    assert sem.acquire(timeout=1)
    assert sem.acquire(blocking=False) is False


def test_semaphore_timeouts_and_arguments(manager: Manager, uniq: str) -> None:
    sem = manager.Semaphore(uniq, 0)
    assert sem.acquire(timeout=0.1) is False
    assert sem.acquire(False) is False
    with pytest.raises(ValueError):
        sem.release(0)
    with pytest.raises(ValueError):
        manager.Semaphore(uniq + ".neg", -1)


# -- get-or-create by name -----------------------------------------------------------------------


def test_locks_get_or_create_by_name(shared_daemon: Daemon, uniq: str) -> None:
    with shared_daemon.connect() as m1, shared_daemon.connect() as m2:
        lock = m1.Lock(uniq + ".lock")
        lock.acquire()
        assert m2.Lock(uniq + ".lock").locked()  # the same lock
        lock.release()
        with pytest.raises(ObjectTypeConflict):
            m2.RLock(uniq + ".lock")
        with pytest.raises(ObjectTypeConflict):
            m2.Semaphore(uniq + ".lock")
        m1.Semaphore(uniq + ".sem", 3)
        with pytest.raises(ArgumentConflict):
            m2.Semaphore(uniq + ".sem", 4)
        assert m2.Semaphore(uniq + ".sem").get_value() == 3  # no value: attaches
        assert m2.Semaphore(uniq + ".sem", 3).get_value() == 3
        with pytest.raises(ObjectTypeConflict):
            m2.BoundedSemaphore(uniq + ".sem", 3)


def test_semaphore_and_lock_arguments_as_threading(manager: Manager, uniq: str) -> None:
    """Found by tests/test_stateful_locks.py: timeouts and counts mean what threading says."""
    sem = manager.Semaphore(uniq, 0)
    assert sem.acquire(timeout=-5) is False  # threading.Semaphore: a negative timeout: no wait
    assert sem.acquire(timeout=-1) is False  # (the daemon waited for ever)
    with pytest.raises(ValueError):
        sem.acquire(False, 1)  # no timeout on a non-blocking acquire
    with pytest.raises(TypeError):
        sem.release("1")  # type: ignore[arg-type]
    lock = manager.Lock(uniq + ".lock")
    with pytest.raises(TypeError):
        lock.acquire(False, "1")  # type: ignore[arg-type]  # threading checks the type first
    assert lock.acquire(True, 0.01) is True
    lock.release()


# -- fencing tokens across daemon restarts (issue 11, item 4) ------------------------------------


def _tokens(d: Daemon, name: str, n: int = 3) -> list[int]:
    """``n`` fencing tokens of the Lock, the RLock and the Semaphore ``name``-ish, in order."""
    out: list[int] = []
    with d.connect() as m:
        for proxy in (m.Lock(name), m.RLock(name + ".r"), m.Semaphore(name + ".s", 2)):
            for _ in range(n):
                assert proxy.acquire(timeout=5)
                token = proxy.fencing_token
                assert isinstance(token, int) and 0 < token < 2**53
                out.append(token)
                proxy.release()
    return out


def _by_object(tokens: list[int], n: int = 3) -> list[list[int]]:
    return [tokens[i : i + n] for i in range(0, len(tokens), n)]


@pytest.mark.parametrize("data_dir", [True, False], ids=["data-dir", "memory-only"])
def test_fencing_tokens_increase_across_restarts_and_crashes(tmp_path: Any, data_dir: bool) -> None:
    args = ["--data-dir", str(tmp_path / "data")] if data_dir else []
    d = Daemon(tmp_path, args=args).start()
    try:
        rounds = [_tokens(d, "fenced")]
        d.restart()  # SIGTERM, then start again
        rounds.append(_tokens(d, "fenced"))
        d.kill()  # kill -9: no chance to store anything on the way out
        d.start(port=d.port)
        rounds.append(_tokens(d, "fenced"))
    finally:
        d.stop()
    for obj in range(3):  # Lock, RLock, Semaphore: each one's tokens strictly increase
        seq = [t for r in rounds for t in _by_object(r)[obj]]
        assert all(a < b for a, b in itertools.pairwise(seq)), seq


def test_a_stored_ceiling_beats_a_clock_stepped_back(tmp_path: Any) -> None:
    """The ceiling is what a clock stepped back cannot undercut: tokens start at it."""
    data = tmp_path / "data"
    d = Daemon(tmp_path, args=["--data-dir", str(data)]).start()
    try:
        first = _tokens(d, "ceiling", 1)[0]
        stored = int((data / "fencing-ceiling").read_text())
        assert stored > first  # stored before serving, above every token issued
        d.kill()
        # As if the previous daemon's clock had run a day ahead of this one's.
        ahead = first + 86_400 * 10**6
        (data / "fencing-ceiling").write_text(f"{ahead}\n")
        d.start(port=d.port)
        after = _tokens(d, "ceiling", 1)
        assert min(after) >= ahead
        assert int((data / "fencing-ceiling").read_text()) > max(after)
    finally:
        d.stop()


def test_a_corrupt_ceiling_refuses_to_start(tmp_path: Any) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "fencing-ceiling").write_text("garbage\n")
    d = Daemon(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "managerd", "serve", "--port", "0", "--data-dir", str(data)],
        env=d.env(),
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert done.returncode == 2
    assert "fencing-token ceiling" in done.stderr and "garbage" in done.stderr


def test_lock_lost_after_a_restart_says_the_daemon_restarted(tmp_path: Any) -> None:
    d = Daemon(tmp_path).start()
    try:
        with d.connect() as m:
            lock = m.Lock("held")
            assert lock.acquire()
            d.restart()
            with pytest.raises(LockLost, match="the daemon restarted"):
                lock.release()
            assert lock.acquire(timeout=5)  # and the lock works again
            lock.release()
    finally:
        d.stop()
