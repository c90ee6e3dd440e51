"""Hostile input, fuzzed: the daemon refuses it and keeps serving everyone else.

Every case talks to a real daemon over a raw socket (the wire module's
frames and handshake, nothing of the client library's politeness). After
each example a well-behaved client checks that its queue and dict are
intact, and the daemon's memory is checked to stay bounded.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from managerd.safepickle import SafeDecoder
from managerd_client import ForbiddenPayload, Manager
from managerd_client.wire import FrameSocket, client_handshake

from conftest import Daemon

FUZZ = settings(
    max_examples=int(os.environ.get("MANAGERD_FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, Manager]]:
    """The daemon, and a well-behaved client with known contents.

    The failed-handshake penalty is off: every fuzzed input must reach the
    handshake code, not be refused at accept after the first twenty
    (tests/test_peers.py tests the penalty).
    """
    daemon = Daemon(tmp_path_factory.mktemp("hostile"), env={"MANAGERD_AUTH_FAILURE_LIMIT": "0"})
    daemon.start()
    m = daemon.connect()
    q = m.Queue("hostile.q")
    q.put_many(["a", "b", "c"])
    m.dict("hostile.d").update({"k": [1, 2, 3]})
    try:
        yield daemon, m
    finally:
        m.close()
        daemon.stop()


def _still_serving(target: tuple[Daemon, Manager], rss_limit_kb: int = 400_000) -> None:
    daemon, m = target
    q = m.Queue("hostile.q")
    assert q.qsize() == 3
    assert m.dict("hostile.d")["k"] == [1, 2, 3]
    assert daemon.proc is not None and daemon.proc.poll() is None
    assert _rss_kb(daemon) < rss_limit_kb


def _rss_kb(daemon: Daemon) -> int:
    assert daemon.proc is not None
    # The daemon is `python -m managerd` itself (no shell in between).
    status = Path(f"/proc/{daemon.proc.pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))


def _raw(daemon: Daemon, authenticate: bool = True) -> FrameSocket:
    sock = socket.create_connection((daemon.host, daemon.port), timeout=5)
    fs = FrameSocket(sock)
    if authenticate:
        client_handshake(fs, daemon.authkey)
    return fs


def _answer(fs: FrameSocket) -> object:
    """The reply to a stock-mode request, or 'closed' if the daemon hung up."""
    try:
        return pickle.loads(fs.recv_frame())
    except (EOFError, OSError):
        return "closed"


class _Boom:
    """Pickles to a call of os.system that would create a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_code_execution_pickle_has_no_effect(
    target: tuple[Daemon, Manager], tmp_path: Path
) -> None:
    daemon, m = target
    marker = tmp_path / "pwned"
    # As a stock request (whole frame), and inside a managerd envelope.
    fs = _raw(daemon)
    fs.send_frame(pickle.dumps((None, "create", (_Boom(marker),), {})))
    answer: Any = _answer(fs)
    kind, err = answer
    assert kind == "#ERROR" and "refused to decode posix.system" in str(err)
    fs.close()
    with pytest.raises(ForbiddenPayload, match=r"refused to decode posix\.system"):
        m._call(None, None, "ping", (_Boom(marker),))
    assert not marker.exists()
    _still_serving(target)


@FUZZ
@given(st.binary(min_size=1, max_size=600))
def test_random_bytes_before_authentication(target: tuple[Daemon, Manager], junk: bytes) -> None:
    daemon, _ = target
    fs = _raw(daemon, authenticate=False)
    try:
        fs.recv_frame()  # the challenge
        fs.sock.sendall(junk)
        fs.sock.shutdown(socket.SHUT_WR)
        while True:
            fs.recv_frame()  # FAILURE, or nothing: the daemon must hang up
    except (EOFError, OSError):
        pass
    finally:
        fs.close()
    _still_serving(target)


@FUZZ
@given(st.binary(max_size=2048))
def test_random_frames_after_authentication(target: tuple[Daemon, Manager], junk: bytes) -> None:
    fs = _raw(target[0])
    fs.send_frame(junk)
    reply = _answer(fs)
    assert reply == "closed" or reply[0] in ("#ERROR", "#RETURN")  # type: ignore[index]
    fs.close()
    _still_serving(target)


