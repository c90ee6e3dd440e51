"""A blocked call ended by an exception in a process that goes on is cancelled.

Ctrl-C in ``q.get()`` (KeyboardInterrupt), an exception raised by a signal
handler, an asynchronous exception in a thread: the client gives the call
up, and the daemon must too, or the next item (lock, permit, message) goes
to a caller that is no longer there. Real daemons, real child processes,
real signals; each child stays alive and uses its ``Manager`` afterwards.
"""

from __future__ import annotations

import inspect
import multiprocessing
import os
import pickle
import queue
import random
import signal
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import workers_interrupts as wi
from test_tls import _tls_daemon, pki  # noqa: F401  (pki: a fixture used here)

import managerd_client.channel as channel_module
from managerd_client import ConnectionLost, Manager, connect
from managerd_client.channel import Channel

from conftest import Daemon, wait_until

WAIT_S = 30.0


class Child:
    """A spawned client process and the pipe the test drives it by."""

    def __init__(self, target: Callable[..., None], *args: Any) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, theirs = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(*args, theirs))
        self.proc.start()
        theirs.close()

    def recv(self) -> Any:
        if not self.conn.poll(WAIT_S):
            if self.proc.is_alive():
                self.signal(signal.SIGUSR2)  # its stacks to stderr (faulthandler)
                time.sleep(1)
            pytest.fail(f"the child said nothing (exit code {self.proc.exitcode})")
        return self.conn.recv()

    def send(self, message: Any) -> None:
        self.conn.send(message)

    def signal(self, sig: int) -> None:
        assert self.proc.pid is not None
        os.kill(self.proc.pid, sig)

    def finish(self) -> None:
        self.send("bye")
        self.proc.join(WAIT_S)
        assert self.proc.exitcode == 0


@contextmanager
def child(target: Callable[..., None], *args: Any) -> Iterator[Child]:
    c = Child(target, *args)
    try:
        yield c
    finally:
        if c.proc.is_alive():
            c.proc.kill()
        c.proc.join(5)


def _status(m: Manager, name: str, key: str = "waiters") -> Any:
    return m.status()["objects"][name][key]


def _parked(m: Manager, name: str, n: int, key: str = "waiters") -> bool:
    return wait_until(lambda: _status(m, name, key) == n)


def _interrupt(
    c: Child, m: Manager, name: str, sig: int, key: str = "waiters", settle: bool = True
) -> Any:
    """Wait until the child's call is parked, signal it, and return its report.

    With ``settle``, also until the daemon dropped the call (the child's
    cancel travels on its own connection: it may come after this one's calls).
    """
    assert c.recv() == "ready"
    assert _parked(m, name, 1, key), "the child's call was not parked"
    c.signal(sig)
    report = c.recv()
    assert report[0] == "interrupted", report
    if settle:
        assert _parked(m, name, 0, key), "the abandoned call is still parked on the daemon"
    return report


# -- the issue: Ctrl-C in q.get() swallowed the next item ------------------------------------


@pytest.mark.parametrize(
    ("sig", "kind", "raised"),
    [(signal.SIGINT, "get", "KeyboardInterrupt"), (signal.SIGUSR1, "custom", "Interrupted")],
    ids=["KeyboardInterrupt", "signal-handler-exception"],
)
def test_an_interrupted_get_does_not_swallow_the_next_item(
    daemon: Daemon, uniq: str, sig: int, kind: str, raised: str
) -> None:
    with (
        daemon.connect() as m,
        child(wi.blocked_child, daemon.address, daemon.authkey, kind, uniq) as c,
    ):
        q = m.Queue(uniq)
        assert _interrupt(c, m, uniq, sig, settle=False) == ("interrupted", raised)
        # Put at once: the daemon may see the child's cancel before or after
        # this put (two connections); either way the item ends in the queue.
        q.put("a")
        assert wait_until(lambda: q.qsize() == 1), "the item went to the abandoned get"
        assert q.get(timeout=2) == "a"
        # The child's Manager still works: its next get takes the next item.
        q.put("b")
        c.send("go")
        assert c.recv() == ("again", "b")
        c.finish()


