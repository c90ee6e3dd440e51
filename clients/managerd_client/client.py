"""``connect()`` and the client ``Manager``: sessions, heartbeats, reconnect.

A ``Manager`` is one client session on a daemon, over one connection shared
by all the threads of the process. A heartbeat thread pings every third of
the session TTL, which keeps the lease and lets a dead network be noticed.
When the connection is lost, the calls in flight raise ``ConnectionLost``
and the next call reconnects (with backoff, for up to ``connect_timeout_s``),
resuming the session if the daemon still has it. Given several addresses
(gateways of one store, or a daemon and its standby), a connect tries them
in turn from the one last used, so a dead one is passed over; the session
is resumed wherever it is still known, else a new one starts. A read or a
re-parkable wait whose connection died under it is asked again when another
daemon of the same store (an etcd gateway) resumed the session
(``Proxy._reissued``); a creation (a get-or-create) is asked again through
any other daemon given; anything else raises ``ConnectionLost``. A lock
proxy whose session did not survive raises ``LockLost`` on its next call.
A connection refused because this address is penalized (too many failed
handshakes from it, maybe by another process) is retried once the penalty
ends, if that is within ``connect_timeout_s``.

After ``os.fork()`` the child drops the inherited connection (without
closing the parent's) and opens its own session on first use.
"""

from __future__ import annotations

import builtins
import logging
import os
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final, TypeVar

from managerd_client import proxies as p
from managerd_client.channel import Channel
from managerd_client.errors import (
    AuthenticationFailed,
    ConnectFailed,
    ConnectionLost,
    ManagerdError,
    ProtocolError,
)
from managerd_client.pipeline import Pipeline
from managerd_client.wire import parse_addresses

DEFAULT_CONNECT_TIMEOUT_S: Final = 10.0
_BACKOFF_FIRST_S: Final = 0.05
_BACKOFF_MAX_S: Final = 1.0
#: Slept past a refusal's retry-after, so the retry does not arrive a hair early.
_REFUSAL_MARGIN_S: Final = 0.05

_managers: weakref.WeakSet[Manager] = weakref.WeakSet()
P = TypeVar("P", bound=p.Proxy)

_log = logging.getLogger(__name__)


def _authkey_from_env() -> bytes:
    key = os.environ.get("MANAGERD_AUTHKEY")
    if key:
        return key.encode()
    path = os.environ.get("MANAGERD_AUTHKEY_FILE")
    if path:
        try:
            with open(path, "rb") as f:
                data = f.read().strip()  # as the daemon reads its key file
        except OSError as exc:
            raise ValueError(
                f"MANAGERD_AUTHKEY_FILE names {path}, which cannot be read: {exc.strerror or exc}"
            ) from None
        if not data:
            raise ValueError(f"MANAGERD_AUTHKEY_FILE names {path}, which is empty")
        return data
    raise ValueError(
        "no authkey: pass authkey=..., or set MANAGERD_AUTHKEY or MANAGERD_AUTHKEY_FILE"
    )


