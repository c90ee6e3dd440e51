"""Model-based tests of the store itself, in process: fast, so many steps.

The subprocess suite's state machines (``tests/test_stateful_*.py``) drive
the daemon through real clients; these drive the store through the
harness, with the standard-library object as the model: ``queue.Queue``
(extended with reserved deliveries, which go back to the front when
nacked, when their session ends or when the store restarts),
``threading.Lock`` (with its holder's session: a session that ends
releases it), an RLock's owner (a session and a thread) and depth,
``threading.Semaphore``/``BoundedSemaphore`` with the permits each session
holds, ``threading.Barrier`` with parties waiting across steps, a
Condition's waits and its lock's hand-overs, a Pipe's two buffers and
blocked reads; and a durability machine:
hostile changes to every durable type, then a restart must give back
every object as it was. Rules call from several client sessions with
hostile timeouts, and leave calls blocked across steps; after every step
the store's depth, reservations and waiters must match the model, and
every put is delivered exactly once (to the oldest blocked get first,
never to an ended session's) or still there (each item carries a
sequence number).

Scale with ``MANAGERD_CONTRACT_EXAMPLES`` (examples per machine, default
15), ``MANAGERD_CONTRACT_STEPS`` (steps per example, default 30) and
``MANAGERD_CONTRACT_RESTARTS`` (store restarts per example at most, default 2);
``MANAGERD_CONTRACT_SHRINK=1`` shrinks a failure.

Where the store deliberately differs from ``queue.Queue`` (README): a
``put`` checks its timeout even on an unbounded queue, as the stdlib does
on a bounded one; a NaN wait is a ValueError.
"""

from __future__ import annotations

import math
import os
import pickle
import queue
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from managerd.store.stats import PipeStats
from managerd_client.errors import ServerShuttingDown

from contract.harness import ETCD_WHOLE, STORE_KINDS, Client, Obj, Pending, StoreHarness
from contract.outcomes import Outcome, outcome, same_outcome

EXAMPLES = int(os.environ.get("MANAGERD_CONTRACT_EXAMPLES", "15"))
STEPS = int(os.environ.get("MANAGERD_CONTRACT_STEPS", "30"))
#: Shrinking re-runs a failing machine many times (minutes): off unless asked for,
#: the failure is reported as found, with every step.
SHRINK = os.environ.get("MANAGERD_CONTRACT_SHRINK", "") not in ("", "0")
SETTINGS = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.reuse, Phase.generate, *([Phase.shrink] if SHRINK else [])],
)

#: Store restarts per example at most (each costs a journal close and recovery).
RESTARTS = int(os.environ.get("MANAGERD_CONTRACT_RESTARTS", "2"))
#: Long enough to park a waiter, short for a step.
SHORT_S = 0.002
NAN = float("nan")
#: Timeouts, fine and hostile (None is drawn apart: it may wait for ever).
TIMEOUTS = st.sampled_from(
    [0, 0.0, -0.0, SHORT_S, False, -1, -1.5, NAN, float("inf"), -float("inf"), 10**30, 1e300,
     "1", b"x", [SHORT_S]]
)  # fmt: skip
PAYLOADS = st.one_of(
    st.none(), st.integers(), st.floats(), st.text(max_size=8), st.binary(max_size=8),
    st.lists(st.integers(), max_size=3),
)  # fmt: skip


def is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float))


class StoreMachine(RuleBasedStateMachine):
    """One store on a fresh data directory per example, three clients."""

    kind: ClassVar[str] = "memory"

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="contract-stateful-"))
        self.store = StoreHarness(self.kind, self.tmp / "data")
        self.clients = [self.store.client, self.store.new_client(), self.store.new_client()]
        self.restarts = 0

    def restart_store(self) -> None:
        self.restarts += 1
        self.store.restart()

    def teardown(self) -> None:
        try:
            self.store.close()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def client(self, data: st.DataObject) -> Client:
        return data.draw(st.sampled_from(self.clients), label="client")


Entry = tuple[int, Any, int]  # (seq, payload, deliveries so far)


def ended_by_restart(store: StoreHarness, pending: Pending) -> bool:
    """A call parked when the daemon stopped: answered ``ServerShuttingDown``, or, by a
    gateway of the etcd store, dropped unanswered (its client asks it again through
    another gateway, where its session resumes)."""
    if store.kind == "etcd" and pending.future.cancelled():
        return True
    return isinstance(outcome(pending.result).error, ServerShuttingDown)


