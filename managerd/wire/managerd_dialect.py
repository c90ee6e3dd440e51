"""The managerd dialect: request envelopes to invocations, outcomes to reply frames.

Everything between (the object, the method's checks, parked calls, the
journal, metrics, whose error it is) is the invoker's
(``service/invoker.py``); this module only translates.

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
is dropped as a session's end drops it (``Store.abandon``); already
answered, the *last* answer of that client thread that handed it something
(an item, a lock, a permit) is undone by the object's undo method (item back
at the front, lock released...). A client thread makes one call at a time,
so its next request confirms it read the previous answer: that answer's undo
record is dropped then (one dict operation per call). A record keeps the
answer (an item's bytes) until then: one per client thread that last took
something, at most ``MAX_ANSWERED_THREADS`` per connection.

**Reissued calls.** A client whose daemon died under a call, and whose
session another daemon of the same store resumed, asks some calls again
there as ``(None, None, REISSUE, (typeid, name, method, args, origin),
thread)`` (``managerd_client.proxies.Proxy._reissued`` says which): run as
the call itself, with ``Session.reissuing`` set while it starts. ``origin``
is the request id the call had when first sent (0: it never was; the
request ids of a client process are unique), so that what the dead daemon
took for *that* request (a get's items) goes to it, and nothing taken for
an earlier request whose answer was read. Without ``origin`` (a 4-tuple),
the object guesses by name and method.

**Handle envelopes (protocol 2).** A client that said ``protocol: 2`` in its
hello may send, besides the envelopes above, ``<rid:u64><handle:u32>
<method:u16><thread:u64><pickle of args>`` (``V2_HEAD``; no pickle for
``()``). It first asks ``resolve`` (an ordinary envelope, ``(None, None,
"resolve", (typeid, name), thread)``) and gets ``(handle, method names)``:
the handle interns ``(typeid, name)`` for this connection only (a
:class:`HandleTable`), a method's number is its index in the names. Handle 0
is the daemon's own operations. A handle stands for a *name*, as the
envelope it replaces did: each call still looks the object up by name, so a
deleted object answers ``NoSuchObject`` and a re-created one is found. The
arguments go through the same restricted decoder; the call is counted under
the same label, with the same undo records and cancels. An unknown handle or
method number (another connection's, a made-up one) is answered with a
``ProtocolError`` and the connection goes on.
"""

from __future__ import annotations

import array
import logging
import pickle
import struct
import sys
import time
from functools import partial
from itertools import accumulate, pairwise
from typing import Any, Final, Protocol

from managerd.safepickle import SafeDecoder
from managerd.service.invoker import (
    LATER,
    CallTable,
    Exposed,
    Invocation,
    Invoker,
    Outcome,
    Prepared,
)
from managerd.service.requests import RequestStats
from managerd.store.api import MethodSpec, NoAttribute
from managerd.store.sessions import Session
from managerd_client.errors import ForbiddenPayload, ProtocolError, error_kind
from managerd_client.wire import (
    PICKLE_PROTOCOL,
    REISSUE,
    RESOLVE,
    V2_HEAD,
    V2_PAYLOADS,
    V2_TAIL,
)

log = logging.getLogger("managerd")

RID: Final = struct.Struct("!Q")
REPLY_HEAD: Final = struct.Struct("!QB")
STATUS_OK: Final = 0
STATUS_ERROR: Final = 1
#: The body is the result itself, a bytes object (a stored payload), sent to
#: clients that asked for it in their hello (``raw_replies``).
STATUS_RAW: Final = 2
RAW_REPLY_MIN_BYTES: Final = 65536
#: The answer of every call that returns nothing (``ping``, ``put``, ``release``...).
_NONE_PICKLE: Final = pickle.dumps(None, PICKLE_PROTOCOL)

#: The daemon operations a managerd client calls (``cancel`` is the
#: connection's own, above); the others are a stock client's.
MANAGERD_OPS: Final = frozenset({"ping", "create", "delete", "objects", "status", "types", "peek"})

#: The protocols a hello may ask for (``managerd_client.wire.PROTOCOL_VERSION``).
SUPPORTED_PROTOCOLS: Final = (1, 2)
#: What this daemon's welcome says it reads beyond protocol 2's envelopes:
#: ``V2_TAIL`` requests (an older daemon says nothing, and is sent none).
FEATURES: Final = {"tail_payloads": True}
#: Handles one connection may resolve (a client resolves each object it
#: uses once per connection; the table is bounded against one that does not).
MAX_HANDLES: Final = 65536
_PICKLE_PROTO: Final = 0x80


