"""The operator's edges: ``managerd serve``/``config``/``check`` as real processes.

Every test runs the real command (``python -m managerd ...``) with a clean
environment: no ``MANAGERD_*`` variable leaks in from the caller, and
``HOME`` is a temporary directory so that a generated key never lands in the
real one.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from multiprocessing.managers import BaseManager
from pathlib import Path

import pytest

from managerd_client import AuthenticationFailed, ConnectFailed, connect

from conftest import Daemon, wait_until

REPO = Path(__file__).resolve().parent.parent
RUN_TIMEOUT_S = 60.0
MASK = "**********"


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """The caller's environment without ``MANAGERD_*``, with ``HOME`` set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MANAGERD_")}
    env["HOME"] = str(home)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def managerd(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run ``python -m managerd ARGS`` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "managerd", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )


def config_json(*args: str, env: dict[str, str]) -> dict[str, object]:
    done = managerd("config", *args, env=env)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert isinstance(data, dict)
    return data


def key_file(path: Path, key: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(key + b"\n")
    path.chmod(mode)
    return path


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    return home


class KeylessDaemon(Daemon):
    """A daemon started with neither MANAGERD_AUTHKEY nor MANAGERD_AUTHKEY_FILE."""

    def __init__(self, tmp: Path, home: Path, args: list[str] | None = None) -> None:
        super().__init__(tmp, args=args)
        self.home = home

    def env(self) -> dict[str, str]:
        return clean_env(self.home, MANAGERD_LOG_LEVEL="INFO")


@pytest.fixture
def keyless(tmp_path: Path, home: Path) -> Iterator[list[KeylessDaemon]]:
    """Keyless daemons a test starts; all stopped at teardown."""
    started: list[KeylessDaemon] = []
    try:
        yield started
    finally:
        for d in started:
            d.stop()


# -- the command itself -------------------------------------------------------------


def test_python_m_managerd_help(home: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "managerd", "--help"],
        env=clean_env(home),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    for command in ("serve", "config", "check"):
        assert command in done.stdout


def test_console_script_is_installed(home: Path) -> None:
    script = Path(sys.executable).parent / "managerd"
    assert script.is_file(), f"no console script at {script}"
    done = subprocess.run(
        [str(script), "serve", "--help"],
        env=clean_env(home),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "--port" in done.stdout


# -- config -------------------------------------------------------------------------


def test_config_masks_the_authkey(home: Path) -> None:
    secret = "s3cret-" + os.urandom(8).hex()
    done = managerd("config", env=clean_env(home, MANAGERD_AUTHKEY=secret))
    assert done.returncode == 0, done.stderr
    assert secret not in done.stdout + done.stderr
    data = json.loads(done.stdout)
    assert data["authkey"] == MASK
    assert data["host"] == "127.0.0.1"
    assert data["port"] == 50000


def test_config_without_authkey_shows_none_and_creates_no_key(home: Path) -> None:
    data = config_json(env=clean_env(home))
    assert data["authkey"] is None
    assert not (home / ".config" / "managerd").exists()


def test_config_takes_every_flag_serve_takes(tmp_path: Path, home: Path) -> None:
    """`config` shows what `serve` would run with, for every flag `serve` has."""

    def help_of(command: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "managerd", command, "--help"],
            env=dict(clean_env(home), COLUMNS="200"), capture_output=True, text=True,
            timeout=RUN_TIMEOUT_S, check=True,
        ).stdout  # fmt: skip

    flags = set(re.findall(r"--[a-z][a-z-]+", help_of("serve")))
    assert {"--fsync", "--recover", "--tls-cert", "--tls-require-client-cert"} <= flags
    assert flags == set(re.findall(r"--[a-z][a-z-]+", help_of("config")))
    cert = tmp_path / "cert.pem"
    shown = config_json(
        "--fsync", "always", "--fsync-interval-s", "0.5", "--recover", "--tls-cert", str(cert),
        "--tls-require-client-cert", "--data-dir", str(tmp_path), env=clean_env(home),
    )  # fmt: skip
    assert (shown["fsync"], shown["fsync_interval_s"], shown["recover"]) == ("always", 0.5, True)
    assert (shown["tls_cert"], shown["tls_require_client_cert"]) == (str(cert), True)


def test_config_precedence_flags_over_env_over_toml_over_defaults(
    tmp_path: Path, home: Path
) -> None:
    toml = tmp_path / "managerd.toml"
    toml.write_text(
        'host = "10.213.0.1"\nport = 1111\nsession_ttl_s = 7.5\nlog_level = "WARNING"\n'
    )
    env = clean_env(home, MANAGERD_PORT="2222", MANAGERD_SESSION_TTL_S="8.5")

    defaults = config_json(env=clean_env(home))
    from_toml = config_json("--config", str(toml), env=clean_env(home))
    with_env = config_json("-c", str(toml), env=env)
    with_flags = config_json("-c", str(toml), "--port", "3333", "--log-level", "debug", env=env)

    assert (defaults["port"], defaults["session_ttl_s"]) == (50000, 10.0)
    assert defaults["log_level"] == "INFO"
    # TOML over defaults
    assert from_toml["host"] == "10.213.0.1"
    assert (from_toml["port"], from_toml["session_ttl_s"]) == (1111, 7.5)
    assert from_toml["log_level"] == "WARNING"
    # environment over TOML; TOML still fills what the environment leaves
    assert (with_env["port"], with_env["session_ttl_s"]) == (2222, 8.5)
    assert with_env["host"] == "10.213.0.1"
    # flags over environment and TOML
    assert with_flags["port"] == 3333
    assert with_flags["log_level"] == "DEBUG"
    assert with_flags["session_ttl_s"] == 8.5
    assert with_flags["max_connections"] == defaults["max_connections"]


def test_config_rejects_unknown_toml_key_and_missing_file(tmp_path: Path, home: Path) -> None:
    toml = tmp_path / "bad.toml"
    toml.write_text("port = 1\nprot = 2\n")
    done = managerd("config", "-c", str(toml), env=clean_env(home))
    assert done.returncode == 2
    assert "prot" in done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1

    missing = tmp_path / "nowhere.toml"
    done = managerd("config", "-c", str(missing), env=clean_env(home))
    assert done.returncode == 2
    assert str(missing) in done.stderr
    assert "Traceback" not in done.stderr


def test_config_rejects_an_invalid_value(home: Path) -> None:
    done = managerd("config", env=clean_env(home, MANAGERD_PORT="70000"))
    assert done.returncode == 2
    assert done.stderr.startswith("managerd: invalid settings: port")
    assert "Traceback" not in done.stderr


# -- check --------------------------------------------------------------------------


def test_check_exits_0_when_a_daemon_answers_and_1_when_none(daemon: Daemon, home: Path) -> None:
    env = clean_env(home, MANAGERD_AUTHKEY=daemon.authkey.decode())
    port = str(daemon.port)

    ok = managerd("check", "--port", port, env=env)
    assert ok.returncode == 0, ok.stderr
    assert f"127.0.0.1:{port}" in ok.stdout

    daemon.stop()
    down = managerd("check", "--port", port, "--timeout-s", "0.5", env=env)
    assert down.returncode == 1
    assert f"no daemon answering at 127.0.0.1:{port}" in down.stderr
    assert "Traceback" not in down.stderr


def test_check_exits_1_on_a_wrong_authkey(daemon: Daemon, home: Path) -> None:
    env = clean_env(home, MANAGERD_AUTHKEY="not-" + daemon.authkey.decode())
    done = managerd("check", "--port", str(daemon.port), env=env)
    assert done.returncode == 1
    assert "refused the authkey" in done.stderr
    assert daemon.authkey.decode() not in done.stderr


def test_check_reads_an_authkey_file(daemon: Daemon, tmp_path: Path, home: Path) -> None:
    path = key_file(tmp_path / "key", daemon.authkey)
    env = clean_env(home, MANAGERD_AUTHKEY_FILE=str(path))
    assert managerd("check", "--port", str(daemon.port), env=env).returncode == 0
    env = clean_env(home)
    done = managerd("check", "--port", str(daemon.port), "--authkey-file", str(path), env=env)
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
def test_check_speaks_tls_to_a_tls_daemon(tmp_path: Path, home: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "2", "-keyout", str(key), "-out", str(cert), "-subj", "/CN=managerd",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=RUN_TIMEOUT_S,
    )  # fmt: skip
    tls_env = {"MANAGERD_TLS_CERT": str(cert), "MANAGERD_TLS_KEY": str(key)}
    d = Daemon(tmp_path, env=tls_env).start()
    try:
        env = clean_env(home, MANAGERD_AUTHKEY=d.authkey.decode(), **tls_env)
        done = managerd("check", "--port", str(d.port), env=env)
        assert done.returncode == 0, done.stderr
        # Without the TLS settings, check cannot talk to it.
        plain = clean_env(home, MANAGERD_AUTHKEY=d.authkey.decode())
        done = managerd("check", "--port", str(d.port), "--timeout-s", "1", env=plain)
        assert done.returncode == 1
        assert "Traceback" not in done.stderr
    finally:
        d.stop()


def test_check_never_creates_a_key(tmp_path: Path, home: Path) -> None:
    data_dir = tmp_path / "data"
    for args in ([], ["--data-dir", str(data_dir)]):
        done = managerd("check", *args, "--timeout-s", "0.5", env=clean_env(home))
        assert done.returncode == 1
        assert "no authkey" in done.stderr
        assert "MANAGERD_AUTHKEY" in done.stderr
    assert not (home / ".config").exists()
    assert not data_dir.exists()


def test_check_uses_the_key_serve_generated(
    tmp_path: Path, home: Path, keyless: list[KeylessDaemon]
) -> None:
    data_dir = tmp_path / "data"
    d = KeylessDaemon(tmp_path, home, args=["--data-dir", str(data_dir)])
    keyless.append(d)
    d.start()
    done = managerd(
        "check", "--data-dir", str(data_dir), "--port", str(d.port), env=clean_env(home)
    )
    assert done.returncode == 0, done.stderr


# -- serve: the authkey -------------------------------------------------------------


def test_serve_generates_a_private_key_and_logs_only_its_path(
    tmp_path: Path, home: Path, keyless: list[KeylessDaemon]
) -> None:
    d = KeylessDaemon(tmp_path, home)
    keyless.append(d)
    d.start()
    path = home / ".config" / "managerd" / "authkey"
    assert path.is_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    key = path.read_bytes().strip()
    assert len(key) >= 32
    assert str(path) in d.log
    assert key.decode() not in d.log
    with connect(d.address, authkey=key) as m:
        m.Queue("q").put(1)

    # A restart reuses the same key: old clients' keys keep working.
    d.restart()
    assert path.read_bytes().strip() == key
    assert key.decode() not in d.log
    with connect(d.address, authkey=key) as m:
        assert m.Queue("q").qsize() == 0  # a new daemon, the same key


def test_serve_generates_the_key_in_data_dir(
    tmp_path: Path, home: Path, keyless: list[KeylessDaemon]
) -> None:
    data_dir = tmp_path / "data"
    d = KeylessDaemon(tmp_path, home, args=["--data-dir", str(data_dir)])
    keyless.append(d)
    d.start()
    path = data_dir / "authkey"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert str(path) in d.log
    assert path.read_bytes().strip().decode() not in d.log
    assert not (home / ".config").exists()


@pytest.mark.parametrize("mode", [0o640, 0o604])
def test_serve_refuses_a_key_file_others_can_read(tmp_path: Path, home: Path, mode: int) -> None:
    secret = b"k-" + os.urandom(8).hex().encode()
    path = key_file(tmp_path / "authkey", secret, mode)
    env = clean_env(home, MANAGERD_AUTHKEY_FILE=str(path))
    done = managerd("serve", "--port", "0", env=env)
    assert done.returncode != 0
    assert f"chmod 600 {path}" in done.stderr
    assert secret.decode() not in done.stdout + done.stderr
    assert "serving on" not in done.stderr
    assert "Traceback" not in done.stderr


def test_serve_refuses_a_missing_key_file(tmp_path: Path, home: Path) -> None:
    path = tmp_path / "absent"
    done = managerd("serve", "--port", "0", "--authkey-file", str(path), env=clean_env(home))
    assert done.returncode != 0
    assert str(path) in done.stderr
    assert "Traceback" not in done.stderr
    assert not path.exists()


def test_serve_refuses_unusable_tls_settings(tmp_path: Path, home: Path) -> None:
    missing = tmp_path / "no-such-cert.pem"
    for extra in (
        {"MANAGERD_TLS_CERT": str(missing)},
        {"MANAGERD_TLS_REQUIRE_CLIENT_CERT": "true"},
    ):
        env = clean_env(home, MANAGERD_AUTHKEY="k", **extra)
        done = managerd("serve", "--port", "0", env=env)
        assert done.returncode == 2, done.stderr
        assert done.stderr.splitlines()[-1].startswith("managerd: ")
        assert "TLS" in done.stderr.splitlines()[-1]
        assert "Traceback" not in done.stderr
        assert "serving on" not in done.stderr


# -- serve: bad input at runtime ----------------------------------------------------


def test_port_in_use_is_one_clear_line(daemon: Daemon, home: Path) -> None:
    env = clean_env(home, MANAGERD_AUTHKEY="k")
    done = managerd("serve", "--port", str(daemon.port), env=env)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if "in use" in line]
    assert lines == [f"managerd: cannot listen on 127.0.0.1:{daemon.port}: Address already in use"]
    assert "Traceback" not in done.stderr
    with daemon.connect() as m:  # the first daemon is unharmed
        m.ping()


