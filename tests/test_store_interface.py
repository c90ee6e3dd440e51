"""The store interface as the service uses it, in process, on the memory store.

What the layers above rely on beyond each primitive's semantics (those are
``tests/contract/``): stats are snapshots, not views; a parked call is
abandoned, cancelled or undone through the store; ``would_hand_out`` reads
without taking; a session's release gives back what it held.
"""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import Iterator
from typing import Any

import pytest

from managerd.store.api import Call
from managerd.store.interface import Handle, Store
from managerd.store.memory.store import MemoryStore
from managerd.store.sessions import Session, SessionKind
from managerd.store.stats import LockStats, QueueStats, SizeStats
from managerd_client.errors import NoSuchObject


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture
def store(loop: asyncio.AbstractEventLoop) -> Store:
    memory: Store = MemoryStore(loop)  # the annotation: mypy checks the protocol
    return memory


def _call(loop: asyncio.AbstractEventLoop, session: Session | None = None) -> Call:
    return Call(session or Session(SessionKind.MANAGERD, "test"), 1, loop)


def _run(obj: Handle, method: str, call: Call, *args: Any) -> Any:
    return obj.methods[method].fn(obj, call, *args)


def test_stats_are_snapshots(store: Store, loop: asyncio.AbstractEventLoop) -> None:
    q = store.get_or_create("Queue", "q", {})
    call = _call(loop)
    _run(q, "put", call, pickle.dumps(1))
    (before,) = store.stats().objects
    _run(q, "put", call, pickle.dumps(2))
    assert isinstance(before, QueueStats) and before.depth == 1 and before.puts_total == 1
    after = store.stats_of(q)
    assert isinstance(after, QueueStats) and after.depth == 2
    assert after.describe()["depth"] == 2 and after.describe()["type"] == "Queue"
    with pytest.raises(AttributeError):
        after.depth = 5  # type: ignore[misc]


def test_lock_stats_name_the_holder_and_release_gives_it_back(
    store: Store, loop: asyncio.AbstractEventLoop
) -> None:
    lock = store.get_or_create("Lock", "lk", {})
    holder = Session(SessionKind.MANAGERD, "holder")
    token = _run(lock, "acquire", _call(loop, holder))
    stats = store.stats_of(lock)
    assert isinstance(stats, LockStats) and stats.token == token
    assert stats.holder is not None and stats.holder["id"] == holder.id
    store.release(holder)
    released = store.stats_of(lock)
    assert isinstance(released, LockStats) and released.holder is None


def test_an_abandoned_get_takes_nothing(store: Store, loop: asyncio.AbstractEventLoop) -> None:
    q = store.get_or_create("Queue", "q", {})
    session = Session(SessionKind.MANAGERD, "getter")
    future = _run(q, "get", _call(loop, session))
    assert isinstance(future, asyncio.Future)
    store.abandon(q, "get", session, future)
    assert future.cancelled()
    _run(q, "put", _call(loop), pickle.dumps("x"))
    stats = store.stats_of(q)
    assert isinstance(stats, QueueStats) and stats.depth == 1 and stats.waiters == 0


def test_an_undone_get_puts_the_item_back_first(
    store: Store, loop: asyncio.AbstractEventLoop
) -> None:
    q = store.get_or_create("Queue", "q", {})
    call = _call(loop)
    for item in ("a", "b"):
        _run(q, "put", call, pickle.dumps(item))
    assert "get" in q.undo_methods
    taken = _run(q, "get", call)
    store.undo(q, "get", call, (), taken)
    assert pickle.loads(_run(q, "get", call)) == "a"


def test_would_hand_out_leaves_the_value(store: Store, loop: asyncio.AbstractEventLoop) -> None:
    d = store.get_or_create("dict", "d", {})
    call = _call(loop)
    _run(d, "__setitem__", call, "k", pickle.dumps("v"))
    assert store.would_hand_out(d, "popitem", call, (), {}) == pickle.dumps("v")
    assert store.would_hand_out(d, "pop", call, ("k",), {}) == pickle.dumps("v")
    assert store.would_hand_out(d, "pop", call, ("missing",), {}) is None
    stats = store.stats_of(d)
    assert isinstance(stats, SizeStats) and stats.len == 1


def test_get_delete_listing(store: Store) -> None:
    store.get_or_create("Event", "e", {})
    store.get_or_create("list", "l", {})
    assert store.listing() == [("e", "Event"), ("l", "list")]
    assert store.get("e").typeid == "Event"
    assert store.delete("e") and not store.delete("e")
    with pytest.raises(NoSuchObject):
        store.get("e")
    assert "Queue" in store.types and "put" in store.types["Queue"].methods