def negotiate(info: dict[str, Any]) -> int | None:
    """The protocol a hello asks for, if this daemon speaks it."""
    version = info.get("protocol")
    if type(version) is int and version in SUPPORTED_PROTOCOLS:
        return version
    return None


class HandleTable:
    """One protocol 2 connection's handles: ``(typeid, name)`` pairs by number.

    Entry ``n`` is ``(typeid, name, methods, labels)``: the method names
    (a method's number is its index) and their metric labels, shared by
    every handle of a type.
    """

    __slots__ = ("entries", "numbers")

    def __init__(self) -> None:
        ops = tuple(sorted(MANAGERD_OPS))
        entry = (None, None, ops, tuple(f"server.{m}" for m in ops))
        self.entries: list[tuple[str | None, str | None, tuple[str, ...], tuple[str, ...]]] = [
            entry
        ]
        self.numbers: dict[tuple[str | None, str | None], int] = {(None, None): 0}


class ReplySink(Protocol):
    """The side of a connection that writes frames."""

    #: The client takes a bytes result as raw bytes (``STATUS_RAW``).
    raw_replies: bool
    #: The connection's calls its client may still cancel.
    calls: CallTable
    #: Protocol 2: the connection's handles (None: protocol 1).
    handles: HandleTable | None

    def send_reply(self, rid: int, status: int, body: bytes) -> None: ...

    def send_frame_parts(self, head: bytes, body: bytes) -> None: ...