class Manager:
    """A client session on a managerd daemon; makes proxies by name."""

    def __init__(
        self,
        address: tuple[str, int] | tuple[tuple[str, int], ...],
        authkey: bytes,
        *,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        client_name: str | None = None,
    ) -> None:
        if not isinstance(authkey, bytes) or not authkey:
            raise TypeError("authkey must be non-empty bytes")
        #: Every address to try, in order; ``address`` is the one in use.
        self.addresses = parse_addresses(address)
        self.address = self.addresses[0]
        self._authkey = authkey
        self.connect_timeout_s = connect_timeout_s
        self._tls = tls
        self._server_hostname = server_hostname
        self._client_name = client_name
        self._lock = threading.Lock()
        self._channel: Channel | None = None
        self._session_id: str | None = None
        self._resume_token: str | None = None
        #: Bumped each time a *new* session starts (not a resumed one), so
        #: lock proxies can tell that what they held is gone.
        self.session_epoch = 0
        self._closed = False
        self._pid = os.getpid()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        #: Lock proxies made on this manager: a forked child forgets their
        #: holdings (the parent's, not the child's).
        self._lock_proxies: weakref.WeakSet[p.Lock] = weakref.WeakSet()
        # The first connection is tried once: nobody listening is an error
        # now, not after connect_timeout_s of retries (those are for restarts).
        self._channel_or_reconnect(retry=False)
        _managers.add(self)

    # -- connection ---------------------------------------------------------------
    def _open(self) -> Channel:
        """A channel to the first address that answers, from the one last used."""
        hello: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid()}
        if self._client_name:
            hello["name"] = self._client_name
        if self._resume_token is not None:
            hello["resume"] = self._resume_token
        start = self.addresses.index(self.address)
        order = self.addresses[start:] + self.addresses[:start]
        failures: list[ConnectFailed] = []
        for address in order:
            try:
                channel = Channel(
                    address,
                    self._authkey,
                    connect_timeout_s=self.connect_timeout_s,
                    tls=self._tls,
                    server_hostname=self._server_hostname,
                    hello=hello,
                )
            except ConnectFailed as exc:
                failures.append(exc)
                continue
            self.address = address
            return channel
        raise _all_failed(failures)

    def _channel_or_reconnect(self, retry: bool = True) -> Channel:
        channel = self._channel
        if channel is not None and not channel.peer_closed():
            return channel
        with self._lock:
            if self._closed:
                raise ConnectionLost("this manager was closed")
            channel = self._channel
            if channel is not None and channel.dead is None:
                return channel
            deadline = time.monotonic() + self.connect_timeout_s
            delay = _BACKOFF_FIRST_S
            while True:
                if self._closed:  # closed while this thread retried
                    raise ConnectionLost("this manager was closed")
                try:
                    channel = self._open()
                    break
                except (AuthenticationFailed, ProtocolError):
                    raise
                except ConnectFailed as exc:
                    if exc.retry_after_s is not None:
                        # Refused for a while (this address was penalized,
                        # maybe for another process's failures): wait it out
                        # if the connect timeout allows, even on a first connect.
                        _wait_out_refusal(exc, deadline, self.connect_timeout_s)
                        continue
                    if not retry or time.monotonic() + delay > deadline:
                        raise
                    time.sleep(delay)
                    delay = min(delay * 2, _BACKOFF_MAX_S)
            if not channel.resumed:
                self.session_epoch += 1
            self._session_id = channel.session_id
            self._resume_token = channel.resume_token
            self._channel = channel
            if self._closed:
                # close() ran while this connected: it may not have seen the
                # new channel (it is not taken under the lock, which a
                # reconnect holds for up to connect_timeout_s), so end it here.
                self._channel = None
                channel.close()
                raise ConnectionLost("this manager was closed")
            self._ensure_heartbeat(channel.session_ttl_s / 3)
            return channel

    def _resumed_elsewhere(self, lost: Channel, epoch: int) -> Channel | None:
        """After ``lost`` died under a call made in session ``epoch``: the channel on
        which that session goes on through another daemon of the same store (a
        gateway that took it over), else None (a new session, the same daemon
        again, or no daemon reached). Only with several addresses, each tried
        once: with one, or none answering, the call raises ConnectionLost at
        once, as always."""
        if len(self.addresses) < 2:
            return None
        try:
            channel = self._channel_or_reconnect(retry=False)
        except ManagerdError as exc:
            _log.debug("session not resumed elsewhere: no daemon reached (%s)", exc)
            return None
        if channel.resumed and self.session_epoch == epoch and channel.server_id != lost.server_id:
            return channel
        _log.debug(
            "session not resumed elsewhere: resumed %s, epoch %d (call's %d), daemon %s (lost %s)",
            channel.resumed, self.session_epoch, epoch, channel.server_id, lost.server_id,
        )  # fmt: skip
        return None

    def _ensure_heartbeat(self, interval_s: float) -> None:
        if self._heartbeat is not None and self._heartbeat.is_alive():
            return
        ref = weakref.ref(self)
        thread = threading.Thread(
            target=_heartbeat_loop, args=(ref, self._stop, interval_s), daemon=True,
            name="managerd-heartbeat",
        )  # fmt: skip
        self._heartbeat = thread
        thread.start()

    @property
    def server_id(self) -> str:
        return self._channel_or_reconnect().server_id

    @property
    def session_id(self) -> str | None:
        return self._session_id

    def _call(
        self, typeid: str | None, name: str | None, method: str, args: tuple[Any, ...]
    ) -> Any:
        return self._channel_or_reconnect().call(typeid, name, method, args)

    def _after_fork(self) -> None:
        """In a forked child: a session of its own, and nothing held.

        What the parent's threads hold belongs to the parent's session (the
        daemon releases it only when the parent's session ends). The child's
        copies of the lock proxies' holding records are dropped, not turned
        into ``LockLost``: the child never held anything, as with the stdlib's
        proxies, whose child also starts with a connection of its own.
        """
        channel = self._channel
        if channel is not None:
            channel.abandon()
        self._channel = None
        self._session_id = None  # the parent's session is not ours
        self._resume_token = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._heartbeat = None
        self._pid = os.getpid()
        for proxy in list(self._lock_proxies):
            proxy._forget_holdings()

    def pipeline(self) -> Pipeline:
        """A ``with`` block whose ``*_async`` calls (this thread's) are read at its end.

        ``q.put_many_async(batch)`` inside it sends without waiting; the
        block's end reads every answer (raising the first error), or, if it
        ends by an exception, gives them up: items of unread ``get_many``
        answers go back to their queue (``managerd_client.pipeline``).
        """
        return Pipeline()

    # -- daemon-level operations -----------------------------------------------------
    def ping(self) -> None:
        self._call(None, None, "ping", ())

    def objects(self) -> list[tuple[str, str]]:
        """``(name, type)`` of every object on the daemon, sorted by name."""
        return [(str(n), str(t)) for n, t in self._call(None, None, "objects", ())]

    def delete(self, name: str) -> bool:
        """Remove the object ``name``; False if there was none. Its waiters fail."""
        return bool(self._call(None, None, "delete", (name,)))

    def status(self) -> dict[str, Any]:
        """What the daemon holds: objects with depths, holders and waiters; sessions."""
        result: dict[str, Any] = self._call(None, None, "status", ())
        return result

    def peek(self, name: str, limit: int = 10) -> dict[str, Any]:
        """``name``'s contents as the daemon stores them, taking nothing (``managerd get``).

        Payloads come back as the pickled bytes clients stored; at most
        ``limit`` items of a queue, list, dict or namespace.
        """
        result: dict[str, Any] = self._call(None, None, "peek", (name, limit))
        return result

    def _create(self, typeid: str, name: str, args: dict[str, Any]) -> str:
        channel = self._channel_or_reconnect()
        try:
            channel.call(None, None, "create", (typeid, name, args))
        except ConnectionLost as lost:
            # A get-or-create, made or not, is asked again through another daemon of
            # the store; a creation needs nothing of the session (resumed there or not).
            if len(self.addresses) < 2:
                raise
            try:
                channel = self._channel_or_reconnect(retry=False)
            except ManagerdError:
                raise lost from None
            channel.call(None, None, "create", (typeid, name, args))
        return channel.server_id

    # -- object factories ---------------------------------------------------------------
    def _make(self, cls: type[P], name: str, **args: Any) -> P:
        given = {k: v for k, v in args.items() if v is not None}
        return cls(self, name, given)

    def Queue(
        self,
        name: str,
        maxsize: int | None = None,
        *,
        visibility_timeout_s: float | None = None,
        max_deliveries: int | None = None,
    ) -> p.Queue:
        """The queue ``name`` (created with ``maxsize``, 0 = unbounded).

        A ``queue.Queue``: ``task_done()`` and ``join()`` as well.
        """
        return self._make(
            p.Queue, name, maxsize=maxsize,
            visibility_timeout_s=visibility_timeout_s, max_deliveries=max_deliveries,
        )  # fmt: skip

    def JoinableQueue(
        self,
        name: str,
        maxsize: int | None = None,
        *,
        visibility_timeout_s: float | None = None,
        max_deliveries: int | None = None,
    ) -> p.JoinableQueue:
        """The queue ``name`` under multiprocessing's name (a ``Queue`` has ``join`` too)."""
        return self._make(
            p.JoinableQueue, name, maxsize=maxsize,
            visibility_timeout_s=visibility_timeout_s, max_deliveries=max_deliveries,
        )  # fmt: skip

    def Pipe(self, name: str, duplex: bool | None = None) -> tuple[p.PipeEnd, p.PipeEnd]:
        """The two ends of the pipe ``name``; with ``duplex=False``, ``(reader, writer)``."""
        args = {} if duplex is None else {"duplex": duplex}
        return p.PipeEnd(self, name, args, end=0), p.PipeEnd(self, name, args, end=1)

    # Initial contents apply when the call creates the object. Attaching
    # with none is always fine; with some, they must equal the ones it was
    # created with (else ArgumentConflict), whatever it holds now. The name
    # of a dict or Namespace is positional-only: ``name=`` is a key.
    def dict(self, name: str, /, *args: Any, **kwargs: Any) -> p.Dict:
        """The dict ``name``; created with ``dict(*args, **kwargs)`` when given."""
        if not args and not kwargs:
            return self._make(p.Dict, name)
        pairs = [(k, p.dumps(v)) for k, v in builtins.dict(*args, **kwargs).items()]
        return self._make(p.Dict, name, contents=pairs)

    def list(self, name: str, sequence: Iterable[Any] | None = None) -> p.List:
        """The list ``name``; created with the items of ``sequence`` when given."""
        if sequence is None:
            return self._make(p.List, name)
        return self._make(p.List, name, contents=[p.dumps(v) for v in sequence])

    def Namespace(self, name: str, /, **attrs: Any) -> p.Namespace:
        """The namespace ``name``; created with the attributes ``attrs`` when given."""
        if not attrs:
            return self._make(p.Namespace, name)
        return self._make(p.Namespace, name, contents=[(k, p.dumps(v)) for k, v in attrs.items()])

    def Value(self, name: str, typecode: str, value: Any = None) -> p.Value:
        """The typed value ``name``; ``value`` is its initial value when created."""
        return self._make(p.Value, name, typecode=typecode, value=value)

    def Array(self, name: str, typecode: str, sequence: Any) -> p.Array:
        """The fixed-length array ``name``: a size, or initial values when created."""
        return self._make(p.Array, name, typecode=typecode, sequence=sequence)

    def Lock(self, name: str) -> p.Lock:
        return self._make(p.Lock, name)

    def RLock(self, name: str) -> p.RLock:
        return self._make(p.RLock, name)

    def Semaphore(self, name: str, value: int | None = None) -> p.Semaphore:
        return self._make(p.Semaphore, name, value=value)

    def BoundedSemaphore(self, name: str, value: int | None = None) -> p.BoundedSemaphore:
        return self._make(p.BoundedSemaphore, name, value=value)

    def Event(self, name: str) -> p.Event:
        return self._make(p.Event, name)

    def Condition(self, name: str, lock: p.Lock | None = None) -> p.Condition:
        """The condition ``name`` over ``lock`` (default: its own RLock ``"<name>.lock"``)."""
        lock_name = None if lock is None else lock._name
        return self._make(p.Condition, name, lock=lock_name)

    def Barrier(
        self, name: str, parties: int | None = None, timeout: float | None = None
    ) -> p.Barrier:
        return self._make(p.Barrier, name, parties=parties, timeout=timeout)

    # -- lifecycle ---------------------------------------------------------------------
    def close(self) -> None:
        """End the session: the daemon releases everything it held."""
        self._closed = True
        self._stop.set()
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Manager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"session {self._session_id}"
        return f"<managerd Manager {self.address[0]}:{self.address[1]} {state}>"


