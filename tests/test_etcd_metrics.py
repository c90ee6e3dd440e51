"""A gateway's etcd metrics, scraped over HTTP from a real ``managerd serve --store etcd://``.

Round trips by RPC, calls per shared Txn, watches open, failed lease
keep-alives and session resumes (``managerd/store/etcd/telemetry.py``).
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_metrics import _promtool, samples, scrape, value

from managerd.store.etcd.client import EtcdClient
from managerd.store.etcd.kv import LeaseNotFound
from managerd.store.etcd.sessions import EtcdSession

from conftest import Daemon, free_port, wait_until
from etcd_support import EtcdCluster, cluster

__all__ = ["cluster"]  # the fixture, from etcd_support


@pytest.fixture
def gateway(cluster: EtcdCluster, tmp_path: Path) -> Iterator[tuple[Daemon, int]]:
    port = free_port()
    store = "etcd://" + ",".join(cluster.endpoints)
    prefix = "/x" + secrets.token_hex(4) + "/"
    d = Daemon(
        tmp_path, args=["--store", store, "--store-prefix", prefix, "--metrics-port", str(port)]
    )
    d.start()
    assert wait_until(lambda: "metrics on http://" in d.log)
    try:
        yield d, port
    finally:
        d.stop()


def test_a_gateway_shows_its_etcd_traffic(gateway: tuple[Daemon, int]) -> None:
    d, port = gateway
    with d.connect() as m:
        jobs = m.Queue("jobs")

        def produce() -> None:
            with d.connect() as mine:
                q = mine.Queue("jobs")
                for i in range(20):
                    q.put(i)

        threads = [threading.Thread(target=produce) for _ in range(4)]
        for t in threads:
            t.start()
        got = [jobs.get(timeout=30) for _ in range(80)]
        for t in threads:
            t.join(30)
        assert sorted(got) == sorted(list(range(20)) * 4)
        with m.Lock("l"):
            pass

        text = scrape(port)
    done = subprocess.run(
        [_promtool(), "check", "metrics"], input=text, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    found = samples(text)
    assert value(text, "managerd_etcd_request_seconds_count", rpc="txn") >= 1
    assert value(text, "managerd_etcd_request_seconds_count", rpc="range") >= 1
    assert value(text, "managerd_etcd_request_seconds_count", rpc="lease_grant") >= 1
    # Every Txn that left is counted once by size; all calls are in some batch.
    batches = value(text, "managerd_etcd_txn_batch_size_count")
    calls = value(text, "managerd_etcd_txn_batch_size_sum")
    assert batches >= 1 and calls >= batches
    assert value(text, "managerd_etcd_txn_batch_size_bucket", le="128.0") == batches
    assert value(text, "managerd_etcd_watches_open") >= 1  # the names mirror's watch at least
    assert value(text, "managerd_etcd_lease_keepalive_failures_total") == 0
    assert value(text, "managerd_etcd_session_resumes_total") == 0
    assert (
        "managerd_etcd_request_seconds_bucket",
        frozenset({("rpc", "txn"), ("le", "+Inf")}),
    ) in found


def test_keepalive_failures_and_resumes_are_counted(cluster: EtcdCluster) -> None:
    async def body() -> None:
        async with EtcdClient(cluster.endpoints) as etcd, EtcdClient(cluster.endpoints) as other:
            session = await EtcdSession.open(etcd, 5, resume_token="secret", gateway="a")
            assert await EtcdSession.take_over(other, "not it", "b") is None
            resumed = await EtcdSession.take_over(other, "secret", "b")
            assert resumed is not None
            assert other.metrics.session_resumes == 1
            await resumed.abandon()
            await session.close()
            with pytest.raises(LeaseNotFound):
                await etcd.lease_keepalive(session.lease_id)
            assert etcd.metrics.keepalive_failures == 1
            assert etcd.metrics.latency["lease_keepalive"].count >= 1

    asyncio.run(body())
