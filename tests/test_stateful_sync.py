"""Model-based tests of Event, Barrier, Condition and Pipe (driven through managerd's own client).

Models: ``threading.Event``; for a Pipe, two deques (what each end has yet
to receive). Two client sessions and two threads each make the calls;
waits are short (0-0.05 s) so that each step is deterministic, and one rule
parks a real waiter that another session's ``set`` must wake.

Where managerd deliberately differs from threading.Event: a NaN wait that
would block is a ValueError (threading's returns False at once), and the
timeout's type is checked even when the flag is set (threading does not
look at it then), as for Semaphore (README "Errors").
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
from typing import Any

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, precondition, rule

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
    run_machine,
    same,
    same_outcome,
    sdaemon,
    settles,
    timeouts,
)

__all__ = ["sdaemon"]

pytestmark = pytest.mark.timeout(300)


class EventMachine(StatefulMachine):
    primitive = "Event"

    def __init__(self) -> None:
        super().__init__()
        self.model = threading.Event()
        self.proxies: list[Any] = []

    @initialize()
    def create(self) -> None:
        self.proxies = [m.Event(self.name()) for m in self.managers]

    def p(self, actor: Actor) -> Any:
        return self.proxies[actor.client]

    @rule(data=st.data())
    def set(self, data: st.DataObject) -> None:
        a = data.draw(st.sampled_from(self.actors))
        same_outcome(a.run(lambda: outcome(self.p(a).set)), outcome(self.model.set), f"{a} set")

    @rule(data=st.data())
    def clear(self, data: st.DataObject) -> None:
        a = data.draw(st.sampled_from(self.actors))
        same_outcome(
            a.run(lambda: outcome(self.p(a).clear)), outcome(self.model.clear), f"{a} clear"
        )

    @rule(data=st.data())
    def is_set(self, data: st.DataObject) -> None:
        a = data.draw(st.sampled_from(self.actors))
        same_outcome(
            a.run(lambda: outcome(self.p(a).is_set)), outcome(self.model.is_set), f"{a} is_set"
        )

    @rule(data=st.data(), timeout=timeouts(allow_none=True))
    def wait(self, data: st.DataObject, timeout: Any) -> None:
        a = data.draw(st.sampled_from(self.actors))
        if timeout is None and not self.model.is_set():
            timeout = SHORT_S  # (None would wait for ever)
        got = a.run(lambda: outcome(lambda: self.p(a).wait(timeout)))
        if nan_wait(timeout, not self.model.is_set()):
            expect_nan_refused(got, f"{a} wait")
            return
        if timeout is not None and (
            isinstance(timeout, (str, bytes, list)) and self.model.is_set()
        ):
            # Deliberate difference: the type is checked even when set.
            same_outcome(got, Outcome(exc=TypeError()), f"{a} wait({timeout!r}) when set")
            return
        want = outcome(lambda: self.model.wait(timeout))
        same_outcome(got, want, f"{a} wait({timeout!r})")

    @precondition(lambda self: self.proxies)
    @rule(data=st.data())
    def set_wakes_a_parked_waiter(self, data: st.DataObject) -> None:
        """A waiter parked in one session is woken by another session's set."""
        waiter, setter = data.draw(st.sampled_from([(0, 2), (2, 0), (1, 3), (3, 1)]))
        w, s = self.actors[waiter], self.actors[setter]
        self.proxies[0].clear()
        self.model.clear()
        pool = concurrent.futures.ThreadPoolExecutor(1)
        try:
            fut = pool.submit(lambda: w.run(lambda: self.p(w).wait(20)))
            assert wait_until(lambda: self.status_of(self.name()).get("waiters", 0) >= 1, 10)
            s.run(self.p(s).set)
            self.model.set()
            assert fut.result(10) is True, "the parked waiter was not woken by set"
        finally:
            pool.shutdown(wait=True)

    @precondition(lambda self: self.proxies and self.may_restart())
    @rule()
    def restart(self) -> None:
        self.restart_daemon()

    @invariant()
    @settles
    def agrees(self) -> None:
        if not self.proxies:
            return
        assert self.proxies[1].is_set() == self.model.is_set(), "is_set differs from the model"
        assert self.status_of(self.name()).get("waiters", 0) == 0, "a waiter left parked"


