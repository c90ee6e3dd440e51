"""A FIFO queue on etcd: put, get (blocking through a watch), reserve/ack/nack.

Keys under ``/m/q/<name>/``:

- ``i/<id>``: a ready item; ``<id>`` sorts in put order, so the head is a
  Range of limit 1 in key order. (A Range sorted by create_revision sorts
  the whole prefix on every get, and collapsed under a backlog.)
- ``r/<id>``: a reserved item, with its deadline, session and delivery
  count. **Not** on the session's lease: an expiry would delete it, and it
  must go back to ``i/``. ``requeue_expired`` returns those past their
  deadline or whose session key is gone; calling it on every queue every
  second is the job of one elected gateway (``store.py``, ``election.py``).
- ``t/<id>``: a tombstone of a taken item, on a short lease (about a minute).
- ``j/<process><seq>``: the place of a parked get or reserve (one that found
  no item for it), of any gateway; places are in line by create_revision.
  (``j/`` sorts next to ``i/``, so that one watch sees both.)

**Unconfirmed gets** (``/m/ug/<session>/<thread>/<queue>/<id>``, outside the
queue's prefix so that a session's are one Range): a get or get_many of a
client thread takes its items, in the same Txn, into records of that thread
(``Holder``), with the item, its queue and the queue's incarnation. They
stand until the thread's next call confirms it read the answer (the
records' deletes ride in that call's take Txn when it is a get; else one
Txn of their own). A gateway that dies between the take and the client's
reading leaves them in etcd: the gateway that takes the session over hands
them to the get the client asks again (``REISSUE``), or drops them when the
thread's next call shows its answer was read; records of a session whose
lease ended with no gateway to end it go back to their places
(``return_records``, run by the elected requeuer). **Not** on the
session's lease, for the same reason as ``r/``.

``<id>`` is ``<unix ns>.<producer>.<seq>``: per producer strictly
increasing; across producers in the order of their clocks (as etcd's own
``recipes/queue``), so puts through different gateways are FIFO to within
their clock skew. A reserved item given back (nack, its deadline passed, its
session ended) goes to the front, as the memory store's ``appendleft``: under
a new id, ``!<time counted down>~<put id>``, before every put's and the
latest returned first (back at its put id, it would stand behind an item
returned after it); its ``u/`` key keeps the put id. Several returned at once
(``requeue_expired``: a session's end, expired ones) go back as the memory
store gives them back one by one (expired ones by deadline, an ended
session's the last delivered first): each to the oldest parked call, the
rest first, in one Txn to the front, ordered so that the line hands them so
(the first items are the places'); one such pass at a time per process.

**Exactly once across failovers.** Every change is one Txn guarded by a
compare, so a retried request after an ambiguous failure (the leader died
after applying it, before answering) cannot apply twice: put requires that
``i/``, ``r/`` and ``t/`` of its id were never created — the tombstone is
what stops a retried put from bringing back an item a consumer already
took. get/reserve require the head's mod_revision to be what they read and
mark the take with a random token, so a retry that finds the item gone
recognises its own take. ack compares the reservation's revision (the
receipt). A late retry past the tombstone's lease (a minute, against a
retry budget of 15 s) could duplicate; nothing else can.

**Blocking get and reserve: one line across gateways.** A call that finds
no item for it parks: it puts its place ``j/`` (in one Txn with the other
calls of its process that park with it, in their arrival order). The
places, oldest first, are the line of every gateway: the first item goes to
the oldest place, the second to the next, and the items past the places
are for the calls that have not parked (a ``get_nowait``, a get's first
look). So a blocked call is answered in the order it parked, whichever
gateway it parked on, as the embedded store answers its waiters. Each
process serves its own parked calls (``EtcdQueue``'s one task): it reads
the places and as many items as it needs (one read-only Txn), and takes the
items of its places in one Txn that compares the items' and places'
revisions and deletes the places with the items (group commit: up to 64
per Txn); a call that has not parked takes an item past the places only if
no place came after that read (a compare over ``j/``). With nothing for its
calls, the task watches ``i/`` and ``j/`` from the read's revision + 1: a
put, or a place ahead that leaves, wakes it; a put between the read and the
watch is seen, so no wake-up is missed and nothing polls.

A place whose item stands untaken for ``SILENT_PLACE_S`` (as seen by
another process: its gateway died, or is cut off from etcd) is passed over:
that process deletes it and the line moves on (``places.py``: the places,
shared with a pipe end's blocked reads). Its call, if its gateway
lives, parks again at the end. A call that leaves (answered, timed out,
interrupted) deletes its place, made again until etcd answers. A call's
timeout runs from its look: the line's read of the queue after the call
came (an item there for it is taken however short the timeout). A call that
gives up while its take is in flight has its item put back at its place,
uncounted.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import queue
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from managerd.store.etcd.client import EtcdClient, unguarded, until_answered
from managerd.store.etcd.kv import (
    Compacted,
    Compare,
    Delete,
    EventType,
    Get,
    KeyValue,
    Op,
    Put,
    RangeResult,
    Target,
    TxnResult,
    name_key,
    prefix_end,
)
from managerd.store.etcd.places import Look, Places
from managerd.store.etcd.sessions import DEFAULT_ROOT, EtcdSession
from managerd.store.etcd.watching import (
    Synced,
    changed,
    deadline_of,
    looked_then_within,
    waiting,
)
from managerd_client.errors import ManagerdError

log = logging.getLogger(__name__)

TOMBSTONE_TTL_S = 60
DEAD_LETTER_SUFFIX = ".dead"
_PUT_BATCH = 40  # items per put Txn: 3 compares each, within --max-txn-ops (128)
_BOUNDED_BATCH = 64  # items per put Txn to a bounded queue: 2 puts each, one compare
#: Bytes of items per put Txn: under etcd's --max-request-bytes (1.5 MiB by default), so
#: that items that fit one by one also fit together; one larger item is refused by etcd
#: (``RequestTooLarge``).
_PUT_BATCH_BYTES = 1024 * 1024
_BATCH = 60  # items per take Txn without records: 2 ops each, within etcd's --max-txn-ops (128)
#: Items per take Txn with unconfirmed records or places: up to 4 ops each (the item,
#: its tombstone or reservation, its record, its place).
_GET_BATCH = 30
_MAX_OPS = 120  # ops per Txn, under etcd's default --max-txn-ops (128)
_FRONT_BATCH = 40  # reservations per Txn to the front: 3 ops each
_TOMBSTONE_ROTATE_S = 20.0  # a tombstone lives 40-60 s


def _pack(meta: dict[str, Any], payload: bytes) -> bytes:
    return json.dumps(meta, separators=(",", ":")).encode() + b"\n" + payload


def _unpack(value: bytes) -> tuple[dict[str, Any], bytes]:
    meta, _, payload = value.partition(b"\n")
    decoded: dict[str, Any] = json.loads(meta)
    return decoded, payload


class _Ids:
    """Sortable, unique item ids: ``<unix ns>.<producer>.<seq>``, increasing per producer."""

    def __init__(self) -> None:
        self.producer = os.urandom(6).hex()
        self._last_ns = 0
        self._seq = itertools.count()

    def next(self) -> bytes:
        self._last_ns = max(time.time_ns(), self._last_ns + 1)
        return f"{self._last_ns:020d}.{self.producer}.{next(self._seq):010d}".encode()


class _ShortLease:
    """A lease for tombstones: a new one every ``_TOMBSTONE_ROTATE_S``, never renewed."""

    def __init__(self, client: EtcdClient) -> None:
        self.client = client
        self._lease_id = 0
        self._granted = 0.0

    async def current(self) -> int:
        now = time.monotonic()
        if not self._lease_id or now - self._granted > _TOMBSTONE_ROTATE_S:
            self._lease_id = await self.client.lease_grant(TOMBSTONE_TTL_S)
            self._granted = now
        return self._lease_id


#: An item taken: ``(kv, payload, deliveries)``, see ``EtcdQueue._take_batch``.
Taken = tuple[KeyValue, bytes, int]


@dataclass(eq=False)
class Holder:
    """A get of one client thread whose items are kept as unconfirmed records
    (module docstring) until the thread's next call."""

    #: ``<root>g/<session>/<thread>/``: the thread's records.
    prefix: bytes
    method: str
    #: The queue's incarnation (the creating revision; 0: unknown), in each record.
    revision: int = 0
    #: The records of the thread's previous answer: deleted in the take's Txn.
    confirm: list[bytes] = dataclasses.field(default_factory=list)
    #: The records made for this call, once taken.
    records: list[bytes] = dataclasses.field(default_factory=list)
    #: The client's id of the request (its first one, for a call asked again).
    rid: int = 0


