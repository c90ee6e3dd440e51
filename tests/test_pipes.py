"""Named pipes between client processes, on a real daemon."""

from __future__ import annotations

import threading
from multiprocessing.managers import BaseManager

import pytest

from managerd_client import ArgumentConflict, Manager, ObjectTypeConflict

import workers
from conftest import Daemon, wait_until


def _waiters(m: Manager, name: str) -> int:
    count: int = m.status()["objects"][name]["waiters"]
    return count


def test_duplex_pipe_between_two_processes(shared_daemon: Daemon, uniq: str) -> None:
    with shared_daemon.connect() as m:
        near, _ = m.Pipe(uniq)
        assert near.poll() is False
        assert near.poll(0.1) is False  # nothing sent yet: the timeout passes
        proc = workers.start(workers.pipe_echo, shared_daemon.address, shared_daemon.authkey, uniq)
        for message in [1, "two", {"three": [3]}, (None,)]:
            near.send(message)
            assert near.poll(workers.WAIT_S) is True
            assert near.recv() == (message, "echo")
        near.send(None)  # the echo stops and closes its end
        workers.join_all([proc])
        assert near.poll() is True  # the close is readable, as the stdlib


def test_poll_blocked_in_this_process_wakes_on_send_from_another(
    shared_daemon: Daemon, uniq: str
) -> None:
    with shared_daemon.connect() as m:
        near, _ = m.Pipe(uniq)
        proc = workers.start(workers.pipe_echo, shared_daemon.address, shared_daemon.authkey, uniq)
        near.send("hello")
        assert near.poll(None) is True  # no timeout: waits for the answer
        assert near.recv() == ("hello", "echo")
        near.send(None)
        workers.join_all([proc])


def test_recv_blocked_in_another_process_gets_eof_on_close(
    shared_daemon: Daemon, manager: Manager, uniq: str
) -> None:
    near, _ = manager.Pipe(uniq)
    proc = workers.start(
        workers.pipe_expect_eof, shared_daemon.address, shared_daemon.authkey, uniq
    )
    assert wait_until(lambda: _waiters(manager, uniq) == 1)
    near.close()
    with pytest.raises(OSError, match="closed"):
        near.send("after close")
    workers.join_all([proc])  # exit code 0: recv() raised EOFError


def test_eof_after_the_other_end_closes(manager: Manager, uniq: str) -> None:
    a, b = manager.Pipe(uniq)
    b.send("last words")
    b.close()
    assert a.poll() is True
    assert a.recv() == "last words"  # what was sent before the close arrives
    with pytest.raises(EOFError):
        a.recv()
    assert a.poll() is True  # as the stdlib: EOF is "readable"
    with pytest.raises(BrokenPipeError):
        a.send("nobody listens")


def test_a_closed_end_refuses_use(manager: Manager, uniq: str) -> None:
    a, _ = manager.Pipe(uniq)
    a.close()
    a.close()  # closing twice is harmless, as the stdlib
    with pytest.raises(OSError, match="closed"):
        a.recv()


def test_close_wakes_a_blocked_poll_with_true(manager: Manager, uniq: str) -> None:
    a, b = manager.Pipe(uniq)
    b.close()
    assert a.poll(workers.WAIT_S) is True


def test_recv_and_poll_timeouts(manager: Manager, uniq: str) -> None:
    a, b = manager.Pipe(uniq)
    with pytest.raises(TimeoutError):
        a.recv(timeout=0.1)
    assert b.poll(0.1) is False
    b.send("x")
    assert a.poll(5) is True
    assert a.recv(timeout=1) == "x"
    assert a.poll(0) is False


def test_both_directions_are_independent(manager: Manager, uniq: str) -> None:
    a, b = manager.Pipe(uniq)
    a.send("a1")
    a.send("a2")
    b.send("b1")
    assert b.recv() == "a1"
    assert a.recv() == "b1"
    assert b.recv() == "a2"


def test_one_way_pipe_between_two_processes(shared_daemon: Daemon, uniq: str) -> None:
    with shared_daemon.connect() as m:
        reader, _ = m.Pipe(uniq, duplex=False)
        items = [1, 2.5, "three", (4,)]
        proc = workers.start(
            workers.pipe_write, shared_daemon.address, shared_daemon.authkey, uniq, items
        )
        received = [reader.recv(timeout=workers.WAIT_S) for _ in items]
        workers.join_all([proc])
        assert received == items
        assert reader.poll() is True  # the writer closed


def test_one_way_pipe_refuses_to_send_on_the_read_end(manager: Manager, uniq: str) -> None:
    reader, _ = manager.Pipe(uniq, duplex=False)
    with pytest.raises(OSError, match="read-only"):
        reader.send("x")


def test_one_way_pipe_refuses_to_recv_on_the_write_end(manager: Manager, uniq: str) -> None:
    _, writer = manager.Pipe(uniq, duplex=False)
    with pytest.raises(OSError, match="write-only"):
        writer.recv()


def test_one_way_pipe_refuses_to_poll_on_the_write_end(manager: Manager, uniq: str) -> None:
    _, writer = manager.Pipe(uniq, duplex=False)
    with pytest.raises(OSError, match="write-only"):
        writer.poll()


def test_pipe_get_or_create_by_name(shared_daemon: Daemon, uniq: str) -> None:
    with shared_daemon.connect() as m1, shared_daemon.connect() as m2:
        a, _ = m1.Pipe(uniq, duplex=False)
        _, b = m2.Pipe(uniq)  # attaches to the same, one-way pipe
        b.send("from m2")
        assert a.recv(timeout=1) == "from m2"
        assert m2.status()["objects"][uniq]["args"] == {"duplex": False}
        with pytest.raises(ArgumentConflict):
            m2.Pipe(uniq, duplex=True)
        with pytest.raises(ObjectTypeConflict):
            m2.Queue(uniq)


def test_pipe_end_passed_to_a_child_process(manager: Manager, uniq: str) -> None:
    near, far = manager.Pipe(uniq)
    near.send("ping")
    proc = workers.start(workers.answer_on_end, far)
    assert near.recv(timeout=workers.WAIT_S) == ("ping", "pong")
    workers.join_all([proc])


class Opaque:
    """A class only managerd clients can read (the daemon never decodes it)."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Opaque)

    __hash__ = object.__hash__


class Stock(BaseManager):
    """A stock stdlib client of managerd."""


Stock.register("Pipe")


def test_a_message_a_stock_client_cannot_read_stays_first(shared_daemon: Daemon, uniq: str) -> None:
    stock = Stock(address=("127.0.0.1", shared_daemon.port), authkey=shared_daemon.authkey)
    stock.connect()
    with shared_daemon.connect() as m:
        near, far = m.Pipe(uniq)
        pipe = stock.Pipe(uniq)  # type: ignore[attr-defined]
        near.send(Opaque())
        near.send("plain")
        for _ in range(2):  # refused, and still first
            with pytest.raises(TypeError, match="read it with managerd_client"):
                pipe.recv(1)
        assert far.recv() == Opaque()
        assert pipe.recv(1) == "plain"
        # A parked stock recv that is handed one gives it back too.
        failures: list[BaseException] = []

        def blocked() -> None:
            try:
                pipe.recv(1, 30)
            except TypeError as exc:
                failures.append(exc)

        thread = threading.Thread(target=blocked)
        thread.start()
        assert wait_until(lambda: _waiters(m, uniq) == 1)
        near.send(Opaque())
        thread.join(30)
        assert len(failures) == 1
        assert far.poll(5) is True
        assert far.recv() == Opaque()
        assert far.poll() is False
