"""Daemon-level operations that are not calls on one object (create, delete, peek, status)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any, Final

from managerd.service.peers import PeerGuard
from managerd.service.sessions import SessionTable
from managerd.store.memory.base import SharedObject
from managerd.store.memory.registry import Registry

#: The most items ``peek`` returns of one object.
MAX_PEEK_ITEMS: Final = 1000


class ServerOps:
    """Daemon-level operations that are not calls on one object."""

    def __init__(self, registry: Registry, sessions: SessionTable, started_at: float) -> None:
        self.registry = registry
        self.sessions = sessions
        self.started_at = started_at
        #: Per-address handshake state (set by the server core).
        self.peers: PeerGuard | None = None
        #: The daemon's version and the settings an operator looks at (set by the core).
        self.about: dict[str, Any] = {}
        #: Deadlocks as they stand, and how many were found (set by the core).
        self.deadlocks: Callable[[], tuple[list[dict[str, Any]], int]] | None = None

    def create(self, typeid: str, name: str, args: dict[str, Any]) -> SharedObject:
        if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
            raise TypeError("creation arguments must be a dict with str keys")
        return self.registry.get_or_create(typeid, name, args)

    def objects(self) -> list[tuple[str, str]]:
        return self.registry.listing()

    def peek(self, name: str, limit: int) -> dict[str, Any]:
        """An object's contents as stored, without taking anything (``managerd get``).

        Payloads stay the clients' pickled bytes: the caller decodes what it
        can. At most ``limit`` items of a queue, list, dict or namespace.
        """
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            raise ValueError("limit must be an int >= 0")
        limit = min(limit, MAX_PEEK_ITEMS)
        obj = self.registry.get(name)
        info = obj.describe()
        try:
            value = obj.snapshot()
        except TypeError:  # locks, events...: their description is their content
            return {"type": obj.typeid, "describe": info, "kind": "none"}
        if isinstance(value, dict):
            return {
                "type": obj.typeid,
                "describe": info,
                "kind": "mapping",
                "total": len(value),
                "items": list(itertools.islice(value.items(), limit)),
            }
        if isinstance(value, list) and obj.typeid != "Array":
            return {
                "type": obj.typeid,
                "describe": info,
                "kind": "sequence",
                "total": len(value),
                "items": value[:limit],
            }
        return {"type": obj.typeid, "describe": info, "kind": "plain", "value": value}

    def status(self) -> dict[str, Any]:
        cycles, found = self.deadlocks() if self.deadlocks is not None else ([], 0)
        return {
            **self.about,
            "deadlocks": cycles,
            "deadlocks_total": found,
            "uptime_s": round(time.time() - self.started_at, 3),
            "objects": {name: obj.describe() for name, obj in self.registry.objects.items()},
            "sessions": [s.describe() for s in self.sessions],
            "handshakes_pending": self.peers.pending() if self.peers else 0,
            "penalized": {
                address: round(left, 1)
                for address, left in (self.peers.penalized() if self.peers else {}).items()
            },
        }
