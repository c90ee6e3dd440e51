"""Proxies: stdlib-shaped handles on named objects of a daemon.

A proxy is a name and a type; every method is one request on its
manager's shared connection. Values (queue items, dict values, list items,
namespace attributes, pipe messages) are pickled here and travel and rest
on the daemon as opaque bytes; only clients unpickle them. Dict keys,
``Value``/``Array`` numbers and arguments such as timeouts travel as plain
builtin data, which the daemon decodes with a restricted unpickler.

Proxies pickle by name, so they can be passed to ``multiprocessing``
children (spawn or fork) or sent through a managerd queue; the receiver
uses its own connection to the same daemon. The authkey goes along only
while a child process is being spawned.

If the daemon restarted (it has a new server id), a proxy re-issues its
get-or-create before its next call, so proxies survive restarts.
"""

from __future__ import annotations

import itertools
import pickle
import threading
import time
from collections.abc import Callable, Iterable, Iterator, MutableMapping, MutableSequence
from multiprocessing.context import get_spawning_popen
from typing import TYPE_CHECKING, Any, ClassVar

from managerd_client.channel import Channel, Pending, abandoned_by
from managerd_client.errors import ConnectionLost, LockLost
from managerd_client.pipeline import current_pipeline
from managerd_client.wire import PICKLE_PROTOCOL, REISSUE

if TYPE_CHECKING:
    from managerd_client.client import Manager

__all__ = [
    "Array",
    "Barrier",
    "BoundedSemaphore",
    "Condition",
    "Dict",
    "Event",
    "JoinableQueue",
    "List",
    "Lock",
    "Message",
    "Namespace",
    "PipeEnd",
    "Proxy",
    "Queue",
    "RLock",
    "Semaphore",
    "Value",
]


def dumps(value: Any) -> bytes:
    """A payload of a batch (many, mostly small)."""
    return pickle.dumps(value, PICKLE_PROTOCOL)


class _PickleBuffer:
    """A file for ``pickle.Pickler`` that writes into one reusable buffer."""

    __slots__ = ("buf", "size")

    def __init__(self) -> None:
        self.buf = bytearray(65536)
        self.size = 0

    def write(self, data: bytes) -> int:
        end = self.size + len(data)
        if end > len(self.buf):
            grown = bytearray(max(end, 2 * len(self.buf)))
            grown[: self.size] = memoryview(self.buf)[: self.size]
            self.buf = grown
        self.buf[self.size : end] = data
        self.size = end
        return len(data)


_KEEP_PICKLE_BUFFER_BYTES = 4 * 1024 * 1024
_per_thread = threading.local()


def dump_one(value: Any) -> bytes:
    """One payload, pickled into this thread's reusable buffer, then copied out.

    The same bytes as :func:`dumps` (the daemon compares payloads as bytes).
    ``pickle.dumps`` grows its output by reallocating, which for a 1 MB
    payload faults ~260 fresh pages in on every call (~0.8 ms); a buffer
    already grown and one exact-size copy cost ~0.1 ms. A small payload costs
    ~1 us more, which is why batches use :func:`dumps`.
    """
    state = getattr(_per_thread, "pickler", None)
    if state is None:
        out = _PickleBuffer()
        state = (out, pickle.Pickler(out, PICKLE_PROTOCOL))
    else:
        _per_thread.pickler = None  # in use: a dump_one from inside this one makes its own
    out, pickler = state
    out.size = 0
    pickler.clear_memo()
    pickler.dump(value)  # on an exception, the (maybe half-written) state is dropped
    data = bytes(memoryview(out.buf)[: out.size])
    if len(out.buf) > _KEEP_PICKLE_BUFFER_BYTES:
        out.buf = bytearray(65536)
    _per_thread.pickler = state
    return data


def loads(payload: bytes | memoryview | None) -> Any:
    return None if payload is None else pickle.loads(payload)


def _loads_all(payloads: list[bytes]) -> list[Any]:
    """A queue's payloads (never None), unpickled one by one in C."""
    return list(map(pickle.loads, payloads))


