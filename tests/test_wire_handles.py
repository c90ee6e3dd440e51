"""Protocol 2 (handle envelopes): negotiation, both dialects side by side, hostile values.

A managerd client that says ``protocol: 2`` in its hello resolves each
object once per connection to a handle and a method table, then sends
``<rid><handle><method><thread><args>`` (``managerd_client.wire.V2_HEAD``).
These tests drive a real daemon: through the client, and through raw
frames where a client would never send what is sent (unknown, foreign,
huge handles; arguments that are not a tuple or name a class). Every such
request gets an error answer matched to its id, and the daemon goes on
serving that connection and the others.
"""

from __future__ import annotations

import os
import pickle
import queue
import struct
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from test_limits import authenticated, metered

import managerd_client.channel as channel_module
from managerd_client.errors import ProtocolError
from managerd_client.wire import HELLO, REISSUE, V2_HEAD, V2_PAYLOADS, V2_TAIL, FrameSocket

from conftest import Daemon, metric

RID = struct.Struct("!Q")
REPLY = struct.Struct("!QB")


def hello(fs: FrameSocket, version: Any) -> tuple[str, Any]:
    fs.send_frame(pickle.dumps((None, HELLO, ({"protocol": version},), {})))
    kind, info = pickle.loads(fs.recv_frame())
    return kind, info


def v2_mode(d: Daemon) -> FrameSocket:
    """A raw connection that said protocol 2 in its hello."""
    fs = authenticated(d)
    try:
        kind, info = hello(fs, 2)
        assert kind == "#RETURN" and info["protocol"] == 2
    except BaseException:
        fs.close()
        raise
    return fs


def ask(fs: FrameSocket, rid: int, body: bytes) -> tuple[int, Any]:
    """Send ``<rid><body>``; the reply's status and unpickled value (same rid)."""
    fs.send_frame(RID.pack(rid) + body)
    frame = fs.recv_frame()
    got, status = REPLY.unpack_from(frame)
    assert got == rid
    return status, pickle.loads(frame[REPLY.size :])


def by_name(
    method: str, args: tuple[Any, ...], typeid: str | None = None, name: Any = None
) -> bytes:
    return pickle.dumps((typeid, name, method, args, 1), 5)


def by_handle(
    handle: int, method_no: int, args: tuple[Any, ...] | None = (), thread: int = 1
) -> bytes:
    head = V2_HEAD.pack(0, handle, method_no, thread)[RID.size :]
    return head if not args else head + pickle.dumps(args, 5)


def resolve(
    fs: FrameSocket, rid: int, typeid: str | None, name: str | None
) -> tuple[int, dict[str, int]]:
    status, value = ask(fs, rid, by_name("resolve", (typeid, name)))
    assert status == 0, value
    handle, methods = value
    return handle, {m: i for i, m in enumerate(methods)}


def error_kind(fs: FrameSocket, rid: int, body: bytes) -> str:
    status, value = ask(fs, rid, body)
    assert status == 1, value
    kind: str = value[0]
    return kind


# -- negotiation ------------------------------------------------------------------------------


def test_the_client_speaks_protocol_2_and_calls_by_handle(shared_daemon: Daemon, uniq: str) -> None:
    with shared_daemon.connect() as m:
        q = m.Queue(uniq)
        q.put("a")
        assert q.get() == "a"
        m.ping()
        channel = m._channel
        assert channel is not None and channel.protocol == 2
        handle, numbers = channel._resolved[("Queue", uniq)]
        assert handle > 0 and numbers is not None and "put" in numbers
        assert q._ref is not None and q._ref[1] == handle
        assert channel._ops is not None and "ping" in channel._ops


def test_a_protocol_1_client_still_calls_by_name(shared_daemon: Daemon, uniq: str) -> None:
    with closing(authenticated(shared_daemon)) as fs:
        kind, info = hello(fs, 1)
        assert kind == "#RETURN" and info["protocol"] == 1
        assert ask(fs, 1, by_name("create", ("Queue", uniq, {}))) == (0, None)
        assert ask(fs, 2, by_name("put", (b"x",), "Queue", uniq)) == (0, None)
        assert ask(fs, 3, by_name("qsize", (), "Queue", uniq)) == (0, 1)
        # A frame shaped as a handle envelope is not one on a protocol 1 connection.
        status, _ = ask(fs, 4, by_handle(0, 0))
        assert status == 1
        assert ask(fs, 5, by_name("ping", ())) == (0, None)


