"""Waiting for a change in etcd: the one wake-up every blocking primitive uses.

A blocking call reads the state, and if it must wait, watches from the
revision of that read + 1: a change between the read and the watch is
delivered by the watch (etcd replays history from that revision), so no
wake-up is missed and nothing polls. The caller then reads again: a wake-up
says only that something changed.

``waiting()`` marks the time a call spends so (a watch, a lock's turn, a
queue's line): the store sets ``WAITING`` in each call's task, and so knows
which calls are parked rather than on their way to an answer (its stats;
the contract suite's harness waits for a call to be one or the other).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any, TypeVar

from managerd.store.etcd.client import EtcdClient
from managerd.store.etcd.kv import Compacted, Event, EventType

T = TypeVar("T")

#: Whether a call marked waiting still waits (a queue's line: until its turn is served).
Still = Callable[[], bool]

#: Set by the store in a call's task: told ``Still`` when the call starts waiting for a
#: change in etcd, None when it stops.
WAITING: ContextVar[Callable[[Still | None], None] | None] = ContextVar("WAITING", default=None)


def _always() -> bool:
    return True


@contextlib.contextmanager
def waiting(still: Still = _always) -> Iterator[None]:
    """The calling task's call waits for a change in etcd while inside."""
    mark = WAITING.get()
    if mark is None:
        yield
        return
    mark(still)
    try:
        yield
    finally:
        mark(None)


#: How long etcd may take to send a watch the events it missed (its watchers out of step
#: are caught up every 100 ms).
CATCH_UP_S = 0.15


class Synced:
    """Whether a watch from ``after_revision + 1`` is in step: it sees a change as it is
    made. A watch created at that revision is; one created later (the store changed
    between the read and the watch) gets what it missed within ``CATCH_UP_S``. Until
    then the call is on its way, not parked: a change made before may wake it."""

    def __init__(self, after_revision: int) -> None:
        self.after_revision = after_revision
        self._synced = False

    def created(self, revision: int) -> None:
        if revision <= self.after_revision:
            self._synced = True
        else:
            asyncio.get_running_loop().call_later(CATCH_UP_S, self._caught_up)

    def _caught_up(self) -> None:
        self._synced = True

    def __call__(self) -> bool:
        return self._synced


async def changed(
    client: EtcdClient,
    key: bytes,
    range_end: bytes = b"",
    *,
    after_revision: int,
    kind: EventType | None = None,
    deadline: float | None = None,
) -> list[Event]:
    """The first events on ``[key, range_end)`` after ``after_revision`` (of ``kind`` if
    given); ``[]`` if that history was compacted (the caller reads the state again).

    The call waits (``waiting``) once its watch is in step (``Synced``).
    ``deadline`` (the loop's time): ``TimeoutError`` then. A timeout bounds the
    wait only, never the look before it, as in the memory store (a free permit
    is taken, a set event seen, however short the timeout).
    """
    synced = Synced(after_revision)
    try:
        with waiting(synced):
            async with asyncio.timeout_at(deadline):
                return await _first(client, key, range_end, after_revision, kind, synced)
    except Compacted:
        return []


async def looked_then_within(
    answer: asyncio.Future[T], looked: asyncio.Event, timeout_s: float | None
) -> T:
    """The answer a line of waiting calls (a queue's gets, a pipe end's reads) gives
    a call: its first look is not timed (what is there is taken however short the
    timeout, as in the memory store), then ``timeout_s`` from that look on
    (TimeoutError). The answer is shielded: the caller decides what a late one is."""
    if not looked.is_set():
        seen = asyncio.ensure_future(looked.wait())
        try:
            either: list[asyncio.Future[Any]] = [answer, seen]
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            seen.cancel()
    return await asyncio.wait_for(asyncio.shield(answer), timeout_s)


def deadline_of(timeout_s: float | None) -> float | None:
    """The loop's time ``timeout_s`` from now (None: no deadline)."""
    return None if timeout_s is None else asyncio.get_running_loop().time() + timeout_s


async def _first(
    client: EtcdClient,
    key: bytes,
    range_end: bytes,
    after_revision: int,
    kind: EventType | None,
    synced: Synced,
) -> list[Event]:
    async with contextlib.aclosing(
        client.watch(key, range_end, start_revision=after_revision + 1, on_created=synced.created)
    ) as events:
        async for batch in events:
            wanted = [e for e in batch if kind is None or e.type is kind]
            if wanted:
                return wanted
    raise AssertionError("a watch ended without an error")  # the client's watch never ends
