"""Value and dict on etcd: one key with compare-and-set, and a key per entry.

**Value** ``/m/v/<name>``: the number kept with ``marshal`` (builtin
numbers and bytes, NaN and infinities included; nothing is unpickled).
``add`` is a compare-and-set on the key's mod_revision, retried on
conflict, so concurrent adds through any gateways all count.

**dict** ``/m/d/<name>/<digest>``: one etcd key per entry. Every key the
memory store takes is taken (any hashable value the request decoder
produced: numbers, strings, bytes, tuples, frozensets, ranges, the classes
``allowed_classes`` names...): the etcd key is a digest of the key's
canonical form (``_canonical``: equal keys have one form, so ``1``, ``1.0``,
``True`` and ``1+0j`` are one entry, a frozenset's order does not matter),
and the entry's value is the key as first given, pickled (read back with
the daemon's restricted decoder), then the payload (opaque bytes). A key
that is not equal to a copy of itself (a NaN, or a tuple holding one) is
an entry of its own each time, under a random etcd key, as in a ``dict``
where a NaN unpickled afresh finds nothing. Order is the dict's: by each
key's create_revision (a change keeps an entry's place, a delete and put
moves it last), which etcd sorts for each listing (fine for small dicts);
``update`` of more than 100 entries is several Txns (not atomic).
"""

from __future__ import annotations

import hashlib
import marshal
import pickle
import secrets
from collections.abc import Callable, Iterable
from typing import Any, Final, cast

from managerd.safepickle import SafeDecoder
from managerd.store.api import BadArgument
from managerd.store.etcd.client import EtcdClient
from managerd.store.etcd.kv import (
    Compare,
    Delete,
    Get,
    KeyValue,
    Op,
    Put,
    RangeResult,
    Target,
    name_key,
    prefix_end,
)
from managerd.store.etcd.sessions import DEFAULT_ROOT

_UPDATE_BATCH = 100  # puts per Txn, within etcd's --max-txn-ops (128)
_MISSING = object()
_DECODER: Final = SafeDecoder()


def _canonical(key: Any) -> bytes | None:
    """One byte form per class of equal keys; None for a key not equal to a copy of
    itself (a NaN inside): each such key is an entry of its own."""
    if key is None:
        return b"n"
    if isinstance(key, (bool, int)):
        return b"i%d" % int(key)
    if isinstance(key, float):
        if key != key:
            return None
        if key.is_integer():
            return b"i%d" % int(key)
        return b"f" + repr(key).encode()
    if isinstance(key, complex):
        if key.imag == 0:
            return _canonical(key.real)
        real, imag = _canonical(key.real), _canonical(key.imag)
        if real is None or imag is None:
            return None
        return b"c" + _framed([real, imag])
    if isinstance(key, str):
        return b"s" + key.encode("utf-8", "surrogatepass")
    if isinstance(key, bytes):
        return b"b" + key
    if isinstance(key, tuple):
        parts = [_canonical(k) for k in key]
        return None if None in parts else b"t" + _framed(cast(list[bytes], parts))
    if isinstance(key, frozenset):
        parts = [_canonical(k) for k in key]
        return None if None in parts else b"z" + _framed(sorted(cast(list[bytes], parts)))
    if isinstance(key, range):  # equal ranges are equal sequences
        if len(key) == 0:
            return b"r"
        return b"r%d,%d,%d" % (key.start, key.step if len(key) > 1 else 1, len(key))
    # Another class the decoder allows: equal when its pickles are (its own __eq__
    # may say more; such keys are rare and kept as sent).
    return b"p" + type(key).__qualname__.encode() + b":" + pickle.dumps(key, protocol=5)


def _framed(parts: list[bytes]) -> bytes:
    return b"".join(b"%d:" % len(p) + p for p in parts)


def check_key(key: Any) -> Any:
    """``key`` if a dict can hold it (hashable), else BadArgument (the memory store's)."""
    try:
        hash(key)
    except TypeError as exc:
        raise BadArgument(f"unhashable key: {exc}") from None
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


def _entry(key: Any, payload: bytes, index: int = 0) -> bytes:
    """An entry's value: its place among the entries made by one Txn, its key as first
    given (pickled), its payload."""
    form = pickle.dumps(key, protocol=5)
    return b"%d:%d:" % (index, len(form)) + form + payload


def _parse(value: bytes) -> tuple[Any, bytes]:
    """``(key, payload)`` of an entry's value."""
    _, size, rest = value.split(b":", 2)
    n = int(size)
    return _DECODER.loads(rest[:n]), rest[n:]


def _index(value: bytes) -> int:
    return int(value.partition(b":")[0])


