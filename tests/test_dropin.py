"""Drop-in for ``SyncManager``: contents at creation, ``Queue.task_done``/``join``.

``manager.list([1, 2, 3])``, ``manager.dict(a=1)`` and
``manager.Namespace(x=1)`` create with contents; managerd's
``m.list(name, [1, 2, 3])`` and friends do too, and a stock client's
``m.dict(name, {...})``. ``SyncManager.Queue()`` is a ``queue.Queue``, so
managerd's ``Queue`` has ``task_done()`` and ``join()``. All against real
daemons; one test runs the same sequence on ``multiprocessing.Manager()``.
"""

from __future__ import annotations

import itertools
import multiprocessing
import pickle
import queue
import threading
from collections.abc import Callable, Iterator
from multiprocessing.managers import (  # type: ignore[attr-defined]  # typeshed omits NamespaceProxy
    BaseManager,
    DictProxy,
    ListProxy,
    NamespaceProxy,
)
from pathlib import Path
from typing import Any

import pytest

from managerd.store.memory.journal import _encode
from managerd_client import ArgumentConflict, Manager, ObjectTypeConflict

import workers
from conftest import Daemon, wait_until


class Stock(BaseManager):
    """A stock stdlib client: the type names, with the stdlib's proxies."""


Stock.register("Queue")
Stock.register("list", proxytype=ListProxy)
Stock.register("dict", proxytype=DictProxy)
Stock.register("Namespace", proxytype=NamespaceProxy)


def _stock(d: Daemon) -> BaseManager:
    m = Stock(address=("127.0.0.1", d.port), authkey=d.authkey)
    m.connect()
    return m


@pytest.fixture
def durable(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path, args=["--data-dir", str(tmp_path / "data"), "--fsync", "always"])
    d.start()
    try:
        yield d
    finally:
        d.stop()


# -- contents at creation ---------------------------------------------------------------------


def test_list_is_created_from_any_iterable(manager: Manager, uniq: str) -> None:
    assert manager.list(f"{uniq}.l", [1, 2, 3])[:] == [1, 2, 3]
    assert manager.list(f"{uniq}.t", ("a", None, 2.5)).copy() == ["a", None, 2.5]
    assert manager.list(f"{uniq}.r", range(4))[:] == [0, 1, 2, 3]
    assert manager.list(f"{uniq}.g", (x * x for x in range(4)))[:] == [0, 1, 4, 9]
    assert manager.list(f"{uniq}.s", "ab")[:] == ["a", "b"]
    assert manager.list(f"{uniq}.d", {"k": 1, "j": 2})[:] == ["k", "j"]
    assert manager.list(f"{uniq}.e", [])[:] == []
    assert manager.list(f"{uniq}.n")[:] == []
    with pytest.raises(TypeError):
        manager.list(f"{uniq}.bad", 5)  # type: ignore[arg-type]
    assert (f"{uniq}.bad", "list") not in manager.objects()


def test_dict_is_created_exactly_as_dict_takes_its_arguments(manager: Manager, uniq: str) -> None:
    assert manager.dict(f"{uniq}.m", {"a": 1, 2: [3]}).copy() == {"a": 1, 2: [3]}
    assert manager.dict(f"{uniq}.k", a=1, name="n").copy() == {"a": 1, "name": "n"}
    assert manager.dict(f"{uniq}.p", [("a", 1), (("t", 1), 2)]).copy() == {"a": 1, ("t", 1): 2}
    assert manager.dict(f"{uniq}.b", {"a": 1, "b": 2}, a=9).copy() == {"a": 9, "b": 2}
    assert manager.dict(f"{uniq}.i", iter([("x", 1), ("x", 2)])).copy() == {"x": 2}
    source = manager.dict(f"{uniq}.m")
    assert manager.dict(f"{uniq}.c", source).copy() == {"a": 1, 2: [3]}  # a proxy is a mapping
    assert manager.dict(f"{uniq}.n").copy() == {}
    bads: list[tuple[Any, ...]] = [(1,), ({}, {}), ([("a", 1, 2)],)]
    for bad in bads:
        with pytest.raises((TypeError, ValueError)) as caught:
            manager.dict(f"{uniq}.bad", *bad)
        with pytest.raises(type(caught.value)):
            dict(*bad)
    assert (f"{uniq}.bad", "dict") not in manager.objects()


