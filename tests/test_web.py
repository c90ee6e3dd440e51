"""The status page in a real headless Chromium (Debian's ``chromium``, driven by playwright).

A daemon with one object of every type serves ``/`` and ``/status.json`` on
its metrics port; the page's table rows must equal the document, a contended
lock must show its holder and its waiter, and a put must show up without a
reload. A screenshot is kept as a test artifact (``MANAGERD_ARTIFACTS`` or
the test's tmp directory).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from managerd_client import Manager

from conftest import Daemon, free_port, wait_until

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM) and os.environ.get("CI") != "true",
    reason="needs Debian's chromium (apt-get install chromium); CI installs it",
)
#: Columns of each table the test compares: (header index, document key).
CHECKED = {
    "queues": [(0, "name"), (1, "type"), (2, "depth"), (3, "reserved"), (4, "waiters")],
    "locks": [(0, "name"), (1, "type"), (4, "available"), (5, "waiters"), (7, "token")],
    "sync": [(0, "name"), (1, "type"), (2, "state"), (3, "waiters")],
    "data": [(0, "name"), (1, "type"), (2, "size"), (3, "value")],
    "pipes": [(0, "name"), (1, "buffered"), (3, "waiters")],
}


@pytest.fixture
def web(tmp_path: Path) -> Iterator[tuple[Daemon, int]]:
    port = free_port()
    d = Daemon(tmp_path, args=["--metrics-port", str(port)]).start()
    try:
        yield d, port
    finally:
        d.stop()


def status_json(port: int, token: str | None = None) -> dict[str, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/status.json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=10) as response:
        doc: dict[str, Any] = json.loads(response.read())
        return doc


def one_of_every_type(m: Manager) -> None:
    m.Queue("jobs").put({"id": 1})
    m.JoinableQueue("tasks").put("t")
    m.dict("results")["a"] = 1
    m.list("log").extend([1, 2, 3])
    m.Namespace("config").mode = "fast"
    m.Value("counter", "i", 7)
    m.Array("weights", "d", [0.5, 1.5])
    m.RLock("tree")
    m.Semaphore("pool", 3).acquire()
    m.BoundedSemaphore("slots", 2)
    m.Event("go").set()
    m.Condition("ready")
    m.Barrier("meet", 3)
    a, _ = m.Pipe("chat")
    a.send("hello")


def lock_row(doc: dict[str, Any], name: str) -> dict[str, Any]:
    rows: list[dict[str, Any]] = [r for r in doc["locks"] if r["name"] == name]
    (row,) = rows
    return row


def polls(page: Any) -> int:
    return int(page.get_attribute("body", "data-polls") or 0)


def queue_depth(page: Any, name: str) -> str:
    rows = {r[0]: r for r in page_rows(page, "queues")}
    return rows[name][2]


def cell(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def page_rows(page: Any, key: str) -> list[list[str]]:
    rows: list[list[str]] = page.eval_on_selector_all(
        f"#t-{key} tbody tr",
        "trs => trs.map(tr => Array.from(tr.cells, td => td.textContent))",
    )
    return rows


def test_page_shows_status_json_live(web: tuple[Daemon, int], tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    daemon, port = web
    with daemon.connect() as holder, daemon.connect() as waiter:
        one_of_every_type(holder)
        holder.Lock("db").acquire()
        blocked = threading.Thread(
            target=lambda: waiter.Lock("db").acquire(timeout=30), daemon=True
        )
        blocked.start()
        assert wait_until(lambda: lock_row(status_json(port), "db")["waiters"] == 1)

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1100})
                page.goto(f"http://127.0.0.1:{port}/")
                assert wait_until(lambda: polls(page) >= 1)
                doc = status_json(port)
                for key, columns in CHECKED.items():
                    shown = page_rows(page, key)
                    want = [[cell(r.get(k)) for _, k in columns] for r in doc[key]]
                    got = [[row[i] for i, _ in columns] for row in shown]
                    assert got == want, key
                assert len(page_rows(page, "sessions")) == len(doc["sessions"]) == 2
                names = {r[0] for key in CHECKED for r in page_rows(page, key)}
                assert len(names) == doc["objects"] == 16

                # The contended lock: its holder and its waiter, as host:pid:thread.
                (db,) = [r for r in page_rows(page, "locks") if r[0] == "db"]
                host = os.uname().nodename
                assert db[2].startswith(f"{host}:{os.getpid()}:")
                assert db[6].startswith(f"{host}:{os.getpid()}:") and db[5] == "1"
                assert db[2] != db[6]  # two threads of this process

                # A put shows up without a reload.
                page.evaluate("() => { window.sameDocument = true; }")
                holder.Queue("jobs").put({"id": 2})
                assert wait_until(lambda: queue_depth(page, "jobs") == "2")
                assert page.evaluate("() => window.sameDocument") is True

                # Filter by name, then sort by a column.
                page.fill("#filter", "o")
                assert [r[0] for r in page_rows(page, "data")] == ["config", "counter", "log"]
                page.fill("#filter", "")
                page.click("#t-data th:nth-child(3)")  # size, ascending
                sizes = [int(r[2]) for r in page_rows(page, "data")]
                assert sizes == sorted(sizes) and len(sizes) == 5

                artifacts = Path(os.environ.get("MANAGERD_ARTIFACTS", tmp_path))
                artifacts.mkdir(parents=True, exist_ok=True)
                shot = artifacts / "status-page.png"
                page.screenshot(path=str(shot), full_page=True)
                assert shot.stat().st_size > 10_000
            finally:
                browser.close()
        holder.Lock("db").release()
        blocked.join(10)


def test_page_needs_the_token_when_metrics_need_one(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    token_file.chmod(0o600)
    port = free_port()
    d = Daemon(tmp_path, args=["--metrics-port", str(port)])
    d.extra_env["MANAGERD_METRICS_TOKEN_FILE"] = str(token_file)
    d.start()
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            status_json(port)
        assert refused.value.code == 401
        refused.value.close()
        doc = status_json(port, "s3cret")
        assert doc["objects"] == 0
        text = json.dumps(doc)
        assert d.authkey.decode() not in text and "s3cret" not in text

        from playwright.sync_api import sync_playwright

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            try:
                page = browser.new_page()
                page.goto(f"http://127.0.0.1:{port}/")  # the page's files hold no data
                assert wait_until(lambda: page.is_visible("#auth"))
                assert polls(page) == 0
                page.fill("#token", "s3cret")
                page.click("#auth button")
                assert wait_until(lambda: polls(page) >= 1)
                assert page.is_hidden("#auth")
            finally:
                browser.close()
    finally:
        d.stop()


def test_status_json_never_shows_payloads(web: tuple[Daemon, int]) -> None:
    daemon, port = web
    with daemon.connect() as m:
        m.Queue("q").put("secret-item-1")
        m.dict("d")["k"] = "secret-value-2"
        m.Namespace("n").attr = "secret-attr-3"
        text = json.dumps(status_json(port))
    for secret in ("secret-item-1", "secret-value-2", "secret-attr-3", daemon.authkey.decode()):
        assert secret not in text


def test_page_names_a_deadlock_until_a_timeout_breaks_it(web: tuple[Daemon, int]) -> None:
    from playwright.sync_api import sync_playwright

    daemon, port = web
    with daemon.connect() as a, daemon.connect() as b:
        both = threading.Barrier(2)

        def cross(m: Manager, first: str, second: str, timeout_s: float) -> None:
            m.Lock(first).acquire()
            both.wait(30)
            if m.Lock(second).acquire(timeout=timeout_s):
                m.Lock(second).release()
            m.Lock(first).release()

        threads = [
            threading.Thread(target=cross, args=(a, "left", "right", 6.0)),
            threading.Thread(target=cross, args=(b, "right", "left", 30.0)),
        ]
        for t in threads:
            t.start()
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            try:
                page = browser.new_page()
                page.goto(f"http://127.0.0.1:{port}/")

                def shown() -> str:
                    if page.is_hidden("#deadlocks-box"):
                        return ""
                    return str(page.text_content("#deadlocks"))

                assert wait_until(lambda: "Lock 'left'" in shown(), timeout_s=20)
                assert "Lock 'right'" in shown() and f":{os.getpid()}:" in shown()
                # The 6 s timeout breaks it; the page stops showing it, without a reload.
                assert wait_until(lambda: shown() == "", timeout_s=30)
            finally:
                browser.close()
        for t in threads:
            t.join(40)
