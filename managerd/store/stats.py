"""What a store tells of its objects: frozen snapshots, one class per kind of object.

:meth:`Store.stats` (``store/interface.py``) answers these; the metrics
collector, the ``status`` operation and the web page read them and nothing
else of an object. Each has :meth:`~ObjectStats.describe`, the object's
entry in the status document (builtin data: it travels to ``managerd
status`` and is served as ``/status.json``).

A session as a holder or a waiter is given as it describes itself
(``Session.describe()`` / ``Session.who()``: id, peer, host, pid...), a
plain mapping, so that the document is the same whichever store made it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from managerd.histogram import Histogram

#: A session as a holder or a waiter shows it (see the module docstring).
Who = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class ObjectStats:
    """Any named object: its name, type and creation arguments."""

    name: str
    typeid: str
    args: Mapping[str, Any]

    def describe(self) -> dict[str, Any]:
        """The object's entry in the status document."""
        return {"type": self.typeid, "args": dict(self.args)}


@dataclass(frozen=True, slots=True)
class QueueStats(ObjectStats):
    depth: int
    reserved: int
    waiters: int
    puts_total: int
    gets_total: int
    unfinished: int

    def describe(self) -> dict[str, Any]:
        return {
            **ObjectStats.describe(self),
            "depth": self.depth,
            "reserved": self.reserved,
            "waiters": self.waiters,
            "puts_total": self.puts_total,
            "gets_total": self.gets_total,
            "unfinished": self.unfinished,
        }


@dataclass(frozen=True, slots=True)
class LockStats(ObjectStats):
    """A Lock or RLock. ``holder`` is the holding session with its ``thread``."""

    holder: Who | None
    held_for_s: float | None
    token: int
    waiters: int
    waiting: tuple[Who, ...]
    acquires_total: int
    wait_seconds: Histogram
    hold_seconds: Histogram

    def describe(self) -> dict[str, Any]:
        return {
            **ObjectStats.describe(self),
            "held": self.holder is not None,
            "holder": dict(self.holder) if self.holder is not None else None,
            "held_for_s": self.held_for_s,
            "token": self.token,
            "waiters": self.waiters,
            "waiting": [dict(w) for w in self.waiting],
        }


@dataclass(frozen=True, slots=True)
class SemaphoreStats(ObjectStats):
    """A Semaphore or BoundedSemaphore. Each of ``holders`` has its ``permits``."""

    value: int
    held: int
    holders: tuple[Who, ...]
    token: int
    waiters: int
    waiting: tuple[Who, ...]
    wait_seconds: Histogram

    def describe(self) -> dict[str, Any]:
        return {
            **ObjectStats.describe(self),
            "value": self.value,
            "holders": [dict(h) for h in self.holders],
            "token": self.token,
            "waiters": self.waiters,
            "waiting": [dict(w) for w in self.waiting],
        }


@dataclass(frozen=True, slots=True)
class EventStats(ObjectStats):
    set: bool
    waiters: int

    def describe(self) -> dict[str, Any]:
        return {**ObjectStats.describe(self), "set": self.set, "waiters": self.waiters}


@dataclass(frozen=True, slots=True)
class ConditionStats(ObjectStats):
    waiters: int

    def describe(self) -> dict[str, Any]:
        return {**ObjectStats.describe(self), "waiters": self.waiters}


@dataclass(frozen=True, slots=True)
class BarrierStats(ObjectStats):
    waiters: int
    broken: bool

    def describe(self) -> dict[str, Any]:
        return {**ObjectStats.describe(self), "n_waiting": self.waiters, "broken": self.broken}


@dataclass(frozen=True, slots=True)
class SizeStats(ObjectStats):
    """A dict, list, Namespace or Array: how many entries."""

    len: int

    def describe(self) -> dict[str, Any]:
        return {**ObjectStats.describe(self), "len": self.len}


@dataclass(frozen=True, slots=True)
class ValueStats(ObjectStats):
    """A Value: its number (a 'c' Value holds one byte)."""

    value: Any

    def describe(self) -> dict[str, Any]:
        return {**ObjectStats.describe(self), "value": self.value}


@dataclass(frozen=True, slots=True)
class PipeStats(ObjectStats):
    """A Pipe: messages buffered for each end, which ends are closed."""

    buffered: tuple[int, int]
    closed: tuple[bool, bool]
    waiters: int

    def describe(self) -> dict[str, Any]:
        return {
            **ObjectStats.describe(self),
            "buffered": list(self.buffered),
            "closed": list(self.closed),
            "waiters": self.waiters,
        }


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Every object (in creation order) and how many deadlocks were found so far."""

    objects: tuple[ObjectStats, ...]
    deadlocks_total: int
