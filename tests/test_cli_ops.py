"""The operator's CLI against a real daemon: status of every type, ls, get, put, del."""

from __future__ import annotations

import fractions
import json
import os
import subprocess
import sys
import time

from managerd_client import Manager

from conftest import Daemon

every_type = [
    "Queue", "JoinableQueue", "Pipe", "dict", "list", "Namespace", "Value", "Array",
    "Lock", "RLock", "Semaphore", "BoundedSemaphore", "Event", "Condition", "Barrier",
]  # fmt: skip


def managerd(d: Daemon | None, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "managerd", *args]
    if d is not None:
        env["MANAGERD_AUTHKEY"] = d.authkey.decode()
        cmd += ["--port", str(d.port)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=False)


def make_every_type(m: Manager) -> None:
    m.Queue("jobs").put({"id": 1})
    m.JoinableQueue("tasks")
    m.Pipe("chat")
    m.dict("results")["a"] = 1
    m.list("log").append("x")
    m.Namespace("conf").mode = "fast"
    m.Value("counter", "i", 7)
    m.Array("weights", "i", [1, 2])
    m.Lock("db")
    m.RLock("tree")
    m.Semaphore("pool", 2)
    m.BoundedSemaphore("slots", 2)
    m.Event("go")
    m.Condition("ready", m.Lock("ready-lock"))
    m.Barrier("meet", 2)


def test_status_lists_every_type(daemon: Daemon) -> None:
    with daemon.connect() as m:
        make_every_type(m)
        done = managerd(daemon, "status", "--json", "--interval-s", "0.1")
        assert done.returncode == 0, done.stderr
        doc = json.loads(done.stdout)
        listed = {
            r["type"] for key in ("queues", "locks", "sync", "data", "pipes") for r in doc[key]
        }
        assert listed == set(every_type)
        assert doc["objects"] == 16 and doc["version"] and doc["settings"]["store"] == "memory"
        text = managerd(daemon, "status", "--interval-s", "0.1").stdout
        for title in ("events, conditions and barriers (3)", "pipes (1)", "values and arrays (5)"):
            assert title in text
        for name in ("chat", "results", "go", "meet", "weights"):
            assert f"\n{name} " in text


def test_status_watch_refreshes_in_place(daemon: Daemon) -> None:
    env = dict(os.environ, MANAGERD_AUTHKEY=daemon.authkey.decode())
    proc = subprocess.Popen(
        [sys.executable, "-m", "managerd", "status", "--port", str(daemon.port), "--watch",
         "--interval-s", "0.2"],
        env=env, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        seen = ""
        with daemon.connect() as m:
            deadline = time.monotonic() + 30
            while seen.count("\x1b[H\x1b[2J") < 2 and time.monotonic() < deadline:
                seen += proc.stdout.readline()
            m.Queue("late").put(1)
            while "late" not in seen and time.monotonic() < deadline:
                seen += proc.stdout.readline()
        assert seen.count("\x1b[H\x1b[2J") >= 2 and "late" in seen
        assert proc.poll() is None  # still watching
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_ls_get_put_del(daemon: Daemon) -> None:
    with daemon.connect() as m:
        make_every_type(m)
        m.Queue("jobs").put(fractions.Fraction(1, 3))  # not builtin data: type and size

        listing = managerd(daemon, "ls", "--json").stdout
        assert {"name": "counter", "type": "Value"} in json.loads(listing)
        assert managerd(daemon, "ls", "re*").stdout.split() == ["ready", "Condition",
                                                               "ready-lock", "Lock",
                                                               "results", "dict"]  # fmt: skip

        got = json.loads(managerd(daemon, "get", "jobs").stdout)
        assert got[0] == {"id": 1}
        assert got[1].startswith("<fractions.Fraction pickle, ") and got[1].endswith(" bytes>")
        assert m.Queue("jobs").qsize() == 2  # nothing taken

        assert managerd(daemon, "put", "jobs", '{"id": 2}').returncode == 0
        assert managerd(daemon, "put", "log", "[1, 2]").returncode == 0
        assert managerd(daemon, "put", "results", '{"b": 2}').returncode == 0
        assert managerd(daemon, "put", "conf", '{"level": 3}').returncode == 0
        assert managerd(daemon, "put", "counter", "42").returncode == 0
        assert m.Queue("jobs").qsize() == 3
        assert m.list("log")[:] == ["x", [1, 2]]
        assert dict(m.dict("results").items()) == {"a": 1, "b": 2}
        assert m.Namespace("conf").level == 3 and m.Namespace("conf").mode == "fast"
        assert m.Value("counter", "i").value == 42
        assert json.loads(managerd(daemon, "get", "results").stdout) == {"a": 1, "b": 2}
        assert json.loads(managerd(daemon, "get", "counter").stdout) == 42
        assert json.loads(managerd(daemon, "get", "log", "--limit", "1").stdout) == {
            "first": ["x"], "shown": 1, "total": 2,
        }  # fmt: skip

        refused = managerd(daemon, "put", "results", "[1]")
        assert refused.returncode == 2 and "merges a JSON object" in refused.stderr
        assert managerd(daemon, "put", "results", "{not json").returncode == 2
        assert "no object named" in managerd(daemon, "put", "nothing", "1").stderr

        assert managerd(daemon, "del", "log").returncode == 0
        assert "log" not in dict(m.objects())
        gone = managerd(daemon, "del", "log")
        assert gone.returncode == 1 and "no object named 'log'" in gone.stderr


def test_version_and_help_texts() -> None:
    from managerd import __version__

    assert managerd(None, "--version").stdout.strip() == f"managerd {__version__}"
    for command in ("check", "status", "ls", "get"):
        text = managerd(None, command, "--help").stdout
        assert "Address of the daemon" in text and "listen on" not in text, command
    assert "<bool>" not in managerd(None, "status", "--help").stdout
    bogus = managerd(None, "serve", "--bogus")
    assert bogus.returncode == 2
    assert "--metrics-port" in bogus.stderr and "--data-dir" in bogus.stderr
