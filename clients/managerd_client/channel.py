"""One authenticated connection to the daemon, shared by a process's threads.

Requests carry ids, so threads share the connection and may have calls in
flight at once. There is no reader thread: the thread that waits for a reply
reads the socket itself (it becomes the *reader*), hands other threads'
replies to them, and gives the reader role to a waiting thread when its own
reply has come. A single-threaded client thus reads its reply directly,
with no thread switch — the reason for this design, since a switch would
cost as much as the round trip. A thread that finds nobody reading takes
the role as it takes its request id and reads its reply in the same
function (``_call_alone``: no slot, no hand-over machinery, about a
quarter fewer instructions per call); the shared path is for calls made
while another thread reads.

A connection is dead when a send fails, the peer closes, or nothing at all
arrives for ``dead_after_s`` while a thread is reading (heartbeats make sure
something does on a live one). Death fails every call in flight with
``ConnectionLost``; a call is never sent twice.

An exception that ends a wait without an answer — Ctrl-C (KeyboardInterrupt),
an exception raised by a signal handler, an asynchronous exception in a
thread — *abandons* the call: the thread sends ``cancel`` for it and the
daemon drops it if still parked, or undoes its answer (an item back at the
front, a lock released; see ``managerd/service/invoker.py``). The stream stays in
step: a frame is marked read only once its slot has it, the read buffer
survives an interrupt in ``recv`` (see ``FrameSocket.recover``), and a
request interrupted half-sent is finished first (see ``_send``). Where
that cannot be known (inside a TLS read or write), the connection is
closed, as after a crash.

Large payloads are not copied on the way: a ``bytes`` argument of 64 KiB or
more is spliced into the request's pickle as it is sent, a large ``bytes``
result comes back raw (status 2) and is unpickled straight from the read
buffer, and a read buffer grown for a large frame is kept (two of them, so a
frame being unpickled by its thread need not be copied out of the way of the
next read). Fresh megabyte buffers cost a page fault per 4 KiB each time.
"""

from __future__ import annotations

import array
import itertools
import os
import pickle
import select
import signal
import socket
import ssl
import struct
import sys
import threading
import time
from collections.abc import Callable
from operator import countOf
from typing import Any, Final

from managerd_client.errors import (
    AuthenticationFailed,
    ConnectFailed,
    ConnectionLost,
    ProtocolError,
    RequestTooLarge,
    error_from_kind,
)
from managerd_client.wire import (
    DEFAULT_MAX_FRAME_BYTES,
    HELLO,
    PICKLE_PROTOCOL,
    PROTOCOL_VERSION,
    RESOLVE,
    V2_PAYLOADS,
    V2_TAIL,
    FrameSocket,
    Refused,
    client_handshake,
    set_nodelay,
    set_receive_timeout,
)

_RID: Final = struct.Struct("!Q")
#: A protocol 2 request's handle, method number and thread (after its id).
_HANDLE_HEAD: Final = struct.Struct("!IHQ")
_COUNT: Final = struct.Struct("<I")
#: A request's frame header and its request id, packed at once.
_FRAME_RID: Final = struct.Struct("!iQ")
#: A request this small goes out as one joined chunk (as ``frame_chunks`` does).
_ONE_CHUNK_BYTES: Final = 65536 - _RID.size
_REPLY_HEAD: Final = struct.Struct("!QB")
_STATUS_OK: Final = 0
_STATUS_AT: Final = _RID.size
_STATUS_RAW: Final = 2  # the body is the result, a bytes object, as it is
#: A bytes argument this large is spliced into the request rather than
#: copied into it (see ``_encode_request``).
_SPLICE_MIN_BYTES: Final = 65536
_SPLICE_MARKER: Final = b"\x00managerd:splice"  # 16 bytes
_HANGUP: Final = select.POLLRDHUP | select.POLLHUP | select.POLLERR
#: An idle connection is checked for a hang-up before a call is sent into it;
#: one that answered this recently is not (that would be a syscall per call).
_IDLE_CHECK_AFTER_S: Final = 0.05


#: A thread waiting for another to read re-checks this often whether its
#: reply came or the reader role is free (a safety net: wake-ups are sent).
_READER_CHECK_S: Final = 1.0
_CANCEL: Final = "cancel"
#: What ``_call_alone`` returns when another thread took the reader role first.
_SHARED: Final = object()

_abandoned = threading.local()
#: Test hook: called in ``_abandon`` just before the cancel is sent (an
#: interrupt can strike there; tests raise from it). None in production.
_before_cancel: Callable[[], None] | None = None


def _block_signals() -> set[int | signal.Signals] | None:
    """Block every signal for this thread; the mask it had (None: not possible here)."""
    if not hasattr(signal, "pthread_sigmask"):
        return None
    return signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())


def abandoned_by(exc: BaseException) -> bool:
    """Whether ``exc`` made this thread give up its last call (and cancel it)."""
    return getattr(_abandoned, "exc", None) is exc


#: Request ids: one sequence for every channel of the process.
_RIDS = itertools.count(1)


class _Slot:
    """Where a reply lands for the thread that waits for it.

    The thread reading the socket decodes its own reply straight from the
    read buffer (``value`` or ``failure``); a reply for another thread is
    copied out as ``frame``, for that thread to decode.
    """

    __slots__ = ("decode_with", "decoded", "error", "failure", "frame", "raised", "value")

    def __init__(self, decode_with: Callable[[Any], Any] | None = None) -> None:
        #: Applied to the result (a payload) before the call returns it.
        self.decode_with = decode_with
        self.frame: bytes | memoryview | None = None
        self.error: BaseException | None = None  # the connection failed
        self.decoded = False
        self.value: Any = None
        self.failure: BaseException | None = None  # the call raised on the daemon
        #: What result() raised: an answer, not an interrupt.
        self.raised: BaseException | None = None

    @property
    def done(self) -> bool:
        return self.decoded or self.frame is not None or self.error is not None

    def decode(self, frame: bytes | memoryview) -> None:
        try:
            self.value = _decode_reply(frame, self.decode_with)
        except Exception as exc:
            self.failure = exc
        self.decoded = True

    def result(self) -> Any:
        if self.error is not None:
            self.raised = self.error
            raise self.error
        if not self.decoded:
            assert self.frame is not None
            self.decode(self.frame)
        if self.failure is not None:
            failure, self.failure = self.failure, None
            self.raised = failure
            raise failure
        return self.value