def test_daemon_refuses_contents_that_are_not_payloads(manager: Manager, uniq: str) -> None:
    """What another client could send: the daemon checks contents, and creates nothing."""
    bad = [
        ("list", "not a list"),
        ("list", [1, 2]),
        ("dict", [("k", b"ok"), ("no pair",)]),
        ("dict", [([1], pickle.dumps(1))]),
        ("Namespace", [(1, pickle.dumps(1))]),
    ]
    for i, (typeid, contents) in enumerate(bad):
        with pytest.raises(TypeError):
            manager._create(typeid, f"{uniq}.{i}", {"contents": contents})
    assert not [name for name, _ in manager.objects() if name.startswith(uniq)]
    assert manager.list(name=f"{uniq}.kw", sequence=(1,))[:] == [1]


def test_namespace_is_created_with_attributes(manager: Manager, uniq: str) -> None:
    ns = manager.Namespace(uniq, x=1, label="here", nested={"a": [1]})
    assert (ns.x, ns.label, ns.nested) == (1, "here", {"a": [1]})
    ns.x = 2
    assert manager.Namespace(uniq).x == 2
    with pytest.raises(AttributeError):
        _ = manager.Namespace(f"{uniq}.empty").x


def test_attach_with_other_contents_is_a_conflict(manager: Manager, uniq: str) -> None:
    lst = manager.list(f"{uniq}.l", [1, 2, 3])
    d = manager.dict(f"{uniq}.d", {"a": 1, "b": 2})
    ns = manager.Namespace(f"{uniq}.ns", x=1)
    # What it holds now does not matter: the contents it was created with do.
    lst.append(4)
    d["c"] = 3
    ns.x = 2
    with pytest.raises(ArgumentConflict, match="created with other contents"):
        manager.list(f"{uniq}.l", [1, 2, 3, 4])
    with pytest.raises(ArgumentConflict):
        manager.list(f"{uniq}.l", [1, 2])
    with pytest.raises(ArgumentConflict):
        manager.list(f"{uniq}.l", [])
    with pytest.raises(ArgumentConflict):
        manager.dict(f"{uniq}.d", a=1, b=3)
    with pytest.raises(ArgumentConflict):
        manager.dict(f"{uniq}.d", a=1)
    with pytest.raises(ArgumentConflict):
        manager.Namespace(f"{uniq}.ns", x=2)
    # No contents, or the creation's (a dict's in any order), attach.
    assert manager.list(f"{uniq}.l")[:] == [1, 2, 3, 4]
    assert manager.list(f"{uniq}.l", (1, 2, 3))[:] == [1, 2, 3, 4]
    assert manager.dict(f"{uniq}.d", b=2, a=1).copy() == {"a": 1, "b": 2, "c": 3}
    assert manager.Namespace(f"{uniq}.ns", x=1).x == 2
    # Created without contents is created empty.
    manager.list(f"{uniq}.empty")
    manager.list(f"{uniq}.empty", [])
    with pytest.raises(ArgumentConflict):
        manager.list(f"{uniq}.empty", [0])
    with pytest.raises(ObjectTypeConflict):
        manager.dict(f"{uniq}.l", a=1)  # another type's name, contents or not


def test_a_proxy_passed_on_does_not_carry_its_contents(manager: Manager, uniq: str) -> None:
    lst = manager.list(uniq, range(1000))
    assert len(pickle.dumps(lst)) < 1000
    lst.clear()
    clone = pickle.loads(pickle.dumps(lst))
    clone.append("x")
    assert lst[:] == ["x"]


def test_contents_survive_kill_9_and_a_snapshot(durable: Daemon) -> None:
    with durable.connect() as m:
        m.list("l", [1, "two", (3,)])
        m.dict("d", {"a": 1}, b=[2])
        m.Namespace("ns", x=1.5)
    durable.kill()  # right after the creations were answered
    for _ in range(2):  # recovered from the journal, then from the snapshot after recovery
        durable.start(port=durable.port)
        assert wait_until(lambda: any((durable.tmp / "data").glob("snapshot-*.bin")))
        with durable.connect() as m:
            assert m.list("l")[:] == [1, "two", (3,)]
            assert m.dict("d").copy() == {"a": 1, "b": [2]}
            assert m.Namespace("ns").x == 1.5
            # The creation's contents came back too: the same attach, the same refusal.
            m.list("l", [1, "two", (3,)])
            m.dict("d", b=[2], a=1)
            with pytest.raises(ArgumentConflict):
                m.list("l", [1])
            with pytest.raises(ArgumentConflict):
                m.Namespace("ns", x=2)
        durable.kill()


