"""Per-address limits before authentication: failed-handshake penalties, pending handshakes.

Real daemons over real sockets. The hostile peer connects from 127.0.0.2 and
the well-behaved client from 127.0.0.1: two addresses, as two hosts would be.
Loopback is exempt from penalties by default, so these daemons exempt only
127.0.0.1 (or nothing) unless a test says otherwise.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from managerd.service.peers import LogBudget, PeerGuard
from managerd_client import ConnectFailed, connect
from managerd_client.wire import (
    CHALLENGE,
    FAILURE,
    REFUSED,
    WELCOME,
    FrameSocket,
    client_handshake,
    create_response,
)

from conftest import Daemon, free_port, metric, wait_until

HOSTILE = "127.0.0.2"
WRONG = b"{sha256}" + bytes(32)  # well formed, never the right HMAC


def start(tmp: Path, daemons: list[Daemon], **env: str) -> tuple[Daemon, int]:
    port = free_port()
    env.setdefault("auth_penalty_exempt", "127.0.0.1/32")
    settings_env = {f"MANAGERD_{k.upper()}": v for k, v in env.items()}
    d = Daemon(tmp, env=settings_env, args=["--metrics-port", str(port)]).start()
    daemons.append(d)
    assert wait_until(lambda: "metrics on http://" in d.log)
    return d, port


def status(d: Daemon) -> str:
    """``managerd status`` (text) against ``d``."""
    done = subprocess.run(
        [sys.executable, "-m", "managerd", "status", "--port", str(d.port), "--interval-s", "0"],
        env=dict(os.environ, MANAGERD_AUTHKEY=d.authkey.decode()),
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return done.stdout


def dial(d: Daemon, source: str = HOSTILE) -> FrameSocket:
    """A raw connection to the daemon from ``source``, nothing sent."""
    sock = socket.socket()
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", d.port))
    return FrameSocket(sock)


def fail_once(d: Daemon, source: str = HOSTILE) -> None:
    """One handshake with a wrong answer: the daemon says FAILURE."""
    with closing(dial(d, source)) as fs:
        assert fs.recv_frame().startswith(CHALLENGE)
        fs.send_frame(WRONG)
        assert fs.recv_frame() == FAILURE


def authenticates(d: Daemon, source: str = HOSTILE) -> bool:
    """A whole handshake with the right authkey from ``source``."""
    with closing(dial(d, source)) as fs:
        try:
            client_handshake(fs, d.authkey)
        except ConnectionRefusedError:
            return False
        return True


def test_an_address_failing_too_often_is_refused_and_others_are_not(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    d, port = start(tmp_path, daemons, auth_failure_limit="5", auth_penalty_s="10")
    with d.connect() as m:  # connected before the flood; stays served throughout
        m.Queue("p.q").put("kept")
        for _ in range(5):
            fail_once(d)
        assert wait_until(lambda: "refusing connections from 127.0.0.2" in d.log)
        # Operators see who is refused, and for how long.
        shown = status(d)
        assert "addresses refused for failed handshakes (1)" in shown
        assert "127.0.0.2" in shown

        # The next connection from that address gets no challenge: one REFUSED frame.
        with closing(dial(d)) as fs:
            fs.send_frame(WRONG)  # ignored: nothing of a held connection is read
            first = fs.recv_frame()
        assert first.startswith(REFUSED)
        assert b"too many failed authentications from 127.0.0.2" in first
        # The right authkey does not help while the penalty lasts.
        assert not authenticates(d)

        # Another address connects and works, and so does the old session.
        with connect(d.address, authkey=d.authkey) as other:
            assert other.Queue("p.q").get(timeout=5) == "kept"
        assert m.Queue("p.q").qsize() == 0

        assert metric(port, "managerd_auth_failures_total") == 5  # held ones never failed
        assert metric(port, "managerd_address_penalties_total") == 1
        assert metric(port, "managerd_addresses_penalized") == 1
        assert metric(port, "managerd_limits_hit_total", limit="auth_penalty") == 2
        assert d.log.count("refusing connections from 127.0.0.2") == 1
        # Each refused connection is a log line too (within the refusal log budget).
        assert "refused: too many failed authentications from 127.0.0.2" in d.log

        # The penalty ends by itself.
        assert wait_until(lambda: metric(port, "managerd_addresses_penalized") == 0, 20)
        assert authenticates(d)
        m.ping()


def test_garbage_and_silent_handshakes_count_as_failures(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    d, port = start(
        tmp_path, daemons, auth_failure_limit="3", auth_penalty_s="30", handshake_timeout_s="0.5"
    )
    with closing(dial(d)) as fs:  # a frame over the 256-byte handshake limit
        fs.recv_frame()
        fs.sock.sendall((100_000).to_bytes(4, "big") + os.urandom(64))
        with pytest.raises((EOFError, ConnectionError)):
            fs.recv_frame()
    with closing(dial(d)) as fs:  # silence until the handshake timeout
        fs.recv_frame()
        with pytest.raises((EOFError, ConnectionError)):
            fs.recv_frame()
    with closing(dial(d)) as fs:  # an answer, then not the peer's challenge
        client_challenge = fs.recv_frame()
        assert client_challenge.startswith(CHALLENGE)
        fs.send_frame(create_response(d.authkey, client_challenge))
        assert fs.recv_frame() == WELCOME
        fs.send_frame(b"not a challenge")
        with pytest.raises((EOFError, ConnectionError)):
            fs.recv_frame()
    assert wait_until(lambda: metric(port, "managerd_address_penalties_total") == 1)
    with closing(dial(d)) as fs:
        assert fs.recv_frame().startswith(REFUSED)


def test_successes_and_a_few_failures_do_not_penalize(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    d, port = start(tmp_path, daemons, auth_failure_limit="5", auth_penalty_s="1")
    for _ in range(4):
        fail_once(d)
    for _ in range(50):
        assert authenticates(d)
    # Failures are counted per window: four more after it has passed are four, not eight.
    time.sleep(1.2)
    for _ in range(4):
        fail_once(d)
    assert authenticates(d)
    assert metric(port, "managerd_address_penalties_total") == 0
    assert metric(port, "managerd_auth_failures_total") == 8
    # A peer that hangs up mid-handshake has not failed one.
    for _ in range(10):
        with closing(dial(d)) as fs:
            fs.recv_frame()
    assert authenticates(d)
    assert metric(port, "managerd_address_penalties_total") == 0


def test_the_client_library_says_why_it_was_refused(tmp_path: Path, daemons: list[Daemon]) -> None:
    """A penalty that outlasts the connect timeout fails at once, naming the wait."""
    d, _ = start(
        tmp_path, daemons, auth_failure_limit="2", auth_penalty_s="30", auth_penalty_exempt=""
    )
    for _ in range(2):
        fail_once(d, source="127.0.0.1")
    started = time.monotonic()
    with pytest.raises(ConnectFailed) as caught:
        connect(d.address, authkey=d.authkey, connect_timeout_s=5)
    took = time.monotonic() - started
    message = str(caught.value)
    assert "too many failed authentications from 127.0.0.1" in message
    assert re.search(r"refused for another (29|30)s", message), message
    assert "would outlast connect_timeout_s=5" in message
    assert caught.value.retry_after_s is not None and 25 < caught.value.retry_after_s <= 30
    assert took < 4  # one held second, not the whole connect timeout


def test_a_penalty_shorter_than_the_connect_timeout_is_waited_out(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    d, port = start(
        tmp_path, daemons, auth_failure_limit="2", auth_penalty_s="3", auth_penalty_exempt=""
    )
    for _ in range(2):
        fail_once(d, source="127.0.0.1")
    assert metric(port, "managerd_addresses_penalized") == 1
    started = time.monotonic()
    with connect(d.address, authkey=d.authkey, connect_timeout_s=10) as m:
        m.ping()
    took = time.monotonic() - started
    assert 2 < took < 8, took  # it waited for the penalty to end, then connected
    assert "refused: too many failed authentications from 127.0.0.1" in d.log


def test_one_hostile_process_on_loopback_locks_nobody_out(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """Issue 11 (7): garbage and silent handshakes from 127.0.0.1 (default settings)."""
    port = free_port()
    d = Daemon(
        tmp_path,
        env={"MANAGERD_HANDSHAKE_TIMEOUT_S": "1"},  # only so the silent ones fail quickly
        args=["--metrics-port", str(port)],
    ).start()
    daemons.append(d)
    assert wait_until(lambda: "metrics on http://" in d.log)
    for _ in range(5):
        with closing(dial(d, "127.0.0.1")) as fs:
            fs.recv_frame()
            fs.sock.sendall((100_000).to_bytes(4, "big") + os.urandom(64))
            with pytest.raises((EOFError, ConnectionError)):
                fs.recv_frame()
    silent = [dial(d, "127.0.0.1") for _ in range(50)]
    try:
        assert wait_until(
            lambda: metric(port, "managerd_limits_hit_total", limit="handshake_timeout") == 50, 30
        )
    finally:
        for fs in silent:
            fs.close()
    with connect(d.address, authkey=d.authkey, connect_timeout_s=2) as m:
        m.ping()
    assert metric(port, "managerd_address_penalties_total") == 0
    assert "refusing connections from" not in d.log


def test_penalty_exempt_setting_is_parsed_and_checked(tmp_path: Path) -> None:
    def serve(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "managerd", *args],
            env=dict(os.environ, MANAGERD_AUTHKEY="k", **env),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    def shown(*args: str, **env: str) -> object:
        done = serve("config", *args, **env)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)["auth_penalty_exempt"]

    assert shown() == ["127.0.0.0/8", "::1/128"]
    assert shown(MANAGERD_AUTH_PENALTY_EXEMPT="") == []
    assert shown(MANAGERD_AUTH_PENALTY_EXEMPT="10.0.0.0/8, fd00::/8") == ["10.0.0.0/8", "fd00::/8"]
    assert shown(MANAGERD_AUTH_PENALTY_EXEMPT='["10.1.0.0/16"]') == ["10.1.0.0/16"]
    assert shown("--auth-penalty-exempt", "10.2.3.4", "--auth-penalty-exempt", "::1") == [
        "10.2.3.4/32",
        "::1/128",
    ]
    toml = tmp_path / "m.toml"
    toml.write_text('auth_penalty_exempt = ["192.168.0.0/16"]\n')
    assert shown("-c", str(toml)) == ["192.168.0.0/16"]
    assert shown("-c", str(toml), "--auth-penalty-exempt", "") == []  # the flag wins
    for bad in ("10.0.0.0/33", "not-a-network", "10.0.0.1/8"):
        done = serve("serve", "--port", "0", "--auth-penalty-exempt", bad)
        assert done.returncode == 2
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "auth_penalty_exempt" in lines[0] and bad in lines[0], lines


def test_penalty_off(tmp_path: Path, daemons: list[Daemon]) -> None:
    d, port = start(tmp_path, daemons, auth_failure_limit="0")
    for _ in range(30):
        fail_once(d)
    assert authenticates(d)
    assert metric(port, "managerd_address_penalties_total") == 0


def test_one_address_cannot_hold_more_than_its_pending_handshakes(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    d, port = start(tmp_path, daemons, max_handshakes_per_peer="3", handshake_timeout_s="30")
    pending = [dial(d) for _ in range(3)]
    for fs in pending:
        assert fs.recv_frame().startswith(CHALLENGE)
    with closing(dial(d)) as fs:
        refused = fs.recv_frame()
    assert refused.startswith(REFUSED)
    assert b"too many unauthenticated connections from 127.0.0.2" in refused
    assert wait_until(lambda: "refused: too many unauthenticated connections" in d.log)
    assert metric(port, "managerd_handshakes_pending") == 3
    assert metric(port, "managerd_limits_hit_total", limit="handshakes_per_peer") == 1
    # Another address is not affected.
    with connect(d.address, authkey=d.authkey) as m:
        m.ping()
    # A finished handshake frees its place; so does a hang-up.
    fs = pending.pop()
    fs.send_frame(WRONG)
    assert fs.recv_frame() == FAILURE
    fs.close()
    pending.pop().close()
    assert wait_until(lambda: metric(port, "managerd_handshakes_pending") == 1)
    assert authenticates(d)
    for fs in pending:
        fs.close()
    assert wait_until(lambda: metric(port, "managerd_handshakes_pending") == 0)
    assert metric(port, "managerd_address_penalties_total") == 0


# -- the guard's bookkeeping, driven directly --------------------------------------------------

ADDRESSES = st.sampled_from([f"10.0.0.{i}" for i in range(6)])
STEPS = st.lists(st.tuples(st.sampled_from(["connect", "fail", "end"]), ADDRESSES), max_size=300)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(STEPS)
def test_guard_bookkeeping_stays_consistent(steps: list[tuple[str, str]]) -> None:
    """Pending counts match the connections open; tables stay within their bound."""
    guard = PeerGuard(3, 60.0, 4, LogBudget())
    open_: dict[str, int] = {}
    failures: dict[str, int] = {}
    for op, address in steps:
        if op == "connect":
            refusal = guard.refusal(address)
            penalized = failures.get(address, 0) >= 3
            full = open_.get(address, 0) >= 4
            if penalized or full:
                assert refusal is not None
                assert refusal[1] == (penalized and not full)
                if refusal[1]:
                    guard.begin(address)
                    open_[address] = open_.get(address, 0) + 1
            else:
                assert refusal is None
                guard.begin(address)
                open_[address] = open_.get(address, 0) + 1
        elif op == "end" and open_.get(address):
            guard.end(address)
            open_[address] -= 1
        elif op == "fail" and open_.get(address) and failures.get(address, 0) < 3:
            guard.failed(address)
            guard.end(address)
            open_[address] -= 1
            failures[address] = failures.get(address, 0) + 1
        assert guard.pending() == sum(open_.values())


def test_guard_exempts_its_networks() -> None:
    guard = PeerGuard(1, 60.0, 10, LogBudget(), exempt=["127.0.0.0/8", "::1/128", "10.9.0.0/16"])
    for address in ("127.0.0.1", "127.4.5.6", "::1", "::ffff:127.0.0.1", "10.9.200.1"):
        guard.failed(address)
        assert guard.is_exempt(address) and guard.refusal(address) is None, address
    for address in ("10.8.0.1", "::2", "192.168.1.1"):
        guard.failed(address)
        refusal = guard.refusal(address)
        assert refusal is not None and refusal[2] is not None, address
    assert not PeerGuard(1, 60.0, 10, LogBudget()).is_exempt("127.0.0.1")  # an empty list
    assert not guard.is_exempt("/tmp/socket")  # not an IP address


def test_guard_forgets_the_oldest_when_full() -> None:
    guard = PeerGuard(1, 60.0, 10, LogBudget(), max_tracked=100)
    for i in range(1000):
        guard.failed(f"10.1.{i // 256}.{i % 256}")
    penalized = guard.penalized()
    assert len(penalized) == 100
    assert "10.1.3.231" in penalized  # the newest is kept
    assert guard.penalties == 1000
