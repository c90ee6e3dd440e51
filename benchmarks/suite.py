"""The benchmark suite of issue 7: the raw socket floor, stock managers and managerd, one run.

Every workload runs, on this machine and in this invocation, against up to
three systems:

- ``floor``: a raw TCP server in another process (``TCP_NODELAY`` on both
  ends, a 5-byte header and the bytes): 100-byte ping-pong, and the same
  put/get pattern as a queue (a payload up and an empty ack back; an empty
  request up and the payload back);
- ``stock``: a ``multiprocessing.managers.BaseManager`` server started as a
  subprocess on 127.0.0.1 with an authkey (named queues, dicts, locks and
  values registered on it), clients using the stock proxies;
- ``managerd``: a ``managerd serve`` subprocess (tests/conftest.py's
  ``Daemon``; default settings, so uvloop when installed), clients using
  ``managerd_client``.

Single-client loops run in a forked child (the suite's own process holds
nothing that could steal its CPU) and record every call's latency;
multi-process workloads fork their workers, which connect first and then
start together at one shared ``time.monotonic()`` instant. Every loop is
bounded in time (``--seconds``) and in count. Figures are printed, never
asserted; a correctness failure (a message lost or delivered twice, a wake
out of FIFO order) is printed and makes the exit status 1.

Usage::

    uv run python benchmarks/suite.py --json benchmarks/results.json   # full (~5 min)
    uv run python benchmarks/suite.py --quick --json /tmp/smoke.json   # seconds (CI)
    uv run python benchmarks/suite.py --only noop,putget --seconds 5  # some workloads

See BENCHMARKS.md for what each figure means and the issue's targets.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import itertools
import json
import multiprocessing
import os
import platform
import queue
import resource
import secrets
import socket
import struct
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import traceback
from array import array
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.managers import AcquirerProxy, BaseManager, DictProxy, ValueProxy
from multiprocessing.managers import Value as StockValue
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from managerd_client import ManagerdError, connect  # noqa: E402

from conftest import Daemon  # noqa: E402

# Fork: a worker starts in milliseconds (spawn re-imports everything, ~0.3 s
# a process), which keeps the multi-process workloads and --quick short.
# Workers open their own connections after the fork.
CTX = multiprocessing.get_context("fork")

P100 = b"x" * 100
SIZES = {"100B": 100, "32KB": 32 * 1024, "1MB": 1024 * 1024}
#: Queue items of the multi-process workloads: producer, sequence, padding (100 B).
HEAD = struct.Struct("!II")
PAD = b"p" * (100 - HEAD.size)
SENTINEL = b""
BOUNDED_QUEUE = 10_000  # maxsize of the producer/consumer queues (both systems)
BATCH = 1_000  # items per put_many / get_many
GET_TIMEOUT_S = 60.0  # a consumer that waits this long reports a failure
GO_TIMEOUT_S = 300.0  # workers wait at most this long for the start signal
CONNECT_PHASE_S = 180.0  # idle clients: a worker stops connecting after this long
FINAL_PINGS_S = 60.0  # idle clients: the check that every session still answers
CHECK_EVERY = 50  # blocked consumers: puts between two checks of the parked count
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Plan:
    """How long and how many: the full run or the --quick smoke."""

    seconds: float
    max_ops: int  # every timed loop stops at this many iterations too
    connect_tries: int
    idle_clients: int
    idle_procs: int
    many_connections: int
    many_procs: int
    consumers: int
    consumer_procs: int
    rounds: int  # single-client and multi-process workloads: systems measured in turn
    quick: bool


def plan_for(quick: bool, seconds: float | None) -> Plan:
    if quick:
        return Plan(
            seconds=0.25 if seconds is None else seconds,
            max_ops=50_000,
            connect_tries=5,
            idle_clients=50,
            idle_procs=2,
            many_connections=200,
            many_procs=2,
            consumers=50,
            consumer_procs=2,
            rounds=1,
            quick=True,
        )
    return Plan(
        seconds=2.0 if seconds is None else seconds,
        max_ops=5_000_000,
        connect_tries=30,
        idle_clients=1_000,
        idle_procs=4,
        many_connections=10_000,
        many_procs=16,
        consumers=1_000,
        consumer_procs=4,
        rounds=2,
        quick=False,
    )


# -- the stock server -----------------------------------------------------------------------------


class StockQueue(queue.Queue):  # type: ignore[type-arg]
    """``queue.Queue``, plus how many getters wait (for the FIFO check only)."""

    def waiters(self) -> int:
        return len(self.not_empty._waiters)  # type: ignore[attr-defined]


_stock_objects: dict[tuple[str, str], Any] = {}
_stock_objects_lock = threading.Lock()


def _stock_named(kind: str, name: str, factory: Callable[[], Any]) -> Any:
    with _stock_objects_lock:
        obj = _stock_objects.get((kind, name))
        if obj is None:
            obj = _stock_objects[kind, name] = factory()
        return obj


def stock_queue(name: str, maxsize: int = 0) -> StockQueue:
    return _stock_named("Queue", name, lambda: StockQueue(maxsize))  # type: ignore[no-any-return]


def stock_dict(name: str) -> dict[Any, Any]:
    return _stock_named("dict", name, dict)  # type: ignore[no-any-return]


def stock_lock(name: str) -> Any:
    return _stock_named("Lock", name, threading.Lock)


def stock_value(name: str, typecode: str = "i", value: Any = 0) -> Any:
    return _stock_named("Value", name, lambda: StockValue(typecode, value))


class StockManager(BaseManager):
    """Named objects on a stock server; the proxies are the stock ones."""


StockManager.register("Queue", callable=stock_queue)  # AutoProxy
StockManager.register("dict", callable=stock_dict, proxytype=DictProxy)
StockManager.register("Lock", callable=stock_lock, proxytype=AcquirerProxy)
StockManager.register("Value", callable=stock_value, proxytype=ValueProxy)


# -- the floor server -----------------------------------------------------------------------------

FLOOR_HEAD = struct.Struct("!cI")  # op (E echo, P put, G get), payload length
#: Reads go into one preallocated buffer: ``recv(n)`` allocates n bytes per
#: call (an mmap/munmap pair above 128 KiB), which would cost more than the
#: round trip.
RECV_CHUNK = 256 * 1024


def _floor_server(port_out: Any) -> None:
    """A raw TCP server: a thread per connection, one recv for a small frame."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=128)
    port_out.send(listener.getsockname()[1])
    store: deque[bytes | bytearray] = deque()
    while True:  # until the suite terminates this process
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_floor_conn, args=(conn, store), daemon=True).start()


