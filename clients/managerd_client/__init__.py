"""managerd_client: reach a managerd daemon's named objects from any host.

::

    from managerd_client import connect

    with connect("10.0.0.5:50000", authkey=key) as m:
        jobs = m.Queue("jobs")          # get-or-create by name
        jobs.put({"id": 1})
        with m.Lock("db"):              # released if this process dies
            m.dict("results")["1"] = "done"

Standard library only. The errors are drawn in ``managerd_client.errors``.
"""

from managerd_client.client import Manager, connect
from managerd_client.errors import (
    ArgumentConflict,
    AuthenticationFailed,
    ConnectFailed,
    ConnectionLost,
    DeadlockDetected,
    ForbiddenPayload,
    InternalError,
    LockLost,
    ManagerdConnectionError,
    ManagerdError,
    NoSuchObject,
    ObjectError,
    ObjectTypeConflict,
    ProtocolError,
    RemoteError,
    RequestTooLarge,
    ServerShuttingDown,
    SessionExpired,
    StoreUnavailable,
)
from managerd_client.proxies import Message

__version__ = "0.1.0"

__all__ = [
    "ArgumentConflict",
    "AuthenticationFailed",
    "ConnectFailed",
    "ConnectionLost",
    "DeadlockDetected",
    "ForbiddenPayload",
    "InternalError",
    "LockLost",
    "Manager",
    "ManagerdConnectionError",
    "ManagerdError",
    "Message",
    "NoSuchObject",
    "ObjectError",
    "ObjectTypeConflict",
    "ProtocolError",
    "RemoteError",
    "RequestTooLarge",
    "ServerShuttingDown",
    "SessionExpired",
    "StoreUnavailable",
    "connect",
]
