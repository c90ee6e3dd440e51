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

The request pipeline (the object, the checks, parked calls, the journal,
metrics, whose error it is) is the invoker's (``service/invoker.py``), as
for managerd clients: this module makes an ``Invocation`` of a request
(``prepare`` converts its arguments once the object is known) and a reply
of its ``Outcome``. Server calls go to the daemon's operations object
(``service/ops.py``).

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

import logging
import pickle
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from multiprocessing.managers import Namespace as StockNamespace
from multiprocessing.managers import Token
from typing import Any, Final, Protocol

from managerd.safepickle import SafeDecoder
from managerd.service.invoker import (
    CALLER_ERRORS,
    Exposed,
    Invocation,
    Invoker,
    Outcome,
    Prepared,
)
from managerd.store.api import BadArgument, Call, Conv, MethodSpec, NoAttribute
from managerd.store.interface import Handle, Snapshot, Store
from managerd.store.sessions import Session
from managerd.wire.iterators import IteratorTable
from managerd_client.errors import (
    ArgumentConflict,
    ForbiddenPayload,
    InternalError,
    ObjectTypeConflict,
)
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

#: A stock client's server calls, and the daemon operation each runs.
STOCK_SERVER_OPS: Final[dict[str, str]] = {
    "create": "stock_create",
    "incref": "incref",
    "decref": "decref",
    "number_of_objects": "number_of_objects",
    "debug_info": "debug_info",
    "get_methods": "get_methods",
    "dummy": "dummy",
    "accept_connection": "accept_connection",
    "shutdown": "shutdown",
}

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
    (InternalError, RuntimeError),
)


class StockSink(Protocol):
    """What the adapter needs of a connection."""

    #: The call last parked (``(object, method, future)``), which a next
    #: request on the connection abandons (see ``Connection._stock_abandon``).
    stock_parked: tuple[Exposed, str, Any] | None

    def send_stock(self, message: tuple[str, Any]) -> None: ...


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
    return BadArgument(
        f"this value cannot be sent to a stock multiprocessing client ({exc}); "
        "it was stored by a managerd client: read it with managerd_client"
    )


@dataclass(frozen=True, slots=True)
class _Proxy:
    """An outcome answered as ``#PROXY`` (a new referent), not ``#RETURN``."""

    exposed: tuple[str, ...]
    token: Token


#: A stock method whose form is not the object's method as is: given the
#: adapter, the object, a call context and the request's arguments, how to
#: run it.
Special = Callable[["StockAdapter", Handle, Call, tuple[Any, ...], dict[str, Any]], Prepared]


