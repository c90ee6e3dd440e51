"""A FIFO queue on etcd: put, get (blocking through a watch), reserve/ack/nack.

Keys under ``/m/q/<name>/``:

- ``i/<id>``: a ready item; ``<id>`` sorts in put order, so the head is a
  Range of limit 1 in key order. (A Range sorted by create_revision sorts
  the whole prefix on every get, and collapsed under a backlog.)
- ``r/<id>``: a reserved item, with its deadline, session and delivery
  count. **Not** on the session's lease: an expiry would delete it, and it
  must go back to ``i/``. Returning expired and orphaned reservations is the
  job of one elected gateway (not built yet, see issue 13).
- ``t/<id>``: a tombstone of a taken item, on a short lease (about a minute).

``<id>`` is ``<unix ns>.<producer>.<seq>``: per producer strictly
increasing; across producers in the order of their clocks (as etcd's own
``recipes/queue``), so puts through different gateways are FIFO to within
their clock skew.

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

**Blocking get** reads the head; on an empty queue it watches ``i/`` from
the revision of that read + 1, so a put between the read and the watch is
seen — no missed wake-up, no polling. Blocked getters race for a new item
(the winner's Txn succeeds, the others watch on): not FIFO among waiters
yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import queue
import secrets
import time
from dataclasses import dataclass
from typing import Any

from managerd.store.etcd.client import EtcdClient
from managerd.store.etcd.kv import (
    Compacted,
    Compare,
    Delete,
    EventType,
    Get,
    KeyValue,
    Put,
    RangeResult,
    Target,
    TxnResult,
    prefix_end,
)
from managerd.store.etcd.sessions import DEFAULT_ROOT, EtcdSession

TOMBSTONE_TTL_S = 60
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


@dataclass(frozen=True, slots=True)
class Delivery:
    """A reserved item: ack or nack it with this (``receipt`` is the reservation's revision)."""

    id: bytes
    receipt: int
    payload: bytes
    deliveries: int  # 1 on the first delivery


class EtcdQueue:
    """The queue ``name``; any number of instances, in any processes, share it."""

    def __init__(self, client: EtcdClient, name: str, *, root: bytes = DEFAULT_ROOT) -> None:
        self.client = client
        self.name = name
        base = root + b"q/" + name.encode() + b"/"
        self._ready = base + b"i/"
        self._reserved = base + b"r/"
        self._tombs = base + b"t/"
        self._ids = _Ids()
        self._tomb_lease = _ShortLease(client)

    async def put(self, item: bytes) -> None:
        """Append ``item``; safe to retry, never duplicated (see the module docstring)."""
        iid = self._ids.next()
        await self.client.txn(
            [
                Compare(self._ready + iid, Target.CREATE, "==", 0),
                Compare(self._reserved + iid, Target.CREATE, "==", 0),
                Compare(self._tombs + iid, Target.CREATE, "==", 0),
            ],
            [Put(self._ready + iid, _pack({"n": 0}, item))],
            idempotent=True,
        )
        # Not succeeded: an earlier attempt of this call was applied (the id is ours alone).

    async def qsize(self) -> int:
        return (
            await self.client.range(self._ready, prefix_end(self._ready), count_only=True)
        ).count

    async def reserved_count(self) -> int:
        return (
            await self.client.range(self._reserved, prefix_end(self._reserved), count_only=True)
        ).count

    async def get_nowait(self) -> bytes:
        """The head, removed; ``queue.Empty`` if there is none."""
        taken, _ = await self._take(None, 0.0)
        if taken is None:
            raise queue.Empty
        return taken[1]

    async def get(self, timeout_s: float | None = None) -> bytes:
        """The head, removed, waiting up to ``timeout_s`` (None: for ever); ``queue.Empty``."""
        taken = await self._blocking(None, 0.0, timeout_s)
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
        """Give it back to the head (``requeue``) or drop it; False if no longer reserved."""
        key = self._reserved + delivery.id
        back: list[Put | Delete] = [Delete(key)]
        if requeue:
            back.append(
                Put(self._ready + delivery.id, _pack({"n": delivery.deliveries}, delivery.payload))
            )
        else:
            back.append(Put(self._tombs + delivery.id, b"", lease=await self._tomb()))
        done = await self.client.txn(
            [Compare(key, Target.MOD, "==", delivery.receipt)], back, idempotent=True
        )
        return done.succeeded

    async def _tomb(self) -> int:
        return await self._tomb_lease.current()

    async def _blocking(
        self, session: EtcdSession | None, visibility_s: float, timeout_s: float | None
    ) -> tuple[KeyValue, bytes, int]:
        loop = asyncio.get_running_loop()
        give_up = None if timeout_s is None else loop.time() + max(0.0, timeout_s)
        taken, revision = await self._take(session, visibility_s)
        while taken is None:
            left_s = None if give_up is None else give_up - loop.time()
            if left_s is not None and left_s <= 0:
                raise queue.Empty
            try:
                taken, revision = await asyncio.wait_for(
                    self._take_after_put(session, visibility_s, revision + 1), left_s
                )
            except TimeoutError:
                raise queue.Empty from None
        return taken

    async def _take_after_put(
        self, session: EtcdSession | None, visibility_s: float, start_revision: int
    ) -> tuple[tuple[KeyValue, bytes, int] | None, int]:
        """Watch ``i/`` from ``start_revision``; at each put, try to take the head."""
        revision = start_revision - 1
        try:
            async with contextlib.aclosing(
                self.client.watch(
                    self._ready, prefix_end(self._ready), start_revision=start_revision
                )
            ) as events:
                async for batch in events:
                    if not any(e.type is EventType.PUT for e in batch):
                        continue
                    taken, revision = await self._take(session, visibility_s)
                    if taken is not None:
                        return taken, revision
        except Compacted:
            pass  # the caller reads again and watches from now
        return None, revision

    async def _take(
        self, session: EtcdSession | None, visibility_s: float
    ) -> tuple[tuple[KeyValue, bytes, int] | None, int]:
        """Take the head (reserve it for ``session``, else remove it).

        ``(taken, revision)``: ``taken`` is ``(kv, payload, deliveries)``, kv
        being the reservation's when reserved, or None and the revision at
        which the queue was read empty.
        """
        while True:
            head = await self.client.range(self._ready, prefix_end(self._ready), limit=1)
            if not head.kvs:
                return None, head.revision
            kv = head.kvs[0]
            iid = kv.key[len(self._ready) :]
            meta, payload = _unpack(kv.value)
            deliveries = int(meta["n"]) + 1
            token = secrets.token_hex(8)
            if session is None:
                mark = self._tombs + iid
                ops: list[Put | Delete] = [
                    Delete(kv.key),
                    Put(mark, token.encode(), lease=await self._tomb()),
                ]
            else:
                mark = self._reserved + iid
                reservation = {
                    "n": deliveries,
                    "deadline": time.time() + visibility_s,
                    "session": session.sid,
                    "token": token,
                }
                ops = [Delete(kv.key), Put(mark, _pack(reservation, payload))]
            done = await self.client.txn(
                [Compare(kv.key, Target.MOD, "==", kv.mod_revision)],
                ops,
                [Get(mark)],
                idempotent=True,
            )
            if done.succeeded or _found(done, token.encode()):
                if session is None:
                    return (kv, payload, deliveries), done.revision
                reserved = await self._reservation(iid, done)
                return (reserved, payload, deliveries), done.revision
            # Another consumer took it first: the next head.

    async def _reservation(self, iid: bytes, done: TxnResult) -> KeyValue:
        """The ``r/`` key a successful take made (its mod_revision is the receipt)."""
        if not done.succeeded:
            [found] = done.responses
            assert isinstance(found, RangeResult)
            return found.kvs[0]
        return KeyValue(self._reserved + iid, b"", done.revision, done.revision, 1, 0)


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