def test_stock_client_creates_with_contents(
    shared_daemon: Daemon, manager: Manager, uniq: str
) -> None:
    stock = _stock(shared_daemon)
    lst = stock.list(f"{uniq}.l", [1, 2, 3])  # type: ignore[attr-defined]
    d = stock.dict(f"{uniq}.d", {"a": 1}, b=2)  # type: ignore[attr-defined]
    ns = stock.Namespace(f"{uniq}.ns", x="y")  # type: ignore[attr-defined]
    assert lst[:] == [1, 2, 3] and d.copy() == {"a": 1, "b": 2} and ns.x == "y"
    assert manager.list(f"{uniq}.l", [1, 2, 3])[:] == [1, 2, 3]
    assert manager.dict(f"{uniq}.d", a=1, b=2).copy() == {"a": 1, "b": 2}
    assert manager.Namespace(f"{uniq}.ns", x="y").x == "y"
    assert stock.dict(f"{uniq}.p", [("k", 1)]).copy() == {"k": 1}  # type: ignore[attr-defined]
    assert stock.list(f"{uniq}.e")[:] == []  # type: ignore[attr-defined]
    # Created by a managerd client; the stock client attaches with the same contents.
    manager.list(f"{uniq}.m", ["x", 2.5])
    assert stock.list(f"{uniq}.m", ("x", 2.5))[:] == ["x", 2.5]  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="created with other contents"):
        stock.list(f"{uniq}.l", [3, 2, 1])  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="created with other contents"):
        stock.dict(f"{uniq}.d", a=2)  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        stock.list(f"{uniq}.bad", 5)  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        stock.Namespace(f"{uniq}.bad", {"x": 1})  # type: ignore[attr-defined]


# -- side by side with SyncManager ------------------------------------------------------------


def _sequence(
    new_list: Callable[..., Any], new_dict: Callable[..., Any], new_ns: Callable[..., Any]
) -> list[Any]:
    """What a SyncManager user does with contents at creation; every result seen."""
    seen: list[Any] = []
    lst = new_list([1, 2, 3])
    lst.append(4)
    lst.extend(["a"])
    seen += [lst[:], len(lst), lst[1]]
    seen.append(new_list(range(3))[:])
    seen.append(new_list("ab")[:])
    seen.append(new_list((None, 2.5, (1, 2)))[:])
    seen.append(new_list()[:])
    seen.append(new_dict({"a": 1}).copy())
    seen.append(new_dict(a=1, b=[2]).copy())
    seen.append(new_dict([("a", 1), ("b", 2)], c=3).copy())
    seen.append(new_dict({"a": 1}, a=2).copy())
    seen.append(new_dict().copy())
    d = new_dict({1: "x"}, y=2)
    d["z"] = 3
    seen += [d.copy(), sorted(d.keys(), key=str), d.get(1)]
    ns = new_ns(x=1, y="z")
    seen += [ns.x, ns.y]
    ns.x = 5
    seen.append(ns.x)
    return seen


def test_same_results_as_multiprocessing_manager(manager: Manager, uniq: str) -> None:
    with multiprocessing.get_context("spawn").Manager() as sync:
        expected = _sequence(sync.list, sync.dict, sync.Namespace)
    names = (f"{uniq}.{i}" for i in itertools.count())
    got = _sequence(
        lambda *a: manager.list(next(names), *a),
        lambda *a, **k: manager.dict(next(names), *a, **k),
        lambda **k: manager.Namespace(next(names), **k),
    )
    assert got == expected
    assert len(expected) == 18


# -- Queue: task_done / join ------------------------------------------------------------------


def test_queue_join_waits_for_a_consumer_process(shared_daemon: Daemon, uniq: str) -> None:
    name, out = uniq, uniq + ".out"
    with shared_daemon.connect() as m:
        q = m.Queue(name)
        results = m.dict(out)
        q.put_many(range(30))
        with pytest.raises(TimeoutError):
            q.join(timeout=0.05)  # nobody consumed yet
        proc = workers.start(
            workers.task_done_worker, shared_daemon.address, shared_daemon.authkey, name, out
        )
        q.join(timeout=workers.WAIT_S)
        # The worker records each result before its task_done(): all are there.
        assert results.copy() == {i: i * 2 for i in range(30)}
        q.put(None)
        workers.join_all([proc])
        q.join(timeout=5)
        with pytest.raises(ValueError, match=r"task_done\(\) called too many times"):
            q.task_done()


def test_queue_join_timeout_and_task_done_too_many(manager: Manager, uniq: str) -> None:
    q = manager.Queue(uniq)
    q.join(timeout=0.05)  # nothing put: returns at once
    with pytest.raises(ValueError, match="too many times"):
        q.task_done()
    q.put("x")
    q.put("y")
    assert q.get() == "x"
    q.task_done()
    with pytest.raises(TimeoutError):
        q.join(timeout=0.1)  # "y" is unfinished, even if nobody took it
    assert manager.status()["objects"][uniq]["unfinished"] == 1
    released = threading.Event()

    def join() -> None:
        q.join(timeout=10)
        released.set()

    joiner = threading.Thread(target=join)
    joiner.start()
    assert q.get() == "y"
    assert not released.wait(0.1)
    q.task_done()
    joiner.join(10)
    assert released.is_set()
    with pytest.raises(ValueError):
        q.task_done()


