"""Events, conditions and barriers.

A Condition works on a named Lock or RLock (its own ``"<name>.lock"`` RLock
unless given one). ``wait`` releases the lock completely, parks, and —
when notified or timed out — queues to take the lock back at the depth it
had, answering only once it holds it again, as ``threading.Condition`` does.
A Barrier whose waiter's session ends breaks, so the others are not stuck.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import Any, ClassVar

from managerd.store.api import BadArgument, BadState, Call, Conv, NoAttribute, exposed
from managerd.store.memory.base import (
    TIMEOUT_MAX,
    SharedObject,
    Waiter,
    alive_count,
    checked_wait,
    fail_all,
    pop_alive,
    seconds,
    wait_or_now_s,
)
from managerd.store.memory.locks import Lock
from managerd.store.memory.records import EventOp
from managerd.store.stats import BarrierStats, ConditionStats, EventStats


class Event(SharedObject):
    """``threading.Event``."""

    typeid = "Event"
    durable = True

    def __init__(self, name: str, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(name, loop)
        self.flag = False
        self.waiters: deque[Waiter] = deque()

    @exposed()
    def is_set(self, call: Call) -> bool:
        return self.flag

    @exposed(mutates=True)
    def set(self, call: Call) -> None:
        if not self.flag:
            self._j(EventOp.FLAG, True)
        self.flag = True
        while (waiter := pop_alive(self.waiters)) is not None:
            waiter.finish(True)

    @exposed(mutates=True)
    def clear(self, call: Call) -> None:
        if self.flag:
            self._j(EventOp.FLAG, False)
        self.flag = False

    @exposed()
    def wait(self, call: Call, timeout: float | None = None) -> Any:
        wait_s = wait_or_now_s(timeout)
        if self.flag:
            return True
        if wait_s == 0.0:
            return False
        return self.park(self.waiters, call, wait_s, _false)

    def waiter_count(self) -> int:
        return alive_count(self.waiters)

    def shutdown(self, exc: BaseException) -> None:
        fail_all(self.waiters, exc)

    def apply(self, effect: tuple[Any, ...]) -> None:
        if effect[0] != EventOp.FLAG:
            raise ValueError(f"unknown event record {effect[0]!r}")
        self.flag = bool(effect[1])

    def dump_state(self) -> Any:
        return self.flag

    def load_state(self, state: Any) -> None:
        self.flag = bool(state)

    def stats(self) -> EventStats:
        return EventStats(
            self.name, self.typeid, self.creation_args(), set=self.flag, waiters=self.waiter_count()
        )


def _false(waiter: Waiter) -> None:
    waiter.finish(False)


class Condition(SharedObject):
    """``threading.Condition`` over a named Lock or RLock."""

    typeid = "Condition"
    create_params = ("lock",)
    undo_methods: ClassVar[dict[str, str]] = {
        "acquire": "_undo_acquire",
        "restore": "_undo_restore",
    }

    def __init__(self, name: str, loop: asyncio.AbstractEventLoop, lock: Lock) -> None:
        super().__init__(name, loop)
        self.lock = lock
        self.waiters: deque[Waiter] = deque()

    def creation_args(self) -> dict[str, Any]:
        return {"lock": self.lock.name}

    @exposed(result=Conv.ACQUIRED, mutates=True)
    def acquire(self, call: Call, blocking: bool = True, timeout: float = -1) -> Any:
        return self.lock.acquire(call, blocking, timeout)

    @exposed(mutates=True)
    def release(self, call: Call) -> None:
        self.lock.release(call)

    @exposed()
    def locked(self, call: Call) -> bool:
        """Whether the condition's lock is held (the client proxy is a lock too)."""
        return self.lock.locked(call)

    @exposed()
    def wait(self, call: Call, timeout: float | None = None) -> Any:
        """Release the lock, wait for a notify (True) or the timeout (False)."""
        # Checked whole before the lock is let go: a wait that cannot start
        # must leave the caller holding it.
        wait_s = checked_wait(wait_or_now_s(timeout))
        depth = self.lock.release_fully(call)
        future = self.park(self.waiters, call, wait_s, self._timed_out, (call.thread, depth))
        return future

    def abandon(self, waiter: Waiter, method: str, stock: bool = False) -> None:
        """An interrupted ``wait`` takes the lock back, as ``threading.Condition``'s finally.

        Still waiting for a notify, it stops and queues for the lock as a
        timeout would; already queued for the lock, it stays. The client
        then calls ``restore`` to wait for the lock (see there). A stock
        client cannot: its wait is dropped without the lock.
        """
        if method == "wait" and not stock:
            if waiter in self.waiters:
                self._wake(waiter, False)
            return
        waiter.cancel()

    @exposed(mutates=True)
    def restore(self, call: Call) -> Any:
        """After this thread's ``wait`` was interrupted: its lock back, as a token.

        The token once this thread holds the lock again (at once if the
        wait had taken it back already), False if it does not and will not
        (the wait was never parked, or its session changed). An interrupted
        ``restore`` is cancelled as an acquire: parked, it stops queueing;
        answered, the lock is released (see ``_undo_restore``).
        """
        lock = self.lock
        if lock.holder is call.session and lock.holder_thread == call.thread:
            return lock.token
        for waiter in lock.waiters:
            if waiter.alive and waiter.session is call.session and waiter.data[0] == call.thread:
                # The interrupted wait's reacquisition: this call answers it now.
                old = waiter.future
                waiter.future = call.loop.create_future()
                thread, depth, _ = waiter.data
                waiter.data = (thread, depth, None)  # answered with the token
                old.cancel()
                return waiter.future
        return False

    def _undo_restore(self, call: Call, args: tuple[Any, ...], token: Any) -> None:
        """A restore answered but abandoned (a second interrupt): release fully."""
        lock = self.lock
        if (
            lock.holder is call.session
            and lock.holder_thread == call.thread
            and lock.token == token
        ):
            lock._hand_over()

    def _undo_acquire(self, call: Call, args: tuple[Any, ...], token: Any) -> None:
        self.lock._undo_acquire(call, args, token)

    def _wake(self, waiter: Waiter, result: bool) -> None:
        thread, depth = waiter.data
        waiter.detach()
        self.lock.reacquire(waiter.session, waiter.future, thread, depth, result)

    def _timed_out(self, waiter: Waiter) -> None:
        self._wake(waiter, False)

    @exposed()
    def notify(self, call: Call, n: int = 1) -> None:
        """Wake at most ``n`` waiters, as ``threading.Condition.notify`` counts them.

        Its loop is ``while waiters and n > 0``: with nobody waiting any ``n``
        is fine; otherwise a float counts down by one (1.5 wakes two) and a
        non-number is the caller's TypeError.
        """
        self._check_owned(call)
        while any(w.alive for w in self.waiters):
            try:
                more = n > 0
            except TypeError as exc:
                raise BadArgument(str(exc)) from None
            if not more:
                return
            waiter = pop_alive(self.waiters)
            if waiter is None:
                return
            self._wake(waiter, True)
            n -= 1

    @exposed()
    def notify_all(self, call: Call) -> None:
        self._check_owned(call)
        while (waiter := pop_alive(self.waiters)) is not None:
            self._wake(waiter, True)

    def _check_owned(self, call: Call) -> None:
        lock = self.lock
        if lock.holder is None or (lock.owned_by_thread and not lock._owns(call)):
            raise BadState("cannot notify on un-acquired lock")

    def waiter_count(self) -> int:
        return alive_count(self.waiters)

    def shutdown(self, exc: BaseException) -> None:
        fail_all(self.waiters, exc)

    def stats(self) -> ConditionStats:
        return ConditionStats(
            self.name, self.typeid, self.creation_args(), waiters=self.waiter_count()
        )