class FrameReader:
    """Reads floor frames: small ones through one reused buffer, large ones straight in place."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.chunk = memoryview(bytearray(RECV_CHUNK))

    def _fill(self) -> bool:
        n = self.sock.recv_into(self.chunk)
        self.buf += self.chunk[:n]
        return n > 0

    def read(self) -> tuple[bytes, bytes | bytearray] | None:
        buf, head = self.buf, FLOOR_HEAD.size
        while len(buf) < head:
            if not self._fill():
                return None
        op, size = FLOOR_HEAD.unpack_from(buf)
        if len(buf) >= head + size:
            payload = bytes(buf[head : head + size])
            del buf[: head + size]
            return op, payload
        # A large frame: everything buffered is its beginning (each side
        # waits for the reply before sending again); read the rest in place.
        whole = bytearray(size)
        view = memoryview(whole)
        have = len(buf) - head
        view[:have] = buf[head:]
        buf.clear()
        while have < size:
            n = self.sock.recv_into(view[have:])
            if not n:
                return None
            have += n
        return op, whole


def send_floor(sock: socket.socket, op: bytes, payload: bytes | bytearray) -> None:
    if len(payload) < 65536:
        sock.sendall(FLOOR_HEAD.pack(op, len(payload)) + payload)
    else:  # no copy of a large payload
        sock.sendall(FLOOR_HEAD.pack(op, len(payload)))
        sock.sendall(payload)


def _floor_conn(conn: socket.socket, store: deque[bytes | bytearray]) -> None:
    reader = FrameReader(conn)
    with conn:
        while (frame := reader.read()) is not None:
            op, payload = frame
            if op == b"E":
                send_floor(conn, b"E", payload)
            elif op == b"P":
                store.append(payload)
                send_floor(conn, b"P", b"")
            else:
                send_floor(conn, b"G", store.popleft())


class FloorClient:
    """The client side of the floor: send a frame, read the reply frame."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = FrameReader(self.sock)

    def call(self, op: bytes, payload: bytes = b"") -> bytes | bytearray:
        send_floor(self.sock, op, payload)
        frame = self.reader.read()
        if frame is None:
            raise EOFError("the floor server closed the connection")
        return frame[1]

    def close(self) -> None:
        self.sock.close()


# -- targets and clients --------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One system under test: where it listens and its server process."""

    system: str  # "floor" | "stock" | "managerd"
    address: Any  # floor: port; stock: (host, port); managerd: "host:port"
    authkey: bytes
    pid: int


class Client:
    """One client of a stock or managerd target, with the same calls on both."""

    def __init__(self, t: Target) -> None:
        self.t = t
        if t.system == "managerd":
            self.m: Any = connect(t.address, authkey=t.authkey)
        else:
            self.m = StockManager(address=t.address, authkey=t.authkey)
            self.m.connect()

    def queue(self, name: str, maxsize: int = 0) -> Any:
        return self.m.Queue(name, maxsize)

    def dict(self, name: str) -> Any:
        return self.m.dict(name)

    def lock(self, name: str) -> Any:
        return self.m.Lock(name)

    def value(self, name: str) -> Any:
        return self.m.Value(name, "i", 0)

    def close(self) -> None:
        if self.t.system == "managerd":
            self.m.close()


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def proc_cpu_s(pid: int) -> tuple[float, float, int]:
    """(utime, stime, minor page faults) of process ``pid`` (all its threads); seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK, int(fields[7])


def vmrss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class CpuWindow:
    """CPU that a server process, and the whole machine, spent between start and stop."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.server0 = proc_cpu_s(pid)
        self.machine0 = _machine_ticks()
        self.wall0 = time.monotonic()

    def stop(self, messages: int) -> dict[str, float]:
        server1, machine1 = proc_cpu_s(self.pid), _machine_ticks()
        wall = time.monotonic() - self.wall0
        cpu = (server1[0] - self.server0[0]) + (server1[1] - self.server0[1])
        busy = (machine1[0] - self.machine0[0]) / CLK_TCK
        total = (machine1[1] - self.machine0[1]) / CLK_TCK
        return {
            "server_cpu_us_per_msg": cpu / messages * 1e6 if messages else 0.0,
            "server_cores_busy": cpu / wall if wall > 0 else 0.0,
            "machine_busy_fraction": busy / total if total > 0 else 0.0,
            "machine_cpu_us_per_msg": busy / messages * 1e6 if messages else 0.0,
        }


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def open_files_limit(pid: int) -> list[int | str]:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return [
                    int(soft) if soft.isdigit() else soft,
                    int(hard) if hard.isdigit() else hard,
                ]
    return []


