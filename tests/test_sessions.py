"""Nothing lost, nothing stuck: what a session's end gives back (real kill -9)."""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import threading
import time
import traceback
from typing import Any

import pytest

from managerd_client import (
    ConnectionLost,
    LockLost,
    Manager,
    ServerShuttingDown,
)
from managerd_client.channel import Channel

import workers_sessions as w
from conftest import Daemon, wait_until

fork = multiprocessing.get_context("fork")


def _waiters(m: Manager, name: str) -> int:
    obj = m.status()["objects"].get(name)
    return int(obj["waiters"]) if obj else 0


def _start(target: Any, *args: Any) -> multiprocessing.process.BaseProcess:
    proc = fork.Process(target=target, args=args, daemon=True)
    proc.start()
    return proc


def _get_into(q: Any, out: list[Any]) -> None:
    out.append(q.get(timeout=10))


def _kill(proc: multiprocessing.process.BaseProcess) -> None:
    proc.kill()
    proc.join(10)
    assert proc.exitcode == -signal.SIGKILL


@pytest.mark.slow
def test_consumer_killed_in_get_loses_nothing(shared_daemon: Daemon, uniq: str) -> None:
    """100 trials: the consumer first in line is killed, then a put; a live one gets it."""
    d = shared_daemon
    with d.connect() as m, d.connect() as live:
        q = m.Queue(uniq)
        live_q = live.Queue(uniq)
        lost = 0
        for trial in range(100):
            doomed = _start(w.block_in_get, d.address, d.authkey, uniq)
            assert wait_until(lambda: _waiters(m, uniq) == 1)
            got: list[Any] = []
            t = threading.Thread(target=_get_into, args=(live_q, got))
            t.start()
            assert wait_until(lambda: _waiters(m, uniq) == 2)
            _kill(doomed)
            q.put(trial)  # at once: the daemon may not have read the EOF yet
            t.join(15)
            if got != [trial]:
                lost += 1
        assert lost == 0
        assert q.qsize() == 0


@pytest.mark.parametrize("typeid", ["Lock", "RLock", "Semaphore"])
def test_holder_killed_releases(shared_daemon: Daemon, uniq: str, typeid: str) -> None:
    d = shared_daemon
    with d.connect() as m:
        lock = getattr(m, typeid)(uniq)
        holder = _start(w.hold_lock, d.address, d.authkey, typeid, uniq, uniq + ".ready")
        assert m.Event(uniq + ".ready").wait(10)
        assert lock.acquire(timeout=0.05) is False
        first = m.status()["objects"][uniq]["token"]
        _kill(holder)
        assert lock.acquire(timeout=1.0) is True  # within 1 s of the kill
        assert lock.fencing_token is not None and lock.fencing_token > first
        lock.release()


def test_waiter_killed_lock_goes_to_live_waiter(shared_daemon: Daemon, uniq: str) -> None:
    d = shared_daemon
    with d.connect() as m, d.connect() as other:
        lock = m.Lock(uniq)
        assert lock.acquire()
        doomed = _start(w.wait_for_lock, d.address, d.authkey, uniq)
        assert wait_until(lambda: _waiters(m, uniq) == 1)
        got: list[bool] = []
        t = threading.Thread(target=lambda: got.append(other.Lock(uniq).acquire(timeout=10)))
        t.start()
        assert wait_until(lambda: _waiters(m, uniq) == 2)
        _kill(doomed)
        lock.release()
        t.join(15)
        assert got == [True]
        holder = m.status()["objects"][uniq]["holder"]
        assert holder["id"] == other.session_id
        assert _waiters(m, uniq) == 0


def test_reserved_message_comes_back_when_consumer_dies(shared_daemon: Daemon, uniq: str) -> None:
    d = shared_daemon
    with d.connect() as m:
        q = m.Queue(uniq)
        q.put("payload")
        q.put("second")
        proc = _start(w.reserve_and_hang, d.address, d.authkey, uniq, uniq + ".seen")
        assert wait_until(lambda: "value" in m.dict(uniq + ".seen"))
        assert q.qsize() == 1
        _kill(proc)
        assert wait_until(lambda: q.qsize() == 2)
        msg = q.reserve(timeout=1)
        assert (msg.value, msg.deliveries) == ("payload", 2)  # back at the front
        msg.ack()
        assert q.get(timeout=1) == "second"