def test_a_client_asks_again_with_protocol_1_when_2_is_refused(
    shared_daemon: Daemon, uniq: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The daemon refuses an unknown protocol and keeps the connection, which
    # is what an older daemon does with 2: the client asks again with 1.
    monkeypatch.setattr(channel_module, "PROTOCOL_VERSION", 3)
    with shared_daemon.connect() as m:
        q = m.Queue(uniq)
        q.put("b")
        assert q.get() == "b"
        channel = m._channel
        assert channel is not None and channel.protocol == 1
        assert q._ref is not None and q._ref[2] is None  # by name


@pytest.mark.parametrize("version", [3, 0, "2", None, True, 2.0])
def test_hello_versions_that_are_not_spoken_are_refused(
    shared_daemon: Daemon, version: Any
) -> None:
    with closing(authenticated(shared_daemon)) as fs:
        kind, info = hello(fs, version)
        assert kind == "#ERROR" and isinstance(info, ProtocolError)
        kind, info = hello(fs, 2)  # the connection is still there
        assert kind == "#RETURN" and info["protocol"] == 2


# -- hostile handle envelopes -------------------------------------------------------------------


def test_hostile_handles_get_clear_errors_and_the_daemon_goes_on(
    shared_daemon: Daemon, uniq: str
) -> None:
    with closing(v2_mode(shared_daemon)) as fs, closing(v2_mode(shared_daemon)) as other:
        assert ask(fs, 1, by_name("create", ("Queue", uniq, {}))) == (0, None)
        handle, numbers = resolve(fs, 2, "Queue", uniq)
        assert ask(fs, 3, by_handle(handle, numbers["put"], (b"p",))) == (0, None)
        assert ask(fs, 4, by_handle(handle, numbers["qsize"])) == (0, 1)
        # Resolving again gives the same handle.
        assert resolve(fs, 5, "Queue", uniq)[0] == handle

        # Unknown handle and method numbers, up to the largest a header holds.
        assert error_kind(fs, 6, by_handle(handle + 1000, 0)) == "Protocol"
        assert error_kind(fs, 7, by_handle(0x7FFFFFFF, 0)) == "Protocol"
        assert error_kind(fs, 8, by_handle(handle, 0xFFFF)) == "Protocol"
        assert error_kind(fs, 9, by_handle(handle, len(numbers))) == "Protocol"
        assert (
            error_kind(fs, 10, by_handle(0xFFFFFFFF, 0xFFFF, (1,), thread=2**64 - 1)) == "Protocol"
        )
        # A handle whose first byte is 0x80 reads as a pickle (PROTO): refused as one.
        assert error_kind(fs, 10, by_handle(0x80000000, 0)) == "Forbidden"
        # A header cut short.
        assert error_kind(fs, 11, by_handle(handle, 0)[:5]) == "Protocol"
        # Arguments that are not a tuple; arguments that name a class.
        head = by_handle(handle, numbers["put"])
        assert error_kind(fs, 12, head + pickle.dumps([b"x"])) == "Type"
        assert error_kind(fs, 13, head + pickle.dumps((os.system,))) == "Forbidden"
        assert error_kind(fs, 14, head + b"\x80\x05garbage") == "Forbidden"
        # Arguments that do not fit the method.
        assert error_kind(fs, 15, by_handle(handle, numbers["put"], (1, 2, 3, 4, 5))) == "Type"

        # Another connection's handle means nothing here.
        assert error_kind(other, 1, by_handle(handle, numbers["qsize"])) == "Protocol"
        # Bad resolves: wrong arity, wrong types, no such type, an empty name.
        assert error_kind(fs, 16, by_name("resolve", ("Queue",))) == "Type"
        assert error_kind(fs, 17, by_name("resolve", (1, 2))) == "Type"
        assert error_kind(fs, 18, by_name("resolve", ("NoType", uniq))) == "Protocol"
        assert error_kind(fs, 19, by_name("resolve", ("Queue", ""))) == "Type"

        # Both connections still serve, by handle and by name.
        assert ask(fs, 20, by_handle(handle, numbers["qsize"])) == (0, 1)
        assert ask(other, 2, by_handle(0, resolve(other, 3, None, None)[1]["ping"])) == (0, None)
    with shared_daemon.connect() as m:
        assert m.Queue(uniq).qsize() == 1
    assert "Traceback" not in shared_daemon.log


def test_hostile_reissued_calls_get_clear_errors_and_nothing_is_taken(
    shared_daemon: Daemon, uniq: str
) -> None:
    """``REISSUE`` envelopes with every part wrong (the first request id NaN, negative,
    past 64 bits, a bool, a str): the caller's TypeError, nothing taken, the connection
    goes on; a well-formed one runs as the call itself."""
    with closing(v2_mode(shared_daemon)) as fs:
        assert ask(fs, 1, by_name("create", ("Queue", uniq, {}))) == (0, None)
        handle, numbers = resolve(fs, 2, "Queue", uniq)
        assert ask(fs, 3, by_handle(handle, numbers["put"], (pickle.dumps("item"),))) == (0, None)
        call = ("Queue", uniq, "get_nowait", ())
        for rid, bad in enumerate(
            [
                (),
                call[:3],
                (*call, 7, 8),
                (*call, -1),
                (*call, 2**64),
                (*call, float("nan")),
                (*call, float("inf")),
                (*call, True),
                (*call, "7"),
                ("Queue", uniq, "get_nowait", ["not a tuple"]),
                (1, uniq, "get_nowait", ()),
            ],
            start=10,
        ):
            assert error_kind(fs, rid, by_name(REISSUE, bad)) == "Type", bad
        assert ask(fs, 30, by_handle(handle, numbers["qsize"])) == (0, 1)  # nothing taken
        status, value = ask(fs, 31, by_name(REISSUE, (*call, 0)))
        assert (status, pickle.loads(value)) == (0, "item")
        assert ask(fs, 32, by_handle(handle, numbers["qsize"])) == (0, 0)
    assert "Traceback" not in shared_daemon.log


def test_the_handle_of_a_deleted_object_answers_no_such_object(
    shared_daemon: Daemon, uniq: str
) -> None:
    with closing(v2_mode(shared_daemon)) as fs, shared_daemon.connect() as m:
        m.Queue(uniq).put("x")
        handle, numbers = resolve(fs, 1, "Queue", uniq)
        assert ask(fs, 2, by_handle(handle, numbers["qsize"])) == (0, 1)
        assert m.delete(uniq)
        assert error_kind(fs, 3, by_handle(handle, numbers["qsize"])) == "NoSuchObject"
        # A handle stands for the name: the object made again under it is found.
        m.Queue(uniq)
        assert ask(fs, 4, by_handle(handle, numbers["qsize"])) == (0, 0)
        # A name taken by another type: the handle's type does not match.
        assert m.delete(uniq)
        m.dict(uniq)
        assert error_kind(fs, 5, by_handle(handle, numbers["qsize"])) == "TypeConflict"


def test_a_proxy_of_a_deleted_object_raises_no_such_object(
    shared_daemon: Daemon, uniq: str
) -> None:
    with shared_daemon.connect() as m, shared_daemon.connect() as other:
        q = m.Queue(uniq)
        q.put(1)
        assert other.delete(uniq)
        with pytest.raises(KeyError):  # NoSuchObject is a KeyError
            q.qsize()
        with pytest.raises(queue.Empty):
            m.Queue(uniq).get(timeout=0.01)


def test_handle_calls_are_counted_under_their_method(tmp_path: Path, uniq: str) -> None:
    d, port = metered(tmp_path, {})
    try:
        with d.connect() as m:
            q = m.Queue(uniq)
            for i in range(3):
                q.put(i)
            m.ping()
            channel = m._channel
            assert channel is not None and channel.protocol == 2
        assert metric(port, "managerd_requests_total", method="Queue.put", outcome="ok") == 3
        assert metric(port, "managerd_requests_total", method="server.ping", outcome="ok") >= 1
        assert metric(port, "managerd_requests_total", method="server.resolve", outcome="ok") >= 2
        with closing(v2_mode(d)) as fs:
            error_kind(fs, 1, by_handle(99, 0))
        assert metric(port, "managerd_requests_total", method="invalid", outcome="Protocol") == 1
    finally:
        d.stop()


# -- payload sections (put_many's items as opaque bytes) -----------------------------------------


def payload_section(payloads: list[bytes], count: int | None = None) -> bytes:
    n = len(payloads) if count is None else count
    lengths = struct.pack(f"<{len(payloads)}I", *map(len, payloads))
    return struct.pack("<I", n) + lengths + b"".join(payloads)


def test_payload_sections_are_stored_as_sent_and_hostile_ones_refused(
    shared_daemon: Daemon, uniq: str
) -> None:
    with closing(v2_mode(shared_daemon)) as fs:
        assert ask(fs, 1, by_name("create", ("Queue", uniq, {}))) == (0, None)
        handle, numbers = resolve(fs, 2, "Queue", uniq)
        put_many = numbers["put_many"] | V2_PAYLOADS
        head = by_handle(handle, put_many)
        items = [pickle.dumps(i) for i in range(5)] + [b"", b"not a pickle"]
        rest = pickle.dumps((True, None))
        assert ask(fs, 3, head + payload_section(items) + rest) == (0, None)
        status, stored = ask(fs, 4, by_handle(handle, numbers["get_many"], (10,)))
        assert (status, stored) == (0, items)  # as sent, never unpickled by the daemon

        # A count larger than the request; lengths that run past it; no count at all.
        assert error_kind(fs, 5, head + payload_section([b"x"], count=10**6) + rest) == "Protocol"
        assert error_kind(fs, 6, head + struct.pack("<II", 1, 10**6) + b"x" + rest) == "Protocol"
        assert error_kind(fs, 7, head + b"\x01") == "Protocol"
        # The flag on a method that takes no payloads: its own error, from the method.
        qsize = by_handle(handle, numbers["qsize"] | V2_PAYLOADS)
        assert error_kind(fs, 8, qsize + payload_section([b"x"])) == "Type"
        # The arguments after the section still go through the restricted decoder.
        evil = pickle.dumps((os.system, None))
        assert error_kind(fs, 9, head + payload_section([b"x"]) + evil) == "Forbidden"
        assert ask(fs, 10, by_handle(handle, numbers["qsize"])) == (0, 0)
    assert "Traceback" not in shared_daemon.log


# -- tail payloads (put's item, a dict's value, as opaque bytes) -------------------------------


def tail(payload: bytes, lead: tuple[Any, ...] = ()) -> bytes:
    pickled = pickle.dumps(lead, 5) if lead else b""
    return struct.pack("<I", len(pickled)) + pickled + payload


def test_tail_payloads_are_stored_as_sent_and_hostile_ones_refused(
    shared_daemon: Daemon, uniq: str
) -> None:
    with closing(v2_mode(shared_daemon)) as fs:
        assert ask(fs, 1, by_name("create", ("Queue", uniq, {}))) == (0, None)
        assert ask(fs, 2, by_name("create", ("dict", uniq + "d", {}))) == (0, None)
        q, qn = resolve(fs, 3, "Queue", uniq)
        d, dn = resolve(fs, 4, "dict", uniq + "d")
        put = by_handle(q, qn["put"] | V2_TAIL)
        # Bytes that would send a pickle through the slow checks, and no pickle at all:
        # stored as they are (the daemon neither decodes nor scans a tail).
        items = [pickle.dumps({"id": 7, "p": "pr\n"}), b"not a pickle \x93", b""]
        for rid, item in enumerate(items, 5):
            assert ask(fs, rid, put + tail(item)) == (0, None)
        for rid, item in enumerate(items, 10):
            assert ask(fs, rid, by_handle(q, qn["get"])) == (0, item)
        # Leading arguments before the tail: a dict's key.
        setitem = by_handle(d, dn["__setitem__"] | V2_TAIL)
        assert ask(fs, 20, setitem + tail(b"v\x93", ("k",))) == (0, None)
        assert ask(fs, 21, by_handle(d, dn["__getitem__"], ("k",))) == (0, b"v\x93")

        # A pickle length past the request; no length at all; both flags at once.
        assert error_kind(fs, 22, put + struct.pack("<I", 10**6) + b"x") == "Protocol"
        assert error_kind(fs, 23, put + b"\x01") == "Protocol"
        both = by_handle(q, qn["put_many"] | V2_PAYLOADS | V2_TAIL)
        assert error_kind(fs, 24, both + payload_section([b"x"])) == "Protocol"
        # The flag on a method that takes no payload: its own error, from the method.
        assert error_kind(fs, 25, by_handle(q, qn["qsize"] | V2_TAIL) + tail(b"x")) == "Type"
        # The leading arguments still go through the restricted decoder.
        evil = pickle.dumps((os.system,))
        assert error_kind(fs, 26, setitem + struct.pack("<I", len(evil)) + evil + b"x") == (
            "Forbidden"
        )
        # Leading arguments that are not a tuple.
        bad = pickle.dumps(["k"])
        assert error_kind(fs, 27, setitem + struct.pack("<I", len(bad)) + bad + b"x") == "Type"
        assert ask(fs, 28, by_handle(q, qn["qsize"])) == (0, 0)
    assert "Traceback" not in shared_daemon.log


def test_the_client_sends_payloads_as_tails_and_small_and_large_come_back(
    shared_daemon: Daemon, uniq: str
) -> None:
    with shared_daemon.connect() as m:
        channel = m._channel_or_reconnect()
        assert channel.tail_payloads
        q, d, lst = m.Queue(uniq), m.dict(uniq + "d"), m.list(uniq + "l")
        big = b"\x93" * (3 << 20)  # a part of its own, not copied into the first
        for item in ({"a": "b\n"}, big, None, "x"):
            q.put(item)
            d["k"] = item
            lst.append(item)
            assert q.get() == item and d["k"] == item and lst[-1] == item
        q.put(1)
        q.put(2, True, 5.0)  # not the defaults: pickled with the item, as before
        q.put_nowait(3)
        assert [q.get(), q.get(True, 5.0), q.get_nowait()] == [1, 2, 3]


# -- pipelining --------------------------------------------------------------------------------


def test_pipelined_batches_arrive_in_order(shared_daemon: Daemon, uniq: str) -> None:
    with shared_daemon.connect() as m:
        q = m.Queue(uniq)
        with m.pipeline() as p:
            sent = [q.put_many_async(range(i, i + 10)) for i in range(0, 100, 10)]
        assert all(s.settled and s.result() is None for s in sent)
        assert p.results == [None] * 10
        with m.pipeline():
            gets = [q.get_many_async(30) for _ in range(4)]
        assert [x for g in gets for x in g.result()] == list(range(100))


def test_a_pipeline_left_by_an_exception_gives_its_items_back(
    shared_daemon: Daemon, uniq: str
) -> None:
    with shared_daemon.connect() as m:
        q = m.Queue(uniq)
        q.put_many(range(10))
        with pytest.raises(ZeroDivisionError), m.pipeline():
            first = q.get_many_async(3)
            second = q.get_many_async(3)
            assert second.result() == [3, 4, 5]  # read: this one is the caller's
            1 / 0  # noqa: B018
        assert first.settled
        with pytest.raises(RuntimeError, match="given up"):
            first.result()
        # 0, 1, 2 went back to the front; 3, 4, 5 were read.
        assert q.get_many(10) == [0, 1, 2, 6, 7, 8, 9]


def test_a_cancelled_pending_gives_its_items_back_and_errors_come_through(
    shared_daemon: Daemon, uniq: str
) -> None:
    with shared_daemon.connect() as m:
        q = m.Queue(uniq)
        q.put_many(["a", "b"])
        pending = q.get_many_async(5)
        pending.cancel()
        assert q.get_many(5) == ["a", "b"]
        empty = q.get_many_async(1, False)
        with pytest.raises(queue.Empty):
            empty.result()
        with pytest.raises(queue.Empty):  # read again: the same answer
            empty.result()
        with pytest.raises(queue.Empty), m.pipeline():
            q.get_many_async(1, False)
        # Many in flight, then read: every lane given back.
        many = [q.put_many_async([i]) for i in range(200)]
        for p in many:
            p.result()
        assert q.qsize() == 200