class QueueMachine(StoreMachine):
    def __init__(self) -> None:
        super().__init__()
        self.q = Obj("Queue", "q")
        self.model: queue.Queue[Entry] = queue.Queue()
        self.maxsize = 0
        self.seq = 0
        #: delivery id -> (entry, the client that reserved it), in the order delivered
        self.reserved: dict[int, tuple[Entry, Client]] = {}
        self.delivered: set[int] = set()
        #: Blocked gets, oldest first: the next item is theirs, in this order.
        self.parked: list[tuple[Client, Pending]] = []

    @initialize(maxsize=st.sampled_from([0, 1, 3, -1]))
    def create(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self.model = queue.Queue(maxsize)
        self.q = self.store.open("Queue", "q", maxsize=maxsize)

    def _full(self) -> bool:
        return 0 < self.maxsize <= self.model.qsize()

    def _got(self, value: Any, want: Entry, deliveries: int | None = None) -> None:
        assert value[0] == want[0], f"got item {value[0]}, the model's next is {want[0]}"
        assert pickle.dumps(value[1]) == pickle.dumps(want[1])
        assert want[0] not in self.delivered, f"item {want[0]} delivered twice"
        if deliveries is not None:
            assert deliveries == want[2] + 1, (deliveries, want)

    def _came_back(self, entry: Entry) -> None:
        """An item returned to the front (nack, a session's end): to a blocked get first."""
        if not self._handed(entry):
            self.model.queue.appendleft(entry)

    def _handed(self, entry: Entry) -> bool:
        """Whether ``entry`` went to the oldest blocked get (there is one)."""
        if not self.parked:
            return False
        _, pending = self.parked.pop(0)
        assert pending.done(), "a blocked get was not handed the next item"
        self._got(pending.result(), entry)
        self.delivered.add(entry[0])
        return True

    def _wait_rules(self, waits: bool, block: bool, timeout: Any) -> Outcome | None:
        """The outcome the README's rules give where the stdlib cannot be asked."""
        if block and waits and is_nan(timeout):
            return Outcome(error=ValueError("NaN wait"))
        return None

    def _put_rules(self, block: bool, timeout: Any) -> Outcome | None:
        """A put's timeout is checked as a bounded ``queue.Queue`` checks it, always."""
        nan = self._wait_rules(self._full(), block, timeout)
        if nan is not None or self.maxsize > 0 or not block or timeout is None:
            return nan
        bounded: queue.Queue[Entry] = queue.Queue(1)
        checked = outcome(lambda: bounded.put((0, None, 0), block, timeout))
        return None if checked.ok else checked

    @rule(data=st.data(), payload=PAYLOADS, block=st.booleans(), timeout=TIMEOUTS)
    def put(self, data: st.DataObject, payload: Any, block: bool, timeout: Any) -> None:
        client = self.client(data)
        self.seq += 1
        entry = (self.seq, payload, 0)
        got = outcome(
            lambda: self.store.call(
                self.q, "put", (entry[0], payload), block, timeout, client=client
            )
        )
        want = self._put_rules(block, timeout) or outcome(
            lambda: self.model.put(entry, block, timeout)
        )
        same_outcome(got, want, f"put(block={block}, timeout={timeout!r})")
        if want.ok and self.parked:  # (then the queue was empty)
            assert self._handed(self.model.get_nowait())

    @precondition(lambda self: self.model.empty() and len(self.parked) < 3)
    @rule(data=st.data())
    def blocked_get(self, data: st.DataObject) -> None:
        client = self.client(data)
        pending = self.store.start(self.q, "get", client=client)
        assert not pending.done(), "a get on an empty queue did not wait"
        self.parked.append((client, pending))

    @rule(data=st.data(), block=st.booleans(), timeout=TIMEOUTS)
    def get(self, data: st.DataObject, block: bool, timeout: Any) -> None:
        client = self.client(data)
        got = outcome(lambda: self.store.call(self.q, "get", block, timeout, client=client))
        want = self._wait_rules(self.model.empty(), block, timeout) or outcome(
            lambda: self.model.get(block, timeout)
        )
        if got.ok and want.ok:
            self._got(got.value, want.value)
            self.delivered.add(want.value[0])
            return
        same_outcome(got, want, f"get(block={block}, timeout={timeout!r})")

    @rule(data=st.data(), n=st.integers(1, 4))
    def get_many(self, data: st.DataObject, n: int) -> None:
        client = self.client(data)
        got = outcome(lambda: self.store.call(self.q, "get_many", n, False, client=client))
        if self.model.empty():
            assert isinstance(got.error, queue.Empty), got
            return
        want = [self.model.get_nowait() for _ in range(min(n, self.model.qsize()))]
        assert got.ok and len(got.value) == len(want), (got, want)
        for value, entry in zip(got.value, want, strict=True):
            self._got(value, entry)
            self.delivered.add(entry[0])

    @rule(data=st.data())
    def reserve(self, data: st.DataObject) -> None:
        client = self.client(data)
        got = outcome(lambda: self.store.call(self.q, "reserve", 0, client=client))
        if self.model.empty():
            assert isinstance(got.error, queue.Empty), got
            return
        entry = self.model.get_nowait()
        assert got.ok, got
        did, value, deliveries = got.value
        self._got(value, entry, deliveries)
        self.reserved[did] = ((entry[0], entry[1], deliveries), client)

    @precondition(lambda self: bool(self.reserved))
    @rule(data=st.data(), wrong_client=st.booleans())
    def settle(self, data: st.DataObject, wrong_client: bool) -> None:
        # In the order delivered (a delivery id of the etcd store is a hash: drawn from
        # the sorted ids, the same program would settle another delivery each run).
        did = data.draw(st.sampled_from(list(self.reserved)))
        entry, owner = self.reserved[did]
        if wrong_client:
            other = next(c for c in self.clients if c is not owner)
            got = outcome(lambda: self.store.call(self.q, "ack", did, client=other))
            assert isinstance(got.error, ValueError), got
            return
        method = data.draw(st.sampled_from(["ack", "nack"]))
        self.store.call(self.q, method, did, client=owner)
        del self.reserved[did]
        if method == "ack":
            self.delivered.add(entry[0])
        else:
            self._came_back(entry)  # back first, its count kept

    @rule(data=st.data())
    def task_done(self, data: st.DataObject) -> None:
        client = self.client(data)
        got = outcome(lambda: self.store.call(self.q, "task_done", client=client))
        same_outcome(got, outcome(self.model.task_done), "task_done")

    @rule(data=st.data())
    def end_session(self, data: st.DataObject) -> None:
        client = self.client(data)
        # In the order delivered (``reserved`` keeps it; delivery ids are opaque: the
        # etcd store's are hashes, not a count).
        mine = [did for did, (_, owner) in self.reserved.items() if owner is client]
        # Done, so that a blocked get it hands an item to is answered by now.
        self.store.end_session(client, wait=True)
        # Its blocked gets are dropped first: what it gives back goes to live ones.
        for _, pending in [p for p in self.parked if p[0] is client]:
            assert pending.cancelled(), "a blocked get of an ended session was not dropped"
        self.parked = [p for p in self.parked if p[0] is not client]
        for did in reversed(mine):  # back first, in the order they were delivered
            self._came_back(self.reserved.pop(did)[0])

    @rule()
    def compact(self) -> None:
        """The store rewrites its state (reservations outstanding): nothing changes."""
        self.store.compact()

    @precondition(lambda self: self.restarts < RESTARTS)
    @rule()
    def restart(self) -> None:
        self.restart_store()
        for _, pending in self.parked:
            assert ended_by_restart(self.store, pending)
        self.parked.clear()
        if self.store.kind == "etcd":
            # The clients' sessions end one after another (they never come back), each
            # one's reservations back to the front in the order they were delivered.
            for client in self.clients:
                mine = [did for did, (_, owner) in self.reserved.items() if owner is client]
                for did in reversed(mine):
                    self.model.queue.appendleft(self.reserved.pop(did)[0])
            return
        for did in reversed(list(self.reserved)):  # the first delivered at the front
            self.model.queue.appendleft(self.reserved.pop(did)[0])

    @invariant()
    def matches_the_model(self) -> None:
        assert self.store.call(self.q, "qsize") == self.model.qsize()
        assert self.store.call(self.q, "reserved_count") == len(self.reserved)
        assert self.store.waiters(self.q) == len(self.parked)
        want_join = outcome(lambda: None if self.model.unfinished_tasks == 0 else 1 / 0)
        got_join = outcome(lambda: self.store.call(self.q, "join", 0))
        assert got_join.ok == want_join.ok, (got_join, self.model.unfinished_tasks)

    def teardown(self) -> None:
        try:
            # Every put is delivered once, or still there, in the model's order.
            if self.q.name:
                for did in sorted(self.reserved):
                    self.store.call(self.q, "ack", did, client=self.reserved[did][1])
                while not self.model.empty():
                    self._got(self.store.call(self.q, "get", False), self.model.get_nowait())
                assert self.store.call(self.q, "qsize") == 0
        finally:
            super().teardown()


class LockMachine(StoreMachine):
    """A Lock against a ``threading.Lock`` and the session that holds it."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = self.store.open("Lock", "l")
        self.model = threading.Lock()
        self.holder: Client | None = None
        self.last_token = 0

    def _token(self, token: Any) -> None:
        assert isinstance(token, int) and token > self.last_token, (token, self.last_token)
        self.last_token = token

    @rule(data=st.data(), blocking=st.booleans(), timeout=TIMEOUTS | st.just(-1))
    def acquire(self, data: st.DataObject, blocking: bool, timeout: Any) -> None:
        client = self.client(data)
        if blocking and self.model.locked() and timeout == -1 and not isinstance(timeout, float):
            timeout = SHORT_S  # -1 would wait for ever
        got = outcome(
            lambda: self.store.call(self.lock, "acquire", blocking, timeout, client=client)
        )
        want = outcome(lambda: self.model.acquire(blocking, timeout))
        if got.ok and got.value is not False:
            assert want.value is True, (got, want)
            self._token(got.value)
            self.holder = client
            return
        same_outcome(got, want, f"acquire({blocking}, {timeout!r})")

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        client = self.client(data)  # any client may release a Lock, as any thread
        got = outcome(lambda: self.store.call(self.lock, "release", client=client))
        same_outcome(got, outcome(self.model.release), "release")
        self.holder = None

    @rule(data=st.data())
    def end_session(self, data: st.DataObject) -> None:
        client = self.client(data)
        self.store.end_session(client)
        if self.holder is client:
            self.model.release()
            self.holder = None

    @precondition(lambda self: self.restarts < RESTARTS)
    @rule()
    def restart(self) -> None:
        self.restart_store()
        if self.model.locked():
            self.model.release()
            self.holder = None

    @invariant()
    def matches_the_model(self) -> None:
        assert self.store.call(self.lock, "locked") == self.model.locked()
        assert self.store.waiters(self.lock) == 0
        if self.model.locked():
            assert self.store.call(self.lock, "fencing_token") == self.last_token


#: An actor: one thread of one client (an RLock is owned by a session and a thread).
Actor = tuple[Client, int]


class RLockMachine(StoreMachine):
    """An RLock owned per session and thread; its model is an owner and a depth.

    A call's arguments are checked as ``threading.RLock`` checks them (the
    model's errors are a free stdlib lock's for the same arguments).
    """

    def __init__(self) -> None:
        super().__init__()
        self.lock = self.store.open("RLock", "r")
        self.owner: Actor | None = None
        self.depth = 0
        self.token = 0

    def actor(self, data: st.DataObject) -> Actor:
        return (self.client(data), data.draw(st.sampled_from([0, 1]), label="thread"))

    def _mine(self, actor: Actor) -> bool:
        return self.owner is not None and self.owner[0] is actor[0] and self.owner[1] == actor[1]

    @rule(data=st.data(), blocking=st.booleans(), timeout=TIMEOUTS | st.just(-1))
    def acquire(self, data: st.DataObject, blocking: bool, timeout: Any) -> None:
        client, thread = actor = self.actor(data)
        held_by_other = self.owner is not None and not self._mine(actor)
        if blocking and held_by_other and timeout == -1 and not isinstance(timeout, float):
            timeout = SHORT_S  # -1 would wait for ever
        got = outcome(
            lambda: self.store.call(
                self.lock, "acquire", blocking, timeout, client=client, thread=thread
            )
        )
        checked = outcome(lambda: threading.RLock().acquire(blocking, timeout))
        if not checked.ok:
            same_outcome(got, checked, f"acquire({blocking}, {timeout!r})")
            return
        assert got.ok, got
        if held_by_other:
            assert got.value is False, got
            return
        if self.owner is None:
            assert isinstance(got.value, int) and got.value > self.token, (got, self.token)
            self.owner, self.depth, self.token = actor, 1, got.value
        else:
            assert got.value == self.token, (got, self.token)  # re-entry: the same holding
            self.depth += 1

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        client, thread = actor = self.actor(data)
        got = outcome(lambda: self.store.call(self.lock, "release", client=client, thread=thread))
        if not self._mine(actor):
            assert isinstance(got.error, RuntimeError), got
            return
        assert got.ok, got
        self.depth -= 1
        if not self.depth:
            self.owner = None

    @rule(data=st.data())
    def end_session(self, data: st.DataObject) -> None:
        client = self.client(data)
        self.store.end_session(client)
        if self.owner is not None and self.owner[0] is client:
            self.owner, self.depth = None, 0

    @precondition(lambda self: self.restarts < RESTARTS)
    @rule()
    def restart(self) -> None:
        self.restart_store()
        self.owner, self.depth = None, 0

    @invariant()
    def matches_the_model(self) -> None:
        assert self.store.call(self.lock, "locked") == (self.owner is not None)
        assert self.store.waiters(self.lock) == 0


class SemaphoreMachine(StoreMachine):
    """A (bounded) semaphore against ``threading``'s, with the permits each session holds."""

    @initialize(bounded=st.booleans(), value=st.integers(0, 3))
    def create(self, bounded: bool, value: int) -> None:
        self.typeid = "BoundedSemaphore" if bounded else "Semaphore"
        self.initial = value
        self.sem = self.store.open(self.typeid, "s", value=value)
        self.model: threading.Semaphore = getattr(threading, self.typeid)(value)
        #: Permits each client holds (a release by anyone takes its own first).
        self.held: dict[Client, int] = {}

    @rule(data=st.data(), blocking=st.booleans(), timeout=TIMEOUTS | st.none())
    def acquire(self, data: st.DataObject, blocking: bool, timeout: Any) -> None:
        client = self.client(data)
        free = self.model._value > 0
        if is_number(timeout) and timeout == -1:
            # The store's -1 is None (what older clients send; README "Errors").
            timeout = None
        if blocking and not free and timeout is None:
            timeout = SHORT_S  # would wait for ever
        got = outcome(
            lambda: self.store.call(self.sem, "acquire", blocking, timeout, client=client)
        )
        if blocking and not free and is_nan(timeout):
            want = Outcome(error=ValueError("NaN wait"))
        elif not blocking and timeout is not None:
            want = Outcome(error=ValueError("can't specify timeout for non-blocking acquire"))
        elif blocking and not is_number(timeout) and timeout is not None:
            want = Outcome(error=TypeError(f"timeout {timeout!r}"))  # checked even when free
        else:
            want = outcome(lambda: self.model.acquire(blocking, timeout))
        if got.ok and want.ok:
            assert bool(got.value) == want.value, (got, want)
            if want.value:
                self.held[client] = self.held.get(client, 0) + 1
            return
        same_outcome(got, want, f"acquire({blocking}, {timeout!r})")

    @rule(data=st.data(), n=st.integers(-1, 3))
    def release(self, data: st.DataObject, n: int) -> None:
        client = self.client(data)
        got = outcome(lambda: self.store.call(self.sem, "release", n, client=client))
        want = outcome(lambda: self.model.release(n))
        same_outcome(got, want, f"release({n})")
        if want.ok:  # the releaser's own permits first, then others' (in the order held)
            for holder in [client, *(c for c in self.held if c is not client)]:
                taken = min(self.held.get(holder, 0), n)
                n -= taken
                if taken == self.held.get(holder):
                    del self.held[holder]  # (a later acquire holds it anew, last in order)
                elif taken:
                    self.held[holder] -= taken

    @rule(data=st.data())
    def end_session(self, data: st.DataObject) -> None:
        client = self.client(data)
        self.store.end_session(client)
        n = self.held.pop(client, 0)
        if n:
            self.model.release(n)

    @precondition(lambda self: self.restarts < RESTARTS)
    @rule()
    def restart(self) -> None:
        self.restart_store()
        if self.store.kind == "etcd":
            # etcd keeps the permits (a gateway's restart is not the store's); the
            # sessions the restart ended gave theirs back.
            if self.held:
                self.model.release(sum(self.held.values()))
        else:  # not durable: back to the initial value
            self.model = getattr(threading, self.typeid)(self.initial)
        self.held.clear()

    @invariant()
    def matches_the_model(self) -> None:
        if hasattr(self, "sem"):
            assert self.store.call(self.sem, "get_value") == self.model._value
            assert self.store.waiters(self.sem) == 0


