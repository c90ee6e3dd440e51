"""The wire format of ``multiprocessing.connection``, shared by client and daemon.

Frames are a 4-byte big-endian signed length and the bytes; a length of -1
is followed by an 8-byte unsigned length for frames over 2 GiB. Authentication
is the HMAC challenge of ``multiprocessing.connection``: the daemon sends
``#CHALLENGE#{sha256}<40 random bytes>``, the peer answers with an HMAC of it
(``{sha256}<mac>``, or a bare 16-byte HMAC-MD5 from Python 3.11), then the
peer challenges the daemon the same way. Stock clients of Python 3.11-3.13
speak exactly this, which is why managerd keeps it.

Why by hand: ``multiprocessing.connection.Connection`` reads and writes the
raw file descriptor (which bypasses TLS) and blocks a thread per connection;
the daemon needs the same frames on an event loop and the client needs them
on an ``ssl.SSLSocket`` shared by threads. The handshake functions here are
pure (bytes in, bytes out) so that both sides use the same code.

After the handshake a stock client sends pickled ``(ident, method, args,
kwds)`` requests and reads ``('#RETURN', value)``/``('#ERROR', exc)``. The
managerd client first sends the stock-shaped request ``(None, HELLO, (info,),
{})``; from the reply on, that connection carries managerd's own envelopes
(see :class:`Request`/replies below), which add request ids so that threads
can share one connection and pipeline calls.
"""

from __future__ import annotations

import hmac
import math
import os
import select
import socket
import ssl
import struct
from collections.abc import Callable
from typing import Any, Final, cast

__all__ = [
    "CHALLENGE",
    "DEFAULT_MAX_FRAME_BYTES",
    "FAILURE",
    "HELLO",
    "PROTOCOL_VERSION",
    "REFUSED",
    "REISSUE",
    "RESOLVE",
    "RETRY_AFTER",
    "V2_HEAD",
    "V2_PAYLOADS",
    "V2_TAIL",
    "WELCOME",
    "FrameSocket",
    "Refused",
    "create_response",
    "frame_header",
    "make_challenge",
    "refused_frame",
    "verify_response",
]

CHALLENGE: Final = b"#CHALLENGE#"
WELCOME: Final = b"#WELCOME#"
FAILURE: Final = b"#FAILURE#"
#: Sent by the daemon instead of a challenge when it will not take the
#: connection (too many connections, shutting down), followed by why.
REFUSED: Final = b"#REFUSED#"
#: Ends a ``#REFUSED#`` frame that says when to try again: ``#RETRY-AFTER#<seconds>``.
RETRY_AFTER: Final = b"#RETRY-AFTER#"
CHALLENGE_RANDOM_BYTES: Final = 40
HANDSHAKE_MAX_FRAME_BYTES: Final = 256
DEFAULT_MAX_FRAME_BYTES: Final = 64 * 1024 * 1024

