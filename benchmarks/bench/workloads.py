"""The workloads of one or a few clients: each ``w_*`` runs in a forked worker, ``run_*`` drives.

Single-client loops (``w_floor_*``, ``w_noop``, ``w_putget``, ``w_dict``,
``w_lock``, ``w_connect``) run whole in a child through ``in_child``; the
multi-process ones (``run_mpmc``, ``run_pipe``, ``run_lock_contended``)
start a ``Gang`` of workers that begin together.
"""

from __future__ import annotations

import collections
import gc
import itertools
import json
import os
import queue
import subprocess
import sys
import sysconfig
import time
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any

from managerd_client import connect

from bench.measure import CpuWindow, Gang, in_child, measure, run_gang
from bench.plan import BOUNDED_QUEUE, GET_TIMEOUT_S, HEAD, P100, PAD, SENTINEL, Plan
from bench.servers import Client, FloorClient, StockManager, Target, unique

# -- single-client workloads (each runs in a forked child) ----------------------------------------


def w_floor_echo(t: Target, size: int, plan: Plan) -> dict[str, Any]:
    fc = FloorClient(t.address)
    payload = b"x" * size
    r = measure([lambda: fc.call(b"E", payload)], plan.seconds, plan.max_ops, t.pid)
    fc.close()
    return r


def w_floor_putget(t: Target, size: int, plan: Plan, put_only: bool = False) -> dict[str, Any]:
    fc = FloorClient(t.address)
    payload = b"x" * size
    ops: list[Callable[[], Any]] = [lambda: fc.call(b"P", payload)]
    if not put_only:
        ops.append(lambda: fc.call(b"G"))
    r = measure(ops, plan.seconds, plan.max_ops, t.pid)
    fc.close()
    return r


def w_noop(t: Target, which: str, plan: Plan) -> dict[str, Any]:
    c = Client(t)
    op = c.m.ping if which == "ping" else c.value(unique("noop")).get
    r = measure([op], plan.seconds, plan.max_ops, t.pid)
    c.close()
    return r


def record_maker() -> Callable[[], dict[str, Any]]:
    """A new small record per call (a dict of str, int, float and a list, ~90 bytes pickled).

    What applications put on queues, rather than 100 bytes of ``x``: every
    record differs (no decoder cache helps), and its pickle holds ``p``/``r``
    bytes and opcodes that a restricted decoder must look at when a daemon
    reads the payload.
    """
    count = itertools.count()

    def make() -> dict[str, Any]:
        n = next(count)
        return {"id": n, "name": f"order-{n}", "price": n * 0.25, "tags": ["new", "paid"]}

    return make


def w_putget(
    t: Target, size: int, plan: Plan, put_only: bool = False, records: bool = False
) -> dict[str, Any]:
    """Put then get; ``records``: a new :func:`record_maker` dict each put (``size`` unused)."""
    c = Client(t)
    name = unique(f"putget{size}")
    q = c.queue(name)
    payload = b"x" * size
    ops: list[Callable[[], Any]] = [lambda: q.put(payload)]
    if records:
        make = record_maker()
        ops = [lambda: q.put(make())]
    if not put_only:
        ops.append(q.get)
    r = measure(ops, plan.seconds, plan.max_ops, t.pid)
    if t.system == "managerd":
        c.m.delete(name)  # put-only leaves its items behind
    c.close()
    return r


def w_dict(t: Target, op: str, plan: Plan) -> dict[str, Any]:
    c = Client(t)
    d = c.dict(unique("dict"))
    keys = [f"key{i}" for i in range(1000)]
    for k in keys:
        d[k] = P100
    nxt = itertools.cycle(keys).__next__
    if op == "set":
        r = measure([lambda: d.__setitem__(nxt(), P100)], plan.seconds, plan.max_ops, t.pid)
    else:
        r = measure([lambda: d[nxt()]], plan.seconds, plan.max_ops, t.pid)
    c.close()
    return r


def w_lock(t: Target, plan: Plan) -> dict[str, Any]:
    c = Client(t)
    lk = c.lock(unique("lock"))
    r = measure([lk.acquire, lk.release], plan.seconds, plan.max_ops, t.pid)
    c.close()
    return r