class BarrierMachine(StoreMachine):
    """A Barrier: parties arrive across steps, time out, abort, reset, leave or die.

    The model is ``threading.Barrier``'s rules with the waiting parties
    kept as pending calls: the last arrival releases the generation (indices
    in arrival order), a timeout or an abort breaks it for everyone, a reset
    fails the waiting and mends it; and README's: a waiting party whose
    session ends breaks it, an interrupted one leaves without breaking it,
    a restart answers the waiting with ServerShuttingDown and the barrier
    starts whole (it is not durable).
    """

    @initialize(parties=st.integers(1, 3))
    def create(self, parties: int) -> None:
        self.parties = parties
        self.bar = self.store.open("Barrier", "b", parties=parties)
        self.waiting: list[tuple[Client, Pending]] = []
        self.broken = False

    def _fail_waiting(self, error: type[BaseException]) -> None:
        for _, pending in self.waiting:
            if error is ServerShuttingDown:
                assert ended_by_restart(self.store, pending)
            else:
                assert isinstance(outcome(pending.result).error, error), error
        self.waiting.clear()

    @rule(data=st.data(), timeout=st.sampled_from([None, None, SHORT_S, 0, -1]))
    def wait(self, data: st.DataObject, timeout: Any) -> None:
        client = self.client(data)
        if self.broken:
            got = outcome(lambda: self.store.call(self.bar, "wait", timeout, client=client))
            assert isinstance(got.error, threading.BrokenBarrierError), got
            return
        if len(self.waiting) + 1 == self.parties:
            assert self.store.call(self.bar, "wait", timeout, client=client) == self.parties - 1
            for i, (_, pending) in enumerate(self.waiting):
                assert pending.result() == i  # in the order they came
            self.waiting.clear()
            return
        pending = self.store.start(self.bar, "wait", timeout, client=client)
        if timeout is None:
            assert not pending.done()
            self.waiting.append((client, pending))
            return
        assert isinstance(outcome(pending.result).error, threading.BrokenBarrierError)
        self.broken = True
        self._fail_waiting(threading.BrokenBarrierError)

    @rule()
    def abort(self) -> None:
        self.store.call(self.bar, "abort")
        self.broken = True
        self._fail_waiting(threading.BrokenBarrierError)

    @rule()
    def reset(self) -> None:
        self.store.call(self.bar, "reset")
        self.broken = False
        self._fail_waiting(threading.BrokenBarrierError)

    @precondition(lambda self: bool(self.waiting))
    @rule(data=st.data())
    def interrupted(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(0, len(self.waiting) - 1), label="party")
        _, pending = self.waiting.pop(index)
        self.store.abandon(pending)
        assert pending.cancelled()

    @rule(data=st.data())
    def end_session(self, data: st.DataObject) -> None:
        client = self.client(data)
        self.store.end_session(client)
        mine = [p for c, p in self.waiting if c is client]
        if not mine:
            return
        for pending in mine:
            assert pending.cancelled()
        self.waiting = [(c, p) for c, p in self.waiting if c is not client]
        self.broken = True
        self._fail_waiting(threading.BrokenBarrierError)

    @precondition(lambda self: self.restarts < RESTARTS)
    @rule()
    def restart(self) -> None:
        waited = bool(self.waiting)
        self.restart_store()
        self._fail_waiting(ServerShuttingDown)
        # Not durable in the embedded store; etcd keeps it, and a waiting party whose
        # session the restart ended broke it.
        self.broken = self.store.kind == "etcd" and (self.broken or waited)

    @invariant()
    def matches_the_model(self) -> None:
        if hasattr(self, "bar"):
            state = (self.parties, len(self.waiting), self.broken)
            assert self.store.call(self.bar, "state") == state
            assert self.store.waiters(self.bar) == len(self.waiting)


