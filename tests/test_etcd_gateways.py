"""Two ``managerd serve --store etcd://...`` gateways on one real 3-node etcd cluster.

Real processes over real sockets: objects made through one gateway are the
same through the other, and a consumer blocked on gateway A (reached with
the multi-address client, A first) is woken by a put through gateway B.
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


def wait_for_waiter(gateway: Daemon) -> bool:
    def waiting() -> bool:
        with gateway.connect() as m:
            status = m.status()
            return bool(status["objects"].get("jobs", {}).get("waiters"))

    return wait_until(waiting, timeout_s=10)


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
