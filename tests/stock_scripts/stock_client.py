"""A stock ``multiprocessing.managers`` client of managerd: standard library only.

Run by tests/test_stock_clients.py under Python 3.11, 3.12 and 3.13 as::

    python stock_client.py SCENARIO PREFIX

with ``MANAGERD_ADDRESS`` (``host:port``) and ``MANAGERD_AUTHKEY`` in the
environment. Each scenario works on objects named ``PREFIX.<something>``
while the test, a managerd client, works on the same names from its side.
A failed check raises, so the exit code is non-zero and the output says
which check failed. Nothing here may import managerd: it is what a user of
the bare standard library has.
"""

from __future__ import annotations

import decimal
import fractions
import gc
import json
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client
from multiprocessing.managers import (  # type: ignore[attr-defined]  # typeshed omits the proxies
    AcquirerProxy,
    ArrayProxy,
    BarrierProxy,
    BaseManager,
    ConditionProxy,
    DictProxy,
    EventProxy,
    IteratorProxy,
    ListProxy,
    NamespaceProxy,
    ValueProxy,
    dispatch,
)
from typing import Any

WAIT_S = 30.0  # how long this client waits for the test's side

#: Builtin-type payloads that cross between managerd and stock clients as is.
SAMPLES = [
    0,
    -(2**70),
    3.25,
    complex(1, -2),
    True,
    None,
    "text é ✓",
    b"\x00bytes\xff",
    bytearray(b"ba"),
    [1, [2, [3]]],
    (1, "two", (3.0,)),
    {"k": [1, 2], 2: {"n": None}},
    {1, 2, 3},
    frozenset({"a"}),
    range(3),
    slice(1, 5, 2),
    "x" * 40_000,  # a frame between 16 and 64 KiB
]


class StockManager(BaseManager):
    """What a stdlib user writes: the type names, with the stdlib's proxies."""


StockManager.register("Queue")
StockManager.register("JoinableQueue")
StockManager.register("dict", proxytype=DictProxy)
StockManager.register("list", proxytype=ListProxy)
StockManager.register("Namespace", proxytype=NamespaceProxy)
StockManager.register("Value", proxytype=ValueProxy)
StockManager.register("Array", proxytype=ArrayProxy)
StockManager.register("Lock", proxytype=AcquirerProxy)
StockManager.register("RLock", proxytype=AcquirerProxy)
StockManager.register("Semaphore", proxytype=AcquirerProxy)
StockManager.register("Event", proxytype=EventProxy)
StockManager.register("Condition", proxytype=ConditionProxy)
StockManager.register("Barrier", proxytype=BarrierProxy)
StockManager.register("Iterator", proxytype=IteratorProxy, create_method=False)
StockManager.register("Pool")  # a stdlib type managerd does not serve


class NoIteratorManager(BaseManager):
    """A client that registered DictProxy but not 'Iterator'."""


NoIteratorManager.register("dict", proxytype=DictProxy)


def address() -> tuple[str, int]:
    host, _, port = os.environ["MANAGERD_ADDRESS"].rpartition(":")
    return host, int(port)


def authkey() -> bytes:
    return os.environ["MANAGERD_AUTHKEY"].encode()


def connect(cls: type[BaseManager] = StockManager) -> Any:
    """A connected manager (``Any``: ``register()`` makes its methods at run time)."""
    m = cls(address=address(), authkey=authkey())
    m.connect()
    return m


def check(ok: object, what: str) -> None:
    if not ok:
        raise AssertionError(what)
    print("ok", what, flush=True)


def raises(
    exc_type: type[BaseException], fn: Callable[..., object], *args: object, **kwds: object
) -> BaseException:
    try:
        fn(*args, **kwds)
    except exc_type as exc:
        return exc
    raise AssertionError(f"{getattr(fn, '__name__', fn)}{args} did not raise {exc_type.__name__}")


def step(m: Any, p: str, name: str) -> None:
    """Tell the test this client got past ``name`` (it waits on the Event)."""
    m.Event(f"{p}.step.{name}").set()


def report(**values: object) -> None:
    """One line the test parses: ``RESULT {json}``."""
    print("RESULT", json.dumps(values), flush=True)


