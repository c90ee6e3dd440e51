"""The daemon: a ``BaseManager`` whose server runs on one event loop.

``Managerd`` subclasses ``multiprocessing.managers.BaseManager`` so that
the stock vocabulary holds (``get_server().serve_forever()``, the registry
of type names a stock client registers), but its server is
:class:`EventLoopServer`: one asyncio loop owns every object, session and
connection (DESIGN.md, principle 2), instead of a thread per connection
blocked inside the object.

:func:`run_server` is the one entry point the CLI calls.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import socket
import ssl
import time
from collections.abc import Callable
from functools import partial
from multiprocessing.managers import BaseManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from managerd import __version__
from managerd.metrics import MetricsServer
from managerd.osutil import raise_file_limit, retain_freed_memory
from managerd.safepickle import SafeDecoder
from managerd.service.invoker import Invoker
from managerd.service.ops import ServerOps
from managerd.service.peers import LogBudget, PeerGuard
from managerd.service.requests import RequestStats, Stats
from managerd.service.sessions import SessionTable
from managerd.settings import EventLoop, Settings, read_key_file, resolve_authkey
from managerd.store.interface import Store
from managerd.store.memory.datadir import DataDirInUse, DataDirLock
from managerd.store.memory.deadlock import DeadlockMode, Detector
from managerd.store.memory.journal import CorruptJournal, FsyncMode, Journal
from managerd.store.memory.registry import TYPES
from managerd.store.memory.store import MemoryStore
from managerd.store.memory.tokens import TokenSource, TokenStoreError
from managerd.store.sessions import Session
from managerd.wire.connection import Connection
from managerd.wire.managerd_dialect import Dispatcher
from managerd.wire.stock_dialect import StockAdapter
from managerd_client.errors import ServerShuttingDown
from managerd_client.wire import REFUSED

if TYPE_CHECKING:
    from managerd.store.etcd.store import EtcdStore

log = logging.getLogger("managerd")


class StartupError(Exception):
    """The daemon cannot start as configured; the message says why."""


class ServerCore:
    """Everything the connections share; lives on the loop."""

    def __init__(
        self,
        settings: Settings,
        authkey: bytes,
        loop: asyncio.AbstractEventLoop,
        store: Store | None = None,
    ):
        self.settings = settings
        self.authkey = authkey
        self.loop = loop
        self.server_id = os.urandom(8).hex()
        data_dir = settings.data_dir.expanduser() if settings.data_dir is not None else None
        # The store: every object's state. Fencing tokens increase across
        # restarts (a ceiling kept in the data directory); the wait-for graph's
        # walker is given to every session unless deadlocks are not looked for.
        # ``store`` given: another store (etcd), which keeps its own state.
        detector = Detector(settings.deadlock)
        #: The memory store, unless another was given (its journal, its compactions).
        self.memory: MemoryStore | None = None
        if store is None:
            store = self.memory = MemoryStore(loop, TokenSource(data_dir), detector)
        self.store: Store = store
        self.sessions = SessionTable(
            self.store, detector if settings.deadlock is not DeadlockMode.OFF else None
        )
        self.decoder = SafeDecoder(settings.allowed_classes)
        self.stats = Stats()
        self.connections: set[Connection] = set()
        #: The connections of each session (a resumed session may have two
        #: for a moment: the old half-open one is closed when it is adopted).
        self.session_conns: dict[Session, Connection] = {}
        self.accepting = True
        #: Refusal log lines allowed per window (a flood must not cost a line each).
        self.refusals = LogBudget()
        #: Failed handshakes, penalties and pending handshakes per address.
        self.peers = PeerGuard(
            settings.auth_failure_limit,
            settings.auth_penalty_s,
            settings.max_handshakes_per_peer,
            self.refusals,
            exempt=settings.auth_penalty_exempt,
        )
        self.ops = ServerOps(self.store, self.sessions, self.peers, about(settings), time.time())
        #: Request counts and latency, kept by the invoker for both dialects.
        self.requests = RequestStats()
        self.invoker = Invoker(self.store, self.ops, loop, self.requests)
        self.dispatcher = Dispatcher(self.invoker, self.decoder)
        self.stock = StockAdapter(self.invoker, self.store, self.decoder)
        #: The TLS context connections start TLS with (None: plain TCP).
        self.tls: ssl.SSLContext | None = None

    # -- durability ---------------------------------------------------------------
    def recover(self, journal: Journal) -> None:
        """Rebuild the objects from the data directory, then journal from here on."""
        assert self.memory is not None, "a journal is the memory store's"
        items, info = self.memory.recover(journal, repair=self.settings.recover)
        log.info(
            "recovered %d objects and %d queued items from %s (%d records, snapshot %s, "
            "%d journal files) in %.3fs",
            len(self.memory), items, journal.dir, info.records, info.snapshot or "none",
            info.journals, info.seconds,
        )  # fmt: skip

    async def compact_when_due(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if self.memory is not None:
                self.memory.compact_if_due()

    # -- connections ------------------------------------------------------------
    def admit(self, conn: Connection) -> bool:
        if not self.accepting or len(self.connections) >= self.settings.max_connections:
            self.stats.connections_refused += 1
            why = "shutting down" if not self.accepting else "too many connections"
            reason = f"{why} ({len(self.connections)} open)"
            conn.send_frame(REFUSED + reason.encode())  # before any challenge: says why
            conn.refuse(f"refused: {reason}")
            return False
        self.connections.add(conn)
        return True

    def adopt(self, session: Session, conn: Connection) -> None:
        """``conn`` resumes ``session``; an older connection of it is closed."""
        old = self.session_conns.get(session)
        if old is not None and old is not conn:
            old.session = None  # so that closing it does not end the session
            old.calls.drop_parked(self.store)  # their answers could not reach the client
            old.close()
        self.session_conns[session] = conn

    def forget(self, conn: Connection) -> None:
        self.connections.discard(conn)
        session = conn.session
        if session is None:
            return
        conn.session = None
        if self.session_conns.get(session) is conn:
            del self.session_conns[session]
        self.sessions.end(session)

    # -- leases -------------------------------------------------------------------
    async def expire_sessions(self) -> None:
        ttl_s = self.settings.session_ttl_s
        while True:
            await asyncio.sleep(min(1.0, ttl_s / 4))
            for session in self.sessions.expired(ttl_s):
                log.warning(
                    "session %s (%s) expired: no heartbeat for %.1fs",
                    session.id,
                    session.peer,
                    ttl_s,
                )
                self.stats.sessions_expired += 1
                conn = self.session_conns.pop(session, None)
                self.sessions.end(session)
                if conn is not None:
                    conn.session = None
                    conn.close()

    # -- shutdown -------------------------------------------------------------------
    def stop_accepting(self) -> None:
        self.accepting = False

    async def shutdown(self) -> None:
        """Answer every waiter with ``ServerShuttingDown`` and close clients."""
        self.store.shutdown()
        # The replies are written by the futures' callbacks, which run on
        # the next loop iteration; a transport flushes them before closing.
        await asyncio.sleep(0)
        for conn in list(self.connections):
            conn.close()


class EventLoopServer:
    """The server behind :class:`Managerd`: listens and runs the loop."""

    def __init__(
        self, settings: Settings, authkey: bytes | None, data_dir_lock: DataDirLock | None = None
    ) -> None:
        self.settings = settings
        #: None: resolved (and generated if none is configured) once the ports
        #: are bound and the data directory is locked.
        self.authkey = authkey
        #: The data directory's lock, when the caller took it; otherwise
        #: :meth:`serve` takes it once the ports are bound.
        self.data_dir_lock = data_dir_lock
        self.address: tuple[str, int] | None = None
        self.core: ServerCore | None = None
        token_file = settings.metrics_token_file
        #: What ``/metrics`` requires as a bearer token (read before listening).
        self.metrics_token = (
            read_key_file(token_file.expanduser(), "metrics token") if token_file else None
        )
        self._stop: asyncio.Event | None = None

    def serve_forever(self, ready: Callable[[tuple[str, int]], None] | None = None) -> None:
        """Serve until SIGTERM/SIGINT (or :meth:`stop`)."""
        given_lock = self.data_dir_lock
        try:
            factory = loop_factory(self.settings.event_loop, tls=self.settings.tls_cert is not None)
            if factory is None:
                asyncio.run(self.serve(ready))
            else:
                with asyncio.Runner(loop_factory=factory) as runner:
                    runner.run(self.serve(ready))
        finally:
            if given_lock is None and self.data_dir_lock is not None:
                self.data_dir_lock.release()  # serve() took it
                self.data_dir_lock = None

    async def serve(self, ready: Callable[[tuple[str, int]], None] | None = None) -> None:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        # In this order, so that a start that fails leaves nothing behind: the
        # ports; the data directory's lock (a second daemon on it must leave it
        # as it found it); the authkey (generated if none is configured); then
        # the token ceiling and the journal in the directory.
        sock = _listen(self.settings.host, self.settings.port)
        metrics = None
        try:
            if self.settings.metrics_port:
                metrics_host = self.settings.metrics_host or self.settings.host
                metrics = MetricsServer(
                    metrics_host, self.settings.metrics_port, self.metrics_token
                )
            if self.data_dir_lock is None:
                self.data_dir_lock = lock_data_dir(self.settings)
            if self.authkey is None:
                self.authkey, source = resolve_authkey(self.settings)
                log.info("authkey from %s", source)
        except BaseException:
            sock.close()
            if metrics is not None:
                metrics.close()
            raise
        etcd = await _etcd_store(self.settings)
        core = self.core = ServerCore(self.settings, self.authkey, loop, etcd)
        core.tls = tls_context(self.settings)
        journal = _journal(self.settings) if etcd is None else None
        compactor = None
        if journal is not None:
            core.recover(journal)
            compactor = loop.create_task(core.compact_when_due())
        loop.set_exception_handler(partial(_one_line_errors, core))
        server = await loop.create_server(lambda: Connection(core), sock=sock, backlog=1024)
        self.address = sock.getsockname()[:2]
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self._stop.set)
            except (NotImplementedError, RuntimeError):  # not the main thread
                pass
        expirer = loop.create_task(core.expire_sessions())
        if metrics is not None:
            metrics.start(core)
        log.info(
            "managerd serving on %s:%d (%d types; session ttl %.1fs)",
            self.address[0],
            self.address[1],
            len(TYPES),
            self.settings.session_ttl_s,
        )
        if ready is not None:
            ready(self.address)
        try:
            await self._stop.wait()
        finally:
            log.info("shutting down")
            core.stop_accepting()
            server.close()
            await core.shutdown()
            expirer.cancel()
            if compactor is not None:
                compactor.cancel()
            if journal is not None:
                await journal.close()
            if etcd is not None:
                await etcd.close()
                await etcd.client.close()
            try:
                await asyncio.wait_for(server.wait_closed(), self.settings.shutdown_timeout_s)
            except (TimeoutError, asyncio.CancelledError):
                pass
            if metrics is not None:
                metrics.stop()
            log.info("stopped")

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()


def about(settings: Settings) -> dict[str, Any]:
    """The version and the settings an operator looks at first (status, the page)."""
    members = settings.etcd_endpoints
    if members is not None:
        store = f"etcd {','.join(members)} prefix {settings.store_prefix}"
    elif settings.data_dir is None or settings.fsync is FsyncMode.NEVER:
        store = "memory"
    else:
        store = f"journal in {settings.data_dir}"
    if settings.tls_cert is None:
        tls = "off"
    else:
        tls = "mutual" if settings.tls_require_client_cert else "on"
    return {
        "version": __version__,
        "settings": {
            "store": store,
            "fsync": settings.fsync.value if store.startswith("journal") else "-",
            "tls": tls,
            "session_ttl_s": settings.session_ttl_s,
            "deadlock": settings.deadlock.value,
        },
    }


def loop_factory(
    choice: EventLoop, tls: bool = False
) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop to serve on: uvloop when asked (or ``auto`` and installed).

    uvloop is optional (``pip install uvloop``); see BENCHMARKS.md for what
    it changes here. With TLS the daemon serves on asyncio's loop: each
    connection is handed to ``start_tls`` from ``connection_made`` (so that a
    failed handshake is reported with its peer), and uvloop starts reading
    the connection before that can happen.
    """
    if choice is EventLoop.ASYNCIO:
        return None
    if tls:
        if choice is EventLoop.UVLOOP:
            log.warning("event_loop=uvloop is not used with TLS; serving on asyncio's loop")
        return None
    try:
        import uvloop
    except ImportError:
        if choice is EventLoop.UVLOOP:
            raise StartupError("event_loop=uvloop, but uvloop is not installed") from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def lock_data_dir(settings: Settings) -> DataDirLock | None:
    """The data directory's exclusive lock (None without one); taken before anything else."""
    if settings.data_dir is None:
        return None
    directory = settings.data_dir.expanduser()
    try:
        return DataDirLock(directory)
    except DataDirInUse as exc:
        raise StartupError(str(exc)) from None
    except OSError as exc:
        raise StartupError(
            f"data directory: {exc.strerror or exc}: {exc.filename or directory}"
        ) from None