def _dumps_all(items: Iterable[Any]) -> list[bytes]:
    """A batch's payloads: :func:`dumps` of each item, called from C."""
    return list(map(pickle.dumps, items, itertools.repeat(PICKLE_PROTOCOL)))


def _loads_reserved(reserved: tuple[int, bytes, int]) -> tuple[int, Any, int]:
    did, payload, deliveries = reserved
    return did, loads(payload), deliveries


def _rebuild(
    cls: type[Proxy],
    address: tuple[str, int] | tuple[tuple[str, int], ...],
    name: str,
    args: dict[str, Any],
    authkey: bytes | None,
    extra: dict[str, Any],
) -> Proxy:
    from managerd_client.client import manager_for

    return cls(manager_for(address, authkey), name, args, **extra)


class Proxy:
    """Base of every proxy: a named object on one daemon."""

    _typeid: ClassVar[str]
    #: Methods asked again, if their connection dies under them, through the daemon
    #: that resumed the session (another gateway of the same store, the first having
    #: died): reads, and waits that the daemon re-parks (a lock's place in line is
    #: kept). A wait asked again starts its timeout again. Never a change that could
    #: have been made already (a put, a release, an ack): those raise ConnectionLost.
    _reissued: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, manager: Manager, name: str, args: dict[str, Any]) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError("an object name must be a non-empty str")
        self._manager = manager
        self._name = name
        #: ``(channel, handle, method numbers)`` on the channel last used
        #: (protocol 2; method numbers None: calls go by name).
        self._ref: tuple[Channel, int, dict[str, int] | None] | None = None
        self._server_id = manager._create(self._typeid, name, args)
        # Initial contents are for the creation only: a proxy re-attaching
        # (daemon restart, unpickled in a child) does not resend them.
        if "contents" in args:
            args = {k: v for k, v in args.items() if k != "contents"}
        self._args = args

    @property
    def name(self) -> str:
        return self._name

    def _call(self, method: str, *args: Any) -> Any:
        return self._call_decoded(None, method, args)

    def _call_loads(self, method: str, *args: Any) -> Any:
        """A call whose result is a payload: unpickled as it is read."""
        return self._call_decoded(loads, method, args)

    def _call_tail(self, method: str, *args: Any) -> Any:
        """A call whose last argument is a payload (``dump_one``'s bytes), sent as it is."""
        return self._call_decoded(None, method, args, True)

    def _call_decoded(
        self,
        decode: Callable[[Any], Any] | None,
        method: str,
        args: tuple[Any, ...],
        tail: bool = False,
    ) -> Any:
        manager = self._manager
        channel = manager._channel_or_reconnect()
        epoch = manager.session_epoch
        if channel.server_id != self._server_id:
            # The daemon restarted: get-or-create again before calling.
            channel.call(None, None, "create", (self._typeid, self._name, self._args))
            self._server_id = channel.server_id
        ref = self._ref
        if ref is None or ref[0] is not channel:
            ref = self._ref = (channel, *channel.resolve(self._typeid, self._name))
        numbers = ref[2]
        number = None if numbers is None else numbers.get(method)
        if method not in self._reissued:
            if number is not None:
                return channel.call_handle(ref[1], number, method, args, decode, tail)
            return channel.call(self._typeid, self._name, method, args, decode)
        typeid: str | None = self._typeid
        name: str | None = self._name
        asked, asked_args = method, args
        ident = threading.get_ident()
        origin = 0  # the request id the call first had (0: not sent yet)
        while True:
            before = channel.asked.get(ident)
            try:
                if number is not None:
                    return channel.call_handle(ref[1], number, method, args, decode)
                return channel.call(typeid, name, asked, asked_args, decode)
            except ConnectionLost:
                if not origin and channel.asked.get(ident) != before:
                    origin = channel.asked[ident]
                again = manager._resumed_elsewhere(channel, epoch)
                if again is None:
                    raise
            # The session goes on through another gateway of the store: the call is
            # asked again there, saying so (a wait's place is kept, see _reissued),
            # by name (a protocol 1 envelope: no handle there yet).
            channel = again
            number = None
            if channel.server_id != self._server_id:
                channel.call(None, None, "create", (self._typeid, self._name, self._args))
                self._server_id = channel.server_id
            typeid, name = None, None
            # Naming the request it first was: what the dead daemon took for that
            # request (a get's items) is this call's, and nothing taken before.
            asked, asked_args = REISSUE, (self._typeid, self._name, method, args, origin)

    def _submit(
        self, decode: Callable[[Any], Any] | None, method: str, args: tuple[Any, ...]
    ) -> Pending:
        """``_call_decoded`` without waiting: the answer is the :class:`Pending`'s."""
        channel = self._manager._channel_or_reconnect()
        if channel.server_id != self._server_id:
            channel.call(None, None, "create", (self._typeid, self._name, self._args))
            self._server_id = channel.server_id
        ref = self._ref
        if ref is None or ref[0] is not channel:
            ref = self._ref = (channel, *channel.resolve(self._typeid, self._name))
        numbers = ref[2]
        number = None if numbers is None else numbers.get(method)
        handle = None if number is None else (ref[1], number)
        pending = channel.submit(self._typeid, self._name, method, args, decode, handle)
        pipeline = current_pipeline()
        if pipeline is not None:
            pipeline.track(pending)
        return pending

    def _extra(self) -> dict[str, Any]:
        return {}

    def __reduce__(self) -> tuple[Any, ...]:
        spawning = get_spawning_popen() is not None
        authkey = self._manager._authkey if spawning else None
        return (
            _rebuild,
            (type(self), self._manager.addresses, self._name, self._args, authkey, self._extra()),
        )

    def __repr__(self) -> str:
        host, port = self._manager.address
        return f"<managerd {self._typeid} {self._name!r} at {host}:{port}>"


