"""Several addresses for one client: ``connect("h1:p1,h2:p2")``, a list, or
``MANAGERD_ADDRESSES``. A connect tries them in turn from the one last used;
a dead one is passed over, now and at every reconnect (real daemons, real
kill -9)."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from managerd_client import ConnectFailed, LockLost, connect
from managerd_client.client import manager_for

from conftest import Daemon, free_port


def _pair(daemons: list[Daemon], tmp_path: Path) -> tuple[Daemon, Daemon]:
    """Two daemons with one authkey (two gateways, or a daemon and its standby)."""
    a, b = Daemon(tmp_path), Daemon(tmp_path)
    b.authkey = a.authkey
    daemons.extend((a.start(), b.start()))
    return a, b


def _quiet() -> None:
    """Let the client's last reply age past its idle check: a call within 50 ms of a
    reply is sent without polling the connection first, and fails with
    ConnectionLost like any call in flight when its daemon dies."""
    time.sleep(0.1)


def _dead_address() -> str:
    return f"127.0.0.1:{free_port()}"  # nobody listens there


def test_a_dead_first_address_is_passed_over(daemon: Daemon, uniq: str) -> None:
    with connect(f"{_dead_address()},{daemon.address}", daemon.authkey) as m:
        assert m.address == (daemon.host, daemon.port)
        q = m.Queue(uniq)
        q.put("x")
        assert q.get(timeout=1) == "x"


def test_failover_to_the_next_daemon_when_one_dies(
    daemons: list[Daemon], tmp_path: Path, uniq: str
) -> None:
    a, b = _pair(daemons, tmp_path)
    m = connect([a.address, (b.host, b.port)], a.authkey, connect_timeout_s=10)
    try:
        assert m.address == (a.host, a.port)
        lock = m.Lock(uniq + ".lock")
        assert lock.acquire()
        a.kill()
        _quiet()
        # The next call reconnects, to b: a different daemon, so a new session
        # (its objects are b's, and the lock held on a is gone with a).
        q = m.Queue(uniq)
        q.put(1)
        assert m.address == (b.host, b.port)
        assert q.get(timeout=1) == 1
        with pytest.raises(LockLost):
            lock.release()
        with b.connect() as other:
            assert uniq in {name for name, _ in other.objects()}
    finally:
        m.close()


def test_sticks_to_the_address_in_use(daemons: list[Daemon], tmp_path: Path, uniq: str) -> None:
    """After a failover the client stays on the daemon that took it, even once the
    first one is back (no flapping between daemons)."""
    a, b = _pair(daemons, tmp_path)
    m = connect(f"{a.address},{b.address}", a.authkey, connect_timeout_s=10)
    try:
        a.kill()
        _quiet()
        m.Queue(uniq).put(1)
        assert m.address == (b.host, b.port)
        a.start(port=a.port)
        b.restart()  # b goes away for a moment: the next connect starts at b
        _quiet()
        assert m.Queue(uniq).qsize() == 0  # memory-only b: empty again
        assert m.address in {(a.host, a.port), (b.host, b.port)}
    finally:
        m.close()


def test_no_address_answers(uniq: str) -> None:
    with pytest.raises(ConnectFailed, match="no address answered"):
        connect(f"{_dead_address()},{_dead_address()}", b"key", connect_timeout_s=1)


@pytest.mark.parametrize(
    ("address", "error"),
    [
        ("", ValueError),
        ("127.0.0.1:1,,127.0.0.1:2", ValueError),
        ("127.0.0.1:notaport", ValueError),
        ("127.0.0.1:0", ValueError),
        ("127.0.0.1:70000", ValueError),
        ([], ValueError),
        (("127.0.0.1", "50000"), ValueError),
        (("127.0.0.1", 1, 2), ValueError),
        (50000, TypeError),
        ([50000], TypeError),
        (b"127.0.0.1:1", TypeError),
    ],
)
def test_bad_addresses_are_refused_clearly(address: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        connect(address, b"key", connect_timeout_s=1)


def test_addresses_from_the_environment(daemon: Daemon, uniq: str) -> None:
    code = (
        "import managerd_client as c\n"
        f"m = c.connect()\nm.Queue({uniq!r}).put('from env')\nprint(m.address[1])\nm.close()\n"
    )
    env = daemon.client_env()
    env.pop("MANAGERD_ADDRESS")
    env["MANAGERD_ADDRESSES"] = f"{_dead_address()},{daemon.address}"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == daemon.port
    with daemon.connect() as m:
        assert m.Queue(uniq).get(timeout=1) == "from env"
    env.pop("MANAGERD_ADDRESSES")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode != 0 and "MANAGERD_ADDRESSES" in out.stderr


def _put_from_child(q: Any) -> None:
    q.put(os.getpid())


def test_a_proxy_sent_to_a_child_carries_every_address(daemon: Daemon, uniq: str) -> None:
    """A spawned child rebuilds the proxy's manager from all its addresses, so a
    dead first address does not stop it."""
    with connect(f"{_dead_address()},{daemon.address}", daemon.authkey) as m:
        q = m.Queue(uniq)
        proc = multiprocessing.get_context("spawn").Process(target=_put_from_child, args=(q,))
        proc.start()
        proc.join(60)
        assert proc.exitcode == 0
        assert q.get(timeout=5) == proc.pid
        # Rebuilt in this process, the proxy finds this manager by any shared address.
        assert manager_for(m.addresses[1:], None) is m