def test_an_interrupted_get_over_tls_keeps_the_connection(
    tmp_path: Path,
    pki: dict[str, Path],  # noqa: F811  (the fixture)
    uniq: str,
) -> None:
    """Over TLS the client waits for data before it reads: Ctrl-C there reads nothing."""
    daemon = _tls_daemon(tmp_path, pki)
    try:
        with (
            connect(daemon.address, authkey=daemon.authkey, tls_ca=pki["ca"]) as m,
            child(
                wi.blocked_tls_child, daemon.address, daemon.authkey, str(pki["ca"]), "get", uniq
            ) as c,
        ):
            q = m.Queue(uniq)
            _interrupt(c, m, uniq, signal.SIGINT)
            sessions = {s["id"] for s in m.status()["sessions"]}
            assert len(sessions) == 2  # the child's is still there
            q.put("a")
            assert q.qsize() == 1
            assert q.get(timeout=2) == "a"
            q.put("b")
            c.send("go")
            assert c.recv() == ("again", "b")
            # The same session all along: the connection was not closed.
            assert {s["id"] for s in m.status()["sessions"]} == sessions
            assert "closing connection" not in daemon.log
            c.finish()
    finally:
        daemon.stop()


def test_an_interrupted_get_many_and_reserve(daemon: Daemon, uniq: str) -> None:
    with daemon.connect() as m:
        q = m.Queue(uniq)
        with child(wi.blocked_child, daemon.address, daemon.authkey, "get_many", uniq) as c:
            _interrupt(c, m, uniq, signal.SIGINT)
            q.put_many(["a", "b"])
            assert q.get_many(10, timeout=2) == ["a", "b"]
            q.put("c")
            c.send("go")
            assert c.recv() == ("again", ["c"])
            c.finish()
        with child(wi.blocked_child, daemon.address, daemon.authkey, "reserve", uniq) as c:
            _interrupt(c, m, uniq, signal.SIGINT)
            q.put("a")
            message = q.reserve(timeout=2)
            assert (message.value, message.deliveries) == ("a", 1)
            message.ack()
            q.put("b")
            c.send("go")
            assert c.recv() == ("again", ("b", 1))
            c.finish()
        assert q.qsize() == 0
        assert m._call("Queue", uniq, "reserved_count", ()) == 0


# -- the daemon had answered when the interrupt came ------------------------------------------


@pytest.mark.parametrize("kind", ["get", "get_many", "reserve", "Pipe"])
def test_an_answer_interrupted_while_decoded_goes_back_first(
    daemon: Daemon, uniq: str, kind: str
) -> None:
    """The item arrived; Ctrl-C struck while the client unpickled it: it is first again."""
    with (
        daemon.connect() as m,
        child(wi.blocked_child, daemon.address, daemon.authkey, kind, uniq) as c,
    ):
        assert c.recv() == "ready"
        if kind == "Pipe":
            end0, end1 = m.Pipe(uniq)
            end0.send(wi.Trap())
            end0.send("x")
        else:
            q = m.Queue(uniq)
            q.put_many([wi.Trap(), "x"])
        assert c.recv() == ("interrupted", "KeyboardInterrupt")
        # The child's cancel and this client's calls travel on two connections.
        if kind == "Pipe":
            assert wait_until(lambda: _status(m, uniq, "buffered") == [0, 2])
        else:
            assert wait_until(lambda: q.qsize() == 2), "the item did not come back"
        if kind == "Pipe":
            assert [end1.recv(timeout=2), end1.recv(timeout=2)] == ["trap", "x"]
            end0.send("y")
        elif kind == "reserve":
            first = q.reserve(timeout=2)
            # Given back as never delivered: its delivery count did not grow.
            assert (first.value, first.deliveries) == ("trap", 1)
            first.ack()
            assert q.get(timeout=2) == "x"
            q.put("y")
        else:
            assert q.get_many(10, timeout=2) == ["trap", "x"]
            q.put("y")
        c.send("go")
        expected: Any = {"get": "y", "get_many": ["y"], "reserve": ("y", 1), "Pipe": "y"}[kind]
        assert c.recv() == ("again", expected)
        c.finish()


