"""Deadlocks named as they form: the wait-for graph of locks and semaphores.

Every blocked acquire is a parked waiter (DESIGN.md, principle 2), so the
daemon knows at any moment who waits for what and who holds it. An *actor*
is one client thread: ``(session, thread)``. An actor waiting on a Lock,
RLock, Semaphore or BoundedSemaphore (a Condition's acquire and its
re-acquire after ``wait`` are waits on its lock; a re-acquire is reported,
never refused, having no acquire to fail) waits for the holders of that
object. When an actor is about to park, :meth:`Detector.parking`
follows the edges from the holders it would wait for; if they lead back to
the actor, that wait closes a cycle and nobody in it can ever proceed:

- ``report`` (the default): one log line names every session, thread and
  lock in the cycle, ``managerd_deadlocks_total`` counts it, and the cycle
  stays on the status page and in ``managerd status`` for as long as it
  stands (a timeout, an interrupt or a session's end breaks it);
- ``raise``: the acquire that would close the cycle fails at once with
  ``DeadlockDetected`` naming the cycle; the others keep waiting;
- ``off``: nothing is checked.

A semaphore's permits belong to a session, not a thread (any thread may
release them), so a permit counts as held by each waiting thread of its
session; and a semaphore waiter is stuck only if *every* holder is. Nothing
is walked unless a call is about to wait, so uncontended acquires cost
nothing; a walk visits each actor at most once (so it may miss a cycle
that reaches one actor by two ways through a semaphore, and never reports
one that is not there).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final

from managerd_client.errors import DeadlockDetected

if TYPE_CHECKING:
    from managerd.store.api import Call
    from managerd.store.memory.base import SharedObject
    from managerd.store.sessions import Session

log = logging.getLogger("managerd")

LOCK_TYPES: Final = frozenset({"Lock", "RLock"})
SEMAPHORE_TYPES: Final = frozenset({"Semaphore", "BoundedSemaphore"})
#: A cycle longer than this is not looked for (a walk stays cheap).
MAX_CYCLE: Final = 64

#: ``(session, thread)``; ``thread`` None means "any thread of the session".
Actor = tuple["Session", int | None]


class DeadlockMode(enum.Enum):
    REPORT = "report"
    RAISE = "raise"
    OFF = "off"


def _holders(obj: SharedObject) -> list[Actor]:
    if obj.typeid in LOCK_TYPES:
        holder = getattr(obj, "holder", None)
        return [] if holder is None else [(holder, getattr(obj, "holder_thread", 0))]
    if obj.typeid in SEMAPHORE_TYPES:
        return [(session, None) for session in list(getattr(obj, "held", {}))]
    return []


def _waits(actor: Actor) -> Iterator[SharedObject]:
    """The locks and semaphores ``actor`` waits on now."""
    session, thread = actor
    for waiter in list(session.waiters):
        obj = waiter.obj
        if not waiter.alive or obj is None:
            continue
        if obj.typeid in LOCK_TYPES:
            waiting_thread = waiter.data[0]
        elif obj.typeid in SEMAPHORE_TYPES:
            waiting_thread = waiter.data
        else:
            continue
        if thread is None or waiting_thread == thread:
            yield obj


def _same(holder: Actor, actor: Actor) -> bool:
    return holder[0] is actor[0] and (holder[1] is None or holder[1] == actor[1])


def _who(actor: Actor) -> dict[str, Any]:
    session, thread = actor
    return {**session.who(), "thread": thread}


def _text(actor: Actor) -> str:
    session, thread = actor
    where = session.peer
    host, pid = session.info.get("host"), session.info.get("pid")
    if host is not None:
        where = f"{host}:{pid}"
    if thread is not None:
        where += f":{thread}"
    return f"{where} (session {session.id})"


class Cycle:
    """Actors each waiting on an object held by the next; the last's is held by the first."""

    def __init__(self, steps: list[tuple[Actor, SharedObject]]) -> None:
        self.steps = steps

    def text(self) -> str:
        parts = []
        for i, (actor, obj) in enumerate(self.steps):
            nxt = self.steps[(i + 1) % len(self.steps)][0]
            parts.append(f"{_text(actor)} waits for {obj.typeid} {obj.name!r} held by {_text(nxt)}")
        return "; ".join(parts)

    def standing(self) -> bool:
        """Whether every wait and every holding in it is still there."""
        for i, (actor, obj) in enumerate(self.steps):
            nxt = self.steps[(i + 1) % len(self.steps)][0]
            if not actor[0].active or not any(o is obj for o in _waits(actor)):
                return False
            if not any(_same(h, nxt) or _same(nxt, h) for h in _holders(obj)):
                return False
        return True

    def describe(self) -> dict[str, Any]:
        return {
            "text": self.text(),
            "steps": [
                {**_who(actor), "waits_for": obj.name, "type": obj.typeid}
                for actor, obj in self.steps
            ],
        }


