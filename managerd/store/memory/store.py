"""The in-memory store: the ``Store`` of ``store/interface.py`` over the registry.

Objects are plain data structures on the event loop (DESIGN.md, principle
2), found by name in the :class:`Registry` this class extends (so that the
invoker's ``get`` is the registry's own, no extra call per request). With
a data directory, a :class:`Journal` keeps what must survive a restart;
fencing tokens come from a :class:`TokenSource`, and a :class:`Detector`
walks the wait-for graph as locks park their waiters.

Usable in-process (the contract suite): ``MemoryStore(loop)``, then calls
on the handles it returns with an ``api.Call`` of a ``Session``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, cast

from managerd.store.api import Call
from managerd.store.interface import Handle, Snapshot, TypeInfo
from managerd.store.memory.base import SharedObject, waiter_of
from managerd.store.memory.deadlock import Detector
from managerd.store.memory.journal import Journal, Recovery
from managerd.store.memory.queues import Queue
from managerd.store.memory.registry import TYPES, Registry
from managerd.store.memory.tokens import TokenSource
from managerd.store.sessions import Session
from managerd.store.stats import ObjectStats, StoreStats

#: The types served, as the interface describes them.
TYPE_INFO: Mapping[str, TypeInfo] = {
    typeid: TypeInfo(typeid, cls.methods, cls.create_params) for typeid, cls in TYPES.items()
}


class MemoryStore(Registry):
    """All named objects of one daemon, in memory, journaled when asked."""

    types: Mapping[str, TypeInfo] = TYPE_INFO

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        tokens: TokenSource | None = None,
        deadlocks: Detector | None = None,
    ) -> None:
        """``tokens`` None: tokens kept in memory only; ``deadlocks`` None: a reporting one."""
        super().__init__(loop, tokens if tokens is not None else TokenSource())
        #: The wait-for graph's walker (sessions are given it: ``SessionTable``).
        self.detector = deadlocks if deadlocks is not None else Detector()

    def created(self, obj: Handle) -> asyncio.Future[None] | None:
        """Kept already: on this loop (and journaled, if at all, with the next barrier)."""
        return None

    # -- parked and answered calls ---------------------------------------------------
    def abandon(
        self, obj: Handle, method: str, session: Session, future: asyncio.Future[Any],
        *, stock: bool = False,
    ) -> None:  # fmt: skip
        waiter = waiter_of(session, future)
        if waiter is None:
            future.cancel()
        else:
            cast(SharedObject, obj).abandon(waiter, method, stock)

    def cancel(self, session: Session, future: asyncio.Future[Any]) -> None:
        waiter = waiter_of(session, future)
        if waiter is None:
            future.cancel()
        else:
            waiter.cancel()

    def undo(
        self, obj: Handle, method: str, call: Call, args: tuple[Any, ...], result: Any
    ) -> None:
        getattr(obj, obj.undo_methods[method])(call, args, result)

    def release(self, session: Session) -> None:
        session.end()

    async def resume(self, token: str) -> Session | None:
        """None: this daemon's sessions are all in its own table."""
        return None

    def would_hand_out(
        self, obj: Handle, method: str, call: Call, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> bytes | None:
        return cast(SharedObject, obj).would_hand_out(method, call, args, kwargs)

    def snapshot(self, obj: Handle) -> Snapshot:
        shared = cast(SharedObject, obj)
        return Snapshot(shared.snapshot(), shared.snapshot_conv)

    # -- durability -------------------------------------------------------------------
    def check_writable(self) -> None:
        if self.journal is not None:
            self.journal.check_writable()

    def barrier(self) -> asyncio.Future[None] | None:
        journal = self.journal
        return journal.barrier() if journal is not None else None

    async def ready(self, timeout_s: float) -> str | None:
        """Always: the objects are on this loop (that the loop answers is the probe)."""
        return None

    def recover(self, journal: Journal, *, repair: bool) -> tuple[int, Recovery]:
        """Rebuild the objects from ``journal``'s directory, then journal from here on.

        Returns the number of queued items recovered and what was read.
        """
        records, info = journal.recover(repair=repair)
        items = self.replay(records)
        journal.open(self.loop)
        self.attach(journal)
        if records:
            # What recovery settled goes to the old journal first (a crash before
            # the snapshot below is on disk replays it too), then a snapshot of
            # what was recovered: later records never depend on how recovery
            # settled reserved items.
            for obj in self.objects.values():
                if isinstance(obj, Queue):
                    obj.journal_recovery()
            self.compact()
        return items, info

    def compact_if_due(self) -> None:
        journal = self.journal
        if journal is not None and journal.compaction_due():
            self.compact()

    def compact(self) -> bool:
        """Snapshot every object now; False while an earlier snapshot is still being written.

        A snapshot holds no reservation (``Queue.dump_state``): each is
        journaled again right after it, so that an ack or a nack that comes
        later finds it on replay.
        """
        journal = self.journal
        if journal is None or not journal.compact(self.state_records()):
            return False
        for obj in self.objects.values():
            if isinstance(obj, Queue):
                obj.journal_reservations()
        return True

    # -- what people look at -------------------------------------------------------------
    def stats(self) -> StoreStats:
        objects = tuple(obj.stats() for obj in list(self.objects.values()))
        return StoreStats(objects, self.detector.found_total)

    def stats_of(self, obj: Handle) -> ObjectStats:
        return cast(SharedObject, obj).stats()

    def deadlocks(self) -> list[dict[str, Any]]:
        return self.detector.standing()