def test_acked_message_never_comes_back(shared_daemon: Daemon, uniq: str) -> None:
    d = shared_daemon
    m = d.connect()
    q = m.Queue(uniq, visibility_timeout_s=0.2)
    q.put("x")
    with q.reserve(timeout=1) as msg:
        assert msg.value == "x"
    m.close()  # session ends after the ack: nothing to give back
    with d.connect() as m2:
        q2 = m2.Queue(uniq)
        with pytest.raises(queue.Empty):
            q2.get(timeout=0.5)  # longer than the visibility timeout


def test_barrier_breaks_when_a_waiter_dies(shared_daemon: Daemon, uniq: str) -> None:
    import threading as th

    d = shared_daemon
    with d.connect() as m:
        b = m.Barrier(uniq, 3)
        doomed = _start(w.wait_at_barrier, d.address, d.authkey, uniq)
        assert wait_until(lambda: b.n_waiting == 1)
        errors: list[BaseException] = []

        def wait() -> None:
            try:
                b.wait(timeout=10)
            except th.BrokenBarrierError as exc:
                errors.append(exc)

        t = th.Thread(target=wait)
        t.start()
        assert wait_until(lambda: b.n_waiting == 2)
        _kill(doomed)
        t.join(15)
        assert len(errors) == 1
        assert b.broken


def test_closed_session_releases_everything(shared_daemon: Daemon, uniq: str) -> None:
    d = shared_daemon
    m = d.connect()
    m.Lock(uniq + "l").acquire()
    m.Semaphore(uniq + "s", 2).acquire()
    with d.connect() as other:
        assert other.Lock(uniq + "l").acquire(timeout=0.05) is False
        m.close()
        assert other.Lock(uniq + "l").acquire(timeout=2) is True
        assert other.Semaphore(uniq + "s").get_value() == 2


def _blocked_get(
    daemon: Daemon, name: str
) -> tuple[Manager, threading.Thread, list[BaseException]]:
    """A client whose thread is parked in get() on the daemon; its error lands in the list."""
    m = daemon.connect(connect_timeout_s=0.5)
    q = m.Queue(name)
    errors: list[BaseException] = []

    def get() -> None:
        try:
            q.get()
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=get)
    t.start()
    assert wait_until(lambda: _waiters(m, name) == 1)
    return m, t, errors


def test_sigterm_answers_waiters_then_exits_zero(daemon: Daemon, uniq: str) -> None:
    m, t, errors = _blocked_get(daemon, uniq)
    daemon.signal(signal.SIGTERM)
    t.join(15)
    assert len(errors) == 1 and isinstance(errors[0], ServerShuttingDown), errors
    assert daemon.wait(15) == 0
    m.close()


def test_restart_clients_reconnect_and_go_on(daemon: Daemon, uniq: str) -> None:
    m = daemon.connect(connect_timeout_s=10)
    q = m.Queue(uniq, maxsize=5)
    lock = m.Lock(uniq + ".lock")
    q.put(1)
    assert lock.acquire()
    old_server = m.server_id
    daemon.restart()
    # A call in flight? None here: the next call reconnects and re-creates.
    q.put(2)
    assert m.server_id != old_server
    assert q.qsize() == 1  # memory-only daemon: the queue came back empty
    assert q.get(timeout=1) == 2
    with pytest.raises(LockLost):
        lock.release()  # the old session (and the lock with it) is gone
    assert lock.acquire(timeout=1)
    lock.release()
    m.close()


