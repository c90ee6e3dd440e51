"""Issue 5's limits and settings against a real daemon: each one holds, is logged and counted.

Each test starts its own ``managerd serve`` with the ``MANAGERD_*`` setting
under test and talks to it over real sockets: raw ones for what a hostile
peer does (``managerd_client.wire`` frames, nothing of the client library's
politeness), the managerd client and stock ``multiprocessing`` clients for
what a well-behaved one sees. Counters are read from a real ``/metrics``
scrape. What tests/test_hostile.py (fuzzed input) and tests/test_tls.py
(certificates) already cover is not repeated here.

A test marked ``xfail(strict=True)`` checks something the code does not do
yet; its reason says what to change, and it fails (remove the mark) once
that is done.
"""

from __future__ import annotations

import array
import decimal
import fractions
import glob
import json
import os
import pickle
import pickletools
import re
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import threading
from contextlib import closing
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client
from multiprocessing.managers import BaseManager
from pathlib import Path

import pytest

from managerd_client import (
    ForbiddenPayload,
    Manager,
    ManagerdConnectionError,
    ManagerdError,
    RequestTooLarge,
)
from managerd_client.wire import HELLO, PROTOCOL_VERSION, WELCOME, FrameSocket, create_response

from conftest import Daemon, free_port, metric, wait_until

#: A hang guard for raw sockets, far above every timeout the daemon is given.
SOCKET_TIMEOUT_S = 30.0


# -- helpers --------------------------------------------------------------------------------


def metered(tmp: Path, env: dict[str, str]) -> tuple[Daemon, int]:
    """A started daemon with ``env`` and a ``/metrics`` port."""
    port = free_port()
    d = Daemon(tmp, env=env, args=["--metrics-port", str(port)]).start()
    assert wait_until(lambda: "metrics on http://" in d.log)
    return d, port


def limit_hits(port: int, limit: str) -> float:
    return metric(port, "managerd_limits_hit_total", limit=limit)


def raw(d: Daemon) -> FrameSocket:
    """A TCP connection to the daemon, nothing sent."""
    return FrameSocket(socket.create_connection(("127.0.0.1", d.port), timeout=SOCKET_TIMEOUT_S))


def authenticated(d: Daemon) -> FrameSocket:
    """A raw connection through the whole handshake, in stock mode."""
    fs = raw(d)
    try:
        fs.send_frame(create_response(d.authkey, fs.recv_frame()))
        assert fs.recv_frame() == WELCOME
        fs.send_frame(b"#CHALLENGE#{sha256}" + os.urandom(40))
        fs.recv_frame()  # the daemon's answer, checked by test_hostile's client_handshake
        fs.send_frame(WELCOME)
    except BaseException:
        fs.close()
        raise
    return fs


def closed_by_daemon(fs: FrameSocket) -> bool:
    """Read until the daemon hangs up: True on EOF or reset (a frame is skipped)."""
    try:
        while True:
            fs.recv_frame()
    except (EOFError, ConnectionError):
        return True
    except TimeoutError:
        return False


def peer_lines(d: Daemon, fs: FrameSocket | socket.socket) -> list[str]:
    """The daemon's log lines that name this socket's end as the peer."""
    sock = fs.sock if isinstance(fs, FrameSocket) else fs
    host, port = sock.getsockname()[:2]
    return [line for line in d.lines if f"{host}:{port}:" in line]


