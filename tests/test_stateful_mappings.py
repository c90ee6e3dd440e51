"""Model-based tests of dict, list, Namespace, Value and Array.

Models: ``dict``, ``list``, ``types.SimpleNamespace``, and for Value/Array
the ``multiprocessing.sharedctypes`` semantics reproduced by ``array.array``
of the same typecode (a value that does not fit is refused, as ctypes
does). All are durable: a daemon crash (SIGKILL) and recovery must keep the
exact state. Two client sessions and two threads each make the calls.

Where managerd deliberately differs from the builtin objects:

- dict keys travel pickled: a NaN key never finds an earlier NaN key (each
  request brings a new float object; ``dict`` matches NaN by identity). The
  model gets a fresh NaN for each call too, so it agrees.
- list/dict values are pickled by the client: an unpicklable value is
  refused before it is sent.
- ``list.sort`` compares the values the daemon decodes (builtin data only);
  a sort that fails changes nothing (``list.sort`` may leave it permuted).
- ``dict.pop`` of an unhashable key is a TypeError even on an empty dict
  (CPython returns the default there without hashing the key).
"""

from __future__ import annotations

import array
import types
from typing import Any

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, precondition, rule

from managerd_client import ArgumentConflict

from conftest import Daemon
from stateful_support import (
    Actor,
    Outcome,
    StatefulMachine,
    hashable_keys,
    ints_hostile,
    keys,
    outcome,
    payloads,
    run_machine,
    same,
    same_outcome,
    sdaemon,
    settles,
    wrong_types,
)

__all__ = ["sdaemon"]

#: A daemon restart that hangs fails in conftest (30 s, with the daemon's log)
#: rather than in pytest-timeout (which shows no log).
pytestmark = pytest.mark.timeout(300)


#: Initial contents: plain data that compares equal to itself (no NaN).
plain_keys = st.one_of(st.integers(-3, 3), st.text(max_size=3))
plain_values = st.one_of(
    st.none(), st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=2)
)


def fresh(key: Any) -> Any:
    """A NaN key as a new object (what the daemon sees: it was unpickled)."""
    if isinstance(key, float) and key != key:
        return float("nan")
    return key


