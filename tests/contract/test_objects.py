"""Named objects: get-or-create, conflicts, listing and deletion.

DESIGN.md principle 1 and README: ``Queue("jobs")`` anywhere is the same
queue; creation arguments apply on first creation; a later call naming a
different one is ``ArgumentConflict``, a name taken by another type
``ObjectTypeConflict``; arguments a call does not name are not compared.
Contents (dict, list, Namespace) conflict only when named and different
from the creation's. Deleting an object fails its waiters with
``NoSuchObject``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest

from managerd_client.errors import ArgumentConflict, NoSuchObject, ObjectTypeConflict

from contract.harness import StoreHarness

ALL_TYPES = [
    "Queue", "JoinableQueue", "Pipe", "dict", "list", "Namespace", "Value", "Array",
    "Lock", "RLock", "Semaphore", "BoundedSemaphore", "Event", "Condition", "Barrier",
]  # fmt: skip


@pytest.mark.parametrize("typeid", ALL_TYPES)
def test_every_type_is_got_or_created_by_name(store: StoreHarness, typeid: str) -> None:
    first = store.open(typeid, "x")
    assert store.open(typeid, "x") == first
    assert ("x", typeid) in store.objects()
    other = "Queue" if typeid != "Queue" else "dict"
    with pytest.raises(ObjectTypeConflict):
        store.open(other, "x")


def test_queue_and_joinable_queue_are_different_types(store: StoreHarness) -> None:
    store.open("Queue", "q")
    with pytest.raises(ObjectTypeConflict):
        store.open("JoinableQueue", "q")


def test_the_same_name_is_the_same_object(store: StoreHarness) -> None:
    q = store.open("Queue", "jobs", maxsize=3)
    store.call(q, "put", 1)
    again = store.open("Queue", "jobs")  # no maxsize named: not compared
    assert store.call(again, "get") == 1


@pytest.mark.parametrize(
    ("typeid", "created", "conflicting", "same"),
    [
        ("Queue", {"maxsize": 3}, {"maxsize": 4}, {"maxsize": 3}),
        ("Queue", {"max_deliveries": 2}, {"max_deliveries": 0}, {"max_deliveries": 2}),
        ("Queue", {"visibility_timeout_s": 5.0}, {"visibility_timeout_s": 6.0},
         {"visibility_timeout_s": 5}),
        ("Semaphore", {"value": 2}, {"value": 3}, {"value": 2}),
        ("Barrier", {"parties": 2}, {"parties": 3}, {"parties": 2}),
        ("Pipe", {"duplex": True}, {"duplex": False}, {"duplex": True}),
        ("Value", {"typecode": "i"}, {"typecode": "d"}, {"typecode": "i", "value": 7}),
        ("Array", {"typecode": "i", "sequence": 3}, {"typecode": "i", "sequence": 4},
         {"typecode": "i", "sequence": [9, 9, 9]}),
        ("dict", {"contents": {"a": 1}}, {"contents": {"a": 2}}, {"contents": {"a": 1.0}}),
        ("list", {"contents": [1, 2]}, {"contents": [2, 1]}, {"contents": [1, 2]}),
        ("Namespace", {"contents": {"x": 1}}, {"contents": {}}, {"contents": {"x": 1}}),
        ("dict", {}, {"contents": {"a": 1}}, {"contents": {}}),
    ],
)  # fmt: skip
def test_argument_conflicts(
    store: StoreHarness,
    typeid: str,
    created: dict[str, Any],
    conflicting: dict[str, Any],
    same: dict[str, Any],
) -> None:
    store.open(typeid, "x", **created)
    with pytest.raises(ArgumentConflict):
        store.open(typeid, "x", **conflicting)
    store.open(typeid, "x", **same)  # the creation's own arguments attach
    store.open(typeid, "x")  # and so does naming none


def test_contents_apply_only_on_creation(store: StoreHarness) -> None:
    d = store.open("dict", "d", contents={"a": 1})
    store.call(d, "__setitem__", "a", 2)
    store.open("dict", "d", contents={"a": 1})  # the creation's contents: attaches...
    assert store.call(d, "__getitem__", "a") == 2  # ...and changes nothing


@pytest.mark.parametrize(
    ("typeid", "args"),
    [("Queue", {"colour": "red"}), ("Lock", {"value": 1}), ("Nope", {})],
)
def test_unknown_types_and_arguments_are_refused(
    store: StoreHarness, typeid: str, args: dict[str, Any]
) -> None:
    with pytest.raises(TypeError):
        store.open(typeid, "x", **args)
    assert store.objects() == []


@pytest.mark.parametrize("name", ["", "a" * 257, "tab\there", "new\nline"])
def test_names_are_1_to_256_printable_characters(store: StoreHarness, name: str) -> None:
    with pytest.raises(ValueError):
        store.open("Queue", name)
    assert store.objects() == []
    store.open("Queue", "a" * 256)


@pytest.mark.parametrize(
    ("typeid", "args"),
    [("Queue", {"maxsize": "3"}), ("Queue", {"visibility_timeout_s": 0}),
     ("Queue", {"max_deliveries": -1}), ("Value", {"typecode": "z"}),
     ("Array", {"typecode": "i", "sequence": -1}), ("Pipe", {"duplex": 1})],
)  # fmt: skip
def test_bad_creation_arguments_create_nothing(
    store: StoreHarness, typeid: str, args: dict[str, Any]
) -> None:
    with pytest.raises((TypeError, ValueError)):
        store.open(typeid, "x", **args)
    assert store.objects() == []


def test_delete_fails_waiters_and_frees_the_name(store: StoreHarness) -> None:
    q = store.open("Queue", "q")
    store.call(q, "put", "gone")
    waiting = store.start(q, "join", client=store.new_client())
    lock = store.open("Lock", "l")
    store.call(lock, "acquire")
    acquiring = store.start(lock, "acquire", client=store.new_client())
    assert store.delete("q") is True
    assert store.delete("l") is True
    for pending in (waiting, acquiring):
        with pytest.raises(NoSuchObject):
            pending.result()
    assert store.delete("q") is False
    assert store.objects() == []
    with pytest.raises(NoSuchObject):
        store.call(q, "qsize")
    again = store.open("dict", "q")  # the name is free for any type
    assert store.call(again, "__len__") == 0


@pytest.mark.parametrize(
    ("typeid", "args", "change", "look", "expected"),
    [("Event", {}, ("set",), ("is_set",), True),
     ("Value", {"typecode": "i", "value": 0}, ("set", 7), ("get",), 7),
     ("Array", {"typecode": "i", "sequence": [0, 0]}, ("__setitem__", 1, 5),
      ("__getitem__", 1), 5),
     ("Barrier", {"parties": 2}, ("abort",), ("__getattribute__", "broken"), True),
     ("Queue", {}, ("put", "kept"), ("qsize",), 1),
     ("dict", {}, ("__setitem__", "k", "kept"), ("__len__",), 1),
     ("list", {}, ("append", "kept"), ("__len__",), 1),
     ("Namespace", {}, ("__setattr__", "k", "kept"), ("__getattribute__", "k"), "kept"),
     ("Semaphore", {"value": 1}, ("acquire",), ("get_value",), 0)],
)  # fmt: skip
def test_deleting_an_object_leaves_one_whose_name_it_begins(
    store: StoreHarness,
    typeid: str,
    args: dict[str, Any],
    change: tuple[Any, ...],
    look: tuple[Any, ...],
    expected: Any,
) -> None:
    """Deleting ``x`` removes ``x``'s state only, never ``xy``'s."""
    short, longer = store.open(typeid, "x", **args), store.open(typeid, "xy", **args)
    store.call(longer, *change)
    store.call(short, *change)
    assert store.delete("x") is True
    # Made again under its name once the deletion is done: the old state is gone.
    again = store.open(typeid, "x", **args)
    with contextlib.suppress(AttributeError):  # a Namespace's attribute: gone
        assert store.call(again, *look) != expected
    assert store.call(longer, *look) == expected


def test_a_condition_makes_its_lock_and_names_it(store: StoreHarness) -> None:
    store.open("Condition", "c")
    assert store.objects() == [("c", "Condition"), ("c.lock", "RLock")]
    store.open("Condition", "c", lock="c.lock")
    with pytest.raises(ArgumentConflict):
        store.open("Condition", "c", lock="other")


def test_a_condition_and_its_named_lock_stay_one_lock(store: StoreHarness) -> None:
    """The lock of a live Condition cannot be deleted (a new lock of its name would be
    another lock until a restart rebinds them); once the Condition is gone, it can."""
    cond = store.open("Condition", "c")
    with pytest.raises(RuntimeError, match="lock of Condition 'c'"):
        store.delete("c.lock")
    lock = store.open("RLock", "c.lock")
    store.call(lock, "acquire", client=store.new_client())
    assert store.call(cond, "locked") is True
    store.restart()
    assert store.objects() == [("c", "Condition"), ("c.lock", "RLock")]
    assert store.delete("c") and store.delete("c.lock")
    assert store.objects() == []