def rss_kb(d: Daemon, field: str = "VmRSS") -> int:
    assert d.proc is not None
    status = Path(f"/proc/{d.proc.pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith(field)))


class Stock(BaseManager):
    """A stock stdlib client of managerd, as a user of the bare stdlib writes it."""


Stock.register("Queue")


def stock(d: Daemon) -> BaseManager:
    m = Stock(address=("127.0.0.1", d.port), authkey=d.authkey)
    m.connect()
    return m


# -- handshake timeout (slowloris) ----------------------------------------------------------


def _dribble(sock: socket.socket, stop: threading.Event) -> None:
    """A 200-byte answer to the challenge (10 s at one byte every 50 ms), until the daemon
    hangs up."""
    try:
        sock.sendall(struct.pack("!i", 200))
        while not stop.wait(0.05):
            sock.sendall(b"\x00")
    except OSError:
        pass


def test_handshake_timeout_closes_slow_peers_and_serves_others(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    d, port = metered(tmp_path, {"MANAGERD_HANDSHAKE_TIMEOUT_S": "1"})
    daemons.append(d)
    before = limit_hits(port, "handshake_timeout")

    silent = raw(d)
    assert silent.recv_frame().startswith(b"#CHALLENGE#")  # then nothing, ever
    dribbler = raw(d)
    dribbler.recv_frame()
    stop = threading.Event()
    dribbling = threading.Thread(target=_dribble, args=(dribbler.sock, stop), daemon=True)
    dribbling.start()
    # Half a handshake: the daemon's challenge answered, ours never sent.
    half = raw(d)
    half.send_frame(create_response(d.authkey, half.recv_frame()))
    assert half.recv_frame() == WELCOME

    try:
        # Meanwhile a well-behaved client is served.
        with d.connect() as m:
            q = m.Queue("slowloris.q")
            q.put("served")
            assert q.get(timeout=5) == "served"

            for fs in (silent, dribbler, half):
                assert closed_by_daemon(fs), "the daemon never closed a slow handshake"
            dribbling.join(SOCKET_TIMEOUT_S)
            assert not dribbling.is_alive()
            # An authenticated connection outlives the handshake timeout.
            q.put("still")
            assert q.get(timeout=5) == "still"
            m.ping()

        for fs in (silent, dribbler, half):
            assert wait_until(lambda fs=fs: peer_lines(d, fs))
            lines = peer_lines(d, fs)
            assert len(lines) == 1, lines
            assert "no authentication within 1.0s" in lines[0]
        assert limit_hits(port, "handshake_timeout") == before + 3
    finally:
        stop.set()
        for fs in (silent, dribbler, half):
            fs.close()


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    cert, key = tmp / "server.crt", tmp / "server.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec",
            "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
            "-subj", "/CN=managerd", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


@needs_openssl
def test_handshake_timeout_covers_the_tls_handshake(tmp_path: Path, daemons: list[Daemon]) -> None:
    """A peer that opens TCP to a TLS daemon and never says hello is closed too."""
    cert, key = _self_signed(tmp_path)
    env = {"MANAGERD_TLS_CERT": str(cert), "MANAGERD_TLS_KEY": str(key)}
    d = Daemon(tmp_path, env={"MANAGERD_HANDSHAKE_TIMEOUT_S": "1", **env}).start()
    daemons.append(d)
    silent = socket.create_connection(("127.0.0.1", d.port), timeout=SOCKET_TIMEOUT_S)
    try:
        try:
            assert silent.recv(1) == b""  # a TLS server speaks second: EOF is its hang-up
        except ConnectionResetError:
            pass
        assert wait_until(lambda: peer_lines(d, silent))
        assert len(peer_lines(d, silent)) == 1, d.log
        assert "Traceback" not in d.log
        with d.connect(tls_ca=cert) as m:
            m.ping()
    finally:
        silent.close()


# -- max connections ------------------------------------------------------------------------


def test_max_connections_refuses_the_excess_cleanly(tmp_path: Path, daemons: list[Daemon]) -> None:
    d, port = metered(tmp_path, {"MANAGERD_MAX_CONNECTIONS": "5"})
    daemons.append(d)
    clients = [d.connect(connect_timeout_s=5) for _ in range(5)]
    try:
        assert metric(port, "managerd_connections") == 5

        # The 6th: a managerd client fails at once, never hangs.
        with pytest.raises(ManagerdConnectionError):
            d.connect(connect_timeout_s=5)
        # A raw peer is closed before any challenge; a stock client gets an error.
        with closing(raw(d)) as extra:
            assert closed_by_daemon(extra)
            # A stock client fails at once too: EOFError on a bare close; on a frame that is
            # not a challenge, AssertionError (3.11's answer_challenge) or AuthenticationError.
            with pytest.raises((EOFError, ConnectionError, AssertionError, AuthenticationError)):
                Client(("127.0.0.1", d.port), authkey=d.authkey)
            assert wait_until(lambda: peer_lines(d, extra))
            lines = peer_lines(d, extra)
        assert len(lines) == 1 and "too many connections (5 open)" in lines[0], lines
        assert limit_hits(port, "max_connections") == 3

        # Those in keep working; after two leave, two newcomers get in, not three.
        for m in clients:
            m.ping()
        for m in clients[:2]:
            m.close()
        assert wait_until(lambda: metric(port, "managerd_connections") == 3)
        clients[:2] = [d.connect(connect_timeout_s=5) for _ in range(2)]
        with pytest.raises(ManagerdConnectionError):
            d.connect(connect_timeout_s=5)
        assert limit_hits(port, "max_connections") == 4
        for m in clients:
            m.Queue("maxconn.q").put(1)
        assert clients[0].Queue("maxconn.q").qsize() == 5
    finally:
        for m in clients:
            m.close()


def test_max_connections_refusal_says_why(tmp_path: Path, daemons: list[Daemon]) -> None:
    d = Daemon(tmp_path, env={"MANAGERD_MAX_CONNECTIONS": "1"}).start()
    daemons.append(d)
    with d.connect(), pytest.raises(ManagerdConnectionError, match=r"(?i)too many connections"):
        d.connect(connect_timeout_s=5)


def test_max_connections_refusal_gives_no_tls_hint(tmp_path: Path, daemons: list[Daemon]) -> None:
    d = Daemon(tmp_path, env={"MANAGERD_MAX_CONNECTIONS": "1"}).start()
    daemons.append(d)
    with d.connect(), pytest.raises(ManagerdConnectionError) as refused:
        d.connect(connect_timeout_s=5)
    assert "too many connections" in str(refused.value)
    assert "tls" not in str(refused.value).lower()


# -- max frame size -------------------------------------------------------------------------


def test_oversized_frame_is_refused_by_disconnecting(tmp_path: Path, daemons: list[Daemon]) -> None:
    """What the daemon does with a frame over MANAGERD_MAX_FRAME_BYTES: it logs one line,
    counts it and closes that connection (it does not answer it); others are served."""
    d, port = metered(tmp_path, {"MANAGERD_MAX_FRAME_BYTES": "65536"})
    daemons.append(d)
    with d.connect() as other, d.connect() as sender:
        other.dict("frame.d")["k"] = "v"
        q = sender.Queue("frame.q")
        q.put(b"x" * 60_000)  # under the limit: served
        assert limit_hits(port, "frame_size") == 0

        # A stock-mode request of 100 KB on a raw connection: closed, unanswered.
        request = pickle.dumps((None, "create", ("Queue", "frame.raw", b"x" * 100_000), {}))
        with closing(authenticated(d)) as fs:
            try:
                fs.send_frame(request)
            except ConnectionError:
                pass  # the daemon may hang up while the frame is still being sent
            assert closed_by_daemon(fs)
            assert wait_until(lambda: peer_lines(d, fs))
            lines = peer_lines(d, fs)
        assert len(lines) == 1 and "over the limit of 65536" in lines[0], lines
        assert limit_hits(port, "frame_size") == 1

        # The managerd client knows the limit from the hello: its 100 KB put is refused
        # before it is sent, so the daemon sees nothing of it.
        with pytest.raises(RequestTooLarge):
            q.put(b"x" * 100_000)
        assert limit_hits(port, "frame_size") == 1

        # Nothing was stored; the daemon serves the other client and the sender again.
        assert other.dict("frame.d")["k"] == "v"
        assert q.qsize() == 1 and len(q.get(timeout=5)) == 60_000
        assert "frame.raw" not in dict(other.objects())
    assert d.proc is not None and d.proc.poll() is None
    assert "Traceback" not in d.log


def test_oversized_managerd_request_is_a_clear_error_and_keeps_the_session(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    d = Daemon(tmp_path, env={"MANAGERD_MAX_FRAME_BYTES": "65536"}).start()
    daemons.append(d)
    with d.connect() as m, d.connect() as other:
        session = m.session_id
        assert m.Lock("frame.lock").acquire(timeout=5)
        with pytest.raises(ManagerdError, match=r"65536"):
            m.Queue("frame.q").put(b"x" * 100_000)
        m.ping()
        assert m.session_id == session
        # The session kept what it held.
        assert not other.Lock("frame.lock").acquire(blocking=False)
        m.Lock("frame.lock").release()


# -- decoding: bounded allocation -----------------------------------------------------------


def _bytearray_bomb() -> bytes:
    """30 bytes that, unpickled, zero-fill a 256 MiB bytearray (builtins.bytearray(1<<28))."""
    return b"\x80\x04cbuiltins\nbytearray\nJ" + struct.pack("<i", 1 << 28) + b"\x85R."


def _set_of_range_bomb() -> bytes:
    """~50 bytes that, unpickled, build a set of two million ints (set(range(1<<21)))."""
    return (
        b"\x80\x04cbuiltins\nset\ncbuiltins\nrange\nJ" + struct.pack("<i", 1 << 21) + b"\x85R\x85R."
    )


def _array_of_range_bomb() -> bytes:
    """47 bytes that, unpickled, fill a 256 MiB array (array.array("q", range(1<<25)))."""
    return (
        b"\x80\x04carray\narray\nX\x01\x00\x00\x00qcbuiltins\nrange\nJ"
        + struct.pack("<i", 1 << 25)
        + b"\x85R\x86R."
    )


def _memo_index_bomb() -> bytes:
    """9 bytes: LONG_BINPUT at memo index 1<<24; CPython's C unpickler grows its memo array
    to twice the index and zero-fills it (256 MiB here, 64 GiB for index 2**32-1)."""
    return b"\x80\x04N" + b"r" + struct.pack("<I", 1 << 24) + b"."


def _memo_put_bomb() -> bytes:
    """The same with the text PUT opcode (protocol 0's): ``p16777216\\n``."""
    return b"\x80\x02N" + b"p16777216\n" + b"."


@pytest.mark.parametrize(
    "bomb",
    [
        _bytearray_bomb(), _set_of_range_bomb(), _array_of_range_bomb(), _memo_index_bomb(),
        _memo_put_bomb(),
    ],
    ids=["bytearray-256MiB", "set-of-range", "array-of-range", "memo-index", "memo-put"],
)  # fmt: skip
def test_a_tiny_request_cannot_allocate_a_lot_while_decoding(
    tmp_path: Path, daemons: list[Daemon], bomb: bytes
) -> None:
    """Each bomb is refused with an error before anything big is built (measured by the
    daemon's peak RSS, VmHWM): builtins callables get no size or range to expand, and no
    memo index beyond the pickle's own opcodes reaches the C unpickler."""
    d = Daemon(tmp_path).start()
    daemons.append(d)
    with d.connect() as m:
        m.ping()
        peak_before = rss_kb(d, "VmHWM")
        with closing(authenticated(d)) as fs:
            fs.send_frame(bomb)
            kind, _ = pickle.loads(fs.recv_frame())
        assert kind == "#ERROR"
        m.ping()
        # The request is under 64 bytes; decoding it may not cost 32 MiB.
        assert rss_kb(d, "VmHWM") - peak_before < 32 * 1024


def test_genuine_bombs() -> None:
    """The payloads above really build what they say (so the test above means it)."""
    assert len(_bytearray_bomb()) < 64 and len(_set_of_range_bomb()) < 64
    small = _bytearray_bomb().replace(struct.pack("<i", 1 << 28), struct.pack("<i", 5))
    assert pickle.loads(small) == bytearray(5)
    small = _set_of_range_bomb().replace(struct.pack("<i", 1 << 21), struct.pack("<i", 5))
    assert pickle.loads(small) == {0, 1, 2, 3, 4}
    small = _array_of_range_bomb().replace(struct.pack("<i", 1 << 25), struct.pack("<i", 5))
    assert pickle.loads(small) == array.array("q", range(5)) and len(small) < 64
    assert len(_memo_index_bomb()) == 9 and pickle.loads(_memo_index_bomb()) is None
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(_memo_index_bomb())]
    assert ("LONG_BINPUT", 1 << 24) in ops
    assert pickle.loads(_memo_put_bomb()) is None
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(_memo_put_bomb())]
    assert ("PUT", 1 << 24) in ops


# -- malformed managerd envelopes -------------------------------------------------------------


def _managerd_mode(d: Daemon) -> FrameSocket:
    """A raw connection past the hello: it speaks managerd envelopes now."""
    fs = authenticated(d)
    try:
        fs.send_frame(pickle.dumps((None, HELLO, ({"protocol": PROTOCOL_VERSION},), {})))
        kind, _ = pickle.loads(fs.recv_frame())
        assert kind == "#RETURN"
    except BaseException:
        fs.close()
        raise
    return fs


def test_malformed_envelopes_get_an_answer_not_a_traceback(shared_daemon: Daemon) -> None:
    with closing(_managerd_mode(shared_daemon)) as fs:
        fs.send_frame(struct.pack("!Q", 7) + pickle.dumps(("Queue", "x", ["get"], (), 1)))
        rid, status = struct.unpack_from("!QB", fs.recv_frame())
    assert (rid, status) == (7, 1)  # an error reply to request 7
    with closing(_managerd_mode(shared_daemon)) as short:
        short.send_frame(b"\x00\x01")
        assert closed_by_daemon(short)
        assert wait_until(lambda: peer_lines(shared_daemon, short))
    assert "Traceback" not in shared_daemon.log


# -- HMAC-MD5 ---------------------------------------------------------------------------------

STOCK_CLIENT = r"""
import os, sys
from multiprocessing.managers import BaseManager
class M(BaseManager):
    pass
M.register("Queue")
host, port = os.environ["MANAGERD_ADDRESS"].rsplit(":", 1)
m = M(address=(host, int(port)), authkey=os.environ["MANAGERD_AUTHKEY"].encode())
try:
    m.connect()
    m.Queue("md5.q").put("%d.%d" % sys.version_info[:2])
except Exception as exc:
    print("REFUSED", type(exc).__name__, exc)
else:
    print("ACCEPTED")
"""


def stock_python(version: str) -> str:
    """A stock interpreter of ``version`` (pyenv's, or on PATH); fail under CI, else skip."""
    root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    pyenv = shutil.which("pyenv")
    if pyenv:
        out = subprocess.run([pyenv, "root"], capture_output=True, text=True, timeout=30)
        root = out.stdout.strip() or root
    candidates = sorted(glob.glob(f"{root}/versions/{version}.*/bin/python{version}"), reverse=True)
    candidates += [p for p in (shutil.which(f"python{version}"), shutil.which("python3")) if p]
    for python in candidates:
        out = subprocess.run(
            [python, "-I", "-S", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        if out.stdout.strip() == version:
            return python
    message = f"no Python {version} interpreter found (pyenv or PATH)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def run_stock(python: str, d: Daemon) -> str:
    out = subprocess.run(
        [python, "-I", "-S", "-c", STOCK_CLIENT],
        env=d.client_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.parametrize("allow_md5", [None, "false"], ids=["default", "md5-off"])
def test_md5_clients_per_setting(
    tmp_path: Path, daemons: list[Daemon], allow_md5: str | None
) -> None:
    pythons = {v: stock_python(v) for v in ("3.11", "3.12", "3.13")}
    env = {} if allow_md5 is None else {"MANAGERD_ALLOW_MD5_AUTH": allow_md5}
    d, port = metered(tmp_path, env)
    daemons.append(d)
    seen = {v: run_stock(python, d) for v, python in pythons.items()}
    # 3.12+ answer with HMAC-SHA256: welcome either way.
    assert seen["3.12"] == seen["3.13"] == "ACCEPTED", seen
    if allow_md5 is None:
        assert seen["3.11"] == "ACCEPTED", seen
        assert metric(port, "managerd_auth_failures_total") == 0
    else:
        # 3.11 answers with a bare HMAC-MD5: refused as a failed authentication.
        assert seen["3.11"].startswith("REFUSED AuthenticationError"), seen
        assert metric(port, "managerd_auth_failures_total") == 1
        assert wait_until(lambda: "authentication failed" in d.log)
    with d.connect() as m:
        stored = sorted(m.Queue("md5.q").get(timeout=5) for _ in range(m.Queue("md5.q").qsize()))
    assert stored == (["3.11", "3.12", "3.13"] if allow_md5 is None else ["3.12", "3.13"])


def test_md5_refusal_is_logged_as_such(tmp_path: Path, daemons: list[Daemon]) -> None:
    python = stock_python("3.11")
    d = Daemon(tmp_path, env={"MANAGERD_ALLOW_MD5_AUTH": "false"}).start()
    daemons.append(d)
    assert run_stock(python, d).startswith("REFUSED")
    assert wait_until(lambda: "closing connection" in d.log)
    refusals = [line for line in d.lines if "closing connection" in line]
    assert len(refusals) == 1 and re.search(r"(?i)md5", refusals[0]), d.log


# -- allowed_classes --------------------------------------------------------------------------


def test_allowed_classes_default_refuses_a_fraction(shared_daemon: Daemon) -> None:
    m = stock(shared_daemon)
    q = m.Queue("allowed.default")  # type: ignore[attr-defined]
    with pytest.raises(Exception, match=r"refused to decode fractions\.Fraction"):
        q.put(fractions.Fraction(1, 3))
    q.put("still served")
    assert q.qsize() == 1
    with shared_daemon.connect() as mc, pytest.raises(ForbiddenPayload):
        mc.dict("allowed.default.d")[fractions.Fraction(1, 2)] = 1  # a key is decoded


def test_allowed_classes_lets_exactly_those_in(tmp_path: Path, daemons: list[Daemon]) -> None:
    d = Daemon(tmp_path, env={"MANAGERD_ALLOWED_CLASSES": '["fractions.Fraction"]'}).start()
    daemons.append(d)
    writer, reader = stock(d), stock(d)
    writer.Queue("allowed.q").put(fractions.Fraction(1, 3))  # type: ignore[attr-defined]
    got = reader.Queue("allowed.q").get(timeout=5)  # type: ignore[attr-defined]
    assert type(got) is fractions.Fraction and got == fractions.Fraction(1, 3)
    # A managerd client reads what a stock client put, and may use it as a key.
    writer.Queue("allowed.q").put(fractions.Fraction(2, 3))  # type: ignore[attr-defined]
    with d.connect() as m:
        assert m.Queue("allowed.q").get(timeout=5) == fractions.Fraction(2, 3)
        m.dict("allowed.d")[fractions.Fraction(1, 2)] = "half"
        assert m.dict("allowed.d")[fractions.Fraction(1, 2)] == "half"
    # Allowing one class allows no other.
    with pytest.raises(Exception, match=r"refused to decode decimal\.Decimal"):
        writer.Queue("allowed.q").put(decimal.Decimal("1.5"))  # type: ignore[attr-defined]


def test_allowed_classes_survive_a_restart(tmp_path: Path, daemons: list[Daemon]) -> None:
    d = Daemon(
        tmp_path,
        env={"MANAGERD_ALLOWED_CLASSES": '["fractions.Fraction"]'},
        args=["--data-dir", str(tmp_path / "data"), "--fsync", "always"],
    ).start()
    daemons.append(d)
    with d.connect() as m:
        m.dict("allowed.d")[fractions.Fraction(1, 2)] = "half"
    d.restart()
    with d.connect() as m:
        assert m.dict("allowed.d")[fractions.Fraction(1, 2)] == "half"


def test_refused_decodes_are_logged_and_counted(tmp_path: Path, daemons: list[Daemon]) -> None:
    d, port = metered(tmp_path, {})
    daemons.append(d)
    with pytest.raises(Exception, match=r"refused to decode fractions\.Fraction"):
        stock(d).Queue("refused.q").put(fractions.Fraction(1, 3))  # type: ignore[attr-defined]
    with d.connect() as m, pytest.raises(ForbiddenPayload, match=r"posix\.system"):
        m._call(None, None, "ping", (os.system,))
    assert limit_hits(port, "decode") == 2
    assert wait_until(lambda: d.log.count("refused to decode") >= 2), d.log
    assert d.log.count("refused to decode") == 2


# -- non-loopback without TLS -----------------------------------------------------------------

WARNING = re.compile(r"WARNING managerd: serving on \S+ without TLS")


@pytest.mark.parametrize(
    ("host", "tls", "warned"),
    [("0.0.0.0", False, True), ("0.0.0.0", True, False), ("127.0.0.1", False, False)],
    ids=["any-plain", "any-tls", "loopback-plain"],
)
def test_non_loopback_without_tls_warns(
    tmp_path: Path, daemons: list[Daemon], host: str, tls: bool, warned: bool
) -> None:
    env: dict[str, str] = {}
    if tls:
        if shutil.which("openssl") is None:
            pytest.skip("needs openssl")
        cert, key = _self_signed(tmp_path)
        env = {"MANAGERD_TLS_CERT": str(cert), "MANAGERD_TLS_KEY": str(key)}
    d = Daemon(tmp_path, env=env, args=["--host", host, "--port", "0"]).start()
    daemons.append(d)
    assert re.search(rf"managerd serving on {re.escape(host)}:", d.log), d.log
    # The warning is logged before the daemon listens, so it is in the log by now.
    warnings = [line for line in d.lines if WARNING.search(line)]
    assert len(warnings) == (1 if warned else 0), d.log
    if warned:
        assert host in warnings[0]


# -- the authkey is never shown ---------------------------------------------------------------


def test_authkey_is_never_logged_even_at_debug(tmp_path: Path, daemons: list[Daemon]) -> None:
    # asyncio's own loop logs a DEBUG line at start, which shows the level took effect.
    env = {"MANAGERD_LOG_LEVEL": "DEBUG", "MANAGERD_EVENT_LOOP": "asyncio"}
    d = Daemon(tmp_path, env=env).start()
    daemons.append(d)
    key = d.authkey.decode()
    # A session, a stock client, wrong keys close to the real one, a slow and a bad handshake.
    with d.connect() as m:
        m.Queue("key.q").put(key)  # the key as data is the client's business, not the log's
        stock(d).Queue("key.q").qsize()  # type: ignore[attr-defined]
        for wrong in (d.authkey + b"x", d.authkey[:-1], d.authkey.upper()):
            with pytest.raises(ManagerdConnectionError):
                Manager(("127.0.0.1", d.port), wrong, connect_timeout_s=5)
        with closing(raw(d)) as fs:
            fs.recv_frame()
            fs.send_frame(d.authkey)  # the key in clear instead of an HMAC of the challenge
            assert closed_by_daemon(fs)
        assert wait_until(lambda: d.log.count("authentication failed") == 4)
        m.ping()
    d.stop()
    assert " DEBUG asyncio: Using selector" in d.log
    for form in (key, repr(d.authkey), d.authkey.hex(), key.upper()):
        assert form not in d.log


def _managerd(*args: str, home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MANAGERD_")}
    clean.update(HOME=str(home), **env)
    return subprocess.run(
        [sys.executable, "-m", "managerd", *args],
        env=clean, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_config_output_never_shows_the_key(tmp_path: Path) -> None:
    """From a TOML file, from a key file, and in a settings error: never the key itself."""
    key = "k3y-" + secrets.token_hex(16)
    toml = tmp_path / "managerd.toml"
    toml.write_text(f'authkey = "{key}"\nport = 4242\n')
    done = _managerd("config", "--config", str(toml), home=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["port"] == 4242
    assert key not in done.stdout + done.stderr

    key_file = tmp_path / "authkey"
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    done = _managerd("config", "--authkey-file", str(key_file), home=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["authkey_file"] == str(key_file)
    assert key not in done.stdout + done.stderr

    # A misspelt key name is refused with a message that names the field, not the value.
    toml.write_text(f'auth_key = "{key}"\n')
    done = _managerd("config", "--config", str(toml), home=tmp_path)
    assert done.returncode == 2 and "auth_key" in done.stderr
    assert key not in done.stdout + done.stderr


# -- memory under many hostile connections ----------------------------------------------------

#: Trailing junk each hostile peer sends with its bad handshake frame. The daemon
#: reads it into the connection's buffer before refusing the first frame, so a
#: connection object that were kept would keep 64 KiB with it.
JUNK = os.urandom(64 * 1024)


def _hostile_round(d: Daemon, n: int, batch: int = 100) -> int:
    """``n`` connections, ``batch`` at a time, each refused: returns how many were closed."""
    closed = 0
    for start in range(0, n, batch):
        conns = [raw(d) for _ in range(batch)]
        for i, fs in enumerate(conns):
            kind = (start + i) % 4
            try:
                fs.recv_frame()
                if kind == 0:  # a wrong HMAC
                    fs.send_frame(b"{sha256}" + os.urandom(32))
                elif kind == 1:  # a wrong HMAC and 64 KiB of junk behind it
                    fs.sock.sendall(struct.pack("!i", 40) + b"{sha256}" + os.urandom(32) + JUNK)
                elif kind == 2:  # a handshake frame over the 256-byte limit
                    fs.sock.sendall(struct.pack("!i", 100_000) + JUNK)
                else:  # a lying long header
                    fs.sock.sendall(struct.pack("!iQ", -1, 2**62))
            except OSError:
                pass
        for fs in conns:
            try:
                closed += closed_by_daemon(fs)
            except OSError:
                closed += 1
            fs.close()
    return closed


def test_memory_stays_bounded_after_many_hostile_connections(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    # The failed-handshake penalty is off: every hostile connection must reach
    # the handshake (tests/test_peers.py tests the penalty).
    d, port = metered(tmp_path, {"MANAGERD_AUTH_FAILURE_LIMIT": "0"})
    daemons.append(d)
    with d.connect() as m:
        m.dict("mem.d")["k"] = [1, 2, 3]
        assert _hostile_round(d, 200) == 200  # warm up the allocator and the log
        before = rss_kb(d)
        assert _hostile_round(d, 2000) == 2000
        # Every hostile connection is gone (this one client is left)...
        assert wait_until(lambda: metric(port, "managerd_connections") == 1)
        assert m.dict("mem.d")["k"] == [1, 2, 3]
        # ...and the memory with it. 2,000 connections held open at once cost the daemon
        # about 4 MB (measured: ~2 KB each), and half of these also leave 64 KiB in their
        # buffer (64 MB if kept); allocator noise over 2,000 refusals measured under 1 MB.
        # 8 MiB fails on any kept connection state bigger than ~4 KB each.
        growth_kb = rss_kb(d) - before
        assert growth_kb < 8 * 1024, f"RSS grew by {growth_kb} KiB"
    assert metric(port, "managerd_auth_failures_total") == 1100
    assert limit_hits(port, "frame_size") == 1100