class StockAdapter:
    """Translates stock requests into invocations, and outcomes into stock replies."""

    def __init__(self, invoker: Invoker, store: Store, decoder: SafeDecoder) -> None:
        self.invoker = invoker
        self.store = store
        self.decoder = decoder
        self.iterators = IteratorTable()

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
            raise BadArgument(f"{spec.name}() takes at most {len(spec.params)} arguments")
        for key in kwds:
            if key not in spec.params:
                raise BadArgument(f"{spec.name}() got an unexpected keyword argument {key!r}")
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
        if IteratorTable.is_id(ident):
            self._iterator_call(conn, ident, method, args)
            return
        reply = partial(self._reply, conn)
        if ident is None:
            op = STOCK_SERVER_OPS.get(method) if isinstance(method, str) else None
            invocation = Invocation(
                session,
                _STOCK_THREAD,
                None,
                None,
                op if op is not None else str(method),
                args,
                kwds,
                prepare=self._prepare_server if op is not None else _no_operation,
            )
        else:
            invocation = Invocation(
                session,
                _STOCK_THREAD,
                None,
                ident,
                method if isinstance(method, str) else str(method),
                args,
                kwds,
                prepare=self._prepare,
                on_parked=partial(_parked, conn),
            )
        self.invoker.run(invocation, reply)

    def _reply(self, conn: StockSink, outcome: Outcome) -> None:
        if outcome.error is not None:
            conn.send_stock(("#ERROR", stock_error(outcome.error)))
        elif isinstance(outcome.value, _Proxy):
            conn.send_stock(("#PROXY", (outcome.value.exposed, outcome.value.token)))
        else:
            conn.send_stock(("#RETURN", outcome.value))

    def _iterator_call(
        self, conn: StockSink, ident: str, method: Any, args: tuple[Any, ...]
    ) -> None:
        """A dict iterator lives on the connection, not in the store: answered here."""
        try:
            value = self.iterators.call(ident, method, args)
        except Exception as exc:
            if not isinstance(exc, CALLER_ERRORS):
                log.error("internal error in a stock iterator call", exc_info=exc)
            conn.send_stock(("#ERROR", stock_error(exc)))
            return
        conn.send_stock(("#RETURN", value))

    def _prepare(self, obj: Exposed, spec: MethodSpec | None, inv: Invocation) -> Prepared:
        """A stock call on an object: its arguments encoded, its result decoded."""
        method, args, kwds = inv.method, inv.args, inv.kwargs
        if method == "#GETVALUE":
            # The store's copy (a future from a store that reads it first), then converted.
            return Prepared(
                args,
                kwds,
                body=lambda obj, call: self.store.snapshot(obj),
                finish=partial(self._getvalue, obj),
            )
        allowed = STOCK_METHODS.get(obj.typeid)
        if allowed is not None and method not in allowed:
            raise NoAttribute(f"{obj.typeid} has no method {method!r} for stock clients")
        call = Call(inv.session, inv.thread, self.invoker.loop)
        special = _SPECIALS.get((obj.typeid, method))
        if special is not None:
            return special(self, obj, call, args, kwds)
        if spec is None:
            raise NoAttribute(f"{obj.typeid} has no method {method!r}")
        call_args, call_kwds = self._args_in(spec, args, kwds)
        removes = spec.mutates and spec.result is not Conv.PLAIN
        if removes:
            # A payload this call would remove must decode *before* it goes:
            # refused, it stays where it was. (A store that cannot say beforehand
            # checks ``accept`` where it removes it: the etcd store.)
            payload = self.store.would_hand_out(obj, method, call, tuple(call_args), call_kwds)
            if payload is not None:
                self.decode(payload)
        return Prepared(
            tuple(call_args),
            call_kwds,
            finish=partial(self.result_out, spec.result),
            accept=self.decode if removes else None,
        )

    def _prepare_server(self, ops: Exposed, spec: MethodSpec | None, inv: Invocation) -> Prepared:
        """A stock server call, as the daemon operation it maps to."""
        method, args, kwds = inv.method, inv.args, inv.kwargs
        if method == "stock_create":
            contents = None
            maker = (
                _STOCK_CONTENTS.get(args[0])
                if len(args) >= 2 and isinstance(args[0], str)
                else None
            )
            if maker is not None:
                contents = maker(self, args[2:], kwds)
            return Prepared((args, kwds, contents), {}, finish=_created)
        if method in ("incref", "decref") and args and IteratorTable.is_id(args[0]):
            # Named objects live until deleted; only iterators are counted.
            count = getattr(self.iterators, method)
            return Prepared(args, kwds, body=lambda ops, call: count(args[0]))
        if method == "number_of_objects":
            return Prepared(args, kwds, finish=lambda n: n + len(self.iterators))
        if method == "get_methods":
            return Prepared(args, kwds, finish=lambda made: _stock_exposed(*made[1:]))
        return Prepared(args, kwds)

    def _getvalue(self, obj: Handle, snapshot: Snapshot) -> Any:
        value = self.result_out(snapshot.conv, snapshot.value)
        return StockNamespace(**value) if obj.typeid == "Namespace" else value

    # -- special methods ---------------------------------------------------------
    def _queue_get(
        self, obj: Handle, call: Call, args: tuple[Any, ...], kwds: dict[str, Any]
    ) -> Prepared:
        """``get``: a reservation, acked once its item decoded, else given back."""
        block, timeout = _get_params(*args, **kwds)
        return Prepared(
            args,
            kwds,
            body=lambda obj, call: obj.methods["reserve"].fn(obj, call, timeout if block else 0.0),
            finish=partial(self._settle_get, obj, call),
        )

    def _queue_get_nowait(
        self, obj: Handle, call: Call, args: tuple[Any, ...], kwds: dict[str, Any]
    ) -> Prepared:
        _no_arguments("get_nowait", args, kwds)
        return Prepared(
            args,
            kwds,
            body=lambda obj, call: obj.methods["reserve"].fn(obj, call, 0.0),
            finish=partial(self._settle_get, obj, call),
        )

    def _settle_get(self, obj: Handle, call: Call, reserved: tuple[int, bytes, int]) -> Any:
        did, payload, _ = reserved
        try:
            value = self.decode(payload)
        except TypeError:
            _settle(obj, call, "nack", did, True)  # back to the front of the queue
            raise
        _settle(obj, call, "ack", did)
        return value

    def _pipe_recv(
        self, obj: Handle, call: Call, args: tuple[Any, ...], kwds: dict[str, Any]
    ) -> Prepared:
        """``recv(end, timeout=None)``; a message that does not decode stays first."""
        spec = obj.methods["recv"]
        call_args, call_kwds = self._args_in(spec, args, kwds)
        if not call_args and "end" in call_kwds:  # the undo method reads the end first
            call_args = [call_kwds.pop("end")]
        return Prepared(tuple(call_args), call_kwds, finish=self.decode, give_back=True)

    def _dict_iter(
        self, obj: Handle, call: Call, args: tuple[Any, ...], kwds: dict[str, Any]
    ) -> Prepared:
        _no_arguments("__iter__", args, kwds)

        def open_iterator(keys: list[Any]) -> _Proxy:
            ident = self.iterators.open(call.session, keys)
            return _Proxy(ITERATOR_EXPOSED, Token(ITERATOR_TYPEID, None, ident))

        return Prepared(
            (),
            {},
            body=lambda obj, call: obj.methods["keys"].fn(obj, call),
            finish=open_iterator,
        )

    def _dict_update(
        self, obj: Handle, call: Call, args: tuple[Any, ...], kwds: dict[str, Any]
    ) -> Prepared:
        """``update(other=(), **kwds)`` as ``dict.update`` takes it."""
        if len(args) > 1:
            raise BadArgument(f"update expected at most 1 argument, got {len(args)}")
        pairs: list[tuple[Any, Any]] = []
        if args:
            other = args[0]
            pairs.extend(other.items() if isinstance(other, dict) else other)
        pairs.extend(kwds.items())
        encoded = [(k, self.encode(v)) for k, v in pairs]
        return Prepared((encoded,), {}, finish=lambda _: None)

    def _dict_setdefault(
        self, obj: Handle, call: Call, args: tuple[Any, ...], kwds: dict[str, Any]
    ) -> Prepared:
        """``setdefault(key, default=None)``; an existing value must decode."""
        key, default = _setdefault_params(*args, **kwds)
        current = self.store.would_hand_out(obj, "setdefault", call, (key,), {})
        if current is not None:
            self.decode(current)
        return Prepared((key, self.encode(default)), {}, finish=self.decode)


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
        raise BadArgument("Namespace() takes keyword arguments only")
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


