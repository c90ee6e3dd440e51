"""Prometheus metrics from a real daemon: exact gauges, counted waits, bounded labels."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from multiprocessing.managers import BaseManager
from pathlib import Path

import pytest

from managerd_client import connect

from conftest import Daemon, free_port, wait_until

spawn = multiprocessing.get_context("spawn")
SAMPLE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$"
)


def scrape(port: int, path: str = "/metrics") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        body: bytes = response.read()
        return body.decode()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if not m:
            continue
        labels = frozenset(
            tuple(part.split("=", 1)) for part in re.findall(r'\w+="[^"]*"', m["labels"] or "")
        )
        labels = frozenset((k, v.strip('"')) for k, v in labels)
        out[(m["name"], labels)] = float(m["value"])
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[(name, frozenset(labels.items()))]


@pytest.fixture(scope="module")
def metered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, int]]:
    port = free_port()
    d = Daemon(
        tmp_path_factory.mktemp("metrics"),
        env={"MANAGERD_METRICS_MAX_OBJECTS": "5"},
        args=["--metrics-port", str(port)],
    ).start()
    assert wait_until(lambda: "metrics on http://" in d.log)
    try:
        yield d, port
    finally:
        d.stop()


def _churn(address: str, authkey: bytes, name: str, puts: int, gets: int) -> None:
    with connect(address, authkey=authkey) as m:
        q = m.Queue(name)
        for i in range(puts):
            q.put(i)
        for _ in range(gets):
            q.get(timeout=10)


def test_scraped_depth_equals_qsize_after_concurrent_clients(metered: tuple[Daemon, int]) -> None:
    d, port = metered
    procs = [
        spawn.Process(target=_churn, args=(d.address, d.authkey, "m.jobs", 300, 100))
        for _ in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    with d.connect() as m:
        depth = m.Queue("m.jobs").qsize()
    text = scrape(port)
    assert depth == 800
    assert value(text, "managerd_queue_depth", queue="m.jobs") == depth
    assert value(text, "managerd_queue_puts_total", queue="m.jobs") == 1200
    assert value(text, "managerd_queue_gets_total", queue="m.jobs") == 400
    assert value(text, "managerd_requests_total", method="Queue.put", outcome="ok") >= 1200


def test_contended_lock_wait_histogram_counts_the_waits(metered: tuple[Daemon, int]) -> None:
    d, port = metered
    with d.connect() as a, d.connect() as b:
        lock_a, lock_b = a.Lock("m.lock"), b.Lock("m.lock")
        before = samples(scrape(port)).get(
            ("managerd_lock_wait_seconds_count", frozenset({("lock", "m.lock")})), 0.0
        )
        for _ in range(3):
            assert lock_a.acquire()
            t = threading.Thread(target=lock_b.acquire)
            t.start()
            assert wait_until(
                lambda: value(scrape(port), "managerd_lock_waiters", lock="m.lock") == 1
            )
            text = scrape(port)
            assert value(text, "managerd_lock_held", lock="m.lock") == 1
            lock_a.release()
            t.join(10)
            lock_b.release()
        text = scrape(port)
        # Six acquisitions: three at once (a wait of 0), three after waiting.
        assert value(text, "managerd_lock_wait_seconds_count", lock="m.lock") - before == 6
        instant = value(text, "managerd_lock_wait_seconds_bucket", lock="m.lock", le="0.0001")
        assert value(text, "managerd_lock_wait_seconds_count", lock="m.lock") - instant >= 3
        assert value(text, "managerd_lock_held", lock="m.lock") == 0
        assert value(text, "managerd_lock_hold_seconds_count", lock="m.lock") >= 6


def test_per_object_labels_are_bounded(metered: tuple[Daemon, int]) -> None:
    d, port = metered
    with d.connect() as m:
        for i in range(12):
            m.Queue(f"m.many.{i:02d}").put(i)
    text = scrape(port)
    queues = {
        dict(labels)["queue"] for (name, labels) in samples(text) if name == "managerd_queue_depth"
    }
    assert len(queues) == 6  # five named (MANAGERD_METRICS_MAX_OBJECTS) + _other
    assert "_other" in queues
    total = sum(v for (name, _), v in samples(text).items() if name == "managerd_queue_depth")
    with d.connect() as m:
        assert total == sum(m.Queue(n).qsize() for n, t in m.objects() if t == "Queue")


class Stock(BaseManager):
    """A stock stdlib client of managerd."""


Stock.register("Queue")


def test_stock_requests_are_counted_with_managerd_ones(metered: tuple[Daemon, int]) -> None:
    d, port = metered

    def count(text: str, method: str, outcome: str) -> float:
        key = ("managerd_requests_total", frozenset({"method": method, "outcome": outcome}.items()))
        return samples(text).get(key, 0.0)

    before = scrape(port)
    stock = Stock(address=("127.0.0.1", d.port), authkey=d.authkey)
    stock.connect()
    q = stock.Queue("m.stock")  # type: ignore[attr-defined]
    for i in range(3):
        q.put(i)
    assert [q.get(timeout=5) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(TypeError):
        q.put(1, True, None, "one too many")  # the caller's error, not the daemon's
    with d.connect() as m:
        m.Queue("m.stock").put(3)
    after = scrape(port)
    assert count(after, "Queue.put", "ok") - count(before, "Queue.put", "ok") == 4
    assert count(after, "Queue.get", "ok") - count(before, "Queue.get", "ok") == 3
    assert count(after, "Queue.put", "Type") - count(before, "Queue.put", "Type") == 1
    assert (
        count(after, "server.stock_create", "ok") - count(before, "server.stock_create", "ok") == 1
    )
    assert "internal error" not in d.log


def test_health_and_readiness(metered: tuple[Daemon, int]) -> None:
    _, port = metered
    assert scrape(port, "/healthz") == "ok\n"
    assert scrape(port, "/readyz") == "ready\n"
    with pytest.raises(urllib.error.HTTPError):
        scrape(port, "/nope")


def test_sessions_connections_and_auth_failures(metered: tuple[Daemon, int]) -> None:
    d, port = metered
    before = value(scrape(port), "managerd_auth_failures_total")
    with pytest.raises(Exception, match="refused"):
        connect(d.address, authkey=b"wrong")
    with d.connect(), d.connect():
        text = scrape(port)
        assert value(text, "managerd_sessions", kind="managerd") >= 2
        assert value(text, "managerd_connections") >= 2
    assert value(scrape(port), "managerd_auth_failures_total") == before + 1


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing (apt-get install prometheus)")
        pytest.skip("promtool is missing")
    return path


def test_exposition_passes_promtool(metered: tuple[Daemon, int]) -> None:
    promtool = _promtool()
    _, port = metered
    done = subprocess.run(
        [promtool, "check", "metrics"], input=scrape(port), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_real_prometheus_scrapes_the_right_depth(
    metered: tuple[Daemon, int], tmp_path: Path
) -> None:
    d, port = metered
    with d.connect() as m:
        q = m.Queue("0.prom")
        q.put_many(list(range(7)))
    assert _prometheus_reads_depth(port, tmp_path, "0.prom") == 7.0


def _prometheus_reads_depth(
    port: int, tmp_path: Path, queue: str, token_file: Path | None = None
) -> float | None:
    """Run a real Prometheus with deploy/prometheus.yml against ``port``; the depth it reads."""
    _promtool()
    prometheus = shutil.which("prometheus")
    assert prometheus is not None
    config = (Path(__file__).resolve().parent.parent / "deploy" / "prometheus.yml").read_text()
    config = re.sub(r"managerd:\d+", f"127.0.0.1:{port}", config)
    config = re.sub(r"(scrape|evaluation)_interval:\s*\S+", r"\1_interval: 1s", config)
    config = re.sub(r"\n\s*rule_files:.*?(?=\n\S|\Z)", "\n", config, flags=re.S)
    if token_file is not None:
        config = config.replace(
            "    static_configs:",
            f"    authorization:\n      credentials_file: {token_file}\n    static_configs:",
        )
    (tmp_path / "prometheus.yml").write_text(config)
    web = free_port()
    proc = subprocess.Popen(
        [
            prometheus,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{web}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    seen: list[float | None] = [None]
    try:
        query = (
            f"http://127.0.0.1:{web}/api/v1/query?"
            f"query=managerd_queue_depth%7Bqueue%3D%22{queue}%22%7D"
        )

        def depth() -> float | None:
            try:
                with urllib.request.urlopen(query, timeout=2) as r:
                    result = json.load(r)["data"]["result"]
            except (OSError, KeyError, ValueError):
                return None
            seen[0] = float(result[0]["value"][1]) if result else None
            return seen[0]

        wait_until(lambda: depth() is not None, timeout_s=60, interval_s=0.5)
    finally:
        proc.terminate()
        proc.wait(30)
    return seen[0]


def test_metrics_token_is_required_and_prometheus_sends_it(tmp_path: Path) -> None:
    token_file = tmp_path / "metrics-token"
    token_file.write_text("s3cret-token\n")
    token_file.chmod(0o600)
    port = free_port()
    d = Daemon(
        tmp_path, env={"MANAGERD_METRICS_TOKEN_FILE": str(token_file)},
        args=["--metrics-port", str(port)],
    ).start()  # fmt: skip
    try:
        assert wait_until(lambda: "metrics on http://" in d.log)
        with d.connect() as m:
            m.Queue("tok.q").put_many([1, 2, 3])
        url = f"http://127.0.0.1:{port}/metrics"
        for header in (None, "Bearer wrong", "s3cret-token", "Bearer s3cret-token2"):
            request = urllib.request.Request(url)
            if header is not None:
                request.add_header("Authorization", header)
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=5)
            assert refused.value.code == 401
            refused.value.close()
        request = urllib.request.Request(url, headers={"Authorization": "Bearer s3cret-token"})
        with urllib.request.urlopen(request, timeout=5) as response:
            assert b'managerd_queue_depth{queue="tok.q"} 3.0' in response.read()
        assert scrape(port, "/healthz") == "ok\n"  # open: up or down, nothing more
        # A real Prometheus with `authorization: credentials_file` scrapes it.
        assert _prometheus_reads_depth(port, tmp_path, "tok.q", token_file) == 3.0
        assert "s3cret-token" not in d.log
    finally:
        d.stop()


def test_metrics_token_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    token_file = tmp_path / "metrics-token"
    token_file.write_text("s3cret-token\n")
    token_file.chmod(0o644)
    env = dict(os.environ, MANAGERD_AUTHKEY="k" * 32, MANAGERD_METRICS_TOKEN_FILE=str(token_file))
    done = subprocess.run(
        [sys.executable, "-m", "managerd", "serve", "--port", "0", "--metrics-port", "0"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert f"metrics token file {token_file} is readable by group or others" in done.stderr
    assert f"chmod 600 {token_file}" in done.stderr


def test_readme_metric_table_matches_the_exposition(metered: tuple[Daemon, int]) -> None:
    d, port = metered
    with d.connect() as m:  # one of each kind, so every family has samples
        m.Queue("m.t.q").put(1)
        m.Lock("m.t.l")
        m.Semaphore("m.t.s")
        m.Event("m.t.e")
        m.Condition("m.t.c")
        m.Barrier("m.t.b", 2)
    types = dict(
        line.split()[2:4] for line in scrape(port).splitlines() if line.startswith("# TYPE ")
    )
    # prometheus-client names a counter's family with its _total suffix.
    exposed = {
        (name if kind != "counter" or name.endswith("_total") else name + "_total", kind)
        for name, kind in types.items()
        if name.startswith("managerd_")  # process_* come from prometheus-client
    }
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    documented = set(re.findall(r"^\| `(managerd_\w+)` \| (\w+) \|", readme, flags=re.M))
    assert documented == exposed


def test_metrics_host_binds_the_endpoint_elsewhere(tmp_path: Path) -> None:
    port = free_port()
    d = Daemon(
        tmp_path, env={"MANAGERD_METRICS_HOST": "127.0.0.2"}, args=["--metrics-port", str(port)]
    ).start()
    try:
        assert wait_until(lambda: f"metrics on http://127.0.0.2:{port}" in d.log)
        with urllib.request.urlopen(f"http://127.0.0.2:{port}/healthz", timeout=5) as response:
            assert response.read() == b"ok\n"
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
        with d.connect() as m:  # the daemon itself still listens on its host
            m.ping()
    finally:
        d.stop()
