"""Sessions: who holds what, and when it must all be given back.

A session is one client (a managerd client process's connection, or one
stock connection). It records the waiters it has parked and the objects on
which it holds something (a lock, permits, reserved messages). When it ends
— its connection closed, or its lease ran out without a heartbeat — its
waiters are cancelled *first*, so that what its holdings release goes to a
live waiter, and then every object it held something on releases it.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import os
import secrets
import time
from collections.abc import Callable
from typing import Any, Protocol


class Holder(Protocol):
    def release_session(self, session: Session) -> None: ...


class Parked(Protocol):
    """A parked waiter as its session sees it (``store.memory.base.Waiter``)."""

    alive: bool
    future: asyncio.Future[Any]
    #: What the call carries (a lock's ``(thread, ...)``, a semaphore's thread...).
    data: Any
    #: The object it waits on (a ``SharedObject``), or None.
    obj: Any

    def cancel(self) -> None: ...


class WaitForGraph(Protocol):
    """The deadlock detector as a session holds it (``store.memory.deadlock.Detector``)."""

    def parking(self, session: Session, thread: int, obj: Any, *, refuse: bool = True) -> None: ...


class SessionState(enum.Enum):
    ACTIVE = "active"
    ENDING = "ending"  # its connection was found dead; end() is on its way
    LOST = "lost"  # the store lost what kept it (an etcd lease); the daemon ends it
    ENDED = "ended"


class SessionKind(enum.Enum):
    MANAGERD = "managerd"  # heartbeats, lease, request ids
    STOCK = "stock"  # a stock multiprocessing client connection


_counter = itertools.count(1)
_prefix = os.urandom(4).hex()


class Session:
    """One client's session on the daemon."""

    def __init__(
        self,
        kind: SessionKind,
        peer: str,
        info: dict[str, Any] | None = None,
        *,
        resumed: tuple[str, str] | None = None,
    ) -> None:
        #: ``resumed``: ``(id, resume_token)`` of a session that a store kept
        #: beyond this daemon (opened through another gateway, taken over here).
        self.id = f"{_prefix}-{next(_counter)}" if resumed is None else resumed[0]
        #: What resumes this session on a new connection: known only to its
        #: client (``id`` is public: status, logs). Resuming by a guessable
        #: or listed id would let any authenticated peer take a live session
        #: over, its locks with it (two processes as one holder).
        self.resume_token = secrets.token_urlsafe(24) if resumed is None else resumed[1]
        self.kind = kind
        self.peer = peer
        self.info: dict[str, Any] = info or {}
        self.state = SessionState.ACTIVE
        self.created_at = time.time()
        self.last_seen = time.monotonic()
        self.waiters: set[Parked] = set()
        self.holdings: dict[Holder, None] = {}  # ordered set
        #: Asks the connection whether the peer is still there (set by it).
        self.probe: Callable[[], bool] | None = None
        #: The daemon's wait-for graph walker (set by the table; None: off).
        self.deadlocks: WaitForGraph | None = None
        #: ``(thread, object name, method, origin)`` of a call the client asks again,
        #: its first daemon having died under it: set only while the call starts (the
        #: managerd dialect's ``REISSUE``), so the object may take back what that
        #: call had (a lock's place in line, a get's items). ``origin``: the request
        #: id the call first had (None: the client did not say). None otherwise.
        self.reissuing: tuple[int, str, str, int | None] | None = None

    @property
    def active(self) -> bool:
        return self.state is SessionState.ACTIVE

    def usable(self) -> bool:
        """Whether a parked waiter of this session may be handed something.

        A peer killed a moment ago has a FIN or RST waiting on its socket
        that the loop may not have read yet; the probe looks (a non-blocking
        peek), so an item or a lock is never handed to a dead process.
        """
        if self.state is not SessionState.ACTIVE:
            return False
        if self.probe is not None and not self.probe():
            self.state = SessionState.ENDING
            return False
        return True

    def touch(self) -> None:
        self.last_seen = time.monotonic()

    def hold(self, obj: Holder) -> None:
        self.holdings[obj] = None

    def end(self) -> None:
        """Cancel every waiter, then release every holding. Idempotent."""
        if self.state is SessionState.ENDED:
            return
        self.state = SessionState.ENDED
        for waiter in list(self.waiters):
            waiter.cancel()
        self.waiters.clear()
        holdings, self.holdings = self.holdings, {}
        for obj in holdings:
            obj.release_session(self)

    def who(self) -> dict[str, Any]:
        """Who this session is, without what it does."""
        return {
            "id": self.id,
            "peer": self.peer,
            "host": self.info.get("host"),
            "pid": self.info.get("pid"),
        }

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind.value,
            "peer": self.peer,
            "host": self.info.get("host"),
            "pid": self.info.get("pid"),
            "age_s": round(time.time() - self.created_at, 3),
            "waiting": len(self.waiters),
            "holds": sorted({str(getattr(o, "name", "?")) for o in list(self.holdings)}),
            "waits_for": sorted(
                {w.obj.name for w in list(self.waiters) if w.alive and w.obj is not None}
            ),
        }
