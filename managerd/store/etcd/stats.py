"""The cluster's figures, as every gateway shows them: read from etcd, refreshed.

``Store.stats()`` answers at once, from any thread (the metrics scrape), so
an ``EtcdStore`` cannot ask etcd then. It answers from a ``ClusterView``
that :meth:`ClusterView.refresh` reads for **every** object of the cluster
(not only those this gateway serves), at one revision (a consistent cut):

- one Range per kind of small state, whole: lock and semaphore contender
  keys (holders, tokens, waiters, who waits), events (keys only), barriers,
  Values, condition waiters (keys only), sessions' descriptions
  (``/m/who/``), waiter keys and recorded deadlocks (``deadlocks.py``),
  the gateways' waiter counts (below);
- per object, count-only Ranges, ``COUNTS_PER_TXN`` to a read-only Txn
  (at most ``CONCURRENCY`` requests in flight): a queue's ready, reserved
  and unfinished items, a dict's entries, a pipe's messages per end (and
  its closed ends, keys only); a list, Namespace or Array is one key, read
  whole. (Each Txn is one revision; the Txns of one refresh are within
  the refresh's duration of each other.)

The store refreshes every ``STATS_INTERVAL_S``, or four times the last
refresh's duration if longer (so at most a fifth of the time is spent
reading; with 10,000 objects, see BENCHMARKS.md), while someone has looked
in the last ``LOOKED_S`` (status, the page, a metrics scrape), else every
``IDLE_INTERVAL_S``. **Staleness**: what ``stats()`` shows of other
gateways' work is at most one interval plus one refresh old; this
gateway's own parked calls are counted as they are now.

**Waiters that leave no key** (a blocked queue get, an event or pipe wait,
a barrier party): each gateway publishes how many of its calls wait on
each object, one key ``/m/gw/<gateway>`` on a lease of its own, rewritten
at most every ``STATS_INTERVAL_S`` when it changed (so its cost does not
grow with traffic; a gateway that dies takes its count with it). A lock's,
semaphore's and condition's waiters are their keys, on their sessions'
leases. Counters (``puts_total``, ``gets_total``, ``acquires_total``) are
this gateway's answers (Prometheus sums them over gateways): a
cluster-wide counter would be one more write per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import marshal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from managerd.histogram import Histogram
from managerd.store.etcd.client import EtcdClient, unguarded
from managerd.store.etcd.deadlocks import (
    Actor,
    EtcdDeadlocks,
    _same,
    contender_lease,
    lock_holder,
    semaphore_holders,
)
from managerd.store.etcd.kv import EtcdError, Get, KeyValue, RangeResult, name_key, prefix_end
from managerd.store.memory.base import SharedObject
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

log = logging.getLogger(__name__)

STATS_INTERVAL_S: Final = 1.0
IDLE_INTERVAL_S: Final = 30.0
LOOKED_S: Final = 60.0
CONCURRENCY: Final = 32
COUNTS_PER_TXN: Final = 120  # etcd's --max-txn-ops is 128 by default
GATEWAY_TTL_S: Final = 10

_NOBODY: Final[Mapping[str, Any]] = {"id": None, "peer": None, "host": None, "pid": None}


@dataclass(frozen=True, slots=True)
class Named:
    """An object as the names mirror knows it."""

    name: str
    typeid: str
    args: Mapping[str, Any]


@dataclass(slots=True)
class _Read:
    """One refresh's prefix reads, by kind."""

    revision: int
    parts: dict[str, list[KeyValue]] = field(default_factory=dict)

    def grouped(self, kind: str, prefix: bytes) -> dict[bytes, list[KeyValue]]:
        """The keys of ``kind`` by object (the name segment after ``prefix``)."""
        groups: dict[bytes, list[KeyValue]] = {}
        for kv in self.parts[kind]:
            segment = kv.key[len(prefix) :].split(b"/", 1)[0]
            groups.setdefault(segment, []).append(kv)
        return groups


