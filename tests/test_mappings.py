"""Dicts, lists, namespaces, values and arrays across client processes.

Then the stdlib surface method by method, with the stdlib's exception types.
"""

from __future__ import annotations

import pickle
from collections.abc import MutableMapping, MutableSequence

import pytest

from managerd_client import ArgumentConflict, Manager, ObjectTypeConflict
from managerd_client.proxies import RLock

import workers
from conftest import Daemon

# -- across processes ------------------------------------------------------------------------------


def test_workers_fill_a_dict_and_a_list_concurrently(shared_daemon: Daemon, uniq: str) -> None:
    addr, key = shared_daemon.address, shared_daemon.authkey
    d_name, l_name, n = uniq + ".d", uniq + ".l", 100
    tags = ["w0", "w1", "w2", "w3"]
    procs = workers.start_all(
        workers.fill_dict_and_list, [(addr, key, d_name, l_name, t, n) for t in tags]
    )
    workers.join_all(procs)
    with shared_daemon.connect() as m:
        assert m.dict(d_name).copy() == {f"{t}-{i}": (t, i) for t in tags for i in range(n)}
        items = m.list(l_name).copy()
        assert len(items) == len(tags) * n
        for t in tags:  # every append arrived, each worker's in its own order
            assert [i for tag, i in items if tag == t] == list(range(n))


def test_value_increments_under_get_lock_lose_no_update(shared_daemon: Daemon, uniq: str) -> None:
    with shared_daemon.connect() as m:
        v = m.Value(uniq, "i", 0)
        procs = workers.start_all(
            workers.increment_value,
            [(shared_daemon.address, shared_daemon.authkey, uniq, 1000)] * 4,
        )
        workers.join_all(procs)
        assert v.value == 4000


def test_array_element_increments_under_get_lock_lose_no_update(
    shared_daemon: Daemon, uniq: str
) -> None:
    with shared_daemon.connect() as m:
        a = m.Array(uniq, "i", 4)
        procs = workers.start_all(
            workers.increment_array,
            [(shared_daemon.address, shared_daemon.authkey, uniq, 2, 1000)] * 4,
        )
        workers.join_all(procs)
        assert a.tolist() == [0, 0, 4000, 0]


def test_namespace_attributes_set_in_another_process(shared_daemon: Daemon, uniq: str) -> None:
    attrs = {"count": 3, "label": "x", "nested": {"a": [1]}, "name": "shared"}
    proc = workers.start(
        workers.set_namespace, shared_daemon.address, shared_daemon.authkey, uniq, attrs
    )
    workers.join_all([proc])
    with shared_daemon.connect() as m:
        ns = m.Namespace(uniq)
        assert ns.count == 3 and ns.label == "x" and ns.nested == {"a": [1]}
        assert ns.name == "shared"  # a shared attribute, not the proxy's object name


# -- dict ------------------------------------------------------------------------------------------


def test_dict_surface(manager: Manager, uniq: str) -> None:
    d = manager.dict(uniq)
    assert isinstance(d, MutableMapping)
    assert len(d) == 0 and d.copy() == {} and list(d) == []
    d["a"] = 1
    d[2] = [2]
    d[("t", 3)] = None
    assert d["a"] == 1 and d[2] == [2] and d[("t", 3)] is None
    assert len(d) == 3
    assert "a" in d and 2 in d and ("t", 3) in d and "zz" not in d
    assert list(d) == ["a", 2, ("t", 3)]  # insertion order, as dict
    assert list(d.keys()) == ["a", 2, ("t", 3)]
    assert list(d.values()) == [1, [2], None]
    assert list(d.items()) == [("a", 1), (2, [2]), (("t", 3), None)]
    assert d.copy() == {"a": 1, 2: [2], ("t", 3): None}
    assert dict(d) == {"a": 1, 2: [2], ("t", 3): None}
    assert d == {"a": 1, 2: [2], ("t", 3): None}
    assert d.get("a") == 1 and d.get("missing") is None and d.get("missing", 7) == 7
    assert d.get(("t", 3), "dflt") is None  # a stored None is not "missing"
    assert d.setdefault("a", 99) == 1
    assert d.setdefault("new", 5) == 5 and d["new"] == 5
    assert d.setdefault("none") is None and "none" in d
    assert d.pop("new") == 5 and "new" not in d
    assert d.pop("new", "gone") == "gone"
    assert d.pop("new", None) is None
    d.update({"b": 2}, c=3)
    d.update([("e", 5)])
    assert d["b"] == 2 and d["c"] == 3 and d["e"] == 5
    del d["b"]
    assert "b" not in d
    key, value = d.popitem()  # LIFO, as dict
    assert (key, value) == ("e", 5)
    d.clear()
    assert len(d) == 0 and d.copy() == {}


