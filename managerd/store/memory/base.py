"""What every named object shares: exposed methods, waiters, sessions.

Objects are plain single-threaded data structures owned by the event loop
(DESIGN.md, principle 2). An exposed method returns its result at once, or
an ``asyncio.Future`` when it must wait: the waiter is registered with the
object *and* with the caller's session, so a session that ends cancels it
before it can take an item or a lock. A method never blocks the loop.

A Task per call would cost more than most calls, so the daemon awaits only
the futures that methods return (see ``service/invoker.py``).

Payloads (queue items, dict and list values, namespace attributes) are the
client's pickled bytes and stay opaque here. Each exposed method declares
which arguments and results are payloads so that the stock-client adapter
can convert plain values at the edge (``wire/stock_dialect.py``).
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Final, cast

from managerd.store.api import BadArgument, Call, Conv, MethodSpec, methods_of
from managerd.store.memory.records import Effect, RecordKind
from managerd.store.sessions import Session
from managerd.store.stats import ObjectStats
from managerd_client.errors import ArgumentConflict

if TYPE_CHECKING:
    from managerd.store.memory.journal import Journal


class Waiter:
    """A blocked call, parked on an object until it can complete."""

    __slots__ = ("alive", "data", "future", "obj", "on_cancel", "session", "since", "timer")

    def __init__(self, session: Session, future: asyncio.Future[Any], data: Any = None) -> None:
        self.session = session
        self.future = future
        self.data = data
        self.since = future.get_loop().time()  # for wait-time histograms
        self.alive = True
        self.timer: asyncio.TimerHandle | None = None
        self.on_cancel: Callable[[Waiter], None] | None = None
        #: The object it waits on (for status and the wait-for graph).
        self.obj: SharedObject | None = None

    def detach(self) -> None:
        """Leave the object's queue without completing (the future moves on)."""
        self._close()

    def _close(self) -> None:
        self.alive = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.session.waiters.discard(self)

    def finish(self, result: Any) -> None:
        self._close()
        if not self.future.done():
            self.future.set_result(result)

    def fail(self, exc: BaseException) -> None:
        self._close()
        if not self.future.done():
            self.future.set_exception(exc)

    def cancel(self) -> None:
        """The session went away: drop the wait without completing it."""
        if not self.alive:
            return
        self._close()
        self.future.cancel()
        if self.on_cancel is not None:
            self.on_cancel(self)


def waiter_of(session: Session, future: asyncio.Future[Any]) -> Waiter | None:
    """The parked waiter of ``session`` that completes ``future`` (for a cancel: rare)."""
    for waiter in session.waiters:
        if waiter.future is future and waiter.alive:
            return cast("Waiter", waiter)  # a session parks only Waiters
    return None


def pop_alive(waiters: deque[Waiter]) -> Waiter | None:
    """The first waiter still alive, dropping dead ones on the way.

    A waiter whose session is found dead here (its process was just killed)
    is cancelled rather than handed anything.
    """
    while waiters:
        waiter = waiters.popleft()
        if not waiter.alive:
            continue
        if waiter.session.usable():
            return waiter
        waiter.cancel()
    return None


def alive_count(waiters: deque[Waiter]) -> int:
    return sum(1 for w in waiters if w.alive)


#: A change record's kind, as the file holds it (``_j`` runs on every journaled change).
_OP: Final = int(RecordKind.OP)

#: The longest wait a timeout may ask for: ``threading``'s (longer is an OverflowError).
TIMEOUT_MAX: Final = threading.TIMEOUT_MAX


def seconds(value: object, what: str = "timeout") -> float:
    """``value`` as a float of seconds, or the stdlib's error for a non-number.

    A str, a list or None (where None means nothing) is a TypeError; an int
    too large for a float an OverflowError, as the stdlib's arithmetic on it.
    A bool is an int (1 or 0 seconds), as for ``threading``. NaN and the
    infinities pass: whether they are an error depends on whether the call
    waits (:func:`checked_wait`).
    """
    if isinstance(value, float):
        return value
    if isinstance(value, int):
        return float(value)  # OverflowError beyond ~1.8e308
    raise BadArgument(f"{what} must be a number, not {type(value).__name__}")


