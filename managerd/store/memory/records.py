"""The on-disk format of a data directory: the one module that owns it.

Files, in ``data_dir`` (``journal.py`` writes and reads them)::

    journal-<n>.log    the records appended since snapshot-<n> (or since the start)
    snapshot-<n>.bin   records that rebuild every object as it was when journal-<n> began

Each file is a header line, then frames::

    header   b"MANAGERD-JOURNAL-<version>\\n" or b"MANAGERD-SNAPSHOT-<version>\\n" (ASCII)
    frame    <u32 length><u32 crc32 of the body><body>, big-endian
    body     a pickle (protocol 5) of one tuple of builtin data and payload bytes

The version is the header's, so it is known before any record is decoded: a
later format may change the records, the pickling or the framing and still
be recognised. Records of format 2 (``FORMAT_VERSION``), the first element
a :class:`RecordKind` value::

    (CREATE, typeid, name, args)      an object was created with ``args``
    (DELETE, name)                    it was deleted
    (STATE, name, state)              snapshots: its ``dump_state()``
    (OP, name, effect, *arguments)    a change: ``effect`` is a value of the
                                      type's effect enum (``EFFECTS[typeid]``)

Values on disk are small ints, not the enum members (a pickled member would
name its class, which the restricted decoder refuses): a queue push is 8
bytes smaller than with format 1's strings, a pop 7.

Compatibility rule:

- A daemon writes only ``FORMAT_VERSION``. It reads every earlier format it
  has a reader for, and the first compaction after a start (at every start
  with records) rewrites the state in the current one.
- Format 1 (managerd up to commit 5456f22: ``MANAGERD-JOURNAL-1`` headers,
  kinds and effects as strings: ``"op"``, ``"push"``...) is read by mapping
  its strings to the enums (``FORMAT1_*`` below). Its records are otherwise
  those of format 2.
- A file of a later version than ``FORMAT_VERSION`` stops the start with
  one line: it is never guessed at, nor cut by ``--recover``.
- Any change to what is on disk (a new kind or effect, a changed argument, a
  changed ``dump_state`` shape) bumps ``FORMAT_VERSION`` and keeps a reader
  of the previous one. An existing member's value never changes nor is
  reused: an older daemon then refuses a newer directory cleanly instead of
  misreading it.
"""

from __future__ import annotations

import enum
import re
from typing import Any, Final

#: The format this daemon writes.
FORMAT_VERSION: Final = 2
#: The formats this daemon reads.
READABLE_VERSIONS: Final = (1, 2)

JOURNAL_HEADER: Final = b"MANAGERD-JOURNAL-"
SNAPSHOT_HEADER: Final = b"MANAGERD-SNAPSHOT-"
#: A header line of any version (a reader looks at the first 40 bytes).
_HEADER_LINE: Final = re.compile(rb"(MANAGERD-(?:JOURNAL|SNAPSHOT)-)([0-9]{1,9})\n")


def header(prefix: bytes, version: int = FORMAT_VERSION) -> bytes:
    """The first line of a journal (``JOURNAL_HEADER``) or snapshot file."""
    return prefix + str(version).encode() + b"\n"


def read_header(prefix: bytes, data: bytes) -> tuple[int, int] | None:
    """``(version, length of the header)``; None if ``data`` has no header of ``prefix``."""
    match = _HEADER_LINE.match(data, 0, 40)
    if match is None or match.group(1) != prefix:
        return None
    return int(match.group(2)), match.end()


class RecordKind(enum.IntEnum):
    """The first element of every record."""

    CREATE = 1
    DELETE = 2
    STATE = 3
    OP = 4


class QueueOp(enum.IntEnum):
    """Changes of a Queue or JoinableQueue."""

    PUSH = 1  # (payload, 0): put at the back (one more unfinished task)
    FRONT = 2  # (payload, deliveries): back at the front (deliveries 0: a new task)
    POP = 3  # (count,): taken from the front
    RES = 4  # (delivery id, payload, deliveries): reserved, not yet acked
    UNRES = 5  # (delivery id,): acked, nacked or timed out
    DONE = 6  # (): task_done
    #: Read only: a JoinableQueue of an older daemon journaled its count (see Queue.apply).
    UNFINISHED = 7


class EventOp(enum.IntEnum):
    FLAG = 1  # (bool,)


class DictOp(enum.IntEnum):
    SET = 1  # (key, payload)
    DEL = 2  # (key,)
    UPDATE = 3  # ([(key, payload), ...],)
    CLEAR = 4  # ()