async def _etcd_store(settings: Settings) -> EtcdStore | None:
    """The etcd store when ``settings.store`` names a cluster (this daemon is a gateway)."""
    endpoints = settings.etcd_endpoints
    if endpoints is None:
        return None
    from managerd.store.etcd.client import EtcdClient, tls_credentials  # the 'etcd' extra
    from managerd.store.etcd.store import EtcdStore

    credentials = None
    if settings.store_tls:

        def read(path: Path | None) -> bytes | None:
            return None if path is None else path.expanduser().read_bytes()

        try:
            ca, cert, key = (
                read(p)
                for p in (settings.store_tls_ca, settings.store_tls_cert, settings.store_tls_key)
            )
        except OSError as exc:
            raise StartupError(f"etcd TLS: {exc.strerror or exc}: {exc.filename}") from None
        credentials = tls_credentials(ca, cert, key)
    client = EtcdClient(endpoints, credentials=credentials)
    ttl_s = max(1, math.ceil(settings.session_ttl_s))  # a lease lasts whole seconds
    try:
        store = await EtcdStore.open(
            client,
            root=settings.store_prefix.encode(),
            session_ttl_s=ttl_s,
            deadlock=settings.deadlock,
        )
    except BaseException:
        await client.close()
        raise
    log.info(
        "store: etcd at %s, prefix %s%s",
        ",".join(endpoints),
        settings.store_prefix,
        ", TLS" if credentials is not None else "",
    )
    return store


