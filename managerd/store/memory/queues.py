"""Queues and joinable queues (named pipes are in ``pipes.py``).

A ``get`` on an empty queue parks a waiter; a ``put`` hands its item straight
to the first live waiter, or appends it. Because a dead session's waiters
are cancelled before anything else happens, an item is never handed to a
consumer that is gone.

Every queue counts unfinished tasks as ``queue.Queue`` does: a put adds
one, ``task_done`` takes one off, ``join`` waits for none. The count is not
journaled per put: replay counts the journaled pushes, and ``task_done``
journals a ``done`` record (a queue that never calls it pays nothing).

``reserve`` is acknowledged delivery: the item leaves the queue but is kept
as a *delivery* owned by the consumer's session until ``ack``. ``nack``, the
visibility timeout, or the end of the session put it back at the front; a
queue with ``max_deliveries`` moves an item delivered that many times to the
dead-letter queue ``"<name>.dead"`` instead.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import queue
from collections import deque
from collections.abc import Callable
from operator import countOf
from typing import Any, ClassVar, cast

from managerd.store.api import BadArgument, Call, Conv, exposed
from managerd.store.memory.base import (
    SharedObject,
    Waiter,
    alive_count,
    fail_all,
    pop_alive,
    positive_s,
    timeout_s,
)
from managerd.store.memory.records import QueueOp, RecordKind
from managerd.store.sessions import Session
from managerd.store.stats import QueueStats

DEFAULT_VISIBILITY_TIMEOUT_S = 30.0
DEAD_LETTER_SUFFIX = ".dead"


class _Want(enum.Enum):
    """A parked getter's ``waiter.data``: what it wants back."""

    GET = enum.auto()  # the payload
    RESERVE = enum.auto()  # (delivery id, payload, deliveries)
    GET_MANY = enum.auto()  # [payload]


# Module names for the members: on Python 3.11 reading a global is ~10x
# faster than an enum member, and every get passes one.
_GET, _RESERVE, _GET_MANY = _Want.GET, _Want.RESERVE, _Want.GET_MANY


class _Returned:
    """An item that was delivered before and came back (it counts deliveries)."""

    __slots__ = ("deliveries", "payload")

    def __init__(self, payload: bytes, deliveries: int) -> None:
        self.payload = payload
        self.deliveries = deliveries


class _Delivery:
    __slots__ = ("deliveries", "id", "payload", "session", "timer")

    def __init__(self, did: int, payload: bytes, deliveries: int, session: Session) -> None:
        self.id = did
        self.payload = payload
        self.deliveries = deliveries
        self.session = session
        self.timer: asyncio.TimerHandle | None = None


_delivery_ids = itertools.count(1)

#: A journal record's kind (``base._j`` without a call per item of a batch).
_OP = int(RecordKind.OP)
#: From this many items on, ``_put`` checks their types in one count (below, one by one).
_BULK_CHECK = 8