def test_dict_errors(manager: Manager, uniq: str) -> None:
    d = manager.dict(uniq)
    with pytest.raises(KeyError) as info:
        d["missing"]
    assert info.value.args == ("missing",)
    with pytest.raises(KeyError) as info:
        del d[("t", 1)]
    assert info.value.args == (("t", 1),)
    with pytest.raises(KeyError) as info:
        d.pop(42)
    assert info.value.args == (42,)
    with pytest.raises(KeyError):
        d.popitem()
    with pytest.raises(TypeError):
        d[["unhashable"]] = 1


def test_dict_batches(manager: Manager, uniq: str) -> None:
    d = manager.dict(uniq)
    d.update({f"k{i}": i for i in range(50)})
    assert len(d) == 50
    assert d.get_many(["k1", "nope", "k49"]) == [1, None, 49]
    assert d.get_many(["nope"], default="-") == ["-"]
    assert d.get_many([]) == []


def test_dict_update_from_another_shared_dict(manager: Manager, uniq: str) -> None:
    src, dst = manager.dict(uniq + ".src"), manager.dict(uniq + ".dst")
    src.update(a=1, b=2)
    dst.update(src)
    assert dst.copy() == {"a": 1, "b": 2}
    assert dst == src


# -- list ------------------------------------------------------------------------------------------


def test_list_surface(manager: Manager, uniq: str) -> None:
    lst = manager.list(uniq)
    assert isinstance(lst, MutableSequence)
    lst.append(3)
    lst.extend([1, 2])
    lst.insert(0, 0)
    assert lst.copy() == [0, 3, 1, 2] and len(lst) == 4
    assert lst[0] == 0 and lst[-1] == 2
    assert lst[1:3] == [3, 1] and lst[::-1] == [2, 1, 3, 0] and lst[5:] == []
    lst[1] = "three"
    assert lst[1] == "three"
    lst[1:3] = ["x", "y", "z"]  # a slice may change the length
    assert lst.copy() == [0, "x", "y", "z", 2]
    lst[::2] = ["A", "B", "C"]
    assert lst.copy() == ["A", "x", "B", "z", "C"]
    del lst[1]
    del lst[-2:]
    assert lst.copy() == ["A", "B"]
    lst[:] = [5, 1, 4, 1]
    assert list(lst) == [5, 1, 4, 1]  # iteration
    assert list(reversed(lst)) == [1, 4, 1, 5]
    assert 4 in lst and 9 not in lst
    assert lst.count(1) == 2 and lst.count(9) == 0
    assert lst.index(1) == 1 and lst.index(1, 2) == 3 and lst.index(4, 0, 3) == 2
    lst.sort()
    assert lst.copy() == [1, 1, 4, 5]
    lst.sort(reverse=True)
    assert lst.copy() == [5, 4, 1, 1]
    lst.reverse()
    assert lst.copy() == [1, 1, 4, 5]
    lst.remove(1)
    assert lst.copy() == [1, 4, 5]
    assert lst.pop() == 5 and lst.pop(0) == 1 and lst.copy() == [4]
    lst += [6, 7]
    assert lst.copy() == [4, 6, 7]
    lst *= 2
    assert lst.copy() == [4, 6, 7, 4, 6, 7]
    assert lst + [8] == [4, 6, 7, 4, 6, 7, 8]  # noqa: RUF005 - the proxy's __add__
    assert lst == [4, 6, 7, 4, 6, 7]
    lst.clear()
    assert len(lst) == 0 and lst.copy() == []


def test_list_augmented_assignment_keeps_the_proxy(manager: Manager, uniq: str) -> None:
    lst = manager.list(uniq)
    same = lst
    lst += ["a"]
    lst *= 3
    assert lst is same
    assert manager.list(uniq).copy() == ["a", "a", "a"]