# -- queues ---------------------------------------------------------------------------


class Message:
    """A reserved queue item: ``ack()`` it when done, or it comes back."""

    __slots__ = ("_done", "_queue", "deliveries", "delivery_id", "value")

    def __init__(self, queue: Queue, delivery_id: int, value: Any, deliveries: int) -> None:
        self._queue = queue
        self.delivery_id = delivery_id
        self.value = value
        self.deliveries = deliveries
        self._done = False

    def ack(self) -> None:
        """The item is handled: it is never delivered again."""
        self._queue._call("ack", self.delivery_id)
        self._done = True

    def nack(self, requeue: bool = True) -> None:
        """Give the item back (to the front), or drop it to the dead-letter queue."""
        self._queue._call("nack", self.delivery_id, requeue)
        self._done = True

    def extend(self, seconds: float) -> None:
        """Keep the reservation ``seconds`` more from now."""
        self._queue._call("extend", self.delivery_id, seconds)

    def __enter__(self) -> Message:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if self._done:
            return
        if exc_type is None:
            self.ack()
        else:
            self.nack()

    def __repr__(self) -> str:
        return f"<Message {self.delivery_id} of {self._queue.name!r} deliveries={self.deliveries}>"


class Queue(Proxy):
    """A named ``queue.Queue``."""

    _typeid = "Queue"
    # A get asked again after a gateway died is handed the item(s) the dead
    # gateway had taken for it, if any (the etcd store keeps them until the
    # thread's next call), else takes the next. A reservation comes back after
    # its timeout.
    _reissued = frozenset(
        {"get", "get_many", "reserve", "join", "qsize", "empty", "full", "reserved_count"}
    )

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        if block is True and timeout is None:
            self._call_tail("put", dump_one(item))  # the daemon's defaults: not sent
        else:
            self._call("put", dump_one(item), block, timeout)

    def put_nowait(self, item: Any) -> None:
        self._call_tail("put_nowait", dump_one(item))

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        if block is True and timeout is None:
            return self._call_loads("get")
        return self._call_loads("get", block, timeout)

    def get_nowait(self) -> Any:
        return self._call_loads("get_nowait")

    def put_many(
        self, items: Iterable[Any], block: bool = True, timeout: float | None = None
    ) -> None:
        """Put every item, in order, in one round trip."""
        self._call("put_many", _dumps_all(items), block, timeout)

    def get_many(
        self, max_items: int, block: bool = True, timeout: float | None = None
    ) -> list[Any]:
        """Up to ``max_items`` items in one round trip; waits only while there are none."""
        # Unpickled inside the call: an interrupt meanwhile gives them back.
        result: list[Any] = self._call_decoded(_loads_all, "get_many", (max_items, block, timeout))
        return result

    def put_many_async(
        self, items: Iterable[Any], block: bool = True, timeout: float | None = None
    ) -> Pending:
        """``put_many`` sent without waiting: ``.result()`` is its answer (see ``pipeline``).

        A producer keeps a few batches in flight instead of waiting a round
        trip per batch. A batch whose ``result()`` returned is in the queue;
        one given up (``cancel()``, an interrupt, the connection lost) may or
        may not be, as with an interrupted ``put_many``.
        """
        return self._submit(None, "put_many", (_dumps_all(items), block, timeout))

    def get_many_async(
        self, max_items: int, block: bool = True, timeout: float | None = None
    ) -> Pending:
        """``get_many`` sent without waiting: ``.result()`` is the list of items.

        Items of an answer that is given up before its ``result()`` returned
        (``cancel()``, an interrupt in ``result()``, leaving a ``pipeline``
        by an exception, closing the manager) go back to the front of the
        queue: none is lost, none is delivered twice.
        """
        return self._submit(_loads_all, "get_many", (max_items, block, timeout))

    def qsize(self) -> int:
        result: int = self._call("qsize")
        return result

    def empty(self) -> bool:
        return bool(self._call("empty"))

    def full(self) -> bool:
        return bool(self._call("full"))

    def reserve(self, timeout: float | None = None) -> Message:
        """Take the next item with acknowledged delivery (``queue.Empty`` on timeout)."""
        did, value, deliveries = self._call_decoded(_loads_reserved, "reserve", (timeout,))
        return Message(self, did, value, deliveries)

    def task_done(self) -> None:
        """One item taken is handled (``ValueError`` if more than were put)."""
        self._call("task_done")

    def join(self, timeout: float | None = None) -> None:
        """Wait until every item put has been marked ``task_done`` (``TimeoutError``)."""
        self._call("join", timeout)


