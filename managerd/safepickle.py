"""Decode requests without ever running code from the wire.

Every frame the daemon receives after authentication is decoded here. The
unpickler resolves only the globals on an allow-list of builtin data types
(plus those an operator names in ``allowed_classes``); any other global — and
so any ``os.system`` or import — is refused before anything is called.
Decoded values are then checked for nesting depth, because hashing or
comparing a tuple nested a million deep would exhaust the C stack.

Payloads from the managerd client are opaque bytes inside these requests and
are never decoded here, except by the few operations that must compare
values (``list.index``, ``list.sort``, ...), which use the same unpickler.
"""

from __future__ import annotations

import _compat_pickle
import io
import pickle
import pickletools
import re
import struct
from collections.abc import Iterable
from typing import Any, Final

from managerd_client.errors import ForbiddenPayload

#: Globals a stock client's pickles of builtin data may name.
SAFE_GLOBALS: Final[frozenset[tuple[str, str]]] = frozenset(
    {
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "bytearray"),
        ("builtins", "complex"),
        ("builtins", "slice"),
        ("builtins", "bytes"),
        ("builtins", "range"),
        ("_codecs", "encode"),  # how protocols 0-2 spell bytes
        ("array", "array"),
        ("array", "_array_reconstructor"),
    }
)

MAX_DEPTH: Final = 100


def _from_data(cls: Any, position: int = 0) -> Any:
    """``cls``, refusing to build from a size (``bytearray(1 << 28)``) or an iterator.

    Called with the data itself, what these build is as large as what was
    sent; called with an int, 30 bytes of pickle could zero-fill gigabytes.
    """

    def build(*args: Any) -> Any:
        if len(args) > position and not isinstance(
            args[position], (bytes, bytearray, str, list, tuple)
        ):
            raise ForbiddenPayload(
                f"refused to decode {cls.__name__}() from a "
                f"{type(args[position]).__name__}: only from the data itself"
            )
        return cls(*args)

    return build


#: A range is a few bytes whatever its length, but ``array.array`` expands it.
MAX_RANGE_LENGTH: Final = 1 << 16


def _bounded_range(*args: Any) -> range:
    r = range(*args)
    if len(r) > MAX_RANGE_LENGTH:
        raise ForbiddenPayload(
            f"refused to decode a range of {len(r)} (at most {MAX_RANGE_LENGTH})"
        )
    return r


_GUARDED: Final[dict[tuple[str, str], Any]] = {
    ("builtins", "range"): _bounded_range,
    ("builtins", "set"): _from_data(set),
    ("builtins", "frozenset"): _from_data(frozenset),
    ("builtins", "bytearray"): _from_data(bytearray),
    ("builtins", "bytes"): _from_data(bytes),
}