# -- scenarios ---------------------------------------------------------------------------


def queues(p: str) -> None:
    start = time.perf_counter()
    m = connect()
    to_stock = m.Queue(f"{p}.to_stock")
    depth = to_stock.qsize()
    report(connect_first_call_ms=round((time.perf_counter() - start) * 1000, 2))
    check(depth == len(SAMPLES), f"qsize() sees the {len(SAMPLES)} items a managerd client put")

    got = [to_stock.get(timeout=WAIT_S) for _ in SAMPLES]
    check(got == SAMPLES, "get() returns every managerd item equal to what was put")
    check(
        [type(v) for v in got] == [type(v) for v in SAMPLES],
        "... and of the same builtin types",
    )
    check(to_stock.empty(), "empty() after taking everything")
    raises(queue.Empty, to_stock.get, timeout=0.05)
    raises(queue.Empty, to_stock.get, False)
    raises(queue.Empty, to_stock.get_nowait)
    check(True, "queue.Empty from get(timeout), get(False) and get_nowait()")

    from_stock = m.Queue(f"{p}.from_stock")
    for i, item in enumerate(SAMPLES):
        (from_stock.put if i % 2 else from_stock.put_nowait)(item)
    check(from_stock.qsize() == len(SAMPLES), "put() and put_nowait() for a managerd reader")

    small = m.Queue(f"{p}.small", 1)
    small.put("only")
    check(small.full(), "full() on a queue of maxsize 1")
    raises(queue.Full, small.put, "more", timeout=0.05)
    raises(queue.Full, small.put_nowait, "more")
    check(True, "queue.Full from put(timeout) and put_nowait()")

    # A get parked on the daemon, completed by a managerd client's put.
    handoff = m.Queue(f"{p}.handoff")
    print("WAITING", flush=True)
    check(handoff.get(timeout=WAIT_S) == {"from": "managerd"}, "a parked get() gets a later put")

    jobs = m.JoinableQueue(f"{p}.joinable")
    for _ in range(2):
        jobs.get(timeout=WAIT_S)
        jobs.task_done()
    check(True, "JoinableQueue get() + task_done() for a managerd join()")