#: The method name of the request that switches a connection to managerd's
#: envelopes. A stock server answers it with an error, a managerd daemon with
#: the session it opened.
HELLO: Final = "managerd_hello"
#: A call asked again through the daemon that resumed the session, its first
#: daemon having died under it: ``(None, None, REISSUE, (typeid, name, method,
#: args, origin), thread)``, ``origin`` the request id the call first had (0:
#: never sent; a process's request ids are unique). The daemon runs the call,
#: knowing it may have been parked (or answered) by the daemon that died.
REISSUE: Final = "managerd_reissue"
#: The newest protocol this client speaks. 1: every request is a pickled
#: ``(typeid, name, method, args, thread)`` envelope. 2 adds handle
#: envelopes: ``<rid:u64><handle:u32><method:u16><thread:u64>`` then the
#: pickled ``args`` tuple (nothing for ``()``), where the handle and the
#: method number come from a ``resolve`` request made once per object and
#: connection. A daemon that answers a hello of 2 with an error is asked
#: again with 1 on the same connection.
PROTOCOL_VERSION: Final = 2
#: The daemon operation (a protocol 1 envelope on a protocol 2 connection)
#: that interns ``(typeid, name)`` as a handle of this connection; its answer
#: is ``(handle, method names)``, a method's number being its index there.
#: ``(None, None)`` is the daemon's own operations, handle 0.
RESOLVE: Final = "resolve"
#: The header of a protocol 2 request: request id, handle, method, thread.
#: A pickle starts with 0x80 (PROTO), so a daemon tells a protocol 1
#: envelope from a handle (which stays below 2**31) by its first byte.
V2_HEAD: Final = struct.Struct("!QIHQ")
#: Set in a protocol 2 request's method number: its first argument is a list
#: of payloads (``bytes``), carried before the pickle of the other arguments
#: as ``<n:u32 LE><n lengths:u32 LE><the payloads back to back>``: opaque
#: bytes the daemon stores without unpickling (``put_many``'s items).
V2_PAYLOADS: Final = 0x8000
#: Set in a protocol 2 request's method number (when the daemon's welcome
#: said ``tail_payloads``): its last argument is one payload (``bytes``),
#: carried after the pickle of the other arguments as ``<n:u32 LE><n bytes:
#: the pickle of the others, none when n is 0><the payload to the frame's
#: end>``: the daemon stores it without unpickling it or scanning it
#: (``Queue.put``'s item, a dict's value). Not with ``V2_PAYLOADS``.
V2_TAIL: Final = 0x4000

#: The pickle protocol of managerd envelopes and payloads. 5 is the newest
#: that every supported Python (3.11+) reads.
PICKLE_PROTOCOL: Final = 5

_LEGACY_MD5_LENGTHS: Final = (16, 20)
_ALLOWED_DIGESTS: Final = frozenset({b"md5", b"sha256", b"sha384", b"sha3_256", b"sha3_384"})
_READ_BUFFER_BYTES: Final = 65536
#: A read buffer grown for a large frame is kept up to this size: the next
#: large frame then lands in memory already paged in, not in a fresh buffer.
_KEEP_BUFFER_BYTES: Final = 4 * 1024 * 1024
_HEADER = struct.Struct("!i")
_LONG_HEADER = struct.Struct("!Q")


def frame_header(size: int) -> bytes:
    """The length prefix of a frame of ``size`` bytes."""
    if size > 0x7FFFFFFF:
        return _HEADER.pack(-1) + _LONG_HEADER.pack(size)
    return _HEADER.pack(size)


def make_challenge(digest: str = "sha256") -> tuple[bytes, bytes]:
    """A fresh challenge: ``(frame to send, message the MAC must cover)``."""
    message = b"{%s}%s" % (digest.encode("ascii"), os.urandom(CHALLENGE_RANDOM_BYTES))
    return CHALLENGE + message, message


def _split_digest(message: bytes) -> tuple[str, bytes]:
    """``(digest name, payload)`` of a challenge or response; '' means legacy MD5."""
    if len(message) in _LEGACY_MD5_LENGTHS:
        return "", message
    if message.startswith(b"{"):
        end = message.find(b"}", 1, 12)
        if end > 0 and message[1:end] in _ALLOWED_DIGESTS:
            return message[1:end].decode("ascii"), message[end + 1 :]
    raise ValueError("unsupported challenge: wrong length, no digest prefix, or unknown digest")


def create_response(authkey: bytes, challenge_frame: bytes) -> bytes:
    """The answer to a ``#CHALLENGE#`` frame: an HMAC of its message."""
    if not challenge_frame.startswith(CHALLENGE):
        raise ValueError("expected a #CHALLENGE# frame")
    message = challenge_frame[len(CHALLENGE) :]
    digest, _ = _split_digest(message)
    if not digest:
        return hmac.new(authkey, message, "md5").digest()
    mac = hmac.new(authkey, message, digest).digest()
    return b"{%s}%s" % (digest.encode("ascii"), mac)


