"""Deadlocks named across gateways: the wait-for graph read from etcd.

The memory store walks its own objects (``store/memory/deadlock.py``); on
etcd the graph is spread over every gateway, so it is read from the keys:

- **holders**: a Lock's or RLock's holder is its oldest contender key
  ``/m/l/<name>/<lease>[/<thread>]`` (``locks.py``; a Lock's thread is in
  the key's value, after the attempt mark); a Semaphore's are its ``n``
  oldest contenders ``/m/sem/<name>/c/<lease>/...``, each held by the
  session (any of its threads), as in the memory store;
- **waiters**: a key ``/m/wf/<lease>/<thread>/<random>`` naming the object
  waited on, put on the waiting session's lease by its gateway when an
  acquire is about to wait (only while ``deadlock`` is not ``off``),
  deleted once the call is answered; a session that ends takes its keys.
- **who**: ``/m/who/<lease>``, the session's public description (id, peer,
  host, pid), on its lease (``EtcdStore`` puts it when the lease opens).

An actor is ``(lease, thread)``. When a call starts waiting on a lock or a
semaphore, its gateway puts the waiter key, then reads every waiter key in
one Range (at most ``MAX_WAITERS``) and, at that Range's revision (one
consistent cut), the holders of the objects the walk reaches (one Range
each, read once): the walk is the memory store's (a semaphore waiter is
stuck only if every holder is; at most ``MAX_CYCLE`` actors).

**Exactly one gateway names a cycle.** Two waits that close one cycle at
the same moment through two gateways may both see it: only the wait whose
waiter key is the newest in the cycle (its create_revision) acts on it.
Its read came after that key, so it sees every older edge; the others
leave it to that one. It then, as ``deadlock`` says:

- ``report``: one log line naming every session, thread and lock, a count
  in etcd (``/m/dlcount``: ``managerd_deadlocks_total`` and ``status`` of
  every gateway show the cluster's), and the cycle kept in
  ``/m/dl/<revision>`` on the closing session's lease, shown by every
  gateway's ``status`` while it stands (``standing``, from each stats
  refresh: every wait and holding in it still there);
- ``raise``: the same count and a log line, and the acquire fails with
  ``DeadlockDetected`` (its contender key withdrawn); the others wait on.

A Condition's re-acquire after ``wait`` is reported, never refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Final

from managerd.store.etcd.client import EtcdClient, cleanup
from managerd.store.etcd.kv import (
    Compacted,
    Compare,
    Delete,
    EtcdError,
    KeyValue,
    Put,
    Target,
    name_key,
    prefix_end,
)
from managerd.store.memory.deadlock import (
    LOCK_TYPES,
    MAX_CYCLE,
    SEMAPHORE_TYPES,
    DeadlockMode,
)
from managerd_client.errors import DeadlockDetected

log = logging.getLogger("managerd")

#: Waiter keys read by one check (a Range's limit): more are not looked at.
MAX_WAITERS: Final = 10_000
_ATTEMPT_BYTES: Final = 8  # locks.py: the random attempt mark before a Lock's thread

#: ``(lease, thread)``; ``thread`` None: any thread of the session (a permit's holder).
Actor = tuple[int, int | None]

#: Set in a call's task while a Lock's own holder waits for it to be released (a
#: second acquire by its session): that wait is on a holding of its own. Any other
#: wait whose waiter holds the lock is over (it got it since its waiter key).
HELD_BY_SELF: ContextVar[bool] = ContextVar("HELD_BY_SELF", default=False)


@dataclass(frozen=True, slots=True)
class Edge:
    """A waiter key: ``actor`` waits on the object ``name`` (a ``typeid``)."""

    actor: Actor
    name: str
    typeid: str
    key: bytes
    revision: int
    held_by_self: bool = False


def lock_holder(kvs: Iterable[KeyValue], prefix: bytes) -> tuple[Actor, KeyValue] | None:
    """The holder of a lock (its oldest contender key under ``prefix``) and its key."""
    first = min(kvs, key=lambda kv: kv.create_revision, default=None)
    if first is None:
        return None
    lease_hex, _, owner = first.key[len(prefix) :].partition(b"/")
    thread: int | None = None
    if owner:
        thread = int(owner)
    else:
        note = first.value[_ATTEMPT_BYTES:]
        if note.startswith(b"@"):
            thread = int(note[1:].split(b"@")[0])
    return (int(lease_hex, 16), thread), first


def semaphore_holders(kvs: Iterable[KeyValue], prefix: bytes) -> list[KeyValue]:
    """The contender keys holding a semaphore's permits (the ``n`` oldest)."""
    permits = 0
    contenders = []
    for kv in kvs:
        rest = kv.key[len(prefix) :]
        if rest == b"n":
            permits = int(kv.value)
        elif rest.startswith(b"c/"):
            contenders.append(kv)
    contenders.sort(key=lambda kv: kv.create_revision)
    return contenders[:permits]


def contender_lease(kv: KeyValue, prefix: bytes) -> int:
    """The lease of a lock's (``prefix`` = the lock's) or semaphore's (its ``c/``) contender."""
    return int(kv.key[len(prefix) :].split(b"/")[0], 16)


