"""Model-based tests of Lock, RLock, Semaphore and BoundedSemaphore against threading's.

Each actor (a thread of one of two client sessions) calls the daemon and
then the model from the same thread, so ``threading.RLock``'s owner is the
same actor as the daemon's. A killed child process's holding is modelled by
a *ghost* actor that takes the model's lock, and gives it back when the
daemon has noticed the death. A daemon crash ends every holding (locks are
not durable): the model starts again from a fresh object. On etcd a
gateway's crash ends nothing (the clients resume their sessions,
``RESTART_RESETS``): the model goes on.

Where managerd deliberately differs from ``threading``:

- a Semaphore's timeout of the wrong type is a ``TypeError`` even when a
  permit is free;
- ``Semaphore.release(n)`` takes a whole number: a float ``n`` is a
  ``TypeError`` (threading adds it to the counter);
- a stock client's explicit ``Semaphore.acquire(timeout=-1)`` waits for
  ever (older managerd clients send -1 for "no timeout"); the managerd
  proxy sends threading's meaning (do not wait).
"""

from __future__ import annotations

import multiprocessing
import threading
from typing import Any

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, precondition, rule

from conftest import Daemon
from stateful_support import (
    RESTART_RESETS,
    SHORT_S,
    Actor,
    StatefulMachine,
    expect_nan_refused,
    ints_hostile,
    nan_wait,
    outcome,
    run_machine,
    same_outcome,
    sdaemon,
    settles,
    timeouts,
    wrong_types,
)

__all__ = ["sdaemon"]

#: A daemon restart that hangs fails in conftest (30 s, with the daemon's log)
#: rather than in pytest-timeout (which shows no log).
pytestmark = pytest.mark.timeout(300)