class DictMachine(StatefulMachine):
    primitive = "dict"

    def __init__(self) -> None:
        super().__init__()
        self.model: dict[Any, Any] = {}
        self.initial: dict[Any, Any] = {}
        self.proxies: list[Any] = []

    @initialize(contents=st.dictionaries(plain_keys, plain_values, max_size=3), kw=st.booleans())
    def create(self, contents: dict[Any, Any], kw: bool) -> None:
        """Created with initial contents (maybe as keywords), attached with none."""
        self.initial = dict(contents)
        if kw:
            self.initial = {f"k{k!r}": v for k, v in contents.items()}
            first = self.managers[0].dict(self.name(), **self.initial)
        else:
            first = self.managers[0].dict(self.name(), self.initial)
        self.model = dict(self.initial)
        self.proxies = [first, self.managers[1].dict(self.name())]

    @precondition(lambda self: self.proxies and self.initial)
    @rule(data=st.data(), same_contents=st.booleans())
    def attach_with_contents(self, data: st.DataObject, same_contents: bool) -> None:
        """Attach with the creation contents: fine; with others: ArgumentConflict."""
        a = data.draw(st.sampled_from(self.actors))
        given = dict(self.initial) if same_contents else {**self.initial, "other": 1}
        got = a.run(lambda: outcome(lambda: self.manager(a).dict(self.name(), given)))
        want = Outcome() if same_contents else Outcome(exc=ArgumentConflict())
        same_outcome(got, want, f"{a} dict({self.name()!r}, {given!r})", compare=False)

    def p(self, actor: Actor) -> Any:
        return self.proxies[actor.client]

    @rule(data=st.data(), key=keys, value=payloads)
    def setitem(self, data: st.DataObject, key: Any, value: Any) -> None:
        a = data.draw(st.sampled_from(self.actors))
        self.call(
            a, f"d[{key!r}] = ...", lambda: self.p(a).__setitem__(key, value),
            lambda: self.model.__setitem__(fresh(key), value),
        )  # fmt: skip

    @rule(data=st.data(), key=keys)
    def getitem(self, data: st.DataObject, key: Any) -> None:
        a = data.draw(st.sampled_from(self.actors))
        self.call(a, f"d[{key!r}]", lambda: self.p(a)[key], lambda: self.model[fresh(key)])

    @rule(data=st.data(), key=keys)
    def delitem(self, data: st.DataObject, key: Any) -> None:
        a = data.draw(st.sampled_from(self.actors))
        self.call(
            a, f"del d[{key!r}]", lambda: self.p(a).__delitem__(key),
            lambda: self.model.__delitem__(fresh(key)),
        )  # fmt: skip

    @rule(data=st.data(), key=keys, default=payloads, with_default=st.booleans())
    def pop(self, data: st.DataObject, key: Any, default: Any, with_default: bool) -> None:
        a = data.draw(st.sampled_from(self.actors))
        args = (key, default) if with_default else (key,)

        def model() -> Any:
            # CPython's dict.pop on an empty dict returns the default without
            # hashing the key; managerd refuses an unhashable key always.
            hash(key)
            return self.model.pop(fresh(key), *args[1:])

        self.call(a, f"pop{args!r}", lambda: self.p(a).pop(*args), model)

    @rule(data=st.data(), key=keys, default=payloads)
    def setdefault(self, data: st.DataObject, key: Any, default: Any) -> None:
        a = data.draw(st.sampled_from(self.actors))
        self.call(
            a, f"setdefault({key!r})", lambda: self.p(a).setdefault(key, default),
            lambda: self.model.setdefault(fresh(key), default),
        )  # fmt: skip

    @rule(data=st.data(), key=keys)
    def contains_get(self, data: st.DataObject, key: Any) -> None:
        a = data.draw(st.sampled_from(self.actors))
        self.call(a, f"{key!r} in d", lambda: key in self.p(a), lambda: fresh(key) in self.model)
        self.call(
            a, f"d.get({key!r})", lambda: self.p(a).get(key), lambda: self.model.get(fresh(key))
        )

    @rule(data=st.data(), pairs=st.lists(st.tuples(hashable_keys, payloads), max_size=3))
    def update(self, data: st.DataObject, pairs: list[tuple[Any, Any]]) -> None:
        a = data.draw(st.sampled_from(self.actors))
        self.call(
            a, "update", lambda: self.p(a).update(pairs),
            lambda: self.model.update([(fresh(k), v) for k, v in pairs]),
        )  # fmt: skip

    @precondition(lambda self: self.proxies)
    @rule(data=st.data())
    def popitem(self, data: st.DataObject) -> None:
        a = data.draw(st.sampled_from(self.actors))
        self.call(a, "popitem", lambda: self.p(a).popitem(), self.model.popitem)

    @rule(data=st.data())
    def clear(self, data: st.DataObject) -> None:
        a = data.draw(st.sampled_from(self.actors))
        self.call(a, "clear", lambda: self.p(a).clear(), self.model.clear)

    @precondition(lambda self: self.proxies and self.may_restart())
    @rule()
    def restart(self) -> None:
        """A crash: a durable dict keeps every acknowledged write."""
        self.restart_daemon()

    @invariant()
    @settles
    def daemon_agrees(self) -> None:
        if not self.proxies:
            return
        got = self.proxies[0].items()
        assert same(got, list(self.model.items())), f"items {got!r} != model {self.model!r}"
        assert self.status_of(self.name())["len"] == len(self.model)


