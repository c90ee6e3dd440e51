"""Locks, re-entrant locks and semaphores, owned by sessions.

Every successful acquire returns a fencing token from the daemon's one
:class:`~managerd.store.memory.tokens.TokenSource`, given to each lock by the registry: a
client that holds token 7 knows that anyone holding the lock after it, on
this daemon or on one that replaced it, holds a larger one (tokens are
increasing, not consecutive; see ``tokens.py``). When a session ends, what
it held is released and goes to the next live waiter (whose waiter was not
cancelled, because the dead session's own waiters are cancelled before its
holdings are released).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, ClassVar

from managerd.histogram import Histogram
from managerd.store.api import BadArgument, BadState, Call, Conv, exposed
from managerd.store.memory.base import (
    TIMEOUT_MAX,
    SharedObject,
    Waiter,
    alive_count,
    fail_all,
    pop_alive,
    seconds,
    wait_or_now_s,
)
from managerd.store.memory.deadlock import check_deadlock, report_deadlock
from managerd.store.memory.tokens import TokenSource
from managerd.store.sessions import Session
from managerd.store.stats import LockStats, SemaphoreStats


def _acquire_wait_s(blocking: bool, timeout: object) -> float | None:
    """``threading.Lock.acquire``'s (blocking, timeout) as seconds to wait.

    Checked whole before anything happens, in the order and with the error
    types of ``_thread``'s lock (which checks even when the lock is free):
    a ``blocking`` that is not an int (a bool is one) or a non-number
    timeout (None included) is a TypeError, NaN a ValueError, beyond
    ``TIMEOUT_MAX`` either way an OverflowError; -1 waits for ever.
    """
    if not isinstance(blocking, int):
        raise BadArgument(f"'{type(blocking).__name__}' object cannot be interpreted as an integer")
    wait_s = seconds(timeout)
    if wait_s != wait_s:
        raise ValueError("Invalid value NaN (not a number)")
    if abs(wait_s) > TIMEOUT_MAX:
        raise OverflowError("timeout value is too large")
    if not blocking:
        if wait_s != -1:
            raise ValueError("can't specify a timeout for a non-blocking call")
        return 0.0
    if wait_s == -1:
        return None
    if wait_s < 0:
        raise ValueError("timeout value must be positive")
    return wait_s


def _semaphore_wait_s(blocking: bool, timeout: object) -> float | None:
    """``threading.Semaphore.acquire``'s (blocking, timeout) as seconds to wait.

    None waits for ever, and so does -1 (the managerd client sends -1 for
    None); any other negative does not wait, as ``threading.Semaphore``.
    """
    if not blocking:
        if timeout is not None and timeout != -1:
            raise ValueError("can't specify timeout for non-blocking acquire")
        return 0.0
    if timeout is None:
        return None
    wait_s = seconds(timeout)
    if wait_s == -1:
        return None
    return wait_or_now_s(wait_s)


def _not_acquired(waiter: Waiter) -> None:
    waiter.finish(False)


class Lock(SharedObject):
    """``threading.Lock``: one holder; any client may release it."""

    typeid = "Lock"
    owned_by_thread = False
    undo_methods: ClassVar[dict[str, str]] = {"acquire": "_undo_acquire"}

    def __init__(self, name: str, loop: asyncio.AbstractEventLoop, *, tokens: TokenSource) -> None:
        super().__init__(name, loop)
        self.tokens = tokens
        self.holder: Session | None = None
        self.holder_thread = 0
        self.count = 0  # recursion depth (RLock); 1 while a Lock is held
        self.token = 0
        self.acquired_at = 0.0
        self.waiters: deque[Waiter] = deque()
        self.acquires_total = 0
        self.wait_hist = Histogram()  # every acquisition's wait (0 when free)
        self.hold_hist = Histogram()

    def _grant(self, session: Session, thread: int, asked_at: float | None = None) -> int:
        now = self.loop.time()
        self.holder = session
        self.holder_thread = thread
        self.count = 1
        self.token = self.tokens.next()
        self.acquires_total += 1
        self.acquired_at = now
        self.wait_hist.observe(0.0 if asked_at is None else now - asked_at)
        session.hold(self)
        return self.token

    def _owns(self, call: Call) -> bool:
        return self.holder is call.session and self.holder_thread == call.thread

    @exposed(result=Conv.ACQUIRED, mutates=True)
    def acquire(self, call: Call, blocking: bool = True, timeout: float = -1) -> Any:
        """The fencing token (a positive int, see ``tokens.py``) when acquired, else False."""
        wait_s = _acquire_wait_s(blocking, timeout)
        if self.owned_by_thread and self._owns(call):
            self.count += 1
            return self.token
        if self.holder is None and alive_count(self.waiters) == 0:
            return self._grant(call.session, call.thread)
        if wait_s == 0.0:
            return False
        check_deadlock(call, self)
        return self.park(self.waiters, call, wait_s, _not_acquired, (call.thread, 1, None))

    def _undo_acquire(self, call: Call, args: tuple[Any, ...], token: Any) -> None:
        """An acquire granted but abandoned by its client: that holding is released.

        Only if the lock is still held by that session (and thread, for an
        RLock) under the token it was granted; an RLock goes one level down.
        """
        if self.holder is not call.session or self.token != token:
            return
        if self.owned_by_thread:
            if self.holder_thread != call.thread:
                return
            self.count -= 1
            if self.count:
                return
        self._hand_over()

    @exposed(mutates=True)
    def release(self, call: Call) -> None:
        if self.holder is None:
            raise BadState("release unlocked lock")
        if self.owned_by_thread:
            if not self._owns(call):
                raise BadState("cannot release un-acquired lock")
            self.count -= 1
            if self.count:
                return
        self._hand_over()

    def _hand_over(self) -> None:
        self.hold_hist.observe(self.loop.time() - self.acquired_at)
        self.holder = None
        self.count = 0
        waiter = pop_alive(self.waiters)
        if waiter is not None:
            thread, depth, result = waiter.data
            token = self._grant(waiter.session, thread, waiter.since)
            self.count = depth
            waiter.finish(token if result is None else result)

    @exposed()
    def locked(self, call: Call) -> bool:
        return self.holder is not None

    @exposed()
    def fencing_token(self, call: Call) -> int:
        """The token of the current holding (0 if never acquired)."""
        return self.token

    def release_session(self, session: Session) -> None:
        if self.holder is session:
            self._hand_over()

    # -- used by Condition -------------------------------------------------
    def release_fully(self, call: Call) -> int:
        """Release whatever depth ``call`` holds; the depth, to restore later."""
        if self.holder is None or (self.owned_by_thread and not self._owns(call)):
            raise BadState("cannot wait on un-acquired lock")
        depth = self.count
        self._hand_over()
        return depth

    def reacquire(
        self, session: Session, future: asyncio.Future[Any], thread: int, depth: int, result: Any
    ) -> None:
        """Take the lock back for a Condition waiter, then complete ``future``."""
        if self.holder is None and alive_count(self.waiters) == 0:
            self._grant(session, thread)
            self.count = depth
            if not future.done():
                future.set_result(result)
            return
        report_deadlock(session, thread, self)
        waiter = Waiter(session, future, (thread, depth, result))
        waiter.obj = self
        self.waiters.append(waiter)
        session.waiters.add(waiter)

    def waiter_count(self) -> int:
        return alive_count(self.waiters)

    def shutdown(self, exc: BaseException) -> None:
        fail_all(self.waiters, exc)

    def stats(self) -> LockStats:
        holder = self.holder
        return LockStats(
            self.name,
            self.typeid,
            self.creation_args(),
            holder=(
                {**holder.describe(), "thread": self.holder_thread} if holder is not None else None
            ),
            held_for_s=round(self.loop.time() - self.acquired_at, 3) if holder else None,
            token=self.token,
            waiters=self.waiter_count(),
            waiting=tuple(
                {**w.session.who(), "thread": w.data[0]} for w in list(self.waiters) if w.alive
            ),
            acquires_total=self.acquires_total,
            wait_seconds=_copy(self.wait_hist),
            hold_seconds=_copy(self.hold_hist),
        )


class RLock(Lock):
    """``threading.RLock``: owned by one client thread, re-entrant."""

    typeid = "RLock"
    owned_by_thread = True


class Semaphore(SharedObject):
    """``threading.Semaphore``; permits taken by a session return when it ends."""

    typeid = "Semaphore"
    create_params = ("value",)
    bounded = False
    undo_methods: ClassVar[dict[str, str]] = {"acquire": "_undo_acquire"}

    def __init__(
        self, name: str, loop: asyncio.AbstractEventLoop, value: int = 1, *, tokens: TokenSource
    ) -> None:
        super().__init__(name, loop)
        self.tokens = tokens
        if not isinstance(value, int) or isinstance(value, bool):
            raise BadArgument("semaphore value must be an int")
        if value < 0:
            raise ValueError("semaphore initial value must be >= 0")
        self.initial = value
        self.value = value
        self.token = 0
        self.waiters: deque[Waiter] = deque()
        self.held: dict[Session, int] = {}
        self.acquires_total = 0
        self.wait_hist = Histogram()

    def creation_args(self) -> dict[str, Any]:
        return {"value": self.initial}

    def _grant(self, session: Session, asked_at: float | None = None) -> int:
        self.wait_hist.observe(0.0 if asked_at is None else self.loop.time() - asked_at)
        self.value -= 1
        self.held[session] = self.held.get(session, 0) + 1
        session.hold(self)
        self.token = self.tokens.next()
        self.acquires_total += 1
        return self.token

    @exposed(result=Conv.ACQUIRED, mutates=True)
    def acquire(self, call: Call, blocking: bool = True, timeout: float | None = -1) -> Any:
        wait_s = _semaphore_wait_s(blocking, timeout)
        if self.value > 0 and alive_count(self.waiters) == 0:
            return self._grant(call.session)
        if wait_s == 0.0:
            return False
        check_deadlock(call, self)
        # The thread is for the wait-for graph (managerd/store/memory/deadlock.py).
        return self.park(self.waiters, call, wait_s, _not_acquired, call.thread)

    def _undo_acquire(self, call: Call, args: tuple[Any, ...], token: Any) -> None:
        """A permit granted but abandoned by its client comes back (if still held)."""
        if self.held.get(call.session, 0) > 0:
            self._forget_holdings(call.session, 1)
            self._give(1)

    @exposed(mutates=True)
    def release(self, call: Call, n: int = 1) -> None:
        if not isinstance(n, int):
            # threading.Semaphore adds a float; permits here are whole.
            raise BadArgument(f"n must be an int, not {type(n).__name__}")
        if n < 1:
            raise ValueError("n must be one or more")
        if self.bounded and self.value + n > self.initial:
            raise ValueError("Semaphore released too many times")
        self._forget_holdings(call.session, n)
        self._give(n)

    def _forget_holdings(self, releaser: Session, n: int) -> None:
        """Stop counting ``n`` permits as held: the releaser's own first.

        Any client may release a semaphore (as any thread may release a
        ``threading.Semaphore``). A permit released for another session is
        no longer that session's, or its end would give it back a second
        time (and push a BoundedSemaphore past its bound).
        """
        for session in [releaser, *(s for s in self.held if s is not releaser)]:
            if n == 0:
                return
            held = self.held.get(session, 0)
            if not held:
                continue
            taken = min(held, n)
            n -= taken
            if held > taken:
                self.held[session] = held - taken
            else:
                del self.held[session]

    def _give(self, n: int) -> None:
        self.value += n
        while self.value > 0:
            waiter = pop_alive(self.waiters)
            if waiter is None:
                return
            waiter.finish(self._grant(waiter.session, waiter.since))

    @exposed()
    def get_value(self, call: Call) -> int:
        return self.value

    def release_session(self, session: Session) -> None:
        n = self.held.pop(session, 0)
        if n:
            self._give(n)

    def waiter_count(self) -> int:
        return alive_count(self.waiters)

    def shutdown(self, exc: BaseException) -> None:
        fail_all(self.waiters, exc)

    def stats(self) -> SemaphoreStats:
        held = list(self.held.items())  # a copy: the metrics scrape reads off the loop
        return SemaphoreStats(
            self.name,
            self.typeid,
            self.creation_args(),
            value=self.value,
            held=sum(n for _, n in held),
            holders=tuple({**s.describe(), "permits": n} for s, n in held),
            token=self.token,
            waiters=self.waiter_count(),
            waiting=tuple(w.session.who() for w in list(self.waiters) if w.alive),
            wait_seconds=_copy(self.wait_hist),
        )


def _copy(hist: Histogram) -> Histogram:
    copy = Histogram()
    copy.merge(hist)
    return copy


class BoundedSemaphore(Semaphore):
    """A Semaphore whose value may never exceed its initial value."""

    typeid = "BoundedSemaphore"
    bounded = True
