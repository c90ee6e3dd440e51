"""Deadlocks named as they form, with real client processes (managerd/store/memory/deadlock.py)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest

from managerd_client import DeadlockDetected

import workers_deadlock as wd
from conftest import Daemon, free_port, metric, wait_until
from workers import join_all, start


def deadlock_daemon(tmp: Path, mode: str, metrics_port: int | None = None) -> Daemon:
    args = ["--deadlock", mode]
    if metrics_port is not None:
        args += ["--metrics-port", str(metrics_port)]
    return Daemon(tmp, args=args).start()


def cycle(d: Daemon, names: list[str], timeout_s: float) -> list[Any]:
    """One process per lock, each holding its lock and wanting the next one's."""
    n = len(names)
    return [
        start(
            wd.cycle_member,
            d.address,
            d.authkey,
            names[i],
            names[(i + 1) % n],
            "meet",
            n,
            timeout_s,
            "out",
        )
        for i in range(n)
    ]


def status(d: Daemon) -> dict[str, Any]:
    with d.connect() as m:
        return m.status()


def test_two_clients_in_a_cycle_are_reported_and_a_timeout_breaks_it(tmp_path: Path) -> None:
    port = free_port()
    d = deadlock_daemon(tmp_path, "report", port)
    try:
        procs = cycle(d, ["a", "b"], timeout_s=6.0)
        assert wait_until(lambda: status(d)["deadlocks"], timeout_s=30)
        (found,) = status(d)["deadlocks"]
        assert sorted(s["waits_for"] for s in found["steps"]) == ["a", "b"]
        assert len({s["pid"] for s in found["steps"]}) == 2
        # The log line is read from the daemon's stderr by another thread.
        assert wait_until(lambda: any("deadlock: " in line for line in d.lines), timeout_s=10)
        lines = [line for line in d.lines if "deadlock: " in line]
        assert len(lines) == 1
        for step in found["steps"]:
            assert f":{step['pid']}:{step['thread']} (session {step['id']})" in lines[0]
        assert "Lock 'a'" in lines[0] and "Lock 'b'" in lines[0]
        assert metric(port, "managerd_deadlocks_total") == 1

        join_all(procs)
        # The timeouts broke it: it is no longer shown as standing.
        doc = status(d)
        assert doc["deadlocks"] == [] and doc["deadlocks_total"] == 1
        with d.connect() as m:
            outcomes = sorted(m.dict("out").values())
        assert outcomes[0] == "acquired" or outcomes == ["timeout", "timeout"]
        assert "timeout" in outcomes
    finally:
        d.stop()


def test_three_clients_in_a_cycle_with_raise(tmp_path: Path) -> None:
    d = deadlock_daemon(tmp_path, "raise")
    try:
        procs = cycle(d, ["x", "y", "z"], timeout_s=20.0)
        join_all(procs)
        with d.connect() as m:
            outcomes = dict(m.dict("out").items())
        refused = [k for k, v in outcomes.items() if v.startswith("deadlock: ")]
        assert len(refused) == 1, outcomes  # the acquire that closed it, only
        assert sorted(v for v in outcomes.values() if v == "acquired") == ["acquired"] * 2
        message = outcomes[refused[0]]
        for name in ("x", "y", "z"):
            assert f"Lock {name!r}" in message
        assert status(d)["deadlocks"] == []  # refused: never standing
        assert status(d)["deadlocks_total"] == 1
    finally:
        d.stop()


def test_a_cycle_through_an_rlock_held_by_another_thread(tmp_path: Path) -> None:
    d = deadlock_daemon(tmp_path, "report")
    try:
        (proc,) = [start(wd.two_threads_rlock, d.address, d.authkey, 6.0, "out")]
        assert wait_until(lambda: status(d)["deadlocks"], timeout_s=30)
        (found,) = status(d)["deadlocks"]
        steps = found["steps"]
        assert {s["type"] for s in steps} == {"Lock", "RLock"}
        assert len({s["pid"] for s in steps}) == 1  # one process...
        assert len({s["thread"] for s in steps}) == 2  # ...two of its threads
        join_all([proc])
        assert status(d)["deadlocks"] == []
        with d.connect() as m:
            assert "timeout" in m.dict("out").values()
    finally:
        d.stop()


def test_a_slow_holder_is_not_a_deadlock(tmp_path: Path) -> None:
    d = deadlock_daemon(tmp_path, "raise")
    try:
        procs = [
            start(wd.hold_slowly, d.address, d.authkey, "slow", 2.0, "held"),
            start(wd.wait_behind, d.address, d.authkey, "mine", "slow", "held", "out"),
        ]
        with d.connect() as m:
            assert m.Event("held").wait(30)
            # A third client waits behind the waiter: a chain, not a cycle.
            assert m.Lock("mine").acquire(timeout=30)
            m.Lock("mine").release()
        join_all(procs)
        with d.connect() as m:
            assert dict(m.dict("out").items()) == {"mine": "acquired"}
        assert status(d)["deadlocks_total"] == 0
        assert not any("deadlock" in line for line in d.lines)
    finally:
        d.stop()


def test_a_lock_acquired_twice_by_its_holder_is_named(tmp_path: Path) -> None:
    d = deadlock_daemon(tmp_path, "raise")
    try:
        with d.connect() as m:
            lock = m.Lock("once")
            lock.acquire()
            with pytest.raises(DeadlockDetected, match=f":{os.getpid()}:"):
                lock.acquire()
            assert lock.acquire(blocking=False) is False  # non-blocking: no wait, no check
            lock.release()
    finally:
        d.stop()


def test_off_checks_nothing(tmp_path: Path) -> None:
    d = deadlock_daemon(tmp_path, "off")
    try:
        with d.connect() as m:
            lock = m.Lock("once")
            lock.acquire()
            assert lock.acquire(timeout=0.2) is False  # waits, as threading.Lock would
            assert m.status()["deadlocks_total"] == 0
    finally:
        d.stop()


def test_a_conditions_reacquire_that_closes_a_cycle_is_reported(tmp_path: Path) -> None:
    d = deadlock_daemon(tmp_path, "raise")  # a re-acquire has no acquire to fail: reported
    try:
        with d.connect() as a, d.connect() as b:
            results: dict[str, Any] = {}

            def waiter() -> None:
                a.Lock("other").acquire()
                cond = a.Condition("c")
                with cond:
                    results["notified"] = cond.wait(1.0)  # times out, then re-acquires
                a.Lock("other").release()

            t = threading.Thread(target=waiter)
            t.start()
            assert wait_until(lambda: status(d)["objects"].get("c", {}).get("waiters") == 1)
            cond_b = b.Condition("c")
            with cond_b:  # holds c's lock, then waits for "other" (held by a)
                results["other"] = b.Lock("other").acquire(timeout=4)
            t.join(20)
            assert results == {"notified": False, "other": False}
        # The log line is read from the daemon's stderr by another thread.
        assert wait_until(lambda: any("deadlock: " in line for line in d.lines), timeout_s=10)
        lines = [line for line in d.lines if "deadlock: " in line]
        assert len(lines) == 1 and "RLock 'c.lock'" in lines[0] and "Lock 'other'" in lines[0]
    finally:
        d.stop()
