"""The values the etcd client takes and returns: keys, events, results, Txn parts, errors.

Plain typed data, so that the rest of the store never sees a protobuf
message (``client.py`` converts at its boundary).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

from managerd_client.errors import RequestTooLarge as ClientRequestTooLarge


class EtcdError(Exception):
    """An etcd request failed; the subclasses say how."""


class EtcdUnavailable(EtcdError):
    """No member answered in time. A write's outcome is unknown: it may have been applied."""


class Compacted(EtcdError):
    """The revision asked for was compacted away; re-read, then watch from the new one.

    ``compact_revision`` is the oldest revision kept (0 when etcd did not say).
    """

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revision compacted (compact revision {compact_revision})")
        self.compact_revision = compact_revision


class LeaseNotFound(EtcdError):
    """The lease expired or was revoked (its keys are gone)."""


class SessionGone(LeaseNotFound):
    """A write made for a session was refused: the session's key was gone when it
    came (its lease ended; see ``client.SESSION_GUARD``). Nothing was written."""


class RequestTooLarge(EtcdError, ClientRequestTooLarge):
    """Over etcd's request size limit (``--max-request-bytes``, 1.5 MiB by default).

    Also the client's ``RequestTooLarge`` (a ``ValueError``): the caller whose value
    cannot be stored gets that, with etcd's reason, not an internal error.
    """


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int


class EventType(enum.Enum):
    PUT = 0
    DELETE = 1


@dataclass(frozen=True, slots=True)
class Event:
    type: EventType
    kv: KeyValue  # for a DELETE: the key and the deleting revision (mod_revision)
    prev_kv: KeyValue | None


@dataclass(frozen=True, slots=True)
class RangeResult:
    revision: int  # the store's revision when this was read
    kvs: list[KeyValue]
    more: bool
    count: int


@dataclass(frozen=True, slots=True)
class PutResult:
    revision: int
    prev_kv: KeyValue | None


@dataclass(frozen=True, slots=True)
class DeleteResult:
    revision: int
    deleted: int
    prev_kvs: list[KeyValue]


@dataclass(frozen=True, slots=True)
class TxnResult:
    revision: int  # the revision the Txn produced (or read at, if it wrote nothing)
    succeeded: bool
    responses: list[RangeResult | PutResult | DeleteResult | TxnResult]
    #: Sent again after an attempt whose outcome is unknown (an idempotent Txn over a
    #: failover): a failed compare may be that attempt's own success.
    repeated: bool = False


class Target(enum.Enum):
    """What a ``Compare`` looks at (etcd's CompareTarget)."""

    VERSION = 0
    CREATE = 1  # create_revision; 0 for a key that does not exist
    MOD = 2  # mod_revision
    VALUE = 3
    LEASE = 4


@dataclass(frozen=True, slots=True)
class Compare:
    """``Compare(key, Target.CREATE, "==", 0)``: the key does not exist."""

    key: bytes
    target: Target
    op: Literal["==", "!=", "<", ">"]
    value: int | bytes
    #: Given: every key of ``[key, range_end)`` must satisfy it (none may exist too).
    range_end: bytes = b""


@dataclass(frozen=True, slots=True)
class Get:
    key: bytes
    range_end: bytes = b""
    limit: int = 0
    keys_only: bool = False
    count_only: bool = False


@dataclass(frozen=True, slots=True)
class Put:
    key: bytes
    value: bytes
    lease: int = 0
    prev_kv: bool = False


@dataclass(frozen=True, slots=True)
class Delete:
    key: bytes
    range_end: bytes = b""
    prev_kv: bool = False


Op = Get | Put | Delete


def name_key(name: str) -> bytes:
    """An object name as one key segment: ``/`` and ``%`` escaped, so that no name's
    keys fall under another's prefix (``a`` and ``a/b``)."""
    return name.replace("%", "%25").replace("/", "%2F").encode()


def prefix_end(prefix: bytes) -> bytes:
    """The ``range_end`` that makes a range cover every key starting with ``prefix``."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"  # all keys
