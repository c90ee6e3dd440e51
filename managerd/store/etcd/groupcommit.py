"""Group commit: the Txns of concurrent calls of one gateway sent to etcd as one Txn.

Why
---
Every Txn is a gRPC request, a Raft proposal and its fsync; on these
machines the per-request cost (most of it in Python and gRPC) bounds a
gateway long before etcd's Raft log does. Calls of many clients that are in
flight together can share one request.

How a shared Txn keeps each call's own outcome
----------------------------------------------
A Txn is all-or-nothing, so the calls' compares cannot simply be joined:
one failing compare would fail every call. Instead each call's Txn is
**nested** in the shared one (etcd >= 3.3): the outer Txn has no compare
and one ``RequestOp.request_txn`` per call, and etcd evaluates each nested
Txn's compares on their own and runs its success or failure branch; the
answer carries each one's ``succeeded`` and responses. So a put whose
``create_revision == 0`` compare fails, or a take that lost its race, gets
exactly the answer it would have got alone.

Two rules make the shared Txn equal to the calls run one after another
(in any order: they were in flight together, so any order is a valid
linearizable history):

- **Disjoint footprints.** etcd evaluates every nested compare on the state
  before the shared Txn, then applies the writes; a call that reads (a
  compare, a Get) a key another call of the batch writes would see the
  state before it, and two writes of one key are refused ("duplicate key").
  A call is added to a batch only if what it writes touches nothing the
  batch reads or writes, and what it reads touches nothing the batch writes
  (keys and ranges compared as intervals). A call that conflicts waits for
  a later batch.
- **Revisions as identities.** All writes of a shared Txn get one
  revision. A call whose revision is an identity (a lock contender's
  fencing token is its key's create_revision; "the lowest create_revision
  holds" needs no ties) asks for ``own_revision`` and leaves alone.
- **etcd's limits.** ``--max-txn-ops`` (128) bounds the outer Txn's number
  of nested Txns *plus* the widest nested one (etcd gives a nested Txn the
  budget left by its parent: 64 nested Txns of 64 operations pass, 64 of
  65 do not); and the request must stay under ``--max-request-bytes``
  (1.5 MiB), so a batch stops at ``max_batch_bytes`` (1 MiB).

When batches go
---------------
No waiting for company: a call is sent at once if fewer than
``max_in_flight`` shared Txns are in flight, else it joins the next batch,
which leaves when one comes back. One call alone is sent as its own Txn,
unchanged. So one client sees no added latency, and under concurrency the
batches grow by themselves.

Calls on the same keys keep their order: a call that conflicts with one
made before it (still waiting, or in flight) is sent only once that one is
answered. Without this, two such calls leaving in two shared Txns at the
same moment could reach etcd in either order (a blocked ``get_many``'s
read and a later put: the read would see the put).

Failures
--------
The shared Txn is retried by the client's rules as one Txn: on ``no
leader`` always (never applied), on an ambiguous failure only if every call
in it is idempotent. Otherwise, after an ambiguous failure, a call that is
not idempotent gets ``EtcdUnavailable`` (as it would alone) and each
idempotent one is sent again alone; after a refusal (the request was never
applied: too large, too many operations), every call is sent again alone,
so the refusal reaches only the call it is about.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from managerd.store.etcd.kv import Compare, Delete, Get, Op

DEFAULT_MAX_TXN_OPS = 128  # etcd's --max-txn-ops default
DEFAULT_MAX_BATCH_BYTES = 1024 * 1024  # under etcd's --max-request-bytes default (1.5 MiB)
DEFAULT_MAX_IN_FLIGHT = 2

#: ``(key, range_end)``: one key when range_end is b"", else ``[key, range_end)``.
Span = tuple[bytes, bytes]


@dataclass(frozen=True, slots=True)
class Footprint:
    """The keys a Txn reads (its compares and Gets) and writes (its Puts and Deletes)."""

    reads: tuple[Span, ...]
    writes: tuple[Span, ...]


def footprint(
    compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op]
) -> Footprint:
    reads: list[Span] = [(c.key, b"") for c in compare]
    writes: list[Span] = []
    for op in (*success, *failure):
        if isinstance(op, Get):
            reads.append((op.key, op.range_end))
        elif isinstance(op, Delete):
            writes.append((op.key, op.range_end))
        else:
            writes.append((op.key, b""))
    return Footprint(tuple(reads), tuple(writes))


def width(compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op]) -> int:
    """What etcd counts against ``--max-txn-ops`` for one Txn."""
    return max(len(compare), len(success), len(failure))


class _Spans:
    """Keys and ranges, asked whether a span touches any of them."""

    def __init__(self) -> None:
        self.points: set[bytes] = set()
        self.ranges: list[Span] = []

    def add(self, spans: Sequence[Span]) -> None:
        for key, end in spans:
            if end:
                self.ranges.append((key, end))
            else:
                self.points.add(key)

    def touches(self, spans: Sequence[Span]) -> bool:
        for key, end in spans:
            if not end:
                if key in self.points or any(lo <= key < _end(hi) for lo, hi in self.ranges):
                    return True
                continue
            if any(key <= p < _end(end) for p in self.points):
                return True
            if any(key < _end(hi) and lo < _end(end) for lo, hi in self.ranges):
                return True
        return False


def _end(range_end: bytes) -> bytes:
    # etcd's range_end b"\0" means "to the end of the keyspace".
    return b"\xff" * 4096 if range_end == b"\0" else range_end


@dataclass(eq=False)
class Pending:
    """One call's Txn waiting for its batch; ``request`` is the client's own message."""

    request: Any
    footprint: Footprint
    width: int
    size: int
    idempotent: bool
    future: asyncio.Future[Any] = field(repr=False)
    #: Its writes must have a revision of their own (see ``GroupCommit.submit``).
    own_revision: bool = False


class _Footprints:
    """The keys some calls read and write: does another call conflict with them?"""

    def __init__(self) -> None:
        self.read = _Spans()
        self.written = _Spans()

    def add(self, fp: Footprint) -> None:
        self.read.add(fp.reads)
        self.written.add(fp.writes)

    def conflicts(self, fp: Footprint) -> bool:
        return (
            self.written.touches(fp.reads)
            or self.written.touches(fp.writes)
            or self.read.touches(fp.writes)
        )


class _Batch(_Footprints):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Pending] = []
        self.width = 0
        self.size = 0

    def fits(self, p: Pending, max_txn_ops: int, max_bytes: int) -> bool:
        if not self.calls:
            return True
        if p.own_revision or self.calls[0].own_revision:
            return False
        if len(self.calls) + 1 + max(self.width, p.width) > max_txn_ops:
            return False
        return self.size + p.size <= max_bytes

    def full(self, max_txn_ops: int) -> bool:
        if self.calls and self.calls[0].own_revision:
            return True
        return len(self.calls) + 1 + self.width > max_txn_ops

    def take(self, p: Pending) -> None:
        self.calls.append(p)
        self.add(p.footprint)
        self.width = max(self.width, p.width)
        self.size += p.size


class GroupCommit:
    """Collects the Txns of concurrent calls into batches; ``send`` sends one batch
    (one call: its own Txn) and settles every call's future."""

    def __init__(
        self,
        send: Callable[[list[Pending]], Coroutine[Any, Any, None]],
        *,
        max_txn_ops: int = DEFAULT_MAX_TXN_OPS,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> None:
        self._send = send
        self.max_txn_ops = max_txn_ops
        self.max_batch_bytes = max_batch_bytes
        self.max_in_flight = max_in_flight
        self._waiting: collections.deque[Pending] = collections.deque()
        self._in_flight: dict[asyncio.Task[None], _Batch] = {}
        self._scheduled = False
        #: Called with each batch's size as it leaves (metrics).
        self.on_batch: Callable[[int], None] | None = None

    async def submit(
        self,
        request: Any,
        fp: Footprint,
        txn_width: int,
        size: int,
        idempotent: bool,
        *,
        own_revision: bool = False,
    ) -> Any:
        """Send ``request`` in the next batch that takes it; its answer.

        ``own_revision``: the call's writes get a revision no other call's
        writes share — when the revision is an identity (a fencing token, a
        place among contenders ordered by create_revision): such a call leaves
        in a batch of its own.
        """
        loop = asyncio.get_running_loop()
        p = Pending(request, fp, txn_width, size, idempotent, loop.create_future(), own_revision)
        self._waiting.append(p)
        if not self._scheduled and len(self._in_flight) < self.max_in_flight:
            # At the end of this turn of the loop: the calls made in it leave together.
            self._scheduled = True
            loop.call_soon(self._dispatch)
        return await p.future

    def _dispatch(self) -> None:
        self._scheduled = False
        while self._waiting and len(self._in_flight) < self.max_in_flight:
            batch = self._next_batch()
            if not batch.calls:
                return  # every waiting call waits for one in flight
            if self.on_batch is not None:
                self.on_batch(len(batch.calls))
            task = asyncio.get_running_loop().create_task(self._send(batch.calls))
            self._in_flight[task] = batch
            task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._in_flight.pop(task, None)
        if self._waiting and not self._scheduled:
            self._dispatch()

    def _next_batch(self) -> _Batch:
        """The oldest waiting calls that fit together; the others keep their place.

        A call that conflicts with a call before it (waiting, or in flight) waits
        for it: calls of this client on the same keys reach etcd in the order
        they were made, as if each were answered before the next was sent.
        """
        batch = _Batch()
        before = _Footprints()  # of the calls left waiting ahead of the next one
        flying = list(self._in_flight.values())
        kept: collections.deque[Pending] = collections.deque()
        while self._waiting:
            p = self._waiting.popleft()
            if p.future.done():
                continue  # its caller gave up before it was sent
            fp = p.footprint
            if (
                batch.fits(p, self.max_txn_ops, self.max_batch_bytes)
                and not batch.conflicts(fp)
                and not before.conflicts(fp)
                and not any(b.conflicts(fp) for b in flying)
            ):
                batch.take(p)
                if batch.full(self.max_txn_ops):
                    break
            else:
                kept.append(p)
                before.add(fp)
        kept.extend(self._waiting)
        self._waiting = kept
        return batch
