"""Client processes that the interrupt tests stop in the middle of a call.

Each runs as a spawned child: it connects, reports ``"ready"`` on its pipe,
blocks in one call until the test interrupts it (SIGINT, or SIGUSR1 whose
handler raises :class:`Interrupted`), reports how the call ended, and then
— still alive, on the same ``Manager`` — makes the call once more when the
test says so, to show that the connection and session are still good.
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import queue
import signal
import threading
import types
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import managerd_client
from managerd_client.channel import Channel

WAIT_S = 30.0

#: Set in a child only: unpickling a :class:`Trap` interrupts that child.
ARMED = False


class Interrupted(Exception):
    """What the SIGUSR1 handler of a child raises (an exception from a signal handler)."""


def _raise_interrupted(signum: int, frame: types.FrameType | None) -> None:
    raise Interrupted(f"signal {signum}")


def interrupt_self() -> str:
    """Unpickled as a payload in an armed child: SIGINT to itself, handled here.

    The answer has arrived when this runs (it is being decoded), so the
    interrupt is the race "the daemon answered just before Ctrl-C".
    """
    if ARMED:
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(100_000):  # the handler runs at the next check, inside this loop
            pass
        raise AssertionError("SIGINT was not delivered")
    return "trap"


class Trap:
    """A payload whose unpickling interrupts an armed child (see :func:`interrupt_self`)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (interrupt_self, ())


def _ops(m: managerd_client.Manager, kind: str, name: str) -> tuple[Callable[[], Any], ...]:
    """``(blocking call, the same call again with a timeout)`` for ``kind``."""
    if kind in ("get", "custom"):
        q = m.Queue(name)
        return q.get, lambda: q.get(timeout=WAIT_S)
    if kind == "get_many":
        q = m.Queue(name)
        return lambda: q.get_many(10), lambda: q.get_many(10, timeout=WAIT_S)
    if kind == "reserve":
        q = m.Queue(name)

        def reserve_again() -> tuple[Any, int]:
            message = q.reserve(timeout=WAIT_S)
            message.ack()
            return message.value, message.deliveries

        return q.reserve, reserve_again
    if kind in ("Lock", "RLock", "Semaphore", "BoundedSemaphore"):
        lock = getattr(m, kind)(name)

        def acquire_again() -> bool:
            got = lock.acquire(timeout=WAIT_S)
            lock.release()
            return bool(got)

        return lock.acquire, acquire_again
    if kind == "Condition":
        cond = m.Condition(name)
        report: dict[str, Any] = {}

        def wait() -> Any:
            with cond:
                try:
                    cond.wait()
                except BaseException:
                    # threading.Condition semantics: the lock is held again here.
                    report["locked_in_handler"] = cond.locked()
                    report["token"] = cond.fencing_token
                    raise
            return None

        def wait_again() -> Any:
            with cond:
                return cond.wait(timeout=WAIT_S), report

        return wait, wait_again
    if kind == "Barrier":
        barrier = m.Barrier(name, 2)
        return barrier.wait, lambda: barrier.wait(timeout=WAIT_S)
    if kind == "Pipe":
        _, end1 = m.Pipe(name)
        return end1.recv, lambda: end1.recv(timeout=WAIT_S)
    raise ValueError(kind)


def blocked_child(address: str, authkey: bytes, kind: str, name: str, conn: Connection) -> None:
    """Block in ``kind``'s call until interrupted; report; call again when told."""
    with managerd_client.connect(address, authkey=authkey) as m:
        _blocked(m, kind, name, conn)


def blocked_tls_child(
    address: str, authkey: bytes, tls_ca: str, kind: str, name: str, conn: Connection
) -> None:
    """:func:`blocked_child` over TLS."""
    with managerd_client.connect(address, authkey=authkey, tls_ca=tls_ca) as m:
        _blocked(m, kind, name, conn)


def _blocked(m: managerd_client.Manager, kind: str, name: str, conn: Connection) -> None:
    global ARMED
    signal.signal(signal.SIGUSR1, _raise_interrupted)
    first, again = _ops(m, kind, name)
    conn.send("ready")
    ARMED = True
    try:
        conn.send(("returned", first()))
    except (KeyboardInterrupt, Interrupted) as exc:
        ARMED = False
        conn.send(("interrupted", type(exc).__name__))
    ARMED = False
    assert conn.poll(WAIT_S), "the test did not say to go on"
    conn.recv()
    conn.send(("again", again()))
    assert conn.poll(WAIT_S)
    conn.recv()


