"""Value and dict on etcd: one key with compare-and-set, and a key per entry.

**Value** ``/m/v/<name>``: the number kept with ``marshal`` (builtin
numbers and bytes, NaN and infinities included; nothing is unpickled).
``add`` is a compare-and-set on the key's mod_revision, retried on
conflict, so concurrent adds through any gateways all count.

**dict** ``/m/d/<name>/<key>``: one etcd key per entry, its value the
entry's original key (a literal) and the payload (opaque bytes). Keys are
literals (``str``, ``bytes``, ``int``, ``float``, ``bool``, ``None`` and
tuples of these); equal numbers are one entry, as in a ``dict`` (``1``,
``1.0`` and ``True`` are the same key; the entry keeps the form that made
it). **Differs from the memory store**: other keys (a ``frozenset``, a NaN)
are refused. Order is the dict's: by each key's create_revision (a change
keeps an entry's place, a delete and put moves it last), which etcd sorts
for each listing (fine for small dicts);
``update`` of more than 100 entries is several Txns (not atomic).
"""

from __future__ import annotations

import ast
import marshal
import math
from collections.abc import Iterable
from typing import Any

from managerd.store.api import BadArgument
from managerd.store.etcd.client import EtcdClient
from managerd.store.etcd.kv import (
    Compare,
    Delete,
    KeyValue,
    Op,
    Put,
    Target,
    name_key,
    prefix_end,
)
from managerd.store.etcd.sessions import DEFAULT_ROOT

_UPDATE_BATCH = 100  # puts per Txn, within etcd's --max-txn-ops (128)
_MISSING = object()


def literal(value: Any) -> bytes:
    """``value`` as a literal ``ast.literal_eval`` reads back; BadArgument if it is not one."""
    if isinstance(value, float) and not math.isfinite(value):
        raise BadArgument(f"{value!r} cannot be kept in etcd")
    if isinstance(value, tuple):
        for v in value:
            literal(v)
    elif not isinstance(value, (str, bytes, int, float, type(None))):
        raise BadArgument(f"a {type(value).__name__} cannot be a key here (the etcd store)")
    return repr(value).encode()


def from_literal(data: bytes) -> Any:
    return ast.literal_eval(data.decode())


def _canonical(key: Any) -> Any:
    """The one form of keys a dict holds equal (``True``, ``1`` and ``1.0`` are one key)."""
    if isinstance(key, tuple):
        return tuple(_canonical(k) for k in key)
    if isinstance(key, bool):
        return int(key)
    if isinstance(key, float) and key.is_integer():
        return int(key)
    return key


class EtcdValue:
    """The Value ``name``: ``create`` it once; then ``get``, ``set``, ``add``."""

    def __init__(self, client: EtcdClient, name: str, *, root: bytes = DEFAULT_ROOT) -> None:
        self.client = client
        self.key = root + b"v/" + name_key(name)

    async def create(self, value: Any) -> None:
        await self.client.txn(
            [Compare(self.key, Target.CREATE, "==", 0)],
            [Put(self.key, marshal.dumps(value))],
            idempotent=True,
        )

    async def get(self) -> Any:
        kv = await self.client.get(self.key)
        return None if kv is None else marshal.loads(kv.value)

    async def set(self, value: Any) -> None:
        await self.client.put(self.key, marshal.dumps(value))

    async def update(self, change: Any) -> Any:
        """Apply ``change(old) -> new`` atomically (compare-and-set, retried); the new value."""
        while True:
            kv = await self.client.get(self.key)
            old = None if kv is None else marshal.loads(kv.value)
            new = change(old)
            revision = 0 if kv is None else kv.mod_revision
            done = await self.client.txn(
                [Compare(self.key, Target.MOD, "==", revision)], [Put(self.key, marshal.dumps(new))]
            )
            if done.succeeded:
                return new


def _entry(key: Any, payload: bytes) -> bytes:
    form = literal(key)
    return b"%d:" % len(form) + form + payload