#: A Condition wait as the model holds it: who, the call, the lock depth to restore,
#: and what the wait answers once it holds the lock again (True: notified).
Waiting = tuple[Actor, Pending, int, bool]


class ConditionMachine(StoreMachine):
    """A Condition on its own RLock: waits that release the lock whole and take it
    back at their depth, notified in order, across steps and sessions.

    The model keeps the lock's owner (a session and a thread) and depth, the
    waits not yet notified, and the ones queued to take the lock back, in
    order: a release hands the lock to the first of them, whose wait then
    answers (True if notified, False if interrupted). Acquires do not block
    (a blocked acquire is the lock machines' business).
    """

    def __init__(self) -> None:
        super().__init__()
        self.cond = self.store.open("Condition", "c")
        self.lock = self.store.open("RLock", "c.lock")
        self.owner: Actor | None = None
        self.depth = 0
        self.waits: list[Waiting] = []  # waiting for a notify
        self.retaking: list[Waiting] = []  # waiting for the lock, to answer

    def actor(self, data: st.DataObject) -> Actor:
        return (self.client(data), data.draw(st.sampled_from([0, 1]), label="thread"))

    def _owns(self, actor: Actor) -> bool:
        return self.owner is not None and self.owner[0] is actor[0] and self.owner[1] == actor[1]

    def _hand_over(self) -> None:
        self.owner, self.depth = None, 0
        if self.retaking:
            actor, pending, depth, notified = self.retaking.pop(0)
            assert pending.result() is notified
            self.owner, self.depth = actor, depth

    @rule(data=st.data())
    def acquire(self, data: st.DataObject) -> None:
        client, thread = actor = self.actor(data)
        got = self.store.call(self.cond, "acquire", False, client=client, thread=thread)
        if self._owns(actor):
            self.depth += 1
        elif self.owner is None and not self.retaking:
            self.owner, self.depth = actor, 1
        else:
            assert got is False, got
            return
        assert got, got

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        client, thread = actor = self.actor(data)
        got = outcome(lambda: self.store.call(self.cond, "release", client=client, thread=thread))
        if not self._owns(actor):
            assert isinstance(got.error, RuntimeError), got
            return
        assert got.ok, got
        self.depth -= 1
        if not self.depth:
            self._hand_over()

    @rule(data=st.data())
    def wait(self, data: st.DataObject) -> None:
        client, thread = actor = self.actor(data)
        if not self._owns(actor):
            got = outcome(lambda: self.store.call(self.cond, "wait", client=client, thread=thread))
            assert isinstance(got.error, RuntimeError), got
            return
        pending = self.store.start(self.cond, "wait", client=client, thread=thread)
        assert not pending.done()
        self.waits.append((actor, pending, self.depth, True))
        self._hand_over()

    @rule(data=st.data(), n=st.sampled_from([1, 2, 5, 0, -1, 1.5]), all_=st.booleans())
    def notify(self, data: st.DataObject, n: Any, all_: bool) -> None:
        client, thread = actor = self.actor(data)
        method, args = ("notify_all", ()) if all_ else ("notify", (n,))
        got = outcome(
            lambda: self.store.call(self.cond, method, *args, client=client, thread=thread)
        )
        if not self._owns(actor):
            assert isinstance(got.error, RuntimeError), got
            return
        assert got.ok, got
        count = len(self.waits) if all_ else max(0, math.ceil(n))
        woken, self.waits = self.waits[:count], self.waits[count:]
        self.retaking += woken

    @precondition(lambda self: bool(self.waits))
    @rule(data=st.data())
    def interrupted(self, data: st.DataObject) -> None:
        """An interrupted wait stops waiting for a notify and queues for the lock."""
        index = data.draw(st.integers(0, len(self.waits) - 1), label="wait")
        actor, pending, depth, _ = self.waits.pop(index)
        self.store.abandon(pending)
        if self.owner is None and not self.retaking:
            assert pending.result() is False
            self.owner, self.depth = actor, depth
        else:
            self.retaking.append((actor, pending, depth, False))

    @rule(data=st.data())
    def end_session(self, data: st.DataObject) -> None:
        client = self.client(data)
        self.store.end_session(client)
        for waiting in (self.waits, self.retaking):
            for (c, _), pending, _, _ in waiting:
                if c is client:
                    assert pending.cancelled()
            waiting[:] = [w for w in waiting if w[0][0] is not client]
        if self.owner is not None and self.owner[0] is client:
            self._hand_over()

    @precondition(lambda self: self.restarts < RESTARTS)
    @rule()
    def restart(self) -> None:
        self.restart_store()
        for _, pending, _, _ in self.waits + self.retaking:
            assert ended_by_restart(self.store, pending)
        self.waits, self.retaking = [], []
        self.owner, self.depth = None, 0

    @invariant()
    def matches_the_model(self) -> None:
        assert self.store.call(self.cond, "locked") == (self.owner is not None)
        assert self.store.waiters(self.cond) == len(self.waits)
        assert self.store.waiters(self.lock) == len(self.retaking)
        for _, pending, _, _ in self.waits + self.retaking:
            assert not pending.done()


