"""The one exception tree of managerd, shared by the client and the daemon.

::

    ManagerdError
    ├── ManagerdConnectionError      (also a builtin ConnectionError)
    │   ├── ConnectFailed            no daemon answered at the address
    │   ├── AuthenticationFailed     the authkey (or certificate) was refused
    │   ├── ConnectionLost           an in-flight call lost its connection
    │   └── ServerShuttingDown       the daemon is stopping
    ├── SessionExpired               the daemon ended this client's session
    │   └── LockLost                 ... and with it a lock this client held
    ├── ObjectError
    │   ├── NoSuchObject             (also a KeyError) no object has that name
    │   ├── ObjectTypeConflict       the name is taken by another type
    │   └── ArgumentConflict         conflicting creation arguments
    ├── DeadlockDetected             the acquire would close a cycle of waiters
    ├── ForbiddenPayload             the daemon refused to decode a request
    ├── RequestTooLarge              (also a ValueError) over the daemon's frame limit
    ├── ProtocolError                a frame that is not managerd's protocol
    ├── RemoteError                  an unexpected failure inside the daemon
    ├── StoreUnavailable             the daemon's store (etcd) did not answer: outcome unknown
    └── InternalError                a bug in the daemon (its log has the traceback)

Blocking calls raise the exceptions the standard library raises, so
existing ``except`` clauses keep working: ``queue.Empty``, ``queue.Full``,
``TimeoutError``, ``threading.BrokenBarrierError``, ``RuntimeError``,
``ValueError``, ``KeyError``, ``IndexError``, ``TypeError``,
``AttributeError``, ``EOFError`` and ``OSError`` (pipes).

The wire carries errors as a ``(kind, message)`` pair, never as a pickled
exception; :func:`error_kind` and :func:`error_from_kind` are the two ends of
that mapping.
"""

from __future__ import annotations

import queue
import threading

__all__ = [
    "ArgumentConflict",
    "AuthenticationFailed",
    "ConnectFailed",
    "ConnectionLost",
    "DeadlockDetected",
    "ForbiddenPayload",
    "InternalError",
    "LockLost",
    "ManagerdConnectionError",
    "ManagerdError",
    "NoSuchObject",
    "ObjectError",
    "ObjectTypeConflict",
    "ProtocolError",
    "RemoteError",
    "RequestTooLarge",
    "ServerShuttingDown",
    "SessionExpired",
    "StoreUnavailable",
    "error_from_kind",
    "error_kind",
]


class ManagerdError(Exception):
    """Root of every error managerd itself raises."""


class ManagerdConnectionError(ManagerdError, ConnectionError):
    """The connection to the daemon could not be made or was lost."""


class ConnectFailed(ManagerdConnectionError):
    """No daemon answered at the address within the connect timeout.

    ``retry_after_s`` is set when the daemon refused the connection for a
    while (a penalized address) and said how long is left.
    """

    retry_after_s: float | None = None


class AuthenticationFailed(ManagerdConnectionError):
    """The daemon refused the authkey, or the client refused the daemon."""


class ConnectionLost(ManagerdConnectionError):
    """A call was in flight when the connection dropped; it was not retried."""


class ServerShuttingDown(ManagerdConnectionError):
    """The daemon is stopping and answered a waiting call with this."""


class SessionExpired(ManagerdError):
    """The daemon ended this client's session (lease expired)."""


class LockLost(SessionExpired):
    """A lock this client believed it held was released.

    Its session ended (a partition, lease expiry) or the daemon restarted;
    the message says which.
    """


class ObjectError(ManagerdError):
    """A named object could not be created, found or used as asked."""


class NoSuchObject(ObjectError, KeyError):
    """No object has that name (it was deleted, or never created)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class ObjectTypeConflict(ObjectError):
    """The name is already used by an object of another type."""


class ArgumentConflict(ObjectError):
    """The object exists with creation arguments that conflict with these."""


class DeadlockDetected(ManagerdError):
    """The acquire would close a cycle of waiters (daemon setting ``deadlock=raise``).

    The message names every session, thread and lock in the cycle. The
    others in it keep waiting: one of them must give up what it holds.
    """


class ForbiddenPayload(ManagerdError):
    """The daemon refused to decode a request (a class it does not trust)."""


class RequestTooLarge(ManagerdError, ValueError):
    """A request is larger than the daemon accepts (``max_frame_bytes``); not sent."""


class ProtocolError(ManagerdError):
    """A peer sent something that is not managerd's protocol."""


class RemoteError(ManagerdError):
    """An unexpected failure inside the daemon; the message says what."""


class StoreUnavailable(ManagerdError):
    """The daemon's store (an etcd cluster behind a gateway) did not answer in time.

    A change the call asked for may or may not have been applied: read before
    repeating it (a ``put`` retried may be delivered twice; a ``get`` may have
    taken an item, which then comes back as an unconfirmed one would).
    """


class InternalError(ManagerdError):
    """A bug in the daemon failed the call; the daemon logged it with its traceback.

    What the call had done before the failure stands: retrying may repeat it.
    """


# Kinds the wire carries, mapped to the class the client raises. Builtin and
# stdlib types come first so that subclasses (NoSuchObject is a KeyError) are
# found by the most specific entry in error_kind().
_KINDS: dict[str, type[BaseException]] = {
    "Empty": queue.Empty,
    "Full": queue.Full,
    "Timeout": TimeoutError,
    "BrokenBarrier": threading.BrokenBarrierError,
    "Runtime": RuntimeError,
    "Value": ValueError,
    "Key": KeyError,
    "Index": IndexError,
    "Type": TypeError,
    "Attribute": AttributeError,
    "NotImplemented": NotImplementedError,
    "Overflow": OverflowError,
    "EOF": EOFError,
    "BrokenPipe": BrokenPipeError,
    "Permission": PermissionError,
    "OS": OSError,
    "ConnectionLost": ConnectionLost,
    "ShuttingDown": ServerShuttingDown,
    "SessionExpired": SessionExpired,
    "LockLost": LockLost,
    "NoSuchObject": NoSuchObject,
    "TypeConflict": ObjectTypeConflict,
    "ArgumentConflict": ArgumentConflict,
    "Forbidden": ForbiddenPayload,
    "Deadlock": DeadlockDetected,
    "Protocol": ProtocolError,
    "Remote": RemoteError,
    "StoreUnavailable": StoreUnavailable,
    "Internal": InternalError,
}
_KIND_OF: dict[type[BaseException], str] = {cls: kind for kind, cls in _KINDS.items()}


def error_kind(exc: BaseException) -> str:
    """The wire kind of ``exc``: its own class's, else its nearest base's."""
    for cls in type(exc).__mro__:
        kind = _KIND_OF.get(cls)
        if kind is not None:
            return kind
    return "Remote"


def error_from_kind(kind: str, message: str) -> BaseException:
    """The exception a client raises for a ``(kind, message)`` reply."""
    cls = _KINDS.get(kind, RemoteError)
    if cls is queue.Empty or cls is queue.Full or cls is threading.BrokenBarrierError:
        return cls() if not message else cls(message)
    return cls(message)