class JoinableQueue(Queue):
    """A named ``multiprocessing.JoinableQueue`` (a ``Queue`` under its own type name)."""

    _typeid = "JoinableQueue"


class PipeEnd(Proxy):
    """One end of a named pipe, shaped like ``multiprocessing.connection.Connection``."""

    _typeid = "Pipe"

    def __init__(self, manager: Manager, name: str, args: dict[str, Any], end: int = 0) -> None:
        super().__init__(manager, name, args)
        self._end = end

    def _extra(self) -> dict[str, Any]:
        return {"end": self._end}

    def send(self, obj: Any) -> None:
        self._call_tail("send", self._end, dump_one(obj))

    def recv(self, timeout: float | None = None) -> Any:
        """The next object sent from the other end (``EOFError`` once it is closed)."""
        return self._call_loads("recv", self._end, timeout)

    def poll(self, timeout: float | None = 0.0) -> bool:
        return bool(self._call("poll", self._end, timeout))

    def close(self) -> None:
        self._call("close", self._end)

    def __enter__(self) -> PipeEnd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- mappings -------------------------------------------------------------------------

_MISSING: Any = object()


class Dict(Proxy, MutableMapping[Any, Any]):
    """A named ``dict``; keys must be builtin data (str, int, tuple, ...)."""

    _typeid = "dict"

    def __getitem__(self, key: Any) -> Any:
        return self._call_loads("__getitem__", key)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._call_tail("__setitem__", key, dump_one(value))

    def __delitem__(self, key: Any) -> None:
        self._call("__delitem__", key)

    def __contains__(self, key: object) -> bool:
        return bool(self._call("__contains__", key))

    def __len__(self) -> int:
        result: int = self._call("__len__")
        return result

    def __iter__(self) -> Iterator[Any]:
        return iter(self.keys())

    def get(self, key: Any, default: Any = None) -> Any:
        payload = self._call("get", key)
        return default if payload is None else loads(payload)

    def get_many(self, keys: Iterable[Any], default: Any = None) -> list[Any]:
        """The value of each key (``default`` where missing), in one round trip."""
        return [default if p is None else loads(p) for p in self._call("get_many", list(keys))]

    def keys(self) -> list[Any]:  # type: ignore[override]
        result: list[Any] = self._call("keys")
        return result

    def values(self) -> list[Any]:  # type: ignore[override]
        return [loads(p) for p in self._call("values")]

    def items(self) -> list[tuple[Any, Any]]:  # type: ignore[override]
        return [(k, loads(p)) for k, p in self._call("items")]

    def pop(self, key: Any, default: Any = _MISSING) -> Any:
        if default is _MISSING:
            return self._call_loads("pop", key)
        return self._call_loads("pop", key, dump_one(default))

    def popitem(self) -> tuple[Any, Any]:
        key, payload = self._call("popitem")
        return key, loads(payload)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        return self._call_loads("setdefault", key, dump_one(default))

    def update(self, other: Any = (), /, **kwargs: Any) -> None:
        """Set many keys in one round trip."""
        pairs = other.items() if hasattr(other, "items") else other
        encoded = [(k, dumps(v)) for k, v in pairs]
        encoded.extend((k, dumps(v)) for k, v in kwargs.items())
        self._call("update", encoded)

    def clear(self) -> None:
        self._call("clear")

    def copy(self) -> dict[Any, Any]:
        return {k: loads(p) for k, p in self._call("copy").items()}

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Dict):
            return self.copy() == other.copy()
        return self.copy() == other

    __hash__ = None  # type: ignore[assignment]


