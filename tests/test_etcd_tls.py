"""TLS to etcd: a real 3-node cluster serving TLS and asking for client certificates.

Certificates are made by openssl (as ``test_tls.py``): a CA, the members'
certificate (subjectAltName 127.0.0.1), a client certificate of that CA, and
one of another CA. The etcd client and a real gateway (``--store etcds://``
with ``MANAGERD_STORE_TLS_*``) work with the right client certificate; a
client without one, or with one of another CA, is refused.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_tls import _ca, _leaf

from managerd.store.etcd.client import EtcdClient, tls_credentials
from managerd.store.etcd.kv import Compare, EtcdError, Put, Target

from conftest import Daemon
from etcd_support import EtcdCluster, Tls, running_cluster


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("etcd-pki")
    ca = _ca(d, "ca")
    other = _ca(d, "otherca")
    return {
        "ca": ca[0],
        "server": _leaf(d, "server", ca, "IP:127.0.0.1"),
        "server_key": d / "server.key",
        "client": _leaf(d, "client", ca, "DNS:gateway", client=True),
        "client_key": d / "client.key",
        "stranger": _leaf(d, "stranger", other, "DNS:stranger", client=True),
        "stranger_key": d / "stranger.key",
    }


@pytest.fixture(scope="module")
def tls_cluster(
    pki: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EtcdCluster]:
    tls = Tls(pki["ca"], pki["server"], pki["server_key"], pki["client"], pki["client_key"])
    with running_cluster(tmp_path_factory.mktemp("etcd-tls"), tls=tls) as c:
        yield c


def test_the_client_with_a_client_certificate(
    tls_cluster: EtcdCluster, pki: dict[str, Path]
) -> None:
    async def body() -> None:
        creds = tls_credentials(
            pki["ca"].read_bytes(), pki["client"].read_bytes(), pki["client_key"].read_bytes()
        )
        async with EtcdClient(tls_cluster.endpoints, credentials=creds) as etcd:
            done = await etcd.txn(
                [Compare(b"/tls/k", Target.CREATE, "==", 0)], [Put(b"/tls/k", b"v")]
            )
            assert done.succeeded
            kv = await etcd.get(b"/tls/k")
            assert kv is not None and kv.value == b"v"
            lease = await etcd.lease_grant(5)
            assert await etcd.lease_keepalive(lease) == 5

    asyncio.run(body())


@pytest.mark.parametrize("who", [None, "stranger"])
def test_a_client_without_an_accepted_certificate_is_refused(
    tls_cluster: EtcdCluster, pki: dict[str, Path], who: str | None
) -> None:
    async def body() -> None:
        ca = pki["ca"].read_bytes()
        creds = (
            tls_credentials(ca)
            if who is None
            else tls_credentials(ca, pki[who].read_bytes(), pki[who + "_key"].read_bytes())
        )
        async with EtcdClient(
            tls_cluster.endpoints, credentials=creds, rpc_timeout_s=1.0, retry_budget_s=2.0
        ) as etcd:
            with pytest.raises(EtcdError):
                await etcd.get(b"/tls/k")

    asyncio.run(body())


def test_a_member_certificate_of_another_ca_is_refused(
    tls_cluster: EtcdCluster, pki: dict[str, Path]
) -> None:
    async def body() -> None:
        # The members' certificate is checked: trusting only another CA fails.
        creds = tls_credentials(
            pki["stranger"].read_bytes(),
            pki["client"].read_bytes(),
            pki["client_key"].read_bytes(),
        )
        async with EtcdClient(
            tls_cluster.endpoints, credentials=creds, rpc_timeout_s=1.0, retry_budget_s=2.0
        ) as etcd:
            with pytest.raises(EtcdError):
                await etcd.get(b"/tls/k")

    asyncio.run(body())


def test_a_gateway_over_tls(tls_cluster: EtcdCluster, pki: dict[str, Path], tmp_path: Path) -> None:
    env = {
        "MANAGERD_STORE_TLS_CA": str(pki["ca"]),
        "MANAGERD_STORE_TLS_CERT": str(pki["client"]),
        "MANAGERD_STORE_TLS_KEY": str(pki["client_key"]),
    }
    store = "etcds://" + ",".join(tls_cluster.endpoints)
    d = Daemon(tmp_path, env=env, args=["--store", store, "--store-prefix", "/tlsgw/"]).start()
    try:
        with d.connect() as m:
            q = m.Queue("jobs")
            q.put({"id": 1})
            assert q.get(timeout=10) == {"id": 1}
            with m.Lock("l") as token:
                assert token
        assert "TLS" in d.log
    finally:
        d.stop()
    listed = tls_cluster.etcdctl("get", "--prefix", "--keys-only", "/tlsgw/o/")
    assert listed.returncode == 0 and "jobs" in listed.stdout


def test_store_tls_settings() -> None:
    def config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "managerd", "config"],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, **env},
        )

    done = config(
        {
            "MANAGERD_STORE": "etcds://127.0.0.1:1",
            "MANAGERD_STORE_TLS_CA": "/ca.pem",
            "MANAGERD_STORE_TLS_CERT": "/c.pem",
            "MANAGERD_STORE_TLS_KEY": "/k.pem",
        }
    )
    settings = json.loads(done.stdout)
    assert settings["store"] == "etcds://127.0.0.1:1"
    assert settings["store_tls_cert"] == "/c.pem"
    refused = config({"MANAGERD_STORE": "etcd://127.0.0.1:1", "MANAGERD_STORE_TLS_CERT": "/c"})
    assert refused.returncode == 2
    assert "store_tls_key" in refused.stderr