def _cancel_last_call(m: Manager) -> None:
    """Cancel this thread's last call, as an interrupt just after its answer would."""
    channel = m._channel
    assert channel is not None
    rid = next(channel._rids) - 1  # the last request id used (one is skipped: harmless)
    channel._abandon(rid, RuntimeError("as if interrupted"))


@pytest.mark.parametrize("kind", ["Lock", "RLock", "Semaphore", "BoundedSemaphore", "Condition"])
def test_an_answered_acquire_that_is_cancelled_is_released(
    shared_daemon: Daemon, uniq: str, kind: str
) -> None:
    with shared_daemon.connect() as m, shared_daemon.connect() as other:
        mine, theirs = getattr(m, kind)(uniq), getattr(other, kind)(uniq)
        assert mine.acquire()
        m.ping()  # this thread asks again: it had its answer, nothing to undo
        _cancel_last_call(m)
        m.ping()  # the cancel was handled before this (one connection, in order)
        assert not theirs.acquire(blocking=False)
        mine.release()
        assert mine.acquire()
        _cancel_last_call(m)
        m.ping()
        assert theirs.acquire(blocking=False), "the holding was not undone"
        theirs.release()


def test_an_answered_reentrant_acquire_undoes_one_level(shared_daemon: Daemon, uniq: str) -> None:
    with shared_daemon.connect() as m, shared_daemon.connect() as other:
        mine, theirs = m.RLock(uniq), other.RLock(uniq)
        assert mine.acquire() and mine.acquire()
        _cancel_last_call(m)  # one level down: still held once
        m.ping()
        assert not theirs.acquire(blocking=False)
        m._call("RLock", uniq, "release", ())
        assert theirs.acquire(blocking=False)
        theirs.release()


# -- every blocking primitive ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["Lock", "RLock", "Semaphore", "BoundedSemaphore"])
def test_an_interrupted_acquire_does_not_take_the_next_release(
    daemon: Daemon, uniq: str, kind: str
) -> None:
    with daemon.connect() as m, daemon.connect() as other:
        lock = getattr(m, kind)(uniq)
        assert lock.acquire()
        with child(wi.blocked_child, daemon.address, daemon.authkey, kind, uniq) as c:
            _interrupt(c, m, uniq, signal.SIGINT)
            lock.release()
            # Another client gets it, not the interrupted one.
            theirs = getattr(other, kind)(uniq)
            assert theirs.acquire(blocking=False)
            theirs.release()
            c.send("go")
            assert c.recv() == ("again", True)
            c.finish()


def test_an_interrupted_condition_wait_takes_the_lock_back(daemon: Daemon, uniq: str) -> None:
    """As ``threading.Condition.wait``: the lock is held again when the exception goes on."""
    with (
        daemon.connect() as m,
        child(wi.blocked_child, daemon.address, daemon.authkey, "Condition", uniq) as c,
    ):
        cond = m.Condition(uniq)
        _interrupt(c, m, uniq, signal.SIGINT)
        # The child's with-block exited: the lock is free, nobody waits.
        assert cond.acquire(blocking=False)
        cond.notify_all()
        cond.release()
        c.send("go")
        assert _parked(m, uniq, 1)
        with cond:
            cond.notify()  # goes to the child's new wait, not to a stale one
        outcome, report = c.recv()[1]
        assert outcome is True
        assert report["locked_in_handler"] is True
        assert report["token"] is not None
        c.finish()


def test_an_interrupted_barrier_party_leaves_without_breaking_it(daemon: Daemon, uniq: str) -> None:
    """The others are not broken or stuck: the barrier waits for its parties again."""
    with (
        daemon.connect() as m,
        child(wi.blocked_child, daemon.address, daemon.authkey, "Barrier", uniq) as c,
    ):
        barrier = m.Barrier(uniq, 2)
        _interrupt(c, m, uniq, signal.SIGINT, key="n_waiting")
        assert (barrier.n_waiting, barrier.broken) == (0, False)
        results: list[int] = []
        thread = threading.Thread(target=lambda: results.append(barrier.wait(timeout=WAIT_S)))
        thread.start()
        assert _parked(m, uniq, 1, key="n_waiting")
        c.send("go")
        report = c.recv()
        thread.join(WAIT_S)
        assert sorted([*results, report[1]]) == [0, 1]
        assert barrier.broken is False
        c.finish()


