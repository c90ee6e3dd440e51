"""Iterators a stock client holds on the daemon (a dict or list walked by proxy)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any, Final

from managerd.store.sessions import Session

#: A stock connection that never drops its iterators keeps at most this many.
MAX_ITERATORS_PER_SESSION: Final = 64


class _StockIterator:
    __slots__ = ("it", "owner", "refs")

    def __init__(self, keys: list[Any], owner: Session) -> None:
        self.it: Iterator[Any] = iter(keys)
        self.owner = owner
        self.refs = 1  # the server's own reference, as a stock server's create


class IteratorTable:
    """The referents of stock ``IteratorProxy``s, by token id.

    Ids start with a NUL character, which no object name may contain, so
    they never collide with a name. The table is a holding of each session
    that opened an iterator: when that connection closes, its iterators go.
    """

    PREFIX: Final = "\0iterator-"

    def __init__(self) -> None:
        self._iters: dict[str, _StockIterator] = {}
        self._owned: dict[Session, dict[str, None]] = {}
        self._ids = itertools.count(1)

    @classmethod
    def is_id(cls, ident: Any) -> bool:
        return isinstance(ident, str) and ident.startswith(cls.PREFIX)

    def open(self, session: Session, keys: list[Any]) -> str:
        ident = f"{self.PREFIX}{next(self._ids)}"
        self._iters[ident] = _StockIterator(keys, session)
        owned = self._owned.setdefault(session, {})
        owned[ident] = None
        session.hold(self)
        while len(owned) > MAX_ITERATORS_PER_SESSION:
            self._drop(next(iter(owned)))
        return ident

    def _get(self, ident: Any) -> _StockIterator:
        entry = self._iters.get(ident)
        if entry is None:
            raise KeyError(f"no iterator {ident!r} (its connection closed, or it was released)")
        return entry

    def call(self, ident: Any, method: Any, args: tuple[Any, ...]) -> Any:
        entry = self._get(ident)
        if method == "__next__" or (method == "send" and args in ((), (None,))):
            return next(entry.it)  # StopIteration travels as the stock error
        if method == "close":
            entry.it = iter(())
            return None
        raise AttributeError(f"an iterator has no method {method!r}")

    def incref(self, ident: Any) -> None:
        self._get(ident).refs += 1

    def decref(self, ident: Any) -> None:
        entry = self._iters.get(ident)
        if entry is None:
            return  # already dropped with its session
        entry.refs -= 1
        if entry.refs <= 0:
            self._drop(ident)

    def _drop(self, ident: str) -> None:
        entry = self._iters.pop(ident, None)
        if entry is None:
            return
        owned = self._owned.get(entry.owner)
        if owned is not None:
            owned.pop(ident, None)

    def release_session(self, session: Session) -> None:
        for ident in self._owned.pop(session, {}):
            self._iters.pop(ident, None)

    def __len__(self) -> int:
        return len(self._iters)