# Opcodes that store into the memo at an index the pickle chooses. The C
# unpickler grows its memo to twice that index and zero-fills it, so 9 bytes
# could cost gigabytes. Python's picklers use MEMOIZE (protocol 4+) or
# sequential indices, never one beyond the number of opcodes so far.
_PUT, _LONG_BINPUT, _STOP = ord("p"), ord("r"), ord(".")
_TAKE1, _TAKE4, _TAKE8 = (struct.Struct(f).unpack_from for f in ("<B", "<I", "<Q"))
#: GLOBAL and INST take two newline-terminated arguments (module, name).
_TWO_LINES: Final = frozenset({ord("c"), ord("i")})
_OPCODE_ARGS: Final[dict[int, int]] = {
    ord(op.code): (op.arg.n if op.arg is not None else 0) for op in pickletools.opcodes
}


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves allow-listed globals only."""

    def __init__(
        self, data: bytes | memoryview, allowed: frozenset[tuple[str, str]], offset: int = 0
    ) -> None:
        stream = io.BytesIO(data)  # shares a bytes object's buffer: no copy
        stream.seek(offset)
        super().__init__(stream)
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        # Protocols 0-2 spell Python 2 names (``__builtin__.set``).
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        guarded = _GUARDED.get((module, name))
        if guarded is not None:
            return guarded
        if (module, name) in self._allowed:
            try:
                return super().find_class(module, name)
            except (ImportError, AttributeError) as exc:
                raise ForbiddenPayload(
                    f"{module}.{name} is in allowed_classes but the daemon cannot import it "
                    f"({exc}): install its module where the daemon runs"
                ) from None
        raise ForbiddenPayload(
            f"refused to decode {module}.{name}: the daemon decodes builtin data types, and "
            f"the classes its allowed_classes setting (MANAGERD_ALLOWED_CLASSES) names, "
            f"which it must be able to import"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise ForbiddenPayload("persistent ids are not accepted")


class SafeDecoder:
    """Decodes frames with the allow-list, configured once per daemon."""

    def __init__(self, allowed_classes: Iterable[str] = ()) -> None:
        extra = set()
        for dotted in allowed_classes:
            module, _, name = dotted.rpartition(".")
            if module:
                extra.add((module, name))
        self.allowed = SAFE_GLOBALS | frozenset(extra)
        #: Small pickles whose opcodes were walked and passed: a client sends
        #: the same envelope again and again (``acquire``, ``release``: an
        #: ``r`` in the method name is no LONG_BINPUT, but only a walk says so).
        self._walked: set[bytes] = set()

    def loads(self, data: bytes | memoryview, offset: int = 0) -> Any:
        """Decode the pickle in ``data`` from ``offset`` on."""
        raw = bytes(data) if isinstance(data, memoryview) else data
        if (_PUT in raw or _LONG_BINPUT in raw) and not _memo_indices_small(raw, offset):
            self._walk(raw, offset)
        try:
            # A protocol 4-5 pickle's 8-byte FRAME length is data, not opcodes.
            framed = raw.startswith(_FRAMED, offset)
            if (
                len(raw) - offset <= _SMALL_PICKLE_BYTES
                and _NAMES_NOTHING(raw, offset + 11 if framed else offset) is None
            ):
                # Nothing in it can name a global or a persistent id, so the
                # allow-list could not be consulted: the C decoder alone is
                # the same decoder, without an Unpickler built per request.
                value = pickle.loads(memoryview(raw)[offset:] if offset else raw)
            else:
                value = RestrictedUnpickler(raw, self.allowed, offset).load()
        except ForbiddenPayload:
            raise
        except RecursionError as exc:
            raise ForbiddenPayload("the request is nested too deeply") from exc
        except Exception as exc:
            raise ForbiddenPayload(f"the request is not a valid pickle: {exc}") from exc
        if len(raw) - offset > MAX_DEPTH:  # nesting one level takes an opcode at least
            check_depth(value)
        return value

    def _walk(self, raw: bytes, offset: int) -> None:
        """:func:`check_memo_indices`, remembering the small pickles that passed."""
        if len(raw) - offset > _WALKED_MAX_BYTES:
            check_memo_indices(raw, offset)
            return
        pickled = raw[offset:]
        walked = self._walked
        if pickled in walked:
            return
        check_memo_indices(pickled)
        if len(walked) >= _WALKED_MAX_COUNT:
            walked.clear()
        walked.add(pickled)


#: The bytes without which no opcode can reach a class: GLOBAL and INST read
#: newline-terminated names (a readline that finds no newline fails: "pickle
#: data was truncated"); STACK_GLOBAL and EXT1/2/4 are these single bytes.
#: OBJ, NEWOBJ, REDUCE and BUILD only act on what those produce; PERSID and
#: BINPERSID fail in an unpickler with no ``persistent_load``. A pickle with
#: none of these bytes anywhere (opcode or data) holds builtin data only.
_NAMES_NOTHING: Final = re.compile(rb"[\n\x82\x83\x84\x93]").search
_FRAMED: Final = b"\x80\x05\x95"

#: At most this many pickles of at most this size are remembered as walked
#: (256 KiB): what one process's few threads send over and over.
_WALKED_MAX_BYTES: Final = 256
_WALKED_MAX_COUNT: Final = 1024

#: Pickles up to this size are first checked by :func:`_memo_indices_small`.
_SMALL_PICKLE_BYTES: Final = 4096


def _memo_indices_small(data: bytes, pos: int) -> bool:
    """True when a small pickle cannot make the unpickler's memo large.

    Looks at every ``p`` and ``r`` byte, opcode or not, rather than walking
    the opcodes (a walk costs ~3-4 us per request, most of decoding one):
    were it a PUT or LONG_BINPUT, the index it would name is at most the
    pickle's size, so the memo stays within a few pages. False (walk) when
    one might name more, or when the pickle is not small.
    """
    if len(data) - pos > _SMALL_PICKLE_BYTES:
        return False
    limit = len(data)
    at = data.find(b"r", pos)
    while at >= 0:
        if int.from_bytes(data[at + 1 : at + 5], "little") > limit:
            return False
        at = data.find(b"r", at + 1)
    if data.find(b"\n", pos) < 0:
        return True  # PUT reads a line: without a newline it fails before storing
    at = data.find(b"p", pos)
    while at >= 0:
        newline = data.find(b"\n", at + 1, at + 34)
        if newline < 0 and data.find(b"\n", at + 1) >= 0:
            return False  # a long line (whitespace can pad an index): walk
        if newline >= 0:  # the line PUT would read, parsed as the unpickler parses it
            try:
                if abs(int(data[at + 1 : newline])) > limit:
                    return False
            except ValueError:
                pass
        at = data.find(b"p", at + 1)
    return True


def check_memo_indices(data: bytes, pos: int = 0) -> None:
    """Refuse a PUT/LONG_BINPUT whose index is beyond the opcodes read so far.

    Walks the opcode stream (arguments skipped by their encoded sizes); the
    unpickler then refuses anything malformed that this walk lets through.
    """
    count, end = 0, len(data)
    take1, take4, take8 = _TAKE1, _TAKE4, _TAKE8
    while pos < end:
        code = data[pos]
        count += 1
        size = _OPCODE_ARGS.get(code)
        if size is None:
            return  # unknown opcode: the unpickler refuses it
        pos += 1
        if code == _LONG_BINPUT and pos + 4 <= end and take4(data, pos)[0] > count:
            raise ForbiddenPayload("refused a pickle that stores far beyond its own size")
        if size >= 0:
            pos += size
        elif size == pickletools.UP_TO_NEWLINE:
            newline = data.find(b"\n", pos)
            if newline >= 0 and code in _TWO_LINES:
                newline = data.find(b"\n", newline + 1)
            if newline < 0:
                return
            if code == _PUT:
                text = data[pos:newline]
                if text.isdigit() and int(text) > count:
                    raise ForbiddenPayload("refused a pickle that stores far beyond its own size")
            pos = newline + 1
        elif size == pickletools.TAKEN_FROM_ARGUMENT1 and pos < end:
            pos += 1 + take1(data, pos)[0]
        elif size in (pickletools.TAKEN_FROM_ARGUMENT4, pickletools.TAKEN_FROM_ARGUMENT4U):
            if pos + 4 > end:
                return
            pos += 4 + take4(data, pos)[0]
        elif size == pickletools.TAKEN_FROM_ARGUMENT8U:
            if pos + 8 > end:
                return
            pos += 8 + take8(data, pos)[0]
        else:
            return
        if code == _STOP:
            return


_SCALARS: Final = frozenset({bytes, str, int, float, bool, type(None), slice})


def _shallow(value: Any) -> bool:
    """A tuple of scalars and flat tuples/lists: what almost every request is."""
    if type(value) is not tuple:
        return False
    for child in value:
        kind = type(child)
        if kind in _SCALARS:
            continue
        if kind is not tuple and kind is not list:
            return False
        for grandchild in child:
            if type(grandchild) not in _SCALARS:
                return False
    return True


def check_depth(value: Any, limit: int = MAX_DEPTH) -> None:
    """Refuse containers nested more than ``limit`` deep (iteratively, no recursion)."""
    if not isinstance(value, (tuple, list, dict, set, frozenset)) or _shallow(value):
        return
    stack: list[tuple[Any, int]] = [(value, 1)]
    seen: set[int] = set()
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            raise ForbiddenPayload(f"the request is nested more than {limit} levels deep")
        if id(item) in seen:
            continue
        seen.add(id(item))
        children: Iterable[Any]
        children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
        for child in children:
            if isinstance(child, (tuple, list, dict, set, frozenset)):
                stack.append((child, depth + 1))