def test_an_interrupted_pipe_recv_leaves_the_message(daemon: Daemon, uniq: str) -> None:
    with (
        daemon.connect() as m,
        child(wi.blocked_child, daemon.address, daemon.authkey, "Pipe", uniq) as c,
    ):
        end0, end1 = m.Pipe(uniq)
        _interrupt(c, m, uniq, signal.SIGINT)
        end0.send("a")
        assert end1.recv(timeout=2) == "a"
        end0.send("b")
        c.send("go")
        assert c.recv() == ("again", "b")
        c.finish()


def test_a_thread_ended_by_an_asynchronous_exception(daemon: Daemon, uniq: str) -> None:
    with daemon.connect() as m, child(wi.thread_child, daemon.address, daemon.authkey, uniq) as c:
        q = m.Queue(uniq)
        assert c.recv() == "ready"
        assert _parked(m, uniq, 1)
        c.send("go")
        assert c.recv() == ("thread", ["interrupted"])
        assert _parked(m, uniq, 0)
        q.put("a")
        assert q.qsize() == 1
        assert q.get(timeout=2) == "a"
        q.put("b")
        c.send("go")
        assert c.recv() == ("again", "b")
        c.finish()


# -- the race: answers and interrupts at random moments ------------------------------------------


@pytest.mark.timeout(240)
def test_no_item_is_lost_or_duplicated_under_random_interrupts(daemon: Daemon, uniq: str) -> None:
    n_items = 400
    rng = random.Random(1234)
    with daemon.connect() as m, child(wi.racing_child, daemon.address, daemon.authkey, uniq) as c:
        q = m.Queue(uniq)
        assert c.recv() == "ready"
        stop = threading.Event()

        def interrupter() -> None:
            while not stop.is_set():
                c.signal(signal.SIGINT)
                time.sleep(rng.uniform(0.001, 0.008))

        thread = threading.Thread(target=interrupter)
        thread.start()
        try:
            for i in range(n_items):
                q.put(i)
                time.sleep(rng.uniform(0, 0.004))
        finally:
            stop.set()
            thread.join()
        q.put(None)
        got, interrupts, epoch = c.recv()
        assert epoch == 1, "the connection was closed (a frame was cut): the session changed"
        rest = []
        while True:
            try:
                rest.append(q.get_nowait())
            except queue.Empty:
                break
        assert interrupts > 50, "too few interrupts landed inside calls to test anything"
        assert len(got) == len(set(got)), "an item was delivered twice"
        assert sorted(got + rest) == list(range(n_items)), "an item was lost"
        c.proc.join(WAIT_S)
        assert c.proc.exitcode == 0


# -- a stock multiprocessing client ----------------------------------------------------------------

_STOCK_SCRIPT = """
import os, sys
from multiprocessing.managers import BaseManager
BaseManager.register("Queue")
host, port = os.environ["MANAGERD_ADDRESS"].rsplit(":", 1)
m = BaseManager(address=(host, int(port)), authkey=os.environ["MANAGERD_AUTHKEY"].encode())
m.connect()
q = m.Queue(sys.argv[1])
print("ready", flush=True)
try:
    q.get()
except KeyboardInterrupt:
    print("interrupted", flush=True)
print("size", q.qsize(), flush=True)
sys.stdin.readline()
print("again", q.get(timeout=30), flush=True)
"""


def test_an_interrupted_stock_get_does_not_swallow_the_next_item(daemon: Daemon, uniq: str) -> None:
    """A stock client's next request drops its abandoned get (and is answered in step)."""
    with subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", _STOCK_SCRIPT, uniq],
        env=daemon.client_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        try:
            _stock_interrupted(daemon, uniq, proc)
        finally:
            if proc.poll() is None:
                proc.kill()