def _all_failed(failures: list[ConnectFailed]) -> ConnectFailed:
    """One error for a connect that no address took.

    If every address refused for a while (penalized), the shortest wait is
    kept, so that the caller waits it out; otherwise the error names each.
    """
    if len(failures) == 1:
        return failures[0]
    waits = [f.retry_after_s for f in failures]
    failed = ConnectFailed("no address answered: " + "; ".join(str(f) for f in failures))
    if all(w is not None for w in waits):
        failed.retry_after_s = min(w for w in waits if w is not None)
    return failed


def _wait_out_refusal(exc: ConnectFailed, deadline: float, timeout_s: float) -> None:
    """Sleep until a refusal's retry-after has passed, or raise if that is past ``deadline``."""
    assert exc.retry_after_s is not None
    wake = time.monotonic() + exc.retry_after_s + _REFUSAL_MARGIN_S
    if wake > deadline:
        failed = ConnectFailed(
            f"{exc}; waiting {exc.retry_after_s:.1f}s more would outlast "
            f"connect_timeout_s={timeout_s:g}"
        )
        failed.retry_after_s = exc.retry_after_s
        raise failed from None
    time.sleep(max(wake - time.monotonic(), 0.0))


def _heartbeat_loop(
    ref: Callable[[], Manager | None], stop: threading.Event, interval_s: float
) -> None:
    pid = os.getpid()
    while not stop.wait(interval_s):
        manager = ref()
        if manager is None or manager._closed or os.getpid() != pid:
            return
        try:
            manager._call(None, None, "ping", ())
        except ManagerdError:
            pass  # the next call (or ping) reconnects
        del manager


