"""Model-based test of stock ``multiprocessing.managers`` clients (stdlib proxies, stock wire).

A stock ``BaseManager`` (run in this process: it is only a library) and a
managerd client work on the same Queue, dict, list, Lock, Event and Value;
the models are ``queue.Queue``, ``dict``, ``list``, ``threading.Lock``,
``threading.Event`` and an int. Stock calls come from two threads (a stock
proxy opens one connection, so one session, per thread). The invariant reads
the state through the stock proxies (``_getvalue()``) and through managerd's.

Where it differs: stock payloads must be builtin data (the daemon decodes
them with its restricted unpickler), so the values drawn are builtin data.
"""

from __future__ import annotations

import queue
import threading
from multiprocessing.managers import (  # type: ignore[attr-defined]  # typeshed omits the proxies
    AcquirerProxy,
    BaseManager,
    DictProxy,
    EventProxy,
    ListProxy,
    ValueProxy,
)
from typing import Any

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, rule

from conftest import Daemon
from stateful_support import (
    Actor,
    StatefulMachine,
    hashable_keys,
    outcome,
    payloads,
    run_machine,
    same,
    same_outcome,
    sdaemon,
)

__all__ = ["sdaemon"]

#: A daemon restart that hangs fails in conftest (30 s, with the daemon's log)
#: rather than in pytest-timeout (which shows no log).
pytestmark = pytest.mark.timeout(300)


class StockManager(BaseManager):
    pass


StockManager.register("Queue")
StockManager.register("dict", proxytype=DictProxy)
StockManager.register("list", proxytype=ListProxy)
StockManager.register("Lock", proxytype=AcquirerProxy)
StockManager.register("Event", proxytype=EventProxy)
StockManager.register("Value", proxytype=ValueProxy)

stock_keys = hashable_keys.filter(lambda k: not (isinstance(k, float) and k != k))