class ListMachine(StatefulMachine):
    primitive = "list"

    def __init__(self) -> None:
        super().__init__()
        self.model: list[Any] = []
        self.initial: list[Any] = []
        self.proxies: list[Any] = []

    @initialize(contents=st.lists(plain_values, max_size=3), as_tuple=st.booleans())
    def create(self, contents: list[Any], as_tuple: bool) -> None:
        """Created from an iterable (maybe a tuple), attached with none."""
        self.initial = contents
        first = self.managers[0].list(self.name(), tuple(contents) if as_tuple else contents)
        self.model = list(contents)
        self.proxies = [first, self.managers[1].list(self.name())]

    @precondition(lambda self: self.proxies and self.initial)
    @rule(data=st.data(), same_contents=st.booleans())
    def attach_with_contents(self, data: st.DataObject, same_contents: bool) -> None:
        a = data.draw(st.sampled_from(self.actors))
        given = list(self.initial) if same_contents else [*self.initial, "other"]
        got = a.run(lambda: outcome(lambda: self.manager(a).list(self.name(), given)))
        want = Outcome() if same_contents else Outcome(exc=ArgumentConflict())
        same_outcome(got, want, f"{a} list({self.name()!r}, {given!r})", compare=False)

    def p(self, actor: Actor) -> Any:
        return self.proxies[actor.client]

    index = st.one_of(ints_hostile, wrong_types, st.just(True))

    @rule(data=st.data(), value=payloads)
    def append(self, data: st.DataObject, value: Any) -> None:
        a = data.draw(st.sampled_from(self.actors))
        self.call(a, "append", lambda: self.p(a).append(value), lambda: self.model.append(value))

    @rule(data=st.data(), values=st.lists(payloads, max_size=3))
    def extend(self, data: st.DataObject, values: list[Any]) -> None:
        a = data.draw(st.sampled_from(self.actors))
        self.call(a, "extend", lambda: self.p(a).extend(values), lambda: self.model.extend(values))

    @rule(data=st.data(), i=index, value=payloads)
    def insert(self, data: st.DataObject, i: Any, value: Any) -> None:
        a = data.draw(st.sampled_from(self.actors))
        self.call(
            a, f"insert({i!r})", lambda: self.p(a).insert(i, value),
            lambda: self.model.insert(i, value),
        )  # fmt: skip

    @rule(data=st.data(), i=index)
    def getitem(self, data: st.DataObject, i: Any) -> None:
        a = data.draw(st.sampled_from(self.actors))
        self.call(a, f"l[{i!r}]", lambda: self.p(a)[i], lambda: self.model[i])

    @rule(data=st.data(), i=index, value=payloads)
    def setitem(self, data: st.DataObject, i: Any, value: Any) -> None:
        a = data.draw(st.sampled_from(self.actors))
        self.call(
            a, f"l[{i!r}] = ...", lambda: self.p(a).__setitem__(i, value),
            lambda: self.model.__setitem__(i, value),
        )  # fmt: skip

    @rule(data=st.data(), i=index)
    def delitem(self, data: st.DataObject, i: Any) -> None:
        a = data.draw(st.sampled_from(self.actors))
        self.call(
            a, f"del l[{i!r}]", lambda: self.p(a).__delitem__(i),
            lambda: self.model.__delitem__(i),
        )  # fmt: skip

    @rule(data=st.data(), i=index)
    def pop(self, data: st.DataObject, i: Any) -> None:
        a = data.draw(st.sampled_from(self.actors))
        self.call(a, f"pop({i!r})", lambda: self.p(a).pop(i), lambda: self.model.pop(i))

    @rule(data=st.data(), value=st.one_of(payloads, st.integers(-2, 2)))
    def remove_index_count(self, data: st.DataObject, value: Any) -> None:
        a = data.draw(st.sampled_from(self.actors))
        self.call(a, "count", lambda: self.p(a).count(value), lambda: self.model.count(value))
        self.call(a, "index", lambda: self.p(a).index(value), lambda: self.model.index(value))
        self.call(a, "remove", lambda: self.p(a).remove(value), lambda: self.model.remove(value))

    @rule(data=st.data(), n=st.one_of(st.integers(-2, 3), wrong_types))
    def imul(self, data: st.DataObject, n: Any) -> None:
        if len(self.model) * (n if isinstance(n, int) else 1) > 50:
            n = 1  # keep it small
        a = data.draw(st.sampled_from(self.actors))

        def model() -> None:
            self.model *= n

        self.call(a, f"*= {n!r}", lambda: self.p(a).__imul__(n), model, compare=False)

    @rule(data=st.data(), reverse=st.booleans())
    def sort_reverse(self, data: st.DataObject, reverse: bool) -> None:
        a = data.draw(st.sampled_from(self.actors))

        def model() -> None:
            # list.sort may leave the list permuted when a comparison fails;
            # managerd's failed sort changes nothing (test_list_errors).
            trial = list(self.model)
            trial.sort(reverse=reverse)
            self.model[:] = trial

        self.call(a, "sort", lambda: self.p(a).sort(reverse=reverse), model)
        self.call(a, "reverse", lambda: self.p(a).reverse(), self.model.reverse)

    @precondition(lambda self: self.proxies and self.may_restart())
    @rule()
    def restart(self) -> None:
        self.restart_daemon()

    @invariant()
    def daemon_agrees(self) -> None:
        if not self.proxies:
            return
        got = self.proxies[0].copy()
        assert same(got, self.model), f"list {got!r} != model {self.model!r}"


