"""A long fuzz run against a real daemon: how many inputs, how many crashes.

Two phases, both against ``managerd serve`` processes over real sockets:

1. **hypothesis** (``--hypothesis-examples N``): tests/test_hostile.py with
   ``MANAGERD_FUZZ_EXAMPLES=N`` (random bytes before authentication, random
   frames after it, lying length headers; each example followed by a
   well-behaved client's check), run by pytest; the examples are counted
   from ``--hypothesis-show-statistics``.
2. **mutation** (``--duration-s S``): this script's own loop. It first
   records the frames a real managerd client and a real stock client send
   while they use every type (so mutations start from requests that get deep
   into the daemon), then, until the time is up, opens one connection per
   input and sends one of: random bytes before authentication, a mutated
   handshake answer, or — after a valid handshake, in stock mode or after
   the managerd hello — one to three recorded requests mutated byte-wise
   (flips, inserts, deletes, splices, truncation, lying headers) or
   structure-wise (decoded, a field replaced by a hostile value — huge ints,
   NaN, long strings, unhashables, dunder method names, wrong types — and
   pickled again with a random protocol). It half-closes, reads until the
   daemon hangs up, and then a well-behaved client (holding a queue and a
   dict it checks every 200 inputs) must get an answer.

A **crash** is the daemon exiting or not answering the well-behaved client
(within ``--hang-s``); its signature is the input family, how it died and
the first line the daemon logged after the input. Each crash's input is
saved under ``--crash-dir`` and the daemon restarted. Reported too, not
counted as crashes: *internal errors* (tracebacks the daemon logged while it
kept serving, by signature), *memory spikes* (an input that raised the
daemon's peak RSS by over ``--spike-mb``; the peak is reset before each
input through ``/proc/PID/clear_refs``) and *stalls* (an input and the
canary's next ping took over a second); their inputs are saved as well.
The fuzzed daemon runs with an address-space limit (``--daemon-memory-mb``,
4 GiB) so that an input asking for tens of gigabytes fails inside it
instead of taking the machine down. It journals to a data directory
(``--fsync interval``); at the end it is restarted on it, and recovery must
bring the canary back.

Exit code 0 when there were no crashes. Usage::

    uv run python scripts/fuzz.py                              # ~8 minutes
    uv run python scripts/fuzz.py --hypothesis-examples 0 --duration-s 60 --seed 7
    uv run python scripts/fuzz.py --replay fuzz-crashes/spike-1-managerd-bytes.pickle
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing.connection as mpc
import os
import pickle
import random
import re
import secrets
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.managers import (
    AcquirerProxy,
    BaseManager,
    DictProxy,
    EventProxy,
    ListProxy,
    ValueProxy,
)
from pathlib import Path
from typing import Any

from managerd_client import Manager, ManagerdError, connect
from managerd_client.wire import (
    CHALLENGE,
    WELCOME,
    FrameSocket,
    client_handshake,
    create_response,
)

ROOT = Path(__file__).resolve().parent.parent
READY = re.compile(r"managerd serving on (\S+):(\d+)")
RID = struct.Struct("!Q")
CANARY_Q, CANARY_D = "canary.q", "canary.d"
CANARY_ITEMS = ["a", "b", "c"]
CANARY_VALUE = {"k": [1, 2, 3]}
LIMIT_AND_EXEC = (
    "import os, resource, sys; n = int(sys.argv[1]); "
    "resource.setrlimit(resource.RLIMIT_AS, (n, n)); os.execv(sys.argv[2], sys.argv[2:])"
)


# -- the daemon ----------------------------------------------------------------------------------


class Daemon:
    """``managerd serve`` on an ephemeral port; its log is scanned for tracebacks."""

    def __init__(self, data_dir: Path, authkey: str, memory_mb: int = 0) -> None:
        self.data_dir = data_dir
        self.authkey = authkey.encode()
        # No failed-handshake penalty: every fuzzed input must reach the handshake.
        env = dict(
            os.environ, MANAGERD_AUTHKEY=authkey, PYTHONUNBUFFERED="1",
            MANAGERD_AUTH_FAILURE_LIMIT="0",
        )  # fmt: skip
        cmd = [
            sys.executable, "-m", "managerd", "serve", "--host", "127.0.0.1", "--port", "0",
            "--data-dir", str(data_dir), "--fsync", "interval",
        ]  # fmt: skip
        if memory_mb:
            # Set the limit in the child, then exec the daemon (no preexec_fn with threads).
            cmd = [sys.executable, "-c", LIMIT_AND_EXEC, str(memory_mb * 1024 * 1024), *cmd]
        self.proc = subprocess.Popen(
            cmd, env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip
        self.port = 0
        self.lines = 0
        self.tail: list[str] = []
        #: Traceback signatures the daemon logged while serving, and how often.
        self.internal_errors: Counter[str] = Counter()
        ready = threading.Event()
        self._reader = threading.Thread(target=self._pump, args=(ready,), daemon=True)
        self._reader.start()
        if not ready.wait(30) or not self.port:
            self.kill()
            raise RuntimeError("managerd did not start:\n" + "\n".join(self.tail))

    def _pump(self, ready: threading.Event) -> None:
        assert self.proc.stdout is not None
        in_traceback = False
        frames: list[str] = []
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines += 1
            self.tail = [*self.tail[-200:], line]
            if not self.port:
                m = READY.search(line)
                if m:
                    self.port = int(m.group(2))
                    ready.set()
            if line.startswith("Traceback (most recent call last):"):
                in_traceback, frames = True, []
            elif in_traceback and line.startswith("  File "):
                frames.append(re.sub(r", line \d+", "", line.strip()))
            elif in_traceback and not line.startswith(" "):
                in_traceback = False
                where = frames[-1] if frames else "?"
                self.internal_errors[f"{line.strip()[:160]}  @ {where}"] += 1
        ready.set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_kb(self, field: str = "VmRSS") -> int:
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return 0
        return int(next((ln.split()[1] for ln in status.splitlines() if field in ln), 0))

    def reset_peak(self) -> bool:
        """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5); False if not allowed."""
        try:
            Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")
        except OSError:
            return False
        return True

    def stop(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)


# -- the corpus: frames real clients send ----------------------------------------------------------


@dataclass
class Corpus:
    stock: list[bytes] = field(default_factory=list)  # stock-mode request frames
    envelopes: list[bytes] = field(default_factory=list)  # managerd <rid><pickle> frames
    hello: bytes = b""
    methods: set[str] = field(default_factory=set)
    names: set[str] = field(default_factory=set)


def _is_handshake(frame: bytes) -> bool:
    return (
        frame.startswith((CHALLENGE, WELCOME, b"#FAILURE#", b"{"))
        or len(frame) in (16, 20)
        or not frame
    )


def _quietly(*calls: Callable[[], Any]) -> None:
    for call in calls:
        try:
            call()
        except Exception:
            pass  # a step the API refuses is still a recorded request


def _managerd_workload(m: Manager) -> None:
    q = m.Queue("fuzz.q", 100)
    jq = m.JoinableQueue("fuzz.jq")
    d, lst, ns = m.dict("fuzz.d"), m.list("fuzz.l"), m.Namespace("fuzz.ns")
    v, arr = m.Value("fuzz.v", "i", 0), m.Array("fuzz.a", "d", 4)
    lock, rlock = m.Lock("fuzz.lock"), m.RLock("fuzz.rlock")
    sem, bsem = m.Semaphore("fuzz.sem", 2), m.BoundedSemaphore("fuzz.bsem", 1)
    ev, cond, bar = m.Event("fuzz.ev"), m.Condition("fuzz.cond"), m.Barrier("fuzz.bar", 1)
    p0, p1 = m.Pipe("fuzz.p")

    def reserve_ack() -> None:
        q.reserve(timeout=0.01).ack()

    def reserve_nack() -> None:
        q.reserve(timeout=0.01).nack()

    def cond_cycle() -> None:
        with cond:
            cond.notify_all()
            cond.wait(0.001)

    _quietly(
        lambda: q.put({"a": [1, 2]}), lambda: q.put_nowait(3), lambda: q.get(timeout=0.01),
        lambda: q.get_nowait(), lambda: q.put_many([1, 2, 3]), lambda: q.get_many(2),
        q.qsize, q.empty, q.full, lambda: q.put(4), reserve_ack, lambda: q.put(5), reserve_nack,
        lambda: jq.put(1), lambda: jq.get(timeout=0.01), jq.task_done, lambda: jq.join(0.01),
        lambda: d.__setitem__("k", 1), lambda: d.__setitem__((1, 2), [3]), lambda: d["k"],
        lambda: d.get("k"), lambda: d.pop("k"), lambda: d.update({"x": 1}), d.keys, d.items,
        d.values, d.__len__, lambda: "x" in d, lambda: d.setdefault("s", 2), d.popitem,
        lambda: d.get_many(["x", "y"]), d.copy, d.clear,
        lambda: lst.append(1), lambda: lst.extend([3, 2]), lambda: lst.insert(0, 9),
        lambda: lst.index(3), lambda: lst.count(1), lst.sort, lst.reverse, lambda: lst[0],
        lambda: lst.__setitem__(0, 5), lambda: lst.__delitem__(0), lst.pop,
        lambda: lst.remove(3), lst.__len__, lst.copy, lambda: lst.__imul__(2), lst.clear,
        lambda: setattr(ns, "x", 1), lambda: ns.x, lambda: delattr(ns, "x"),
        lambda: setattr(v, "value", 3), lambda: v.value,
        lambda: arr.__setitem__(0, 1.5), lambda: arr[:2], arr.__len__,
        lambda: lock.acquire(timeout=0.01), lock.release, lambda: rlock.acquire(timeout=0.01),
        rlock.release, lambda: sem.acquire(timeout=0.01), sem.release,
        lambda: bsem.acquire(timeout=0.01), bsem.release,
        ev.set, ev.is_set, ev.clear, lambda: ev.wait(0.001), cond_cycle,
        lambda: bar.wait(1), lambda: bar.parties, bar.reset, bar.abort,
        lambda: p0.send("hi"), lambda: p1.poll(0), lambda: p1.recv(timeout=0.01),
        m.objects, m.status, m.ping, lambda: m.delete("fuzz.nothing"),
    )  # fmt: skip


class _Stock(BaseManager):
    pass


for _typeid, _proxy in (
    ("Queue", None), ("dict", DictProxy), ("list", ListProxy), ("Lock", AcquirerProxy),
    ("Event", EventProxy), ("Value", ValueProxy),
):  # fmt: skip
    _Stock.register(_typeid, proxytype=_proxy)


def _stock_workload(address: tuple[str, int], authkey: bytes) -> None:
    m = _Stock(address=address, authkey=authkey)
    m.connect()
    q = m.Queue("fuzz.sq")  # type: ignore[attr-defined]
    d = m.dict("fuzz.sd")  # type: ignore[attr-defined]
    lst = m.list("fuzz.sl")  # type: ignore[attr-defined]
    lock, ev = m.Lock("fuzz.slock"), m.Event("fuzz.sev")  # type: ignore[attr-defined]
    v = m.Value("fuzz.sv", "i", 1)  # type: ignore[attr-defined]
    _quietly(
        lambda: q.put((1, "two")), q.qsize, lambda: q.get(timeout=0.01),
        lambda: d.__setitem__("k", {1, 2}), lambda: d["k"], d.keys, lambda: d.pop("k"),
        lambda: lst.append(b"x"), lambda: lst[0], lst.__len__,
        lock.acquire, lock.release, ev.set, lambda: ev.wait(0.001), lambda: v.set(2), v.get,
        lambda: m._number_of_objects(),  # type: ignore[attr-defined]
    )  # fmt: skip


def record_corpus(daemon: Daemon) -> Corpus:
    """The frames a managerd client and a stock client send while using every type."""
    sent: list[bytes] = []
    original_frame = FrameSocket.send_frame
    original_bytes = mpc.Connection._send_bytes  # type: ignore[attr-defined]

    def frame_spy(self: FrameSocket, body: bytes) -> None:
        sent.append(bytes(body))
        original_frame(self, body)

    def bytes_spy(self: Any, buf: Any) -> None:
        sent.append(bytes(buf))
        original_bytes(self, buf)

    FrameSocket.send_frame = frame_spy  # type: ignore[method-assign]
    mpc.Connection._send_bytes = bytes_spy  # type: ignore[attr-defined]
    try:
        with connect(daemon.address, authkey=daemon.authkey) as m:
            _managerd_workload(m)
        _stock_workload(("127.0.0.1", daemon.port), daemon.authkey)
    finally:
        FrameSocket.send_frame = original_frame  # type: ignore[method-assign]
        mpc.Connection._send_bytes = original_bytes  # type: ignore[attr-defined]

    corpus = Corpus()
    for frame in sent:
        if _is_handshake(frame):
            continue
        if frame[8:10] == b"\x80\x05":
            try:
                _typeid, name, method, _args, _thread = pickle.loads(frame[8:])
            except Exception:
                continue
            corpus.envelopes.append(frame)
            corpus.methods.add(str(method))
            if isinstance(name, str):
                corpus.names.add(name)
            continue
        try:
            request = pickle.loads(frame)
        except Exception:
            continue
        if isinstance(request, tuple) and len(request) == 4 and request[1] == "managerd_hello":
            corpus.hello = frame
        elif isinstance(request, tuple) and len(request) == 4:
            corpus.stock.append(frame)
            corpus.methods.add(str(request[1]))
    if not (corpus.stock and corpus.envelopes and corpus.hello):
        raise RuntimeError("recording the corpus failed: the clients sent nothing usable")
    return corpus


# -- mutations -----------------------------------------------------------------------------------

HOSTILE_METHODS = [
    "__reduce__", "__reduce_ex__", "__class__", "__init__", "__getattribute__", "__dict__",
    "__del__", "__setattr__", "_callmethod", "shutdown", "accept_connection", "incref",
    "decref", "debug_info", "number_of_objects", "dummy", "create", "get_methods",
    "managerd_hello", "", "\x00", "é" * 50, "x" * 10_000,
]  # fmt: skip
TYPEIDS = [
    "Queue", "JoinableQueue", "dict", "list", "Namespace", "Value", "Array", "Lock", "RLock",
    "Semaphore", "BoundedSemaphore", "Event", "Condition", "Barrier", "Pipe", "Pool",
    "Iterator", "", None,
]  # fmt: skip
OPCODES = [bytes([b]) for b in b"()]}.0123456789NIJKLMRSTUVX\x80\x81\x85\x86\x87\x8c\x94\x95"]


def hostile_values(rng: random.Random) -> list[Any]:
    n = rng.randrange(0, 300)
    return [
        0, -1, 1, 2**31, 2**63, -(2**63), 2**64 + 1, 10**300, 1e308, float("inf"),
        float("-inf"), float("nan"), -0.0, True, None, "", "x" * rng.choice((1, 255, 5000)),
        "\x00\ud800"[: rng.randrange(1, 2)], "fuzz.q", rng.choice(TYPEIDS), b"",
        os.urandom(n), pickle.dumps(os.urandom(8)), bytearray(b"ba"), [], {}, (), [[[]]],
        {"k": [1]}, {1: 2}, {(): None}, [None] * n, tuple(range(n)), set(), frozenset({1, 2}),
        range(n), slice(1, None, n), complex(1, -2), {"maxsize": -5}, {"parties": 0},
        {"typecode": "Z"}, {"value": "bad"}, {"duplex": "yes"}, {"lock": "fuzz.q"},
    ]  # fmt: skip


def mutate_value(rng: random.Random, value: Any, corpus: Corpus) -> Any:
    """``value`` with one part replaced by something hostile (a container is entered)."""
    if isinstance(value, tuple) and value and rng.random() < 0.7:
        items = list(value)
        i = rng.randrange(len(items))
        choice = rng.random()
        if choice < 0.6:
            items[i] = mutate_value(rng, items[i], corpus)
        elif choice < 0.75:
            del items[i]
        elif choice < 0.9:
            items.insert(i, rng.choice(hostile_values(rng)))
        else:
            items = items + items
        return tuple(items)
    if isinstance(value, str) and rng.random() < 0.5:
        pool = sorted(corpus.methods) + HOSTILE_METHODS + sorted(corpus.names) + TYPEIDS[:-1]
        return rng.choice(pool)
    if isinstance(value, dict) and value and rng.random() < 0.5:
        out = dict(value)
        key = rng.choice(list(out))
        out[key] = rng.choice(hostile_values(rng))
        return out
    return rng.choice(hostile_values(rng))


def repickle(rng: random.Random, value: Any) -> bytes:
    try:
        return pickle.dumps(value, rng.randrange(0, pickle.HIGHEST_PROTOCOL + 1))
    except Exception:
        return pickle.dumps(repr(value)[:100])


def mutate_bytes(rng: random.Random, data: bytes, corpus: Corpus) -> bytes:
    """Byte-level damage, one to four times."""
    buf = bytearray(data)
    for _ in range(rng.randrange(1, 5)):
        op = rng.randrange(8)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:  # flip bits
            i = min(pos, len(buf) - 1)
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:  # a random byte
            buf[min(pos, len(buf) - 1)] = rng.randrange(256)
        elif op == 2:  # insert random bytes or an opcode
            ins = rng.choice(OPCODES) if rng.random() < 0.5 else os.urandom(rng.randrange(1, 9))
            buf[pos:pos] = ins
        elif op == 3 and buf:  # delete a range
            del buf[pos : pos + rng.randrange(1, 9)]
        elif op == 4 and buf:  # duplicate a range
            buf[pos:pos] = buf[pos : pos + rng.randrange(1, 33)]
        elif op == 5:  # truncate
            del buf[pos:]
        elif op == 6:  # splice another recorded frame
            other = rng.choice(corpus.stock + corpus.envelopes)
            cut = rng.randrange(len(other) + 1)
            buf[pos:] = other[cut:]
        elif op == 7 and len(buf) >= 4:  # an interesting 4-byte integer
            i = rng.randrange(len(buf) - 3)
            buf[i : i + 4] = struct.pack(
                "<i", rng.choice((0, -1, 1, 2**31 - 1, -(2**31), 255, 65536))
            )
    return bytes(buf)


def _header(body: bytes) -> bytes:
    return struct.pack("!i", len(body))


# -- one input -----------------------------------------------------------------------------------

FAMILIES = {
    "preauth-random": 5,
    "preauth-mutated": 5,
    "stock-bytes": 18,
    "stock-struct": 20,
    "managerd-bytes": 20,
    "managerd-struct": 27,
    "stream": 5,
}


@dataclass
class Input:
    family: str
    preauth: bytes = b""  # raw bytes sent right after the challenge (no handshake)
    hello: bool = False
    frames: list[bytes] = field(default_factory=list)  # whole frames, headers included


def make_input(rng: random.Random, corpus: Corpus, authkey: bytes) -> Input:
    family = rng.choices(list(FAMILIES), weights=list(FAMILIES.values()))[0]
    inp = Input(family)
    count = rng.randrange(1, 4)
    if family == "preauth-random":
        inp.preauth = os.urandom(rng.randrange(0, 600))
    elif family == "preauth-mutated":
        answer = create_response(authkey, CHALLENGE + b"{sha256}" + os.urandom(40))
        body = mutate_bytes(rng, answer, corpus)
        inp.preauth = _header(body) + body
    elif family == "stock-bytes":
        for _ in range(count):
            body = mutate_bytes(rng, rng.choice(corpus.stock), corpus)
            inp.frames.append(_header(body) + body)
    elif family == "stock-struct":
        for _ in range(count):
            request = pickle.loads(rng.choice(corpus.stock))
            body = repickle(rng, mutate_value(rng, request, corpus))
            inp.frames.append(_header(body) + body)
    elif family == "managerd-bytes":
        inp.hello = True
        for _ in range(count):
            body = mutate_bytes(rng, rng.choice(corpus.envelopes), corpus)
            inp.frames.append(_header(body) + body)
    elif family == "managerd-struct":
        inp.hello = True
        for _ in range(count):
            frame = rng.choice(corpus.envelopes)
            rid = frame[:8] if rng.random() < 0.9 else os.urandom(rng.choice((0, 4, 8)))
            body = rid + repickle(rng, mutate_value(rng, pickle.loads(frame[8:]), corpus))
            inp.frames.append(_header(body) + body)
    else:  # stream: frames whose headers lie
        inp.hello = rng.random() < 0.5
        pool = corpus.envelopes if inp.hello else corpus.stock
        stream = b"".join(_header(f) + f for f in rng.sample(pool, min(count, len(pool))))
        inp.frames.append(mutate_bytes(rng, stream, corpus))
    return inp


def send_input(daemon: Daemon, corpus: Corpus, inp: Input, timeout_s: float) -> str:
    """Send one input on a fresh connection; how the daemon ended it ('eof', 'reset', 'timeout')."""
    sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=timeout_s)
    fs = FrameSocket(sock)
    try:
        try:
            if inp.family.startswith("preauth"):
                fs.recv_frame()
                sock.sendall(inp.preauth)
            else:
                client_handshake(fs, daemon.authkey)
                if inp.hello:
                    fs.send_frame(corpus.hello)
                    fs.recv_frame()
                for frame in inp.frames:
                    sock.sendall(frame)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
            return "eof"
        except TimeoutError:
            return "timeout"
        except (ConnectionError, EOFError, PermissionError):
            return "reset"
        except OSError:
            return "reset"
    finally:
        fs.close()


# -- the canary ----------------------------------------------------------------------------------


def canary(daemon: Daemon) -> Manager:
    m = connect(daemon.address, authkey=daemon.authkey, connect_timeout_s=10)
    q = m.Queue(CANARY_Q)
    if q.qsize() == 0:
        q.put_many(CANARY_ITEMS)
        m.dict(CANARY_D).update(CANARY_VALUE)
    return m


def canary_intact(m: Manager) -> bool:
    return m.Queue(CANARY_Q).qsize() == len(CANARY_ITEMS) and dict(
        m.dict(CANARY_D).items()
    ) == dict(CANARY_VALUE)


def answers(m: Manager, daemon: Daemon, hang_s: float) -> bool:
    """Whether the daemon answers the canary's ping within ``hang_s``."""
    result: list[bool] = []

    def ping() -> None:
        try:
            m.ping()
            result.append(True)
        except (ManagerdError, OSError):
            result.append(False)

    t = threading.Thread(target=ping, daemon=True)
    t.start()
    t.join(hang_s)
    return bool(result and result[0]) and daemon.alive()