def checked_wait(wait_s: float | None) -> float | None:
    """The seconds a call may really wait for (None: no end), or the error.

    NaN is a ValueError (threading's locks refuse it; the stdlib calls that
    accept it spin forever); more than ``TIMEOUT_MAX`` (an infinity
    included) is an OverflowError, as ``threading`` raises before it would
    block. What this returns is finite and in ``[0, TIMEOUT_MAX]``, which
    ``loop.call_later`` takes on both asyncio's loop and uvloop (uvloop
    raises on NaN; asyncio would put a NaN in its timer heap). ``park``
    applies it before anything is registered.
    """
    if wait_s is None:
        return None
    if wait_s != wait_s:
        raise ValueError("Invalid value NaN (not a number)")
    if wait_s > TIMEOUT_MAX:
        raise OverflowError(f"timeout value is too large (more than {TIMEOUT_MAX:.0f} s)")
    if wait_s < 0:  # a policy below maps negatives first; this is a guard
        raise ValueError("timeout value must be a non-negative number")
    return wait_s


def timeout_s(block: bool, timeout: object) -> float | None:
    """``queue.Queue``'s (block, timeout) as seconds to wait (0: don't).

    As ``queue.Queue``: a non-blocking call ignores the timeout; a negative
    one is a ValueError and a non-number a TypeError, at once; NaN and
    beyond ``TIMEOUT_MAX`` are refused only if the call has to wait.
    """
    if not block:
        return 0.0
    if timeout is None:
        return None
    wait_s = seconds(timeout)
    if wait_s < 0:
        raise ValueError("'timeout' must be a non-negative number")
    return wait_s


def wait_or_now_s(timeout: object) -> float | None:
    """``threading``'s timeout of Event/Condition/Barrier/Semaphore waits and
    ``Connection.poll``: None waits for ever, a negative one does not wait."""
    if timeout is None:
        return None
    wait_s = seconds(timeout)
    return 0.0 if wait_s < 0 else wait_s


def positive_s(value: object, what: str) -> float:
    """A duration that must be > 0 (visibility timeouts, ``extend``), checked whole."""
    duration = seconds(value, what)
    if not duration > 0:  # NaN too
        raise ValueError(f"{what} must be a positive number")
    if duration > TIMEOUT_MAX:
        raise OverflowError(f"{what} is too large (more than {TIMEOUT_MAX:.0f} s)")
    return duration


def sequence_index(index: Any) -> int | slice:
    """A list or array index as the builtin sequences take it (a bool is 0 or 1)."""
    if not isinstance(index, (int, slice)):
        raise BadArgument(f"list indices must be integers or slices, not {type(index).__name__}")
    return int(index) if isinstance(index, bool) else index