class List(Proxy, MutableSequence[Any]):
    """A named ``list``."""

    _typeid = "list"

    def __getitem__(self, index: Any) -> Any:
        result = self._call("__getitem__", index)
        if isinstance(index, slice):
            return [loads(p) for p in result]
        return loads(result)

    def __setitem__(self, index: Any, value: Any) -> None:
        if isinstance(index, slice):
            self._call("__setitem__", index, [dumps(v) for v in value])
        else:
            self._call_tail("__setitem__", index, dump_one(value))

    def __delitem__(self, index: Any) -> None:
        self._call("__delitem__", index)

    def __len__(self) -> int:
        result: int = self._call("__len__")
        return result

    def __iter__(self) -> Iterator[Any]:
        return iter(self.copy())

    def __reversed__(self) -> Iterator[Any]:
        return iter([loads(p) for p in self._call("__reversed__")])

    def __contains__(self, value: object) -> bool:
        return bool(self._call("__contains__", dumps(value)))

    def insert(self, index: int, value: Any) -> None:
        self._call_tail("insert", index, dump_one(value))

    def append(self, value: Any) -> None:
        self._call_tail("append", dump_one(value))

    def extend(self, values: Iterable[Any]) -> None:
        self._call("extend", [dumps(v) for v in values])

    def pop(self, index: int = -1) -> Any:
        return self._call_loads("pop", index)

    def remove(self, value: Any) -> None:
        self._call("remove", dumps(value))

    def index(self, value: Any, start: int = 0, stop: int | None = None) -> int:
        result: int = self._call("index", dumps(value), start, stop)
        return result

    def count(self, value: Any) -> int:
        result: int = self._call("count", dumps(value))
        return result

    def reverse(self) -> None:
        self._call("reverse")

    def sort(self, *, key: None = None, reverse: bool = False) -> None:
        """Sort on the daemon (items must be builtin data; no key function)."""
        if key is not None:
            raise TypeError("sort() on a shared list takes no key function")
        self._call("sort", None, reverse)

    def clear(self) -> None:
        self._call("clear")

    def copy(self) -> list[Any]:
        return [loads(p) for p in self._call("copy")]

    def __iadd__(self, values: Iterable[Any]) -> List:
        self.extend(values)
        return self

    def __imul__(self, n: int) -> List:
        self._call("__imul__", n)
        return self

    def __add__(self, other: Iterable[Any]) -> list[Any]:
        return [loads(p) for p in self._call("__add__", [dumps(v) for v in other])]

    def __mul__(self, n: int) -> list[Any]:
        return [loads(p) for p in self._call("__mul__", n)]

    __rmul__ = __mul__

    def __eq__(self, other: object) -> bool:
        if isinstance(other, List):
            return self.copy() == other.copy()
        return self.copy() == other

    __hash__ = None  # type: ignore[assignment]