def test_bool_indices_are_0_and_1_as_for_list_and_array(manager: Manager, uniq: str) -> None:
    """``l[True]`` is ``l[1]`` for a list (bool is an int): the stateful model found it refused."""
    lst = manager.list(uniq, ["a", "b", "c"])
    model = ["a", "b", "c"]
    assert lst[True] == model[True] == "b"
    lst[False] = "A"
    model[False] = "A"
    lst.insert(True, "x")
    model.insert(True, "x")
    del lst[True]
    del model[True]
    assert lst.pop(True) == model.pop(True)
    lst *= True
    model *= True
    assert lst.copy() == model
    del lst[:]
    with pytest.raises(IndexError):
        lst[True]  # out of range, as list says (not a TypeError)
    # The argument is checked before the emptiness, as list.pop does.
    with pytest.raises(OverflowError):
        lst.pop(2**63)
    with pytest.raises(TypeError):
        lst.pop("1")  # type: ignore[arg-type]  # the wrong type on purpose
    with pytest.raises(IndexError):
        lst.pop(True)
    arr = manager.Array(uniq + ".a", "i", [5, 6])
    assert arr[True] == 6
    arr[False] = 7
    assert arr.tolist() == [7, 6]


def test_list_errors(manager: Manager, uniq: str) -> None:
    lst = manager.list(uniq)
    with pytest.raises(IndexError):
        lst.pop()
    lst.extend([1, 2])
    with pytest.raises(IndexError):
        lst[2]
    with pytest.raises(IndexError):
        lst[-3] = 0
    with pytest.raises(IndexError):
        del lst[5]
    with pytest.raises(IndexError):
        lst.pop(7)
    with pytest.raises(ValueError):
        lst.remove(3)
    with pytest.raises(ValueError):
        lst.index(3)
    with pytest.raises(ValueError):
        lst.index(1, 1)  # not in the range searched
    with pytest.raises(ValueError):
        lst[::2] = ["one", "two"]  # an extended slice keeps its length
    with pytest.raises(TypeError):
        lst["0"]
    with pytest.raises(TypeError):
        lst.sort(key=abs)  # type: ignore[arg-type]  # sorted on the daemon: no key function
    lst.append("mixed")
    with pytest.raises(TypeError):
        lst.sort()
    assert lst.copy() == [1, 2, "mixed"]  # a failed sort changes nothing


def test_list_compares_items_by_value(manager: Manager, uniq: str) -> None:
    lst = manager.list(uniq)
    lst.extend([1, 1.0, (1, 2), {"k": [1]}, "s"])
    # Equal values whose pickles differ (1 and 1.0) still compare equal.
    assert lst.count(1) == 2
    assert lst.index((1, 2)) == 2 and {"k": [1]} in lst
    lst.remove(1.0)
    assert lst.copy() == [1.0, (1, 2), {"k": [1]}, "s"]


# -- namespace -------------------------------------------------------------------------------------


def test_namespace_surface(manager: Manager, uniq: str) -> None:
    ns = manager.Namespace(uniq)
    ns.x = 1
    ns.items = [1, 2]  # any public name, even one the proxy uses
    ns.name = "shared"  # type: ignore[misc]  # a Namespace takes any public name
    assert ns.x == 1 and ns.items == [1, 2] and ns.name == "shared"
    assert manager.Namespace(uniq).x == 1
    ns.x = 2
    assert ns.x == 2
    del ns.x
    with pytest.raises(AttributeError):
        _ = ns.x
    with pytest.raises(AttributeError):
        del ns.x
    assert getattr(ns, "missing", "default") == "default"
    assert not hasattr(ns, "missing")
    assert "items=[1, 2]" in repr(ns)
    again = pickle.loads(pickle.dumps(ns))  # pickles by name, like every proxy
    assert again.items == [1, 2] and again.name == "shared"


# -- value and array -------------------------------------------------------------------------------


def test_value_surface(manager: Manager, uniq: str) -> None:
    v = manager.Value(uniq, "i", 7)
    assert v.value == 7
    v.value = -3
    assert v.value == -3 and v.get() == -3
    v.set(10)
    assert v.add(5) == 15 and v.value == 15
    assert manager.Value(uniq, "i", 999).value == 15  # the initial value applies once
    with pytest.raises(TypeError):
        v.value = 1.5
    with pytest.raises(TypeError):
        v.value = "1"
    assert v.value == 15
    lock = v.get_lock()
    assert isinstance(lock, RLock)
    with lock, lock:  # an RLock: re-entrant
        v.value += 1
    assert v.value == 16