def mappings(p: str) -> None:
    m = connect()
    d = m.dict(f"{p}.dict")
    check(d["str"] == "v" and d[1] == [1, 2] and d[(1, "t")] == {"n": None}, "d[key]")
    check(d.get("missing") is None and d.get("missing", 7) == 7, "get() with and without default")
    missing = raises(KeyError, d.__getitem__, "missing")
    check(missing.args == ("missing",), "KeyError('missing') for a missing key")
    raises(KeyError, d.pop, "missing")
    check(len(d) == 3 and "str" in d and "nope" not in d, "len() and in")
    check(sorted(d.keys(), key=repr) == sorted(["str", 1, (1, "t")], key=repr), "keys()")
    check(dict(d.items()) == {"str": "v", 1: [1, 2], (1, "t"): {"n": None}}, "items()")

    before = m._number_of_objects()
    check(sorted(d, key=repr) == sorted(["str", 1, (1, "t")], key=repr), "iterating a DictProxy")
    seen = [key for key in d]
    check(len(seen) == 3, "for key in d")
    gc.collect()  # an exhausted iterator proxy may sit in a cycle with its StopIteration
    check(m._number_of_objects() == before, "finished iterations leave no referent behind")
    it = iter(d)
    check(m._number_of_objects() == before + 1, "an open iterator is a referent")
    next(it)
    del it
    gc.collect()
    check(m._number_of_objects() == before, "a dropped iterator is released (decref)")

    copy = d._getvalue()
    check(isinstance(copy, dict) and copy == {"str": "v", 1: [1, 2], (1, "t"): {"n": None}},
          "_getvalue() of a dict")  # fmt: skip
    copy["added"] = 1
    check("added" not in d, "... is a copy")

    d["stock"] = {"set": {1, 2}}
    d.update({"u1": 1}, u2=[2])
    d.update([("u3", 3)])
    check(d.setdefault("sd") is None and d.setdefault("sd", 5) is None, "setdefault()")
    check(d.setdefault("sd2", (5,)) == (5,), "setdefault(key, default)")
    check(d.pop("u3") == 3, "pop()")
    check(d.popitem() == ("sd2", (5,)), "popitem()")

    lst = m.list(f"{p}.list")
    check(list(lst) == [1, "two", (3,)], "iterating a ListProxy (through __getitem__)")
    check(lst[1:] == ["two", (3,)] and lst[-1] == (3,), "indexing and slicing")
    check(len(lst) == 3 and "two" in lst and lst.index("two") == 1, "len, in, index")
    check(list(reversed(lst)) == [(3,), "two", 1], "reversed()")
    check(lst._getvalue() == [1, "two", (3,)], "_getvalue() of a list")
    copied = lst._getvalue()
    copied.append("local")
    check(len(lst) == 3, "... is a copy")
    lst.append({"stock": True})
    lst += [4]
    lst.insert(0, "first")
    lst.extend([5, 5])
    check(lst.count(5) == 2 and lst.pop() == 5, "count(), pop()")
    lst.remove("first")
    check(raises(IndexError, lst.__getitem__, 99).args != (), "IndexError past the end")

    ns = m.Namespace(f"{p}.ns")
    check(ns.x == 1 and ns.name == "managerd", "Namespace attributes")
    raises(AttributeError, getattr, ns, "missing")
    value = ns._getvalue()
    check(vars(value) == {"x": 1, "name": "managerd"}, "_getvalue() of a Namespace")
    ns.from_stock = [1, 2]

    v = m.Value(f"{p}.value", "i", 0)
    check(v.value == 41 and v.get() == 41 and v._getvalue() == 41, "Value (creation value ignored)")
    v.value = 42
    a = m.Array(f"{p}.array", "d", 3)
    check(len(a) == 3 and list(a) == [0.5, 1.5, 2.5] and a[:2] == [0.5, 1.5], "Array")
    check(a._getvalue() == [0.5, 1.5, 2.5], "_getvalue() of an Array")
    a[0] = 10.0

    # Without 'Iterator' registered, iterating fails on the client only; the
    # daemon drops the iterator when that thread's connection closes.
    lone = connect(NoIteratorManager)
    d2 = lone.dict(f"{p}.dict")
    errors: list[tuple[object, ...]] = []

    def iterate(proxy: DictProxy[Any, Any]) -> None:
        try:
            list(proxy)
        except KeyError as exc:
            errors.append(exc.args)  # not exc: its traceback holds the connection

    thread = threading.Thread(target=iterate, args=(d2,))
    thread.start()
    thread.join(WAIT_S)
    check(errors == [("Iterator",)], "no 'Iterator': KeyError")
    del d2
    gc.collect()
    start = time.monotonic()
    while m._number_of_objects() != before and time.monotonic() < start + WAIT_S:
        time.sleep(0.01)  # until the daemon notices the closed connection
    report(iterator_dropped_after_s=round(time.monotonic() - start, 3))
    check(m._number_of_objects() == before, "... and its iterator is dropped with its connection")


