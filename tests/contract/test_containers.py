"""dict, list, Namespace, Value and Array: the builtin's outcome for the same call.

Each test runs the same operations on the store's object and on the
builtin (``dict``, ``list``, ``types.SimpleNamespace``, ``array``) and
compares every outcome: the same value, or an error of the same type.
Deliberate differences (README): ``pop`` of an unhashable key is a
TypeError even on an empty dict; a failed ``sort`` changes nothing; list
``sort`` takes no key function; ``Value``/``Array`` are typed as ``ctypes``
would hold the typecode.
"""

from __future__ import annotations

import array
import math
import types
from collections.abc import Callable
from typing import Any

import pytest

from contract.harness import Obj, StoreHarness
from contract.outcomes import outcome, same_outcome

#: A model operation: the method name, its arguments, and what the builtin does.
Step = tuple[str, tuple[Any, ...], Callable[[Any], Any]]


def run_steps(store: StoreHarness, obj: Obj, model: Any, steps: list[Step]) -> None:
    for method, args, on_model in steps:
        got = outcome(lambda: store.call(obj, method, *args))  # noqa: B023
        want = outcome(lambda: on_model(model))  # noqa: B023
        same_outcome(got, want, f"{method}{args!r}")


# -- dict ---------------------------------------------------------------------------------

DICT_STEPS: list[Step] = [
    ("__setitem__", ("a", 1), lambda d: d.__setitem__("a", 1)),
    ("__setitem__", (2, [2]), lambda d: d.__setitem__(2, [2])),
    ("__setitem__", ((1, "t"), None), lambda d: d.__setitem__((1, "t"), None)),
    ("__getitem__", ("a",), lambda d: d["a"]),
    ("__getitem__", ("missing",), lambda d: d["missing"]),
    ("__getitem__", ([1],), lambda d: d[[1]]),  # unhashable
    ("__contains__", (2,), lambda d: 2 in d),
    ("__contains__", ("zz",), lambda d: "zz" in d),
    ("__len__", (), len),
    ("get", ("a",), lambda d: d.get("a")),
    ("get", ("zz",), lambda d: d.get("zz")),
    ("get", ("zz", "dflt"), lambda d: d.get("zz", "dflt")),
    ("setdefault", ("a", 9), lambda d: d.setdefault("a", 9)),
    ("setdefault", ("n", 9), lambda d: d.setdefault("n", 9)),
    ("pop", ("n",), lambda d: d.pop("n")),
    ("pop", ("n",), lambda d: d.pop("n")),
    ("pop", ("n", "dflt"), lambda d: d.pop("n", "dflt")),
    ("__delitem__", (2,), lambda d: d.__delitem__(2)),
    ("__delitem__", (2,), lambda d: d.__delitem__(2)),
    ("update", ({"x": 1, "y": 2},), lambda d: d.update({"x": 1, "y": 2})),
    ("keys", (), lambda d: list(d.keys())),
    ("values", (), lambda d: list(d.values())),
    ("items", (), lambda d: list(d.items())),
    ("copy", (), lambda d: d.copy()),
    ("popitem", (), lambda d: d.popitem()),
    ("get_many", (["a", "x", "q"],), lambda d: [d.get(k) for k in ["a", "x", "q"]]),
    ("clear", (), lambda d: d.clear()),
    ("popitem", (), lambda d: d.popitem()),
    ("__len__", (), len),
]


def test_dict_as_the_builtin(store: StoreHarness) -> None:
    run_steps(store, store.open("dict", "d"), {}, DICT_STEPS)


def test_dict_keys_keep_their_type_and_nan_is_one_key(store: StoreHarness) -> None:
    d = store.open("dict", "d")
    nan = float("nan")
    store.call(d, "__setitem__", 1, "int")
    store.call(d, "__setitem__", 1.5, "float")
    store.call(d, "__setitem__", nan, "nan")
    assert store.call(d, "__getitem__", 1) == "int"
    assert store.call(d, "__getitem__", True) == "int"  # True == 1, as in a dict
    keys = store.call(d, "keys")
    assert len(keys) == 3 and any(isinstance(k, float) and math.isnan(k) for k in keys)


def test_dict_created_with_contents(store: StoreHarness) -> None:
    d = store.open("dict", "d", contents={"a": 1, "b": [2]})
    assert dict(store.call(d, "items")) == {"a": 1, "b": [2]}