class Detector:
    """The daemon's wait-for graph walker, and the cycles it found that still stand."""

    def __init__(self, mode: DeadlockMode = DeadlockMode.REPORT) -> None:
        self.mode = mode
        self.found_total = 0
        self._cycles: list[Cycle] = []

    def parking(
        self, session: Session, thread: int, obj: SharedObject, *, refuse: bool = True
    ) -> None:
        """A thread is about to wait on ``obj``: report (or refuse) a wait that closes a cycle.

        ``refuse=False``: report even with ``deadlock=raise`` (a Condition's
        re-acquire after ``wait``, which has no acquire to fail).
        """
        if self.mode is DeadlockMode.OFF:
            return
        start: Actor = (session, thread)
        path = self._path_back(start, obj, start, set())
        if path is None:
            return
        cycle = Cycle([(start, obj), *path])
        self.found_total += 1
        text = cycle.text()
        if self.mode is DeadlockMode.RAISE and refuse:
            log.warning("deadlock refused (deadlock=raise): %s", text)
            raise DeadlockDetected(f"this acquire would close a deadlock: {text}")
        log.warning("deadlock: %s", text)
        self._cycles.append(cycle)

    def _path_back(
        self, start: Actor, obj: SharedObject, actor: Actor, seen: set[tuple[int, int | None]]
    ) -> list[tuple[Actor, SharedObject]] | None:
        """Steps from ``obj``'s holders back to ``start``, if every way out leads there.

        A lock has one holder; a semaphore waiter is stuck only if every
        holder of the semaphore is.
        """
        holders = _holders(obj)
        if not holders or len(seen) > MAX_CYCLE:
            return None
        path: list[tuple[Actor, SharedObject]] | None = None
        for holder in holders:
            if _same(holder, start):
                found: list[tuple[Actor, SharedObject]] | None = []
            else:
                found = self._from(start, holder, seen)
            if found is None:
                return None  # this holder may still release: not stuck
            if path is None:
                path = found
        return path

    def _from(
        self, start: Actor, actor: Actor, seen: set[tuple[int, int | None]]
    ) -> list[tuple[Actor, SharedObject]] | None:
        key = (id(actor[0]), actor[1])
        if key in seen:
            # Visited: a cycle not through ``start`` (reported when it formed),
            # or a second way to an actor already walked. Not counting it may
            # miss a cycle through a semaphore; it never reports a false one.
            return None
        seen.add(key)
        for obj in _waits(actor):
            rest = self._path_back(start, obj, actor, seen)
            if rest is not None:
                return [(actor, obj), *rest]
        return None

    def standing(self) -> list[dict[str, Any]]:
        """The cycles found that still stand (the others are forgotten)."""
        self._cycles = [c for c in self._cycles if c.standing()]
        return [c.describe() for c in self._cycles]


def check_deadlock(call: Call, obj: SharedObject) -> None:
    """The hook a lock or semaphore calls just before parking ``call``."""
    detector = call.session.deadlocks
    if detector is not None:
        detector.parking(call.session, call.thread, obj)


def report_deadlock(session: Session, thread: int, obj: SharedObject) -> None:
    """The hook a Condition's re-acquire calls before it waits for the lock (never refuses)."""
    detector = session.deadlocks
    if detector is not None:
        detector.parking(session, thread, obj, refuse=False)