def verify_response(
    authkey: bytes, message: bytes, response: bytes, *, allow_md5: bool = True
) -> bool:
    """Whether ``response`` is a valid HMAC of ``message`` under ``authkey``.

    A prefixed challenge cannot be downgraded: the MAC covers the prefix. A
    bare 16-byte response is Python 3.11's HMAC-MD5, refused unless
    ``allow_md5``.
    """
    try:
        digest, mac = _split_digest(response)
    except ValueError:
        return False
    digest = digest or "md5"
    if digest == "md5" and not allow_md5:
        return False
    expected = hmac.new(authkey, message, digest).digest()
    return bool(hmac.compare_digest(expected, mac))


class FrameSocket:
    """Blocking frame I/O over a socket (plain or TLS), buffered for reads.

    Sends are whole frames in one ``sendall``. Reads go into one reusable
    buffer with ``recv_into``: a burst of replies costs one syscall, and no
    read allocates (``recv(256 KiB)`` would allocate and free 256 KiB per
    call, which measured here costs ~20 us, as much as the round trip).
    """

    __slots__ = (
        "_base",
        "_buf",
        "_end",
        "_got",
        "_max_frame_bytes",
        "_next",
        "_poller",
        "_spare",
        "_start",
        "_tls",
        "read_timeout_s",
        "sock",
        "torn",
    )

    def __init__(self, sock: socket.socket, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES):
        self.sock = sock
        self._buf = bytearray(_READ_BUFFER_BYTES)
        #: A large read buffer handed back (see detach_frame), for the next one.
        self._spare: bytearray | None = None
        self._start = 0  # unread bytes are _buf[_start:_end]
        self._end = 0
        self._next = 0  # where the frame last returned by next_frame_view ends
        self._max_frame_bytes = max_frame_bytes
        # Interrupt safety (see recover()): what the last read returned, and
        # where it started; True while the buffer is being rearranged.
        self._got: list[int] = []
        self._base = 0
        self._tls = isinstance(sock, ssl.SSLSocket)
        self._poller: select.poll | None = None
        #: How long a TLS read waits for data (see _await_readable); set it
        #: with set_receive_timeout's value.
        self.read_timeout_s: float | None = sock.gettimeout()
        #: An exception (Ctrl-C...) left the read state unknown: the stream
        #: cannot be used any more.
        self.torn = False

    @property
    def tls(self) -> bool:
        return self._tls

    @property
    def write_fn(self) -> Callable[[Any], int]:
        """A C function that sends bytes and returns how many it sent.

        ``socket.send``; over TLS the TLS object's ``write`` (what
        ``ssl.SSLSocket.send`` calls: that one is Python code, and an
        interrupt inside it could lose the count).
        """
        if self._tls:
            write: Callable[[Any], int] = self.sock._sslobj.write  # type: ignore[attr-defined]
            return write
        return self.sock.send

    def send_frame(self, body: bytes, prefix: bytes = b"") -> None:
        """Send ``prefix + body`` as one frame (without copying a large body)."""
        size = len(prefix) + len(body)
        if size < 65536:
            self.sock.sendall(frame_header(size) + prefix + body)
        else:
            self.sock.sendall(frame_header(size) + prefix)
            self.sock.sendall(body)

    def send_frame_parts(self, parts: list[bytes], prefix: bytes = b"") -> None:
        """Send ``prefix`` and ``parts`` back to back as one frame, without joining them."""
        for chunk in self.frame_chunks(parts, prefix):
            self.sock.sendall(chunk)

    @staticmethod
    def frame_chunks(parts: list[bytes], prefix: bytes = b"") -> list[bytes]:
        """What ``send_frame_parts`` sends, one ``sendall`` each (a large body is not copied)."""
        if len(parts) == 1:
            body = parts[0]
            size = len(prefix) + len(body)
            if size < 65536:
                return [frame_header(size) + prefix + body]
            return [frame_header(size) + prefix, body]
        size = len(prefix) + sum(len(p) for p in parts)
        return [frame_header(size) + prefix + parts[0], *parts[1:]]

    def recv_frame(self) -> bytes:
        """The next frame; ``EOFError`` when the peer closed the connection.

        A receive timeout raises ``TimeoutError`` with the partial frame kept
        in the buffer, so the caller may simply call again.
        """
        return bytes(self.recv_frame_view())

    def recv_frame_view(self) -> memoryview:
        """The next frame as a view of the read buffer, valid until the next read."""
        frame = self.next_frame_view()
        self.done_frame()
        return frame

    def next_frame_view(self) -> memoryview:
        """The next frame, left unread until :meth:`done_frame`.

        A reader that is interrupted before it is done with the frame (its
        thread gets ``KeyboardInterrupt``) reads the same frame again.
        """
        if self._got:
            self._settle()  # an interrupted read's count (recover() was not reached)
        if self.torn:
            raise OSError("the stream was torn by an interrupted read")
        while True:
            buf, start, avail = self._buf, self._start, self._end - self._start
            if avail >= 4:
                (size,) = _HEADER.unpack_from(buf, start)
                head = 4
                if size == -1:
                    if avail < 12:
                        self._fill(12)
                        continue
                    (size,) = _LONG_HEADER.unpack_from(buf, start + 4)
                    head = 12
                if size < 0 or size > self._max_frame_bytes:
                    raise OSError(f"frame of {size} bytes is over the limit")
                if avail >= head + size:
                    self._next = start + head + size
                    return memoryview(buf)[start + head : start + head + size]
                self._fill(head + size)
            elif self._tls or self._start + 4 > len(buf):
                self._fill(4)
            else:
                # _fill's usual case inlined (an empty buffer with room: one
                # reply per read), with its interrupt safety: the count
                # lands in _got in C, and applying it is idempotent.
                got = self._got
                self._base = self._end
                try:
                    got.extend(map(self.sock.recv_into, (memoryview(buf)[self._base :],)))
                except BlockingIOError as exc:  # SO_RCVTIMEO ran out
                    raise TimeoutError("no data before the receive timeout") from exc
                n = got[0]
                self._end = self._base + n
                got.clear()
                if not n:
                    raise EOFError("connection closed by peer")

    def done_frame(self) -> None:
        """The frame last returned by :meth:`next_frame_view` is read."""
        if self._next == self._end:
            # One statement (no call inside): an interrupt cannot split it.
            self._start, self._end, self._next = 0, 0, 0
            if len(self._buf) > _KEEP_BUFFER_BYTES:  # a huge frame passed: shrink back
                self._buf = bytearray(_READ_BUFFER_BYTES)
        elif self._next > self._start:
            self._start = self._next

    def detach_frame(self, frame: memoryview) -> memoryview:
        """Keep ``frame`` (the last view returned) valid past the next read.

        A small frame is copied. A large one keeps the read buffer it lies in:
        reading goes on in a spare buffer (what follows the frame moves
        there), and :meth:`recycle` makes the old one the next spare, so large
        frames alternate between two buffers already paged in.
        """
        if len(frame) < _READ_BUFFER_BYTES or frame.obj is not self._buf:
            return memoryview(bytes(frame))
        rest = self._buf[self._start : self._end]
        spare, self._spare = self._spare, None
        if spare is None or len(spare) < len(rest):
            spare = bytearray(max(_READ_BUFFER_BYTES, len(rest)))
        spare[: len(rest)] = rest
        self._buf, self._start, self._end, self._next = spare, 0, len(rest), 0
        return frame

    def recycle(self, buffer: object) -> None:
        """``buffer`` (of a detached frame) is no longer read: reuse it."""
        if isinstance(buffer, bytearray) and len(buffer) <= _KEEP_BUFFER_BYTES:
            self._spare = buffer

    def _fill(self, want: int) -> None:
        """Read more, making room for a frame of ``want`` bytes at ``_start``.

        Interrupt-safe (see :meth:`recover`): the count that ``recv_into``
        returns is kept by ``list.extend`` in C, so an exception raised as
        the call returns (a signal handler runs there) cannot lose it. Over
        TLS, it waits for data before it reads (see ``_await_readable``).
        """
        buf = self._buf
        if self._start + want > len(buf):
            self.torn = True  # until the unread bytes are in place
            start, end = self._start, self._end
            unread = buf[start:end]
            if want > len(buf):
                buf = bytearray(max(want, min(2 * len(buf), _KEEP_BUFFER_BYTES)))
            buf[: end - start] = unread
            self._buf, self._start, self._end, self._next = buf, 0, end - start, 0
            self.torn = False
        got = self._got
        self._base = self._end
        if self._tls:
            # A TLS read may lose what it decrypted if an interrupt strikes
            # inside it (ssl.SSLSocket.recv_into is Python code; _ssl checks
            # signals after SSL_read): so wait for data first, where an
            # interrupt reads nothing, and count the read itself as torn.
            self._await_readable()
            self.torn = True
        try:
            got.extend(map(self.sock.recv_into, (memoryview(buf)[self._base :],)))
        except BlockingIOError as exc:  # SO_RCVTIMEO ran out (see set_receive_timeout)
            self.torn = False
            raise TimeoutError("no data before the receive timeout") from exc
        self.torn = False
        if not self._settle():
            raise EOFError("connection closed by peer")

    def _await_readable(self) -> None:
        """Wait until the TLS socket has something to read (poll(2) reads nothing)."""
        sock = cast(ssl.SSLSocket, self.sock)
        if sock.pending():
            return  # decrypted bytes already buffered in the TLS layer
        if self._poller is None:
            self._poller = select.poll()
            self._poller.register(sock.fileno(), select.POLLIN | select.POLLPRI)
        timeout_s = self.read_timeout_s
        if not self._poller.poll(None if timeout_s is None else timeout_s * 1000):
            raise TimeoutError("no data before the receive timeout")

    def _settle(self) -> int:
        """Count the bytes the last ``recv_into`` returned (idempotent)."""
        got = self._got
        if not got:
            return 0
        n = got[0]
        self._end = self._base + n
        got.clear()
        return n

    def recover(self) -> bool:
        """After an exception escaped a read: whether the stream is still usable.

        An interrupt (``KeyboardInterrupt``, an exception from a signal
        handler, an asynchronous exception) may strike anywhere in a read.
        Inside ``recv_into`` (or, over TLS, while waiting for data) nothing
        was read; just after it, the count is in ``_got`` and is applied
        here; while the buffer was being rearranged, or inside the TLS read
        itself (microseconds: data was there), what was read is unknown: the
        stream is torn.
        """
        if self.torn:
            return False
        self._settle()
        return True

    def close(self) -> None:
        """Shut down, then close: a thread blocked in recv() wakes (close alone would not)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass


def set_receive_timeout(sock: socket.socket, timeout_s: float) -> None:
    """Make blocking reads and writes give up after ``timeout_s``, in the kernel.

    Unlike ``sock.settimeout()``, which makes Python poll(2) before every
    send and recv (two syscalls more per call), SO_RCVTIMEO/SO_SNDTIMEO cost
    nothing until they expire; the socket stays in blocking mode.
    """
    seconds = int(timeout_s)
    value = struct.pack("ll", seconds, int((timeout_s - seconds) * 1e6))
    sock.settimeout(None)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)


class Refused(ConnectionRefusedError):
    """The daemon sent ``#REFUSED#`` instead of a challenge; maybe with when to retry."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def refused_frame(reason: str, retry_after_s: float | None = None) -> bytes:
    """A ``#REFUSED#`` frame; with ``retry_after_s``, the text and a trailer say it.

    The seconds travel as a trailer (not only in the words) so that a client
    need not parse a sentence; stock clients never get this far anyway.
    """
    if retry_after_s is None:
        return REFUSED + reason.encode()
    left = max(retry_after_s, 0.0)
    text = f"{reason}; refused for another {math.ceil(left)}s"
    return REFUSED + text.encode() + RETRY_AFTER + f"{left:.3f}".encode()