def _journal(settings: Settings) -> Journal | None:
    """The journal of the data directory, unless state is memory only."""
    if settings.data_dir is None or settings.fsync is FsyncMode.NEVER:
        return None
    return Journal(
        settings.data_dir.expanduser(),
        settings.fsync,
        settings.fsync_interval_s,
        compact_bytes=settings.journal_compact_bytes,
        allowed_classes=settings.allowed_classes,
    )


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The daemon's TLS context (TLS 1.2+), or None to serve plain TCP."""
    if settings.tls_cert is None:
        if settings.tls_key is not None or settings.tls_require_client_cert:
            raise ValueError("TLS settings need MANAGERD_TLS_CERT (the certificate)")
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(settings.tls_cert, settings.tls_key)
        if settings.tls_ca is not None:
            ctx.load_verify_locations(cafile=settings.tls_ca)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load TLS files: {exc}") from exc
    if settings.tls_require_client_cert:
        if settings.tls_ca is None:
            raise ValueError("MANAGERD_TLS_REQUIRE_CLIENT_CERT needs MANAGERD_TLS_CA")
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _one_line_errors(
    core: ServerCore, loop: asyncio.AbstractEventLoop, context: dict[str, Any]
) -> None:
    """A peer's TLS or connection error is one log line, not a traceback."""
    exc = context.get("exception")
    if isinstance(exc, (ssl.SSLError, ConnectionError, TimeoutError)):
        transport = context.get("transport")
        peer = transport.get_extra_info("peername") if transport is not None else None
        where = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "a client"
        log.warning("connection from %s: %s", where, exc)
        return
    loop.default_exception_handler(context)


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket; ``OSError`` with a plain message if the port is taken."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, socktype, proto, _, addr = infos[0]
    sock = socket.socket(family, socktype, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(1024)
    sock.setblocking(False)
    return sock


class Managerd(BaseManager):
    """The managerd daemon as a ``BaseManager``.

    ``Managerd(settings).get_server().serve_forever()`` serves every type in
    ``TYPES`` by name. ``start()`` (a server in a child process) is not
    offered: the daemon is a service, started by ``managerd serve``.
    """

    # Derived from the one type table, not filled by register() at import.
    _registry: dict[str, Any] = {  # noqa: RUF012 - BaseManager's own attribute
        typeid: (None, tuple(sorted(cls.methods)), None, None) for typeid, cls in TYPES.items()
    }

    def __init__(
        self,
        settings: Settings,
        authkey: bytes | None = None,
        data_dir_lock: DataDirLock | None = None,
    ) -> None:
        if authkey is None:
            authkey, _ = resolve_authkey(settings)
        super().__init__(address=(settings.host, settings.port), authkey=authkey)
        self.settings = settings
        self.authkey = authkey
        self.data_dir_lock = data_dir_lock

    def get_server(self) -> EventLoopServer:  # type: ignore[override]
        return EventLoopServer(self.settings, self.authkey, self.data_dir_lock)

    def start(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("run the daemon with `managerd serve` (or get_server())")


def run_server(settings: Settings) -> None:
    """Serve until stopped. The CLI's one call.

    The daemon binds its ports, then locks the data directory, then reads
    (or generates) the authkey: a start that cannot listen, or a second
    daemon on a directory in use, leaves the directory exactly as it found
    it (no key written, no journal compacted, no directory made).
    """
    raise_file_limit(settings.max_connections)
    retain_freed_memory(settings.malloc_retain_bytes)
    try:
        tls = tls_context(settings)
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    if tls is not None:
        mutual = " with client certificates required" if settings.tls_require_client_cert else ""
        log.info("TLS on (TLS 1.2+%s)", mutual)
    if settings.host not in ("127.0.0.1", "localhost", "::1") and settings.tls_cert is None:
        log.warning(
            "serving on %s without TLS: traffic (and stock clients' payloads) travel in clear",
            settings.host,
        )
    try:
        EventLoopServer(settings, None).serve_forever()
    except (CorruptJournal, TokenStoreError) as exc:
        raise StartupError(str(exc)) from None
    except OSError as exc:
        if settings.data_dir is not None and exc.filename is not None:
            raise StartupError(f"data directory: {exc.strerror}: {exc.filename}") from None
        raise


__all__ = ["EventLoopServer", "Managerd", "ServerShuttingDown", "StartupError", "run_server"]