class PipeMachine(StatefulMachine):
    """A duplex pipe: what one end sends, the other receives, in order."""

    primitive = "Pipe"

    def __init__(self) -> None:
        super().__init__()
        #: inbox[i]: what end i has yet to receive.
        self.inbox: list[collections.deque[Any]] = [collections.deque(), collections.deque()]
        self.ends: list[tuple[Any, Any]] = []

    @initialize()
    def create(self) -> None:
        self.ends = [m.Pipe(self.name()) for m in self.managers]

    def end(self, actor: Actor, i: int) -> Any:
        return self.ends[actor.client][i]

    @rule(data=st.data(), i=st.integers(0, 1), value=payloads)
    def send(self, data: st.DataObject, i: int, value: Any) -> None:
        a = data.draw(st.sampled_from(self.actors))
        got = a.run(lambda: outcome(lambda: self.end(a, i).send(value)))
        assert got.ok, f"{a} end{i}.send: {got}"
        self.inbox[1 - i].append(value)

    @rule(data=st.data(), i=st.integers(0, 1))
    def recv(self, data: st.DataObject, i: int) -> None:
        if not self.inbox[i]:
            return  # recv would wait for ever
        a = data.draw(st.sampled_from(self.actors))
        got = a.run(lambda: outcome(lambda: self.end(a, i).recv()))
        want = self.inbox[i].popleft()
        assert got.ok and same(got.value, want), f"{a} end{i}.recv: {got}, model {want!r}"

    @rule(data=st.data(), i=st.integers(0, 1), timeout=st.sampled_from([0, 0.0, 0.01, -1]))
    def poll(self, data: st.DataObject, i: int, timeout: Any) -> None:
        a = data.draw(st.sampled_from(self.actors))
        got = a.run(lambda: outcome(lambda: self.end(a, i).poll(timeout)))
        same_outcome(got, Outcome(bool(self.inbox[i])), f"{a} end{i}.poll({timeout!r})")

    @precondition(lambda self: self.ends and self.may_restart())
    @rule()
    def restart(self) -> None:
        """A crash: what a pipe held is not durable (README "Durable state"; on etcd a
        gateway's crash, and the pipe's messages stay in etcd)."""
        self.restart_daemon()
        if not RESTART_RESETS:
            return
        for inbox in self.inbox:
            inbox.clear()

    @invariant()
    def agrees(self) -> None:
        if not self.ends:
            return
        for i in (0, 1):
            assert self.ends[0][i].poll(0) == bool(self.inbox[i]), f"end{i}.poll differs"


class BarrierMachine(StatefulMachine):
    """threading.Barrier: rounds of ``parties`` waiters, timeouts break it, abort/reset."""

    primitive = "Barrier"

    def __init__(self) -> None:
        super().__init__()
        self.model = threading.Barrier(1)
        self.proxies: list[Any] = []

    @initialize(parties=st.integers(1, 3))
    def create(self, parties: int) -> None:
        self.model = threading.Barrier(parties)
        first = self.managers[0].Barrier(self.name(), parties)
        self.proxies = [first, self.managers[1].Barrier(self.name())]

    def p(self, actor: Actor) -> Any:
        return self.proxies[actor.client]

    @rule(data=st.data(), timeout=st.sampled_from([0, 0.0, 0.01, SHORT_S, -1]))
    def lone_wait(self, data: st.DataObject, timeout: Any) -> None:
        """One waiter alone: passes if parties == 1, else times out and breaks it."""
        a = data.draw(st.sampled_from(self.actors))
        got = a.run(lambda: outcome(lambda: self.p(a).wait(timeout)))
        want = outcome(lambda: self.model.wait(timeout))
        same_outcome(got, want, f"{a} wait({timeout!r}) of {self.model.parties}")

    @rule()
    def full_round(self) -> None:
        """``parties`` actors wait at once: each gets a distinct index (or all are broken)."""
        n = self.model.parties
        actors = self.actors[:n]
        with concurrent.futures.ThreadPoolExecutor(2 * n) as pool:

            def wait_of(a: Actor) -> Outcome:
                got: Outcome = a.run(lambda: outcome(lambda: self.p(a).wait(10)))
                return got

            mine = [pool.submit(wait_of, a) for a in actors]
            models = [pool.submit(lambda: outcome(lambda: self.model.wait(10))) for _ in actors]
            got = [f.result(30) for f in mine]
            want = [f.result(30) for f in models]
        for g, w in zip(got, want, strict=True):
            same_outcome(g, w, f"full round of {n}", compare=False)
        if all(w.ok for w in want):
            assert sorted(g.value for g in got) == list(range(n)), f"indices {got}"

    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        a = data.draw(st.sampled_from(self.actors))
        a.run(self.p(a).abort)
        self.model.abort()

    @rule(data=st.data())
    def reset(self, data: st.DataObject) -> None:
        a = data.draw(st.sampled_from(self.actors))
        a.run(self.p(a).reset)
        self.model.reset()

    @precondition(lambda self: self.proxies and self.may_restart())
    @rule()
    def restart(self) -> None:
        """A crash: a Barrier keeps its parties, not its state (README "Durable state"; on
        etcd a gateway's crash, and a broken barrier stays broken)."""
        self.restart_daemon()
        if not RESTART_RESETS:
            return
        self.model = threading.Barrier(self.model.parties)

    @invariant()
    def agrees(self) -> None:
        if not self.proxies:
            return
        p = self.proxies[1]
        assert p.broken == self.model.broken, f"broken {p.broken}, model {self.model.broken}"
        assert p.n_waiting == self.model.n_waiting == 0, "a waiter left at the barrier"
        assert p.parties == self.model.parties