class ClusterView:
    """The last refresh's figures of every object (see the module docstring)."""

    def __init__(self, client: EtcdClient, root: bytes, deadlocks: EtcdDeadlocks) -> None:
        self.client = client
        self.root = root
        self.deadlocks = deadlocks
        #: Each object's figures; ``waiters`` counts other gateways' only.
        self.objects: dict[str, ObjectStats] = {}
        #: Since when (wall clock) each lock's holding is held, as first seen here.
        self.held_since: dict[str, float] = {}
        self._first_seen: dict[tuple[bytes, int], float] = {}
        self.cycles: list[dict[str, Any]] = []
        self.deadlocks_total = 0
        self.duration_s = 0.0
        self.revision = 0

    async def refresh(
        self,
        objects: list[Named],
        mine: set[int],
        gateway: bytes,
        blank: Callable[[Named], SharedObject],
    ) -> None:
        """Read every object's figures at one revision (``mine``: this gateway's leases,
        whose waits it counts itself; ``gateway``: its key in ``/m/gw/``)."""
        started = time.monotonic()
        root = self.root
        kinds = {
            "wf": (root + b"wf/", False),
            "l": (root + b"l/", False),
            "sem": (root + b"sem/", False),
            "ev": (root + b"ev/", True),
            "b": (root + b"b/", False),
            "v": (root + b"v/", False),
            "cv": (root + b"cv/", True),
            "who": (root + b"who/", False),
            "dl": (root + b"dl/", False),
            "gw": (root + b"gw/", False),
        }
        first = await self.client.range(kinds["wf"][0], prefix_end(kinds["wf"][0]))
        read = _Read(first.revision, {"wf": first.kvs})
        at = first.revision
        limit = asyncio.Semaphore(CONCURRENCY)

        async def rng(key: bytes, end: bytes = b"", **kw: Any) -> RangeResult:
            async with limit:
                return await self.client.range(key, end, revision=at, **kw)

        async def whole(kind: str) -> None:
            prefix, keys_only = kinds[kind]
            read.parts[kind] = (await rng(prefix, prefix_end(prefix), keys_only=keys_only)).kvs

        count_ = await rng(self.deadlocks.count_key)
        await asyncio.gather(*(whole(k) for k in kinds if k != "wf"))
        self.deadlocks_total = int(count_.kvs[0].value) if count_.kvs else 0

        who = {int(kv.key[len(kinds["who"][0]) :], 16): json.loads(kv.value)
               for kv in read.parts["who"]}  # fmt: skip
        locks = read.grouped("l", kinds["l"][0])
        sems = read.grouped("sem", kinds["sem"][0])
        events = set(read.grouped("ev", kinds["ev"][0]))
        barriers = {k: v[0] for k, v in read.grouped("b", kinds["b"][0]).items()}
        values = {k: v[0] for k, v in read.grouped("v", kinds["v"][0]).items()}
        conds = read.grouped("cv", kinds["cv"][0])
        others: dict[str, int] = {}
        for kv in read.parts["gw"]:
            if kv.key != kinds["gw"][0] + gateway:
                for name, n in json.loads(kv.value).items():
                    others[name] = others.get(name, 0) + int(n)

        def person(lease: int, thread: int | None = None, **more: Any) -> dict[str, Any]:
            entry = dict(who.get(lease, _NOBODY))
            if thread is not None or not more:
                entry["thread"] = thread
            entry.update(more)
            return entry

        counts = _Counts(self.client, limit)

        async def count(prefix: bytes) -> int:
            return await counts.count(prefix)

        now = time.time()
        seen: dict[tuple[bytes, int], float] = {}
        holders_of: dict[str, list[Actor]] = {}

        async def one(obj: Named) -> ObjectStats:
            nk, typeid, args = name_key(obj.name), obj.typeid, obj.args
            if typeid in ("Queue", "JoinableQueue"):
                base = root + b"q/" + nk + b"/"
                depth, reserved, unfinished = await asyncio.gather(
                    count(base + b"i/"), count(base + b"r/"), count(base + b"u/")
                )
                return QueueStats(obj.name, typeid, args, depth, reserved,
                                  others.get(obj.name, 0), 0, 0, unfinished)  # fmt: skip
            if typeid in ("Lock", "RLock"):
                prefix = root + b"l/" + nk + b"/"
                kvs = sorted(locks.get(nk, []), key=lambda kv: kv.create_revision)
                held = lock_holder(kvs, prefix)
                holder, token, held_for = None, 0, None
                if held is not None:
                    actor, kv = held
                    holders_of[obj.name] = [actor]
                    holder, token = person(actor[0], actor[1]), kv.create_revision
                    since = self._first_seen.get((kv.key, token), now)
                    seen[(kv.key, token)] = since
                    self.held_since[obj.name] = since
                    held_for = round(now - since, 3)
                waiting = []
                for kv in kvs[1:]:
                    lease_hex, _, owner = kv.key[len(prefix) :].partition(b"/")
                    waiting.append(person(int(lease_hex, 16), int(owner) if owner else None))
                waits = sum(1 for kv in kvs[1:] if contender_lease(kv, prefix) not in mine)
                return LockStats(obj.name, typeid, args, holder, held_for, token, waits,
                                 tuple(waiting), 0, Histogram(), Histogram())  # fmt: skip
            if typeid in ("Semaphore", "BoundedSemaphore"):
                prefix = root + b"sem/" + nk + b"/"
                kvs = sems.get(nk, [])
                if not any(kv.key == prefix + b"n" for kv in kvs):  # being made
                    return SemaphoreStats(obj.name, typeid, args, int(args.get("value", 1)), 0,
                                          (), 0, 0, (), Histogram())  # fmt: skip
                holding = semaphore_holders(kvs, prefix)
                permits = int(next(kv.value for kv in kvs if kv.key == prefix + b"n"))
                contenders = sorted((kv for kv in kvs if kv.key.startswith(prefix + b"c/")),
                                    key=lambda kv: kv.create_revision)  # fmt: skip
                leases = [contender_lease(kv, prefix + b"c/") for kv in holding]
                holders_of[obj.name] = [(lease, None) for lease in leases]
                by_lease: dict[int, int] = {}
                for lease in leases:
                    by_lease[lease] = by_lease.get(lease, 0) + 1
                rest = [contender_lease(kv, prefix + b"c/") for kv in contenders[len(holding) :]]
                return SemaphoreStats(
                    obj.name, typeid, args,
                    value=permits - len(holding),
                    held=len(holding),
                    holders=tuple(person(lease, permits=n) for lease, n in by_lease.items()),
                    token=max((kv.create_revision for kv in holding), default=0),
                    waiters=sum(1 for lease in rest if lease not in mine),
                    waiting=tuple(person(lease) for lease in rest),
                    wait_seconds=Histogram(),
                )  # fmt: skip
            if typeid == "Event":
                return EventStats(obj.name, typeid, args, nk in events, others.get(obj.name, 0))
            if typeid == "Condition":
                prefix = root + b"cv/" + nk + b"/w/"
                waits = sum(
                    1 for kv in conds.get(nk, []) if contender_lease(kv, prefix) not in mine
                )
                return ConditionStats(obj.name, typeid, args, waits)
            if typeid == "Barrier":
                state = barriers.get(nk)
                broken = bool(marshal.loads(state.value)["broken"]) if state else False
                return BarrierStats(obj.name, typeid, args, others.get(obj.name, 0), broken)
            if typeid == "Value":
                number = values.get(nk)
                if number is None:
                    return ObjectStats(obj.name, typeid, args)
                return ValueStats(obj.name, typeid, args, marshal.loads(number.value))
            if typeid == "dict":
                return SizeStats(obj.name, typeid, args, await count(root + b"d/" + nk + b"/"))
            if typeid == "Pipe":
                base = root + b"p/" + nk + b"/"
                zero, one_, closed = await asyncio.gather(
                    count(base + b"q/0/i/"),
                    count(base + b"q/1/i/"),
                    rng(base + b"closed/", prefix_end(base + b"closed/"), keys_only=True),
                )
                ends = {kv.key[len(base) + 7 :] for kv in closed.kvs}
                return PipeStats(obj.name, typeid, args, (zero, one_),
                                 (b"0" in ends, b"1" in ends), others.get(obj.name, 0))  # fmt: skip
            cell = (await rng(root + b"c/" + nk)).kvs
            made = blank(obj)
            if cell:
                made.load_state(marshal.loads(cell[0].value))
            return made.stats()

        results = await asyncio.gather(*(one(obj) for obj in objects), return_exceptions=True)
        fresh: dict[str, ObjectStats] = {}
        for obj, result in zip(objects, results, strict=True):
            if isinstance(result, BaseException):
                if isinstance(result, EtcdError | ValueError | KeyError):
                    log.debug("etcd store: stats of %r: %s", obj.name, result)
                    continue
                raise result
            fresh[obj.name] = result
        self._first_seen = seen
        self.held_since = {n: s for n, s in self.held_since.items() if n in fresh}
        self.objects = fresh
        self.cycles = self._standing(read, holders_of)
        self.revision = at
        self.duration_s = time.monotonic() - started

    def _standing(self, read: _Read, holders_of: dict[str, list[Actor]]) -> list[dict[str, Any]]:
        """The recorded cycles whose every wait and holding is still there."""
        waits = {kv.key: kv.create_revision for kv in read.parts["wf"]}
        cycles = []
        for kv in read.parts["dl"]:
            record = json.loads(kv.value)
            standing = True
            for key_hex, revision, name, _, lease, thread in record.get("edges", []):
                if waits.get(bytes.fromhex(key_hex)) != revision:
                    standing = False
                    break
                recorded: Actor = (lease, thread)
                if not any(_same(h, recorded) or _same(recorded, h)
                           for h in holders_of.get(name, [])):  # fmt: skip
                    standing = False
                    break
            if standing:
                cycles.append({k: v for k, v in record.items() if k != "edges"})
        return cycles