def _auth_lines(d: Daemon) -> list[str]:
    return [line for line in d.lines if "authentic" in line.lower()]


def test_wrong_authkey_fails_cleanly_and_the_daemon_serves_on(daemon: Daemon) -> None:
    with daemon.connect() as before:
        held = before.Queue("held")
        held.put("x")

        with pytest.raises(AuthenticationFailed):
            connect(daemon.address, authkey=b"wrong-" + daemon.authkey)
        assert wait_until(lambda: len(_auth_lines(daemon)) >= 1)
        assert len(_auth_lines(daemon)) == 1, daemon.log
        assert daemon.authkey.decode() not in daemon.log

        # A session opened before is untouched, and new ones are welcome.
        assert held.get(timeout=5) == "x"
        with daemon.connect() as after:
            after.Queue("held").put("y")
        assert held.get(timeout=5) == "y"
    assert daemon.proc is not None and daemon.proc.poll() is None
    assert "Traceback" not in daemon.log


def test_wrong_authkey_from_a_stock_client(daemon: Daemon) -> None:
    class Stock(BaseManager):
        pass

    Stock.register("Queue")
    m = Stock(address=(daemon.host, daemon.port), authkey=b"wrong")
    with pytest.raises(multiprocessing.AuthenticationError):
        m.connect()
    assert wait_until(lambda: len(_auth_lines(daemon)) >= 1)
    with daemon.connect() as good:
        good.ping()