class LockMachine(StatefulMachine):
    primitive = "Lock"
    typeid = "Lock"

    def __init__(self) -> None:
        super().__init__()
        self.initial = 1
        self.ghost = Actor(-1, 0)
        self.ghost_holds = 0
        self.proxies: list[Any] = []
        self.model: Any = None
        self.max_token = 0
        self.restart_token = 0  # the highest token before the last restart
        self.forked = False  # one fork per example
        self.interrupted = False  # one interrupted acquire per example (a spawn costs ~1 s)

    def teardown(self) -> None:
        self.ghost.close()
        super().teardown()

    # -- the model ----------------------------------------------------------------------
    def new_model(self) -> Any:
        return getattr(threading, self.typeid)()

    def would_block(self, actor: Actor) -> bool:
        """Whether the model's acquire from ``actor`` has to wait."""
        if self.typeid == "RLock":
            return bool(self.model._is_owned()) is False and self.model_locked()
        return self.model_locked()

    def model_locked(self) -> bool:
        if self.typeid == "RLock":
            return "unlocked" not in repr(self.model)
        return bool(self.model.locked())

    @initialize()
    def create(self) -> None:
        self.model = self.new_model()
        self._make_proxies()

    def _make_proxies(self) -> None:
        self.proxies = [getattr(m, self.typeid)(self.name()) for m in self.managers]

    def p(self, actor: Actor) -> Any:
        return self.proxies[actor.client]

    # -- rules ------------------------------------------------------------------------------
    @rule(data=st.data(), blocking=st.booleans(), timeout=timeouts(True))
    def acquire(self, data: st.DataObject, blocking: bool, timeout: Any) -> None:
        actor = data.draw(st.sampled_from(self.actors))
        if timeout is None:
            timeout = -1  # threading.Lock's "no timeout"
        blocks = actor.run(lambda: self._blocks(actor))
        if blocking and blocks and (timeout == -1) and not isinstance(timeout, bool):
            timeout = SHORT_S  # would wait for ever
        got = actor.run(lambda: outcome(lambda: self.p(actor).acquire(blocking, timeout)))
        # threading's locks check the timeout first (NaN a ValueError, inf
        # and huge ones an OverflowError, waiting or not): the model says it.
        want = actor.run(lambda: outcome(lambda: self.model.acquire(blocking, timeout)))
        same_outcome(got, want, f"{actor} acquire(blocking={blocking}, timeout={timeout!r})")
        if got.ok and got.value:
            self._check_token(actor.run(lambda: self.p(actor).fencing_token))

    def _blocks(self, actor: Actor) -> bool:
        return self.would_block(actor)

    def _check_token(self, token: int | None) -> None:
        assert token is not None
        if self.typeid == "RLock" and token == self.max_token:
            return  # re-entered: the same holding
        assert token > self.max_token, f"fencing token {token} after {self.max_token}"
        assert token > self.restart_token, "fencing tokens went back after a restart"
        self.max_token = token

    @precondition(lambda self: self.proxies and not self.forked)
    @rule()
    def forked_child_acquires(self) -> None:
        """A child forked (multiprocessing "fork") while actor threads and the
        heartbeat run: its acquire(False) is another client's (it holds nothing
        of the parent's), it gets a new fencing token, and its release leaves
        the state as it was."""
        self.forked = True
        ctx = multiprocessing.get_context("fork")
        reader, writer = ctx.Pipe(duplex=False)
        proxy = self.proxies[0]

        def child() -> None:
            got = proxy.acquire(False)
            token = proxy.fencing_token if got else None
            if got:
                proxy.release()
            writer.send((got, token))

        proc = ctx.Process(target=child)
        proc.start()
        writer.close()
        try:
            assert reader.poll(30), "the forked child said nothing"
            got, token = reader.recv()
            proc.join(10)
            assert proc.exitcode == 0, f"the forked child exited {proc.exitcode}"
        finally:
            if proc.is_alive():
                proc.kill()
            proc.join(5)
            reader.close()
        assert got == (not self.model_locked()), f"forked child's acquire {got}, model {self.model}"
        if got:
            assert token is not None and token > self.max_token, f"child's token {token}"
            self.max_token = token

    @precondition(
        lambda self: (
            self.proxies
            and self.typeid in ("Lock", "Semaphore", "BoundedSemaphore")
            and not self.interrupted
        )
    )
    @rule(data=st.data())
    def interrupted_acquire(self, data: st.DataObject) -> None:
        """Another process blocked in acquire() gets SIGINT: KeyboardInterrupt there,
        it lives on, its wait is gone; a release then frees the lock for whoever asks
        next (the interrupted process's next acquire gets it), never for the
        abandoned call."""
        if not self.ghost.run(lambda: self.would_block(self.ghost)):
            return  # free: an acquire would not block (the acquire rule covers it)
        if self.typeid == "BoundedSemaphore" and self.model._initial_value == 0:
            return  # no release can free a permit (bound 0)
        self.interrupted = True
        with self.interrupted_child(self.typeid) as conn:
            actor = data.draw(st.sampled_from(self.actors))
            got = actor.run(lambda: outcome(lambda: self.p(actor).release()))
            same_outcome(got, actor.run(lambda: outcome(self.model.release)), "release")
            conn.send("go")
            assert conn.poll(30), "the child's next acquire did not return"
            assert conn.recv() == ("again", True), "the interrupted child's next acquire failed"

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        actor = data.draw(st.sampled_from(self.actors))
        got = actor.run(lambda: outcome(lambda: self.p(actor).release()))
        want = actor.run(lambda: outcome(self.model.release))
        same_outcome(got, want, f"{actor} release")

    @rule(data=st.data())
    def locked(self, data: st.DataObject) -> None:
        actor = data.draw(st.sampled_from(self.actors))
        if self.typeid in ("Lock", "RLock") and hasattr(self.p(actor), "locked"):
            got = actor.run(lambda: self.p(actor).locked())
            assert got == self.model_locked(), f"locked() {got}, model {self.model_locked()}"

    # -- failures ----------------------------------------------------------------------------
    @precondition(lambda self: self.model is not None and len(self.children) < 3)
    @rule()
    def kill_holder(self) -> None:
        """A child process acquires (if it can at once) and is SIGKILLed: its holding goes."""
        child = self.spawn_holder("acquire", self.typeid, self.name(), str(self.initial))
        said = child.held.split()  # type: ignore[attr-defined]
        can = self.ghost.run(lambda: not self.would_block(self.ghost))
        assert (said[0] == "HELD") == can, f"child said {said}, model could acquire: {can}"
        if can:
            assert self.ghost.run(lambda: self.model.acquire(False))
            self._check_token(int(said[1]))
        self.kill_child(child)
        # Gone from the daemon's sessions, its holding is gone (on etcd: its lease was
        # revoked), so a restart rule next finds it free.
        self.wait_children_gone()
        if can:
            self.ghost.run(self.model.release)

    @precondition(lambda self: self.model is not None and self.may_restart())
    @rule()
    def restart(self) -> None:
        """A crash: locks are not durable; every holding ends, the object starts afresh
        (on etcd, a gateway's: every holding, token and permit stays)."""
        self.restart_daemon()
        if not RESTART_RESETS:
            return
        self.model = self.new_model()
        self.restart_token = self.max_token
        self.max_token = 0
        self._make_proxies()

    # -- invariants ----------------------------------------------------------------------------
    @invariant()
    @settles
    def daemon_agrees(self) -> None:
        if self.model is None:
            return
        info = self.status_of(self.name())
        assert info["waiters"] == 0, f"a waiter outlived its call: {info}"
        self.check_status(info)

    def check_status(self, info: dict[str, Any]) -> None:
        assert info["held"] == self.model_locked(), f"held {info}, model {self.model}"
        holder = info["holder"]
        if holder is not None:
            dead = {c.pid for c in self.children}
            assert holder["pid"] not in dead, "a lock is held by a killed process"