class _Counts:
    """Count-only Ranges asked for at about the same moment, sent in shared Txns."""

    def __init__(self, client: EtcdClient, limit: asyncio.Semaphore) -> None:
        self.client = client
        self.limit = limit
        self._pending: list[tuple[bytes, asyncio.Future[int]]] = []
        self._sending: set[asyncio.Future[None]] = set()

    async def count(self, prefix: bytes) -> int:
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[int] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((prefix, answer))
        return await answer

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        for i in range(0, len(pending), COUNTS_PER_TXN):
            sending = unguarded(self._send(pending[i : i + COUNTS_PER_TXN]))
            self._sending.add(sending)
            sending.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[tuple[bytes, asyncio.Future[int]]]) -> None:
        try:
            async with self.limit:
                done = await self.client.txn(
                    [], [Get(p, prefix_end(p), count_only=True) for p, _ in batch]
                )
        except BaseException as exc:
            for _, answer in batch:
                if not answer.done():
                    answer.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, answer), result in zip(batch, done.responses, strict=True):
            if not answer.done():
                answer.set_result(result.count if isinstance(result, RangeResult) else 0)


class Publisher:
    """This gateway's count of waiting calls per object, in ``/m/gw/<gateway>``."""

    def __init__(self, client: EtcdClient, root: bytes, gateway: bytes) -> None:
        self.client = client
        self.key = root + b"gw/" + gateway
        self._lease = 0
        self._published: dict[str, int] | None = None
        self._renewed = 0.0

    async def publish(self, counts: dict[str, int]) -> None:
        """Keep the key on a live lease; rewrite it if the counts changed."""
        now = time.monotonic()
        if self._lease and now - self._renewed > GATEWAY_TTL_S / 3:
            try:
                await self.client.lease_keepalive(self._lease)
                self._renewed = now
            except EtcdError:
                self._lease, self._published = 0, None
        if not self._lease:
            self._lease = await self.client.lease_grant(GATEWAY_TTL_S)
            self._renewed = now
        if counts != self._published:
            await self.client.put(self.key, json.dumps(counts).encode(), lease=self._lease)
            self._published = dict(counts)

    async def close(self) -> None:
        if self._lease:
            with contextlib.suppress(EtcdError):
                await self.client.lease_revoke(self._lease)
            self._lease = 0


def unread(name: str, typeid: str, args: Mapping[str, Any]) -> ObjectStats:
    """An object not read yet (made since the last refresh): its kind's figures, empty."""
    if typeid in ("Queue", "JoinableQueue"):
        return QueueStats(name, typeid, args, 0, 0, 0, 0, 0, 0)
    if typeid in ("Lock", "RLock"):
        return LockStats(name, typeid, args, None, None, 0, 0, (), 0, Histogram(), Histogram())
    if typeid in ("Semaphore", "BoundedSemaphore"):
        value = args.get("value", 1)
        return SemaphoreStats(name, typeid, args, value, 0, (), 0, 0, (), Histogram())
    if typeid == "Event":
        return EventStats(name, typeid, args, False, 0)
    if typeid == "Condition":
        return ConditionStats(name, typeid, args, 0)
    if typeid == "Barrier":
        return BarrierStats(name, typeid, args, 0, False)
    if typeid == "Pipe":
        return PipeStats(name, typeid, args, (0, 0), (False, False), 0)
    if typeid == "Value":
        return ValueStats(name, typeid, args, args.get("value", 0))
    return SizeStats(name, typeid, args, 0)
