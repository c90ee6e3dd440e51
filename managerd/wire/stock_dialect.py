"""Serve stock ``multiprocessing.managers`` clients on the same named objects.

A stock client sends ``(ident, method, args, kwds)``: with ``ident`` None it
calls a server method (``create``, ``incref``, ``accept_connection``...);
otherwise ``ident`` is the object's id, which managerd makes the object's
*name*, so stock tokens address named objects directly. Replies are
``('#RETURN', value)``, ``('#ERROR', exception)`` or ``('#PROXY', (exposed,
token))``. A stock client's type names are managerd's (``Queue``, ``dict``,
``list``, ``Lock``...) and its creation calls take the name first::

    BaseManager.register("Queue")
    BaseManager.register("dict", proxytype=DictProxy)
    BaseManager.register("Iterator", proxytype=IteratorProxy, create_method=False)
    m = BaseManager(address=(host, port), authkey=key); m.connect()
    m.Queue("jobs").get(timeout=1)

``list``, ``dict`` and ``Namespace`` take initial contents after the name
as the builtins do (``m.dict("d", {"a": 1}, b=2)``), applied on creation.

Stock clients send and expect plain values, while objects keep payloads as
pickled bytes; this module converts at the edge as each method's spec says
(``Conv``). Only builtin data can cross: values are decoded here with the
daemon's restricted unpickler, so a payload that a managerd client pickled
from its own classes reaches a stock client as a ``TypeError`` that says
so, and is left where it was: a stock ``get`` takes a queue item as a
reservation and acknowledges it only once it decoded (otherwise it goes
back to the front, as a ``nack``: it counts as a delivery for a queue with
``max_deliveries``), ``pop``-like calls check the value before removing
it, and a pipe message a parked ``recv`` cannot take goes back first in
line. On queues a stock client has only the stdlib's methods (``reserve``,
``get_many``... would hand out payloads without that check).

What differs from a stock ``SyncManager`` server:

- Iterating a stock ``DictProxy`` (``for k in d``) works when the client
  registers ``'Iterator'`` as ``SyncManager`` does (above): ``__iter__``
  answers ``#PROXY`` with an iterator over a snapshot of the keys taken
  when iteration starts (the stdlib iterates the live dict and fails if it
  changes size). The iterator is reference-counted by the client's
  ``incref``/``decref`` like a stock referent, and also dropped when the
  connection that opened it closes, so a client without ``'Iterator'``
  registered (its ``for`` raises ``KeyError: 'Iterator'``) leaks nothing;
  a connection keeps at most ``MAX_ITERATORS_PER_SESSION``. Iterators count
  in ``number_of_objects`` as a stock server's referents do.
  A stock ``ListProxy`` iterates through ``__getitem__`` until
  ``IndexError``; ``ArrayProxy`` too.
- ``_getvalue()`` copies: a dict, a list, a ``Namespace``, a number, a list
  of numbers, and for a queue the list of its items (the queue is unchanged).
- A ``Condition`` takes the *name* of a Lock/RLock (``m.Condition("c",
  "db")``), not a lock proxy, which the daemon would refuse to unpickle.
- ``shutdown`` over the wire is refused with ``PermissionError``.
- ``get_methods`` (only called by an ``AutoProxy`` rebuilt without its
  method list) cannot work: its argument is a pickled ``Token``, which the
  restricted unpickler refuses.
- Objects live until deleted (``incref``/``decref`` are no-ops for them).
- A stock client opens one connection per thread, so each thread is a
  session of its own: what it holds (an RLock, permits) is its own, and is
  released when that connection closes.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from multiprocessing.managers import Namespace as StockNamespace
from multiprocessing.managers import Token
from typing import Any, Final, Protocol

from managerd.safepickle import SafeDecoder
from managerd.service.invoker import EXPECTED_ERRORS
from managerd.service.ops import ServerOps
from managerd.store.api import Call, Conv, MethodSpec
from managerd.store.memory.base import SharedObject
from managerd.store.memory.journal import Journal
from managerd.store.memory.registry import TYPES, Registry
from managerd.store.sessions import Session
from managerd.wire.iterators import IteratorTable
from managerd_client.errors import ArgumentConflict, ForbiddenPayload, ObjectTypeConflict
from managerd_client.wire import PICKLE_PROTOCOL

log = logging.getLogger("managerd")

#: Methods each stock proxy type calls, by typeid: what ``create`` answers
#: as ``exposed`` (AutoProxy builds its methods from it) and, for these
#: types, all a stock client may call (``get_many``, ``reserve``... hand out
#: raw payloads or take items without the decode check of ``get``).
STOCK_METHODS: Final[dict[str, tuple[str, ...]]] = {
    "Queue": (
        "empty", "full", "get", "get_nowait", "join", "put", "put_nowait", "qsize", "task_done",
    ),
    "JoinableQueue": (
        "empty", "full", "get", "get_nowait", "join", "put", "put_nowait", "qsize", "task_done",
    ),
}  # fmt: skip

#: The type name a stock client registers for iterators (as SyncManager does).
ITERATOR_TYPEID: Final = "Iterator"
ITERATOR_EXPOSED: Final = ("__next__", "close", "send")

#: Every stock request runs as "thread 0" of its session: a stock client
#: opens one connection (one session) per thread.
_STOCK_THREAD: Final = 0

_STDLIB_ERROR_MODULES: Final = frozenset({"builtins", "_queue", "queue", "threading"})
#: managerd errors a stock client gets as the closest builtin (it cannot
#: unpickle managerd's own classes).
_AS_BUILTIN: Final[tuple[tuple[type[Exception], type[Exception]], ...]] = (
    (ObjectTypeConflict, TypeError),
    (ArgumentConflict, ValueError),
    (ForbiddenPayload, TypeError),
)

Reply = Callable[[tuple[str, Any]], None]


class StockSink(Protocol):
    """What the adapter needs of a connection."""

    #: The call last parked (``(object, method, future)``), which a next
    #: request on the connection abandons (see ``Connection._stock_abandon``).
    stock_parked: tuple[SharedObject, str, asyncio.Future[Any]] | None

    def _stock_reply(self, message: tuple[str, Any]) -> None: ...


def stock_error(exc: BaseException) -> BaseException:
    """``exc`` as something a stock client can unpickle without managerd."""
    if type(exc).__module__ in _STDLIB_ERROR_MODULES:
        return exc
    for managerd_cls, builtin in _AS_BUILTIN:
        if isinstance(exc, managerd_cls):
            return builtin(str(exc))
    for cls in type(exc).__mro__:
        if cls.__module__ == "builtins" and issubclass(cls, Exception):
            try:
                return cls(str(exc))
            except Exception:
                break
    return RuntimeError(str(exc))


def undecodable(exc: Exception) -> TypeError:
    """The error a stock client gets for a value only managerd clients can read."""
    return TypeError(
        f"this value cannot be sent to a stock multiprocessing client ({exc}); "
        "it was stored by a managerd client: read it with managerd_client"
    )


# -- iterators -------------------------------------------------------------------


# -- the adapter ----------------------------------------------------------------------


@dataclass(slots=True)
class _Request:
    """One stock call on an object, for the handlers of special methods."""

    obj: SharedObject
    call: Call
    method: str
    args: tuple[Any, ...]
    kwds: dict[str, Any]
    reply: Reply
    conn: StockSink


#: Handlers of methods whose stock form is not the object's method as is.
Special = Callable[["StockAdapter", _Request], None]
#: For calls that remove a payload: the payload they would remove (or None),
#: checked decodable *before* the call so that a refused value stays put.
Peek = Callable[[SharedObject, Call, list[Any], dict[str, Any]], "bytes | None"]


class StockAdapter:
    """Translates stock requests into object calls and back."""

    def __init__(self, ops: ServerOps, decoder: SafeDecoder, loop: asyncio.AbstractEventLoop):
        self.ops = ops
        self.registry: Registry = ops.registry
        self.decoder = decoder
        self.loop = loop
        self.iterators = IteratorTable()
        #: Set by the server when state is journaled: mutations refused while
        #: the data directory cannot take writes.
        self.journal: Journal | None = None

    # -- conversions ----------------------------------------------------------
    def encode(self, value: Any) -> bytes:
        return pickle.dumps(value, PICKLE_PROTOCOL)

    def decode(self, payload: bytes) -> Any:
        try:
            return self.decoder.loads(payload)
        except ForbiddenPayload as exc:
            raise undecodable(exc) from None

    def _args_in(
        self, spec: MethodSpec, args: tuple[Any, ...], kwds: dict[str, Any]
    ) -> tuple[list[Any], dict[str, Any]]:
        """Positional and keyword arguments with payloads encoded."""
        if len(args) > len(spec.params):
            raise TypeError(f"{spec.name}() takes at most {len(spec.params)} arguments")
        for key in kwds:
            if key not in spec.params:
                raise TypeError(f"{spec.name}() got an unexpected keyword argument {key!r}")
        first = args[0] if args else kwds.get(spec.params[0]) if spec.params else None
        out_args = [
            self._arg_in(spec, name, first, value)
            for name, value in zip(spec.params, args, strict=False)
        ]
        out_kwds = {name: self._arg_in(spec, name, first, value) for name, value in kwds.items()}
        return out_args, out_kwds

    def _arg_in(self, spec: MethodSpec, name: str, first: Any, value: Any) -> Any:
        conv = spec.args.get(name, Conv.PLAIN)
        if conv is Conv.ITEM_OR_ITEMS:  # list.__setitem__: a slice takes many
            conv = Conv.PAYLOADS if isinstance(first, slice) else Conv.PAYLOAD
        if conv is Conv.PAYLOAD:
            return self.encode(value)
        if conv is Conv.PAYLOADS:
            return [self.encode(v) for v in value]
        if conv is Conv.PAIRS:
            pairs: Iterable[Any] = value.items() if isinstance(value, dict) else value
            return [(k, self.encode(v)) for k, v in pairs]
        return value

    def result_out(self, conv: Conv, value: Any) -> Any:
        if conv is Conv.PAYLOAD:
            return None if value is None else self.decode(value)
        if conv is Conv.PAYLOADS:
            return [None if v is None else self.decode(v) for v in value]
        if conv is Conv.PAIRS:
            return [(k, self.decode(v)) for k, v in value]
        if conv is Conv.PAIR:
            return value[0], self.decode(value[1])
        if conv is Conv.MAPPING:
            return {k: self.decode(v) for k, v in value.items()}
        if conv is Conv.ACQUIRED:
            return bool(value)
        if conv is Conv.ITEM_OR_ITEMS:
            return (
                [self.decode(v) for v in value] if isinstance(value, list) else self.decode(value)
            )
        return value

    # -- requests -------------------------------------------------------------
    def handle(
        self,
        conn: StockSink,
        session: Session,
        ident: Any,
        method: Any,
        args: tuple[Any, ...],
        kwds: dict[str, Any],
    ) -> None:
        reply: Reply = conn._stock_reply
        try:
            if ident is None:
                reply(("#RETURN", self._server_call(method, args, kwds)))
                return
            if IteratorTable.is_id(ident):
                reply(("#RETURN", self.iterators.call(ident, method, args)))
                return
            obj = self.registry.get(ident)
            if method == "#GETVALUE":
                reply(("#RETURN", self._getvalue(obj)))
                return
            allowed = STOCK_METHODS.get(obj.typeid)
            if allowed is not None and method not in allowed:
                raise AttributeError(f"{obj.typeid} has no method {method!r} for stock clients")
            target = obj.methods.get(method)
            if self.journal is not None and target is not None and target.mutates:
                self.journal.check_writable()
            call = Call(session, _STOCK_THREAD, self.loop)
            special = _SPECIALS.get((obj.typeid, method))
            if special is not None:
                special(self, _Request(obj, call, method, args, kwds, reply, conn))
                return
            spec = obj.methods.get(method)
            if spec is None:
                raise AttributeError(f"{obj.typeid} has no method {method!r}")
            call_args, call_kwds = self._args_in(spec, args, kwds)
            peek = _PEEKS.get((obj.typeid, method))
            if peek is not None:
                payload = peek(obj, call, call_args, call_kwds)
                if payload is not None:
                    self.decode(payload)
            result = spec.fn(obj, call, *call_args, **call_kwds)
            if isinstance(result, asyncio.Future):
                conn.stock_parked = (obj, method, result)
                self._when_done(reply, result, lambda value: self.result_out(spec.result, value))
            else:
                reply(("#RETURN", self.result_out(spec.result, result)))
        except Exception as exc:
            self._reply_error(reply, exc)

    def _reply_error(self, reply: Reply, exc: BaseException) -> None:
        if not isinstance(exc, (*EXPECTED_ERRORS, StopIteration)):
            log.error("internal error in a stock request", exc_info=exc)
        reply(("#ERROR", stock_error(exc)))

    def _when_done(
        self, reply: Reply, fut: asyncio.Future[Any], then: Callable[[Any], Any]
    ) -> None:
        """Reply ``then(result)`` of a parked call, or its error."""

        def done(fut: asyncio.Future[Any]) -> None:
            if fut.cancelled():
                return  # the session ended: nobody is there to read a reply
            exc = fut.exception()
            try:
                if exc is not None:
                    raise exc
                value = then(fut.result())
            except Exception as error:
                self._reply_error(reply, error)
                return
            reply(("#RETURN", value))

        fut.add_done_callback(done)

    def _getvalue(self, obj: SharedObject) -> Any:
        value = obj.snapshot()
        if obj.typeid == "Namespace":
            return StockNamespace(**self.result_out(Conv.MAPPING, value))
        if obj.typeid in ("Queue", "JoinableQueue"):
            return self.result_out(Conv.PAYLOADS, value)
        conv = getattr(obj, "snapshot_conv", Conv.PLAIN)
        return self.result_out(conv, value)

    # -- special methods ---------------------------------------------------------
    def _queue_get(self, req: _Request) -> None:
        """``get``: a reservation, acked once its item decoded, else given back."""
        if req.method == "get_nowait":
            _no_arguments("get_nowait", req.args, req.kwds)
            block, timeout = False, None
        else:
            block, timeout = _get_params(*req.args, **req.kwds)
        obj, call = req.obj, req.call
        reserved = obj.methods["reserve"].fn(obj, call, timeout if block else 0.0)

        def settle(reserved: tuple[int, bytes, int]) -> Any:
            did, payload, _ = reserved
            try:
                value = self.decode(payload)
            except TypeError:
                _settle(obj, call, "nack", did, True)  # back to the front of the queue
                raise
            _settle(obj, call, "ack", did)
            return value

        if isinstance(reserved, asyncio.Future):
            req.conn.stock_parked = (obj, req.method, reserved)
            self._when_done(req.reply, reserved, settle)
        else:
            req.reply(("#RETURN", settle(reserved)))

    def _pipe_recv(self, req: _Request) -> None:
        """``recv(end, timeout=None)``; a message that does not decode stays first."""
        obj = req.obj
        spec = obj.methods["recv"]
        args, kwds = self._args_in(spec, req.args, req.kwds)
        end = args[0] if args else kwds.get("end")
        inbox: Any = obj.inbox[end] if end in (0, 1) else None  # type: ignore[attr-defined]
        if inbox:
            self.decode(inbox[0])
        result = spec.fn(obj, req.call, *args, **kwds)

        def check(payload: bytes) -> Any:
            try:
                return self.decode(payload)
            except TypeError:
                inbox.appendleft(payload)
                raise

        if isinstance(result, asyncio.Future):
            req.conn.stock_parked = (obj, req.method, result)
            self._when_done(req.reply, result, check)
        else:
            req.reply(("#RETURN", self.decode(result)))

    def _dict_iter(self, req: _Request) -> None:
        _no_arguments("__iter__", req.args, req.kwds)
        keys = req.obj.methods["keys"].fn(req.obj, req.call)
        ident = self.iterators.open(req.call.session, keys)
        req.reply(("#PROXY", (ITERATOR_EXPOSED, Token(ITERATOR_TYPEID, None, ident))))

    def _dict_update(self, req: _Request) -> None:
        """``update(other=(), **kwds)`` as ``dict.update`` takes it."""
        if len(req.args) > 1:
            raise TypeError(f"update expected at most 1 argument, got {len(req.args)}")
        pairs: list[tuple[Any, Any]] = []
        if req.args:
            other = req.args[0]
            pairs.extend(other.items() if isinstance(other, dict) else other)
        pairs.extend(req.kwds.items())
        encoded = [(k, self.encode(v)) for k, v in pairs]
        req.obj.methods["update"].fn(req.obj, req.call, encoded)
        req.reply(("#RETURN", None))

    def _dict_setdefault(self, req: _Request) -> None:
        """``setdefault(key, default=None)``; an existing value must decode."""
        key, default = _setdefault_params(*req.args, **req.kwds)
        current = req.obj.methods["get"].fn(req.obj, req.call, key)
        if current is None:
            req.obj.methods["setdefault"].fn(req.obj, req.call, key, self.encode(default))
            req.reply(("#RETURN", default))
        else:
            req.reply(("#RETURN", self.decode(current)))

    # -- server operations ---------------------------------------------------------
    def _server_call(self, method: Any, args: tuple[Any, ...], kwds: dict[str, Any]) -> Any:
        if method in ("dummy", "accept_connection"):
            return None
        if method in ("incref", "decref"):
            # Named objects live until deleted; only iterators are counted.
            if args and IteratorTable.is_id(args[0]):
                getattr(self.iterators, method)(args[0])
            return None
        if method == "create":
            return self._create(args, kwds)
        if method == "get_methods":
            (token,) = args
            return self.exposed(self.registry.get(token.id))
        if method == "number_of_objects":
            return len(self.registry) + len(self.iterators)
        if method == "debug_info":
            return "\n".join(f"{n}: {t}" for n, t in self.registry.listing())
        if method == "shutdown":
            raise PermissionError("shutdown over the wire is disabled; stop the daemon instead")
        raise AttributeError(f"the daemon has no operation {method!r}")

    def _create(self, args: tuple[Any, ...], kwds: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
        if not args:
            raise TypeError("create() needs a type name")
        typeid = args[0]
        cls = TYPES.get(typeid) if isinstance(typeid, str) else None
        if cls is None:
            raise TypeError(f"unknown type {typeid!r}; the daemon serves {', '.join(TYPES)}")
        if len(args) < 2:
            raise TypeError(
                f"managerd objects are named: call m.{typeid}(name, ...), "
                f"e.g. m.{typeid}('jobs'), to get or create the {typeid} of that name"
            )
        name, rest = args[1], args[2:]
        contents = _STOCK_CONTENTS.get(typeid)
        if contents is not None:
            obj = self.ops.create(typeid, name, contents(self, rest, kwds))
            return obj.name, self.exposed(obj)
        params = cls.create_params
        if len(rest) > len(params):
            raise TypeError(f"{typeid} takes at most {len(params)} creation arguments")
        create_args = dict(zip(params, rest, strict=False))
        for key in kwds:
            if key in create_args:
                raise TypeError(f"{typeid}() got multiple values for argument {key!r}")
        create_args.update(kwds)
        obj = self.ops.create(typeid, name, create_args)
        return obj.name, self.exposed(obj)

    @staticmethod
    def exposed(obj: SharedObject) -> tuple[str, ...]:
        """What an ``AutoProxy`` of ``obj`` gets: public methods, as a stock server.

        Dunder names would become methods of the AutoProxy class itself
        (``__setattr__`` would break the proxy), so, as the stdlib's
        ``public_methods``, they are left to the typed proxies.
        """
        methods = STOCK_METHODS.get(obj.typeid)
        if methods is not None:
            return methods
        return tuple(name for name in sorted(obj.methods) if not name.startswith("_"))


# -- creation with contents ------------------------------------------------------------
# A stock client passes contents as the builtin would take them
# (``m.dict("d", {"a": 1}, b=2)``); the object takes encoded payloads.


def _list_contents(adapter: StockAdapter, rest: tuple[Any, ...], kwds: dict[str, Any]) -> Any:
    if not rest and not kwds:
        return {}
    values: list[Any] = list(*rest, **kwds)  # list()'s own errors
    return {"contents": [adapter.encode(v) for v in values]}


def _dict_contents(adapter: StockAdapter, rest: tuple[Any, ...], kwds: dict[str, Any]) -> Any:
    if not rest and not kwds:
        return {}
    mapping: dict[Any, Any] = dict(*rest, **kwds)  # dict()'s own errors
    return {"contents": [(k, adapter.encode(v)) for k, v in mapping.items()]}


def _namespace_contents(adapter: StockAdapter, rest: tuple[Any, ...], kwds: dict[str, Any]) -> Any:
    if rest:
        raise TypeError("Namespace() takes keyword arguments only")
    if not kwds:
        return {}
    return {"contents": [(k, adapter.encode(v)) for k, v in kwds.items()]}


_STOCK_CONTENTS: Final[
    dict[str, Callable[[StockAdapter, tuple[Any, ...], dict[str, Any]], Any]]
] = {
    "list": _list_contents,
    "dict": _dict_contents,
    "Namespace": _namespace_contents,
}


# -- helpers ----------------------------------------------------------------------


def _no_arguments(name: str, args: tuple[Any, ...], kwds: dict[str, Any]) -> None:
    if args or kwds:
        raise TypeError(f"{name}() takes no arguments")


def _get_params(block: bool = True, timeout: float | None = None) -> tuple[bool, float | None]:
    return block, timeout


def _setdefault_params(key: Any, default: Any = None) -> tuple[Any, Any]:
    return key, default


def _settle(obj: SharedObject, call: Call, method: str, did: int, *rest: Any) -> None:
    """Ack or nack a stock get's reservation (it may have timed out meanwhile)."""
    try:
        obj.methods[method].fn(obj, call, did, *rest)
    except ValueError:
        pass  # redelivered by its visibility timeout already


