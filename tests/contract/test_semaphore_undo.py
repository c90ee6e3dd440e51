"""A Semaphore acquire undone (its caller left) after its permit was released meanwhile.

The memory store counts a session's permits: its undo gives one back if the
session still holds any. The etcd store names them (a contender key each):
its undo gives back the one the acquire was answered with, or, if that one
is gone, another the session holds (``sync.PermitReturn``). Both leave the
same count: nothing held for nobody, nothing given back twice.
"""

from __future__ import annotations

import pytest

from contract.harness import StoreHarness


@pytest.mark.parametrize("typeid", ["Semaphore", "BoundedSemaphore"])
def test_undo_after_the_session_released_that_permit_gives_back_another_it_holds(
    store: StoreHarness, typeid: str
) -> None:
    sem = store.open(typeid, "s", value=2)
    store.call(sem, "acquire", thread=1)
    second = store.start(sem, "acquire", thread=2)
    assert second.result()
    store.call(sem, "release", thread=1)  # the session's newest: the undone one's
    store.undo(second)
    assert store.call(sem, "get_value") == 2


@pytest.mark.parametrize("typeid", ["Semaphore", "BoundedSemaphore"])
def test_undo_after_its_permit_was_released_gives_back_nothing_more(
    store: StoreHarness, typeid: str
) -> None:
    sem = store.open(typeid, "s", value=1)
    acquired = store.start(sem, "acquire")
    assert acquired.result()
    store.call(sem, "release")
    store.undo(acquired)
    assert store.call(sem, "get_value") == 1
    other = store.new_client()
    assert store.call(sem, "acquire", False, client=other)
    assert not store.call(sem, "acquire", False, client=store.new_client())


def test_undo_after_another_client_released_that_permit_gives_back_nothing_more(
    store: StoreHarness,
) -> None:
    sem = store.open("Semaphore", "s", value=1)
    acquired = store.start(sem, "acquire")
    assert acquired.result()
    store.call(sem, "release", client=store.new_client())
    store.undo(acquired)
    assert store.call(sem, "get_value") == 1


def test_undo_gives_back_its_own_permit_when_the_session_holds_several(
    store: StoreHarness,
) -> None:
    sem = store.open("Semaphore", "s", value=3)
    first = store.start(sem, "acquire", thread=1)
    assert first.result()
    store.call(sem, "acquire", thread=2)
    store.undo(first)
    assert store.call(sem, "get_value") == 2
    store.call(sem, "release", thread=2)
    assert store.call(sem, "get_value") == 3
