"""Running one exposed method and sending its answer when it may be sent.

A method's result is answered at once, or — when it is an ``asyncio.Future``
(a parked waiter) — when the future completes; with ``fsync=always`` an
answer also waits for the journal. :class:`CallTable` keeps what a client
may still cancel (see ``wire/managerd_dialect.py`` for the cancel request).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from functools import partial
from typing import Any, Final

from managerd.store.api import Call, MethodSpec
from managerd.store.memory.base import SharedObject, waiter_of
from managerd.store.memory.journal import Journal
from managerd.store.sessions import Session
from managerd_client.errors import ManagerdError

#: Exceptions an object method raises to mean "the caller asked for
#: something wrong"; anything else is a daemon bug and is logged in full.
EXPECTED_ERRORS: Final = (
    ManagerdError,
    LookupError,
    ValueError,
    TypeError,
    RuntimeError,
    AttributeError,
    OSError,
    EOFError,
    ArithmeticError,
    NotImplementedError,
    queue.Empty,
    queue.Full,
    threading.BrokenBarrierError,
)


class _Parked:
    """A call whose answer waits on a future, as the connection knows it."""

    __slots__ = ("args", "call", "cancelled", "future", "method", "obj", "undo")

    def __init__(
        self,
        obj: SharedObject,
        method: str,
        call: Call,
        args: tuple[Any, ...],
        future: asyncio.Future[Any],
        undo: str | None,
    ) -> None:
        self.obj = obj
        self.method = method
        self.call = call
        self.args = args
        self.future = future
        self.undo = undo
        #: The client gave up after the future completed but before its
        #: answer went out: undo the result instead of answering.
        self.cancelled = False


#: ``(rid, object, undo method name, call, args, result)``
_Answered = tuple[int, SharedObject, str, Call, tuple[Any, ...], Any]


#: A connection remembers this many client threads' last answers at most (a
#: client that starts and ends many threads would otherwise grow the table).
MAX_ANSWERED_THREADS: Final = 1024


class CallTable:
    """One managerd connection's calls that its client may still cancel.

    ``parked``: calls waiting on a future, by request id. ``answered``: per
    client thread, the last answer that handed something over, until that
    thread's next request (see the module docstring).
    """

    __slots__ = ("answered", "parked")

    def __init__(self) -> None:
        self.parked: dict[int, _Parked] = {}
        self.answered: dict[int, _Answered] = {}

    def remember(self, rid: int, obj: SharedObject, undo: str, call: Call,
                 args: tuple[Any, ...], value: Any) -> None:  # fmt: skip
        answered = self.answered
        if len(answered) >= MAX_ANSWERED_THREADS and call.thread not in answered:
            del answered[next(iter(answered))]
        answered[call.thread] = (rid, obj, undo, call, args, value)

    def cancel(self, session: Session, thread: int, rid: int) -> None:
        """The client gave the call ``rid`` up: drop its wait, or undo its answer."""
        parked = self.parked.get(rid)
        if parked is not None:
            if parked.future.done():
                parked.cancelled = True  # answered, not yet sent: _settled undoes it
                return
            waiter = waiter_of(session, parked.future)
            if waiter is None:
                parked.future.cancel()
            else:
                parked.obj.abandon(waiter, parked.method)
            return
        record = self.answered.get(thread)
        if record is not None and record[0] == rid:
            del self.answered[thread]
            _, obj, undo, call, args, value = record
            getattr(obj, undo)(call, args, value)

    def drop_parked(self) -> None:
        """The connection is replaced (its session resumed elsewhere): its waits end.

        Their answers would go to a closed connection, so an item or a lock
        handed to one would be lost; dropped, they go to a live waiter.
        """
        parked, self.parked = self.parked, {}
        for entry in parked.values():
            if not entry.future.done():
                waiter = waiter_of(entry.call.session, entry.future)
                if waiter is None:
                    entry.future.cancel()
                else:
                    waiter.cancel()


def invoke(
    journal: Journal | None,
    spec: MethodSpec,
    obj: SharedObject,
    call: Call,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    done: Callable[[Any], None],
    failed: Callable[[BaseException], None],
    calls: CallTable | None = None,
    rid: int = 0,
) -> None:
    """Run one exposed method; ``done``/``failed`` get its answer when it may be sent.

    A method that parks a waiter answers when its future completes (never,
    if the session ended or the client cancelled). With ``fsync=always`` an
    answer also waits until everything journaled before it is on disk.
    Synchronous errors propagate. With ``calls``, the call can be cancelled
    by its client (see :class:`CallTable`).
    """
    if spec.mutates and journal is not None:
        journal.check_writable()
    result = spec.fn(obj, call, *args, **kwargs)
    undo = obj.undo_methods.get(spec.name) if obj.undo_methods else None
    if isinstance(result, asyncio.Future):
        parked = None
        if calls is not None:
            parked = _Parked(obj, spec.name, call, args, result, undo)
            calls.parked[rid] = parked
        result.add_done_callback(partial(_settled, journal, done, failed, calls, rid, parked))
        return
    if undo is not None and calls is not None and result is not False:
        calls.remember(rid, obj, undo, call, args, result)
    answer(journal, result, done, failed)


def _settled(
    journal: Journal | None,
    done: Callable[[Any], None],
    failed: Callable[[BaseException], None],
    calls: CallTable | None,
    rid: int,
    parked: _Parked | None,
    future: asyncio.Future[Any],
) -> None:
    if calls is not None and calls.parked.get(rid) is parked:
        del calls.parked[rid]
    if future.cancelled():
        return  # the session ended or the client gave up: nobody to answer
    exc = future.exception()
    if exc is not None:
        if parked is None or not parked.cancelled:
            failed(exc)
        return
    value = future.result()
    if parked is not None and calls is not None and parked.undo is not None and value is not False:
        if parked.cancelled:
            getattr(parked.obj, parked.undo)(parked.call, parked.args, value)
            return
        calls.remember(rid, parked.obj, parked.undo, parked.call, parked.args, value)
    if parked is not None and parked.cancelled:
        return
    answer(journal, value, done, failed)


def answer(
    journal: Journal | None,
    value: Any,
    done: Callable[[Any], None],
    failed: Callable[[BaseException], None],
) -> None:
    """``done(value)`` now, or once the journal is durable up to here."""
    barrier = journal.barrier() if journal is not None else None
    if barrier is None:
        done(value)
        return

    def durable(fut: asyncio.Future[None]) -> None:
        exc = fut.exception()
        if exc is not None:
            failed(exc)
        else:
            done(value)

    barrier.add_done_callback(durable)