def _after_fork_in_child() -> None:
    global _shared_lock
    _shared_lock = threading.Lock()  # a parent thread may have held it at the fork
    for manager in list(_managers):
        manager._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


def connect(
    address: str | tuple[str, int] | Sequence[str | tuple[str, int]] | None = None,
    authkey: bytes | str | None = None,
    *,
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    tls: ssl.SSLContext | None = None,
    tls_ca: str | os.PathLike[str] | None = None,
    tls_cert: str | os.PathLike[str] | None = None,
    tls_key: str | os.PathLike[str] | None = None,
    server_hostname: str | None = None,
    client_name: str | None = None,
) -> Manager:
    """Connect to the daemon at ``"host:port"`` and open a session.

    Several addresses (``"h1:50000,h2:50000"`` or a list) are tried in turn,
    now and at every reconnect, from the one last used. Without ``address``:
    ``MANAGERD_ADDRESSES`` (or ``MANAGERD_ADDRESS``) from the environment.

    ``authkey`` defaults to ``MANAGERD_AUTHKEY`` (or the file named by
    ``MANAGERD_AUTHKEY_FILE``); a trailing newline is dropped, as the daemon
    drops it from its key file. Raises ``ConnectFailed`` when no daemon
    answers within ``connect_timeout_s`` and ``AuthenticationFailed`` when
    the key is refused.

    TLS: pass ``tls`` (an ``ssl.SSLContext``), or ``tls_ca`` (the CA that
    signed the daemon's certificate) and, for mutual TLS, ``tls_cert`` and
    ``tls_key``. The certificate must name the host you connect to (or pass
    ``server_hostname``).
    """
    if tls is None and (tls_ca or tls_cert):
        tls = client_tls_context(tls_ca, tls_cert, tls_key)
    if address is None:
        address = os.environ.get("MANAGERD_ADDRESSES") or os.environ.get("MANAGERD_ADDRESS")
        if not address:
            raise ValueError("no address: pass one, or set MANAGERD_ADDRESSES or MANAGERD_ADDRESS")
    if authkey is None:
        authkey = _authkey_from_env()
    elif isinstance(authkey, str):
        authkey = authkey.encode()
    # The daemon strips its key file's whitespace; so does a key read from a
    # file here (``open(path, "rb").read()`` ends with a newline).
    authkey = authkey.rstrip(b"\r\n")
    return Manager(
        parse_addresses(address),
        authkey,
        connect_timeout_s=connect_timeout_s,
        tls=tls,
        server_hostname=server_hostname,
        client_name=client_name,
    )