def _parse(value: bytes) -> tuple[Any, bytes]:
    size, _, rest = value.partition(b":")
    n = int(size)
    return from_literal(rest[:n]), rest[n:]


class EtcdDict:
    """The dict ``name``: a key per entry (see the module docstring)."""

    def __init__(self, client: EtcdClient, name: str, *, root: bytes = DEFAULT_ROOT) -> None:
        self.client = client
        self.prefix = root + b"d/" + name_key(name) + b"/"
        self.end = prefix_end(self.prefix)

    def _key(self, key: Any) -> bytes:
        return self.prefix + literal(_canonical(key))

    async def _kv(self, key: Any) -> KeyValue | None:
        return await self.client.get(self._key(key))

    async def getitem(self, key: Any) -> bytes:
        kv = await self._kv(key)
        if kv is None:
            raise KeyError(key)
        return _parse(kv.value)[1]

    async def get(self, key: Any, default: Any = None) -> Any:
        kv = await self._kv(key)
        return default if kv is None else _parse(kv.value)[1]

    async def setitem(self, key: Any, payload: bytes) -> None:
        k = self._key(key)
        # The entry keeps the form of the key that made it (dict's own rule).
        kv = await self.client.get(k)
        form = key if kv is None else _parse(kv.value)[0]
        await self.client.put(k, _entry(form, payload))

    async def delitem(self, key: Any) -> None:
        done = await self.client.txn(
            [Compare(self._key(key), Target.CREATE, "!=", 0)], [Delete(self._key(key))]
        )
        if not done.succeeded:
            raise KeyError(key)

    async def contains(self, key: Any) -> bool:
        return await self._kv(key) is not None

    async def len(self) -> int:
        return (await self.client.range(self.prefix, self.end, count_only=True)).count

    async def pop(self, key: Any, default: Any = _MISSING) -> Any:
        k = self._key(key)
        while True:
            kv = await self.client.get(k)
            if kv is None:
                if default is _MISSING:
                    raise KeyError(key)
                return default
            done = await self.client.txn(
                [Compare(k, Target.MOD, "==", kv.mod_revision)], [Delete(k)]
            )
            if done.succeeded:
                return _parse(kv.value)[1]

    async def popitem(self) -> tuple[Any, bytes]:
        while True:
            newest = await self.client.range(self.prefix, self.end, limit=1, newest_first=True)
            if not newest.kvs:
                raise KeyError("popitem(): dictionary is empty")
            kv = newest.kvs[0]
            done = await self.client.txn(
                [Compare(kv.key, Target.MOD, "==", kv.mod_revision)], [Delete(kv.key)]
            )
            if done.succeeded:
                return _parse(kv.value)

    async def setdefault(self, key: Any, payload: bytes) -> bytes:
        k = self._key(key)
        while True:
            kv = await self.client.get(k)
            if kv is not None:
                return _parse(kv.value)[1]
            done = await self.client.txn(
                [Compare(k, Target.CREATE, "==", 0)], [Put(k, _entry(key, payload))]
            )
            if done.succeeded:
                return payload

    def puts(self, pairs: Iterable[tuple[Any, bytes]]) -> list[Op]:
        """The puts that set ``pairs`` (for a Txn of the caller's)."""
        return [Put(self._key(k), _entry(k, v)) for k, v in pairs]

    async def update(self, pairs: Iterable[tuple[Any, bytes]]) -> None:
        ops = self.puts(pairs)
        for i in range(0, len(ops), _UPDATE_BATCH):
            await self.client.txn([], ops[i : i + _UPDATE_BATCH])

    async def clear(self) -> None:
        await self.client.delete(self.prefix, self.end)

    async def items(self) -> list[tuple[Any, bytes]]:
        """In ``dict`` order: an entry's place is its key's creation (a change keeps it)."""
        read = await self.client.range(self.prefix, self.end, oldest_first=True)
        return [_parse(kv.value) for kv in read.kvs]
