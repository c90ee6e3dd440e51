"""From a decoded request to an object method, and its reply back.

A method's result is sent at once, or — when it is an ``asyncio.Future``
(a parked waiter) — when the future completes. A future cancelled because
its session ended gets no reply: nobody is there to read it.

managerd envelopes (after the hello) are ``<rid:u64><pickle of (typeid,
name, method, args, thread)>``; replies are ``<rid:u64><status:u8><pickle of
value>`` with status 0 for a result and 1 for an ``(error kind, message)``
pair, or ``<rid:u64><2><bytes>`` for a large ``bytes`` result (a stored
payload, sent as it is rather than pickled again) to clients that said
``raw_replies`` in their hello. The request id stays outside the pickle so
that a request the daemon refuses to decode still gets an answer the client
can match.

**Cancelling.** A client whose blocked call is interrupted (Ctrl-C, an
exception from a signal handler, a thread stopped) sends ``(None, None,
"cancel", (rid,), thread)`` and does not wait for an answer (none is sent).
The connection's :class:`CallTable` knows the call: still parked, its waiter
is dropped as a session's end drops it (``SharedObject.abandon``); already
answered, the *last* answer of that client thread that handed it something
(an item, a lock, a permit) is undone by the object's undo method (item back
at the front, lock released...). A client thread makes one call at a time,
so its next request confirms it read the previous answer: that answer's undo
record is dropped then (one dict operation per call). A record keeps the
answer (an item's bytes) until then: one per client thread that last took
something, at most ``MAX_ANSWERED_THREADS`` per connection.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import pickle
import queue
import struct
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any, Final, Protocol

from managerd.journal import Journal
from managerd.metrics import RequestStats
from managerd.objects.base import Call, MethodSpec, SharedObject, waiter_of
from managerd.peers import PeerGuard
from managerd.registry import TYPES, Registry
from managerd.safepickle import SafeDecoder
from managerd.sessions import Session, SessionTable
from managerd_client.errors import ForbiddenPayload, ManagerdError, error_kind
from managerd_client.wire import PICKLE_PROTOCOL

log = logging.getLogger("managerd")

RID: Final = struct.Struct("!Q")
REPLY_HEAD: Final = struct.Struct("!QB")
STATUS_OK: Final = 0
STATUS_ERROR: Final = 1
#: The body is the result itself, a bytes object (a stored payload), sent to
#: clients that asked for it in their hello (``raw_replies``).
STATUS_RAW: Final = 2
RAW_REPLY_MIN_BYTES: Final = 65536

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


SERVER_OPS: Final = frozenset(
    {"ping", "create", "delete", "objects", "status", "types", "peek", "cancel"}
)
#: The most items ``peek`` returns of one object.
MAX_PEEK_ITEMS: Final = 1000


def _method_label(typeid: Any, method: Any) -> str:
    """``Type.method`` for the metrics; anything unknown is one label (bounded)."""
    if typeid is None:
        return f"server.{method}" if method in SERVER_OPS else "invalid"
    cls = TYPES.get(typeid) if isinstance(typeid, str) else None
    if cls is None or method not in cls.methods:
        return "invalid"
    return f"{typeid}.{method}"


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


class ReplySink(Protocol):
    """The side of a connection that writes frames."""

    #: The client takes a bytes result as raw bytes (``STATUS_RAW``).
    raw_replies: bool
    #: The connection's calls its client may still cancel.
    calls: CallTable

    def send_frame(self, body: bytes) -> None: ...

    def send_frame_parts(self, head: bytes, body: bytes) -> None: ...


class ServerOps:
    """Daemon-level operations that are not calls on one object."""

    def __init__(self, registry: Registry, sessions: SessionTable, started_at: float) -> None:
        self.registry = registry
        self.sessions = sessions
        self.started_at = started_at
        #: Per-address handshake state (set by the server core).
        self.peers: PeerGuard | None = None
        #: The daemon's version and the settings an operator looks at (set by the core).
        self.about: dict[str, Any] = {}
        #: Deadlocks as they stand, and how many were found (set by the core).
        self.deadlocks: Callable[[], tuple[list[dict[str, Any]], int]] | None = None

    def create(self, typeid: str, name: str, args: dict[str, Any]) -> SharedObject:
        if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
            raise TypeError("creation arguments must be a dict with str keys")
        return self.registry.get_or_create(typeid, name, args)

    def objects(self) -> list[tuple[str, str]]:
        return self.registry.listing()

    def peek(self, name: str, limit: int) -> dict[str, Any]:
        """An object's contents as stored, without taking anything (``managerd get``).

        Payloads stay the clients' pickled bytes: the caller decodes what it
        can. At most ``limit`` items of a queue, list, dict or namespace.
        """
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            raise ValueError("limit must be an int >= 0")
        limit = min(limit, MAX_PEEK_ITEMS)
        obj = self.registry.get(name)
        info = obj.describe()
        try:
            value = obj.snapshot()
        except TypeError:  # locks, events...: their description is their content
            return {"type": obj.typeid, "describe": info, "kind": "none"}
        if isinstance(value, dict):
            return {
                "type": obj.typeid,
                "describe": info,
                "kind": "mapping",
                "total": len(value),
                "items": list(itertools.islice(value.items(), limit)),
            }
        if isinstance(value, list) and obj.typeid != "Array":
            return {
                "type": obj.typeid,
                "describe": info,
                "kind": "sequence",
                "total": len(value),
                "items": value[:limit],
            }
        return {"type": obj.typeid, "describe": info, "kind": "plain", "value": value}

    def status(self) -> dict[str, Any]:
        cycles, found = self.deadlocks() if self.deadlocks is not None else ([], 0)
        return {
            **self.about,
            "deadlocks": cycles,
            "deadlocks_total": found,
            "uptime_s": round(time.time() - self.started_at, 3),
            "objects": {name: obj.describe() for name, obj in self.registry.objects.items()},
            "sessions": [s.describe() for s in self.sessions],
            "handshakes_pending": self.peers.pending() if self.peers else 0,
            "penalized": {
                address: round(left, 1)
                for address, left in (self.peers.penalized() if self.peers else {}).items()
            },
        }


class Dispatcher:
    """Runs managerd-envelope requests against the registry."""

    def __init__(
        self,
        ops: ServerOps,
        decoder: SafeDecoder,
        loop: asyncio.AbstractEventLoop,
        on_request: Callable[[str, str, float], None] | None = None,
    ) -> None:
        self.ops = ops
        self.registry = ops.registry
        self.decoder = decoder
        self.loop = loop
        self.on_request = on_request
        self.journal: Journal | None = None
        self.stats = RequestStats()

    def handle(self, sink: ReplySink, session: Session, frame: bytes) -> None:
        """Answer one envelope (the connection checked it is at least a request id long)."""
        (rid,) = RID.unpack_from(frame)
        started = time.perf_counter()
        try:
            typeid, name, method, args, thread = self.decoder.loads(frame, RID.size)
            if not isinstance(args, tuple):
                raise TypeError("request arguments must be a tuple")
            if not (typeid is None or isinstance(typeid, str)) or not isinstance(method, str):
                raise TypeError("a request names its type and method with strings")
        except Exception as exc:
            if isinstance(exc, ForbiddenPayload):
                self.refused_decode(session.peer, exc)
            self._reply_error(sink, rid, "invalid", started, exc)
            return
        calls = sink.calls
        if (
            typeid is None
            and method == "cancel"
            and len(args) == 1
            and type(args[0]) is int
            and type(thread) is int
        ):
            calls.cancel(session, thread, args[0])  # no answer: nobody waits for one
            return
        if calls.answered:
            # This thread's previous answer arrived (it asks again): no undo now.
            calls.answered.pop(thread, None)
        label = _method_label(typeid, method)
        done = partial(self._reply_raw, sink, rid, label, started)
        failed = partial(self._reply_error, sink, rid, label, started)
        try:
            if typeid is None:
                answer(self.journal, self._server_call(session, method, args), done, failed)
            else:
                obj = self.registry.get(name, typeid)
                spec = obj.methods.get(method)
                if spec is None:
                    raise AttributeError(f"{typeid} has no method {method!r}")
                call = Call(session, thread, self.loop)
                invoke(self.journal, spec, obj, call, args, {}, done, failed, calls, rid)
        except EXPECTED_ERRORS as exc:
            failed(exc)
        except Exception as exc:
            log.exception("internal error in %s.%s", typeid, method)
            failed(exc)

    def refused_decode(self, peer: str, exc: ForbiddenPayload) -> None:
        """Someone with the key sent what the daemon will not decode: one line, counted."""
        self.stats.limit_hit("decode")
        log.warning("refused a request from %s: %s", peer, exc)

    def _server_call(self, session: Session, method: str, args: tuple[Any, ...]) -> Any:
        if method == "ping":
            return None
        if method in ("create", "delete") and self.journal is not None:
            self.journal.check_writable()
        if method == "create":
            typeid, name, create_args = args
            self.ops.create(typeid, name, create_args)
            return None
        if method == "delete":
            (name,) = args
            return self.registry.delete(name)
        if method == "objects":
            return self.ops.objects()
        if method == "status":
            return self.ops.status()
        if method == "peek":
            name, limit = args
            return self.ops.peek(name, limit)
        if method == "types":
            return {typeid: sorted(cls.methods) for typeid, cls in TYPES.items()}
        raise AttributeError(f"the daemon has no operation {method!r}")

    def _reply(self, sink: ReplySink, rid: int, label: str, started: float, value: Any) -> None:
        try:
            body = pickle.dumps(value, PICKLE_PROTOCOL)
        except Exception as exc:  # a daemon bug, but answer rather than hang
            self._reply_error(sink, rid, label, started, exc)
            return
        sink.send_frame(REPLY_HEAD.pack(rid, STATUS_OK) + body)
        self.stats.record(label, "ok", time.perf_counter() - started)

    def _reply_raw(self, sink: ReplySink, rid: int, label: str, started: float, value: Any) -> None:
        """A large stored payload goes out as it is: no pickling, no copy."""
        if type(value) is bytes and len(value) >= RAW_REPLY_MIN_BYTES and sink.raw_replies:
            sink.send_frame_parts(REPLY_HEAD.pack(rid, STATUS_RAW), value)
            self.stats.record(label, "ok", time.perf_counter() - started)
        else:
            self._reply(sink, rid, label, started, value)

    def _reply_error(
        self, sink: ReplySink, rid: int, label: str, started: float, exc: BaseException
    ) -> None:
        kind = error_kind(exc)
        # A KeyError carries its key (builtin data, it was decoded safely).
        args = exc.args if kind == "Key" and len(exc.args) == 1 else ()
        body = pickle.dumps((kind, str(exc), args), PICKLE_PROTOCOL)
        sink.send_frame(REPLY_HEAD.pack(rid, STATUS_ERROR) + body)
        self.stats.record(label, kind, time.perf_counter() - started)
