"""The store interface: all object state, behind one :class:`Store`.

The service (the invoker, the daemon's operations, the sessions table) and
the wire ask a store for everything about named objects; the metrics, the
status document and the web page read its :meth:`Store.stats`. Nothing
outside a store reads an object's attributes. ``store/memory/store.py`` is
the first implementation (objects on the event loop, a journal on disk).

**What a second store implements** (one on etcd, say): this protocol, a
:class:`Handle` per object, and the snapshots of ``store/stats.py``.

- A handle's ``methods`` (``api.MethodSpec``, declared with ``@exposed``)
  *are* the operations: the invoker calls ``spec.fn(handle, call, *args,
  **kwargs)`` directly (no layer in between on the hot path). It returns
  the result, or an ``asyncio.Future`` (a Task is one) when the answer
  comes later; it raises the errors of ``api.py`` on purpose.
- A parked call (a returned future) belongs to ``call.session``:
  :meth:`Store.release` ends everything of a session, :meth:`Store.abandon`
  and :meth:`Store.cancel` end one parked call (the future is cancelled, or
  completes if the store already answered it); :meth:`Store.undo` gives
  back what an answered call handed out (``Handle.undo_methods`` names
  the methods that can be undone). :meth:`Store.resume` finds a session a
  client started through another daemon of the same store (its gateway
  died) by the client's secret resume token.
- ``get_or_create`` answers at once; ``created`` is None, or a future done
  once the object is kept (the etcd store writes its name in the
  background): whoever tells a client that an object exists waits for it.
- ``check_writable`` refuses a mutation up front while the store cannot
  keep it; ``barrier`` is None, or a future done once everything changed so
  far is durable (an answer waits for it); ``ready`` says whether calls can
  be served now (the readiness probe: a gateway whose cluster does not
  answer is not ready).
- ``types``: the memory store's types and methods (``tests/contract/``
  says what they mean). The stock dialect composes a few: a stock ``get``
  is ``reserve``, then ``ack`` or ``nack`` (expected to answer at once).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from managerd.store.api import Call, Conv, MethodSpec
from managerd.store.sessions import Session
from managerd.store.stats import ObjectStats, StoreStats


@dataclass(frozen=True, slots=True)
class TypeInfo:
    """A type the store serves: its exposed methods and creation parameters, in order."""

    typeid: str
    methods: Mapping[str, MethodSpec]
    create_params: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A copy of an object's whole value (payloads as stored) and how it converts."""

    value: Any
    conv: Conv


class Handle(Protocol):
    """A named object as a store hands it out: the target of its ``methods``."""

    @property
    def name(self) -> str: ...
    @property
    def typeid(self) -> str: ...
    @property
    def methods(self) -> Mapping[str, MethodSpec]: ...
    #: Methods whose answer hands something over, and the method that gives it back.
    @property
    def undo_methods(self) -> Mapping[str, str]: ...
    #: A TypeError from a method is the builtin container's, so the caller's.
    @property
    def builtin_type_errors(self) -> bool: ...


class Store(Protocol):
    """Named objects: get-or-create, delete, list, calls, sessions, durability, stats."""

    @property
    def types(self) -> Mapping[str, TypeInfo]: ...

    def get_or_create(self, typeid: str, name: str, args: dict[str, Any]) -> Handle:
        """``name``, made with ``args`` if new; ArgumentConflict/ObjectTypeConflict if not."""

    def created(self, obj: Handle) -> asyncio.Future[None] | None:
        """None if ``obj`` (from :meth:`get_or_create`) is kept by the store already,
        else a future done once it is, or failed with why it is not (ObjectTypeConflict,
        StoreUnavailable...). A creation is answered only then: an object a client was
        told exists outlives the daemon that told it. The memory store: always None."""

    def get(self, name: str, typeid: str | None = None) -> Handle:
        """NoSuchObject, or ObjectTypeConflict when ``typeid`` is given and differs."""

    def delete(self, name: str) -> bool:
        """Whether it existed; its parked calls fail with NoSuchObject."""

    def listing(self) -> list[tuple[str, str]]:
        """``(name, typeid)`` of every object, sorted."""

    def abandon(
        self, obj: Handle, method: str, session: Session, future: asyncio.Future[Any],
        *, stock: bool = False,
    ) -> None:  # fmt: skip
        """The client gave up the parked call (interrupted): as the object says (a
        Condition wait takes its lock back unless ``stock``); else as :meth:`cancel`."""

    def cancel(self, session: Session, future: asyncio.Future[Any]) -> None:
        """Drop a parked call whose answer could reach nobody, as a session's end would."""

    def undo(
        self, obj: Handle, method: str, call: Call, args: tuple[Any, ...], result: Any
    ) -> None:
        """Give back what ``method`` (in ``undo_methods``) handed over as ``result``."""

    def release(self, session: Session) -> asyncio.Future[None] | None:
        """The session ended: its parked calls are dropped, then all it holds goes back.
        None once that is done; else a future done once it is (a store whose release
        is a round trip: the sessions table lists the session until then)."""

    async def resume(self, token: str) -> Session | None:
        """The live session that another daemon (a gateway of the same store) opened
        with the resume token ``token``, taken over by this one with what it holds;
        None if there is none. (The sessions table has looked among this daemon's
        own first; the memory store keeps no session elsewhere: always None.)"""

    def would_hand_out(
        self, obj: Handle, method: str, call: Call, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> bytes | None:
        """The stored payload the call would hand out (``pop``, ``setdefault``...),
        read without making it: a caller that must decode it refuses first.
        None if none, or if the call will fail by itself."""

    def snapshot(self, obj: Handle) -> Snapshot | asyncio.Future[Snapshot]:
        """The whole value (BadArgument for a lock, an event...: nothing to copy), or a
        future of it from a store that must read it first (a round trip)."""

    def check_writable(self) -> None:
        """Refuse (NotDurable) a mutation while changes cannot be kept."""

    def barrier(self) -> asyncio.Future[None] | None:
        """None, or a future done once every change so far is durable."""

    async def ready(self, timeout_s: float) -> str | None:
        """None if the store can serve calls now, else why not (``/readyz``), answered
        within ``timeout_s``: the etcd store reads from its cluster."""

    def stats(self) -> StoreStats:
        """Every object's stats; safe from another thread (the metrics scrape)."""

    def stats_of(self, obj: Handle) -> ObjectStats:
        """One object's stats (``peek``)."""

    def deadlocks(self) -> list[dict[str, Any]]:
        """The cycles of waiting sessions that stand now (on the loop)."""

    def shutdown(self) -> None:
        """The daemon stops: every parked call fails with ServerShuttingDown."""
