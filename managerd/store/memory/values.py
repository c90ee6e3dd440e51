"""Shared scalars and arrays (``multiprocessing.Value`` / ``Array``): not mappings.

They hold numbers the daemon type-checks as ``ctypes`` would (``array`` does
the checking).
"""

from __future__ import annotations

import array
import asyncio
from typing import Any, Final

from managerd.store.api import BadArgument, Call, exposed
from managerd.store.memory.base import SharedObject, sequence_index
from managerd.store.memory.records import ArrayOp, ValueOp
from managerd.store.stats import SizeStats, ValueStats

#: ctypes typecodes multiprocessing.Value/Array accept; 'c' is a byte.
TYPECODES: Final = frozenset("cubBhHiIlLqQfd")


def _check_typecode(typecode: Any) -> str:
    if not isinstance(typecode, str) or typecode not in TYPECODES:
        raise BadArgument(f"typecode must be one of {''.join(sorted(TYPECODES))}, not {typecode!r}")
    return typecode


def _coerce(typecode: str, value: Any) -> Any:
    """``value`` as the C type would hold it; TypeError/OverflowError if it can't."""
    if typecode == "c":
        if not isinstance(value, bytes) or len(value) != 1:
            raise BadArgument("a 'c' value is one byte (bytes of length 1)")
        return value
    if isinstance(value, bool):
        value = int(value)
    try:
        return array.array(typecode, [value])[0]
    except TypeError as exc:  # a str for an 'i' value...
        raise BadArgument(str(exc)) from None


class Value(SharedObject):
    """``multiprocessing.Value``: one typed number (or byte)."""

    builtin_type_errors = True

    typeid = "Value"
    create_params = ("typecode", "value")
    state_params = ("value",)
    durable = True

    def __init__(
        self, name: str, loop: asyncio.AbstractEventLoop, typecode: str = "i", value: Any = 0
    ) -> None:
        super().__init__(name, loop)
        self.typecode = _check_typecode(typecode)
        self.value = _coerce(self.typecode, value if typecode != "c" or value else b"\0")

    def creation_args(self) -> dict[str, Any]:
        return {"typecode": self.typecode}

    @exposed()
    def get(self, call: Call) -> Any:
        return self.value

    @exposed(mutates=True)
    def set(self, call: Call, value: Any) -> None:
        self.value = _coerce(self.typecode, value)
        self._j(ValueOp.SET, self.value)

    @exposed(mutates=True)
    def add(self, call: Call, delta: Any) -> Any:
        """Add ``delta`` atomically; the new value."""
        if self.typecode == "c":
            raise BadArgument("cannot add to a 'c' value")
        try:
            total = self.value + delta
        except TypeError as exc:
            raise BadArgument(str(exc)) from None
        self.value = _coerce(self.typecode, total)
        self._j(ValueOp.SET, self.value)
        return self.value

    def apply(self, effect: tuple[Any, ...]) -> None:
        if effect[0] != ValueOp.SET:
            raise ValueError(f"unknown value record {effect[0]!r}")
        self.value = effect[1]

    def dump_state(self) -> Any:
        return self.value

    def load_state(self, state: Any) -> None:
        self.value = state

    def snapshot(self) -> Any:
        return self.value

    def stats(self) -> ValueStats:
        return ValueStats(self.name, self.typeid, self.creation_args(), value=self.value)


class Array(SharedObject):
    """``multiprocessing.Array``: a fixed-length typed array."""

    builtin_type_errors = True

    typeid = "Array"
    create_params = ("typecode", "sequence")
    state_params = ("sequence",)
    durable = True

    def __init__(
        self,
        name: str,
        loop: asyncio.AbstractEventLoop,
        typecode: str = "i",
        sequence: Any = 0,
    ) -> None:
        super().__init__(name, loop)
        self.typecode = _check_typecode(typecode)
        if isinstance(sequence, int) and not isinstance(sequence, bool):
            if sequence < 0:
                raise ValueError("array size must be >= 0")
            init: Any = bytes(sequence) if typecode == "c" else [0] * sequence
        elif isinstance(sequence, (list, tuple, bytes, bytearray, str)):
            init = sequence
        else:
            raise BadArgument("sequence must be a size (int) or a list of values")
        self.data: bytearray | array.array[Any]
        if typecode == "c":
            if not isinstance(init, (bytes, bytearray)):
                raise BadArgument("a 'c' array is initialised from bytes")
            self.data = bytearray(init)
        else:
            try:
                self.data = array.array(typecode, init)
            except TypeError as exc:  # values the typecode cannot hold
                raise BadArgument(str(exc)) from None

    def creation_args(self) -> dict[str, Any]:
        return {"typecode": self.typecode, "length": len(self.data)}

    def check_conflicts(self, args: dict[str, Any]) -> None:
        super().check_conflicts(args)
        sequence = args.get("sequence")
        if sequence is None:
            return
        length = sequence if isinstance(sequence, int) else len(sequence)
        if length != len(self.data):
            from managerd_client.errors import ArgumentConflict

            raise ArgumentConflict(
                f"Array {self.name!r} exists with length {len(self.data)}, not {length}"
            )

    @exposed()
    def __len__(self, call: Call) -> int:
        return len(self.data)

    def _out(self, value: Any) -> Any:
        if self.typecode == "c":
            return bytes([value]) if isinstance(value, int) else bytes(value)
        return value.tolist() if isinstance(value, array.array) else value

    @exposed()
    def __getitem__(self, call: Call, index: Any) -> Any:
        return self._out(self.data[sequence_index(index)])

    @exposed(mutates=True)
    def __setitem__(self, call: Call, index: Any, value: Any) -> None:
        index = sequence_index(index)
        self._store(index, value)
        self._j(ArrayOp.SET, index, self._out(self.data[index]))

    def _store(self, index: int | slice, value: Any) -> None:
        try:
            self._store_checked(index, value)
        except TypeError as exc:  # values the typecode cannot hold, not a sequence...
            if isinstance(exc, BadArgument):
                raise
            raise BadArgument(str(exc)) from None

    def _store_checked(self, index: int | slice, value: Any) -> None:
        if isinstance(index, slice):
            current = range(len(self.data))[index]
            values = list(value) if not isinstance(value, (bytes, bytearray)) else value
            if len(values) != len(current):
                raise ValueError("Can only assign sequence of same size")
            if isinstance(self.data, bytearray):
                self.data[index] = bytes(values)
            else:
                self.data[index] = array.array(
                    self.typecode, [_coerce(self.typecode, v) for v in values]
                )
        else:
            self.data[index]  # IndexError before TypeError, as ctypes
            if isinstance(self.data, bytearray):
                self.data[index] = _coerce("c", value)[0]
            else:
                self.data[index] = _coerce(self.typecode, value)

    @exposed()
    def tolist(self, call: Call) -> Any:
        return self.snapshot()

    def apply(self, effect: tuple[Any, ...]) -> None:
        if effect[0] != ArrayOp.SET:
            raise ValueError(f"unknown array record {effect[0]!r}")
        self._store(effect[1], effect[2])

    def dump_state(self) -> Any:
        return self.snapshot()

    def load_state(self, state: Any) -> None:
        self._store(slice(None), state)

    def snapshot(self) -> Any:
        if isinstance(self.data, bytearray):
            return bytes(self.data)
        return self.data.tolist()

    def stats(self) -> SizeStats:
        return SizeStats(self.name, self.typeid, self.creation_args(), len=len(self.data))