class Queue(SharedObject):
    """``queue.Queue`` semantics, plus batches and acknowledged delivery.

    ``join`` waits until every item put was ``task_done``. With ``reserve``,
    a consumer calls ``task_done`` after ``ack`` (a nacked item comes back
    and is done later); an item moved to the dead-letter queue is never
    acked, so it counts as done by itself.
    """

    typeid = "Queue"
    create_params = ("maxsize", "visibility_timeout_s", "max_deliveries")
    durable = True
    snapshot_conv: ClassVar[Conv] = Conv.PAYLOADS
    undo_methods: ClassVar[dict[str, str]] = {
        "get": "_undo_get",
        "get_nowait": "_undo_get",
        "get_many": "_undo_get_many",
        "reserve": "_undo_reserve",
    }

    def __init__(
        self,
        name: str,
        loop: asyncio.AbstractEventLoop,
        maxsize: int = 0,
        visibility_timeout_s: float = DEFAULT_VISIBILITY_TIMEOUT_S,
        max_deliveries: int = 0,
    ) -> None:
        super().__init__(name, loop)
        if not isinstance(maxsize, int) or isinstance(maxsize, bool):
            raise BadArgument("maxsize must be an int")
        # Checked whole here: every reserve starts a timer of this length, after
        # its item has left the queue (a timer that failed then would lose it).
        visibility_s = positive_s(visibility_timeout_s, "visibility_timeout_s")
        if not isinstance(max_deliveries, int) or max_deliveries < 0:
            raise ValueError("max_deliveries must be a non-negative int")
        self.maxsize = maxsize
        self.visibility_timeout_s = visibility_s
        self.max_deliveries = max_deliveries
        self.items: deque[bytes | _Returned] = deque()
        self.getters: deque[Waiter] = deque()
        self.putters: deque[Waiter] = deque()
        self.reserved: dict[int, _Delivery] = {}
        #: Deliveries journaled as reserved, while recovering (no sessions then).
        self._recovering: dict[int, tuple[bytes, int]] = {}
        #: What ``recovered`` put back, for ``journal_recovery``: (delivery id, payload, count).
        self._settled: list[tuple[int, bytes, int]] = []
        self.puts_total = 0
        self.gets_total = 0
        #: Items put and not yet ``task_done`` (queue.Queue's unfinished_tasks).
        self.unfinished = 0
        self.joiners: deque[Waiter] = deque()
        #: Set by the registry: where items delivered too often go.
        self.dead_letter: Callable[[Queue, bytes], None] | None = None

    def creation_args(self) -> dict[str, Any]:
        return {
            "maxsize": self.maxsize,
            "visibility_timeout_s": self.visibility_timeout_s,
            "max_deliveries": self.max_deliveries,
        }

    # -- internals -------------------------------------------------------
    @property
    def _bound(self) -> int:
        """The most items the queue holds; 0 for unbounded (maxsize <= 0, as queue.Queue)."""
        return max(self.maxsize, 0)

    def _is_full(self) -> bool:
        return 0 < self._bound <= len(self.items)

    def _deliver(self, entry: bytes | _Returned, waiter: Waiter) -> None:
        """Complete a getter with ``entry`` (journaled as queued, then taken)."""
        kind = waiter.data
        payload = entry.payload if isinstance(entry, _Returned) else entry
        self.gets_total += 1
        self._j(QueueOp.POP, 1)
        if kind is _RESERVE:
            waiter.finish(self._reserve(entry, waiter.session))
        elif kind is _GET_MANY:
            waiter.finish([payload])
        else:
            waiter.finish(payload)

    def _reserve(self, entry: bytes | _Returned, session: Session) -> tuple[int, bytes, int]:
        if isinstance(entry, _Returned):
            payload, deliveries = entry.payload, entry.deliveries + 1
        else:
            payload, deliveries = entry, 1
        delivery = _Delivery(next(_delivery_ids), payload, deliveries, session)
        delivery.timer = self.loop.call_later(
            self.visibility_timeout_s, self._redeliver, delivery.id
        )
        self.reserved[delivery.id] = delivery
        self._j(QueueOp.RES, delivery.id, payload, deliveries)
        session.hold(self)
        return delivery.id, payload, deliveries

    def _offer(self, entry: bytes | _Returned, front: bool = False) -> None:
        """Hand ``entry`` to a live getter, else queue it."""
        if not isinstance(entry, _Returned):
            self.unfinished += 1  # a returned item was counted when first put
        if self.journal is not None:
            if isinstance(entry, _Returned):
                self._j(QueueOp.FRONT, entry.payload, entry.deliveries)
            else:
                self._j(QueueOp.FRONT if front else QueueOp.PUSH, entry, 0)
        waiter = pop_alive(self.getters)
        if waiter is not None:
            self._deliver(entry, waiter)
        elif front:
            self.items.appendleft(entry)
        else:
            self.items.append(entry)

    def _offer_all(self, items: list[bytes]) -> None:
        """``_offer`` each of ``items`` (new, not returned), in order.

        While getters are parked, one by one (each is handed the next item,
        oldest getter first); once none is left, the rest join the queue in
        one ``extend``. The journal gets the same records as one ``_offer``
        per item: a push each (and a pop after each handed over); the
        queued rest's pushes go in one ``Journal.append_many``.
        """
        count = len(items)
        done = 0
        while done < count and self.getters:
            self._offer(items[done])
            done += 1
        if done == count:
            return
        rest = items[done:] if done else items
        self.unfinished += len(rest)
        journal = self.journal
        if journal is not None:
            push, name = int(QueueOp.PUSH), self.name
            journal.append_many([(_OP, name, push, item, 0) for item in rest])
        self.items.extend(rest)

    def _admit_putters(self) -> None:
        """Complete the putters at the front, in order, while their items fit."""
        while (waiter := pop_alive(self.putters)) is not None:
            # A put_many waits for room for all its items, and the putters
            # behind it wait too (FIFO): admitting it on the first free slot
            # would overfill the queue.
            if self._bound and self._bound - len(self.items) < len(waiter.data):
                self.putters.appendleft(waiter)
                return
            self._offer_all(waiter.data)
            self.puts_total += len(waiter.data)
            waiter.finish(None)

    def _take(self) -> bytes | _Returned:
        entry = self.items.popleft()
        self._j(QueueOp.POP, 1)
        self._admit_putters()
        return entry

    def _redeliver(self, did: int) -> None:
        """Put a reserved item back (nack, visibility timeout, session end)."""
        delivery = self.reserved.pop(did, None)
        if delivery is None:
            return
        self._j(QueueOp.UNRES, did)
        if delivery.timer is not None:
            delivery.timer.cancel()
        if self.max_deliveries and delivery.deliveries >= self.max_deliveries:
            self._drop_dead(delivery.payload)
            return
        self._offer(_Returned(delivery.payload, delivery.deliveries), front=True)

    def _drop_dead(self, payload: bytes) -> None:
        """An item leaves for good, unacked: to the dead-letter queue if there is one."""
        if self.dead_letter is not None:
            self.dead_letter(self, payload)
        # No consumer will ack it, so none will call task_done() for it: it
        # is done as far as join() is concerned, or join() would never return.
        if self.unfinished > 0:
            self._finish_one()

    def _on_get_timeout(self, waiter: Waiter) -> None:
        waiter.fail(queue.Empty())

    def _on_put_timeout(self, waiter: Waiter) -> None:
        waiter.fail(queue.Full())
        self._admit_putters()  # it may have held the line for smaller puts

    def _on_putter_gone(self, waiter: Waiter) -> None:
        self._admit_putters()

    # -- the stdlib surface ---------------------------------------------
    @exposed(item=Conv.PAYLOAD, mutates=True)
    def put(self, call: Call, item: bytes, block: bool = True, timeout: float | None = None) -> Any:
        return self._put([item], call, timeout_s(block, timeout))

    @exposed(item=Conv.PAYLOAD, mutates=True)
    def put_nowait(self, call: Call, item: bytes) -> Any:
        return self._put([item], call, 0.0)

    @exposed(items=Conv.PAYLOADS, mutates=True)
    def put_many(
        self, call: Call, items: list[bytes], block: bool = True, timeout: float | None = None
    ) -> Any:
        """Put all of ``items`` in order; with a maxsize, waits for room for all."""
        if not isinstance(items, (list, tuple)):
            raise BadArgument("put_many takes a list of items")
        if self._bound and len(items) > self._bound:
            raise ValueError(f"{len(items)} items can never fit a queue of maxsize {self.maxsize}")
        return self._put(list(items), call, timeout_s(block, timeout))

    def _put(self, items: list[bytes], call: Call, wait_s: float | None) -> Any:
        # A batch's types counted in one pass in C (all bytes but from a hostile client).
        if len(items) < _BULK_CHECK or countOf(map(type, items), bytes) != len(items):
            for item in items:
                if not isinstance(item, bytes):
                    raise BadArgument("queue items travel as pickled bytes")
        room = self._bound - len(self.items) if self._bound else len(items)
        if room >= len(items) and (not self.putters or alive_count(self.putters) == 0):
            if len(items) == 1:
                self._offer(items[0])
            else:
                self._offer_all(items)
            self.puts_total += len(items)
            return None
        if wait_s == 0.0:
            raise queue.Full()
        future = self.park(self.putters, call, wait_s, self._on_put_timeout, items)
        self.putters[-1].on_cancel = self._on_putter_gone
        return future

    @exposed(result=Conv.PAYLOAD, mutates=True)
    def get(self, call: Call, block: bool = True, timeout: float | None = None) -> Any:
        return self._get(call, timeout_s(block, timeout), _GET)

    @exposed(result=Conv.PAYLOAD, mutates=True)
    def get_nowait(self, call: Call) -> Any:
        return self._get(call, 0.0, _GET)

    @exposed(result=Conv.PAYLOADS, mutates=True)
    def get_many(
        self, call: Call, max_items: int, block: bool = True, timeout: float | None = None
    ) -> Any:
        """Up to ``max_items`` items; waits (as ``get``) only while there are none."""
        if not isinstance(max_items, int) or max_items < 1:
            raise ValueError("max_items must be a positive int")
        wait_s = timeout_s(block, timeout)
        items = self.items
        if items:
            count = min(max_items, len(items))
            if count == len(items):
                taken: list[bytes | _Returned] = list(items)
                items.clear()
            else:  # ``count`` poplefts, called from C
                taken = list(itertools.starmap(items.popleft, itertools.repeat((), count)))
            if countOf(map(type, taken), bytes) != count:  # some came back (nack, undo)
                out = [e.payload if isinstance(e, _Returned) else e for e in taken]
            else:
                out = cast("list[bytes]", taken)  # all bytes: checked just above
            self._j(QueueOp.POP, len(out))
            self.gets_total += len(out)
            self._admit_putters()
            return out
        return self._get(call, wait_s, _GET_MANY)

    def _get(self, call: Call, wait_s: float | None, kind: _Want) -> Any:
        if self.items:
            entry = self._take()
            self.gets_total += 1
            if kind is _RESERVE:
                return self._reserve(entry, call.session)
            payload = entry.payload if isinstance(entry, _Returned) else entry
            return [payload] if kind is _GET_MANY else payload
        if wait_s == 0.0:
            raise queue.Empty()
        return self.park(self.getters, call, wait_s, self._on_get_timeout, kind)

    # -- giving back what a cancelled call took (see dispatch.CallTable) ---------
    def _undo_get(self, call: Call, args: tuple[Any, ...], payload: bytes) -> None:
        """A get answered but abandoned by its client: the item is first again."""
        self._put_back([payload])

    def _undo_get_many(self, call: Call, args: tuple[Any, ...], payloads: list[bytes]) -> None:
        self._put_back(list(payloads))

    def _put_back(self, entries: list[bytes | _Returned]) -> None:
        """Return taken entries to the front, in their order, then to parked getters.

        Journaled as the ``front`` records of a nack. Not an ``_offer``: the
        items were counted when put (a JoinableQueue's unfinished count
        already has them), and a bounded queue takes them back even if full.
        """
        journal = self.journal
        if journal is not None:
            front, name = int(QueueOp.FRONT), self.name
            journal.append_many(
                [
                    (_OP, name, front, e.payload, e.deliveries)
                    if isinstance(e, _Returned)
                    else (_OP, name, front, e, 0)
                    for e in reversed(entries)
                ]
            )
        self.items.extendleft(reversed(entries))
        while self.items and (waiter := pop_alive(self.getters)) is not None:
            self._deliver(self.items.popleft(), waiter)

    @exposed()
    def qsize(self, call: Call) -> int:
        return len(self.items)

    @exposed()
    def empty(self, call: Call) -> bool:
        return not self.items

    @exposed()
    def full(self, call: Call) -> bool:
        return self._is_full()

    @exposed(mutates=True)
    def task_done(self, call: Call) -> None:
        if self.unfinished <= 0:
            raise ValueError("task_done() called too many times")
        self._finish_one()

    def _finish_one(self) -> None:
        self.unfinished -= 1
        self._j(QueueOp.DONE)
        if self.unfinished == 0:
            while (waiter := pop_alive(self.joiners)) is not None:
                waiter.finish(None)

    @exposed()
    def join(self, call: Call, timeout: float | None = None) -> Any:
        wait_s = timeout_s(True, timeout)
        if self.unfinished == 0:
            return None
        return self.park(self.joiners, call, wait_s, _join_timeout)

    # -- acknowledged delivery -------------------------------------------
    @exposed(mutates=True)
    def reserve(self, call: Call, timeout: float | None = None) -> Any:
        """``(delivery_id, payload, deliveries)``; ``queue.Empty`` on timeout."""
        return self._get(call, timeout_s(True, timeout), _RESERVE)

    def _undo_reserve(self, call: Call, args: tuple[Any, ...], result: Any) -> None:
        """A reservation abandoned by its client: back to the front, not counted.

        Unlike a nack, the delivery count is what it was before: the client
        never saw the item. Nothing happens if it was acked, nacked or
        redelivered meanwhile.
        """
        did = result[0]
        delivery = self.reserved.get(did)
        if delivery is None or delivery.session is not call.session:
            return
        del self.reserved[did]
        self._j(QueueOp.UNRES, did)
        if delivery.timer is not None:
            delivery.timer.cancel()
        before = delivery.deliveries - 1
        self._put_back([_Returned(delivery.payload, before) if before else delivery.payload])

    def _own_delivery(self, call: Call, did: int) -> _Delivery:
        if not isinstance(did, int):  # (an unhashable one would fail the lookup below)
            raise BadArgument(f"a delivery id is an int, not {type(did).__name__}")
        delivery = self.reserved.get(did)
        if delivery is None or delivery.session is not call.session:
            raise ValueError(
                f"delivery {did} of queue {self.name!r} is not reserved by this session "
                "(already acked or nacked, or it timed out and was redelivered)"
            )
        return delivery

    @exposed(mutates=True)
    def ack(self, call: Call, did: int) -> None:
        delivery = self._own_delivery(call, did)
        del self.reserved[did]
        self._j(QueueOp.UNRES, did)
        if delivery.timer is not None:
            delivery.timer.cancel()

    @exposed(mutates=True)
    def nack(self, call: Call, did: int, requeue: bool = True) -> None:
        delivery = self._own_delivery(call, did)
        if requeue:
            self._redeliver(did)
            return
        del self.reserved[did]
        self._j(QueueOp.UNRES, did)
        if delivery.timer is not None:
            delivery.timer.cancel()
        self._drop_dead(delivery.payload)

    @exposed()
    def extend(self, call: Call, did: int, seconds: float) -> None:
        extend_s = positive_s(seconds, "seconds")
        delivery = self._own_delivery(call, did)
        if delivery.timer is not None:
            delivery.timer.cancel()
        delivery.timer = self.loop.call_later(extend_s, self._redeliver, did)

    @exposed()
    def reserved_count(self, call: Call) -> int:
        return len(self.reserved)

    def release_session(self, session: Session) -> None:
        # Back to the front in the order they were delivered.
        mine = [d.id for d in self.reserved.values() if d.session is session]
        for did in reversed(mine):
            self._redeliver(did)

    # -- durability ---------------------------------------------------------
    def apply(self, effect: tuple[Any, ...]) -> None:
        op = effect[0]
        if op == QueueOp.PUSH:
            self.items.append(effect[1])
            self.unfinished += 1
        elif op == QueueOp.POP:
            for _ in range(effect[1]):
                self.items.popleft()
        elif op == QueueOp.FRONT:
            payload, deliveries = effect[1], effect[2]
            self.items.appendleft(_Returned(payload, deliveries) if deliveries else payload)
            if not deliveries:
                self.unfinished += 1
        elif op == QueueOp.RES:
            self._recovering[effect[1]] = (effect[2], effect[3])
        elif op == QueueOp.UNRES:
            self._recovering.pop(effect[1], None)
        elif op == QueueOp.DONE:
            self.unfinished = max(self.unfinished - 1, 0)
        elif op == QueueOp.UNFINISHED:
            # A journal of an older daemon: a JoinableQueue journaled its
            # count, ``n`` = count + 1 just before each push it came from
            # (the push counts it here); any other ``n`` is the count itself.
            if effect[1] != self.unfinished + 1:
                self.unfinished = effect[1]
        else:
            raise ValueError(f"unknown queue record {op!r}")

    def recovered(self) -> None:
        """Reserved-but-unacked items come back, at the front, in delivery order."""
        for did in sorted(self._recovering, reverse=True):
            payload, deliveries = self._recovering[did]
            self.items.appendleft(_Returned(payload, deliveries))
            self._settled.append((did, payload, deliveries))
        self._recovering.clear()

    def journal_recovery(self) -> None:
        """Journal what :meth:`recovered` did, as the old journal's last records.

        The next process's records follow them. Without these, a crash before
        the startup snapshot is on disk replays that process's takes on top
        of the old reservations (a take pops the item behind the one it took,
        delivery ids of two processes meet), and an item is lost. Each comes
        back as an ack of its old reservation and a put back at the front.
        """
        for did, payload, deliveries in self._settled:
            self._j(QueueOp.UNRES, did)
            self._j(QueueOp.FRONT, payload, deliveries)
        self._settled.clear()

    def dump_state(self) -> Any:
        """The ready items and the unfinished count.

        Not the reservations: a snapshot that held them as ready items would
        bring back one acked after it (its ``UNRES`` record would find no
        reservation on replay), and a nacked one twice. The store journals
        them again right after the snapshot (:meth:`journal_reservations`).
        """
        ready = [
            (e.payload, e.deliveries) if isinstance(e, _Returned) else (e, 0) for e in self.items
        ]
        return {"items": ready, "unfinished": self.unfinished}

    def journal_reservations(self) -> None:
        """Journal every reservation as taken now (after a snapshot, which has none)."""
        for delivery in sorted(self.reserved.values(), key=lambda d: d.id):
            self._j(QueueOp.RES, delivery.id, delivery.payload, delivery.deliveries)

    def load_state(self, state: Any) -> None:
        if isinstance(state, dict):
            ready, self.unfinished = state["items"], state["unfinished"]
        else:  # an older daemon's snapshot of a Queue: its items are unfinished
            ready = state
            self.unfinished = len(ready)
        self.items = deque(_Returned(p, n) if n else p for p, n in ready)

    # -- bookkeeping ------------------------------------------------------
    def waiter_count(self) -> int:
        return alive_count(self.getters) + alive_count(self.putters) + alive_count(self.joiners)

    def shutdown(self, exc: BaseException) -> None:
        fail_all(self.getters, exc)
        fail_all(self.putters, exc)
        fail_all(self.joiners, exc)
        for delivery in self.reserved.values():
            if delivery.timer is not None:
                delivery.timer.cancel()

    def stats(self) -> QueueStats:
        return QueueStats(
            self.name,
            self.typeid,
            self.creation_args(),
            depth=len(self.items),
            reserved=len(self.reserved),
            waiters=self.waiter_count(),
            puts_total=self.puts_total,
            gets_total=self.gets_total,
            unfinished=self.unfinished,
        )

    def snapshot(self) -> list[bytes]:
        return [e.payload if isinstance(e, _Returned) else e for e in self.items]


class JoinableQueue(Queue):
    """``multiprocessing.JoinableQueue``: a Queue (which has ``task_done``/``join``
    too, as ``queue.Queue``) under its own type name, so a name taken by one
    is refused to the other."""

    typeid = "JoinableQueue"


def _join_timeout(waiter: Waiter) -> None:
    waiter.fail(TimeoutError("join() timed out"))