def raise_nofile(needed: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards ``needed`` (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


# -- the timed loop -------------------------------------------------------------------------------


def measure(
    ops: list[Callable[[], Any]], seconds: float, max_iters: int, server_pid: int, warmup: int = 20
) -> dict[str, Any]:
    """Run ``ops`` in turn until ``seconds`` or ``max_iters``; every call is timed.

    Returns iterations per second, p50/p99 of an iteration and of each op
    (µs), and the CPU that the client and the server process spent per
    iteration (µs; /proc utime+stime, 10 ms ticks, so only meaningful over
    a second or more).
    """
    warm_until = time.perf_counter() + seconds / 10
    for _ in range(warmup):  # bounded in time too: a stalled op (stock 32 KB) takes 88 ms
        for op in ops:
            op()
        if time.perf_counter() > warm_until:
            break
    per_op: list[list[float]] = [[] for _ in ops]
    iters: list[float] = []
    pc = time.perf_counter
    server0, client0 = proc_cpu_s(server_pid), os.times()
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = pc()
    end = start + seconds
    n = 0
    t = start
    while n < max_iters:
        t = t0 = pc()
        for op, bucket in zip(ops, per_op, strict=True):
            op()
            t1 = pc()
            bucket.append(t1 - t)
            t = t1
        iters.append(t - t0)
        n += 1
        if t >= end:
            break
    elapsed = t - start
    server1, client1 = proc_cpu_s(server_pid), os.times()
    server_user, server_sys = server1[0] - server0[0], server1[1] - server0[1]
    client_user, client_sys = client1.user - client0.user, client1.system - client0.system
    server_faults = server1[2] - server0[2]
    client_faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    us = 1e6
    return {
        "iterations": n,
        "elapsed_s": round(elapsed, 4),
        "rate": n / elapsed if elapsed > 0 else 0.0,
        "p50_us": pct(iters, 0.5) * us,
        "p99_us": pct(iters, 0.99) * us,
        "per_op_p50_us": [pct(b, 0.5) * us for b in per_op],
        "per_op_p99_us": [pct(b, 0.99) * us for b in per_op],
        "server_cpu_us_per_iter": (server_user + server_sys) / n * us if n else 0.0,
        "server_user_us_per_iter": server_user / n * us if n else 0.0,
        "server_sys_us_per_iter": server_sys / n * us if n else 0.0,
        "client_cpu_us_per_iter": (client_user + client_sys) / n * us if n else 0.0,
        "client_user_us_per_iter": client_user / n * us if n else 0.0,
        "client_sys_us_per_iter": client_sys / n * us if n else 0.0,
        "server_page_faults_per_iter": server_faults / n if n else 0.0,
        "client_page_faults_per_iter": client_faults / n if n else 0.0,
    }


def mean_of(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds of one measurement as one: numbers averaged, flags all-true, the rest listed."""
    if len(rounds) == 1:
        return {**rounds[0], "rate_per_round": [rounds[0].get("rate")]}
    out: dict[str, Any] = {}
    for key, first in rounds[0].items():
        values = [r.get(key) for r in rounds]
        if isinstance(first, bool):
            out[key] = all(values)
        elif isinstance(first, (int, float)):
            out[key] = sum(values) / len(values)
        elif isinstance(first, list) and all(isinstance(x, (int, float)) for x in first):
            out[key] = [sum(column) / len(column) for column in zip(*values, strict=True)]
        else:
            out[key] = values if any(v != first for v in values) else first
    out["rate_per_round"] = [r.get("rate") for r in rounds]
    return out


# -- running in children --------------------------------------------------------------------------


def _child_main(out: Any, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        out.send((True, fn(*args)))
    except BaseException:
        out.send((False, traceback.format_exc()))


def in_child(fn: Callable[..., Any], *args: Any, timeout_s: float = 600.0) -> Any:
    """``fn(*args)`` in a forked child process; its result (or its traceback as an error)."""
    receiver, sender = CTX.Pipe(duplex=False)
    proc = CTX.Process(target=_child_main, args=(sender, fn, args), daemon=True)
    proc.start()
    sender.close()
    try:
        if not receiver.poll(timeout_s):
            raise TimeoutError(f"{fn.__name__} did not finish in {timeout_s:.0f}s")
        ok, value = receiver.recv()
    except EOFError:
        ok, value = False, f"the child running {fn.__name__} died (exit {proc.exitcode})"
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join(10)
        receiver.close()
    if not ok:
        raise RuntimeError(f"{fn.__name__} failed in a child process:\n{value}")
    return value


class Gang:
    """Forked workers that connect, wait for one start signal, run and report.

    A worker is ``fn(ready, *args)``; it calls ``ready()`` when connected,
    which blocks until every worker is ready and returns the shared start
    instant (``time.monotonic()``, the same clock in every process).
    """

    def __init__(self) -> None:
        self.ready_q: Any = CTX.Queue()
        self.out_q: Any = CTX.Queue()
        self.go_event = CTX.Event()
        self.t_go = CTX.Value("d", 0.0, lock=False)
        self.procs: list[Any] = []
        self.early: list[tuple[int, Any]] = []

    def spawn(self, fn: Callable[..., Any], *args: Any) -> int:
        index = len(self.procs)
        proc = CTX.Process(target=_gang_main, args=(self, index, fn, args), daemon=True)
        proc.start()
        self.procs.append(proc)
        return index

    def wait_ready(self, count: int, timeout_s: float = 600.0) -> None:
        deadline = time.monotonic() + timeout_s
        seen = 0
        while seen < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {seen} of {count} workers got ready")
            try:
                self.ready_q.get(timeout=0.1)
                seen += 1
            except queue.Empty:
                self._check_failures()

    def _check_failures(self) -> None:
        while True:
            try:
                index, ok, value = self.out_q.get_nowait()
            except queue.Empty:
                return
            if not ok:
                raise RuntimeError(f"worker {index} failed:\n{value}")
            self.early.append((index, value))

    def go(self) -> float:
        t_go = time.monotonic() + 0.005
        self.t_go.value = t_go
        self.go_event.set()
        return t_go

    def result(self, timeout_s: float) -> tuple[int, Any]:
        if self.early:
            return self.early.pop(0)
        index, ok, value = self.out_q.get(timeout=timeout_s)
        if not ok:
            raise RuntimeError(f"worker {index} failed:\n{value}")
        return index, value

    def join(self) -> None:
        for proc in self.procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join(10)


def _gang_main(gang: Gang, index: int, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    def ready() -> float:
        gang.ready_q.put(index)
        if not gang.go_event.wait(GO_TIMEOUT_S):
            raise TimeoutError("no start signal")
        return float(gang.t_go.value)

    try:
        gang.out_q.put((index, True, fn(ready, *args)))
    except BaseException:
        gang.out_q.put((index, False, traceback.format_exc()))


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


def w_putget(t: Target, size: int, plan: Plan, put_only: bool = False) -> dict[str, Any]:
    c = Client(t)
    name = unique(f"putget{size}")
    q = c.queue(name)
    payload = b"x" * size
    ops: list[Callable[[], Any]] = [lambda: q.put(payload)]
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
            sm = StockManager(address=t.address, authkey=t.authkey)
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
    ready: Callable[[], float], t: Target, name: str, batch: int, seconds: float, max_msgs: int
) -> dict[str, Any]:
    """One producer: ``put_many`` of ``batch`` items (or single ``put`` when batch is 1)."""
    c = Client(t)
    q = c.queue(name, BOUNDED_QUEUE)
    pack, mono = HEAD.pack, time.monotonic
    deadline = ready() + seconds
    cpu0 = os.times()
    seq = 0
    if batch == 1:
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
    ready: Callable[[], float], t: Target, name: str, batch: int, max_msgs: int
) -> dict[str, Any]:
    """One consumer: ``get_many(batch)`` (or ``get``); checks the order (one producer, FIFO)."""
    c = Client(t)
    q = c.queue(name, BOUNDED_QUEUE)
    unpack = HEAD.unpack_from
    ready()
    cpu0 = os.times()
    expect = 0
    in_order = True
    error = None
    calls = 0
    while calls <= max_msgs + 1:
        calls += 1
        try:
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


def run_pipe(t: Target, batch: int, plan: Plan) -> dict[str, Any]:
    name = unique(f"pipe{batch}")
    gang = Gang()
    gang.spawn(w_pipe_producer, t, name, batch, plan.seconds, plan.max_ops * 10)
    gang.spawn(w_pipe_consumer, t, name, batch, plan.max_ops * 10)
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
    name = unique("contended")
    gang = Gang()
    for _ in range(procs):
        gang.spawn(w_lock_contender, t, name, plan.seconds, plan.max_ops)
    try:
        gang.wait_ready(procs)
        cpu = CpuWindow(t.pid)
        t_go = gang.go()
        results = [gang.result(plan.seconds + 120)[1] for _ in range(procs)]
        usage = cpu.stop(sum(r["pairs"] for r in results))
    finally:
        gang.join()
    pairs = sum(r["pairs"] for r in results)
    elapsed = max(r["end"] for r in results) - t_go
    return {
        "rate": pairs / elapsed if elapsed > 0 else 0.0,
        "per_process": [r["pairs"] for r in results],
        **usage,
        "elapsed_s": round(elapsed, 3),
    }


# -- many clients ---------------------------------------------------------------------------------


def w_probe(ready: Callable[[], float], t: Target, seconds: float, max_ops: int) -> dict[str, Any]:
    """Another client: connected before the crowd; times its calls while the crowd idles."""
    c = Client(t)
    op = c.m.ping if t.system == "managerd" else c.value(unique("probe")).get
    op()
    ready()
    r = measure([op], seconds, max_ops, t.pid)
    c.close()
    return r


def w_idle_managerd(
    ready: Callable[[], float], t: Target, count: int, release: Any
) -> dict[str, Any]:
    """``count`` connect() sessions, each pinged once, held until ``release``.

    Connecting stops after CONNECT_PHASE_S; the final pings stop after
    FINAL_PINGS_S (a session that was lost reconnects on its next call).
    """
    nofile = raise_nofile(count + 256)
    threading.stack_size(256 * 1024)  # one heartbeat thread per session
    managers = []
    failures: list[str] = []
    started = time.monotonic()
    for _ in range(count):
        if time.monotonic() - started > CONNECT_PHASE_S:
            failures.append(f"stopped connecting after {CONNECT_PHASE_S:.0f}s")
            break
        try:
            m = connect(t.address, authkey=t.authkey, connect_timeout_s=5)
            m.ping()
            managers.append(m)
        except (ManagerdError, OSError) as exc:
            failures.append(f"{type(exc).__name__}: {exc}")
            if len(failures) >= 20:
                break
    connect_s = time.monotonic() - started
    ready()
    release.wait(GO_TIMEOUT_S)
    # A session lost and started again (lease expired, connection dropped)
    # shows as a session epoch above 1.
    replaced = sum(m.session_epoch - 1 for m in managers)
    alive = 0
    deadline = time.monotonic() + FINAL_PINGS_S
    for m in managers:
        if time.monotonic() < deadline:
            try:
                m.ping()
                alive += 1
            except ManagerdError:
                pass
        m.close()
    return {"connected": len(managers), "alive_at_end": alive, "failures": len(failures),
            "first_failures": failures[:3], "connect_s": round(connect_s, 2),
            "sessions_replaced": replaced, "nofile_soft": nofile}  # fmt: skip


def w_idle_stock(ready: Callable[[], float], t: Target, count: int, release: Any) -> dict[str, Any]:
    """``count`` stock connections: a thread each (a stock proxy connects per thread)."""
    nofile = raise_nofile(count + 256)
    threading.stack_size(256 * 1024)
    c = Client(t)
    v = c.value("idle")
    hold = threading.Event()
    opened: list[int] = []
    failures: list[str] = []

    def one(done: threading.Event) -> None:
        try:
            v.get()
            opened.append(1)
        except Exception as exc:
            failures.append(f"{type(exc).__name__}: {exc}")
        done.set()
        hold.wait(GO_TIMEOUT_S)

    started = time.monotonic()
    threads = []
    # One at a time, as the managerd clients connect: the stock listener's
    # backlog is 16, and a burst of connects beyond it waits for SYN retries.
    for _ in range(count):
        done = threading.Event()
        th = threading.Thread(target=one, args=(done,), daemon=True)
        th.start()
        threads.append(th)
        if not done.wait(60):
            failures.append("no connection within 60s")
            break
    connect_s = time.monotonic() - started
    ready()
    release.wait(GO_TIMEOUT_S)
    hold.set()
    for th in threads:
        th.join(10)
    return {"connected": len(opened), "alive_at_end": len(opened), "failures": len(failures),
            "first_failures": failures[:3], "connect_s": round(connect_s, 2),
            "sessions_replaced": 0, "nofile_soft": nofile}  # fmt: skip


def run_idle(t: Target, clients: int, procs: int, plan: Plan) -> dict[str, Any]:
    """A probe client connects, then ``clients`` idle ones; the probe's calls are timed."""
    worker = w_idle_managerd if t.system == "managerd" else w_idle_stock
    print(f"    {clients} idle clients on {t.system} (server pid {t.pid})", flush=True)
    gang = Gang()
    release = CTX.Event()
    rss_empty = vmrss_mb(t.pid)
    gang.spawn(w_probe, t, max(plan.seconds, 0.25), plan.max_ops)
    try:
        gang.wait_ready(1)
        shares = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
        started = time.monotonic()
        for share in shares:
            gang.spawn(worker, t, share, release)
        gang.wait_ready(procs)
        connect_s = time.monotonic() - started
        time.sleep(0.5)  # let the daemon settle (freed buffers, heartbeats)
        rss_idle = vmrss_mb(t.pid)
        gang.go()
        _, probe = gang.result(plan.seconds + 120)
        rss_after = vmrss_mb(t.pid)
        release.set()
        crowd = [gang.result(GO_TIMEOUT_S)[1] for _ in range(procs)]
    finally:
        release.set()
        gang.join()
    return {
        "clients": clients,
        "processes": procs,
        "connected": sum(r["connected"] for r in crowd),
        "alive_at_end": sum(r["alive_at_end"] for r in crowd),
        "failures": sum(r["failures"] for r in crowd),
        "sessions_replaced": sum(r["sessions_replaced"] for r in crowd),
        "daemon_log": daemon_warnings(t.pid) if t.system == "managerd" else None,
        "first_failures": [f for r in crowd for f in r["first_failures"]][:3],
        "connect_all_s": round(connect_s, 2),
        "server_rss_mb_before": round(rss_empty, 1),
        "server_rss_mb": round(max(rss_idle, rss_after), 1),
        "server_open_files_limit": open_files_limit(t.pid),
        "client_open_files_soft": crowd[0]["nofile_soft"] if crowd else None,
        "probe": probe,
    }


def w_blocked_consumers(
    t: Target, name: str, indices: list[int], commands: Any, out: Any, ready_q: Any
) -> None:
    """Consumers ``indices`` (a connection each); ``("go", i)`` makes consumer i call get()."""
    raise_nofile(2 * len(indices) + 256)
    threading.stack_size(256 * 1024)
    events = {i: threading.Event() for i in indices}
    clients: list[Client] = []
    queues = {}
    opened = threading.Event()

    def consume(i: int) -> None:
        q = queues[i]
        try:
            q.qsize()  # (stock: opens this thread's connection) before get() is timed
        except BaseException:
            ready_q.put(("error", traceback.format_exc()))
            return
        opened.set()
        if not events[i].wait(GO_TIMEOUT_S):
            return
        try:
            item = q.get(True, GO_TIMEOUT_S)
            out.put((i, item, time.monotonic()))
        except BaseException as exc:
            out.put((i, f"error: {type(exc).__name__}: {exc}", time.monotonic()))

    threads = []
    try:
        if t.system == "stock":
            c = Client(t)
            clients.append(c)
            shared = c.queue(name)
        for i in indices:
            if t.system == "managerd":
                c = Client(t)
                clients.append(c)
                queues[i] = c.queue(name)
            else:
                queues[i] = shared
            # One connection at a time (the stock listener's backlog is 16).
            opened.clear()
            th = threading.Thread(target=consume, args=(i,), daemon=True)
            th.start()
            threads.append(th)
            if not opened.wait(60):
                raise TimeoutError(f"consumer {i} did not connect within 60s")
    except BaseException:
        ready_q.put(("error", traceback.format_exc()))
        return
    ready_q.put(("ready", len(indices)))
    for _ in range(len(indices) + 1):
        if not commands.poll(GO_TIMEOUT_S):
            break
        command = commands.recv()
        if command[0] == "stop":
            break
        events[command[1]].set()
    for th in threads:
        th.join(1)
    for c in clients:
        c.close()


def run_blocked(t: Target, consumers: int, procs: int, plan: Plan) -> dict[str, Any]:
    """``consumers`` blocked in get(), in a known arrival order; one put wakes the next."""
    name = unique("blocked")
    out: Any = CTX.Queue()
    ready_q: Any = CTX.Queue()
    pipes = []
    workers = []
    owner = {}
    for p in range(procs):
        indices = list(range(p, consumers, procs))
        for i in indices:
            owner[i] = p
        receiver, sender = CTX.Pipe(duplex=False)
        proc = CTX.Process(
            target=w_blocked_consumers, args=(t, name, indices, receiver, out, ready_q), daemon=True
        )
        proc.start()
        pipes.append(sender)
        workers.append(proc)
    check = Client(t)
    q = check.queue(name)
    if t.system == "managerd":

        def waiters() -> int:
            return int(check.m.status()["objects"][name]["waiters"])
    else:
        waiters = q.waiters
    arrival_ok = fifo_ok = one_each = True
    wakes: list[float] = []
    errors: list[str] = []
    try:
        for _ in range(procs):
            what, info = ready_q.get(timeout=GO_TIMEOUT_S)
            if what != "ready":
                raise RuntimeError(f"a consumer process failed:\n{info}")
        # Arrival order: consumer i calls get() only once i-1 is seen parked.
        started = time.monotonic()
        for i in range(consumers):
            pipes[owner[i]].send(("go", i))
            deadline = time.monotonic() + 10
            delay = 0.0002
            while waiters() != i + 1 and time.monotonic() < deadline:
                time.sleep(delay)
                delay = min(delay * 2, 0.01)
            if waiters() != i + 1:
                arrival_ok = False
                errors.append(f"consumer {i} not seen waiting (waiters={waiters()})")
                break
        arrive_s = time.monotonic() - started
        # The parked count is checked every CHECK_EVERY puts (a managerd status()
        # with 1,000 sessions costs ~10 ms of daemon time); the wake right
        # after a check is left out of the latencies.
        after_check = False
        woken = 0
        for k in range(consumers if arrival_ok else 0):
            t_put = time.monotonic()
            q.put(k)
            index, item, t_recv = out.get(timeout=30)
            woken += 1
            if not after_check:
                wakes.append(t_recv - t_put)
            after_check = False
            if index != k or item != k:
                fifo_ok = False
                errors.append(f"put {k} woke consumer {index} with {item!r}")
            if k % CHECK_EVERY == CHECK_EVERY - 1 or k == consumers - 1:
                left = waiters()
                after_check = True
                if left != consumers - k - 1:
                    one_each = False
                    errors.append(f"after put {k}: {left} waiting, not {consumers - k - 1}")
        try:
            extra = out.get(timeout=0.2)
            one_each = False
            errors.append(f"an extra wake: {extra!r}")
        except queue.Empty:
            pass
    finally:
        for pipe in pipes:
            try:
                pipe.send(("stop",))
            except OSError:
                pass
        for proc in workers:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join(10)
        check.close()
    return {
        "consumers": consumers,
        "processes": procs,
        "arrivals_s": round(arrive_s, 2) if arrival_ok else None,
        "wake_p50_ms": pct(wakes, 0.5) * 1000,
        "wake_p99_ms": pct(wakes, 0.99) * 1000,
        "wake_max_ms": max(wakes, default=0.0) * 1000,
        "woken": woken,
        "wakes_timed": len(wakes),
        "fifo": fifo_ok and arrival_ok,
        "exactly_one_per_put": one_each,
        "ok": arrival_ok and fifo_ok and one_each and woken == consumers,
        "errors": errors[:5],
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


# -- servers --------------------------------------------------------------------------------------


@contextlib.contextmanager
def floor_server() -> Iterator[Target]:
    receiver, sender = CTX.Pipe(duplex=False)
    proc = CTX.Process(target=_floor_server, args=(sender,), daemon=True)
    proc.start()
    try:
        if not receiver.poll(30):
            raise RuntimeError("the floor server did not start")
        yield Target("floor", receiver.recv(), b"", proc.pid)
    finally:
        proc.terminate()
        proc.join(10)


@contextlib.contextmanager
def stock_server() -> Iterator[Target]:
    authkey = secrets.token_hex(16).encode()
    manager = StockManager(address=("127.0.0.1", 0), authkey=authkey, ctx=CTX)
    manager.start()
    try:
        yield Target("stock", manager.address, authkey, manager._process.pid)  # type: ignore[attr-defined]
    finally:
        manager.shutdown()


#: The running daemons by pid (their log lines tell of expired sessions).
DAEMONS: dict[int, Daemon] = {}


def daemon_warnings(pid: int) -> dict[str, Any]:
    """What the daemon logged above INFO: expired sessions counted, the rest sampled."""
    d = DAEMONS.get(pid)
    lines = [] if d is None else [line for line in d.lines if " INFO " not in line]
    expired = [line for line in lines if "expired" in line]
    others = [line for line in lines if "expired" not in line]
    return {"sessions_expired": len(expired), "other_warnings": len(others),
            "first_warnings": (expired[:2] + others[:3])}  # fmt: skip


@contextlib.contextmanager
def managerd_server(tmp: Path, env: dict[str, str] | None = None) -> Iterator[Target]:
    tmp.mkdir(parents=True, exist_ok=True)
    d = Daemon(tmp, env=env).start()
    assert d.proc is not None
    DAEMONS[d.proc.pid] = d
    try:
        yield Target("managerd", d.address, d.authkey, d.proc.pid)
    except BaseException:
        tail = "\n".join(d.lines[-40:])
        print(f"the daemon's last log lines:\n{tail}", file=sys.stderr, flush=True)
        raise
    finally:
        d.stop()


# -- the run --------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    try:
        import uvloop

        uvloop_version: str | None = uvloop.__version__
    except ImportError:
        uvloop_version = None
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "memory_gb": round(mem_kb / 2**20, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "uvloop": uvloop_version,
        "open_files_limit": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
    }


class Suite:
    def __init__(self, plan: Plan, only: set[str] | None) -> None:
        self.plan = plan
        self.only = only
        self.results: dict[str, dict[str, Any]] = {}
        self.failures: list[str] = []
        self.started = time.monotonic()

    def wanted(self, group: str) -> bool:
        return self.only is None or group in self.only

    def record(self, key: str, **fields: Any) -> None:
        self.results[key] = fields
        load = os.getloadavg()[0]
        shown = {k: fields.get(k) for k in ("floor", "stock", "managerd")}
        at = time.monotonic() - self.started
        print(
            f"  {at:6.1f}s {key:<28} {json.dumps(_rounded(shown))}  (load {load:.2f})", flush=True
        )
        if fields.get("ok") is False:
            self.failures.append(f"{key}: {json.dumps(_rounded(fields.get('details', {})))}")

    def run(self, tmp: Path) -> None:
        plan = self.plan
        with floor_server() as floor, stock_server() as stock, managerd_server(tmp / "main") as md:
            self.single_client(floor, stock, md)
            self.multi_process(stock, md)
            if self.wanted("connect"):
                ms = {
                    s.system: in_child(w_connect, s, plan.connect_tries) for s in (floor, stock, md)
                }
                self.record(
                    "connect_first_call_ms", unit="ms (median)", better="lower",
                    **{k: pct(v, 0.5) for k, v in ms.items()},
                    details={k: {"median_ms": pct(v, 0.5), "p90_ms": pct(v, 0.9),
                                 "max_ms": max(v), "tries": len(v)} for k, v in ms.items()},
                )  # fmt: skip
            if self.wanted("blocked"):
                self.blocked(stock, md)
            if self.wanted("imports"):
                r = run_imports(md)
                self.record("client_imports", unit="modules added, all stdlib", better="-",
                            managerd=r["modules_added"], ok=r["ok"], details=r)  # fmt: skip
        if self.wanted("loops"):
            self.event_loops(tmp)
        if self.wanted("idle"):
            self.idle(tmp)
        if self.wanted("many"):
            self.many(tmp)

    def compare(self, runs: dict[str, Callable[[], dict[str, Any]]]) -> dict[str, dict[str, Any]]:
        """Each run ``plan.rounds`` times, the systems in turn; the mean of the rounds.

        Taking turns spreads a burst of other work on the machine over all
        the systems instead of landing on one of them.
        """
        rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in runs}
        for _ in range(self.plan.rounds):
            for name, run in runs.items():
                rounds[name].append(run())
        return {name: mean_of(measured) for name, measured in rounds.items()}

    def single_client(self, floor: Target, stock: Target, md: Target) -> None:
        plan = self.plan
        ping: dict[str, Any] = {}
        if any(self.wanted(g) for g in ("floor", "noop", "dict", "lock")):
            r = self.compare({
                "floor": lambda: in_child(w_floor_echo, floor, 100, plan),
                "stock": lambda: in_child(w_noop, stock, "value", plan),
                "ping": lambda: in_child(w_noop, md, "ping", plan),
                "value": lambda: in_child(w_noop, md, "value", plan),
            })  # fmt: skip
            ping = r["floor"]
            self.record("floor_pingpong_100B", unit="round trips/s", better="higher",
                        floor=ping["rate"], details={"floor": ping})  # fmt: skip
            for which, label in (("ping", "noop_ping"), ("value", "noop_value_get")):
                self.record(label, unit="calls/s", better="higher", floor=ping["rate"],
                            stock=r["stock"]["rate"], managerd=r[which]["rate"],
                            details={"floor": ping, "stock": r["stock"],
                                     "managerd": r[which]})  # fmt: skip
        if self.wanted("putget"):
            for label, size in SIZES.items():
                r = self.compare({
                    "floor": lambda size=size: in_child(w_floor_putget, floor, size, plan),
                    "stock": lambda size=size: in_child(w_putget, stock, size, plan),
                    "managerd": lambda size=size: in_child(w_putget, md, size, plan),
                })  # fmt: skip
                self.record(f"queue_put_get_{label}", unit="pairs/s", better="higher",
                            **{k: v["rate"] for k, v in r.items()}, details=r)  # fmt: skip
                if label == "32KB":
                    # One call (a put, or a get) is one round trip of the 32 KB payload.
                    rt = {k: max(v["per_op_p50_us"]) / 1000 for k, v in r.items()}
                    p99 = {k: max(v["per_op_p99_us"]) / 1000 for k, v in r.items()}
                    self.record("roundtrip_32KB_ms", unit="ms per call (p50)", better="lower",
                                **rt, details={"p99_ms": p99})  # fmt: skip
        if self.wanted("putonly"):
            r = self.compare({
                "floor": lambda: in_child(w_floor_putget, floor, 100, plan, True),
                "stock": lambda: in_child(w_putget, stock, 100, plan, True),
                "managerd": lambda: in_child(w_putget, md, 100, plan, True),
            })  # fmt: skip
            self.record("put_only_100B", unit="puts/s", better="higher",
                        **{k: v["rate"] for k, v in r.items()}, details=r)  # fmt: skip
        if self.wanted("dict"):
            for op in ("set", "get"):
                r = self.compare({
                    "stock": lambda op=op: in_child(w_dict, stock, op, plan),
                    "managerd": lambda op=op: in_child(w_dict, md, op, plan),
                })  # fmt: skip
                self.record(f"dict_{op}", unit="ops/s", better="higher", floor=ping["rate"],
                            **{k: v["rate"] for k, v in r.items()}, details=r)  # fmt: skip
        if self.wanted("lock"):
            r = self.compare({
                "stock": lambda: in_child(w_lock, stock, plan),
                "managerd": lambda: in_child(w_lock, md, plan),
            })  # fmt: skip
            self.record("lock_uncontended", unit="pairs/s", better="higher",
                        floor=ping["rate"] / 2, **{k: v["rate"] for k, v in r.items()},
                        details=r)  # fmt: skip

    def multi_process(self, stock: Target, md: Target) -> None:
        plan = self.plan
        if self.wanted("lock"):
            r = self.compare({
                "stock": lambda: run_lock_contended(stock, 4, plan),
                "managerd": lambda: run_lock_contended(md, 4, plan),
            })  # fmt: skip
            self.record("lock_contended_4procs", unit="pairs/s (total)", better="higher",
                        **{k: v["rate"] for k, v in r.items()}, details=r)  # fmt: skip
        if self.wanted("mpmc"):
            for n in (2, 8):
                r = self.compare({
                    "stock": lambda n=n: run_mpmc(stock, n, n, plan),
                    "managerd": lambda n=n: run_mpmc(md, n, n, plan),
                })  # fmt: skip
                self.record(f"queue_{n}p{n}c_100B", unit="messages/s", better="higher",
                            **{k: v["rate"] for k, v in r.items()},
                            ok=r["stock"]["ok"] and r["managerd"]["ok"], details=r)  # fmt: skip
        if self.wanted("batch"):
            r = self.compare({
                "stock": lambda: run_pipe(stock, 1, plan),
                "single": lambda: run_pipe(md, 1, plan),
                "batch": lambda: run_pipe(md, BATCH, plan),
            })  # fmt: skip
            self.record("queue_1p1c_100B", unit="messages/s", better="higher",
                        stock=r["stock"]["rate"], managerd=r["single"]["rate"],
                        ok=r["stock"]["ok"] and r["single"]["ok"],
                        details={"stock": r["stock"], "managerd": r["single"]})  # fmt: skip
            self.record(f"batch_{BATCH}_1p1c_100B", unit="messages/s", better="higher",
                        stock=r["stock"]["rate"], managerd=r["batch"]["rate"], ok=r["batch"]["ok"],
                        details={"stock (single put/get)": r["stock"],
                                 "managerd": r["batch"]})  # fmt: skip

    def blocked(self, stock: Target, md: Target) -> None:
        plan = self.plan
        s = run_blocked(stock, plan.consumers, plan.consumer_procs, plan)
        m = run_blocked(md, plan.consumers, plan.consumer_procs, plan)
        self.record(f"blocked_get_{plan.consumers}_wake_ms", unit="ms (p50 put -> wake)",
                    better="lower", stock=s["wake_p50_ms"], managerd=m["wake_p50_ms"],
                    ok=s["ok"] and m["ok"], details={"stock": s, "managerd": m})  # fmt: skip

    def event_loops(self, tmp: Path) -> None:
        """m.ping() on a daemon per event loop, measured in turn (A, U, A, U): the mean."""
        plan = self.plan
        runs: dict[str, list[dict[str, Any]]] = {"asyncio": [], "uvloop": []}
        with contextlib.ExitStack() as stack:
            daemons = {
                loop: stack.enter_context(
                    managerd_server(tmp / loop, {"MANAGERD_EVENT_LOOP": loop})
                )
                for loop in runs
            }
            for _ in range(2):
                for loop, md in daemons.items():
                    runs[loop].append(in_child(w_noop, md, "ping", plan))
        for loop, measured in runs.items():
            rate = sum(r["rate"] for r in measured) / len(measured)
            self.record(f"noop_ping_{loop}", unit="calls/s (mean of 2)", better="higher",
                        managerd=rate, details={f"round {i + 1}": r for i, r in
                                                enumerate(measured)})  # fmt: skip

    def idle(self, tmp: Path) -> None:
        plan = self.plan
        with managerd_server(tmp / "idle") as md:
            m = run_idle(md, plan.idle_clients, plan.idle_procs, plan)
        with stock_server() as stock:
            s = run_idle(stock, plan.idle_clients, plan.idle_procs, plan)
        details = {"stock": s, "managerd": m}
        ok = m["connected"] == plan.idle_clients and m["alive_at_end"] == m["connected"]
        n = plan.idle_clients
        self.record(f"idle_{n}_server_rss_mb", unit="MB (VmRSS)", better="lower",
                    stock=s["server_rss_mb"], managerd=m["server_rss_mb"], ok=ok,
                    details=details)  # fmt: skip
        self.record(f"idle_{n}_other_call_p99_ms", unit="ms (p99)", better="lower",
                    stock=s["probe"]["p99_us"] / 1000, managerd=m["probe"]["p99_us"] / 1000,
                    details={k: v["probe"] for k, v in details.items()})  # fmt: skip

    def many(self, tmp: Path) -> None:
        """As many connections as the target: the probe and N - 1 idle sessions."""
        plan = self.plan
        with managerd_server(tmp / "many") as md:
            limit = open_files_limit(md.pid)
            m = run_idle(md, plan.many_connections - 1, plan.many_procs, plan)
        m["daemon_open_files_limit_at_start"] = limit
        m["accepted_with_probe"] = m["connected"] + 1
        self.record(f"connections_{plan.many_connections}_accepted", unit="sessions",
                    better="higher", managerd=m["connected"] + 1, details=m)  # fmt: skip


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 3) if abs(value) < 100 else round(value)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def ratios(results: dict[str, dict[str, Any]]) -> None:
    for r in results.values():
        md, stock, floor = r.get("managerd"), r.get("stock"), r.get("floor")
        r["managerd/stock"] = md / stock if md and stock else None
        r["managerd/floor"] = md / floor if md and floor else None


def targets(results: dict[str, dict[str, Any]], plan: Plan) -> list[dict[str, Any]]:
    """The issue's targets next to what was measured (None: not run)."""

    def get(key: str, field: str) -> Any:
        return results.get(key, {}).get(field)

    def t(what: str, measured: Any, met: bool | None) -> dict[str, Any]:
        return {"target": what, "measured": measured, "met": met}

    out = []
    for key in ("noop_ping", "noop_value_get"):
        f, s = get(key, "managerd/floor"), get(key, "managerd/stock")
        out.append(t(f"{key}: >= 0.8x floor", f, None if f is None else f >= 0.8))
        out.append(t(f"{key}: >= stock", s, None if s is None else s >= 1.0))
    c = get("connect_first_call_ms", "managerd")
    out.append(t("connect + first call < 5 ms (median)", c, None if c is None else c < 5))
    rt = get("roundtrip_32KB_ms", "managerd")
    out.append(t("32 KB round trip < 1 ms (p50)", rt, None if rt is None else rt < 1))
    r8 = get("queue_8p8c_100B", "managerd/stock")
    out.append(t("8 producers/8 consumers >= 2x stock", r8, None if r8 is None else r8 >= 2))
    b = get(f"batch_{BATCH}_1p1c_100B", "managerd")
    out.append(t("put_many/get_many >= 500,000 msgs/s", b, None if b is None else b >= 500_000))
    bs = get(f"batch_{BATCH}_1p1c_100B", "managerd/stock")
    out.append(t("put_many/get_many >= 30x stock single put/get", bs,
                 None if bs is None else bs >= 30))  # fmt: skip
    n = plan.idle_clients
    rss = get(f"idle_{n}_server_rss_mb", "managerd")
    out.append(t(f"{n} idle clients: daemon RSS < 150 MB", rss, None if rss is None else rss < 150))
    p99 = get(f"idle_{n}_other_call_p99_ms", "managerd")
    out.append(t(f"{n} idle clients: another call p99 < 2 ms", p99,
                 None if p99 is None else p99 < 2))  # fmt: skip
    acc = get(f"connections_{plan.many_connections}_accepted", "managerd")
    out.append(t(f"{plan.many_connections} connections accepted", acc,
                 None if acc is None else acc >= plan.many_connections))  # fmt: skip
    imp = get("client_imports", "ok")
    out.append(t("client pulls in no third-party module", imp, imp))
    return out


def print_table(results: dict[str, dict[str, Any]], goals: list[dict[str, Any]]) -> None:
    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, bool):
            return "yes" if v else "NO"
        if isinstance(v, float) and abs(v) < 10:
            return f"{v:.3f}" if abs(v) < 1 else f"{v:.2f}"
        return f"{v:,.0f}"

    head = f"{'workload':<32}{'unit':<26}{'floor':>11}{'stock':>11}{'managerd':>11}"
    print(f"\n{head}{'md/stock':>10}{'md/floor':>10}  better")
    for key, r in results.items():
        print(f"{key:<32}{r['unit']:<26}{fmt(r.get('floor')):>11}{fmt(r.get('stock')):>11}"
              f"{fmt(r.get('managerd')):>11}{fmt(r.get('managerd/stock')):>10}"
              f"{fmt(r.get('managerd/floor')):>10}  {r['better']}")  # fmt: skip
    print(f"\n{'per iteration: latency, CPU (µs), faults':<44}{'p50':>9}{'p99':>9}"
          f"{'server user+sys':>22}{'faults':>8}{'client user+sys':>22}{'faults':>8}")  # fmt: skip
    for key, r in results.items():
        for system, d in r.get("details", {}).items():
            if isinstance(d, dict) and "server_cpu_us_per_iter" in d:
                server = f"{d['server_user_us_per_iter']:.1f}+{d['server_sys_us_per_iter']:.1f}"
                client = f"{d['client_user_us_per_iter']:.1f}+{d['client_sys_us_per_iter']:.1f}"
                print(f"{key + ' ' + system:<44}{d['p50_us']:>9.1f}{d['p99_us']:>9.1f}"
                      f"{server:>22}{d['server_page_faults_per_iter']:>8.1f}"
                      f"{client:>22}{d['client_page_faults_per_iter']:>8.1f}")  # fmt: skip
    print(f"\n{'multi-process: CPU per message (µs)':<44}{'server':>9}{'all procs':>11}"
          f"{'server cores':>14}{'machine busy':>14}{'prod/cons cores':>17}")  # fmt: skip
    for key, r in results.items():
        for system, d in r.get("details", {}).items():
            if isinstance(d, dict) and "server_cpu_us_per_msg" in d:
                pc = (f"{d['producer_cores_busy']:.2f}/{d['consumer_cores_busy']:.2f}"
                      if "producer_cores_busy" in d else "-")  # fmt: skip
                print(f"{key + ' ' + system:<44}{d['server_cpu_us_per_msg']:>9.1f}"
                      f"{d['machine_cpu_us_per_msg']:>11.1f}{d['server_cores_busy']:>14.2f}"
                      f"{d['machine_busy_fraction']:>14.0%}{pc:>17}")  # fmt: skip
    print(f"\n{'target':<52}{'measured':>14}  met")
    for g in goals:
        print(f"{g['target']:<52}{fmt(g['measured']):>14}  {fmt(g['met'])}")


def main() -> int:
    global BATCH
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, help="per timed loop (default 2; 0.25 quick)")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke (CI)")
    parser.add_argument("--json", type=Path, help="write the figures as JSON here")
    parser.add_argument(
        "--only",
        help="comma-separated groups: floor,noop,putget,putonly,dict,lock,mpmc,batch,"
        "connect,blocked,imports,loops,idle,many",
    )
    parser.add_argument("--connections", type=int, help="the many-connections workload's count")
    parser.add_argument("--batch", type=int, default=BATCH, help="items per put_many/get_many")
    args = parser.parse_args()
    BATCH = args.batch
    plan = plan_for(args.quick, args.seconds)
    if args.connections:
        plan = dataclasses.replace(plan, many_connections=args.connections)
    only = set(args.only.split(",")) if args.only else None
    info = machine()
    load_start = os.getloadavg()
    print(f"machine: {json.dumps(info)}")
    print(f"plan: {plan}; load average at start {load_start}", flush=True)
    suite = Suite(plan, only)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="managerd-bench-") as tmp:
        suite.run(Path(tmp))
    ratios(suite.results)
    goals = targets(suite.results, plan)
    print_table(suite.results, goals)
    report = {
        "machine": info,
        "plan": plan.__dict__,
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "duration_s": round(time.monotonic() - started, 1),
        "workloads": _rounded(suite.results),
        "targets": _rounded(goals),
        "correctness_failures": suite.failures,
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nJSON written to {args.json}")
    else:
        print(json.dumps(report, indent=2))
    print(f"took {report['duration_s']}s; load average at end {report['load_average_end']}")
    for failure in suite.failures:
        print(f"CORRECTNESS FAILURE {failure}", file=sys.stderr)
    return 1 if suite.failures else 0


if __name__ == "__main__":
    sys.exit(main())
