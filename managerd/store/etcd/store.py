"""The etcd store: the ``Store`` of ``store/interface.py`` on an etcd cluster.

Any number of gateways (managerd processes) open an ``EtcdStore`` on the
same cluster and prefix, and serve the same objects: every object's state
is in etcd (the primitives of ``queues.py``, ``locks.py``, ``sync.py``,
``values.py``); a gateway keeps only what is its own (its sessions' leases,
its parked calls, the delivery ids it gave its clients).

**Names** ``/m/o/<name>``: the type and creation arguments (JSON), created
with the object's initial state in one Txn (``create_revision == 0``). The
interface's ``get_or_create`` answers at once, so each gateway keeps a
mirror of these keys, loaded when it opens and kept by a watch:
ArgumentConflict and ObjectTypeConflict are raised at once for a name the
mirror knows. **Differs from the memory store**: a name created at the
same moment through another gateway with another type or arguments is
found when the creating Txn fails; the handle then answers every call
with that conflict (the memory store raises it from get_or_create).

**Sessions**: a managerd session gets an etcd lease (``EtcdSession``,
TTL ``session_ttl_s``) at its first call; locks and permits are keys on
it. ``release`` drops the session's parked calls (a blocked acquire
withdraws its key; a call on its way is dropped once it parks), then
revokes the lease (its holdings go to the next live waiter), then returns
its reservations to their queues; later calls on the objects it used
wait for all that, as if it had happened at once. Reservations of a gateway
that died are returned by ``requeue_expired`` of any gateway: each one runs
it every second over the queues it has opened (safe when several do: each
move compares the reservation's revision).

**Calls** return a Task (every answer is a round trip to etcd), which
``run`` files under its session: ``abandon`` and ``cancel`` cancel it.
**Stats** are answered from what this gateway knows without a round trip
(its parked calls; the rest as last read by ``refresh_stats``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, Final, cast

from managerd.store.api import BadArgument, BadState, Call
from managerd.store.etcd.cells import CELLS
from managerd.store.etcd.client import EtcdClient
from managerd.store.etcd.handles import (
    HANDLES,
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
    EventType,
    Get,
    Op,
    Put,
    RangeResult,
    Target,
    name_key,
    prefix_end,
)
from managerd.store.etcd.sessions import DEFAULT_ROOT, EtcdSession
from managerd.store.interface import Handle, Snapshot, TypeInfo
from managerd.store.memory.registry import check_name
from managerd.store.sessions import Session
from managerd.store.stats import ObjectStats, StoreStats
from managerd_client.errors import (
    ArgumentConflict,
    NoSuchObject,
    ObjectTypeConflict,
    ServerShuttingDown,
)

log = logging.getLogger(__name__)

#: The types served, and the handle class of each.
SERVED: Final[dict[str, type[EtcdHandle]]] = {**HANDLES, **CELLS}
TYPE_INFO: Final[Mapping[str, TypeInfo]] = {
    typeid: TypeInfo(typeid, cls.methods, cls.create_params) for typeid, cls in SERVED.items()
}
REQUEUE_INTERVAL_S: Final = 1.0
#: How long a session's end waits for each of its calls still on their way to wait
#: or be answered before it drops them all the same (a net: they never take so long).
END_CALLS_S: Final = 10.0


class EtcdStore:
    """``await EtcdStore.open(client, ...)``; see the module docstring."""

    types: Mapping[str, TypeInfo] = TYPE_INFO

    def __init__(
        self, client: EtcdClient, loop: asyncio.AbstractEventLoop, root: bytes, session_ttl_s: int
    ) -> None:
        self.client = client
        self.loop = loop
        self.root = root
        self.session_ttl_s = session_ttl_s
        self._names = root + b"o/"
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
        self._stats: dict[str, ObjectStats] = {}
        self._closed = False

    @classmethod
    async def open(
        cls,
        client: EtcdClient,
        *,
        root: bytes = DEFAULT_ROOT,
        session_ttl_s: int = 10,
    ) -> EtcdStore:
        """Load the names, then keep them (a watch) and requeue expired reservations."""
        store = cls(client, asyncio.get_running_loop(), root, session_ttl_s)
        read = await client.range(store._names, prefix_end(store._names))
        for kv in read.kvs:
            store._learn(kv.value, kv.create_revision)
        store.background(store._follow(read.revision))
        store.background(store._requeue_loop())
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
            except EtcdError as exc:  # compacted: read all again
                log.warning("etcd store: names watch failed (%s); reading them again", exc)
                read = await self.client.range(self._names, prefix_end(self._names))
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
        creating = self.loop.create_task(self._create(handle, typeid, created, deleting))
        self._changes.add(creating)
        creating.add_done_callback(self._changes.discard)

        def created_or_not(task: asyncio.Task[None]) -> None:
            if task.cancelled():
                handle.ready.cancel()
            elif task.exception() is not None:
                handle.ready.set_exception(cast(BaseException, task.exception()))
                handle.ready.exception()  # retrieved: each call raises it
            else:
                handle.ready.set_result(None)

        creating.add_done_callback(created_or_not)
        return cast(Handle, handle)

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
        done = await self.client.txn(
            [Compare(key, Target.CREATE, "==", 0)],
            [Put(key, entry), *handle.init_ops()],
            [Get(key)],
            idempotent=True,
        )
        if done.succeeded:
            revision = done.revision
        else:
            [read] = done.responses
            assert isinstance(read, RangeResult)
            if read.kvs and read.kvs[0].value != entry:  # not our own retried creation
                found = json.loads(read.kvs[0].value)
                found_args = SERVED[found["type"]].decode_args(found["args"])
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
        await cast(EtcdHandle, self.get_or_create(typeid, name, {})).ready

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
        deleting = self.loop.create_task(self._delete(handle))
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
        ops += [Delete(prefix, prefix_end(prefix)) for prefix in handle.state_prefixes()]
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
        lease = self._lease(session)

        async def run() -> Any:
            # Shielded: cancelling one call must not cancel what every call of the
            # object (its creation) or of the session (its lease) waits for.
            await asyncio.shield(handle.ready)
            return await work(await asyncio.shield(lease))

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
            lease = self.loop.create_task(
                EtcdSession.open(self.client, self.session_ttl_s, root=self.root)
            )
            self._leases[session] = lease
        return lease

    def background(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` for the store (not for a caller); a failure is logged."""
        task = self.loop.create_task(coro)
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
        if not task.cancelled() and task.exception() is not None:
            log.error("etcd store: background work failed", exc_info=task.exception())

    def abandon(
        self, obj: Handle, method: str, session: Session, future: asyncio.Future[Any],
        *, stock: bool = False,
    ) -> None:  # fmt: skip
        cast(EtcdHandle, obj).abandon(method, future, stock=stock)

    def cancel(self, session: Session, future: asyncio.Future[Any]) -> None:
        future.cancel()

    def undo(
        self, obj: Handle, method: str, call: Call, args: tuple[Any, ...], result: Any
    ) -> None:
        getattr(obj, obj.undo_methods[method])(call, args, result)

    def release(self, session: Session) -> None:
        """End ``session``, in the memory store's order: its calls that wait are dropped
        (one still on its way is dropped once it waits, or answered), then its lease
        is revoked (its holdings go to the next live waiter), then its reservations
        go back. Calls made after this on the objects it used wait for all that."""
        calls = self._calls.pop(session, {})
        for answer, in_flight in calls.items():
            in_flight.handle.drop_when_parked(answer)
        queues = self.deliveries.drop(session)
        for key in [k for k in self.tokens if k[0] is session]:
            del self.tokens[key]
        lease = self._leases.pop(session, None)
        ended: asyncio.Future[None] = self.loop.create_future()
        # What came before the end on those objects (any session's calls on their way
        # to wait, earlier ends) comes first: a dead waiter is not handed the lock.
        before: list[asyncio.Future[Any]] = []
        for handle in self._used.pop(session, ()):
            before += [f for f in handle.undos if not f.done()]
            before += [f for f in handle.arrivals.values() if not f.done()]
            handle.end_after(ended)
        ending = self.loop.create_task(self._end(calls, before, lease, queues, ended))
        self._endings.add(ending)
        ending.add_done_callback(self._ended)

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
            if lease is not None:
                etcd_session = await lease
                await etcd_session.close()
            for queue in queues:  # its reservations go back now, not after a deadline
                await queue.queue.requeue_expired()
        finally:
            ended.set_result(None)

    def _ended(self, task: asyncio.Task[None]) -> None:
        self._endings.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("etcd store: ending a session failed", exc_info=task.exception())

    async def _requeue_loop(self) -> None:
        while True:
            await asyncio.sleep(REQUEUE_INTERVAL_S)
            for handle in list(self._handles.values()):
                if isinstance(handle, QueueHandle):
                    try:
                        await handle.queue.requeue_expired()
                    except EtcdError as exc:
                        log.warning("etcd store: requeue of %r failed: %s", handle.name, exc)

    def would_hand_out(
        self, obj: Handle, method: str, call: Call, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> bytes | None:
        """Not answered here (it would take a round trip): None, as for a call that
        fails by itself. (The stock dialect's decode check is then not made first.)"""
        return None

    def snapshot(self, obj: Handle) -> Snapshot:
        raise BadArgument(f"a {obj.typeid} on the etcd store has no whole value to copy yet")

    # -- durability: etcd answers a write once a quorum has it ----------------------------
    def check_writable(self) -> None:
        return None

    def barrier(self) -> asyncio.Future[None] | None:
        return None

    # -- what people look at ------------------------------------------------------------
    def stats(self) -> StoreStats:
        handles = list(self._handles.values())
        return StoreStats(tuple(h.stats() for h in handles), 0)

    async def refresh_stats(self) -> None:
        """Read from etcd what the stats of this gateway's objects show."""
        for handle in list(self._handles.values()):
            await handle.refresh()

    def stats_of(self, obj: Handle) -> ObjectStats:
        return cast(EtcdHandle, obj).stats()

    def deadlocks(self) -> list[dict[str, Any]]:
        """Not looked for across gateways: none reported."""
        return []

    def _fail_calls(self, handle: EtcdHandle, exc: BaseException) -> None:
        for answer in list(handle.calls):
            if not answer.done():
                answer.set_exception(exc)

    def shutdown(self) -> None:
        self._closed = True
        for handle in self._handles.values():
            self._fail_calls(handle, ServerShuttingDown("the daemon is shutting down"))
        for task in list(self._tasks):
            task.cancel()

    async def close(self) -> None:
        """Stop, revoke every session's lease this gateway opened."""
        tasks = list(self._tasks)
        self.shutdown()
        await asyncio.gather(*tasks, *self._changes, *self._endings, return_exceptions=True)
        for session in list(self._leases):
            lease = self._leases.pop(session)
            with contextlib.suppress(Exception):
                await (await lease).close()


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