def _stock_interrupted(daemon: Daemon, uniq: str, proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None and proc.stdout is not None
    with daemon.connect() as m:
        q = m.Queue(uniq)
        assert proc.stdout.readline().strip() == "ready"
        assert _parked(m, uniq, 1)
        proc.send_signal(signal.SIGINT)
        assert proc.stdout.readline().strip() == "interrupted"
        assert proc.stdout.readline().strip() == "size 0"
        assert _parked(m, uniq, 0)
        q.put("a")
        assert q.qsize() == 1
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "again a"
        assert proc.wait(WAIT_S) == 0
        assert q.qsize() == 0


def test_the_cancel_request_is_not_answered(shared_daemon: Daemon, uniq: str) -> None:
    """A cancel of an unknown call is harmless, and the connection stays in step."""
    with shared_daemon.connect() as m:
        q = m.Queue(uniq)
        q.put("a")
        channel = m._channel
        assert channel is not None
        channel._abandon(10**9, RuntimeError("unknown call"))
        assert q.get(timeout=2) == "a"
        assert pickle.loads(pickle.dumps(q)).qsize() == 0


# -- what an undo leaves behind ---------------------------------------------------------------


def test_an_undone_get_is_journaled_and_counted_once(tmp_path: Path, uniq: str) -> None:
    """Back at the front across a SIGKILL restart; a JoinableQueue's count is not doubled."""
    daemon = Daemon(tmp_path, args=["--data-dir", str(tmp_path / "data"), "--fsync", "always"])
    daemon.start()
    try:
        with daemon.connect() as m:
            q = m.Queue(uniq)
            q.put_many(["a", "b"])
            assert q.get() == "a"
            _cancel_last_call(m)
            m.ping()
            jq = m.JoinableQueue(uniq + ".j")
            jq.put("x")
            assert jq.get() == "x"
            _cancel_last_call(m)
            m.ping()
            assert jq.get(timeout=2) == "x"
            jq.task_done()
            jq.join(timeout=2)  # one put, one task_done: not waiting for a second
        daemon.kill()
        daemon.start(port=daemon.port)
        with daemon.connect() as m:
            assert m.Queue(uniq).get_many(10, timeout=2) == ["a", "b"]
    finally:
        daemon.stop()


def test_a_resumed_session_drops_the_waits_of_its_old_connection(daemon: Daemon, uniq: str) -> None:
    """Found on the way: a get parked on the connection a resume replaced took the next item.

    Its answer went to the closed connection: the item was lost.
    """
    with daemon.connect() as m, daemon.connect() as other:
        q = m.Queue(uniq)
        failures: list[BaseException] = []

        def get() -> None:
            try:
                q.get()
            except ConnectionLost as exc:
                failures.append(exc)

        thread = threading.Thread(target=get)
        thread.start()
        assert _parked(other, uniq, 1)
        # The session resumed on a new connection, as after a healed partition.
        host, port = daemon.address.rsplit(":", 1)
        again = Channel(
            (host, int(port)),
            daemon.authkey,
            connect_timeout_s=5,
            hello={"resume": m._resume_token},
        )
        try:
            assert again.resumed
            thread.join(WAIT_S)
            assert len(failures) == 1
            assert _parked(other, uniq, 0)
            other.Queue(uniq).put("a")
            assert other.Queue(uniq).qsize() == 1
        finally:
            again.close()


# -- a second interrupt in the client's own bookkeeping ------------------------------------------


def test_a_cancel_stopped_by_a_second_interrupt_is_sent_by_the_next_call(
    shared_daemon: Daemon, uniq: str
) -> None:
    """The get's answer ("a") was in; Ctrl-C, then a second one before its cancel went out.

    Blocking signals in the thread does not defer a Python handler while
    another thread (the heartbeat's) can take the signal, so the second
    interrupt can strike there. The call stays marked and the thread's next
    call sends the cancel: "a" is first again (it was lost: the next get
    confirmed the answer the client never saw).
    """
    with shared_daemon.connect() as m:
        q = m.Queue(uniq)
        q.put_many(["a", "b"])
        assert q.get() == "a"
        ch = m._channel
        assert ch is not None
        rid = next(ch._rids) - 1  # the get's request id (one id is skipped: harmless)
        # As inside call(): the interrupt struck before it returned "a".
        ch._unconfirmed[threading.get_ident()] = rid

        def second_interrupt() -> None:
            raise KeyboardInterrupt

        channel_module._before_cancel = second_interrupt
        try:
            with pytest.raises(KeyboardInterrupt):
                ch._abandon(rid, KeyboardInterrupt())
        finally:
            channel_module._before_cancel = None
        assert q.get(timeout=2) == "a", "the cancel was never sent: 'a' was lost"
        assert q.get(timeout=2) == "b"


@pytest.mark.parametrize("path", ["alone", "shared"])
def test_an_interrupt_as_the_reader_role_is_taken_does_not_leave_it_taken(
    shared_daemon: Daemon, uniq: str, path: str
) -> None:
    """Ctrl-C just after a call took the reader role: the next calls do not hang.

    A signal handler can run as the lock's ``__exit__`` returns; the role
    was taken outside the ``try`` that gives it back, so every later call of
    the process waited for a reader that was gone (the hang of the random test).
    Both places that take it: ``_call_alone`` (a thread calling alone) and
    ``_await`` (the shared path, taken here by a call marked nested).
    """
    taker = Channel._call_alone if path == "alone" else Channel._await
    lines, first = inspect.getsourcelines(taker)
    taken = next(
        first + i for i, line in enumerate(lines) if "self._reading =" in line and "True" in line
    )
    with shared_daemon.connect() as m:
        q = m.Queue(uniq)
        ch = m._channel
        assert ch is not None
        fired: list[int] = []

        def local(frame: types.FrameType, event: str, arg: Any) -> Any:
            # The first line after the role was taken (not the with's exit,
            # where no signal handler can run).
            if event == "line" and not fired and frame.f_lineno > taken and ch._reading:
                fired.append(frame.f_lineno)
                raise KeyboardInterrupt
            return local

        def tracer(frame: types.FrameType, event: str, arg: Any) -> Any:
            return local if frame.f_code is taker.__code__ else None

        nested = path == "shared"
        if nested:
            ch._calling.add(threading.get_ident())  # a nested call takes the shared path
        sys.settrace(tracer)
        try:
            with pytest.raises(KeyboardInterrupt):
                q.get(timeout=WAIT_S)
        finally:
            sys.settrace(None)
            if nested:
                ch._calling.discard(threading.get_ident())
        assert fired, f"the interrupt was not raised inside {taker.__name__}"
        q.put("a")
        got: list[Any] = []
        thread = threading.Thread(target=lambda: got.append(q.get(timeout=WAIT_S)), daemon=True)
        thread.start()
        thread.join(10)
        assert got == ["a"], "the next call waited for a reader that was gone"


@pytest.mark.timeout(240)
def test_pipelined_gets_lose_no_item_under_random_interrupts(daemon: Daemon, uniq: str) -> None:
    """An interrupted pipeline gives its unread answers back: nothing lost or doubled."""
    n_items = 400
    rng = random.Random(4321)
    with (
        daemon.connect() as m,
        child(wi.pipelined_racing_child, daemon.address, daemon.authkey, uniq) as c,
    ):
        q = m.Queue(uniq)
        assert c.recv() == "ready"
        stop = threading.Event()

        def interrupter() -> None:
            while not stop.is_set():
                c.signal(signal.SIGINT)
                time.sleep(rng.uniform(0.001, 0.008))

        thread = threading.Thread(target=interrupter)
        thread.start()
        try:
            for i in range(0, n_items, 4):
                q.put_many(list(range(i, i + 4)))
                time.sleep(rng.uniform(0, 0.004))
        finally:
            stop.set()
            thread.join()
        q.put(None)
        got, interrupts, epoch = c.recv()
        assert epoch == 1, "the connection was closed (a frame was cut): the session changed"
        rest = []
        while True:
            try:
                rest.append(q.get_nowait())
            except queue.Empty:
                break
        # Fewer land inside calls than in the plain race: a round spends
        # part of its time between calls (a loaded machine, fewer still).
        assert interrupts > 20, "too few interrupts landed inside calls to test anything"
        assert len(got) == len(set(got)), "an item was delivered twice"
        assert sorted(got + rest) == list(range(n_items)), "an item was lost"