class ConditionMachine(StatefulMachine):
    """threading.Condition: one step at a time (waits time out, notify with no
    waiter; the lock is owned per actor thread, the model's RLock too), and
    ``notify_parked``: real waiters parked in order, woken by another session."""

    primitive = "Condition"

    def __init__(self) -> None:
        super().__init__()
        self.model = threading.Condition()
        self.proxies: list[Any] = []
        self.parked_rounds = 0

    @initialize()
    def create(self) -> None:
        self.proxies = [m.Condition(self.name()) for m in self.managers]

    def p(self, actor: Actor) -> Any:
        return self.proxies[actor.client]

    def both(self, a: Actor, what: str, mine: Any, model: Any) -> None:
        got = a.run(lambda: outcome(mine))
        want = a.run(lambda: outcome(model))
        same_outcome(got, want, f"{a} {what}")

    @rule(data=st.data())
    def acquire(self, data: st.DataObject) -> None:
        a = data.draw(st.sampled_from(self.actors))
        self.both(a, "acquire(False)", lambda: self.p(a).acquire(False),
                  lambda: self.model.acquire(False))  # fmt: skip

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        a = data.draw(st.sampled_from(self.actors))
        self.both(a, "release", lambda: self.p(a).release(), self.model.release)

    @rule(data=st.data(), timeout=st.sampled_from([0, 0.0, 0.01, SHORT_S, 0.05, -1]))
    def wait(self, data: st.DataObject, timeout: Any) -> None:
        a = data.draw(st.sampled_from(self.actors))
        self.both(a, f"wait({timeout!r})", lambda: self.p(a).wait(timeout),
                  lambda: self.model.wait(timeout))  # fmt: skip

    @rule(data=st.data(), n=st.integers(0, 3), all_=st.booleans())
    def notify(self, data: st.DataObject, n: int, all_: bool) -> None:
        a = data.draw(st.sampled_from(self.actors))
        if all_:
            self.both(a, "notify_all", lambda: self.p(a).notify_all(), self.model.notify_all)
        else:
            self.both(a, f"notify({n})", lambda: self.p(a).notify(n), lambda: self.model.notify(n))

    @rule(data=st.data(), k=st.integers(1, 3), n=st.integers(0, 3), all_=st.booleans())
    def notify_parked(self, data: st.DataObject, k: int, n: int, all_: bool) -> None:
        """``k`` actors park in wait() (on a condition of this rule's own), one by one;
        another notifies: the first min(n, k) parked (all for notify_all) wake with
        True, in FIFO order as threading.Condition's, the rest stay parked until a
        notify_all."""
        order = data.draw(st.permutations(self.actors))
        waiters, notifier = order[:k], order[k]
        name = self.name(f".parked{self.parked_rounds}")
        self.parked_rounds += 1
        cond = {a.client: self.managers[a.client].Condition(name) for a in self.actors}

        def park(a: Actor) -> bool:
            c = cond[a.client]
            c.acquire()
            try:
                return bool(c.wait(20))
            finally:
                c.release()

        futures: list[concurrent.futures.Future[bool]] = []
        for i, a in enumerate(waiters):
            futures.append(a._pool.submit(park, a))
            assert wait_until(lambda i=i: self.status_of(name).get("waiters", 0) == i + 1), (
                f"waiter {i} did not park"
            )

        def wake(how: str) -> None:
            c = cond[notifier.client]
            c.acquire()
            try:
                c.notify_all() if how == "all" else c.notify(n)
            finally:
                c.release()

        notifier.run(lambda: wake("all" if all_ else "n"))
        woken = k if all_ else min(n, k)
        for i, f in enumerate(futures[:woken]):
            assert f.result(20) is True, f"parked waiter {i} of {k} not woken by notify"
        assert wait_until(lambda: self.status_of(name).get("waiters", 0) == k - woken), (
            f"after notify({n}) of {k}: {self.status_of(name)}"
        )
        assert not any(f.done() for f in futures[woken:]), "notify woke more than asked (or LIFO)"
        notifier.run(lambda: wake("all"))
        assert all(f.result(20) is True for f in futures[woken:])
        assert self.status_of(name).get("waiters", 0) == 0

    @invariant()
    @settles
    def agrees(self) -> None:
        if not self.proxies:
            return
        info = self.status_of(self.name())
        assert info.get("waiters", 0) == 0, f"a waiter left parked: {info}"


def test_event_model(sdaemon: Daemon) -> None:
    run_machine(EventMachine, sdaemon)


def test_pipe_model(sdaemon: Daemon) -> None:
    run_machine(PipeMachine, sdaemon)


def test_barrier_model(sdaemon: Daemon) -> None:
    run_machine(BarrierMachine, sdaemon)


def test_condition_model(sdaemon: Daemon) -> None:
    run_machine(ConditionMachine, sdaemon)