def _peek_dict_pop(obj: SharedObject, call: Call, args: list[Any], kwds: dict[str, Any]) -> Any:
    key = args[0] if args else kwds.get("key")
    result: bytes | None = obj.methods["get"].fn(obj, call, key)
    return result


def _peek_dict_popitem(obj: SharedObject, call: Call, args: list[Any], kwds: dict[str, Any]) -> Any:
    data: dict[Any, bytes] = obj.data  # type: ignore[attr-defined]
    return next(reversed(data.values()), None)


def _peek_list_pop(obj: SharedObject, call: Call, args: list[Any], kwds: dict[str, Any]) -> Any:
    index = args[0] if args else kwds.get("index", -1)
    try:
        return obj.methods["__getitem__"].fn(obj, call, index)
    except (IndexError, TypeError):
        return None  # pop itself raises the right error


_SPECIALS: Final[dict[tuple[str, str], Special]] = {
    ("Queue", "get"): StockAdapter._queue_get,
    ("Queue", "get_nowait"): StockAdapter._queue_get,
    ("JoinableQueue", "get"): StockAdapter._queue_get,
    ("JoinableQueue", "get_nowait"): StockAdapter._queue_get,
    ("dict", "__iter__"): StockAdapter._dict_iter,
    ("dict", "update"): StockAdapter._dict_update,
    ("dict", "setdefault"): StockAdapter._dict_setdefault,
    ("Pipe", "recv"): StockAdapter._pipe_recv,
}

_PEEKS: Final[dict[tuple[str, str], Peek]] = {
    ("dict", "pop"): _peek_dict_pop,
    ("dict", "popitem"): _peek_dict_popitem,
    ("list", "pop"): _peek_list_pop,
}