class Barrier(SharedObject):
    """``threading.Barrier``; the end of a waiting session breaks it."""

    typeid = "Barrier"
    create_params = ("parties", "timeout")

    def __init__(
        self,
        name: str,
        loop: asyncio.AbstractEventLoop,
        parties: int = 1,
        timeout: float | None = None,
    ) -> None:
        super().__init__(name, loop)
        if isinstance(parties, bool) or not isinstance(parties, int) or parties < 1:
            raise ValueError("parties must be an int > 0")
        if timeout is not None:
            # Refused here rather than by every wait() that would use it.
            default_s = seconds(timeout)
            if not default_s >= 0:  # NaN too
                raise ValueError("timeout must be a non-negative number or None")
            if default_s > TIMEOUT_MAX:
                raise OverflowError(f"timeout is too large (more than {TIMEOUT_MAX:.0f} s)")
        self.parties = parties
        self.timeout = timeout
        self.waiters: deque[Waiter] = deque()
        self.broken = False
        self.generations = 0

    def creation_args(self) -> dict[str, Any]:
        return {"parties": self.parties, "timeout": self.timeout}

    @exposed()
    def wait(self, call: Call, timeout: float | None = None) -> Any:
        wait_s = wait_or_now_s(self.timeout if timeout is None else timeout)
        if self.broken:
            raise threading.BrokenBarrierError()
        index = alive_count(self.waiters)
        if index + 1 == self.parties:
            # The last party: release the generation.
            waiters, self.waiters = self.waiters, deque()
            self.generations += 1
            for i, waiter in enumerate(w for w in waiters if w.alive):
                waiter.finish(i)
            return self.parties - 1
        # A negative timeout is 0, as threading.Barrier (it breaks at once).
        future = self.park(self.waiters, call, wait_s, self._timed_out)
        # The waiter is the last one appended.
        self.waiters[-1].on_cancel = self._party_left
        return future

    def _timed_out(self, waiter: Waiter) -> None:
        waiter.fail(threading.BrokenBarrierError())
        self._break()

    def abandon(self, waiter: Waiter, method: str, stock: bool = False) -> None:
        """An interrupted party leaves the count; the barrier does not break.

        The others keep waiting for ``parties`` arrivals (the interrupted
        client may come back with another ``wait``). A party whose session
        ends still breaks it: nobody will come back for it.
        """
        waiter.on_cancel = None
        waiter.cancel()

    def _party_left(self, waiter: Waiter) -> None:
        self._break()

    def _break(self) -> None:
        self.broken = True
        fail_all(self.waiters, threading.BrokenBarrierError())

    @exposed(mutates=True)
    def abort(self, call: Call) -> None:
        self._break()

    @exposed(mutates=True)
    def reset(self, call: Call) -> None:
        fail_all(self.waiters, threading.BrokenBarrierError())
        self.broken = False

    @exposed("__getattribute__")
    def attribute(self, call: Call, name: str) -> Any:
        if name == "parties":
            return self.parties
        if name == "n_waiting":
            return alive_count(self.waiters)
        if name == "broken":
            return self.broken
        raise NoAttribute(f"'Barrier' has no attribute {name!r}")

    @exposed()
    def state(self, call: Call) -> tuple[int, int, bool]:
        """``(parties, n_waiting, broken)`` in one call."""
        return self.parties, alive_count(self.waiters), self.broken

    def waiter_count(self) -> int:
        return alive_count(self.waiters)

    def shutdown(self, exc: BaseException) -> None:
        fail_all(self.waiters, exc)

    def stats(self) -> BarrierStats:
        return BarrierStats(
            self.name,
            self.typeid,
            self.creation_args(),
            waiters=self.waiter_count(),
            broken=self.broken,
        )