#: Pipelined calls one connection may have in flight at once (each has a
#: lane: a client-side "thread" id of its own; see :meth:`Channel.submit`).
MAX_PIPELINED: Final = 256
#: Lanes are numbered from here up: far below any real thread id (a pthread_t).
_FIRST_LANE: Final = 1


class Pending:
    """A pipelined call's answer, to come (see :meth:`Channel.submit`).

    :meth:`result` waits for it and returns it (or raises the call's
    error); :meth:`cancel` gives the call up: the daemon drops it if it
    still waits, or undoes its answer (items go back to the front of their
    queue) if it was answered and not read. An exception (Ctrl-C...) while
    waiting in ``result`` cancels the call the same way.
    """

    __slots__ = (
        "_channel",
        "_done",
        "_error",
        "_lane",
        "_lane_back",
        "_slot",
        "_value",
        "method",
        "rid",
    )

    def __init__(self, channel: Channel, slot: _Slot, rid: int, lane: int, method: str) -> None:
        self._channel = channel
        self._slot = slot
        self.rid = rid
        self._lane = lane
        self.method = method
        self._done = False
        #: Its lane is back in the channel's pool (once only).
        self._lane_back = False
        #: Once read: the value, or the error (re-raised by a later ``result()``).
        self._value: Any = None
        self._error: BaseException | None = None

    @property
    def done(self) -> bool:
        """Whether the answer is in (or the call was given up): ``result`` will not wait."""
        return self._done or self._slot.done

    @property
    def channel(self) -> Channel:
        """The connection it was sent on."""
        return self._channel

    @property
    def settled(self) -> bool:
        """Whether its result was read (or the call given up): nothing more to do with it."""
        return self._done

    def result(self) -> Any:
        """The call's result, waiting for it; the call's error raised as for a plain call."""
        return self._channel._finish(self)

    def cancel(self) -> None:
        """Give the call up (no-op once its result was read): nothing it took is lost."""
        self._channel._cancel(self, None)

    def __repr__(self) -> str:
        state = "done" if self._done else "in flight"
        return f"<Pending {self.method} #{self.rid} {state}>"


def _decode_reply(frame: bytes | memoryview, decode: Callable[[Any], Any] | None = None) -> Any:
    status = frame[_STATUS_AT]
    body = (frame if type(frame) is memoryview else memoryview(frame))[_REPLY_HEAD.size :]
    if status == _STATUS_RAW:
        return bytes(body) if decode is None else decode(body)
    value = pickle.loads(body)
    if status == _STATUS_OK:
        return value if decode is None else decode(value)
    kind, message, args = value
    if kind == "Key" and args:
        raise KeyError(*args)
    raise error_from_kind(kind, message)


def _encode_request(envelope: tuple[Any, ...]) -> list[bytes]:
    """The pickled request, in parts to send back to back.

    A large payload (a ``bytes`` argument of ``_SPLICE_MIN_BYTES`` or more,
    as ``put`` sends) is not copied into the pickle: the envelope is pickled
    with a 16-byte marker in its place (protocol 3: no framing, so lengths
    inside the pickle stay right) and the payload goes out between the
    pieces as a ``BINBYTES`` item. The daemon reads an ordinary pickle.
    """
    args = envelope[3]
    for i, arg in enumerate(args):  # noqa: B007 (i names the argument after the loop)
        if type(arg) is bytes and len(arg) >= _SPLICE_MIN_BYTES:
            break
    else:
        return [pickle.dumps(envelope, PICKLE_PROTOCOL)]
    marked = (*envelope[:3], (*args[:i], _SPLICE_MARKER, *args[i + 1 :]), *envelope[4:])
    pickled = pickle.dumps(marked, 3)
    needle = b"C\x10" + _SPLICE_MARKER  # SHORT_BINBYTES, 16 bytes
    at = pickled.find(needle)
    if at < 0 or pickled.find(needle, at + 1) >= 0:  # another argument holds the marker
        return [pickle.dumps(envelope, PICKLE_PROTOCOL)]
    return [
        pickled[:at] + b"B" + struct.pack("<I", len(arg)),  # BINBYTES, 4-byte length
        arg,
        pickled[at + len(needle) :],
    ]


def _encode_args(head: bytes, args: tuple[Any, ...]) -> list[bytes]:
    """A protocol 2 request after its id: ``head`` then the pickled ``args``, in parts.

    No pickle for ``()``. A large ``bytes`` argument is spliced in as in
    :func:`_encode_request`.
    """
    if not args:
        return [head]
    for i, arg in enumerate(args):  # noqa: B007 (i names the argument after the loop)
        if type(arg) is bytes and len(arg) >= _SPLICE_MIN_BYTES:
            break
    else:
        return [head + pickle.dumps(args, PICKLE_PROTOCOL)]
    pickled = pickle.dumps((*args[:i], _SPLICE_MARKER, *args[i + 1 :]), 3)
    needle = b"C\x10" + _SPLICE_MARKER  # SHORT_BINBYTES, 16 bytes
    at = pickled.find(needle)
    if at < 0 or pickled.find(needle, at + 1) >= 0:  # another argument holds the marker
        return [head + pickle.dumps(args, PICKLE_PROTOCOL)]
    return [
        head + pickled[:at] + b"B" + struct.pack("<I", len(arg)),  # BINBYTES, 4-byte length
        arg,
        pickled[at + len(needle) :],
    ]