def edges_of(kvs: Iterable[KeyValue], prefix: bytes) -> list[Edge]:
    """The waiter keys read under ``/m/wf/``."""
    edges = []
    for kv in kvs:
        lease_hex, thread, _ = kv.key[len(prefix) :].split(b"/", 2)
        entry = json.loads(kv.value)
        actor = (int(lease_hex, 16), int(thread))
        edges.append(
            Edge(
                actor,
                entry["name"],
                entry["type"],
                kv.key,
                kv.create_revision,
                bool(entry.get("self")),
            )
        )
    return edges


def _same(holder: Actor, actor: Actor) -> bool:
    return holder[0] == actor[0] and (holder[1] is None or holder[1] == actor[1])


class Graph:
    """The wait-for graph at one revision: every waiter key, holders read as needed."""

    def __init__(
        self,
        edges: list[Edge],
        holders: Callable[[str, str], Awaitable[list[Actor]]],
    ) -> None:
        self.edges = edges
        self._read_holders = holders
        self._holders: dict[str, list[Actor]] = {}

    async def holders(self, name: str, typeid: str) -> list[Actor]:
        if name not in self._holders:
            self._holders[name] = await self._read_holders(name, typeid)
        return self._holders[name]

    def waits(self, actor: Actor) -> list[Edge]:
        return [e for e in self.edges if _same(actor, e.actor) or e.actor == actor]

    async def path_back(
        self, start: Actor, edge: Edge, seen: set[Actor]
    ) -> list[tuple[Edge, Actor]] | None:
        """Steps from ``edge``'s object's holders back to ``start``, if every way out leads
        there (``store/memory/deadlock.py``'s walk): ``(edge, holder)`` pairs."""
        holders = await self.holders(edge.name, edge.typeid)
        if not holders or len(seen) > MAX_CYCLE:
            return None
        path: list[tuple[Edge, Actor]] | None = None
        for holder in holders:
            if edge.typeid in LOCK_TYPES and _same(holder, edge.actor) and not edge.held_by_self:
                return None  # it got the lock since it put its waiter key: not waiting
            if _same(holder, start):
                found: list[tuple[Edge, Actor]] | None = [(edge, holder)]
            else:
                found = await self._from(start, holder, seen)
                if found is not None:
                    found = [(edge, holder), *found]
            if found is None:
                return None  # this holder may still release: not stuck
            if path is None:
                path = found
        return path

    async def _from(
        self, start: Actor, actor: Actor, seen: set[Actor]
    ) -> list[tuple[Edge, Actor]] | None:
        if actor in seen:
            return None
        seen.add(actor)
        for edge in self.waits(actor):
            rest = await self.path_back(start, edge, seen)
            if rest is not None:
                return rest
        return None


