"""Model-based tests of Queue and JoinableQueue against ``queue.Queue``.

The model is a ``queue.Queue`` of ``(seq, payload, deliveries)`` entries,
extended with what managerd adds: reserved deliveries (``reserve``/``ack``/
``nack``), which go back to the front when nacked, when their session ends
(a reserving child process is SIGKILLed) or when the daemon crashes and
recovers from its data directory. Every put carries a unique ``seq``, so a
get that returns anything but the model's next entry fails: together with
the depth check after every step and the drain at the end, every
acknowledged put is delivered exactly once or still there.

Where managerd deliberately differs from ``queue.Queue``:

- items are pickled by the client: an unpicklable item is refused before it
  is sent (a pickling error) and the queue is unchanged;
- ``put`` validates its timeout even on an unbounded queue (the stdlib only
  looks at it when it has to wait): a bad one raises the type the stdlib
  raises on a bounded queue (``queue_timeout_error``);
- ``reserve``/``ack``/``nack``/``get_many`` have no stdlib counterpart;
  an ``ack`` from another session, or of a delivery already settled, is a
  ``ValueError``.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, precondition, rule

from managerd_client import Message

from conftest import Daemon, wait_until
from stateful_support import (
    RESTART_RESETS,
    SHORT_S,
    Actor,
    Outcome,
    StatefulMachine,
    expect_nan_refused,
    nan_wait,
    outcome,
    payloads,
    real,
    run_machine,
    same,
    same_outcome,
    sdaemon,
    settles,
    timeouts,
    too_long,
    top_payloads,
)

__all__ = ["sdaemon"]

#: A daemon restart that hangs fails in conftest (30 s, with the daemon's log)
#: rather than in pytest-timeout (which shows no log).
pytestmark = pytest.mark.timeout(300)

Entry = tuple[int, Any, int]  # (seq, payload, deliveries so far)


def queue_timeout_error(block: Any, timeout: Any) -> BaseException | None:
    """The error ``queue.Queue`` raises for (block, timeout) when it must wait."""
    if not block or timeout is None:
        return None
    try:
        if timeout < 0:
            return ValueError("'timeout' must be a non-negative number")
    except TypeError as exc:
        return exc
    return None


class QueueMachine(StatefulMachine):
    primitive = "Queue"
    typeid = "Queue"

    def __init__(self) -> None:
        super().__init__()
        self.maxsize = 0
        self.model: queue.Queue[Entry] = queue.Queue()
        self.reserved: dict[int, tuple[Entry, int, Message]] = {}  # did -> entry, client, msg
        self.dead: list[Entry] = []
        self.seq = 0
        self.interrupted = False  # one interrupted-get rule per example (a spawn costs ~1 s)
        self.delivered: set[int] = set()
        self.put_seqs: set[int] = set()
        self.proxies: list[Any] = []

    @initialize(maxsize=st.sampled_from([0, 0, 1, 3, -1]))
    def create(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self.model = queue.Queue(maxsize)
        self._make_proxies()

    def _make_proxies(self) -> None:
        self.proxies = [getattr(m, self.typeid)(self.name(), self.maxsize) for m in self.managers]

    def q(self, actor: Actor) -> Any:
        return self.proxies[actor.client]

    def _entry(self, payload: Any) -> Entry:
        self.seq += 1
        return (self.seq, payload, 0)

    def _expect_item(self, got: Any, want: Entry, what: str) -> None:
        assert isinstance(got, tuple) and len(got) == 2, f"{what}: got {got!r}"
        assert got[0] == want[0], f"{what}: got item {got[0]}, the model's next is {want[0]}"
        assert same(got[1], want[1]), f"{what}: payload {got[1]!r} != {want[1]!r}"
        assert want[0] not in self.delivered, f"{what}: item {want[0]} delivered twice"
        self.delivered.add(want[0])

    # -- puts ----------------------------------------------------------------------------
    @rule(data=st.data(), payload=top_payloads, block=st.booleans(), timeout=timeouts(True))
    def put(self, data: st.DataObject, payload: Any, block: bool, timeout: Any) -> None:
        actor = data.draw(st.sampled_from(self.actors))
        payload = real(payload)
        entry = self._entry(payload)
        item = (entry[0], payload)
        if block and timeout is None and 0 < self.maxsize <= self.model.qsize():
            timeout = SHORT_S  # (None would wait for ever)
        got = actor.run(lambda: outcome(lambda: self.q(actor).put(item, block, timeout)))
        if nan_wait(timeout, block and 0 < self.maxsize <= self.model.qsize()):
            expect_nan_refused(got, f"{actor} put")
            return
        early = queue_timeout_error(block, timeout)
        if early is not None:
            same_outcome(got, Outcome(exc=early), f"{actor} put(timeout={timeout!r})")
            return
        full = 0 < self.maxsize <= self.model.qsize()
        if full and (block and timeout is None):
            # The model would wait forever: managerd parked (the call has not
            # returned); cannot happen here since the call returned.
            raise AssertionError(f"put(block, None) on a full queue returned {got}")
        want = outcome(lambda: self.model.put(entry, block, timeout))
        same_outcome(got, want, f"{actor} put(block={block}, timeout={timeout!r})")
        if want.ok:
            self.put_seqs.add(entry[0])

    @rule(data=st.data(), payload=top_payloads)
    def put_nowait(self, data: st.DataObject, payload: Any) -> None:
        actor = data.draw(st.sampled_from(self.actors))
        payload = real(payload)
        entry = self._entry(payload)
        got = actor.run(lambda: outcome(lambda: self.q(actor).put_nowait((entry[0], payload))))
        want = outcome(lambda: self.model.put_nowait(entry))
        same_outcome(got, want, f"{actor} put_nowait")
        if want.ok:
            self.put_seqs.add(entry[0])

    @rule(data=st.data())
    def put_unpicklable(self, data: st.DataObject) -> None:
        """Deliberate difference: the item must pickle; refused client-side, nothing queued."""
        actor = data.draw(st.sampled_from(self.actors))
        unpicklable: list[Any] = [lambda: 1, threading.Lock(), (i for i in range(0))]
        bad = data.draw(st.sampled_from(unpicklable))
        got = actor.run(lambda: outcome(lambda: self.q(actor).put(bad, False)))
        assert not got.ok, "an unpicklable item was accepted"

    # -- an interrupted blocked get (Ctrl-C in another process) -------------------------
    @precondition(
        lambda self: self.typeid == "Queue" and self.model.empty() and not self.interrupted
    )
    @rule(payload=payloads)
    def interrupted_get_then_next(self, payload: Any) -> None:
        """A child blocked in get() gets SIGINT: KeyboardInterrupt there, it stays alive,
        no waiter is left, and its next get takes the next item (none is lost)."""
        self.interrupted = True
        with self.interrupted_child("get") as conn:
            entry = self._entry(payload)
            self.q(self.actors[0]).put((entry[0], payload))
            self.model.put(entry)
            self.put_seqs.add(entry[0])
            conn.send("go")
            assert conn.poll(30), "the child's next get did not return"
            tag, value = conn.recv()
            assert tag == "again", tag
            self._expect_item(value, self.model.get_nowait(), "the interrupted child's next get")

    # -- gets ----------------------------------------------------------------------------
    @rule(data=st.data(), block=st.booleans(), timeout=timeouts())
    def get(self, data: st.DataObject, block: bool, timeout: Any) -> None:
        actor = data.draw(st.sampled_from(self.actors))
        got = actor.run(lambda: outcome(lambda: self.q(actor).get(block, timeout)))
        if nan_wait(timeout, block and self.model.empty()):
            expect_nan_refused(got, f"{actor} get")
            return
        # inf and huge waits: queue.Queue raises OverflowError as it waits.
        want = outcome(lambda: self.model.get(block, timeout))
        same_outcome(got, want, f"{actor} get(block={block}, timeout={timeout!r})", compare=False)
        if want.ok:
            self._expect_item(got.value, want.value, f"{actor} get")

    @rule(data=st.data())
    def get_nowait(self, data: st.DataObject) -> None:
        actor = data.draw(st.sampled_from(self.actors))
        got = actor.run(lambda: outcome(lambda: self.q(actor).get_nowait()))
        want = outcome(self.model.get_nowait)
        same_outcome(got, want, f"{actor} get_nowait", compare=False)
        if want.ok:
            self._expect_item(got.value, want.value, f"{actor} get_nowait")

    @rule(data=st.data(), max_items=st.one_of(st.integers(-2, 4), st.sampled_from([1.5, "2"])))
    def get_many(self, data: st.DataObject, max_items: Any) -> None:
        """Extension: up to max_items at once (ValueError unless a positive int)."""
        actor = data.draw(st.sampled_from(self.actors))
        got = actor.run(lambda: outcome(lambda: self.q(actor).get_many(max_items, False)))
        if not isinstance(max_items, int) or max_items < 1:
            same_outcome(got, Outcome(exc=ValueError()), f"get_many({max_items!r})")
            return
        if self.model.empty():
            same_outcome(got, Outcome(exc=queue.Empty()), "get_many on empty")
            return
        assert got.ok, got
        want = [self.model.get_nowait() for _ in range(min(max_items, self.model.qsize()))]
        assert len(got.value) == len(want), f"get_many: {len(got.value)} items, model {len(want)}"
        for g, w in zip(got.value, want, strict=True):
            self._expect_item(g, w, "get_many")

    @rule(data=st.data())
    def sizes(self, data: st.DataObject) -> None:
        actor = data.draw(st.sampled_from(self.actors))
        q = self.q(actor)
        got = actor.run(lambda: (q.qsize(), q.empty(), q.full()))
        want = (self.model.qsize(), self.model.empty(), self.model.full())
        assert got == want, f"qsize/empty/full {got} != model {want}"

    # -- acknowledged delivery (the model's extension) ---------------------------------------
    @rule(data=st.data(), timeout=timeouts())
    def reserve(self, data: st.DataObject, timeout: Any) -> None:
        actor = data.draw(st.sampled_from(self.actors))
        got = actor.run(lambda: outcome(lambda: self.q(actor).reserve(timeout)))
        if nan_wait(timeout, self.model.empty()):
            expect_nan_refused(got, f"{actor} reserve")
            return
        early = queue_timeout_error(True, timeout)
        if early is not None:
            same_outcome(got, Outcome(exc=early), f"reserve({timeout!r})")
            return
        if too_long(timeout) and self.model.empty():
            same_outcome(got, Outcome(exc=OverflowError()), f"{actor} reserve({timeout!r})")
            return
        if self.model.empty():
            same_outcome(got, Outcome(exc=queue.Empty()), f"{actor} reserve on empty")
            return
        assert got.ok, f"{actor} reserve: {got}"
        entry = self.model.get_nowait()
        msg: Message = got.value
        assert msg.value[0] == entry[0], f"reserved item {msg.value[0]}, model's next {entry[0]}"
        assert same(msg.value[1], entry[1])
        assert msg.deliveries == entry[2] + 1, f"deliveries {msg.deliveries}, model {entry[2] + 1}"
        self.reserved[msg.delivery_id] = ((entry[0], entry[1], entry[2] + 1), actor.client, msg)

    def _pick_reserved(self, data: st.DataObject) -> int:
        return data.draw(st.sampled_from(sorted(self.reserved)))

    @precondition(lambda self: self.reserved)
    @rule(data=st.data(), own=st.booleans())
    def ack(self, data: st.DataObject, own: bool) -> None:
        did = self._pick_reserved(data)
        entry, client, _ = self.reserved[did]
        actor = next(a for a in self.actors if (a.client == client) == own)
        got = actor.run(lambda: outcome(lambda: self.q(actor)._call("ack", did)))
        if not own:
            same_outcome(got, Outcome(exc=ValueError()), "ack from another session")
            return
        assert got.ok, f"ack: {got}"
        del self.reserved[did]
        assert entry[0] not in self.delivered, f"item {entry[0]} acked twice"
        self.delivered.add(entry[0])
        again = actor.run(lambda: outcome(lambda: self.q(actor)._call("ack", did)))
        same_outcome(again, Outcome(exc=ValueError()), "ack twice")

    @precondition(lambda self: self.reserved)
    @rule(data=st.data(), requeue=st.booleans())
    def nack(self, data: st.DataObject, requeue: bool) -> None:
        did = self._pick_reserved(data)
        entry, client, msg = self.reserved.pop(did)
        actor = next(a for a in self.actors if a.client == client)
        got = actor.run(lambda: outcome(lambda: msg.nack(requeue)))
        assert got.ok, f"nack: {got}"
        if requeue:
            self.model.queue.appendleft(entry)
        else:
            # README: an item moved to "<name>.dead" counts as done for join().
            self.dead.append(entry)
            if self.model.unfinished_tasks > 0:
                self.model.task_done()

    # -- failures ------------------------------------------------------------------------------
    @precondition(lambda self: len(self.children) < 3)
    @rule()
    def kill_reserver(self) -> None:
        """A client process reserves the front item and is SIGKILLed: it comes back first."""
        child = self.spawn_holder("reserve", self.typeid, self.name())
        held = child.held.split()  # type: ignore[attr-defined]
        if self.model.empty():
            assert held == ["NOTHING"], f"a child reserved from an empty queue: {held}"
        else:
            entry = self.model.get_nowait()
            assert held[0] == "HELD" and int(held[2]) == entry[2] + 1, held
            assert wait_until(lambda: self._reserved_on_daemon() == len(self.reserved) + 1)
            self.model.queue.appendleft((entry[0], entry[1], entry[2] + 1))
        self.kill_child(child)
        assert wait_until(lambda: self._reserved_on_daemon() == len(self.reserved)), (
            "a killed consumer's reservation was not returned"
        )

    def _reserved_on_daemon(self) -> int:
        return int(self.status_of(self.name())["reserved"])

    @precondition(lambda self: self.may_restart())
    @rule()
    def restart(self) -> None:
        """Crash and recover: queued items stay; reserved ones come back first, in order
        (on etcd, a gateway's: the sessions resume, their reservations stay theirs)."""
        self.restart_daemon()
        if not RESTART_RESETS:
            return
        returned = [self.reserved[did][0] for did in sorted(self.reserved)]
        self.reserved.clear()
        for entry in reversed(returned):
            self.model.queue.appendleft(entry)
        self._make_proxies()

    # -- invariants ----------------------------------------------------------------------------
    @invariant()
    @settles
    def daemon_agrees(self) -> None:
        if not self.proxies:
            return
        info = self.status_of(self.name())
        assert info["depth"] == self.model.qsize(), f"depth {info['depth']} != model {info}"
        assert info["reserved"] == len(self.reserved), f"reserved {info}"
        assert info["waiters"] == 0, f"a waiter outlived its call: {info}"
        accounted = (
            {e[0] for e in self.model.queue}
            | {e[0] for e, _, _ in self.reserved.values()}
            | self.delivered
            | {e[0] for e in self.dead}
        )
        assert self.put_seqs <= accounted, f"lost items: {self.put_seqs - accounted}"

    def teardown(self) -> None:
        try:
            if self.proxies:
                self._drain_and_compare()
        finally:
            super().teardown()

    def _drain_and_compare(self) -> None:
        """Everything acknowledged and not taken is still there, in the model's order."""
        for did in list(self.reserved):
            _, _, msg = self.reserved.pop(did)
            msg.ack()
        rest = self.proxies[0].get_many(10_000, False) if not self.model.empty() else []
        want = list(self.model.queue)
        assert [r[0] for r in rest] == [w[0] for w in want], "the queue's contents differ"
        if self.dead:
            dead_q = self.managers[0].Queue(self.name(".dead"))
            got = dead_q.get_many(10_000, False)
            assert [g[0] for g in got] == [d[0] for d in self.dead], "dead letters differ"


class JoinableQueueMachine(QueueMachine):
    """JoinableQueue: the model's unfinished_tasks is queue.Queue's own."""

    primitive = "JoinableQueue"
    typeid = "JoinableQueue"

    @rule(data=st.data())
    def task_done(self, data: st.DataObject) -> None:
        actor = data.draw(st.sampled_from(self.actors))
        got = actor.run(lambda: outcome(lambda: self.q(actor)._call("task_done")))
        want = outcome(self.model.task_done)
        same_outcome(got, want, "task_done")

    @rule(data=st.data(), timeout=st.sampled_from([0, 0.01]))
    def join(self, data: st.DataObject, timeout: float) -> None:
        """Extension: join(timeout) raises TimeoutError (queue.Queue.join has no timeout)."""
        actor = data.draw(st.sampled_from(self.actors))
        got = actor.run(lambda: outcome(lambda: self.q(actor)._call("join", timeout)))
        unfinished = self.model.unfinished_tasks
        want = Outcome() if unfinished == 0 else Outcome(exc=TimeoutError())
        same_outcome(got, want, f"join with {unfinished} unfinished")


class QueueTaskDoneMachine(QueueMachine):
    """queue.Queue has task_done/join too (plain Queue, as queue.Queue)."""

    primitive = "Queue.task_done"

    task_done = JoinableQueueMachine.task_done
    join = JoinableQueueMachine.join


def test_queue_model(sdaemon: Daemon) -> None:
    run_machine(QueueMachine, sdaemon)


def test_joinable_queue_model(sdaemon: Daemon) -> None:
    run_machine(JoinableQueueMachine, sdaemon)


def test_queue_task_done_model(sdaemon: Daemon) -> None:
    run_machine(QueueTaskDoneMachine, sdaemon)