def _all_bytes(values: list[Any]) -> bool:
    """Whether ``values`` is not empty and all exactly ``bytes`` (as ``put_many`` sends).

    The types are counted in C: ~160 instructions a payload, against ~230
    for a set of them and ~430 for a generator.
    """
    return bool(values) and countOf(map(type, values), bytes) == len(values)


def _encode_tail(head: bytes, args: tuple[Any, ...]) -> list[bytes]:
    """A ``V2_TAIL`` request after its id: ``args[-1]`` (bytes) after the pickle of the others.

    ``head`` has the flag set in its method number. A small request is one
    part; a large payload is a part of its own (sent as it is, not copied).
    """
    lead = pickle.dumps(args[:-1], PICKLE_PROTOCOL) if len(args) > 1 else b""
    payload = args[-1]
    first = head + _COUNT.pack(len(lead)) + lead
    if len(payload) < _SPLICE_MIN_BYTES:
        return [first + payload]
    return [first, payload]


def _encode_payloads(head: bytes, payloads: list[bytes], rest: tuple[Any, ...]) -> list[bytes]:
    """A protocol 2 request whose first argument is ``payloads`` (``V2_PAYLOADS``), in parts.

    ``head`` has the flag set in its method number. The payloads go out as
    they are, after a count and their lengths; the other arguments pickled
    after them.
    """
    lengths = array.array("I", map(len, payloads))
    if sys.byteorder != "little":
        lengths.byteswap()
    section = head + _COUNT.pack(len(payloads)) + lengths.tobytes()
    tail = pickle.dumps(rest, PICKLE_PROTOCOL)
    body = b"".join(payloads)
    if len(body) < _SPLICE_MIN_BYTES:
        return [section + body + tail]
    return [section, body, tail]


def open_socket(
    address: tuple[str, int], timeout_s: float, tls: ssl.SSLContext | None, server_hostname: str
) -> socket.socket:
    try:
        sock = socket.create_connection(address, timeout=timeout_s)
    except OSError as exc:
        raise ConnectFailed(
            f"cannot connect to managerd at {address[0]}:{address[1]}: {exc.strerror or exc}"
        ) from exc
    set_nodelay(sock)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if tls is not None:
        try:
            sock = tls.wrap_socket(sock, server_hostname=server_hostname)
        except ssl.SSLError as exc:
            sock.close()
            raise AuthenticationFailed(
                f"TLS handshake with {address[0]}:{address[1]} failed: {exc} "
                "(does the daemon serve TLS, with a certificate your CA signed for this host?)"
            ) from exc
        except OSError as exc:
            sock.close()
            raise ConnectFailed(f"TLS connection to {address[0]} failed: {exc}") from exc
    return sock