def w_connect(t: Target, tries: int) -> list[float]:
    """Milliseconds for connect + first call, ``tries`` times after one warm-up."""
    name = unique("connect")

    def once() -> float:
        if t.system == "floor":
            start = time.perf_counter()
            fc = FloorClient(t.address)
            fc.call(b"E", P100)
            took = time.perf_counter() - start
            fc.close()
        elif t.system == "stock":
            start = time.perf_counter()
            sm: Any = StockManager(address=t.address, authkey=t.authkey)
            sm.connect()
            q = sm.Queue(name)
            q.qsize()
            took = time.perf_counter() - start
            del q, sm  # the proxy's decref (one more connection) is not timed
            gc.collect()
        else:
            start = time.perf_counter()
            m = connect(t.address, authkey=t.authkey)
            m.Queue(name).qsize()
            took = time.perf_counter() - start
            m.close()
        return took * 1000

    once()
    return [once() for _ in range(tries)]


# -- multi-process workloads ----------------------------------------------------------------------


def w_producer(
    ready: Callable[[], float], t: Target, name: str, index: int, seconds: float, max_msgs: int
) -> dict[str, Any]:
    c = Client(t)
    q = c.queue(name, BOUNDED_QUEUE)
    put, pack, mono = q.put, HEAD.pack, time.monotonic
    deadline = ready() + seconds
    seq = 0
    while seq < max_msgs and mono() < deadline:
        put(pack(index, seq) + PAD)
        seq += 1
    c.close()
    return {"role": "producer", "index": index, "sent": seq}


def w_consumer(ready: Callable[[], float], t: Target, name: str, max_msgs: int) -> dict[str, Any]:
    c = Client(t)
    q = c.queue(name, BOUNDED_QUEUE)
    seqs: dict[int, array[int]] = {}
    unpack = HEAD.unpack_from
    ready()
    n = 0
    last = time.monotonic()
    error = None
    while n <= max_msgs:
        try:
            item = q.get(True, GET_TIMEOUT_S)
        except queue.Empty:
            error = f"nothing for {GET_TIMEOUT_S:.0f}s"
            break
        if item == SENTINEL:
            break
        producer, seq = unpack(item)
        got = seqs.get(producer)
        if got is None:
            got = seqs[producer] = array("I")
        got.append(seq)
        n += 1
        last = time.monotonic()
    c.close()
    return {
        "role": "consumer",
        "received": n,
        "last": last,
        "error": error,
        "seqs": {p: a.tobytes() for p, a in seqs.items()},
    }


def w_put_sentinels(t: Target, name: str, count: int) -> None:
    c = Client(t)
    q = c.queue(name, BOUNDED_QUEUE)
    for _ in range(count):
        q.put(SENTINEL)
    c.close()


def check_exactly_once(sent: dict[int, int], consumers: list[dict[str, Any]]) -> dict[str, Any]:
    """Every (producer, seq) sent was received exactly once."""
    counts = {p: bytearray(n) for p, n in sent.items()}
    strays = 0
    for result in consumers:
        for producer, raw in result["seqs"].items():
            seqs = array("I")
            seqs.frombytes(raw)
            mine = counts.get(producer)
            for s in seqs:
                if mine is None or s >= len(mine):
                    strays += 1
                else:
                    mine[s] = min(255, mine[s] + 1)
    lost = sum(c.count(0) for c in counts.values())
    twice = sum(len(c) - c.count(0) - c.count(1) for c in counts.values())
    return {
        "lost": lost,
        "duplicated": twice,
        "unknown": strays,
        "ok": not (lost or twice or strays),
    }


