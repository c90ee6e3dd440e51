"""Fixtures: a real ``managerd serve`` process on an ephemeral port.

The daemon is started as a subprocess (``python -m managerd serve --port
0``) and is ready when it logs the address it listens on; never a sleep.
Each fixture stops what it started.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from managerd_client import Manager, connect

READY = re.compile(r"managerd serving on (\S+):(\d+)")
START_TIMEOUT_S = 30.0


class Daemon:
    """A running ``managerd serve`` subprocess."""

    def __init__(self, tmp: Path, env: dict[str, str] | None = None, args: list[str] | None = None):
        self.tmp = tmp
        self.authkey = secrets.token_hex(16).encode()
        self.extra_env = env or {}
        self.args = args or []
        self.python = sys.executable  # the benchmarks run another checkout's interpreter
        self.proc: subprocess.Popen[str] | None = None
        self.host = "127.0.0.1"
        self.port = 0
        self.lines: list[str] = []
        self._reader: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "MANAGERD_AUTHKEY": self.authkey.decode(),
                "MANAGERD_LOG_LEVEL": "INFO",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.extra_env)
        return env

    def start(self, port: int | None = None, prefix: list[str] | None = None) -> Daemon:
        """Start and wait until it listens. ``prefix`` wraps the command (ip netns exec)."""
        cmd = [
            *(prefix or []),
            self.python,
            "-m",
            "managerd",
            "serve",
            "--host",
            self.host,
            "--port",
            str(self.port if port is None else port),
            *self.args,
        ]
        self.proc = subprocess.Popen(
            cmd,
            env=self.env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        ready = threading.Event()
        proc = self.proc

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                self.lines.append(line.rstrip("\n"))
                m = READY.search(line)
                if m:
                    self.port = int(m.group(2))
                    ready.set()
            ready.set()

        self._reader = threading.Thread(target=pump, daemon=True)
        self._reader.start()
        if not ready.wait(START_TIMEOUT_S) or (proc.poll() is not None and not self.port):
            self.stop()
            raise RuntimeError("managerd did not start:\n" + self.log)
        if proc.poll() is not None:
            raise RuntimeError("managerd exited:\n" + self.log)
        return self

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def connect(self, **kwargs: Any) -> Manager:
        return connect(self.address, authkey=self.authkey, **kwargs)

    def client_env(self) -> dict[str, str]:
        """Environment for a client subprocess: address and authkey."""
        env = dict(os.environ)
        env["MANAGERD_AUTHKEY"] = self.authkey.decode()
        env["MANAGERD_ADDRESS"] = self.address
        return env

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout_s: float = 15.0) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout_s)
        if self._reader is not None:
            self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return code

    def kill(self) -> None:
        """SIGKILL: a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.wait()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.wait()

    def restart(self) -> Daemon:
        """Stop and start again on the same port."""
        self.stop()
        return self.start(port=self.port)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A fresh daemon for one test."""
    d = Daemon(tmp_path).start()
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon for a whole test module; tests use distinct object names."""
    d = Daemon(tmp_path_factory.mktemp("managerd")).start()
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    """Daemons a test starts; each is stopped afterwards."""
    started: list[Daemon] = []
    try:
        yield started
    finally:
        for d in started:
            d.stop()


@pytest.fixture
def manager(shared_daemon: Daemon) -> Iterator[Manager]:
    m = shared_daemon.connect()
    try:
        yield m
    finally:
        m.close()


@pytest.fixture
def uniq(request: pytest.FixtureRequest) -> str:
    """A name prefix unique to this test (object names on a shared daemon)."""
    return re.sub(r"\W+", "_", request.node.name) + "_" + secrets.token_hex(3)


def wait_until(predicate: Any, timeout_s: float = 10.0, interval_s: float = 0.01) -> bool:
    """Poll ``predicate`` until true or the timeout; for observing other processes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return bool(predicate())


def free_port() -> int:
    """A TCP port free on loopback now (for a daemon's metrics endpoint)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metric(port: int, name: str, **labels: str) -> float:
    """One sample of a real scrape of ``/metrics``, by name and exact labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    selector = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "")
    match = re.search(rf"^{selector} (\S+)$", text, re.MULTILINE)
    assert match is not None, f"no sample {name}{{{want}}} in the scrape"
    return float(match.group(1))