class Namespace(Proxy):
    """A named ``Namespace``: attributes are shared (names starting with _ are local)."""

    _typeid = "Namespace"

    def __getattribute__(self, attr: str) -> Any:
        # Every public name is shared, even one the proxy class defines
        # (``name``): ``ns.name = "x"`` must read back as "x" (as the stdlib's
        # NamespaceProxy does).
        if attr.startswith("_"):
            return object.__getattribute__(self, attr)
        return loads(object.__getattribute__(self, "_call")("__getattribute__", attr))

    def __setattr__(self, attr: str, value: Any) -> None:
        if attr.startswith("_"):
            object.__setattr__(self, attr, value)
        else:
            self._call_tail("__setattr__", attr, dump_one(value))

    def __delattr__(self, attr: str) -> None:
        if attr.startswith("_"):
            object.__delattr__(self, attr)
        else:
            self._call("__delattr__", attr)

    def _items(self) -> dict[str, Any]:
        return {k: loads(p) for k, p in self._call("items")}

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in sorted(self._items().items()))
        return f"Namespace({inner})"


class Value(Proxy):
    """A named ``multiprocessing.Value``; ``get_lock()`` is the RLock ``"<name>.lock"``."""

    _typeid = "Value"

    @property
    def value(self) -> Any:
        return self._call("get")

    @value.setter
    def value(self, new: Any) -> None:
        self._call("set", new)

    def get(self) -> Any:
        return self._call("get")

    def set(self, new: Any) -> None:
        self._call("set", new)

    def add(self, delta: Any) -> Any:
        """Add ``delta`` atomically on the daemon; returns the new value."""
        return self._call("add", delta)

    def get_lock(self) -> RLock:
        return self._manager.RLock(self._name + ".lock")


class Array(Proxy):
    """A named ``multiprocessing.Array``; ``get_lock()`` is the RLock ``"<name>.lock"``."""

    _typeid = "Array"

    def __len__(self) -> int:
        result: int = self._call("__len__")
        return result

    def __getitem__(self, index: Any) -> Any:
        return self._call("__getitem__", index)

    def __setitem__(self, index: Any, value: Any) -> None:
        if isinstance(index, slice) and not isinstance(value, (bytes, bytearray)):
            value = list(value)
        self._call("__setitem__", index, value)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.tolist())

    def tolist(self) -> Any:
        return self._call("tolist")

    def get_lock(self) -> RLock:
        return self._manager.RLock(self._name + ".lock")


# -- locks ------------------------------------------------------------------------------