def parse_refused(frame: bytes) -> tuple[str, float | None]:
    """The reason of a ``#REFUSED#`` frame and its retry-after seconds (None if none)."""
    body = frame[len(REFUSED) :]
    retry_after_s = None
    head, sep, tail = body.rpartition(RETRY_AFTER)
    if sep:
        try:
            retry_after_s = float(tail.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            retry_after_s = None
        else:
            body = head
        if retry_after_s is not None and not 0.0 <= retry_after_s < 86_400.0:
            retry_after_s = None  # nonsense (or NaN): not worth waiting for
    return body.decode("utf-8", "replace"), retry_after_s


def client_handshake(fs: FrameSocket, authkey: bytes) -> None:
    """Authenticate to a daemon (answer its challenge, then challenge it).

    Raises ``PermissionError`` when either side refuses the other, and
    :class:`Refused` when the daemon refuses the connection itself.
    """
    challenge = fs.recv_frame()
    if challenge.startswith(REFUSED):
        reason, retry_after_s = parse_refused(challenge)
        raise Refused(f"the daemon refused the connection: {reason}", retry_after_s)
    if len(challenge) > HANDSHAKE_MAX_FRAME_BYTES or not challenge.startswith(CHALLENGE):
        raise PermissionError("the peer did not send an authentication challenge")
    try:
        fs.send_frame(create_response(authkey, challenge))
    except ValueError as exc:
        raise PermissionError(str(exc)) from exc
    if fs.recv_frame() != WELCOME:
        raise PermissionError("the daemon refused the authkey")
    frame, message = make_challenge()
    fs.send_frame(frame)
    response = fs.recv_frame()
    if not verify_response(authkey, message, response):
        fs.send_frame(FAILURE)
        raise PermissionError("the daemon does not know the authkey")
    fs.send_frame(WELCOME)


def set_nodelay(sock: socket.socket) -> None:
    """Disable Nagle: a request and its reply must not wait for an ACK."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def parse_address(address: str | tuple[str, int]) -> tuple[str, int]:
    """``"host:port"``, ``"[v6]:port"`` or ``(host, port)`` as a tuple."""
    if isinstance(address, tuple):
        if len(address) != 2 or not isinstance(address[1], int) or isinstance(address[1], bool):
            raise ValueError(f"address {address!r} is not (host, port)")
        return str(address[0]), address[1]
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"address {address!r} is not HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port_text)


def parse_addresses(addresses: Any) -> tuple[tuple[str, int], ...]:
    """One address or several, in order, without repeats.

    ``"h1:50000,h2:50000"``, a ``(host, port)`` tuple, or a list/tuple of
    either (a daemon and its standbys, or several gateways of one store).
    """
    if isinstance(addresses, str):
        parts: list[Any] = [a.strip() for a in addresses.split(",")]
        if not all(parts):
            raise ValueError(f"addresses {addresses!r}: an empty entry between commas")
    elif isinstance(addresses, tuple) and len(addresses) == 2 and isinstance(addresses[1], int):
        parts = [addresses]  # one (host, port)
    elif isinstance(addresses, (list, tuple)):
        parts = list(addresses)
    else:
        raise TypeError(
            "an address is 'HOST:PORT', several joined by commas, a (host, port) tuple, "
            f"or a list of those; got {type(addresses).__name__}"
        )
    if not parts:
        raise ValueError("no address given")
    found: list[tuple[str, int]] = []
    for part in parts:
        if not isinstance(part, (str, tuple)):
            raise TypeError(f"an address is 'HOST:PORT' or (host, port), not {describe(part)}")
        address = parse_address(part)
        if not 0 < address[1] < 65536:
            raise ValueError(f"address {part!r}: port {address[1]} is not 1-65535")
        if address not in found:
            found.append(address)
    return tuple(found)


def describe(value: Any) -> str:
    """A short repr for error messages (never a whole payload)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