class ListOp(enum.IntEnum):
    SET = 1  # (index or slice, payload or payloads)
    DEL = 2  # (index or slice,)
    EXTEND = 3  # ([payloads],)
    INSERT = 4  # (index, payload)
    ALL = 5  # ([payloads],): the whole list (sort, reverse, clear, *=)


class NamespaceOp(enum.IntEnum):
    SET = 1  # (attribute, payload)
    DEL = 2  # (attribute,)


class ValueOp(enum.IntEnum):
    SET = 1  # (value,)


class ArrayOp(enum.IntEnum):
    SET = 1  # (index or slice, value or values)


#: Any type's effect (what ``SharedObject._j`` takes).
Effect = QueueOp | EventOp | DictOp | ListOp | NamespaceOp | ValueOp | ArrayOp

#: The effects each journaled type's OP records use, by typeid (the typeids
#: are on disk too, in CREATE records).
EFFECTS: Final[dict[str, type[enum.IntEnum]]] = {
    "Queue": QueueOp,
    "JoinableQueue": QueueOp,
    "Event": EventOp,
    "dict": DictOp,
    "list": ListOp,
    "Namespace": NamespaceOp,
    "Value": ValueOp,
    "Array": ArrayOp,
}

# -- format 1 --------------------------------------------------------------------------
#: Format 1's strings, frozen: what its records said, whatever the enums become.
FORMAT1_KINDS: Final[dict[str, RecordKind]] = {
    "create": RecordKind.CREATE,
    "delete": RecordKind.DELETE,
    "state": RecordKind.STATE,
    "op": RecordKind.OP,
}
_FORMAT1_QUEUE: Final[dict[str, enum.IntEnum]] = {
    "push": QueueOp.PUSH,
    "front": QueueOp.FRONT,
    "pop": QueueOp.POP,
    "res": QueueOp.RES,
    "unres": QueueOp.UNRES,
    "done": QueueOp.DONE,
    "unfinished": QueueOp.UNFINISHED,
}
FORMAT1_EFFECTS: Final[dict[str, dict[str, enum.IntEnum]]] = {
    "Queue": _FORMAT1_QUEUE,
    "JoinableQueue": _FORMAT1_QUEUE,
    "Event": {"flag": EventOp.FLAG},
    "dict": {
        "set": DictOp.SET,
        "del": DictOp.DEL,
        "update": DictOp.UPDATE,
        "clear": DictOp.CLEAR,
    },
    "list": {
        "set": ListOp.SET,
        "del": ListOp.DEL,
        "extend": ListOp.EXTEND,
        "insert": ListOp.INSERT,
        "all": ListOp.ALL,
    },
    "Namespace": {"set": NamespaceOp.SET, "del": NamespaceOp.DEL},
    "Value": {"set": ValueOp.SET},
    "Array": {"set": ArrayOp.SET},
}


class Format1:
    """Reads format-1 records as format 2 (one instance across a recovery's files).

    An OP record names its object, not its type: the types come from the
    CREATE records read so far (a snapshot's, then the journals').
    """

    def __init__(self) -> None:
        self.types: dict[str, str] = {}

    def seen(self, record: tuple[Any, ...]) -> None:
        """Note which type each name has (from an upgraded CREATE or DELETE record)."""
        if record[0] == RecordKind.CREATE:
            self.types[record[2]] = record[1]
        elif record[0] == RecordKind.DELETE:
            self.types.pop(record[1], None)

    def upgrade(self, record: tuple[Any, ...]) -> tuple[Any, ...]:
        """``record`` in format 2; ValueError if it is no format-1 record."""
        kind = FORMAT1_KINDS.get(record[0]) if isinstance(record[0], str) else None
        if kind is None:
            raise ValueError(f"unknown format-1 record kind {record[0]!r}")
        if kind is RecordKind.OP:
            if len(record) < 3:
                raise ValueError("format-1 change record without an effect")
            typeid = self.types.get(record[1])
            effects = FORMAT1_EFFECTS.get(typeid or "", {})
            effect = effects.get(record[2]) if isinstance(record[2], str) else None
            if effect is None:
                raise ValueError(f"unknown format-1 change {record[2]!r} of {typeid} {record[1]!r}")
            return (int(kind), record[1], int(effect), *record[3:])
        upgraded = (int(kind), *record[1:])
        self.seen(upgraded)
        return upgraded