def run_mpmc(t: Target, producers: int, consumers: int, plan: Plan) -> dict[str, Any]:
    name = unique(f"mpmc{producers}x{consumers}")
    gang = Gang()
    for i in range(producers):
        gang.spawn(w_producer, t, name, i, plan.seconds, plan.max_ops)
    for _ in range(consumers):
        gang.spawn(w_consumer, t, name, plan.max_ops * producers)
    try:
        gang.wait_ready(producers + consumers)
        cpu = CpuWindow(t.pid)
        t_go = gang.go()
        results: dict[int, dict[str, Any]] = {}
        while sum(1 for r in results.values() if r["role"] == "producer") < producers:
            index, value = gang.result(plan.seconds + 120)
            results[index] = value
        in_child(w_put_sentinels, t, name, consumers)
        while len(results) < producers + consumers:
            index, value = gang.result(GET_TIMEOUT_S + 60)
            results[index] = value
        usage = cpu.stop(sum(r["received"] for r in results.values() if r["role"] == "consumer"))
    finally:
        gang.join()
    sent = {r["index"]: r["sent"] for r in results.values() if r["role"] == "producer"}
    got = [r for r in results.values() if r["role"] == "consumer"]
    received = sum(r["received"] for r in got)
    elapsed = max(r["last"] for r in got) - t_go
    check = check_exactly_once(sent, got)
    errors = [r["error"] for r in got if r["error"]]
    return {
        "rate": received / elapsed if elapsed > 0 else 0.0,
        "sent": sum(sent.values()),
        "received": received,
        "elapsed_s": round(elapsed, 3),
        "exactly_once": check,
        **usage,
        "ok": check["ok"] and not errors,
        "errors": errors,
    }


def w_pipe_producer(
    ready: Callable[[], float],
    t: Target,
    name: str,
    batch: int,
    seconds: float,
    max_msgs: int,
    depth: int = 0,
) -> dict[str, Any]:
    """One producer: ``put_many`` of ``batch`` items (or single ``put`` when batch is 1).

    ``depth`` > 0: pipelined, ``put_many_async`` with that many batches in flight.
    """
    c = Client(t)
    q = c.queue(name, BOUNDED_QUEUE)
    pack, mono = HEAD.pack, time.monotonic
    deadline = ready() + seconds
    cpu0 = os.times()
    seq = 0
    if depth:
        in_flight: collections.deque[Any] = collections.deque()
        put_async = q.put_many_async
        while seq < max_msgs and mono() < deadline:
            in_flight.append(put_async([pack(0, s) + PAD for s in range(seq, seq + batch)]))
            seq += batch
            if len(in_flight) >= depth:
                in_flight.popleft().result()
        while in_flight:
            in_flight.popleft().result()
    elif batch == 1:
        put = q.put
        while seq < max_msgs and mono() < deadline:
            put(pack(0, seq) + PAD)
            seq += 1
    else:
        put_many = q.put_many
        while seq < max_msgs and mono() < deadline:
            put_many([pack(0, s) + PAD for s in range(seq, seq + batch)])
            seq += batch
    q.put(SENTINEL)
    c.close()
    cpu1 = os.times()
    return {"role": "producer", "sent": seq,
            "cpu_s": cpu1.user - cpu0.user + cpu1.system - cpu0.system}  # fmt: skip


def w_pipe_consumer(
    ready: Callable[[], float], t: Target, name: str, batch: int, max_msgs: int, depth: int = 0
) -> dict[str, Any]:
    """One consumer: ``get_many(batch)`` (or ``get``); checks the order (one producer, FIFO).

    ``depth`` > 0: pipelined, ``get_many_async`` with that many calls in flight
    (those still in flight at the end are cancelled).
    """
    c = Client(t)
    q = c.queue(name, BOUNDED_QUEUE)
    unpack = HEAD.unpack_from
    ready()
    cpu0 = os.times()
    expect = 0
    in_order = True
    error = None
    calls = 0
    in_flight: collections.deque[Any] = collections.deque()
    while calls <= max_msgs + 1:
        calls += 1
        try:
            if depth:
                while len(in_flight) < depth:
                    in_flight.append(q.get_many_async(batch, True, GET_TIMEOUT_S))
                items = in_flight.popleft().result()
            else:
                items = (
                    q.get_many(batch, True, GET_TIMEOUT_S)
                    if batch > 1
                    else [q.get(True, GET_TIMEOUT_S)]
                )
        except queue.Empty:
            error = f"nothing for {GET_TIMEOUT_S:.0f}s"
            break
        for item in items:
            if item == SENTINEL:
                last = time.monotonic()
                for pending in in_flight:
                    pending.cancel()
                c.close()
                cpu1 = os.times()
                cpu_s = cpu1.user - cpu0.user + cpu1.system - cpu0.system
                return {"role": "consumer", "received": expect, "in_order": in_order,
                        "last": last, "cpu_s": cpu_s}  # fmt: skip
            if unpack(item)[1] != expect:
                in_order = False
            expect += 1
    c.close()
    return {"role": "consumer", "received": expect, "in_order": False, "last": time.monotonic(),
            "error": error, "cpu_s": 0.0}  # fmt: skip