# -- list ---------------------------------------------------------------------------------

LIST_STEPS: list[Step] = [
    ("append", (3,), lambda x: x.append(3)),
    ("extend", ([1, "a", 2.5],), lambda x: x.extend([1, "a", 2.5])),
    ("insert", (0, "first"), lambda x: x.insert(0, "first")),
    ("insert", (100, "last"), lambda x: x.insert(100, "last")),
    ("insert", (-2, "mid"), lambda x: x.insert(-2, "mid")),
    ("__len__", (), len),
    ("__getitem__", (0,), lambda x: x[0]),
    ("__getitem__", (-1,), lambda x: x[-1]),
    ("__getitem__", (99,), lambda x: x[99]),
    ("__getitem__", ("0",), lambda x: x["0"]),
    ("__getitem__", (True,), lambda x: x[True]),
    ("__getitem__", (slice(1, 3),), lambda x: x[1:3]),
    ("__getitem__", (slice(None, None, -2),), lambda x: x[::-2]),
    ("__setitem__", (1, "one"), lambda x: x.__setitem__(1, "one")),
    ("__setitem__", (50, "x"), lambda x: x.__setitem__(50, "x")),
    (
        "__setitem__",
        (slice(0, 2), ["s", "t", "u"]),
        lambda x: x.__setitem__(slice(0, 2), ["s", "t", "u"]),
    ),
    ("__setitem__", (slice(0, 4, 2), ["w"]), lambda x: x.__setitem__(slice(0, 4, 2), ["w"])),
    ("__contains__", ("a",), lambda x: "a" in x),
    ("__contains__", ("zz",), lambda x: "zz" in x),
    ("index", ("a",), lambda x: x.index("a")),
    ("index", ("zz",), lambda x: x.index("zz")),
    ("index", ("a", 0, 2), lambda x: x.index("a", 0, 2)),
    ("count", (1,), lambda x: x.count(1)),
    ("remove", ("a",), lambda x: x.remove("a")),
    ("remove", ("a",), lambda x: x.remove("a")),
    ("pop", (), lambda x: x.pop()),
    ("pop", (0,), lambda x: x.pop(0)),
    ("pop", (99,), lambda x: x.pop(99)),
    ("pop", (None,), lambda x: x.pop(None)),
    ("__delitem__", (0,), lambda x: x.__delitem__(0)),
    ("__delitem__", (slice(0, 1),), lambda x: x.__delitem__(slice(0, 1))),
    ("__delitem__", (77,), lambda x: x.__delitem__(77)),
    ("reverse", (), lambda x: x.reverse()),
    ("copy", (), lambda x: x.copy()),
    ("__add__", ([9],), lambda x: x + [9]),  # noqa: RUF005 (the operator under test)
    ("__mul__", (2,), lambda x: x * 2),
    ("__rmul__", (2,), lambda x: 2 * x),
    ("__imul__", (2,), lambda x: x.__imul__(2) and None),
    ("__reversed__", (), lambda x: list(reversed(x))),
    ("clear", (), lambda x: x.clear()),
    ("extend", ([3, 1, 2],), lambda x: x.extend([3, 1, 2])),
    ("sort", (), lambda x: x.sort()),
    ("sort", (None, True), lambda x: x.sort(reverse=True)),
    ("copy", (), lambda x: x.copy()),
    ("pop", (), lambda x: x.pop()),
]


def test_list_as_the_builtin(store: StoreHarness) -> None:
    run_steps(store, store.open("list", "l"), [], LIST_STEPS)


def test_a_failed_sort_changes_nothing(store: StoreHarness) -> None:
    lst = store.open("list", "l", contents=[3, "a", 1])
    with pytest.raises(TypeError):
        store.call(lst, "sort")
    assert store.call(lst, "copy") == [3, "a", 1]


def test_list_equality_is_by_value(store: StoreHarness) -> None:
    """``in``/``index``/``count``/``remove`` compare values, not their pickles."""
    lst = store.open("list", "l", contents=[1, 1.0, True, (1,)])
    assert store.call(lst, "count", 1) == [1, 1.0, True, (1,)].count(1)
    assert store.call(lst, "index", (1,)) == 3


