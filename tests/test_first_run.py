"""A new user's first run: ports, keys and the messages they read (issue 15)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from multiprocessing.managers import BaseManager
from pathlib import Path

import pytest

from managerd_client import connect

from conftest import Daemon

ROOT = Path(__file__).resolve().parent.parent


class Stock(BaseManager):
    pass


Stock.register("Queue")


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MANAGERD_")}
    return subprocess.run(
        [sys.executable, "-m", "managerd", "serve", *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_port_in_use_leaves_no_key_and_no_directory(tmp_path: Path, taken_port: int) -> None:
    data = tmp_path / "managerd-dtaa"  # mistyped: must not be created
    done = serve("--port", str(taken_port), "--data-dir", str(data))
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{taken_port}" in done.stderr
    assert not data.exists()


def test_a_metrics_port_in_use_is_said_like_the_main_port(tmp_path: Path, taken_port: int) -> None:
    data = tmp_path / "data"
    done = serve("--port", "0", "--metrics-port", str(taken_port), "--data-dir", str(data))
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{taken_port} (metrics): " in done.stderr
    assert "Traceback" not in done.stderr
    assert not data.exists()


def test_the_client_strips_a_key_files_newline(daemon: Daemon, tmp_path: Path) -> None:
    key_file = tmp_path / "authkey"
    key_file.write_bytes(daemon.authkey + b"\n")  # as `serve` writes its key file
    with open(key_file, "rb") as f, connect(daemon.address, authkey=f.read()) as m:
        m.ping()


def test_a_missing_key_file_names_the_variable_and_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MANAGERD_AUTHKEY", raising=False)
    missing = tmp_path / "no-such-key"
    monkeypatch.setenv("MANAGERD_AUTHKEY_FILE", str(missing))
    with pytest.raises(ValueError, match="MANAGERD_AUTHKEY_FILE") as refused:
        connect("127.0.0.1:1")
    assert str(missing) in str(refused.value)


def test_a_stock_clients_refused_class_names_allowed_classes(
    tmp_path: Path, daemons: list[Daemon], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "mytypes_issue15.py").write_text(
        "class Point:\n    def __init__(self, x):\n        self.x = x\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import mytypes_issue15  # type: ignore[import-not-found]  # written just above

    (tmp_path / "a").mkdir()
    plain = Daemon(tmp_path / "a").start()
    daemons.append(plain)
    m = Stock(address=("127.0.0.1", plain.port), authkey=plain.authkey)
    m.connect()
    with pytest.raises(Exception, match="allowed_classes") as refused:
        m.Queue("q").put(mytypes_issue15.Point(1))  # type: ignore[attr-defined]
    assert "must be able to import" in str(refused.value)

    (tmp_path / "b").mkdir()
    allowing = Daemon(
        tmp_path / "b", env={"MANAGERD_ALLOWED_CLASSES": '["mytypes_issue15.Point"]'}
    ).start()
    daemons.append(allowing)
    m = Stock(address=("127.0.0.1", allowing.port), authkey=allowing.authkey)
    m.connect()
    with pytest.raises(Exception, match="cannot import it") as refused:
        m.Queue("q").put(mytypes_issue15.Point(1))  # type: ignore[attr-defined]
    assert "install its module where the daemon runs" in str(refused.value)


def test_the_readme_serves_without_the_dev_tools() -> None:
    readme = (ROOT / "README.md").read_text()
    serve_line = next(line for line in readme.splitlines() if "managerd serve --data-dir" in line)
    assert "uv run --no-dev" in serve_line and "&&" in serve_line  # still one line
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["dependency-groups"]["dev"]
    assert any(dep.startswith("mypy") for dep in dev)  # the test command still gets them


def test_podman_is_told_to_keep_the_healthcheck() -> None:
    deploy = (ROOT / "deploy" / "README.md").read_text()
    assert "podman build --format docker -f deploy/Dockerfile" in deploy
    assert "HEALTHCHECK" in (ROOT / "deploy" / "Dockerfile").read_text()
