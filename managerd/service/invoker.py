"""The one request pipeline, for both wire dialects: :meth:`Invoker.run`.

A dialect decodes a request into an :class:`Invocation` and turns the
:class:`Outcome` it is given back into a reply frame; everything between is
here, once:

1. *resolve*: the named object, a handle from the store
   (``store/interface.py``; its type checked), or the daemon's own
   operations (``service/ops.py``) for a call on no object;
2. *check*: the method exists, the store can keep a change if it mutates;
3. *call*: the method (or the dialect's conversion of its arguments first);
4. *settle*: a result that is an ``asyncio.Future`` (a parked waiter) is
   answered when it completes; cancelled (the session ended, the client
   gave up), it gets no outcome at all;
5. *durability*: with ``fsync=always`` the outcome waits until everything
   journaled before it is on disk;
6. *metrics*: ``managerd_requests_total{method, outcome}`` and the latency
   histogram, for managerd and stock clients alike;
7. *classification*: what the caller did wrong is the caller's error;
   anything else is a daemon bug, logged with its traceback and answered
   as kind ``Internal``.

**Whose error.** Everything refused before the call (no such object or
method, arguments that do not bind to the method's parameters, a
dialect's conversion of them) is the caller's. From the call itself, only
the errors a method raises on purpose are (:data:`CALLER_ERRORS`: the
``Refusal`` subclasses of ``store/api.py`` stand for the ``TypeError``,
``AttributeError``, ``RuntimeError`` a method raises on purpose, so that
the same builtins raised by a bug are not mistaken for the caller's). A
``TypeError`` from the call is also the caller's when the arguments do not
bind to the method's signature (checked only then: a call that succeeds
pays nothing for it).

:class:`CallTable` keeps what a managerd client may still cancel (see
``wire/managerd_dialect.py`` for the cancel request).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache, partial
from typing import Any, Final

from managerd.service.requests import RequestStats
from managerd.store.api import BadArgument, Call, MethodSpec, NoAttribute, Refusal
from managerd.store.interface import Handle, Store
from managerd.store.sessions import Session
from managerd_client.errors import InternalError, ManagerdError, NoSuchObject, error_kind

log = logging.getLogger("managerd")

#: What a method raises on purpose to mean "the caller asked for something
#: wrong" (answered as the caller's error); anything else escaping a call is
#: a daemon bug, logged in full and answered as an :class:`InternalError`.
#: ``OSError``/``EOFError``: a closed pipe, a data directory that cannot
#: take writes. ``StopIteration``: the end of a stock client's iterator.
CALLER_ERRORS: Final = (
    ManagerdError,
    Refusal,
    LookupError,
    ValueError,
    OverflowError,
    TimeoutError,
    OSError,
    EOFError,
    StopIteration,
    queue.Empty,
    queue.Full,
    threading.BrokenBarrierError,
)


#: An object the invoker calls: a store's handle, or the daemon's operations
#: (``service/ops.py``), which look like one.
Exposed = Handle


class _Parked:
    """A call whose answer waits on a future, as the connection knows it."""

    __slots__ = ("args", "call", "cancelled", "future", "method", "obj", "undo")

    def __init__(
        self,
        obj: Exposed,
        method: str,
        call: Call,
        args: tuple[Any, ...],
        future: asyncio.Future[Any],
        undo: bool,
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


#: ``(rid, object, method, call, args, result)`` of an answer that can be undone
_Answered = tuple[int, Exposed, str, Call, tuple[Any, ...], Any]


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

    def remember(self, rid: int, obj: Exposed, method: str, call: Call,
                 args: tuple[Any, ...], value: Any) -> None:  # fmt: skip
        answered = self.answered
        if len(answered) >= MAX_ANSWERED_THREADS and call.thread not in answered:
            del answered[next(iter(answered))]
        answered[call.thread] = (rid, obj, method, call, args, value)

    def cancel(self, store: Store, session: Session, thread: int, rid: int) -> None:
        """The client gave the call ``rid`` up: drop its wait, or undo its answer."""
        parked = self.parked.get(rid)
        if parked is not None:
            if parked.future.done():
                parked.cancelled = True  # answered, not yet sent: _settled undoes it
                return
            store.abandon(parked.obj, parked.method, session, parked.future)
            return
        record = self.answered.get(thread)
        if record is not None and record[0] == rid:
            del self.answered[thread]
            _, obj, method, call, args, value = record
            store.undo(obj, method, call, args, value)

    def drop_parked(self, store: Store) -> None:
        """The connection is replaced (its session resumed elsewhere): its waits end.

        Their answers would go to a closed connection, so an item or a lock
        handed to one would be lost; dropped, they go to a live waiter.
        """
        parked, self.parked = self.parked, {}
        for entry in parked.values():
            if not entry.future.done():
                store.cancel(entry.call.session, entry.future)


@dataclass(slots=True)
class Prepared:
    """A dialect's form of one call, made once the object and method are known."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    #: Runs instead of the method (a dialect's multi-step form of it).
    body: Callable[[Any, Call], Any] | None = None
    #: Turns the result into what the dialect answers; may refuse it.
    finish: Callable[[Any], Any] | None = None
    #: A result ``finish`` refuses goes back through the object's undo method
    #: (a stock client cannot read a message a managerd client pickled: it
    #: stays first in line for one that can).
    give_back: bool = False
    #: ``Call.accept``: what a payload the call removes must pass before it goes.
    accept: Callable[[bytes], Any] | None = None


