"""The etcd store's handles: one class per type served, its exposed methods.

A handle is what ``Gateway.get_or_create`` hands out (``store/interface.py``):
its ``@exposed`` methods check their arguments at once, as the memory
store's objects do (the same helpers, so the same errors), then return a
Task that makes the change in etcd (``Gateway.run``): every answer comes
later, since every answer is a round trip to etcd. The primitives
themselves are the etcd classes of ``queues.py``, ``locks.py``, ``sync.py``
and ``values.py``; a handle maps ``call.session`` to the session's lease and
the calling thread to a lock's owner.

Calls on one handle take effect in the order they were made, as the
memory store's do on its one loop: a call waits, before its work starts,
for every earlier call that may park to have parked or been answered, and
for the undos (``_undo``) and session ends (``end_after``) given before
it; calls that cannot park run side by side. While a call waits for a
change in etcd (``watching.waiting``, once its watch is in step) it is in
``waiting``: parked, not on its way to an answer. A call whose session
ended before it parked is dropped once it parks (``drop_when_parked``).

Served here: Queue, JoinableQueue, Lock, RLock, Semaphore,
BoundedSemaphore, Event, Value, dict, Condition, Barrier and Pipe
(``cells.py``: list, Namespace and Array). Each class says what differs
from the memory store.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import hashlib
import marshal
import pickle
import queue
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, ClassVar, Protocol

from managerd.histogram import Histogram
from managerd.safepickle import SafeDecoder
from managerd.store.api import (
    BadArgument,
    BadState,
    Call,
    Conv,
    MethodSpec,
    NoAttribute,
    exposed,
    methods_of,
)
from managerd.store.etcd.client import EtcdClient, until_answered
from managerd.store.etcd.conditions import EtcdBarrier, EtcdCondition
from managerd.store.etcd.deadlocks import HELD_BY_SELF
from managerd.store.etcd.kv import EventType, Op, Put
from managerd.store.etcd.locks import EtcdLock, EtcdRLock
from managerd.store.etcd.pipes import EtcdPipe
from managerd.store.etcd.queues import (
    DEAD_LETTER_SUFFIX,
    Delivery,
    EtcdQueue,
    Found,
    Holder,
    records_prefix,
    return_records,
)
from managerd.store.etcd.sessions import EtcdSession
from managerd.store.etcd.sync import EtcdEvent, EtcdSemaphore, PermitReturn
from managerd.store.etcd.values import EtcdDict, EtcdValue, check_key
from managerd.store.etcd.watching import WAITING, Still, changed
from managerd.store.etcd.watching import waiting as watching_waiting
from managerd.store.interface import Snapshot
from managerd.store.memory.base import (
    TIMEOUT_MAX,
    SharedObject,
    checked_wait,
    positive_s,
    seconds,
    timeout_s,
    wait_or_now_s,
)
from managerd.store.memory.locks import _acquire_wait_s, _semaphore_wait_s
from managerd.store.memory.mappings import NO_DEFAULT, Dict
from managerd.store.memory.values import _check_typecode, _coerce
from managerd.store.sessions import Session
from managerd.store.stats import (
    BarrierStats,
    ConditionStats,
    EventStats,
    LockStats,
    ObjectStats,
    PipeStats,
    QueueStats,
    SemaphoreStats,
    SizeStats,
    ValueStats,
)
from managerd_client.errors import LockLost

Work = Callable[[EtcdSession], Coroutine[Any, Any, Any]]
#: How much an answer adds to a counter: ``(args, kwargs, result) -> n``.
_Amount = Callable[[tuple[Any, ...], dict[str, Any], Any], int]

_DECODER = SafeDecoder()
DEFAULT_VISIBILITY_TIMEOUT_S = 30.0
_DEADLINE_SLACK_S = 0.01  # a deadline is wall-clock, the timer the loop's


def _reissuing(call: Call) -> tuple[str, str] | None:
    """``(object name, method)`` of the call the calling thread asks again (``REISSUE``)."""
    reissuing = call.session.reissuing
    if reissuing is None or reissuing[0] != call.thread:
        return None
    return reissuing[1], reissuing[2]


def _origin(call: Call) -> int | None:
    """The client's id of the request a call asked again (``REISSUE``) first was; None
    if it is not asked again, or its client did not say."""
    reissuing = call.session.reissuing
    if reissuing is None or reissuing[0] != call.thread:
        return None
    return reissuing[3]


def _first_request(call: Call, name: str, method: str) -> int:
    """The client's id of the request ``call`` first was: for a call of ``method`` on
    ``name`` asked again, the one it had through the gateway that died; else its own
    (0: none known)."""
    origin = _origin(call) if _reissuing(call) == (name, method) else None
    return origin or call.rid


class Deliveries:
    """The delivery ids of this gateway's sessions' reservations, and the etcd
    reservation each stands for.

    An id is an int (as the memory store's), derived from the reservation
    itself (its item id and delivery count): a gateway that took a session
    over finds a reservation made through another gateway by its id
    (``lookup``), so a delivery acks where its session went.
    """

    def __init__(self) -> None:
        self._by_id: dict[int, tuple[Session, QueueHandle, Delivery]] = {}

    @staticmethod
    def id_of(delivery: Delivery) -> int:
        digest = hashlib.blake2b(b"%s/%d" % (delivery.id, delivery.deliveries), digest_size=8)
        return int.from_bytes(digest.digest()) >> 2 or 1

    def add(self, session: Session, queue: QueueHandle, delivery: Delivery) -> int:
        did = self.id_of(delivery)
        self._by_id[did] = (session, queue, delivery)
        return did

    def find(
        self, session: Session, queue: QueueHandle, did: int, *, take: bool
    ) -> Delivery | None:
        """The reservation ``did`` of ``session`` on ``queue`` (forgotten here if
        ``take``); None if this gateway does not know it."""
        entry = self._by_id.get(did)
        if entry is None or entry[0] is not session or entry[1] is not queue:
            return None
        if take:
            del self._by_id[did]
        return entry[2]

    async def lookup(
        self, session: Session, etcd_session: EtcdSession, queue: QueueHandle, did: int
    ) -> Delivery | None:
        """The reservation ``did`` of ``session`` on ``queue`` as etcd has it (made through
        another gateway before the session came here); None if it has none."""
        for delivery in await queue.queue.reserved_by(etcd_session.sid):
            if self.id_of(delivery) == did:
                self._by_id[did] = (session, queue, delivery)
                return delivery
        return None

    def renew(self, did: int, delivery: Delivery) -> None:
        """``did`` stands for ``delivery`` now (a new receipt)."""
        entry = self._by_id.get(did)
        if entry is not None:
            self._by_id[did] = (entry[0], entry[1], delivery)

    def drop(self, session: Session) -> set[QueueHandle]:
        """Forget ``session``'s; the queues it had reserved from."""
        queues = set()
        for did, (s, handle, _) in list(self._by_id.items()):
            if s is session:
                del self._by_id[did]
                queues.add(handle)
        return queues


class Gateway(Protocol):
    """What a handle asks of its store (``store.py``'s ``EtcdStore``)."""

    client: EtcdClient
    root: bytes
    loop: asyncio.AbstractEventLoop
    deliveries: Deliveries
    #: Fencing tokens of this gateway's lock holdings: (session, name, owner) -> token.
    tokens: dict[tuple[Session, str, str], int]
    #: Per client thread, the unconfirmed records of its last get (``queues.Holder``),
    #: until its next call; and those found when its session was taken over here.
    unconfirmed: dict[tuple[Session, int], list[bytes]]
    found: dict[tuple[Session, int], Found]

    def run(
        self, handle: EtcdHandle, call: Call, work: Work, *, parks: bool
    ) -> asyncio.Future[Any]: ...
    def background(self, coro: Coroutine[Any, Any, Any]) -> None: ...
    def background_as(self, session: Session, work: Work) -> None: ...
    async def ensure(self, name: str, typeid: str) -> None: ...
    def lock_for(self, name: str) -> LockHandle: ...
    def parking(self, handle: EtcdHandle, call: Call, answer: asyncio.Future[Any]) -> None: ...


def _unwaitable(wait_s: float | None) -> bool:
    """A wait the memory store refuses only if the call has to wait (NaN, too long):
    the call is tried without waiting, and ``checked_wait`` raises if it would."""
    return wait_s is not None and not 0 <= wait_s <= TIMEOUT_MAX


class EtcdHandle:
    """A named object of the etcd store (see the module docstring)."""

    typeid: ClassVar[str]
    create_params: ClassVar[tuple[str, ...]] = ()
    methods: ClassVar[dict[str, MethodSpec]]
    builtin_type_errors: ClassVar[bool] = False
    undo_methods: ClassVar[dict[str, str]] = {}
    #: Methods whose answers this gateway counts (``counts``): the counter, and how much
    #: an answer adds (the status's ``puts_total``, ``acquires_total``...).
    counted: ClassVar[dict[str, tuple[str, _Amount]]] = {}

    async def snapshot(self) -> Snapshot:
        """The whole value as stored, read now (``Store.snapshot``); BadArgument for a
        type with none (a lock, an event...)."""
        raise BadArgument(f"a {self.typeid} has no value to copy")

    #: Whether :meth:`snapshot` has a value to give (checked before any read).
    copyable: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.methods = {
            name: _counting(spec, *cls.counted[name]) if name in cls.counted else spec
            for name, spec in methods_of(cls).items()
        }

    def __init__(self, store: Gateway, name: str, args: Mapping[str, Any]) -> None:
        self.store = store
        self.name = name
        #: The revision that created it in etcd (0 until known).
        self.revision = 0
        #: Done once the object exists in etcd (its creating Txn, or found there).
        self.ready: asyncio.Future[None] = store.loop.create_future()
        #: This gateway's calls in flight here, and those of them that wait.
        self.calls: set[asyncio.Future[Any]] = set()
        self.parked: set[asyncio.Future[Any]] = set()
        #: What the last ``refresh`` read (the stats' numbers).
        self.seen: dict[str, Any] = {}
        #: Calls waiting for a change in etcd now, and whether each still does.
        self.waiting: dict[asyncio.Future[Any], Still] = {}
        #: Undos under way (``_undo``), and ends of sessions that used it: later calls
        #: here wait for them.
        self.undos: list[asyncio.Future[None]] = []
        #: What this gateway's answers counted (``counted``).
        self.counts: dict[str, int] = {}
        #: Each call that may park, done once it has arrived: parked or answered. A
        #: call made after it waits for that first, so calls here take effect in
        #: the order they were made, as in the memory store (``_run``).
        self.arrivals: dict[asyncio.Future[Any], asyncio.Future[None]] = {}
        #: Calls whose session ended before they arrived: dropped once they park.
        self._dropping: set[asyncio.Future[Any]] = set()

    def creation_args(self) -> dict[str, Any]:
        """What a later get-or-create compares (as the memory store's ``creation_args``)."""
        return {}

    @classmethod
    def encode_args(cls, args: dict[str, Any]) -> dict[str, Any]:
        """``creation_args`` as JSON for the names key (``decode_args`` reads it back)."""
        return args

    @classmethod
    def decode_args(cls, args: dict[str, Any]) -> dict[str, Any]:
        return args

    @classmethod
    def same_arg(cls, name: str, created: Any, given: Any) -> bool:
        """Whether a get-or-create's ``given`` value of argument ``name`` attaches to an
        object made with ``created``."""
        return bool(created == given)

    def init_ops(self) -> list[Op]:
        """The puts that make its initial state, in the creating Txn."""
        return []

    def state_prefixes(self) -> list[bytes]:
        """Every key of its state is one of these, or starts with one ending with
        ``/`` (what ``delete`` removes: a key alone, or a prefix's range)."""
        raise NotImplementedError

    async def refresh(self) -> None:
        """Read what its stats show."""

    def stats(self) -> ObjectStats:
        return ObjectStats(self.name, self.typeid, self.creation_args())

    def _run(self, call: Call, work: Work, *, parks: bool = False, unwinds: bool = False) -> Any:
        """Run ``work`` for ``call``; the answer's future.

        The work starts once what came before the call here is done: the undos
        and session ends given before it (``_undo``, ``end_after``), and the
        arrival of every earlier call that may park. So a call sees what an
        earlier one changed (an acquire that queued, a party that arrived) as
        the memory store's calls, made in turn on one loop, do; calls that
        cannot park do not wait for one another. While the work waits for a
        change in etcd, the call is in ``waiting`` (``watching.waiting``).

        ``unwinds``: cancelled, the work takes back what it wrote (an acquire's
        contender key, once its put is answered: ``client.settled``); calls made
        here after the cancel wait for that, as the memory store's next call finds
        a cancelled waiter gone. It must not wait for other calls meanwhile.
        """
        answer: list[asyncio.Future[Any]] = []
        before = [f for f in self.undos if not f.done()]
        before += [f for f in self.arrivals.values() if not f.done()]
        working: list[asyncio.Future[None]] = []

        async def ordered(session: EtcdSession) -> Any:
            WAITING.set(self._marker(answer, call))
            if before:
                await asyncio.wait(before)
            if not unwinds:
                return await work(session)
            worked: asyncio.Future[None] = self.store.loop.create_future()
            working.append(worked)
            try:
                return await work(session)
            finally:
                worked.set_result(None)

        future: asyncio.Future[Any] = self.store.run(self, call, ordered, parks=parks)
        answer.append(future)
        if parks:
            arrived: asyncio.Future[None] = self.store.loop.create_future()
            self.arrivals[future] = arrived
        future.add_done_callback(self._answered)
        if unwinds:

            def unwinding(future: asyncio.Future[Any]) -> None:
                if future.cancelled() and working and not working[0].done():
                    self.end_after(working[0])

            future.add_done_callback(unwinding)
        return future

    def _answered(self, future: asyncio.Future[Any]) -> None:
        self.waiting.pop(future, None)
        self._dropping.discard(future)
        arrived = self.arrivals.pop(future, None)
        if arrived is not None and not arrived.done():
            arrived.set_result(None)

    def _marker(
        self, answer: list[asyncio.Future[Any]], call: Call
    ) -> Callable[[Still | None], None]:
        """What ``watching.waiting`` tells: the call ``answer[0]`` waits (or no longer);
        the store puts a wait on a lock on the wait-for graph (``store.parking``)."""

        def mark(still: Still | None) -> None:
            if not answer or answer[0].done():
                return
            future = answer[0]
            if still is None:
                self.waiting.pop(future, None)
                return
            self.waiting[future] = still
            self.store.parking(self, call, future)
            arrived = self.arrivals.pop(future, None)
            if arrived is not None and not arrived.done():
                arrived.set_result(None)
            if future in self._dropping:
                future.cancel()

        return mark

    def drop_when_parked(self, future: asyncio.Future[Any]) -> None:
        """The session of the call ``future`` ended: drop it now if it waits, else once it
        does (a call on its way to an answer is answered, as in the memory store,
        where it was answered before the session ended)."""
        if future.done():
            return
        if future in self.waiting:
            future.cancel()
        else:
            self._dropping.add(future)

    def end_after(self, done: asyncio.Future[None]) -> None:
        """Calls made here from now on wait for ``done`` (a session's end under way)."""
        self.undos.append(done)
        done.add_done_callback(self.undos.remove)

    def waits_now(self, future: asyncio.Future[Any]) -> bool:
        """Whether the call ``future`` is parked: waiting for a change in etcd."""
        still = self.waiting.get(future)
        return still is not None and still()

    def _undo(
        self, work: Callable[[], Coroutine[Any, Any, Any]], *, repeatable: bool = False
    ) -> None:
        """Give back what an answered call handed out (``work()``); calls made here after
        it wait for it (as the memory store's undo is done before its next call).
        ``repeatable``: work safe to make again (``client.until_answered``), made again
        while etcd is out of reach rather than dropped."""
        before = [f for f in self.undos if not f.done()]
        finished: asyncio.Future[None] = self.store.loop.create_future()
        self.undos.append(finished)

        async def undo() -> None:
            try:
                if before:
                    await asyncio.wait(before)  # in the order they were given
                if repeatable:
                    await until_answered(work)
                else:
                    await work()
            finally:
                finished.set_result(None)
                self.undos.remove(finished)

        self.store.background(undo())

    def _undo_as(self, session: Session, work: Work, *, repeatable: bool = False) -> None:
        """``_undo`` of work that needs the session's lease. ``repeatable``: work safe
        to make again (``client.until_answered``), made again while etcd is out of
        reach rather than dropped."""
        before = [f for f in self.undos if not f.done()]
        finished: asyncio.Future[None] = self.store.loop.create_future()
        self.undos.append(finished)

        async def undo(etcd_session: EtcdSession) -> None:
            try:
                if before:
                    await asyncio.wait(before)
                if repeatable:
                    await until_answered(lambda: work(etcd_session))
                else:
                    await work(etcd_session)
            finally:
                finished.set_result(None)
                self.undos.remove(finished)

        self.store.background_as(session, undo)

    def abandon(self, method: str, future: asyncio.Future[Any], *, stock: bool = False) -> None:
        """The client gave up the call ``future`` (an interrupt): by default it is
        dropped, as a session's end drops it (Condition and Barrier say otherwise)."""
        future.cancel()


def _counting(spec: MethodSpec, counter: str, amount: _Amount) -> MethodSpec:
    """``spec`` whose answers add ``amount(args, kwargs, result)`` to the handle's
    ``counts[counter]``."""
    inner = spec.fn

    # Its signature is the method's (``__wrapped__``): the invoker tells a call whose
    # arguments do not fit (the caller's TypeError) from one that failed inside.
    @functools.wraps(inner)
    def fn(self: EtcdHandle, call: Call, *args: Any, **kwargs: Any) -> Any:
        answer = inner(self, call, *args, **kwargs)

        def count(answer: asyncio.Future[Any]) -> None:
            if not answer.cancelled() and answer.exception() is None:
                added = amount(args, kwargs, answer.result())
                self.counts[counter] = self.counts.get(counter, 0) + added

        if isinstance(answer, asyncio.Future):
            answer.add_done_callback(count)
        return answer

    return dataclasses.replace(spec, fn=fn)


def _one(args: tuple[Any, ...], kwargs: dict[str, Any], result: Any) -> int:
    return 1


def _items_put(args: tuple[Any, ...], kwargs: dict[str, Any], result: Any) -> int:
    return len(args[0] if args else kwargs["items"])


def _items_got(args: tuple[Any, ...], kwargs: dict[str, Any], result: Any) -> int:
    return len(result)


def _acquired(args: tuple[Any, ...], kwargs: dict[str, Any], result: Any) -> int:
    return int(result is not False)


class QueueHandle(EtcdHandle):
    """``queue.Queue`` with reserve/ack/nack/extend, dead letters and ``task_done``/``join``.

    ``maxsize`` is exact across gateways: a put is made only if no ready
    item was added since the count it read (``queues.py``). **Differs from
    the memory store**: ``puts_total`` and
    ``gets_total`` are not counted; a queue whose name ends in ``.dead`` has
    no dead letters of its own.
    """

    typeid = "Queue"
    create_params = ("maxsize", "visibility_timeout_s", "max_deliveries")
    copyable = True

    async def snapshot(self) -> Snapshot:
        """The items waiting, in order (not those reserved), as the memory store copies."""
        return Snapshot(await self.queue.items(), Conv.PAYLOADS)

    undo_methods: ClassVar[dict[str, str]] = {
        "get": "_undo_get",
        "get_nowait": "_undo_get",
        "get_many": "_undo_get_many",
        "reserve": "_undo_reserve",
    }
    counted: ClassVar[dict[str, tuple[str, _Amount]]] = {
        "put": ("puts_total", _one),
        "put_nowait": ("puts_total", _one),
        "put_many": ("puts_total", _items_put),
        "get": ("gets_total", _one),
        "get_nowait": ("gets_total", _one),
        "get_many": ("gets_total", _items_got),
        "reserve": ("gets_total", _one),
    }

    def __init__(self, store: Gateway, name: str, args: Mapping[str, Any]) -> None:
        super().__init__(store, name, args)
        maxsize = args.get("maxsize", 0)
        if not isinstance(maxsize, int) or isinstance(maxsize, bool):
            raise BadArgument("maxsize must be an int")
        self.maxsize = maxsize
        self.visibility_timeout_s = positive_s(
            args.get("visibility_timeout_s", DEFAULT_VISIBILITY_TIMEOUT_S), "visibility_timeout_s"
        )
        max_deliveries = args.get("max_deliveries", 0)
        if not isinstance(max_deliveries, int) or max_deliveries < 0:
            raise ValueError("max_deliveries must be a non-negative int")
        self.max_deliveries = max_deliveries
        self.queue = EtcdQueue(
            store.client,
            name,
            root=store.root,
            maxsize=max(maxsize, 0),
            max_deliveries=max_deliveries,
            dead_letters=not name.endswith(DEAD_LETTER_SUFFIX),
        )
        self.queue.before_dead_letter = self._name_dead_letters

    async def _name_dead_letters(self) -> None:
        await self.store.ensure(self.name + DEAD_LETTER_SUFFIX, "Queue")

    def creation_args(self) -> dict[str, Any]:
        return {
            "maxsize": self.maxsize,
            "visibility_timeout_s": self.visibility_timeout_s,
            "max_deliveries": self.max_deliveries,
        }

    @property
    def _bound(self) -> int:
        return self.maxsize if self.maxsize > 0 else 0

    @exposed(item=Conv.PAYLOAD, mutates=True)
    def put(self, call: Call, item: bytes, block: bool = True, timeout: float | None = None) -> Any:
        return self._put(call, [item], timeout_s(block, timeout))

    @exposed(item=Conv.PAYLOAD, mutates=True)
    def put_nowait(self, call: Call, item: bytes) -> Any:
        return self._put(call, [item], 0.0)

    @exposed(items=Conv.PAYLOADS, mutates=True)
    def put_many(
        self, call: Call, items: list[bytes], block: bool = True, timeout: float | None = None
    ) -> Any:
        """Put all of ``items`` in order; with a maxsize, waits for room for all."""
        if not isinstance(items, (list, tuple)):
            raise BadArgument("put_many takes a list of items")
        if self._bound and len(items) > self._bound:
            raise ValueError(f"{len(items)} items can never fit a queue of maxsize {self.maxsize}")
        return self._put(call, list(items), timeout_s(block, timeout))

    def _put(self, call: Call, items: list[bytes], wait_s: float | None) -> Any:
        for item in items:
            if not isinstance(item, bytes):
                raise BadArgument("queue items travel as pickled bytes")
        # The thread's last get is confirmed in the put's own Txn (``_get``).
        self.store.found.pop((call.session, call.thread), None)
        read = self.store.unconfirmed.pop((call.session, call.thread), [])
        if _unwaitable(wait_s):

            async def put_or_refuse(_: EtcdSession) -> None:
                try:
                    await self.queue.put_many(items, 0.0, read)
                except queue.Full:
                    checked_wait(wait_s)  # it would wait: the wait's own error
                    raise

            return self._run(call, put_or_refuse)
        parks = bool(self._bound) and wait_s != 0.0
        return self._run(call, lambda _: self.queue.put_many(items, wait_s, read), parks=parks)

    @exposed(result=Conv.PAYLOAD, mutates=True)
    def get(self, call: Call, block: bool = True, timeout: float | None = None) -> Any:
        wait_s = timeout_s(block, timeout)
        if wait_s == 0.0:
            return self._get(call, "get", self.queue.get_nowait)
        if _unwaitable(wait_s):

            async def get_or_refuse(holder: Holder) -> bytes:
                try:
                    return await self.queue.get_nowait(holder)
                except queue.Empty:
                    checked_wait(wait_s)  # it would wait: the wait's own error
                    raise

            return self._get(call, "get", get_or_refuse)
        return self._get(call, "get", lambda h: self.queue.get(wait_s, h), parks=True)

    @exposed(result=Conv.PAYLOAD, mutates=True)
    def get_nowait(self, call: Call) -> Any:
        return self._get(call, "get_nowait", self.queue.get_nowait)

    def _get(
        self,
        call: Call,
        method: str,
        take: Callable[[Holder], Coroutine[Any, Any, Any]],
        *,
        parks: bool = False,
    ) -> Any:
        """A get of the calling client thread, its items kept as unconfirmed records
        (``queues.Holder``) until the thread's next call; this call confirms the
        thread's previous answer (the deletes ride in its take's Txn).

        A get the client asks again (``REISSUE``: its gateway died under it) is
        answered with the records the dead gateway had taken for it, if the thread
        has records of just such a call: the item taken is the one answered, so it
        is delivered once and the queue's order stands. (Records of any other call
        were read: this call confirms them.)
        """
        key = (call.session, call.thread)
        confirm = self.store.unconfirmed.pop(key, [])
        found = self.store.found.pop(key, None)
        origin = _origin(call)
        if (
            found is not None
            and found.answer is not None
            and found.answer[:2] == (self.name, method)
            and _reissuing(call) == (self.name, method)
            # Taken for this very request, not for an earlier one that was answered
            # (a client that names it; records made before request ids have none).
            and (origin is None or found.rid in (None, origin))
        ):
            self.store.unconfirmed[key] = confirm  # handed again: still not read
            payloads = found.answer[2]

            async def again(_: EtcdSession) -> Any:
                return list(payloads) if method == "get_many" else payloads[0]

            return self._run(call, again)

        async def work(session: EtcdSession) -> Any:
            holder = Holder(
                records_prefix(self.store.root, session.sid, call.thread),
                method,
                self.revision,
                confirm,
                rid=_first_request(call, self.name, method),
            )
            try:
                result = await take(holder)
            finally:
                if holder.confirm:  # not confirmed by a take (an error)
                    self.store.background(self.queue.confirm([holder]))
            if holder.records:
                self.store.unconfirmed[key] = holder.records
            return result

        return self._run(call, work, parks=parks)

    @exposed(result=Conv.PAYLOADS, mutates=True)
    def get_many(
        self, call: Call, max_items: int, block: bool = True, timeout: float | None = None
    ) -> Any:
        """Up to ``max_items`` items; waits (as ``get``) only while there are none."""
        if not isinstance(max_items, int) or max_items < 1:
            raise ValueError("max_items must be a positive int")
        max_items = int(max_items)  # True is 1, as in the memory store (etcd takes no bool)
        wait_s = timeout_s(block, timeout)
        if _unwaitable(wait_s):

            async def get_many_or_refuse(holder: Holder) -> list[bytes]:
                try:
                    return await self.queue.get_many(max_items, 0.0, holder)
                except queue.Empty:
                    checked_wait(wait_s)  # it would wait: the wait's own error
                    raise

            return self._get(call, "get_many", get_many_or_refuse)
        return self._get(
            call, "get_many", lambda h: self.queue.get_many(max_items, wait_s, h),
            parks=wait_s != 0.0,
        )  # fmt: skip

    def _undo_get(self, call: Call, args: tuple[Any, ...], payload: bytes) -> None:
        """An answered get whose client left: the item goes back to its place (its
        unconfirmed record), else first."""
        self._undo_get_many(call, args, [payload])

    def _undo_get_many(self, call: Call, args: tuple[Any, ...], payloads: list[bytes]) -> None:
        key = (call.session, call.thread)
        self.store.found.pop(key, None)
        records = self.store.unconfirmed.pop(key, None)
        if records:
            self._undo(lambda: self._return_records(records), repeatable=True)
            return
        # The ids are taken once, here: a try made again puts each item under the same
        # id, so one applied unanswered fails its compares (``put_front``); a new id
        # each try would put it twice.
        ids = [self.queue._ids.next() for _ in payloads]

        async def put_back() -> None:
            # The last put first goes behind the others (the oldest id sorts last).
            for payload, iid in zip(reversed(payloads), ids, strict=True):
                await self.queue.put_front(payload, iid)

        self._undo(put_back, repeatable=True)

    async def _return_records(self, keys: list[bytes]) -> None:
        """The items of the unconfirmed records ``keys`` back at their places. Safe to
        make again: each move compares its record's revision and deletes it, so a
        record moved by a try whose answer was lost is gone when read again."""
        kvs = [kv for key in keys if (kv := await self.store.client.get(key)) is not None]
        await return_records(self.store.client, self.store.root, kvs)

    def _undo_reserve(self, call: Call, args: tuple[Any, ...], result: Any) -> None:
        """A reservation whose client never saw it: back to its place, the delivery not
        counted (nothing happens if it was acked, nacked or redelivered meanwhile)."""
        delivery = self.store.deliveries.find(call.session, self, result[0], take=True)
        if delivery is not None:
            unseen = dataclasses.replace(delivery, deliveries=delivery.deliveries - 1)
            # The nack compares the reservation's receipt: a try applied unanswered is
            # gone from ``r/`` when made again (nothing moves twice).
            self._undo(lambda: self.queue.nack(unseen, True), repeatable=True)

    @exposed()
    def qsize(self, call: Call) -> Any:
        return self._run(call, lambda _: self.queue.qsize())

    @exposed()
    def empty(self, call: Call) -> Any:
        async def empty(_: EtcdSession) -> bool:
            return await self.queue.qsize() == 0

        return self._run(call, empty)

    @exposed()
    def full(self, call: Call) -> Any:
        async def full(_: EtcdSession) -> bool:
            return bool(self._bound) and await self.queue.qsize() >= self._bound

        return self._run(call, full)

    @exposed(mutates=True)
    def task_done(self, call: Call) -> Any:
        return self._run(call, lambda _: self.queue.task_done())

    @exposed()
    def join(self, call: Call, timeout: float | None = None) -> Any:
        wait_s = timeout_s(True, timeout)
        if _unwaitable(wait_s):

            async def join_or_refuse(_: EtcdSession) -> None:
                try:
                    await self.queue.join(0.0)
                except TimeoutError:
                    checked_wait(wait_s)  # it would wait: the wait's own error
                    raise

            return self._run(call, join_or_refuse)
        return self._run(call, lambda _: self.queue.join(wait_s), parks=True)

    @exposed(mutates=True)
    def reserve(self, call: Call, timeout: float | None = None) -> Any:
        """``(delivery_id, payload, deliveries)``; ``queue.Empty`` on timeout."""
        wait_s = timeout_s(True, timeout)
        unwaitable = _unwaitable(wait_s)  # (as get: refused only if it would wait)

        async def reserve(session: EtcdSession) -> tuple[int, bytes, int]:
            try:
                delivery = await self.queue.reserve(
                    session, self.visibility_timeout_s, 0.0 if unwaitable else wait_s
                )
            except queue.Empty:
                if unwaitable:
                    checked_wait(wait_s)
                raise
            self._expire_after(self.visibility_timeout_s)
            did = self.store.deliveries.add(call.session, self, delivery)
            return did, delivery.payload, delivery.deliveries

        return self._run(call, reserve, parks=wait_s != 0.0 and not unwaitable)

    def _delivery(self, call: Call, did: int, *, take: bool) -> Delivery | None:
        """The reservation ``did`` as this gateway knows it; None: ``_reserved`` looks."""
        if not isinstance(did, int) or isinstance(did, bool):
            raise BadArgument(f"a delivery id is an int, not {type(did).__name__}")
        return self.store.deliveries.find(call.session, self, did, take=take)

    async def _reserved(
        self, call: Call, session: EtcdSession, did: int, known: Delivery | None, *, take: bool
    ) -> Delivery:
        """``known``, else the reservation ``did`` as etcd has it (the session was taken
        over from another gateway); ValueError if the session has no such reservation."""
        delivery = known or await self.store.deliveries.lookup(call.session, session, self, did)
        if delivery is None:
            raise ValueError(
                f"delivery {did} of queue {self.name!r} is not reserved by this session "
                "(already acked or nacked, or it timed out and was redelivered)"
            )
        if take and known is None:
            self.store.deliveries.find(call.session, self, did, take=True)
        return delivery

    @exposed(mutates=True)
    def ack(self, call: Call, did: int) -> Any:
        known = self._delivery(call, did, take=True)

        async def ack(session: EtcdSession) -> None:
            delivery = await self._reserved(call, session, did, known, take=True)
            if not await self.queue.ack(delivery):
                raise ValueError(f"delivery {did} of queue {self.name!r} timed out: redelivered")

        return self._run(call, ack)

    @exposed(mutates=True)
    def nack(self, call: Call, did: int, requeue: bool = True) -> Any:
        known = self._delivery(call, did, take=True)

        async def nack(session: EtcdSession) -> None:
            delivery = await self._reserved(call, session, did, known, take=True)
            if not await self.queue.nack(delivery, bool(requeue)):
                raise ValueError(f"delivery {did} of queue {self.name!r} timed out: redelivered")

        return self._run(call, nack)

    @exposed()
    def extend(self, call: Call, did: int, seconds: float) -> Any:
        extend_s = positive_s(seconds, "seconds")
        known = self._delivery(call, did, take=False)

        async def extend(session: EtcdSession) -> None:
            delivery = await self._reserved(call, session, did, known, take=False)
            extended = await self.queue.extend(delivery, extend_s)
            if extended is None:
                self.store.deliveries.find(call.session, self, did, take=True)
                raise ValueError(f"delivery {did} of queue {self.name!r} timed out: redelivered")
            self.store.deliveries.renew(did, extended)
            self._expire_after(extend_s)

        return self._run(call, extend)

    def _expire_after(self, seconds: float) -> None:
        """Return reservations past their deadline at this one's (the requeue loop of
        every gateway is the net for a gateway that died)."""

        def expire() -> None:
            self.store.background(self.queue.requeue_expired())

        self.store.loop.call_later(seconds + _DEADLINE_SLACK_S, expire)

    @exposed()
    def reserved_count(self, call: Call) -> Any:
        return self._run(call, lambda _: self.queue.reserved_count())

    def state_prefixes(self) -> list[bytes]:
        return [self.queue.base]

    async def refresh(self) -> None:
        self.seen = {
            "depth": await self.queue.qsize(),
            "reserved": await self.queue.reserved_count(),
            "unfinished": await self.queue.unfinished(),
        }

    def stats(self) -> QueueStats:
        return QueueStats(
            self.name,
            self.typeid,
            self.creation_args(),
            depth=self.seen.get("depth", 0),
            reserved=self.seen.get("reserved", 0),
            waiters=len(self.parked),
            puts_total=0,
            gets_total=0,
            unfinished=self.seen.get("unfinished", 0),
        )


class JoinableQueueHandle(QueueHandle):
    """``multiprocessing.JoinableQueue``: a Queue under its own type name."""

    typeid = "JoinableQueue"


class LockHandle(EtcdHandle):
    """``threading.Lock``: one holder, any client may release it; a fencing token."""

    typeid = "Lock"
    undo_methods: ClassVar[dict[str, str]] = {"acquire": "_undo_acquire"}
    counted: ClassVar[dict[str, tuple[str, _Amount]]] = {"acquire": ("acquires_total", _acquired)}
    lock_class: ClassVar[type[EtcdLock]] = EtcdLock

    def __init__(self, store: Gateway, name: str, args: Mapping[str, Any]) -> None:
        super().__init__(store, name, args)
        self.lock = self.lock_class(store.client, name, root=store.root)

    def state_prefixes(self) -> list[bytes]:
        return [self.lock.prefix]

    async def refresh(self) -> None:
        held = await self.lock.holder()
        self.seen = {"token": 0 if held is None else held[1], "held": held is not None}

    def stats(self) -> LockStats:
        return LockStats(
            self.name,
            self.typeid,
            self.creation_args(),
            holder={"id": "?"} if self.seen.get("held") else None,
            held_for_s=None,
            token=self.seen.get("token", 0),
            waiters=len(self.parked),
            waiting=(),
            acquires_total=0,
            wait_seconds=Histogram(),
            hold_seconds=Histogram(),
        )

    def _owner(self, call: Call) -> str:
        # A Lock is held by its session, an RLock by one thread of it.
        return ""

    @exposed(result=Conv.ACQUIRED, mutates=True)
    def acquire(self, call: Call, blocking: bool = True, timeout: float = -1) -> Any:
        wait_s = _acquire_wait_s(blocking, timeout)
        owner = self._owner(call)
        # Asked again after the gateway that had it died: its key keeps its place.
        again = _reissuing(call) == (self.name, "acquire")

        note = b"@%d" % call.thread  # who holds a Lock: for status and the wait-for graph
        request = _first_request(call, self.name, "acquire")  # an RLock keeps it

        async def acquire(session: EtcdSession) -> int | bool:
            take = self.lock.adopt if again else self.lock.acquire
            try:
                token = await take(
                    session,
                    owner,
                    blocking=wait_s != 0.0,
                    timeout_s=wait_s or None,
                    caller=call.thread,
                    note=note,
                    request=request,
                )
            except RuntimeError:  # a Lock this session holds already: it waits (threading's)
                token = await self._wait_held_by_self(session, owner, wait_s, call.thread, note)
            if token is None:
                return False
            self.store.tokens[(call.session, self.name, owner)] = token
            return token

        return self._run(call, acquire, parks=wait_s != 0.0, unwinds=True)

    async def _wait_held_by_self(
        self,
        session: EtcdSession,
        owner: str,
        wait_s: float | None,
        caller: int = 0,
        note: bytes = b"",
    ) -> int | None:
        """A second acquire of a held Lock by its own session: not a re-entry. It waits
        for a release (by anyone), then contends again."""
        if wait_s == 0.0:
            return None
        HELD_BY_SELF.set(True)  # this task's wait is on its own holding (deadlocks.py)
        key = self.lock._key(session, owner)
        try:
            async with asyncio.timeout(wait_s):
                while True:
                    read = await self.store.client.range(key)
                    if read.kvs:
                        await changed(
                            self.store.client, key, after_revision=read.revision,
                            kind=EventType.DELETE,
                        )  # fmt: skip
                    try:
                        return await self.lock.acquire(session, owner, caller=caller, note=note)
                    except RuntimeError:
                        continue  # held by its own session again: wait on
        except TimeoutError:
            return None

    def _undo_acquire(self, call: Call, args: tuple[Any, ...], token: Any) -> None:
        owner = self._owner(call)
        if self.store.tokens.get((call.session, self.name, owner)) != token:
            return

        async def undo(session: EtcdSession) -> None:
            try:
                await self.lock.release(session, token, owner)
            except LockLost:
                pass

        # A Lock's release by its token: made again until etcd answers, or a lock granted
        # to a caller that left would stay held, for nobody, while its session lives.
        # (An RLock's release lowers a count: one applied unanswered and made again
        # would let go of a level the thread holds.)
        self._undo_as(call.session, undo, repeatable=type(self.lock) is EtcdLock)

    @exposed(mutates=True)
    def release(self, call: Call) -> Any:
        """The caller's own holding, by its token; else whoever holds it, as
        ``threading.Lock`` lets anyone release it. ``LockLost`` if the caller's
        holding went with its session's lease (another may hold the lock now: it
        is not released for them)."""
        holding = (call.session, self.name, self._owner(call))

        async def release(session: EtcdSession) -> None:
            token = self.store.tokens.get(holding)
            if token is not None:
                try:
                    await self.lock.release(session, token, holding[2])
                except LockLost:
                    self.store.tokens.pop(holding, None)
                    if await self.store.client.lease_time_to_live(session.lease_id) <= 0:
                        session.lost.set()  # the session ends (store._end_when_lost)
                        raise
                    # Released by another client meanwhile (anyone may): threading's
                    # answer, below.
                else:
                    self.store.tokens.pop(holding, None)
                    return
            if not await self.lock.release_holder():
                raise BadState("release unlocked lock")

        return self._run(call, release)

    @exposed()
    def locked(self, call: Call) -> Any:
        async def locked(_: EtcdSession) -> bool:
            return await self.lock.holder() is not None

        return self._run(call, locked)

    @exposed()
    def fencing_token(self, call: Call) -> Any:
        """The token of the current holding (0 if free: etcd keeps no past holder)."""

        async def fencing_token(_: EtcdSession) -> int:
            held = await self.lock.holder()
            return 0 if held is None else held[1]

        return self._run(call, fencing_token)


class RLockHandle(LockHandle):
    """``threading.RLock``: owned by one client thread, re-entrant."""

    typeid = "RLock"
    lock_class = EtcdRLock

    def _owner(self, call: Call) -> str:
        return str(call.thread)

    @exposed(mutates=True)
    def release(self, call: Call) -> Any:
        owner = self._owner(call)

        async def release(session: EtcdSession) -> None:
            # The holding's token as etcd has it (a Condition's wait may have taken it
            # back a moment ago, its answer not yet given).
            kv = await self.store.client.get(self.lock._key(session, owner))
            held = await self.lock.holder()
            if kv is None or held is None or held[0] != kv.key:
                raise BadState("cannot release un-acquired lock")
            await self.lock.release(session, kv.create_revision, owner)

        return self._run(call, release)


class SemaphoreHandle(EtcdHandle):
    """``threading.Semaphore``; permits taken by a session return when it ends."""

    typeid = "Semaphore"
    create_params = ("value",)
    bounded = False
    undo_methods: ClassVar[dict[str, str]] = {"acquire": "_undo_acquire"}

    def __init__(self, store: Gateway, name: str, args: Mapping[str, Any]) -> None:
        super().__init__(store, name, args)
        value = args.get("value", 1)
        if not isinstance(value, int) or isinstance(value, bool):
            raise BadArgument("semaphore value must be an int")
        if value < 0:
            raise ValueError("semaphore initial value must be >= 0")
        self.initial = value
        self.sem = EtcdSemaphore(store.client, name, bounded=self.bounded, root=store.root)

    def state_prefixes(self) -> list[bytes]:
        return [self.sem.base]

    async def refresh(self) -> None:
        value, held = await self.sem.holdings()
        self.seen = {"value": value, "held": held}

    def stats(self) -> SemaphoreStats:
        held = self.seen.get("held", [])
        return SemaphoreStats(
            self.name,
            self.typeid,
            self.creation_args(),
            value=self.seen.get("value", self.initial),
            held=sum(n for _, n in held),
            holders=tuple({"id": sid, "permits": n} for sid, n in held),
            token=0,
            waiters=len(self.parked),
            waiting=(),
            wait_seconds=Histogram(),
        )

    def creation_args(self) -> dict[str, Any]:
        return {"value": self.initial}

    def init_ops(self) -> list[Op]:
        return [Put(self.sem.permits_key, b"%d" % self.initial)]

    @exposed(result=Conv.ACQUIRED, mutates=True)
    def acquire(self, call: Call, blocking: bool = True, timeout: float | None = -1) -> Any:
        """Asked again after the gateway that ran it died (``REISSUE``), the acquire is
        the request it first was: its contender key keeps its place in line, or its
        permit, granted there with the answer lost, is this call's (``sync.py``)."""
        wait_s = _semaphore_wait_s(blocking, timeout)
        unwaitable = _unwaitable(wait_s)
        request = _first_request(call, self.name, "acquire")

        async def acquire(session: EtcdSession) -> int | bool:
            blocks = wait_s != 0.0 and not unwaitable
            token = await self.sem.acquire(
                session, blocking=blocks, timeout_s=wait_s or None, request=request
            )
            if token is None and unwaitable:
                checked_wait(wait_s)  # it would wait: the wait's own error
            return False if token is None else token

        return self._run(call, acquire, parks=wait_s != 0.0, unwinds=True)

    def _undo_acquire(self, call: Call, args: tuple[Any, ...], token: Any) -> None:
        """The permit the acquire was answered with goes back, made again until etcd
        answers (``sync.PermitReturn``: not a release, which is not safe to repeat);
        if the session released that one meanwhile, another it holds, as the memory
        store's undo gives one back while the session holds any."""
        if isinstance(token, int) and not isinstance(token, bool):
            self._undo_as(call.session, PermitReturn(self.sem, token), repeatable=True)

    @exposed(mutates=True)
    def release(self, call: Call, n: int = 1) -> Any:
        if not isinstance(n, int):
            raise BadArgument(f"n must be an int, not {type(n).__name__}")
        if n < 1:
            raise ValueError("n must be one or more")
        return self._run(call, lambda session: self.sem.release(session, n))

    @exposed()
    def get_value(self, call: Call) -> Any:
        return self._run(call, lambda _: self.sem.value())


class BoundedSemaphoreHandle(SemaphoreHandle):
    """A Semaphore whose value may never exceed its initial value."""

    typeid = "BoundedSemaphore"
    bounded = True


class EventHandle(EtcdHandle):
    """``threading.Event``."""

    typeid = "Event"

    def __init__(self, store: Gateway, name: str, args: Mapping[str, Any]) -> None:
        super().__init__(store, name, args)
        self.event = EtcdEvent(store.client, name, root=store.root)

    def state_prefixes(self) -> list[bytes]:
        return [self.event.key]

    async def refresh(self) -> None:
        self.seen = {"set": await self.event.is_set()}

    def stats(self) -> EventStats:
        return EventStats(
            self.name,
            self.typeid,
            self.creation_args(),
            set=self.seen.get("set", False),
            waiters=len(self.parked),
        )

    @exposed()
    def is_set(self, call: Call) -> Any:
        return self._run(call, lambda _: self.event.is_set())

    @exposed(mutates=True)
    def set(self, call: Call) -> Any:
        return self._run(call, lambda _: self.event.set())

    @exposed(mutates=True)
    def clear(self, call: Call) -> Any:
        return self._run(call, lambda _: self.event.clear())

    @exposed()
    def wait(self, call: Call, timeout: float | None = None) -> Any:
        wait_s = wait_or_now_s(timeout)
        if _unwaitable(wait_s):

            async def set_or_refuse(_: EtcdSession) -> bool:
                if not await self.event.is_set():
                    checked_wait(wait_s)  # it would wait: the wait's own error
                return True

            return self._run(call, set_or_refuse)
        return self._run(call, lambda _: self.event.wait(wait_s), parks=wait_s != 0.0)


class ValueHandle(EtcdHandle):
    """``multiprocessing.Value``: one typed number (or byte), changed by compare-and-set."""

    typeid = "Value"
    create_params = ("typecode", "value")
    builtin_type_errors = True
    copyable = True

    async def snapshot(self) -> Snapshot:
        return Snapshot(await self.value.get(), Conv.PLAIN)

    def __init__(self, store: Gateway, name: str, args: Mapping[str, Any]) -> None:
        super().__init__(store, name, args)
        self.typecode = _check_typecode(args.get("typecode", "i"))
        value = args.get("value", 0)
        self.initial = _coerce(self.typecode, value if self.typecode != "c" or value else b"\0")
        self.value = EtcdValue(store.client, name, root=store.root)

    def state_prefixes(self) -> list[bytes]:
        return [self.value.key]

    async def refresh(self) -> None:
        self.seen = {"value": await self.value.get()}

    def stats(self) -> ValueStats:
        return ValueStats(
            self.name, self.typeid, self.creation_args(), value=self.seen.get("value", self.initial)
        )

    def creation_args(self) -> dict[str, Any]:
        return {"typecode": self.typecode}

    def init_ops(self) -> list[Op]:
        return [Put(self.value.key, marshal.dumps(self.initial))]

    @exposed()
    def get(self, call: Call) -> Any:
        return self._run(call, lambda _: self.value.get())

    @exposed(mutates=True)
    def set(self, call: Call, value: Any) -> Any:
        new = _coerce(self.typecode, value)
        return self._run(call, lambda _: self.value.set(new))

    @exposed(mutates=True)
    def add(self, call: Call, delta: Any) -> Any:
        """Add ``delta`` atomically; the new value."""
        if self.typecode == "c":
            raise BadArgument("cannot add to a 'c' value")

        def change(old: Any) -> Any:
            try:
                total = old + delta
            except TypeError as exc:
                raise BadArgument(str(exc)) from None
            return _coerce(self.typecode, total)

        return self._run(call, lambda _: self.value.update(change))


class ContentsArgs:
    """Creation ``contents`` kept in the names key (pickled, read back with the
    restricted decoder) and compared by value as the memory store compares them."""

    memory_class: ClassVar[type[SharedObject]]

    @classmethod
    def encode_args(cls, args: dict[str, Any]) -> dict[str, Any]:
        if "contents" not in args:
            return args
        pickled = pickle.dumps(args["contents"], protocol=5)
        return {**args, "contents": base64.b64encode(pickled).decode()}

    @classmethod
    def decode_args(cls, args: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(args.get("contents"), str):
            return args
        return {**args, "contents": _DECODER.loads(base64.b64decode(args["contents"]))}

    @classmethod
    def same_arg(cls, name: str, created: Any, given: Any) -> bool:
        if name != "contents":
            return bool(created == given)
        blank = cls.memory_class.__new__(cls.memory_class)  # its comparison needs no state
        try:
            return bool(blank._same_contents(created, given))  # type: ignore[attr-defined]
        except (TypeError, ValueError):
            return False  # contents it would refuse: not the same


class DictHandle(ContentsArgs, EtcdHandle):
    """``dict``: any hashable key, a key per entry (``values.py``)."""

    memory_class = Dict

    typeid = "dict"
    copyable = True

    async def snapshot(self) -> Snapshot:
        return Snapshot(dict(await self.dict.items()), Conv.MAPPING)

    create_params = ("contents",)
    builtin_type_errors = True

    def __init__(self, store: Gateway, name: str, args: Mapping[str, Any]) -> None:
        super().__init__(store, name, args)
        self.dict = EtcdDict(store.client, name, root=store.root)
        contents = args.get("contents", ())
        pairs = contents.items() if isinstance(contents, Mapping) else contents
        try:
            self.contents = [(k, v) for k, v in pairs]
        except (TypeError, ValueError) as exc:
            raise BadArgument(f"dict contents are (key, value) pairs: {exc}") from None
        for _, v in self.contents:
            if not isinstance(v, bytes):
                raise BadArgument("dict values travel as pickled bytes")

    def state_prefixes(self) -> list[bytes]:
        return [self.dict.prefix]

    def creation_args(self) -> dict[str, Any]:
        return {"contents": self.contents}

    async def refresh(self) -> None:
        self.seen = {"len": await self.dict.len()}

    def stats(self) -> SizeStats:
        return SizeStats(self.name, self.typeid, self.creation_args(), len=self.seen.get("len", 0))

    def init_ops(self) -> list[Op]:
        return self.dict.puts(self.contents)

    @exposed(result=Conv.PAYLOAD)
    def __getitem__(self, call: Call, key: Any) -> Any:
        check_key(key)
        return self._run(call, lambda _: self.dict.getitem(key))

    @exposed(value=Conv.PAYLOAD, mutates=True)
    def __setitem__(self, call: Call, key: Any, value: bytes) -> Any:
        check_key(key)
        if not isinstance(value, bytes):
            raise BadArgument("dict values travel as pickled bytes")
        return self._run(call, lambda _: self.dict.setitem(key, value))

    @exposed(mutates=True)
    def __delitem__(self, call: Call, key: Any) -> Any:
        check_key(key)
        return self._run(call, lambda _: self.dict.delitem(key))

    @exposed()
    def __contains__(self, call: Call, key: Any) -> Any:
        check_key(key)
        return self._run(call, lambda _: self.dict.contains(key))

    @exposed()
    def __len__(self, call: Call) -> Any:
        return self._run(call, lambda _: self.dict.len())

    @exposed(result=Conv.PAYLOAD, default=Conv.PAYLOAD)
    def get(self, call: Call, key: Any, default: bytes | None = None) -> Any:
        check_key(key)
        return self._run(call, lambda _: self.dict.get(key, default))

    @exposed(result=Conv.PAYLOADS)
    def get_many(self, call: Call, keys: list[Any]) -> Any:
        """The value of each key, ``None`` where it is missing; one call."""
        if not isinstance(keys, (list, tuple)):
            raise BadArgument("get_many takes a list of keys")
        for key in keys:
            check_key(key)
        return self._run(call, lambda _: self.dict.get_many(list(keys)))

    @exposed(result=Conv.PAYLOAD, default=Conv.PAYLOAD, mutates=True)
    def pop(self, call: Call, key: Any, default: Any = NO_DEFAULT) -> Any:
        check_key(key)
        if default is NO_DEFAULT:
            return self._run(call, lambda _: self.dict.pop(key, accept=call.accept))
        return self._run(call, lambda _: self.dict.pop(key, default, call.accept))

    @exposed(result=Conv.PAIR, mutates=True)
    def popitem(self, call: Call) -> Any:
        return self._run(call, lambda _: self.dict.popitem(call.accept))

    @exposed(result=Conv.PAYLOAD, default=Conv.PAYLOAD, mutates=True)
    def setdefault(self, call: Call, key: Any, default: bytes) -> Any:
        check_key(key)
        if not isinstance(default, bytes):
            raise BadArgument("dict values travel as pickled bytes")
        return self._run(call, lambda _: self.dict.setdefault(key, default))

    @exposed(pairs=Conv.PAIRS, mutates=True)
    def update(self, call: Call, pairs: Any = ()) -> Any:
        """Set many keys (``pairs`` of key and payload); one Txn per 100."""
        if not isinstance(pairs, (list, tuple)):
            raise BadArgument("update takes a list of (key, value) pairs")
        for pair in pairs:
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise BadArgument("update takes (key, value) pairs")
            check_key(pair[0])
            if not isinstance(pair[1], bytes):
                raise BadArgument("dict values travel as pickled bytes")
        return self._run(call, lambda _: self.dict.update(pairs))

    @exposed(mutates=True)
    def clear(self, call: Call) -> Any:
        return self._run(call, lambda _: self.dict.clear())

    @exposed()
    def keys(self, call: Call) -> Any:
        async def keys(_: EtcdSession) -> list[Any]:
            return [k for k, _ in await self.dict.items()]

        return self._run(call, keys)

    @exposed(result=Conv.PAYLOADS)
    def values(self, call: Call) -> Any:
        async def values(_: EtcdSession) -> list[bytes]:
            return [v for _, v in await self.dict.items()]

        return self._run(call, values)

    @exposed(result=Conv.PAIRS)
    def items(self, call: Call) -> Any:
        return self._run(call, lambda _: self.dict.items())

    @exposed(result=Conv.MAPPING)
    def copy(self, call: Call) -> Any:
        async def copy(_: EtcdSession) -> dict[Any, bytes]:
            return dict(await self.dict.items())

        return self._run(call, copy)


class ConditionHandle(EtcdHandle):
    """``threading.Condition`` over a named Lock or RLock (``conditions.py``)."""

    typeid = "Condition"
    create_params = ("lock",)
    undo_methods: ClassVar[dict[str, str]] = {
        "acquire": "_undo_acquire",
        "restore": "_undo_restore",
    }

    def __init__(self, store: Gateway, name: str, args: Mapping[str, Any]) -> None:
        super().__init__(store, name, args)
        lock_name = args.get("lock") or f"{name}.lock"
        lock = store.lock_for(lock_name)
        self.lock: LockHandle = lock
        self.condition = EtcdCondition(store.client, name, lock.lock, root=store.root)
        #: This gateway's waits not yet notified (nor timed out): the stats' waiters.
        self.unnotified: set[_CondWait] = set()
        #: The wait behind each answer not yet given.
        self._waits: dict[asyncio.Future[Any], _CondWait] = {}
        #: Interrupted waits taking the lock back, by (session, owner): for ``restore``.
        self._restoring: dict[tuple[Session, str], _CondWait] = {}

    def creation_args(self) -> dict[str, Any]:
        return {"lock": self.lock.name}

    def state_prefixes(self) -> list[bytes]:
        return [self.condition.waiters]

    @exposed(result=Conv.ACQUIRED, mutates=True)
    def acquire(self, call: Call, blocking: bool = True, timeout: float = -1) -> Any:
        """The lock's acquire. Asked again after the gateway that ran it died
        (``REISSUE``, naming this Condition), it is the lock's acquire asked again:
        its key keeps its place in line, or holds already (``LockHandle.acquire``)."""
        session = call.session
        reissuing = session.reissuing
        if reissuing is None or _reissuing(call) != (self.name, "acquire"):
            return self.lock.acquire(call, blocking, timeout)
        # The lock's acquire reads what is asked again as it starts, within this call.
        session.reissuing = (reissuing[0], self.lock.name, "acquire", reissuing[3])
        try:
            return self.lock.acquire(call, blocking, timeout)
        finally:
            session.reissuing = reissuing

    def _undo_acquire(self, call: Call, args: tuple[Any, ...], token: Any) -> None:
        self.lock._undo_acquire(call, args, token)

    @exposed(mutates=True)
    def release(self, call: Call) -> Any:
        return self.lock.release(call)

    @exposed()
    def locked(self, call: Call) -> Any:
        """Whether the condition's lock is held (the client proxy is a lock too)."""
        return self.lock.locked(call)

    @exposed()
    def wait(self, call: Call, timeout: float | None = None) -> Any:
        """Release the lock, wait for a notify (True) or the timeout (False).

        The wait runs apart from its answer: a client that gives it up
        (``abandon``) stops waiting for a notify and takes the lock back, for
        ``restore``; a call dropped (its session ended, a stock client's
        interrupt) lets the lock go without taking it back. Asked again after the
        gateway that ran it died (``REISSUE``), it goes on from where that one was
        (``EtcdCondition._found``): still a waiter in its place, or notified (or
        timed out) and taking the lock back.
        """
        wait_s = checked_wait(wait_or_now_s(timeout))
        owner = self.lock._owner(call)
        request = _first_request(call, self.name, "wait")
        again = _reissuing(call) == (self.name, "wait")
        waiting = _CondWait(self.store.loop, call.session, owner)
        self.unnotified.add(waiting)
        # Calls made after this one, here or on the lock, see the lock let go (the
        # memory store lets it go within the call).
        for handle in (self, self.lock):
            handle.end_after(waiting.released)

        answer_of: list[asyncio.Future[Any]] = []

        async def wait_apart(session: EtcdSession) -> None:
            waiting.task = asyncio.current_task()
            mark_answer = self._marker(answer_of, call)

            def mark(still: Still | None) -> None:
                waiting.still = still
                mark_answer(still)

            WAITING.set(mark)
            waiting.key = self.condition.waiter_key(session, request)
            try:
                if waiting.dropped:  # dropped before it began: the lock goes all the same
                    await self.condition._abandon(session, owner, waiting.key)
                    raise asyncio.CancelledError
                outcome = await self.condition.wait(
                    session,
                    owner,
                    wait_s,
                    on_wake=lambda: self._retaking(waiting),
                    stop=waiting.stop,
                    key=waiting.key,
                    released=waiting.released,
                    request=request,
                    caller=call.thread,
                    again=again,
                )
            except asyncio.CancelledError:
                waiting.outcome.cancel()
                raise
            except Exception as exc:
                waiting.outcome.set_exception(exc)
                waiting.outcome.exception()  # retrieved: an answer or a restore raises it
                return
            finally:
                self.unnotified.discard(waiting)
                if not waiting.released.done():
                    waiting.released.set_result(None)
                waiting.finished.set_result(None)
            waiting.outcome.set_result(outcome)

        self.store.background_as(call.session, wait_apart)

        async def wait(_: EtcdSession) -> bool:
            notified, token = await asyncio.shield(waiting.outcome)
            self.store.tokens[(call.session, self.lock.name, owner)] = token
            return notified

        answer = self._run(call, wait, parks=True)
        answer_of.append(answer)
        self._waits[answer] = waiting
        waiting.answer = answer

        def answered(answer: asyncio.Future[Any]) -> None:
            del self._waits[answer]
            if not answer.cancelled():
                return
            if waiting.stop.is_set():
                # Given up by its client: its restore answers it now (``restore`` took
                # it from ``_restoring``), or, still there, its session ended first.
                restoring = (waiting.session, waiting.owner)
                if self._restoring.get(restoring) is not waiting:
                    return
                del self._restoring[restoring]
            waiting.drop()
            self.unnotified.discard(waiting)
            for handle in (self, self.lock):  # later calls see the lock let go
                handle.end_after(waiting.finished)

        answer.add_done_callback(answered)
        return answer

    def abandon(self, method: str, future: asyncio.Future[Any], *, stock: bool = False) -> None:
        """An interrupted ``wait`` takes the lock back, as ``threading.Condition``'s
        finally: it stops waiting for a notify and queues for the lock; its answer
        is then False (as a timeout's), unless the client's ``restore`` comes
        first and answers instead. A stock client cannot: dropped."""
        waiting = self._waits.get(future)
        if method == "wait" and not stock and waiting is not None:
            waiting.stop.set()
            self._retaking(waiting)
            self._restoring[(waiting.session, waiting.owner)] = waiting
            return
        future.cancel()

    @exposed(mutates=True)
    def restore(self, call: Call) -> Any:
        """After this thread's ``wait`` was interrupted: its lock back, as a token.

        The token once this thread holds the lock again (at once if the wait
        had taken it back already), False if it does not and will not. A
        ``restore`` given up while it waits stops the wait's reacquisition;
        one answered but given up is released (``_undo_restore``).
        """
        owner = self.lock._owner(call)
        waiting = self._restoring.pop((call.session, owner), None)
        if waiting is not None and waiting.answer is not None:
            waiting.answer.cancel()  # this call answers the interrupted wait's retake now

        async def restore(session: EtcdSession) -> int | bool:
            if waiting is not None:
                try:
                    with watching_waiting(waiting.waits_now):
                        _, token = await asyncio.shield(waiting.outcome)
                except asyncio.CancelledError:
                    if waiting.outcome.cancelled():
                        return False
                    raise
                except Exception:
                    return False
                self.store.tokens[(call.session, self.lock.name, owner)] = token
                return token
            held = await self.lock.lock.holder()
            if held is None or held[0] != self.lock.lock._key(session, owner):
                return False
            return held[1]

        answer = self._run(call, restore, parks=waiting is not None)
        if waiting is not None:

            def answered(answer: asyncio.Future[Any]) -> None:
                if answer.cancelled() and not waiting.outcome.done():
                    waiting.drop()

            answer.add_done_callback(answered)
        return answer

    def _undo_restore(self, call: Call, args: tuple[Any, ...], token: Any) -> None:
        """A restore answered but given up (a second interrupt): the lock goes, whole."""
        owner = self.lock._owner(call)

        async def undo(session: EtcdSession) -> None:
            await self.condition.release_whole(self.lock.lock._key(session, owner), token)

        # A delete compared on the token: a try applied unanswered finds the key gone
        # (or another holding's) when made again, so it is made again until etcd answers.
        if isinstance(token, int) and not isinstance(token, bool):
            self._undo_as(call.session, undo, repeatable=True)

    @exposed()
    def notify(self, call: Call, n: int = 1) -> Any:
        owner = self.lock._owner(call)

        async def notify(session: EtcdSession) -> None:
            self._notified(await self.condition.notify(session, owner, n))

        return self._run(call, notify)

    @exposed()
    def notify_all(self, call: Call) -> Any:
        owner = self.lock._owner(call)

        async def notify_all(session: EtcdSession) -> None:
            self._notified(await self.condition.notify_all(session, owner))

        return self._run(call, notify_all)

    def _notified(self, keys: list[bytes]) -> None:
        """This gateway's waits whose keys a notify deleted are no longer waiters (at
        once, as in the memory store; each sees its key gone a moment later)."""
        deleted = set(keys)
        for waiting in [w for w in self.unnotified if w.key in deleted]:
            self._retaking(waiting)

    def _retaking(self, waiting: _CondWait) -> None:
        """A wait notified, timed out or given up no longer waits for a notify: it waits
        for the lock, and counts among the lock's waiters until it holds it (as the
        memory store queues it on the lock; its contender key is this gateway's to
        count, as a parked acquire is: the cluster's figures count other gateways')."""
        self.unnotified.discard(waiting)
        outcome, parked = waiting.outcome, self.lock.parked
        if waiting.dropped or outcome.done() or outcome in parked:
            return
        parked.add(outcome)
        outcome.add_done_callback(parked.discard)
        waiting.counted_in = parked

    def stats(self) -> ConditionStats:
        return ConditionStats(
            self.name, self.typeid, self.creation_args(), waiters=len(self.unnotified)
        )


class _CondWait:
    """One ``Condition.wait`` running apart from its answer (``ConditionHandle.wait``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, session: Session, owner: str) -> None:
        self.session = session
        self.owner = owner
        #: Set when the client gives the wait up: it takes the lock back.
        self.stop = asyncio.Event()
        #: ``(notified, token)`` once it holds the lock again.
        self.outcome: asyncio.Future[tuple[bool, int]] = loop.create_future()
        self.task: asyncio.Task[Any] | None = None
        #: The answer of the ``wait`` call (None until made).
        self.answer: asyncio.Future[Any] | None = None
        #: Its waiter key in etcd, once the wait has begun.
        self.key: bytes | None = None
        #: Done once the lock was let go (or the wait refused).
        self.released: asyncio.Future[None] = loop.create_future()
        self.dropped = False
        #: Whether it waits for a change in etcd now (``watching.waiting``).
        self.still: Still | None = None
        #: Done once it has ended (its lock taken back, or let go).
        self.finished: asyncio.Future[None] = loop.create_future()
        #: The lock's waiters it counts among while it waits for the lock (``_retaking``).
        self.counted_in: set[asyncio.Future[Any]] | None = None

    def waits_now(self) -> bool:
        return self.still is not None and self.still()

    def drop(self) -> None:
        """Nobody will take the answer: stop, let the lock go, do not take it back."""
        self.dropped = True
        if self.counted_in is not None:  # no longer a waiter, as its key goes
            self.counted_in.discard(self.outcome)
        if self.task is not None:
            self.task.cancel()


class BarrierHandle(EtcdHandle):
    """``threading.Barrier`` (``conditions.py`` says what differs)."""

    typeid = "Barrier"
    create_params = ("parties", "timeout")

    def __init__(self, store: Gateway, name: str, args: Mapping[str, Any]) -> None:
        super().__init__(store, name, args)
        parties, timeout = args.get("parties", 1), args.get("timeout")
        if isinstance(parties, bool) or not isinstance(parties, int) or parties < 1:
            raise ValueError("parties must be an int > 0")
        if timeout is not None:
            default_s = seconds(timeout)
            if not default_s >= 0:  # NaN too
                raise ValueError("timeout must be a non-negative number or None")
            if default_s > TIMEOUT_MAX:
                raise OverflowError(f"timeout is too large (more than {TIMEOUT_MAX:.0f} s)")
        self.parties = parties
        self.timeout = timeout
        self.barrier = EtcdBarrier(store.client, name, parties, root=store.root)
        #: Each waiting party's answer: whether its client gave it up (it leaves), and
        #: the party's end once it began (what it left in etcd is done).
        self._leaving: dict[asyncio.Future[Any], tuple[list[bool], list[asyncio.Future[None]]]]
        self._leaving = {}

    def creation_args(self) -> dict[str, Any]:
        return {"parties": self.parties, "timeout": self.timeout}

    def init_ops(self) -> list[Op]:
        return [Put(self.barrier.key, self.barrier.initial())]

    def state_prefixes(self) -> list[bytes]:
        return [self.barrier.key, self.barrier.arrivals]

    @exposed()
    def wait(self, call: Call, timeout: float | None = None) -> Any:
        """A party cancelled breaks the barrier (its session ended), unless its client
        gave the wait up (``abandon``): it then leaves the count. Asked again after
        the gateway that ran it died (``REISSUE``), a party that arrived there waits
        on in its round with its index (``EtcdBarrier.wait``): not counted twice."""
        wait_s = checked_wait(wait_or_now_s(self.timeout if timeout is None else timeout))
        left: list[bool] = []
        began: list[asyncio.Future[None]] = []
        request = _first_request(call, self.name, "wait")
        again = _reissuing(call) == (self.name, "wait")

        async def wait(session: EtcdSession) -> int:
            ended: asyncio.Future[None] = self.store.loop.create_future()
            began.append(ended)
            try:
                return await self.barrier.wait(
                    wait_s, lambda: bool(left), session=session, caller=call.thread,
                    request=request, again=again,
                )  # fmt: skip
            finally:
                ended.set_result(None)

        answer = self._run(call, wait, parks=True)
        self._leaving[answer] = (left, began)
        answer.add_done_callback(lambda a: self._leaving.pop(a, None))
        return answer

    def abandon(self, method: str, future: asyncio.Future[Any], *, stock: bool = False) -> None:
        """An interrupted party leaves the count; the barrier does not break. Calls made
        here after it see it gone (as the memory store's, made after it on one loop)."""
        leaving = self._leaving.get(future)
        if leaving is not None:
            left, began = leaving
            left.append(True)
            for ended in began:
                self.end_after(ended)
        future.cancel()

    @exposed(mutates=True)
    def abort(self, call: Call) -> Any:
        return self._run(call, lambda _: self.barrier.abort())

    @exposed(mutates=True)
    def reset(self, call: Call) -> Any:
        return self._run(call, lambda _: self.barrier.reset())

    @exposed("__getattribute__")
    def attribute(self, call: Call, name: str) -> Any:
        if name not in ("parties", "n_waiting", "broken"):
            raise NoAttribute(f"'Barrier' has no attribute {name!r}")

        async def attribute(_: EtcdSession) -> Any:
            parties, n_waiting, broken = await self._state()
            return {"parties": parties, "n_waiting": n_waiting, "broken": broken}[name]

        return self._run(call, attribute)

    @exposed()
    def state(self, call: Call) -> Any:
        """``(parties, n_waiting, broken)`` in one call."""
        return self._run(call, lambda _: self._state())

    async def _state(self) -> tuple[int, int, bool]:
        state, _ = await self.barrier.state()
        return self.parties, int(state["count"]), bool(state["broken"])

    async def refresh(self) -> None:
        self.seen = {"broken": (await self._state())[2]}

    def stats(self) -> BarrierStats:
        return BarrierStats(
            self.name,
            self.typeid,
            self.creation_args(),
            waiters=len(self.parked),
            broken=self.seen.get("broken", False),
        )


class PipeHandle(EtcdHandle):
    """``multiprocessing.Pipe`` between two named ends (``pipes.py``)."""

    typeid = "Pipe"
    create_params = ("duplex",)
    undo_methods: ClassVar[dict[str, str]] = {"recv": "_undo_recv"}

    def __init__(self, store: Gateway, name: str, args: Mapping[str, Any]) -> None:
        super().__init__(store, name, args)
        duplex = args.get("duplex", True)
        if not isinstance(duplex, bool):
            raise BadArgument("duplex must be a bool")
        self.duplex = duplex
        self.pipe = EtcdPipe(store.client, name, duplex, root=store.root)

    def creation_args(self) -> dict[str, Any]:
        return {"duplex": self.duplex}

    def state_prefixes(self) -> list[bytes]:
        return [self.pipe.base]

    @staticmethod
    def _end(end: int) -> int:
        if end not in (0, 1):
            raise ValueError("a pipe has ends 0 and 1")
        return end

    @exposed(payload=Conv.PAYLOAD, mutates=True)
    def send(self, call: Call, end: int, payload: bytes) -> Any:
        end = self._end(end)
        if not self.duplex and end == 0:
            raise OSError("connection is read-only")
        if not isinstance(payload, bytes):
            raise BadArgument("pipe messages travel as pickled bytes")
        return self._run(call, lambda _: self.pipe.send(end, payload))

    def _read_check(self, end: int) -> int:
        end = self._end(end)
        if not self.duplex and end == 1:
            raise OSError("connection is write-only")
        return end

    @exposed(result=Conv.PAYLOAD, mutates=True)
    def recv(self, call: Call, end: int, timeout: float | None = None) -> Any:
        end = self._read_check(end)
        wait_s = timeout_s(True, timeout)
        return self._run(call, lambda _: self.pipe.recv(end, wait_s), parks=True)

    def _undo_recv(self, call: Call, args: tuple[Any, ...], payload: bytes) -> None:
        """A recv answered but abandoned by its client: the message is first again, made
        again until etcd answers (under one id, taken here: ``put_front``)."""
        inbox = self.pipe.inboxes[self._end(args[0])]
        iid = inbox._ids.next()
        self._undo(lambda: inbox.put_front(payload, iid), repeatable=True)

    @exposed()
    def poll(self, call: Call, end: int, timeout: float | None = 0.0) -> Any:
        end = self._read_check(end)
        wait_s = checked_wait(wait_or_now_s(timeout))
        return self._run(call, lambda _: self.pipe.poll(end, wait_s), parks=wait_s != 0.0)

    @exposed(mutates=True)
    def close(self, call: Call, end: int) -> Any:
        end = self._end(end)
        return self._run(call, lambda _: self.pipe.close(end))

    async def refresh(self) -> None:
        buffered, closed = await self.pipe.state()
        self.seen = {"buffered": buffered, "closed": closed}

    def stats(self) -> PipeStats:
        return PipeStats(
            self.name,
            self.typeid,
            self.creation_args(),
            buffered=self.seen.get("buffered", (0, 0)),
            closed=self.seen.get("closed", (False, False)),
            waiters=len(self.parked),
        )


HANDLES: dict[str, type[EtcdHandle]] = {
    cls.typeid: cls
    for cls in (
        QueueHandle,
        JoinableQueueHandle,
        LockHandle,
        RLockHandle,
        SemaphoreHandle,
        BoundedSemaphoreHandle,
        EventHandle,
        ValueHandle,
        DictHandle,
        ConditionHandle,
        BarrierHandle,
        PipeHandle,
    )
}
