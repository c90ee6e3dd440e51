"""Two ``managerd serve --store etcd://...`` gateways on one real 3-node etcd cluster.

Real processes over real sockets: objects made through one gateway are the
same through the other, a consumer blocked on gateway A (reached with
the multi-address client, A first) is woken by a put through gateway B,
consumers blocked on both are answered in the order they blocked, and a
dead gateway's blocked consumer is passed over.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from managerd_client import connect

from conftest import Daemon, wait_until
from etcd_support import EtcdCluster, cluster

__all__ = ["cluster"]  # the fixture, from etcd_support


@pytest.fixture
def gateways(cluster: EtcdCluster, tmp_path: Path) -> Iterator[tuple[Daemon, Daemon]]:
    store = "etcd://" + ",".join(cluster.endpoints)
    prefix = "/g" + secrets.token_hex(4) + "/"
    args = ["--store", store, "--store-prefix", prefix]
    a = Daemon(tmp_path / "a", args=args)
    b = Daemon(tmp_path / "b", args=args)
    b.authkey = a.authkey
    started = []
    try:
        started.append(a.start())
        started.append(b.start())
        yield a, b
    finally:
        for d in started:
            d.stop()


def test_objects_are_the_same_through_both_gateways(gateways: tuple[Daemon, Daemon]) -> None:
    a, b = gateways
    with a.connect() as ma, b.connect() as mb:
        ma.dict("config")["mode"] = "fast"
        assert mb.dict("config")["mode"] == "fast"
        with ma.Lock("db") as token:
            assert token
            assert not mb.Lock("db").acquire(blocking=False)
        assert mb.Lock("db").acquire(blocking=False)


def test_a_consumer_blocked_on_one_gateway_is_woken_by_a_put_through_the_other(
    gateways: tuple[Daemon, Daemon],
) -> None:
    a, b = gateways
    got: list[Any] = []
    with connect(f"{a.address},{b.address}", authkey=a.authkey) as consumer:
        jobs = consumer.Queue("jobs")
        waiting = threading.Thread(target=lambda: got.append(jobs.get(timeout=20)))
        waiting.start()
        with b.connect() as producer:
            # Only once the get waits on A: its stats there count one waiter.
            assert wait_for_waiter(a)
            producer.Queue("jobs").put({"id": 1})
        waiting.join(25)
    assert got == [{"id": 1}]
    assert "store: etcd at" in a.log


def wait_for_waiter(gateway: Daemon, n: int = 1, name: str = "jobs") -> bool:
    """Whether ``gateway`` counts ``n`` calls parked on ``name`` within 10 s."""

    def waiting() -> bool:
        with gateway.connect() as m:
            status = m.status()
            return bool(status["objects"].get(name, {}).get("waiters", 0) >= n)

    return wait_until(waiting, timeout_s=10)


def _blocked_get(gateway: Daemon, name: str, got: dict[int, Any], i: int) -> threading.Thread:
    """A thread whose consumer blocks in ``get`` on ``gateway``: ``got[i]`` its item, or
    ``("failed", exception)``."""

    def get() -> None:
        try:
            with gateway.connect() as m:
                got[i] = m.Queue(name).get(timeout=30)
        except Exception as exc:
            got[i] = ("failed", exc)

    thread = threading.Thread(target=get)
    thread.start()
    return thread


def queue_places(cluster: EtcdCluster, name: str) -> int:
    """How many places the line of the queue ``name`` has in etcd (its ``j/`` keys)."""
    done = cluster.etcdctl("get", "--prefix", "/", "--keys-only")
    assert done.returncode == 0, done.stderr
    return sum(f"/q/{name}/j/" in line for line in done.stdout.splitlines())


def test_gets_blocked_on_two_gateways_are_answered_in_the_order_they_blocked(
    cluster: EtcdCluster, gateways: tuple[Daemon, Daemon]
) -> None:
    """Consumers block in turn on A, B, A, B, A (each once its place is in etcd); five
    items put one by one through B: the first to block gets the first item, and so
    on (one line across gateways)."""
    a, b = gateways
    got: dict[int, Any] = {}
    threads = []
    for i, gateway in enumerate([a, b, a, b, a]):
        threads.append(_blocked_get(gateway, "line", got, i))
        assert wait_until(lambda n=i + 1: queue_places(cluster, "line") == n, timeout_s=10)
    with b.connect() as producer:
        line = producer.Queue("line")
        for i in range(5):
            line.put(i)
    for thread in threads:
        thread.join(35)
    assert got == {i: i for i in range(5)}


def test_a_dead_gateways_blocked_get_is_passed_over(gateways: tuple[Daemon, Daemon]) -> None:
    """A consumer blocked on A, then one on B; A is killed: an item put through B goes
    to B's consumer (A's place is passed over once the item stands untaken), and the
    next item put, too, is B's next consumer's."""
    a, b = gateways
    got: dict[int, Any] = {}
    first = _blocked_get(a, "passed", got, 0)
    assert wait_for_waiter(a, 1, "passed")
    second = _blocked_get(b, "passed", got, 1)
    assert wait_for_waiter(b, 1, "passed")
    a.kill()
    with b.connect() as producer:
        producer.Queue("passed").put("for the living")
        second.join(35)
        assert got.get(1) == "for the living"
        third = _blocked_get(b, "passed", got, 2)
        assert wait_for_waiter(b, 1, "passed")
        producer.Queue("passed").put("next")
        third.join(35)
        assert got[2] == "next"
        assert producer.Queue("passed").qsize() == 0
    first.join(35)  # its gateway died: the call failed, nothing was taken for it
    assert got[0][0] == "failed"


@pytest.mark.parametrize("store", ["bogus", "etcd://", "etcd://host-without-port", "redis://h:1"])
def test_a_store_that_is_not_one_is_refused_at_start(store: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "managerd", "config", "--store", store],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "store" in done.stderr


def test_store_and_prefix_from_the_environment() -> None:
    env = {**os.environ, "MANAGERD_STORE": "etcd://127.0.0.1:1,127.0.0.1:2"}
    env["MANAGERD_STORE_PREFIX"] = "/other/"
    done = subprocess.run(
        [sys.executable, "-m", "managerd", "config"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    settings = json.loads(done.stdout)
    assert settings["store"] == "etcd://127.0.0.1:1,127.0.0.1:2"
    assert settings["store_prefix"] == "/other/"
