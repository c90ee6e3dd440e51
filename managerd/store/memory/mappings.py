"""Dicts, lists and namespaces (``Value`` and ``Array`` are in ``values.py``).

Dict keys and namespace attribute names are builtin data, decoded safely
with the request; dict values, list items and attributes are payloads
(opaque pickled bytes). The few list operations that compare items
(``index``, ``count``, ``remove``, ``in``, ``sort``) decode them with the
restricted unpickler, falling back to comparing bytes for items of classes
the daemon does not decode.

A dict, list or namespace may be created with contents (``contents``: a
list of payloads, or of ``(key, payload)`` pairs), as ``dict(...)`` and
``list(...)`` are. They are part of the creation, journaled in its one
record. A later get-or-create that names contents must name the ones the
object was created with (equal values; what it holds now does not matter,
so every process can run the same ``m.dict("config", defaults)``); one
created without contents was created empty.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Final

from managerd.safepickle import SafeDecoder
from managerd.store.api import BadArgument, Call, Conv, NoAttribute, exposed
from managerd.store.memory.base import SharedObject, sequence_index
from managerd.store.memory.records import DictOp, ListOp, NamespaceOp
from managerd.store.stats import SizeStats
from managerd_client.errors import ArgumentConflict, ForbiddenPayload

_DECODER: Final = SafeDecoder()
NO_DEFAULT: Final = object()


def _check_payload(value: Any) -> bytes:
    if not isinstance(value, bytes):
        raise BadArgument("values travel as pickled bytes")
    return value


def _check_key(key: Any) -> Any:
    try:
        hash(key)
    except TypeError as exc:
        raise BadArgument(f"unhashable key: {exc}") from None
    return key


def _payload_list(contents: Any) -> list[bytes]:
    """Initial list contents: a list of payloads."""
    if not isinstance(contents, (list, tuple)):
        raise BadArgument("initial contents travel as a list of pickled items")
    return [_check_payload(v) for v in contents]


def _payload_pairs(contents: Any, check_key: Callable[[Any], Any]) -> dict[Any, bytes]:
    """Initial mapping contents: ``(key, payload)`` pairs (a later key wins, as in dict())."""
    if not isinstance(contents, (list, tuple)):
        raise BadArgument("initial contents travel as a list of (key, pickled value) pairs")
    out: dict[Any, bytes] = {}
    for pair in contents:
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise BadArgument("initial contents travel as (key, pickled value) pairs")
        out[check_key(pair[0])] = _check_payload(pair[1])
    return out


class _Contents(SharedObject):
    """Creation with initial ``contents``; an attach naming others is a conflict."""

    builtin_type_errors = True

    create_params = ("contents",)

    def _same_contents(self, created: Any, given: Any) -> bool:
        raise NotImplementedError

    def check_conflicts(self, args: dict[str, Any]) -> None:
        super().check_conflicts(args)
        if "contents" not in args:
            return
        if not self._same_contents(self.created_with.get("contents", []), args["contents"]):
            raise ArgumentConflict(
                f"{self.typeid} {self.name!r} exists, created with other contents; "
                "attach without contents, or with the ones it was created with"
            )


def _same_mapping(a: dict[Any, bytes], b: dict[Any, bytes]) -> bool:
    return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)


def _found_after_unpickling(key: Any) -> bool:
    """Whether a fresh copy of ``key`` (unpickled) finds the original in a dict."""
    if isinstance(key, float):
        return key == key  # NaN is not equal to a copy of itself
    if isinstance(key, (tuple, frozenset)):
        return all(_found_after_unpickling(k) for k in key)
    return True


class Dict(_Contents):
    """``dict``: builtin keys, payload values."""

    typeid = "dict"
    snapshot_conv: ClassVar[Conv] = Conv.MAPPING
    durable = True

    def __init__(self, name: str, loop: asyncio.AbstractEventLoop, contents: Any = ()) -> None:
        super().__init__(name, loop)
        self.data: dict[Any, bytes] = _payload_pairs(contents, _check_key)
        self.writes_total = 0

    def _same_contents(self, created: Any, given: Any) -> bool:
        return _same_mapping(_payload_pairs(created, _check_key), _payload_pairs(given, _check_key))

    @exposed(result=Conv.PAYLOAD)
    def __getitem__(self, call: Call, key: Any) -> bytes:
        return self.data[_check_key(key)]

    @exposed(value=Conv.PAYLOAD, mutates=True)
    def __setitem__(self, call: Call, key: Any, value: bytes) -> None:
        self.data[_check_key(key)] = _check_payload(value)
        self.writes_total += 1
        self._j(DictOp.SET, key, value)

    @exposed(mutates=True)
    def __delitem__(self, call: Call, key: Any) -> None:
        del self.data[_check_key(key)]
        self._j_removed(key)

    @exposed()
    def __contains__(self, call: Call, key: Any) -> bool:
        return _check_key(key) in self.data

    @exposed()
    def __len__(self, call: Call) -> int:
        return len(self.data)

    @exposed(result=Conv.PAYLOAD, default=Conv.PAYLOAD)
    def get(self, call: Call, key: Any, default: bytes | None = None) -> bytes | None:
        return self.data.get(_check_key(key), default)

    @exposed(result=Conv.PAYLOADS)
    def get_many(self, call: Call, keys: list[Any]) -> list[bytes | None]:
        """The value of each key, ``None`` where it is missing; one round trip."""
        if not isinstance(keys, (list, tuple)):
            raise BadArgument("get_many takes a list of keys")
        data = self.data
        return [data.get(_check_key(k)) for k in keys]

    @exposed(result=Conv.PAYLOAD, default=Conv.PAYLOAD, mutates=True)
    def pop(self, call: Call, key: Any, default: Any = NO_DEFAULT) -> bytes:
        if _check_key(key) in self.data:
            value = self.data.pop(key)
            self._j_removed(key)
            return value
        if default is NO_DEFAULT:
            raise KeyError(key)
        return default  # type: ignore[no-any-return]

    @exposed(result=Conv.PAIR, mutates=True)
    def popitem(self, call: Call) -> tuple[Any, bytes]:
        if not self.data:
            raise KeyError("popitem(): dictionary is empty")
        key, value = self.data.popitem()
        self._j_removed(key)
        return key, value

    def would_hand_out(
        self, method: str, call: Call, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> bytes | None:
        if method in ("pop", "setdefault"):
            key = args[0] if args else kwargs.get("key")
            return self.get(call, key)
        if method == "popitem":
            return next(reversed(self.data.values()), None)
        return None

    def _j_removed(self, key: Any) -> None:
        """Journal that ``key`` left: by key, unless replay could not find it.

        Replay unpickles a fresh key, and a NaN matches only itself (``dict``
        compares by identity first): ``del d[nan]`` would find nothing and the
        entry would come back after a restart. Such a removal journals the
        whole dict instead (rare: only keys holding a NaN).
        """
        if _found_after_unpickling(key):
            self._j(DictOp.DEL, key)
        else:
            self._j(DictOp.CLEAR)
            self._j(DictOp.UPDATE, list(self.data.items()))

    @exposed(result=Conv.PAYLOAD, default=Conv.PAYLOAD, mutates=True)
    def setdefault(self, call: Call, key: Any, default: bytes) -> bytes:
        if _check_key(key) not in self.data:
            self.data[key] = _check_payload(default)
            self._j(DictOp.SET, key, default)
        return self.data[key]

    @exposed(pairs=Conv.PAIRS, mutates=True)
    def update(self, call: Call, pairs: Iterable[tuple[Any, bytes]] = ()) -> None:
        """Set many keys in one round trip (``pairs`` of key and payload)."""
        if not isinstance(pairs, (list, tuple)):
            raise BadArgument("update takes a list of (key, value) pairs")
        new = {}
        for pair in pairs:
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise BadArgument("update takes (key, value) pairs")
            new[_check_key(pair[0])] = _check_payload(pair[1])
        self.data.update(new)
        self.writes_total += len(new)
        self._j(DictOp.UPDATE, list(new.items()))

    @exposed(mutates=True)
    def clear(self, call: Call) -> None:
        self.data.clear()
        self._j(DictOp.CLEAR)

    def apply(self, effect: tuple[Any, ...]) -> None:
        op = effect[0]
        if op == DictOp.SET:
            self.data[effect[1]] = effect[2]
        elif op == DictOp.DEL:
            self.data.pop(effect[1], None)
        elif op == DictOp.UPDATE:
            self.data.update(effect[1])
        elif op == DictOp.CLEAR:
            self.data.clear()
        else:
            raise ValueError(f"unknown dict record {op!r}")

    def dump_state(self) -> Any:
        return list(self.data.items())

    def load_state(self, state: Any) -> None:
        self.data = dict(state)

    @exposed()
    def keys(self, call: Call) -> list[Any]:
        return list(self.data)

    @exposed(result=Conv.PAYLOADS)
    def values(self, call: Call) -> list[bytes]:
        return list(self.data.values())

    @exposed(result=Conv.PAIRS)
    def items(self, call: Call) -> list[tuple[Any, bytes]]:
        return list(self.data.items())

    @exposed(result=Conv.MAPPING)
    def copy(self, call: Call) -> dict[Any, bytes]:
        return dict(self.data)

    def snapshot(self) -> dict[Any, bytes]:
        return dict(self.data)

    def stats(self) -> SizeStats:
        return SizeStats(self.name, self.typeid, self.creation_args(), len=len(self.data))


def _decoded(payload: bytes) -> tuple[bool, Any]:
    try:
        return True, _DECODER.loads(payload)
    except ForbiddenPayload:
        return False, None


def _same(a: bytes, b: bytes) -> bool:
    """Equality of two payloads: by value when both decode, else by bytes."""
    if a == b:
        return True
    ok_a, va = _decoded(a)
    ok_b, vb = _decoded(b)
    return ok_a and ok_b and bool(va == vb)


class List(_Contents):
    """``list`` of payloads."""

    typeid = "list"
    snapshot_conv: ClassVar[Conv] = Conv.PAYLOADS
    durable = True

    def __init__(self, name: str, loop: asyncio.AbstractEventLoop, contents: Any = ()) -> None:
        super().__init__(name, loop)
        self.items: list[bytes] = _payload_list(contents)

    def _same_contents(self, created: Any, given: Any) -> bool:
        a, b = _payload_list(created), _payload_list(given)
        return len(a) == len(b) and all(map(_same, a, b))

    @exposed(result=Conv.ITEM_OR_ITEMS)
    def __getitem__(self, call: Call, index: Any) -> bytes | list[bytes]:
        return self.items[sequence_index(index)]

    @exposed(value=Conv.ITEM_OR_ITEMS, mutates=True)
    def __setitem__(self, call: Call, index: Any, value: Any) -> None:
        index = sequence_index(index)
        if isinstance(index, slice):
            if not isinstance(value, (list, tuple)):
                raise BadArgument("can only assign a list of items to a slice")
            value = [_check_payload(v) for v in value]
            self.items[index] = value
        else:
            self.items[index] = _check_payload(value)
        self._j(ListOp.SET, index, value)

    @exposed(mutates=True)
    def __delitem__(self, call: Call, index: Any) -> None:
        del self.items[sequence_index(index)]
        self._j(ListOp.DEL, index)

    @exposed()
    def __len__(self, call: Call) -> int:
        return len(self.items)

    @exposed(value=Conv.PAYLOAD)
    def __contains__(self, call: Call, value: bytes) -> bool:
        return any(_same(item, value) for item in self.items)

    @exposed(value=Conv.PAYLOAD, mutates=True)
    def append(self, call: Call, value: bytes) -> None:
        self.items.append(_check_payload(value))
        self._j(ListOp.EXTEND, [value])

    @exposed(values=Conv.PAYLOADS, mutates=True)
    def extend(self, call: Call, values: list[bytes]) -> None:
        if not isinstance(values, (list, tuple)):
            raise BadArgument("extend takes a list of items")
        values = [_check_payload(v) for v in values]
        self.items.extend(values)
        self._j(ListOp.EXTEND, values)

    @exposed(value=Conv.PAYLOAD, mutates=True)
    def insert(self, call: Call, index: int, value: bytes) -> None:
        if not isinstance(index, int):
            raise BadArgument("insert index must be an int")
        index = int(index)  # a bool is 0 or 1, as for list.insert
        self.items.insert(index, _check_payload(value))
        self._j(ListOp.INSERT, index, value)

    @exposed(result=Conv.PAYLOAD, mutates=True)
    def pop(self, call: Call, index: int = -1) -> bytes:
        # No check for an empty list first: list.pop checks its argument
        # first (pop(2**63) is an OverflowError, pop("1") a TypeError).
        item = self.items.pop(index)
        self._j(ListOp.DEL, index)
        return item

    def would_hand_out(
        self, method: str, call: Call, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> bytes | None:
        if method != "pop":
            return None
        index = args[0] if args else kwargs.get("index", -1)
        try:
            item = self.items[sequence_index(index)]
        except (IndexError, TypeError):
            return None  # pop itself raises the right error
        return item if isinstance(item, bytes) else None

    @exposed(value=Conv.PAYLOAD, mutates=True)
    def remove(self, call: Call, value: bytes) -> None:
        for i, item in enumerate(self.items):
            if _same(item, value):
                del self.items[i]
                self._j(ListOp.DEL, i)
                return
        raise ValueError("list.remove(x): x not in list")

    @exposed(value=Conv.PAYLOAD)
    def index(self, call: Call, value: bytes, start: int = 0, stop: int | None = None) -> int:
        items = self.items
        begin, end, _ = slice(start, stop).indices(len(items))
        for i in range(begin, end):
            if _same(items[i], value):
                return i
        raise ValueError("list.index(x): x not in list")

    @exposed(value=Conv.PAYLOAD)
    def count(self, call: Call, value: bytes) -> int:
        return sum(1 for item in self.items if _same(item, value))

    @exposed(mutates=True)
    def reverse(self, call: Call) -> None:
        self.items.reverse()
        self._j(ListOp.ALL, self.items)

    @exposed(mutates=True)
    def sort(self, call: Call, key: None = None, reverse: bool = False) -> None:
        if key is not None:
            raise BadArgument("sort() on a shared list takes no key function")
        decoded = []
        for item in self.items:
            ok, value = _decoded(item)
            if not ok:
                raise BadArgument("sort() on a shared list needs items of builtin types")
            decoded.append(value)
        try:
            order = sorted(range(len(decoded)), key=decoded.__getitem__, reverse=bool(reverse))
        except TypeError as exc:  # items that do not compare ('<' between int and str)
            raise BadArgument(str(exc)) from None
        self.items = [self.items[i] for i in order]
        self._j(ListOp.ALL, self.items)

    @exposed(mutates=True)
    def clear(self, call: Call) -> None:
        self.items.clear()
        self._j(ListOp.ALL, [])

    @exposed(result=Conv.PAYLOADS)
    def copy(self, call: Call) -> list[bytes]:
        return list(self.items)

    @exposed(other=Conv.PAYLOADS, result=Conv.PAYLOADS)
    def __add__(self, call: Call, other: list[bytes]) -> list[bytes]:
        return self.items + [_check_payload(v) for v in other]

    @exposed(result=Conv.PAYLOADS)
    def __mul__(self, call: Call, n: int) -> list[bytes]:
        return self.items * n

    # Not named __rmul__ here: a reflected operator with a ``call`` argument
    # is not a valid signature for type checkers.
    @exposed("__rmul__", result=Conv.PAYLOADS)
    def rmul(self, call: Call, n: int) -> list[bytes]:
        return self.items * n

    @exposed(mutates=True)
    def __imul__(self, call: Call, n: int) -> None:
        if not isinstance(n, int):
            raise BadArgument("can't multiply a list by a non-int")
        self.items *= int(n)  # a bool is 0 or 1, as for list
        self._j(ListOp.ALL, self.items)

    @exposed(result=Conv.PAYLOADS)
    def __reversed__(self, call: Call) -> list[bytes]:
        return self.items[::-1]

    def apply(self, effect: tuple[Any, ...]) -> None:
        op = effect[0]
        if op == ListOp.SET:
            self.items[effect[1]] = effect[2]
        elif op == ListOp.DEL:
            del self.items[effect[1]]
        elif op == ListOp.EXTEND:
            self.items.extend(effect[1])
        elif op == ListOp.INSERT:
            self.items.insert(effect[1], effect[2])
        elif op == ListOp.ALL:
            self.items = list(effect[1])
        else:
            raise ValueError(f"unknown list record {op!r}")

    def dump_state(self) -> Any:
        return list(self.items)

    def load_state(self, state: Any) -> None:
        self.items = list(state)

    def snapshot(self) -> list[bytes]:
        return list(self.items)

    def stats(self) -> SizeStats:
        return SizeStats(self.name, self.typeid, self.creation_args(), len=len(self.items))


class Namespace(_Contents):
    """``multiprocessing.managers.Namespace``: attributes holding payloads."""

    typeid = "Namespace"
    snapshot_conv: ClassVar[Conv] = Conv.MAPPING
    durable = True

    def __init__(self, name: str, loop: asyncio.AbstractEventLoop, contents: Any = ()) -> None:
        super().__init__(name, loop)
        self.attrs: dict[str, bytes] = _payload_pairs(contents, self._attr)

    def _same_contents(self, created: Any, given: Any) -> bool:
        return _same_mapping(_payload_pairs(created, self._attr), _payload_pairs(given, self._attr))

    @staticmethod
    def _attr(name: Any) -> str:
        if not isinstance(name, str):
            raise BadArgument("attribute name must be a string")
        return name

    @exposed("__getattribute__", result=Conv.PAYLOAD)
    def getattr(self, call: Call, name: str) -> bytes:
        try:
            return self.attrs[self._attr(name)]
        except KeyError:
            raise NoAttribute(f"'Namespace' object has no attribute {name!r}") from None

    @exposed("__setattr__", value=Conv.PAYLOAD, mutates=True)
    def setattr(self, call: Call, name: str, value: bytes) -> None:
        self.attrs[self._attr(name)] = _check_payload(value)
        self._j(NamespaceOp.SET, name, value)

    @exposed("__delattr__", mutates=True)
    def delattr(self, call: Call, name: str) -> None:
        try:
            del self.attrs[self._attr(name)]
        except KeyError:
            raise NoAttribute(f"'Namespace' object has no attribute {name!r}") from None
        self._j(NamespaceOp.DEL, name)

    def apply(self, effect: tuple[Any, ...]) -> None:
        if effect[0] == NamespaceOp.SET:
            self.attrs[effect[1]] = effect[2]
        elif effect[0] == NamespaceOp.DEL:
            self.attrs.pop(effect[1], None)
        else:
            raise ValueError(f"unknown namespace record {effect[0]!r}")

    def dump_state(self) -> Any:
        return dict(self.attrs)

    def load_state(self, state: Any) -> None:
        self.attrs = dict(state)

    @exposed(result=Conv.PAIRS)
    def items(self, call: Call) -> list[tuple[str, bytes]]:
        return list(self.attrs.items())

    def snapshot(self) -> dict[str, bytes]:
        return dict(self.attrs)

    def stats(self) -> SizeStats:
        return SizeStats(self.name, self.typeid, self.creation_args(), len=len(self.attrs))