def test_threads_calling_at_once_after_a_restart_all_reconnect(daemon: Daemon, uniq: str) -> None:
    """The first calls after a crash, from several threads of one manager at once:
    none is sent into the connection already known dead (none raises ConnectionLost).

    Found by the long stateful run: while one thread polled the idle connection
    and found it hung up, another skipped the check and sent into it.
    """
    m = daemon.connect(connect_timeout_s=10)
    n = 8
    start = threading.Barrier(n)
    errors: list[BaseException] = []

    def first_call() -> None:
        start.wait()
        try:
            m.Queue(uniq).qsize()
        except BaseException as exc:  # any error is the failure
            errors.append(exc)

    for _round in range(10):
        m.Queue(uniq).put(0)  # the connection was heard from just now
        daemon.kill()
        daemon.start(port=daemon.port)
        threads = [threading.Thread(target=first_call) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert errors == [], errors
    m.close()


def test_call_in_flight_when_daemon_dies_raises_connection_lost(daemon: Daemon, uniq: str) -> None:
    m, t, errors = _blocked_get(daemon, uniq)
    daemon.kill()
    t.join(15)
    assert len(errors) == 1 and isinstance(errors[0], ConnectionLost), errors
    m.close()


def test_close_from_another_thread_wakes_a_blocked_call_and_ends_the_session(
    shared_daemon: Daemon, uniq: str
) -> None:
    m, t, errors = _blocked_get(shared_daemon, uniq)
    session = m.session_id
    m.close()
    t.join(5)
    assert not t.is_alive() and isinstance(errors[0], ConnectionLost)
    with shared_daemon.connect() as other:
        assert wait_until(lambda: session not in {s["id"] for s in other.status()["sessions"]})


def _hold_until(proxies: list[Any], held: threading.Event, go: threading.Event) -> list[Any]:
    """A parent thread's holdings: acquire each, signal, release each when told."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            for proxy in proxies:
                assert proxy.acquire(timeout=5)
            outcome.append([proxy.fencing_token for proxy in proxies])
            held.set()
            assert go.wait(30)
            outcome.append([proxy.fencing_token for proxy in proxies])
            for proxy in proxies:
                proxy.release()
            outcome.append("released")
        except BaseException as exc:  # reported by the test
            outcome.append(exc)
            held.set()

    threading.Thread(target=run, daemon=True).start()
    return outcome


def _fork_and_run(how: str, *args: Any) -> int | None:
    if how == "multiprocessing":
        proc = _start(w.forked_child_holds_nothing, *args)
        proc.join(30)
        return proc.exitcode
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            w.forked_child_holds_nothing(*args)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.parametrize("how", ["multiprocessing", "os.fork"])
def test_forked_child_holds_nothing_and_parent_keeps_its_holdings(
    shared_daemon: Daemon, uniq: str, how: str
) -> None:
    """Issue 11 (5): a child forked while a parent thread holds locks starts clean."""
    d = shared_daemon
    with d.connect() as m, d.connect() as observer:
        held = [m.Lock(uniq + ".lock"), m.RLock(uniq + ".rlock"), m.Condition(uniq + ".cond")]
        free = m.Lock(uniq + ".free")
        is_held, go = threading.Event(), threading.Event()
        outcome = _hold_until(held, is_held, go)
        assert is_held.wait(10) and not isinstance(outcome[0], BaseException), outcome
        code = _fork_and_run(how, held, free, m.session_id)
        assert code == 0, f"the forked child failed (exit code {code}); see its stderr"
        # The parent still holds all three, with the same tokens, and releases them.
        objects = observer.status()["objects"]
        for name in (uniq + ".lock", uniq + ".rlock", uniq + ".cond.lock"):
            assert objects[name]["holder"]["id"] == m.session_id, objects[name]
        go.set()
        assert wait_until(lambda: len(outcome) == 3), outcome
        assert outcome[1] == outcome[0] and outcome[2] == "released", outcome
        assert not any(proxy.locked() for proxy in held)


def test_a_session_cannot_be_taken_over_by_its_public_id(shared_daemon: Daemon, uniq: str) -> None:
    """The id every status shows does not resume a session: only the secret its
    client got does. A peer that resumed by id would hold the victim's lock too."""
    victim = shared_daemon.connect()
    lock = victim.RLock(uniq)
    assert lock.acquire()
    public = victim.session_id
    assert public in {s["id"] for s in victim.status()["sessions"]}
    thief = Channel(
        (shared_daemon.host, shared_daemon.port),
        shared_daemon.authkey,
        connect_timeout_s=5,
        hello={"resume": public},
    )
    try:
        assert not thief.resumed and thief.session_id != public
        with pytest.raises(RuntimeError):  # not the holder: its release is refused
            thief.call("RLock", uniq, "release", ())
        lock.release()  # the victim's connection was not closed, its lock still its own
        assert victim.session_id == public
    finally:
        thief.close()
        victim.close()


def test_close_while_another_thread_reconnects_leaves_no_session(daemon: Daemon, uniq: str) -> None:
    """A manager closed while one of its threads retries a connect (the daemon is
    down): that thread gives up with ConnectionLost, and no connection or session
    is left behind once the daemon is back (found by the long stateful run as a
    socket never closed)."""
    m = daemon.connect(connect_timeout_s=20)
    q = m.Queue(uniq)
    port = daemon.port
    daemon.kill()
    time.sleep(0.1)  # past the client's idle check: the call reconnects, not sends
    errors: list[BaseException] = []

    def call() -> None:
        try:
            q.qsize()
        except BaseException as exc:  # the outcome under test
            errors.append(exc)

    t = threading.Thread(target=call)
    t.start()
    time.sleep(0.3)  # it is in the reconnect loop (nobody listens)
    m.close()
    daemon.start(port=port)
    t.join(30)
    assert not t.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], ConnectionLost), errors
    with daemon.connect() as other:
        assert wait_until(lambda: len(other.status()["sessions"]) == 1, 5), other.status()[
            "sessions"
        ]