def test_value_typecodes(manager: Manager, uniq: str) -> None:
    d = manager.Value(uniq + ".d", "d", 1)
    assert d.value == 1.0 and isinstance(d.value, float)
    d.value = 2.5
    assert d.value == 2.5
    c = manager.Value(uniq + ".c", "c", b"x")
    assert c.value == b"x"
    with pytest.raises(TypeError):
        c.value = 1
    b = manager.Value(uniq + ".b", "b", 0)
    with pytest.raises(OverflowError):
        b.value = 1000
    with pytest.raises(TypeError):
        manager.Value(uniq + ".bad", "z")
    with pytest.raises(TypeError):
        manager.Value(uniq + ".float", "i", 1.5)


def test_array_surface(manager: Manager, uniq: str) -> None:
    a = manager.Array(uniq, "i", [1, 2, 3, 4])
    assert len(a) == 4 and a.tolist() == [1, 2, 3, 4] and list(a) == [1, 2, 3, 4]
    assert a[0] == 1 and a[-1] == 4
    assert a[1:3] == [2, 3] and a[::-1] == [4, 3, 2, 1]
    a[0] = 10
    a[-1] = 40
    a[1:3] = [20, 30]
    assert a.tolist() == [10, 20, 30, 40]
    a[::2] = (7, 8)
    assert a.tolist() == [7, 20, 8, 40]
    with pytest.raises(IndexError):
        a[4]
    with pytest.raises(IndexError):
        a[-5] = 0
    with pytest.raises(TypeError):
        a[0] = 1.5  # an 'i' array holds ints, as ctypes
    with pytest.raises(IndexError):
        a[4] = 1.5  # the index is checked first, as ctypes
    with pytest.raises(TypeError):
        a[0:2] = [1, 2.5]
    with pytest.raises(ValueError):
        a[0:2] = [1, 2, 3]  # fixed length
    assert a.tolist() == [7, 20, 8, 40]  # nothing half-written
    lock = a.get_lock()
    assert isinstance(lock, RLock)
    with lock:
        a[0] += 1
    assert a[0] == 8


def test_array_sizes_and_typecodes(manager: Manager, uniq: str) -> None:
    zeros = manager.Array(uniq + ".z", "d", 3)
    assert zeros.tolist() == [0.0, 0.0, 0.0]
    zeros[1] = 2
    assert zeros[1] == 2.0
    chars = manager.Array(uniq + ".c", "c", b"abc")
    assert chars[0] == b"a" and chars[:] == b"abc" and len(chars) == 3
    chars[1] = b"X"
    assert chars.tolist() == b"aXc"
    with pytest.raises(TypeError):
        manager.Array(uniq + ".f", "i", [1, 2.5])


# -- get-or-create by name -------------------------------------------------------------------------


def test_mappings_get_or_create_by_name(shared_daemon: Daemon, uniq: str) -> None:
    with shared_daemon.connect() as m1, shared_daemon.connect() as m2:
        m1.dict(uniq + ".d")["k"] = "v"
        assert m2.dict(uniq + ".d")["k"] == "v"
        m1.list(uniq + ".l").append(1)
        assert m2.list(uniq + ".l").copy() == [1]
        with pytest.raises(ObjectTypeConflict):
            m2.list(uniq + ".d")
        with pytest.raises(ObjectTypeConflict):
            m2.Namespace(uniq + ".l")
        m1.Value(uniq + ".v", "i", 1)
        with pytest.raises(ArgumentConflict):
            m2.Value(uniq + ".v", "d")
        assert m2.Value(uniq + ".v", "i").value == 1
        m1.Array(uniq + ".a", "i", 4)
        with pytest.raises(ArgumentConflict):
            m2.Array(uniq + ".a", "i", 5)
        with pytest.raises(ArgumentConflict):
            m2.Array(uniq + ".a", "d", 4)
        assert len(m2.Array(uniq + ".a", "i", [9, 9, 9, 9])) == 4  # same length: attaches
        assert m2.Array(uniq + ".a", "i", 4).tolist() == [0, 0, 0, 0]