@FUZZ
@given(st.integers(min_value=-(2**31), max_value=2**31 - 1), st.binary(max_size=64))
def test_lying_length_headers(target: tuple[Daemon, Manager], length: int, tail: bytes) -> None:
    fs = _raw(target[0])
    fs.sock.sendall(struct.pack("!i", length) + tail)
    fs.sock.shutdown(socket.SHUT_WR)  # a truncated frame: the rest never comes
    _answer(fs)
    fs.close()
    _still_serving(target)


def test_huge_long_header_is_refused_before_buffering(target: tuple[Daemon, Manager]) -> None:
    daemon, _ = target
    before = _rss_kb(daemon)
    fs = _raw(daemon)
    fs.sock.sendall(struct.pack("!i", -1) + struct.pack("!Q", 2**62))
    assert _answer(fs) == "closed"
    fs.close()
    assert "over the limit" in daemon.log
    _still_serving(target, rss_limit_kb=before + 50_000)


def _nested(depth: int) -> bytes:
    """A pickle of a list nested ``depth`` deep, built opcode by opcode."""
    return b"\x80\x04" + b"]" * depth + b"a" * (depth - 1) + b"."


def _self_referencing() -> bytes:
    x: list[object] = []
    x.append(x)
    return pickle.dumps(x)


def _bomb() -> bytes:
    # One 1 MiB string referenced a million times through the memo: tiny to
    # send; if anything tried to repeat it, gigabytes.
    body = b"\x80\x04" + b"X" + struct.pack("<I", 1 << 20) + b"a" * (1 << 20) + b"\x94"
    body += b"(" + b"h\x00" * 200_000 + b"l."
    return body


@pytest.mark.parametrize(
    "payload",
    [
        _nested(100_000),
        _nested(1_000),
        _self_referencing(),
        _bomb(),
        b"\x80\x05\xff\xfe.",  # unknown opcodes
        pickle.dumps((None, "create", (os.getcwd,), {})),
        b"cos\nsystem\n(S'true'\ntR.",  # protocol 0 GLOBAL + REDUCE
        pickle.dumps((None, "create", ("Queue", "x" * 300), {})),  # a name too long
    ],
    ids=[
        "nested-100k",
        "nested-1k",
        "self-ref",
        "memo-bomb",
        "opcodes",
        "getcwd",
        "proto0",
        "long-name",
    ],
)
def test_hostile_pickles(target: tuple[Daemon, Manager], payload: bytes) -> None:
    fs = _raw(target[0])
    fs.send_frame(payload)
    reply = _answer(fs)
    assert reply == "closed" or reply[0] == "#ERROR", reply  # type: ignore[index]
    fs.close()
    _still_serving(target)


def test_hostile_pickles_are_genuine() -> None:
    """The crafted pickles really are what they claim (so the tests above mean it)."""
    assert len(list(pickletools.genops(_nested(10)))) > 10
    with pytest.raises(RecursionError):
        pickle.loads(_nested(100_000)).__repr__()


def test_decoder_shortcuts_refuse_what_it_refuses() -> None:
    """The decoder's shortcuts (C ``pickle.loads`` for a pickle that names no
    global, walked pickles remembered) decode and refuse as its full path does."""
    decoder = SafeDecoder()
    rid = b"\x00" * 8
    for envelope in [
        (None, None, "ping", (), 140234567890123),
        ("Lock", "db", "release", (), 1),  # an ``r`` in a name: walked, then remembered
        ("Queue", "jobs", "put", (b"line\nbreak", None, None), 2),  # a newline: restricted path
        ("dict", "d", "__setitem__", ("k", {1, 2}, frozenset({3})), 3),
    ]:
        frame = rid + pickle.dumps(envelope, 5)
        for _ in range(2):
            assert decoder.loads(frame, len(rid)) == envelope
    global_names = pickle.dumps((None, None, "ping", (os.getcwd,), 1), 5)
    assert b"\x93" in global_names
    far_put = b"\x80\x04N" + b"r" + struct.pack("<I", 1 << 30) + b"."
    persistent = b"\x80\x04NQ."
    for hostile in (global_names, far_put, persistent):
        for _ in range(3):  # refused every time, not remembered as walked
            with pytest.raises(ForbiddenPayload):
                decoder.loads(rid + hostile, len(rid))