class PipeMachine(StoreMachine):
    """A duplex Pipe: two deques, readers blocked across steps, ends closed.

    What end 0 sends, end 1 receives: a blocked ``poll`` of the receiving
    end learns of it (True), the first blocked ``recv`` takes it, else it
    waits in the end's buffer. Closing an end answers its own blocked reads
    with OSError and the other end's with EOF (``recv``) or True (``poll``).
    A pipe is not durable: after a restart it is empty and open.
    """

    def __init__(self) -> None:
        super().__init__()
        self.pipe = self.store.open("Pipe", "p")
        self.inbox: tuple[list[Any], list[Any]] = ([], [])
        self.closed = [False, False]
        #: Blocked reads of each end, oldest first: (client, call, "recv" or "poll").
        self.readers: tuple[list[tuple[Client, Pending, str]], ...] = ([], [])
        self.seq = 0

    @rule(data=st.data(), end=st.sampled_from([0, 1]))
    def send(self, data: st.DataObject, end: int) -> None:
        client = self.client(data)
        self.seq += 1
        got = outcome(lambda: self.store.call(self.pipe, "send", end, self.seq, client=client))
        if self.closed[end]:
            assert isinstance(got.error, OSError), got
            return
        if self.closed[1 - end]:
            assert isinstance(got.error, BrokenPipeError), got
            return
        assert got.ok, got
        readers = self.readers[1 - end]
        while readers:
            _, pending, kind = readers.pop(0)
            if kind == "poll":
                assert pending.result() is True
                continue
            assert pending.result() == self.seq
            return
        self.inbox[1 - end].append(self.seq)

    @rule(data=st.data(), end=st.sampled_from([0, 1]))
    def recv(self, data: st.DataObject, end: int) -> None:
        client = self.client(data)
        got = outcome(lambda: self.store.call(self.pipe, "recv", end, SHORT_S, client=client))
        if self.closed[end]:
            assert isinstance(got.error, OSError), got
        elif self.inbox[end]:
            assert got.value == self.inbox[end].pop(0), got
        elif self.closed[1 - end]:
            assert isinstance(got.error, EOFError), got
        else:
            assert isinstance(got.error, TimeoutError), got

    @rule(data=st.data(), end=st.sampled_from([0, 1]), kind=st.sampled_from(["recv", "poll"]))
    def blocked_read(self, data: st.DataObject, end: int, kind: str) -> None:
        if self.closed[end] or self.closed[1 - end] or self.inbox[end]:
            return  # it would not block
        client = self.client(data)
        args = (end,) if kind == "recv" else (end, None)
        pending = self.store.start(self.pipe, kind, *args, client=client)
        assert not pending.done()
        self.readers[end].append((client, pending, kind))

    @rule(data=st.data(), end=st.sampled_from([0, 1]))
    def poll(self, data: st.DataObject, end: int) -> None:
        got = outcome(lambda: self.store.call(self.pipe, "poll", end, client=self.client(data)))
        if self.closed[end]:
            assert isinstance(got.error, OSError), got
        else:
            assert got.value == bool(self.inbox[end] or self.closed[1 - end]), got

    @rule(data=st.data(), end=st.sampled_from([0, 1]))
    def close(self, data: st.DataObject, end: int) -> None:
        self.store.call(self.pipe, "close", end, client=self.client(data))
        if self.closed[end]:
            return
        self.closed[end] = True
        for _, pending, kind in self.readers[1 - end]:
            if kind == "poll":
                assert pending.result() is True
            else:
                assert isinstance(outcome(pending.result).error, EOFError)
        for _, pending, _ in self.readers[end]:
            assert isinstance(outcome(pending.result).error, OSError)
        self.readers[0].clear()
        self.readers[1].clear()

    @rule(data=st.data())
    def end_session(self, data: st.DataObject) -> None:
        client = self.client(data)
        self.store.end_session(client)
        for readers in self.readers:
            for c, pending, _ in readers:
                if c is client:
                    assert pending.cancelled()
            readers[:] = [r for r in readers if r[0] is not client]

    @precondition(lambda self: self.restarts < RESTARTS)
    @rule()
    def restart(self) -> None:
        self.restart_store()
        for readers in self.readers:
            for _, pending, _ in readers:
                assert ended_by_restart(self.store, pending)
            readers.clear()
        if self.store.kind != "etcd":  # etcd keeps a pipe's messages and ends
            self.inbox = ([], [])
            self.closed = [False, False]

    @invariant()
    def matches_the_model(self) -> None:
        stats = self.store.stats(self.pipe)
        assert isinstance(stats, PipeStats)
        assert stats.buffered == (len(self.inbox[0]), len(self.inbox[1]))
        assert stats.closed == tuple(self.closed)
        assert self.store.waiters(self.pipe) == len(self.readers[0]) + len(self.readers[1])


