"""A two-ended pipe on etcd: an inbox queue per end and a key per closed end.

``/m/p/<name>/q/<end>/``: the messages waiting for ``end``, an ``EtcdQueue``
(FIFO, idempotent puts); ``/m/p/<name>/closed/<end>``: exists once that end
is closed. A reader reads the pipe's keys (few: what is buffered and the
two flags) and, with nothing for it, watches them from that read's
revision: a message, or a close of the other end (EOF), or of its own end
(OSError), wakes it, on any gateway.
"""

from __future__ import annotations

import queue

from managerd.store.etcd.client import EtcdClient
from managerd.store.etcd.kv import Compare, EventType, Put, Target, name_key, prefix_end
from managerd.store.etcd.queues import EtcdQueue
from managerd.store.etcd.sessions import DEFAULT_ROOT
from managerd.store.etcd.watching import changed, deadline_of


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
        deadline = deadline_of(timeout_s or None)  # 0: one look, below
        try:
            while True:
                revision, waiting, own, other = await self._read(end)
                if own:
                    raise OSError("handle is closed")
                if waiting:
                    try:
                        return await self.inboxes[end].get_nowait()
                    except queue.Empty:
                        continue  # taken through another gateway: read again
                if other:
                    raise EOFError("the other end of the pipe is closed")
                if timeout_s == 0:
                    raise TimeoutError
                await changed(
                    self.client, self.base, self.end, after_revision=revision, deadline=deadline
                )
        except TimeoutError:
            raise TimeoutError("recv() timed out") from None

    async def poll(self, end: int, timeout_s: float | None) -> bool:
        deadline = deadline_of(timeout_s or None)  # 0: one look, below
        try:
            while True:
                revision, waiting, own, other = await self._read(end)
                if own:
                    raise OSError("handle is closed")
                if waiting or other:
                    return True
                if timeout_s == 0:
                    return False
                events = await changed(
                    self.client, self.base, self.end, after_revision=revision, deadline=deadline
                )
                inbox = self.inboxes[end]._ready
                if any(e.kv.key.startswith(inbox) for e in events if e.type is EventType.PUT):
                    return True  # a message came (a reader may have taken it since)
        except TimeoutError:
            return False

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
