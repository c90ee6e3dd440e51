"""The systems under test: the raw floor, a stock manager, managerd daemons; Target and Client.

A ``Target`` is what a worker needs to reach one system (it crosses a
fork, so it holds plain values); ``Client`` gives stock and managerd the
same calls.
"""

from __future__ import annotations

import contextlib
import os
import queue
import secrets
import socket
import struct
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.managers import (  # type: ignore[attr-defined]
    AcquirerProxy,
    BaseManager,
    DictProxy,
    ValueProxy,
)
from multiprocessing.managers import Value as StockValue  # type: ignore[attr-defined]
from pathlib import Path
from typing import Any

from managerd_client import connect

from bench.plan import CTX
from conftest import Daemon

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
    #: The name in the report: the system's, or "managerd@<rev>" for another checkout's daemon.
    label: str = ""

    @property
    def name(self) -> str:
        return self.label or self.system


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


# -- servers --------------------------------------------------------------------------------------


@contextlib.contextmanager
def floor_server() -> Iterator[Target]:
    receiver, sender = CTX.Pipe(duplex=False)
    proc = CTX.Process(target=_floor_server, args=(sender,), daemon=True)
    proc.start()
    try:
        if not receiver.poll(30):
            raise RuntimeError("the floor server did not start")
        assert proc.pid is not None  # started
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


@dataclass(frozen=True)
class Checkout:
    """Another checkout of the repository (a git worktree), whose daemon is measured too.

    Its daemon runs that checkout's ``managerd`` package: with its own
    ``.venv/bin/python`` when it has one (its dependencies, e.g. uvloop, as
    that checkout pins them), else with this interpreter; in both cases
    ``PYTHONPATH`` puts the checkout first and ``PYTHONSAFEPATH`` keeps the
    current directory (this checkout) off ``sys.path``. Clients stay this
    checkout's ``managerd_client``: the comparison is of the daemon's code.
    """

    path: Path
    label: str  # "managerd@<short rev>"
    rev: str
    dirty: bool
    python: str
    managerd_module: str  # where that interpreter imports managerd from (checked to be in path)

    def env(self) -> dict[str, str]:
        return {
            "PYTHONPATH": os.pathsep.join([str(self.path), str(self.path / "clients")]),
            "PYTHONSAFEPATH": "1",
        }

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path), "rev": self.rev, "dirty": self.dirty,
                "python": self.python, "managerd_module": self.managerd_module}  # fmt: skip


def _git(path: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(path), *args], capture_output=True, text=True, timeout=30, check=False
    )
    return done.stdout.strip() if done.returncode == 0 else ""


def checkout(path: Path, taken: set[str]) -> Checkout:
    """``path`` as a checkout to serve a daemon from; its label is not one of ``taken``."""
    path = path.expanduser().resolve()
    if not (path / "managerd" / "__main__.py").is_file():
        raise SystemExit(f"{path} is not a checkout of managerd (no managerd/__main__.py)")
    venv_python = path / ".venv" / "bin" / "python"
    python = str(venv_python) if venv_python.exists() else sys.executable
    rev = _git(path, "rev-parse", "--short", "HEAD") or path.name
    dirty = bool(_git(path, "status", "--porcelain", "--untracked-files=no"))
    label = f"managerd@{rev}{'+' if dirty else ''}"
    n = 2
    while label in taken:  # the same revision twice: managerd@abc1234#2
        label = f"managerd@{rev}{'+' if dirty else ''}#{n}"
        n += 1
    probe = subprocess.run(
        [python, "-c", "import managerd; print(managerd.__file__)"],
        env={**os.environ, **Checkout(path, label, rev, dirty, python, "").env()},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    module = probe.stdout.strip()
    if probe.returncode != 0 or not Path(module).resolve().is_relative_to(path):
        raise SystemExit(
            f"{python} does not import managerd from {path} (got {module!r}):\n{probe.stderr}"
        )
    return Checkout(path, label, rev, dirty, python, module)


@contextlib.contextmanager
def managerd_server(
    tmp: Path, env: dict[str, str] | None = None, source: Checkout | None = None
) -> Iterator[Target]:
    """A managerd daemon: this checkout's, or ``source``'s (labelled ``managerd@<rev>``)."""
    tmp.mkdir(parents=True, exist_ok=True)
    d = Daemon(tmp, env={**(source.env() if source else {}), **(env or {})})
    if source is not None:
        d.python = source.python
    d.start()
    assert d.proc is not None
    DAEMONS[d.proc.pid] = d
    try:
        yield Target("managerd", d.address, d.authkey, d.proc.pid, source.label if source else "")
    except BaseException:
        tail = "\n".join(d.lines[-40:])
        print(f"the daemon's last log lines:\n{tail}", file=sys.stderr, flush=True)
        raise
    finally:
        d.stop()