# -- phases --------------------------------------------------------------------------------------


def run_hypothesis(examples: int) -> tuple[int, int, int]:
    """(examples tried, failing tests, exit code) of tests/test_hostile.py with more examples."""
    env = dict(os.environ, MANAGERD_FUZZ_EXAMPLES=str(examples))
    cmd = [
        sys.executable, "-m", "pytest", "tests/test_hostile.py", "-q", "-p", "no:cacheprovider",
        "--hypothesis-show-statistics", "-o", "timeout=3600",
    ]  # fmt: skip
    print("phase 1:", f"MANAGERD_FUZZ_EXAMPLES={examples}", " ".join(cmd[1:]), flush=True)
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    tried = sum(
        int(a) + int(b) + int(c)
        for a, b, c in re.findall(
            r"(\d+) passing, (\d+) failing, and (\d+) invalid test cases", done.stdout
        )
    )
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr
    failed = re.search(r"(\d+) failed", summary)
    plain = re.search(r"(\d+) passed", summary)
    # The non-hypothesis tests of the file (crafted pickles) are inputs too.
    parametrized = len(re.findall(r"Stopped because", done.stdout))
    tried += max(0, (int(plain.group(1)) if plain else 0) - parametrized)
    print(f"  {summary}", flush=True)
    if done.returncode != 0:
        print(done.stdout[-4000:], done.stderr[-2000:], sep="\n")
    return tried, int(failed.group(1)) if failed else 0, done.returncode


