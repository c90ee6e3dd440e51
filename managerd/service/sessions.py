"""The table of live sessions: open, find, resume, end, and the lease expiry.

A client reconnecting with its resume token finds its session here if this
daemon served it; else the store may know it (``Store.resume``: a gateway of
the etcd store takes over a session that a gateway which died served).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from managerd.store.interface import Store
from managerd.store.sessions import Session, SessionKind, SessionState, WaitForGraph


class SessionTable:
    """All live sessions, by id; the store releases what a session held when it ends."""

    def __init__(self, store: Store, deadlocks: WaitForGraph | None = None) -> None:
        self._sessions: dict[str, Session] = {}
        self._by_token: dict[str, Session] = {}
        #: Ended sessions whose release the store has not finished (``end``).
        self._ending: dict[str, Session] = {}
        self.store = store
        #: Given to every session it opens (None: deadlocks are not looked for).
        self.deadlocks = deadlocks

    def open(self, kind: SessionKind, peer: str, info: dict[str, Any] | None = None) -> Session:
        session = Session(kind, peer, info)
        session.deadlocks = self.deadlocks
        self._sessions[session.id] = session
        self._by_token[session.resume_token] = session
        return session

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def resumable(self, token: str) -> Session | None:
        """The live session of this daemon whose secret resume token this is."""
        return self._by_token.get(token)

    async def resume_elsewhere(self, token: str) -> Session | None:
        """The live session another daemon of the store served with this token, now
        this daemon's (``Store.resume``); None if there is none."""
        session = await self.store.resume(token)
        if session is None:
            return None
        session.deadlocks = self.deadlocks
        self._sessions[session.id] = session
        self._by_token[session.resume_token] = session
        return session

    def end(self, session: Session) -> None:
        """No call of ``session`` from now on; listed (``status``) until the store has
        released what it held. Listed no more, it holds nothing: a gateway of the etcd
        store killed after that leaves no holding of it to its lease's TTL."""
        self._sessions.pop(session.id, None)
        self._by_token.pop(session.resume_token, None)
        releasing = self.store.release(session)
        if releasing is not None and not releasing.done():
            self._ending[session.id] = session
            releasing.add_done_callback(lambda _: self._ending.pop(session.id, None))

    def expired(self, ttl_s: float) -> list[Session]:
        """Managerd sessions not heard from for ``ttl_s``, or that the store lost (an etcd
        session whose lease is gone)."""
        deadline = time.monotonic() - ttl_s
        return [
            s
            for s in self._sessions.values()
            if s.kind is SessionKind.MANAGERD
            and (s.last_seen < deadline or s.state is SessionState.LOST)
        ]

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    def listed(self) -> list[Session]:
        """What ``status`` lists: the live sessions, and the ended ones whose release the
        store has not finished (they may hold something yet)."""
        return [*self._sessions.values(), *self._ending.values()]

    def __len__(self) -> int:
        return len(self._sessions)