def records_prefix(root: bytes, sid: str, thread: int) -> bytes:
    """Where the unconfirmed records of a client thread of session ``sid`` are."""
    return root + b"ug/" + sid.encode() + b"/%d/" % thread


#: One caller of a take: a reservation's session (else a get) and visibility
#: timeout, and the get's holder (None: no records, a plain removal).
_Ask = tuple["EtcdSession | None", float, "Holder | None"]


@dataclass(eq=False)
class _Want:
    """A blocked get (``session`` None) or reserve of this process, waiting for an item."""

    session: EtcdSession | None
    visibility_s: float
    future: asyncio.Future[Taken]
    holder: Holder | None = None
    #: Set once the line read the queue empty after it came (its timeout runs then).
    seen: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    #: Its place (``j/``) once it parked, as last read.
    place: KeyValue | None = None


@dataclass(frozen=True, slots=True)
class Delivery:
    """A reserved item: ack or nack it with this (``receipt`` is the reservation's revision)."""

    id: bytes
    receipt: int
    payload: bytes
    deliveries: int  # 1 on the first delivery


class EtcdQueue:
    """The queue ``name``; any number of instances, in any processes, share it."""

    def __init__(
        self,
        client: EtcdClient,
        name: str,
        *,
        root: bytes = DEFAULT_ROOT,
        maxsize: int = 0,
        max_deliveries: int = 0,
        dead_letters: bool = True,
    ) -> None:
        self.client = client
        self.name = name
        self.maxsize = maxsize
        self.max_deliveries = max_deliveries
        #: Where items nacked without requeue or delivered too often go (None: dropped).
        self.dead: EtcdQueue | None = (
            EtcdQueue(client, name + DEAD_LETTER_SUFFIX, root=root, dead_letters=False)
            if dead_letters
            else None
        )
        #: Run before an item goes to the dead letters (the store names that queue).
        self.before_dead_letter: Callable[[], Awaitable[None]] | None = None
        #: Puts of this process to a bounded queue, one at a time (see ``put``).
        self._room = asyncio.Lock()
        self.base = base = root + b"q/" + name_key(name) + b"/"
        self._sessions = root + b"s/"
        self._ready = base + b"i/"
        self._ready_end = prefix_end(self._ready)
        self._reserved = base + b"r/"
        self._tombs = base + b"t/"
        self._unfinished = base + b"u/"
        self._places = base + b"j/"
        self._places_end = prefix_end(self._places)
        #: The places of the line, and the calls of this process parked in it.
        self._line: Places[_Want] = Places(
            client, self._places, self._places_end, f"queue {name!r}"
        )
        self._key = name_key(name)
        self._ids = _Ids()
        self._tomb_lease = _ShortLease(client)
        self._wants: collections.deque[_Want] = collections.deque()
        self._taker: asyncio.Task[None] | None = None
        self._watching: asyncio.Task[Any] | None = None
        self._watch_synced: Synced = Synced(0)
        #: Set when a call joins the line while it may wait on its watch: it looks again.
        self._look = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        #: One return pass of this process at a time (``requeue_expired``): two would
        #: hand the same waiting calls items, and mix their front ids.
        self._returning = asyncio.Lock()

    async def put(self, item: bytes, timeout_s: float | None = 0.0) -> None:
        """Append ``item``; safe to retry, never duplicated (see the module docstring).

        A bounded queue (``maxsize``) waits up to ``timeout_s`` (None: for
        ever) for room, then raises ``queue.Full``.
        """
        await self.put_many([item], timeout_s)

    async def put_many(
        self, items: list[bytes], timeout_s: float | None = 0.0, confirm: list[bytes] | None = None
    ) -> None:
        """Append ``items`` in order (one Txn per chunk of ``_chunks``: atomic within one).

        ``confirm``: unconfirmed records the caller's thread confirmed (``Holder``),
        deleted in the first Txn of an unbounded queue's put, else on their own.
        """
        if not self.maxsize:
            await self._append(items, confirm or [])
            return
        if confirm:
            await delete_records(self.client, confirm)
        # The count is read, then the put made only if no ready item was added since
        # (a compare on the whole ready range): exact across gateways. Puts of this
        # process wait for room one at a time, in arrival order. More than
        # _BOUNDED_BATCH items are several Txns: never past maxsize, not atomic.
        if timeout_s == 0 and self._room.locked():
            raise queue.Full  # a put waits for room ahead of this one (FIFO)
        deadline = deadline_of(timeout_s or None)
        try:
            if self._room.locked():
                with waiting():  # behind a put that waits for room: parked too
                    async with asyncio.timeout_at(deadline):
                        await self._room.acquire()
            else:
                await self._room.acquire()
            try:
                await self._put_when_room(items, timeout_s, deadline)
            finally:
                self._room.release()
        except TimeoutError:
            raise queue.Full from None

    async def _put_when_room(
        self, items: list[bytes], timeout_s: float | None, deadline: float | None
    ) -> None:
        remaining = items
        while remaining:
            read = await self.client.range(self._ready, self._ready_end, count_only=True)
            if read.count + len(remaining) <= self.maxsize:
                batch = remaining[:_BOUNDED_BATCH]
                if await self._append_if_unchanged(batch, read.revision):
                    remaining = remaining[len(batch) :]
                continue  # put, or another put came first: count again
            if timeout_s == 0:
                raise queue.Full
            await changed(
                self.client,
                self._ready,
                self._ready_end,
                after_revision=read.revision,
                kind=EventType.DELETE,
                deadline=deadline,
            )

    async def _append_if_unchanged(self, items: list[bytes], revision: int) -> bool:
        """Put ``items`` in one Txn if no ready item was added or changed after
        ``revision`` (the count's read); whether they were put.

        A retry after the Txn was applied fails the compare (its own items are
        newer): the first item's keys say whether it was ours.
        """
        ops: list[Op] = []
        first = b""
        for item in items:
            iid = self._ids.next()
            first = first or iid
            ops += [
                Put(self._ready + iid, _pack({"n": 0}, item)),
                Put(self._unfinished + iid, b""),
            ]
        unchanged = Compare(self._ready, Target.MOD, "<", revision + 1, range_end=self._ready_end)
        done = await self.client.txn(
            [unchanged],
            ops,
            [Get(self._ready + first), Get(self._reserved + first), Get(self._tombs + first)],
            idempotent=True,
        )
        return done.succeeded or any(isinstance(r, RangeResult) and r.kvs for r in done.responses)

    async def _append(self, items: list[bytes], confirm: list[bytes]) -> None:
        if len(confirm) > _MAX_OPS - 2 * _PUT_BATCH:
            await delete_records(self.client, confirm)
            confirm = []
        for n, chunk in enumerate(_chunks(items)):
            compares: list[Compare] = []
            ops: list[Op] = [Delete(key) for key in confirm] if n == 0 else []
            for item in chunk:
                iid = self._ids.next()
                compares += [
                    Compare(self._ready + iid, Target.CREATE, "==", 0),
                    Compare(self._reserved + iid, Target.CREATE, "==", 0),
                    Compare(self._tombs + iid, Target.CREATE, "==", 0),
                ]
                ops += [
                    Put(self._ready + iid, _pack({"n": 0}, item)),
                    Put(self._unfinished + iid, b""),
                ]
            # Not succeeded: an earlier attempt of this call was applied (the ids are ours).
            await self.client.txn(compares, ops, idempotent=True)

    async def get_many(
        self, max_items: int, timeout_s: float | None = None, holder: Holder | None = None
    ) -> list[bytes]:
        """Up to ``max_items`` items at once; if there are none, the first to come
        (waiting as ``get``). With a ``holder``, kept as its unconfirmed records,
        ``_GET_BATCH`` per Txn (atomic within one)."""
        per_txn = _GET_BATCH if holder is not None else _BATCH
        got: list[bytes] = []
        while len(got) < max_items:
            limit = min(max_items - len(got), per_txn)
            taken, _ = await self._take_free(limit, (None, 0.0, holder))
            if taken == []:
                if got:
                    return got
                return [(await self._blocking(None, 0.0, timeout_s, holder))[1]]
            if taken is not None:
                got += [payload for _, payload, _ in taken]
        return got

    def record_key(self, holder: Holder, iid: bytes) -> bytes:
        return holder.prefix + self._key + b"/" + iid

    async def confirm(self, holders: list[Holder | None]) -> None:
        """Delete the records the ``holders``' threads confirmed (their previous answers)."""
        keys = [key for h in holders if h is not None for key in h.confirm]
        await delete_records(self.client, keys)
        for h in holders:
            if h is not None:
                h.confirm = []

    async def unfinished(self) -> int:
        """Items put and not yet ``task_done`` (``queue.Queue``'s unfinished_tasks)."""
        end = prefix_end(self._unfinished)
        return (await self.client.range(self._unfinished, end, count_only=True)).count

    async def task_done(self) -> None:
        """One item fewer unfinished; ``ValueError`` if none is."""
        end = prefix_end(self._unfinished)
        while True:
            oldest = await self.client.range(self._unfinished, end, limit=1)
            if not oldest.kvs:
                raise ValueError("task_done() called too many times")
            kv = oldest.kvs[0]
            done = await self.client.txn(
                [Compare(kv.key, Target.MOD, "==", kv.mod_revision)], [Delete(kv.key)]
            )
            if done.succeeded:
                return

    async def join(self, timeout_s: float | None = None) -> None:
        """Return once no item is unfinished; ``TimeoutError`` after ``timeout_s``."""
        end = prefix_end(self._unfinished)
        if timeout_s is not None and timeout_s <= 0:  # a look, not a wait (no time to read)
            if (await self.client.range(self._unfinished, end, count_only=True)).count:
                raise TimeoutError("join() timed out")
            return
        deadline = deadline_of(timeout_s)
        try:
            while True:
                read = await self.client.range(self._unfinished, end, count_only=True)
                if not read.count:
                    return
                await changed(
                    self.client,
                    self._unfinished,
                    end,
                    after_revision=read.revision,
                    kind=EventType.DELETE,
                    deadline=deadline,
                )
        except TimeoutError:
            raise TimeoutError("join() timed out") from None

    async def put_front(self, item: bytes, iid: bytes | None = None) -> None:
        """Put ``item`` back before every other (an answered get whose caller left).

        Its id sorts before any ``put``'s (a leading ``!``, then the time
        counted down: the latest such item first); at most once, as ``put``.
        ``iid``: the put id (``_Ids.next``) to make that id of, taken once by a
        caller that makes this again until etcd answers: a try applied unanswered
        then fails the compares of the next (a new id each try would put the item
        twice). As for ``put``, a try made after the item was taken and its
        tombstone's lease ended (about a minute) could put it again.
        """
        iid = self._ids.next() if iid is None else iid
        iid = b"!%020d" % (10**20 - 1 - int(iid[:20])) + iid[20:]
        await self.client.txn(
            [
                Compare(self._ready + iid, Target.CREATE, "==", 0),
                Compare(self._reserved + iid, Target.CREATE, "==", 0),
                Compare(self._tombs + iid, Target.CREATE, "==", 0),
            ],
            [Put(self._ready + iid, _pack({"n": 0}, item))],
            idempotent=True,
        )

    async def items(self) -> list[bytes]:
        """The payloads of the items waiting, in order (reserved ones are not)."""
        read = await self.client.range(self._ready, prefix_end(self._ready))
        return [_unpack(kv.value)[1] for kv in read.kvs]

    async def qsize(self) -> int:
        return (await self.client.range(self._ready, self._ready_end, count_only=True)).count

    async def reserved_count(self) -> int:
        return (
            await self.client.range(self._reserved, prefix_end(self._reserved), count_only=True)
        ).count

    async def get_nowait(self, holder: Holder | None = None) -> bytes:
        """The head, removed; ``queue.Empty`` if there is none."""
        taken, _ = await self._take(None, 0.0, holder)
        if taken is None:
            raise queue.Empty
        return taken[1]

    async def get(self, timeout_s: float | None = None, holder: Holder | None = None) -> bytes:
        """The head, removed, waiting up to ``timeout_s`` (None: for ever); ``queue.Empty``.
        With a ``holder``, kept as its unconfirmed record."""
        taken = await self._blocking(None, 0.0, timeout_s, holder)
        return taken[1]

    async def reserve(
        self, session: EtcdSession, visibility_timeout_s: float, timeout_s: float | None = None
    ) -> Delivery:
        """The head, moved to ``r/`` until acked; ``queue.Empty`` after ``timeout_s``."""
        taken = await self._blocking(session, visibility_timeout_s, timeout_s)
        kv, payload, deliveries = taken
        return Delivery(kv.key[len(self._reserved) :], kv.mod_revision, payload, deliveries)

    async def ack(self, delivery: Delivery) -> bool:
        """Done with it; False if the reservation is no longer this one (returned, expired)."""
        key = self._reserved + delivery.id
        token = secrets.token_hex(8)
        done = await self.client.txn(
            [Compare(key, Target.MOD, "==", delivery.receipt)],
            [Delete(key), Put(self._tombs + delivery.id, token.encode(), lease=await self._tomb())],
            [Get(self._tombs + delivery.id)],
            idempotent=True,
        )
        return done.succeeded or _found(done, token.encode())

    async def nack(self, delivery: Delivery, requeue: bool = True) -> bool:
        """Give it back to the front (``requeue``, unless delivered ``max_deliveries``
        times) or to the dead letters; False if no longer reserved."""
        return await self._give_back_reserved(
            delivery.id, delivery.receipt, delivery.deliveries, delivery.payload, requeue
        )

    async def _give_back_reserved(
        self,
        iid: bytes,
        receipt: int,
        deliveries: int,
        payload: bytes,
        requeue: bool,
        front: bytes | None = None,
    ) -> bool:
        """Return the reservation ``r/<iid>`` of revision ``receipt`` (``_return``); False
        if it is no longer that one."""
        key = self._reserved + iid
        while True:
            guards, ops = await self._return(iid, deliveries, payload, requeue, front)
            done = await self.client.txn(
                [Compare(key, Target.MOD, "==", receipt), *guards],
                [Delete(key), *ops],
                [Get(key)],
                idempotent=True,
            )
            if done.succeeded:
                return True
            found = done.responses[0] if done.responses else None
            if not guards or not isinstance(found, RangeResult) or not found.kvs:
                return False
            if found.kvs[0].mod_revision != receipt:
                return False
            # Still reserved: the unfinished key read was taken meanwhile (task_done).

    async def _return(
        self, iid: bytes, deliveries: int, payload: bytes, requeue: bool, front: bytes | None = None
    ) -> tuple[list[Compare], list[Op]]:
        """The compares and ops that return a reserved item: to the front (as the memory
        store's ``appendleft``: the latest returned first), or to the dead letters (done
        as far as ``join`` is concerned: nobody will ack it)."""
        origin = _origin(iid)
        if requeue and not (self.max_deliveries and deliveries >= self.max_deliveries):
            # A new key before every ready one; the put id's tombstone stops a put
            # retried after an ambiguous failure from bringing the item back twice.
            moved = _front_id(front or _FRONT_IDS.next(), origin)
            ops: list[Op] = [Put(self._ready + moved, _pack({"n": deliveries}, payload))]
            if iid == origin:
                ops.append(Put(self._tombs + iid, b"", lease=await self._tomb()))
            return [], ops
        # One item fewer unfinished: its own u/ key, or, if a task_done took that one
        # (task_done deletes the oldest, whoever's), the oldest left (else join would
        # wait for ever).
        unfinished = await self.client.get(self._unfinished + origin)
        if unfinished is None:
            oldest = await self.client.range(
                self._unfinished, prefix_end(self._unfinished), limit=1
            )
            unfinished = oldest.kvs[0] if oldest.kvs else None
        guards: list[Compare] = []
        gone: list[Op] = [Put(self._tombs + iid, b"", lease=await self._tomb())]
        if unfinished is not None:
            guards.append(Compare(unfinished.key, Target.MOD, "==", unfinished.mod_revision))
            gone.append(Delete(unfinished.key))
        if self.dead is not None:
            dead = self.dead
            if self.before_dead_letter is not None:
                try:
                    await self.before_dead_letter()
                except ManagerdError as exc:  # the name is another type's: never drop it
                    log.error("queue %r: %s; the item stays in the queue", self.name, exc)
                    return [], [Put(self._ready + iid, _pack({"n": deliveries}, payload))]
            gone += [
                Put(dead._ready + origin, _pack({"n": 0}, payload)),
                Put(dead._unfinished + origin, b""),
            ]
        return guards, gone

    async def extend(self, delivery: Delivery, seconds: float) -> Delivery | None:
        """Its deadline ``seconds`` from now; the delivery's new receipt, None if no longer
        reserved."""
        key = self._reserved + delivery.id
        kv = await self.client.get(key)
        if kv is None or kv.mod_revision != delivery.receipt:
            return None
        meta, payload = _unpack(kv.value)
        meta["deadline"] = time.time() + seconds
        done = await self.client.txn(
            [Compare(key, Target.MOD, "==", delivery.receipt)], [Put(key, _pack(meta, payload))]
        )
        if not done.succeeded:
            return None
        return dataclasses.replace(delivery, receipt=done.revision)

    async def reserved_by(self, sid: str) -> list[Delivery]:
        """The reservations of the session ``sid`` (as its gateway had them: another
        gateway took the session over)."""
        reserved = await self.client.range(self._reserved, prefix_end(self._reserved))
        found = []
        for kv in reserved.kvs:
            meta, payload = _unpack(kv.value)
            if meta.get("session") == sid:
                iid = kv.key[len(self._reserved) :]
                found.append(Delivery(iid, kv.mod_revision, payload, int(meta["n"])))
        return found

    async def requeue_expired(self, now_s: float | None = None) -> int:
        """Return to the head every reservation past its deadline or whose session is gone;
        how many. (Deliveries stay counted.)

        The job of one elected gateway, every second or so, and of a gateway
        ending a session; two at once are safe (each move compares the
        reservation's revision), only wasteful. Deadlines are wall-clock times
        of the reserving gateway's host.
        """
        async with self._returning:
            now_s = time.time() if now_s is None else now_s
            reserved = await self.client.range(self._reserved, prefix_end(self._reserved))
            alive: dict[str, bool] = {}
            ended = []
            expired = []
            for kv in sorted(reserved.kvs, key=lambda kv: kv.create_revision):
                meta, payload = _unpack(kv.value)
                sid = str(meta["session"])
                if sid not in alive:
                    alive[sid] = await self.client.get(self._sessions + sid.encode()) is not None
                if not alive[sid]:
                    ended.append((kv, int(meta["n"]), payload))
                elif meta["deadline"] <= now_s:
                    order = (meta["deadline"], kv.create_revision, kv.key)
                    expired.append((order, (kv, int(meta["n"]), payload)))
            # As the memory store gives them back one by one: expired ones as their
            # timers fire (by deadline), an ended session's the last delivered first.
            expired.sort(key=lambda e: e[0])
            return await self._return_due([d for _, d in expired] + ended[::-1])

    async def _return_due(self, due: list[tuple[KeyValue, int, bytes]]) -> int:
        """Return the reservations ``due`` (``(r/ kv, deliveries, payload)``) as the memory
        store returns them one by one in that order: each to the oldest parked call in
        the line, else first (``appendleft``); or to the dead letters. How many were
        returned.

        All go to the front, in the order the line then hands them out (the first
        ``places`` items are the parked calls'), in one Txn (per ``_FRONT_BATCH``): a
        pass of another gateway at the same time moves all of them or none, never
        some with its front ids and some with these (which would mix their order)."""
        moved = 0
        back = []
        for kv, deliveries, payload in due:
            if self.max_deliveries and deliveries >= self.max_deliveries:
                iid = kv.key[len(self._reserved) :]
                moved += await self._give_back_reserved(
                    iid, kv.mod_revision, deliveries, payload, True
                )
            else:
                back.append((kv, deliveries, payload))
        places = (await self.client.range(self._places, self._places_end, count_only=True)).count
        ordered = back[:places] + back[places:][::-1]
        # The head gets the newest front id: first of all.
        fronts = [_FRONT_IDS.next() for _ in ordered][::-1]
        for i in range(0, len(ordered), _FRONT_BATCH):
            moved += await self._to_front(
                ordered[i : i + _FRONT_BATCH], fronts[i : i + _FRONT_BATCH]
            )
        return moved

    async def _to_front(self, items: list[tuple[KeyValue, int, bytes]], fronts: list[bytes]) -> int:
        """Move the reservations ``items`` to the front under ``fronts`` (``_front_id``) in
        one Txn; if any is no longer what was read, each on its own. How many moved."""
        compares: list[Compare] = []
        ops: list[Op] = []
        for (kv, deliveries, payload), front in zip(items, fronts, strict=True):
            iid = kv.key[len(self._reserved) :]
            origin = _origin(iid)
            compares.append(Compare(kv.key, Target.MOD, "==", kv.mod_revision))
            ops += [
                Delete(kv.key),
                Put(self._ready + _front_id(front, origin), _pack({"n": deliveries}, payload)),
            ]
            if iid == origin:  # (see ``_return``)
                ops.append(Put(self._tombs + iid, b"", lease=await self._tomb()))
        done = await self.client.txn(compares, ops, idempotent=True)
        if done.succeeded:
            return len(items)
        moved = 0
        for (kv, deliveries, payload), front in zip(items, fronts, strict=True):
            iid = kv.key[len(self._reserved) :]
            moved += await self._give_back_reserved(
                iid, kv.mod_revision, deliveries, payload, True, front
            )
        return moved

    async def _tomb(self) -> int:
        return await self._tomb_lease.current()

    async def _blocking(
        self,
        session: EtcdSession | None,
        visibility_s: float,
        timeout_s: float | None,
        holder: Holder | None = None,
    ) -> Taken:
        if timeout_s is not None and timeout_s <= 0:
            taken, _ = await self._take(session, visibility_s, holder)
            if taken is None:
                raise queue.Empty
            return taken
        want = _Want(session, visibility_s, asyncio.get_running_loop().create_future(), holder)
        self._wants.append(want)
        if self._taker is None or self._taker.done():
            # Shared by the waiters of all sessions: its writes are nobody's own.
            self._taker = unguarded(self._take_for_wants(), name=f"take {self.name}")
        else:
            self._look.set()  # the line may wait on its watch: this call's look is due

        def parked() -> bool:
            return not want.future.done() and want.seen.is_set() and self._parked()

        try:
            with waiting(parked):
                return await looked_then_within(want.future, want.seen, timeout_s)
        except (TimeoutError, asyncio.CancelledError) as exc:
            if want.future.done() and not want.future.cancelled():
                if isinstance(exc, TimeoutError):
                    return want.future.result()  # answered as the time ran out: keep it
                if want.future.exception() is None:  # the caller is gone: give it back
                    # (Compared on what the take made: safe to make again until etcd
                    # answers, and a try applied unanswered makes the next one nothing.)
                    item = want.future.result()
                    self._background(until_answered(lambda: self._give_back(item, holder)))
            if isinstance(exc, TimeoutError):
                raise queue.Empty from None
            raise
        finally:
            want.future.cancel()
            with contextlib.suppress(ValueError):
                self._wants.remove(want)
            self._line.unplace(want)
            if not self._wants and self._watching is not None:
                self._watching.cancel()  # nobody waits: stop watching

    async def _take_for_wants(self) -> None:
        """Serve the parked and arriving calls of this process (module docstring), several
        per Txn."""
        batch = _GET_BATCH
        seen: Look | None = None  # what the watch saw, kept up to date: no read needed
        try:
            while wants := [w for w in self._wants if not w.future.done()]:
                self._look.clear()
                looking = list(self._wants)  # the calls this read is the look of
                arriving = [w for w in wants if w.place is None]
                if seen is not None and any(
                    w.place is not None and w.place.create_revision > seen.revision for w in wants
                ):
                    seen = None  # older than a place of ours (put while it waited): read
                if seen is None:
                    seen = await self._line.look(self._ready, self._ready_end, len(arriving))
                look, seen = seen, None
                plan, silent = self._plan(look, wants)
                if plan:
                    plan = plan[:batch]
                    kvs = _within_bytes([item for item, _ in plan])
                    plan = plan[: len(kvs)]
                    asks = [(w.session, w.visibility_s, w.holder) for _, w in plan]
                    places = [w.place for _, w in plan]
                    taken = await self._take_batch(kvs, asks, places, look.revision)
                    if taken is None:
                        batch = max(1, batch // 2)  # another consumer took some: ask for fewer
                        continue
                    batch = _GET_BATCH
                    for (_, want), item in zip(plan, taken, strict=False):
                        self._line.taken(want)  # its place went with the take
                        with contextlib.suppress(ValueError):
                            self._wants.remove(want)
                        if want.future.done():
                            # Gave up while the Txn was in flight.
                            await self._give_back(item, want.holder)
                        else:
                            want.future.set_result(item)
                    continue
                if silent:
                    await self._line.pass_over(silent)
                    continue
                await self._line.park([w for w in wants if w.place is None])
                await self._looked(looking)
                seen = await self._wait_for_change(look)
        except Exception as exc:  # an EtcdError, or a bug: never leave a caller waiting
            for want in self._wants:
                if not want.future.done():
                    want.future.set_exception(exc)

    def _plan(
        self, look: Look, wants: list[_Want]
    ) -> tuple[list[tuple[KeyValue, _Want]], list[KeyValue]]:
        """Which item each call of ``wants`` takes: the i-th place's call the i-th item,
        the calls that have not parked the items past the places, in arrival order; and
        the places of other processes found silent (``SILENT_PLACE_S``)."""
        self._line.refresh(look.places, wants)  # passed over: parks again, at the end
        plan = []
        foreign = []
        for place, item in zip(look.places, look.items, strict=False):
            owner = self._line.owner(place)
            if owner is None:
                foreign.append(place)
            elif not owner.future.done():
                plan.append((item, owner))
        arriving = [w for w in wants if w.place is None]
        plan += zip(look.items[len(look.places) :], arriving, strict=False)
        return plan, self._line.note_silent(foreign)

    async def _looked(self, looking: list[_Want]) -> None:
        """The queue had no item for ``looking`` (read after they came): their timeouts
        run now.

        Parked, the answers before these calls are confirmed now, not at their
        takes (a gateway dying meanwhile must not hand them again).
        """
        await self.confirm([w.holder for w in looking if w.holder is not None])
        for want in looking:
            want.seen.set()

    async def _wait_for_change(self, look: Look) -> Look | None:
        """Wait for a put or a place ahead leaving (after ``look``), or a silent place's
        time to be up; the state then if the watch kept it (``_change_after``), else
        None (the line reads again).

        Calls that join the line meanwhile park at once, without a read of their own:
        with the watch in step and silent, the look's answer holds for them (nothing
        past the places); their places, put, are in line for the next put the watch
        tells of. (A watch not yet in step: the line reads.)"""
        watching: asyncio.Task[Look | None] = unguarded(self._change_after(look))
        self._watching = watching
        try:
            while not watching.done():
                silent_s = self._line.silent_wait_s()
                joined = asyncio.ensure_future(self._look.wait())
                try:
                    done, _ = await asyncio.wait(
                        [watching, joined], timeout=silent_s, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    joined.cancel()
                if not done or watching.done() or not self._watch_synced():
                    break
                self._look.clear()
                looking = [w for w in self._wants if not w.seen.is_set()]
                await self._line.park(
                    [w for w in self._wants if w.place is None and not w.future.done()]
                )
                await self._looked(looking)
        finally:
            self._watching = None
            if not watching.done():
                watching.cancel()
                await asyncio.wait([watching])
        if watching.cancelled():
            return None
        failed = watching.exception()
        if failed is not None:
            raise failed
        return watching.result()

    def _parked(self) -> bool:
        """Whether the line waits for a change now (its watch in step: ``watching.Synced``)."""
        watching = self._watching
        return watching is not None and not watching.done() and self._watch_synced()

    async def _change_after(self, look: Look) -> Look | None:
        """Return at the first put into ``i/`` after ``look``, or the first place that
        left without an item (more places than items deleted in a batch of events: a
        call that timed out, was interrupted or was passed over; the line past it
        moves up). A take's deletes of items and their places change no call's item
        and wake nobody. (A leave and a newcomer's take in one batch wake nobody
        either: a silent place's time, at most ``SILENT_PLACE_S``, wakes the line.)

        If ``look`` saw every item, the events keep it up to date (they are every
        change of ``i/`` and ``j/`` since): returned, it saves the line a read. Else
        None: the line reads again.
        """
        self._watch_synced = synced = Synced(look.revision)
        places = {kv.key: kv for kv in look.places}
        items = {kv.key: kv for kv in look.items}
        try:
            async with contextlib.aclosing(
                self.client.watch(
                    self._ready,
                    self._places_end,
                    start_revision=look.revision + 1,
                    on_created=synced.created,
                )
            ) as events:
                async for batch in events:
                    puts = left = 0
                    for e in batch:
                        ready = e.kv.key.startswith(self._ready)
                        kept = items if ready else places
                        if e.type is EventType.PUT:
                            puts += ready
                            kept[e.kv.key] = e.kv
                        else:  # a take deletes its place with its item: no line moves
                            left += -1 if ready else 1
                            kept.pop(e.kv.key, None)
                    if puts or left > 0:
                        break
                else:
                    return None
        except Compacted:
            return None  # history is gone: the caller reads again
        if not look.complete:
            return None
        return Look(
            batch[-1].kv.mod_revision,
            sorted(places.values(), key=lambda kv: (kv.create_revision, kv.key)),
            sorted(items.values(), key=lambda kv: kv.key),
            complete=True,
        )

    async def _take(
        self, session: EtcdSession | None, visibility_s: float, holder: Holder | None = None
    ) -> tuple[Taken | None, int]:
        """Take the first item past the places for one caller: ``(taken, revision)``, or
        ``(None, revision)`` at which there was none."""
        while True:
            taken, revision = await self._take_free(1, (session, visibility_s, holder))
            if taken is not None:
                return (taken[0] if taken else None), revision

    async def _take_free(self, limit: int, ask: _Ask) -> tuple[list[Taken] | None, int]:
        """Up to ``limit`` items past the places, for calls that have not parked (``ask``
        each): ``(taken, revision)``, ``[]`` if there were none at that revision, None if
        another call took them first or a place came (the caller looks again)."""
        look = await self._line.look(self._ready, self._ready_end, limit)
        free = look.items[len(look.places) :][:limit]
        if not free:
            silent = self._line.note_silent(
                [p for p in look.places[: len(look.items)] if self._line.owner(p) is None]
            )
            if silent:
                await self._line.pass_over(silent)
                return None, look.revision
            await self.confirm([ask[2]])
            return [], look.revision
        kvs = _within_bytes(free)
        return await self._take_batch(kvs, [ask] * len(kvs), [], look.revision), look.revision

    async def _take_batch(
        self,
        kvs: list[KeyValue],
        asks: list[_Ask],
        places: list[KeyValue | None],
        revision: int,
    ) -> list[Taken] | None:
        """Take ``kvs[i]`` for ``asks[i]`` (reserve it for that session, else remove it, into
        the holder's records if there is one), all in one Txn, with the deletes of what
        the holders confirmed; None if any was taken by someone else first.

        ``places[i]``: the place of the parked call ``asks[i]`` (deleted with the take,
        which requires it to be the one read); a call without one (missing or None)
        takes only if no place came after ``revision`` (the read of ``kvs``).

        A taken item is ``(kv, payload, deliveries)``: kv is the ``r/`` key made
        (its mod_revision is the receipt) when reserved, else the ``i/`` key removed.
        """
        token = secrets.token_hex(8)
        ops: list[Put | Delete] = []
        marks: list[bytes] = []
        unpacked = []
        holders = list({id(a[2]): a[2] for a in asks if a[2] is not None}.values())
        confirming = [key for h in holders for key in h.confirm]
        records: list[tuple[Holder, bytes]] = []
        if confirming and len(confirming) + 4 * len(asks) > _MAX_OPS:
            await self.confirm(list(holders))  # too many for one Txn: first, on their own
            confirming = []
        ops += [Delete(key) for key in confirming]
        compares = [Compare(kv.key, Target.MOD, "==", kv.mod_revision) for kv in kvs[: len(asks)]]
        placed = [p for p in places if p is not None]
        compares += [Compare(p.key, Target.CREATE, "==", p.create_revision) for p in placed]
        ops += [Delete(p.key) for p in placed]
        if len(placed) < min(len(kvs), len(asks)):
            compares.append(
                Compare(self._places, Target.MOD, "<", revision + 1, range_end=self._places_end)
            )
        for kv, (session, visibility_s, holder) in zip(kvs, asks, strict=False):
            iid = kv.key[len(self._ready) :]
            meta, payload = _unpack(kv.value)
            deliveries = int(meta["n"]) + 1
            unpacked.append((payload, deliveries))
            ops.append(Delete(kv.key))
            if session is None:
                marks.append(self._tombs + iid)
                ops.append(Put(marks[-1], token.encode(), lease=await self._tomb()))
                if holder is not None:
                    record = {
                        "n": deliveries,
                        "q": self.name,
                        "rev": holder.revision,
                        "m": holder.method,
                        "r": holder.rid,
                    }
                    records.append((holder, self.record_key(holder, iid)))
                    ops.append(Put(records[-1][1], _pack(record, payload)))
            else:
                marks.append(self._reserved + iid)
                reservation = {
                    "n": deliveries,
                    "deadline": time.time() + visibility_s,
                    "session": session.sid,
                    "token": token,
                }
                ops.append(Put(marks[-1], _pack(reservation, payload)))
        done = await self.client.txn(compares, ops, [Get(marks[0])], idempotent=True)
        own = _own_revision(done, token)
        if own is None:
            return None
        for h in holders:
            h.confirm = [key for key in h.confirm if key not in confirming]
        for h, made in records:
            h.records.append(made)
        return [
            (
                KeyValue(mark, b"", own, own, 1, 0) if session is not None else kv,
                payload,
                deliveries,
            )
            for kv, mark, (session, _, _), (payload, deliveries) in zip(
                kvs, marks, asks, unpacked, strict=False
            )
        ]

    async def _give_back(self, taken: Taken, holder: Holder | None = None) -> None:
        """Put an item taken for a caller that left back at its place, not counted."""
        kv, payload, deliveries = taken
        ops: list[Op] = []
        if kv.key.startswith(self._reserved):
            iid = kv.key[len(self._reserved) :]
            held = Compare(kv.key, Target.MOD, "==", kv.mod_revision)
        else:
            iid = kv.key[len(self._ready) :]
            held = Compare(self._tombs + iid, Target.CREATE, "!=", 0)
            if holder is not None:
                record = self.record_key(holder, iid)
                held = Compare(record, Target.CREATE, "!=", 0)
                ops.append(Delete(record))
                with contextlib.suppress(ValueError):
                    holder.records.remove(record)
        mark = self._reserved + iid if kv.key.startswith(self._reserved) else self._tombs + iid
        await self.client.txn(
            [held],
            [*ops, Delete(mark), Put(self._ready + iid, _pack({"n": deliveries - 1}, payload))],
            idempotent=True,
        )

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = unguarded(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


#: Ids of the returns of this process (``_front_id``): one line, so strictly increasing.
_FRONT_IDS = _Ids()


def _front_id(iid: bytes, origin: bytes) -> bytes:
    """The key of an item returned to the front: ``!`` and the time counted down (before
    any put's id, the latest return first), then ``~`` and its put id (``_origin``)."""
    return b"!%020d~" % (10**20 - 1 - int(iid[:20])) + origin


def _origin(iid: bytes) -> bytes:
    """The id an item was put with (its ``u/`` key), whatever its returns made of it."""
    front, sep, origin = iid.partition(b"~")
    return origin if sep and front.startswith(b"!") else iid


def _chunks(items: list[bytes]) -> list[list[bytes]]:
    """``items`` in order, in chunks of at most ``_PUT_BATCH`` items and (unless one item
    is larger alone) ``_PUT_BATCH_BYTES``."""
    chunks: list[list[bytes]] = [[]]
    size = 0
    for item in items:
        if chunks[-1] and (len(chunks[-1]) == _PUT_BATCH or size + len(item) > _PUT_BATCH_BYTES):
            chunks.append([])
            size = 0
        chunks[-1].append(item)
        size += len(item)
    return [c for c in chunks if c]


def _within_bytes(kvs: list[KeyValue]) -> list[KeyValue]:
    """The first of ``kvs`` (one at least) whose items add up to ``_PUT_BATCH_BYTES``: a
    take that copies them (into unconfirmed records or reservations) is a request of
    their size, and items that were put one by one must be taken together too."""
    size = 0
    for i, kv in enumerate(kvs):
        size += len(kv.value)
        if i and size > _PUT_BATCH_BYTES:
            return kvs[:i]
    return kvs


def _own_revision(done: TxnResult, token: str) -> int | None:
    """The revision of a take marked with ``token``: its Txn's, or (a retry that found
    its own mark) the earlier attempt's; None if another call took the item."""
    if done.succeeded:
        return done.revision
    if _found(done, token.encode()):
        found = done.responses[0]
        assert isinstance(found, RangeResult)
        return found.kvs[0].mod_revision  # our earlier attempt: one Txn, one revision
    return None


def _found(done: TxnResult, token: bytes) -> bool:
    """Whether the failure branch's Get found our own mark (an earlier attempt applied)."""
    if done.succeeded or not done.responses:
        return False
    found = done.responses[0]
    if not isinstance(found, RangeResult) or not found.kvs:
        return False
    value = found.kvs[0].value
    if value == token:
        return True
    if value.startswith(b"{"):
        meta, _ = _unpack(value)
        return bool(meta.get("token") == token.decode())
    return False


async def return_records(client: EtcdClient, root: bytes, kvs: list[KeyValue]) -> int:
    """Put the items of unconfirmed records (``Holder``) back at their places, not
    counted; how many. A record changed meanwhile is left alone; one whose queue is
    gone (deleted, or made again since) is dropped."""
    moved = 0
    for kv in kvs:
        meta, payload = _unpack(kv.value)
        name = str(meta["q"])
        iid = kv.key.rpartition(b"/")[2]
        unchanged = Compare(kv.key, Target.MOD, "==", kv.mod_revision)
        same_queue = Compare(root + b"o/" + name_key(name), Target.CREATE, "==", int(meta["rev"]))
        ready = root + b"q/" + name_key(name) + b"/i/" + iid
        back = Put(ready, _pack({"n": max(int(meta["n"]) - 1, 0)}, payload))
        compares = [unchanged, same_queue] if meta["rev"] else [unchanged]
        done = await client.txn(compares, [Delete(kv.key), back], idempotent=True)
        if done.succeeded:
            moved += 1
        elif meta["rev"]:
            await client.txn([unchanged], [Delete(kv.key)], idempotent=True)
    return moved


async def delete_records(client: EtcdClient, keys: list[bytes]) -> None:
    """Delete unconfirmed records whose answers were read (confirmed)."""
    for i in range(0, len(keys), _MAX_OPS):
        await client.txn([], [Delete(key) for key in keys[i : i + _MAX_OPS]])


@dataclass(slots=True)
class Found:
    """One client thread's unconfirmed records, as etcd has them (a session taken over
    from another gateway): the keys, and the answer they make if they are one call's."""

    keys: list[bytes]
    #: ``(queue, method, payloads)`` of the one call they were taken for; None if
    #: they cannot be one answer (several queues, methods or requests).
    answer: tuple[str, str, list[bytes]] | None
    #: The client's request id they were taken for (None: not recorded).
    rid: int | None = None


def found_records(kvs: list[KeyValue], prefix: bytes) -> dict[int, Found]:
    """The records under ``prefix`` (``<root>g/<session>/``, read in key order: by thread,
    queue, then item id), by client thread."""
    found: dict[int, Found] = {}
    for kv in kvs:
        thread = int(kv.key[len(prefix) :].partition(b"/")[0])
        meta, payload = _unpack(kv.value)
        entry = found.get(thread)
        rid = meta.get("r")
        if entry is None:
            answer = (str(meta["q"]), str(meta["m"]), [payload])
            found[thread] = Found([kv.key], answer, None if rid is None else int(rid))
            continue
        entry.keys.append(kv.key)
        if entry.answer is not None:
            queue_name, method, payloads = entry.answer
            same = (queue_name, method, entry.rid) == (meta["q"], meta["m"], rid)
            if same and method == "get_many":
                payloads.append(payload)
            else:
                entry.answer = None
    return found