@dataclass
class Stats:
    inputs: int = 0
    frames: int = 0
    by_family: Counter[str] = field(default_factory=Counter)
    endings: Counter[str] = field(default_factory=Counter)
    crashes: dict[str, int] = field(default_factory=dict)
    canary_damage: int = 0
    internal_errors: Counter[str] = field(default_factory=Counter)
    #: Inputs after which the canary's ping took over a second, by family.
    stalls: Counter[str] = field(default_factory=Counter)
    #: Inputs that raised the daemon's peak RSS by over --spike-mb, by family; the largest.
    spikes: Counter[str] = field(default_factory=Counter)
    largest_spike_mb: int = 0
    peak_tracking: bool = True


def _logged_since(daemon: Daemon, mark: int) -> str:
    """The first line the daemon logged after line ``mark``, without time and peer port."""
    new = daemon.lines - mark
    lines = daemon.tail[-new:] if 0 < new <= len(daemon.tail) else []
    first = next((ln for ln in lines if ln and not ln.startswith(" ")), "(nothing logged)")
    first = re.sub(r"^\d{4}-\d\d-\d\d [\d:,]+ ", "", first)
    return re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", first)[:160]


def _save(crash_dir: Path, kind: str, n: int, inp: Input) -> Path:
    crash_dir.mkdir(parents=True, exist_ok=True)
    path = crash_dir / f"{kind}-{n}-{inp.family}.pickle"
    path.write_bytes(pickle.dumps(inp))
    return path