def test_connect_to_a_closed_daemon_raises_connect_failed(daemon: Daemon) -> None:
    address = daemon.address
    daemon.stop()
    with pytest.raises(ConnectFailed, match="cannot connect"):
        connect(address, authkey=daemon.authkey, connect_timeout_s=1.0)
    # ConnectFailed is a ConnectionError too, for code that catches builtins.
    with pytest.raises(ConnectionError):
        connect(address, authkey=daemon.authkey, connect_timeout_s=0.2)


def test_connect_to_a_silent_listener_times_out() -> None:
    """Something accepts TCP but never speaks: the handshake gives up, no hang."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        with pytest.raises(ConnectFailed):
            connect(f"127.0.0.1:{port}", authkey=b"k", connect_timeout_s=0.5)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_the_daemon_with_exit_code_0(daemon: Daemon, sig: int) -> None:
    m = daemon.connect()
    try:
        m.Queue("jobs").put(1)
        daemon.signal(sig)
        assert daemon.wait() == 0, daemon.log
    finally:
        m.close()
    assert "stopped" in daemon.log
    assert "Traceback" not in daemon.log


# -- the README is true -------------------------------------------------------------


def _readme_blocks() -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def _expected(code: str) -> list[str]:
    return [line.split("# -> ", 1)[1].strip() for line in code.splitlines() if "# -> " in line]


def test_readme_tour_and_stdlib_snippet_run(daemon: Daemon, tmp_path: Path, home: Path) -> None:
    blocks = _readme_blocks()
    tour = next(b for b in blocks if "from managerd_client import connect" in b)
    stock = next(b for b in blocks if "BaseManager.register" in b)
    assert '"127.0.0.1:50000"' in tour
    assert '("127.0.0.1", 50000)' in stock
    env = clean_env(home, MANAGERD_AUTHKEY_FILE=str(key_file(tmp_path / "key", daemon.authkey)))
    for code in (
        tour.replace('"127.0.0.1:50000"', repr(daemon.address)),
        stock.replace('("127.0.0.1", 50000)', repr((daemon.host, daemon.port))),
    ):
        done = subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == _expected(code)