def _stock_exposed(typeid: str, methods: tuple[str, ...]) -> tuple[str, ...]:
    """What ``create`` answers as ``exposed``: the stock methods of the type, if listed."""
    return STOCK_METHODS.get(typeid, methods)


def _no_operation(ops: Exposed, spec: MethodSpec | None, inv: Invocation) -> Prepared:
    """A server call that is not one of a stock client's (``ping`` is managerd's)."""
    raise NoAttribute(f"the daemon has no operation {inv.method!r}")


def _created(made: tuple[str, str, tuple[str, ...]]) -> tuple[str, tuple[str, ...]]:
    """A stock ``create`` answers the new referent's id and its exposed methods."""
    name, typeid, methods = made
    return name, _stock_exposed(typeid, methods)


def _parked(conn: StockSink, obj: Exposed, method: str, future: Any) -> None:
    conn.stock_parked = (obj, method, future)


def _no_arguments(name: str, args: tuple[Any, ...], kwds: dict[str, Any]) -> None:
    if args or kwds:
        raise BadArgument(f"{name}() takes no arguments")


def _get_params(block: bool = True, timeout: float | None = None) -> tuple[bool, float | None]:
    return block, timeout


def _setdefault_params(key: Any, default: Any = None) -> tuple[Any, Any]:
    return key, default


def _settle(obj: Handle, call: Call, method: str, did: int, *rest: Any) -> None:
    """Ack or nack a stock get's reservation (it may have timed out meanwhile)."""
    try:
        obj.methods[method].fn(obj, call, did, *rest)
    except ValueError:
        pass  # redelivered by its visibility timeout already


_SPECIALS: Final[dict[tuple[str, str], Special]] = {
    ("Queue", "get"): StockAdapter._queue_get,
    ("Queue", "get_nowait"): StockAdapter._queue_get_nowait,
    ("JoinableQueue", "get"): StockAdapter._queue_get,
    ("JoinableQueue", "get_nowait"): StockAdapter._queue_get_nowait,
    ("dict", "__iter__"): StockAdapter._dict_iter,
    ("dict", "update"): StockAdapter._dict_update,
    ("dict", "setdefault"): StockAdapter._dict_setdefault,
    ("Pipe", "recv"): StockAdapter._pipe_recv,
}