def run_mutation(args: argparse.Namespace, workdir: Path) -> Stats:
    rng = random.Random(args.seed)
    authkey = secrets.token_hex(16)
    stats = Stats()
    crash_dir = Path(args.crash_dir)
    data_dir = workdir / "data"
    daemon = Daemon(data_dir, authkey, args.daemon_memory_mb)
    corpus = record_corpus(daemon)
    print(
        f"phase 2: mutation fuzzing for {args.duration_s:.0f}s (seed {args.seed}); corpus "
        f"{len(corpus.stock)} stock and {len(corpus.envelopes)} managerd requests, "
        f"{len(corpus.methods)} methods; daemon address space limited to "
        f"{args.daemon_memory_mb} MiB",
        flush=True,
    )
    m = canary(daemon)
    start_rss = daemon.rss_kb()
    peak_rss = start_rss
    deadline = time.monotonic() + args.duration_s
    next_report = time.monotonic() + 30
    saved = itertools.count(1)
    while time.monotonic() < deadline:
        inp = make_input(rng, corpus, daemon.authkey)
        stats.inputs += 1
        stats.frames += len(inp.frames) or 1
        stats.by_family[inp.family] += 1
        mark = daemon.lines
        stats.peak_tracking = daemon.reset_peak() and stats.peak_tracking
        rss_before = daemon.rss_kb()
        t0 = time.monotonic()
        try:
            ending = send_input(daemon, corpus, inp, args.hang_s)
        except OSError as exc:  # could not even connect
            ending = f"connect failed: {exc.strerror or exc}"
        stats.endings[ending.split(":")[0]] += 1
        ok = answers(m, daemon, args.hang_s)
        if ok:
            spike_mb = (daemon.rss_kb("VmHWM") - rss_before) // 1024
            spiked = stats.peak_tracking and spike_mb > args.spike_mb
            stalled_s = time.monotonic() - t0
            if spiked or stalled_s > 1.0:
                path = _save(crash_dir, "spike" if spiked else "stall", next(saved), inp)
                print(
                    f"  {inp.family}: +{spike_mb} MiB peak RSS, {stalled_s:.1f}s ({path})",
                    flush=True,
                )
            if spiked:
                stats.spikes[inp.family] += 1
                stats.largest_spike_mb = max(stats.largest_spike_mb, spike_mb)
            if stalled_s > 1.0:
                stats.stalls[inp.family] += 1
        if ok and stats.inputs % 200 == 0:
            if not canary_intact(m):
                stats.canary_damage += 1
                print(f"  canary damaged after input {stats.inputs} ({inp.family})", flush=True)
                m.delete(CANARY_Q)
                m.delete(CANARY_D)
                m.close()
                m = canary(daemon)
            for name, _type in m.objects():
                if not name.startswith("canary."):
                    m.delete(name)  # keep what the fuzz creates from piling up
            peak_rss = max(peak_rss, daemon.rss_kb())
        if ok:
            if time.monotonic() > next_report:
                next_report = time.monotonic() + 30
                print(
                    f"  {stats.inputs:,} inputs, {len(stats.crashes)} crashes, "
                    f"{sum(daemon.internal_errors.values())} internal errors, "
                    f"RSS {daemon.rss_kb() // 1024} MiB",
                    flush=True,
                )
            continue
        # A crash: the daemon exited, or stopped answering.
        code = daemon.proc.poll()
        how = "hang" if code is None else f"exited with code {code}"
        daemon.kill()  # a hung one; an exited one is only reaped
        signature = f"{inp.family}: {how}: {_logged_since(daemon, mark)}"
        stats.crashes[signature] = stats.crashes.get(signature, 0) + 1
        path = _save(crash_dir, "crash", next(saved), inp)
        print(f"  CRASH: {signature} (input saved to {path})", flush=True)
        stats.internal_errors.update(daemon.internal_errors)
        m.close()
        daemon.stop()
        data_dir = workdir / f"data-{next(saved)}"
        daemon = Daemon(data_dir, authkey, args.daemon_memory_mb)
        m = canary(daemon)

    peak_rss = max(peak_rss, daemon.rss_kb())
    m.close()
    # Restart on the data directory: what was journaled under fuzz must recover.
    daemon.stop()
    stats.internal_errors.update(daemon.internal_errors)
    again = Daemon(data_dir, authkey, args.daemon_memory_mb)
    try:
        with connect(again.address, authkey=again.authkey) as m2:
            recovered = canary_intact(m2)
    finally:
        again.stop()
    stats.internal_errors.update(again.internal_errors)
    print(
        f"  daemon RSS: {start_rss // 1024} MiB at start, {peak_rss // 1024} MiB at most "
        f"(between inputs); restart on the fuzzed data directory: "
        f"{'recovered' if recovered else 'FAILED'}",
        flush=True,
    )
    if not recovered:
        stats.crashes["recovery after fuzzing failed"] = 1
    return stats