KEYS = st.sampled_from(["a", "b", 0, 1, 1.0, True, -0.0, NAN, (1, NAN), None, "é" * 3])
VALUES = st.one_of(PAYLOADS, st.sampled_from([NAN, -0.0, (NAN, [1]), {"k": [2**70]}]))
INDICES = st.one_of(st.integers(-4, 4), st.builds(slice, st.integers(-3, 3), st.integers(-3, 3)))

#: The durable types and a strategy of ``(method, args)`` calls that change them.
CHANGES: dict[str, st.SearchStrategy[tuple[str, tuple[Any, ...]]]] = {
    "dict": st.one_of(
        st.tuples(st.just("__setitem__"), st.tuples(KEYS, VALUES)),
        st.tuples(st.sampled_from(["__delitem__", "pop"]), st.tuples(KEYS)),
        st.tuples(st.just("setdefault"), st.tuples(KEYS, VALUES)),
        st.tuples(st.just("update"), st.tuples(st.lists(st.tuples(KEYS, VALUES), max_size=3))),
        st.tuples(st.sampled_from(["popitem", "clear"]), st.just(())),
    ),
    "list": st.one_of(
        st.tuples(st.just("append"), st.tuples(VALUES)),
        st.tuples(st.just("extend"), st.tuples(st.lists(VALUES, max_size=3))),
        st.tuples(st.just("insert"), st.tuples(st.integers(-4, 4), VALUES)),
        st.tuples(st.just("pop"), st.tuples(st.integers(-4, 4))),
        st.tuples(st.just("remove"), st.tuples(VALUES)),
        st.tuples(st.just("__setitem__"), st.tuples(st.integers(-4, 4), VALUES)),
        st.tuples(
            st.just("__setitem__"),
            st.tuples(st.builds(slice, st.integers(-3, 3)), st.lists(VALUES, max_size=3)),
        ),
        st.tuples(st.just("__delitem__"), st.tuples(INDICES)),
        st.tuples(st.just("__imul__"), st.tuples(st.integers(-1, 2))),
        st.tuples(st.sampled_from(["reverse", "sort", "clear"]), st.just(())),
    ),
    "Namespace": st.one_of(
        st.tuples(st.just("__setattr__"), st.tuples(st.sampled_from(["x", "y"]), VALUES)),
        st.tuples(st.just("__delattr__"), st.tuples(st.sampled_from(["x", "y"]))),
    ),
    "Value": st.tuples(st.sampled_from(["set", "add"]), st.tuples(st.integers(-(2**40), 2**40))),
    "Array": st.one_of(
        st.tuples(st.just("__setitem__"), st.tuples(st.integers(-4, 4), st.floats())),
        st.tuples(
            st.just("__setitem__"),
            st.tuples(st.builds(slice, st.integers(-3, 3)), st.lists(st.floats(), max_size=3)),
        ),
    ),
    "Event": st.tuples(st.sampled_from(["set", "clear"]), st.just(())),
    "Queue": st.one_of(
        st.tuples(st.just("put"), st.tuples(VALUES, st.just(False))),
        st.tuples(st.just("put_many"), st.tuples(st.lists(VALUES, max_size=3), st.just(False))),
        st.tuples(st.just("get"), st.just((False,))),
        st.tuples(st.just("get_many"), st.tuples(st.integers(1, 3), st.just(False))),
        st.tuples(st.sampled_from(["task_done", "nacked", "acked"]), st.just(())),
    ),
}
DURABLE_ARGS: dict[str, dict[str, Any]] = {
    "Value": {"typecode": "q"},
    "Array": {"typecode": "d", "sequence": 3},
    "Queue": {"maxsize": 4},
}