def run_pipe(t: Target, batch: int, plan: Plan, depth: int = 0) -> dict[str, Any]:
    name = unique(f"pipe{batch}")
    gang = Gang()
    gang.spawn(w_pipe_producer, t, name, batch, plan.seconds, plan.max_ops * 10, depth)
    gang.spawn(w_pipe_consumer, t, name, batch, plan.max_ops * 10, depth)
    try:
        gang.wait_ready(2)
        cpu = CpuWindow(t.pid)
        t_go = gang.go()
        results = dict(gang.result(plan.seconds + GET_TIMEOUT_S + 60) for _ in range(2))
        usage = cpu.stop(results[1]["received"])
    finally:
        gang.join()
    prod, cons = results[0], results[1]
    elapsed = cons["last"] - t_go
    ok = cons["in_order"] and cons["received"] == prod["sent"] and not cons.get("error")
    return {
        "rate": cons["received"] / elapsed if elapsed > 0 else 0.0,
        "sent": prod["sent"],
        "received": cons["received"],
        "elapsed_s": round(elapsed, 3),
        "batch": batch,
        "ok": ok,
        "producer_cores_busy": prod["cpu_s"] / elapsed if elapsed > 0 else 0.0,
        "consumer_cores_busy": cons["cpu_s"] / elapsed if elapsed > 0 else 0.0,
        **usage,
    }


def w_lock_contender(
    ready: Callable[[], float], t: Target, name: str, seconds: float, max_ops: int
) -> dict[str, Any]:
    c = Client(t)
    lk = c.lock(name)
    acquire, release, mono = lk.acquire, lk.release, time.monotonic
    deadline = ready() + seconds
    n = 0
    while n < max_ops and mono() < deadline:
        acquire()
        release()
        n += 1
    end = mono()
    c.close()
    return {"pairs": n, "end": end}


def run_lock_contended(t: Target, procs: int, plan: Plan) -> dict[str, Any]:
    results, usage, elapsed = run_gang(
        t.pid, procs, "pairs", plan.seconds + 120,
        w_lock_contender, t, unique("contended"), plan.seconds, plan.max_ops,
    )  # fmt: skip
    pairs = sum(r["pairs"] for r in results)
    return {
        "rate": pairs / elapsed if elapsed > 0 else 0.0,
        "per_process": [r["pairs"] for r in results],
        **usage,
        "elapsed_s": round(elapsed, 3),
    }


# -- the client's imports -------------------------------------------------------------------------

IMPORT_PROBE = r"""
import json, sys
before = set(sys.modules)
import managerd_client
m = managerd_client.connect(sys.argv[1], authkey=sys.argv[2].encode())
m.ping()
q = m.Queue("imports-probe")
q.put(1)
q.get()
m.close()
print(json.dumps({n: getattr(mod, "__file__", None) for n, mod in sys.modules.items()
                  if n not in before}))
"""


def run_imports(t: Target) -> dict[str, Any]:
    """Modules that importing managerd_client and connecting added, by where they live."""
    out = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE, t.address, t.authkey.decode()],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    added: dict[str, str | None] = json.loads(out.stdout)
    paths = sysconfig.get_paths()
    stdlib = {Path(paths["stdlib"]).resolve(), Path(paths["platstdlib"]).resolve()}
    site = {Path(p).resolve() for p in (paths["purelib"], paths["platlib"])}
    import managerd_client

    client_dir = Path(managerd_client.__file__).resolve().parent
    third_party = {}
    for name, file in added.items():
        if file is None:
            continue  # builtin or frozen
        path = Path(file).resolve()
        in_stdlib = any(path.is_relative_to(s) for s in stdlib) and not any(
            path.is_relative_to(s) for s in site
        )
        if not (in_stdlib or path.is_relative_to(client_dir)):
            third_party[name] = file
    return {
        "modules_added": len(added),
        "client_modules": sorted(n for n in added if n.split(".")[0] == "managerd_client"),
        "third_party": third_party,
        "ok": not third_party,
    }
