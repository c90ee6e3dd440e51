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
import logging
import pickle
import struct
import time
from collections.abc import Callable
from functools import partial
from typing import Any, Final, Protocol

from managerd.safepickle import SafeDecoder
from managerd.service.invoker import (
    EXPECTED_ERRORS,
    CallTable,
    answer,
    invoke,
)
from managerd.service.ops import ServerOps
from managerd.service.requests import RequestStats
from managerd.store.api import Call
from managerd.store.memory.journal import Journal
from managerd.store.memory.registry import TYPES
from managerd.store.sessions import Session
from managerd_client.errors import ForbiddenPayload, error_kind
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


SERVER_OPS: Final = frozenset(
    {"ping", "create", "delete", "objects", "status", "types", "peek", "cancel"}
)


def _method_label(typeid: Any, method: Any) -> str:
    """``Type.method`` for the metrics; anything unknown is one label (bounded)."""
    if typeid is None:
        return f"server.{method}" if method in SERVER_OPS else "invalid"
    cls = TYPES.get(typeid) if isinstance(typeid, str) else None
    if cls is None or method not in cls.methods:
        return "invalid"
    return f"{typeid}.{method}"


class ReplySink(Protocol):
    """The side of a connection that writes frames."""

    #: The client takes a bytes result as raw bytes (``STATUS_RAW``).
    raw_replies: bool
    #: The connection's calls its client may still cancel.
    calls: CallTable

    def send_frame(self, body: bytes) -> None: ...

    def send_frame_parts(self, head: bytes, body: bytes) -> None: ...


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