class Lock(Proxy):
    """A named ``Lock``; released by the daemon if this client's session ends.

    ``fencing_token`` is the token of this client's current holding: strictly
    greater than that of every earlier holding of the same lock.
    """

    _typeid = "Lock"
    _reissued = frozenset({"acquire", "locked"})

    def __init__(self, manager: Manager, name: str, args: dict[str, Any]) -> None:
        super().__init__(manager, name, args)
        self._local = threading.local()
        #: thread -> (token, session epoch, server id) of each holding
        self._held: dict[int, tuple[int, int, str]] = {}
        manager._lock_proxies.add(self)

    def _forget_holdings(self) -> None:
        """After a fork, in the child: the parent's holdings are not the child's."""
        self._held = {}

    def _call(self, method: str, *args: Any) -> Any:
        if self._held:  # holdings the daemon may have released since (nothing held: none)
            self._check_held()
        return super()._call(method, *args)

    def _check_held(self) -> None:
        """``LockLost`` if this client's holdings went with a session or a daemon."""
        channel = self._manager._channel_or_reconnect()
        epoch = self._manager.session_epoch
        lost = [(t, sid) for t, (_, e, sid) in self._held.items() if e != epoch]
        if lost:
            for thread, _ in lost:
                del self._held[thread]
            old = lost[0][1]
            if old != channel.server_id:
                why = (
                    f"the daemon restarted (server id {old} is now {channel.server_id}); "
                    "a restarted daemon holds nothing for anyone"
                )
            else:
                why = "this client's session ended (partition or lease expiry)"
            raise LockLost(f"{self._typeid} {self._name!r} was released by the daemon: {why}")

    def _hold(self, token: int) -> None:
        self._held[self._holder_key()] = (token, self._manager.session_epoch, self._server_id)

    def _holder_key(self) -> int:
        return 0  # a Lock belongs to the client, not to a thread

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if blocking is True and type(timeout) is int and timeout == -1:
            token = self._call("acquire")  # the daemon's defaults: not sent
        else:
            token = self._call("acquire", blocking, timeout)
        if token is False:
            return False
        self._hold(token)
        return True

    def release(self) -> None:
        try:
            self._call("release")
        except LockLost:
            self._lost()  # the daemon found the holding gone: not held any more
            raise
        self._released()

    def _released(self) -> None:
        self._held.pop(self._holder_key(), None)

    def _lost(self) -> None:
        self._held.pop(self._holder_key(), None)

    def locked(self) -> bool:
        return bool(self._call("locked"))

    @property
    def fencing_token(self) -> int | None:
        """The fencing token of this client's holding, None when not held."""
        held = self._held.get(self._holder_key())
        return held[0] if held else None

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class RLock(Lock):
    """A named ``RLock``, owned by one thread of one client."""

    _typeid = "RLock"

    def __init__(self, manager: Manager, name: str, args: dict[str, Any]) -> None:
        self._depth: dict[int, int] = {}
        super().__init__(manager, name, args)

    def _forget_holdings(self) -> None:
        super()._forget_holdings()
        self._depth = {}

    def _holder_key(self) -> int:
        return threading.get_ident()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        got = super().acquire(blocking, timeout)
        if got:
            key = self._holder_key()
            self._depth[key] = self._depth.get(key, 0) + 1
        return got

    def _lost(self) -> None:
        super()._lost()
        self._depth.pop(self._holder_key(), None)

    def _released(self) -> None:
        key = self._holder_key()
        depth = self._depth.get(key, 0) - 1
        if depth > 0:
            self._depth[key] = depth
        else:
            self._depth.pop(key, None)
            self._held.pop(key, None)


class Semaphore(Lock):
    """A named ``Semaphore``; permits come back if this client's session ends."""

    _typeid = "Semaphore"
    # An acquire asked again after a gateway died is the request it first was: the
    # etcd store keeps its place in line, and a permit the dead gateway granted it
    # (the answer lost) is the one it gets: never a second one taken.
    _reissued = frozenset({"acquire", "get_value"})

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        # threading.Semaphore: None waits for ever, any negative timeout does not
        # wait (the daemon takes -1 to mean "for ever", as older clients sent it).
        if timeout == -1 and not isinstance(timeout, bool):
            timeout = 0
        if blocking is True and timeout is None:
            token = self._call("acquire")  # the daemon's default: for ever
        else:
            token = self._call("acquire", blocking, timeout)
        if token is False:
            return False
        self._hold(token)
        return True

    def release(self, n: int = 1) -> None:
        self._call("release", n)
        self._held.pop(self._holder_key(), None)

    def get_value(self) -> int:
        result: int = self._call("get_value")
        return result