class Channel:
    """An authenticated managerd-mode connection."""

    def __init__(
        self,
        address: tuple[str, int],
        authkey: bytes,
        *,
        connect_timeout_s: float,
        dead_margin_s: float = 1.0,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        hello: dict[str, Any] | None = None,
    ) -> None:
        self.address = address
        sock = open_socket(address, connect_timeout_s, tls, server_hostname or address[0])
        self._fs = FrameSocket(sock)
        try:
            client_handshake(self._fs, authkey)
        except PermissionError as exc:
            self._fs.close()
            raise AuthenticationFailed(
                f"managerd at {address[0]}:{address[1]} refused the connection: {exc}"
            ) from None
        except ssl.SSLError as exc:
            self._fs.close()
            raise AuthenticationFailed(
                f"managerd at {address[0]}:{address[1]} refused the TLS session: {exc}"
            ) from None
        except Refused as exc:  # a #REFUSED# frame: the daemon said why (and maybe how long)
            self._fs.close()
            failed = ConnectFailed(f"managerd at {address[0]}:{address[1]}: {exc}")
            failed.retry_after_s = exc.retry_after_s
            raise failed from None
        except (OSError, EOFError) as exc:
            self._fs.close()
            if tls is not None:
                raise AuthenticationFailed(
                    f"managerd at {address[0]}:{address[1]} ended the TLS session during "
                    f"authentication: {exc or 'closed'} (does it require a client "
                    "certificate? pass tls_cert= and tls_key=)"
                ) from None
            hint = " (if the daemon serves TLS, connect with tls=...)"
            raise ConnectFailed(
                f"managerd at {address[0]}:{address[1]} closed the connection during "
                f"authentication: {exc or 'closed'}{hint}"
            ) from None
        try:
            kind, info = self._hello(hello, PROTOCOL_VERSION)
            if kind == "#ERROR" and isinstance(info, ProtocolError) and PROTOCOL_VERSION > 1:
                # An older daemon: it speaks protocol 1 (and says so by refusing 2).
                kind, info = self._hello(hello, 1)
        except (OSError, EOFError) as exc:
            self._fs.close()
            raise ConnectFailed(f"managerd at {address[0]}:{address[1]} hung up: {exc}") from None
        if kind != "#RETURN" or not isinstance(info, dict):
            self._fs.close()
            raise ProtocolError(
                f"{address[0]}:{address[1]} is not a managerd daemon (it answered {kind!r})"
            )
        self.info: dict[str, Any] = info
        self.session_id: str = info["session"]
        #: The secret that resumes the session (an older daemon resumed by id).
        self.resume_token: str = str(info.get("resume_token", self.session_id))
        self.server_id: str = info["server_id"]
        self.resumed: bool = bool(info.get("resumed"))
        self.session_ttl_s = float(info["session_ttl_s"])
        self.max_frame_bytes = int(info.get("max_frame_bytes", DEFAULT_MAX_FRAME_BYTES))
        #: 2: handle envelopes (see ``wire.PROTOCOL_VERSION``); 1: names only.
        self.protocol = int(info.get("protocol", 1))
        #: The daemon reads ``V2_TAIL`` requests (its welcome says so).
        self.tail_payloads = self.protocol >= 2 and info.get("tail_payloads") is True
        #: Protocol 2: ``(typeid, name)`` -> ``(handle, method numbers)``;
        #: ``(None, None)`` the daemon's operations (resolved at their first call).
        self._resolved: dict[tuple[str | None, str | None], tuple[int, dict[str, int] | None]] = {}
        self._ops: dict[str, int] | None = None
        # Heartbeats bring a reply every ttl/3, so silence this long means a
        # dead network (or daemon), never a slow call.
        self.dead_after_s = self.session_ttl_s + dead_margin_s
        set_receive_timeout(sock, self.dead_after_s)
        self._fs.read_timeout_s = self.dead_after_s
        # Unique among all the requests of this process (a call asked again through
        # another daemon names the one it first was: ``asked``).
        self._rids = _RIDS
        #: Each thread's latest request id (of a call, not of a pipelined one).
        self.asked: dict[int, int] = {}
        self._pending: dict[int, _Slot] = {}
        # ``with self._lock`` only, and no ``threading.Condition`` on it:
        # Condition's methods are Python code that releases and retakes the
        # lock, and an interrupt between the two would leave it released
        # inside a ``with`` (whose exit then releases another thread's
        # hold). A C lock's __enter__/__exit__ cannot be split so.
        self._lock = threading.Lock()
        #: Threads waiting for a reply another thread reads: each sleeps on
        #: its own locked C lock, released by ``_wake_all`` (see ``_await``).
        self._sleepers: list[threading.Lock] = []
        #: Per client thread: its call in flight, until its answer is
        #: returned. One still there when the thread calls again was
        #: abandoned without its cancel sent (a second interrupt): sent then.
        self._unconfirmed: dict[int, int] = {}
        #: Threads inside a call: a call made while its thread decodes an
        #: answer (a proxy in a payload re-created) is nested, not the next.
        self._calling: set[int] = set()
        self._send_lock = threading.Lock()
        #: Free lanes for pipelined calls (see submit), and the next new one.
        self._lanes: dict[int, None] = {}
        self._next_lane = _FIRST_LANE
        self._write_fn = self._fs.write_fn
        self._tls = self._fs.tls
        self._reading = False
        self.dead: BaseException | None = None
        self.last_heard = time.monotonic()
        self._poller = select.poll()
        self._poll_lock = threading.Lock()
        self._poller.register(sock.fileno(), _HANGUP)

    def _hello(self, hello: dict[str, Any] | None, version: int) -> tuple[Any, Any]:
        """Send the hello asking for protocol ``version``: the daemon's ``(kind, info)``."""
        info = self._hello_info(hello)
        info["protocol"] = version
        self._fs.send_frame(pickle.dumps((None, HELLO, (info,), {}), PICKLE_PROTOCOL))
        kind, answer = pickle.loads(self._fs.recv_frame())
        return kind, answer

    # -- calls ------------------------------------------------------------------
    def resolve(self, typeid: str | None, name: str | None) -> tuple[int, dict[str, int] | None]:
        """``(handle, method numbers)`` of an object on this connection (protocol 2).

        Asked of the daemon once per object and connection; ``(0, None)``
        means "call it by name" (protocol 1, or a daemon that will not give
        this connection more handles).
        """
        known = self._resolved.get((typeid, name))
        if known is not None:
            return known
        if self.protocol < 2:
            return 0, None
        try:
            handle, methods = self.call(None, None, RESOLVE, (typeid, name))
            found: tuple[int, dict[str, int] | None] = (
                int(handle),
                {str(m): i for i, m in enumerate(methods)},
            )
        except ProtocolError:
            found = (0, None)  # over the daemon's bound: this object goes by name
        self._resolved[(typeid, name)] = found
        return found

    def call_handle(
        self,
        handle: int,
        method_no: int,
        method: str,
        args: tuple[Any, ...],
        decode: Callable[[Any], Any] | None = None,
        tail: bool = False,
    ) -> Any:
        """``call`` through a handle and method number of :meth:`resolve` (protocol 2).

        A first argument that is a list of ``bytes`` payloads (``put_many``)
        travels as a payload section (``V2_PAYLOADS``), not pickled. With
        ``tail``, the last argument (a payload, ``bytes``) travels after the
        pickle of the others (``V2_TAIL``) if the daemon reads that.
        """
        ident = threading.get_ident()
        if tail and self.tail_payloads:
            head = _HANDLE_HEAD.pack(handle, method_no | V2_TAIL, ident)
            parts = _encode_tail(head, args)
        elif args and type(args[0]) is list and _all_bytes(args[0]):
            head = _HANDLE_HEAD.pack(handle, method_no | V2_PAYLOADS, ident)
            parts = _encode_payloads(head, args[0], args[1:])
        else:
            parts = _encode_args(_HANDLE_HEAD.pack(handle, method_no, ident), args)
        return self._call_parts(parts, decode, ident, method)

    def call(
        self,
        typeid: str | None,
        name: str | None,
        method: str,
        args: tuple[Any, ...],
        decode: Callable[[Any], Any] | None = None,
    ) -> Any:
        """The result of ``method`` on the daemon, passed through ``decode`` if given."""
        ident = threading.get_ident()
        if typeid is None and name is None and self.protocol >= 2 and method != RESOLVE:
            ops = self._ops
            if ops is None:
                ops = self._ops = self.resolve(None, None)[1] or {}
            number = ops.get(method)
            if number is not None:
                parts = _encode_args(_HANDLE_HEAD.pack(0, number, ident), args)
                return self._call_parts(parts, decode, ident, method)
        parts = _encode_request((typeid, name, method, args, ident))
        return self._call_parts(parts, decode, ident, method)

    def submit(
        self,
        typeid: str | None,
        name: str | None,
        method: str,
        args: tuple[Any, ...],
        decode: Callable[[Any], Any] | None = None,
        handle: tuple[int, int] | None = None,
    ) -> Pending:
        """Send a call without waiting for its answer: :meth:`Pending.result` reads it.

        The daemon keeps one undo record per client thread and takes a
        thread's next request as proof that it read the answer before; so a
        pipelined call goes on a *lane* of its own (a thread id that no
        thread has), given back only once its answer was read or its cancel
        sent. The same guarantees as a plain call's follow: an answer given
        up (``cancel``, an interrupt in ``result``, the connection closed)
        is undone by the daemon. ``handle``: ``(handle, method number)`` of
        a protocol 2 object (else the call goes by name).
        """
        with self._lock:
            if self.dead is not None:
                raise ConnectionLost(str(self.dead))
            if self._lanes:
                lane = self._lanes.popitem()[0]
            elif self._next_lane < _FIRST_LANE + MAX_PIPELINED:
                lane = self._next_lane
                self._next_lane += 1
            else:
                raise RuntimeError(
                    f"{MAX_PIPELINED} pipelined calls in flight on one connection; "
                    "read some results first"
                )
        try:
            stale = self._unconfirmed.get(lane)
            if stale is not None:
                self._abandon(stale, None, lane)  # its cancel did not go out: now
            if handle is not None and args and type(args[0]) is list and _all_bytes(args[0]):
                head = _HANDLE_HEAD.pack(handle[0], handle[1] | V2_PAYLOADS, lane)
                parts = _encode_payloads(head, args[0], args[1:])
            elif handle is not None:
                parts = _encode_args(_HANDLE_HEAD.pack(handle[0], handle[1], lane), args)
            else:
                parts = _encode_request((typeid, name, method, args, lane))
            size = sum(map(len, parts)) + _RID.size
            if size > self.max_frame_bytes:
                raise RequestTooLarge(
                    f"a {method} request of {size} bytes is over the daemon's "
                    f"limit of {self.max_frame_bytes} bytes (max_frame_bytes)"
                )
        except BaseException:
            self._lanes[lane] = None
            raise
        slot = _Slot(decode)
        rid = 0
        try:
            with self._lock:
                if self.dead is not None:
                    raise ConnectionLost(str(self.dead))
                rid = next(self._rids)
                self._pending[rid] = slot
                self._unconfirmed[lane] = rid
            self._send(parts, rid)
            return Pending(self, slot, rid, lane, method)
        except BaseException as exc:
            # Sent or not, nobody will read it: give it up (a cancel of a
            # request never sent is harmless), and the lane with it.
            try:
                if rid:
                    self._abandon(rid, exc, lane)
            finally:
                self._lanes[lane] = None
            raise

    def _finish(self, pending: Pending) -> Any:
        """:meth:`Pending.result`: wait, read, give the lane back."""
        if pending._done:
            if pending._error is not None:
                raise pending._error
            return pending._value
        slot = pending._slot
        try:
            self._await(slot)
            try:
                value = slot.result()
            finally:
                if isinstance(slot.frame, memoryview):
                    self._fs.recycle(slot.frame.obj)
                    slot.frame = None
        except BaseException as exc:
            if exc is not slot.raised:
                self._cancel(pending, exc)  # an interrupt: the answer goes back
            else:
                pending._error = exc
                pending._done = True
                self._unconfirmed.pop(pending._lane, None)
                self._give_lane_back(pending)
            raise
        # From the marker's removal to the return nothing is a call (an
        # interrupt could strike there and lose the value with no undo);
        # before it, an interrupt leaves the call to be given up and undone.
        # The lane is free only once its marker is gone, so a free lane
        # with a marker is always one whose cancel did not go out.
        lane = pending._lane
        pending._value = value
        pending._done = True
        pending._lane_back = True
        if lane in self._unconfirmed:
            del self._unconfirmed[lane]
        self._lanes[lane] = None
        return value

    def _give_lane_back(self, pending: Pending) -> None:
        if not pending._lane_back:
            pending._lane_back = True
            self._lanes[pending._lane] = None

    def resend_cancels(self) -> None:
        """Send the cancels that an interrupt kept from going out, for free lanes.

        (A lane in use sends its own when it is next taken.)
        """
        for lane, rid in list(self._unconfirmed.items()):
            if lane in self._lanes and self.dead is None:
                self._abandon(rid, None, lane)

    def _cancel(self, pending: Pending, exc: BaseException | None) -> None:
        """Give a pipelined call up: the daemon drops it or undoes its answer."""
        if pending._done:
            return
        pending._error = RuntimeError(f"{pending.method} #{pending.rid} was given up")
        pending._done = True
        try:
            self._abandon(pending.rid, exc, pending._lane)
        finally:
            # A cancel that did not go out (a second interrupt) left its
            # marker: resend_cancels, or the lane's next use, sends it.
            self._give_lane_back(pending)

    def _call_parts(
        self,
        parts: list[bytes],
        decode: Callable[[Any], Any] | None,
        ident: int,
        method: str,
    ) -> Any:
        """Send the request ``parts`` (after their id) and return its answer."""
        size = (len(parts[0]) if len(parts) == 1 else sum(map(len, parts))) + _RID.size
        if size > self.max_frame_bytes:
            # The daemon would hang up on it (and end this session): don't send it.
            raise RequestTooLarge(
                f"a {method} request of {size} bytes is over the daemon's "
                f"limit of {self.max_frame_bytes} bytes (max_frame_bytes)"
            )
        outer = ident not in self._calling
        if outer:
            stale = self._unconfirmed.get(ident)
            if stale is not None:
                self._abandon(stale, None)  # before this request confirms its answer
            if not self._reading:
                value = self._call_alone(parts, decode, ident)
                if value is not _SHARED:
                    return value
        slot = _Slot(decode)
        with self._lock:
            if self.dead is not None:
                raise ConnectionLost(str(self.dead))
            rid = next(self._rids)
            self._pending[rid] = slot
        if outer:
            self._unconfirmed[ident] = self.asked[ident] = rid
        try:
            if outer:
                # Inside the try: an interrupt as add() returns must not
                # leave this thread marked as calling (all its calls would
                # then be nested: no marker, no late cancel).
                self._calling.add(ident)
            self._send(parts, rid)
            self._await(slot)
            try:
                value = slot.result()
            finally:
                if isinstance(slot.frame, memoryview):
                    self._fs.recycle(slot.frame.obj)
                    slot.frame = None
        except BaseException as exc:
            if outer:
                self._calling.discard(ident)
            if exc is not slot.raised:
                # Not the answer: an interrupt (Ctrl-C, a signal handler's
                # exception, an asynchronous exception) ended the wait.
                self._abandon(rid, exc)
            elif outer:
                self._unconfirmed.pop(ident, None)  # answered (an error, or the connection died)
            raise
        if outer:
            # An interrupt as discard() returns leaves the marker: the
            # thread's next call cancels this one (its value never got out).
            self._calling.discard(ident)
            # No call from here to the return: nothing can come in between.
            del self._unconfirmed[ident]
        return value

    def _call_alone(
        self, parts: list[bytes], decode: Callable[[Any], Any] | None, ident: int
    ) -> Any:
        """``call`` when no other thread reads: send, then read the reply, in one frame.

        The reader role is taken with the request id, under one lock hold,
        and the reply is read here: no slot, no ``_await``. Other threads
        that call meanwhile wait for this one to read as in ``_await``, and
        their replies are handed to them as in ``_read_until``. The
        interrupt guarantees are ``call``'s, step by step: the role is taken
        inside the ``try`` that gives it back, a half-sent frame is finished
        by ``_send``, a frame is marked read only once decoded, and an
        exception that is not the answer (``raised``) abandons the call.
        ``decode`` runs after the role is given back (it may call back into
        the channel). ``_SHARED`` if another thread took the role first.
        """
        reading = False
        rid = 0
        raised: BaseException | None = None
        kept: memoryview | None = None
        try:
            try:
                with self._lock:
                    if self.dead is not None:
                        raised = ConnectionLost(str(self.dead))
                        raise raised
                    if self._reading:
                        return _SHARED
                    rid = next(self._rids)
                    self._reading = reading = True
                self._unconfirmed[ident] = self.asked[ident] = rid
                self._calling.add(ident)
                fs = self._fs
                body = parts[0]
                if len(parts) == 1 and len(body) < _ONE_CHUNK_BYTES and not self._tls:
                    # _send's usual case inlined: one chunk, one send, the
                    # count kept in C (see _send for an interrupt in there).
                    chunk = _FRAME_RID.pack(len(body) + _RID.size, rid) + body
                    counts: list[int] = []
                    try:
                        with self._send_lock:
                            try:
                                counts.extend(map(self._write_fn, (chunk,)))
                                if counts[0] != len(chunk):
                                    self._write([chunk], counts, [1], counts[0])
                            except OSError:
                                raise
                            except BaseException:
                                self._finish_frame([chunk], counts, False)
                                raise
                    except OSError as exc:
                        self._die(ConnectionLost(f"sending to managerd failed: {exc}"))
                else:
                    self._send(parts, rid)
                while True:
                    try:
                        frame = fs.next_frame_view()
                    except (OSError, EOFError) as exc:  # TimeoutError is an OSError
                        self._lost(exc)
                        raised = self.dead or ConnectionLost("connection to managerd lost")
                        raise raised from None
                    self.last_heard = time.monotonic()
                    if len(frame) < _REPLY_HEAD.size:
                        self._die(ProtocolError("the daemon sent a frame too short to be a reply"))
                        raised = self.dead or ConnectionLost("connection to managerd lost")
                        raise raised
                    (got,) = _RID.unpack_from(frame)
                    if got == rid:
                        break
                    target = self._pending.get(got)
                    if target is not None:  # another thread's reply (as in _read_until)
                        copy = bytes(frame)
                        with self._lock:
                            target.frame = copy
                            self._pending.pop(got, None)
                            self._wake_all()
                    fs.done_frame()
                # The frame stays unread (an interrupt reads it again, then
                # skips it: no longer anyone's) until its value is out of it.
                status = frame[_STATUS_AT]
                if status == _STATUS_RAW:
                    if decode is None:
                        value: Any = bytes(frame[_REPLY_HEAD.size :])
                    else:
                        fs.done_frame()  # decoded after the role is given back
                        kept = fs.detach_frame(frame)
                else:
                    try:
                        value = pickle.loads(frame[_REPLY_HEAD.size :])
                    except Exception as exc:  # an answer that cannot be read (as _Slot.decode)
                        raised = exc
                        raise
                    finally:
                        fs.done_frame()
            except BaseException:
                # An interrupt in the read: go on with the stream if it is
                # intact (the usual case: it struck inside recv), else close.
                if reading and not self._fs.recover():
                    self._die(ConnectionLost("a read was interrupted mid-frame; connection closed"))
                raise
            finally:
                if reading:
                    # As in _await: the role first (a plain store), then the
                    # threads that found it taken.
                    self._reading = False
                    if self._sleepers:
                        with self._lock:
                            self._wake_all()
            if kept is not None:
                try:
                    try:
                        value = decode(kept[_REPLY_HEAD.size :])  # type: ignore[misc]
                    except Exception as exc:
                        raised = exc
                        raise
                finally:
                    self._fs.recycle(kept.obj)
            elif status != _STATUS_OK and status != _STATUS_RAW:
                kind, message, args = value
                if kind == "Key" and args:
                    raised = KeyError(*args)
                else:
                    raised = error_from_kind(kind, message)
                raise raised
            elif decode is not None:
                try:
                    value = decode(value)
                except Exception as exc:
                    raised = exc
                    raise
        except BaseException as exc:
            self._calling.discard(ident)
            if exc is not raised:
                if rid:  # an interrupt: as in call
                    self._abandon(rid, exc)
            else:
                self._unconfirmed.pop(ident, None)  # answered (an error, or the connection died)
            raise
        # As in call: an interrupt as discard() returns leaves the marker.
        self._calling.discard(ident)
        del self._unconfirmed[ident]
        return value

    def _send(self, parts: list[bytes], rid: int) -> None:
        """Send one request frame, whole, even if an interrupt strikes in the middle.

        Each ``send`` is made by ``list.extend`` over ``map``, which keeps
        its byte count in C: an exception raised as it returns (a signal
        handler runs there) cannot lose it, and one raised inside it means
        it sent nothing. So after an interrupt this knows how much of the
        frame went out, and sends the rest (signals blocked meanwhile)
        before the exception goes on: the daemon never reads the next
        request as the rest of a cut one. Over TLS a write interrupted
        from inside may have sent its bytes or not: the connection is
        closed then (the session ends).
        """
        if len(parts) == 1 and len(parts[0]) < _ONE_CHUNK_BYTES:
            body = parts[0]
            chunks = [_FRAME_RID.pack(len(body) + _RID.size, rid) + body]
        else:
            chunks = self._fs.frame_chunks(parts, _RID.pack(rid))
        counts: list[int] = []
        inside = [0]
        try:
            with self._send_lock:
                try:
                    self._write(chunks, counts, inside, 0)
                except OSError:
                    raise
                except BaseException:
                    self._finish_frame(chunks, counts, inside[0] > len(counts))
                    raise
        except OSError as exc:
            self._die(ConnectionLost(f"sending to managerd failed: {exc}"))

    def _write(self, chunks: list[bytes], counts: list[int], inside: list[int], skip: int) -> None:
        """Send ``chunks`` from byte ``skip`` on; each send's count lands in ``counts``."""
        write = self._write_fn
        if skip == 0 and len(chunks) == 1:  # the usual request: one send, no copy
            chunk = chunks[0]
            pieces = map(write, (chunk,))
            inside[0] = 1  # no call from here into the write: nothing in between
            counts.extend(pieces)
            if counts[0] == len(chunk):
                return
            skip = counts[0]
        pos = 0
        for chunk in chunks:
            end = pos + len(chunk)
            while skip < end:
                pieces = map(write, (memoryview(chunk)[skip - pos :],))
                n = len(counts) + 1
                inside[0] = n  # no call from here into the write: nothing in between
                counts.extend(pieces)
                skip += counts[-1]
            pos = end

    def _finish_frame(self, chunks: list[bytes], counts: list[int], unsure: bool) -> None:
        """After an interrupt: send what is left of a frame begun, or close."""
        total = sum(len(c) for c in chunks)
        done = sum(counts)
        if unsure and self._fs.tls:
            self._die(
                ConnectionLost(
                    "a request was interrupted inside a TLS write; the connection was closed "
                    "(what the write sent is unknown)"
                )
            )
            return
        if done == 0 or done >= total:
            return  # nothing of it sent, or all of it
        # Blocking signals defers a handler only while no other thread can
        # take the signal (CPython runs it in the main thread whichever
        # thread got it): one that strikes anyway is swallowed here (the
        # first interrupt goes on) and the rest of the frame still sent.
        blocked = _block_signals()
        try:
            while done < total:
                sent: list[int] = []
                inside = [0]
                try:
                    self._write(chunks, sent, inside, done)
                    return
                except OSError as exc:
                    self._die(ConnectionLost(f"sending to managerd failed: {exc}"))
                    return
                except BaseException:
                    done += sum(sent)
                    if inside[0] > len(sent) and self._fs.tls:
                        self._die(ConnectionLost("a request was interrupted inside a TLS write"))
                        return
        finally:
            if blocked is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def _abandon(self, rid: int, exc: BaseException | None, ident: int | None = None) -> None:
        """Stop waiting for ``rid`` and ask the daemon to cancel it.

        The daemon drops the call if it is still parked, or gives back what
        its answer handed over (an item to the front of its queue, a lock or
        a permit released) if it was answered: nothing this thread will not
        see is lost, nothing is delivered twice. The cancel is not answered.
        ``exc`` is what ended the wait (None: an earlier abandoned call);
        ``ident`` the client thread that made the call (this one if None).
        """
        if ident is None:
            ident = threading.get_ident()
        if exc is not None:
            _abandoned.exc = exc
        # A second signal should not stop the cancel on its way (the
        # answer's undo waits for it): signals wait until it is sent (a few
        # us). That holds only while no other thread (the heartbeat's) can
        # take the signal: CPython runs a handler in the main thread
        # whichever thread the kernel gave the signal to. So the marker in
        # ``_unconfirmed`` is what guarantees the cancel: it is dropped only
        # once the cancel is sent, else the thread's next call sends it.
        blocked = _block_signals()
        try:
            with self._lock:
                self._pending.pop(rid, None)
                if self.dead is not None:
                    self._unconfirmed.pop(ident, None)
                    return  # the session ends with the connection: the daemon drops the call
                crid = next(self._rids)
            request = (None, None, _CANCEL, (rid,), ident)
            if _before_cancel is not None:
                _before_cancel()
            self._send([pickle.dumps(request, PICKLE_PROTOCOL)], crid)
            # Only now, not in a ``finally``: the marker stays if an
            # interrupt kept the cancel from going out, and the thread's
            # next call sends it (a cancel sent twice is harmless: the
            # first one used the undo record up).
            if self._unconfirmed.get(ident) == rid:
                del self._unconfirmed[ident]
        finally:
            if blocked is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def _await(self, slot: _Slot) -> None:
        while True:
            # The role is taken inside the try, in the same statement as
            # ``reading`` (no call in between): an interrupt as the lock's
            # ``__exit__`` returns must not leave it taken for good (every
            # later call of the process would wait for a reader that is gone).
            reading = False
            wake: threading.Lock | None = None
            try:
                with self._lock:
                    if slot.done:
                        return
                    if self._reading:
                        wake = threading.Lock()
                        wake.acquire()
                        self._sleepers.append(wake)
                    else:
                        self._reading = reading = True
                if wake is not None:
                    # One C call: an interrupt in it or as it returns leaves
                    # nothing half done (the lock is only a wake-up call).
                    wake.acquire(timeout=_READER_CHECK_S)
                    continue
                self._read_until(slot)
            except BaseException:
                # An interrupt in the read: go on with the stream if it is
                # intact (the usual case: it struck inside recv), else close.
                if reading and not self._fs.recover():
                    self._die(ConnectionLost("a read was interrupted mid-frame; connection closed"))
                raise
            finally:
                if reading:
                    # The role first (a plain store): a second interrupt
                    # here must not leave it taken.
                    self._reading = False
                    # Unlocked test: a thread that finds the role taken
                    # appends itself under the lock, so it is either seen
                    # here or it saw the role free (and takes it itself).
                    if self._sleepers:
                        with self._lock:
                            self._wake_all()

    def _wake_all(self) -> None:
        """Wake the threads waiting in ``_await`` (called with ``_lock`` held)."""
        sleepers, self._sleepers = self._sleepers, []
        for wake in sleepers:
            wake.release()

    def _read_until(self, slot: _Slot) -> None:
        fs = self._fs
        while not slot.done:
            try:
                frame = fs.next_frame_view()
            except (OSError, EOFError) as exc:
                self._lost(exc)
                return
            self.last_heard = time.monotonic()
            if len(frame) < _REPLY_HEAD.size:
                self._die(ProtocolError("the daemon sent a frame too short to be a reply"))
                return
            # A frame is marked read (done_frame) only once it reached its
            # slot: an interrupt before that reads it again, and a frame
            # whose slot is no longer pending is skipped, so none is lost.
            (rid,) = _RID.unpack_from(frame)
            target = self._pending.get(rid)
            if target is slot:
                with self._lock:
                    self._pending.pop(rid, None)
                if slot.decode_with is None:
                    slot.decode(frame)  # before the next read reuses the buffer
                    fs.done_frame()
                else:
                    # Unpickling a payload may call back into this channel (a
                    # proxy rebuilt): it happens after this thread stops reading.
                    fs.done_frame()
                    slot.frame = fs.detach_frame(frame)
                return
            if target is not None:
                copy = bytes(frame)
                with self._lock:
                    target.frame = copy
                    self._pending.pop(rid, None)
                    self._wake_all()
            fs.done_frame()

    def _lost(self, exc: OSError | EOFError) -> None:
        """A read failed: the connection is dead, and why."""
        if isinstance(exc, TimeoutError):
            self._die(
                ConnectionLost(
                    f"managerd at {self.address[0]}:{self.address[1]} sent nothing for "
                    f"{self.dead_after_s:.1f}s; the connection is considered dead"
                )
            )
        else:
            self._die(ConnectionLost(f"connection to managerd lost: {exc or 'closed'}"))

    @staticmethod
    def _hello_info(hello: dict[str, Any] | None) -> dict[str, Any]:
        """What the client says of itself: protocol, raw large results, then ``hello``."""
        return {"protocol": PROTOCOL_VERSION, "raw_replies": True, **(hello or {})}

    def peer_closed(self) -> bool:
        """Whether an idle connection was closed by the daemon (it restarted).

        Checked before a call is sent, so that a call is not sent into a
        connection already known dead (which would fail it for nothing):
        one non-blocking poll(2). A thread that is reading notices by itself.
        """
        if self.dead is not None:
            return True
        quiet_s = time.monotonic() - self.last_heard
        if quiet_s < _IDLE_CHECK_AFTER_S:
            return False  # busy: a closed connection shows up as ConnectionLost soon enough
        if quiet_s > self.session_ttl_s:
            # Heartbeats bring a reply every ttl/3: this long without one,
            # the daemon has ended our session and (if it could) closed the
            # connection. Do not send into it; reconnect.
            self._die(ConnectionLost(f"nothing heard from managerd for {self.session_ttl_s}s"))
            return True
        if self._reading:
            return False  # another thread is reading: it notices a hang-up itself
        # Another thread checking right now: wait for its answer (one poll(2),
        # microseconds) rather than send into a connection it may find dead.
        with self._poll_lock:
            if self.dead is not None:
                return True
            hung_up = any(events & _HANGUP for _fd, events in self._poller.poll(0))
        if hung_up:
            self._die(ConnectionLost("the daemon closed the connection"))
        return hung_up

    def _die(self, exc: BaseException) -> None:
        with self._lock:
            if self.dead is None:
                self.dead = exc
            pending, self._pending = self._pending, {}
            for slot in pending.values():
                slot.error = exc
            self._wake_all()
        self._fs.close()

    # -- lifecycle ----------------------------------------------------------------
    def close(self) -> None:
        # Calls abandoned without their cancel sent, by this thread or by
        # threads gone since: cancelled now, or the session's end would not
        # give back what their answers handed over. (A live thread's call
        # may be returning its answer right now: not that one.)
        me = threading.get_ident()
        live = {t.ident for t in threading.enumerate()} - {me}
        for ident, rid in list(self._unconfirmed.items()):
            if ident not in live and self.dead is None:
                self._abandon(rid, None, ident)
        self._die(ConnectionLost("the client closed the connection"))

    def abandon(self) -> None:
        """Drop an inherited connection in a forked child without touching the parent's."""
        self.dead = ConnectionLost("connection belongs to the parent process")
        self._pending = {}
        self._lock = threading.Lock()
        self._sleepers = []
        self._send_lock = threading.Lock()
        try:
            os.close(self._fs.sock.detach())  # close(2) only: no FIN, no TLS alert
        except OSError:
            pass