class SharedObject:
    """Base of every named object the daemon serves."""

    typeid: ClassVar[str]
    #: Creation parameters in the order a stock client passes them.
    create_params: ClassVar[tuple[str, ...]] = ()
    methods: ClassVar[dict[str, MethodSpec]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.methods = methods_of(cls)

    #: Creation parameters that only set initial state (``Value``'s value):
    #: a later get-or-create may pass another without a conflict.
    state_params: ClassVar[tuple[str, ...]] = ()

    #: Whether the object's state is journaled (its existence always is).
    durable: ClassVar[bool] = False

    #: The methods are a builtin container's own operations (dict, list...):
    #: a TypeError they raise (an unhashable key, a str index) is the
    #: caller's, as the builtin raises it, not a daemon bug (service/invoker.py).
    builtin_type_errors: ClassVar[bool] = False

    #: Methods whose result hands the caller something (an item, a lock, a
    #: permit), by name, and the method that gives it back: called as
    #: ``undo(call, args, result)`` when the client cancels a call it had
    #: already been answered (see ``Dispatcher.cancel``). Each object keeps
    #: its undo methods next to the methods they undo.
    undo_methods: ClassVar[dict[str, str]] = {}

    def __init__(self, name: str, loop: asyncio.AbstractEventLoop) -> None:
        self.name = name
        self.loop = loop
        #: Set by the registry on durable objects when a data directory is used.
        self.journal: Journal | None = None
        #: The creation arguments it was made with (journaled, snapshotted).
        self.created_with: dict[str, Any] = {}

    # -- creation ---------------------------------------------------------
    def creation_args(self) -> dict[str, Any]:
        """The arguments this object was created with (for conflicts and listing)."""
        return {}

    def check_conflicts(self, args: dict[str, Any]) -> None:
        """Refuse a get-or-create whose explicit arguments differ from ours."""
        current = self.creation_args()
        for key, value in args.items():
            if key in self.state_params or key not in current:
                continue
            if current[key] != value:
                raise ArgumentConflict(
                    f"{self.typeid} {self.name!r} exists with {key}={current[key]!r}; "
                    f"cannot attach with {key}={value!r}"
                )

    # -- sessions ---------------------------------------------------------
    def release_session(self, session: Session) -> None:
        """Give back everything ``session`` holds here (it has ended)."""

    def park(
        self,
        waiters: deque[Waiter],
        call: Call,
        wait_s: float | None,
        on_timeout: Callable[[Waiter], None],
        data: Any = None,
    ) -> asyncio.Future[Any]:
        """Register a waiter for ``call``; ``on_timeout`` runs after ``wait_s``.

        Everything that can raise (the wait's check, the timer) comes before
        the waiter is registered anywhere: a call that fails here leaves no
        waiter behind to take the next item or lock.
        """
        wait_s = checked_wait(wait_s)
        future: asyncio.Future[Any] = call.loop.create_future()
        waiter = Waiter(call.session, future, data)
        waiter.obj = self
        if wait_s is not None:
            waiter.timer = call.loop.call_later(wait_s, on_timeout, waiter)
        waiters.append(waiter)
        call.session.waiters.add(waiter)
        return future

    def abandon(self, waiter: Waiter, method: str, stock: bool = False) -> None:
        """The client gave up the parked call ``method`` (it was interrupted).

        The wait is dropped as a session's end drops it, except where an
        object says otherwise (a Barrier party that leaves does not break the
        barrier; a Condition wait takes its lock back unless ``stock``: a
        stock client cannot ask for it, see ``Condition.restore``).
        """
        waiter.cancel()

    def waiter_count(self) -> int:
        return 0

    def shutdown(self, exc: BaseException) -> None:
        """The object is being deleted or the daemon stops: fail every waiter."""

    def stats(self) -> ObjectStats:
        """What status and the metrics show (``store/stats.py``); may run off the loop."""
        return ObjectStats(self.name, self.typeid, self.creation_args())

    def would_hand_out(
        self, method: str, call: Call, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> bytes | None:
        """The stored payload the call ``method`` would hand out, read without making it."""
        return None

    # -- durability (journal records; see store/memory/journal.py) --------------------
    def _j(self, effect: Effect, *arguments: Any) -> None:
        """Journal one change of this object's state (no-op when memory only).

        ``effect`` is a member of the type's effect enum (``records.py``);
        the file holds its value.
        """
        journal = self.journal
        if journal is not None:
            journal.append((_OP, self.name, int(effect), *arguments))

    def apply(self, effect: tuple[Any, ...]) -> None:
        """Redo one journaled change (recovery; no sessions, no waiters).

        ``effect[0]`` is the value of a member of the type's effect enum.
        """
        raise TypeError(f"a {self.typeid} journals no changes")

    def dump_state(self) -> Any:
        """The state a snapshot keeps (builtin data and payload bytes)."""
        return None

    def load_state(self, state: Any) -> None:
        """Take the state a snapshot kept."""

    def recovered(self) -> None:
        """Recovery is over: settle what cannot outlive a restart."""

    #: How :meth:`snapshot`'s value converts for a stock client.
    snapshot_conv: ClassVar[Conv] = Conv.PLAIN

    def snapshot(self) -> Any:
        """The whole value, for a stock client's ``_getvalue()``."""
        raise BadArgument(f"a {self.typeid} has no value to copy")


def fail_all(waiters: deque[Waiter], exc: BaseException) -> None:
    while waiters:
        waiter = waiters.popleft()
        if waiter.alive:
            waiter.fail(exc)
