"""list, Namespace and Array on etcd: the whole value in one key, changed by compare-and-set.

Each call reads the key, rebuilds the memory store's object of that type
from the value (``load_state``), calls the memory store's own method on it,
and, for a method that changes it, writes the new value back with a compare
on the key's mod_revision, again from the read if another gateway wrote in
between. So the semantics (argument checks, errors, results) are the memory
store's by construction, and concurrent changes through any gateways are
serialized by etcd. The cost: a read and a write per change, the whole value
each time, so for small objects (etcd refuses a request over 1.5 MiB).

The value is kept with ``marshal`` (builtin data only: lists of payload
bytes, a dict of str to bytes, numbers with NaN and infinities). A list's
or Namespace's creation ``contents`` are kept with its name, and a later
get-or-create naming others is refused, as in the memory store.
"""

from __future__ import annotations

import marshal
from collections.abc import Mapping
from typing import Any, ClassVar

from managerd.store.api import BadArgument, Call, MethodSpec, Refusal
from managerd.store.etcd.handles import ContentsArgs, EtcdHandle, Gateway
from managerd.store.etcd.kv import Compare, Op, Put, Target, name_key
from managerd.store.etcd.sessions import EtcdSession
from managerd.store.interface import Snapshot
from managerd.store.memory.base import SharedObject
from managerd.store.memory.mappings import List, Namespace
from managerd.store.memory.values import Array
from managerd.store.stats import ObjectStats


class CellHandle(EtcdHandle):
    """A type whose whole value is one key (see the module docstring)."""

    builtin_type_errors = True
    memory_class: ClassVar[type[SharedObject]]

    def __init__(self, store: Gateway, name: str, args: Mapping[str, Any]) -> None:
        super().__init__(store, name, args)
        self.key = store.root + b"c/" + name_key(name)
        if "sequence" not in args and "length" in args:  # found in the names: a blank of it
            args = {"typecode": args["typecode"], "sequence": args["length"]}
        # Made here so that its arguments are checked as the memory store checks them.
        self.initial = self.memory_class(name, store.loop, **args)
        self.seen_stats: ObjectStats = self.initial.stats()

    def creation_args(self) -> dict[str, Any]:
        return self.initial.creation_args()

    def init_ops(self) -> list[Op]:
        return [Put(self.key, marshal.dumps(self.initial.dump_state()))]

    def state_prefixes(self) -> list[bytes]:
        return [self.key]

    def _blank(self) -> SharedObject:
        args = self.creation_args()
        if "length" in args:
            args = {"typecode": args["typecode"], "sequence": args["length"]}
        return self.memory_class(self.name, self.store.loop, **args)

    async def read(self) -> tuple[SharedObject, int]:
        """The object as it is now, and the key's mod_revision."""
        kv = await self.store.client.get(self.key)
        obj = self._blank()
        if kv is not None:
            obj.load_state(marshal.loads(kv.value))
        return obj, 0 if kv is None else kv.mod_revision

    async def apply(self, spec: MethodSpec, call: Call, args: tuple[Any, ...], kwargs: Any) -> Any:
        while True:
            obj, revision = await self.read()
            before = obj.dump_state()
            if call.accept is not None and spec.mutates:
                # What it would hand out must pass first (a stock client's decode).
                payload = obj.would_hand_out(spec.name, call, args, kwargs)
                if payload is not None:
                    call.accept(payload)
            try:
                result = spec.fn(obj, call, *args, **kwargs)
            except TypeError as exc:
                if isinstance(exc, Refusal):
                    raise
                raise BadArgument(str(exc)) from None  # the builtin's: the caller's
            after = obj.dump_state()
            self.seen_stats = obj.stats()
            if not spec.mutates or _same(after, before):
                return result
            done = await self.store.client.txn(
                [Compare(self.key, Target.MOD, "==", revision)],
                [Put(self.key, marshal.dumps(after))],
            )
            if done.succeeded:
                return result

    async def refresh(self) -> None:
        self.seen_stats = (await self.read())[0].stats()

    copyable = True

    async def snapshot(self) -> Snapshot:
        obj = (await self.read())[0]
        return Snapshot(obj.snapshot(), obj.snapshot_conv)

    def stats(self) -> ObjectStats:
        return self.seen_stats


class ContentsCell(ContentsArgs, CellHandle):
    """A list or Namespace: made with ``contents``, compared on a later get-or-create."""

    def __init__(self, store: Gateway, name: str, args: Mapping[str, Any]) -> None:
        super().__init__(store, name, args)
        self.contents = args.get("contents", [])

    def creation_args(self) -> dict[str, Any]:
        return {**self.initial.creation_args(), "contents": self.contents}


def _same(a: Any, b: Any) -> bool:
    return marshal.dumps(a) == marshal.dumps(b)  # NaN equals itself here


def _forward(spec: MethodSpec) -> MethodSpec:
    def method(self: CellHandle, call: Call, *args: Any, **kwargs: Any) -> Any:
        async def work(_: EtcdSession) -> Any:
            return await self.apply(spec, call, args, kwargs)

        return self._run(call, work)

    return MethodSpec(spec.name, method, spec.args, spec.params, spec.result, spec.mutates)


CELLS: dict[str, type[CellHandle]] = {}
for _cls in (List, Namespace, Array):
    _handle: type[CellHandle] = type(
        f"{_cls.__name__}Cell",
        (ContentsCell if _cls in (List, Namespace) else CellHandle,),
        {"typeid": _cls.typeid, "create_params": _cls.create_params, "memory_class": _cls},
    )
    _handle.methods = {name: _forward(spec) for name, spec in _cls.methods.items()}
    CELLS[_cls.typeid] = _handle