class Dispatcher:
    """Translates managerd envelopes into invocations, and outcomes into replies."""

    def __init__(self, invoker: Invoker, decoder: SafeDecoder) -> None:
        self.invoker = invoker
        self.decoder = decoder
        self.stats: RequestStats = invoker.stats
        self._method_tables: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}

    def handle(self, sink: ReplySink, session: Session, frame: bytes, start: int) -> None:
        """Answer the envelope at ``frame[start:]`` (at least a request id long)."""
        handles = sink.handles
        if handles is not None and len(frame) > start + 8 and frame[start + 8] != _PICKLE_PROTO:
            self.handle_v2(sink, session, handles, frame, start)
            return
        (rid,) = RID.unpack_from(frame, start)
        started = time.perf_counter()
        try:
            typeid, name, method, args, thread = self.decoder.loads(frame, start + RID.size)
            if not isinstance(args, tuple):
                raise TypeError("request arguments must be a tuple")
            if not (typeid is None or isinstance(typeid, str)) or not isinstance(method, str):
                raise TypeError("a request names its type and method with strings")
            if type(thread) is not int:
                raise TypeError("a request names its client thread with an int")
        except Exception as exc:
            if isinstance(exc, ForbiddenPayload):
                self.refused_decode(session.peer, exc)
            self.stats.record("invalid", error_kind(exc), time.perf_counter() - started)
            self._send_error(sink, rid, exc)
            return
        calls = sink.calls
        if (
            typeid is None
            and method == "cancel"
            and len(args) == 1
            and type(args[0]) is int
            and type(thread) is int
        ):
            # No answer: nobody waits for one.
            calls.cancel(self.invoker.store, session, thread, args[0])
            return
        if typeid is None and method == REISSUE:
            self._reissue(sink, session, rid, args, thread)
            return
        if typeid is None and method == RESOLVE and handles is not None:
            self._resolve(sink, handles, rid, args, started)
            return
        if calls.answered:
            # This thread's previous answer arrived (it asks again): no undo now.
            calls.answered.pop(thread, None)
        invocation = Invocation(
            session,
            thread,
            typeid,
            None if typeid is None else name,
            method,
            args,
            prepare=None if typeid is not None or method in MANAGERD_OPS else _no_operation,
            calls=calls,
            rid=rid,
        )
        value = self.invoker.run_or_defer(invocation, partial(self._reply, sink, rid))
        if value is None:
            sink.send_reply(rid, STATUS_OK, _NONE_PICKLE)
        elif value is not LATER:
            self._send_value(sink, rid, value)

    def _reissue(
        self, sink: ReplySink, session: Session, rid: int, args: tuple[Any, ...], thread: int
    ) -> None:
        """A call asked again after the daemon that had it died (the client's session
        was resumed here): run as itself, with ``session.reissuing`` naming it while
        the object's method runs (the etcd store's lock keeps the call's place in
        line). Not inlined in ``handle``: it is rare, and ``handle`` is the hot path."""
        if not (
            len(args) in (4, 5)
            and isinstance(args[0], str)
            and isinstance(args[1], str)
            and isinstance(args[2], str)
            and isinstance(args[3], tuple)
            and (len(args) == 4 or (type(args[4]) is int and 0 <= args[4] < 1 << 64))
        ):
            self._send_error(
                sink,
                rid,
                TypeError("a reissued call is (typeid, name, method, args[, first request id])"),
            )
            return
        typeid, name, method, call_args = args[:4]
        # Never sent before (0): this request is where the call starts.
        origin = (args[4] or rid) if len(args) == 5 else None
        sink.calls.answered.pop(thread, None)
        invocation = Invocation(
            session, thread, typeid, name, method, call_args, calls=sink.calls, rid=rid
        )
        session.reissuing = (thread, name, method, origin)
        try:
            value = self.invoker.run_or_defer(invocation, partial(self._reply, sink, rid))
        finally:
            session.reissuing = None
        if value is None:
            sink.send_reply(rid, STATUS_OK, _NONE_PICKLE)
        elif value is not LATER:
            self._send_value(sink, rid, value)

    def handle_v2(
        self,
        sink: ReplySink,
        session: Session,
        handles: HandleTable,
        frame: bytes,
        start: int,
    ) -> None:
        """Answer a protocol 2 request: a handle, a method number, the pickled args."""
        started = time.perf_counter()
        rid = 0
        try:
            if len(frame) - start < V2_HEAD.size:
                (rid,) = RID.unpack_from(frame, start)
                raise ProtocolError("a handle request shorter than its header")
            rid, number, method_no, thread = V2_HEAD.unpack_from(frame, start)
            entries = handles.entries
            if number >= len(entries):
                raise ProtocolError(f"no handle {number} on this connection (resolve it first)")
            typeid, name, methods, labels = entries[number]
            at = start + V2_HEAD.size
            payloads = None
            tail = None
            if method_no & V2_PAYLOADS:
                if method_no & V2_TAIL:
                    raise ProtocolError("a request with both a payload section and a tail")
                payloads, at = _payload_section(frame, at)
                method_no &= ~V2_PAYLOADS
            elif method_no & V2_TAIL:
                frame, tail = _tail_payload(frame, at)
                at += _COUNT.size
                method_no &= ~V2_TAIL
            if method_no >= len(methods):
                raise ProtocolError(f"no method number {method_no} for handle {number}")
            if len(frame) == at:
                args: Any = ()
            else:
                args = self.decoder.loads(frame, at)
                if type(args) is not tuple:
                    raise TypeError("request arguments must be a tuple")
            if payloads is not None:
                args = (payloads, *args)
            elif tail is not None:
                args = (*args, tail)
        except Exception as exc:
            if isinstance(exc, ForbiddenPayload):
                self.refused_decode(session.peer, exc)
            self.stats.record("invalid", error_kind(exc), time.perf_counter() - started)
            self._send_error(sink, rid, exc)
            return
        calls = sink.calls
        if calls.answered:
            # This thread's previous answer arrived (it asks again): no undo now.
            calls.answered.pop(thread, None)
        value = self.invoker.run_named(
            session,
            thread,
            typeid,
            name,
            methods[method_no],
            labels[method_no],
            args,
            calls,
            rid,
            self._reply,
            sink,
            started,
        )
        if value is None:
            sink.send_reply(rid, STATUS_OK, _NONE_PICKLE)
        elif value is not LATER:
            self._send_value(sink, rid, value)

    def _resolve(
        self, sink: ReplySink, handles: HandleTable, rid: int, args: tuple[Any, ...], started: float
    ) -> None:
        """``resolve(typeid, name)``: the connection's handle for it, and its method names."""
        try:
            if len(args) != 2:
                raise TypeError("resolve takes (typeid, name)")
            typeid, name = args
            if typeid is None and name is None:
                number = 0
            else:
                if not isinstance(typeid, str) or not isinstance(name, str) or not name:
                    raise TypeError("resolve takes a type name and an object name (str)")
                info = self.invoker.types.get(typeid)
                if info is None:
                    raise ProtocolError(f"no type {typeid!r} on this daemon")
                key = (typeid, name)
                found = handles.numbers.get(key)
                if found is None:
                    if len(handles.entries) >= MAX_HANDLES:
                        raise ProtocolError(
                            f"over {MAX_HANDLES} handles on one connection; "
                            "call by name (protocol 1 envelopes) instead"
                        )
                    methods, labels = self._methods_of(typeid, info.methods)
                    found = len(handles.entries)
                    handles.entries.append((typeid, name, methods, labels))
                    handles.numbers[key] = found
                number = found
        except Exception as exc:
            self.stats.record("server.resolve", error_kind(exc), time.perf_counter() - started)
            self._send_error(sink, rid, exc)
            return
        self.stats.record("server.resolve", "ok", time.perf_counter() - started)
        self._send_value(sink, rid, (number, handles.entries[number][2]))

    def _methods_of(self, typeid: str, methods: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """A type's method names, sorted, and their labels (made once per type)."""
        known = self._method_tables.get(typeid)
        if known is None:
            names = tuple(sorted(methods))
            known = names, tuple(f"{typeid}.{m}" for m in names)
            self._method_tables[typeid] = known
        return known

    def refused_decode(self, peer: str, exc: ForbiddenPayload) -> None:
        """Someone with the key sent what the daemon will not decode: one line, counted."""
        self.stats.limit_hit("decode")
        log.warning("refused a request from %s: %s", peer, exc)

    def _reply(self, sink: ReplySink, rid: int, outcome: Outcome) -> None:
        if outcome.error is not None:
            self._send_error(sink, rid, outcome.error)
            return
        self._send_value(sink, rid, outcome.value)

    def _send_value(self, sink: ReplySink, rid: int, value: Any) -> None:
        if type(value) is bytes and len(value) >= RAW_REPLY_MIN_BYTES and sink.raw_replies:
            # A large stored payload goes out as it is: no pickling, no copy.
            sink.send_frame_parts(REPLY_HEAD.pack(rid, STATUS_RAW), value)
            return
        try:
            body = _NONE_PICKLE if value is None else pickle.dumps(value, PICKLE_PROTOCOL)
        except Exception as exc:  # a daemon bug, but answer rather than hang
            log.error("cannot pickle the answer to request %d", rid, exc_info=exc)
            self._send_error(sink, rid, exc)
            return
        sink.send_reply(rid, STATUS_OK, body)

    def _send_error(self, sink: ReplySink, rid: int, exc: BaseException) -> None:
        kind = error_kind(exc)
        # A KeyError carries its key (builtin data, it was decoded safely).
        args = exc.args if kind == "Key" and len(exc.args) == 1 else ()
        body = pickle.dumps((kind, str(exc), args), PICKLE_PROTOCOL)
        sink.send_reply(rid, STATUS_ERROR, body)


_COUNT: Final = struct.Struct("<I")


def _tail_payload(frame: bytes, at: int) -> tuple[bytes, bytes]:
    """A ``V2_TAIL`` request's frame up to the end of its pickle, and its payload.

    ``<n:u32 LE><n bytes of pickle><payload>`` at ``frame[at:]``: the payload
    is the rest of the frame, kept as the bytes it is (never unpickled or
    scanned here); the pickle of the other arguments is decoded as usual
    from what is returned in place of the frame.
    """
    if len(frame) - at < _COUNT.size:
        raise ProtocolError("a tail payload's request shorter than its pickle's length")
    (size,) = _COUNT.unpack_from(frame, at)
    end = at + _COUNT.size + size
    if end > len(frame):
        raise ProtocolError("a tail payload's pickle runs past the request")
    return frame[:end], frame[end:]


def _payload_section(frame: bytes, at: int) -> tuple[list[bytes], int]:
    """The payloads of a ``V2_PAYLOADS`` section at ``frame[at:]``, and where it ends.

    ``<n:u32><n lengths:u32><payloads>``, little-endian; the payloads are
    kept as the bytes they are (never unpickled here).
    """
    end = len(frame)
    if end - at < _COUNT.size:
        raise ProtocolError("a payload section shorter than its count")
    (count,) = _COUNT.unpack_from(frame, at)
    at += _COUNT.size
    if count > (end - at) // _COUNT.size:
        raise ProtocolError(f"a payload section of {count} payloads is longer than the request")
    lengths = array.array("I")
    if lengths.itemsize != _COUNT.size:  # pragma: no cover (no such platform here)
        lengths = array.array("L")
    lengths.frombytes(frame[at : at + count * _COUNT.size])
    if sys.byteorder != "little":  # pragma: no cover
        lengths.byteswap()
    at += count * _COUNT.size
    total = sum(lengths)
    if total > end - at:
        raise ProtocolError("a payload section's lengths run past the request")
    payloads = [frame[a:b] for a, b in pairwise(accumulate(lengths, initial=at))]
    return payloads, at + total


def _no_operation(ops: Exposed, spec: MethodSpec | None, inv: Invocation) -> Prepared:
    """A daemon operation that is not a managerd client's (``incref`` is a stock client's)."""
    raise NoAttribute(f"the daemon has no operation {inv.method!r}")
