"""One elected gateway returns expired and orphaned reservations of every queue.

Two real ``managerd serve --store etcd://...`` gateways on a real 3-node
cluster, sessions of 2 s. The elected one (the lowest key under
``<prefix>g/requeue/``) is killed with SIGKILL while a reservation made
through it (its session now orphaned) and one made through the other (about
to expire) are out: the other gateway takes over within the lease TTL and
returns both, including the one of a queue it never opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from managerd.store.etcd.client import EtcdClient
from managerd.store.etcd.kv import name_key, prefix_end

from conftest import Daemon, wait_until
from etcd_support import EtcdCluster, cluster

__all__ = ["cluster"]  # the fixture, from etcd_support


@pytest.fixture
def prefix() -> str:
    return "/r" + secrets.token_hex(4) + "/"


@pytest.fixture
def gateways(cluster: EtcdCluster, prefix: str, tmp_path: Path) -> Iterator[list[Daemon]]:
    store = "etcd://" + ",".join(cluster.endpoints)
    args = ["--store", store, "--store-prefix", prefix, "--session-ttl-s", "2"]
    made = [Daemon(tmp_path / "a", args=args), Daemon(tmp_path / "b", args=args)]
    made[1].authkey = made[0].authkey
    try:
        for d in made:
            d.start()
        yield made
    finally:
        for d in made:
            d.stop()


def read(cluster: EtcdCluster, key: bytes, *, first: bool = False) -> list[bytes]:
    """The values under ``key`` (only the oldest one if ``first``)."""

    async def body() -> list[bytes]:
        async with EtcdClient(cluster.endpoints) as etcd:
            got = await etcd.range(key, prefix_end(key), limit=int(first), oldest_first=first)
            return [kv.value for kv in got.kvs]

    return asyncio.run(body())


def elected_pid(cluster: EtcdCluster, prefix: str) -> int | None:
    leader = read(cluster, prefix.encode() + b"g/requeue/", first=True)
    return int(json.loads(leader[0])["pid"]) if leader else None


def queue_keys(cluster: EtcdCluster, prefix: str, name: str, part: bytes) -> int:
    return len(read(cluster, prefix.encode() + b"q/" + name_key(name) + b"/" + part))


def test_the_elected_gateway_dies_another_returns_reservations(
    cluster: EtcdCluster, prefix: str, gateways: list[Daemon]
) -> None:
    assert wait_until(lambda: elected_pid(cluster, prefix) is not None, timeout_s=20)
    pids = {d.proc.pid: d for d in gateways if d.proc is not None}
    elected = pids[elected_pid(cluster, prefix)]  # type: ignore[index]
    [other] = [d for d in gateways if d is not elected]

    # Through the elected one: a reservation whose session will be orphaned, on a
    # queue the other gateway never opens.
    on_elected = elected.connect()
    orphans = on_elected.Queue("orphans", visibility_timeout_s=600)
    orphans.put("x")
    assert orphans.reserve(timeout=10).value == "x"
    # Through the other: a reservation that expires after the kill.
    with other.connect() as on_other:
        expiring = on_other.Queue("expiring", visibility_timeout_s=3)
        expiring.put("y")
        assert expiring.reserve(timeout=10).value == "y"
        assert queue_keys(cluster, prefix, "orphans", b"r/") == 1

        elected.kill()
        with contextlib.suppress(Exception):
            on_elected.close()

        # Its session's lease ends within 2 s; the other gateway then leads.
        assert wait_until(lambda: elected_pid(cluster, prefix) == other.proc.pid, timeout_s=30)  # type: ignore[union-attr]
        assert wait_until(
            lambda: queue_keys(cluster, prefix, "orphans", b"i/") == 1, timeout_s=30
        ), other.log
        assert queue_keys(cluster, prefix, "orphans", b"r/") == 0
        assert expiring.get(timeout=30) == "y"  # returned at its deadline, then taken
        assert queue_keys(cluster, prefix, "expiring", b"r/") == 0
    assert "this gateway leads" in other.log
