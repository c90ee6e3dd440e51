"""One client connection on the event loop: frames, handshake, modes.

An ``asyncio.Protocol`` rather than streams: a request is parsed and
answered inside ``data_received`` with no Task and no extra buffering, which
is most of the per-call cost at these speeds.

A connection goes through :class:`ConnState`: the daemon's challenge, the
peer's challenge, then either stock mode (pickled ``(ident, method, args,
kwds)`` requests from a stock ``multiprocessing`` client) or — after a
``managerd_hello`` request — managerd mode (request-id envelopes). A hello
whose resume token this daemon does not know is looked up in the store
(another gateway's session, ``SessionTable.resume_elsewhere``) while the
connection reads nothing more. Frames
are refused before they are buffered when their header says they are over
the limit (256 bytes during the handshake, like the stdlib).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import pickle
import socket
import ssl
import struct
import time
from typing import Any, Final, Protocol, cast

from managerd.safepickle import SafeDecoder
from managerd.service.invoker import CallTable, Exposed
from managerd.service.peers import PENALTY_HOLD_S, LogBudget, PeerGuard
from managerd.service.requests import RequestStats, Stats
from managerd.service.sessions import SessionTable
from managerd.store.sessions import Session, SessionKind
from managerd.wire.managerd_dialect import FEATURES, Dispatcher, HandleTable, negotiate
from managerd.wire.stock_dialect import StockAdapter
from managerd_client.errors import ForbiddenPayload, ProtocolError
from managerd_client.wire import (
    CHALLENGE,
    FAILURE,
    HANDSHAKE_MAX_FRAME_BYTES,
    HELLO,
    WELCOME,
    create_response,
    frame_header,
    make_challenge,
    refused_frame,
    verify_response,
)

log = logging.getLogger("managerd")

_HEADER: Final = struct.Struct("!i")
_LONG_HEADER: Final = struct.Struct("!Q")
#: A managerd reply's frame header, request id and status (managerd_dialect.REPLY_HEAD).
_REPLY_HEAD: Final = struct.Struct("!QB")
_FRAMED_REPLY_HEAD: Final = struct.Struct("!iQB")


class ConnState(enum.Enum):
    HELD = "held"  # a penalized address: no challenge, input ignored, refused soon
    CHALLENGED = "challenged"  # we sent our challenge, await the answer
    AWAIT_PEER_CHALLENGE = "await-peer-challenge"
    AWAIT_VERDICT = "await-verdict"  # we answered the peer's challenge
    STOCK = "stock"
    RESUMING = "resuming"  # a hello's token is being looked up in the store: input waits
    MANAGERD = "managerd"
    CLOSED = "closed"


class ConnectionSettings(Protocol):
    """The settings a connection reads (``managerd.settings.Settings``)."""

    @property
    def allow_md5_auth(self) -> bool: ...
    @property
    def handshake_timeout_s(self) -> float: ...
    @property
    def max_frame_bytes(self) -> int: ...
    @property
    def session_ttl_s(self) -> float: ...


class ConnectionContext(Protocol):
    """What a connection needs of the daemon (``server.ServerCore`` is one).

    The wire layer may not import the server above it: the core is passed
    in, and this is all a connection may use of it.
    """

    @property
    def settings(self) -> ConnectionSettings: ...
    @property
    def authkey(self) -> bytes: ...
    @property
    def server_id(self) -> str: ...
    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...
    @property
    def tls(self) -> ssl.SSLContext | None: ...
    @property
    def decoder(self) -> SafeDecoder: ...
    @property
    def dispatcher(self) -> Dispatcher: ...
    @property
    def stock(self) -> StockAdapter: ...
    @property
    def sessions(self) -> SessionTable: ...
    @property
    def peers(self) -> PeerGuard: ...
    @property
    def refusals(self) -> LogBudget: ...
    @property
    def requests(self) -> RequestStats: ...
    @property
    def stats(self) -> Stats: ...

    def admit(self, conn: Connection) -> bool: ...
    def adopt(self, session: Session, conn: Connection) -> None: ...
    def forget(self, conn: Connection) -> None: ...


class Connection(asyncio.Protocol):
    """The daemon's end of one TCP (or TLS) connection."""

    def __init__(self, core: ConnectionContext) -> None:
        self.core = core
        self.state = ConnState.CHALLENGED
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.peer = "?"
        #: The peer's IP address: what failed handshakes are counted against.
        self.address = "?"
        #: Counted among the address's pending handshakes (until authenticated or closed).
        self._pending = False
        #: In the authkey (or TLS) handshake: a refusal now is a failed handshake.
        self._handshaking = False
        self.session: Session | None = None
        #: The client takes large bytes results raw (it said so in its hello).
        self.raw_replies = False
        #: managerd mode: the calls its client may cancel (parked, or answered).
        self.calls = CallTable()
        #: managerd mode, protocol 2: the handles its client resolved.
        self.handles: HandleTable | None = None
        #: Stock mode: the call last parked, ``(object, method, future)``.
        self.stock_parked: tuple[Exposed, str, asyncio.Future[Any]] | None = None
        self._challenge_message = b""
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._probe_sock: socket.socket | None = None
        self._tls_task: asyncio.Task[None] | None = None
        self._stats = core.stats
        self._max_frame_bytes = core.settings.max_frame_bytes
        #: Frames sent while ``data_received`` answers a burst of requests:
        #: written together when it returns (one write, not one per reply).
        self._out: list[bytes] | None = None

    # -- asyncio callbacks --------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.address = peer[0]
            self.peer = f"{peer[0]}:{peer[1]}"
        else:
            self.address = self.peer = str(peer)
        if not self.core.admit(self):
            return
        peers = self.core.peers
        refusal = peers.refusal(self.address)
        if refusal is not None:
            reason, hold, until = refusal
            if not hold:
                self._refuse_at_once(reason, until)
                return
            # Penalized: no challenge, no HMAC, no timer of the handshake's;
            # the peer waits in silence, then is told why.
            peers.begin(self.address)
            self._pending = True
            self.state = ConnState.HELD
            self.transport.pause_reading()
            self._handshake_timer = self.core.loop.call_later(
                PENALTY_HOLD_S, self._refuse_at_once, reason, until
            )
            return
        # Only now: a refused connection should cost as little as it can.
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        peers.begin(self.address)
        self._pending = self._handshaking = True
        self._handshake_timer = self.core.loop.call_later(
            self.core.settings.handshake_timeout_s, self._handshake_expired
        )
        if self.core.tls is not None:
            # TLS is started here rather than by create_server so that a
            # failed handshake is ours to report: one line, with the peer.
            self.transport.pause_reading()
            self._tls_task = self.core.loop.create_task(self._start_tls(self.transport))
            return
        self._challenge()

    def _challenge(self) -> None:
        frame, self._challenge_message = make_challenge()
        self.send_frame(frame)

    async def _start_tls(self, raw: asyncio.Transport) -> None:
        assert self.core.tls is not None
        try:
            tls = await self.core.loop.start_tls(
                raw,
                self,
                self.core.tls,
                server_side=True,
                ssl_handshake_timeout=self.core.settings.handshake_timeout_s,
            )
        except (OSError, TimeoutError, asyncio.CancelledError) as exc:
            self.core.stats.tls_failures += 1
            self._handshake_failed()
            reason = str(exc) or type(exc).__name__
            if self.core.refusals.allow():
                log.warning("TLS handshake with %s failed: %s", self.peer, reason)
            raw.close()
            self.connection_lost(None)
            return
        if tls is None or self.state is ConnState.CLOSED:
            return
        self.transport = tls
        self._challenge()

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = ConnState.CLOSED
        self._handshake_over()
        if self._probe_sock is not None:
            self._probe_sock.close()
            self._probe_sock = None
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        self.core.forget(self)

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state is ConnState.HELD:
            return  # uvloop may deliver what arrived with the connection
        self._stats.bytes_in += len(data)
        if state is ConnState.MANAGERD and not self.buf and len(data) >= 12:
            # The usual case: exactly one whole request, decoded where it lies.
            (size,) = _HEADER.unpack_from(data)
            if size + 4 == len(data) and size <= self._max_frame_bytes:
                session = self.session
                assert session is not None
                session.touch()
                self.core.dispatcher.handle(self, session, data, 4)
                return
        self._out = []
        try:
            self._frames(data)
        finally:
            out, self._out = self._out, None
            if out:
                self._write(out)

    def _frames(self, data: bytes) -> None:
        """Answer every whole frame buffered, keep the rest."""
        buf = self.buf
        buf += data
        pos = 0
        end = len(buf)
        # Identity tests, not a set: an Enum member hashes in Python code.
        while (
            end - pos >= 4
            and self.state is not ConnState.CLOSED
            and self.state is not ConnState.RESUMING  # buffered until the hello is answered
        ):
            (size,) = _HEADER.unpack_from(buf, pos)
            start = pos + 4
            if size == -1:
                if end - pos < 12:
                    break
                (size,) = _LONG_HEADER.unpack_from(buf, start)
                start += 8
            if size < 0 or size > self._frame_limit():
                self.core.requests.limit_hit("frame_size")
                self.refuse(f"frame of {size} bytes is over the limit of {self._frame_limit()}")
                return
            if end - start < size:
                break
            frame = bytes(memoryview(buf)[start : start + size])  # one copy, not two
            pos = start + size
            self.frame_received(frame)
        if pos:
            del buf[:pos]

    # -- frames ---------------------------------------------------------------
    def _frame_limit(self) -> int:
        if self.state in (ConnState.STOCK, ConnState.MANAGERD):
            return self._max_frame_bytes
        return HANDSHAKE_MAX_FRAME_BYTES

    def send_frame(self, body: bytes) -> None:
        if len(body) >= 16384:
            self.send_frame_parts(b"", body)  # not joined: one copy fewer
            return
        self._stats.bytes_out += len(body) + 4
        self._send(frame_header(len(body)) + body)

    def send_reply(self, rid: int, status: int, body: bytes) -> None:
        """Send a managerd reply: ``<rid><status>`` and ``body``, framed with one pack."""
        if len(body) >= 16384:
            self.send_frame_parts(_REPLY_HEAD.pack(rid, status), body)
            return
        size = len(body) + _REPLY_HEAD.size
        self._stats.bytes_out += size + 4
        self._send(_FRAMED_REPLY_HEAD.pack(size, rid, status) + body)

    def send_frame_parts(self, head: bytes, body: bytes) -> None:
        """Send ``head + body`` as one frame without joining them (``body`` is large)."""
        size = len(head) + len(body)
        self._stats.bytes_out += size + 4
        out = self._out
        if out is not None:
            out += (frame_header(size) + head, body)
            return
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.writelines((frame_header(size) + head, body))

    def _send(self, frame: bytes) -> None:
        out = self._out
        if out is not None:
            out.append(frame)  # written when data_received returns
            return
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(frame)

    def _write(self, frames: list[bytes]) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if len(frames) == 1:
            transport.write(frames[0])
        else:
            transport.writelines(frames)

    def frame_received(self, frame: bytes) -> None:
        state = self.state
        if state is ConnState.MANAGERD:
            assert self.session is not None
            if len(frame) < 8:
                self.refuse(f"a request of {len(frame)} bytes is shorter than its request id")
                return
            self.session.touch()
            self.core.dispatcher.handle(self, self.session, frame, 0)
        elif state is ConnState.STOCK:
            self._stock_request(frame)
        elif state is ConnState.CHALLENGED:
            if verify_response(
                self.core.authkey,
                self._challenge_message,
                frame,
                allow_md5=self.core.settings.allow_md5_auth,
            ):
                self.send_frame(WELCOME)
                self.state = ConnState.AWAIT_PEER_CHALLENGE
            else:
                self.send_frame(FAILURE)
                self.core.stats.auth_failures += 1
                if len(frame) == 16 and not self.core.settings.allow_md5_auth:
                    self.refuse(
                        "authentication failed: legacy HMAC-MD5 refused "
                        "(MANAGERD_ALLOW_MD5_AUTH=false; a Python 3.11 client?)"
                    )
                else:
                    self.refuse("authentication failed (wrong authkey)", quiet=False)
        elif state is ConnState.AWAIT_PEER_CHALLENGE:
            if not frame.startswith(CHALLENGE):
                self.refuse("expected the peer's challenge")
                return
            try:
                self.send_frame(create_response(self.core.authkey, frame))
            except ValueError as exc:
                self.refuse(f"bad challenge: {exc}")
                return
            self.state = ConnState.AWAIT_VERDICT
            # A stock client now writes WELCOME and its first request back to
            # back; with Nagle on its side the request waits for our ACK of
            # WELCOME, which delayed ACK would hold ~40 ms. Ack at once.
            self._quickack()
        elif state is ConnState.AWAIT_VERDICT:
            if frame != WELCOME:
                self.refuse("the peer refused our answer to its challenge")
                return
            if self._handshake_timer is not None:
                self._handshake_timer.cancel()
                self._handshake_timer = None
            self.state = ConnState.STOCK
            self._handshake_over()

    def peer_alive(self) -> bool:
        """Peek at the socket: False if the peer has closed or reset it.

        On failure the connection is closed, which ends its session on the
        next loop iteration.
        """
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        if self._probe_sock is None:
            raw = transport.get_extra_info("socket")
            if raw is None:
                return True
            self._probe_sock = socket.socket(
                raw.family, raw.type, raw.proto, fileno=os.dup(raw.fileno())
            )
        try:
            alive = self._probe_sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except BlockingIOError:
            return True
        except OSError:
            alive = False
        if not alive:
            self.close()
        return alive

    def _quickack(self) -> None:
        sock = self.transport.get_extra_info("socket") if self.transport else None
        if sock is not None and hasattr(socket, "TCP_QUICKACK"):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            except OSError:
                pass

    # -- stock mode -----------------------------------------------------------
    def _stock_request(self, frame: bytes) -> None:
        try:
            request = self.core.decoder.loads(frame)
            ident, method, args, kwds = request
            if not isinstance(args, tuple) or not isinstance(kwds, dict):
                raise TypeError("request args must be a tuple and kwds a dict")
        except (ForbiddenPayload, TypeError, ValueError) as exc:
            if isinstance(exc, ForbiddenPayload):
                self.core.dispatcher.refused_decode(self.peer, exc)
            self.send_stock(("#ERROR", _plain_error(exc)))
            return
        if ident is None and method == HELLO:
            self._hello(args)
            return
        if self.session is None:
            self.session = self.core.sessions.open(SessionKind.STOCK, self.peer)
            self.session.probe = self.peer_alive
        if self.stock_parked is not None:
            self._stock_abandon(self.session)
        self.core.stock.handle(self, self.session, ident, method, args, kwds)

    def _stock_abandon(self, session: Session) -> None:
        """A request while a call is parked: the stock client gave that call up.

        A stock connection is strictly one request, then its reply (a stock
        client opens one per thread), so a new request means the client
        stopped reading for the parked one (Ctrl-C in ``q.get()``): the wait
        is dropped, as a session's end drops it, before it can take an item
        the client would never read. Had its answer been sent already, the
        client reads it as the answer to this request: a limit of the stock
        protocol (README).
        """
        assert self.stock_parked is not None
        obj, method, future = self.stock_parked
        self.stock_parked = None
        if not future.done():
            self.core.stock.store.abandon(obj, method, session, future, stock=True)

    def send_stock(self, message: tuple[str, Any]) -> None:
        """Send a stock reply (the invoker waited for the journal where it had to)."""
        try:
            body = pickle.dumps(message, 4)
        except Exception as exc:
            body = pickle.dumps(("#UNSERIALIZABLE", repr(exc)), 4)
        self.send_frame(body)

    def _hello(self, args: tuple[Any, ...]) -> None:
        info = args[0] if args and isinstance(args[0], dict) else {}
        version = negotiate(info)
        if version is None:
            self.send_stock(
                ("#ERROR", ProtocolError(f"protocol {info.get('protocol')!r} is not supported"))
            )
            return
        token = info.get("resume")
        session = self.core.sessions.resumable(token) if isinstance(token, str) else None
        if session is not None and session.active and session.kind is SessionKind.MANAGERD:
            self.core.stats.sessions_resumed += 1
            self._welcome(info, session, resumed=True, version=version)
        elif session is None and isinstance(token, str):
            # Maybe a session of another gateway of the store: asked, input waits.
            self.state = ConnState.RESUMING
            if self.transport is not None:
                self.transport.pause_reading()
            looking = self.core.loop.create_task(self.core.sessions.resume_elsewhere(token))
            looking.add_done_callback(lambda task: self._resumed_elsewhere(info, task))
        else:
            self._welcome(info, None, resumed=False, version=version)

    def _resumed_elsewhere(self, info: dict[str, Any], task: asyncio.Task[Session | None]) -> None:
        """The store's answer to a hello's token: its session, or a new one."""
        session = None
        if not task.cancelled():
            if task.exception() is not None:
                log.warning("resuming a session for %s failed: %s", self.peer, task.exception())
            else:
                session = task.result()
        if self.state is ConnState.CLOSED:
            # Its connection is gone while it was looked up: as any session whose
            # connection dropped, it waits for its client to come back within the
            # TTL (the expiry ends it otherwise), its holdings kept.
            if session is not None:
                session.touch()
            return
        if session is not None:
            session.peer = self.peer
            session.info = _clean(info)
            self.core.stats.sessions_resumed += 1
            self.core.stats.sessions_taken_over += 1
        self._out = []
        try:
            self._welcome(info, session, resumed=session is not None, version=negotiate(info) or 1)
            if self.transport is not None:
                self.transport.resume_reading()
            self._frames(b"")  # what arrived meanwhile
        finally:
            out, self._out = self._out, None
            if out:
                self._write(out)

    def _welcome(
        self, info: dict[str, Any], session: Session | None, *, resumed: bool, version: int
    ) -> None:
        """Managerd mode for ``session`` (a new one if None), speaking protocol ``version``:
        the hello's answer."""
        if session is None:
            session = self.core.sessions.open(SessionKind.MANAGERD, self.peer, _clean(info))
        self.core.adopt(session, self)
        self.session = session
        session.probe = self.peer_alive
        session.touch()
        self.state = ConnState.MANAGERD
        self.raw_replies = info.get("raw_replies") is True
        self.handles = HandleTable() if version >= 2 else None
        self.send_stock(
            (
                "#RETURN",
                {
                    "session": session.id,
                    "resume_token": session.resume_token,
                    "resumed": resumed,
                    "server_id": self.core.server_id,
                    "session_ttl_s": self.core.settings.session_ttl_s,
                    "max_frame_bytes": self.core.settings.max_frame_bytes,
                    "raw_replies": self.raw_replies,
                    "protocol": version,
                    **(FEATURES if version >= 2 else {}),
                },
            )
        )

    # -- ending ---------------------------------------------------------------
    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        if self.state in (ConnState.STOCK, ConnState.MANAGERD, ConnState.CLOSED):
            return
        self.core.stats.handshake_timeouts += 1
        self.refuse(f"no authentication within {self.core.settings.handshake_timeout_s}s")

    def _handshake_over(self) -> None:
        """Authenticated or gone: no longer a pending handshake of the address."""
        self._handshaking = False
        if self._pending:
            self._pending = False
            self.core.peers.end(self.address)

    def _handshake_failed(self) -> None:
        """Count a failed handshake against the peer's address, once."""
        if self._handshaking:
            self._handshaking = False
            self.core.peers.failed(self.address)

    def _refuse_at_once(self, reason: str, until: float | None = None) -> None:
        """Refuse before any challenge: one ``#REFUSED#`` frame says why (and the log).

        ``until`` (monotonic) is when a penalty ends: the frame says how long
        is left *now*, after the hold, so a client can wait and retry.
        """
        self._handshake_timer = None
        retry_after_s = None if until is None else until - time.monotonic()
        frame = refused_frame(reason, retry_after_s)
        self.send_frame(frame)
        self.refuse(f"refused: {reason}")

    def refuse(self, reason: str, quiet: bool = False) -> None:
        """Log one line (within the log budget) and close the connection.

        During the handshake this counts as a failed handshake of the
        peer's address (see :mod:`managerd.service.peers`).
        """
        self._handshake_failed()
        if not quiet and self.core.refusals.allow():
            log.warning("closing connection from %s: %s", self.peer, reason)
        self.close()

    def close(self) -> None:
        if self.state is ConnState.CLOSED:
            return
        self.state = ConnState.CLOSED
        if self.transport is not None:
            out, self._out = self._out, None
            if out:  # the replies (a #FAILURE#...) before the close
                self._write(out)
            self.transport.close()


def _clean(info: dict[str, Any]) -> dict[str, Any]:
    """What a hello says of its client that a session keeps."""
    return {k: info[k] for k in ("host", "pid", "name") if k in info}


def _plain_error(exc: BaseException) -> BaseException:
    """An exception a stock client can unpickle (builtins only)."""
    for cls in type(exc).__mro__:
        if cls.__module__ == "builtins":
            try:
                return cls(str(exc))  # type: ignore[no-any-return]
            except Exception:
                break
    return RuntimeError(str(exc))
