"""A two-ended pipe on etcd: an inbox queue per end and a key per closed end.

``/m/p/<name>/q/<end>/``: the messages waiting for ``end``, an ``EtcdQueue``
(FIFO, idempotent puts); ``/m/p/<name>/closed/<end>``: exists once that end
is closed. A one-look read (timeout 0) reads the pipe's keys (few: what is
buffered and the two flags). A blocked read joins its end's line in this
process, served in arrival order as the memory store serves an end's
readers: one task per end reads the keys and, with a message there,
answers the ``poll``s up to the first ``recv`` (True) and has that ``recv``
take it, the ``poll``s after it waiting on (the message is gone); with
nothing there, it watches the keys from that read's revision: a message,
or a close of the other end (EOF, or True for a ``poll``), or of its own
end (OSError), wakes it, on any gateway. Lines of different gateways are
not ordered among themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import queue
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from managerd.store.etcd.client import EtcdClient, cleanup, unguarded
from managerd.store.etcd.kv import Compacted, Compare, Put, Target, name_key, prefix_end
from managerd.store.etcd.queues import EtcdQueue
from managerd.store.etcd.sessions import DEFAULT_ROOT
from managerd.store.etcd.watching import Synced, looked_then_within, waiting


class _Read(enum.Enum):
    """What a blocked read of an end waits for."""

    RECV = enum.auto()  # a message
    POLL = enum.auto()  # to know there is one (or EOF)


@dataclass(eq=False)
class _Reader:
    """A blocked read in its end's line; ``seen`` once the line had a look for it."""

    kind: _Read
    future: asyncio.Future[Any]
    seen: asyncio.Event = field(default_factory=asyncio.Event)


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
        #: Each end's blocked reads made here, in arrival order, and what serves them.
        self._lines: tuple[deque[_Reader], deque[_Reader]] = (deque(), deque())
        self._servers: list[asyncio.Task[None] | None] = [None, None]
        self._watching: list[asyncio.Task[None] | None] = [None, None]
        self._synced: list[Synced | None] = [None, None]

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

    async def send(self, end: int, payload: bytes) -> None:
        _, _, own, other = await self._read(end)
        if own:
            raise OSError("handle is closed")
        if other:
            raise BrokenPipeError("the other end of the pipe is closed")
        await self.inboxes[1 - end].put(payload)

    async def recv(self, end: int, timeout_s: float | None) -> bytes:
        if timeout_s is not None and timeout_s <= 0:  # one look
            while True:
                _, waiting, own, other = await self._read(end)
                if own:
                    raise OSError("handle is closed")
                if waiting:
                    try:
                        return await self.inboxes[end].get_nowait()
                    except queue.Empty:
                        continue  # taken through another gateway: read again
                if other:
                    raise EOFError("the other end of the pipe is closed")
                raise TimeoutError("recv() timed out")
        got: bytes = await self._in_line(end, _Read.RECV, timeout_s)
        return got

    async def poll(self, end: int, timeout_s: float | None) -> bool:
        if timeout_s is not None and timeout_s <= 0:  # one look
            _, waiting, own, other = await self._read(end)
            if own:
                raise OSError("handle is closed")
            return bool(waiting or other)
        ready: bool = await self._in_line(end, _Read.POLL, timeout_s)
        return ready

    async def _in_line(self, end: int, kind: _Read, timeout_s: float | None) -> Any:
        """Wait in ``end``'s line of this process for the line to serve this read."""
        reader = _Reader(kind, asyncio.get_running_loop().create_future())
        line = self._lines[end]
        line.append(reader)
        server = self._servers[end]
        if server is None or server.done():
            # Shared by the readers of all sessions: its writes are nobody's own.
            self._servers[end] = unguarded(self._serve(end), name=f"pipe end {end}")
        else:
            watching = self._watching[end]
            if watching is not None and not watching.done():
                watching.cancel()  # the line looks again: this read has its look
        try:
            with waiting(lambda: self._parked(end)):
                return await looked_then_within(reader.future, reader.seen, timeout_s)
        except (TimeoutError, asyncio.CancelledError) as exc:
            done = reader.future.done() and not reader.future.cancelled()
            if done and reader.future.exception() is None:
                if isinstance(exc, TimeoutError):
                    return reader.future.result()  # answered as the time ran out: keep it
                if kind is _Read.RECV:  # the caller is gone: the message is first again
                    await cleanup(self.inboxes[end].put_front(reader.future.result()))
            if isinstance(exc, TimeoutError):
                if kind is _Read.POLL:
                    return False
                raise TimeoutError("recv() timed out") from None
            raise
        finally:
            reader.future.cancel()
            with contextlib.suppress(ValueError):
                line.remove(reader)
            watching = self._watching[end]
            if not line and watching is not None:
                watching.cancel()  # nobody reads: stop watching

    async def _serve(self, end: int) -> None:
        """Serve ``end``'s line in arrival order, as the memory store's ``send`` and
        ``close`` do its readers: each ``poll`` before the first ``recv`` learns of a
        message (True), that ``recv`` takes it; the ``poll``s after it wait on."""
        line = self._lines[end]
        try:
            while readers := [r for r in line if not r.future.done()]:
                revision, waiting_now, own, other = await self._read(end)
                if own:
                    for r in readers:
                        r.future.set_exception(OSError("handle is closed"))
                    continue
                if waiting_now:
                    await self._hand_out(end, readers)
                    continue
                if other:
                    for r in readers:
                        if r.kind is _Read.POLL:
                            r.future.set_result(True)
                        else:
                            r.future.set_exception(EOFError("the other end of the pipe is closed"))
                    continue
                for r in line:
                    r.seen.set()  # each had its look: its timeout runs now
                self._watching[end] = watching = unguarded(self._change_after(end, revision))
                await asyncio.wait([watching])  # a change, or nobody reads any more
                self._watching[end] = None
                failed = None if watching.cancelled() else watching.exception()
                if failed is not None:
                    raise failed
        except Exception as exc:  # an EtcdError, or a bug: never leave a caller waiting
            for r in line:
                if not r.future.done():
                    r.future.set_exception(exc)

    async def _hand_out(self, end: int, readers: list[_Reader]) -> None:
        """A message waits for ``end``: the polls up to the first recv are ready, and
        that recv takes the message."""
        for r in readers:
            if r.future.done():
                continue
            if r.kind is _Read.POLL:
                r.future.set_result(True)
                continue
            try:
                payload = await self.inboxes[end].get_nowait()
            except queue.Empty:
                return  # taken through another gateway: read again
            if r.future.done():  # gave up while the take was in flight
                await self.inboxes[end].put_front(payload)
            else:
                r.future.set_result(payload)
            return

    def _parked(self, end: int) -> bool:
        """Whether ``end``'s line waits for a change now (its watch in step)."""
        watching, synced = self._watching[end], self._synced[end]
        return watching is not None and not watching.done() and synced is not None and synced()

    async def _change_after(self, end: int, revision: int) -> None:
        """Return at the first change of the pipe's keys after ``revision``."""
        self._synced[end] = synced = Synced(revision)
        try:
            async with contextlib.aclosing(
                self.client.watch(
                    self.base, self.end, start_revision=revision + 1, on_created=synced.created
                )
            ) as events:
                async for batch in events:
                    if batch:
                        return
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