class RLockMachine(LockMachine):
    primitive = "RLock"
    typeid = "RLock"


class SemaphoreMachine(LockMachine):
    primitive = "Semaphore"
    typeid = "Semaphore"

    def new_model(self) -> Any:
        return getattr(threading, self.typeid)(self.initial)

    def would_block(self, actor: Actor) -> bool:
        return self.model_locked()

    def model_locked(self) -> bool:
        return int(self.model._value) == 0

    @initialize(initial=st.integers(0, 3))
    def create(self, initial: int) -> None:
        self.initial = initial
        self.model = self.new_model()
        self._make_proxies()

    def _make_proxies(self) -> None:
        self.proxies = [getattr(m, self.typeid)(self.name(), self.initial) for m in self.managers]

    @rule(data=st.data(), blocking=st.booleans(), timeout=timeouts(True))
    def acquire(self, data: st.DataObject, blocking: bool, timeout: Any) -> None:
        actor = data.draw(st.sampled_from(self.actors))
        if blocking and timeout is None and self.model_locked():
            timeout = SHORT_S  # would wait for ever
        got = actor.run(lambda: outcome(lambda: self.p(actor).acquire(blocking, timeout)))
        if blocking and timeout is not None and not isinstance(timeout, (int, float)):
            # Deliberate difference: the timeout's type is checked even when a
            # permit is free (threading.Semaphore only uses it to wait).
            assert not got.ok and isinstance(got.exc, TypeError), got
            return
        if blocking and nan_wait(timeout, self.model_locked()):
            expect_nan_refused(got, f"{actor} acquire")  # threading.Semaphore would spin
            return
        want = actor.run(lambda: outcome(lambda: self.model.acquire(blocking, timeout)))
        same_outcome(got, want, f"{actor} acquire(blocking={blocking}, timeout={timeout!r})")
        if got.ok and got.value:
            self._check_token(actor.run(lambda: self.p(actor).fencing_token))

    @rule(data=st.data(), n=st.one_of(ints_hostile, wrong_types))
    def release_n(self, data: st.DataObject, n: Any) -> None:
        actor = data.draw(st.sampled_from(self.actors))
        got = actor.run(lambda: outcome(lambda: self.p(actor).release(n)))
        if isinstance(n, float):
            # Deliberate difference: permits are whole (threading adds a float).
            assert not got.ok and isinstance(got.exc, TypeError), f"release({n!r}): {got}"
            return
        want = actor.run(lambda: outcome(lambda: self._model_release(n)))
        same_outcome(got, want, f"{actor} release({n!r})")

    def _model_release(self, n: Any) -> None:
        if isinstance(n, int) and n > 64:
            # threading notifies n times in a loop: do its arithmetic instead.
            if self.typeid == "BoundedSemaphore" and self.model._value + n > self.initial:
                raise ValueError("Semaphore released too many times")
            self.model._value += n
            return
        self.model.release(n)

    @rule(data=st.data())
    def get_value(self, data: st.DataObject) -> None:
        actor = data.draw(st.sampled_from(self.actors))
        got = actor.run(lambda: self.p(actor).get_value())
        assert got == self.model._value, f"get_value() {got}, model {self.model._value}"

    def check_status(self, info: dict[str, Any]) -> None:
        assert info["value"] == self.model._value, f"value {info}, model {self.model._value}"
        dead = {c.pid for c in self.children}
        for holder in info["holders"]:
            assert holder["pid"] not in dead, "permits held by a killed process"


class BoundedSemaphoreMachine(SemaphoreMachine):
    primitive = "BoundedSemaphore"
    typeid = "BoundedSemaphore"


def test_lock_model(sdaemon: Daemon) -> None:
    run_machine(LockMachine, sdaemon)


def test_rlock_model(sdaemon: Daemon) -> None:
    run_machine(RLockMachine, sdaemon)


def test_semaphore_model(sdaemon: Daemon) -> None:
    run_machine(SemaphoreMachine, sdaemon)


def test_bounded_semaphore_model(sdaemon: Daemon) -> None:
    run_machine(BoundedSemaphoreMachine, sdaemon)