class EtcdDeadlocks:
    """One gateway's part of the cluster's deadlock detection (see the module docstring)."""

    def __init__(self, client: EtcdClient, root: bytes, mode: DeadlockMode) -> None:
        self.client = client
        self.root = root
        self.mode = mode
        self.waiters = root + b"wf/"
        self.who = root + b"who/"
        self.cycles = root + b"dl/"
        self.count_key = root + b"dlcount"
        #: Checks under way (done once each has looked, and acted).
        self.checking: set[asyncio.Future[None]] = set()

    def lock_prefix(self, name: str) -> bytes:
        return self.root + b"l/" + name_key(name) + b"/"

    def semaphore_prefix(self, name: str) -> bytes:
        return self.root + b"sem/" + name_key(name) + b"/"

    def waiter_key(self, lease: int, thread: int) -> bytes:
        return self.waiters + f"{lease:016x}/{thread}/{secrets.token_hex(6)}".encode()

    async def waiting(
        self,
        lease: int,
        thread: int,
        name: str,
        typeid: str,
        answer: asyncio.Future[Any],
        *,
        refuse: bool,
        held_by_self: bool = False,
    ) -> None:
        """``(lease, thread)``'s call ``answer`` waits on ``name``: keep its waiter key
        until the call is answered, and look for a cycle it closes (``held_by_self``:
        see ``HELD_BY_SELF``)."""
        if self.mode is DeadlockMode.OFF or answer.done():
            return
        key = self.waiter_key(lease, thread)
        entry = json.dumps({"name": name, "type": typeid, "self": held_by_self}).encode()
        loop = asyncio.get_running_loop()
        checked: asyncio.Future[None] = loop.create_future()
        self.checking.add(checked)
        done: asyncio.Future[None] = loop.create_future()

        def answered(_: asyncio.Future[Any]) -> None:
            if not done.done():
                done.set_result(None)

        answer.add_done_callback(answered)
        record: bytes | None = None
        try:
            try:
                put = await self.client.txn(
                    [Compare(key, Target.CREATE, "==", 0)],
                    [Put(key, entry, lease=lease)],
                    idempotent=True,
                )
                if not answer.done():
                    edge = Edge((lease, thread), name, typeid, key, put.revision, held_by_self)
                    record = await self._check(edge, answer, refuse=refuse)
            finally:
                self.checking.discard(checked)
                checked.set_result(None)
            await done
        finally:
            deletes = [Delete(key)] + ([Delete(record)] if record else [])
            with contextlib.suppress(EtcdError):
                await cleanup(self.client.txn([], deletes))

    async def _check(
        self, mine: Edge, answer: asyncio.Future[Any], *, refuse: bool
    ) -> bytes | None:
        """Look for a cycle ``mine`` closes; act on it (the key of its record, if kept)."""
        for _ in range(3):
            try:
                graph, revision = await self.graph(revision=0)
                steps = await graph.path_back(mine.actor, mine, set())
                break
            except Compacted:
                continue
        else:
            return None
        if steps is None or max(edge.revision for edge, _ in steps) != mine.revision:
            return None  # no cycle, or a newer wait in it names it
        described = await self.describe(steps, revision)
        text = described["text"]
        await self._count()
        if self.mode is DeadlockMode.RAISE and refuse:
            log.warning("deadlock refused (deadlock=raise): %s", text)
            if not answer.done():
                answer.set_exception(
                    DeadlockDetected(f"this acquire would close a deadlock: {text}")
                )
            return None
        log.warning("deadlock: %s", text)
        record = self.cycles + b"%020d" % mine.revision
        stored = {
            **described,
            "edges": [
                [e.key.hex(), e.revision, e.name, e.typeid, holder[0], holder[1]]
                for e, holder in steps
            ],
        }
        await self.client.txn(
            [Compare(mine.key, Target.CREATE, "==", mine.revision)],
            [Put(record, json.dumps(stored).encode(), lease=mine.actor[0])],
        )
        return record

    async def _count(self) -> None:
        """One more in the cluster's count (compare-and-set)."""
        while True:
            kv = await self.client.get(self.count_key)
            old, revision = (0, 0) if kv is None else (int(kv.value), kv.mod_revision)
            done = await self.client.txn(
                [Compare(self.count_key, Target.MOD, "==", revision)],
                [Put(self.count_key, b"%d" % (old + 1))],
            )
            if done.succeeded:
                return

    async def graph(self, revision: int) -> tuple[Graph, int]:
        """Every waiter key (one Range), holders read at that Range's revision."""
        read = await self.client.range(
            self.waiters, prefix_end(self.waiters), limit=MAX_WAITERS, revision=revision
        )
        at = read.revision

        async def holders(name: str, typeid: str) -> list[Actor]:
            if typeid in LOCK_TYPES:
                prefix = self.lock_prefix(name)
                kvs = (await self.client.range(prefix, prefix_end(prefix), revision=at)).kvs
                held = lock_holder(kvs, prefix)
                return [] if held is None else [held[0]]
            if typeid in SEMAPHORE_TYPES:
                prefix = self.semaphore_prefix(name)
                kvs = (await self.client.range(prefix, prefix_end(prefix), revision=at)).kvs
                return [
                    (contender_lease(kv, prefix + b"c/"), None)
                    for kv in semaphore_holders(kvs, prefix)
                ]
            return []

        return Graph(edges_of(read.kvs, self.waiters), holders), at

    async def describe(self, steps: list[tuple[Edge, Actor]], revision: int) -> dict[str, Any]:
        """The cycle as ``status`` shows it (the memory store's form) and its log text."""
        leases = {edge.actor[0] for edge, _ in steps}
        who: dict[int, dict[str, Any]] = {}
        for lease in leases:
            with contextlib.suppress(Compacted):
                kv = (await self.client.range(self.who + b"%016x" % lease, revision=revision)).kvs
                if kv:
                    who[lease] = json.loads(kv[0].value)
        return describe_cycle(steps, who)

    async def count(self) -> int:
        kv = await self.client.get(self.count_key)
        return 0 if kv is None else int(kv.value)


def _text(actor: Actor, who: dict[str, Any]) -> str:
    where = str(who.get("peer", f"lease {actor[0]:x}"))
    if who.get("host") is not None:
        where = f"{who['host']}:{who.get('pid')}"
    if actor[1] is not None:
        where += f":{actor[1]}"
    return f"{where} (session {who.get('id', '?')})"


def describe_cycle(
    steps: list[tuple[Edge, Actor]], who: dict[int, dict[str, Any]]
) -> dict[str, Any]:
    parts = []
    for i, (edge, _) in enumerate(steps):
        nxt = steps[(i + 1) % len(steps)][0].actor
        parts.append(
            f"{_text(edge.actor, who.get(edge.actor[0], {}))} waits for {edge.typeid} "
            f"{edge.name!r} held by {_text(nxt, who.get(nxt[0], {}))}"
        )
    return {
        "text": "; ".join(parts),
        "steps": [
            {
                **who.get(edge.actor[0], {"id": None, "peer": None, "host": None, "pid": None}),
                "thread": edge.actor[1],
                "waits_for": edge.name,
                "type": edge.typeid,
            }
            for edge, _ in steps
        ],
    }
