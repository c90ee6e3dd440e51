"""The etcd store: the ``Store`` of ``store/interface.py`` on an etcd cluster.

Any number of gateways (managerd processes) open an ``EtcdStore`` on the
same cluster and prefix, and serve the same objects: every object's state
is in etcd (the primitives of ``queues.py``, ``locks.py``, ``sync.py``,
``values.py``); a gateway keeps only what is its own (its sessions' leases,
its parked calls, the reservations its clients used through it; a session
and its reservations are found from any gateway).

**Names** ``/m/o/<name>``: the type and creation arguments (JSON), created
with the object's initial state in one Txn (``create_revision == 0``). The
interface's ``get_or_create`` answers at once, so each gateway keeps a
mirror of these keys, loaded when it opens and kept by a watch:
ArgumentConflict and ObjectTypeConflict are raised at once for a name the
mirror knows. A new name's creating Txn runs in the background (its
outcome is the handle's ``ready``, which every call of it awaits); the
daemon answers the creation itself only once it is done (``created``): a
client told that an object exists is never told so by a gateway killed
before the name reached etcd. **Differs from the memory store**: a name
created at the same moment through another gateway with another type or
arguments is found when the creating Txn fails; the creation and the
handle's calls then answer that conflict (the memory store raises it from
get_or_create), and the mirror has what etcd has. A creation etcd did not
answer is StoreUnavailable (it may have been made), and the next
get-or-create of the name tries again.

**Sessions**: a managerd session gets an etcd lease (``EtcdSession``,
TTL ``session_ttl_s``) at its first call, with the hash of its resume
token on it; locks and permits are keys on it. ``release`` drops the
session's parked calls (a blocked acquire withdraws its key; a call on its
way is dropped once it parks), then revokes the lease (its holdings go to
the next live waiter), then returns its reservations to their queues; later
calls on the objects it used wait for all that, as if it had happened at
once. ``resume`` is another gateway's session taken over by this one
(its client reconnected here with its resume token while the lease
lived): the lease is renewed from here, and what the session holds stays
held. A gateway watches the token keys: a session of its own taken over
elsewhere is let go (``_let_go``: its parked calls dropped, leaving their
keys to the calls asked again there, its calls refused, its lease no
longer renewed from here, never revoked). A session whose lease is lost
(``EtcdSession.lost``: expired, or not renewed for a TTL) is ended as an
expired one: its calls raise ``SessionExpired`` (``LockLost`` for
locks), the daemon closes its connection, and the client's next call
starts a new session.
Expired reservations, and
those of sessions that ended elsewhere (a gateway that died), are returned
by **one elected gateway** (``election.py``: a key under ``/m/g/requeue/``
on a lease of the gateway's own; lowest create_revision leads; another
takes over within the lease's TTL, ``session_ttl_s``, when it dies). It
runs ``requeue_expired`` every second over every queue of the names mirror,
not only those it has opened (safe if two ever do at once: each move
compares the reservation's revision).

**Unconfirmed gets** (``queues.py``): ``unconfirmed`` keeps, per client
thread, the records of its last get's items until its next call (``run``)
confirms it read that answer; ``resume`` reads a session's records, so a
get the client asks again is handed them (``QueueHandle._get``); ``_end``
drops a session's records before revoking its lease; the elected requeuer
returns the records of sessions whose lease ended unended
(``_return_orphans``). **Stopping** (``shutdown``/``close``): managerd
sessions' calls are dropped unanswered and their leases left to expire or be
taken over, never revoked: their clients resume through another gateway.
Undos under way (a get's give-back, a lock's release for a caller that
left...) first get up to ``CLOSE_UNDOS_S`` to be answered by etcd: the
gateway that takes a session over knows nothing of them.

**Calls** return a Task (every answer is a round trip to etcd), which
``run`` files under its session: ``abandon`` and ``cancel`` cancel it.

**Stats** are the cluster's, for every object (``stats.py``): read from
etcd by a periodic refresh (its staleness bound there), plus this
gateway's parked calls counted as they are now. Each session's public
description is put on its lease (``/m/who/<lease>``) so that any gateway
can name a holder or a waiter. **Deadlocks** are looked for across
gateways (``deadlocks.py``) when a call starts waiting on a lock or a
semaphore, as the ``deadlock`` setting says.

**Snapshot** (a stock client's ``_getvalue()``, ``managerd get``) is read
from etcd when asked, so it is answered as a future (the interface allows
it): a queue's waiting items in order, a dict's entries, a Value, and a
list's, Namespace's or Array's whole value. **No** ``would_hand_out`` (it
is synchronous): a stock client's decode check of what ``pop``/``popitem``
would remove is made where etcd removes it, before the delete
(``Call.accept``), so a payload it cannot decode stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, Final, cast

from managerd.store.api import BadArgument, BadState, Call
from managerd.store.etcd.cells import CELLS
from managerd.store.etcd.client import (
    SESSION_GUARD,
    UNDO_RETRY_FIRST_S,
    EtcdClient,
    try_undos_now,
    undos_later,
    unguarded,
)
from managerd.store.etcd.deadlocks import HELD_BY_SELF, EtcdDeadlocks
from managerd.store.etcd.election import Election
from managerd.store.etcd.handles import (
    HANDLES,
    ConditionHandle,
    Deliveries,
    EtcdHandle,
    LockHandle,
    QueueHandle,
    Work,
)
from managerd.store.etcd.kv import (
    Compare,
    Delete,
    EtcdError,
    EtcdUnavailable,
    EventType,
    Get,
    KeyValue,
    LeaseNotFound,
    Op,
    Put,
    RangeResult,
    Target,
    name_key,
    prefix_end,
)
from managerd.store.etcd.queues import Found, delete_records, found_records, return_records
from managerd.store.etcd.sessions import DEFAULT_ROOT, EtcdSession
from managerd.store.etcd.stats import (
    IDLE_INTERVAL_S,
    LOOKED_S,
    STATS_INTERVAL_S,
    ClusterView,
    Named,
    Publisher,
    unread,
)
from managerd.store.interface import Handle, Snapshot, TypeInfo
from managerd.store.memory.base import SharedObject
from managerd.store.memory.deadlock import LOCK_TYPES, SEMAPHORE_TYPES, DeadlockMode
from managerd.store.memory.registry import check_name
from managerd.store.sessions import Session, SessionKind, SessionState
from managerd.store.stats import LockStats, ObjectStats, StoreStats
from managerd_client.errors import (
    ArgumentConflict,
    LockLost,
    NoSuchObject,
    ObjectTypeConflict,
    ServerShuttingDown,
    SessionExpired,
    StoreUnavailable,
)

log = logging.getLogger(__name__)

#: The types served, and the handle class of each.
SERVED: Final[dict[str, type[EtcdHandle]]] = {**HANDLES, **CELLS}
TYPE_INFO: Final[Mapping[str, TypeInfo]] = {
    typeid: TypeInfo(typeid, cls.methods, cls.create_params) for typeid, cls in SERVED.items()
}
REQUEUE_INTERVAL_S: Final = 1.0
#: How many queues the elected gateway reads at once in a requeue pass.
REQUEUE_CONCURRENCY: Final = 16
#: How long a session's end waits for each of its calls still on their way to wait
#: or be answered before it drops them all the same (a net: they never take so long).
END_CALLS_S: Final = 10.0
#: How long a gateway that stops gives the undos under way to be answered by etcd
#: before it cancels them (``close``): its sessions resume elsewhere, without them.
CLOSE_UNDOS_S: Final = 5.0
#: How often a watch's loop asks etcd again for the state it re-reads after an outage.
_REREAD_S: Final = 1.0


class EtcdStore:
    """``await EtcdStore.open(client, ...)``; see the module docstring."""

    types: Mapping[str, TypeInfo] = TYPE_INFO

    def __init__(
        self,
        client: EtcdClient,
        loop: asyncio.AbstractEventLoop,
        root: bytes,
        session_ttl_s: int,
        deadlock: DeadlockMode = DeadlockMode.REPORT,
    ) -> None:
        self.client = client
        self.loop = loop
        self.root = root
        self.session_ttl_s = session_ttl_s
        self._names = root + b"o/"
        #: What ``managerd/metrics.py`` shows of this gateway's etcd traffic.
        self.etcd_metrics = client.metrics
        #: The mirror of ``/m/o/``, by name.
        self._known: dict[str, _Known] = {}
        #: Deletions under way, by name: a creation of the name waits for its deletion.
        self._deleting: dict[str, asyncio.Task[None]] = {}
        self._handles: dict[str, EtcdHandle] = {}
        #: Each session's lease, opened at its first call.
        self._leases: dict[Session, asyncio.Task[EtcdSession]] = {}
        #: Each session's calls in flight (answers not yet given): the handle and task of each.
        self._calls: dict[Session, dict[asyncio.Future[Any], _InFlight]] = {}
        #: The handles each session has called (its end is awaited by their later calls).
        self._used: dict[Session, set[EtcdHandle]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        #: Sessions' ends under way (``release``): finished, not cancelled, on close.
        self._endings: set[asyncio.Task[None]] = set()
        #: Creations and deletions under way: finished (not cancelled) on close.
        self._changes: set[asyncio.Task[None]] = set()
        self.deliveries = Deliveries()
        #: Fencing tokens of this gateway's lock holdings: (session, name, owner) -> token.
        self.tokens: dict[tuple[Session, str, str], int] = {}
        #: The wait-for graph across gateways (``deadlocks.py``).
        self.graph = EtcdDeadlocks(client, root, deadlock)
        #: Calls whose wait is on the graph (once each, per object waited on).
        self._on_graph: set[tuple[asyncio.Future[Any], str]] = set()
        #: The cluster's figures (``stats.py``), and when someone last looked at them.
        self.view = ClusterView(client, root, self.graph)
        self._looked = 0.0
        self.gateway = secrets.token_hex(8).encode()
        self._publisher = Publisher(client, root, self.gateway)
        #: Sessions ending (their leases revoked): ``refresh_stats`` reads after them.
        self._ending: set[asyncio.Task[None]] = set()
        self._closed = False
        #: How this gateway names itself as the owner of a session (``sessions.py``).
        self.gateway_id = secrets.token_hex(8)
        #: This gateway's resumable sessions, by the key of their resume token's hash.
        self._by_token_key: dict[bytes, Session] = {}
        self._token_keys: dict[Session, bytes] = {}
        #: Sessions another gateway took over: their calls here are refused.
        self._taken: set[Session] = set()
        #: The election of the gateway that returns expired reservations (see ``open``).
        self.requeuer = Election(
            client, root + b"g/requeue/", session_ttl_s, json.dumps({"pid": os.getpid()}).encode()
        )
        #: Queues the requeuer has read but this gateway has not opened, by name.
        self._requeue_only: dict[str, QueueHandle] = {}
        #: Per client thread of a session: the unconfirmed records of its last get
        #: (``queues.py``), dropped (confirmed) at the thread's next call.
        self.unconfirmed: dict[tuple[Session, int], list[bytes]] = {}
        #: Those of a session taken over here, as found (for a get asked again).
        self.found: dict[tuple[Session, int], Found] = {}
        self._records = root + b"ug/"

    @classmethod
    async def open(
        cls,
        client: EtcdClient,
        *,
        root: bytes = DEFAULT_ROOT,
        session_ttl_s: int = 10,
        deadlock: DeadlockMode = DeadlockMode.REPORT,
    ) -> EtcdStore:
        """Load the names, then keep them (a watch), requeue expired reservations and
        refresh the cluster's figures."""
        store = cls(client, asyncio.get_running_loop(), root, session_ttl_s, deadlock)
        read = await client.range(store._names, prefix_end(store._names))
        for kv in sorted(read.kvs, key=lambda kv: kv.create_revision):  # creation order
            store._learn(kv.value, kv.create_revision)
        store.background(store._follow(read.revision))
        store.background(store._follow_takeovers(read.revision))
        store.background(store.requeuer.run(store._requeue_all))
        store.background(store._stats_loop())
        return store

    # -- names ------------------------------------------------------------------------
    def _learn(self, value: bytes, revision: int) -> None:
        """A name created (here or through another gateway) at ``revision``."""
        entry = json.loads(value)
        name = entry["name"]
        handle = self._handles.get(name)
        if handle is not None and handle.revision == 0:
            return  # being made here: its own Txn says which incarnation it is
        if handle is not None and handle.revision > revision:
            return  # an older incarnation's creation, seen late by the watch
        if handle is not None and handle.revision != revision:
            self._drop(name, NoSuchObject(f"{name!r} was deleted"))  # made again elsewhere
        args = SERVED[entry["type"]].decode_args(entry["args"])
        self._known[name] = _Known(entry["type"], args, revision)

    async def _follow(self, revision: int) -> None:
        """Keep the mirror of names: creations and deletions through any gateway."""
        while True:
            try:
                async with contextlib.aclosing(
                    self.client.watch(
                        self._names,
                        prefix_end(self._names),
                        start_revision=revision + 1,
                        prev_kv=True,
                    )
                ) as events:
                    async for batch in events:
                        for event in batch:
                            if event.type is EventType.PUT:
                                self._learn(event.kv.value, event.kv.create_revision)
                            elif event.prev_kv is not None:
                                name = json.loads(event.prev_kv.value)["name"]
                                known = self._known.get(name)
                                # Only that incarnation: not one made since, here.
                                if known and known.revision == event.prev_kv.create_revision:
                                    self._forget(name)
                            revision = event.kv.mod_revision
            except EtcdError as exc:  # compacted, or etcd down: read all again
                log.warning("etcd store: names watch failed (%s); reading them again", exc)
                read = await self._once_answered(
                    "names", lambda: self.client.range(self._names, prefix_end(self._names))
                )
                self._known.clear()
                for kv in read.kvs:
                    self._learn(kv.value, kv.create_revision)
                for name in set(self._handles) - set(self._known):
                    self._forget(name)
                revision = read.revision

    def _forget(self, name: str) -> None:
        self._known.pop(name, None)
        self._drop(name, NoSuchObject(f"{name!r} was deleted"))

    def _drop(self, name: str, exc: BaseException) -> None:
        handle = self._handles.pop(name, None)
        if handle is not None:
            self._fail_calls(handle, exc)

    def get_or_create(self, typeid: str, name: str, args: dict[str, Any]) -> Handle:
        cls = SERVED.get(typeid)
        if cls is None:
            raise BadArgument(f"unknown type {typeid!r}; the etcd store serves {', '.join(SERVED)}")
        check_name(name)
        unknown = set(args) - set(cls.create_params)
        if unknown:
            raise BadArgument(f"{typeid} takes no creation argument {', '.join(sorted(unknown))}")
        known = self._known.get(name)
        if known is not None:
            _check_same(name, known.typeid, known.args, typeid, args)
            return self._handle(name, known)
        handle = cls(self, name, args)
        created = handle.creation_args()
        self._known[name] = _Known(typeid, created, 0)
        self._handles[name] = handle
        # Only a deletion under way now comes first: one asked for later waits for this
        # creation (``_delete`` awaits ``ready``), and waiting for it here would deadlock.
        deleting = self._deleting.get(name)
        creating = unguarded(self._create(handle, typeid, created, deleting), loop=self.loop)
        self._changes.add(creating)
        creating.add_done_callback(self._changes.discard)

        def created_or_not(task: asyncio.Task[None]) -> None:
            if task.cancelled():
                handle.ready.cancel()
            elif task.exception() is not None:
                handle.ready.set_exception(cast(BaseException, task.exception()))
                handle.ready.exception()  # retrieved: each call raises it
                self._not_created(handle, cast(BaseException, task.exception()))
            else:
                handle.ready.set_result(None)

        creating.add_done_callback(created_or_not)
        return cast(Handle, handle)

    def created(self, obj: Handle) -> asyncio.Future[None] | None:
        """None once the name is in etcd (the usual case: a name the mirror knows);
        else its creating Txn's outcome, shielded: a caller that gives up (a cancel,
        its session's end) does not cancel what every call of the object waits for."""
        ready = cast(EtcdHandle, obj).ready
        if ready.done() and not ready.cancelled() and ready.exception() is None:
            return None
        return asyncio.shield(ready)

    def _not_created(self, handle: EtcdHandle, exc: BaseException) -> None:
        """Its creating Txn failed: the name is not this handle's any more, so that a
        later get-or-create tries again (etcd did not answer) or answers what etcd
        has (``_create`` put it in the mirror). Its calls get the failure (``ready``)."""
        name = handle.name
        if self._handles.get(name) is handle:
            del self._handles[name]
            known = self._known.get(name)
            if known is not None and known.revision == 0:
                del self._known[name]
                if isinstance(exc, StoreUnavailable):
                    # It may have been made, and the names watch passed it over while
                    # this handle was being made (``_learn``): read it back.
                    self.background(self._read_back(name))

    async def _read_back(self, name: str) -> None:
        try:
            read = await self.client.range(self._names + name_key(name))
        except EtcdError as exc:
            log.warning("etcd store: %r not read back after its creation failed: %s", name, exc)
            return
        if read.kvs and name not in self._known:
            self._learn(read.kvs[0].value, read.kvs[0].create_revision)

    async def _create(
        self,
        handle: EtcdHandle,
        typeid: str,
        created: dict[str, Any],
        deleting: asyncio.Task[None] | None,
    ) -> None:
        if deleting is not None:
            await asyncio.wait([deleting])
        key = self._names + name_key(handle.name)
        args = type(handle).encode_args(created)
        entry = json.dumps({"name": handle.name, "type": typeid, "args": args}).encode()
        try:
            done = await self.client.txn(
                [Compare(key, Target.CREATE, "==", 0)],
                [Put(key, entry), *handle.init_ops()],
                [Get(key)],
                idempotent=True,
            )
        except EtcdUnavailable as exc:  # the creating call's to know (``created``)
            raise StoreUnavailable(
                f"etcd did not answer ({exc}); {handle.name!r} may or may not have been created"
            ) from exc
        if done.succeeded:
            revision = done.revision
        else:
            [read] = done.responses
            assert isinstance(read, RangeResult)
            if read.kvs and read.kvs[0].value != entry:  # not our own retried creation
                found = json.loads(read.kvs[0].value)
                found_args = SERVED[found["type"]].decode_args(found["args"])
                if self._handles.get(handle.name) is handle:
                    # What etcd has is what the mirror says from now on (the names
                    # watch passed it over while this handle was being made).
                    self._known[handle.name] = _Known(
                        found["type"], found_args, read.kvs[0].create_revision
                    )
                _check_same(handle.name, found["type"], found_args, typeid, created)
            revision = read.kvs[0].create_revision
        if handle.revision == 0:
            handle.revision = revision
            known = self._known.get(handle.name)
            if known is not None and known.revision == 0:
                known.revision = revision

    async def ensure(self, name: str, typeid: str) -> None:
        """``name`` exists as a ``typeid`` made with its defaults (a dead-letter queue)
        once this returns; ObjectTypeConflict if it is another type."""
        known = self._known.get(name)
        if known is not None:
            _check_same(name, known.typeid, known.args, typeid, {})
            return
        # Shielded: a cancelled caller must not cancel what every call of it waits for.
        await asyncio.shield(cast(EtcdHandle, self.get_or_create(typeid, name, {})).ready)

    def lock_for(self, name: str) -> LockHandle:
        """The Lock or RLock ``name`` of a Condition, made an RLock if new (as the memory
        store makes ``<condition>.lock``)."""
        known = self._known.get(name)
        if known is None:
            return cast(LockHandle, self.get_or_create("RLock", name, {}))
        if known.typeid not in ("Lock", "RLock"):
            raise ObjectTypeConflict(f"{name!r} is a {known.typeid}, not a Lock or RLock")
        return cast(LockHandle, self._handle(name, known))

    def _handle(self, name: str, known: _Known) -> Handle:
        handle = self._handles.get(name)
        if handle is None:
            handle = SERVED[known.typeid](self, name, known.args)
            handle.revision = known.revision
            handle.ready.set_result(None)  # it is in etcd: the mirror saw it
            self._handles[name] = handle
        return cast(Handle, handle)

    def get(self, name: str, typeid: str | None = None) -> Handle:
        known = self._known.get(name)
        if known is None:
            raise NoSuchObject(f"no object named {name!r}")
        if typeid is not None and known.typeid != typeid:
            raise ObjectTypeConflict(f"{name!r} is a {known.typeid}, not a {typeid}")
        return self._handle(name, known)

    def delete(self, name: str) -> bool:
        """Whether this gateway knew it; its state in etcd goes in the background."""
        known = self._known.get(name)
        if known is None:
            return False
        if known.typeid in ("Lock", "RLock"):
            # A Condition holds its lock's handle: a new lock of that name would be
            # another lock until a restart rebinds the Condition by name (as the
            # memory store). Only the Conditions this gateway's mirror knows.
            users = sorted(n for n, k in self._known.items()
                           if k.typeid == "Condition" and k.args.get("lock") == name)  # fmt: skip
            if users:
                raise BadState(
                    f"{name!r} is the lock of Condition {users[0]!r}: delete the Condition first"
                )
        handle = cast(EtcdHandle, self._handle(name, known))
        self._forget(name)
        deleting = unguarded(self._delete(handle), loop=self.loop)
        self._changes.add(deleting)
        deleting.add_done_callback(self._changes.discard)
        self._deleting[name] = deleting
        deleting.add_done_callback(lambda _: self._deleted(name, deleting))
        return True

    def _deleted(self, name: str, task: asyncio.Task[None]) -> None:
        if self._deleting.get(name) is task:
            del self._deleting[name]
        if not task.cancelled() and task.exception() is not None:
            log.error("etcd store: deleting %r failed", name, exc_info=task.exception())

    async def _delete(self, handle: EtcdHandle) -> None:
        """Delete that incarnation of the name (not one made since), and its state."""
        with contextlib.suppress(Exception):
            await asyncio.shield(handle.ready)  # made here a moment ago: once it exists
        key = self._names + name_key(handle.name)
        ops: list[Op] = [Delete(key)]
        # A prefix ends with "/"; any other is a key of its own: a range from it would
        # take the state of every name it begins (deleting "x" deleted "xy"'s).
        ops += [
            Delete(prefix, prefix_end(prefix)) if prefix.endswith(b"/") else Delete(prefix)
            for prefix in handle.state_prefixes()
        ]
        await self.client.txn([Compare(key, Target.CREATE, "==", handle.revision)], ops)

    def listing(self) -> list[tuple[str, str]]:
        return sorted((name, known.typeid) for name, known in self._known.items())

    # -- calls ------------------------------------------------------------------------
    def run(
        self, handle: EtcdHandle, call: Call, work: Work, *, parks: bool
    ) -> asyncio.Future[Any]:
        """Run ``work`` with the caller's lease once the object exists.

        The answer is a future of its own, not the Task: cancelling it (the
        call given up, its session ended) cancels the work, and the store can
        fail it (deleted object, shutdown) while the work unwinds.
        """
        if self._closed:
            raise ServerShuttingDown("the daemon is shutting down")
        session = call.session
        if self._taken and session in self._taken:
            raise SessionExpired(f"session {session.id} was taken over by another gateway")
        if self.unconfirmed:
            # The thread asks again: it read its last answer (a get confirms its own).
            read = self.unconfirmed.pop((session, call.thread), None)
            self.found.pop((session, call.thread), None)
            if read:
                self.background(delete_records(self.client, read))
        lease = self._lease(session)

        async def run() -> Any:
            try:
                return await attempt()
            except EtcdUnavailable as exc:  # the caller's to know: the outcome is unknown
                raise StoreUnavailable(
                    f"etcd did not answer ({exc}); the call may or may not have taken effect"
                ) from exc

        async def attempt() -> Any:
            # Shielded: cancelling one call must not cancel what every call of the
            # object (its creation) or of the session (its lease) waits for.
            await asyncio.shield(handle.ready)
            etcd_session = await asyncio.shield(lease)
            if not etcd_session.lost.is_set():
                # Its writes land only while the session lives (client.SESSION_GUARD):
                # one held up in a cut network must not land after another took over.
                SESSION_GUARD.set(etcd_session.key)
                try:
                    return await work(etcd_session)
                except LeaseNotFound:
                    etcd_session.lost.set()  # the session ends (_end_when_lost)
            error = LockLost if isinstance(handle, LockHandle) else SessionExpired
            raise error("this session's etcd lease expired (its gateway was cut off from etcd?)")

        answer: asyncio.Future[Any] = self.loop.create_future()
        task = self.loop.create_task(run())
        calls = self._calls.setdefault(session, {})
        calls[answer] = _InFlight(handle, task)
        self._used.setdefault(session, set()).add(handle)
        handle.calls.add(answer)
        if parks:
            handle.parked.add(answer)

        def worked(task: asyncio.Task[Any]) -> None:
            if answer.done():
                return
            if task.cancelled():
                answer.cancel()
            elif (exc := task.exception()) is not None:
                answer.set_exception(exc)
            else:
                answer.set_result(task.result())

        def answered(answer: asyncio.Future[Any]) -> None:
            calls.pop(answer, None)
            handle.calls.discard(answer)
            handle.parked.discard(answer)
            task.cancel()  # a no-op once it is done

        task.add_done_callback(worked)
        answer.add_done_callback(answered)
        return answer

    def _lease(self, session: Session) -> asyncio.Task[EtcdSession]:
        lease = self._leases.get(session)
        if lease is None:
            resumable = session.kind is SessionKind.MANAGERD
            lease = unguarded(
                EtcdSession.open(
                    self.client,
                    self.session_ttl_s,
                    root=self.root,
                    resume_token=session.resume_token if resumable else None,
                    public_id=session.id,
                    gateway=self.gateway_id,
                ),
                loop=self.loop,
            )
            self._leases[session] = lease
            lease.add_done_callback(lambda task: self._opened(session, task))
            lease.add_done_callback(lambda opened: self._describe(session, opened))
            self.background(self._end_when_lost(session, lease))
        return lease

    def _opened(self, session: Session, task: asyncio.Task[EtcdSession]) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        key = task.result().token_key
        if key is not None and self._leases.get(session) is task:
            self._by_token_key[key] = session
            self._token_keys[session] = key

    async def resume(self, token: str) -> Session | None:
        """The session of another gateway whose resume token this is, while its lease
        lives: taken over (renewed from here, owned by this gateway)."""
        if self._closed:
            return None
        etcd_session = await EtcdSession.take_over(
            self.client, token, self.gateway_id, root=self.root
        )
        if etcd_session is None:
            return None
        session = Session(SessionKind.MANAGERD, "?", resumed=(etcd_session.public_id, token))
        # Gets its old gateway answered and whose reading no next call confirmed there.
        prefix = self._records + etcd_session.sid.encode() + b"/"
        records = await self.client.range(prefix, prefix_end(prefix))
        for thread, found in found_records(records.kvs, prefix).items():
            self.unconfirmed[(session, thread)] = found.keys
            self.found[(session, thread)] = found

        async def taken() -> EtcdSession:
            return etcd_session

        lease = self._leases[session] = unguarded(taken(), loop=self.loop)
        self.background(self._end_when_lost(session, lease))
        if etcd_session.token_key is not None:
            self._by_token_key[etcd_session.token_key] = session
            self._token_keys[session] = etcd_session.token_key
        return session

    async def _follow_takeovers(self, revision: int) -> None:
        """Let go of a session of this gateway as soon as another takes it over (its
        client reconnected there): its parked calls here are dropped, leaving its
        keys to the calls the client asks again there, and its lease is renewed
        from there only. (Missed, a takeover is still found when the session ends
        here: ``_end`` revokes only a session this gateway owns.)"""
        tokens = self.root + b"t/"
        while True:
            try:
                async with contextlib.aclosing(
                    self.client.watch(tokens, prefix_end(tokens), start_revision=revision + 1)
                ) as events:
                    async for batch in events:
                        for event in batch:
                            revision = event.kv.mod_revision
                            session = self._by_token_key.get(event.kv.key)
                            if session is None or event.type is not EventType.PUT:
                                continue
                            if self._taken_from_here(session, event.kv):
                                self._let_go(session)
            except EtcdError as exc:  # compacted, or etcd down: follow from now on
                log.warning("etcd store: sessions watch failed (%s); following again", exc)
                now = await self._once_answered(
                    "sessions", lambda: self.client.range(tokens, count_only=True)
                )
                revision = now.revision

    async def _once_answered(
        self, what: str, read: Callable[[], Awaitable[RangeResult]]
    ) -> RangeResult:
        """``read()``, asked again while etcd cannot answer it: a watch's loop outlives
        an outage longer than the client's retry budget instead of ending with it."""
        while True:
            try:
                return await read()
            except EtcdUnavailable as exc:
                log.warning("etcd store: %s watch waits for etcd: %s", what, exc)
                await asyncio.sleep(_REREAD_S)

    def _taken_from_here(self, session: Session, kv: KeyValue) -> bool:
        """Whether a put of ``session``'s token key names another gateway on the lease
        this one keeps for it, after this one put it (a takeover; not a lease of its
        own elsewhere, nor a put this gateway's own superseded)."""
        lease = self._leases.get(session)
        if lease is None or not lease.done() or lease.cancelled() or lease.exception():
            return False
        ours = lease.result()
        return (
            kv.lease == ours.lease_id
            and kv.mod_revision > ours.token_revision
            and json.loads(kv.value).get("gateway") != self.gateway_id
        )

    def _let_go(self, session: Session) -> None:
        """``session`` was taken over by another gateway: nothing of it is done here."""
        log.info("etcd store: session %s was taken over by another gateway", session.id)
        self._taken.add(session)
        self._forget_session(session)
        lease = self._leases.pop(session, None)
        if lease is not None:
            self.background(self._abandon(lease))

    async def _abandon(self, lease: asyncio.Task[EtcdSession]) -> None:
        await (await lease).abandon()

    def _forget_session(self, session: Session) -> set[QueueHandle]:
        """Drop this gateway's state of ``session``: its calls (cancelled), delivery ids
        and tokens; the queues it had reserved from."""
        for answer in self._calls.pop(session, {}):
            answer.cancel()
        queues = self.deliveries.drop(session)
        for held in [k for k in self.tokens if k[0] is session]:
            del self.tokens[held]
        key = self._token_keys.pop(session, None)
        if key is not None:
            self._by_token_key.pop(key, None)
        if self.unconfirmed or self.found:
            for entry in [k for k in self.unconfirmed if k[0] is session]:
                del self.unconfirmed[entry]
            for entry in [k for k in self.found if k[0] is session]:
                del self.found[entry]
        return queues

    def _describe(self, session: Session, opened: asyncio.Task[EtcdSession]) -> None:
        """Put the session's public description on its lease (``/m/who/``): any gateway
        names it as a holder or a waiter."""
        if opened.cancelled() or opened.exception() is not None:
            return
        lease_id = opened.result().lease_id
        key = self.graph.who + b"%016x" % lease_id
        who = json.dumps(session.who()).encode()
        self.background(self.client.put(key, who, lease=lease_id))

    async def _end_when_lost(self, session: Session, lease: asyncio.Task[EtcdSession]) -> None:
        """Once the session's lease is gone (or could not be had), the managerd session
        ends: the daemon closes its connection, and the client's next call starts a new
        session (``LockLost`` from a lock it held). Not for a lease revoked here."""
        try:
            etcd_session = await asyncio.shield(lease)
        except Exception:
            pass  # never opened (etcd unreachable): every call of the session would fail
        else:
            await etcd_session.lost.wait()
        if self._leases.get(session) is lease:
            log.warning("etcd store: session %s lost its etcd lease; ending it", session.id)
            session.state = SessionState.LOST

    def background(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` for the store (not for a caller); a failure is logged."""
        task = unguarded(coro, loop=self.loop)
        self._tasks.add(task)
        task.add_done_callback(self._background_done)

    def background_as(self, session: Session, work: Work) -> None:
        """Run ``work`` with ``session``'s lease, for nobody's answer (an undo)."""
        lease = self._lease(session)

        async def run() -> None:
            await work(await asyncio.shield(lease))

        self.background(run())

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled() or (exc := task.exception()) is None:
            return
        if isinstance(exc, EtcdUnavailable):
            # An outage, not a bug: what the work left stays on its lease (records go
            # back when it ends), and the loops that matter start again.
            log.warning("etcd store: background work not done, etcd unavailable: %s", exc)
        else:
            log.error("etcd store: background work failed", exc_info=exc)

    def abandon(
        self, obj: Handle, method: str, session: Session, future: asyncio.Future[Any],
        *, stock: bool = False,
    ) -> None:  # fmt: skip
        if not isinstance(obj, EtcdHandle):  # a daemon operation waiting (a creation)
            future.cancel()
            return
        obj.abandon(method, future, stock=stock)

    def cancel(self, session: Session, future: asyncio.Future[Any]) -> None:
        future.cancel()

    def undo(
        self, obj: Handle, method: str, call: Call, args: tuple[Any, ...], result: Any
    ) -> None:
        getattr(obj, obj.undo_methods[method])(call, args, result)

    def release(self, session: Session) -> asyncio.Future[None] | None:
        """End ``session``, in the memory store's order: its calls that wait are dropped
        (one still on its way is dropped once it waits, or answered), then its lease
        is revoked (its holdings go to the next live waiter), then its reservations
        go back. Calls made after this on the objects it used wait for all that.
        A session of a gateway that stops (SIGTERM) is left to resume elsewhere.

        Done when the future returned is: until then the sessions table lists the
        session, so that a gateway killed before its lease was revoked (the lease
        then lasts its TTL) never showed it as ended."""
        self._taken.discard(session)
        # A copy: each call's own callback forgets it once dropped (``run``), and the
        # end waits for the dropped ones to unwind.
        calls = dict(self._calls.pop(session, {}))
        if self._closed and session.kind is SessionKind.MANAGERD:
            # This gateway stops: the session is left to resume through another
            # gateway within its TTL; ``close`` stops renewing its lease.
            self._forget_session(session)
            return None
        for answer, in_flight in calls.items():
            in_flight.handle.drop_when_parked(answer)
        queues = self._forget_session(session)
        lease = self._leases.pop(session, None)
        ended: asyncio.Future[None] = self.loop.create_future()
        # What came before the end on those objects (any session's calls on their way
        # to wait, earlier ends) comes first: a dead waiter is not handed the lock.
        before: list[asyncio.Future[Any]] = []
        for handle in self._used.pop(session, ()):
            before += [f for f in handle.undos if not f.done()]
            before += [f for f in handle.arrivals.values() if not f.done()]
            handle.end_after(ended)
        ending = unguarded(self._end(calls, before, lease, queues, ended), loop=self.loop)
        self._endings.add(ending)
        self._ending.add(ending)
        ending.add_done_callback(self._ending.discard)
        ending.add_done_callback(self._ended)
        return ended

    async def _end(
        self,
        calls: dict[asyncio.Future[Any], _InFlight],
        before: list[asyncio.Future[Any]],
        lease: asyncio.Task[EtcdSession] | None,
        queues: set[QueueHandle],
        ended: asyncio.Future[None],
    ) -> None:
        try:
            if before:
                await asyncio.wait(before, timeout=END_CALLS_S)
            tasks = [in_flight.task for in_flight in calls.values()]
            if tasks:  # each answered, or dropped and unwound (a waiter's key withdrawn)
                await asyncio.wait(tasks, timeout=END_CALLS_S)
                for answer in calls:
                    answer.cancel()  # a no-op once answered; else one that never waited
                await asyncio.wait(tasks, timeout=END_CALLS_S)
            if lease is None:
                return
            etcd_session = await lease
            if not await etcd_session.owned():
                # Taken over by another gateway (its client reconnected there): not
                # ours to end.
                await etcd_session.abandon()
                return
            # Its gets' answers were read (an answer the client gave up was undone by
            # its cancel), as the memory store drops its undo records with the
            # connection; dropped before the lease goes, so the requeuer never sees
            # them orphaned.
            prefix = self._records + etcd_session.sid.encode() + b"/"
            await self.client.delete(prefix, prefix_end(prefix))
            await etcd_session.close()
            for queue in queues:  # its reservations go back now, not after a deadline
                await queue.queue.requeue_expired()
        finally:
            ended.set_result(None)

    def _ended(self, task: asyncio.Task[None]) -> None:
        self._endings.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("etcd store: ending a session failed", exc_info=task.exception())

    async def _requeue_all(self) -> None:
        """While this gateway is the elected requeuer: every second, every queue."""
        running = asyncio.Semaphore(REQUEUE_CONCURRENCY)

        async def requeue(handle: QueueHandle) -> None:
            async with running:
                try:
                    await handle.queue.requeue_expired()
                except EtcdError as exc:
                    log.warning("etcd store: requeue of %r failed: %s", handle.name, exc)

        while True:
            await asyncio.sleep(REQUEUE_INTERVAL_S)
            try:
                await self._return_orphans()
            except EtcdError as exc:
                log.warning("etcd store: returning orphaned gets failed: %s", exc)
            queues = [
                self._queue_for_requeue(name, known)
                for name, known in list(self._known.items())
                if known.revision and SERVED[known.typeid] in _QUEUE_TYPES
            ]
            await asyncio.gather(*(requeue(h) for h in queues))
            for name in set(self._requeue_only) - set(self._known):
                del self._requeue_only[name]

    def _queue_for_requeue(self, name: str, known: _Known) -> QueueHandle:
        """The queue's handle if this gateway opened it, else one kept for requeues only
        (not served, not in the stats)."""
        handle = self._handles.get(name)
        if isinstance(handle, QueueHandle):
            return handle
        kept = self._requeue_only.get(name)
        if kept is None or kept.revision != known.revision:
            kept = cast(QueueHandle, SERVED[known.typeid](self, name, known.args))
            kept.revision = known.revision
            kept.ready.set_result(None)
            self._requeue_only[name] = kept
        return kept

    async def _return_orphans(self) -> int:
        """Return the unconfirmed records of sessions whose lease ended with no gateway
        to end them (theirs died and no other took them over): their clients may not
        have read those answers."""
        records = await self.client.range(self._records, prefix_end(self._records))
        if not records.kvs:
            return 0
        sessions = self.root + b"s/"
        live = await self.client.range(sessions, prefix_end(sessions), keys_only=True)
        alive = {kv.key[len(sessions) :] for kv in live.kvs}
        orphans = [
            kv for kv in records.kvs if kv.key[len(self._records) :].partition(b"/")[0] not in alive
        ]
        return await return_records(self.client, self.root, orphans)

    def would_hand_out(
        self, obj: Handle, method: str, call: Call, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> bytes | None:
        """Not answered here (it would take a round trip): None, as for a call that
        fails by itself. (The stock dialect's decode check is then not made first.)"""
        return None

    def snapshot(self, obj: Handle) -> asyncio.Future[Snapshot]:
        """Read now, so answered later (a future); BadArgument at once for a type
        with no value to copy."""
        handle = cast(EtcdHandle, obj)
        if not handle.copyable:
            raise BadArgument(f"a {obj.typeid} has no value to copy")
        return unguarded(handle.snapshot(), loop=self.loop)

    # -- durability: etcd answers a write once a quorum has it ----------------------------
    def check_writable(self) -> None:
        return None

    def barrier(self) -> asyncio.Future[None] | None:
        return None

    async def ready(self, timeout_s: float) -> str | None:
        """A linearizable read of one key (needs a leader and a quorum) within ``timeout_s``.

        The key is the names prefix itself (no such key): the cheapest Range
        that still goes through the leader's read index.
        """
        if self._closed:
            return "shutting down"
        try:
            await asyncio.wait_for(self.client.range(self._names, keys_only=True), timeout_s)
        except TimeoutError:
            return f"etcd did not answer a read within {timeout_s:g} s"
        except EtcdError as exc:
            # The kind only: /readyz is open to anyone who reaches the metrics
            # port, and etcd's details name its members' addresses.
            log.debug("etcd store: not ready: %s", exc)
            return f"etcd refused a read ({type(exc).__name__})"
        return None

    # -- what people look at ------------------------------------------------------------
    def stats(self) -> StoreStats:
        """Every object of the cluster (in creation order), as of the last refresh, with
        this gateway's parked calls as they are now. Safe from another thread."""
        self._looked = time.monotonic()
        # In the order this gateway learned the names: its own creations in call order,
        # the others' in revision order.
        known = list(self._known.items())
        objects = tuple(self._stats_now(name, entry.typeid, entry.args) for name, entry in known)
        return StoreStats(objects, self.view.deadlocks_total)

    def _stats_now(self, name: str, typeid: str, args: Mapping[str, Any]) -> ObjectStats:
        base = self.view.objects.get(name)
        handle = self._handles.get(name)
        if base is None or base.typeid != typeid:
            base = unread(name, typeid, args)
        local = 0
        if isinstance(handle, ConditionHandle):
            local = len(handle.unnotified)
        elif handle is not None:
            local = len(handle.parked)
        waiters = getattr(base, "waiters", None)
        if local and isinstance(waiters, int):
            changes: dict[str, Any] = {"waiters": waiters + local}
            base = dataclasses.replace(base, **changes)
        counts: dict[str, Any] = {
            k: v
            for k, v in (handle.counts if handle is not None else {}).items()
            if hasattr(base, k)
        }
        if counts:  # this gateway's own (stats.py)
            base = dataclasses.replace(base, **counts)
        since = self.view.held_since.get(name)
        if since is not None and isinstance(base, LockStats) and base.holder is not None:
            base = dataclasses.replace(base, held_for_s=round(max(time.time() - since, 0.0), 3))
        return base

    async def refresh_stats(self) -> None:
        """Read the cluster's figures now, after this gateway's deadlock checks, session
        ends, creations and deletions under way (the stats loop does this periodically)."""
        under_way = [*self.graph.checking, *self._ending, *self._changes]
        if under_way:
            await asyncio.wait(under_way)
        await self._publish()
        mine = {
            t.result().lease_id
            for t in list(self._leases.values())
            if t.done() and not t.cancelled() and t.exception() is None
        }
        objects = [Named(n, k.typeid, k.args) for n, k in list(self._known.items())]
        await self.view.refresh(objects, mine, self.gateway, self._blank)

    def _blank(self, obj: Named) -> SharedObject:
        """A list, Namespace or Array as created, for its stored state (``cells.py``)."""
        known = self._known.get(obj.name)
        handle = self._handle(obj.name, known) if known is not None else None
        blank = getattr(handle, "_blank", None)
        if blank is None:
            raise KeyError(obj.name)
        made: SharedObject = blank()
        return made

    async def _publish(self) -> None:
        """This gateway's waiting calls per object, for the other gateways' stats."""
        counts = {}
        for name, handle in list(self._handles.items()):
            waits = handle.unnotified if isinstance(handle, ConditionHandle) else handle.parked
            n = len(waits)
            if n:
                counts[name] = n
        await self._publisher.publish(counts)

    async def _stats_loop(self) -> None:
        while True:
            looked = time.monotonic() - self._looked < LOOKED_S
            try:
                if looked:
                    await self.refresh_stats()
                else:
                    await self._publish()
            except EtcdError as exc:
                log.warning("etcd store: stats refresh failed: %s", exc)
            interval_s = STATS_INTERVAL_S if looked else IDLE_INTERVAL_S
            wake = time.monotonic() + max(interval_s, 4 * self.view.duration_s)
            while time.monotonic() < wake:
                await asyncio.sleep(STATS_INTERVAL_S)
                if not looked and time.monotonic() - self._looked < LOOKED_S:
                    break  # someone looks now: refresh at once
                await self._publish_quietly()

    async def _publish_quietly(self) -> None:
        try:
            await self._publish()
        except EtcdError as exc:
            log.warning("etcd store: publishing waiters failed: %s", exc)

    def stats_of(self, obj: Handle) -> ObjectStats:
        known = self._known.get(obj.name)
        if known is None:
            return cast(EtcdHandle, obj).stats()
        return self._stats_now(obj.name, known.typeid, known.args)

    def deadlocks(self) -> list[dict[str, Any]]:
        """The cycles recorded by any gateway that stood at the last refresh."""
        self._looked = time.monotonic()
        return list(self.view.cycles)

    def parking(self, handle: EtcdHandle, call: Call, answer: asyncio.Future[Any]) -> None:
        """``call`` (its answer ``answer``) starts waiting on ``handle``: on the wait-for
        graph if it waits on a lock or a semaphore (a Condition: its re-acquire)."""
        if self.graph.mode is DeadlockMode.OFF or answer.done():
            return
        target: EtcdHandle = handle
        refuse = True
        if isinstance(handle, ConditionHandle):
            waiting = handle._waits.get(answer)
            if waiting is None or waiting in handle.unnotified:
                return  # waiting for a notify: not on the graph
            target, refuse = handle.lock, False
        elif handle.typeid not in LOCK_TYPES | SEMAPHORE_TYPES:
            return
        entry = (answer, target.name)
        if entry in self._on_graph:
            return
        lease = self._leases.get(call.session)
        if lease is None or not lease.done() or lease.cancelled() or lease.exception():
            return
        self._on_graph.add(entry)
        answer.add_done_callback(lambda _: self._on_graph.discard(entry))
        self.background(
            self.graph.waiting(
                lease.result().lease_id,
                call.thread,
                target.name,
                target.typeid,
                answer,
                refuse=refuse,
                held_by_self=HELD_BY_SELF.get(),
            )
        )

    def _undos_under_way(self) -> list[asyncio.Future[Any]]:
        """What this gateway still has to give back: its handles' undos (``_undo``, a
        Barrier party's leave...) and the client's undos of failed writes
        (``client.undos_later``)."""
        undos: list[asyncio.Future[Any]] = [*undos_later(self.loop)]
        for handle in self._handles.values():
            undos += [f for f in handle.undos if not f.done()]
        return undos

    async def _finish_undos(self) -> None:
        """Wait, ``CLOSE_UNDOS_S`` at most, for the undos under way, each tried again at
        once if it pauses between two tries; then cancel those of ``undos_later`` (the
        handles' go with the background work) and say how many were left undone.

        Cancelled, an undo is lost: the session resumes through another gateway, which
        knows nothing of it (a get's items whose give-back was cut short stay in the
        session's records, and its thread's next call confirms them: dropped)."""
        deadline = self.loop.time() + CLOSE_UNDOS_S
        while undos := self._undos_under_way():
            left_s = deadline - self.loop.time()
            if left_s <= 0:
                # (A session's end on an object counts too: later undos there wait for it.)
                log.warning(
                    "etcd store: closing with %d undo(s) left undone: etcd did not answer "
                    "them within %.0f s",
                    len(undos),
                    CLOSE_UNDOS_S,
                )
                for task in undos_later(self.loop):
                    task.cancel()
                return
            try_undos_now(self.loop)
            await asyncio.wait(undos, timeout=min(left_s, UNDO_RETRY_FIRST_S))

    def _fail_calls(self, handle: EtcdHandle, exc: BaseException) -> None:
        for answer in list(handle.calls):
            if not answer.done():
                answer.set_exception(exc)

    def shutdown(self) -> None:
        """Stop serving. A managerd session's calls are dropped unanswered (its client
        asks them again through another gateway, where the session resumes: its
        lease is not revoked, see ``close``); a stock session's are refused. The
        background work goes on until ``close``: undos still under way get their
        last chance there."""
        self._closed = True
        for session, calls in self._calls.items():
            if session.kind is SessionKind.MANAGERD:
                for answer in list(calls):
                    answer.cancel()
        for handle in self._handles.values():
            self._fail_calls(handle, ServerShuttingDown("the daemon is shutting down"))

    async def close(self) -> None:
        """Stop; give the undos under way up to ``CLOSE_UNDOS_S`` to be answered, then
        cancel all background work; stop renewing the leases of managerd sessions
        (their clients resume them through another gateway within the TTL, holdings
        kept); revoke those of stock sessions (a stock client cannot resume)."""
        self.shutdown()
        await self._finish_undos()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, *self._changes, *self._endings, return_exceptions=True)
        await self._publisher.close()
        for session in list(self._leases):
            lease = self._leases.pop(session)
            with contextlib.suppress(Exception):
                etcd_session = await lease
                if session.kind is SessionKind.MANAGERD:
                    await etcd_session.abandon()
                else:
                    await etcd_session.close()


_QUEUE_TYPES: Final = tuple(cls for cls in SERVED.values() if issubclass(cls, QueueHandle))


@dataclass(frozen=True, slots=True)
class _InFlight:
    """A call in flight: the handle it was made on, and the task that does its work."""

    handle: EtcdHandle
    task: asyncio.Task[Any]


@dataclass(slots=True)
class _Known:
    """A name as the mirror knows it: type, creation arguments, and the revision that
    created it (0 while its creation here is in flight)."""

    typeid: str
    args: dict[str, Any]
    revision: int


def _check_same(
    name: str, known_type: str, created: Mapping[str, Any], typeid: str, args: Mapping[str, Any]
) -> None:
    """ObjectTypeConflict or ArgumentConflict, as the memory store's get-or-create."""
    if "length" in created and "sequence" in args:  # an Array: its length
        sequence = args["sequence"]
        length = sequence if isinstance(sequence, int) else len(sequence)
        args = {**args, "length": length}
    if known_type != typeid:
        raise ObjectTypeConflict(
            f"{name!r} already exists as a {known_type}, cannot use it as a {typeid}"
        )
    same = SERVED[typeid].same_arg  # the known type: one served
    for key, value in args.items():
        if key in created and not same(key, created[key], value):
            raise ArgumentConflict(
                f"{typeid} {name!r} exists with {key}={created[key]!r}; "
                f"cannot attach with {key}={value!r}"
            )
