"""Named objects: the one table of types, and get-or-create by name.

``TYPES`` is the explicit list of what the daemon serves; each class lists
its exposed methods itself (``@exposed``). Creation arguments apply when an
object is first created; a later call that names a conflicting one gets
``ArgumentConflict``, and a name taken by another type ``ObjectTypeConflict``.
Arguments a call does not name are not compared, so ``Queue("jobs")``
attaches to ``jobs`` whatever its maxsize.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any, Final

from managerd.store.api import BadArgument, BadState
from managerd.store.memory.base import SharedObject
from managerd.store.memory.journal import Journal
from managerd.store.memory.locks import BoundedSemaphore, Lock, RLock, Semaphore
from managerd.store.memory.mappings import Dict, List, Namespace
from managerd.store.memory.pipes import Pipe
from managerd.store.memory.queues import DEAD_LETTER_SUFFIX, JoinableQueue, Queue
from managerd.store.memory.records import RecordKind
from managerd.store.memory.sync import Barrier, Condition, Event
from managerd.store.memory.tokens import TokenSource
from managerd.store.memory.values import Array, Value
from managerd_client.errors import (
    NoSuchObject,
    ObjectTypeConflict,
    ServerShuttingDown,
)

TYPES: Final[dict[str, type[SharedObject]]] = {
    cls.typeid: cls
    for cls in (
        Queue,
        JoinableQueue,
        Pipe,
        Dict,
        List,
        Namespace,
        Value,
        Array,
        Lock,
        RLock,
        Semaphore,
        BoundedSemaphore,
        Event,
        Condition,
        Barrier,
    )
}

MAX_NAME_LENGTH: Final = 256

log = logging.getLogger("managerd")


def check_name(name: Any) -> str:
    if not isinstance(name, str):
        raise BadArgument(f"an object name must be a str, not {type(name).__name__}")
    if not name or len(name) > MAX_NAME_LENGTH or not name.isprintable():
        raise ValueError(
            f"object names are 1-{MAX_NAME_LENGTH} printable characters, got {name[:40]!r}"
        )
    return name


class Registry:
    """All named objects of one daemon."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tokens: TokenSource) -> None:
        self.loop = loop
        #: Where every Lock, RLock and Semaphore takes its fencing tokens.
        self.tokens = tokens
        self.objects: dict[str, SharedObject] = {}
        #: Where creations, deletions and durable objects' changes are
        #: journaled; None for a memory-only daemon (and during recovery).
        self.journal: Journal | None = None

    def get(self, name: str, typeid: str | None = None) -> SharedObject:
        obj = self.objects.get(name)
        if obj is None:
            raise NoSuchObject(f"no object named {name!r}")
        if typeid is not None and obj.typeid != typeid:
            raise ObjectTypeConflict(f"{name!r} is a {obj.typeid}, not a {typeid}")
        return obj

    def get_or_create(self, typeid: str, name: str, args: dict[str, Any]) -> SharedObject:
        cls = TYPES.get(typeid)
        if cls is None:
            raise BadArgument(f"unknown type {typeid!r}; the daemon serves {', '.join(TYPES)}")
        check_name(name)
        unknown = set(args) - set(cls.create_params)
        if unknown:
            raise BadArgument(f"{typeid} takes no creation argument {', '.join(sorted(unknown))}")
        obj = self.objects.get(name)
        if obj is not None:
            if obj.typeid != typeid:
                raise ObjectTypeConflict(
                    f"{name!r} already exists as a {obj.typeid}, cannot use it as a {typeid}"
                )
            obj.check_conflicts(args)
            return obj
        obj = self._construct(cls, name, args)
        self._add(obj, args)
        return obj

    def _add(self, obj: SharedObject, args: dict[str, Any]) -> None:
        obj.created_with = dict(args)
        self.objects[obj.name] = obj
        if self.journal is not None:
            self.journal.append((int(RecordKind.CREATE), obj.typeid, obj.name, obj.created_with))
            if obj.durable:
                obj.journal = self.journal

    def _construct(self, cls: type[SharedObject], name: str, args: dict[str, Any]) -> SharedObject:
        if cls is Condition:
            lock_name = args.get("lock") or f"{name}.lock"
            lock = self.objects.get(lock_name)
            if lock is None:
                lock = RLock(check_name(lock_name), self.loop, tokens=self.tokens)
                self._add(lock, {})
            if not isinstance(lock, Lock):
                raise ObjectTypeConflict(f"{lock_name!r} is a {lock.typeid}, not a Lock or RLock")
            return Condition(name, self.loop, lock=lock)
        if issubclass(cls, (Lock, Semaphore)):
            obj: SharedObject = cls(name, self.loop, tokens=self.tokens, **args)
        else:
            obj = cls(name, self.loop, **args)
        if isinstance(obj, Queue):
            obj.dead_letter = self._dead_letter
        return obj

    def _dead_letter(self, source: Queue, payload: bytes) -> None:
        name = source.name + DEAD_LETTER_SUFFIX
        dead = self.objects.get(name)
        if dead is None:
            dead = self.get_or_create("Queue", name, {})
        if not isinstance(dead, Queue):
            # Never drop the item: it stays in its queue, and the log says why.
            log.error(
                "cannot dead-letter an item of %r: %r is a %s, not a Queue; "
                "the item goes back to %r",
                source.name, name, dead.typeid, source.name,
            )  # fmt: skip
            source._offer(payload, front=True)
            return
        dead.dead_letter = None  # a dead letter is never dead-lettered again
        dead._offer(payload)
        dead.puts_total += 1

    def delete(self, name: str) -> bool:
        obj = self.objects.get(name)
        if obj is None:
            return False
        if isinstance(obj, Lock):
            # A Condition holds its lock object: a new lock of that name would
            # be another lock until a restart rebinds the Condition by name.
            users = sorted(c.name for c in self.objects.values()
                           if isinstance(c, Condition) and c.lock is obj)  # fmt: skip
            if users:
                raise BadState(
                    f"{name!r} is the lock of Condition {users[0]!r}: delete the Condition first"
                )
        del self.objects[name]
        obj.shutdown(NoSuchObject(f"{name!r} was deleted"))
        if self.journal is not None:
            self.journal.append((int(RecordKind.DELETE), name))
        return True

    # -- durability -------------------------------------------------------------
    def replay(self, records: list[tuple[Any, ...]]) -> int:
        """Rebuild the objects from journal records; the number of queued items.

        The records are in the current format (``Journal.recover`` upgrades
        older ones); see ``records.py``.
        """
        assert self.journal is None, "replay before the journal is attached"
        create, delete, state, op = RecordKind  # looked up once, not per record
        for record in records:
            kind = record[0]
            if kind == op:
                self.objects[record[1]].apply(tuple(record[2:]))
            elif kind == create:
                _, typeid, name, args = record
                self.get_or_create(typeid, name, args)
            elif kind == delete:
                self.delete(record[1])
            elif kind == state:
                self.objects[record[1]].load_state(record[2])
            else:
                raise ValueError(f"unknown journal record {kind!r}")
        items = 0
        for obj in self.objects.values():
            obj.recovered()
            if isinstance(obj, Queue):
                items += len(obj.items)
        return items

    def attach(self, journal: Journal) -> None:
        """Journal from now on: durable objects' changes, creations, deletions."""
        self.journal = journal
        for obj in self.objects.values():
            if obj.durable:
                obj.journal = journal

    def state_records(self) -> list[tuple[Any, ...]]:
        """The records that rebuild every object as it is now (a snapshot)."""
        records: list[tuple[Any, ...]] = []
        for obj in self.objects.values():
            records.append((int(RecordKind.CREATE), obj.typeid, obj.name, obj.created_with))
            if obj.durable:
                records.append((int(RecordKind.STATE), obj.name, obj.dump_state()))
        return records

    def shutdown(self) -> None:
        for obj in self.objects.values():
            obj.shutdown(ServerShuttingDown("the daemon is shutting down"))

    def listing(self) -> list[tuple[str, str]]:
        return sorted((name, obj.typeid) for name, obj in self.objects.items())

    def __iter__(self) -> Iterator[SharedObject]:
        return iter(list(self.objects.values()))

    def __len__(self) -> int:
        return len(self.objects)