class BoundedSemaphore(Semaphore):
    """A named ``BoundedSemaphore``: releasing more than acquired is a ValueError."""

    _typeid = "BoundedSemaphore"


# -- events, conditions, barriers ------------------------------------------------------------


class Event(Proxy):
    """A named ``Event``."""

    _typeid = "Event"
    _reissued = frozenset({"wait", "is_set"})

    def is_set(self) -> bool:
        return bool(self._call("is_set"))

    def set(self) -> None:
        self._call("set")

    def clear(self) -> None:
        self._call("clear")

    def wait(self, timeout: float | None = None) -> bool:
        return bool(self._call("wait", timeout))


class Condition(RLock):
    """A named ``Condition`` over a named Lock or RLock."""

    _typeid = "Condition"
    # A wait asked again after a gateway died goes on where it was: still a waiter in
    # its place in notify order, or notified (or timed out) and taking the lock back
    # (the etcd store's ``conditions.py`` says where a place cannot be kept).
    # ``wait_for`` is this client's loop of waits. An acquire is the lock's acquire
    # asked again: its place in the lock's line is kept, or its holding is its own.
    _reissued = frozenset({"wait", "locked", "acquire"})

    def __init__(self, manager: Manager, name: str, args: dict[str, Any]) -> None:
        super().__init__(manager, name, args)
        #: Per thread: ``with`` exits that must not release (see ``wait``).
        self._lost_exits: dict[int, int] = {}

    def wait(self, timeout: float | None = None) -> bool:
        """Release the lock until notified (True) or ``timeout`` passes (False).

        Interrupted (Ctrl-C, an exception from a signal handler...), it takes
        the lock back before the exception goes on, as
        ``threading.Condition.wait`` does in its ``finally``: code in the
        ``with`` block's ``finally`` holds the lock, and the block's exit
        releases it. A second interrupt while it waits for the lock gives
        up: the exception goes on without the lock, and this thread's
        ``with`` exits do not release it (they would raise ``RuntimeError``
        over the interrupt).
        """
        try:
            return bool(self._call("wait", timeout))
        except BaseException as exc:
            if abandoned_by(exc):
                self._restore()
            raise

    def _restore(self) -> None:
        key = self._holder_key()
        held: Any = False
        try:
            held = self._call("restore")
        finally:
            if not held:
                depth = self._depth.pop(key, 0)
                self._held.pop(key, None)
                if depth:
                    self._lost_exits[key] = depth

    def __exit__(self, *exc: object) -> None:
        key = self._holder_key()
        lost = self._lost_exits.get(key, 0)
        if lost:
            if lost > 1:
                self._lost_exits[key] = lost - 1
            else:
                del self._lost_exits[key]
            return
        self.release()

    def wait_for(self, predicate: Callable[[], Any], timeout: float | None = None) -> Any:
        end = None if timeout is None else time.monotonic() + timeout
        result = predicate()
        while not result:
            if end is not None:
                remaining = end - time.monotonic()
                if remaining <= 0:
                    break
                self.wait(remaining)
            else:
                self.wait()
            result = predicate()
        return result

    def notify(self, n: int = 1) -> None:
        self._call("notify", n)

    def notify_all(self) -> None:
        self._call("notify_all")


class Barrier(Proxy):
    """A named ``Barrier``; breaks if a waiting client's session ends."""

    _typeid = "Barrier"
    # A party that arrived through a gateway that died waits on through another in
    # its round, with its index (the etcd store notes each arrival): never counted
    # twice, the round not broken.
    _reissued = frozenset({"wait", "state"})

    def wait(self, timeout: float | None = None) -> int:
        result: int = self._call("wait", timeout)
        return result

    def abort(self) -> None:
        self._call("abort")

    def reset(self) -> None:
        self._call("reset")

    @property
    def parties(self) -> int:
        result: int = self._call("state")[0]
        return result

    @property
    def n_waiting(self) -> int:
        result: int = self._call("state")[1]
        return result

    @property
    def broken(self) -> bool:
        return bool(self._call("state")[2])