class EtcdDict:
    """The dict ``name``: a key per entry (see the module docstring)."""

    def __init__(self, client: EtcdClient, name: str, *, root: bytes = DEFAULT_ROOT) -> None:
        self.client = client
        self.prefix = root + b"d/" + name_key(name) + b"/"
        self.end = prefix_end(self.prefix)

    def _key(self, key: Any) -> bytes:
        form = _canonical(key)
        if form is None:  # equal to no other key: an entry of its own
            return self.prefix + b"~" + secrets.token_hex(16).encode()
        return self.prefix + hashlib.blake2b(form, digest_size=20).hexdigest().encode()

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
        if kv is None:
            await self.client.put(k, _entry(key, payload))
        else:
            await self.client.put(k, _entry(_parse(kv.value)[0], payload, _index(kv.value)))

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

    async def pop(
        self, key: Any, default: Any = _MISSING, accept: Callable[[bytes], Any] | None = None
    ) -> Any:
        """``accept``: the payload must pass it (it raises) before it goes."""
        k = self._key(key)
        while True:
            kv = await self.client.get(k)
            if kv is None:
                if default is _MISSING:
                    raise KeyError(key)
                return default
            if accept is not None:
                accept(_parse(kv.value)[1])
            done = await self.client.txn(
                [Compare(k, Target.MOD, "==", kv.mod_revision)], [Delete(k)]
            )
            if done.succeeded:
                return _parse(kv.value)[1]

    async def popitem(self, accept: Callable[[bytes], Any] | None = None) -> tuple[Any, bytes]:
        """``accept``: the payload must pass it (it raises) before it goes."""
        while True:
            # The entries one Txn made share a create_revision: the last of them by place.
            newest = await self.client.range(
                self.prefix, self.end, limit=_UPDATE_BATCH, newest_first=True
            )
            if not newest.kvs:
                raise KeyError("popitem(): dictionary is empty")
            last = newest.kvs[0].create_revision
            kv = max(
                (kv for kv in newest.kvs if kv.create_revision == last),
                key=lambda kv: _index(kv.value),
            )
            if accept is not None:
                accept(_parse(kv.value)[1])
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

    def puts(
        self, pairs: Iterable[tuple[Any, bytes]], found: dict[bytes, tuple[Any, int]] | None = None
    ) -> list[Op]:
        """The puts that set ``pairs`` (for a Txn of the caller's): one per entry, the
        first form of a key kept (``found``: form and place of entries that exist),
        the last payload, as ``dict.update``; new entries numbered in order."""
        found = found or {}
        entries: dict[bytes, tuple[Any, bytes, int]] = {}
        for k, v in pairs:
            key = self._key(k)
            if key in entries:
                form, _, index = entries[key]
            else:
                form, index = found.get(key, (k, len(entries)))
            entries[key] = (form, v, index)
        return [Put(key, _entry(form, v, index)) for key, (form, v, index) in entries.items()]

    async def update(self, pairs: Iterable[tuple[Any, bytes]]) -> None:
        pairs = list(pairs)
        keys = list(dict.fromkeys(self._key(k) for k, _ in pairs))
        found: dict[bytes, tuple[Any, int]] = {}
        for i in range(0, len(keys), _UPDATE_BATCH):
            read = await self.client.txn(
                [], [Get(k) for k in keys[i : i + _UPDATE_BATCH]], idempotent=True
            )
            for result in read.responses:
                assert isinstance(result, RangeResult)
                for kv in result.kvs:
                    found[kv.key] = (_parse(kv.value)[0], _index(kv.value))
        ops = self.puts(pairs, found)
        for i in range(0, len(ops), _UPDATE_BATCH):
            await self.client.txn([], ops[i : i + _UPDATE_BATCH])

    async def get_many(self, keys: list[Any]) -> list[bytes | None]:
        """The payload of each key (None where missing), in Txns of reads."""
        wanted = [self._key(k) for k in keys]
        found: dict[bytes, bytes] = {}
        unique = list(dict.fromkeys(wanted))
        for i in range(0, len(unique), _UPDATE_BATCH):
            read = await self.client.txn(
                [], [Get(k) for k in unique[i : i + _UPDATE_BATCH]], idempotent=True
            )
            for result in read.responses:
                assert isinstance(result, RangeResult)
                for kv in result.kvs:
                    found[kv.key] = _parse(kv.value)[1]
        return [found.get(k) for k in wanted]

    async def clear(self) -> None:
        await self.client.delete(self.prefix, self.end)

    async def items(self) -> list[tuple[Any, bytes]]:
        """In ``dict`` order: an entry's place is its key's creation (a change keeps it)."""
        read = await self.client.range(self.prefix, self.end, oldest_first=True)
        kvs = sorted(read.kvs, key=lambda kv: (kv.create_revision, _index(kv.value)))
        return [_parse(kv.value) for kv in kvs]
