"""A two-ended pipe on etcd: an inbox queue per end and a key per closed end.

``/m/p/<name>/q/<end>/``: the messages waiting for ``end``, an ``EtcdQueue``
(FIFO, idempotent puts); ``/m/p/<name>/closed/<end>``: exists once that end
is closed.

**An end's blocked reads: one line across gateways**, as a queue's blocked
gets (``places.py``). A read (``recv`` or ``poll``) that finds nothing for
it puts its place in its end's inbox (``j/``, valued ``r`` or ``p``); the
places, oldest first, are the line of every gateway, served as the memory
store serves an end's readers in arrival order: with n messages waiting,
the first n ``recv`` places take them, in order, and the ``poll`` places
before the (n+1)-th ``recv`` place are ready (True); the ``poll``s after it
wait on. The messages past the ``recv`` places are for the reads that have
not parked (a one-look read, a read's first look), in arrival order, which
take one only if no place came after their read (a compare over ``j/``).
With the other end closed, each ``recv`` left without a message gets EOF
and each ``poll`` True; with its own end closed, every read fails
(OSError).

Each process serves its own reads of an end (one task per end): it reads
the places, the messages for them and the closed keys at once (a read-only
Txn), answers its ``poll``s and EOFs, and takes the messages of its ``recv``
places in one Txn that compares the messages' and places' revisions and
deletes the places with the messages (the inbox's take). Before any take,
the ``poll`` places the messages make ready are marked so (valued ``P``, in
one Txn that compares them): once a message is taken, a ``poll``'s own
process could no longer tell that it came. With nothing for its reads, it
parks the new ones (their places, in arrival order, in one Txn) and
watches the pipe's keys from the read's revision + 1: a message, a place
that leaves, a ``poll`` made ready, or a close wakes it, on any gateway. A
``recv`` place of another process whose message stands untaken for
``SILENT_PLACE_S`` (its gateway died, or is cut off from etcd) is passed
over; a ``poll``'s place holds up no one and is not. A read that leaves
deletes its place. A read's timeout runs from its look; a ``recv`` that
gives up while its take is in flight has its message put back at its place.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from managerd.store.etcd.client import EtcdClient, cleanup, unguarded, until_answered
from managerd.store.etcd.kv import (
    Compacted,
    Compare,
    EventType,
    Get,
    KeyValue,
    Put,
    Target,
    name_key,
    prefix_end,
)
from managerd.store.etcd.places import Look, Places
from managerd.store.etcd.queues import EtcdQueue
from managerd.store.etcd.sessions import DEFAULT_ROOT
from managerd.store.etcd.watching import Synced, looked_then_within, waiting

#: Messages per take Txn: 2 compares and 3 ops each, within etcd's --max-txn-ops (128).
_TAKE_BATCH = 30


class _Read(enum.Enum):
    """What a blocked read of an end waits for (its place's value)."""

    RECV = b"r"  # a message
    POLL = b"p"  # to know there is one (or EOF)


#: The value of a ``poll``'s place made ready by another process (``_mark_ready``).
_READY = b"P"


def _kind(place: KeyValue) -> _Read | None:
    """What the read at ``place`` waits for; None: a ``poll`` already made ready."""
    if place.value == _READY:
        return None
    return _Read.POLL if place.value == _Read.POLL.value else _Read.RECV


@dataclass(eq=False)
class _Reader:
    """A blocked read in its end's line; ``seen`` once the line had a look for it."""

    kind: _Read
    future: asyncio.Future[Any]
    seen: asyncio.Event = field(default_factory=asyncio.Event)
    #: Its place (``j/``) once it parked, as last read.
    place: KeyValue | None = None


@dataclass(eq=False)
class _Plan:
    """What a look at an end gives the reads of this process (``EtcdPipe._plan``)."""

    ready: list[_Reader] = field(default_factory=list)  # polls: True
    eof: list[_Reader] = field(default_factory=list)  # recvs: EOFError
    takes: list[tuple[KeyValue, _Reader]] = field(default_factory=list)  # recvs: a message
    #: The ``recv`` places of other processes with a message for them.
    foreign: list[KeyValue] = field(default_factory=list)
    #: The ``poll`` places ready for a message (not a close), to be made so before a
    #: take (``_mark_ready``).
    polls: list[KeyValue] = field(default_factory=list)
    #: The messages past the recv places (for reads that have not parked).
    free: list[KeyValue] = field(default_factory=list)


class _Line:
    """An end's blocked reads of this process, in arrival order, and what serves them."""

    def __init__(self, inbox: EtcdQueue, label: str) -> None:
        self.readers: deque[_Reader] = deque()
        self.places: Places[_Reader] = Places(inbox.client, inbox._places, inbox._places_end, label)
        self.server: asyncio.Task[None] | None = None
        self.watching: asyncio.Task[None] | None = None
        self.synced = Synced(0)
        #: Set when a read joins the line while it may wait on its watch: it looks again.
        self.look = asyncio.Event()

    def parked(self) -> bool:
        """Whether the line waits for a change now (its watch in step)."""
        watching = self.watching
        return watching is not None and not watching.done() and self.synced()


class EtcdPipe:
    """The pipe ``name`` (``duplex``: both ends send; else end 0 reads, end 1 writes)."""

    def __init__(
        self, client: EtcdClient, name: str, duplex: bool, *, root: bytes = DEFAULT_ROOT
    ) -> None:
        self.client = client
        self.duplex = duplex
        self.base = root + b"p/" + name_key(name) + b"/"
        self.end = prefix_end(self.base)
        self.inboxes = tuple(
            EtcdQueue(client, str(end), root=self.base, dead_letters=False) for end in (0, 1)
        )
        self._lines = tuple(_Line(self.inboxes[end], f"pipe {name!r} end {end}") for end in (0, 1))

    def _closed_key(self, end: int) -> bytes:
        return self.base + b"closed/%d" % end

    async def _read(self, end: int) -> tuple[int, int, bool, bool]:
        """``(revision, messages for end, own end closed, other end closed)``."""
        read = await self.client.range(self.base, self.end, keys_only=True)
        inbox = self.inboxes[end]._ready
        waiting = sum(1 for kv in read.kvs if kv.key.startswith(inbox))
        keys = {kv.key for kv in read.kvs}
        closed = (self._closed_key(end) in keys, self._closed_key(1 - end) in keys)
        return read.revision, waiting, closed[0], closed[1]

    async def _look(self, end: int, arriving: int) -> tuple[Look, bool, bool]:
        """``end``'s places, the messages for them and for ``arriving`` reads more, and
        whether its own and the other end are closed, in one read."""
        inbox = self.inboxes[end]
        look = await self._lines[end].places.look(
            inbox._ready,
            inbox._ready_end,
            arriving,
            [Get(self._closed_key(end)), Get(self._closed_key(1 - end))],
        )
        own, other = (bool(read.kvs) for read in look.others)
        return look, own, other

    async def send(self, end: int, payload: bytes) -> None:
        _, _, own, other = await self._read(end)
        if own:
            raise OSError("handle is closed")
        if other:
            raise BrokenPipeError("the other end of the pipe is closed")
        await self.inboxes[1 - end].put(payload)

    async def recv(self, end: int, timeout_s: float | None) -> bytes:
        if timeout_s is not None and timeout_s <= 0:  # one look
            inbox = self.inboxes[end]
            while True:
                plan, other, revision = await self._one_look(end)
                if plan.free:
                    if plan.polls:  # (a take without a place compares them: look again)
                        await self._mark_ready(plan.polls)
                        continue
                    taken = await inbox._take_batch(
                        plan.free[:1], [(None, 0.0, None)], [], revision
                    )
                    if taken is None:
                        continue  # taken through another gateway, or a place came: again
                    return taken[0][1]
                if other:
                    raise EOFError("the other end of the pipe is closed")
                raise TimeoutError("recv() timed out")
        got: bytes = await self._in_line(end, _Read.RECV, timeout_s)
        return got

    async def poll(self, end: int, timeout_s: float | None) -> bool:
        if timeout_s is not None and timeout_s <= 0:  # one look
            plan, other, _ = await self._one_look(end)
            return bool(plan.free or other)
        ready: bool = await self._in_line(end, _Read.POLL, timeout_s)
        return ready

    async def _one_look(self, end: int) -> tuple[_Plan, bool, int]:
        """A look for a read that does not wait: ``(plan, other end closed, revision)``;
        OSError if ``end`` is closed. Silent places are passed over first."""
        places = self._lines[end].places
        while True:
            look, own, other = await self._look(end, 1)
            if own:
                raise OSError("handle is closed")
            plan = self._plan(end, look, [], other)
            silent = [] if plan.free else places.note_silent(plan.foreign)
            if not silent:
                return plan, other, look.revision
            await places.pass_over(silent)

    async def _in_line(self, end: int, kind: _Read, timeout_s: float | None) -> Any:
        """Wait in ``end``'s line for the line to serve this read."""
        reader = _Reader(kind, asyncio.get_running_loop().create_future())
        line = self._lines[end]
        line.readers.append(reader)
        if line.server is None or line.server.done():
            # Shared by the readers of all sessions: its writes are nobody's own.
            line.server = unguarded(self._serve(end), name=f"pipe end {end}")
        else:
            line.look.set()  # the line may wait on its watch: this read's look is due

        def parked() -> bool:
            return not reader.future.done() and reader.seen.is_set() and line.parked()

        try:
            with waiting(parked):
                return await looked_then_within(reader.future, reader.seen, timeout_s)
        except (TimeoutError, asyncio.CancelledError) as exc:
            done = reader.future.done() and not reader.future.cancelled()
            if done and reader.future.exception() is None:
                if isinstance(exc, TimeoutError):
                    return reader.future.result()  # answered as the time ran out: keep it
                if kind is _Read.RECV:  # the caller is gone: the message is first again
                    # Under one id (taken here), made again until etcd answers: a try
                    # applied unanswered fails the next one's compares (``put_front``).
                    inbox, payload = self.inboxes[end], reader.future.result()
                    iid = inbox._ids.next()
                    await cleanup(until_answered(lambda: inbox.put_front(payload, iid)))
            if isinstance(exc, TimeoutError):
                if kind is _Read.POLL:
                    return False
                raise TimeoutError("recv() timed out") from None
            raise
        finally:
            reader.future.cancel()
            with contextlib.suppress(ValueError):
                line.readers.remove(reader)
            line.places.unplace(reader)
            if not line.readers and line.watching is not None:
                line.watching.cancel()  # nobody reads: stop watching

    async def _serve(self, end: int) -> None:
        """Serve ``end``'s reads of this process (module docstring), several per Txn."""
        line = self._lines[end]
        inbox = self.inboxes[end]
        batch = _TAKE_BATCH
        try:
            while readers := [r for r in line.readers if not r.future.done()]:
                line.look.clear()
                looking = list(line.readers)  # the reads this look is the look of
                arriving = [r for r in readers if r.place is None]
                look, own, other = await self._look(end, len(arriving))
                if own:
                    for r in readers:
                        r.future.set_exception(OSError("handle is closed"))
                    continue
                plan = self._plan(end, look, readers, other)
                for r in plan.ready:
                    r.future.set_result(True)
                for r in plan.eof:
                    r.future.set_exception(EOFError("the other end of the pipe is closed"))
                if plan.takes:
                    # This process's polls are answered here; the others' are made ready.
                    foreign = [p for p in plan.polls if line.places.owner(p) is None]
                    marked = await self._mark_ready(foreign)
                    if not marked or (foreign and any(r.place is None for _, r in plan.takes)):
                        # A poll place left meanwhile; or the marks are places changed
                        # after the read, which a take without a place compares: again.
                        continue
                    takes = plan.takes[:batch]
                    taken = await inbox._take_batch(
                        [item for item, _ in takes],
                        [(None, 0.0, None)] * len(takes),
                        [r.place for _, r in takes],
                        look.revision,
                    )
                    if taken is None:
                        batch = max(1, batch // 2)  # another read took some: ask for fewer
                        continue
                    batch = _TAKE_BATCH
                    for (_, r), item in zip(takes, taken, strict=True):
                        line.places.taken(r)  # its place went with the take
                        if r.future.done():  # gave up while the Txn was in flight
                            await inbox._give_back(item)
                        else:
                            r.future.set_result(item[1])
                    continue
                if plan.ready or plan.eof:
                    continue
                silent = line.places.note_silent(plan.foreign)
                if silent:
                    await line.places.pass_over(silent)
                    continue
                parking = [r for r in readers if r.place is None]
                await line.places.park(parking, [r.kind.value for r in parking])
                for r in looking:
                    r.seen.set()  # each had its look: its timeout runs now
                await self._wait_for_change(end, look.revision)
        except Exception as exc:  # an EtcdError, or a bug: never leave a caller waiting
            for r in line.readers:
                if not r.future.done():
                    r.future.set_exception(exc)

    def _plan(self, end: int, look: Look, readers: list[_Reader], other: bool) -> _Plan:
        """What ``look`` gives ``readers`` (this process's, not answered), as the memory
        store's ``send`` and ``close`` give an end's readers: along the line, the i-th
        ``recv`` place takes the i-th message, each ``poll`` place before the first
        ``recv`` place left without one is ready; then the reads that have not parked,
        in arrival order, the same with the messages past the ``recv`` places. With the
        other end closed, a ``recv`` left without a message gets EOF, a ``poll`` True."""
        places = self._lines[end].places
        places.refresh(look.places, readers)  # passed over: parks again, at the end
        plan = _Plan()
        messages = look.items
        recvs = 0  # recv places so far
        for place in look.places:
            kind = _kind(place)
            owner = places.owner(place)
            if kind is None:  # a poll made ready: its own process answers it
                if owner is not None and not owner.future.done():
                    plan.ready.append(owner)
                continue
            item = messages[recvs] if kind is _Read.RECV and recvs < len(messages) else None
            due = recvs < len(messages) or other
            recvs += kind is _Read.RECV
            if not due:
                continue
            if kind is _Read.POLL and not other:
                plan.polls.append(place)
            if owner is None:
                if item is not None:
                    plan.foreign.append(place)
            elif not owner.future.done():
                self._answer(plan, owner, item)
        plan.free = messages[recvs:]
        taking = 0
        for r in readers:
            if r.place is not None or r.future.done():
                continue
            if taking < len(plan.free):
                item = plan.free[taking] if r.kind is _Read.RECV else None
                taking += r.kind is _Read.RECV
                self._answer(plan, r, item)
            elif other:
                self._answer(plan, r, None)
        return plan

    async def _mark_ready(self, polls: list[KeyValue]) -> bool:
        """Make the ``poll`` places ``polls`` ready (their value ``_READY``), all if each is
        still the one read; whether they were.

        Made before a take of a message that came for them: once it is taken, their
        process could not tell that it came (the memory store's ``send`` answers the
        polls ahead of the recv that takes the message). A poll's place is not passed
        over: it holds up no one."""
        if not polls:
            return True
        done = await self.client.txn(
            [Compare(p.key, Target.CREATE, "==", p.create_revision) for p in polls],
            [Put(p.key, _READY) for p in polls],
            idempotent=True,
        )
        return done.succeeded

    @staticmethod
    def _answer(plan: _Plan, reader: _Reader, item: KeyValue | None) -> None:
        """``reader``'s answer in ``plan``: True for a poll, else ``item`` (None: EOF)."""
        if reader.kind is _Read.POLL:
            plan.ready.append(reader)
        elif item is not None:
            plan.takes.append((item, reader))
        else:
            plan.eof.append(reader)

    async def _wait_for_change(self, end: int, revision: int) -> None:
        """Wait for a change of ``end``'s line after ``revision`` (``_change_after``), a
        read joining the line, or a silent place's time to be up."""
        line = self._lines[end]
        line.watching = watching = unguarded(self._change_after(end, revision))
        look = asyncio.ensure_future(line.look.wait())
        try:
            await asyncio.wait(
                [watching, look],
                timeout=line.places.silent_wait_s(),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            look.cancel()
            line.watching = None
            if not watching.done():
                watching.cancel()
                await asyncio.wait([watching])
        failed = None if watching.cancelled() else watching.exception()
        if failed is not None:
            raise failed

    async def _change_after(self, end: int, revision: int) -> None:
        """Return at the first message for ``end``, place of its line leaving, or close of
        either end after ``revision``."""
        inbox = self.inboxes[end]
        closed = (self._closed_key(0), self._closed_key(1))
        self._lines[end].synced = synced = Synced(revision)
        try:
            async with contextlib.aclosing(
                self.client.watch(
                    self.base, self.end, start_revision=revision + 1, on_created=synced.created
                )
            ) as events:
                async for batch in events:
                    for e in batch:
                        key = e.kv.key
                        if e.type is EventType.PUT and (
                            key.startswith(inbox._ready) or key in closed
                        ):
                            return
                        if key.startswith(inbox._places) and (
                            e.type is EventType.DELETE or e.kv.value == _READY
                        ):
                            return  # a place leaves, or one of its polls is made ready
        except Compacted:
            return  # read again

    async def close(self, end: int) -> None:
        key = self._closed_key(end)
        await self.client.txn(
            [Compare(key, Target.CREATE, "==", 0)], [Put(key, b"")], idempotent=True
        )

    async def state(self) -> tuple[tuple[int, int], tuple[bool, bool]]:
        """Messages buffered for each end, and which ends are closed."""
        _, w0, c0, c1 = await self._read(0)
        _, w1, _, _ = await self._read(1)
        return (w0, w1), (c0, c1)
