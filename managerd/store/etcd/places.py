"""One line of parked calls across gateways: place keys, in create_revision order.

A queue's blocked gets and reserves (``queues.py``) and a pipe end's blocked
reads (``pipes.py``) wait in one line whichever gateway they came to: a call
that finds nothing for it puts its place ``<prefix><process><seq>`` (the
places of one process's Txn in their arrival order, by key); the places,
oldest first (by create_revision, then key), are the line. The object's
code says what the line hands out (the i-th item to the i-th place, ...);
this module keeps the places of one object in one process:

- ``placed``: the calls of this process by their place's key; ``refresh``
  drops a place that is no longer there (passed over: its call parks again,
  at the end of the line).
- A place of another process whose answer stands untaken for
  ``SILENT_PLACE_S`` (as this process sees it: its gateway died, or is cut
  off from etcd) is passed over: deleted, if still the one read, so that the
  line moves on.
- A call that leaves deletes its place, made again until etcd answers (a
  place left behind would be passed over, after ``SILENT_PLACE_S``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from managerd.store.etcd.client import EtcdClient, unguarded, until_answered
from managerd.store.etcd.kv import Compare, Delete, Get, KeyValue, Put, RangeResult, Target

log = logging.getLogger(__name__)

#: How long another process sees an answer stand untaken for a parked call's place before
#: it passes the place over: far above a live gateway's take (a few ms), far below a
#: session's TTL.
SILENT_PLACE_S = 1.0
#: This process's part of its places' keys, then a count: places of one Txn are in line by key.
_ORIGIN = secrets.token_hex(6).encode() + b"."
_SEQ = itertools.count()


class Placed(Protocol):
    """A parked call: its place once it has one, and its answer."""

    place: KeyValue | None

    @property
    def future(self) -> asyncio.Future[Any]: ...


C = TypeVar("C", bound=Placed)


@dataclass(frozen=True, slots=True)
class Look:
    """The places, oldest first, the first items, and what else was read with them."""

    revision: int
    places: list[KeyValue]
    items: list[KeyValue]
    others: list[RangeResult] = dataclasses.field(default_factory=list)
    #: Every item there is (the read was not cut short by its limit): a watch's events
    #: since can keep it up to date (``queues.py``).
    complete: bool = False


class Places(Generic[C]):
    """The places under ``prefix`` (one object's line) as this process keeps them."""

    def __init__(self, client: EtcdClient, prefix: bytes, end: bytes, label: str) -> None:
        self.client = client
        self.prefix = prefix
        self.end = end
        #: What the log calls the object (``queue 'jobs'``).
        self.label = label
        #: The calls of this process parked in the line, by their place's key.
        self.placed: dict[bytes, C] = {}
        #: Places of other processes with an answer for them, since when (the loop's time).
        self.silent: dict[bytes, float] = {}
        #: How many places the last look found.
        self.seen = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def look(
        self, items: bytes, items_end: bytes, need: int, others: Iterable[Get] = ()
    ) -> Look:
        """The places and the first ``need`` items of ``[items, items_end)`` (at least
        one), with ``others``, in one read (if more items are needed than the count of
        places last seen let it guess, they are read again after)."""
        guess = max(1, self.seen + need)
        extra = list(others)
        done = await self.client.txn(
            [],
            [Get(self.prefix, self.end), Get(items, items_end, limit=guess), *extra],
            idempotent=True,
        )
        places_read, items_read, *more = done.responses
        assert isinstance(places_read, RangeResult) and isinstance(items_read, RangeResult)
        places = sorted(places_read.kvs, key=lambda kv: (kv.create_revision, kv.key))
        self.seen = len(places)
        found = items_read.kvs
        need = max(1, len(places) + need)
        read = [r for r in more if isinstance(r, RangeResult)]
        if items_read.more and len(found) < need:
            found = (await self.client.range(items, items_end, limit=need)).kvs
            return Look(done.revision, places, found, read)
        return Look(done.revision, places, found, read, complete=not items_read.more)

    def refresh(self, places: list[KeyValue], calls: Iterable[C]) -> None:
        """``calls``' places as ``places`` has them; a call whose place is gone (passed
        over) has none again: it parks again, at the end of the line (and deletes the
        place, in case the read was older than it)."""
        current = {kv.key: kv for kv in places}
        for call in calls:
            if call.place is None:
                continue
            read = current.get(call.place.key)
            if read is None:
                self.unplace(call)
            else:
                call.place = read

    def owner(self, place: KeyValue) -> C | None:
        """The call of this process at ``place`` (None: another process's)."""
        return self.placed.get(place.key)

    def note_silent(self, foreign: list[KeyValue]) -> list[KeyValue]:
        """Of ``foreign`` (other processes' places with an answer for them), those seen so
        for ``SILENT_PLACE_S`` or more."""
        now = asyncio.get_running_loop().time()
        self.silent = {p.key: self.silent.get(p.key, now) for p in foreign}
        return [p for p in foreign if now - self.silent[p.key] >= SILENT_PLACE_S]

    def silent_wait_s(self) -> float | None:
        """How long until the first silent place's time is up (None: none is silent)."""
        if not self.silent:
            return None
        now = asyncio.get_running_loop().time()
        return max(0.0, min(self.silent.values()) + SILENT_PLACE_S - now)

    async def pass_over(self, silent: list[KeyValue]) -> None:
        """Delete the ``silent`` places (each if still the one read)."""
        for place in silent:
            log.warning("%s: passing over a silent place %r", self.label, place.key)
            self.silent.pop(place.key, None)
        await self.client.txn(
            [Compare(p.key, Target.CREATE, "==", p.create_revision) for p in silent],
            [Delete(p.key) for p in silent],
            idempotent=True,
        )

    async def park(self, calls: list[C], values: list[bytes] | None = None) -> None:
        """Give ``calls`` their places at the end of the line, in order, at once
        (``values``: each place's value, else empty)."""
        if not calls:
            return
        keys = [self.prefix + _ORIGIN + b"%016d" % next(_SEQ) for _ in calls]
        values = values or [b""] * len(calls)
        done = await self.client.txn(
            [], [Put(key, value) for key, value in zip(keys, values, strict=True)], idempotent=True
        )
        for call, key, value in zip(calls, keys, values, strict=True):
            call.place = KeyValue(key, value, done.revision, done.revision, 1, 0)
            self.placed[key] = call
            if call.future.done():  # left meanwhile: its place goes at once
                self.unplace(call)

    def taken(self, call: C) -> None:
        """``call``'s place was deleted with its take."""
        if call.place is not None:
            self.placed.pop(call.place.key, None)
            call.place = None

    def unplace(self, call: C) -> None:
        """``call`` left the line: its place goes (made again until etcd answers)."""
        if call.place is None:
            return
        key = call.place.key
        call.place = None
        if self.placed.get(key) is call:
            del self.placed[key]
            task = unguarded(until_answered(lambda: self.client.delete(key)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