class NamespaceMachine(StatefulMachine):
    primitive = "Namespace"

    def __init__(self) -> None:
        super().__init__()
        self.model = types.SimpleNamespace()
        self.initial: dict[str, Any] = {}
        self.proxies: list[Any] = []

    @initialize(contents=st.dictionaries(st.sampled_from(["a", "b", "value"]), plain_values))
    def create(self, contents: dict[str, Any]) -> None:
        """Created with attributes, attached with none."""
        self.initial = contents
        first = self.managers[0].Namespace(self.name(), **contents)
        self.model = types.SimpleNamespace(**contents)
        self.proxies = [first, self.managers[1].Namespace(self.name())]

    @precondition(lambda self: self.proxies and self.initial)
    @rule(data=st.data(), same_contents=st.booleans())
    def attach_with_contents(self, data: st.DataObject, same_contents: bool) -> None:
        a = data.draw(st.sampled_from(self.actors))
        given = dict(self.initial) if same_contents else {**self.initial, "other": 1}
        got = a.run(lambda: outcome(lambda: self.manager(a).Namespace(self.name(), **given)))
        want = Outcome() if same_contents else Outcome(exc=ArgumentConflict())
        same_outcome(got, want, f"{a} Namespace({self.name()!r}, **{given!r})", compare=False)

    attrs = st.sampled_from(["a", "b", "value", "name", "x" * 300, "é"])

    @rule(data=st.data(), attr=attrs, value=payloads)
    def set(self, data: st.DataObject, attr: str, value: Any) -> None:
        a = data.draw(st.sampled_from(self.actors))
        p = self.proxies[a.client]
        self.call(a, f"ns.{attr} = ...", lambda: setattr(p, attr, value),
                  lambda: setattr(self.model, attr, value))  # fmt: skip

    @rule(data=st.data(), attr=attrs)
    def get_del(self, data: st.DataObject, attr: str) -> None:
        a = data.draw(st.sampled_from(self.actors))
        p = self.proxies[a.client]
        self.call(a, f"ns.{attr}", lambda: getattr(p, attr), lambda: getattr(self.model, attr))
        self.call(a, f"del ns.{attr}", lambda: delattr(p, attr),
                  lambda: delattr(self.model, attr))  # fmt: skip

    @precondition(lambda self: self.proxies and self.may_restart())
    @rule()
    def restart(self) -> None:
        self.restart_daemon()

    @invariant()
    def daemon_agrees(self) -> None:
        if not self.proxies:
            return
        got = self.proxies[0]._items()
        assert same(dict(sorted(got.items())), dict(sorted(vars(self.model).items()))), got


class ValueArrayMachine(StatefulMachine):
    """Value and Array: numbers as ctypes holds them (array.array is the model)."""

    primitive = "Value/Array"

    def __init__(self) -> None:
        super().__init__()
        self.typecode = "i"
        self.value: array.array[Any] = array.array("i", [0])
        self.arr: array.array[Any] = array.array("i", [0])
        self.values: list[Any] = []
        self.arrays: list[Any] = []

    @initialize(typecode=st.sampled_from("bBhHiIlLqQfd"), length=st.integers(0, 4))
    def create(self, typecode: str, length: int) -> None:
        self.typecode = typecode
        self.value = array.array(typecode, [0])
        self.arr = array.array(typecode, [0] * length)
        self.values = [m.Value(self.name(".v"), typecode, 0) for m in self.managers]
        self.arrays = [m.Array(self.name(".a"), typecode, length) for m in self.managers]

    numbers = st.one_of(
        st.integers(-(2**64), 2**64),
        st.sampled_from([2**31, -(2**31) - 1, 2**63, 255, 256, -129, True]),
        st.floats(),
        st.sampled_from(["1", None, b"1", [1]]),
    )

    def set_model(self, arr: array.array[Any], i: int, v: Any) -> None:
        arr[i] = v

    @rule(data=st.data(), v=numbers)
    def set_value(self, data: st.DataObject, v: Any) -> None:
        a = data.draw(st.sampled_from(self.actors))
        p = self.values[a.client]
        got = a.run(lambda: outcome(lambda: p.set(v)))
        want = outcome(lambda: self.set_model(self.value, 0, int(v) if v is True else v))
        same_outcome(got, want, f"Value({self.typecode!r}).value = {v!r}")

    @rule(data=st.data(), i=st.one_of(ints_hostile, wrong_types), v=numbers)
    def set_item(self, data: st.DataObject, i: Any, v: Any) -> None:
        a = data.draw(st.sampled_from(self.actors))
        p = self.arrays[a.client]
        got = a.run(lambda: outcome(lambda: p.__setitem__(i, v)))
        want = outcome(lambda: self.set_model(self.arr, i, int(v) if v is True else v))
        same_outcome(got, want, f"Array({self.typecode!r})[{i!r}] = {v!r}")

    @rule(data=st.data(), i=st.one_of(ints_hostile, wrong_types))
    def get_item(self, data: st.DataObject, i: Any) -> None:
        a = data.draw(st.sampled_from(self.actors))
        p = self.arrays[a.client]
        got = a.run(lambda: outcome(lambda: p[i]))
        same_outcome(got, outcome(lambda: self.arr[i]), f"Array[{i!r}]")

    @precondition(lambda self: self.values and self.may_restart())
    @rule()
    def restart(self) -> None:
        self.restart_daemon()

    @invariant()
    def daemon_agrees(self) -> None:
        if not self.values:
            return
        assert same(self.values[0].value, self.value[0]), (self.values[0].value, self.value)
        assert same(self.arrays[0].tolist(), self.arr.tolist()), self.arr


def test_dict_model(sdaemon: Daemon) -> None:
    run_machine(DictMachine, sdaemon)


def test_list_model(sdaemon: Daemon) -> None:
    run_machine(ListMachine, sdaemon)


def test_namespace_model(sdaemon: Daemon) -> None:
    run_machine(NamespaceMachine, sdaemon)


def test_value_array_model(sdaemon: Daemon) -> None:
    run_machine(ValueArrayMachine, sdaemon)