@dataclass(slots=True)
class Invocation:
    """One decoded request: who calls what, with which arguments.

    ``name`` None (and ``typeid`` None) is a call on the daemon's own
    operations. ``typeid`` None with a name takes the object of that name
    whatever its type (a stock client's token carries no type).
    """

    session: Session
    thread: int
    typeid: str | None
    name: str | None
    method: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: ``Type.method`` in the metrics; set by :meth:`Invoker.run`.
    label: str = "invalid"
    #: The dialect's conversion of the call, given the object and the spec.
    prepare: Callable[[Exposed, MethodSpec | None, Invocation], Prepared] | None = None
    #: managerd dialect: what the client may still cancel, and this call's id.
    calls: CallTable | None = None
    rid: int = 0
    #: Stock dialect: told of a parked call (a next request abandons it).
    on_parked: Callable[[Exposed, str, asyncio.Future[Any]], None] | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a call came to: a value, or the error to answer."""

    value: Any = None
    error: BaseException | None = None

    @property
    def kind(self) -> str:
        """``ok``, or the error's wire kind (the ``outcome`` label of the metrics)."""
        return "ok" if self.error is None else error_kind(self.error)


#: What :meth:`Invoker.run_or_defer` returns for a call answered later (or never).
LATER: Final = object()

#: What a client gets for a bug in the daemon (the log has the traceback).
INTERNAL_MESSAGE: Final = "internal error in the daemon, see its log"


@cache
def _signature(fn: Callable[..., Any]) -> inspect.Signature:
    return inspect.signature(fn)