def client_tls_context(
    ca: str | os.PathLike[str] | None,
    cert: str | os.PathLike[str] | None = None,
    key: str | os.PathLike[str] | None = None,
) -> ssl.SSLContext:
    """A client context: verify the daemon against ``ca``; present ``cert`` if given."""
    ctx = ssl.create_default_context(cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


_shared: dict[tuple[tuple[str, int], ...], Manager] = {}
_shared_lock = threading.Lock()


def manager_for(
    address: tuple[str, int] | tuple[tuple[str, int], ...], authkey: bytes | None
) -> Manager:
    """A live manager of this process for ``address`` (to rebuild unpickled proxies).

    ``address`` is the proxy's manager's addresses (or, pickled by an older
    client, its one address). Prefers a manager the program opened itself
    that has one of them; else opens a shared one with the authkey that
    came with the proxy (only sent to spawned children).
    """
    addresses = parse_addresses(address)
    for manager in list(_managers):
        if not manager._closed and set(manager.addresses) & set(addresses):
            return manager
    if authkey is None:
        where = ",".join(f"{host}:{port}" for host, port in addresses)
        raise ManagerdError(
            f"a proxy for {where} arrived, but this process has no "
            "connection there: call managerd_client.connect() first"
        )
    with _shared_lock:
        shared = _shared.get(addresses)
        if shared is None or shared._closed:
            shared = _shared[addresses] = Manager(addresses, authkey)
        return shared