# -- Namespace ----------------------------------------------------------------------------


def test_namespace_as_simple_namespace(store: StoreHarness) -> None:
    ns = store.open("Namespace", "n", contents={"x": 1})
    model = types.SimpleNamespace(x=1)
    steps: list[Step] = [
        ("__getattribute__", ("x",), lambda m: m.x),
        ("__getattribute__", ("y",), lambda m: m.y),
        ("__setattr__", ("y", [2]), lambda m: setattr(m, "y", [2])),
        ("__getattribute__", ("y",), lambda m: m.y),
        ("__delattr__", ("x",), lambda m: delattr(m, "x")),
        ("__delattr__", ("x",), lambda m: delattr(m, "x")),
        ("__getattribute__", ("x",), lambda m: m.x),
        ("items", (), lambda m: list(vars(m).items())),
    ]
    run_steps(store, ns, model, steps)
    with pytest.raises(TypeError):
        store.call(ns, "__setattr__", 5, "v")  # attribute names are str


# -- Value and Array ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("typecode", "values"),
    [("i", [5, -7, 2**31, 1.5, "3", None]), ("d", [1.5, 2, float("inf"), "x"]),
     ("B", [255, 256, -1]), ("c", [b"x", b"xy", "x", 1])],
)  # fmt: skip
def test_value_holds_what_its_typecode_holds(
    store: StoreHarness, typecode: str, values: list[Any]
) -> None:
    v = store.open("Value", "v", typecode=typecode)
    for value in values:
        got = outcome(lambda: store.call(v, "set", value))  # noqa: B023
        if typecode == "c":
            ok = isinstance(value, bytes) and len(value) == 1
            assert got.ok == ok, (value, got)
            want = value if ok else None
        else:
            model = outcome(lambda: array.array(typecode, [value])[0])  # noqa: B023
            same_outcome(got, outcome(lambda: None) if model.ok else model, f"set({value!r})")
            want = model.value
        if got.ok:
            assert store.call(v, "get") == want


def test_value_add_is_atomic_and_checked(store: StoreHarness) -> None:
    v = store.open("Value", "v", typecode="i", value=40)
    assert store.call(v, "add", 2) == 42
    with pytest.raises(TypeError):
        store.call(v, "add", "x")
    with pytest.raises(OverflowError):
        store.call(v, "add", 2**40)
    assert store.call(v, "get") == 42


def test_array_as_array(store: StoreHarness) -> None:
    arr = store.open("Array", "a", typecode="i", sequence=[1, 2, 3])
    model = array.array("i", [1, 2, 3])
    steps: list[Step] = [
        ("__len__", (), len),
        ("__getitem__", (0,), lambda m: m[0]),
        ("__getitem__", (-1,), lambda m: m[-1]),
        ("__getitem__", (5,), lambda m: m[5]),
        ("__getitem__", (slice(0, 2),), lambda m: m[0:2].tolist()),
        ("__setitem__", (1, 20), lambda m: m.__setitem__(1, 20)),
        ("__setitem__", (9, 1), lambda m: m.__setitem__(9, 1)),
        ("__setitem__", (0, "x"), lambda m: m.__setitem__(0, "x")),
        ("__setitem__", (0, 2**40), lambda m: m.__setitem__(0, 2**40)),
        (
            "__setitem__",
            (slice(0, 3), [7, 8, 9]),
            lambda m: m.__setitem__(slice(0, 3), array.array("i", [7, 8, 9])),
        ),
        ("tolist", (), lambda m: m.tolist()),
    ]
    run_steps(store, arr, model, steps)
    with pytest.raises(ValueError):  # an Array has a fixed length (ctypes)
        store.call(arr, "__setitem__", slice(0, 3), [1])
    assert store.call(arr, "tolist") == [7, 8, 9]


def test_array_of_bytes(store: StoreHarness) -> None:
    arr = store.open("Array", "a", typecode="c", sequence=3)
    assert store.call(arr, "tolist") == b"\0\0\0"
    store.call(arr, "__setitem__", 0, b"x")
    assert store.call(arr, "__getitem__", 0) == b"x"
    with pytest.raises(TypeError):
        store.call(arr, "__setitem__", 1, 5)
    assert store.call(arr, "tolist") == b"x\0\0"