def _binds(
    spec: MethodSpec, obj: Any, call: Call, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> bool:
    try:
        _signature(spec.fn).bind(obj, call, *args, **kwargs)
    except TypeError:
        return False
    return True


class Invoker:
    """Runs invocations for both wire dialects (see the module docstring)."""

    def __init__(
        self, store: Store, ops: Exposed, loop: asyncio.AbstractEventLoop, stats: RequestStats
    ) -> None:
        self.store = store
        self.ops = ops
        #: The types served, by typeid (for metric labels of calls that fail early).
        self.types = store.types
        self.loop = loop
        self.stats = stats

    def label(self, typeid: Any, method: Any) -> str:
        """``Type.method`` for the metrics; anything unknown is one label (bounded)."""
        if typeid is None:
            return f"server.{method}" if method in self.ops.methods else "invalid"
        cls = self.types.get(typeid) if isinstance(typeid, str) else None
        if cls is None or method not in cls.methods:
            return "invalid"
        return f"{typeid}.{method}"

    def run(self, inv: Invocation, on_outcome: Callable[[Outcome], None]) -> None:
        """Run ``inv``; ``on_outcome`` gets its outcome when it may be answered (or never)."""
        value = self.run_or_defer(inv, on_outcome)
        if value is not LATER:
            on_outcome(Outcome(value))

    def run_or_defer(self, inv: Invocation, on_later: Callable[[Outcome], None]) -> Any:
        """Run ``inv``: its value if it can be answered at once, else :data:`LATER`.

        A value returned is counted already (6): the caller answers it, with
        no ``Outcome`` in between (the usual call: ping, put, get of what is
        there). Anything else (an error, a parked call, a ``finish`` to
        apply, a journal to wait for) goes to ``on_later`` when it may be
        answered, or never (a cancelled wait).
        """
        started = time.perf_counter()
        # 1-2: resolve, convert (the dialect's prepare), check: what fails here is
        # the caller's, including a TypeError from converting the caller's values
        # (``dict(*args)`` of a stock create); anything else is still a bug.
        try:
            if inv.name is None and inv.typeid is None:
                obj: Exposed = self.ops
            else:
                if not isinstance(inv.name, str):
                    raise NoSuchObject(f"no object named {inv.name!r}")
                obj = self.store.get(inv.name, inv.typeid)
            spec = obj.methods.get(inv.method)
            if spec is not None:
                inv.label = f"{obj.typeid}.{inv.method}"
            prepared = inv.prepare(obj, spec, inv) if inv.prepare is not None else None
            if prepared is None:
                args, kwargs, body, finish = inv.args, inv.kwargs, None, None
            else:
                args, kwargs = prepared.args, prepared.kwargs
                body, finish = prepared.body, prepared.finish
            if spec is None and body is None:
                raise NoAttribute(f"{obj.typeid} has no method {inv.method!r}")
            if spec is None:
                inv.label = f"{obj.typeid}.{inv.method}"
            if spec is not None and spec.mutates:
                self.store.check_writable()
        except Exception as exc:
            if inv.label == "invalid" and inv.typeid is not None:
                # Counted under its method even if the object was not found.
                inv.label = self.label(inv.typeid, inv.method)
            outcome = Outcome(error=exc) if isinstance(exc, TypeError) else self._classify(inv, exc)
            self._deliver(inv, started, on_later, outcome)
            return LATER
        # 3: call.
        call = Call(inv.session, inv.thread, self.loop, inv.rid)
        if prepared is not None and prepared.accept is not None:
            call.accept = prepared.accept
        try:
            if body is not None:
                result = body(obj, call)
            else:
                assert spec is not None
                result = spec.fn(obj, call, *args, **kwargs)
        except Exception as exc:
            self._failed(inv, obj, spec, body, call, args, kwargs, exc, started, on_later)
            return LATER
        # 4: settle.
        calls = inv.calls
        undo = inv.method in obj.undo_methods if obj.undo_methods else False
        give_back = None
        if prepared is not None and prepared.give_back and undo:
            give_back = partial(self.store.undo, obj, inv.method, call, args)
        if isinstance(result, asyncio.Future):
            self._park(inv, obj, call, args, result, undo, finish, give_back, started, on_later)
            return LATER
        if undo and calls is not None and result is not False:
            calls.remember(inv.rid, obj, inv.method, call, args, result)
        if finish is None and self.store.barrier() is None:
            # 5-6 at once: nothing to wait for; counted here, answered by the caller.
            self.stats.record(inv.label, "ok", time.perf_counter() - started)
            return result
        self._answer(inv, finish, give_back, result, partial(self._deliver, inv, started, on_later))
        return LATER

    def run_named(
        self,
        session: Session,
        thread: int,
        typeid: str | None,
        name: str | None,
        method: str,
        label: str,
        args: tuple[Any, ...],
        calls: CallTable,
        rid: int,
        reply: Callable[[Any, int, Outcome], None],
        reply_to: Any,
        started: float,
    ) -> Any:
        """:meth:`run_or_defer` of a managerd call whose label is known (a handle's).

        The same steps, without an :class:`Invocation` for the usual call
        (answered at once): one is made only for a path that needs it (an
        error, a parked call, a journal to wait for), which then goes the
        same way as in :meth:`run_or_defer`, answered by ``reply(reply_to,
        rid, outcome)`` (bound only then: no ``partial`` per call).
        ``started`` is when the request was read (the latency counted).
        ``name`` None is the daemon's own operations (a managerd client's:
        no conversion).
        """
        try:
            obj: Exposed = self.ops if name is None else self.store.get(name, typeid)
            spec = obj.methods.get(method)
            if spec is None:
                raise NoAttribute(f"{obj.typeid} has no method {method!r}")
            if spec.mutates:
                self.store.check_writable()
        except Exception:
            # Refused before the call: the general path, which classifies and counts it.
            inv = Invocation(session, thread, typeid, name, method, args, calls=calls, rid=rid)
            return self.run_or_defer(inv, partial(reply, reply_to, rid))
        call = Call(session, thread, self.loop, rid)
        try:
            result = spec.fn(obj, call, *args)
        except Exception as exc:
            inv = Invocation(
                session, thread, typeid, name, method, args, label=label, calls=calls, rid=rid
            )
            self._failed(
                inv, obj, spec, None, call, args, {}, exc, started, partial(reply, reply_to, rid)
            )
            return LATER
        undo = method in obj.undo_methods if obj.undo_methods else False
        if isinstance(result, asyncio.Future):
            inv = Invocation(
                session, thread, typeid, name, method, args, label=label, calls=calls, rid=rid
            )
            self._park(
                inv,
                obj,
                call,
                args,
                result,
                undo,
                None,
                None,
                started,
                partial(reply, reply_to, rid),
            )
            return LATER
        if undo and result is not False:
            calls.remember(rid, obj, method, call, args, result)
        if self.store.barrier() is None:
            self.stats.record(label, "ok", time.perf_counter() - started)
            return result
        inv = Invocation(
            session, thread, typeid, name, method, args, label=label, calls=calls, rid=rid
        )
        self._answer(
            inv,
            None,
            None,
            result,
            partial(self._deliver, inv, started, partial(reply, reply_to, rid)),
        )
        return LATER

    def _failed(
        self,
        inv: Invocation,
        obj: Exposed,
        spec: MethodSpec | None,
        body: Callable[[Any, Call], Any] | None,
        call: Call,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        exc: Exception,
        started: float,
        on_later: Callable[[Outcome], None],
    ) -> None:
        """3, failed: whose error it is (see the module docstring), counted and answered."""
        answer: Outcome | None = None
        if isinstance(exc, TypeError) and not isinstance(exc, Refusal):
            if obj.builtin_type_errors:
                # A container's method is the builtin's own operation: its
                # TypeError (an unhashable key, a str index) is the caller's,
                # as the stdlib object would raise it.
                answer = Outcome(error=exc)
            elif body is None and spec is not None and not _binds(spec, obj, call, args, kwargs):
                answer = Outcome(error=BadArgument(f"{inv.label}(): {exc}"))
        if answer is None:
            answer = self._classify(inv, exc)
        self._deliver(inv, started, on_later, answer)

    def _park(
        self,
        inv: Invocation,
        obj: Exposed,
        call: Call,
        args: tuple[Any, ...],
        result: asyncio.Future[Any],
        undo: bool,
        finish: Callable[[Any], Any] | None,
        give_back: Callable[[Any], None] | None,
        started: float,
        on_later: Callable[[Outcome], None],
    ) -> None:
        """4, parked: answered when the future completes (cancellable meanwhile)."""
        parked = None
        calls = inv.calls
        if calls is not None:
            parked = _Parked(obj, inv.method, call, args, result, undo)
            calls.parked[inv.rid] = parked
        if inv.on_parked is not None:
            inv.on_parked(obj, inv.method, result)
        deliver = partial(self._deliver, inv, started, on_later)
        result.add_done_callback(partial(self._settled, inv, finish, give_back, deliver, parked))

    def _settled(
        self,
        inv: Invocation,
        finish: Callable[[Any], Any] | None,
        give_back: Callable[[Any], None] | None,
        deliver: Callable[[Outcome], None],
        parked: _Parked | None,
        future: asyncio.Future[Any],
    ) -> None:
        calls = inv.calls
        if calls is not None and calls.parked.get(inv.rid) is parked:
            del calls.parked[inv.rid]
        if future.cancelled():
            return  # the session ended or the client gave up: nobody to answer
        exc = future.exception()
        if exc is not None:
            if parked is None or not parked.cancelled:
                deliver(self._classify(inv, exc))
            return
        value = future.result()
        if parked is not None and calls is not None and parked.undo and value is not False:
            if parked.cancelled:
                self.store.undo(parked.obj, parked.method, parked.call, parked.args, value)
                return
            calls.remember(inv.rid, parked.obj, parked.method, parked.call, parked.args, value)
        if parked is not None and parked.cancelled:
            return
        self._answer(inv, finish, give_back, value, deliver)

    def _answer(
        self,
        inv: Invocation,
        finish: Callable[[Any], Any] | None,
        give_back: Callable[[Any], None] | None,
        value: Any,
        deliver: Callable[[Outcome], None],
    ) -> None:
        """5: the outcome now, or once the journal is durable up to here."""
        if finish is not None:
            try:
                finished = finish(value)
            except Exception as exc:
                if give_back is not None:
                    give_back(value)
                deliver(self._classify(inv, exc))
                return
            value = finished
        barrier = self.store.barrier()
        if barrier is None:
            deliver(Outcome(value))
            return

        def durable(fut: asyncio.Future[None]) -> None:
            exc = fut.exception()
            deliver(Outcome(value) if exc is None else Outcome(error=exc))

        barrier.add_done_callback(durable)

    def _classify(self, inv: Invocation, exc: BaseException) -> Outcome:
        """7: the caller's error as it is; a daemon bug logged and answered as internal."""
        if isinstance(exc, CALLER_ERRORS):
            return Outcome(error=exc)
        log.error("internal error in %s", inv.label, exc_info=exc)
        return Outcome(error=InternalError(INTERNAL_MESSAGE))

    def _deliver(
        self,
        inv: Invocation,
        started: float,
        on_outcome: Callable[[Outcome], None],
        outcome: Outcome,
    ) -> None:
        """6: count the outcome, then hand it to the dialect."""
        self.stats.record(inv.label, outcome.kind, time.perf_counter() - started)
        on_outcome(outcome)