class StockMachine(StatefulMachine):
    primitive = "stock"

    def __init__(self) -> None:
        super().__init__()
        self.q: queue.Queue[Any] = queue.Queue()
        self.d: dict[Any, Any] = {}
        self.lst: list[Any] = []
        self.lock = threading.Lock()
        self.event_model = threading.Event()
        self.value = 0
        self.stock: BaseManager | None = None
        self.p: dict[str, Any] = {}

    @initialize()
    def create(self) -> None:
        host, _, port = self.daemon.address.rpartition(":")
        self.stock = StockManager(address=(host, int(port)), authkey=self.daemon.authkey)
        self.stock.connect()
        s = self.stock
        self.p = {
            "q": s.Queue(self.name(".q")),  # type: ignore[attr-defined]
            "d": s.dict(self.name(".d")),  # type: ignore[attr-defined]
            "l": s.list(self.name(".l")),  # type: ignore[attr-defined]
            "lock": s.Lock(self.name(".lock")),  # type: ignore[attr-defined]
            "e": s.Event(self.name(".e")),  # type: ignore[attr-defined]
            "v": s.Value(self.name(".v"), "q", 0),  # type: ignore[attr-defined]
        }

    def actor(self, data: st.DataObject) -> Actor:
        return data.draw(st.sampled_from([a for a in self.actors if a.client == 0]))

    @rule(data=st.data(), item=payloads)
    def put(self, data: st.DataObject, item: Any) -> None:
        a = self.actor(data)
        got = a.run(lambda: outcome(lambda: self.p["q"].put(item)))
        same_outcome(got, outcome(lambda: self.q.put(item)), "stock put")

    @rule(data=st.data(), timeout=st.sampled_from([0, 0.01, -1]))
    def get(self, data: st.DataObject, timeout: float) -> None:
        a = self.actor(data)
        got = a.run(lambda: outcome(lambda: self.p["q"].get(True, timeout)))
        same_outcome(got, outcome(lambda: self.q.get(True, timeout)), f"stock get({timeout})")

    @rule(data=st.data(), key=stock_keys, value=payloads)
    def dict_set(self, data: st.DataObject, key: Any, value: Any) -> None:
        a = self.actor(data)
        got = a.run(lambda: outcome(lambda: self.p["d"].__setitem__(key, value)))
        same_outcome(got, outcome(lambda: self.d.__setitem__(key, value)), "stock d[k] = v")

    @rule(data=st.data(), key=stock_keys)
    def dict_get_del(self, data: st.DataObject, key: Any) -> None:
        a = self.actor(data)
        got = a.run(lambda: outcome(lambda: self.p["d"][key]))
        same_outcome(got, outcome(lambda: self.d[key]), f"stock d[{key!r}]")
        got = a.run(lambda: outcome(lambda: self.p["d"].__delitem__(key)))
        same_outcome(got, outcome(lambda: self.d.__delitem__(key)), f"stock del d[{key!r}]")

    @rule(data=st.data(), value=payloads, index=st.integers(-3, 3))
    def list_ops(self, data: st.DataObject, value: Any, index: int) -> None:
        a = self.actor(data)
        got = a.run(lambda: outcome(lambda: self.p["l"].append(value)))
        same_outcome(got, outcome(lambda: self.lst.append(value)), "stock append")
        got = a.run(lambda: outcome(lambda: self.p["l"].pop(index)))
        same_outcome(got, outcome(lambda: self.lst.pop(index)), f"stock pop({index})")

    @rule(data=st.data(), blocking=st.booleans())
    def lock_acquire(self, data: st.DataObject, blocking: bool) -> None:
        a = self.actor(data)
        timeout = 0.01 if blocking else None
        got = a.run(lambda: outcome(lambda: self.p["lock"].acquire(blocking, timeout)))
        want = outcome(lambda: self.lock.acquire(blocking, -1 if timeout is None else timeout))
        same_outcome(got, want, "stock acquire")

    @rule(data=st.data())
    def lock_release(self, data: st.DataObject) -> None:
        a = self.actor(data)
        got = a.run(lambda: outcome(lambda: self.p["lock"].release()))
        same_outcome(got, outcome(self.lock.release), "stock release")

    @rule(data=st.data(), op=st.sampled_from(["set", "clear", "wait"]))
    def event(self, data: st.DataObject, op: str) -> None:
        a = self.actor(data)
        if op == "wait":
            got = a.run(lambda: outcome(lambda: self.p["e"].wait(0.01)))
            same_outcome(got, outcome(lambda: self.event_model.wait(0.01)), "stock wait")
        else:
            a.run(lambda: getattr(self.p["e"], op)())
            getattr(self.event_model, op)()

    @rule(data=st.data(), v=st.one_of(st.integers(-(2**63), 2**63 - 1), st.just(2**64)))
    def value_set(self, data: st.DataObject, v: int) -> None:
        a = self.actor(data)
        got = a.run(lambda: outcome(lambda: setattr(self.p["v"], "value", v)))
        if v >= 2**63:
            assert not got.ok and isinstance(got.exc, OverflowError), got
            return
        assert got.ok, got
        self.value = v

    @invariant()
    def daemon_agrees(self) -> None:
        if not self.p:
            return
        assert self.p["q"].qsize() == self.q.qsize()
        assert same(self.p["d"]._getvalue(), self.d), (self.p["d"]._getvalue(), self.d)
        assert same(self.p["l"]._getvalue(), self.lst)
        assert self.p["e"].is_set() == self.event_model.is_set()
        assert self.p["v"].value == self.value
        m = self.managers[1]  # and the managerd side agrees
        assert same(m.list(self.name(".l")).copy(), self.lst)
        assert m.Lock(self.name(".lock")).locked() == self.lock.locked()
        assert m.Value(self.name(".v"), "q").value == self.value

    def teardown(self) -> None:
        self.p.clear()
        super().teardown()


def test_stock_client_model(sdaemon: Daemon) -> None:
    run_machine(StockMachine, sdaemon)
