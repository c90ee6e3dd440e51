"""Deadlocks named across gateways (``managerd/store/etcd/deadlocks.py``).

Two real gateways on one real 3-node etcd cluster; each client is a real
process connected to its own gateway. Two of them each hold one lock and
ask for the other's: the wait-for graph spans both gateways, read from
etcd. ``report``: exactly one gateway logs it, both show it in ``status``
while it stands, the cluster's ``managerd_deadlocks_total`` is 1 at both.
``raise``: exactly one acquire fails with ``DeadlockDetected``; a Condition's
re-acquire that closes a cycle is reported, never refused.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import workers_deadlock as wd
from conftest import Daemon, free_port, metric, wait_until
from etcd_support import EtcdCluster, cluster
from workers import join_all, start

__all__ = ["cluster"]  # the fixture, from etcd_support


def gateways(cluster: EtcdCluster, tmp: Path, mode: str) -> tuple[Daemon, Daemon, int, int]:
    prefix = "/dl" + secrets.token_hex(4) + "/"
    args = ["--store", "etcd://" + ",".join(cluster.endpoints), "--store-prefix", prefix]
    args += ["--deadlock", mode]
    ports = free_port(), free_port()
    a = Daemon(tmp / "a", args=[*args, "--metrics-port", str(ports[0])])
    b = Daemon(tmp / "b", args=[*args, "--metrics-port", str(ports[1])])
    b.authkey = a.authkey
    return a, b, ports[0], ports[1]


@pytest.fixture
def reporting(cluster: EtcdCluster, tmp_path: Path) -> Iterator[tuple[Daemon, Daemon, int, int]]:
    yield from _running(gateways(cluster, tmp_path, "report"))


@pytest.fixture
def raising(cluster: EtcdCluster, tmp_path: Path) -> Iterator[tuple[Daemon, Daemon, int, int]]:
    yield from _running(gateways(cluster, tmp_path, "raise"))


def _running(
    made: tuple[Daemon, Daemon, int, int],
) -> Iterator[tuple[Daemon, Daemon, int, int]]:
    a, b, _, _ = made
    started = []
    try:
        started.append(a.start())
        started.append(b.start())
        yield made
    finally:
        for d in started:
            d.stop()


def across(a: Daemon, b: Daemon, timeout_s: float) -> list[Any]:
    """Client 1 through A holds ``a`` and wants ``b``; client 2 through B the reverse."""
    return [
        start(wd.cycle_member, d.address, a.authkey, first, second, "meet", 2, timeout_s, "out")
        for d, first, second in ((a, "a", "b"), (b, "b", "a"))
    ]


def status(d: Daemon) -> dict[str, Any]:
    with d.connect() as m:
        return m.status()


def test_a_cycle_across_two_gateways_is_reported_once(
    reporting: tuple[Daemon, Daemon, int, int],
) -> None:
    a, b, port_a, port_b = reporting
    procs = across(a, b, timeout_s=8.0)
    # Standing: shown by both gateways, whichever found it.
    assert wait_until(lambda: status(a)["deadlocks"] and status(b)["deadlocks"], timeout_s=30)
    (found,) = status(b)["deadlocks"]
    assert status(a)["deadlocks"] == [found]
    assert sorted(s["waits_for"] for s in found["steps"]) == ["a", "b"]
    assert len({s["pid"] for s in found["steps"]}) == 2
    assert all(s["thread"] is not None and s["id"] for s in found["steps"])
    lines = [line for d in (a, b) for line in d.lines if "deadlock: " in line]
    assert len(lines) == 1, lines  # one gateway names it
    for step in found["steps"]:
        assert f":{step['pid']}:{step['thread']} (session {step['id']})" in lines[0]
    assert "Lock 'a'" in lines[0] and "Lock 'b'" in lines[0]
    assert metric(port_a, "managerd_deadlocks_total") == 1  # the cluster's count
    assert metric(port_b, "managerd_deadlocks_total") == 1

    join_all(procs)
    # The timeouts broke it: no longer standing, at either gateway.
    assert wait_until(lambda: not status(a)["deadlocks"] and not status(b)["deadlocks"])
    assert status(a)["deadlocks_total"] == 1 and status(b)["deadlocks_total"] == 1
    with a.connect() as m:
        outcomes = sorted(m.dict("out").values())
    assert "timeout" in outcomes


def test_raise_fails_one_acquire_across_two_gateways(
    raising: tuple[Daemon, Daemon, int, int],
) -> None:
    a, b, _, _ = raising
    join_all(across(a, b, timeout_s=20.0))
    with b.connect() as m:
        outcomes = dict(m.dict("out").items())
    refused = [k for k, v in outcomes.items() if v.startswith("deadlock: ")]
    assert len(refused) == 1, outcomes  # the acquire that closed it, only
    assert [v for v in outcomes.values() if v == "acquired"] == ["acquired"]
    assert "Lock 'a'" in outcomes[refused[0]] and "Lock 'b'" in outcomes[refused[0]]
    # Counted (at the next refresh: stats.py), never standing.
    assert wait_until(lambda: status(a)["deadlocks_total"] == 1, timeout_s=30)
    assert status(a)["deadlocks"] == [] and status(b)["deadlocks"] == []


def test_off_names_nothing(cluster: EtcdCluster, tmp_path: Path) -> None:
    a, b, _, _ = gateways(cluster, tmp_path, "off")
    for made in _running((a, b, 0, 0)):
        procs = across(a, b, timeout_s=3.0)
        join_all(procs)
        with a.connect() as m:
            outcomes = sorted(m.dict("out").values())
        # A timeout breaks the cycle; the other wait, begun a moment later through the
        # other gateway, may end by taking the lock the first one then released.
        assert outcomes in (["timeout", "timeout"], ["acquired", "timeout"]), outcomes
        assert status(a)["deadlocks_total"] == 0 and status(b)["deadlocks_total"] == 0
        assert not any("deadlock" in line for d in made[:2] for line in d.lines)


def test_a_conditions_reacquire_across_gateways_is_reported_not_refused(
    raising: tuple[Daemon, Daemon, int, int],
) -> None:
    a, b, _, _ = raising  # a re-acquire has no acquire to fail: reported even so
    with a.connect() as ma, b.connect() as mb:
        results: dict[str, Any] = {}

        def waiter() -> None:
            ma.Lock("other").acquire()
            cond = ma.Condition("c")
            with cond:
                results["notified"] = cond.wait(1.0)  # times out, then re-acquires
            ma.Lock("other").release()

        t = threading.Thread(target=waiter)
        t.start()
        assert wait_until(lambda: status(a)["objects"].get("c", {}).get("waiters") == 1)
        cond_b = mb.Condition("c")
        with cond_b:  # holds c's lock, then waits for "other" (held through A)
            results["other"] = mb.Lock("other").acquire(timeout=4)
        t.join(20)
        assert results == {"notified": False, "other": False}
    assert wait_until(lambda: [ln for d in (a, b) for ln in d.lines if "deadlock: " in ln])
    lines = [line for d in (a, b) for line in d.lines if "deadlock: " in line]
    assert len(lines) == 1, lines
    assert "RLock 'c.lock'" in lines[0] and "Lock 'other'" in lines[0]
