"""`managerd status` against a real daemon: tables and JSON of live state."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

from conftest import Daemon, wait_until


def _status(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, MANAGERD_AUTHKEY=d.authkey.decode())
    return subprocess.run(
        [sys.executable, "-m", "managerd", "status", "--port", str(d.port), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_status_shows_queues_locks_and_sessions(daemon: Daemon) -> None:
    with daemon.connect() as producer, daemon.connect() as holder, daemon.connect() as waiter:
        jobs = producer.Queue("jobs")
        jobs.put_many(list(range(5)))
        msg = producer.Queue("jobs").reserve()
        db = holder.Lock("db")
        db.acquire()
        holder.Semaphore("pool", 3).acquire()
        t = threading.Thread(target=waiter.Lock("db").acquire, args=(True, 5), daemon=True)
        t.start()
        assert wait_until(lambda: holder.status()["objects"]["db"]["waiters"] == 1)
        done = _status(daemon, "--json", "--interval-s", "0.2")
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout)
        (queue,) = summary["queues"]
        assert (queue["name"], queue["depth"], queue["reserved"]) == ("jobs", 4, 1)
        locks = {lk["name"]: lk for lk in summary["locks"]}
        assert locks["db"]["waiters"] == 1 and locks["db"]["token"] == db.fencing_token
        assert locks["db"]["holders"][0]["pid"] == os.getpid()
        assert locks["pool"]["available"] == 2
        assert len(summary["sessions"]) == 4  # three clients and status itself
        text = _status(daemon, "--interval-s", "0.2").stdout
        assert "queues (1)" in text and "locks and semaphores (2)" in text
        assert f"{os.uname().nodename}:{os.getpid()}" in text
        msg.ack()
        holder.Lock("db").release()
        t.join(10)


def test_status_without_a_daemon_fails_clearly(daemon: Daemon) -> None:
    port = daemon.port
    daemon.stop()
    env = dict(os.environ, MANAGERD_AUTHKEY=daemon.authkey.decode())
    done = subprocess.run(
        [sys.executable, "-m", "managerd", "status", "--port", str(port), "--timeout-s", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "no daemon answering" in done.stderr