def sync(p: str) -> None:
    m = connect()
    flags = m.dict(f"{p}.flags")

    # Lock: the test holds it.
    lock = m.Lock(f"{p}.lock")
    check(lock.acquire(False) is False, "acquire(False) while a managerd client holds the lock")
    check(lock.acquire(True, 0.05) is False, "acquire(timeout) times out")
    step(m, p, "lock_probed")
    check(lock.acquire() is True, "acquire() waits until the managerd holder releases")
    step(m, p, "lock_held")
    check(m.Event(f"{p}.step.lock_checked").wait(WAIT_S), "the test saw the lock held")
    lock.release()

    rlock = m.RLock(f"{p}.rlock")
    with rlock, rlock:
        check(True, "RLock is re-entrant")

    # Semaphore(2): the test holds both permits.
    sem = m.Semaphore(f"{p}.sem", 2)
    check(sem.acquire(False) is False, "no permit left")
    check(sem.acquire() is True, "acquire() waits for a permit the test releases")
    sem.release()
    step(m, p, "sem_done")

    # Event, both ways.
    event = m.Event(f"{p}.event")
    check(event.wait(0.05) is False and not event.is_set(), "Event.wait(timeout) -> False")
    step(m, p, "event_probed")
    check(event.wait(WAIT_S) is True, "Event.wait() returns when the test sets it")
    m.Event(f"{p}.event_back").set()  # the test waits on it

    # Condition, both ways, with a predicate on a shared dict.
    cond = m.Condition(f"{p}.cond")
    with cond:
        ok = cond.wait_for(lambda: flags.get("go") == 1, timeout=WAIT_S)
    check(ok, "Condition.wait_for() woken by the test's notify()")
    with cond:
        flags["back"] = 1
        cond.notify_all()
    over_lock = m.Condition(f"{p}.cond_over_lock", f"{p}.lock")  # a lock by name
    with over_lock:
        check(lock.acquire(False) is False, "a Condition created over a named Lock holds it")
    check(lock.acquire(False) is True, "... and releases it")
    lock.release()

    # Barrier, and a barrier the test aborts.
    barrier = m.Barrier(f"{p}.barrier", 2)
    check(barrier.parties == 2 and barrier.broken is False, "Barrier parties/broken")
    index = barrier.wait(WAIT_S)
    check(barrier.n_waiting == 0, "both parties passed")
    report(barrier_index=index)
    doomed = m.Barrier(f"{p}.doomed", 2)
    raises(threading.BrokenBarrierError, doomed.wait, WAIT_S)
    check(doomed.broken is True, "BrokenBarrierError when the test aborts the barrier")


def errors(p: str) -> None:
    m = connect()
    # Payloads a managerd client pickled from its own class.
    q = m.Queue(f"{p}.objects")
    refused = raises(TypeError, q.get, timeout=WAIT_S)
    check("managerd_client" in str(refused), f"a clear TypeError for a custom class: {refused}")
    check(q.qsize() == 2, "... and the item stays in the queue")
    d = m.dict(f"{p}.objdict")
    raises(TypeError, d.__getitem__, "point")
    raises(TypeError, d.pop, "point")
    raises(TypeError, d.popitem)
    raises(TypeError, d._getvalue)
    check("point" in d and len(d) == 1, "dict: refused reads, value kept")
    lst = m.list(f"{p}.list")
    raises(TypeError, lst.pop)
    raises(TypeError, lst.__getitem__, 0)
    check(len(lst) == 1, "list: refused pop, item kept")
    parked = m.Queue(f"{p}.parked")
    print("WAITING", flush=True)
    raises(TypeError, parked.get, timeout=WAIT_S)
    check(parked.qsize() == 1, "a parked get() refused a custom class; the item went back")

    # What a stock client itself may not send.
    for value in (fractions.Fraction(1, 3), decimal.Decimal("1.5")):
        exc = raises(Exception, q.put, value)
        check("refused to decode" in str(exc), f"the daemon refuses {type(value).__name__}")
    q.put("still serving")
    check(q.qsize() == 3, "the connection still works after a refused request")

    # Daemon-level refusals.
    conn = Client(address(), authkey=authkey())
    refused = raises(PermissionError, dispatch, conn, None, "shutdown")
    conn.close()
    check("shutdown" in str(refused), "shutdown over the wire is refused")
    check(m._number_of_objects() > 0, "the daemon still serves after a shutdown request")
    check("unknown type" in str(raises(TypeError, m.Pool, "x")), "unknown type name")
    check("named" in str(raises(TypeError, m.Queue)), "a creation call without a name")
    raises(TypeError, m.dict, f"{p}.list")
    check(True, "a name taken by another type")
    bad = StockManager(address=address(), authkey=b"not the key")
    raises(AuthenticationError, bad.connect)
    check(True, "a wrong authkey")


SCENARIOS = {"queues": queues, "mappings": mappings, "sync": sync, "errors": errors}

if __name__ == "__main__":
    scenario, prefix = sys.argv[1], sys.argv[2]
    print(f"python {sys.version.split()[0]} scenario {scenario}", flush=True)
    SCENARIOS[scenario](prefix)
    print("DONE", flush=True)
