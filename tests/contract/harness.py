"""The one module that knows how to drive a store in process.

The contract suite (``tests/contract/``) specifies what every primitive
means, whatever keeps its state. Its tests talk only to a
:class:`StoreHarness`: open an object by name, call one of its methods as a
given client session and thread, end a session, restart the store on the
same data directory. Everything store-specific is here, so a second store
(etcd) is one more entry in ``STORE_KINDS`` and one more branch of
:meth:`StoreHarness._open_store`/:meth:`StoreHarness._close_store`, and
nothing else changes.

The stores are driven through the ``Store`` interface
(``managerd/store/interface.py``): get-or-create, get, delete, listing,
``release`` of a session, ``shutdown``, ``stats_of``/``stats``,
``snapshot``, ``would_hand_out``, ``abandon``/``cancel``/``undo`` of a
call, ``deadlocks``; an object's method is
called as the invoker calls it (``spec.fn(handle, call, *args)``), with no
socket and no subprocess: a call that must wait returns a future, which
the harness settles by running the event loop it owns. Only making a store
and closing it (its journal, on its data directory) is per kind: today the
in-memory store (``MemoryStore``), wired as ``ServerCore`` wires it.

What a client library does is done here too, so that tests read like the
standard library they are compared with: payload arguments are pickled and
payload results unpickled as each method's ``MethodSpec`` says, and a
call's arguments reach the store pickled and unpickled as one request, as
from the wire (never the caller's objects). And the
invoker's rule of whose error it is applies (``service/invoker.py``): an
exception that is not one a method raises on purpose is a daemon bug, and
is raised as :class:`DaemonBug`, never mistaken for the caller's error that
a test expects.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import inspect
import os
import pickle
import secrets
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from managerd.service.invoker import CALLER_ERRORS
from managerd.store.api import Call, Conv, MethodSpec, Refusal
from managerd.store.etcd.client import EtcdClient
from managerd.store.etcd.handles import EtcdHandle
from managerd.store.etcd.store import EtcdStore
from managerd.store.interface import Handle, Store
from managerd.store.memory.deadlock import DeadlockMode, Detector
from managerd.store.memory.journal import FsyncMode, Journal
from managerd.store.memory.store import MemoryStore
from managerd.store.memory.tokens import TokenSource
from managerd.store.sessions import Session, SessionKind
from managerd.store.stats import ObjectStats, StoreStats

#: The stores the suite runs over (the ``store`` fixture's parameters).
STORE_KINDS: Final = ("memory", "etcd")
#: Run every test on etcd too; without it, the etcd kind runs all but the slow and the
#: not-yet-matching modules and tests of ``ETCD_OPT_IN`` (conftest deselects them).
ETCD_WHOLE: Final = os.environ.get("MANAGERD_CONTRACT_ETCD", "") not in ("", "0")
#: Deselected on etcd unless ``ETCD_WHOLE`` (test ids containing one of these): none
#: now. Every model machine of ``test_stateful.py`` runs on etcd by default (25 to
#: 50 s on a shared 2-core machine); the hostile-arguments sweep makes a quarter of
#: its calls on etcd unless ``ETCD_WHOLE`` (the whole of it: minutes).
ETCD_OPT_IN: Final[tuple[str, ...]] = ()

#: How long a call the test expects to finish may stay parked before the
#: test fails: a safety net against a hang, never a measure of speed.
SETTLE_LIMIT_S: Final = 10.0

#: How often the harness looks whether the etcd store's calls are answered or parked.
_POLL_S: Final = 0.002

#: Creation arguments that are contents, given here as plain values.
_CONTENTS_TYPES: Final = {"dict": Conv.PAIRS, "Namespace": Conv.PAIRS, "list": Conv.PAYLOADS}


_cluster: list[str] = []


def _etcd_cluster() -> list[str]:
    """The endpoints of one 3-node etcd cluster for the whole run, started on first use."""
    if not _cluster:
        from etcd_support import running_cluster

        stack = contextlib.ExitStack()
        cluster = stack.enter_context(running_cluster(Path(tempfile.mkdtemp(prefix="contract-"))))
        atexit.register(stack.close)
        _cluster.extend(cluster.endpoints)
    return _cluster


class DaemonBug(AssertionError):
    """A call raised what no method raises on purpose: the daemon would log it as a bug."""


@dataclass(frozen=True)
class Obj:
    """A named object as a test holds it."""

    typeid: str
    name: str


class Client:
    """One client of the store: a session, renewed when the store restarts."""

    def __init__(self, label: str, session: Session) -> None:
        self.label = label
        self.session = session

    def __repr__(self) -> str:
        return f"Client({self.label})"


@dataclass(frozen=True)
class _Made:
    """A call as the store was given it (for giving it up or undoing it)."""

    handle: Handle
    method: str
    call: Call
    args: tuple[Any, ...]


class Pending:
    """A call that may still be waiting (a parked waiter)."""

    def __init__(
        self, harness: StoreHarness, future: asyncio.Future[Any], decode: Any, made: _Made
    ) -> None:
        self._harness = harness
        self.future = future
        self._decode = decode
        self.made = made

    def done(self) -> bool:
        """Whether it completed (with a value or an error), once it has either completed
        or parked (see :meth:`StoreHarness.answered_or_parked`)."""
        self._harness.answered_or_parked(self)
        return self.future.done()

    def cancelled(self) -> bool:
        """Dropped without an answer (its session ended)."""
        return self.done() and self.future.cancelled()

    def result(self) -> Any:
        """Its value (or its error, raised), waiting for it if needed."""
        return self._harness.wait(self)


def _encode(conv: Conv, value: Any, first: Any) -> Any:
    if conv is Conv.ITEM_OR_ITEMS:
        conv = Conv.PAYLOADS if isinstance(first, slice) else Conv.PAYLOAD
    if conv is Conv.PAYLOAD:
        return pickle.dumps(value)
    if conv is Conv.PAYLOADS:
        return [pickle.dumps(v) for v in value]
    if conv is Conv.PAIRS:
        pairs = value.items() if isinstance(value, Mapping) else value
        return [(k, pickle.dumps(v)) for k, v in pairs]
    return value


def _as_sent(value: Any) -> Any:
    """``value`` as a store receives it in one request: unpickled afresh from the wire.

    Never the caller's objects, so that nothing is shared between two
    requests (a NaN key is a new NaN each time, and finds nothing in a
    dict), while objects shared within one request stay shared, as
    pickle's memo keeps them.
    """
    return pickle.loads(pickle.dumps(value))


def _loads(value: Any) -> Any:
    return pickle.loads(value) if isinstance(value, bytes) else value


def _decode(conv: Conv, value: Any) -> Any:
    if conv is Conv.PAYLOAD:
        return _loads(value)
    if conv is Conv.ITEM_OR_ITEMS:
        return [_loads(v) for v in value] if isinstance(value, list) else _loads(value)
    if conv is Conv.PAYLOADS:
        return [_loads(v) for v in value]
    if conv is Conv.PAIRS:
        return [(k, _loads(v)) for k, v in value]
    if conv is Conv.PAIR:
        return (value[0], _loads(value[1]))
    if conv is Conv.MAPPING:
        return {k: _loads(v) for k, v in value.items()}
    return value


def _decode_reserved(value: Any) -> Any:
    """``Queue.reserve``: ``(delivery id, payload, deliveries)``, the payload unpickled."""
    did, payload, deliveries = value
    return (did, pickle.loads(payload), deliveries)


class StoreHarness:
    """One store, in process, on a data directory (see the module docstring)."""

    def __init__(self, kind: str, data_dir: Path) -> None:
        if kind not in STORE_KINDS:
            raise ValueError(f"unknown store kind {kind!r}")
        self.kind = kind
        self.data_dir = data_dir
        data_dir.mkdir(parents=True, exist_ok=True)  # as the daemon's directory lock does
        self.loop = asyncio.new_event_loop()
        self._clients: list[Client] = []
        #: Every call that parked (see :meth:`close`).
        self._parked: list[asyncio.Future[Any]] = []
        #: What each parked future is a call of (named when one neither answers nor parks).
        self._made: dict[asyncio.Future[Any], str] = {}
        self._journal: Journal | None = None
        #: The wait-for graph's walker, given to every session (as the daemon's default).
        self._detector = Detector(DeadlockMode.REPORT)
        #: The etcd store's keys are under a prefix of their own (one cluster serves all).
        self._root = b"/c" + secrets.token_hex(6).encode() + b"/"
        self._etcd: EtcdStore | None = None
        self._memory: MemoryStore | None = None
        self.store: Store = self._open_store()
        #: The client a call is made as unless it names another.
        self.client = self.new_client("main")

    # -- the store's life (what differs per kind) ----------------------------------------
    def _open_store(self) -> Store:
        """What ``ServerCore`` and ``ServerCore.recover`` do, minus the network."""
        if self.kind == "etcd":
            endpoints = _etcd_cluster()

            async def open_etcd() -> EtcdStore:
                return await EtcdStore.open(EtcdClient(endpoints), root=self._root)

            self._etcd = self.loop.run_until_complete(open_etcd())
            return self._etcd
        store = MemoryStore(self.loop, TokenSource(self.data_dir), self._detector)
        journal = Journal(self.data_dir, FsyncMode.INTERVAL, 1.0)
        store.recover(journal, repair=False)
        self._journal = journal
        self._memory = store
        return store

    def _close_store(self) -> None:
        """A clean stop: waiters fail with ``ServerShuttingDown``, the journal is written."""
        self.store.shutdown()
        self.settle()
        journal, self._journal = self._journal, None
        if journal is not None:
            self.loop.run_until_complete(journal.close())
        for obj in self._memory or ():
            obj.journal = None  # nothing the old objects do now is the new store's
        for client in self._clients:
            self.store.release(client.session)
        etcd, self._etcd = self._etcd, None
        if etcd is not None:
            self.loop.run_until_complete(etcd.close())
            self.loop.run_until_complete(etcd.client.close())

    def restart(self) -> None:
        """Stop the store and open it again on the same data directory.

        Every client gets a new session (a client reconnects after a
        restart): what the old ones held or waited for is gone with them.
        A gateway of the etcd store that stops leaves its sessions to resume
        through another within their TTL; these clients do not come back, so
        their sessions end here, as the embedded daemon's end with it.
        """
        if self._memory is None:
            for client in self._clients:
                self.store.release(client.session)
        self._close_store()
        self.store = self._open_store()
        for client in self._clients:
            client.session = self._session(client.label)

    def compact(self) -> None:
        """Rewrite what the store keeps on disk as one snapshot now (a journal's compaction;
        a store without one has nothing to do: etcd compacts its own history)."""
        if self._memory is not None:
            self._memory.compact()

    def close(self) -> None:
        try:
            self._close_store()
            # Calls the test left waiting were answered ServerShuttingDown: looked at
            # here, so that the loop does not log them as never retrieved.
            for future in self._parked:
                if future.done() and not future.cancelled():
                    future.exception()
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    # -- clients ----------------------------------------------------------------------
    def _session(self, label: str) -> Session:
        session = Session(SessionKind.MANAGERD, f"contract-{label}", {"host": "test", "pid": 0})
        session.deadlocks = self._detector
        return session

    def new_client(self, label: str | None = None) -> Client:
        label = label or f"client-{len(self._clients)}"
        client = Client(label, self._session(label))
        self._clients.append(client)
        return client

    def end_session(self, client: Client, *, wait: bool = False) -> None:
        """The client's session ends (its process died): waits dropped, holdings given back.

        The client gets a fresh session for any later call. ``wait``: return once the
        end is done (the etcd store's is round trips; without it, the next call on
        an object the session used waits for it, and a parked call it hands
        something to is answered a little later, not by the time this returns).
        """
        ended = self.store.release(client.session)
        if wait and ended is not None:
            self.loop.run_until_complete(asyncio.wait([ended], timeout=SETTLE_LIMIT_S))
            assert ended.done(), f"a session's end is still under way after {SETTLE_LIMIT_S} s"
        client.session = self._session(client.label)

    def resume(self, token: str) -> Session | None:
        """``Store.resume``: the session another daemon of the store served with this
        resume token (``client.session.resume_token``), taken over; None if none."""
        return self.loop.run_until_complete(self.store.resume(token))

    # -- objects ----------------------------------------------------------------------
    def open(self, typeid: str, name: str, **args: Any) -> Obj:
        """Get or create ``name`` as a ``typeid`` with creation ``args`` (plain values)."""
        conv = _CONTENTS_TYPES.get(typeid)
        if conv is not None and "contents" in args:
            args["contents"] = _encode(conv, args["contents"], None)
        self.store.get_or_create(typeid, name, _as_sent(args))
        return Obj(typeid, name)

    def methods(self, typeid: str) -> list[str]:
        """The names of the methods a client may call on a ``typeid``."""
        return list(self.store.types[typeid].methods)

    def delete(self, name: str) -> bool:
        return self.store.delete(name)

    def objects(self) -> list[tuple[str, str]]:
        """``(name, typeid)`` of every object, sorted."""
        return self.store.listing()

    def waiters(self, obj: Obj) -> int:
        """Calls parked on ``obj`` (its stats; 0 for an object that never parks one), once
        every call made to the etcd store is answered or parked (``settle``; the
        memory store's are, within the call)."""
        if self._etcd is not None:
            self.settle()
        return int(getattr(self.store.stats_of(self._object(obj)), "waiters", 0))

    def stats(self, obj: Obj) -> ObjectStats:
        """The store's snapshot of ``obj`` (what metrics, status and the page read)."""
        self._refresh()
        return self.store.stats_of(self._object(obj))

    def all_stats(self) -> StoreStats:
        self._refresh()
        return self.store.stats()

    def _refresh(self) -> None:
        """The etcd store shows the cluster's figures as of its last refresh: one now,
        once every call made is answered or parked (as a status request a moment later)."""
        if self._etcd is not None:
            self.settle()
            self.loop.run_until_complete(self._etcd.refresh_stats())

    def snapshot(self, obj: Obj) -> Any:
        """``obj``'s whole value (a stock client's ``_getvalue()``), payloads unpickled."""
        snap = self.store.snapshot(self._object(obj))
        if isinstance(snap, asyncio.Future):  # read first (the etcd store)
            snap = self.loop.run_until_complete(snap)
        return _decode(snap.conv, snap.value)

    def would_hand_out(self, obj: Obj, method: str, *args: Any, **kwargs: Any) -> Any:
        """What the removing call ``method(*args)`` would hand out, unpickled (None: nothing)."""
        handle = self._object(obj)
        call = Call(self.client.session, 0, self.loop)
        return _loads(self.store.would_hand_out(handle, method, call, args, kwargs))

    def deadlocks(self) -> list[dict[str, Any]]:
        """The cycles of waiting clients that stand now."""
        self._refresh()
        return self.store.deadlocks()

    def _object(self, obj: Obj) -> Handle:
        return self.store.get(obj.name, obj.typeid)

    # -- calls --------------------------------------------------------------------
    def start(
        self,
        obj: Obj,
        method: str,
        *args: Any,
        client: Client | None = None,
        thread: int = 0,
        **kwargs: Any,
    ) -> Pending:
        """Call ``method``; a call that must wait stays pending (see :meth:`wait`).

        An error raised at once is raised here.
        """
        target = self._object(obj)
        spec = target.methods.get(method)
        if spec is None:
            raise AttributeError(f"{obj.typeid} has no method {method!r}")
        args, kwargs = self._encode_args(spec, args, kwargs)
        call = Call((client or self.client).session, thread, self.loop)
        made = _Made(target, method, call, args)
        try:
            result = spec.fn(target, call, *args, **kwargs)
        except Exception as exc:
            self._check_caller_error(target, spec, call, args, kwargs, exc)
            raise
        decode = _decode_reserved if method == "reserve" else lambda v: _decode(spec.result, v)
        if isinstance(result, asyncio.Future):
            self._parked.append(result)
            self._made[result] = f"{obj.typeid}.{method}{tuple(args)!r:.200}"
            return Pending(self, result, decode, made)
        done: asyncio.Future[Any] = self.loop.create_future()
        done.set_result(result)
        return Pending(self, done, decode, made)

    def call(
        self,
        obj: Obj,
        method: str,
        *args: Any,
        client: Client | None = None,
        thread: int = 0,
        **kwargs: Any,
    ) -> Any:
        """Call ``method`` and return its value, waiting (the loop runs) if it parks."""
        return self.wait(self.start(obj, method, *args, client=client, thread=thread, **kwargs))

    def wait(self, pending: Pending, limit_s: float = SETTLE_LIMIT_S) -> Any:
        """Run the loop until ``pending`` completes; its value, or its error raised."""
        future = pending.future
        if not future.done():
            self.loop.run_until_complete(asyncio.wait([future], timeout=limit_s))
        if not future.done():
            raise AssertionError(f"the call is still waiting after {limit_s} s")
        if future.cancelled():
            raise AssertionError("the call was dropped without an answer (its session ended)")
        exc = future.exception()
        if exc is not None:
            if not isinstance(exc, CALLER_ERRORS):
                raise DaemonBug(f"a parked call failed with {exc!r}") from exc
            raise exc
        return pending._decode(future.result())

    # -- interrupted calls (README "Interrupts") ------------------------------------------
    def abandon(self, pending: Pending, *, stock: bool = False) -> None:
        """The client was interrupted in the parked call: it gives it up."""
        made = pending.made
        self.store.abandon(made.handle, made.method, made.call.session, pending.future, stock=stock)

    def cancel(self, pending: Pending) -> None:
        """The parked call's answer could reach nobody: drop it as a session's end would."""
        self.store.cancel(pending.made.call.session, pending.future)

    def undo(self, pending: Pending) -> None:
        """The client was interrupted after the answer came: what it handed over goes back."""
        made = pending.made
        assert made.method in made.handle.undo_methods, f"{made.method} cannot be undone"
        result = pending.future.result()
        self.store.undo(made.handle, made.method, made.call, made.args, result)

    def settle(self) -> None:
        """Let everything that is due now run (callbacks, not timers in the future).

        For the etcd store, whose every answer is a round trip: until each call
        made is answered or parked (see :meth:`answered_or_parked`).
        """
        for _ in range(3):
            self.loop.run_until_complete(asyncio.sleep(0))
        if self._etcd is not None:
            self._run_until(lambda: all(self._settled(f) for f in self._parked))
            if not all(f.done() for f in self._parked):
                self._confirm_parked()
                self._run_until(lambda: all(self._settled(f) for f in self._parked))

    def _confirm_parked(self) -> None:
        """A call of the etcd store that waits may be about to wake: the change that wakes
        it was answered, its watch event not yet seen. A round trip to etcd
        (the event was sent before its answer), then the loop's ready callbacks; three
        times, as a loaded member may send the event a little after."""
        etcd = self._etcd
        if etcd is not None:
            for _ in range(3):
                self.loop.run_until_complete(etcd.client.get(self._root + b"settle"))
                for _ in range(5):
                    self.loop.run_until_complete(asyncio.sleep(0))

    def answered_or_parked(self, pending: Pending, limit_s: float = SETTLE_LIMIT_S) -> None:
        """Run the loop until ``pending`` is answered, or parked: waiting for a change
        of state (the memory store decides that within the call; the etcd store
        once the call watches etcd). A safety net of ``limit_s`` against a hang."""
        self.settle()
        if self._etcd is not None:
            self._run_until(lambda: self._settled(pending.future), limit_s)
            if not pending.future.done():
                self._confirm_parked()
                self._run_until(lambda: self._settled(pending.future), limit_s)

    def _settled(self, future: asyncio.Future[Any]) -> bool:
        if future.done():
            return True
        return any(isinstance(h, EtcdHandle) and h.waits_now(future) for h in self._etcd_handles())

    def _etcd_handles(self) -> list[EtcdHandle]:
        etcd = self._etcd
        return [] if etcd is None else list(etcd._handles.values())

    def _run_until(self, ready: Any, limit_s: float = SETTLE_LIMIT_S) -> None:
        async def until() -> None:
            while not ready():
                await asyncio.sleep(_POLL_S)

        try:
            self.loop.run_until_complete(asyncio.wait_for(until(), limit_s))
        except TimeoutError:
            stuck = [self._made.get(f, "?") for f in self._parked if not self._settled(f)]
            raise AssertionError(
                f"a call neither answered nor parked after {limit_s} s: {stuck[:5]}"
            ) from None

    def sleep(self, seconds: float) -> None:
        """Let ``seconds`` of the store's time pass (timers due by then fire)."""
        self.loop.run_until_complete(asyncio.sleep(seconds))

    # -- what a client library and the invoker do ----------------------------------
    @staticmethod
    def _encode_args(
        spec: MethodSpec, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The arguments as the store gets them from the wire (see :func:`_as_sent`)."""
        first = args[0] if args else None

        def encode(name: str, value: Any) -> Any:
            conv = spec.args.get(name)
            return value if conv is None else _encode(conv, value, first)

        named = zip(spec.params, args, strict=False)
        out = tuple(encode(name, value) for name, value in named) + args[len(spec.params) :]
        sent: tuple[tuple[Any, ...], dict[str, Any]]
        sent = _as_sent((out, {k: encode(k, v) for k, v in kwargs.items()}))
        return sent

    @staticmethod
    def _check_caller_error(
        target: Handle,
        spec: MethodSpec,
        call: Call,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        exc: Exception,
    ) -> None:
        """Raise :class:`DaemonBug` unless the invoker would answer ``exc`` as the caller's."""
        if isinstance(exc, TypeError) and not isinstance(exc, Refusal):
            if target.builtin_type_errors:
                return
            try:
                inspect.signature(spec.fn).bind(target, call, *args, **kwargs)
            except TypeError:
                return  # the arguments do not fit the method: the caller's
            raise DaemonBug(f"{target.typeid}.{spec.name} raised {exc!r}") from exc
        if not isinstance(exc, CALLER_ERRORS):
            raise DaemonBug(f"{target.typeid}.{spec.name} raised {exc!r}") from exc
