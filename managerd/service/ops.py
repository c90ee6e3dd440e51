"""The daemon's own operations, exposed as one object like any other.

``ping``, ``create``, ``delete``, ``objects``, ``status``, ``types`` and
``peek`` (the managerd dialect's daemon requests), and the stock server's
``create``, ``incref``, ``decref``, ``number_of_objects``, ``debug_info``,
``get_methods``, ``dummy``, ``accept_connection`` and ``shutdown``: each is
an ``exposed`` method of :class:`ServerOps`, which the invoker finds for a
call on no object (``service/invoker.py``) and runs as it runs a queue's
``put``: same argument check, journal check, metrics (``server.<method>``)
and error classification.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any, ClassVar, Final

from managerd.service.peers import PeerGuard
from managerd.service.sessions import SessionTable
from managerd.store.api import BadArgument, Call, MethodSpec, exposed, methods_of
from managerd.store.memory.base import SharedObject
from managerd.store.memory.registry import TYPES, Registry

#: The most items ``peek`` returns of one object.
MAX_PEEK_ITEMS: Final = 1000


class ServerOps:
    """Daemon-level operations that are not calls on one object."""

    #: The invoker's label prefix for these (``server.create``).
    typeid: ClassVar[str] = "server"
    methods: ClassVar[dict[str, MethodSpec]]
    undo_methods: ClassVar[dict[str, str]] = {}

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

    def abandon(self, waiter: Any, method: str, stock: bool = False) -> None:
        """No operation parks: nothing to abandon (the invoker's object interface)."""

    # -- managerd clients ---------------------------------------------------------
    @exposed()
    def ping(self, call: Call) -> None:
        return None

    @exposed("create", mutates=True)
    def create_op(self, call: Call, typeid: str, name: str, args: dict[str, Any]) -> None:
        self.create(typeid, name, args)

    def create(self, typeid: Any, name: Any, args: Any) -> SharedObject:
        """Get or create ``name``; every refusal of the caller's arguments is raised here."""
        cls = TYPES.get(typeid) if isinstance(typeid, str) else None
        if cls is None:
            raise BadArgument(f"unknown type {typeid!r}; the daemon serves {', '.join(TYPES)}")
        if not isinstance(name, str):
            raise BadArgument(f"an object name must be a str, not {type(name).__name__}")
        if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
            raise BadArgument("creation arguments must be a dict with str keys")
        unknown = set(args) - set(cls.create_params)
        if unknown:
            raise BadArgument(f"{typeid} takes no creation argument {', '.join(sorted(unknown))}")
        return self.registry.get_or_create(typeid, name, args)

    @exposed(mutates=True)
    def delete(self, call: Call, name: str) -> bool:
        if not isinstance(name, str):
            raise BadArgument(f"an object name must be a str, not {type(name).__name__}")
        return self.registry.delete(name)

    @exposed()
    def objects(self, call: Call) -> list[tuple[str, str]]:
        return self.registry.listing()

    @exposed()
    def types(self, call: Call) -> dict[str, list[str]]:
        return {typeid: sorted(cls.methods) for typeid, cls in TYPES.items()}

    @exposed()
    def peek(self, call: Call, name: str, limit: int) -> dict[str, Any]:
        """An object's contents as stored, without taking anything (``managerd get``).

        Payloads stay the clients' pickled bytes: the caller decodes what it
        can. At most ``limit`` items of a queue, list, dict or namespace.
        """
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            raise ValueError("limit must be an int >= 0")
        if not isinstance(name, str):
            raise BadArgument(f"an object name must be a str, not {type(name).__name__}")
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

    @exposed()
    def status(self, call: Call) -> dict[str, Any]:
        return self.report()

    def report(self) -> dict[str, Any]:
        """The daemon's status (``managerd status``, the web page, the metrics)."""
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

    # -- stock clients (the stock dialect maps its server calls onto these) ---------
    @exposed(mutates=True)
    def stock_create(
        self,
        call: Call,
        args: tuple[Any, ...],
        kwds: dict[str, Any],
        contents: dict[str, Any] | None = None,
    ) -> tuple[str, str, tuple[str, ...]]:
        """A stock ``create(typeid, name, *rest, **kwds)``: ``(name, typeid, methods)``.

        ``rest`` and ``kwds`` are the type's creation parameters in order,
        unless the dialect turned them into initial ``contents`` (a stock
        ``m.dict("d", {"a": 1})``).
        """
        if not args:
            raise BadArgument("create() needs a type name")
        typeid = args[0]
        cls = TYPES.get(typeid) if isinstance(typeid, str) else None
        if cls is None:
            raise BadArgument(f"unknown type {typeid!r}; the daemon serves {', '.join(TYPES)}")
        if len(args) < 2:
            raise BadArgument(
                f"managerd objects are named: call m.{typeid}(name, ...), "
                f"e.g. m.{typeid}('jobs'), to get or create the {typeid} of that name"
            )
        name, rest = args[1], args[2:]
        if contents is not None:
            obj = self.create(typeid, name, contents)
            return obj.name, obj.typeid, public_methods(obj)
        params = cls.create_params
        if len(rest) > len(params):
            raise BadArgument(f"{typeid} takes at most {len(params)} creation arguments")
        create_args = dict(zip(params, rest, strict=False))
        for key in kwds:
            if key in create_args:
                raise BadArgument(f"{typeid}() got multiple values for argument {key!r}")
        create_args.update(kwds)
        obj = self.create(typeid, name, create_args)
        return obj.name, obj.typeid, public_methods(obj)

    @exposed()
    def get_methods(self, call: Call, token: Any) -> tuple[str, str, tuple[str, ...]]:
        name = getattr(token, "id", None)
        if not isinstance(name, str):
            raise BadArgument("get_methods takes a token")
        obj = self.registry.get(name)
        return obj.name, obj.typeid, public_methods(obj)

    @exposed()
    def number_of_objects(self, call: Call) -> int:
        return len(self.registry)

    @exposed()
    def debug_info(self, call: Call) -> str:
        return "\n".join(f"{n}: {t}" for n, t in self.registry.listing())

    @exposed()
    def incref(self, call: Call, ident: Any, *rest: Any) -> None:
        """Named objects live until deleted: nothing to count."""

    @exposed()
    def decref(self, call: Call, ident: Any, *rest: Any) -> None:
        """Named objects live until deleted: nothing to count."""

    @exposed()
    def dummy(self, call: Call) -> None:
        return None

    @exposed()
    def accept_connection(self, call: Call, *args: Any) -> None:
        return None

    @exposed()
    def shutdown(self, call: Call, *args: Any) -> None:
        raise PermissionError("shutdown over the wire is disabled; stop the daemon instead")


ServerOps.methods = methods_of(ServerOps)


def public_methods(obj: SharedObject) -> tuple[str, ...]:
    """What an ``AutoProxy`` of ``obj`` gets: public methods, as a stock server.

    Dunder names would become methods of the AutoProxy class itself
    (``__setattr__`` would break the proxy), so, as the stdlib's
    ``public_methods``, they are left to the typed proxies.
    """
    return tuple(name for name in sorted(obj.methods) if not name.startswith("_"))
