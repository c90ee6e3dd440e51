"""The daemon's own operations, exposed as one object like any other.

``ping``, ``create``, ``delete``, ``objects``, ``status``, ``types`` and
``peek`` (the managerd dialect's daemon requests), and the stock server's
``create``, ``incref``, ``decref``, ``number_of_objects``, ``debug_info``,
``get_methods``, ``dummy``, ``accept_connection`` and ``shutdown``: each is
an ``exposed`` method of :class:`ServerOps`, which the invoker finds for a
call on no object (``service/invoker.py``) and runs as it runs a queue's
``put``: same argument check, journal check, metrics (``server.<method>``)
and error classification.

A creation (``create``, ``stock_create``) is answered once the store keeps
the object (``Store.created``: at once in memory; once its name is in etcd
on the etcd store), or with why it could not be kept: a client told that an
object exists is never told so by a gateway that dies before writing it.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from functools import partial
from typing import Any, ClassVar, Final, TypeVar

from managerd.service.peers import PeerGuard
from managerd.service.sessions import SessionTable
from managerd.store.api import BadArgument, Call, MethodSpec, exposed, methods_of
from managerd.store.interface import Handle, Snapshot, Store

#: The most items ``peek`` returns of one object.
MAX_PEEK_ITEMS: Final = 1000

_T = TypeVar("_T")
_U = TypeVar("_U")
#: A stock ``create``'s answer before the dialect converts it: ``(name, typeid, methods)``.
_Made = tuple[str, str, tuple[str, ...]]


class ServerOps:
    """Daemon-level operations that are not calls on one object."""

    #: The invoker's label prefix for these (``server.create``); the rest
    #: makes this look like a store's handle to the invoker. No operation
    #: parks or hands anything over.
    typeid: ClassVar[str] = "server"
    name: ClassVar[str] = "server"
    methods: ClassVar[dict[str, MethodSpec]]
    undo_methods: ClassVar[dict[str, str]] = {}
    builtin_type_errors: ClassVar[bool] = False

    def __init__(
        self,
        store: Store,
        sessions: SessionTable,
        peers: PeerGuard,
        about: dict[str, Any],
        started_at: float,
    ) -> None:
        self.store = store
        self.sessions = sessions
        #: Per-address handshake state.
        self.peers = peers
        #: The daemon's version and the settings an operator looks at.
        self.about = about
        self.started_at = started_at

    # -- managerd clients ---------------------------------------------------------
    @exposed()
    def ping(self, call: Call) -> None:
        return None

    @exposed("create", mutates=True)
    def create_op(
        self, call: Call, typeid: str, name: str, args: dict[str, Any]
    ) -> asyncio.Future[None] | None:
        """Answered once the object is kept (``Store.created``): at once in memory."""
        return self.store.created(self.create(typeid, name, args))

    def create(self, typeid: Any, name: Any, args: Any) -> Handle:
        """Get or create ``name``; every refusal of the caller's arguments is raised here."""
        types = self.store.types
        cls = types.get(typeid) if isinstance(typeid, str) else None
        if cls is None:
            raise BadArgument(f"unknown type {typeid!r}; the daemon serves {', '.join(types)}")
        if not isinstance(name, str):
            raise BadArgument(f"an object name must be a str, not {type(name).__name__}")
        if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
            raise BadArgument("creation arguments must be a dict with str keys")
        unknown = set(args) - set(cls.create_params)
        if unknown:
            raise BadArgument(f"{typeid} takes no creation argument {', '.join(sorted(unknown))}")
        return self.store.get_or_create(typeid, name, args)

    @exposed(mutates=True)
    def delete(self, call: Call, name: str) -> bool:
        if not isinstance(name, str):
            raise BadArgument(f"an object name must be a str, not {type(name).__name__}")
        return self.store.delete(name)

    @exposed()
    def objects(self, call: Call) -> list[tuple[str, str]]:
        return self.store.listing()

    @exposed()
    def types(self, call: Call) -> dict[str, list[str]]:
        return {typeid: sorted(cls.methods) for typeid, cls in self.store.types.items()}

    @exposed()
    def peek(self, call: Call, name: str, limit: int) -> Any:
        """An object's contents as stored, without taking anything (``managerd get``).

        Payloads stay the clients' pickled bytes: the caller decodes what it
        can. At most ``limit`` items of a queue, list, dict or namespace.
        """
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            raise ValueError("limit must be an int >= 0")
        if not isinstance(name, str):
            raise BadArgument(f"an object name must be a str, not {type(name).__name__}")
        limit = min(limit, MAX_PEEK_ITEMS)
        obj = self.store.get(name)
        info = self.store.stats_of(obj).describe()
        try:
            snapshot = self.store.snapshot(obj)
        except TypeError:  # locks, events...: their description is their content
            return {"type": obj.typeid, "describe": info, "kind": "none"}
        if isinstance(snapshot, asyncio.Future):  # a store that reads it first
            return asyncio.ensure_future(_later(snapshot, partial(_peeked, obj, info, limit)))
        return _peeked(obj, info, limit, snapshot)

    @exposed()
    def status(self, call: Call) -> dict[str, Any]:
        return self.report()

    def report(self) -> dict[str, Any]:
        """The daemon's status (``managerd status``, the web page, the metrics)."""
        cycles = self.store.deadlocks()
        stats = self.store.stats()
        return {
            **self.about,
            "deadlocks": cycles,
            "deadlocks_total": stats.deadlocks_total,
            "uptime_s": round(time.time() - self.started_at, 3),
            "objects": {o.name: o.describe() for o in stats.objects},
            "sessions": [s.describe() for s in self.sessions.listed()],
            "handshakes_pending": self.peers.pending(),
            "penalized": {
                address: round(left, 1) for address, left in self.peers.penalized().items()
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
    ) -> _Made | asyncio.Future[_Made]:
        """A stock ``create(typeid, name, *rest, **kwds)``: ``(name, typeid, methods)``.

        ``rest`` and ``kwds`` are the type's creation parameters in order,
        unless the dialect turned them into initial ``contents`` (a stock
        ``m.dict("d", {"a": 1})``).
        """
        if not args:
            raise BadArgument("create() needs a type name")
        typeid = args[0]
        types = self.store.types
        cls = types.get(typeid) if isinstance(typeid, str) else None
        if cls is None:
            raise BadArgument(f"unknown type {typeid!r}; the daemon serves {', '.join(types)}")
        if len(args) < 2:
            raise BadArgument(
                f"managerd objects are named: call m.{typeid}(name, ...), "
                f"e.g. m.{typeid}('jobs'), to get or create the {typeid} of that name"
            )
        name, rest = args[1], args[2:]
        if contents is not None:
            return self._made(self.create(typeid, name, contents))
        params = cls.create_params
        if len(rest) > len(params):
            raise BadArgument(f"{typeid} takes at most {len(params)} creation arguments")
        create_args = dict(zip(params, rest, strict=False))
        for key in kwds:
            if key in create_args:
                raise BadArgument(f"{typeid}() got multiple values for argument {key!r}")
        create_args.update(kwds)
        return self._made(self.create(typeid, name, create_args))

    def _made(self, obj: Handle) -> _Made | asyncio.Future[_Made]:
        """A stock ``create``'s answer, once the object is kept (``Store.created``)."""
        made = obj.name, obj.typeid, public_methods(obj)
        kept = self.store.created(obj)
        if kept is None:
            return made
        return asyncio.ensure_future(_later(kept, lambda _: made))

    @exposed()
    def get_methods(self, call: Call, token: Any) -> tuple[str, str, tuple[str, ...]]:
        name = getattr(token, "id", None)
        if not isinstance(name, str):
            raise BadArgument("get_methods takes a token")
        obj = self.store.get(name)
        return obj.name, obj.typeid, public_methods(obj)

    @exposed()
    def number_of_objects(self, call: Call) -> int:
        return len(self.store.listing())

    @exposed()
    def debug_info(self, call: Call) -> str:
        return "\n".join(f"{n}: {t}" for n, t in self.store.listing())

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


def public_methods(obj: Handle) -> tuple[str, ...]:
    """What an ``AutoProxy`` of ``obj`` gets: public methods, as a stock server.

    Dunder names would become methods of the AutoProxy class itself
    (``__setattr__`` would break the proxy), so, as the stdlib's
    ``public_methods``, they are left to the typed proxies.
    """
    return tuple(name for name in sorted(obj.methods) if not name.startswith("_"))


async def _later(first: asyncio.Future[_T], then: Callable[[_T], _U]) -> _U:
    return then(await first)


def _peeked(obj: Handle, info: dict[str, Any], limit: int, snapshot: Snapshot) -> dict[str, Any]:
    """``peek``'s answer from the object's copy."""
    value = snapshot.value
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