def test_queue_reserve_nack_and_dead_letters_count_once(manager: Manager, uniq: str) -> None:
    q = manager.Queue(uniq, max_deliveries=2)
    q.put_many(["a", "b"])
    msg = q.reserve(timeout=1)
    msg.nack()  # back at the front: still one unfinished task, not two
    msg = q.reserve(timeout=1)
    assert msg.value == "a" and msg.deliveries == 2
    msg.ack()
    q.task_done()
    q.reserve(timeout=1).nack(requeue=False)  # "b" is dead-lettered: done by itself
    q.join(timeout=5)
    with pytest.raises(ValueError):
        q.task_done()
    dead = manager.Queue(uniq + ".dead")
    with pytest.raises(TimeoutError):
        dead.join(timeout=0.05)  # the dead letter is a put there
    assert dead.get(timeout=1) == "b"
    dead.task_done()
    dead.join(timeout=1)


def test_stock_queue_has_task_done_and_join(
    shared_daemon: Daemon, manager: Manager, uniq: str
) -> None:
    stock = _stock(shared_daemon)
    sq = stock.Queue(uniq)  # type: ignore[attr-defined]
    q = manager.Queue(uniq)
    q.put({"n": 1})
    assert sq.get(timeout=5) == {"n": 1}
    with pytest.raises(TimeoutError):
        q.join(timeout=0.05)
    sq.task_done()
    q.join(timeout=5)
    sq.join()  # returns: nothing unfinished
    with pytest.raises(ValueError, match="too many times"):
        sq.task_done()


def test_unfinished_count_survives_kill_9(durable: Daemon) -> None:
    with durable.connect() as m:
        q = m.Queue("q")
        q.put_many(["a", "b", "c"])
        assert q.get() == "a"
        q.task_done()
        assert q.reserve(timeout=1).value == "b"  # reserved at the crash: comes back
    durable.kill()
    for _ in range(2):  # from the journal, then from the snapshot after recovery
        durable.start(port=durable.port)
        assert wait_until(lambda: any((durable.tmp / "data").glob("snapshot-*.bin")))
        with durable.connect() as m:
            assert m.status()["objects"]["q"]["unfinished"] == 2
        durable.kill()
    durable.start(port=durable.port)
    with durable.connect() as m:
        q = m.Queue("q")
        with pytest.raises(TimeoutError):
            q.join(timeout=0.05)
        assert q.get_many(5) == ["b", "c"]
        q.task_done()
        q.task_done()
        q.join(timeout=1)
        with pytest.raises(ValueError):
            q.task_done()


def test_an_older_journal_of_a_joinable_queue_keeps_its_count(tmp_path: Path) -> None:
    """An older daemon journaled a JoinableQueue's count before each push it came from.

    Its records are of data format 1 (strings), read by the format-1 reader.
    """
    data = tmp_path / "data"
    data.mkdir()
    records = [
        ("create", "JoinableQueue", "jq", {}),
        ("op", "jq", "unfinished", 1),
        ("op", "jq", "push", pickle.dumps("a"), 0),
        ("op", "jq", "unfinished", 2),
        ("op", "jq", "push", pickle.dumps("b"), 0),
        ("op", "jq", "pop", 1),
        ("op", "jq", "unfinished", 1),  # task_done()
        ("op", "jq", "unfinished", 2),
        ("op", "jq", "push", pickle.dumps("c"), 0),
        ("create", "Queue", "q", {}),
        ("op", "q", "push", pickle.dumps("c"), 0),
    ]
    (data / "journal-0.log").write_bytes(
        b"MANAGERD-JOURNAL-1\n" + b"".join(_encode(r) for r in records)
    )
    d = Daemon(tmp_path, args=["--data-dir", str(data), "--fsync", "always"]).start()
    try:
        with d.connect() as m:
            described = m.status()["objects"]
            # Not 3: neither the count set then its push counted again, nor counts ignored.
            assert described["jq"]["unfinished"] == 2
            assert described["q"]["unfinished"] == 1
            jq = m.JoinableQueue("jq")
            assert jq.get_many(5) == ["b", "c"]
            jq.task_done()
            with pytest.raises(TimeoutError):
                jq.join(timeout=0.05)
            jq.task_done()
            jq.join(timeout=1)
            with pytest.raises(queue.Empty):
                jq.get_nowait()
    finally:
        d.stop()
