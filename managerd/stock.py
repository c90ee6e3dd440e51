"""Serve stock ``multiprocessing.managers`` clients on the same named objects.

A stock client sends ``(ident, method, args, kwds)``: with ``ident`` None it
calls a server method (``create``, ``incref``, ``accept_connection``...);
otherwise ``ident`` is the object's id, which managerd makes the object's
*name*, so stock tokens address named objects directly. Replies are
``('#RETURN', value)`` or ``('#ERROR', exception)``.

Stock clients send and expect plain values, while objects keep payloads as
pickled bytes; this module converts at the edge as each method's spec says
(``Conv``). Only builtin data can cross: values are decoded here with the
daemon's restricted unpickler, so a payload that a managerd client pickled
from its own classes is refused to a stock client with a clear error.
"""

from __future__ import annotations

import asyncio
import pickle
import queue
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final

from managerd_client.wire import PICKLE_PROTOCOL

from managerd.objects.base import Call, Conv, MethodSpec, SharedObject
from managerd.registry import Registry
from managerd.safepickle import SafeDecoder
from managerd.sessions import Session

if TYPE_CHECKING:
    from managerd.dispatch import ServerOps

#: Methods each stock proxy type calls, by typeid: what ``create`` answers
#: as ``exposed`` (AutoProxy builds its methods from it).
STOCK_METHODS: Final[dict[str, tuple[str, ...]]] = {
    "Queue": ("empty", "full", "get", "get_nowait", "put", "put_nowait", "qsize"),
    "JoinableQueue": (
        "empty", "full", "get", "get_nowait", "join", "put", "put_nowait", "qsize", "task_done",
    ),
}  # fmt: skip

_STDLIB_ERROR_MODULES: Final = frozenset({"builtins", "_queue", "queue", "threading"})


class StockSink:
    """What the adapter needs of a connection."""

    def _stock_reply(self, message: tuple[str, Any]) -> None:  # pragma: no cover
        raise NotImplementedError


def stock_error(exc: BaseException) -> BaseException:
    """``exc`` as something a stock client can unpickle without managerd."""
    if type(exc).__module__ in _STDLIB_ERROR_MODULES:
        return exc
    for cls in type(exc).__mro__:
        if cls.__module__ == "builtins" and issubclass(cls, Exception):
            try:
                return cls(str(exc))
            except Exception:
                break
    return RuntimeError(str(exc))


class StockAdapter:
    """Translates stock requests into object calls and back."""

    def __init__(self, ops: ServerOps, decoder: SafeDecoder, loop: asyncio.AbstractEventLoop):
        self.ops = ops
        self.registry: Registry = ops.registry
        self.decoder = decoder
        self.loop = loop

    # -- conversions ----------------------------------------------------------
    def encode(self, value: Any) -> bytes:
        return pickle.dumps(value, PICKLE_PROTOCOL)

    def decode(self, payload: bytes) -> Any:
        return self.decoder.loads(payload)

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
        conn: Any,
        session: Session,
        ident: Any,
        method: Any,
        args: tuple[Any, ...],
        kwds: dict[str, Any],
    ) -> None:
        reply: Callable[[tuple[str, Any]], None] = conn._stock_reply
        try:
            if ident is None:
                reply(("#RETURN", self._server_call(method, args, kwds)))
                return
            obj = self.registry.get(ident)
            if method == "#GETVALUE":
                reply(("#RETURN", self._getvalue(obj)))
                return
            spec = obj.methods.get(method)
            if spec is None:
                raise AttributeError(f"{obj.typeid} has no method {method!r}")
            call = Call(session, _thread_of(session), self.loop)
            call_args, call_kwds = self._args_in(spec, args, kwds)
            result = spec.fn(obj, call, *call_args, **call_kwds)
        except Exception as exc:
            reply(("#ERROR", stock_error(exc)))
            return
        if isinstance(result, asyncio.Future):
            result.add_done_callback(lambda fut: self._reply_later(reply, spec.result, fut))
        else:
            self._reply_value(reply, spec.result, result)

    def _reply_value(
        self, reply: Callable[[tuple[str, Any]], None], conv: Conv, value: Any
    ) -> None:
        try:
            reply(("#RETURN", self.result_out(conv, value)))
        except Exception as exc:
            reply(("#ERROR", stock_error(exc)))

    def _reply_later(
        self, reply: Callable[[tuple[str, Any]], None], conv: Conv, fut: asyncio.Future[Any]
    ) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            reply(("#ERROR", stock_error(exc)))
        else:
            self._reply_value(reply, conv, fut.result())

    def _getvalue(self, obj: SharedObject) -> Any:
        value = obj.snapshot()
        conv = getattr(obj, "snapshot_conv", Conv.PLAIN)
        return self.result_out(conv, value)

    def _server_call(self, method: Any, args: tuple[Any, ...], kwds: dict[str, Any]) -> Any:
        if method in ("dummy", "incref", "decref", "accept_connection"):
            return None  # named objects live until deleted; no refcounts
        if method == "create":
            typeid, name, *rest = args
            cls_params = self._create_params(typeid)
            if len(rest) > len(cls_params):
                raise TypeError(f"{typeid} takes at most {len(cls_params)} creation arguments")
            create_args = dict(zip(cls_params, rest, strict=False))
            create_args.update(kwds)
            obj = self.ops.create(typeid, name, create_args)
            return obj.name, self.exposed(obj)
        if method == "get_methods":
            (token,) = args
            return self.exposed(self.registry.get(token.id))
        if method == "number_of_objects":
            return len(self.registry)
        if method == "debug_info":
            return "\n".join(f"{n}: {t}" for n, t in self.registry.listing())
        if method == "shutdown":
            raise PermissionError("shutdown over the wire is disabled; stop the daemon instead")
        raise AttributeError(f"the daemon has no operation {method!r}")

    def _create_params(self, typeid: str) -> tuple[str, ...]:
        from managerd.registry import TYPES

        cls = TYPES.get(typeid)
        if cls is None:
            raise TypeError(f"unknown type {typeid!r}")
        return cls.create_params

    @staticmethod
    def exposed(obj: SharedObject) -> tuple[str, ...]:
        return STOCK_METHODS.get(obj.typeid) or tuple(sorted(obj.methods))


def _thread_of(session: Session) -> int:
    # A stock client opens one connection (so one session) per thread.
    return 0


# Keep the names referenced for readers of stock error types.
_ = (queue.Empty, threading.BrokenBarrierError)