def thread_child(address: str, authkey: bytes, name: str, conn: Connection) -> None:
    """A thread blocked in ``q.get()`` ends by an asynchronous exception; the process goes on."""
    with managerd_client.connect(address, authkey=authkey) as m:
        q = m.Queue(name)
        outcome: list[str] = []

        def getter() -> None:
            try:
                outcome.append(repr(q.get()))
            except Interrupted:
                outcome.append("interrupted")

        thread = threading.Thread(target=getter)
        thread.start()
        conn.send("ready")
        assert conn.poll(WAIT_S)
        conn.recv()  # the test saw the get parked
        assert thread.ident is not None
        hit = ctypes.pythonapi.PyThreadState_SetAsyncExc(
            ctypes.c_ulong(thread.ident), ctypes.py_object(Interrupted)
        )
        assert hit == 1
        # The getter sleeps in recv(); a reply for this thread wakes it as
        # the reader, and the exception strikes as it goes on.
        m.ping()
        thread.join(WAIT_S)
        conn.send(("thread", outcome))
        assert conn.poll(WAIT_S)
        conn.recv()
        conn.send(("again", q.get(timeout=WAIT_S)))
        assert conn.poll(WAIT_S)
        conn.recv()


def _inside_call(frame: types.FrameType | None) -> bool:
    # By name (call) or by handle (call_handle): both send through _call_parts.
    codes = {Channel.call.__code__, Channel.call_handle.__code__, Channel._call_parts.__code__}
    while frame is not None:
        if frame.f_code in codes:
            return True
        frame = frame.f_back
    return False


def racing_child(address: str, authkey: bytes, name: str, conn: Connection) -> None:
    """``get(timeout=...)`` in a loop while SIGINTs arrive at random moments.

    The handler raises only while a managerd call is on the stack: a value
    that a call has returned and that the loop has not stored yet would be
    lost by any Python code (the stdlib's ``queue.get`` too); this test is
    about the call. Ends at a None item; reports what it got.
    """
    faulthandler.register(signal.SIGUSR2, all_threads=True)
    interrupts = [0]

    def on_sigint(signum: int, frame: types.FrameType | None) -> None:
        if _inside_call(frame):
            interrupts[0] += 1
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    with managerd_client.connect(address, authkey=authkey) as m:
        q = m.Queue(name)
        got: list[Any] = []
        conn.send("ready")
        while True:
            try:
                item = q.get(timeout=0.05)
            except queue.Empty:
                continue
            except KeyboardInterrupt:
                continue
            if item is None:
                break
            got.append(item)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        conn.send((got, interrupts[0], m.session_epoch))


def _inside_pipelined(frame: types.FrameType | None) -> bool:
    codes = {
        Channel.call.__code__,
        Channel._call_parts.__code__,
        Channel.submit.__code__,
        Channel._finish.__code__,
    }
    while frame is not None:
        if frame.f_code in codes:
            return True
        frame = frame.f_back
    return False


def pipelined_racing_child(address: str, authkey: bytes, name: str, conn: Connection) -> None:
    """Three ``get_many_async`` in flight per round while SIGINTs arrive at random moments.

    As ``racing_child``, the handler raises only while a managerd call
    (sending one, or reading its answer) is on the stack. A round left by
    an exception gives up its unread answers (the pipeline's exit). Ends
    at a None item; reports what it got.
    """
    faulthandler.register(signal.SIGUSR2, all_threads=True)
    interrupts = [0]

    def on_sigint(signum: int, frame: types.FrameType | None) -> None:
        if _inside_pipelined(frame):
            interrupts[0] += 1
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    with managerd_client.connect(address, authkey=authkey) as m:
        q = m.Queue(name)
        got: list[Any] = []
        conn.send("ready")
        done = False
        while not done:
            try:
                with m.pipeline():
                    pending = [q.get_many_async(3, True, 0.05) for _ in range(3)]
                    for p in pending:
                        for item in p.result():
                            if item is None:
                                done = True
                            else:
                                got.append(item)
            except (queue.Empty, KeyboardInterrupt):
                continue
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        conn.send((got, interrupts[0], m.session_epoch))