class DurabilityMachine(StoreMachine):
    """Any change to a durable object, then a restart: it is as it was.

    Every durable type (dict, list, Namespace, Value, Array, Event, Queue
    with its unfinished count) gets calls drawn from ``CHANGES``, hostile
    keys and values included (NaN, -0.0, True beside 1); a failed call is
    fine, but after a restart every object's whole value must be the one it
    had before (compared by ``repr``: a NaN is then equal to itself).
    """

    def __init__(self) -> None:
        super().__init__()
        self.objs = [
            self.store.open(typeid, f"o-{typeid}", **DURABLE_ARGS.get(typeid, {}))
            for typeid in CHANGES
        ]

    @rule(data=st.data())
    def change(self, data: st.DataObject) -> None:
        obj = data.draw(st.sampled_from(self.objs), label="object")
        method, args = data.draw(CHANGES[obj.typeid], label="call")
        if method in ("nacked", "acked"):  # a reservation settled at once
            got = outcome(lambda: self.store.call(obj, "reserve", 0))
            if got.ok:
                self.store.call(obj, method[:-2], got.value[0])
            return
        outcome(lambda: self.store.call(obj, method, *args))

    @rule()
    def compact(self) -> None:
        """A compaction between changes: the snapshot and the journal after it agree."""
        self.store.compact()

    def state(self) -> list[str]:
        out = []
        for obj in self.objs:
            if obj.typeid == "Event":
                out.append(repr(self.store.call(obj, "is_set")))
                continue
            out.append(repr(self.store.snapshot(obj)))
            if obj.typeid == "Queue":
                out.append(repr(getattr(self.store.stats(obj), "unfinished", None)))
        return out

    @precondition(lambda self: self.restarts < RESTARTS)
    @rule()
    def restart(self) -> None:
        before = self.state()
        self.restart_store()
        after = self.state()
        for obj, was, now in zip(self.objs, before, after, strict=False):
            assert was == now, f"{obj.typeid} before a restart: {was}, after: {now}"
        assert before == after

    def teardown(self) -> None:
        try:
            self.restart()  # every example ends with one: all its changes are replayed
        finally:
            super().teardown()


MACHINES = [
    QueueMachine, LockMachine, RLockMachine, SemaphoreMachine, BarrierMachine,
    ConditionMachine, PipeMachine, DurabilityMachine,
]  # fmt: skip


@pytest.mark.parametrize("kind", STORE_KINDS)
@pytest.mark.parametrize("machine", MACHINES, ids=lambda m: m.__name__)
def test_store_against_the_model(kind: str, machine: type[StoreMachine]) -> None:
    machine.kind = kind
    # On etcd the default run makes the same programs every time (timing still varies);
    # with MANAGERD_CONTRACT_ETCD=1, new ones each run, as on the embedded store.
    fixed = kind == "etcd" and not ETCD_WHOLE
    run_state_machine_as_test(machine, settings=settings(SETTINGS, derandomize=fixed))