def replay(paths: list[str], memory_mb: int) -> int:
    """Send saved inputs to a fresh daemon, one by one; print what each did."""
    with tempfile.TemporaryDirectory(prefix="managerd-replay-") as tmp:
        daemon = Daemon(Path(tmp) / "data", secrets.token_hex(16), memory_mb)
        try:
            corpus = record_corpus(daemon)  # for the hello frame
            m = canary(daemon)
            for path in paths:
                inp: Input = pickle.loads(Path(path).read_bytes())
                mark = daemon.lines
                daemon.reset_peak()
                before = daemon.rss_kb()
                t0 = time.monotonic()
                ending = send_input(daemon, corpus, inp, 60.0)
                ok = answers(m, daemon, 60.0)
                print(
                    f"{path}: {inp.family}, {len(inp.frames)} frames; connection {ending}; "
                    f"{time.monotonic() - t0:.2f}s; peak RSS "
                    f"+{(daemon.rss_kb('VmHWM') - before) // 1024} MiB; daemon "
                    f"{'answers' if ok else 'DOES NOT ANSWER'}; logged: "
                    f"{_logged_since(daemon, mark)}",
                    flush=True,
                )
                if not ok:
                    return 1
            m.close()
        finally:
            daemon.stop()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hypothesis-examples", type=int, default=3000,
                        help="examples per hypothesis test in phase 1 (0: skip)")  # fmt: skip
    parser.add_argument("--duration-s", type=float, default=420.0,
                        help="length of the mutation phase (0: skip)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=None, help="random seed of phase 2")
    parser.add_argument("--hang-s", type=float, default=10.0,
                        help="no answer for this long is a hang (a crash)")  # fmt: skip
    parser.add_argument("--crash-dir", default=str(ROOT / "fuzz-crashes"),
                        help="where crashing (and stalling, spiking) inputs are saved")  # fmt: skip
    parser.add_argument("--daemon-memory-mb", type=int, default=4096,
                        help="RLIMIT_AS of the fuzzed daemon (0: none)")  # fmt: skip
    parser.add_argument("--spike-mb", type=int, default=64,
                        help="report an input that raises the daemon's peak RSS more")  # fmt: skip
    parser.add_argument("--replay", nargs="+", metavar="FILE",
                        help="only send these saved inputs to a fresh daemon")  # fmt: skip
    args = parser.parse_args()
    if args.replay:
        return replay(args.replay, args.daemon_memory_mb)
    if args.seed is None:
        args.seed = secrets.randbelow(2**32)
    started = time.monotonic()

    h_tried = h_failed = 0
    h_code = 0
    if args.hypothesis_examples > 0:
        h_tried, h_failed, h_code = run_hypothesis(args.hypothesis_examples)
    stats = Stats()
    if args.duration_s > 0:
        with tempfile.TemporaryDirectory(prefix="managerd-fuzz-") as tmp:
            stats = run_mutation(args, Path(tmp))

    total_s = time.monotonic() - started
    print()
    print(f"fuzz run: {total_s:.0f}s")
    if args.hypothesis_examples > 0:
        print(
            f"  hypothesis suite: {h_tried:,} inputs, {h_failed} failing tests "
            f"(pytest exit {h_code})"
        )
    if args.duration_s > 0:
        families = ", ".join(f"{k} {v:,}" for k, v in sorted(stats.by_family.items()))
        endings = ", ".join(f"{k} {v:,}" for k, v in sorted(stats.endings.items()))
        print(f"  mutation: {stats.inputs:,} inputs ({stats.frames:,} frames): {families}")
        print(f"  connections ended by the daemon: {endings}")
        print(f"  canary damaged: {stats.canary_damage}")
        stalls = ", ".join(f"{k} {v}" for k, v in sorted(stats.stalls.items())) or "none"
        print(f"  stalls (an input and the canary's next ping took over 1s): {stalls}")
        if stats.peak_tracking:
            spikes = ", ".join(f"{k} {v}" for k, v in sorted(stats.spikes.items())) or "none"
            print(
                f"  memory spikes over {args.spike_mb} MiB from one input: {spikes}"
                + (f" (largest +{stats.largest_spike_mb} MiB)" if stats.spikes else "")
            )
        else:
            print("  memory spikes: not tracked (cannot write /proc/PID/clear_refs)")
    crashes = len(stats.crashes) + h_failed
    print(f"  inputs tried: {h_tried + stats.inputs:,}")
    print(f"  distinct daemon crashes: {crashes}")
    for signature, n in sorted(stats.crashes.items()):
        print(f"    {n}x {signature}")
    print(f"  distinct internal errors logged (daemon kept serving): {len(stats.internal_errors)}")
    for signature, n in stats.internal_errors.most_common():
        print(f"    {n:,}x {signature}")
    return 0 if crashes == 0 and h_code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
