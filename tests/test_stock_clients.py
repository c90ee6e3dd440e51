"""Stock ``multiprocessing.managers`` clients of Python 3.11, 3.12 and 3.13.

Each test runs tests/stock_scripts/stock_client.py — standard library only,
under ``-I -S`` so that nothing but the stdlib is importable — as a
subprocess of each interpreter, against a real daemon, while this process
works on the same named objects as a managerd client. The script checks
what the stock side sees; the test checks what the managerd side sees.

An interpreter that is not installed fails the test when ``CI`` is set and
skips it otherwise (a skip is a gap in what was tested).
"""

from __future__ import annotations

import functools
import glob
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from stock_scripts.stock_client import SAMPLES

from managerd_client import Manager

from conftest import Daemon, wait_until

VERSIONS = ("3.11", "3.12", "3.13")
SCRIPT = Path(__file__).parent / "stock_scripts" / "stock_client.py"
WAIT_S = 30.0
RUN_TIMEOUT_S = 90.0


# -- interpreters -------------------------------------------------------------------------


def _version_of(python: str) -> str | None:
    try:
        out = subprocess.run(
            [python, "-I", "-S", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _pyenv_roots() -> Iterator[str]:
    yield os.environ.get("PYENV_ROOT", "")
    yield os.path.expanduser("~/.pyenv")
    pyenv = shutil.which("pyenv")
    if pyenv:
        try:
            out = subprocess.run([pyenv, "root"], capture_output=True, text=True, timeout=30)
            yield out.stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass


def _patch_level(path: str) -> tuple[int, ...]:
    match = re.search(r"versions/(\d+)\.(\d+)\.(\d+)", path)
    return tuple(int(g) for g in match.groups()) if match else (0,)


def _candidates(version: str) -> Iterator[str]:
    """Where a Python ``version`` may be, most likely first (each looked up lazily)."""
    for root in _pyenv_roots():
        if root and os.path.isdir(root):
            found = glob.glob(f"{root}/versions/{version}.*/bin/python{version}")
            yield from sorted(found, key=_patch_level, reverse=True)
    for name in (f"python{version}", "python3"):
        path = shutil.which(name)
        if path:
            yield path
    yield sys.executable
    uv = shutil.which("uv")
    if uv:
        try:
            out = subprocess.run(
                [uv, "python", "find", "--no-project", version],
                capture_output=True,
                text=True,
                timeout=60,
            )
            if out.returncode == 0 and out.stdout.strip():
                yield out.stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass


@functools.cache
def find_python(version: str) -> str | None:
    """A working interpreter of ``version`` ("3.12"): pyenv's, on PATH, or uv's."""
    tried: set[str] = set()
    for candidate in _candidates(version):
        if candidate not in tried:
            tried.add(candidate)
            if _version_of(candidate) == version:
                return candidate
    return None


def python_or_skip(version: str) -> str:
    """The interpreter; if missing, a failure under CI and a skip elsewhere."""
    python = find_python(version)
    if python is None:
        message = f"no Python {version} interpreter found (pyenv, PATH or uv)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return python


@pytest.fixture(params=VERSIONS, ids=[f"py{v}" for v in VERSIONS])
def stock_python(request: pytest.FixtureRequest) -> str:
    return python_or_skip(request.param)


# -- running the stock client ------------------------------------------------------------


class StockRun:
    """The stock client script running one scenario in a subprocess."""

    def __init__(self, python: str, scenario: str, prefix: str, daemon: Daemon) -> None:
        # -I -S: no site-packages, no PYTHONPATH: the standard library only.
        self.proc = subprocess.Popen(
            [python, "-I", "-S", str(SCRIPT), scenario, prefix],
            env=daemon.client_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.output = ""

    def finish(self) -> str:
        """Wait for the script; its output, asserting that every check passed."""
        self.output, _ = self.proc.communicate(timeout=RUN_TIMEOUT_S)
        assert self.proc.returncode == 0, self.output
        assert self.output.rstrip().endswith("DONE"), self.output
        return self.output

    def _check_running(self) -> None:
        """Fail at once, with the script's output, if it has already exited."""
        if self.proc.poll() is not None:
            self.finish()
            pytest.fail(f"the stock client exited before the test's side was done:\n{self.output}")

    def parked(self, m: Manager, name: str, key: str = "waiters") -> bool:
        """Wait until exactly one client (the script) is parked on ``name``."""

        def parked() -> bool:
            self._check_running()
            return _describe(m, name).get(key) == 1

        return wait_until(parked, timeout_s=WAIT_S)

    def step(self, m: Manager, prefix: str, name: str) -> bool:
        """Wait until the script says it got past ``name`` (it sets an Event)."""
        event = m.Event(f"{prefix}.step.{name}")

        def reached() -> bool:
            self._check_running()
            return event.is_set()

        return wait_until(reached, timeout_s=WAIT_S)

    def results(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for line in self.output.splitlines():
            if line.startswith("RESULT "):
                values.update(json.loads(line[len("RESULT ") :]))
        return values

    def __enter__(self) -> StockRun:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:  # the test failed while the script waited
            self.proc.kill()
            self.output += self.proc.communicate()[0] or ""
        if exc[0] is not None:
            print(self.output)


@pytest.fixture
def m(shared_daemon: Daemon) -> Iterator[Manager]:
    with shared_daemon.connect() as manager:
        yield manager


def _describe(m: Manager, name: str) -> dict[str, Any]:
    found: dict[str, Any] = m.status()["objects"].get(name, {})
    return found


class Point:
    """A class only managerd clients can unpickle (the daemon never decodes it)."""

    def __init__(self, x: int, y: int) -> None:
        self.x, self.y = x, y

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)

    __hash__ = None  # type: ignore[assignment]


# -- tests ---------------------------------------------------------------------------------


def test_a_missing_interpreter_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"no Python 3\.99"):
        python_or_skip("3.99")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match=r"no Python 3\.99"):
        python_or_skip("3.99")


def test_queues_both_ways(
    stock_python: str, shared_daemon: Daemon, m: Manager, uniq: str, capsys: Any
) -> None:
    p = uniq
    to_stock = m.Queue(f"{p}.to_stock")
    to_stock.put_many(SAMPLES)
    joinable = m.JoinableQueue(f"{p}.joinable")
    joinable.put_many(["a", "b"])
    handoff = m.Queue(f"{p}.handoff")
    with StockRun(stock_python, "queues", p, shared_daemon) as run:
        assert run.parked(m, f"{p}.handoff")
        handoff.put({"from": "managerd"})
        joinable.join(timeout=WAIT_S)  # TimeoutError unless the stock side task_done()s
        run.finish()

    from_stock = m.Queue(f"{p}.from_stock")
    got = from_stock.get_many(len(SAMPLES) + 1, timeout=1)
    assert got == SAMPLES
    assert [type(v) for v in got] == [type(v) for v in SAMPLES]
    assert m.Queue(f"{p}.small").get_nowait() == "only"
    assert to_stock.qsize() == 0 and handoff.qsize() == 0
    with capsys.disabled():  # a measurement to read, not to assert
        version = run.output.split()[1]
        ms = run.results()["connect_first_call_ms"]
        print(f"\n  stock Python {version}: connect + create + first call {ms} ms", end="")


def test_mappings_both_ways(
    stock_python: str, shared_daemon: Daemon, m: Manager, uniq: str
) -> None:
    p = uniq
    d = m.dict(f"{p}.dict")
    d.update({"str": "v", 1: [1, 2], (1, "t"): {"n": None}})
    lst = m.list(f"{p}.list")
    lst.extend([1, "two", (3,)])
    ns = m.Namespace(f"{p}.ns")
    ns.x = 1
    ns.name = "managerd"  # type: ignore[misc]  # a Namespace takes any public name
    value = m.Value(f"{p}.value", "i", 41)
    array = m.Array(f"{p}.array", "d", [0.5, 1.5, 2.5])
    with StockRun(stock_python, "mappings", p, shared_daemon) as run:
        run.finish()

    assert d["stock"] == {"set": {1, 2}}
    assert (d["u1"], d["u2"], d["sd"]) == (1, [2], None)
    assert "u3" not in d and "sd2" not in d and "added" not in d
    assert lst.copy() == [1, "two", (3,), {"stock": True}, 4, 5]
    assert ns.from_stock == [1, 2]
    assert value.value == 42
    assert array.tolist() == [10.0, 1.5, 2.5]


def test_sync_between_stock_and_managerd(
    stock_python: str, shared_daemon: Daemon, m: Manager, uniq: str
) -> None:
    p = uniq
    lock = m.Lock(f"{p}.lock")
    assert lock.acquire()
    sem = m.Semaphore(f"{p}.sem", 2)
    assert sem.acquire() and sem.acquire()
    event = m.Event(f"{p}.event")
    cond = m.Condition(f"{p}.cond")
    flags = m.dict(f"{p}.flags")
    doomed = m.Barrier(f"{p}.doomed", 2)
    with StockRun(stock_python, "sync", p, shared_daemon) as run:
        # Lock: the stock client waits for our release, then holds it.
        assert run.step(m, p, "lock_probed")
        assert run.parked(m, f"{p}.lock")
        lock.release()
        assert run.step(m, p, "lock_held")
        assert lock.acquire(blocking=False) is False
        m.Event(f"{p}.step.lock_checked").set()
        assert lock.acquire(timeout=WAIT_S)
        lock.release()
        # Semaphore: it waits for one of our two permits.
        assert run.parked(m, f"{p}.sem")
        sem.release()
        assert run.step(m, p, "sem_done")
        assert sem.get_value() == 1
        sem.release()
        # Event: we set what it waits on, it sets what we wait on.
        assert run.step(m, p, "event_probed")
        assert run.parked(m, f"{p}.event")
        event.set()
        assert m.Event(f"{p}.event_back").wait(WAIT_S)
        # Condition: we notify its wait_for, then it notifies ours.
        assert run.parked(m, f"{p}.cond")
        with cond:
            flags["go"] = 1
            cond.notify()
        with cond:
            assert cond.wait_for(lambda: flags.get("back") == 1, timeout=WAIT_S)
        # Barrier: one party each; then we abort the one it waits on.
        index = m.Barrier(f"{p}.barrier", 2).wait(WAIT_S)
        assert run.parked(m, f"{p}.doomed", key="n_waiting")
        doomed.abort()
        run.finish()
    assert {index, run.results()["barrier_index"]} == {0, 1}
    assert sem.get_value() == 2 and not lock.locked()


def test_errors_and_refusals(
    stock_python: str, shared_daemon: Daemon, m: Manager, uniq: str
) -> None:
    p = uniq
    objects = m.Queue(f"{p}.objects")
    objects.put_many([Point(1, 2), "behind"])
    m.dict(f"{p}.objdict")["point"] = Point(0, 0)
    m.list(f"{p}.list").append(Point(5, 5))
    parked = m.Queue(f"{p}.parked")
    with StockRun(stock_python, "errors", p, shared_daemon) as run:
        assert run.parked(m, f"{p}.parked")
        parked.put(Point(3, 4))
        run.finish()

    # Nothing a stock client could not read was lost.
    assert objects.get_many(10, timeout=1) == [Point(1, 2), "behind", "still serving"]
    assert parked.get(timeout=1) == Point(3, 4)
    assert m.dict(f"{p}.objdict").copy() == {"point": Point(0, 0)}
    assert m.list(f"{p}.list").copy() == [Point(5, 5)]
    m.ping()
    assert "internal error" not in shared_daemon.log
